//! MC146818-compatible real-time clock and 128 bytes of CMOS RAM, after bhyve's `vrtc.c`.
//!
//! # Ports
//!
//! | port | offset | read | write |
//! |---|---|---|---|
//! | 0x70 | 0 | 0xFF (write-only) | bits 6:0 select the register; bit 7 is the NMI-disable bit, masked off the index |
//! | 0x71 | 1 | selected register | selected register |
//!
//! Both ports are byte-wide; wider accesses are split into byte accesses.
//!
//! # Registers (index)
//!
//! | index | register |
//! |---|---|
//! | 0x00, 0x02, 0x04 | seconds (bit 7 read-only), minutes, hours (12-hour mode: bit 7 = PM) |
//! | 0x01, 0x03, 0x05 | alarm seconds, minutes, hours (0xC0–0xFF = don't care) |
//! | 0x06–0x09 | day of week (1 = Sunday), day of month, month, year (00–99) |
//! | 0x0A | A: 7 UIP (read-only), 6:4 divider (010 = running, 11x = reset), 3:0 rate select |
//! | 0x0B | B: 7 SET, 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (1 = binary), 1 24/12 (1 = 24 h), 0 DSE |
//! | 0x0C | C (read-only, read clears): 7 IRQF, 6 PF, 5 AF, 4 UF |
//! | 0x0D | D (read-only): 7 VRT = 1 |
//! | 0x32 | century (a time register, as bhyve's `RTC_CENTURY`) |
//! | other 0x0E–0x7F | battery-backed RAM |
//!
//! # Time
//!
//! The date comes from the host's [`WallClock`] once, at creation (and on
//! [`Rtc::set_time_from_wall`]); from then on the RTC keeps time from the monotonic [`Clock`],
//! with its seconds rolling over in phase with the host wall clock's. The guest owns its own offset:
//! writing the time registers (under SET, as every OS does, or while running, as OpenBSD does with
//! the century byte) moves the guest's RTC time away from the host's. Invalid date/time contents
//! stop the clock until the guest writes a valid time (bhyve stops the VM instead when
//! `hw.vmm.vrtc.flag_broken_time` is set; we keep running).
//!
//! The divider chain runs while register A's divider field is 010 (the only time base bhyve
//! accepts); taking it out of reset starts the first update half a second later (datasheet). UIP
//! reads 1 during the last 244 µs before each update. The periodic interrupt rate is
//! 32768 Hz >> (rate − 1) (rates 1 and 2 alias 8 and 9), from 2 Hz to 8192 Hz — never faster than
//! 122 µs, so above [`crate::devices::MIN_TIMER_PERIOD_NS`] without clamping.
//!
//! # Interrupts
//!
//! PF, AF and UF are set whenever their event happens (whatever the enables, as the datasheet
//! says), IRQF = PF·PIE + AF·AIE + UF·UIE, and ISA IRQ 8 ([`RTC_IRQ`]) follows IRQF as a level.
//! Reading C clears the flags and drops the line. While IRQF is set no further edge can happen, so
//! the RTC interrupts at most once per read of register C, however the guest programs it.

use super::{Clock, IrqSink, LineLatch, TimerDevice, WallClock, WallTime};

/// Index port.
pub const RTC_PORT: u16 = 0x70;
/// Number of RTC ports (index and data).
pub const RTC_PORT_LEN: u16 = 2;
/// ISA IRQ of the RTC.
pub const RTC_IRQ: u32 = 8;
/// Size of the CMOS RAM, registers included.
pub const RTC_RAM_SIZE: usize = 128;

/// Seconds register.
pub const REG_SEC: u8 = 0x00;
/// Alarm seconds register.
pub const REG_SEC_ALARM: u8 = 0x01;
/// Minutes register.
pub const REG_MIN: u8 = 0x02;
/// Alarm minutes register.
pub const REG_MIN_ALARM: u8 = 0x03;
/// Hours register.
pub const REG_HOUR: u8 = 0x04;
/// Alarm hours register.
pub const REG_HOUR_ALARM: u8 = 0x05;
/// Day-of-week register.
pub const REG_DOW: u8 = 0x06;
/// Day-of-month register.
pub const REG_DAY: u8 = 0x07;
/// Month register.
pub const REG_MONTH: u8 = 0x08;
/// Year register.
pub const REG_YEAR: u8 = 0x09;
/// Status register A.
pub const REG_A: u8 = 0x0A;
/// Status register B.
pub const REG_B: u8 = 0x0B;
/// Status register C.
pub const REG_C: u8 = 0x0C;
/// Status register D.
pub const REG_D: u8 = 0x0D;
/// Century register.
pub const REG_CENTURY: u8 = 0x32;

