//! I/O APIC (82093AA register model, as bhyve's `vioapic.c`), 32 pins, delivering through MSIs to
//! KVM's in-kernel local APICs (split irqchip).
//!
//! # Register layout
//!
//! MMIO window at [`IOAPIC_BASE`] (0xFEC0_0000), [`IOAPIC_SIZE`] bytes (bhyve's `VIOAPIC_SIZE`):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x00 | IOREGSEL: index of the indirect register (bits 7:0) | 1, 2 or 4 bytes |
//! | 0x10 | IOWIN: data of the indirect register selected by IOREGSEL | 4 bytes |
//!
//! Anything else (other offsets, other widths) reads 0 and ignores writes, as `vioapic_mmio_rw`.
//!
//! Indirect registers (IOREGSEL):
//!
//! | index | register |
//! |---|---|
//! | 0x00 | ID: bits 27:24 APIC ID (read/write) |
//! | 0x01 | VER: bits 7:0 version 0x11, bits 23:16 max redirection entry (31) (read-only) |
//! | 0x02 | ARB: arbitration ID = the APIC ID (read-only) |
//! | 0x10 + 2n, 0x11 + 2n | redirection table entry n (low, high dword), n in 0..32 |
//! | others | read 0, writes ignored |
//!
//! Redirection table entry (64 bits): 7:0 vector, 10:8 delivery mode, 11 destination mode
//! (1 = logical), 12 delivery status (read-only, always 0 here: delivery is synchronous),
//! 13 polarity (stored, not applied: sources report *asserted*), 14 remote IRR (read-only),
//! 15 trigger mode (1 = level), 16 mask, 63:56 destination.
//!
//! # Delivery
//!
//! An unmasked edge-triggered pin delivers on each rising edge of its input. A level-triggered pin
//! delivers when its input is asserted and remote IRR is clear, and then sets remote IRR; the local
//! APIC's EOI for that vector (`KVM_EXIT_IOAPIC_EOI`, [`IoApic::eoi`]) clears remote IRR and
//! delivers again if the input is still asserted. Masked pins deliver nothing; a level-triggered pin
//! that is unmasked while asserted is delivered by [`IoApic::flush`], which [`IoApic::set_irq`] and
//! [`IoApic::eoi`] also run first. Delivery is an x86 MSI: address 0xFEE0_0000 | destination << 12 |
//! destination mode << 2; data = vector | delivery mode << 8 | (level ? 1 << 14 | 1 << 15 : 0).
//!
//! KVM only reports EOIs of vectors it knows to be IOAPIC level vectors (its
//! `ioapic_handled_vectors`, scanned from the GSI routing table), so the runner should mirror the
//! level-triggered entries into MSI routes; [`IoApic::msi_message`] and
//! [`IoApic::rte_generation`] give it what it needs to do so lazily.

use super::{fill_le, le_value, lo32, lo8, MsiSink};

