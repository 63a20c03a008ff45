//! PCI device models on bus 0: their configuration space next to the platform's host and LPC
//! bridges, their BAR regions on the bus, MSI-X through KVM irqfds and MSI routes ([`IrqfdMsi`]:
//! a completion writes an eventfd, no ioctl and no exit), and virtio notifies absorbed by KVM
//! ioeventfds (a queue notify never exits to userspace). The vectors' GSIs come from the VM's one
//! `vcpu_runner::GsiRoutes`, which merges them with the I/O APIC's level routes.
//!
//! BAR placement (fixed; the guest may read it and must not move it): BAR 0 of `0:SLOT.FUNC` is at
//! `0xC000_0000 + ((SLOT << 3) | FUNC) * 0x1_0000`, inside the PCI memory window the DSDT gives
//! the host bridge (0xC000_0000–0xDFFF_FFFF).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use stages::devices::pci::{Bdf, PciConfigSpace};
use stages::pc::PcPlatform;
use stages::{BusDevice, Space, Stage};
use vcpu_runner::{Devices, GsiRoutes, KvmHypervisor, Machine, Vm};
use virtio::options::{ConsoleTarget, DeviceSpec};
use virtio::transport::RegionKind;
use virtio::{
    BarRegion, Execution, IntxLine, MsiTrigger, PciConfigHandle, VirtioPciDevice, Wiring,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// How one function's MSI-X messages went out.
#[derive(Debug, Default)]
pub struct MsiDeliveryStats {
    /// Messages sent by writing the vector's irqfd (the completion path: no ioctl, no exit).
    pub irqfd: AtomicU64,
    /// Messages sent with `KVM_SIGNAL_MSI` (a vector that could not have an irqfd or route).
    pub signal_msi: AtomicU64,
    /// Route updates a delivery made (the entry's message had changed since the last one).
    pub route_updates: AtomicU64,
    /// Route updates or eventfd writes that failed (the message then went by `KVM_SIGNAL_MSI`).
    pub failures: AtomicU64,
}

/// One vector's irqfd: its GSI, the eventfd KVM listens on, the message its route holds.
struct VectorFd {
    gsi: u32,
    fd: EventFd,
    routed: Option<(u64, u32)>,
}

/// MSI-X through KVM irqfds: each table entry has a GSI (from the VM's one [`GsiRoutes`]) and an
/// eventfd bound to it with `KVM_IRQFD`. A delivery writes the eventfd; KVM injects the message of
/// the GSI's route without an exit. The route follows the table lazily: a delivery whose message
/// differs from the one routed installs it first, so a guest rewriting entries in a loop costs
/// nothing until the vector fires (and then one route update). Masking is the MSI-X state's
/// (`virtio::pci::Msix`): a masked vector never reaches this trigger, its pending bit is set
/// and it is delivered here on unmask. A vector without an irqfd falls back to
/// `KVM_SIGNAL_MSI`, counted.
pub struct IrqfdMsi<V: Vm> {
    vm: Arc<V>,
    routes: Arc<GsiRoutes>,
    vectors: Mutex<Vec<Option<VectorFd>>>,
    stats: Arc<MsiDeliveryStats>,
}

impl<V: Vm> std::fmt::Debug for IrqfdMsi<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqfdMsi")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<V: Vm> IrqfdMsi<V> {
    /// Binds `vectors` eventfds to fresh GSIs of `routes` (a vector that cannot have one is
    /// logged and will use `KVM_SIGNAL_MSI`).
    pub fn new(vm: Arc<V>, routes: Arc<GsiRoutes>, vectors: u16, what: &str) -> Self {
        let mut fds = Vec::with_capacity(usize::from(vectors));
        let mut failed = None;
        for _ in 0..vectors {
            let bound = (|| {
                let gsi = routes.allocate().map_err(|e| e.to_string())?;
                let fd = match EventFd::new(EFD_NONBLOCK) {
                    Ok(fd) => fd,
                    Err(e) => {
                        let _ = routes.release(gsi);
                        return Err(format!("eventfd: {e}"));
                    }
                };
                if let Err(e) = vm.register_irqfd(&fd, gsi) {
                    let _ = routes.release(gsi);
                    return Err(e.to_string());
                }
                Ok(VectorFd {
                    gsi,
                    fd,
                    routed: None,
                })
            })();
            match bound {
                Ok(v) => fds.push(Some(v)),
                Err(e) => {
                    failed.get_or_insert(e);
                    fds.push(None);
                }
            }
        }
        if let Some(e) = failed {
            eprintln!("bhyve: {what}: MSI-X vectors without irqfd use KVM_SIGNAL_MSI: {e}");
        }
        Self {
            vm,
            routes,
            vectors: Mutex::new(fds),
            stats: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<MsiDeliveryStats> {
        &self.stats
    }

    fn direct(&self, address: u64, data: u32) {
        MsiDeliveryStats::inc(&self.stats.signal_msi);
        // A failed injection has no guest-visible recovery; it is counted above.
        let _ = self.vm.signal_msi(address, data);
    }
}

impl MsiDeliveryStats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl<V: Vm> MsiTrigger for IrqfdMsi<V> {
    fn trigger(&self, vector: u16, address: u64, data: u32) {
        let mut vectors = lock(&self.vectors);
        let Some(Some(v)) = vectors.get_mut(usize::from(vector)) else {
            drop(vectors);
            self.direct(address, data);
            return;
        };
        if v.routed != Some((address, data)) {
            if self.routes.set_msi_route(v.gsi, address, data).is_err() {
                v.routed = None;
                drop(vectors);
                MsiDeliveryStats::inc(&self.stats.failures);
                self.direct(address, data);
                return;
            }
            v.routed = Some((address, data));
            MsiDeliveryStats::inc(&self.stats.route_updates);
        }
        if v.fd.write(1).is_ok() {
            MsiDeliveryStats::inc(&self.stats.irqfd);
        } else {
            drop(vectors);
            MsiDeliveryStats::inc(&self.stats.failures);
            self.direct(address, data);
        }
    }
}

impl<V: Vm> Drop for IrqfdMsi<V> {
    fn drop(&mut self) {
        for v in lock(&self.vectors).drain(..).flatten() {
            let _ = self.vm.unregister_irqfd(&v.fd, v.gsi);
            let _ = self.routes.release(v.gsi);
        }
    }
}

/// The PCI INTx lines into the platform's I/O APIC: each I/O APIC input is a wired OR of the
/// functions whose INTx pin the `_PRT` routes to it ([`loader::pci_intx_gsi`]), so one function
/// releasing a shared line does not drop another's assertion.
pub struct IntxLines {
    pc: Arc<PcPlatform>,
    asserted: Mutex<[u32; stages::pc::PC_LINES]>,
}

impl std::fmt::Debug for IntxLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxLines")
            .field("asserted", &*lock(&self.asserted))
            .finish()
    }
}

