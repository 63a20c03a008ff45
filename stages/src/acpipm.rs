//! ACPI fixed hardware: the PM1a event and control registers, and the reset control register at
//! port 0xCF9 (bhyve's `pm.c`).
//!
//! # Registers
//!
//! [`Pm1`] decodes [`PM1_PORT`]..+[`PM1_LEN`] (0x400–0x405); the PM timer at 0x408 is
//! `devices::pmtimer`. Offsets are relative to 0x400:
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0–1 | PM1_STS | read; write 1 to clear. Only PWRBTN_STS (bit 8, set by [`Pm1::power_button`]) and WAK_STS (bit 15, see below) are ever set |
//! | 2–3 | PM1_EN | read/write; PWRBTN_EN (8), GBL_EN (5) and RTC_EN (10) are writable, as bhyve, the rest read 0 |
//! | 4–5 | PM1_CNT | SCI_EN (0) always reads 1; BM_RLD (1) and SLP_TYP (12:10) read back; GBL_RLS (2) and SLP_EN (13) are write-only and read 0 |
//!
//! Any width is accepted and decoded byte lane by byte lane, as an LPC device would see it: a
//! 16-bit access at 0x400 is PM1_STS, a 32-bit one is PM1_STS and PM1_EN, a byte write to 0x405
//! alone can set SLP_TYP and SLP_EN. Bytes past 0x405 read all-ones and are not written. bhyve
//! insists on 16-bit accesses; ACPICA makes 16-bit ones, so both agree on what an OS does.
//!
//! The platform is always in ACPI mode: the FADT has no SMI_CMD port, and SCI_EN cannot be
//! cleared.
//!
//! # Sleep states
//!
//! A write that sets SLP_EN with SLP_TYP = [`S5_SLP_TYP`] (5, the value of the DSDT's `\_S5_`,
//! bhyve's) requests [`VmRequest::PowerOff`]. bhyve ignores every other SLP_TYP; so do we, except
//! that WAK_STS is set at once, as if the machine had woken immediately: ACPICA spins on WAK_STS
//! after entering S1–S4, and an OS that tries a state we do not advertise (the DSDT defines only
//! `\_S5_`) must not hang. Each such request is counted ([`Pm1::unsupported_sleeps`]) and logged,
//! rate-limited to the 1st, 2nd, 4th, 8th… occurrence.
//!
//! # SCI
//!
//! The device has no interrupt plumbing. [`Pm1::sci_level`] is the level of the (level-triggered)
//! SCI it wants: some enabled status bit is set. The runner samples it after every access to the
//! device and after [`Pm1::power_button`], and drives ISA IRQ [`SCI_IRQ`] accordingly.
//!
//! # Reset control
//!
//! [`ResetControl`] decodes the single byte at [`RESET_CONTROL_PORT`] (0xCF9, the FADT reset
//! register): a write with RST_CPU (bit 2) set, such as the FADT's reset value 0x06 or a "full
//! reset" 0x0E, requests [`VmRequest::Reset`]; bits 3:1 read back what was written (Linux's
//! `reboot=pci` reads the register before writing it). bhyve treats hard and soft resets alike, and
//! so does this.

use std::sync::Arc;

use crate::platform::{BusDevice, VmRequest, VmRequests};

/// First port of the PM1a event block (PM1_STS, PM1_EN) and of [`Pm1`] (bhyve's `PM1A_EVT_ADDR`).
pub const PM1_PORT: u64 = 0x400;
/// Ports [`Pm1`] decodes: the 4-byte event block and the 2-byte control block at 0x404.
pub const PM1_LEN: u64 = 6;
/// PM1a control block (bhyve's `PM1A_CNT_ADDR`), offset 4 of [`Pm1`].
pub const PM1_CNT_PORT: u64 = 0x404;
/// The reset control register.
pub const RESET_CONTROL_PORT: u64 = 0xcf9;
/// Ports [`ResetControl`] decodes.
pub const RESET_CONTROL_LEN: u64 = 1;
/// ISA IRQ of the SCI (bhyve's `SCI_INT`; the MADT makes it level-triggered, active low).
pub const SCI_IRQ: u32 = 9;
/// SLP_TYP of S5, the value of the DSDT's `\_S5_` package (`loader::acpi::S5_SLP_TYP`).
pub const S5_SLP_TYP: u16 = 5;

