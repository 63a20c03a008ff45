//! High Precision Event Timer (IA-PC HPET specification 1.0a), 8 timers, after bhyve's `vhpet.c`.
//!
//! # Register layout
//!
//! MMIO window at [`HPET_BASE`] (0xFED0_0000), [`HPET_SIZE`] bytes. Registers are 64-bit and
//! accept 8-byte accesses and 4-byte accesses to either half, naturally aligned; any other width
//! or alignment reads 0 and ignores writes (as `vhpet_mmio_read`/`vhpet_mmio_write`).
//!
//! | offset | register |
//! |---|---|
//! | 0x000 | GCAP_ID (read-only): 7:0 revision 1, 12:8 timers − 1 (7), 13 64-bit counter, 15 legacy replacement capable, 31:16 vendor 0x8086, 63:32 tick period in fs ([`HPET_PERIOD_FS`]) |
//! | 0x010 | GEN_CONF: 0 ENABLE_CNF, 1 LEG_RT_CNF |
//! | 0x020 | GINTR_STA: bit n = timer n level interrupt active; write 1 to clear |
//! | 0x0F0 | MAIN_CNT: 64-bit main counter |
//! | 0x100 + 0x20·n | Tn_CONF_CAP: 1 level, 2 interrupt enable, 3 periodic, 4 periodic capable (RO), 5 64-bit capable (RO), 6 VAL_SET, 8 32-bit mode, 13:9 route, 14 FSB enable (RO 0), 15 FSB capable (RO 0), 63:32 route capability (RO) |
//! | 0x108 + 0x20·n | Tn_COMPARATOR |
//! | 0x110 + 0x20·n | Tn_FSB_INT_ROUTE: reads 0, writes ignored (no FSB delivery) |
//! | others | read 0, writes ignored |
//!
//! # Choices (documented differences from bhyve)
//!
//! * Main counter: **64-bit at 10 MHz** ([`HPET_FREQ_HZ`]; period exactly 100 000 000 fs, so the
//!   advertised period has no rounding error). bhyve's counter is 32-bit at 2^24 Hz.
//! * Legacy replacement routing is supported (bhyve clears LEG_RT_CNF): timer 0 drives ISA IRQ 0
//!   (I/O APIC input 2) and timer 1 ISA IRQ 8. While it is set the PIT and RTC should not
//!   interrupt; [`Hpet::legacy_replacement`] tells the runner to gate their lines.
//! * Otherwise each timer may be routed to I/O APIC inputs 24–31 ([`HPET_ROUTE_CAP`], as bhyve with
//!   32 pins); a route outside the capability is replaced by 0 ("not connected", no interrupt).
//! * FSB (MSI) delivery is not offered (FSB_INT_DEL_CAP = 0).
//! * Every timer is periodic-capable and 64-bit capable; 32-bit mode (Tn_32MODE_CNF, used by
//!   Linux) compares the low 32 bits of the counter, so a one-shot 32-bit timer fires again every
//!   2^32 ticks, as hardware does.
//! * As bhyve, the status bit is only set for an enabled level-triggered timer, and a periodic
//!   period of 0 behaves as one-shot. Periods below [`HPET_MIN_PERIOD_TICKS`] are clamped to it.
//! * Edge-triggered timers pulse their line; level-triggered timers hold it until the guest clears
//!   the status bit (or disables the interrupt, switches to edge or changes the route).

use super::{le_value, lo32, Clock, IrqSink, TimerDevice, MIN_TIMER_PERIOD_NS, NS_PER_SEC};

