//! ACPI power-management timer (ACPI 6.x §4.8.3.3, PM_TMR), after bhyve's `vpmtmr.c`.
//!
//! # Register layout
//!
//! One read-only 32-bit register at port [`PM_TIMER_PORT`] (0x408, bhyve's `BHYVE_PM_TIMER_ADDR`):
//! a free-running counter at [`PM_TIMER_FREQ_HZ`] (3.579545 MHz) of the [`Clock`], monotonic
//! (modulo its width) and independent of guest exits.
//!
//! * Width: **32 bits**, as bhyve (its FADT sets TMR_VAL_EXT, "32-bit PM Timer (V1) : 1"); the
//!   ACPI tables generated for our guests must set FADT.Flags.TMR_VAL_EXT (bit 8) and
//!   PM_TMR_LEN = 4.
//! * Accesses: a 4-byte read at offset 0 is the register; naturally aligned 1- and 2-byte reads
//!   return the corresponding bytes (as chipsets do); other reads return all-ones. Writes are
//!   ignored.
//! * TMR_STS: whoever owns the PM1 event block can mirror the ACPI timer-overflow status (set when
//!   bit 31 of the counter toggles, every 2^31 ticks ≈ 600 s) with [`PmTimer::set_timer_enable`],
//!   [`PmTimer::timer_status`] and [`PmTimer::clear_timer_status`]; while TMR_EN and TMR_STS are
//!   both set the SCI line (ISA IRQ 9 by default, bhyve's `SCI_INT`) is asserted. bhyve does not
//!   implement this; it costs nothing when TMR_EN stays clear.

use super::{
    fill_le, fill_ones, mul_div_ceil, mul_div_floor, Clock, IrqSink, LineLatch, TimerDevice,
    NS_PER_SEC,
};

/// Port of the PM timer (bhyve's `BHYVE_PM_TIMER_ADDR`).
pub const PM_TIMER_PORT: u16 = 0x408;
/// Size of the PM timer register.
pub const PM_TIMER_LEN: u16 = 4;
/// Counter frequency.
pub const PM_TIMER_FREQ_HZ: u64 = 3_579_545;
/// Counter width in bits (FADT TMR_VAL_EXT = 1).
pub const PM_TIMER_BITS: u32 = 32;
/// Default SCI line (bhyve's `SCI_INT`).
pub const SCI_IRQ: u32 = 9;

const MSB_PERIOD_TICKS: u64 = 1 << (PM_TIMER_BITS - 1);

/// The PM timer core.
#[derive(Debug)]
pub struct PmTimer<C: Clock> {
    clock: C,
    base_ns: u64,
    sci_line: u32,
    tmr_en: bool,
    tmr_sts: bool,
    checked_ns: u64,
    line: LineLatch,
}

impl<C: Clock> PmTimer<C> {
    /// A PM timer reading 0 now, with its SCI on [`SCI_IRQ`].
    pub fn new(clock: C) -> Self {
        Self::with_sci(clock, SCI_IRQ)
    }

    /// A PM timer reading 0 now, with its SCI on `sci_line`.
    pub fn with_sci(clock: C, sci_line: u32) -> Self {
        let now = clock.now_ns();
        PmTimer {
            clock,
            base_ns: now,
            sci_line,
            tmr_en: false,
            tmr_sts: false,
            checked_ns: now,
            line: LineLatch::default(),
        }
    }

    fn ticks(&self, now: u64) -> u64 {
        mul_div_floor(
            now.saturating_sub(self.base_ns),
            PM_TIMER_FREQ_HZ,
            NS_PER_SEC,
        )
    }

    /// The counter value at `now_ns` (the low [`PM_TIMER_BITS`] bits of the tick count).
    pub fn counter_at(&self, now_ns: u64) -> u32 {
        let b = self.ticks(now_ns).to_le_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Read at `offset` from [`PM_TIMER_PORT`].
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let width = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let ok =
            matches!(width, 1 | 2 | 4) && offset % width == 0 && offset.saturating_add(width) <= 4;
        if !ok {
            fill_ones(data);
            return;
        }
        let now = self.clock.now_ns();
        self.catch_up(now);
        fill_le(data, u64::from(self.counter_at(now)) >> (offset * 8));
    }

    /// Writes to the PM timer are ignored (the register is read-only).
    pub fn write(&mut self, _offset: u64, _data: &[u8]) {}

    fn catch_up(&mut self, now: u64) {
        if now <= self.checked_ns {
            return;
        }
        let before = self.ticks(self.checked_ns) / MSB_PERIOD_TICKS;
        let after = self.ticks(now) / MSB_PERIOD_TICKS;
        self.checked_ns = now;
        if after > before {
            self.tmr_sts = true;
            self.update_line();
        }
    }

    fn update_line(&mut self) {
        self.line.set(self.tmr_en && self.tmr_sts);
    }

