//! Process start to the guest's first UART byte, and to VM exit, for the same tiny guest under our
//! `bhyve` and under `qemu-system-x86_64 -enable-kvm -M microvm`, interleaved in the same run; plus
//! each monitor's peak resident set (ru_maxrss) and, for ours, how much of it is guest memory.
//!
//! `cargo bench -p bhyve --bench startup` (env `STARTUP_REPS`, default 20; `BHYVE_BIN=PATH` to
//! measure another build of ours, such as the static one). QEMU comes from Debian's
//! `qemu-system-x86` package; without it only our figures are printed.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_byte: Duration,
    exit: Duration,
    maxrss_kib: u64,
    status: i32,
}

#[allow(
    clippy::zombie_processes,
    reason = "the child is reaped with wait4 below, to read its ru_maxrss"
)]
fn measure(mut cmd: Command) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut b = [0u8; 1];
    let first_byte = match out.read(&mut b) {
        Ok(1) => start.elapsed(),
        _ => Duration::MAX,
    };
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `ru` are valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let exit = start.elapsed();
    assert_eq!(rc, pid, "wait4");
    let st = std::process::ExitStatus::from_raw(status);
    Sample {
        first_byte,
        exit,
        maxrss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0),
        status: st.code().unwrap_or(-1),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("startup: bench");
        return;
    }
    let reps: usize = std::env::var("STARTUP_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("bhyve-startup-{}", std::process::id()));
    guests::write_all(&dir).expect("guest images");
    let img = dir.join("hello.elf");
    // BHYVE_BIN measures another build of ours (e.g. the static one the rig ships).
    let bhyve_bin =
        std::env::var("BHYVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bhyve").into());
    let bhyve = bhyve_bin.as_str();
    let qemu = ["/usr/bin/qemu-system-x86_64"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let ours = || {
        let mut c = Command::new(bhyve);
        c.args(["-m", "256M", "-l", "com1,stdio", "-o"])
            .arg(format!("boot.kernel={}", img.display()))
            .arg("hello");
        c
    };
    let theirs = |q: &str| {
        let mut c = Command::new(q);
        c.args([
            "-M",
            "microvm",
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
            "-kernel",
        ])
        .arg(&img);
        c
    };
    let (mut o, mut q, mut o4k) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let s = measure(ours());
        assert_eq!(s.status, 1, "our run failed");
        o.push(s);
        // The same without transparent huge pages (what a short-lived guest can choose).
        let mut c = ours();
        c.args(["-o", "memory.thp=false"]);
        let s = measure(c);
        assert_eq!(s.status, 1, "our run with memory.thp=false failed");
        o4k.push(s);
        if let Some(qp) = qemu {
            let s = measure(theirs(qp));
            assert_eq!(s.status, 1, "QEMU run failed");
            q.push(s);
        }
    }
    let ms = |v: &[Sample], f: fn(&Sample) -> Duration| {
        median(v.iter().map(|s| f(s).as_secs_f64() * 1e3).collect())
    };
    let rss = |v: &[Sample]| median(v.iter().map(|s| s.maxrss_kib as f64).collect());
    println!("start-up of the `hello` test guest, median of {reps} interleaved runs\n");
    println!("| monitor | to first UART byte (ms) | to VM exit (ms) | peak RSS (KiB) |");
    println!("|---|---|---|---|");
    let (of, oe, orss) = (ms(&o, |s| s.first_byte), ms(&o, |s| s.exit), rss(&o));
    println!("| ours (`bhyve`) | {of:.2} | {oe:.2} | {orss:.0} |");
    let (nf, ne, nrss) = (ms(&o4k, |s| s.first_byte), ms(&o4k, |s| s.exit), rss(&o4k));
    println!("| ours, `-o memory.thp=false` | {nf:.2} | {ne:.2} | {nrss:.0} |");
    if !q.is_empty() {
        let (qf, qe, qrss) = (ms(&q, |s| s.first_byte), ms(&q, |s| s.exit), rss(&q));
        println!("| QEMU `-M microvm` | {qf:.2} | {qe:.2} | {qrss:.0} |");
        println!(
            "| ratio ours/QEMU | {:.3} | {:.3} | {:.3} |",
            of / qf,
            oe / qe,
            orss / qrss
        );
        println!(
            "| ratio ours (`memory.thp=false`)/QEMU | {:.3} | {:.3} | {:.3} |",
            nf / qf,
            ne / qe,
            nrss / qrss
        );
        println!(
            "\nbar: ours ≤ 0.08× QEMU — first byte {}, exit {} (memory.thp=false: {}, {})",
            if of / qf <= 0.08 { "met" } else { "NOT met" },
            if oe / qe <= 0.08 { "met" } else { "NOT met" },
            if nf / qf <= 0.08 { "met" } else { "NOT met" },
            if ne / qe <= 0.08 { "met" } else { "NOT met" }
        );
    } else {
        println!("(qemu-system-x86_64 not installed: apt-get install qemu-system-x86)");
    }
    // Guest-touched memory, from the monitor itself.
    let out = ours()
        .args(["-o", "stats.print=true"])
        .output()
        .expect("run with stats");
    let err = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| -> Option<f64> {
        err.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .rev()
            .nth(1)?
            .parse()
            .ok()
    };
    if let (Some(g), Some(h)) = (
        field("guest memory resident:"),
        field("monitor peak resident set (VmHWM):"),
    ) {
        println!(
            "\nours: peak resident set {h:.0} KiB, of which guest memory the guest touched {g:.0} KiB: \
             monitor beyond guest memory {:.0} KiB (bar ≤ 3072 KiB: {})",
            h - g,
            if h - g <= 3072.0 { "met" } else { "NOT met" }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