/// Guest-physical base of the HPET (bhyve's `VHPET_BASE`).
pub const HPET_BASE: u64 = 0xFED0_0000;
/// Size of the HPET window (1 KiB, as bhyve's DSDT declares).
pub const HPET_SIZE: u64 = 0x400;
/// Number of timers.
pub const HPET_NUM_TIMERS: usize = 8;
/// Main counter frequency.
pub const HPET_FREQ_HZ: u64 = 10_000_000;
/// Nanoseconds per main-counter tick.
pub const HPET_NS_PER_TICK: u64 = NS_PER_SEC / HPET_FREQ_HZ;
/// Tick period in femtoseconds, as GCAP_ID reports it.
pub const HPET_PERIOD_FS: u64 = 100_000_000;
/// Shortest interrupt period in ticks ([`MIN_TIMER_PERIOD_NS`] at 10 MHz: 1000).
pub const HPET_MIN_PERIOD_TICKS: u64 = MIN_TIMER_PERIOD_NS / HPET_NS_PER_TICK;
/// I/O APIC inputs a timer may be routed to: 24–31 (Tn_INT_ROUTE_CAP).
pub const HPET_ROUTE_CAP: u32 = 0xFF00_0000;
/// Line of timer 0 in legacy replacement mode (ISA IRQ 0, I/O APIC input 2).
pub const HPET_LEGACY_TIMER0_LINE: u32 = 0;
/// Line of timer 1 in legacy replacement mode (ISA IRQ 8).
pub const HPET_LEGACY_TIMER1_LINE: u32 = 8;

/// Offset of GCAP_ID.
pub const REG_CAP: u64 = 0x000;
/// Offset of GEN_CONF.
pub const REG_CONFIG: u64 = 0x010;
/// Offset of GINTR_STA.
pub const REG_ISR: u64 = 0x020;
/// Offset of MAIN_CNT.
pub const REG_COUNTER: u64 = 0x0F0;
/// Offset of timer 0's registers.
pub const REG_TIMER0: u64 = 0x100;
/// Distance between timers' register blocks.
pub const TIMER_STRIDE: u64 = 0x20;
/// Offset of Tn_CONF_CAP within a timer block.
pub const TIMER_CONFIG: u64 = 0x00;
/// Offset of Tn_COMPARATOR within a timer block.
pub const TIMER_COMPARATOR: u64 = 0x08;
/// Offset of Tn_FSB_INT_ROUTE within a timer block.
pub const TIMER_FSB: u64 = 0x10;

/// GEN_CONF: counter enable.
pub const CNF_ENABLE: u64 = 1 << 0;
/// GEN_CONF: legacy replacement routing.
pub const CNF_LEG_RT: u64 = 1 << 1;

/// Tn_CONF: level-triggered.
pub const TN_LEVEL: u64 = 1 << 1;
/// Tn_CONF: interrupt enable.
pub const TN_INT_ENB: u64 = 1 << 2;
/// Tn_CONF: periodic.
pub const TN_PERIODIC: u64 = 1 << 3;
/// Tn_CAP: periodic capable (read-only).
pub const TN_PER_CAP: u64 = 1 << 4;
/// Tn_CAP: 64-bit capable (read-only).
pub const TN_SIZE_CAP: u64 = 1 << 5;
/// Tn_CONF: next comparator write sets the comparator itself (periodic mode).
pub const TN_VAL_SET: u64 = 1 << 6;
/// Tn_CONF: 32-bit mode.
pub const TN_32MODE: u64 = 1 << 8;
/// Tn_CONF: interrupt route (I/O APIC input), bits 13:9.
pub const TN_ROUTE_MASK: u64 = 0x1f << 9;

const TN_WRITABLE: u64 =
    TN_LEVEL | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32MODE | TN_ROUTE_MASK;
const LOW32: u64 = 0xffff_ffff;
const HIGH32: u64 = !LOW32;
const TIMERS_MASK: u64 = (1 << HPET_NUM_TIMERS) - 1;

