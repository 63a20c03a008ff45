//! The platform's timers in real time, driven through the bus adapters as a guest drives them, with
//! the timer thread running and a recording MSI closure (no privileges, no /dev/kvm).

#[path = "pc_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{measure_rate, platform, TestBus, Timers};
use stages::devices::hpet::{HPET_FREQ_HZ, TN_INT_ENB, TN_PERIODIC, TN_VAL_SET};
use stages::devices::pmtimer::PM_TIMER_FREQ_HZ;
use stages::pc::TIMER_MAX_SLEEP_NS;
use stages::VmRequest;

const HPET: u64 = 0xFED0_0000;

fn within(rate: f64, expected: f64, tolerance: f64) -> bool {
    (rate - expected).abs() <= expected * tolerance
}

/// Timer 0 of the HPET periodic at `hz`, routed to I/O APIC input `route` (or legacy if None).
fn hpet_periodic(bus: &TestBus, timer: u64, hz: u64, route: u32) {
    let period = HPET_FREQ_HZ / hz;
    let conf = HPET + 0x100 + 0x20 * timer;
    bus.mmio_write32(
        conf,
        u32::try_from(TN_INT_ENB | TN_PERIODIC | TN_VAL_SET).unwrap() | (route << 9),
    );
    // As Linux does: the first comparator write (with VAL_SET) sets the match, the second the
    // period.
    let now = bus.mmio_read64(HPET + 0xF0);
    bus.mmio_write64(conf + 8, now + period);
    bus.mmio_write64(conf + 8, period);
}

#[test]
fn pit_at_100hz_through_the_ports_delivers_100_msis_per_second_to_gsi2s_vector() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    let timers = Timers::start(&pc);
    bus.ioapic_rte(2, 0x31, 0);
    bus.ioapic_rte(0, 0x50, 0); // IOAPIC input 0 is not the PIT's (ISA IRQ 0 is GSI 2)
    bus.pit_program(2, 11_932); // 1193182 / 11932 = 99.998 Hz
    let rate = measure_rate(
        &log,
        0x31,
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    println!("PIT mode 2 at 100 Hz: {rate:.2} MSIs/s");
    assert!(within(rate, 100.0, 0.05), "{rate}");
    assert_eq!(log.count(0x50), 0);
    assert_eq!(log.total(), log.count(0x31));
    assert_eq!(log.last_address.load(Ordering::SeqCst), 0xFEE0_0000);

    // Reprogramming to 1 kHz takes effect at once.
    bus.pit_program(2, 1193);
    let rate = measure_rate(
        &log,
        0x31,
        Duration::from_millis(100),
        Duration::from_secs(1),
    );
    println!("PIT mode 2 at 1 kHz: {rate:.1} MSIs/s");
    // A timer thread the host schedules late loses (coalesces) ticks, it never adds any: the
    // lower bound leaves room for a loaded host, the upper one does not.
    assert!((900.0..=1050.0).contains(&rate), "{rate}");

    // Masking the pin stops delivery; the PIT keeps ticking (the pin sees the edges).
    bus.ioapic_rte(2, 0x31 | (1 << 16), 0);
    let rate = measure_rate(
        &log,
        0x31,
        Duration::from_millis(20),
        Duration::from_millis(300),
    );
    assert_eq!(rate, 0.0);
    assert!(pc.stats().timer_polls.load(Ordering::Relaxed) > 100);
    drop(timers);
}

