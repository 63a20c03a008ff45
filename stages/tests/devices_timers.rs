//! Time-keeping devices driven the way kernels drive them, through the public API only, with a fake
//! clock (no privileges, no /dev/kvm).

use stages::devices::hpet::{
    timer_comparator_offset, timer_config_offset, Hpet, CNF_ENABLE, CNF_LEG_RT, HPET_NS_PER_TICK,
    REG_CAP, REG_CONFIG, REG_COUNTER, TN_32MODE, TN_INT_ENB, TN_PERIODIC, TN_VAL_SET,
};
use stages::devices::ioapic::{IoApic, IOREGSEL, IOWIN, REG_REDTBL};
use stages::devices::pic::{init_pair_standard, PicPair};
use stages::devices::pit::{Pit, PIT_FREQ_HZ};
use stages::devices::pmtimer::{PmTimer, PM_TIMER_FREQ_HZ};
use stages::devices::rtc::{epoch_secs, Rtc, REG_A, REG_B};
use stages::devices::testing::{FixedWallClock, IrqRecorder, ManualClock};
use stages::devices::{service, IrqSink, IsaIrqRouter, MsiSink, TimerDevice, NS_PER_SEC};

/// Counts MSIs per vector (and checks they target the LAPIC window).
struct Vectors {
    per_vector: [u64; 256],
    total: u64,
}

impl Vectors {
    fn new() -> Self {
        Vectors {
            per_vector: [0; 256],
            total: 0,
        }
    }
    fn get(&self, vector: u8) -> u64 {
        self.per_vector[usize::from(vector)]
    }
}

impl MsiSink for Vectors {
    fn send_msi(&mut self, addr: u64, data: u32) {
        assert_eq!(addr >> 20, 0xFEE, "MSI outside the LAPIC window");
        self.per_vector[usize::from(data.to_le_bytes()[0])] += 1;
        self.total += 1;
    }
}

fn program_rte(io: &mut IoApic, pin: u8, low: u32) {
    io.write(IOREGSEL, &u32::from(REG_REDTBL + 2 * pin).to_le_bytes());
    io.write(IOWIN, &low.to_le_bytes());
}

/// Follow `dev`'s deadlines up to `end_ns`, delivering through `irq`.
fn run<T: TimerDevice>(dev: &mut T, clock: &ManualClock, irq: &mut impl IrqSink, end_ns: u64) {
    while let Some(d) = dev.next_deadline_ns() {
        if d > end_ns {
            break;
        }
        clock.set(d);
        dev.poll(clock.get(), irq);
    }
    clock.set(end_ns);
    service(dev, end_ns, irq);
}

#[test]
fn pit_periodic_tick_reaches_pic_and_ioapic_at_hz() {
    // Linux's i8253 clockevent at HZ=250: mode 2, LATCH = (1193182 + 125) / 250 = 4773.
    let clock = ManualClock::new(10_000);
    let mut pit = Pit::new(&clock);
    let mut pic = PicPair::new();
    init_pair_standard(&mut pic, 0x20, 0x28);
    let mut io = IoApic::new();
    program_rte(&mut io, 2, 0x30); // ISA IRQ 0 is GSI 2
    let mut msi = Vectors::new();

    pit.write(3, &[0x34]);
    let latch: u16 = 4773;
    pit.write(0, &latch.to_le_bytes()[..1]);
    pit.write(0, &latch.to_le_bytes()[1..]);

    let start = clock.get();
    let mut ticks_via_pic = 0;
    while let Some(d) = pit.next_deadline_ns() {
        if d > start + NS_PER_SEC {
            break;
        }
        clock.set(d);
        let mut router = IsaIrqRouter::new(&mut pic, &mut io, &mut msi);
        pit.poll(clock.get(), &mut router);
        // The vCPU takes the ExtINT and the handler sends a non-specific EOI.
        if let Some(v) = pic.pending_vector() {
            assert_eq!(v, 0x20);
            ticks_via_pic += 1;
            pic.write(stages::devices::pic::PicRange::Master, 0, &[0x20]);
        }
    }
    // 1193182 / 4773 = 249.99 Hz.
    assert!(
        (249..=251).contains(&ticks_via_pic),
        "PIC ticks {ticks_via_pic}"
    );
    assert_eq!(msi.get(0x30), msi.total);
    assert!(
        (249..=251).contains(&msi.total),
        "IOAPIC ticks {}",
        msi.total
    );
}