/// The GCAP_ID register value (its low 32 bits are the ACPI HPET table's Event Timer Block ID).
pub const fn capabilities() -> u64 {
    0x01 | (((HPET_NUM_TIMERS as u64) - 1) << 8)
        | (1 << 13)
        | (1 << 15)
        | (0x8086 << 16)
        | (HPET_PERIOD_FS << 32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    config: u64,
    comparator: u64,
    /// Periodic increment (0 when not periodic).
    period: u64,
    /// Main-counter value at which the timer next fires.
    next_fire: Option<u64>,
}

impl Timer {
    fn new() -> Self {
        Timer {
            config: TN_PER_CAP | TN_SIZE_CAP | (u64::from(HPET_ROUTE_CAP) << 32),
            comparator: u64::MAX,
            period: 0,
            next_fire: None,
        }
    }
}

fn line_bit(line: u32) -> u64 {
    1u64.checked_shl(line).unwrap_or(0)
}

/// The HPET core.
#[derive(Debug)]
pub struct Hpet<C: Clock> {
    clock: C,
    config: u64,
    isr: u64,
    /// Main counter value at `base_ns` (the whole value while disabled).
    count_base: u64,
    base_ns: u64,
    timers: [Timer; HPET_NUM_TIMERS],
    /// Lines (bit per line) reported asserted to the sink.
    reported_high: u64,
    /// Edge pulses waiting for `poll` (bit per line).
    pending_pulses: u64,
    fired: u64,
}

impl<C: Clock> Hpet<C> {
    /// A disabled HPET: counter 0, all timers one-shot, interrupts disabled, comparators all-ones.
    pub fn new(clock: C) -> Self {
        let now = clock.now_ns();
        Hpet {
            clock,
            config: 0,
            isr: 0,
            count_base: 0,
            base_ns: now,
            timers: [Timer::new(); HPET_NUM_TIMERS],
            reported_high: 0,
            pending_pulses: 0,
            fired: 0,
        }
    }

    fn enabled(&self) -> bool {
        self.config & CNF_ENABLE != 0
    }

    /// Whether legacy replacement routing is on: the runner should then keep the PIT (IRQ 0) and
    /// the RTC (IRQ 8) from interrupting, as the chipset does.
    pub fn legacy_replacement(&self) -> bool {
        self.config & CNF_LEG_RT != 0
    }

    /// The main counter at `now_ns`.
    pub fn counter_at(&self, now_ns: u64) -> u64 {
        if self.enabled() {
            let ticks = now_ns.saturating_sub(self.base_ns) / HPET_NS_PER_TICK;
            self.count_base.wrapping_add(ticks)
        } else {
            self.count_base
        }
    }

    /// Timer interrupts generated so far (a counter for statistics).
    pub fn fired_count(&self) -> u64 {
        self.fired
    }

    fn timer_line(&self, n: usize) -> Option<u32> {
        if self.legacy_replacement() {
            match n {
                0 => return Some(HPET_LEGACY_TIMER0_LINE),
                1 => return Some(HPET_LEGACY_TIMER1_LINE),
                _ => {}
            }
        }
        let t = self.timers.get(n)?;
        let route = lo32((t.config & TN_ROUTE_MASK) >> 9);
        (HPET_ROUTE_CAP & 1u32.checked_shl(route).unwrap_or(0) != 0).then_some(route)
    }

    fn desired_high(&self) -> u64 {
        let mut lines = 0;
        for n in 0..HPET_NUM_TIMERS {
            let Some(t) = self.timers.get(n) else {
                continue;
            };
            if self.isr & (1 << n) != 0 && t.config & TN_LEVEL != 0 {
                if let Some(line) = self.timer_line(n) {
                    lines |= line_bit(line);
                }
            }
        }
        lines
    }

    /// Compute when timer `n` next fires, given the counter value `counter`. `inclusive` (after a
    /// reprogramming) lets a comparator equal to the counter fire now; after a firing the next
    /// match must lie strictly ahead.
    fn schedule(&mut self, n: usize, counter: u64, inclusive: bool) {
        let enabled = self.enabled();
        let Some(t) = self.timers.get_mut(n) else {
            return;
        };
        if !enabled || t.config & TN_INT_ENB == 0 {
            t.next_fire = None;
            return;
        }
        let periodic = t.config & TN_PERIODIC != 0 && t.period != 0;
        let rate = t.period.max(HPET_MIN_PERIOD_TICKS);
        if t.config & TN_32MODE != 0 {
            let c32 = lo32(counter);
            let cmp = lo32(t.comparator);
            let ahead = if inclusive {
                u64::from(cmp.wrapping_sub(c32))
            } else if periodic {
                let lag = u64::from(c32.wrapping_sub(cmp));
                let steps = (lag / rate).saturating_add(1);
                let next = lo32(u64::from(cmp).wrapping_add(steps.wrapping_mul(rate)));
                t.comparator = u64::from(next);
                u64::from(next.wrapping_sub(c32))
            } else {
                match cmp.wrapping_sub(c32) {
                    0 => 1 << 32,
                    d => u64::from(d),
                }
            };
            t.next_fire = Some(counter.wrapping_add(ahead));
            return;
        }
        let due = if inclusive {
            t.comparator >= counter
        } else {
            t.comparator > counter
        };
        t.next_fire = if due {
            Some(t.comparator)
        } else if periodic {
            let lag = counter.saturating_sub(t.comparator);
            let steps = (lag / rate).saturating_add(1);
            t.comparator = t.comparator.saturating_add(steps.saturating_mul(rate));
            (t.comparator > counter || inclusive).then_some(t.comparator)
        } else {
            None
        };
    }

    fn schedule_all(&mut self, counter: u64) {
        for n in 0..HPET_NUM_TIMERS {
            self.schedule(n, counter, true);
        }
    }

    fn fire(&mut self, n: usize) {
        let Some(t) = self.timers.get(n) else { return };
        let level = t.config & TN_LEVEL != 0;
        self.fired = self.fired.wrapping_add(1);
        let Some(line) = self.timer_line(n) else {
            return;
        };
        if level {
            self.isr |= 1 << n;
        } else {
            self.pending_pulses |= line_bit(line);
        }
    }

    /// Fire every timer whose match has passed at `now` (at most once each).
    fn catch_up(&mut self, now: u64) {
        if !self.enabled() {
            return;
        }
        let counter = self.counter_at(now);
        for n in 0..HPET_NUM_TIMERS {
            let due = self
                .timers
                .get(n)
                .and_then(|t| t.next_fire)
                .is_some_and(|f| f <= counter);
            if due {
                self.fire(n);
                self.schedule(n, counter, false);
            }
        }
    }

    fn ns_for_count(&self, target: u64) -> u64 {
        let ahead = target.saturating_sub(self.count_base);
        self.base_ns
            .saturating_add(ahead.saturating_mul(HPET_NS_PER_TICK))
    }

    /// MMIO read at `offset` from [`HPET_BASE`].
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let width = data.len();
        let aligned = match width {
            4 => offset % 4 == 0,
            8 => offset % 8 == 0,
            _ => false,
        };
        let value = if aligned && offset < HPET_SIZE {
            let now = self.clock.now_ns();
            self.catch_up(now);
            let full = self.read_reg(offset & !7, now);
            if width == 8 {
                full
            } else if offset & 4 != 0 {
                full >> 32
            } else {
                full & LOW32
            }
        } else {
            0
        };
        super::fill_le(data, value);
    }

    fn read_reg(&mut self, reg: u64, now: u64) -> u64 {
        match reg {
            REG_CAP => capabilities(),
            REG_CONFIG => self.config,
            REG_ISR => self.isr,
            REG_COUNTER => self.counter_at(now),
            _ => {
                let Some((n, sub)) = timer_slot(reg) else {
                    return 0;
                };
                let counter = self.counter_at(now);
                let enabled = self.enabled();
                let Some(t) = self.timers.get_mut(n) else {
                    return 0;
                };
                match sub {
                    TIMER_CONFIG => t.config,
                    TIMER_COMPARATOR => {
                        // A periodic 64-bit comparator reads as the next match even while its
                        // interrupt is disabled (no deadline keeps it moving then).
                        let periodic = t.config & TN_PERIODIC != 0 && t.period != 0;
                        if enabled
                            && periodic
                            && t.config & TN_32MODE == 0
                            && t.comparator < counter
                        {
                            let rate = t.period.max(HPET_MIN_PERIOD_TICKS);
                            let steps = ((counter - t.comparator) / rate).saturating_add(1);
                            t.comparator = t.comparator.saturating_add(steps.saturating_mul(rate));
                        }
                        if t.config & TN_32MODE != 0 {
                            t.comparator & LOW32
                        } else {
                            t.comparator
                        }
                    }
                    _ => 0,
                }
            }
        }
    }

    /// MMIO write at `offset` from [`HPET_BASE`].
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let width = data.len();
        let Some(value) = le_value(data) else { return };
        let (val, mask) = match width {
            8 if offset % 8 == 0 => (value, u64::MAX),
            4 if offset % 4 == 0 => {
                if offset & 4 != 0 {
                    (value << 32, HIGH32)
                } else {
                    (value, LOW32)
                }
            }
            _ => return,
        };
        if offset >= HPET_SIZE {
            return;
        }
        let now = self.clock.now_ns();
        self.catch_up(now);
        match offset & !7 {
            REG_CONFIG => self.write_config(val, mask, now),
            REG_ISR => self.isr &= !(val & mask & TIMERS_MASK),
            REG_COUNTER => {
                let counter = self.counter_at(now);
                self.count_base = (counter & !mask) | (val & mask);
                self.base_ns = now;
                let c = self.count_base;
                self.schedule_all(c);
            }
            reg => {
                let Some((n, sub)) = timer_slot(reg) else {
                    return;
                };
                match sub {
                    TIMER_CONFIG => self.write_timer_config(n, val, mask, now),
                    TIMER_COMPARATOR => self.write_comparator(n, val, mask, now),
                    _ => {}
                }
            }
        }
    }

    fn write_config(&mut self, val: u64, mask: u64, now: u64) {
        let counter = self.counter_at(now);
        let old = self.config;
        self.config = ((old & !mask) | (val & mask)) & (CNF_ENABLE | CNF_LEG_RT);
        if (old ^ self.config) & CNF_ENABLE != 0 {
            self.count_base = counter;
            self.base_ns = now;
            if self.enabled() {
                self.schedule_all(counter);
            } else {
                for t in self.timers.iter_mut() {
                    t.next_fire = None;
                }
            }
        }
    }

    fn write_timer_config(&mut self, n: usize, val: u64, mask: u64, now: u64) {
        let counter = self.counter_at(now);
        let old_line = self.timer_line(n);
        let Some(t) = self.timers.get_mut(n) else {
            return;
        };
        let old = t.config;
        let mut new = (old & !mask) | (val & mask);
        new = (new & TN_WRITABLE) | (old & !TN_WRITABLE);
        let route = lo32((new & TN_ROUTE_MASK) >> 9);
        if HPET_ROUTE_CAP & 1u32.checked_shl(route).unwrap_or(0) == 0 {
            new &= !TN_ROUTE_MASK;
        }
        if new & TN_32MODE != 0 {
            t.comparator &= LOW32;
            t.period &= LOW32;
        }
        if new & TN_PERIODIC == 0 {
            t.period = 0;
        }
        t.config = new;
        let bit = 1u64 << n;
        if self.isr & bit != 0 {
            let new_line = self.timer_line(n);
            if new & TN_INT_ENB == 0 || new & TN_LEVEL == 0 || new_line != old_line {
                self.isr &= !bit;
            }
        }
        self.schedule(n, counter, true);
    }

    fn write_comparator(&mut self, n: usize, val: u64, mask: u64, now: u64) {
        let counter = self.counter_at(now);
        let Some(t) = self.timers.get_mut(n) else {
            return;
        };
        let (val, mask) = if t.config & TN_32MODE != 0 {
            (val & LOW32, mask & LOW32)
        } else {
            (val, mask)
        };
        if mask != 0 {
            if t.config & TN_PERIODIC != 0 {
                t.period = (t.period & !mask) | (val & mask);
                if t.config & TN_VAL_SET != 0 {
                    t.comparator = (t.comparator & !mask) | (val & mask);
                }
            } else {
                t.comparator = (t.comparator & !mask) | (val & mask);
            }
        }
        t.config &= !TN_VAL_SET;
        self.schedule(n, counter, true);
    }
}

