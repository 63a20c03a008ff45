//! Interrupt controllers as a kernel relies on them: I/O APIC level semantics with EOI, masking,
//! the PIC's ExtINT vectors and spurious IRQs, and PCI configuration through 0xCF8/0xCFC.

use stages::devices::ioapic::{IoApic, IOREGSEL, IOWIN, REG_REDTBL, REG_VER};
use stages::devices::pci::{
    config_address, standard_config_io, Bdf, BuiltinPciFunction, PciConfigIo, HOST_BRIDGE_BDF,
    LPC_BDF,
};
use stages::devices::pic::{init_pair_standard, PicPair, PicRange};
use stages::devices::pmtimer::{PmTimer, SCI_IRQ};
use stages::devices::testing::{ManualClock, MsiRecorder};
use stages::devices::{IsaIrqRouter, TimerDevice, NS_PER_SEC};

fn rte(io: &mut IoApic, pin: u8, low: u32, high: u32) {
    io.write(IOREGSEL, &u32::from(REG_REDTBL + 2 * pin + 1).to_le_bytes());
    io.write(IOWIN, &high.to_le_bytes());
    io.write(IOREGSEL, &u32::from(REG_REDTBL + 2 * pin).to_le_bytes());
    io.write(IOWIN, &low.to_le_bytes());
}