#[test]
fn pit_channel2_tsc_calibration_sequence() {
    // arch/x86/kernel/tsc.c pit_calibrate_tsc(): gate on, speaker off, mode 0 on channel 2,
    // then spin on port 0x61 bit 5.
    let clock = ManualClock::new(0);
    let mut pit = Pit::new(&clock);
    let v = pit.port61_read();
    pit.port61_write((v & !0x02) | 0x01);
    let latch: u16 = 11932; // 10 ms
    pit.write(3, &[0xb0]);
    pit.write(2, &latch.to_le_bytes()[..1]);
    pit.write(2, &latch.to_le_bytes()[1..]);
    let t0 = clock.get();
    let mut spins = 0u64;
    while pit.port61_read() & 0x20 == 0 {
        clock.advance(1_000); // one pass of the loop costs 1 µs of guest time
        spins += 1;
        assert!(spins < 1_000_000, "OUT2 never rose");
    }
    let elapsed = clock.get() - t0;
    let expect = u64::from(latch) * NS_PER_SEC / PIT_FREQ_HZ;
    assert!(
        elapsed.abs_diff(expect) <= 1_000,
        "OUT2 rose after {elapsed} ns, expected {expect}"
    );
}

#[test]
fn pit_counter_read_matches_elapsed_time() {
    // quick_pit_calibrate() reads channel 2's MSB while it counts down from 0xffff.
    let clock = ManualClock::new(0);
    let mut pit = Pit::new(&clock);
    pit.port61_write(0x01);
    pit.write(3, &[0xb0]);
    pit.write(2, &[0xff]);
    pit.write(2, &[0xff]);
    let mut last = 0x1_0000u32;
    for _ in 0..50 {
        clock.advance(200_000); // 200 µs = ~238.6 ticks
        let mut b = [0u8; 2];
        pit.read(2, &mut b[..1]);
        pit.read(2, &mut b[1..]);
        let v = u32::from(u16::from_le_bytes(b));
        assert!(v < last, "counter must count down: {v} after {last}");
        let expect = 0xffff - clock.get() * PIT_FREQ_HZ / NS_PER_SEC;
        assert!(
            u64::from(v).abs_diff(expect) <= 1,
            "read {v}, expected {expect}"
        );
        last = v;
    }
}

#[test]
fn hpet_one_shot_and_periodic_through_the_ioapic() {
    let clock = ManualClock::new(0);
    let mut hpet = Hpet::new(&clock);
    let mut pic = PicPair::new();
    init_pair_standard(&mut pic, 0x20, 0x28);
    let mut io = IoApic::new();
    program_rte(&mut io, 2, 0x40); // legacy timer 0 -> ISA IRQ 0 -> GSI 2
    program_rte(&mut io, 8, 0x48); // legacy timer 1 -> ISA IRQ 8
    let mut msi = Vectors::new();

    let mut cap = [0u8; 8];
    hpet.read(REG_CAP, &mut cap);
    let period_fs = u64::from_le_bytes(cap) >> 32;
    assert_eq!(
        period_fs / 1_000_000,
        HPET_NS_PER_TICK,
        "period in fs matches the counting rate"
    );

    // Linux: enable in legacy mode, timer 1 one-shot 32-bit at +5 ms, timer 0 periodic 32-bit 1 ms.
    hpet.write(REG_CONFIG, &(CNF_ENABLE | CNF_LEG_RT).to_le_bytes());
    clock.advance(777_700);
    let mut c = [0u8; 4];
    hpet.read(REG_COUNTER, &mut c);
    let now = u32::from_le_bytes(c);
    let cfg1 = u32::try_from(TN_INT_ENB | TN_32MODE).unwrap_or(0);
    hpet.write(timer_config_offset(1), &cfg1.to_le_bytes());
    hpet.write(
        timer_comparator_offset(1),
        &now.wrapping_add(50_000).to_le_bytes(),
    );
    let cfg0 = u32::try_from(TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32MODE).unwrap_or(0);
    hpet.write(timer_config_offset(0), &cfg0.to_le_bytes());
    hpet.write(
        timer_comparator_offset(0),
        &now.wrapping_add(10_000).to_le_bytes(),
    );
    hpet.write(timer_comparator_offset(0), &10_000u32.to_le_bytes());

    let start = clock.get();
    let mut router = IsaIrqRouter::new(&mut pic, &mut io, &mut msi);
    run(&mut hpet, &clock, &mut router, start + NS_PER_SEC);
    let periodic = msi.get(0x40);
    assert!((999..=1001).contains(&periodic), "periodic MSIs {periodic}");
    assert_eq!(
        msi.get(0x48),
        1,
        "32-bit one-shot fires once (again only after 2^32 ticks)"
    );
    assert_eq!(msi.total, periodic + 1);
    // The PIC saw the same lines (IRQ 0 and IRQ 8).
    assert_eq!(pic.pending_vector(), Some(0x20));
}

