//! What a hostile guest may try against the in-module devices: writes to read-only registers,
//! out-of-range indexes, timers programmed to fire every tick, index-port fuzzing, and randomized
//! register traffic (100k accesses per device, random widths and offsets, random clock advances),
//! which doubles as a smoke run of the `devices::fuzz` harnesses.

use stages::devices::fuzz::{
    run_hpet, run_ioapic, run_pci, run_pic, run_pit, run_pmtimer, run_rtc, FuzzStats,
};
use stages::devices::hpet::{
    capabilities, timer_comparator_offset, timer_config_offset, Hpet, CNF_ENABLE,
    HPET_MIN_PERIOD_TICKS, HPET_NUM_TIMERS, REG_CAP, REG_CONFIG, TN_INT_ENB, TN_PERIODIC,
    TN_VAL_SET,
};
use stages::devices::ioapic::{IoApic, IOAPIC_VERSION, IOREGSEL, IOWIN, REG_REDTBL};
use stages::devices::pit::Pit;
use stages::devices::rtc::{Rtc, REG_C, REG_D};
use stages::devices::testing::{FixedWallClock, IrqRecorder, ManualClock, MsiRecorder};
use stages::devices::{TimerDevice, MIN_TIMER_PERIOD_NS, NS_PER_SEC};

/// A small deterministic generator (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[3]).collect()
    }
}

/// Input for one randomized run: a little under 8 bytes per operation on average, so 1 MB makes
/// well over 100k operations (the harnesses count them).
const RANDOM_INPUT_BYTES: usize = 1_000_000;
/// Accesses each randomized run must make.
const MIN_OPS: u64 = 100_000;

fn check(name: &str, stats: FuzzStats, min_interrupts: u64) {
    println!("{name}: {stats:?}");
    assert!(
        stats.ops >= MIN_OPS,
        "{name}: only {} operations",
        stats.ops
    );
    assert!(
        stats.interrupts >= min_interrupts,
        "{name}: random traffic produced only {} interrupts: the harness no longer reaches the device's logic",
        stats.interrupts
    );
}

#[test]
fn random_traffic_pit() {
    for seed in [1u64, 0xdead_beef] {
        check(
            "pit",
            run_pit(&XorShift(seed).bytes(RANDOM_INPUT_BYTES)),
            10,
        );
    }
}

#[test]
fn random_traffic_hpet() {
    for seed in [2u64, 0x1234_5678_9abc] {
        check(
            "hpet",
            run_hpet(&XorShift(seed).bytes(RANDOM_INPUT_BYTES)),
            10,
        );
    }
}

#[test]
fn random_traffic_rtc() {
    for seed in [3u64, 0xfeed_f00d] {
        check(
            "rtc",
            run_rtc(&XorShift(seed).bytes(RANDOM_INPUT_BYTES)),
            10,
        );
    }
}

#[test]
fn random_traffic_pmtimer() {
    check(
        "pmtimer",
        run_pmtimer(&XorShift(4).bytes(RANDOM_INPUT_BYTES)),
        1,
    );
}

#[test]
fn random_traffic_ioapic() {
    check(
        "ioapic",
        run_ioapic(&XorShift(5).bytes(RANDOM_INPUT_BYTES)),
        10,
    );
}

#[test]
fn random_traffic_pic() {
    check("pic", run_pic(&XorShift(6).bytes(RANDOM_INPUT_BYTES)), 10);
}

#[test]
fn random_traffic_pci() {
    check("pci", run_pci(&XorShift(7).bytes(RANDOM_INPUT_BYTES)), 10);
}

#[test]
fn hpet_read_only_registers_ignore_writes() {
    let clock = ManualClock::new(0);
    let mut h = Hpet::new(&clock);
    h.write(REG_CAP, &u64::MAX.to_le_bytes());
    h.write(REG_CAP + 4, &0u32.to_le_bytes());
    let mut b = [0u8; 8];
    h.read(REG_CAP, &mut b);
    assert_eq!(u64::from_le_bytes(b), capabilities());
    // Read-only capability bits of a timer: periodic/64-bit capable, route capability, no FSB.
    for n in 0..HPET_NUM_TIMERS as u64 {
        h.read(timer_config_offset(n), &mut b);
        let before = u64::from_le_bytes(b);
        h.write(timer_config_offset(n), &(!before & !0x7f4e).to_le_bytes());
        h.read(timer_config_offset(n), &mut b);
        let after = u64::from_le_bytes(b);
        assert_eq!(
            after & 0xffff_ffff_0000_8030,
            before & 0xffff_ffff_0000_8030,
            "timer {n}"
        );
    }
}

