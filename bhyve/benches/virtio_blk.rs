//! virtio-blk throughput of the same test guest (`virtio_blk`, `rread=` / `swrite=` modes) under
//! our `bhyve` and under `qemu-system-x86_64 -enable-kvm -M pc` with `virtio-blk-pci`, on the same
//! raw image, interleaved in one run. The guest times itself (TSC calibrated against the PM timer)
//! from its first notify to its last completion, so firmware and boot do not count:
//!
//! - 4 KiB random reads (xorshift LBAs over the whole disk, 4 KiB aligned): IOPS;
//! - 1 MiB sequential writes then a FLUSH: MB/s (10^6 bytes/s) to the FLUSH's completion, and to
//!   the last write's completion;
//!
//! each with completions polled (`msix=0`) and with MSI-X interrupts (`msix=1`), at queue depth 1
//! and at a deeper depth (`VBLK_QD`, default 16, for reads; `VBLK_WQD`, default 4, for writes).
//!
//! `cargo bench -p bhyve --bench virtio_blk`. Environment: `VBLK_REPS` (default 5, medians),
//! `VBLK_READS` (default 20000), `VBLK_WRITES` (MiB, default 128), `VBLK_QD`, `VBLK_WQD`,
//! `VBLK_IMAGE_MIB` (default 256), `VBLK_STATS=1` (one more run of ours per configuration with
//! `-o stats.print=true -o stats.histograms=true`, its exit statistics printed), `BHYVE_BIN=PATH`
//! (another build of ours), `VBLK_B_OPTS=OPTS` (an A/B: a third monitor in every repetition, ours
//! with `,OPTS` after the image, e.g. `eagerwb=off`; its figures are printed as ours/B). QEMU comes from Debian's `qemu-system-x86` package; without it only
//! our figures are printed.
//!
//! Both monitors see the same host semantics: the image is an ordinary file, read and written
//! through the page cache, a FLUSH is an fdatasync. Ours: preadv/pwritev straight from guest memory
//! on a normal descriptor, one I/O thread per host CPU up to 4 (several requests in flight),
//! fdatasync on FLUSH; QEMU:
//! `cache=writeback` (its default: no O_DIRECT, flush = fdatasync), `aio=threads`.
//! The image is filled with data (not sparse) and read once before the runs, so reads hit a warm
//! page cache on both sides.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Longest one VM run may take (the guest bounds every wait to 5 s itself).
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The guest's xorshift64 pattern (guests/asm/virtio.inc `vio_pattern`).
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

/// Runs `cmd` to completion (killed after [`RUN_LIMIT`]); returns exit code, stdout, stderr.
fn run(mut cmd: Command, what: &str) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            break child.wait().expect("reap");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (
        status.code().unwrap_or(-1),
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default(),
    )
}

/// `key=value` from the guest's `BENCH <kind> ...` line.
fn field(out: &str, kind: &str, key: &str) -> Option<u64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("BENCH {kind} ")))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

#[derive(Clone, Copy)]
struct Config {
    msix: bool,
    qd: u64,
    wqd: u64,
}

#[derive(Default)]
struct Samples {
    iops: Vec<f64>,
    mbps: Vec<f64>,
    mbps_writes: Vec<f64>,
    rirqs: Vec<f64>,
    discarded: u32,
}

struct Bench {
    guest: PathBuf,
    image: PathBuf,
    sockets: PathBuf,
    bhyve: String,
    /// Device options of the B side of an A/B (`VBLK_B_OPTS`).
    b_opts: Option<String>,
    reads: u64,
    writes: u64,
    image_mib: u64,
    serial: u64,
}

impl Bench {
    fn cmdline(&self, c: Config, seed: u64, pmport: Option<u16>) -> String {
        let mut s = format!(
            "msix={} rread={} qd={} swrite={} wqd={} seed={seed}",
            u8::from(c.msix),
            self.reads,
            c.qd,
            self.writes,
            c.wqd
        );
        if let Some(p) = pmport {
            s.push_str(&format!(" pmport={p} pmbits=24"));
        }
        s
    }

