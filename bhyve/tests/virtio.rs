//! virtio guest tests (tier: needs `/dev/kvm`): the `virtio_*` test guests drive each virtio device
//! model through the `bhyve` binary (`-s SLOT[:FUNC],virtio-...`) with their own ring-3 driver
//! (`guests/asm/virtio.inc`), and the host side checks what the guest did: the image file holds the
//! pattern the guest wrote, a read-only image is untouched, console bytes round-trip through a Unix
//! socket, the entropy device returns bytes, and Ethernet frames cross a real tap both ways.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Longest a guest run may take before the test kills it (the guests bound every wait themselves;
/// this catches a hung monitor).
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn bhyve() -> &'static str {
    env!("CARGO_BIN_EXE_bhyve")
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (a host with KVM); every developer and CI machine has one"
    );
}

/// A fresh directory for one test, holding every guest image; removed when the test passes (kept
/// for a look when it fails).
struct WorkDir(PathBuf);

impl std::ops::Deref for WorkDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn work_dir(test: &str) -> WorkDir {
    let dir = std::env::temp_dir().join(format!("bhyve-virtio-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    guests::write_all(&dir).expect("write guest images");
    WorkDir(dir)
}

/// A VM name no other run shares (each VM has a control socket named after it).
fn vm_name(guest: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{guest}-{}-{n}", std::process::id())
}

/// The `bhyve` command line for `guest` with `cmdline` and extra arguments (the devices).
fn command(dir: &Path, guest: &str, cmdline: &str, extra: &[String]) -> Command {
    require_kvm();
    let mut cmd = Command::new(bhyve());
    cmd.args(["-l", "com1,stdio"])
        .arg("-o")
        .arg(format!(
            "boot.kernel={}",
            dir.join(format!("{guest}.elf")).display()
        ))
        .arg("-o")
        .arg(format!("boot.cmdline={cmdline}"))
        .args(extra)
        .arg(vm_name(guest))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` (killing it after [`RUN_LIMIT`]) and prints what it said.
fn finish(mut child: Child, what: &str) -> Output {
    let start = Instant::now();
    // Drain the pipes on threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bhyve") {
            break s;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let s = child.wait().expect("reap bhyve");
            eprintln!("--- {what}: killed after {RUN_LIMIT:?}");
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    };
    eprintln!(
        "--- {what}: status {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        start.elapsed(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn run(dir: &Path, guest: &str, cmdline: &str, extra: &[String]) -> Output {
    let child = command(dir, guest, cmdline, extra)
        .spawn()
        .expect("run bhyve");
    finish(child, &format!("{guest} {cmdline}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn dev(spec: &str) -> Vec<String> {
    vec!["-s".into(), spec.into()]
}

/// BAR 0 of `0:slot.func` as the platform places it (bhyve/src/pci.rs).
fn bar0(slot: u64, func: u64) -> u64 {
    0xC000_0000 + ((slot << 3) | func) * 0x1_0000
}

/// The guests' `vio_pattern`: xorshift64 from `seed ^ 0x9E3779B97F4A7C15`, little-endian words.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The guests' `vio_fnv1a`.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The number that follows `prefix` in the guest's output.
fn number_after(out: &str, prefix: &str) -> Option<u64> {
    let rest = &out[out.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A counter of `-o stats.print=true` (the last number on the line that starts with `what`).
fn counter(stderr: &str, what: &str) -> Option<u64> {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with(what))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const IMAGE_SECTORS: usize = 2048;

/// Background of the test images: not zero, not the pattern, different in every sector.
fn background(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i / 512 + i * 7) % 251).unwrap_or(0))
        .collect()
}

#[test]
fn virtio_blk_writes_flushes_and_reads_back_the_pattern_and_the_image_holds_it() {
    let dir = work_dir("blk");
    let img = dir.join("disk.img");
    let before = background(IMAGE_SECTORS * 512);
    std::fs::write(&img, &before).unwrap();
    let (lba, n, seed, bench) = (100usize, 8usize, 7u64, 200u64);
    let mut args = dev(&format!("4,virtio-blk,{},ser=BHYVE-TEST-4", img.display()));
    args.extend(["-o".to_string(), "stats.print=true".to_string()]);
    let o = run(
        &dir,
        "virtio_blk",
        &format!("msix=1 lba={lba} n={n} seed={seed} bench={bench}"),
        &args,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    assert!(
        out.contains("virtio: device 1af4:1042 at pci 0:4.0"),
        "{out}"
    );
    assert!(
        out.contains(&format!("virtio: BAR0 {:#018x}", bar0(4, 0))),
        "BAR 0 where the platform places it: {out}"
    );
    assert!(out.contains(&format!("virtio_blk: capacity {IMAGE_SECTORS}")));
    let want = pattern(seed, n * 512);
    let h = fnv1a(&want);
    assert!(
        out.contains(&format!("virtio_blk: pattern fnv1a {h:#018x}")),
        "{out}"
    );
    assert!(out.contains(&format!("write OK: {n} sectors at sector {lba}")));
    assert!(out.contains("virtio_blk: flush OK"));
    assert!(out.contains(&format!("read back equal, fnv1a {h:#018x}")));
    assert!(out.contains(&format!(
        "read at sector {IMAGE_SECTORS} (past the end) answered IOERR"
    )));
    assert!(out.contains("virtio_blk: id \"BHYVE-TEST-4\""), "{out}");
    // The image file: the pattern at the right offset, every other byte as it was.
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), before.len(), "the image changed size");
    let at = lba * 512;
    assert!(
        after[at..at + n * 512] == want[..],
        "the image does not hold the pattern"
    );
    assert!(
        after[..at] == before[..at],
        "bytes before the written sectors changed"
    );
    assert!(
        after[at + n * 512..] == before[at + n * 512..],
        "bytes after the written sectors changed"
    );
    // MSI-X: 5 requests (write, flush, read, read past the end, get-id) plus the bench reads, and
    // at least one interrupt on queue 0's vector for each (the guest waited for each).
    let requests = number_after(&out, "virtio_blk: MSI-X: ").expect("MSI-X line");
    assert_eq!(requests, 5 + bench);
    let irqs = number_after(&out, " requests, interrupts on queue 0: ").expect("interrupt count");
    assert!(
        irqs >= requests,
        "{irqs} interrupts for {requests} requests"
    );
    let per = number_after(&out, " us, ").expect("bench line");
    eprintln!("virtio-blk 4 KiB read round trip with MSI-X: {per} us per request");
    // Every completion interrupt went through the vector's irqfd: no KVM_SIGNAL_MSI ioctl on the
    // completion path.
    let err = stderr(&o);
    let by_irqfd = counter(&err, "4.0 virtio-blk MSI-X messages by irqfd").expect("irqfd counter");
    assert!(
        by_irqfd >= requests,
        "{by_irqfd} irqfd messages for {requests} requests"
    );
    assert_eq!(
        counter(&err, "4.0 virtio-blk MSI-X messages by KVM_SIGNAL_MSI"),
        Some(0)
    );
    assert_eq!(
        counter(&err, "4.0 virtio-blk MSI-X delivery failures"),
        Some(0)
    );
}

#[test]
fn virtio_blk_eager_writeback_option_keeps_writes_exact_and_a_bad_value_is_refused() {
    let dir = work_dir("eagerwb");
    let img = dir.join("disk.img");
    let mib = 1usize << 20;
    let before = background(16 * mib);
    for (opt, seed) in [("eagerwb=1M", 11u64), ("eagerwb=off", 12)] {
        std::fs::write(&img, &before).unwrap();
        let mut args = dev(&format!("4,virtio-blk,{},{opt}", img.display()));
        args.extend(["-o".to_string(), "stats.print=true".to_string()]);
        // 8 sequential 1 MiB writes, 4 in flight, then a FLUSH.
        let o = run(
            &dir,
            "virtio_blk",
            &format!("msix=1 swrite=8 wqd=4 seed={seed}"),
            &args,
        );
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{opt}: {out}");
        assert!(out.contains("BENCH swrite ops=8 "), "{opt}: {out}");
        let after = std::fs::read(&img).unwrap();
        assert_eq!(after.len(), before.len(), "{opt}: the image changed size");
        assert!(after[..mib] == pattern(seed, mib)[..], "{opt}: first MiB");
        assert!(
            after[8 * mib..] == before[8 * mib..],
            "{opt}: bytes after the written 8 MiB changed"
        );
        let err = stderr(&o);
        assert_eq!(
            counter(&err, "4.0 virtio-blk early writebacks failed (eagerwb)"),
            Some(0),
            "{opt}"
        );
        let early = counter(&err, "4.0 virtio-blk bytes written back early (eagerwb)");
        if opt == "eagerwb=off" {
            assert_eq!(early, Some(0), "{opt}");
        } else {
            // How much was started before the FLUSH synced it all depends on scheduling.
            assert!(early.is_some_and(|b| b <= 8 << 20), "{opt}: {early:?}");
        }
    }
    let o = run(
        &dir,
        "virtio_blk",
        "msix=1",
        &dev(&format!("4,virtio-blk,{},eagerwb=lots", img.display())),
    );
    assert_ne!(o.status.code(), Some(guests::STATUS_OK));
    let err = stderr(&o);
    assert!(
        err.contains("bad value for 'eagerwb=lots'"),
        "the refusal names the option: {err}"
    );
}

#[test]
fn virtio_msix_by_irqfd_masked_vector_pends_and_unmask_delivers_and_route_churn_is_cheap() {
    let dir = work_dir("irqfd");
    let churn = 5_000u64;
    let mut args = dev("3,virtio-rnd");
    args.extend(["-o".to_string(), "stats.print=true".to_string()]);
    let o = run(
        &dir,
        "virtio_rng",
        &format!("msix=1 maskpba=1 churn={churn}"),
        &args,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    // Masked: the completion set the PBA bit (entry 1 = queue 0) and sent nothing; the unmask
    // delivered it once and cleared the bit.
    assert!(
        out.contains("virtio_rng: masked: completion without interrupt, PBA 0x0000000000000002"),
        "{out}"
    );
    assert!(out.contains("virtio_rng: masked: unmask delivered 1 interrupt, PBA bit clear"));
    // The guest rewrote the entry 5000 times: the interrupt followed the last message, and the
    // route was updated only when the vector fired (not once per table write).
    assert!(out.contains("virtio_rng: churn: interrupt on vector 0x61 after the rewrites"));
    assert!(out.contains("virtio_rng: churn: back on vector 0x51"));
    let err = stderr(&o);
    let get = |what: &str| counter(&err, &format!("3.0 virtio-rnd {what}")).expect(what);
    // Deliveries: 2 plain requests, the masked one (on unmask), 2 around the churn.
    assert_eq!(get("MSI-X messages by irqfd"), 5, "{err}");
    assert_eq!(get("MSI-X messages by KVM_SIGNAL_MSI"), 0);
    // First message, 0x61, 0x51 again.
    assert_eq!(get("MSI-X route updates"), 3);
    let tables = counter(&err, "GSI routing tables installed").expect("route tables");
    assert!(
        tables < 20,
        "{tables} routing tables installed for {churn} table writes"
    );
}

#[test]
fn virtio_blk_polled_on_function_2_is_found_by_a_bus_scan() {
    let dir = work_dir("blkfn");
    let img = dir.join("disk.img");
    let before = background(IMAGE_SECTORS * 512);
    std::fs::write(&img, &before).unwrap();
    let (lba, n, seed) = (IMAGE_SECTORS - 16, 16usize, 0x5eed_u64);
    let mut devices = dev("7,virtio-rnd");
    devices.extend(dev(&format!("6:2,virtio-blk,{}", img.display())));
    let o = run(
        &dir,
        "virtio_blk",
        &format!("lba={lba} n={n} seed={seed} bench=200"),
        &devices,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    assert!(
        out.contains("virtio: device 1af4:1042 at pci 0:6.2"),
        "{out}"
    );
    assert!(out.contains(&format!("virtio: BAR0 {:#018x}", bar0(6, 2))));
    assert!(!out.contains("MSI-X"), "polling mode takes no interrupts");
    let want = pattern(seed, n * 512);
    assert!(out.contains(&format!("read back equal, fnv1a {:#018x}", fnv1a(&want))));
    let after = std::fs::read(&img).unwrap();
    assert!(
        after[lba * 512..] == want[..],
        "the last sectors do not hold the pattern"
    );
    assert!(after[..lba * 512] == before[..lba * 512]);
    let per = number_after(&out, " us, ").expect("bench line");
    eprintln!("virtio-blk 8 KiB read round trip, polled: {per} us per request");
}

#[test]
fn virtio_blk_read_only_offers_f_ro_answers_writes_ioerr_and_leaves_the_image_alone() {
    let dir = work_dir("blkro");
    let img = dir.join("ro.img");
    let before = pattern(99, IMAGE_SECTORS * 512);
    std::fs::write(&img, &before).unwrap();
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let (lba, n) = (3usize, 8usize);
    let spec = format!("5,virtio-blk,{},ro", img.display());
    let o = run(
        &dir,
        "virtio_blk",
        &format!("ro=1 slot=5 lba={lba} n={n} seed=7"),
        &dev(&spec),
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    assert!(out.contains("virtio: device 1af4:1042 at pci 0:5.0"));
    assert!(out.contains("virtio_blk: read-only: F_RO offered, write answered IOERR"));
    let h = fnv1a(&before[lba * 512..(lba + n) * 512]);
    assert!(
        out.contains(&format!("virtio_blk: read-only: fnv1a {h:#018x}")),
        "the guest read what the image holds: {out}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the read-only image changed"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), mtime);

    // The guest's own check can fail: told to expect a writable disk, it refuses F_RO.
    let o = run(&dir, "virtio_blk", "slot=5", &dev(&spec));
    assert_eq!(o.status.code(), Some(guests::STATUS_FAIL));
    assert!(stdout(&o).contains("FAIL: the device offers F_RO but ro=1 was not given"));
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn virtio_rng_returns_two_different_nonzero_64_byte_blocks_polled_and_with_msix() {
    let dir = work_dir("rng");
    let mut seen = Vec::new();
    for msix in [0, 1] {
        let o = run(
            &dir,
            "virtio_rng",
            &format!("msix={msix}"),
            &dev("3,virtio-rnd"),
        );
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
        assert!(out.contains("virtio: device 1af4:1044 at pci 0:3.0"));
        let block = |tag: &str| -> Vec<u8> {
            let line = out
                .lines()
                .find_map(|l| l.strip_prefix(tag))
                .unwrap_or_else(|| panic!("no {tag:?} line: {out}"));
            assert_eq!(line.len(), 128, "64 bytes in hex: {line:?}");
            (0..64)
                .map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).expect("hex"))
                .collect()
        };
        let (a, b) = (block("virtio_rng: 1: "), block("virtio_rng: 2: "));
        assert!(a.iter().any(|x| *x != 0) && b.iter().any(|x| *x != 0));
        assert_ne!(a, b);
        seen.push(a);
        seen.push(b);
        if msix == 1 {
            let irqs = number_after(&out, "MSI-X interrupts on queue 0: ").expect("irq line");
            assert!(irqs >= 2, "{irqs} interrupts for 2 requests");
        }
    }
    assert_ne!(seen[0], seen[2], "two boots returned the same entropy");
}

#[test]
fn virtio_rng_without_msix_interrupts_through_intx_on_the_io_apic_input_the_prt_names() {
    let dir = work_dir("intx");
    let mut args = dev("3,virtio-rnd");
    args.extend(["-o".to_string(), "stats.print=true".to_string()]);
    let o = run(&dir, "virtio_rng", "msix=0 intx=1", &args);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    // Slot 3, INTA: I/O APIC input 16 + (3 + 0) % 8, as the DSDT's _PRT says (loader::acpi).
    let gsi = loader::pci_intx_gsi(3, 0);
    assert_eq!(gsi, 19);
    assert!(
        out.contains(&format!("virtio_rng: INTx: pin INTA, line {gsi}")),
        "{out}"
    );
    // One interrupt per completion: the handler's ISR read deasserted the level each time.
    assert!(
        out.contains(
            "virtio_rng: INTx: 2 interrupts on vector 0x70, ISR bits seen by the handler 1"
        ),
        "{out}"
    );
    let err = stderr(&o);
    assert_eq!(
        counter(&err, "3.0 virtio-rnd MSI-X messages by irqfd"),
        Some(0)
    );
    assert_eq!(
        counter(&err, "3.0 virtio-rnd MSI-X messages by KVM_SIGNAL_MSI"),
        Some(0)
    );
}

#[test]
fn virtio_rng_bar_moved_by_the_guest_is_followed_with_its_notify() {
    let dir = work_dir("movebar");
    for msix in [0, 1] {
        let mut args = dev("3,virtio-rnd");
        args.extend(["-o".to_string(), "stats.print=true".to_string()]);
        let to = 0xc800_0000u64;
        let o = run(
            &dir,
            "virtio_rng",
            &format!("msix={msix} movebar={to}"),
            &args,
        );
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
        assert!(
            out.contains(&format!(
                "virtio_rng: BAR0 moved from {:#018x} to {to:#018x}",
                bar0(3, 0)
            )),
            "{out}"
        );
        assert!(out.contains(
            "virtio_rng: BAR0 moved: the old address reads all-ones, a request at the new one completed"
        ));
        let err = stderr(&o);
        // Decode on at the platform's place, then the move; the notify eventfd followed (bound
        // twice, unbound once); nothing refused.
        assert_eq!(counter(&err, "BAR placements followed"), Some(2), "{err}");
        assert_eq!(counter(&err, "BAR placements refused"), Some(0));
        assert_eq!(counter(&err, "notify ioeventfds bound"), Some(2));
        assert_eq!(counter(&err, "notify ioeventfds unbound"), Some(1));
        // The notify after the move went through the eventfd at the new address: no notify
        // reached the device's register path.
        assert_eq!(
            counter(&err, "3.0 virtio-rnd virtio chains completed"),
            Some(3)
        );
        assert_eq!(
            counter(&err, "3.0 virtio-rnd virtio notifies by register write"),
            Some(0)
        );
    }
}

/// Connects to the console socket `child` listens on (it appears once the device is created).
fn connect(child: &mut Option<Child>, path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
        if let Some(c) = child.as_mut() {
            if c.try_wait().ok().flatten().is_some() {
                let o = finish(child.take().expect("child"), "virtio_console");
                panic!("bhyve ended before its console socket appeared: {o:?}");
            }
        }
    }
}

#[test]
fn virtio_console_lines_round_trip_through_a_unix_socket() {
    let dir = work_dir("console");
    for msix in [0, 1] {
        let sock = dir.join(format!("console{msix}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut child = Some(
            command(
                &dir,
                "virtio_console",
                &format!("msix={msix}"),
                &dev(&format!("2,virtio-console,unix={}", sock.display())),
            )
            .spawn()
            .expect("run bhyve"),
        );
        let s = connect(&mut child, &sock);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(b"hello guest\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).expect("the guest's line");
        assert_eq!(line, "hello host from virtio_console\n");
        // A long line with every printable byte, split across the guest's 256-byte buffers.
        let long: Vec<u8> = (0..3000u32)
            .map(|i| u8::try_from(0x20 + (i * 7 + msix) % 95).unwrap_or(b'x'))
            .collect();
        let mut msg = long.clone();
        msg.push(b'\n');
        w.write_all(&msg).unwrap();
        let mut echo = Vec::new();
        r.read_until(b'\n', &mut echo).expect("the echo");
        let mut want = b"echo: ".to_vec();
        want.extend_from_slice(&msg);
        assert!(echo == want, "echo of {} bytes differs", echo.len());
        let o = finish(child.take().expect("child"), "virtio_console");
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
        assert!(out.contains("virtio_console: received line: hello guest"));
        assert!(out.contains(&format!(
            "virtio_console: received 3000 bytes, fnv1a {:#018x}",
            fnv1a(&long)
        )));
        if msix == 1 {
            let rx = number_after(&out, "MSI-X interrupts: receiveq ").expect("irq line");
            let tx = number_after(&out, ", transmitq ").expect("irq line");
            assert!(rx >= 2 && tx >= 2, "rx {rx} tx {tx}");
        }
    }
}

#[test]
fn virtio_console_guest_gives_up_when_the_host_stays_silent() {
    let dir = work_dir("console-silent");
    let sock = dir.join("console.sock");
    let mut child = Some(
        command(
            &dir,
            "virtio_console",
            "wait=1",
            &dev(&format!("2,virtio-console,unix={}", sock.display())),
        )
        .spawn()
        .expect("run bhyve"),
    );
    let _s = connect(&mut child, &sock); // connected, but says nothing
    let start = Instant::now();
    let o = finish(child.take().expect("child"), "virtio_console silent host");
    assert_eq!(o.status.code(), Some(guests::STATUS_FAIL));
    assert!(stdout(&o).contains("FAIL: no complete line from the host within wait="));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "the wait was not bounded"
    );
}

// ---------------------------------------------------------------------------------------------
// virtio-net over a real tap in a network namespace.

const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0xa0, 0x98, 0x00, 0x00, 0x05];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// A network namespace, deleted (with its tap) on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// An AF_PACKET socket for EtherType 0x88b5 bound to `tap` inside namespace `ns` (opened on a
/// thread that entered the namespace: setns(CLONE_NEWNET) affects only the calling thread, and a
/// socket keeps the namespace it was created in).
fn packet_socket(ns: &str, tap: &str) -> Result<OwnedFd, String> {
    let (ns, tap) = (ns.to_string(), tap.to_string());
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on a namespace descriptor we hold; affects only this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let proto = ETHERTYPE.to_be();
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(tap.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name; the lookup runs in this thread's namespace.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(format!("no interface {tap} in the namespace"));
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(index).map_err(|e| e.to_string())?;
        let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        // SAFETY: bind with a properly sized sockaddr_ll that outlives the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(format!(
                "bind to {tap}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let tl = u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16);
        // SAFETY: setsockopt with a timeval that outlives the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast::<libc::c_void>(),
                tl,
            )
        };
        Ok(fd)
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}

/// Receives frames until one satisfies `want` or `limit` passes.
fn recv_frame(fd: &OwnedFd, limit: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    while start.elapsed() < limit {
        // SAFETY: recv into a buffer we own, with its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            let f = &buf[..n];
            if want(f) {
                return Some(f.to_vec());
            }
        }
    }
    None
}

fn payload(f: &[u8]) -> &[u8] {
    let p = f.get(14..).unwrap_or_default();
    let end = p.iter().position(|b| *b == 0).unwrap_or(p.len());
    &p[..end]
}

#[test]
fn virtio_net_frames_cross_a_tap_in_a_namespace_both_ways() {
    require_kvm();
    let pid = std::process::id();
    let ns = format!("bhyve-vnet-{pid}");
    let tap = format!("vnet{}", pid % 100_000);
    if let Err(e) = ip(&["netns", "add", &ns]) {
        eprintln!("SKIP: cannot create a network namespace ({e}); needs CAP_NET_ADMIN");
        return;
    }
    let _guard = Netns(ns.clone());
    if let Err(e) = ip(&["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"])
        .and_then(|()| ip(&["-n", &ns, "link", "set", &tap, "up"]))
    {
        eprintln!("SKIP: cannot create a tap in the namespace ({e})");
        return;
    }
    // Opened before the guest runs, so its first frame is seen.
    let sock = packet_socket(&ns, &tap).expect("packet socket in the namespace");
    let dir = work_dir("net");
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, bhyve(), "-l", "com1,stdio"])
        .arg("-o")
        .arg(format!(
            "boot.kernel={}",
            dir.join("virtio_net.elf").display()
        ))
        .args(["-o", "boot.cmdline=msix=1", "-s"])
        .arg(format!("5,virtio-net,{tap},mac={mac}"))
        .arg(vm_name("virtio_net"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("run bhyve in the namespace");

    // The guest's broadcast frame.
    let guest = recv_frame(&sock, Duration::from_secs(20), |f| {
        payload(f).starts_with(b"bhyve-rs virtio_net guest frame")
    });
    let Some(guest) = guest else {
        let o = finish(child, "virtio_net");
        panic!("no frame from the guest on the tap: {}", stdout(&o));
    };
    assert_eq!(guest.len(), 60, "padded to the Ethernet minimum");
    assert_eq!(&guest[..6], &[0xff; 6], "broadcast");
    assert_eq!(&guest[6..12], &GUEST_MAC, "from the MAC given with mac=");
    assert_eq!(&guest[12..14], &ETHERTYPE.to_be_bytes());

    // Ours, to the guest's MAC.
    let nonce = format!(
        "{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ pid
    );
    let text = format!("bhyve-rs host frame {nonce}");
    let mut frame = GUEST_MAC.to_vec();
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(text.as_bytes());
    // SAFETY: send from a buffer we own, with its length, on the bound packet socket.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            frame.as_ptr().cast::<libc::c_void>(),
            frame.len(),
            0,
        )
    };
    assert_eq!(
        usize::try_from(sent).ok(),
        Some(frame.len()),
        "send on the tap"
    );

    // The guest's echo, to us.
    let echo = recv_frame(&sock, Duration::from_secs(20), |f| {
        payload(f).starts_with(b"echo: ")
    });
    let o = finish(child, "virtio_net");
    let out = stdout(&o);
    let echo = echo.unwrap_or_else(|| panic!("no echo from the guest: {out}"));
    assert_eq!(&echo[..6], &HOST_MAC, "echo addressed to the sender");
    assert_eq!(&echo[6..12], &GUEST_MAC);
    assert_eq!(payload(&echo), format!("echo: {text}").as_bytes());
    assert_eq!(o.status.code(), Some(guests::STATUS_OK), "{out}");
    assert!(
        out.contains(&format!("virtio_net: mac {mac} link 1")),
        "{out}"
    );
    assert!(out.contains(&format!(
        "virtio_net: received {}-byte frame from 02:00:00:00:00:01: \"{text}\"",
        frame.len()
    )));
    let rx = number_after(&out, "MSI-X interrupts: rx ").expect("irq line");
    assert!(rx >= 1, "{rx}");
}
