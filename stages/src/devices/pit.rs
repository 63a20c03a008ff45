//! Intel 8254 programmable interval timer (channels 0–2) and the channel-2 gate/output bits of
//! port 0x61 (system control port B), after bhyve's `vatpit.c`, with the full mode set.
//!
//! # Port layout
//!
//! | port | offset | read | write |
//! |---|---|---|---|
//! | 0x40–0x42 | 0–2 | counter n: status byte if latched, else latched count, else live count | count (LSB, MSB or LSB then MSB) |
//! | 0x43 | 3 | 0xFF (the control register is write-only) | control word, counter latch, read-back |
//! | 0x61 | [`Pit::port61_read`] | bit 0 gate 2, bit 1 speaker enable, bits 3:2 as written, bit 4 refresh toggle (every 15.085 µs), bit 5 OUT2 | bits 3:0 stored, bit 0 drives gate 2 |
//!
//! Control word (0x43): bits 7:6 select the counter (3 = read-back), bits 5:4 access
//! (0 = latch the count, 1 = LSB, 2 = MSB, 3 = LSB then MSB), bits 3:1 mode (6 and 7 alias 2 and 3),
//! bit 0 BCD. Read-back: bit 5 clear latches counts, bit 4 clear latches status, bits 3:1 select
//! counters 2, 1, 0. Status byte: bit 7 OUT, bit 6 null count, bits 5:4 access, bits 3:1 mode,
//! bit 0 BCD. All ports are byte-wide; wider accesses are split into byte accesses.
//!
//! # Time and interrupts
//!
//! The counters run at [`PIT_FREQ_HZ`] (1.193182 MHz) of the [`Clock`], computed from the time a
//! count was loaded, never from exits. Channel 0's OUT drives ISA IRQ 0 ([`PIT_IRQ`]): mode 0
//! raises the line at terminal count and holds it until the channel is reprogrammed; modes 2 and 3
//! pulse the line once per period (the rising edge of OUT); mode 4 pulses once at the strobe. The
//! gates of channels 0 and 1 are tied high (so modes 1 and 5 never trigger there); channel 2's gate
//! is port 0x61 bit 0 (modes 0/4 pause while it is low, 2/3 stop and restart on its rising edge,
//! 1/5 trigger on its rising edge).
//!
//! Deviations kept deliberately small: a new count written while a channel runs takes effect
//! immediately in every mode (as bhyve and QEMU do; the 8254 waits for the end of the period in
//! modes 2/3); the periodic interrupt period is at least [`PIT_MIN_IRQ_TICKS`] (so count 1 cannot
//! make a 1.19 MHz storm; the counter itself still counts at the programmed rate).

use super::{
    mul_div_ceil, mul_div_floor, Clock, IrqSink, LineLatch, TimerDevice, MIN_TIMER_PERIOD_NS,
    NS_PER_SEC,
};

/// First PIT port (counter 0).
pub const PIT_PORT: u16 = 0x40;
/// Number of PIT ports (0x40–0x43).
pub const PIT_PORT_LEN: u16 = 4;
/// System control port B (NMI status and control).
pub const PORT61: u16 = 0x61;
/// Number of ports at [`PORT61`].
pub const PORT61_LEN: u16 = 1;
/// Input clock of the 8254 (`PIT_8254_FREQ` in bhyve).
pub const PIT_FREQ_HZ: u64 = 1_193_182;
/// ISA IRQ driven by channel 0.
pub const PIT_IRQ: u32 = 0;
/// Shortest interrupt period of channel 0 in PIT ticks: [`MIN_TIMER_PERIOD_NS`] rounded up (120).
pub const PIT_MIN_IRQ_TICKS: u64 = (MIN_TIMER_PERIOD_NS * PIT_FREQ_HZ).div_ceil(NS_PER_SEC);
/// Half-period of the port 0x61 refresh toggle (bit 4).
pub const REFRESH_TOGGLE_NS: u64 = 15_085;