    /// Set TMR_EN (PM1_EN bit 0): whether TMR_STS raises the SCI.
    pub fn set_timer_enable(&mut self, enable: bool) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        self.tmr_en = enable;
        self.update_line();
    }

    /// TMR_STS (PM1_STS bit 0): the counter's top bit toggled since it was last cleared.
    pub fn timer_status(&mut self) -> bool {
        let now = self.clock.now_ns();
        self.catch_up(now);
        self.tmr_sts
    }

    /// Clear TMR_STS (the guest wrote 1 to PM1_STS bit 0).
    pub fn clear_timer_status(&mut self) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        self.tmr_sts = false;
        self.update_line();
    }
}

impl<C: Clock> TimerDevice for PmTimer<C> {
    fn next_deadline_ns(&self) -> Option<u64> {
        if self.line.dirty() {
            return Some(0);
        }
        if !self.tmr_en || self.tmr_sts {
            return None;
        }
        let next = (self.ticks(self.checked_ns) / MSB_PERIOD_TICKS)
            .saturating_add(1)
            .saturating_mul(MSB_PERIOD_TICKS);
        Some(
            self.base_ns
                .saturating_add(mul_div_ceil(next, NS_PER_SEC, PM_TIMER_FREQ_HZ)),
        )
    }

    fn poll(&mut self, now_ns: u64, irq: &mut dyn IrqSink) {
        self.catch_up(now_ns);
        self.line.flush(self.sci_line, irq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::{IrqRecorder, ManualClock};

    fn read32(pm: &mut PmTimer<&ManualClock>) -> u32 {
        let mut b = [0u8; 4];
        pm.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn counts_at_nominal_rate() {
        let clock = ManualClock::new(123);
        let mut pm = PmTimer::new(&clock);
        assert_eq!(read32(&mut pm), 0);
        clock.advance(NS_PER_SEC);
        assert_eq!(read32(&mut pm), 3_579_545);
        clock.advance(NS_PER_SEC / 1000);
        assert_eq!(read32(&mut pm), 3_579_545 + 3_579);
    }

    #[test]
    fn monotonic_between_reads() {
        let clock = ManualClock::new(0);
        let mut pm = PmTimer::new(&clock);
        let mut last = 0;
        for step in [1u64, 7, 279, 280, 1_000, 99_999] {
            clock.advance(step);
            let v = read32(&mut pm);
            assert!(v >= last);
            last = v;
        }
    }

    #[test]
    fn wraps_at_32_bits() {
        let clock = ManualClock::new(0);
        let pm = PmTimer::new(&clock);
        let wrap_ns = mul_div_ceil(1 << 32, NS_PER_SEC, PM_TIMER_FREQ_HZ);
        assert_eq!(pm.counter_at(wrap_ns - 200), u32::MAX);
        assert_eq!(pm.counter_at(wrap_ns), 0);
    }

    #[test]
    fn narrow_reads_and_bad_accesses() {
        let clock = ManualClock::new(0);
        let mut pm = PmTimer::new(&clock);
        clock.advance(NS_PER_SEC);
        let v = read32(&mut pm).to_le_bytes();
        let mut w = [0u8; 2];
        pm.read(2, &mut w);
        assert_eq!(w, [v[2], v[3]]);
        let mut b = [0u8; 1];
        pm.read(1, &mut b);
        assert_eq!(b[0], v[1]);
        let mut bad = [0u8; 4];
        pm.read(2, &mut bad);
        assert_eq!(bad, [0xff; 4]);
        let mut bad = [0u8; 3];
        pm.read(0, &mut bad);
        assert_eq!(bad, [0xff; 3]);
        pm.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&mut pm), u32::from_le_bytes(v));
    }

    #[test]
    fn overflow_status_raises_sci_only_when_enabled() {
        let clock = ManualClock::new(0);
        let mut pm = PmTimer::new(&clock);
        let mut irq = IrqRecorder::new();
        assert_eq!(pm.next_deadline_ns(), None);
        pm.set_timer_enable(true);
        let d = pm.next_deadline_ns().unwrap_or(0);
        assert_eq!(d, mul_div_ceil(1 << 31, NS_PER_SEC, PM_TIMER_FREQ_HZ));
        clock.set(d);
        pm.poll(d, &mut irq);
        assert!(irq.level(SCI_IRQ));
        assert!(pm.timer_status());
        assert_eq!(pm.next_deadline_ns(), None);
        pm.clear_timer_status();
        pm.poll(d, &mut irq);
        assert!(!irq.level(SCI_IRQ));
        pm.set_timer_enable(false);
        clock.advance(4_000 * NS_PER_SEC);
        pm.poll(clock.get(), &mut irq);
        assert_eq!(irq.rising(SCI_IRQ), 1);
        assert!(pm.timer_status(), "status still set while disabled");
    }
}
