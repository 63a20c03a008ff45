//! Fuzz harnesses: each `fuzz_<device>` reads its input as a stream of guest register traffic,
//! clock advances and runner actions, drives the device through the public API exactly as the
//! runner would, and checks the invariants a hostile guest must not break:
//!
//! * no panic, whatever the offsets, widths and values;
//! * after `poll(now)` the next deadline is strictly after `now` (so a runner that follows the
//!   deadlines always makes progress: no timer can demand attention in a loop);
//! * a poll raises each interrupt line at most once;
//! * interrupt totals stay within what the documented period floor allows.
//!
//! The same functions back the randomized tests (`stages/tests/devices_fuzz.rs`) and can be called
//! from a libFuzzer target (`fuzz_target!(|data: &[u8]| stages::devices::fuzz::fuzz_hpet(data))`).
//! They are ordinary no_std code and always compiled.
//!
//! Input format: a sequence of operations, each starting with an opcode byte; the bytes that follow
//! depend on the opcode. A truncated last operation is ignored.

use super::hpet::{Hpet, HPET_NUM_TIMERS, HPET_SIZE};
use super::ioapic::IoApic;
use super::pci::{standard_config_io, PciConfigSpace, HOST_BRIDGE_BDF, LPC_BDF};
use super::pic::{PicPair, PicRange};
use super::pit::Pit;
use super::pmtimer::PmTimer;
use super::rtc::{Rtc, REG_C};
use super::testing::{FixedWallClock, IrqRecorder, ManualClock, MsiRecorder, RECORDED_LINES};
use super::{TimerDevice, MIN_TIMER_PERIOD_NS};

/// A cursor over fuzz input.
#[derive(Debug)]
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    fn u8(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied()?;
        self.pos += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }

    /// An access width: mostly the legal ones, sometimes an illegal one.
    fn width(&mut self) -> Option<usize> {
        const WIDTHS: [usize; 8] = [1, 2, 4, 8, 4, 0, 3, 16];
        WIDTHS.get(usize::from(self.u8()? & 7)).copied()
    }

    /// `len` bytes of data (zero-padded if the input ends).
    fn bytes<const N: usize>(&mut self, len: usize) -> [u8; N] {
        let mut out = [0u8; N];
        for b in out.iter_mut().take(len) {
            *b = self.u8().unwrap_or(0);
        }
        out
    }

    /// A clock step spanning nanoseconds to tens of seconds.
    fn step(&mut self) -> Option<u64> {
        let shift = u32::from(self.u8()? % 36);
        Some((1u64 << shift) + u64::from(self.u8()?))
    }
}

/// What one harness run did, so tests can check that random traffic reached the interesting
/// states (interrupts actually fired) and did not just bounce off invalid accesses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuzzStats {
    /// Operations executed.
    pub ops: u64,
    /// Interrupts produced: rising edges (timers), MSIs (I/O APIC), vectors acknowledged (PIC),
    /// or for PCI the data reads that reached a function.
    pub interrupts: u64,
    /// Simulated time covered, in nanoseconds.
    pub elapsed_ns: u64,
}

/// Poll `dev` at `now` and check the per-poll invariants.
fn checked_poll<T: TimerDevice>(dev: &mut T, now: u64, irq: &mut IrqRecorder) {
    let before = irq.clone();
    dev.poll(now, irq);
    for line in 0..u32::try_from(RECORDED_LINES).unwrap_or(0) {
        let raised = irq.rising(line) - before.rising(line);
        assert!(raised <= 1, "line {line} raised {raised} times in one poll");
    }
    if let Some(d) = dev.next_deadline_ns() {
        assert!(
            d > now || d == u64::MAX,
            "deadline {d} not after now {now} right after poll"
        );
    }
}

/// The runner's obligation: poll when the deadline has passed.
fn service<T: TimerDevice>(dev: &mut T, now: u64, irq: &mut IrqRecorder) -> bool {
    match dev.next_deadline_ns() {
        Some(d) if d <= now => {
            checked_poll(dev, now, irq);
            true
        }
        _ => false,
    }
}

/// Bound on interrupts a set of `timers` can produce in `elapsed_ns` given `accesses` guest
/// register accesses (each of which may re-arm a timer or move an asserted line).
fn storm_bound(timers: u64, elapsed_ns: u64, accesses: u64) -> u64 {
    timers
        .saturating_mul(elapsed_ns / MIN_TIMER_PERIOD_NS + 2)
        .saturating_add(accesses.saturating_mul(HPET_NUM_TIMERS as u64))
}

/// Fuzz the 8254 PIT and port 0x61.
pub fn fuzz_pit(data: &[u8]) {
    run_pit(data);
}