/// A: update in progress.
pub const A_UIP: u8 = 0x80;
/// A: divider field.
pub const A_DV_MASK: u8 = 0x70;
/// A: divider running with the 32.768 kHz time base.
pub const A_DV_RUN: u8 = 0x20;
/// A: rate select.
pub const A_RS_MASK: u8 = 0x0F;
/// B: SET (updates halted, guest owns the time registers).
pub const B_SET: u8 = 0x80;
/// B: periodic interrupt enable.
pub const B_PIE: u8 = 0x40;
/// B: alarm interrupt enable.
pub const B_AIE: u8 = 0x20;
/// B: update-ended interrupt enable.
pub const B_UIE: u8 = 0x10;
/// B: binary (not BCD) data mode.
pub const B_DM_BINARY: u8 = 0x04;
/// B: 24-hour mode.
pub const B_24H: u8 = 0x02;
/// C: interrupt request flag.
pub const C_IRQF: u8 = 0x80;
/// C: periodic flag.
pub const C_PF: u8 = 0x40;
/// C: alarm flag.
pub const C_AF: u8 = 0x20;
/// C: update-ended flag.
pub const C_UF: u8 = 0x10;
/// D: valid RAM and time.
pub const D_VRT: u8 = 0x80;

/// How long before each update UIP reads 1 (datasheet tBUC).
pub const UIP_WINDOW_NS: u64 = 244_000;
/// Delay from taking the divider out of reset to the first update.
pub const DIVIDER_START_DELAY_NS: u64 = 500_000_000;

const SECS_PER_DAY: i64 = 86_400;
const NS_PER_SEC_I: i128 = 1_000_000_000;
const CHAIN_HZ: i128 = 32_768;
/// 0000-01-01T00:00:00 and 9999-12-31T23:59:59, the range the registers can express.
const MIN_SECS: i64 = -62_167_219_200;
const MAX_SECS: i64 = 253_402_300_799;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn small(v: i64) -> u8 {
    u8::try_from(v.rem_euclid(100)).unwrap_or(0)
}

/// The RTC core.
#[derive(Debug)]
pub struct Rtc<C: Clock> {
    clock: C,
    index: u8,
    nmi_disabled: bool,
    ram: [u8; RTC_RAM_SIZE],
    /// Divider chain phase: updates happen at `chain_base_ns + k * 1 s`.
    chain_base_ns: i128,
    /// The time registers hold a valid date and time.
    valid: bool,
    /// RTC seconds at chain second `anchor_index` while updating; the frozen time otherwise.
    anchor_secs: i64,
    anchor_index: i64,
    /// Flags are accounted up to this time.
    checked_ns: u64,
    line: LineLatch,
}

impl<C: Clock> Rtc<C> {
    /// An RTC showing the host's wall-clock time: divider running, 24-hour BCD mode, no interrupts
    /// enabled (bhyve's `vrtc_init` state), index register at D.
    pub fn new(clock: C, wall: &impl WallClock) -> Self {
        let now = clock.now_ns();
        let mut rtc = Rtc {
            clock,
            index: REG_D,
            nmi_disabled: false,
            ram: [0; RTC_RAM_SIZE],
            chain_base_ns: 0,
            valid: true,
            anchor_secs: 0,
            anchor_index: 0,
            checked_ns: now,
            line: LineLatch::default(),
        };
        rtc.set_reg(REG_A, A_DV_RUN);
        rtc.set_reg(REG_B, B_24H);
        rtc.set_reg(REG_D, D_VRT);
        rtc.align_to_wall(now, wall.wall_now());
        rtc.render(now);
        rtc
    }

    fn align_to_wall(&mut self, now: u64, w: WallTime) {
        let nanos = i128::from(w.nanos.min(999_999_999));
        self.chain_base_ns = i128::from(now) - nanos;
        self.anchor_index = self.idx(now);
        self.anchor_secs = w.secs.clamp(MIN_SECS, MAX_SECS);
        self.valid = true;
    }

    /// Re-read the host wall clock (bhyve's `vrtc_set_time`, e.g. after a host suspend). Refused,
    /// returning false, while the guest holds SET.
    pub fn set_time_from_wall(&mut self, wall: &impl WallClock) -> bool {
        if self.halted() {
            return false;
        }
        let now = self.clock.now_ns();
        self.catch_up(now);
        self.align_to_wall(now, wall.wall_now());
        self.render(now);
        true
    }

