//! A hostile guest against the whole platform, in real time: every timer at its fastest rate, and
//! seconds of random register traffic through the bus adapters from two "vCPUs" at once. The timer
//! thread's wake-ups must stay bounded (it must never spin), and the platform must still work
//! afterwards (no privileges, no /dev/kvm).

#[path = "pc_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{measure_rate, platform, TestBus, Timers, XorShift};
use stages::pc::{PcPlatform, TIMER_MAX_SLEEP_NS, TIMER_ROUND_NS};
use stages::Space;

const HPET: u64 = 0xFED0_0000;

struct Counters {
    wakeups: u64,
    kicks: u64,
    rounds: u64,
}

fn counters(pc: &PcPlatform) -> Counters {
    let s = pc.stats();
    Counters {
        wakeups: s.timer_wakeups.load(Ordering::Relaxed),
        kicks: s.timer_kicks.load(Ordering::Relaxed),
        rounds: s.timer_rounds.load(Ordering::Relaxed),
    }
}

/// The timer thread's own bounds over `elapsed`: rounds at least `TIMER_ROUND_NS` apart, at most
/// one kick per round, so at most two wake-ups per round.
fn check_bounds(what: &str, before: &Counters, after: &Counters, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    let rounds = after.rounds - before.rounds;
    let wakeups = after.wakeups - before.wakeups;
    let kicks = after.kicks - before.kicks;
    println!(
        "{what}: {:.0} wake-ups/s, {:.0} rounds/s, {:.0} kicks/s",
        wakeups as f64 / secs,
        rounds as f64 / secs,
        kicks as f64 / secs
    );
    let max_rounds = u64::try_from(elapsed.as_nanos()).unwrap() / TIMER_ROUND_NS + 2;
    assert!(
        rounds <= max_rounds,
        "{what}: {rounds} rounds > {max_rounds}"
    );
    assert!(
        kicks <= rounds + 1,
        "{what}: {kicks} kicks for {rounds} rounds"
    );
    assert!(
        wakeups <= 2 * rounds + 2,
        "{what}: {wakeups} wake-ups for {rounds} rounds"
    );
}

#[test]
fn every_timer_at_its_fastest_rate_cannot_make_the_timer_thread_spin() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    for pin in 0..32u8 {
        bus.ioapic_rte(pin, 0x40 + u32::from(pin), 0);
    }
    let timers = Timers::start(&pc);
    let before = counters(&pc);
    let t0 = Instant::now();
    // PIT: mode 2, count 2 (600 kHz asked); HPET: eight periodic timers with a period of one tick,
    // comparators staggered so no two share a deadline; RTC: 8192 Hz periodic interrupt.
    bus.pit_program(2, 2);
    for n in 0..8u64 {
        let conf = HPET + 0x100 + 0x20 * n;
        bus.mmio_write32(conf, 0x4c | ((24 + u32::try_from(n).unwrap()) << 9));
        bus.mmio_write64(conf + 8, 1 + 131 * n);
        bus.mmio_write64(conf + 8, 1);
    }
    bus.mmio_write32(HPET + 0x10, 1);
    bus.rtc_write(0x0A, 0x23);
    bus.rtc_write(0x0B, 0x42);
    // The guest also reads RTC register C as fast as it can, re-arming its interrupt.
    while t0.elapsed() < Duration::from_secs(2) {
        bus.rtc_read(0x0C);
    }
    let elapsed = t0.elapsed();
    let after = counters(&pc);
    check_bounds("fastest timers", &before, &after, elapsed);
    // The floor of every source is 10 kHz: 10 sources (PIT, RTC, 8 HPET timers).
    let per_sec = log.total() as f64 / elapsed.as_secs_f64();
    println!("fastest timers: {per_sec:.0} MSIs/s");
    assert!(per_sec < 10.0 * 10_500.0, "{per_sec} MSIs/s");
    // They did run (a loaded host lowers the rate; 2000/s is far above what one slow source makes).
    assert!(per_sec > 2_000.0, "the timers did not run: {per_sec}");
    drop(timers);
}