/// [`fuzz_pit`], returning what the run did.
pub fn run_pit(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let clock = ManualClock::new(1);
    let mut pit = Pit::new(&clock);
    let mut irq = IrqRecorder::new();
    let mut inp = Input::new(data);
    let mut accesses = 0u64;
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        match op % 6 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                pit.read(u64::from(off % 5), buf.get_mut(..w).unwrap_or(&mut []));
                accesses += 1;
            }
            1 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let buf: [u8; 16] = inp.bytes(w);
                pit.write(u64::from(off % 5), buf.get(..w).unwrap_or(&[]));
                accesses += 1;
            }
            2 => {
                let Some(v) = inp.u8() else { break };
                pit.port61_write(v);
                let _ = pit.port61_read();
                accesses += 1;
            }
            3 => {
                let Some(s) = inp.step() else { break };
                clock.advance(s);
            }
            4 => checked_poll(&mut pit, clock.get(), &mut irq),
            _ => {
                let Some(ch) = inp.u8() else { break };
                let _ = pit.out(usize::from(ch % 4));
            }
        }
        service(&mut pit, clock.get(), &mut irq);
    }
    let bound = storm_bound(1, clock.get(), accesses);
    assert!(
        irq.rising(0) <= bound,
        "PIT raised IRQ 0 {} times (bound {bound})",
        irq.rising(0)
    );
    stats.interrupts = irq.total_rising();
    stats.elapsed_ns = clock.get() - 1;
    stats
}

/// Fuzz the HPET.
pub fn fuzz_hpet(data: &[u8]) {
    run_hpet(data);
}

/// [`fuzz_hpet`], returning what the run did.
pub fn run_hpet(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let clock = ManualClock::new(1);
    let mut hpet = Hpet::new(&clock);
    let mut irq = IrqRecorder::new();
    let mut inp = Input::new(data);
    let mut accesses = 0u64;
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        match op % 5 {
            0 | 1 => {
                let (Some(raw), Some(w)) = (inp.u16(), inp.width()) else {
                    break;
                };
                let mut off = u64::from(raw) % (HPET_SIZE + 0x40);
                if raw & 0x8000 == 0 {
                    // Mostly naturally aligned, to reach the register logic.
                    off &= !(u64::try_from(w).unwrap_or(1).max(1) - 1);
                }
                if op % 5 == 0 {
                    let mut buf = [0u8; 16];
                    hpet.read(off, buf.get_mut(..w).unwrap_or(&mut []));
                } else {
                    let buf: [u8; 16] = inp.bytes(w);
                    hpet.write(off, buf.get(..w).unwrap_or(&[]));
                }
                accesses += 1;
            }
            2 => {
                let Some(s) = inp.step() else { break };
                clock.advance(s);
            }
            3 => checked_poll(&mut hpet, clock.get(), &mut irq),
            _ => {
                let mut b = [0u8; 8];
                hpet.read(0x020, &mut b);
                assert_eq!(
                    u64::from_le_bytes(b) >> HPET_NUM_TIMERS,
                    0,
                    "status bits beyond the timers"
                );
            }
        }
        service(&mut hpet, clock.get(), &mut irq);
    }
    let bound = storm_bound(HPET_NUM_TIMERS as u64, clock.get(), accesses);
    assert!(
        irq.total_rising() <= bound,
        "HPET raised {} interrupts (bound {bound})",
        irq.total_rising()
    );
    stats.interrupts = irq.total_rising();
    stats.elapsed_ns = clock.get() - 1;
    stats
}

/// Fuzz the RTC, index-port fuzzing included.
pub fn fuzz_rtc(data: &[u8]) {
    run_rtc(data);
}