    fn reg(&self, index: u8) -> u8 {
        self.ram.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn set_reg(&mut self, index: u8, value: u8) {
        if let Some(slot) = self.ram.get_mut(usize::from(index)) {
            *slot = value;
        }
    }

    fn divider_running(&self) -> bool {
        self.reg(REG_A) & A_DV_MASK == A_DV_RUN
    }

    fn halted(&self) -> bool {
        self.reg(REG_B) & B_SET != 0
    }

    fn updating(&self) -> bool {
        self.divider_running() && !self.halted() && self.valid
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_DM_BINARY != 0
    }

    /// Chain second index at `now`.
    fn idx(&self, now: u64) -> i64 {
        let q = (i128::from(now) - self.chain_base_ns).div_euclid(NS_PER_SEC_I);
        i64::try_from(q).unwrap_or(i64::MAX)
    }

    /// Chain 32.768 kHz tick at `now`.
    fn chain_tick(&self, now: u64) -> i128 {
        ((i128::from(now) - self.chain_base_ns) * CHAIN_HZ).div_euclid(NS_PER_SEC_I)
    }

    fn secs_at(&self, now: u64) -> i64 {
        if self.updating() {
            let elapsed = self.idx(now).saturating_sub(self.anchor_index);
            self.anchor_secs
                .saturating_add(elapsed)
                .clamp(MIN_SECS, MAX_SECS)
        } else {
            self.anchor_secs
        }
    }

    /// The guest's RTC time (seconds since the epoch, in whatever zone the guest keeps it), or
    /// `None` while the time registers hold an invalid date.
    pub fn time_secs(&self) -> Option<i64> {
        self.valid.then(|| self.secs_at(self.clock.now_ns()))
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI disable) set.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Apply `f`, freezing or restarting the clock if it changes whether the time updates.
    fn transition(&mut self, now: u64, f: impl FnOnce(&mut Self)) {
        let was = self.updating();
        let secs = self.secs_at(now);
        f(self);
        let is = self.updating();
        if was && !is {
            self.anchor_secs = secs;
        } else if !was && is {
            self.anchor_index = self.idx(now);
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, raw: u8) -> Option<u8> {
        if self.binary() {
            return Some(raw);
        }
        let (hi, lo) = (raw >> 4, raw & 0x0f);
        (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
    }

    /// Decode an hours byte (either the time or the alarm) to 0–23.
    fn decode_hour(&self, raw: u8) -> Option<u8> {
        if self.reg(REG_B) & B_24H != 0 {
            return self.decode(raw).filter(|&h| h <= 23);
        }
        let pm = raw & 0x80 != 0;
        let h = self.decode(raw & 0x7f).filter(|h| (1..=12).contains(h))?;
        Some(h % 12 + if pm { 12 } else { 0 })
    }

    /// Write the time registers from the current time.
    fn render(&mut self, now: u64) {
        if !self.valid {
            return;
        }
        let secs = self.secs_at(now);
        let days = secs.div_euclid(SECS_PER_DAY);
        let tod = secs.rem_euclid(SECS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let dow = (days + 4).rem_euclid(7) + 1;
        let hour = tod / 3600;
        let hour_reg = if self.reg(REG_B) & B_24H != 0 {
            self.encode(small(hour))
        } else {
            let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
            self.encode(small(h12)) | if hour >= 12 { 0x80 } else { 0 }
        };
        let year = y.rem_euclid(10_000);
        let fields = [
            (REG_SEC, self.encode(small(tod % 60))),
            (REG_MIN, self.encode(small(tod / 60 % 60))),
            (REG_HOUR, hour_reg),
            (REG_DOW, self.encode(small(dow))),
            (REG_DAY, self.encode(small(d))),
            (REG_MONTH, self.encode(small(m))),
            (REG_YEAR, self.encode(small(year % 100))),
            (REG_CENTURY, self.encode(small(year / 100))),
        ];
        for (reg, v) in fields {
            self.set_reg(reg, v);
        }
    }

    /// Seconds since the epoch the time registers describe, if valid.
    fn parse(&self) -> Option<i64> {
        let sec = self.decode(self.reg(REG_SEC) & 0x7f).filter(|&v| v <= 59)?;
        let min = self.decode(self.reg(REG_MIN)).filter(|&v| v <= 59)?;
        let hour = self.decode_hour(self.reg(REG_HOUR))?;
        let month = i64::from(
            self.decode(self.reg(REG_MONTH))
                .filter(|m| (1..=12).contains(m))?,
        );
        let year = i64::from(self.decode(self.reg(REG_YEAR)).filter(|&v| v <= 99)?);
        let century = i64::from(self.decode(self.reg(REG_CENTURY)).filter(|&v| v <= 99)?);
        let full_year = century * 100 + year;
        let day = i64::from(self.decode(self.reg(REG_DAY))?);
        if day < 1 || day > days_in_month(full_year, month) {
            return None;
        }
        let days = days_from_civil(full_year, month, day);
        Some(days * SECS_PER_DAY + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec))
    }

    /// Alarm fields as (hour, minute, second): `None` = never matches, inner `None` = don't care.
    fn alarm(&self) -> Option<(Option<u8>, Option<u8>, Option<u8>)> {
        let field = |raw: u8, max: u8| -> Option<Option<u8>> {
            if raw >= 0xC0 {
                Some(None)
            } else {
                self.decode(raw).filter(|&v| v <= max).map(Some)
            }
        };
        let raw_h = self.reg(REG_HOUR_ALARM);
        let h = if raw_h >= 0xC0 {
            None
        } else {
            Some(self.decode_hour(raw_h)?)
        };
        Some((
            h,
            field(self.reg(REG_MIN_ALARM), 59)?,
            field(self.reg(REG_SEC_ALARM), 59)?,
        ))
    }

    /// The first second strictly after `after` whose time of day matches the alarm.
    fn next_alarm_after(&self, after: i64) -> Option<i64> {
        let (ah, am, asec) = self.alarm()?;
        let tod = after.rem_euclid(SECS_PER_DAY);
        let day_start = after - tod;
        let cur_h = u8::try_from(tod / 3600).unwrap_or(0);
        let cur_m = u8::try_from(tod / 60 % 60).unwrap_or(0);
        let cur_s = u8::try_from(tod % 60).unwrap_or(0);
        for day in 0..=1i64 {
            for h in 0..24u8 {
                if ah.is_some_and(|x| x != h) || (day == 0 && h < cur_h) {
                    continue;
                }
                let after_ms = (day == 0 && h == cur_h).then_some((cur_m, cur_s));
                if let Some((m, s)) = first_minute_second(am, asec, after_ms) {
                    return Some(
                        day_start
                            + day * SECS_PER_DAY
                            + i64::from(h) * 3600
                            + i64::from(m) * 60
                            + i64::from(s),
                    );
                }
            }
        }
        None
    }

    fn periodic_ticks(&self) -> Option<i128> {
        match self.reg(REG_A) & A_RS_MASK {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1i128 << (rs - 1)),
        }
    }

    /// Account the events between the last check and `now` in register C.
    fn catch_up(&mut self, now: u64) {
        if now <= self.checked_ns {
            return;
        }
        let from = self.checked_ns;
        self.checked_ns = now;
        if !self.divider_running() {
            return;
        }
        let mut flags = 0;
        if let Some(p) = self.periodic_ticks() {
            if self.chain_tick(now).div_euclid(p) > self.chain_tick(from).div_euclid(p) {
                flags |= C_PF;
            }
        }
        if self.updating() && self.idx(now) > self.idx(from) {
            flags |= C_UF;
            let (s0, s1) = (self.secs_at(from), self.secs_at(now));
            if self.next_alarm_after(s0).is_some_and(|a| a <= s1) {
                flags |= C_AF;
            }
        }
        if flags != 0 {
            self.set_reg(REG_C, self.reg(REG_C) | flags);
            self.update_irqf();
        }
    }

    fn update_irqf(&mut self) {
        let c = self.reg(REG_C);
        let b = self.reg(REG_B);
        let irqf = (c & C_PF != 0 && b & B_PIE != 0)
            || (c & C_AF != 0 && b & B_AIE != 0)
            || (c & C_UF != 0 && b & B_UIE != 0);
        self.set_reg(
            REG_C,
            (c & (C_PF | C_AF | C_UF)) | if irqf { C_IRQF } else { 0 },
        );
        self.line.set(irqf);
    }

    fn uip(&self, now: u64) -> bool {
        if !self.updating() {
            return false;
        }
        let phase = (i128::from(now) - self.chain_base_ns).rem_euclid(NS_PER_SEC_I);
        phase >= NS_PER_SEC_I - i128::from(UIP_WINDOW_NS)
    }

    /// Read from port `0x70 + offset` (byte-wide; wider accesses are split).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut off = offset;
        for b in data.iter_mut() {
            *b = if off == 1 { self.read_data() } else { 0xff };
            off = off.saturating_add(1);
        }
    }

    /// Write to port `0x70 + offset` (byte-wide; wider accesses are split).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut off = offset;
        for &b in data {
            match off {
                0 => {
                    self.index = b & 0x7f;
                    self.nmi_disabled = b & 0x80 != 0;
                }
                1 => self.write_data(b),
                _ => {}
            }
            off = off.saturating_add(1);
        }
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        self.catch_up(now);
        match self.index {
            REG_SEC | REG_MIN | REG_HOUR | REG_DOW | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => {
                if !self.halted() {
                    self.render(now);
                }
                self.reg(self.index)
            }
            REG_A => (self.reg(REG_A) & !A_UIP) | if self.uip(now) { A_UIP } else { 0 },
            REG_C => {
                let v = self.reg(REG_C);
                self.set_reg(REG_C, 0);
                self.line.set(false);
                v
            }
            REG_D => D_VRT,
            i => self.reg(i),
        }
    }