const CONTROL_OFFSET: u64 = 3;

/// Access mode of a counter: which byte(s) reads and writes transfer.
const ACCESS_LSB: u8 = 1;
const ACCESS_MSB: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Channel {
    mode: u8,
    access: u8,
    bcd: bool,
    /// Reload value N: 1..=65536 (binary) or 1..=10000 (BCD).
    reload: u32,
    /// A count was written since the last control word (the status byte's null count is clear).
    loaded: bool,
    write_lsb: Option<u8>,
    read_msb: bool,
    latch: Option<u16>,
    latch_msb: bool,
    status: Option<u8>,
    gate: bool,
    /// Modes 1 and 5: a gate trigger happened since the count was loaded.
    triggered: bool,
    running: bool,
    base_ticks: u64,
    run_start_ns: u64,
}

impl Channel {
    fn new(gate: bool, now: u64) -> Self {
        Channel {
            mode: 0,
            access: 3,
            bcd: false,
            reload: 0x1_0000,
            loaded: true,
            write_lsb: None,
            read_msb: false,
            latch: None,
            latch_msb: false,
            status: None,
            gate,
            triggered: false,
            running: gate,
            base_ticks: 0,
            run_start_ns: now,
        }
    }

    fn ticks(&self, now: u64) -> u64 {
        if self.running {
            let elapsed = now.saturating_sub(self.run_start_ns);
            self.base_ticks
                .saturating_add(mul_div_floor(elapsed, PIT_FREQ_HZ, NS_PER_SEC))
        } else {
            self.base_ticks
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    fn n(&self) -> u64 {
        u64::from(self.reload.max(1))
    }

    /// The counting element's value (binary, `0..modulus`).
    fn count(&self, now: u64) -> u64 {
        let n = self.n();
        let t = self.ticks(now);
        let m = self.modulus();
        let v = match self.mode {
            2 => n - t % n,
            3 => {
                let half = (n / 2).max(1);
                n - 2 * ((t % n) % half)
            }
            _ => (n % m + m - t % m) % m,
        };
        v % m
    }

    /// The counter as the guest reads it (BCD-encoded in BCD mode).
    fn readout(&self, now: u64) -> u16 {
        let v = self.count(now);
        let v = if self.bcd { to_bcd(v) } else { v };
        u16::try_from(v & 0xffff).unwrap_or(0)
    }

    fn out(&self, now: u64) -> bool {
        if !self.loaded {
            // After a control word: OUT is low in mode 0, high in every other mode.
            return self.mode != 0;
        }
        let n = self.n();
        let t = self.ticks(now);
        match self.mode {
            0 => t >= n,
            1 => !self.triggered || t >= n,
            2 => {
                let n = n.max(2);
                !self.gate || t % n != n - 1
            }
            3 => !self.gate || t % n < n.div_ceil(2),
            4 => t != n,
            _ => !self.triggered || t != n,
        }
    }

    fn status_byte(&self, now: u64) -> u8 {
        (u8::from(self.out(now)) << 7)
            | (u8::from(!self.loaded) << 6)
            | ((self.access & 3) << 4)
            | ((self.mode & 7) << 1)
            | u8::from(self.bcd)
    }
}

fn to_bcd(v: u64) -> u64 {
    let v = v % 10_000;
    (v % 10) | ((v / 10 % 10) << 4) | ((v / 100 % 10) << 8) | ((v / 1000 % 10) << 12)
}

fn from_bcd(raw: u32) -> u32 {
    let digit = |shift: u32| ((raw >> shift) & 0xf).min(9);
    digit(0) + digit(4) * 10 + digit(8) * 100 + digit(12) * 1000
}

/// The 8254 core with port 0x61.
#[derive(Debug)]
pub struct Pit<C: Clock> {
    clock: C,
    ch: [Channel; 3],
    port61: u8,
    /// Channel-0 tick at which the next IRQ 0 event happens.
    irq_next_tick: Option<u64>,
    /// OUT0 as a level (mode 0); pulses are sent directly from `poll`.
    irq_line: LineLatch,
    irq_count: u64,
}

impl<C: Clock> Pit<C> {
    /// A PIT whose counters free-run from now with count 65536 in mode 0 and whose channel 0 raises
    /// no interrupt until the guest programs it; channel 2's gate (port 0x61 bit 0) is low.
    pub fn new(clock: C) -> Self {
        let now = clock.now_ns();
        Pit {
            clock,
            ch: [
                Channel::new(true, now),
                Channel::new(true, now),
                Channel::new(false, now),
            ],
            port61: 0,
            irq_next_tick: None,
            irq_line: LineLatch::default(),
            irq_count: 0,
        }
    }

    fn channel_mut(&mut self, i: usize) -> Option<&mut Channel> {
        self.ch.get_mut(i)
    }

    /// Read from PIT port `0x40 + offset` (byte-wide; wider accesses are split).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut off = offset;
        for b in data.iter_mut() {
            *b = match off {
                0..=2 => self.read_counter(usize::try_from(off).unwrap_or(0), now),
                _ => 0xff,
            };
            off = off.saturating_add(1);
        }
    }

    /// Write to PIT port `0x40 + offset` (byte-wide; wider accesses are split).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        let mut off = offset;
        for &b in data {
            match off {
                0..=2 => self.write_counter(usize::try_from(off).unwrap_or(0), b, now),
                CONTROL_OFFSET => self.write_control(b, now),
                _ => {}
            }
            off = off.saturating_add(1);
        }
    }