/// [`fuzz_rtc`], returning what the run did.
pub fn run_rtc(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let clock = ManualClock::new(1);
    let mut wall = FixedWallClock::new(1_700_000_000, 123_456_789);
    if let (Some(&a), Some(&b)) = (data.first(), data.get(1)) {
        // Let the input pick the start date too (anything from 1970 to ~2106).
        wall = FixedWallClock::new(
            i64::from(u32::from_le_bytes([a, b, a, b])),
            u32::from(a) * 3_900_000,
        );
    }
    let mut rtc = Rtc::new(&clock, &wall);
    let mut irq = IrqRecorder::new();
    let mut inp = Input::new(data);
    let mut accesses = 0u64;
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        match op % 6 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                rtc.read(u64::from(off % 3), buf.get_mut(..w).unwrap_or(&mut []));
                accesses += 1;
            }
            1 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let buf: [u8; 16] = inp.bytes(w);
                rtc.write(u64::from(off % 3), buf.get(..w).unwrap_or(&[]));
                accesses += 1;
            }
            2 => {
                // Select a register (any byte: bit 7 and out-of-range indexes included) and
                // read or write it.
                let (Some(index), Some(v)) = (inp.u8(), inp.u8()) else {
                    break;
                };
                rtc.write(0, &[index]);
                if v & 1 == 0 {
                    let mut b = [0u8];
                    rtc.read(1, &mut b);
                    if index & 0x7f == REG_C {
                        assert_eq!(b[0] & 0x0f, 0, "register C low nibble");
                    }
                } else {
                    rtc.write(1, &[v]);
                }
                accesses += 1;
            }
            3 => {
                let Some(s) = inp.step() else { break };
                clock.advance(s);
            }
            4 => checked_poll(&mut rtc, clock.get(), &mut irq),
            _ => {
                let _ = rtc.time_secs();
                let _ = rtc.set_time_from_wall(&wall);
            }
        }
        service(&mut rtc, clock.get(), &mut irq);
    }
    // IRQ 8 follows IRQF, which can only fall (and so rise again) when the guest reads register C
    // or rewrites register B: however long the run, edges are bounded by the guest's accesses.
    assert!(
        irq.rising(8) <= accesses + 1,
        "RTC raised IRQ 8 {} times for {accesses} accesses",
        irq.rising(8)
    );
    stats.interrupts = irq.total_rising();
    stats.elapsed_ns = clock.get() - 1;
    stats
}

/// Fuzz the ACPI PM timer.
pub fn fuzz_pmtimer(data: &[u8]) {
    run_pmtimer(data);
}

/// [`fuzz_pmtimer`], returning what the run did.
pub fn run_pmtimer(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let clock = ManualClock::new(1);
    let mut pm = PmTimer::new(&clock);
    let mut irq = IrqRecorder::new();
    let mut inp = Input::new(data);
    let mut last: Option<(u64, u32)> = None;
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        match op % 5 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                pm.read(u64::from(off % 6), buf.get_mut(..w).unwrap_or(&mut []));
                let mut b = [0u8; 4];
                pm.read(0, &mut b);
                let v = u32::from_le_bytes(b);
                let now = clock.get();
                if let Some((t, prev)) = last {
                    // Monotonic modulo 2^32: the forward distance matches the elapsed time.
                    let expect = super::mul_div_floor(
                        now - t,
                        super::pmtimer::PM_TIMER_FREQ_HZ,
                        super::NS_PER_SEC,
                    );
                    let got = u64::from(v.wrapping_sub(prev));
                    assert!(
                        expect >= (1 << 32) || got.abs_diff(expect % (1 << 32)) <= 1,
                        "PM timer not monotonic"
                    );
                }
                last = Some((now, v));
            }
            1 => {
                let Some(w) = inp.width() else { break };
                let buf: [u8; 16] = inp.bytes(w);
                pm.write(0, buf.get(..w).unwrap_or(&[]));
            }
            2 => {
                let Some(v) = inp.u8() else { break };
                match v % 3 {
                    0 => pm.set_timer_enable(v & 4 != 0),
                    1 => pm.clear_timer_status(),
                    _ => {
                        let _ = pm.timer_status();
                    }
                }
            }
            3 => {
                let Some(s) = inp.step() else { break };
                clock.advance(s);
            }
            _ => checked_poll(&mut pm, clock.get(), &mut irq),
        }
        service(&mut pm, clock.get(), &mut irq);
    }
    stats.interrupts = irq.total_rising();
    stats.elapsed_ns = clock.get() - 1;
    stats
}

/// Fuzz the I/O APIC: MMIO traffic, input lines and EOIs.
pub fn fuzz_ioapic(data: &[u8]) {
    run_ioapic(data);
}

/// [`fuzz_ioapic`], returning what the run did.
pub fn run_ioapic(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let mut io = IoApic::new();
    let mut msi = MsiRecorder::new();
    let mut inp = Input::new(data);
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        let before = msi.count;
        match op % 5 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                io.read(u64::from(off % 0x24), buf.get_mut(..w).unwrap_or(&mut []));
            }
            1 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let buf: [u8; 16] = inp.bytes(w);
                // Bias towards IOREGSEL/IOWIN so the redirection table gets programmed.
                let off = if off & 0x80 == 0 {
                    u64::from(off & 0x10)
                } else {
                    u64::from(off % 0x24)
                };
                io.write(off, buf.get(..w).unwrap_or(&[]));
            }
            2 => {
                let Some(v) = inp.u8() else { break };
                io.set_irq(u32::from(v % 40), v & 0x80 != 0, &mut msi);
            }
            3 => {
                let Some(v) = inp.u8() else { break };
                io.eoi(v, &mut msi);
            }
            _ => io.flush(&mut msi),
        }
        // One operation delivers at most one message per pin, twice (pending flush + the op).
        assert!(
            msi.count - before <= 64,
            "I/O APIC burst of {} messages",
            msi.count - before
        );
        if let Some((addr, _)) = msi.last {
            assert_eq!(
                addr & 0xFFF0_0000,
                0xFEE0_0000,
                "MSI outside the LAPIC window"
            );
        }
    }
    stats.interrupts = msi.count;
    stats
}