    fn write_data(&mut self, val: u8) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        match self.index {
            REG_A => {
                let old_running = self.divider_running();
                self.transition(now, |s| {
                    s.set_reg(REG_A, val & !A_UIP);
                    if !old_running && s.divider_running() {
                        s.chain_base_ns =
                            i128::from(now) + i128::from(DIVIDER_START_DELAY_NS) - NS_PER_SEC_I;
                    }
                });
                // Periodic edges are counted from the new phase and rate on.
                self.checked_ns = now;
            }
            REG_B => self.write_b(val, now),
            REG_C | REG_D => {}
            REG_SEC | REG_MIN | REG_HOUR | REG_DOW | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => {
                let v = if self.index == REG_SEC {
                    val & 0x7f
                } else {
                    val
                };
                self.write_time(self.index, v, now);
            }
            i => self.set_reg(i, val),
        }
    }

    fn write_b(&mut self, val: u8, now: u64) {
        let old = self.reg(REG_B);
        let mut new = val;
        if new & B_SET != 0 {
            // Setting SET ends update cycles and clears UIE (datasheet).
            new &= !B_UIE;
            if old & B_SET == 0 {
                self.render(now);
            }
        }
        let releasing = old & B_SET != 0 && new & B_SET == 0;
        self.transition(now, |s| {
            s.set_reg(REG_B, new);
            if releasing {
                match s.parse() {
                    Some(t) => {
                        s.anchor_secs = t;
                        s.valid = true;
                    }
                    None => s.valid = false,
                }
            }
        });
        self.update_irqf();
    }

    fn write_time(&mut self, index: u8, v: u8, now: u64) {
        if self.halted() {
            self.set_reg(index, v);
            return;
        }
        self.render(now);
        self.set_reg(index, v);
        match self.parse() {
            Some(t) => {
                let updating = self.updating();
                self.transition(now, |s| {
                    s.anchor_secs = t;
                    s.valid = true;
                    if updating {
                        s.anchor_index = s.idx(now);
                    }
                });
                self.render(now);
            }
            None if self.updating() => self.render(now), // a running clock ignores a bad field
            None => self.valid = false,
        }
    }

    fn deadline_at(&self, ns: i128) -> u64 {
        u64::try_from(ns.max(0)).unwrap_or(u64::MAX)
    }
}