    fn read_counter(&mut self, i: usize, now: u64) -> u8 {
        let Some(c) = self.channel_mut(i) else {
            return 0xff;
        };
        if let Some(s) = c.status.take() {
            return s;
        }
        let [lo, hi] = match c.latch {
            Some(l) => l.to_le_bytes(),
            None => c.readout(now).to_le_bytes(),
        };
        let latched = c.latch.is_some();
        match c.access {
            ACCESS_LSB => {
                c.latch = None;
                lo
            }
            ACCESS_MSB => {
                c.latch = None;
                hi
            }
            _ if latched => {
                if c.latch_msb {
                    c.latch = None;
                    c.latch_msb = false;
                    hi
                } else {
                    c.latch_msb = true;
                    lo
                }
            }
            _ => {
                let b = if c.read_msb { hi } else { lo };
                c.read_msb = !c.read_msb;
                b
            }
        }
    }

    fn latch_count(&mut self, i: usize, now: u64) {
        if let Some(c) = self.channel_mut(i) {
            if c.latch.is_none() {
                c.latch = Some(c.readout(now));
                c.latch_msb = false;
            }
        }
    }

    fn latch_status(&mut self, i: usize, now: u64) {
        if let Some(c) = self.channel_mut(i) {
            if c.status.is_none() {
                c.status = Some(c.status_byte(now));
            }
        }
    }

    fn write_control(&mut self, val: u8, now: u64) {
        let sel = usize::from(val >> 6);
        if sel == 3 {
            for i in 0..3usize {
                if val & (2 << i) == 0 {
                    continue;
                }
                if val & 0x20 == 0 {
                    self.latch_count(i, now);
                }
                if val & 0x10 == 0 {
                    self.latch_status(i, now);
                }
            }
            return;
        }
        let access = (val >> 4) & 3;
        if access == 0 {
            self.latch_count(sel, now);
            return;
        }
        let mut mode = (val >> 1) & 7;
        if mode > 5 {
            mode -= 4;
        }
        let Some(c) = self.channel_mut(sel) else {
            return;
        };
        c.mode = mode;
        c.access = access;
        c.bcd = val & 1 != 0;
        c.loaded = false;
        c.write_lsb = None;
        c.read_msb = false;
        c.latch = None;
        c.latch_msb = false;
        c.status = None;
        c.triggered = false;
        c.running = false;
        c.base_ticks = 0;
        if sel == 0 {
            self.irq_next_tick = None;
            self.irq_line.set(false);
        }
    }