#[test]
fn hpet_every_tick_timers_are_bounded_per_poll_and_per_second() {
    let clock = ManualClock::new(0);
    let mut h = Hpet::new(&clock);
    let mut irq = IrqRecorder::new();
    for n in 0..HPET_NUM_TIMERS as u64 {
        h.write(
            timer_config_offset(n),
            &(TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | ((24 + n) << 9)).to_le_bytes(),
        );
        h.write(timer_comparator_offset(n), &1u64.to_le_bytes());
        h.write(timer_comparator_offset(n), &1u64.to_le_bytes());
    }
    h.write(REG_CONFIG, &CNF_ENABLE.to_le_bytes());
    let mut polls = 0u64;
    while let Some(d) = h.next_deadline_ns() {
        if d > NS_PER_SEC {
            break;
        }
        assert!(d >= clock.get(), "deadline in the past after a poll");
        clock.set(d);
        let before = irq.total_rising();
        h.poll(clock.get(), &mut irq);
        polls += 1;
        assert!(
            irq.total_rising() - before <= HPET_NUM_TIMERS as u64,
            "more than one interrupt per timer per poll"
        );
    }
    let per_timer_per_sec = NS_PER_SEC / MIN_TIMER_PERIOD_NS + 1;
    for n in 0..HPET_NUM_TIMERS as u32 {
        let c = irq.rising(24 + n);
        assert!(
            c <= per_timer_per_sec,
            "timer {n}: {c} interrupts in one simulated second"
        );
        assert!(c > 0);
    }
    assert!(
        polls <= per_timer_per_sec + 1,
        "{polls} polls: the timers share their deadlines"
    );
    assert_eq!(HPET_MIN_PERIOD_TICKS, 1000);

    // A 10-minute stall delivers one interrupt per timer, not a backlog.
    let before = irq.total_rising();
    clock.advance(600 * NS_PER_SEC);
    h.poll(clock.get(), &mut irq);
    assert_eq!(irq.total_rising() - before, HPET_NUM_TIMERS as u64);
}

#[test]
fn pit_count_one_is_bounded() {
    let clock = ManualClock::new(0);
    let mut pit = Pit::new(&clock);
    let mut irq = IrqRecorder::new();
    for mode in [2u8, 3] {
        pit.write(3, &[0x30 | (mode << 1)]);
        pit.write(0, &[1]);
        pit.write(0, &[0]);
        let start = clock.get();
        let before = irq.rising(0);
        while let Some(d) = pit.next_deadline_ns() {
            if d > start + NS_PER_SEC {
                break;
            }
            clock.set(d);
            pit.poll(clock.get(), &mut irq);
        }
        clock.set(start + NS_PER_SEC);
        let n = irq.rising(0) - before;
        assert!(
            n <= NS_PER_SEC / MIN_TIMER_PERIOD_NS + 1,
            "mode {mode}: {n} interrupts per second"
        );
    }
}

#[test]
fn ioapic_out_of_range_indexes_read_zero_and_change_nothing() {
    let mut io = IoApic::new();
    let mut msi = MsiRecorder::new();
    let snapshot = |io: &mut IoApic| -> Vec<u32> {
        (0..=255u8)
            .map(|i| {
                io.write(IOREGSEL, &u32::from(i).to_le_bytes());
                let mut b = [0u8; 4];
                io.read(IOWIN, &mut b);
                u32::from_le_bytes(b)
            })
            .collect()
    };
    let before = snapshot(&mut io);
    for i in (0x03..0x10u8).chain(0x50..=0xff) {
        io.write(IOREGSEL, &u32::from(i).to_le_bytes());
        io.write(IOWIN, &0xffff_ffffu32.to_le_bytes());
    }
    // The version register is read-only too.
    io.write(IOREGSEL, &1u32.to_le_bytes());
    io.write(IOWIN, &0u32.to_le_bytes());
    let after = snapshot(&mut io);
    assert_eq!(before, after);
    assert_eq!(after[1], IOAPIC_VERSION);
    for (i, v) in after.iter().enumerate() {
        if !(0x00..0x03).contains(&i) && !(0x10..0x50).contains(&i) {
            assert_eq!(*v, 0, "index {i:#x}");
        }
    }
    // Pins beyond 31 do not exist.
    for pin in 32..64 {
        io.set_irq(pin, true, &mut msi);
    }
    io.write(IOREGSEL, &u32::from(REG_REDTBL).to_le_bytes());
    let mut b = [0u8; 4];
    io.read(IOWIN, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0001_0000);
    assert_eq!(msi.count, 0);
}

#[test]
fn rtc_index_port_fuzzing_is_harmless() {
    let clock = ManualClock::new(0);
    let mut rtc = Rtc::new(&clock, &FixedWallClock::new(1_700_000_000, 0));
    let mut irq = IrqRecorder::new();
    let mut rng = XorShift(0x5eed);
    for _ in 0..100_000 {
        let r = rng.next();
        let [index, value, action, ..] = r.to_le_bytes();
        rtc.write(0, &[index]);
        match action % 4 {
            0 => {
                let mut b = [0u8];
                rtc.read(1, &mut b);
            }
            1 if index & 0x7f != 0x0b && index & 0x7f != 0x0a => rtc.write(1, &[value]),
            2 => {
                let mut b = [0u8; 2];
                rtc.read(0, &mut b);
                assert_eq!(b[0], 0xff, "the index port reads 0xFF");
            }
            _ => clock.advance(u64::from(value) * 1000),
        }
        if rtc.next_deadline_ns().is_some_and(|d| d <= clock.get()) {
            rtc.poll(clock.get(), &mut irq);
        }
    }
    // Status registers stayed sane and the clock still runs.
    rtc.write(0, &[REG_D]);
    let mut d = [0u8];
    rtc.read(1, &mut d);
    assert_eq!(d[0], 0x80);
    rtc.write(0, &[REG_C]);
    rtc.read(1, &mut d);
    assert_eq!(d[0] & 0x0f, 0);
    // Register A/B were left alone, so invalid time writes were ignored and the clock runs.
    let t0 = rtc.time_secs();
    assert!(t0.is_some());
    clock.advance(5 * NS_PER_SEC);
    assert_eq!(
        rtc.time_secs(),
        t0.map(|t| t + 5),
        "time registers fuzzed but clock still counting"
    );
}
