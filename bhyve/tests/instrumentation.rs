//! The monitor explains itself (tier: needs `/dev/kvm`): a guest with a known mix of exits gives
//! exactly that mix in the counters; the trace export parses as JSON with one event per exit; the
//! plot option writes SVG images.

use std::process::Command;

fn counter(stderr: &str, description: &str) -> u64 {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with(description))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn known_exit_mix_counters_trace_and_plots() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let dir = std::env::temp_dir().join(format!("bhyve-instr-{}", std::process::id()));
    guests::write_all(&dir).unwrap();
    let trace = dir.join("trace.json");
    let plots = dir.join("plots");
    let n = 3000u64;
    let o = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args([
            "-l",
            "com1,stdio",
            "-o",
            "test.devices=true",
            "-o",
            "stats.print=true",
        ])
        .arg("-o")
        .arg(format!("boot.kernel={}", dir.join("posted.elf").display()))
        .args(["-o", &format!("boot.cmdline=n={n}")])
        .arg("-o")
        .arg(format!("trace.file={}", trace.display()))
        .arg("-o")
        .arg(format!("stats.plots={}", plots.display()))
        .args(["-o", "stats.histograms=true"])
        .arg(format!("mix-{}", std::process::id()))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{out}{err}");
    assert_eq!(o.status.code(), Some(guests::STATUS_OK));

    // The mix the `posted` guest makes: boot-done and debug-exit (fast), n posted scratch writes,
    // two waited reads (write counter, last value), and one posted UART write per output byte.
    let uart_bytes = out.len() as u64;
    assert_eq!(counter(&err, "exits handled inline"), 2);
    assert_eq!(counter(&err, "exits that waited for a device-model"), 2);
    assert_eq!(
        counter(&err, "exits posted to the device-model"),
        n + uart_bytes
    );
    let total = counter(&err, "total number of vm exits");
    assert_eq!(total, 2 + 2 + n + uart_bytes);
    assert_eq!(
        counter(&err, "number of times in/out was intercepted"),
        total
    );

    // Per device: the slow scratch device took the n posted writes and the two reads; COM1 one
    // write per output byte; the exit ring held records at some point.
    assert_eq!(counter(&err, "exits to scratch-slow"), n + 2);
    assert_eq!(counter(&err, "exits to com1"), uart_bytes);
    assert_eq!(counter(&err, "exits to debug-exit"), 1);
    assert!(counter(&err, "exit ring occupancy high-water mark") >= 1);

    // Histograms printed with percentiles, for every phase: exit to re-entry, inside KVM_RUN, the
    // handler alone, and the ring wait of the two waited reads.
    assert!(err.contains("p99.9"), "histogram table printed");
    for phase in [
        "exit pio-write/slow-posted",
        "run pio-write/slow-posted",
        "handler pio-write/slow-posted",
    ] {
        assert!(err.contains(phase), "{phase} histogram");
    }
    let ring_wait = err
        .lines()
        .find(|l| l.starts_with("ring-wait pio-read/slow-waited"))
        .expect("ring-wait histogram for the waited reads");
    assert_eq!(
        ring_wait.split_whitespace().nth(2),
        Some("2"),
        "{ring_wait}"
    );

    // The trace: valid JSON, one complete event per exit.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let exits = events.iter().filter(|e| e["ph"] == "X").count() as u64;
    assert_eq!(exits, total, "one trace event per exit");
    let posted = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == "slow-posted")
        .count() as u64;
    assert_eq!(posted, n + uart_bytes);

    // The plots.
    for f in ["exit-latency.svg", "exit-rate.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{f}");
        assert!(svg.trim_end().ends_with("</svg>"), "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
