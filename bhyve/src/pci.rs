//! PCI device models on bus 0: their configuration space next to the platform's host and LPC
//! bridges, their BAR regions on the bus, MSI-X through KVM, and virtio notifies absorbed by KVM
//! ioeventfds (a queue notify never exits to userspace).
//!
//! BAR placement (fixed; the guest may read it and must not move it): BAR 0 of `0:SLOT.FUNC` is at
//! `0xC000_0000 + ((SLOT << 3) | FUNC) * 0x1_0000`, inside the PCI memory window the DSDT gives
//! the host bridge (0xC000_0000–0xDFFF_FFFF).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use stages::devices::pci::{Bdf, PciConfigSpace};
use stages::{BusDevice, Space, Stage};
use vcpu_runner::{Devices, KvmHypervisor, Machine, Vm};
use virtio::options::{ConsoleTarget, DeviceSpec};
use virtio::transport::RegionKind;
use virtio::{BarRegion, Execution, MsiTrigger, PciConfigHandle, VirtioPciDevice, Wiring};

use crate::opts::PciDevice;

/// Base of the BAR window for device models.
pub const BAR_WINDOW: u64 = 0xC000_0000;
/// Room per PCI function.
pub const BAR_STRIDE: u64 = 0x1_0000;

/// BAR 0 address of `0:slot.function`.
pub fn bar0(slot: u8, function: u8) -> u64 {
    BAR_WINDOW + ((u64::from(slot) << 3) | u64::from(function)) * BAR_STRIDE
}

/// Functions reached through the configuration mechanism besides the platform's bridges.
pub type ExtraFunctions = Arc<Mutex<Vec<(Bdf, Box<dyn PciConfigSpace + Send>)>>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The platform's CONFIG_ADDRESS (0xCF8) adapter, with a shadow of the register for the mux.
pub struct AddressShadow {
    /// The platform's adapter.
    pub inner: Arc<Mutex<dyn BusDevice>>,
    /// The last dword written.
    pub shadow: Arc<AtomicU32>,
}

impl BusDevice for AddressShadow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.inner).read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.shadow.store(u32::from_le_bytes(b), Ordering::Release);
            }
        }
        lock(&self.inner).write(offset, data);
    }
}

/// The platform's CONFIG_DATA (0xCFC–0xCFF) adapter, sending accesses to our functions' config
/// spaces and everything else to the platform.
pub struct DataMux {
    /// The platform's adapter.
    pub inner: Arc<Mutex<dyn BusDevice>>,
    /// The CONFIG_ADDRESS shadow.
    pub shadow: Arc<AtomicU32>,
    /// Our functions.
    pub extra: ExtraFunctions,
}

impl DataMux {
    /// The function and register an access at data-port `offset` reaches, if it is one of ours.
    fn target(&self, offset: u64) -> Option<(usize, Bdf, u16)> {
        let a = self.shadow.load(Ordering::Acquire);
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let dev = u8::try_from((a >> 11) & 0x1f).ok()?;
        let func = u8::try_from((a >> 8) & 0x7).ok()?;
        let bdf = Bdf::new(0, dev, func)?;
        let reg = u16::try_from((a & 0xfc) as u64 + (offset & 3)).ok()?;
        let extra = lock(&self.extra);
        let i = extra.iter().position(|(b, _)| *b == bdf)?;
        Some((i, bdf, reg))
    }
}

impl BusDevice for DataMux {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((i, bdf, reg)) => {
                if let Some((_, f)) = lock(&self.extra).get_mut(i) {
                    f.config_read(bdf, reg, data);
                }
            }
            None => lock(&self.inner).read(offset, data),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        match self.target(offset) {
            Some((i, bdf, reg)) => {
                if let Some((_, f)) = lock(&self.extra).get_mut(i) {
                    f.config_write(bdf, reg, data);
                }
            }
            None => lock(&self.inner).write(offset, data),
        }
    }
}

/// MSI-X messages of device models, injected through KVM (no vCPU exit on the completion path).
struct KvmMsi(Arc<<KvmHypervisor as vcpu_runner::Hypervisor>::Vm>);

impl MsiTrigger for KvmMsi {
    fn trigger(&self, addr: u64, data: u32) {
        // A failed injection has no guest-visible recovery; the transport counts what it sends.
        let _ = self.0.signal_msi(addr, data);
    }
}