/// Map a register offset (8-aligned) to (timer, offset within the timer block).
fn timer_slot(reg: u64) -> Option<(usize, u64)> {
    let rel = reg.checked_sub(REG_TIMER0)?;
    let n = usize::try_from(rel / TIMER_STRIDE).ok()?;
    (n < HPET_NUM_TIMERS).then_some((n, rel % TIMER_STRIDE))
}

impl<C: Clock> TimerDevice for Hpet<C> {
    fn next_deadline_ns(&self) -> Option<u64> {
        if self.pending_pulses != 0 || self.desired_high() != self.reported_high {
            return Some(0);
        }
        if !self.enabled() {
            return None;
        }
        self.timers
            .iter()
            .filter_map(|t| t.next_fire)
            .map(|f| self.ns_for_count(f))
            .min()
    }

    fn poll(&mut self, now_ns: u64, irq: &mut dyn IrqSink) {
        self.catch_up(now_ns);
        let desired = self.desired_high();
        let changed = desired ^ self.reported_high;
        for line in 0..64u32 {
            let b = line_bit(line);
            if changed & b != 0 {
                irq.set_irq(line, desired & b != 0);
            }
        }
        self.reported_high = desired;
        let pulses = core::mem::take(&mut self.pending_pulses);
        for line in 0..64u32 {
            let b = line_bit(line);
            // A line held high by a level-triggered timer cannot show another edge.
            if pulses & b != 0 && desired & b == 0 {
                irq.set_irq(line, true);
                irq.set_irq(line, false);
            }
        }
    }
}