fn read_rte_low(io: &mut IoApic, pin: u8) -> u32 {
    io.write(IOREGSEL, &u32::from(REG_REDTBL + 2 * pin).to_le_bytes());
    let mut b = [0u8; 4];
    io.read(IOWIN, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn level_interrupt_redelivered_after_eoi_while_high_not_after_it_drops() {
    let mut io = IoApic::new();
    let mut msi = MsiRecorder::new();
    // PCI INTx style: vector 0x61, level, physical destination APIC 1.
    rte(&mut io, 16, 0x61 | (1 << 15), 1 << 24);
    io.set_irq(16, true, &mut msi);
    assert_eq!(msi.count, 1);
    assert_eq!(msi.last, Some((0xFEE0_1000, 0x61 | (1 << 14) | (1 << 15))));
    assert_ne!(read_rte_low(&mut io, 16) & (1 << 14), 0, "remote IRR");

    // The handler has not silenced the device yet: EOI re-delivers.
    io.eoi(0x61, &mut msi);
    assert_eq!(msi.count, 2);
    io.eoi(0x61, &mut msi);
    assert_eq!(msi.count, 3);

    // The device deasserts; the last EOI delivers nothing.
    io.set_irq(16, false, &mut msi);
    io.eoi(0x61, &mut msi);
    assert_eq!(msi.count, 3);
    assert_eq!(read_rte_low(&mut io, 16) & (1 << 14), 0);

    // A fresh assertion delivers again.
    io.set_irq(16, true, &mut msi);
    assert_eq!(msi.count, 4);
}

#[test]
fn masked_pins_deliver_nothing_edge_or_level() {
    let mut io = IoApic::new();
    let mut msi = MsiRecorder::new();
    rte(&mut io, 3, 0x33 | (1 << 16), 0);
    rte(&mut io, 17, 0x71 | (1 << 15) | (1 << 16), 0);
    for _ in 0..10 {
        io.pulse_irq(3, &mut msi);
        io.set_irq(17, true, &mut msi);
        io.eoi(0x71, &mut msi);
    }
    assert_eq!(msi.count, 0);
    // Unmasking the still-asserted level pin delivers it once.
    rte(&mut io, 17, 0x71 | (1 << 15), 0);
    io.flush(&mut msi);
    assert_eq!(msi.count, 1);
    assert_eq!(msi.last.map(|(_, d)| d & 0xff), Some(0x71));
}

#[test]
fn sci_from_pm_timer_is_level_through_the_router() {
    assert_eq!(SCI_IRQ, 9, "bhyve's SCI_INT");
    let clock = ManualClock::new(0);
    let mut pm = PmTimer::new(&clock);
    let mut pic = PicPair::new();
    init_pair_standard(&mut pic, 0x20, 0x28);
    pic.write(PicRange::Elcr, 1, &[0x02]); // IRQ 9 level, as the SCI is
    let mut io = IoApic::new();
    rte(&mut io, 9, 0x59 | (1 << 15), 0);
    let mut msi = MsiRecorder::new();

    pm.set_timer_enable(true);
    let d = pm.next_deadline_ns().unwrap_or(u64::MAX);
    assert!(
        d > 500 * NS_PER_SEC && d < 700 * NS_PER_SEC,
        "bit 31 toggles after ~600 s"
    );
    clock.set(d);
    pm.poll(
        clock.get(),
        &mut IsaIrqRouter::new(&mut pic, &mut io, &mut msi),
    );
    assert_eq!(msi.count, 1);
    io.eoi(0x59, &mut msi);
    assert_eq!(msi.count, 2, "SCI still asserted: re-delivered");
    pm.clear_timer_status();
    pm.poll(
        clock.get(),
        &mut IsaIrqRouter::new(&mut pic, &mut io, &mut msi),
    );
    io.eoi(0x59, &mut msi);
    assert_eq!(msi.count, 2, "SCI dropped: no re-delivery");
    assert_eq!(
        pic.registers(true).0 & 0x02,
        0,
        "level IRQ 9 request dropped on the PIC too"
    );
}

#[test]
fn ioapic_version_and_unknown_registers() {
    let mut io = IoApic::new();
    io.write(IOREGSEL, &u32::from(REG_VER).to_le_bytes());
    let mut b = [0u8; 4];
    io.read(IOWIN, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x001f_0011, "32 pins, version 0x11");
}

#[test]
fn pic_extint_vector_and_spurious_irq7() {
    let mut pic = PicPair::new();
    // Linux init_8259A(): mask all, ICW1..ICW4 (vectors 0x30/0x38), restore masks.
    pic.write(PicRange::Master, 1, &[0xff]);
    pic.write(PicRange::Slave, 1, &[0xff]);
    pic.write(PicRange::Master, 0, &[0x11]);
    pic.write(PicRange::Master, 1, &[0x30]);
    pic.write(PicRange::Master, 1, &[0x04]);
    pic.write(PicRange::Master, 1, &[0x01]);
    pic.write(PicRange::Slave, 0, &[0x11]);
    pic.write(PicRange::Slave, 1, &[0x38]);
    pic.write(PicRange::Slave, 1, &[0x02]);
    pic.write(PicRange::Slave, 1, &[0x01]);
    pic.write(PicRange::Master, 1, &[0xfb]); // only the cascade unmasked
    pic.write(PicRange::Slave, 1, &[0xff]);

    pic.set_irq(1, true);
    assert!(!pic.intr_output(), "masked");
    pic.write(PicRange::Master, 1, &[0xf9]); // unmask IRQ 1
    assert!(pic.intr_output());
    assert_eq!(
        pic.pending_vector(),
        Some(0x31),
        "ExtINT vector = ICW2 base + IRQ"
    );
    pic.write(PicRange::Master, 0, &[0x61]); // specific EOI for IRQ 1
    pic.set_irq(1, false);

    // Slave IRQ 12 (mouse): vector 0x3c through the cascade.
    pic.write(PicRange::Slave, 1, &[0xef]);
    pic.set_irq(12, true);
    assert_eq!(pic.pending_vector(), Some(0x3c));
    pic.write(PicRange::Slave, 0, &[0x20]);
    pic.write(PicRange::Master, 0, &[0x20]);

    // Spurious IRQ 7: a level request that goes away before the acknowledge.
    pic.write(PicRange::Elcr, 0, &[0x20]); // IRQ 5 level
    pic.write(PicRange::Master, 1, &[0xd9]); // unmask IRQ 5
    pic.set_irq(5, true);
    assert!(pic.intr_output());
    pic.set_irq(5, false);
    assert_eq!(pic.interrupt_acknowledge(), 0x37);
    pic.write(PicRange::Master, 0, &[0x0b]); // OCW3: read ISR
    let mut isr = [0u8];
    pic.read(PicRange::Master, 0, &mut isr);
    assert_eq!(
        isr[0] & 0x80,
        0,
        "spurious IRQ 7 is not in service (the kernel checks this)"
    );
    assert_eq!(pic.spurious_count(), 1);
}

#[test]
fn pci_ids_through_cf8_cfc_and_all_ones_for_absent_functions() {
    let mut cfg: PciConfigIo<BuiltinPciFunction, 8> = match standard_config_io() {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let dword = |cfg: &mut PciConfigIo<BuiltinPciFunction, 8>, bdf: Bdf, reg: u8| {
        cfg.write(0, &config_address(bdf, reg).to_le_bytes());
        let mut b = [0u8; 4];
        cfg.read(4, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(dword(&mut cfg, HOST_BRIDGE_BDF, 0x00), 0x1275_1275);
    assert_eq!(dword(&mut cfg, HOST_BRIDGE_BDF, 0x08) >> 8, 0x06_0000);
    assert_eq!(dword(&mut cfg, LPC_BDF, 0x00), 0x7000_8086);
    assert_eq!(dword(&mut cfg, LPC_BDF, 0x08) >> 8, 0x06_0100);
    assert_eq!(
        dword(&mut cfg, LPC_BDF, 0x0c) >> 16 & 0xff,
        0,
        "header type 0"
    );

    // Bus scan: every other function on bus 0 and everything on bus 1 is absent.
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let Some(bdf) = Bdf::new(0, dev, func) else {
                continue;
            };
            let id = dword(&mut cfg, bdf, 0);
            if bdf == HOST_BRIDGE_BDF || bdf == LPC_BDF {
                assert_ne!(id, 0xffff_ffff);
            } else {
                assert_eq!(id, 0xffff_ffff, "{dev}.{func} should be absent");
            }
        }
    }
    let far = Bdf::new(1, 0, 0).unwrap_or(HOST_BRIDGE_BDF);
    assert_eq!(dword(&mut cfg, far, 0), 0xffff_ffff);

    // Byte and word reads at 0xCFC+n pick the right bytes.
    cfg.write(0, &config_address(LPC_BDF, 0x08).to_le_bytes());
    let mut b = [0u8; 1];
    cfg.read(7, &mut b);
    assert_eq!(b[0], 0x06, "class code at 0x0B via 0xCFF");
    let mut w = [0u8; 2];
    cfg.read(6, &mut w);
    assert_eq!(
        u16::from_le_bytes(w),
        0x0601,
        "class/subclass at 0x0A via 0xCFE"
    );
    cfg.write(0, &config_address(LPC_BDF, 0x00).to_le_bytes());
    cfg.read(6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x7000, "device ID at 0x02 via 0xCFE");

    // The decoder tells the runner which function a data access is for.
    cfg.write(
        0,
        &config_address(Bdf::new(0, 3, 0).unwrap_or(LPC_BDF), 0x10).to_le_bytes(),
    );
    assert_eq!(
        cfg.decode(0, 4),
        Some((Bdf::new(0, 3, 0).unwrap_or(LPC_BDF), 0x10))
    );
    assert!(!cfg.is_registered(Bdf::new(0, 3, 0).unwrap_or(LPC_BDF)));
}