impl IntxLines {
    /// Lines into `pc`.
    pub fn new(pc: Arc<PcPlatform>) -> Arc<Self> {
        Arc::new(Self {
            pc,
            asserted: Mutex::new([0; stages::pc::PC_LINES]),
        })
    }

    /// One function's INTx pin on I/O APIC input `gsi`.
    pub fn pin(self: &Arc<Self>, gsi: u32) -> Arc<dyn IntxLine> {
        Arc::new(IntxPinLine {
            lines: self.clone(),
            gsi,
        })
    }
}

/// One function's INTx pin (level-triggered; the function's `IntxPin` reports changes only).
struct IntxPinLine {
    lines: Arc<IntxLines>,
    gsi: u32,
}

impl IntxLine for IntxPinLine {
    fn set_level(&self, asserted: bool) {
        let mut a = lock(&self.lines.asserted);
        let Some(n) = usize::try_from(self.gsi).ok().and_then(|i| a.get_mut(i)) else {
            return;
        };
        *n = if asserted {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        // Drive the I/O APIC with the line lock held, so two functions' changes reach it in the
        // order of their counts.
        self.lines.pc.set_irq(self.gsi, *n > 0);
    }
}

/// What the monitor keeps of each device model after set-up: its counters, for `stats.print`.
#[derive(Debug)]
pub struct PciModel {
    /// `slot.function`.
    pub at: String,
    /// The device model's name ("virtio-blk").
    pub name: &'static str,
    /// Its MSI-X delivery counters.
    pub msi: Arc<MsiDeliveryStats>,
    /// Its virtio counters.
    pub virtio: Arc<virtio::log::VirtioStats>,
}

/// Builds every `-s` device model, places its BAR, registers its regions and config space.
pub fn add_devices(
    vm_name: &str,
    list: &[PciDevice],
    machine: &Machine<KvmHypervisor>,
    devices: &mut Devices,
    extra: &ExtraFunctions,
    routes: &Arc<GsiRoutes>,
    intx: &Arc<IntxLines>,
) -> Result<Vec<PciModel>, String> {
    let mut models = Vec::new();
    for d in list {
        let what = format!("-s {}:{}", d.slot, d.function);
        for i in &d.ignored {
            eprintln!("bhyve: {what}: ignored: {i}");
        }
        let model: Box<dyn virtio::VirtioDevice> = match &d.spec {
            DeviceSpec::Block(o) => {
                let mut b =
                    virtio::blk::Block::open(o).map_err(|e| format!("{what}: virtio-blk: {e}"))?;
                b.set_io_threads(virtio::blk::DEFAULT_IO_THREADS);
                Box::new(b)
            }
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
        let vectors = virtio::transport::msix_vectors(model.as_ref());
        let msi = Arc::new(IrqfdMsi::new(
            machine.vm().clone(),
            routes.clone(),
            vectors,
            &what,
        ));
        let name = model.name();
        let msi_stats = msi.stats().clone();
        // INTx (the fallback while MSI-X is off): INTA of the slot, where the _PRT routes it.
        let gsi = loader::pci_intx_gsi(d.slot, 0);
        let wiring = Wiring {
            msi,
            intx: Some(intx.pin(gsi)),
            execution: Execution::Worker,
            name: format!("{vm_name}-{}.{}", d.slot, d.function),
        };
        let mut dev = VirtioPciDevice::new(model, machine.memory().clone(), wiring)
            .map_err(|e| format!("{what}: {e}"))?;
        dev.set_interrupt_line(u8::try_from(gsi).unwrap_or(0xff));
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
        models.push(PciModel {
            at: format!("{}.{}", d.slot, d.function),
            name,
            msi: msi_stats,
            virtio: lock(&shared).stats().clone(),
        });
        lock(extra).push((bdf, Box::new(PciConfigHandle(shared))));
    }
    Ok(models)
}
