//! Interrupt routing of the platform: level-triggered re-delivery at EOI, masking, the KVM route
//! mirror, device-model lines, the PIC path, PCI configuration through the port adapters, and
//! concurrent use from several threads (no privileges, no /dev/kvm).

#[path = "pc_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{platform, TestBus, Timers};
use stages::devices::pci::{config_address, HOST_BRIDGE_BDF, LPC_BDF};
use stages::pc::{MsiRoute, IOAPIC_ID};
use stages::{EoiSink, Space};

const LEVEL: u32 = 1 << 15;
const MASKED: u32 = 1 << 16;

#[test]
fn level_triggered_sci_is_redelivered_after_eoi_while_the_line_stays_high() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    bus.ioapic_rte(9, 0x49 | LEVEL, 0);
    pc.set_irq(9, true);
    assert_eq!(log.count(0x49), 1);
    assert_ne!(bus.ioapic_rte_low(9) & (1 << 14), 0, "remote IRR set");
    pc.set_irq(9, true);
    assert_eq!(log.count(0x49), 1, "no delivery while remote IRR is set");
    for n in 2..=5 {
        pc.eoi(0x49);
        assert_eq!(log.count(0x49), n, "re-delivered at EOI while high");
    }
    pc.eoi(0x77);
    assert_eq!(log.count(0x49), 5, "another vector's EOI does nothing");
    pc.set_irq(9, false);
    pc.eoi(0x49);
    assert_eq!(log.count(0x49), 5, "line low: nothing at EOI");
    assert_eq!(bus.ioapic_rte_low(9) & (1 << 14), 0, "remote IRR clear");
    assert_eq!(pc.stats().eois.load(Ordering::Relaxed), 6);
    // The level-trigger bits are in the message (KVM sets the TMR from them).
    assert_eq!(
        pc.ioapic_message(9).map(|m| m.data),
        Some(0x49 | (1 << 14) | (1 << 15))
    );
}

#[test]
fn a_masked_pin_delivers_nothing_and_unmasking_an_asserted_level_pin_delivers_once() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    bus.ioapic_rte(9, 0x49 | LEVEL | MASKED, 0);
    bus.ioapic_rte(4, 0x44 | MASKED, 0);
    pc.set_irq(9, true);
    for _ in 0..10 {
        pc.pulse_irq(4);
    }
    pc.eoi(0x49);
    assert_eq!(log.total(), 0);
    assert_eq!(pc.ioapic_message(9), None);
    // Unmasking the asserted level pin delivers at the write (the adapter flushes).
    bus.ioapic_rte(9, 0x49 | LEVEL, 0);
    assert_eq!(log.count(0x49), 1);
    // A masked edge is lost for good.
    bus.ioapic_rte(4, 0x44, 0);
    assert_eq!(log.count(0x44), 0);
    pc.pulse_irq(4);
    assert_eq!(log.count(0x44), 1);
}

#[test]
fn level_entries_are_mirrored_to_the_route_sink_only_when_they_change() {
    let (pc, _, _) = platform(2);
    let bus = TestBus::new(&pc);
    let tables: Arc<Mutex<Vec<Vec<MsiRoute>>>> = Arc::default();
    let t = tables.clone();
    pc.set_route_sink(Arc::new(move |routes: &[MsiRoute]| {
        t.lock().unwrap().push(routes.to_vec());
        Ok(())
    }));
    assert_eq!(tables.lock().unwrap().as_slice(), &[Vec::<MsiRoute>::new()]);
    // Edge entries need no route.
    bus.ioapic_rte(2, 0x30, 0);
    bus.ioapic_rte(4, 0x34, 1);
    assert_eq!(tables.lock().unwrap().len(), 1);
    bus.ioapic_rte(9, 0x49 | LEVEL, 1);
    let last = tables.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last,
        vec![MsiRoute {
            gsi: 9,
            address: 0xFEE0_1000,
            data: 0x49 | (1 << 14) | (1 << 15)
        }]
    );
    // Masking keeps the route (an EOI may still be owed); re-writing the same entry changes
    // nothing.
    let n = tables.lock().unwrap().len();
    bus.ioapic_rte(9, 0x49 | LEVEL | MASKED, 1);
    bus.ioapic_rte(9, 0x49 | LEVEL, 1);
    assert_eq!(tables.lock().unwrap().len(), n);
    // A new vector does.
    bus.ioapic_rte(9, 0x4a | LEVEL, 1);
    assert_eq!(tables.lock().unwrap().len(), n + 1);
    assert_eq!(pc.stats().route_updates.load(Ordering::Relaxed), 3);
}