    fn write_counter(&mut self, i: usize, val: u8, now: u64) {
        let Some(c) = self.channel_mut(i) else { return };
        let raw = match c.access {
            ACCESS_LSB => u32::from(val),
            ACCESS_MSB => u32::from(val) << 8,
            _ => match c.write_lsb.take() {
                None => {
                    c.write_lsb = Some(val);
                    if c.mode == 0 {
                        // Mode 0: writing the first byte stops the count and drops OUT.
                        c.base_ticks = c.ticks(now);
                        c.running = false;
                        c.loaded = false;
                        if i == 0 {
                            self.irq_next_tick = None;
                            self.irq_line.set(false);
                        }
                    }
                    return;
                }
                Some(lsb) => u32::from(lsb) | (u32::from(val) << 8),
            },
        };
        self.load(i, raw, now);
    }

    fn load(&mut self, i: usize, raw: u32, now: u64) {
        let Some(c) = self.channel_mut(i) else { return };
        c.reload = if c.bcd {
            match from_bcd(raw) {
                0 => 10_000,
                d => d,
            }
        } else if raw == 0 {
            0x1_0000
        } else {
            raw
        };
        c.loaded = true;
        c.base_ticks = 0;
        c.triggered = false;
        c.run_start_ns = now;
        c.running = match c.mode {
            1 | 5 => false,
            _ => c.gate,
        };
        if i == 0 {
            self.schedule_irq();
        }
    }

    fn schedule_irq(&mut self) {
        let c = &self.ch[0];
        self.irq_line.set(false);
        self.irq_next_tick = if c.loaded && c.running {
            let n = c.n();
            match c.mode {
                0 => Some(n),
                2 | 3 => Some(n.max(PIT_MIN_IRQ_TICKS)),
                4 => Some(n.saturating_add(1)),
                _ => None,
            }
        } else {
            None
        };
    }

    fn set_gate(&mut self, i: usize, gate: bool, now: u64) {
        let Some(c) = self.channel_mut(i) else { return };
        if c.gate == gate {
            return;
        }
        let t = c.ticks(now);
        c.gate = gate;
        if !c.loaded {
            return;
        }
        match c.mode {
            0 | 4 => {
                if gate {
                    c.running = true;
                    c.run_start_ns = now;
                } else {
                    c.base_ticks = t;
                    c.running = false;
                }
            }
            1 | 5 => {
                if gate {
                    c.triggered = true;
                    c.base_ticks = 0;
                    c.running = true;
                    c.run_start_ns = now;
                }
            }
            _ => {
                if gate {
                    c.base_ticks = 0;
                    c.running = true;
                    c.run_start_ns = now;
                } else {
                    c.base_ticks = t;
                    c.running = false;
                }
            }
        }
    }

    /// Read port 0x61: bit 0 gate 2, bit 1 speaker data enable, bits 3:2 as written, bit 4 the
    /// refresh toggle, bit 5 OUT2; bits 7:6 (parity/channel check) read 0.
    pub fn port61_read(&mut self) -> u8 {
        let now = self.clock.now_ns();
        let refresh = (now / REFRESH_TOGGLE_NS) & 1 != 0;
        (self.port61 & 0x0f) | (u8::from(refresh) << 4) | (u8::from(self.ch[2].out(now)) << 5)
    }

    /// Write port 0x61: bits 3:0 are stored, bit 0 is channel 2's gate; bits 7:4 are read-only.
    pub fn port61_write(&mut self, val: u8) {
        let now = self.clock.now_ns();
        self.port61 = val & 0x0f;
        self.set_gate(2, val & 1 != 0, now);
    }