/// Smallest (minute, second) matching the alarm fields, strictly after `after` when given.
fn first_minute_second(
    am: Option<u8>,
    asec: Option<u8>,
    after: Option<(u8, u8)>,
) -> Option<(u8, u8)> {
    let s_min = asec.unwrap_or(0);
    let Some((cm, cs)) = after else {
        return Some((am.unwrap_or(0), s_min));
    };
    if am.is_none_or(|m| m == cm) {
        let s = match asec {
            Some(x) => (x > cs).then_some(x),
            None => (cs < 59).then_some(cs + 1),
        };
        if let Some(s) = s {
            return Some((cm, s));
        }
    }
    match am {
        Some(m) => (m > cm).then_some((m, s_min)),
        None => (cm < 59).then_some((cm + 1, s_min)),
    }
}

impl<C: Clock> TimerDevice for Rtc<C> {
    fn next_deadline_ns(&self) -> Option<u64> {
        if self.line.dirty() {
            return Some(0);
        }
        if self.reg(REG_C) & C_IRQF != 0 || !self.divider_running() {
            return None;
        }
        let b = self.reg(REG_B);
        let from = self.checked_ns;
        let mut best: Option<i128> = None;
        let mut consider = |t: i128| best = Some(best.map_or(t, |b: i128| b.min(t)));
        if b & B_PIE != 0 {
            if let Some(p) = self.periodic_ticks() {
                let k = self.chain_tick(from).div_euclid(p) + 1;
                let num = k * p * NS_PER_SEC_I;
                let ns = num.div_euclid(CHAIN_HZ) + i128::from(num.rem_euclid(CHAIN_HZ) != 0);
                consider(self.chain_base_ns + ns);
            }
        }
        if self.updating() {
            if b & B_UIE != 0 {
                consider(self.chain_base_ns + (i128::from(self.idx(from)) + 1) * NS_PER_SEC_I);
            }
            if b & B_AIE != 0 {
                if let Some(a) = self.next_alarm_after(self.secs_at(from)) {
                    let index = i128::from(self.anchor_index) + i128::from(a)
                        - i128::from(self.anchor_secs);
                    consider(self.chain_base_ns + index * NS_PER_SEC_I);
                }
            }
        }
        best.map(|t| self.deadline_at(t))
    }