/// PM1_STS / PM1_EN bits.
pub mod pm1 {
    /// PM1_STS: PM timer carry.
    pub const TMR_STS: u16 = 1 << 0;
    /// PM1_STS: bus master activity.
    pub const BM_STS: u16 = 1 << 4;
    /// PM1_STS: global lock released.
    pub const GBL_STS: u16 = 1 << 5;
    /// PM1_STS: power button pressed.
    pub const PWRBTN_STS: u16 = 1 << 8;
    /// PM1_STS: sleep button pressed.
    pub const SLPBTN_STS: u16 = 1 << 9;
    /// PM1_STS: RTC alarm.
    pub const RTC_STS: u16 = 1 << 10;
    /// PM1_STS: PCIe wake.
    pub const PCIEXP_WAKE_STS: u16 = 1 << 14;
    /// PM1_STS: the machine woke from a sleep state.
    pub const WAK_STS: u16 = 1 << 15;
    /// PM1_EN: global lock release raises the SCI.
    pub const GBL_EN: u16 = 1 << 5;
    /// PM1_EN: the power button raises the SCI.
    pub const PWRBTN_EN: u16 = 1 << 8;
    /// PM1_EN: the RTC alarm raises the SCI.
    pub const RTC_EN: u16 = 1 << 10;
    /// PM1_CNT: SCI (not SMI) delivery of power-management events.
    pub const SCI_EN: u16 = 1 << 0;
    /// PM1_CNT: bus master requests wake from C3.
    pub const BM_RLD: u16 = 1 << 1;
    /// PM1_CNT: global lock release (write-only).
    pub const GBL_RLS: u16 = 1 << 2;
    /// PM1_CNT: sleep type field (bits 12:10).
    pub const SLP_TYP: u16 = 7 << 10;
    /// PM1_CNT: enter the sleep state in SLP_TYP (write-only).
    pub const SLP_EN: u16 = 1 << 13;
}

/// Status bits a guest write of 1 clears (every status bit the spec defines).
const STS_W1C: u16 = pm1::TMR_STS
    | pm1::BM_STS
    | pm1::GBL_STS
    | pm1::PWRBTN_STS
    | pm1::SLPBTN_STS
    | pm1::RTC_STS
    | pm1::PCIEXP_WAKE_STS
    | pm1::WAK_STS;
/// Enable bits a guest may set (bhyve's set: "ACPI-CA whines profusely if it can't set GBL_EN").
const EN_WRITABLE: u16 = pm1::GBL_EN | pm1::PWRBTN_EN | pm1::RTC_EN;
/// Status bits that raise the SCI when their enable bit is set (same bit positions in PM1_EN).
const SCI_SOURCES: u16 = pm1::GBL_STS | pm1::PWRBTN_STS | pm1::RTC_STS;
/// Control bits that read back what was written (SCI_EN is forced to 1).
const CNT_STORED: u16 = pm1::BM_RLD | pm1::SLP_TYP;

/// The PM1a event and control registers.
#[derive(Debug)]
pub struct Pm1 {
    requests: Arc<VmRequests>,
    status: u16,
    enable: u16,
    control: u16,
    unsupported_sleeps: u64,
}

impl Pm1 {
    /// The registers after reset: no status, nothing enabled, SCI_EN set.
    pub fn new(requests: Arc<VmRequests>) -> Self {
        Pm1 {
            requests,
            status: 0,
            enable: 0,
            control: pm1::SCI_EN,
            unsupported_sleeps: 0,
        }
    }