/// Tn_CONF_CAP offset of timer `n`.
pub const fn timer_config_offset(n: u64) -> u64 {
    REG_TIMER0 + TIMER_STRIDE * n + TIMER_CONFIG
}

/// Tn_COMPARATOR offset of timer `n`.
pub const fn timer_comparator_offset(n: u64) -> u64 {
    REG_TIMER0 + TIMER_STRIDE * n + TIMER_COMPARATOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::{IrqRecorder, ManualClock};

    fn w64(h: &mut Hpet<&ManualClock>, off: u64, v: u64) {
        h.write(off, &v.to_le_bytes());
    }
    fn w32(h: &mut Hpet<&ManualClock>, off: u64, v: u32) {
        h.write(off, &v.to_le_bytes());
    }
    fn r64(h: &mut Hpet<&ManualClock>, off: u64) -> u64 {
        let mut b = [0u8; 8];
        h.read(off, &mut b);
        u64::from_le_bytes(b)
    }
    fn r32(h: &mut Hpet<&ManualClock>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        h.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn run_until(
        h: &mut Hpet<&ManualClock>,
        clock: &ManualClock,
        irq: &mut IrqRecorder,
        end: u64,
    ) -> u64 {
        let mut polls = 0;
        while let Some(d) = h.next_deadline_ns() {
            if d > end {
                break;
            }
            clock.set(d);
            let before = irq.total_rising();
            h.poll(clock.get(), irq);
            assert!(
                irq.total_rising() - before <= HPET_NUM_TIMERS as u64,
                "bounded per poll"
            );
            polls += 1;
        }
        clock.set(end);
        h.poll(end, irq);
        polls
    }

    #[test]
    fn capabilities_register() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let cap = r64(&mut h, REG_CAP);
        assert_eq!(cap >> 32, 100_000_000, "10 MHz");
        assert_eq!((cap >> 8) & 0x1f, 7, "8 timers");
        assert_ne!(cap & (1 << 13), 0, "64-bit counter");
        assert_ne!(cap & (1 << 15), 0, "legacy replacement capable");
        assert_eq!((cap >> 16) & 0xffff, 0x8086);
        assert_eq!(u64::from(r32(&mut h, REG_CAP + 4)), cap >> 32);
        w64(&mut h, REG_CAP, 0);
        assert_eq!(r64(&mut h, REG_CAP), cap, "read-only");
    }

    #[test]
    fn counter_runs_only_when_enabled_and_is_writable() {
        let clock = ManualClock::new(1000);
        let mut h = Hpet::new(&clock);
        clock.advance(1_000_000);
        assert_eq!(r64(&mut h, REG_COUNTER), 0);
        w64(&mut h, REG_CONFIG, CNF_ENABLE);
        clock.advance(1_000_000);
        assert_eq!(r64(&mut h, REG_COUNTER), 10_000);
        w64(&mut h, REG_CONFIG, 0);
        clock.advance(1_000_000);
        assert_eq!(r64(&mut h, REG_COUNTER), 10_000, "frozen");
        w32(&mut h, REG_COUNTER + 4, 1);
        assert_eq!(r64(&mut h, REG_COUNTER), (1 << 32) + 10_000);
        assert_eq!(r32(&mut h, REG_COUNTER + 4), 1);
    }

    #[test]
    fn one_shot_64bit_edge_fires_once_on_route() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(&mut h, timer_config_offset(2), TN_INT_ENB | (26 << 9));
        assert_eq!((r64(&mut h, timer_config_offset(2)) >> 9) & 0x1f, 26);
        w64(&mut h, timer_comparator_offset(2), 50_000); // 5 ms
        w64(&mut h, REG_CONFIG, CNF_ENABLE);
        assert_eq!(h.next_deadline_ns(), Some(5_000_000));
        run_until(&mut h, &clock, &mut irq, 4_999_999);
        assert_eq!(irq.rising(26), 0);
        run_until(&mut h, &clock, &mut irq, NS_PER_SEC);
        assert_eq!(irq.rising(26), 1);
        assert_eq!(h.fired_count(), 1);
        assert!(!irq.level(26));
        assert_eq!(
            h.next_deadline_ns(),
            None,
            "one-shot 64-bit does not repeat"
        );
    }

    #[test]
    fn periodic_32bit_linux_style_rate() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(&mut h, REG_CONFIG, CNF_ENABLE | CNF_LEG_RT);
        clock.advance(123_456);
        let now = r32(&mut h, REG_COUNTER);
        let delta = 10_000u32; // 1 ms
        w32(
            &mut h,
            timer_config_offset(0),
            lo32(TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32MODE),
        );
        w32(&mut h, timer_comparator_offset(0), now.wrapping_add(delta));
        w32(&mut h, timer_comparator_offset(0), delta);
        let start = clock.get();
        run_until(&mut h, &clock, &mut irq, start + NS_PER_SEC);
        let n = irq.rising(HPET_LEGACY_TIMER0_LINE);
        assert!((999..=1001).contains(&n), "got {n}");
    }

    #[test]
    fn periodic_32bit_comparator_wraps() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(&mut h, REG_COUNTER, 0xffff_f000);
        w64(
            &mut h,
            timer_config_offset(0),
            TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32MODE,
        );
        w64(&mut h, timer_comparator_offset(0), 0xffff_f800);
        w64(&mut h, timer_comparator_offset(0), 0x1000);
        w64(&mut h, REG_CONFIG, CNF_ENABLE | CNF_LEG_RT);
        // Matches at 0xffff_f800 (tick 0x800) and 0x0000_0800 (after the wrap, tick 0x1800).
        run_until(&mut h, &clock, &mut irq, 0x800 * 100);
        assert_eq!(irq.rising(0), 1);
        run_until(&mut h, &clock, &mut irq, 0x17ff * 100);
        assert_eq!(irq.rising(0), 1);
        run_until(&mut h, &clock, &mut irq, 0x1800 * 100);
        assert_eq!(irq.rising(0), 2, "fired again across the 32-bit wrap");
        assert_eq!(r32(&mut h, timer_comparator_offset(0)), 0x1800);
        assert_eq!(
            r32(&mut h, timer_comparator_offset(0) + 4),
            0,
            "32-bit mode: upper half 0"
        );
    }

    #[test]
    fn one_shot_32bit_wraps_and_refires_every_2_pow_32() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(&mut h, REG_COUNTER, 0xffff_ff00);
        w64(&mut h, timer_config_offset(1), TN_INT_ENB | TN_32MODE);
        w32(&mut h, timer_comparator_offset(1), 0x100);
        w64(&mut h, REG_CONFIG, CNF_ENABLE | CNF_LEG_RT);
        assert_eq!(h.next_deadline_ns(), Some(0x200 * 100));
        run_until(&mut h, &clock, &mut irq, 0x200 * 100);
        assert_eq!(irq.rising(HPET_LEGACY_TIMER1_LINE), 1);
        assert_eq!(h.next_deadline_ns(), Some((0x200 + (1u64 << 32)) * 100));
    }

    #[test]
    fn level_timer_holds_line_until_status_cleared() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(
            &mut h,
            timer_config_offset(3),
            TN_INT_ENB | TN_LEVEL | TN_PERIODIC | TN_VAL_SET | (24 << 9),
        );
        w64(&mut h, timer_comparator_offset(3), 10_000);
        w64(&mut h, REG_CONFIG, CNF_ENABLE);
        run_until(&mut h, &clock, &mut irq, 5_000_000);
        assert_eq!(
            irq.rising(24),
            1,
            "periodic level timer: one edge until cleared"
        );
        assert!(irq.level(24));
        assert_eq!(r64(&mut h, REG_ISR), 1 << 3);
        w64(&mut h, REG_ISR, 1 << 3);
        assert_eq!(h.next_deadline_ns(), Some(0));
        h.poll(clock.get(), &mut irq);
        assert!(!irq.level(24));
        run_until(&mut h, &clock, &mut irq, 7_000_000);
        assert_eq!(irq.rising(24), 2);
        // Disabling the interrupt drops a pending level.
        w64(
            &mut h,
            timer_config_offset(3),
            TN_LEVEL | TN_PERIODIC | (24 << 9),
        );
        assert_eq!(r64(&mut h, REG_ISR), 0);
        h.poll(clock.get(), &mut irq);
        assert!(!irq.level(24));
    }

    #[test]
    fn invalid_route_reads_zero_and_delivers_nothing() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        w64(
            &mut h,
            timer_config_offset(4),
            TN_INT_ENB | (5 << 9) | (1 << 14) | (1 << 15) | TN_SIZE_CAP,
        );
        let cfg = r64(&mut h, timer_config_offset(4));
        assert_eq!(cfg & TN_ROUTE_MASK, 0);
        assert_eq!(cfg & ((1 << 14) | (1 << 15)), 0, "no FSB");
        assert_eq!(
            cfg >> 32,
            u64::from(HPET_ROUTE_CAP),
            "route capability read-only"
        );
        assert_ne!(cfg & TN_SIZE_CAP, 0);
        w64(&mut h, timer_comparator_offset(4), 100);
        w64(&mut h, REG_CONFIG, CNF_ENABLE);
        run_until(&mut h, &clock, &mut irq, NS_PER_SEC);
        assert_eq!(irq.calls, 0);
    }

    #[test]
    fn every_tick_periodic_is_clamped() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut irq = IrqRecorder::new();
        for n in 0..8u64 {
            w64(
                &mut h,
                timer_config_offset(n),
                TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | ((24 + n) << 9),
            );
            w64(&mut h, timer_comparator_offset(n), 1);
            w64(&mut h, timer_comparator_offset(n), 1);
        }
        w64(&mut h, REG_CONFIG, CNF_ENABLE);
        run_until(&mut h, &clock, &mut irq, NS_PER_SEC);
        for n in 0..8u32 {
            let c = irq.rising(24 + n);
            assert!(c <= NS_PER_SEC / MIN_TIMER_PERIOD_NS + 1, "timer {n}: {c}");
            assert!(c >= NS_PER_SEC / MIN_TIMER_PERIOD_NS - 1, "timer {n}: {c}");
        }
        // A stall produces one interrupt per timer, not a burst.
        let before = irq.total_rising();
        clock.advance(10 * NS_PER_SEC);
        h.poll(clock.get(), &mut irq);
        assert_eq!(irq.total_rising() - before, 8);
    }

    #[test]
    fn odd_widths_and_misaligned_accesses() {
        let clock = ManualClock::new(0);
        let mut h = Hpet::new(&clock);
        let mut b = [0xaau8; 2];
        h.read(REG_CAP, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xaau8; 8];
        h.read(REG_CAP + 4, &mut b);
        assert_eq!(b, [0; 8], "misaligned 8-byte read");
        h.write(REG_CONFIG, &[1]);
        h.write(REG_CONFIG + 2, &1u32.to_le_bytes());
        assert_eq!(r64(&mut h, REG_CONFIG), 0);
        h.read(HPET_SIZE, &mut b);
        assert_eq!(b, [0; 8]);
        assert_eq!(r64(&mut h, 0x200), 0, "reserved");
        assert_eq!(r64(&mut h, timer_config_offset(0) + TIMER_FSB), 0);
    }
}