    fn ours(&mut self, c: Config, seed: u64, extra: &[&str]) -> Command {
        self.ours_with(c, seed, extra, None)
    }

    /// Ours, with `dev_opts` appended to the virtio-blk options.
    fn ours_with(
        &mut self,
        c: Config,
        seed: u64,
        extra: &[&str],
        dev_opts: Option<&str>,
    ) -> Command {
        self.serial += 1;
        let mut cmd = Command::new(&self.bhyve);
        cmd.env("BHYVE_RS_SOCKET_DIR", &self.sockets)
            .args(["-m", "256M", "-l", "com1,stdio", "-o"])
            .arg(format!("boot.kernel={}", self.guest.display()))
            .arg("-o")
            .arg(format!("boot.cmdline={}", self.cmdline(c, seed, None)))
            .arg("-s")
            .arg(match dev_opts {
                Some(o) => format!("4,virtio-blk,{},{o}", self.image.display()),
                None => format!("4,virtio-blk,{}", self.image.display()),
            })
            .args(extra)
            .arg(format!("vblk-{}-{}", std::process::id(), self.serial));
        cmd
    }

    fn qemu(&self, c: Config, seed: u64) -> Command {
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-M",
            "pc",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            "256M",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
            "-drive",
        ])
        .arg(format!(
            "file={},if=none,id=d0,format=raw,cache=writeback,aio=threads",
            self.image.display()
        ))
        .args([
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,addr=4",
            "-kernel",
        ])
        .arg(&self.guest)
        .arg("-append")
        // QEMU's PIIX4 ACPI PM timer sits at 0x608 under -M pc, 24 bits wide.
        .arg(self.cmdline(c, seed, Some(1544)));
        cmd
    }

    /// One run: checks the exit, the BENCH lines and that the image holds this run's pattern in
    /// its first MiB (swrite starts at sector 0), and records the figures.
    fn sample(&self, cmd: Command, what: &str, seed: u64, into: &mut Samples) {
        let (code, out, err) = run(cmd, what);
        assert_eq!(
            code, 1,
            "{what}: exit {code}\nstdout:\n{out}\nstderr:\n{err}"
        );
        let mut head = vec![0u8; 1 << 20];
        let mut f = std::fs::File::open(&self.image).expect("image");
        f.read_exact(&mut head).expect("read image");
        assert!(
            head == pattern(seed, 1 << 20),
            "{what}: the image does not hold the run's pattern at sector 0"
        );
        let get = |kind: &str, key: &str| {
            field(&out, kind, key).unwrap_or_else(|| panic!("{what}: no {kind} {key}= in\n{out}"))
        };
        assert_eq!(get("rread", "ops"), self.reads, "{what}");
        assert_eq!(get("swrite", "bytes"), self.writes << 20, "{what}");
        let (rns, wns, wwns) = (
            get("rread", "ns"),
            get("swrite", "ns"),
            get("swrite", "writes_ns"),
        );
        // The TSC figure must agree with the PM timer's (which adds two exits, a few µs): a TSC that
        // jumped (or a calibration a preemption spoiled) discards the run rather than skewing it.
        for (kind, ns) in [("rread", rns), ("swrite", wns)] {
            let pm = get(kind, "pm_ns");
            if ns.abs_diff(pm) > pm / 50 + 100_000 {
                eprintln!("{what}: {kind} ns={ns} but pm_ns={pm}: run discarded\n{out}");
                into.discarded += 1;
                return;
            }
        }
        into.iops.push(self.reads as f64 * 1e9 / rns as f64);
        into.mbps
            .push((self.writes << 20) as f64 * 1e3 / wns as f64);
        into.mbps_writes
            .push((self.writes << 20) as f64 * 1e3 / wwns as f64);
        into.rirqs.push(get("rread", "irqs") as f64);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("virtio_blk: bench");
        return;
    }
    let reps = env_u64("VBLK_REPS", 5).max(1);
    let qd = env_u64("VBLK_QD", 16);
    let wqd = env_u64("VBLK_WQD", 4);
    let dir = std::env::temp_dir().join(format!("bhyve-vblk-{}", std::process::id()));
    guests::write_all(&dir).expect("guest images");
    let sockets = dir.join("sockets");
    std::fs::create_dir_all(&sockets).expect("socket dir");
    let mut b = Bench {
        guest: dir.join("virtio_blk.elf"),
        image: dir.join("disk.img"),
        sockets,
        bhyve: std::env::var("BHYVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bhyve").into()),
        b_opts: std::env::var("VBLK_B_OPTS").ok().filter(|o| !o.is_empty()),
        reads: env_u64("VBLK_READS", 20000),
        writes: env_u64("VBLK_WRITES", 128),
        image_mib: env_u64("VBLK_IMAGE_MIB", 256),
        serial: 0,
    };
    assert!(b.writes <= b.image_mib, "VBLK_WRITES beyond the image");
    // A filled image (every block backed), then read once: warm page cache for both monitors.
    {
        let mut f = std::fs::File::create(&b.image).expect("create image");
        let chunk = pattern(0xd15c, 1 << 20);
        for _ in 0..b.image_mib {
            f.write_all(&chunk).expect("fill image");
        }
        f.sync_all().expect("sync image");
    }
    let _ = std::fs::read(&b.image).expect("warm the page cache");
    let have_qemu = Path::new(QEMU).exists();
    let configs = [
        Config {
            msix: false,
            qd: 1,
            wqd: 1,
        },
        Config {
            msix: true,
            qd: 1,
            wqd: 1,
        },
        Config {
            msix: false,
            qd,
            wqd,
        },
        Config {
            msix: true,
            qd,
            wqd,
        },
    ];
    let mut ours: Vec<Samples> = configs.iter().map(|_| Samples::default()).collect();
    let mut theirs: Vec<Samples> = configs.iter().map(|_| Samples::default()).collect();
    let mut ours_b: Vec<Samples> = configs.iter().map(|_| Samples::default()).collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    let mut seed = 1u64;
    for rep in 0..reps {
        for (i, &c) in configs.iter().enumerate() {
            seed += 1;
            let what = format!("ours rep {rep} msix={} qd={}", c.msix, c.qd);
            let cmd = b.ours(c, seed, &[]);
            b.sample(cmd, &what, seed, &mut ours[i]);
            if let Some(opts) = b.b_opts.clone() {
                seed += 1;
                let what = format!("ours,{opts} rep {rep} msix={} qd={}", c.msix, c.qd);
                let cmd = b.ours_with(c, seed, &[], Some(&opts));
                b.sample(cmd, &what, seed, &mut ours_b[i]);
            }
            if have_qemu {
                seed += 1;
                let what = format!("QEMU rep {rep} msix={} qd={}", c.msix, c.qd);
                b.sample(b.qemu(c, seed), &what, seed, &mut theirs[i]);
            }
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "virtio-blk, `virtio_blk` test guest, median of {reps} interleaved runs; image {} MiB \
         (filled, warm page cache); {} random 4 KiB reads, {} x 1 MiB sequential writes + FLUSH; \
         load average before {} / after {}\n",
        b.image_mib,
        b.reads,
        b.writes,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let ratio = |o: f64, q: f64| {
        if have_qemu {
            format!("{:.2}", o / q)
        } else {
            "-".into()
        }
    };
    let q = |v: f64| {
        if have_qemu {
            format!("{v:.0}")
        } else {
            "-".into()
        }
    };
    println!("| completion | read qd | ours IOPS | QEMU IOPS | ours/QEMU | write qd | ours MB/s (to FLUSH done) | QEMU MB/s | ours/QEMU | ours MB/s (writes only) | QEMU MB/s (writes only) | ours/QEMU |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut met = true;
    for (i, c) in configs.iter().enumerate() {
        let (o, t) = (&ours[i], &theirs[i]);
        let (oi, ti) = (median(&o.iops), median(&t.iops));
        let (om, tm) = (median(&o.mbps), median(&t.mbps));
        let (ow, tw) = (median(&o.mbps_writes), median(&t.mbps_writes));
        if have_qemu && (oi < ti || om < tm) {
            met = false;
        }
        println!(
            "| {} | {} | {oi:.0} | {} | {} | {} | {om:.0} | {} | {} | {ow:.0} | {} | {} |",
            if c.msix { "MSI-X" } else { "polled" },
            c.qd,
            q(ti),
            ratio(oi, ti),
            c.wqd,
            q(tm),
            ratio(om, tm),
            q(tw),
            ratio(ow, tw),
        );
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("\nEvery run, in order (IOPS | MB/s to FLUSH done | MB/s writes only):");
    for (i, c) in configs.iter().enumerate() {
        let what = format!(
            "{} qd={}/wqd={}",
            if c.msix { "MSI-X" } else { "polled" },
            c.qd,
            c.wqd
        );
        let b_name = format!("ours,{}", b.b_opts.as_deref().unwrap_or(""));
        for (who, s) in [
            ("ours", &ours[i]),
            (b_name.as_str(), &ours_b[i]),
            ("QEMU", &theirs[i]),
        ] {
            if !s.iops.is_empty() || s.discarded > 0 {
                println!(
                    "- {what} {who}: {} | {} | {}{}",
                    list(&s.iops),
                    list(&s.mbps),
                    list(&s.mbps_writes),
                    if s.discarded > 0 {
                        format!(" ({} discarded: TSC and PM timer disagreed)", s.discarded)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    if let Some(opts) = &b.b_opts {
        println!(
            "\nA/B: ours (A) against ours with `,{opts}` (B), medians (B's own ratio to QEMU \
             in brackets)\n"
        );
        println!("| completion | read qd | A IOPS | B IOPS | A/B | write qd | A MB/s (to FLUSH done) | B MB/s | A/B | A MB/s (writes only) | B MB/s (writes only) | A/B |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (i, c) in configs.iter().enumerate() {
            let (o, x, t) = (&ours[i], &ours_b[i], &theirs[i]);
            let (oi, xi, ti) = (median(&o.iops), median(&x.iops), median(&t.iops));
            let (om, xm, tm) = (median(&o.mbps), median(&x.mbps), median(&t.mbps));
            let (ow, xw, tw) = (
                median(&o.mbps_writes),
                median(&x.mbps_writes),
                median(&t.mbps_writes),
            );
            println!(
                "| {} | {} | {oi:.0} | {xi:.0} ({}) | {:.2} | {} | {om:.0} | {xm:.0} ({}) | {:.2} | {ow:.0} | {xw:.0} ({}) | {:.2} |",
                if c.msix { "MSI-X" } else { "polled" },
                c.qd,
                ratio(xi, ti),
                oi / xi,
                c.wqd,
                ratio(xm, tm),
                om / xm,
                ratio(xw, tw),
                ow / xw,
            );
        }
    }
    println!(
        "\nMSI-X reads, interrupts per run (median): {}",
        configs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.msix)
            .map(|(i, c)| format!(
                "qd={}: ours {:.0}, QEMU {}",
                c.qd,
                median(&ours[i].rirqs),
                q(median(&theirs[i].rirqs))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if have_qemu {
        println!(
            "\nbar: ours >= QEMU in IOPS and MB/s (to FLUSH done), every row: {}",
            if met { "met" } else { "NOT met" }
        );
    } else {
        println!("\n(qemu-system-x86_64 not installed: apt-get install qemu-system-x86)");
    }
    if env_u64("VBLK_STATS", 0) == 1 {
        for c in configs {
            seed += 1;
            let cmd = b.ours(
                c,
                seed,
                &["-o", "stats.print=true", "-o", "stats.histograms=true"],
            );
            let (code, out, err) = run(cmd, "ours with stats");
            println!(
                "\n### ours, msix={} qd={} wqd={}: exit {code}\n```\n{}\n{}```",
                u8::from(c.msix),
                c.qd,
                c.wqd,
                out.lines()
                    .filter(|l| l.starts_with("BENCH"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                err
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