    /// A host-initiated power-button press (the way to ask an ACPI guest to shut down): sets
    /// PWRBTN_STS. Returns whether the SCI should now be asserted (PWRBTN_EN is set).
    pub fn power_button(&mut self) -> bool {
        self.status |= pm1::PWRBTN_STS;
        self.sci_level()
    }

    /// The SCI level the registers ask for: some status bit is set whose enable bit is set.
    pub fn sci_level(&self) -> bool {
        self.status & self.enable & SCI_SOURCES != 0
    }

    /// PM1_STS.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// PM1_EN.
    pub fn enable(&self) -> u16 {
        self.enable
    }

    /// PM1_CNT as the guest reads it.
    pub fn control(&self) -> u16 {
        self.control | pm1::SCI_EN
    }

    /// Sleep requests with an SLP_TYP other than S5, which were answered with an immediate wake.
    pub fn unsupported_sleeps(&self) -> u64 {
        self.unsupported_sleeps
    }

    /// The byte of the register file at `offset` (0..6).
    fn reg_byte(&self, offset: u64) -> u8 {
        let reg = match offset {
            0 | 1 => self.status,
            2 | 3 => self.enable,
            4 | 5 => self.control(),
            _ => return 0xff,
        };
        let [lo, hi] = reg.to_le_bytes();
        if offset % 2 == 0 {
            lo
        } else {
            hi
        }
    }

    fn sleep(&mut self, slp_typ: u16) {
        if slp_typ == S5_SLP_TYP {
            self.requests.request(VmRequest::PowerOff);
            return;
        }
        self.status |= pm1::WAK_STS;
        self.unsupported_sleeps = self.unsupported_sleeps.saturating_add(1);
        if self.unsupported_sleeps.is_power_of_two() {
            eprintln!(
                "acpipm: guest asked for sleep type {slp_typ} (only S5 = {S5_SLP_TYP} is \
                 supported); woke it at once ({} such requests so far)",
                self.unsupported_sleeps
            );
        }
    }
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .map_or(0xff, |o| self.reg_byte(o));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut slp_en = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = u64::try_from(i).ok().and_then(|i| offset.checked_add(i)) else {
                break;
            };
            let (lane, shift) = match o {
                0..=5 => (o / 2, (o % 2) * 8),
                _ => break,
            };
            let v = u16::from(b) << shift;
            let byte_mask = 0xffu16 << shift;
            match lane {
                0 => self.status &= !(v & STS_W1C),
                1 => self.enable = (self.enable & !byte_mask) | (v & EN_WRITABLE),
                _ => {
                    self.control = (self.control & !(byte_mask & CNT_STORED)) | (v & CNT_STORED);
                    slp_en |= v & pm1::SLP_EN != 0;
                }
            }
        }
        if slp_en {
            self.sleep((self.control & pm1::SLP_TYP) >> 10);
        }
    }
}

/// RST_CPU: a write with this bit set resets the machine.
const RST_CPU: u8 = 1 << 2;
/// Bits of the reset control register that read back (SYS_RST, RST_CPU, FULL_RST).
const RESET_STORED: u8 = 0x0e;

/// The reset control register at port 0xCF9.
#[derive(Debug)]
pub struct ResetControl {
    requests: Arc<VmRequests>,
    value: u8,
}