#[test]
fn hpet_periodic_timers_deliver_at_their_rate_and_legacy_mode_replaces_the_pit() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    let timers = Timers::start(&pc);
    let cap = bus.mmio_read64(HPET);
    assert_eq!(cap >> 32, 100_000_000, "10 MHz counter");
    bus.ioapic_rte(24, 0x41, 0);
    bus.ioapic_rte(25, 0x42, 0);
    bus.ioapic_rte(2, 0x43, 0);
    hpet_periodic(&bus, 0, 250, 24);
    hpet_periodic(&bus, 1, 64, 25);
    bus.mmio_write32(HPET + 0x10, 1); // ENABLE
    std::thread::sleep(Duration::from_millis(100));
    let (a0, b0, t0) = (log.count(0x41), log.count(0x42), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let secs = t0.elapsed().as_secs_f64();
    let r250 = (log.count(0x41) - a0) as f64 / secs;
    let r64 = (log.count(0x42) - b0) as f64 / secs;
    println!("HPET timer 0 at 250 Hz: {r250:.2}/s, timer 1 at 64 Hz: {r64:.2}/s");
    assert!(within(r250, 250.0, 0.05), "{r250}");
    assert!(within(r64, 64.0, 0.05), "{r64}");

    // The main counter runs at 10 MHz of real time.
    let (c0, t0) = (bus.mmio_read64(HPET + 0xF0), Instant::now());
    std::thread::sleep(Duration::from_millis(300));
    let (c1, secs) = (bus.mmio_read64(HPET + 0xF0), t0.elapsed().as_secs_f64());
    let hz = (c1 - c0) as f64 / secs;
    assert!(within(hz, 1e7, 0.02), "HPET counter at {hz} Hz");

    // Legacy replacement: timer 0 drives ISA IRQ 0 (GSI 2) and the PIT, running at 100 Hz, is
    // disconnected from it.
    bus.pit_program(2, 11_932);
    bus.mmio_write32(HPET + 0x10, 3); // ENABLE | LEG_RT
    let rate = measure_rate(
        &log,
        0x43,
        Duration::from_millis(100),
        Duration::from_secs(1),
    );
    println!("GSI 2 with legacy replacement (HPET 250 Hz, PIT 100 Hz gated): {rate:.1}/s");
    assert!(within(rate, 250.0, 0.05), "{rate}");
    // Back to normal routing: GSI 2 is the PIT's again.
    bus.mmio_write32(HPET + 0x10, 1);
    let rate = measure_rate(
        &log,
        0x43,
        Duration::from_millis(100),
        Duration::from_secs(1),
    );
    println!("GSI 2 without legacy replacement: {rate:.1}/s");
    assert!(within(rate, 100.0, 0.06), "{rate}");
    drop(timers);
}

#[test]
fn rtc_periodic_interrupt_fires_once_per_read_of_register_c() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    let _timers = Timers::start(&pc);
    bus.ioapic_rte(8, 0x38, 0);
    bus.rtc_write(0x0A, 0x26); // divider running, 1024 Hz
    bus.rtc_write(0x0B, 0x42); // PIE, 24-hour
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(log.count(0x38), 1, "IRQF holds the line: one edge");
    assert_eq!(bus.rtc_read(0x0C) & 0xC0, 0xC0, "IRQF and PF");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(log.count(0x38), 2, "reading C re-arms the interrupt");
    // Reading C as fast as it fires: about 1024 Hz.
    let t0 = Instant::now();
    let c0 = log.count(0x38);
    while t0.elapsed() < Duration::from_millis(500) {
        bus.rtc_read(0x0C);
        std::thread::sleep(Duration::from_micros(200));
    }
    let rate = (log.count(0x38) - c0) as f64 / t0.elapsed().as_secs_f64();
    println!("RTC at 1024 Hz with C read every ~200 µs: {rate:.0}/s");
    assert!(rate > 700.0 && rate < 1100.0, "{rate}");
}

#[test]
fn pm_timer_counts_at_3_58_mhz_of_real_time() {
    let (pc, _, _) = platform(1);
    let bus = TestBus::new(&pc);
    let (a, t0) = (bus.inl(0x408), Instant::now());
    std::thread::sleep(Duration::from_millis(300));
    let (b, secs) = (bus.inl(0x408), t0.elapsed().as_secs_f64());
    let hz = f64::from(b.wrapping_sub(a)) / secs;
    println!("PM timer: {hz:.0} Hz");
    assert!(within(hz, PM_TIMER_FREQ_HZ as f64, 0.02), "{hz}");
    let mut last = bus.inl(0x408);
    for _ in 0..1000 {
        let v = bus.inl(0x408);
        assert!(v.wrapping_sub(last) < 1 << 31, "went backwards");
        last = v;
    }
}

#[test]
fn the_timer_thread_stops_promptly() {
    let (pc, _, requests) = platform(1);
    let bus = TestBus::new(&pc);
    bus.pit_program(2, 11_932);
    // Woken explicitly: at once.
    let t = Timers::start(&pc);
    std::thread::sleep(Duration::from_millis(50));
    let took = t.stop(true);
    assert!(took < Duration::from_millis(50), "{took:?}");
    // Flag only: within its longest sleep.
    let t = Timers::start(&pc);
    std::thread::sleep(Duration::from_millis(50));
    let took = t.stop(false);
    let bound = Duration::from_nanos(TIMER_MAX_SLEEP_NS) + Duration::from_millis(50);
    assert!(took < bound, "{took:?}");
    // Idle (no deadline at all): still the flag is seen within the bound.
    let (idle, _, _) = platform(1);
    let t = Timers::start(&idle);
    std::thread::sleep(Duration::from_millis(50));
    assert!(t.stop(false) < bound);
    // A pending VM request ends it without the flag.
    let t = Timers::start(&pc);
    std::thread::sleep(Duration::from_millis(20));
    requests.request(VmRequest::PowerOff);
    let t0 = Instant::now();
    while !t.is_finished() && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(t.is_finished(), "still running after the VM asked to stop");
}