#[test]
fn rtc_date_matches_the_injected_wall_clock_as_a_kernel_reads_it() {
    // 2031-12-31T23:59:58.5Z
    let secs = epoch_secs(2031, 12, 31, 23, 59, 58);
    let clock = ManualClock::new(0);
    let mut rtc = Rtc::new(&clock, &FixedWallClock::new(secs, 500_000_000));
    let read = |rtc: &mut Rtc<&ManualClock>, index: u8| {
        rtc.write(0, &[0x80 | index]); // NMI-disable bit set, as Linux's CMOS_READ does
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    };
    let bcd = |v: u8| (v >> 4) * 10 + (v & 0xf);
    // mc146818_get_time(): wait for UIP to clear, read, retry if the seconds changed.
    let mut samples = Vec::new();
    for _ in 0..3 {
        while read(&mut rtc, REG_A) & 0x80 != 0 {
            clock.advance(10_000);
        }
        let fields: Vec<u8> = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32]
            .iter()
            .map(|&i| read(&mut rtc, i))
            .collect();
        samples.push(fields.iter().map(|&v| bcd(v)).collect::<Vec<_>>());
        clock.advance(NS_PER_SEC);
    }
    assert_eq!(samples[0], vec![58, 59, 23, 31, 12, 31, 20]);
    assert_eq!(
        samples[1],
        vec![59, 59, 23, 31, 12, 31, 20],
        "the second rolls with the host's"
    );
    assert_eq!(samples[2], vec![0, 0, 0, 1, 1, 32, 20], "rolled into 2032");
    // Binary mode shows the same instant.
    rtc.write(0, &[REG_B]);
    rtc.write(1, &[0x06]);
    let year = read(&mut rtc, 0x09);
    assert_eq!(year, 32);
}

#[test]
fn pm_timer_is_monotonic_and_runs_at_3_579545_mhz() {
    let clock = ManualClock::new(5);
    let mut pm = PmTimer::new(&clock);
    let read = |pm: &mut PmTimer<&ManualClock>| {
        let mut b = [0u8; 4];
        pm.read(0, &mut b);
        u32::from_le_bytes(b)
    };
    let first = read(&mut pm);
    let mut last = first;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = clock.get();
    while clock.get() - start < NS_PER_SEC {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        clock.advance(x % 50_000);
        let v = read(&mut pm);
        assert!(v >= last, "went backwards: {v} < {last}");
        last = v;
    }
    let elapsed = clock.get() - start;
    let ticks = u64::from(last - first);
    let expect = elapsed * PM_TIMER_FREQ_HZ / NS_PER_SEC;
    assert!(
        ticks.abs_diff(expect) <= 1,
        "{ticks} ticks in {elapsed} ns, expected {expect}"
    );
    // One second is 3579545 ticks (±1 for the phase).
    assert!(ticks.abs_diff(PM_TIMER_FREQ_HZ) <= PM_TIMER_FREQ_HZ / 20);
}

#[test]
fn timer_service_helper_polls_only_when_due() {
    let clock = ManualClock::new(0);
    let mut pit = Pit::new(&clock);
    let mut irq = IrqRecorder::new();
    pit.write(3, &[0x34]);
    pit.write(0, &[0xa9]);
    pit.write(0, &[0x04]); // 1193: 1 ms
    assert!(!service(&mut pit, clock.get(), &mut irq));
    clock.advance(NS_PER_SEC / 1000);
    assert!(service(&mut pit, clock.get(), &mut irq));
    assert_eq!(irq.rising(0), 1);
}

#[test]
fn runner_can_keep_timers_as_trait_objects() {
    let clock = ManualClock::new(0);
    let mut pit = Pit::new(&clock);
    let mut hpet = Hpet::new(&clock);
    let mut pm = PmTimer::new(&clock);
    let mut rtc = Rtc::new(&clock, &FixedWallClock::new(0, 0));
    pit.write(3, &[0x34]);
    pit.write(0, &[0x9c]);
    pit.write(0, &[0x2e]); // 11932: 10 ms
    rtc.write(0, &[REG_B]);
    rtc.write(1, &[0x12]); // UIE: 1 s
    let mut timers: [&mut dyn TimerDevice; 4] = [&mut pit, &mut hpet, &mut pm, &mut rtc];
    let earliest = timers.iter().filter_map(|t| t.next_deadline_ns()).min();
    assert_eq!(earliest, Some(11932 * NS_PER_SEC / PIT_FREQ_HZ + 1));
    let mut irq = IrqRecorder::new();
    clock.set(NS_PER_SEC);
    for t in timers.iter_mut() {
        service(&mut **t, clock.get(), &mut irq);
    }
    assert_eq!(irq.rising(0), 1, "PIT: one coalesced tick");
    assert!(irq.level(8), "RTC update-ended interrupt");
}