    /// Offset-based access to port 0x61 for a bus adapter (offset 0 only; wider accesses split).
    pub fn read_port61(&mut self, offset: u64, data: &mut [u8]) {
        let mut off = offset;
        for b in data.iter_mut() {
            *b = if off == 0 { self.port61_read() } else { 0xff };
            off = off.saturating_add(1);
        }
    }

    /// Offset-based access to port 0x61 for a bus adapter (offset 0 only; wider accesses split).
    pub fn write_port61(&mut self, offset: u64, data: &[u8]) {
        let mut off = offset;
        for &b in data {
            if off == 0 {
                self.port61_write(b);
            }
            off = off.saturating_add(1);
        }
    }

    /// OUT of counter `channel` (0–2) now; false for other numbers.
    pub fn out(&self, channel: usize) -> bool {
        let now = self.clock.now_ns();
        self.ch.get(channel).is_some_and(|c| c.out(now))
    }

    /// IRQ 0 events generated so far (a counter for statistics).
    pub fn irq_count(&self) -> u64 {
        self.irq_count
    }

    fn tick_deadline(&self, tick: u64) -> Option<u64> {
        let c = &self.ch[0];
        if !c.running {
            return None;
        }
        let ahead = tick.saturating_sub(c.base_ticks);
        Some(
            c.run_start_ns
                .saturating_add(mul_div_ceil(ahead, NS_PER_SEC, PIT_FREQ_HZ)),
        )
    }
}

impl<C: Clock> TimerDevice for Pit<C> {
    fn next_deadline_ns(&self) -> Option<u64> {
        if self.irq_line.dirty() {
            return Some(0);
        }
        self.irq_next_tick.and_then(|t| self.tick_deadline(t))
    }

    fn poll(&mut self, now_ns: u64, irq: &mut dyn IrqSink) {
        let mut pulse = false;
        if let Some(next) = self.irq_next_tick {
            let c = &self.ch[0];
            let t = c.ticks(now_ns);
            if t >= next {
                self.irq_count = self.irq_count.wrapping_add(1);
                self.irq_next_tick = match c.mode {
                    0 => {
                        self.irq_line.set(true);
                        None
                    }
                    2 | 3 => {
                        pulse = true;
                        let p = c.n().max(PIT_MIN_IRQ_TICKS);
                        // Coalesce: one pulse however many periods passed.
                        Some((t / p).saturating_add(1).saturating_mul(p))
                    }
                    4 => {
                        pulse = true;
                        None
                    }
                    _ => None,
                };
            }
        }
        self.irq_line.flush(PIT_IRQ, irq);
        if pulse {
            irq.set_irq(PIT_IRQ, true);
            irq.set_irq(PIT_IRQ, false);
        }
    }
}

/// Compose a control word: channel, access (1 LSB, 2 MSB, 3 both), mode, BCD. For tests and
/// fuzzing.
pub fn control_word(channel: u8, access: u8, mode: u8, bcd: bool) -> u8 {
    ((channel & 3) << 6) | ((access & 3) << 4) | ((mode & 7) << 1) | u8::from(bcd)
}

