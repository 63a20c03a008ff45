//! Fan-out of interrupt lines to the PIC pair and the I/O APIC, as bhyve's devices do when they
//! call both `vatpic_*_irq` and `vioapic_*_irq`.

use super::ioapic::IoApic;
use super::pic::PicPair;
use super::{IrqSink, MsiSink};

/// The I/O APIC input an ISA IRQ is wired to: IRQ 0 (the PIT, or HPET timer 0 in legacy
/// replacement mode) is GSI 2, every other ISA IRQ is the GSI of the same number. This is the
/// interrupt source override bhyve's MADT advertises, and the one the ACPI tables must match.
pub const fn isa_irq_to_gsi(irq: u32) -> u32 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// An [`IrqSink`] that drives ISA IRQs (lines 0–15) into both the PIC pair and the I/O APIC (at
/// [`isa_irq_to_gsi`]) and lines from 16 up into the I/O APIC only.
///
/// Line 2 is the PIC cascade and is not a device line; a source that asserts it reaches only I/O
/// APIC input 2. I/O APIC input 0, which bhyve pulses as the "virtual wire via I/O APIC" ExtINT
/// path, is not driven: the runner injects the PIC's output as ExtINT through the local APIC
/// (`KVM_INTERRUPT`) instead.
#[derive(Debug)]
pub struct IsaIrqRouter<'a, M: MsiSink + ?Sized> {
    /// The PIC pair.
    pub pic: &'a mut PicPair,
    /// The I/O APIC.
    pub ioapic: &'a mut IoApic,
    /// Where the I/O APIC's messages go.
    pub msi: &'a mut M,
}

impl<'a, M: MsiSink + ?Sized> IsaIrqRouter<'a, M> {
    /// A router over the given controllers.
    pub fn new(pic: &'a mut PicPair, ioapic: &'a mut IoApic, msi: &'a mut M) -> Self {
        IsaIrqRouter { pic, ioapic, msi }
    }
}

impl<M: MsiSink + ?Sized> IrqSink for IsaIrqRouter<'_, M> {
    fn set_irq(&mut self, line: u32, level: bool) {
        if line < 16 {
            self.pic.set_irq(line, level);
            self.ioapic
                .set_irq(isa_irq_to_gsi(line), level, &mut self.msi);
        } else {
            self.ioapic.set_irq(line, level, &mut self.msi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::{IOREGSEL, IOWIN, REG_REDTBL};
    use crate::devices::pic::init_pair_standard;
    use crate::devices::testing::MsiRecorder;

    fn unmask(io: &mut IoApic, pin: u8, vector: u8) {
        io.write(IOREGSEL, &u32::from(REG_REDTBL + 2 * pin).to_le_bytes());
        io.write(IOWIN, &u32::from(vector).to_le_bytes());
    }

    #[test]
    fn isa_irq0_reaches_pic_pin0_and_ioapic_pin2() {
        let mut pic = PicPair::new();
        init_pair_standard(&mut pic, 0x20, 0x28);
        let mut io = IoApic::new();
        unmask(&mut io, 2, 0x30);
        unmask(&mut io, 0, 0x40);
        let mut msi = MsiRecorder::new();
        let mut r = IsaIrqRouter::new(&mut pic, &mut io, &mut msi);
        r.set_irq(0, true);
        r.set_irq(0, false);
        assert_eq!(msi.count, 1);
        assert_eq!(msi.count_vector(0x30), 1);
        assert_eq!(pic.pending_vector(), Some(0x20));
    }

    #[test]
    fn gsi_lines_bypass_the_pic() {
        let mut pic = PicPair::new();
        init_pair_standard(&mut pic, 0x20, 0x28);
        let mut io = IoApic::new();
        unmask(&mut io, 24, 0x60);
        let mut msi = MsiRecorder::new();
        let mut r = IsaIrqRouter::new(&mut pic, &mut io, &mut msi);
        r.set_irq(24, true);
        assert_eq!(msi.count_vector(0x60), 1);
        assert!(!pic.intr_output());
        assert_eq!(isa_irq_to_gsi(8), 8);
    }
}