impl ResetControl {
    /// The register, raising its request on `requests`.
    pub fn new(requests: Arc<VmRequests>) -> Self {
        ResetControl { requests, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.value;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Byte lane 0 is port 0xCF9 whatever the access width.
        let (0, Some(&v)) = (offset, data.first()) else {
            return;
        };
        self.value = v & RESET_STORED;
        if v & RST_CPU != 0 {
            self.requests.request(VmRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (Pm1, Arc<VmRequests>) {
        let r = Arc::new(VmRequests::new());
        (Pm1::new(r.clone()), r)
    }

    fn r16(d: &mut impl BusDevice, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        d.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn w16(d: &mut impl BusDevice, offset: u64, v: u16) {
        d.write(offset, &v.to_le_bytes());
    }

    #[test]
    fn s5_write_requests_power_off() {
        // ACPICA's sequence: SLP_TYP first, then SLP_TYP | SLP_EN, 16-bit writes to PM1_CNT.
        let (mut p, r) = pm();
        let cnt = r16(&mut p, 4) & !(pm1::SLP_TYP | pm1::SLP_EN);
        w16(&mut p, 4, cnt | (S5_SLP_TYP << 10));
        assert_eq!(r.pending(), None, "SLP_TYP alone does nothing");
        w16(&mut p, 4, cnt | (S5_SLP_TYP << 10) | pm1::SLP_EN);
        assert_eq!(r.pending(), Some(VmRequest::PowerOff));
        assert_eq!(r.pending().unwrap().exit_status(), 1);

        // A byte write to the high half carries SLP_TYP and SLP_EN on its own.
        let (mut p, r) = pm();
        p.write(5, &[u8::try_from(S5_SLP_TYP << 2).unwrap() | 0x20]);
        assert_eq!(r.pending(), Some(VmRequest::PowerOff));
    }

    #[test]
    fn other_sleep_types_request_nothing_and_wake_at_once() {
        for typ in (0..8u16).filter(|&t| t != S5_SLP_TYP) {
            let (mut p, r) = pm();
            w16(&mut p, 4, (typ << 10) | pm1::SLP_EN);
            assert_eq!(r.pending(), None, "SLP_TYP {typ}");
            assert_eq!(p.unsupported_sleeps(), 1);
            assert_ne!(
                r16(&mut p, 0) & pm1::WAK_STS,
                0,
                "WAK_STS so the OS stops waiting"
            );
            assert_eq!(r16(&mut p, 4), (typ << 10) | pm1::SCI_EN, "SLP_EN reads 0");
            w16(&mut p, 0, pm1::WAK_STS);
            assert_eq!(r16(&mut p, 0), 0, "WAK_STS is write-1-to-clear");
        }
    }

    #[test]
    fn control_reads_sci_en_and_keeps_only_its_stored_bits() {
        let (mut p, r) = pm();
        assert_eq!(r16(&mut p, 4), pm1::SCI_EN);
        w16(&mut p, 4, 0);
        assert_eq!(r16(&mut p, 4), pm1::SCI_EN, "always in ACPI mode");
        w16(&mut p, 4, !pm1::SLP_EN);
        assert_eq!(r16(&mut p, 4), pm1::SCI_EN | pm1::BM_RLD | pm1::SLP_TYP);
        assert_eq!(r.pending(), None);
    }

    #[test]
    fn status_is_write_one_to_clear_and_drives_the_sci() {
        let (mut p, _) = pm();
        assert!(!p.power_button(), "PWRBTN_EN clear: no SCI");
        assert_eq!(r16(&mut p, 0), pm1::PWRBTN_STS);
        w16(&mut p, 0, 0);
        w16(&mut p, 0, !pm1::PWRBTN_STS);
        assert_eq!(
            r16(&mut p, 0),
            pm1::PWRBTN_STS,
            "only a 1 in bit 8 clears it"
        );
        w16(&mut p, 2, 0xffff);
        assert_eq!(r16(&mut p, 2), pm1::GBL_EN | pm1::PWRBTN_EN | pm1::RTC_EN);
        assert!(p.sci_level(), "enabled and pending");
        w16(&mut p, 0, pm1::PWRBTN_STS);
        assert_eq!(r16(&mut p, 0), 0);
        assert!(!p.sci_level());
        assert!(p.power_button(), "PWRBTN_EN set: SCI");
        // A guest cannot set a status bit by writing it.
        let (mut q, _) = pm();
        w16(&mut q, 0, 0xffff);
        assert_eq!(q.status(), 0);
    }

    #[test]
    fn accesses_of_any_width_see_the_byte_lanes() {
        let (mut p, _) = pm();
        p.power_button();
        w16(&mut p, 2, pm1::PWRBTN_EN);
        let mut d = [0u8; 4];
        p.read(0, &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            u32::from(pm1::PWRBTN_STS) | (u32::from(pm1::PWRBTN_EN) << 16)
        );
        let mut d = [0u8; 4];
        p.read(4, &mut d);
        assert_eq!(d, [1, 0, 0xff, 0xff], "PM1_CNT, then nothing");
        let mut d = [0u8; 1];
        p.read(1, &mut d);
        assert_eq!(d, [1], "high byte of PM1_STS");
        p.write(0, &0x0100_0100u32.to_le_bytes()); // clears PWRBTN_STS, keeps PWRBTN_EN
        assert_eq!((p.status(), p.enable()), (0, pm1::PWRBTN_EN));
        let mut d = [0u8; 8];
        p.read(u64::MAX - 2, &mut d);
        assert_eq!(d, [0xff; 8]);
    }

    #[test]
    fn reset_register_resets_on_rst_cpu_and_reads_back() {
        let r = Arc::new(VmRequests::new());
        let mut c = ResetControl::new(r.clone());
        let mut b = [0u8; 1];
        c.read(0, &mut b);
        assert_eq!(b, [0]);
        c.write(0, &[0x02]);
        assert_eq!(
            r.pending(),
            None,
            "SYS_RST alone selects, it does not reset"
        );
        c.read(0, &mut b);
        assert_eq!(b, [0x02], "reboot=pci reads the register first");
        c.write(0, &[0x06]);
        assert_eq!(r.pending(), Some(VmRequest::Reset));
        assert_eq!(r.pending().unwrap().exit_status(), 0);

        let r = Arc::new(VmRequests::new());
        let mut c = ResetControl::new(r.clone());
        c.write(0, &[0x0e]);
        assert_eq!(r.pending(), Some(VmRequest::Reset), "full reset");

        let r = Arc::new(VmRequests::new());
        let mut c = ResetControl::new(r.clone());
        c.write(1, &[0x06]);
        c.write(0, &[]);
        assert_eq!(r.pending(), None, "not port 0xCF9");
        let mut w = [0u8; 2];
        c.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    /// xorshift64*, deterministic.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_register_traffic_never_panics_and_keeps_invariants() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let r = Arc::new(VmRequests::new());
        let mut p = Pm1::new(r.clone());
        let mut c = ResetControl::new(r.clone());
        let mut buf = [0u8; 16];
        for _ in 0..100_000 {
            let x = rng.next();
            let offset = match x % 8 {
                0 => u64::MAX - (x >> 8) % 16,
                1 => x >> 3,
                _ => (x >> 3) % 12,
            };
            let len = usize::try_from((x >> 40) % 11).unwrap();
            let data = &mut buf[..len];
            for b in data.iter_mut() {
                *b = rng.next().to_le_bytes()[0];
            }
            let dev: &mut dyn BusDevice = if x & (1 << 60) == 0 { &mut p } else { &mut c };
            if x & (1 << 61) == 0 {
                dev.read(offset, data);
            } else {
                dev.write(offset, data);
            }
            if x % 997 == 0 {
                p.power_button();
            }
            assert_ne!(p.control() & pm1::SCI_EN, 0);
            assert_eq!(p.enable() & !EN_WRITABLE, 0);
            assert_eq!(p.status() & !(pm1::PWRBTN_STS | pm1::WAK_STS), 0);
            assert_eq!(p.control() & !(CNT_STORED | pm1::SCI_EN), 0);
        }
        assert!(p.unsupported_sleeps() > 0, "the traffic reached SLP_EN");
        assert!(r.pending().is_some(), "and some request");
    }
}