/// Program `channel` with a 16-bit count in LSB-then-MSB access. For tests and fuzzing.
pub fn program_channel<C: Clock>(pit: &mut Pit<C>, channel: u8, mode: u8, count: u16) {
    pit.write(CONTROL_OFFSET, &[control_word(channel, 3, mode, false)]);
    let [lo, hi] = count.to_le_bytes();
    pit.write(u64::from(channel & 3), &[lo]);
    pit.write(u64::from(channel & 3), &[hi]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::{IrqRecorder, ManualClock};

    /// Follow the deadlines until `end_ns`, counting IRQ 0 rising edges.
    fn run_until(
        pit: &mut Pit<&ManualClock>,
        clock: &ManualClock,
        irq: &mut IrqRecorder,
        end_ns: u64,
    ) {
        while let Some(d) = pit.next_deadline_ns() {
            if d > end_ns {
                break;
            }
            clock.set(d);
            pit.poll(clock.get(), irq);
        }
        clock.set(end_ns);
        pit.poll(end_ns, irq);
    }

    #[test]
    fn mode2_count_1193_gives_1000_hz_over_one_second() {
        let clock = ManualClock::new(5_000);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        program_channel(&mut pit, 0, 2, 1193);
        let start = clock.get();
        run_until(&mut pit, &clock, &mut irq, start + NS_PER_SEC);
        // 1193182 / 1193 = 1000.15 Hz
        let n = irq.rising(0);
        assert!((999..=1001).contains(&n), "got {n} interrupts");
        assert_eq!(pit.irq_count(), n);
        assert!(!irq.level(0));
    }

    #[test]
    fn mode3_square_wave_same_rate_as_mode2() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        program_channel(&mut pit, 0, 3, 11932); // ~100 Hz
        run_until(&mut pit, &clock, &mut irq, NS_PER_SEC);
        let n = irq.rising(0);
        assert!((99..=101).contains(&n), "got {n}");
    }

    #[test]
    fn stall_is_coalesced_into_one_interrupt() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        program_channel(&mut pit, 0, 2, 1193);
        clock.advance(5 * NS_PER_SEC);
        pit.poll(clock.get(), &mut irq);
        assert_eq!(irq.rising(0), 1);
        pit.poll(clock.get(), &mut irq);
        assert_eq!(irq.rising(0), 1, "nothing more is due at the same instant");
        let d = pit.next_deadline_ns().unwrap_or(0);
        assert!(d > clock.get() && d <= clock.get() + 1_000_000);
    }

    #[test]
    fn count_1_is_clamped_to_the_minimum_period() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        program_channel(&mut pit, 0, 2, 1);
        run_until(&mut pit, &clock, &mut irq, NS_PER_SEC);
        let n = irq.rising(0);
        let max = NS_PER_SEC / MIN_TIMER_PERIOD_NS + 1;
        // 120-tick period: 1193182 / 120 = 9943 per second.
        assert!(n <= max && n >= 9_900, "got {n}, bound {max}");
    }

    #[test]
    fn mode0_holds_out_high_until_reprogrammed() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        program_channel(&mut pit, 0, 0, 1000);
        assert!(!pit.out(0));
        run_until(&mut pit, &clock, &mut irq, NS_PER_SEC / 10);
        assert_eq!(irq.rising(0), 1);
        assert!(irq.level(0), "mode 0 OUT stays high");
        assert!(pit.out(0));
        assert_eq!(pit.next_deadline_ns(), None, "one-shot");
        // Writing a new count drops OUT and re-arms.
        pit.write(0, &[0x10]);
        assert_eq!(
            pit.next_deadline_ns(),
            Some(0),
            "line change latched for poll"
        );
        pit.poll(clock.get(), &mut irq);
        assert!(!irq.level(0));
        pit.write(0, &[0x00]);
        run_until(&mut pit, &clock, &mut irq, clock.get() + NS_PER_SEC / 10);
        assert_eq!(irq.rising(0), 2);
    }

    #[test]
    fn live_counter_counts_down_at_pit_rate() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        program_channel(&mut pit, 0, 2, 0); // 65536
        clock.advance(10_000_000); // 10 ms = 11931.82 ticks
        let mut b = [0u8; 2];
        pit.read(0, &mut b[..1]);
        pit.read(0, &mut b[1..]);
        let v = u16::from_le_bytes(b);
        assert_eq!(u64::from(v), 65536 - 11931);
    }

    #[test]
    fn latch_freezes_the_readout() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        program_channel(&mut pit, 0, 2, 30000);
        clock.advance(1_000_000);
        pit.write(3, &[0x00]); // latch counter 0
        let expect = 30000 - mul_div_floor(1_000_000, PIT_FREQ_HZ, NS_PER_SEC);
        clock.advance(3_000_000);
        let mut b = [0u8; 2];
        pit.read(0, &mut b[..1]);
        pit.read(0, &mut b[1..]);
        assert_eq!(u64::from(u16::from_le_bytes(b)), expect);
        // Latch released: the next read is live again.
        pit.read(0, &mut b[..1]);
        pit.read(0, &mut b[1..]);
        assert_ne!(u64::from(u16::from_le_bytes(b)), expect);
    }

    #[test]
    fn readback_status_reports_mode_access_and_out() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        pit.write(3, &[control_word(1, 1, 3, true)]);
        pit.write(3, &[0xe4]); // read-back: status only, counter 1
        let mut s = [0u8];
        pit.read(1, &mut s);
        assert_eq!(
            s[0],
            0x80 | 0x40 | (1 << 4) | (3 << 1) | 1,
            "OUT high, null count"
        );
        pit.write(1, &[0x50]); // BCD 50
        pit.write(3, &[0xe4]);
        pit.read(1, &mut s);
        assert_eq!(s[0] & 0x40, 0, "count loaded");
        // Count and status latched together: status first.
        pit.write(3, &[0xc4]);
        pit.read(1, &mut s);
        assert_eq!(s[0] & 0x0f, (3 << 1) | 1);
        pit.read(1, &mut s);
        assert_eq!(s[0], 0x50, "BCD readout of the just-loaded count");
    }

    #[test]
    fn lsb_only_and_msb_only_access() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        pit.write(3, &[control_word(1, 2, 2, false)]);
        pit.write(1, &[0x12]);
        let mut b = [0u8];
        pit.read(1, &mut b);
        assert_eq!(b[0], 0x12);
        pit.write(3, &[control_word(1, 1, 2, false)]);
        pit.write(1, &[0x34]);
        pit.read(1, &mut b);
        assert_eq!(b[0], 0x34);
    }

    #[test]
    fn port61_gates_channel2_and_shows_out2() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        pit.port61_write(0x01); // gate high, speaker off
        assert_eq!(pit.port61_read() & 0x03, 0x01);
        program_channel(&mut pit, 2, 0, 1193); // 1 ms one-shot
        assert_eq!(pit.port61_read() & 0x20, 0, "OUT2 low while counting");
        clock.advance(999_000);
        assert_eq!(pit.port61_read() & 0x20, 0);
        clock.advance(2_000);
        assert_eq!(
            pit.port61_read() & 0x20,
            0x20,
            "OUT2 high at terminal count"
        );
        // Gate low pauses mode 0.
        program_channel(&mut pit, 2, 0, 1193);
        pit.port61_write(0x00);
        clock.advance(5_000_000);
        assert_eq!(pit.port61_read() & 0x20, 0);
        pit.port61_write(0x01);
        clock.advance(1_000_100);
        assert_eq!(pit.port61_read() & 0x20, 0x20);
        // Refresh bit toggles with time, high bits are read-only.
        pit.port61_write(0xf3);
        let a = pit.port61_read();
        clock.advance(REFRESH_TOGGLE_NS);
        let b = pit.port61_read();
        assert_ne!(a & 0x10, b & 0x10);
        assert_eq!(a & 0xc0, 0);
        assert_eq!(a & 0x0f, 0x03);
    }

    #[test]
    fn channel2_does_not_interrupt_and_control_port_reads_ff() {
        let clock = ManualClock::new(0);
        let mut pit = Pit::new(&clock);
        let mut irq = IrqRecorder::new();
        pit.port61_write(0x01);
        program_channel(&mut pit, 2, 2, 100);
        assert_eq!(pit.next_deadline_ns(), None);
        clock.advance(NS_PER_SEC);
        pit.poll(clock.get(), &mut irq);
        assert_eq!(irq.calls, 0);
        let mut b = [0u8; 2];
        pit.read(3, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn bcd_helpers() {
        assert_eq!(to_bcd(1234), 0x1234);
        assert_eq!(from_bcd(0x9999), 9999);
        assert_eq!(from_bcd(0xffff), 9999);
    }
}