/// Guest-physical base of the I/O APIC window (bhyve's `VIOAPIC_BASE`).
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the I/O APIC window (bhyve's `VIOAPIC_SIZE`).
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of redirection-table entries (input pins).
pub const IOAPIC_PINS: usize = 32;
/// Version register value: version 0x11 with 31 as the highest redirection entry, as bhyve.
pub const IOAPIC_VERSION: u32 = 0x11 | (31 << 16);

/// Offset of IOREGSEL.
pub const IOREGSEL: u64 = 0x00;
/// Offset of IOWIN.
pub const IOWIN: u64 = 0x10;

/// Indirect index of the ID register.
pub const REG_ID: u8 = 0x00;
/// Indirect index of the version register.
pub const REG_VER: u8 = 0x01;
/// Indirect index of the arbitration register.
pub const REG_ARB: u8 = 0x02;
/// Indirect index of redirection entry 0 (low dword).
pub const REG_REDTBL: u8 = 0x10;

/// Redirection entry: vector.
pub const RTE_VECTOR: u64 = 0xff;
/// Redirection entry: delivery mode (bits 10:8).
pub const RTE_DELMODE: u64 = 0x700;
/// Redirection entry: logical destination mode.
pub const RTE_DESTMODE_LOGICAL: u64 = 1 << 11;
/// Redirection entry: delivery status (read-only).
pub const RTE_DELIVS: u64 = 1 << 12;
/// Redirection entry: active-low polarity.
pub const RTE_POLARITY_LOW: u64 = 1 << 13;
/// Redirection entry: remote IRR (read-only).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection entry: level-triggered.
pub const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
/// Redirection entry: masked.
pub const RTE_MASKED: u64 = 1 << 16;
/// Redirection entry: destination APIC ID / logical set, bits 63:56.
pub const RTE_DEST_SHIFT: u32 = 56;

const RTE_RO_BITS: u64 = RTE_DELIVS | RTE_REMOTE_IRR;
const ID_MASK: u32 = 0x0f00_0000;
/// Reset value of every redirection entry: masked, everything else zero.
pub const RTE_RESET: u64 = RTE_MASKED;

/// MSI address base (the local APICs' window).
pub const MSI_ADDR_BASE: u64 = 0xFEE0_0000;

/// One x86 MSI: what [`MsiSink::send_msi`] receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address (0xFEEx_xxxx).
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// The I/O APIC core.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u32,
    ioregsel: u8,
    rte: [u64; IOAPIC_PINS],
    /// Input levels (bit n = pin n asserted).
    level: u32,
    /// Pins to re-evaluate for delivery at the next flush.
    pending: u32,
    generation: u64,
    delivered: u64,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

fn pin_bit(pin: usize) -> u32 {
    u32::try_from(pin)
        .ok()
        .and_then(|p| 1u32.checked_shl(p))
        .unwrap_or(0)
}

impl IoApic {
    /// An I/O APIC with APIC ID 0 and every pin masked.
    pub fn new() -> Self {
        IoApic {
            id: 0,
            ioregsel: 0,
            rte: [RTE_RESET; IOAPIC_PINS],
            level: 0,
            pending: 0,
            generation: 0,
            delivered: 0,
        }
    }

    /// An I/O APIC with the given APIC ID (bits 3:0 used).
    pub fn with_id(id: u8) -> Self {
        let mut s = Self::new();
        s.id = (u32::from(id) << 24) & ID_MASK;
        s
    }

    /// MMIO read at `offset` from [`IOAPIC_BASE`].
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 1 | 2 | 4) => u64::from(self.ioregsel),
            (IOWIN, 4) => u64::from(self.read_indirect(self.ioregsel)),
            _ => 0,
        };
        fill_le(data, value);
    }

    /// MMIO write at `offset` from [`IOAPIC_BASE`]. A write that unmasks an asserted
    /// level-triggered pin leaves a delivery pending for [`IoApic::flush`].
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = le_value(data) else { return };
        match (offset, data.len()) {
            (IOREGSEL, 1 | 2 | 4) => self.ioregsel = lo8(value),
            (IOWIN, 4) => self.write_indirect(self.ioregsel, lo32(value)),
            _ => {}
        }
    }

    fn rte_slot(index: u8) -> Option<(usize, bool)> {
        let rel = index.checked_sub(REG_REDTBL)?;
        let pin = usize::from(rel / 2);
        (pin < IOAPIC_PINS).then_some((pin, rel % 2 == 1))
    }

    fn read_indirect(&self, index: u8) -> u32 {
        match index {
            REG_ID | REG_ARB => self.id,
            REG_VER => IOAPIC_VERSION,
            _ => match Self::rte_slot(index) {
                Some((pin, high)) => {
                    let v = self.rte.get(pin).copied().unwrap_or(0);
                    lo32(if high { v >> 32 } else { v })
                }
                None => 0,
            },
        }
    }

    fn write_indirect(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => self.id = value & ID_MASK,
            REG_VER | REG_ARB => {}
            _ => {
                let Some((pin, high)) = Self::rte_slot(index) else {
                    return;
                };
                let bit = pin_bit(pin);
                let level = self.level & bit != 0;
                let Some(entry) = self.rte.get_mut(pin) else {
                    return;
                };
                let old = *entry;
                let (shift, mask) = if high {
                    (32, 0xffff_ffff_0000_0000u64)
                } else {
                    (0, 0xffff_ffffu64)
                };
                let written = u64::from(value) << shift;
                let mut new = (old & !(mask & !RTE_RO_BITS)) | (written & mask & !RTE_RO_BITS);
                if new & RTE_TRIGGER_LEVEL == 0 {
                    // Remote IRR has no meaning for an edge-triggered pin.
                    new &= !RTE_REMOTE_IRR;
                }
                *entry = new;
                if new != old {
                    self.generation = self.generation.wrapping_add(1);
                }
                if level && new & RTE_TRIGGER_LEVEL != 0 && new & (RTE_MASKED | RTE_REMOTE_IRR) == 0
                {
                    self.pending |= bit;
                }
            }
        }
    }

    /// Set input `pin` to `level` (asserted = true). Pins outside `0..32` are ignored.
    pub fn set_irq(&mut self, pin: u32, level: bool, msi: &mut impl MsiSink) {
        self.flush(msi);
        let Ok(p) = usize::try_from(pin) else { return };
        if p >= IOAPIC_PINS {
            return;
        }
        let bit = pin_bit(p);
        let was = self.level & bit != 0;
        if level {
            self.level |= bit;
        } else {
            self.level &= !bit;
        }
        if !level {
            return;
        }
        let entry = self.rte.get(p).copied().unwrap_or(RTE_RESET);
        if entry & RTE_TRIGGER_LEVEL != 0 {
            if entry & RTE_REMOTE_IRR == 0 {
                self.deliver(p, msi);
            }
        } else if !was {
            self.deliver(p, msi);
        }
    }

    /// Pulse input `pin` (assert then deassert), as an edge-style source does.
    pub fn pulse_irq(&mut self, pin: u32, msi: &mut impl MsiSink) {
        self.set_irq(pin, true, msi);
        self.set_irq(pin, false, msi);
    }

    /// End of interrupt for `vector` from a local APIC: clear remote IRR on every level-triggered
    /// pin with that vector, and deliver again those whose input is still asserted.
    pub fn eoi(&mut self, vector: u8, msi: &mut impl MsiSink) {
        self.flush(msi);
        for pin in 0..IOAPIC_PINS {
            let Some(entry) = self.rte.get_mut(pin) else {
                continue;
            };
            if *entry & RTE_REMOTE_IRR == 0 || lo8(*entry & RTE_VECTOR) != vector {
                continue;
            }
            *entry &= !RTE_REMOTE_IRR;
            if self.level & pin_bit(pin) != 0 {
                self.deliver(pin, msi);
            }
        }
    }

    /// Whether a register write left a delivery for [`IoApic::flush`].
    pub fn needs_flush(&self) -> bool {
        self.pending != 0
    }

    /// Deliver what register writes left pending (an asserted level-triggered pin that became
    /// deliverable). The runner calls this after MMIO writes, or relies on the next `set_irq`/`eoi`.
    pub fn flush(&mut self, msi: &mut impl MsiSink) {
        let pending = core::mem::take(&mut self.pending);
        if pending == 0 {
            return;
        }
        for pin in 0..IOAPIC_PINS {
            let bit = pin_bit(pin);
            if pending & bit == 0 || self.level & bit == 0 {
                continue;
            }
            let entry = self.rte.get(pin).copied().unwrap_or(RTE_RESET);
            if entry & RTE_TRIGGER_LEVEL != 0 && entry & RTE_REMOTE_IRR == 0 {
                self.deliver(pin, msi);
            }
        }
    }

    fn deliver(&mut self, pin: usize, msi: &mut impl MsiSink) {
        let Some(entry) = self.rte.get_mut(pin) else {
            return;
        };
        if *entry & RTE_MASKED != 0 {
            return;
        }
        if *entry & RTE_TRIGGER_LEVEL != 0 {
            *entry |= RTE_REMOTE_IRR;
        }
        let m = Self::entry_to_msi(*entry);
        self.delivered = self.delivered.wrapping_add(1);
        msi.send_msi(m.address, m.data);
    }

    /// The MSI a redirection entry describes (regardless of its mask bit).
    pub fn entry_to_msi(entry: u64) -> MsiMessage {
        let dest = (entry >> RTE_DEST_SHIFT) & 0xff;
        let logical = entry & RTE_DESTMODE_LOGICAL != 0;
        let level = entry & RTE_TRIGGER_LEVEL != 0;
        let address = MSI_ADDR_BASE | (dest << 12) | (u64::from(logical) << 2);
        let vector = lo32(entry & RTE_VECTOR);
        let delmode = lo32((entry & RTE_DELMODE) >> 8);
        let data = vector | (delmode << 8) | if level { (1 << 14) | (1 << 15) } else { 0 };
        MsiMessage { address, data }
    }

    /// The MSI pin `pin` would deliver now, or `None` for a masked or nonexistent pin.
    pub fn msi_message(&self, pin: usize) -> Option<MsiMessage> {
        let entry = *self.rte.get(pin)?;
        (entry & RTE_MASKED == 0).then(|| Self::entry_to_msi(entry))
    }

    /// The raw redirection entry of `pin`.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.rte.get(pin).copied()
    }

    /// Incremented whenever a guest write changes a redirection entry (so the runner can refresh
    /// its KVM MSI routes only when needed).
    pub fn rte_generation(&self) -> u64 {
        self.generation
    }

    /// Whether input `pin` is asserted.
    pub fn pin_level(&self, pin: usize) -> bool {
        self.level & pin_bit(pin) != 0
    }

    /// MSIs delivered so far (a counter for statistics).
    pub fn delivered_count(&self) -> u64 {
        self.delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::MsiRecorder;

    fn w32(io: &mut IoApic, index: u8, value: u32) {
        io.write(IOREGSEL, &u32::from(index).to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn r32(io: &mut IoApic, index: u8) -> u32 {
        io.write(IOREGSEL, &u32::from(index).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(io: &mut IoApic, pin: u8, low: u32, dest: u8) {
        w32(io, REG_REDTBL + 2 * pin + 1, u32::from(dest) << 24);
        w32(io, REG_REDTBL + 2 * pin, low);
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = IoApic::new();
        assert_eq!(r32(&mut io, REG_VER), 0x001f_0011);
        w32(&mut io, REG_ID, 0xffff_ffff);
        assert_eq!(r32(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(r32(&mut io, REG_ARB), 0x0f00_0000);
        w32(&mut io, REG_VER, 0);
        assert_eq!(r32(&mut io, REG_VER), 0x001f_0011, "version is read-only");
        assert_eq!(IoApic::with_id(3).read_indirect(REG_ID), 0x0300_0000);
    }

    #[test]
    fn reset_state_is_masked_and_delivers_nothing() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        for pin in 0..32 {
            assert_eq!(r32(&mut io, REG_REDTBL + 2 * pin), 0x0001_0000);
            io.pulse_irq(u32::from(pin), &mut msi);
        }
        assert_eq!(msi.count, 0);
    }

    #[test]
    fn edge_pin_builds_msi_from_entry() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        // vector 0x31, fixed, logical destination 0x0f.
        program(&mut io, 4, 0x31 | (1 << 11), 0x0f);
        io.set_irq(4, true, &mut msi);
        io.set_irq(4, true, &mut msi); // still high: no new edge
        assert_eq!(msi.count, 1);
        assert_eq!(msi.last, Some((0xFEE0_F004, 0x31)));
        io.set_irq(4, false, &mut msi);
        io.set_irq(4, true, &mut msi);
        assert_eq!(msi.count, 2);
        assert_eq!(io.delivered_count(), 2);
    }

    #[test]
    fn delivery_mode_and_level_bits_in_data() {
        let e = 0x45 | (1 << 8) | RTE_TRIGGER_LEVEL | (3u64 << 56);
        let m = IoApic::entry_to_msi(e);
        assert_eq!(m.address, 0xFEE0_3000);
        assert_eq!(m.data, 0x45 | (1 << 8) | (1 << 14) | (1 << 15));
    }

    #[test]
    fn level_pin_redelivers_after_eoi_only_while_asserted() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        program(&mut io, 9, 0x49 | (1 << 15), 0);
        io.set_irq(9, true, &mut msi);
        assert_eq!(msi.count, 1);
        assert_ne!(
            r32(&mut io, REG_REDTBL + 18) & (1 << 14),
            0,
            "remote IRR set"
        );
        // Still asserted: another assertion does not deliver while remote IRR is set.
        io.set_irq(9, true, &mut msi);
        assert_eq!(msi.count, 1);
        io.eoi(0x49, &mut msi);
        assert_eq!(msi.count, 2, "line still high: re-delivered at EOI");
        io.set_irq(9, false, &mut msi);
        io.eoi(0x49, &mut msi);
        assert_eq!(msi.count, 2, "line low: nothing at EOI");
        assert_eq!(r32(&mut io, REG_REDTBL + 18) & (1 << 14), 0);
        io.eoi(0x50, &mut msi);
        assert_eq!(msi.count, 2);
    }

    #[test]
    fn remote_irr_and_delivery_status_are_read_only() {
        let mut io = IoApic::new();
        w32(&mut io, REG_REDTBL, 0xffff_ffff);
        assert_eq!(r32(&mut io, REG_REDTBL) & lo32(RTE_RO_BITS), 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers_on_flush() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        program(&mut io, 5, 0x55 | (1 << 15) | (1 << 16), 0);
        io.set_irq(5, true, &mut msi);
        assert_eq!(msi.count, 0, "masked");
        program(&mut io, 5, 0x55 | (1 << 15), 0);
        assert!(io.needs_flush());
        io.flush(&mut msi);
        assert_eq!(msi.count, 1);
        assert!(!io.needs_flush());
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        program(&mut io, 1, 0x21 | (1 << 16), 0);
        io.pulse_irq(1, &mut msi);
        program(&mut io, 1, 0x21, 0);
        io.flush(&mut msi);
        assert_eq!(msi.count, 0);
    }

    #[test]
    fn out_of_range_indexes_and_bad_accesses() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        for idx in [0x03u8, 0x0f, 0x50, 0x7f, 0xff] {
            w32(&mut io, idx, 0xdead_beef);
            assert_eq!(r32(&mut io, idx), 0);
        }
        io.set_irq(32, true, &mut msi);
        io.set_irq(u32::MAX, true, &mut msi);
        let mut b = [0xaa; 8];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0; 8], "8-byte IOWIN read is not decoded");
        let mut b = [0xaa; 4];
        io.read(0x04, &mut b);
        assert_eq!(b, [0; 4]);
        io.write(0x20, &[1, 2, 3]);
        io.read(0x10, &mut []);
        assert_eq!(msi.count, 0);
    }

    #[test]
    fn byte_write_to_ioregsel_selects_index() {
        let mut io = IoApic::new();
        io.write(IOREGSEL, &[REG_VER]);
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        assert_eq!(u32::from_le_bytes(b), IOAPIC_VERSION);
        let mut s = [0u8; 1];
        io.read(IOREGSEL, &mut s);
        assert_eq!(s[0], REG_VER);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr_and_bumps_generation() {
        let mut io = IoApic::new();
        let mut msi = MsiRecorder::new();
        let g0 = io.rte_generation();
        program(&mut io, 2, 0x30 | (1 << 15), 0);
        assert!(io.rte_generation() > g0);
        io.set_irq(2, true, &mut msi);
        assert!(io.redirection_entry(2).unwrap_or(0) & RTE_REMOTE_IRR != 0);
        program(&mut io, 2, 0x30, 0);
        assert_eq!(io.redirection_entry(2).unwrap_or(0) & RTE_REMOTE_IRR, 0);
        assert_eq!(
            io.msi_message(2),
            Some(MsiMessage {
                address: MSI_ADDR_BASE,
                data: 0x30
            })
        );
        assert_eq!(io.msi_message(40), None);
    }
}
