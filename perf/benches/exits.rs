//! Exit round trip per class, ours against a raw `KVM_RUN` loop, interleaved in the same run.
//!
//! `cargo bench -p perf --bench exits` (env: `EXITS_N`, default 100000 exits per run; `EXITS_REPS`,
//! default 5; `EXITS_DEVICE_SPIN_US`, the device-model thread's spin before it parks, and
//! `EXITS_COMPLETION_SPIN_US`, a vCPU's spin for its completion before it parks, default what
//! `RunConfig` chooses; `EXITS_CLASSES`, a comma-separated subset of
//! `fast,posted,waited,trace,coalesced`, default all; `EXITS_RAW_SPINNER=1` runs a spinning
//! thread on CPU 1 beside the raw loop). Prints a markdown table; bar: fast ≤ 1.05×
//! raw, posted ≤ 1.05× raw, waited ≤ raw + 1 µs; then the cost of tracing every exit (`trace`);
//! then what a coalesced write costs against an exit, and what its zone costs once (`coalesced`).

#[path = "support/exits.rs"]
mod exits;

use exits::{run_ours, run_ours_opts, run_ours_with, run_raw, Class};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("exits: bench");
        return;
    }
    let classes: Vec<String> = std::env::var("EXITS_CLASSES")
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    if let Some(bad) = classes
        .iter()
        .find(|c| !["fast", "posted", "waited", "trace", "coalesced"].contains(&c.as_str()))
    {
        eprintln!("EXITS_CLASSES: unknown class {bad:?} (fast, posted, waited, trace, coalesced)");
        std::process::exit(2);
    }
    let wanted = |name: &str| classes.is_empty() || classes.iter().any(|c| c == name);
    let n = env("EXITS_N", 100_000);
    let reps = env("EXITS_REPS", 5) as usize;
    if Class::ALL.iter().any(|c| wanted(c.guest())) {
        println!(
            "exit round trip, n={n} exits per run, median of {reps} paired runs (ns per exit)\n"
        );
        println!("| class | raw KVM_RUN loop | ours | ours / raw | ours − raw | bar |");
        println!("|---|---|---|---|---|---|");
    }
    for class in Class::ALL.into_iter().filter(|c| wanted(c.guest())) {
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            // Interleave so drift (thermal, other load) hits both alike.
            let exits = class.exits(n) as f64;
            let r0 = run_raw(class.guest(), 0).as_nanos() as f64;
            let rn = run_raw(class.guest(), n).as_nanos() as f64;
            let o0 = run_ours(class.guest(), 0).as_nanos() as f64;
            let on = run_ours(class.guest(), n).as_nanos() as f64;
            raw.push((rn - r0) / exits);
            ours.push((on - o0) / exits);
        }
        let (r, o) = (median(raw), median(ours));
        let (bar, ok) = match class {
            Class::Waited => ("≤ raw + 1000 ns", o - r <= 1000.0),
            _ => ("≤ 1.05×", o / r <= 1.05),
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:+.0} | {} {} |",
            class.name(),
            r,
            o,
            o / r,
            o - r,
            bar,
            if ok { "met" } else { "NOT met" }
        );
    }

    if wanted("trace") {
        trace_cost(n, reps);
    }
    if wanted("coalesced") {
        coalesced_cost(n, reps);
    }
}

/// Coalesced writes (KVM queues them in a ring instead of exiting to us) against exits: the `fast`
/// guest (n writes to the scratch write register, n reads) with and without that register as a
/// coalesced zone, at two sizes, so the slope gives the cost per write; and with one write each,
/// what the zone costs once per VM (its registration at the first write exit and its
/// unregistration before the VM closes: each waits for an SRCU grace period in KVM).
fn coalesced_cost(n: u64, reps: usize) {
    let small = (n / 10).max(1);
    let (mut exit, mut write, mut once) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t =
            |n: u64, coalesce: bool| run_ours_opts("fast", n, false, coalesce).as_nanos() as f64;
        let (p1, c1, p2, c2) = (t(small, false), t(small, true), t(n, false), t(n, true));
        let span = (n - small) as f64;
        // Without the zone: n writes and n reads, every one an exit.
        let per_exit = (p2 - p1) / span / 2.0;
        // With it: the reads still exit; the writes do not (but one in ~170, when the ring is full).
        let per_write = (c2 - c1) / span - per_exit;
        exit.push(per_exit);
        write.push(per_write);
        // What the zone adds to a VM that writes once (and so arms it).
        once.push(t(1, true) - t(1, false));
    }
    let (e, w, o) = (median(exit), median(write), median(once));
    println!(
        "\ncoalesced writes (`fast` guest, its write register a coalesced zone, n = {small} and {n}, \
         median of {reps}): an exit to us {e:.0} ns; a coalesced write {w:.0} ns ({:.3}× an exit); \
         the zone's registration and unregistration, once per VM: {:.2} ms",
        w / e,
        o / 1e6
    );
}

/// Tracing every exit, on against off, same guest, same run (histograms and counters are always on
/// in both).
fn trace_cost(n: u64, reps: usize) {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let class = Class::Posted;
    for _ in 0..reps {
        let exits = class.exits(n) as f64;
        let f0 = run_ours_with(class.guest(), 0, false).as_nanos() as f64;
        let f1 = run_ours_with(class.guest(), n, false).as_nanos() as f64;
        let t0 = run_ours_with(class.guest(), 0, true).as_nanos() as f64;
        let t1 = run_ours_with(class.guest(), n, true).as_nanos() as f64;
        off.push((f1 - f0) / exits);
        on.push((t1 - t0) / exits);
    }
    let (f, t) = (median(off), median(on));
    println!(
        "\ntracing every exit ({}): off {f:.0} ns, on {t:.0} ns per exit: {:+.1} % (bar ≤ 5 %: {})",
        class.name(),
        100.0 * (t / f - 1.0),
        if t / f <= 1.05 { "met" } else { "NOT met" }
    );
}