#[test]
fn a_refused_route_table_is_counted() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    pc.set_route_sink(Arc::new(|_: &[MsiRoute]| Err("no".to_string())));
    bus.ioapic_rte(10, 0x4b | LEVEL, 0);
    assert_eq!(pc.stats().route_errors.load(Ordering::Relaxed), 2);
    // Delivery does not depend on it.
    pc.set_irq(10, true);
    assert_eq!(log.count(0x4b), 1);
}

#[test]
fn uart_lines_pulse_their_isa_irq() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    bus.ioapic_rte(4, 0x24, 0);
    bus.ioapic_rte(3, 0x23, 0);
    let com1 = pc.isa_line(4);
    let com2 = pc.isa_line(3);
    for _ in 0..3 {
        com1.pulse();
    }
    com2.pulse();
    assert_eq!((log.count(0x24), log.count(0x23)), (3, 1));
    // A line the platform does not have is dropped and counted.
    pc.isa_line(77).pulse();
    pc.set_irq(32, true);
    assert_eq!(pc.stats().lines_ignored.load(Ordering::Relaxed), 2);
    assert_eq!(log.total(), 4);
}

#[test]
fn the_pic_pair_sees_the_pit_through_its_ports() {
    let (pc, _, _) = platform(1);
    let bus = TestBus::new(&pc);
    // ICW1..ICW4 on both chips, vectors 0x20 and 0x28; unmask IRQ 0 only.
    bus.outb(0x20, 0x11);
    for v in [0x20, 0x04, 0x01] {
        bus.outb(0x21, v);
    }
    bus.outb(0xA0, 0x11);
    for v in [0x28, 0x02, 0x01] {
        bus.outb(0xA1, v);
    }
    bus.outb(0x21, 0xFE);
    assert_eq!(bus.inb(0x21), 0xFE);
    assert!(!pc.pic_output());
    let _timers = Timers::start(&pc);
    bus.pit_program(2, 1193); // 1 kHz
    std::thread::sleep(Duration::from_millis(20));
    assert!(pc.pic_output());
    assert_eq!(pc.pic_acknowledge(), Some(0x20));
    bus.outb(0x20, 0x20); // non-specific EOI

    // ELCR: IRQ 0–2 stay edge, IRQ 9 may be level.
    bus.outb(0x4D0, 0xFF);
    bus.outb(0x4D1, 0x02);
    assert_eq!(bus.inb(0x4D0), 0xF8);
    assert_eq!(bus.inb(0x4D1), 0x02);
}

#[test]
fn pci_configuration_mechanism_1_through_two_port_ranges() {
    let (pc, _, _) = platform(1);
    let bus = TestBus::new(&pc);
    assert!(
        !bus.claimed(Space::Pio, 0xCF9),
        "0xCF9 is the reset register's"
    );
    let id = |bdf| {
        bus.outl(0xCF8, config_address(bdf, 0));
        bus.inl(0xCFC)
    };
    assert_eq!(id(HOST_BRIDGE_BDF), 0x1275_1275);
    assert_eq!(id(LPC_BDF), 0x7000_8086);
    assert_eq!(bus.inl(0xCF8), config_address(LPC_BDF, 0));
    // Byte and word reads at their offsets within the data port.
    bus.outl(0xCF8, config_address(LPC_BDF, 0x08));
    let class = bus.read(Space::Pio, 0xCFE, 2);
    assert_eq!(class, 0x0601, "ISA bridge");
    assert_eq!(bus.read(Space::Pio, 0xCFF, 1), 0x06);
    // An absent function reads all-ones.
    bus.outl(
        0xCF8,
        config_address(stages::devices::pci::Bdf::new(0, 5, 0).unwrap(), 0),
    );
    assert_eq!(bus.inl(0xCFC), u32::MAX);
    // A byte access to the address port is not CONFIG_ADDRESS.
    assert_eq!(bus.inb(0xCF8), 0xFF);
    assert_eq!(IOAPIC_ID, 0);
    // Interrupt line is writable on the LPC bridge, read-only fields are not.
    bus.outl(0xCF8, config_address(LPC_BDF, 0x3C));
    bus.outb(0xCFC, 0x0B);
    assert_eq!(bus.inb(0xCFC), 0x0B);
    bus.outl(0xCF8, config_address(LPC_BDF, 0));
    bus.outl(0xCFC, 0);
    assert_eq!(bus.inl(0xCFC), 0x7000_8086);
}

