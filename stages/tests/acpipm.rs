//! The ACPI PM1 block and reset register on the real bus, at the ports the FADT gives them, driven
//! by port accesses as an OS makes them.

use std::sync::{Arc, Mutex};

use stages::acpipm::{
    pm1, Pm1, ResetControl, PM1_LEN, PM1_PORT, RESET_CONTROL_LEN, RESET_CONTROL_PORT, S5_SLP_TYP,
};
use stages::bus::fill_unclaimed;
use stages::{Bus, BusDevice, DeviceId, Space, Stage, VmRequest, VmRequests};

/// A bus with the PM1 block, the reset register, and placeholders where the PM timer and the PCI
/// configuration ports sit beside them.
struct Platform {
    bus: Bus,
    devices: Vec<Box<dyn BusDevice>>,
    requests: Arc<VmRequests>,
    /// The PM1 block, shared between the bus and the host's power button.
    pm: Arc<Mutex<Pm1>>,
}

/// How the runner can share the PM1 block between the bus and the host side.
struct Shared(Arc<Mutex<Pm1>>);

impl BusDevice for Shared {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().write(offset, data);
    }
}

/// A device that claims its ports and answers nothing.
struct Placeholder;

impl BusDevice for Placeholder {
    fn read(&mut self, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, _: &[u8]) {}
}

impl Platform {
    fn new() -> Self {
        let requests = Arc::new(VmRequests::new());
        let pm = Arc::new(Mutex::new(Pm1::new(requests.clone())));
        let mut bus = Bus::new();
        let devices: Vec<Box<dyn BusDevice>> = vec![
            Box::new(Shared(pm.clone())),
            Box::new(ResetControl::new(requests.clone())),
            Box::new(Placeholder),
            Box::new(Placeholder),
            Box::new(Placeholder),
        ];
        let ranges = [
            (PM1_PORT, PM1_LEN),
            (RESET_CONTROL_PORT, RESET_CONTROL_LEN),
            (0x408, 4), // PM timer
            (0xcf8, 1), // PCI CONFIG_ADDRESS, decoded byte by byte around 0xCF9
            (0xcfc, 4), // PCI CONFIG_DATA
        ];
        for (i, (base, len)) in ranges.into_iter().enumerate() {
            bus.insert(Space::Pio, base, len, DeviceId(i as u16), Stage::Fast)
                .unwrap_or_else(|e| panic!("{base:#x}+{len}: {e:?}"));
        }
        Platform {
            bus,
            devices,
            requests,
            pm,
        }
    }

    fn out(&mut self, port: u64, data: &[u8]) {
        let r = self.bus.route(Space::Pio, port).expect("claimed port");
        self.devices[usize::from(r.device.0)].write(r.offset, data);
    }

    fn inw(&mut self, port: u64) -> u16 {
        let mut d = [0u8; 2];
        fill_unclaimed(&mut d);
        let r = self.bus.route(Space::Pio, port).expect("claimed port");
        self.devices[usize::from(r.device.0)].read(r.offset, &mut d);
        u16::from_le_bytes(d)
    }
}

#[test]
fn acpica_s5_sequence_powers_off() {
    let mut p = Platform::new();
    // acpi_hw_legacy_sleep: clear WAK_STS, write SLP_TYP, then SLP_TYP | SLP_EN.
    p.out(PM1_PORT, &pm1::WAK_STS.to_le_bytes());
    let cnt = p.inw(0x404) & !(pm1::SLP_TYP | pm1::SLP_EN);
    assert_ne!(cnt & pm1::SCI_EN, 0, "ACPI mode");
    p.out(0x404, &(cnt | S5_SLP_TYP << 10).to_le_bytes());
    assert_eq!(p.requests.pending(), None);
    p.out(0x404, &(cnt | S5_SLP_TYP << 10 | pm1::SLP_EN).to_le_bytes());
    assert_eq!(p.requests.pending(), Some(VmRequest::PowerOff));
}

#[test]
fn acpi_reset_register_resets() {
    let mut p = Platform::new();
    p.out(RESET_CONTROL_PORT, &[0x06]);
    assert_eq!(p.requests.pending(), Some(VmRequest::Reset));
}

#[test]
fn pci_reboot_sequence_resets_on_its_second_write() {
    // Linux reboot=pci: cf9 = inb(0xcf9) & ~6; outb(cf9 | 2); outb(cf9 | 6).
    let mut p = Platform::new();
    let cf9 = (p.inw(RESET_CONTROL_PORT) as u8) & !6;
    p.out(RESET_CONTROL_PORT, &[cf9 | 2]);
    assert_eq!(p.requests.pending(), None);
    p.out(RESET_CONTROL_PORT, &[cf9 | 6]);
    assert_eq!(p.requests.pending(), Some(VmRequest::Reset));
}

#[test]
fn power_button_event_round_trip() {
    let mut p = Platform::new();
    assert!(
        !p.pm.lock().unwrap().power_button(),
        "not enabled yet: no SCI"
    );
    p.out(PM1_PORT, &pm1::PWRBTN_STS.to_le_bytes());
    // The guest's ACPI driver enables the power button event.
    p.out(PM1_PORT + 2, &pm1::PWRBTN_EN.to_le_bytes());
    // The host presses the button: the SCI must be raised.
    assert!(p.pm.lock().unwrap().power_button());
    // The guest's SCI handler reads PM1_STS, sees the button, writes the bit back to clear it.
    let sts = p.inw(PM1_PORT);
    assert_eq!(sts, pm1::PWRBTN_STS);
    p.out(PM1_PORT, &sts.to_le_bytes());
    assert!(!p.pm.lock().unwrap().sci_level(), "the SCI drops");
    assert_eq!(p.inw(PM1_PORT), 0);
    assert_eq!(p.inw(PM1_PORT + 2), pm1::PWRBTN_EN);
}
