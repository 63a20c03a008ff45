//! Device guests (tier: needs `/dev/kvm`): each `dev_*` test guest drives one in-module device
//! through the `bhyve` binary — its registers, its interrupts through the I/O APIC into KVM's local
//! APIC, its rate against another clock — and reports over COM1; `smp` starts a second vCPU with
//! INIT/SIPI and exchanges IPIs with it. The tests check the reports and the exit status.
//!
//! The guests measure rates over a second of guest-visible time, so the tests here run one at a
//! time (a lock), never two VMs fighting for the same pinned host CPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long any device guest may take (they need about two seconds).
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn bhyve() -> &'static str {
    env!("CARGO_BIN_EXE_bhyve")
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bhyve-dev-guests-{}", std::process::id()));
        guests::write_all(&dir).expect("write guest images");
        dir
    })
}

/// Runs `guest` under bhyve with COM1 on stdout, killing it after [`GUEST_TIMEOUT`].
fn run(guest: &str, extra: &[&str]) -> Output {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (a host with KVM); every developer and CI machine has one"
    );
    let _one_at_a_time = serial();
    let img = guest_dir().join(format!("{guest}.elf"));
    let mut child = Command::new(bhyve())
        .args(["-l", "com1,stdio"])
        .arg("-o")
        .arg(format!("boot.kernel={}", img.display()))
        .args(extra)
        // VM names are unique per module: another test binary may run the same guest.
        .arg(format!("{guest}-{}", std::process::id()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bhyve");
    let t0 = Instant::now();
    while child.try_wait().expect("wait for bhyve").is_none() {
        if t0.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect bhyve output");
    eprintln!(
        "--- {guest} status {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        t0.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The first number after `after` on the first line that contains `line_marker`.
fn number_in(out: &str, line_marker: &str, after: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.contains(line_marker))
        .unwrap_or_else(|| panic!("no line with {line_marker:?} in:\n{out}"));
    let rest = line
        .split_once(after)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("no {after:?} in {line:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
}

#[test]
fn the_ioapic_id_is_the_one_the_madt_announces() {
    assert_eq!(stages::pc::IOAPIC_ID, loader::acpi::IOAPIC_ID);
    assert_eq!(
        stages::devices::pmtimer::SCI_IRQ,
        u32::from(loader::acpi::SCI_IRQ)
    );
    assert_eq!(
        u64::from(loader::acpi::PM_TMR_PORT),
        u64::from(stages::devices::pmtimer::PM_TIMER_PORT)
    );
}

#[test]
fn dev_pit_takes_100_interrupts_a_second_through_gsi_2() {
    let o = run("dev_pit", &[]);
    let out = stdout(&o);
    let n = number_in(&out, "interrupts in 1 s", "dev_pit: ");
    assert!((95..=105).contains(&n), "{n} PIT interrupts in 1 s");
    assert!(out.contains("dev_pit: masked GSI 2 delivered nothing in 100 ms"));
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}

#[test]
fn dev_hpet_periodic_and_one_shot_comparators_interrupt() {
    let o = run("dev_hpet", &[]);
    let out = stdout(&o);
    assert!(
        out.contains("dev_hpet: GCAP_ID 0x05f5e1008086a701"),
        "{out}"
    );
    let n = number_in(&out, "periodic interrupts in 1 s", "dev_hpet: ");
    assert!((95..=105).contains(&n), "{n} HPET interrupts in 1 s");
    let ticks = number_in(&out, "periodic interrupts in 1 s", "counter advanced ");
    assert!(
        (9_900_000..=10_100_000).contains(&ticks),
        "HPET counter advanced {ticks} in 1 s of the PM timer"
    );
    assert!(out.contains("dev_hpet: one-shot comparator 50 ms ahead fired once"));
    assert!(out.contains("dev_hpet: counter disabled, no more interrupts"));
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}

/// Seconds since the epoch of a "YYYY-MM-DD hh:mm:ss" the guest printed after `prefix`.
fn guest_time(out: &str, prefix: &str) -> i64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"));
    let f: Vec<i64> = line[prefix.len()..]
        .split(['-', ' ', ':'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse()
                .unwrap_or_else(|_| panic!("bad field {w:?} in {line:?}"))
        })
        .collect();
    assert_eq!(f.len(), 6, "{line:?}");
    stages::devices::rtc::epoch_secs(f[0], f[1], f[2], f[3], f[4], f[5])
}

#[test]
fn dev_rtc_shows_the_hosts_utc_time_in_bcd_and_binary() {
    let o = run("dev_rtc", &[]);
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let out = stdout(&o);
    let bcd = guest_time(&out, "dev_rtc bcd: ");
    let bin = guest_time(&out, "dev_rtc bin: ");
    assert!(
        (bin - bcd).abs() <= 1,
        "BCD {bcd} and binary {bin} readings"
    );
    // The guest read the clock a second or two before it exited.
    assert!(
        (now - bcd).abs() <= 5,
        "the guest's RTC says {bcd}, the host's UTC clock {now}"
    );
    assert!(out.contains("dev_rtc: BCD and binary agree, the clock ticks"));
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}

#[test]
fn dev_pmtimer_is_monotonic_and_runs_at_3_58_mhz() {
    let o = run("dev_pmtimer", &["-o", "boot.cmdline=n=20000"]);
    let out = stdout(&o);
    assert!(out.contains("dev_pmtimer: 20000 consecutive reads, never backwards"));
    let hz = number_in(&out, "Hz against the HPET", "dev_pmtimer: rate ");
    assert!((3_543_750..=3_615_341).contains(&hz), "{hz} Hz");
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}

#[test]
fn dev_ioapic_level_pins_redeliver_at_eoi_and_masked_pins_stay_quiet() {
    let o = run("dev_ioapic", &[]);
    let out = stdout(&o);
    let n = number_in(&out, "for one assertion", "level pin 8 delivered ");
    assert!((5..=6).contains(&n), "{n} deliveries of one assertion");
    assert!(out.contains(
        "dev_ioapic: masked level pin delivered nothing; unmasked while asserted it delivered, then stopped"
    ));
    let pit = number_in(
        &out,
        "masked edge pin 2 delivered nothing",
        "unmasked for 50 ms: ",
    );
    assert!(pit >= 25, "{pit}");
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}

#[test]
fn smp_starts_the_ap_with_init_sipi_and_exchanges_ipis() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the smp guest needs a host with two CPUs (bhyve refuses more vCPUs than host CPUs)"
    );
    let o = run("smp", &["-c", "2"]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "smp: AP online in long mode, APIC ID 1",
            "smp: BSP (APIC ID 0) started the AP with INIT/SIPI",
            "smp: AP took the BSP's IPI (vector 0x60), answering",
            "smp: BSP took the AP's IPI (vector 0x61): IPIs exchanged both ways",
        ],
        "{out}"
    );
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));
}