#[test]
fn every_window_is_registered_once_at_its_address() {
    let (pc, _, _) = platform(1);
    let bus = TestBus::new(&pc);
    let names = bus.names();
    for n in [
        "ioapic",
        "hpet",
        "pic-master",
        "pic-slave",
        "elcr",
        "pit",
        "port61",
        "rtc",
        "pmtimer",
        "pci-address",
        "pci-data",
    ] {
        assert_eq!(names.iter().filter(|x| *x == n).count(), 1, "{n}");
    }
    for (space, addr) in [
        (Space::Mmio, 0xFEC0_0FFF),
        (Space::Mmio, 0xFED0_03FF),
        (Space::Pio, 0x21),
        (Space::Pio, 0xA1),
        (Space::Pio, 0x4D1),
        (Space::Pio, 0x43),
        (Space::Pio, 0x61),
        (Space::Pio, 0x71),
        (Space::Pio, 0x40B),
        (Space::Pio, 0xCFF),
    ] {
        assert!(bus.claimed(space, addr), "{space} {addr:#x}");
    }
    for (space, addr) in [
        (Space::Mmio, 0xFED0_0400),
        (Space::Mmio, 0xFEE0_0000),
        (Space::Pio, 0x44),
        (Space::Pio, 0x72),
        (Space::Pio, 0x400),
    ] {
        assert!(!bus.claimed(space, addr), "{space} {addr:#x}");
    }
    // The I/O APIC answers with our ID and 32 pins.
    bus.mmio_write32(0xFEC0_0000, 1);
    assert_eq!(bus.mmio_read32(0xFEC0_0010), 0x001f_0011);
    bus.mmio_write32(0xFEC0_0000, 0);
    assert_eq!(bus.mmio_read32(0xFEC0_0010) >> 24, u32::from(IOAPIC_ID));
}

#[test]
fn concurrent_sources_and_eois_lose_nothing() {
    let (pc, log, _) = platform(4);
    let bus = TestBus::new(&pc);
    bus.ioapic_rte(5, 0x55, 0);
    bus.ioapic_rte(6, 0x56, 1);
    bus.ioapic_rte(11, 0x5b | LEVEL, 0);
    let _timers = Timers::start(&pc);
    bus.pit_program(2, 1193);
    bus.ioapic_rte(2, 0x30, 0);
    const N: u64 = 20_000;
    std::thread::scope(|s| {
        for line in [5u32, 6] {
            let pc = pc.clone();
            s.spawn(move || {
                for _ in 0..N {
                    pc.pulse_irq(line);
                }
            });
        }
        // A level line held high while another thread EOIs it: one delivery per EOI.
        let pc2 = pc.clone();
        s.spawn(move || {
            pc2.set_irq(11, true);
            for _ in 0..N {
                pc2.eoi(0x5b);
            }
            pc2.set_irq(11, false);
            pc2.eoi(0x5b);
        });
    });
    assert_eq!(log.count(0x55), N);
    assert_eq!(log.count(0x56), N);
    assert_eq!(log.count(0x5b), N + 1);
    assert!(log.count(0x30) > 0, "the timer thread ran meanwhile");
}

#[test]
fn the_rtc_is_a_level_source_that_reading_register_c_drops() {
    let (pc, log, _) = platform(1);
    let bus = TestBus::new(&pc);
    let _timers = Timers::start(&pc);
    bus.ioapic_rte(8, 0x48 | LEVEL, 0);
    bus.rtc_write(0x0A, 0x2F); // 2 Hz
    bus.rtc_write(0x0B, 0x42); // PIE
    let t0 = std::time::Instant::now();
    while log.count(0x48) == 0 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(log.count(0x48), 1);
    // What the guest's handler does: EOI with the line high four times, then drop it.
    for n in 1..=4 {
        pc.eoi(0x48);
        assert_eq!(log.count(0x48), n + 1);
    }
    assert_eq!(bus.rtc_read(0x0C) & 0xC0, 0xC0);
    bus.rtc_write(0x0B, 0x02);
    pc.eoi(0x48);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(log.count(0x48), 5);
}