    fn poll(&mut self, now_ns: u64, irq: &mut dyn IrqSink) {
        self.catch_up(now_ns);
        self.line.flush(RTC_IRQ, irq);
    }
}

/// Seconds since the epoch of a proleptic-Gregorian UTC date and time, for tests and tools. Fields
/// are not validated (day 0 is the last day of the previous month, and so on) but are clamped to
/// ranges that cannot overflow: years ±1 000 000, the other fields ±10 000.
pub fn epoch_secs(year: i64, month: i64, day: i64, hour: i64, min: i64, sec: i64) -> i64 {
    let f = |v: i64| v.clamp(-10_000, 10_000);
    days_from_civil(
        year.clamp(-1_000_000, 1_000_000),
        month.clamp(1, 12),
        f(day),
    ) * SECS_PER_DAY
        + f(hour) * 3600
        + f(min) * 60
        + f(sec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::{FixedWallClock, IrqRecorder, ManualClock};
    use crate::devices::NS_PER_SEC;

    /// 2024-02-29T13:45:30Z, a Thursday.
    const T0: i64 = 1_709_214_330;

    fn rd(rtc: &mut Rtc<&ManualClock>, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn wr(rtc: &mut Rtc<&ManualClock>, index: u8, v: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[v]);
    }

    fn new_rtc(clock: &ManualClock, secs: i64, nanos: u32) -> Rtc<&ManualClock> {
        Rtc::new(clock, &FixedWallClock::new(secs, nanos))
    }

    #[test]
    fn calendar_helpers_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(epoch_secs(2024, 2, 29, 0, 0, 0), 1_709_164_800);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(epoch_secs(0, 1, 1, 0, 0, 0), MIN_SECS);
        assert_eq!(epoch_secs(9999, 12, 31, 23, 59, 59), MAX_SECS);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn bcd_24h_date_equals_wall_clock() {
        let clock = ManualClock::new(77);
        let mut rtc = new_rtc(&clock, T0, 0);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        assert_eq!(rd(&mut rtc, REG_MIN), 0x45);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x13);
        assert_eq!(rd(&mut rtc, REG_DOW), 5, "Thursday");
        assert_eq!(rd(&mut rtc, REG_DAY), 0x29);
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(rd(&mut rtc, REG_B), B_24H);
        assert_eq!(rd(&mut rtc, REG_D), D_VRT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        wr(&mut rtc, REG_B, B_DM_BINARY | B_24H);
        assert_eq!(rd(&mut rtc, REG_HOUR), 13);
        assert_eq!(rd(&mut rtc, REG_MIN), 45);
        assert_eq!(rd(&mut rtc, REG_YEAR), 24);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 20);
        wr(&mut rtc, REG_B, B_DM_BINARY);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x80 | 1, "1 PM");
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x81, "BCD 1 PM");
        let mut noon = new_rtc(&clock, epoch_secs(2024, 1, 1, 12, 0, 0), 0);
        wr(&mut noon, REG_B, 0);
        assert_eq!(rd(&mut noon, REG_HOUR), 0x92, "12 PM");
        let mut midnight = new_rtc(&clock, epoch_secs(2024, 1, 1, 0, 0, 0), 0);
        wr(&mut midnight, REG_B, 0);
        assert_eq!(rd(&mut midnight, REG_HOUR), 0x12, "12 AM");
    }

    #[test]
    fn seconds_roll_with_the_host_wall_clock_phase() {
        let clock = ManualClock::new(1_000);
        let mut rtc = new_rtc(&clock, T0, 900_000_000);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        clock.advance(99_999_999);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        clock.advance(1);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x31);
        clock.advance(3600 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x14);
        assert_eq!(rtc.time_secs(), Some(T0 + 3601));
    }

    #[test]
    fn uip_is_set_just_before_the_update() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        assert_eq!(rd(&mut rtc, REG_A) & A_UIP, 0);
        clock.set(NS_PER_SEC - UIP_WINDOW_NS - 1);
        assert_eq!(rd(&mut rtc, REG_A) & A_UIP, 0);
        clock.set(NS_PER_SEC - UIP_WINDOW_NS);
        assert_eq!(rd(&mut rtc, REG_A), A_UIP | A_DV_RUN);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        clock.set(NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_A) & A_UIP, 0);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x31);
        wr(&mut rtc, REG_A, 0xff);
        assert_eq!(
            rd(&mut rtc, REG_A) & A_UIP,
            0,
            "UIP is read-only and 0 while stopped"
        );
    }

    #[test]
    fn guest_set_time_changes_its_offset() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        wr(&mut rtc, REG_B, B_SET | B_24H);
        clock.advance(5 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30, "frozen under SET");
        wr(&mut rtc, REG_YEAR, 0x31);
        wr(&mut rtc, REG_DAY, 0x28);
        wr(&mut rtc, REG_SEC, 0x80); // bit 7 read-only
        assert_eq!(rd(&mut rtc, REG_SEC), 0x00);
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(rtc.time_secs(), Some(epoch_secs(2031, 2, 28, 13, 45, 0)));
        clock.advance(2 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x02);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x31);
        assert_eq!(rd(&mut rtc, REG_DOW), 6, "2031-02-28 is a Friday");
        assert_eq!(rtc.time_secs(), Some(epoch_secs(2031, 2, 28, 13, 45, 2)));
    }

    #[test]
    fn century_written_while_running_moves_time() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        wr(&mut rtc, REG_CENTURY, 0x19);
        assert_eq!(rtc.time_secs(), Some(epoch_secs(1924, 2, 29, 13, 45, 30)));
        wr(&mut rtc, REG_MONTH, 0x13); // invalid while running: ignored
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x02);
    }

    #[test]
    fn invalid_time_under_set_stops_the_clock_until_fixed() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        wr(&mut rtc, REG_B, B_SET | B_24H);
        wr(&mut rtc, REG_DAY, 0x31); // Feb 31
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(rtc.time_secs(), None);
        clock.advance(3 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_DAY), 0x31, "registers kept as written");
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30, "not counting");
        wr(&mut rtc, REG_DAY, 0x28);
        assert_eq!(rtc.time_secs(), Some(epoch_secs(2024, 2, 28, 13, 45, 30)));
        clock.advance(NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x31);
    }

    #[test]
    fn divider_reset_freezes_and_restart_updates_half_a_second_later() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        clock.set(300_000_000);
        wr(&mut rtc, REG_A, 0x70);
        clock.advance(10 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        wr(&mut rtc, REG_A, 0x26);
        clock.advance(499_999_999);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x30);
        clock.advance(1);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x31);
    }

    fn run(
        rtc: &mut Rtc<&ManualClock>,
        clock: &ManualClock,
        irq: &mut IrqRecorder,
        end: u64,
        ack: bool,
    ) {
        while let Some(d) = rtc.next_deadline_ns() {
            if d > end {
                break;
            }
            clock.set(d);
            rtc.poll(clock.get(), irq);
            if ack && irq.level(RTC_IRQ) {
                rd(rtc, REG_C);
                rtc.poll(clock.get(), irq);
            }
        }
        clock.set(end);
        rtc.poll(end, irq);
    }

    #[test]
    fn periodic_interrupt_at_1024_hz_when_acknowledged() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 250_000_000);
        let mut irq = IrqRecorder::new();
        wr(&mut rtc, REG_A, A_DV_RUN | 6);
        wr(&mut rtc, REG_B, B_24H | B_PIE);
        let start = clock.get();
        run(&mut rtc, &clock, &mut irq, start + NS_PER_SEC, true);
        let n = irq.rising(RTC_IRQ);
        assert!((1023..=1025).contains(&n), "got {n}");
    }

    #[test]
    fn unacknowledged_periodic_interrupt_asserts_once() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        let mut irq = IrqRecorder::new();
        wr(&mut rtc, REG_A, A_DV_RUN | 3); // 8192 Hz
        wr(&mut rtc, REG_B, B_24H | B_PIE);
        run(&mut rtc, &clock, &mut irq, NS_PER_SEC, false);
        assert_eq!(irq.rising(RTC_IRQ), 1);
        assert!(irq.level(RTC_IRQ));
        assert_eq!(rtc.next_deadline_ns(), None);
        let c = rd(&mut rtc, REG_C);
        assert_eq!(
            c & (C_IRQF | C_PF | C_AF),
            C_IRQF | C_PF,
            "UF may be set too (an update passed)"
        );
        assert_eq!(rtc.next_deadline_ns(), Some(0), "deassert latched");
        rtc.poll(clock.get(), &mut irq);
        assert!(!irq.level(RTC_IRQ));
        assert_eq!(rd(&mut rtc, REG_C), 0, "read clears");
    }

    #[test]
    fn update_ended_interrupt_once_per_second() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 600_000_000);
        let mut irq = IrqRecorder::new();
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        run(&mut rtc, &clock, &mut irq, 10 * NS_PER_SEC, true);
        assert_eq!(irq.rising(RTC_IRQ), 10);
    }

    #[test]
    fn alarm_with_dont_care_fields() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        let mut irq = IrqRecorder::new();
        wr(&mut rtc, REG_SEC_ALARM, 0x35);
        wr(&mut rtc, REG_MIN_ALARM, 0xC0);
        wr(&mut rtc, REG_HOUR_ALARM, 0xFF);
        wr(&mut rtc, REG_B, B_24H | B_AIE);
        assert_eq!(rtc.next_deadline_ns(), Some(5 * NS_PER_SEC));
        run(&mut rtc, &clock, &mut irq, 4 * NS_PER_SEC, true);
        assert_eq!(irq.rising(RTC_IRQ), 0);
        clock.set(5 * NS_PER_SEC);
        rtc.poll(clock.get(), &mut irq);
        assert_eq!(irq.rising(RTC_IRQ), 1);
        assert_eq!(rd(&mut rtc, REG_C) & (C_AF | C_IRQF), C_AF | C_IRQF);
        rtc.poll(clock.get(), &mut irq);
        // Next match: the same second of the next minute.
        assert_eq!(rtc.next_deadline_ns(), Some(65 * NS_PER_SEC));
    }

    #[test]
    fn fixed_alarm_next_day() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        wr(&mut rtc, REG_SEC_ALARM, 0x00);
        wr(&mut rtc, REG_MIN_ALARM, 0x00);
        wr(&mut rtc, REG_HOUR_ALARM, 0x07);
        wr(&mut rtc, REG_B, B_24H | B_AIE);
        // 13:45:30 -> next 07:00:00 is 17h14m30s away.
        assert_eq!(
            rtc.next_deadline_ns(),
            Some((17 * 3600 + 14 * 60 + 30) * NS_PER_SEC)
        );
        wr(&mut rtc, REG_HOUR_ALARM, 0x24); // invalid hour: never
        assert_eq!(rtc.next_deadline_ns(), None);
    }

    #[test]
    fn flags_set_without_enables_raise_irq_when_enabled() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        let mut irq = IrqRecorder::new();
        clock.advance(2 * NS_PER_SEC);
        rtc.poll(clock.get(), &mut irq);
        assert_eq!(irq.calls, 0);
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        assert_eq!(rtc.next_deadline_ns(), Some(0));
        rtc.poll(clock.get(), &mut irq);
        assert!(irq.level(RTC_IRQ));
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_UF);
    }

    #[test]
    fn index_port_masks_nmi_bit_and_nvram_is_plain_memory() {
        let clock = ManualClock::new(0);
        let mut rtc = new_rtc(&clock, T0, 0);
        rtc.write(0, &[0x80 | REG_CENTURY]);
        assert!(rtc.nmi_disabled());
        let mut b = [0u8];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x20);
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xff, "index port is write-only");
        for i in (0x0e..0x80u8).filter(|&i| i != REG_CENTURY) {
            wr(&mut rtc, i, i ^ 0x5a);
        }
        for i in (0x0e..0x80u8).filter(|&i| i != REG_CENTURY) {
            assert_eq!(rd(&mut rtc, i), i ^ 0x5a);
        }
        wr(&mut rtc, REG_D, 0);
        assert_eq!(rd(&mut rtc, REG_D), D_VRT);
        wr(&mut rtc, REG_C, 0xff);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        // Wide access: index then data in one 16-bit write.
        rtc.write(0, &[REG_YEAR, 0x28]);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x28);
        assert_eq!(rtc.time_secs(), Some(epoch_secs(2028, 2, 29, 13, 45, 30)));
        assert_eq!(rd(&mut rtc, REG_DOW), 3, "2028-02-29 is a Tuesday");
    }

    #[test]
    fn first_minute_second_cases() {
        assert_eq!(
            first_minute_second(None, None, Some((10, 59))),
            Some((11, 0))
        );
        assert_eq!(first_minute_second(None, None, Some((59, 59))), None);
        assert_eq!(
            first_minute_second(Some(10), Some(5), Some((10, 4))),
            Some((10, 5))
        );
        assert_eq!(first_minute_second(Some(10), Some(5), Some((10, 5))), None);
        assert_eq!(
            first_minute_second(None, Some(5), Some((10, 5))),
            Some((11, 5))
        );
        assert_eq!(first_minute_second(Some(3), None, None), Some((3, 0)));
    }
}