/// Fuzz the PIC pair: port traffic on the three ranges, input lines and acknowledges.
pub fn fuzz_pic(data: &[u8]) {
    run_pic(data);
}

/// [`fuzz_pic`], returning what the run did.
pub fn run_pic(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let mut pic = PicPair::new();
    let mut inp = Input::new(data);
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        let range = match op / 8 % 3 {
            0 => PicRange::Master,
            1 => PicRange::Slave,
            _ => PicRange::Elcr,
        };
        match op % 5 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                pic.read(
                    range,
                    u64::from(off % 3),
                    buf.get_mut(..w).unwrap_or(&mut []),
                );
            }
            1 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let buf: [u8; 16] = inp.bytes(w);
                pic.write(range, u64::from(off % 3), buf.get(..w).unwrap_or(&[]));
            }
            2 => {
                let Some(v) = inp.u8() else { break };
                pic.set_irq(u32::from(v % 20), v & 0x80 != 0);
            }
            3 => {
                let out = pic.intr_output();
                let v = pic.pending_vector();
                assert_eq!(out, v.is_some(), "INT output and pending vector disagree");
                stats.interrupts += u64::from(v.is_some());
            }
            _ => {
                let _ = pic.interrupt_acknowledge();
            }
        }
        let elcr = pic.elcr();
        assert_eq!(
            elcr & 0x2107,
            0,
            "ELCR let IRQ 0, 1, 2, 8 or 13 become level-triggered"
        );
    }
    stats
}

/// Fuzz PCI configuration mechanism #1 with the standard bridges.
pub fn fuzz_pci(data: &[u8]) {
    run_pci(data);
}

/// [`fuzz_pci`], returning what the run did.
pub fn run_pci(data: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let Ok(mut io) = standard_config_io::<4>() else {
        return stats;
    };
    let mut inp = Input::new(data);
    while let Some(op) = inp.u8() {
        stats.ops += 1;
        match op % 3 {
            0 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let mut buf = [0u8; 16];
                let off = u64::from(off % 9);
                io.read(off, buf.get_mut(..w).unwrap_or(&mut []));
                let claimed = off >= 4
                    && io
                        .decode(off - 4, w)
                        .is_some_and(|(bdf, _)| io.is_registered(bdf));
                stats.interrupts += u64::from(claimed);
            }
            1 => {
                let (Some(off), Some(w)) = (inp.u8(), inp.width()) else {
                    break;
                };
                let buf: [u8; 16] = inp.bytes(w);
                io.write(u64::from(off % 9), buf.get(..w).unwrap_or(&[]));
            }
            _ => {
                // Point CONFIG_ADDRESS at one of the bridges (or nowhere) with a random register.
                let (Some(sel), Some(reg)) = (inp.u8(), inp.u8()) else {
                    break;
                };
                let bdf = match sel % 3 {
                    0 => HOST_BRIDGE_BDF.raw(),
                    1 => LPC_BDF.raw(),
                    _ => u16::from(sel),
                };
                let enable = if sel & 0x80 == 0 {
                    super::pci::CONFIG_ENABLE
                } else {
                    0
                };
                let addr = enable | (u32::from(bdf) << 8) | u32::from(reg);
                io.write(0, &addr.to_le_bytes());
            }
        }
    }
    // Whatever was written, the identity registers did not move.
    let mut id = [0u8; 4];
    if let Some(h) = io.function_mut(HOST_BRIDGE_BDF) {
        h.config_read(HOST_BRIDGE_BDF, 0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1275_1275);
        h.config_read(HOST_BRIDGE_BDF, 8, &mut id);
        assert_eq!(u32::from_le_bytes(id) >> 8, 0x06_0000);
    }
    if let Some(l) = io.function_mut(LPC_BDF) {
        l.config_read(LPC_BDF, 0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x7000_8086);
        l.config_read(LPC_BDF, 8, &mut id);
        assert_eq!(u32::from_le_bytes(id) >> 8, 0x06_0100);
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_tiny_inputs() {
        for data in [&[][..], &[0], &[1, 2], &[255; 7]] {
            fuzz_pit(data);
            fuzz_hpet(data);
            fuzz_rtc(data);
            fuzz_pmtimer(data);
            fuzz_ioapic(data);
            fuzz_pic(data);
            fuzz_pci(data);
        }
    }
}