/// Random accesses of random widths to random offsets of every window.
fn hostile_traffic(bus: &TestBus, seed: u64, until: Instant) -> u64 {
    let windows: [(Space, u64, u64); 11] = [
        (Space::Mmio, 0xFEC0_0000, 0x20),
        (Space::Mmio, HPET, 0x400),
        (Space::Pio, 0x20, 2),
        (Space::Pio, 0xA0, 2),
        (Space::Pio, 0x4D0, 2),
        (Space::Pio, 0x40, 4),
        (Space::Pio, 0x61, 1),
        (Space::Pio, 0x70, 2),
        (Space::Pio, 0x408, 4),
        (Space::Pio, 0xCF8, 1),
        (Space::Pio, 0xCFC, 4),
    ];
    let mut rng = XorShift(seed);
    let mut ops = 0u64;
    while Instant::now() < until {
        for _ in 0..64 {
            let r = rng.next_u64();
            let (space, base, len) = windows[usize::try_from(r % 11).unwrap()];
            let offset = (r >> 8) % len;
            let width = [1usize, 2, 4, 8][usize::try_from((r >> 20) & 3).unwrap()];
            let value = rng.next_u64();
            if (r >> 24) & 3 == 0 {
                bus.read(space, base + offset, width);
            } else {
                bus.write(space, base + offset, &value.to_le_bytes()[..width]);
            }
            ops += 1;
        }
    }
    ops
}

#[test]
fn random_register_traffic_from_two_vcpus_keeps_the_timer_thread_bounded() {
    let (pc, log, _) = platform(2);
    let bus = TestBus::new(&pc);
    let timers = Timers::start(&pc);
    let before = counters(&pc);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(3);
    let ops: u64 = std::thread::scope(|s| {
        let a = s.spawn(|| hostile_traffic(&bus, 0x1234_5678_9abc_def1, until));
        let b = s.spawn(|| hostile_traffic(&bus, 0x0fed_cba9_8765_4321, until));
        a.join().unwrap() + b.join().unwrap()
    });
    let elapsed = t0.elapsed();
    let after = counters(&pc);
    println!(
        "hostile: {ops} accesses, {} MSIs, stats {:?}",
        log.total(),
        pc.stats().snapshot()
    );
    assert!(ops > 100_000, "only {ops} accesses");
    check_bounds("hostile traffic", &before, &after, elapsed);
    assert!(
        after.kicks > before.kicks,
        "random reprogramming never moved a deadline earlier: the test no longer reaches the wake-up path"
    );
    assert!(!timers.is_finished());

    // The platform still works: reset what matters and run the PIT at 100 Hz.
    bus.mmio_write32(HPET + 0x10, 0);
    for pin in 0..32u8 {
        bus.ioapic_rte(pin, 1 << 16, 0);
    }
    bus.ioapic_rte(2, 0x31, 0);
    bus.pit_program(2, 11_932);
    let rate = measure_rate(
        &log,
        0x31,
        Duration::from_millis(100),
        Duration::from_secs(1),
    );
    println!("after the storm, PIT at 100 Hz: {rate:.1}/s");
    assert!((rate - 100.0).abs() <= 5.0, "{rate}");
    let took = timers.stop(true);
    assert!(took < Duration::from_nanos(TIMER_MAX_SLEEP_NS), "{took:?}");
}

#[test]
fn an_idle_platform_wakes_only_to_look_at_its_stop_flag() {
    let (pc, _, _) = platform(1);
    let timers = Timers::start(&pc);
    std::thread::sleep(Duration::from_millis(500));
    let wakeups = pc.stats().timer_wakeups.load(Ordering::Relaxed);
    let bound = 500_000_000 / TIMER_MAX_SLEEP_NS + 3;
    println!("idle: {wakeups} wake-ups in 500 ms");
    assert!(wakeups <= bound, "{wakeups} > {bound}");
    drop(timers);
}