/// Builds every `-s` device model, places its BAR, registers its regions and config space.
pub fn add_devices(
    vm_name: &str,
    list: &[PciDevice],
    machine: &Machine<KvmHypervisor>,
    devices: &mut Devices,
    extra: &ExtraFunctions,
) -> Result<(), String> {
    for d in list {
        let what = format!("-s {}:{}", d.slot, d.function);
        for i in &d.ignored {
            eprintln!("bhyve: {what}: ignored: {i}");
        }
        let model: Box<dyn virtio::VirtioDevice> = match &d.spec {
            DeviceSpec::Block(o) => Box::new(
                virtio::blk::Block::open(o).map_err(|e| format!("{what}: virtio-blk: {e}"))?,
            ),
            DeviceSpec::Net(o) => {
                let tap = virtio::net::Tap::open(&o.tap)
                    .map_err(|e| format!("{what}: virtio-net: tap {}: {e}", o.tap))?;
                let mac = o
                    .mac
                    .unwrap_or_else(|| virtio::net::default_mac(vm_name, d.slot, d.function));
                Box::new(virtio::net::Net::new(Box::new(tap), mac, o.mtu))
            }
            DeviceSpec::Console(t) => {
                let backend: Box<dyn virtio::console::ConsoleBackend> = match t {
                    ConsoleTarget::Stdio => Box::new(virtio::console::StdioBackend),
                    ConsoleTarget::File(p) => Box::new(
                        virtio::console::FileBackend::open(p)
                            .map_err(|e| format!("{what}: virtio-console: {}: {e}", p.display()))?,
                    ),
                    ConsoleTarget::Unix(p) => Box::new(
                        virtio::console::UnixBackend::bind(p)
                            .map_err(|e| format!("{what}: virtio-console: {}: {e}", p.display()))?,
                    ),
                };
                Box::new(virtio::console::Console::new(backend))
            }
            DeviceSpec::Rng => Box::new(virtio::rng::Rng::new()),
        };
        let wiring = Wiring {
            msi: Arc::new(KvmMsi(machine.vm().clone())),
            intx: None,
            execution: Execution::Worker,
            name: format!("{vm_name}-{}.{}", d.slot, d.function),
        };
        let mut dev = VirtioPciDevice::new(model, machine.memory().clone(), wiring)
            .map_err(|e| format!("{what}: {e}"))?;
        let base = bar0(d.slot, d.function);
        dev.set_bar_address(0, base)
            .map_err(|e| format!("{what}: BAR 0 at {base:#x}: {e}"))?;
        let regions = dev.regions();
        // The notify eventfds, one per queue, absorbed by KVM.
        let mut notify = Vec::new();
        for q in 0..u16::MAX {
            let Some(fd) = dev.notify_eventfd(q) else {
                break;
            };
            notify.push(
                fd.try_clone()
                    .map_err(|e| format!("{what}: eventfd: {e}"))?,
            );
        }
        let shared = Arc::new(Mutex::new(dev));
        for r in regions {
            let addr = base + r.offset;
            let name = format!("virtio-{}.{}-{:?}", d.slot, d.function, r.kind);
            // Registers run as ordered slow stages: their writes take effect before the vCPU's
            // next access, including a notify that KVM absorbs. Notify writes are posted.
            let stage = match r.kind {
                RegionKind::Notify => Stage::Slow,
                _ => Stage::SlowOrdered,
            };
            devices
                .add(
                    &name,
                    Space::Mmio,
                    addr,
                    r.len,
                    stage,
                    Arc::new(Mutex::new(BarRegion::new(shared.clone(), r.bar, r.offset))),
                )
                .map_err(|e| e.to_string())?;
            if r.kind == RegionKind::Notify {
                for (q, fd) in notify.iter().enumerate() {
                    let at = addr + 4 * u64::try_from(q).unwrap_or(0);
                    machine
                        .vm()
                        .register_ioeventfd(at, fd)
                        .map_err(|e| format!("{what}: notify of queue {q}: {e}"))?;
                }
            }
        }
        let bdf =
            Bdf::new(0, d.slot, d.function).ok_or_else(|| format!("{what}: not a PCI address"))?;
        lock(extra).push((bdf, Box::new(PciConfigHandle(shared))));
    }
    Ok(())
}
