//! PCI device models on bus 0: their configuration space next to the platform's host and LPC
//! bridges, their BAR regions on the bus, MSI-X through KVM irqfds and MSI routes ([`IrqfdMsi`]:
//! a completion writes an eventfd, no ioctl and no exit), and virtio notifies absorbed by KVM
//! ioeventfds (a queue notify never exits to userspace). The vectors' GSIs come from the VM's one
//! `vcpu_runner::GsiRoutes`, which merges them with the I/O APIC's level routes.
//!
//! BAR placement: the platform places BAR 0 of `0:SLOT.FUNC` at
//! `0xC000_0000 + ((SLOT << 3) | FUNC) * 0x1_0000`, inside the PCI memory window the DSDT gives
//! the host bridge (0xC000_0000–0xDFFF_FFFF). The whole window is one set of ordered slow-stage
//! bus ranges ([`PciMmio`]) that routes each access to the BAR decoding it *now*: a guest that
//! turns memory decode on or off or moves a BAR is followed after the configuration write, notify
//! ioeventfds included; a placement outside the window or over another BAR is refused with a log
//! line (that BAR does not decode).
//!
//! INTx: INTA of each slot is wired to I/O APIC input `loader::pci_intx_gsi(slot, 0)` (the DSDT's
//! `_PRT` says so, and the interrupt line register holds it); it is asserted while MSI-X is off
//! and the device has an interrupt to report, and deasserted when the guest reads the ISR.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use stages::devices::pci::{Bdf, PciConfigSpace};
use stages::pc::PcPlatform;
use stages::{BusDevice, Space, Stage};
use vcpu_runner::{Devices, GsiRoutes, KvmHypervisor, Machine, Vm};
use virtio::options::{ConsoleTarget, DeviceSpec};
use virtio::transport::SharedDevice;
use virtio::{Execution, IntxLine, MsiTrigger, VirtioPciDevice, Wiring};
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

/// Where a decoder binds and unbinds the notify ioeventfds (KVM's `KVM_IOEVENTFD`; a fake in the
/// tests).
pub trait NotifyFds: Send + Sync {
    /// Guest writes to MMIO `addr` signal `fd` inside the hypervisor.
    fn bind(&self, addr: u64, fd: &EventFd) -> Result<(), String>;
    /// Undoes [`NotifyFds::bind`].
    fn unbind(&self, addr: u64, fd: &EventFd) -> Result<(), String>;
}

/// [`NotifyFds`] of a VM.
pub struct VmNotifyFds<V: Vm>(pub Arc<V>);

impl<V: Vm> NotifyFds for VmNotifyFds<V> {
    fn bind(&self, addr: u64, fd: &EventFd) -> Result<(), String> {
        self.0
            .register_ioeventfd(addr, fd)
            .map_err(|e| e.to_string())
    }
    fn unbind(&self, addr: u64, fd: &EventFd) -> Result<(), String> {
        self.0
            .unregister_ioeventfd(addr, fd)
            .map_err(|e| e.to_string())
    }
}

/// One function as the decoder sees it.
struct Decoded {
    at: String,
    dev: SharedDevice,
    /// Queue notify eventfds (bound at BAR 0 + NOTIFY_OFFSET + 4·q while BAR 0 decodes).
    notify: Vec<EventFd>,
    /// Memory BARs decoding now: (BAR, base, length).
    windows: Vec<(u8, u64, u64)>,
    /// Where the notify eventfds are bound (the notify region's base).
    bound: Option<u64>,
}

/// Counters of the decoder.
#[derive(Debug, Default)]
pub struct PciMmioStats {
    /// Changes of where a function's BARs decode that were followed (decode on or off, a move).
    pub moves: AtomicU64,
    /// BAR placements refused (outside the window, over a reserved range or another BAR).
    pub refused: AtomicU64,
    /// Accesses in the window that no BAR decodes (all-ones, dropped).
    pub unclaimed: AtomicU64,
    /// Notify ioeventfds bound, and unbound.
    pub binds: AtomicU64,
    /// Notify ioeventfds unbound.
    pub unbinds: AtomicU64,
}

/// The PCI memory window of the device models' BARs: the bus range(s) of the DSDT's 32-bit window
/// forward every access here, and this finds the function whose BAR decodes that address *now*.
/// A guest that moves a BAR (or turns memory decode off and on) is followed after each
/// configuration write: the BAR decodes at its new address and the notify ioeventfds move with
/// BAR 0. A placement outside the window, over a reserved range or over another function's BAR is
/// refused with a (rate-limited) log line: that BAR does not decode until the guest places it
/// somewhere free. State per function is fixed-size whatever the guest does (its BARs, its
/// notify eventfds), and every binding is undone before another is made.
pub struct PciMmio {
    start: u64,
    end: u64,
    reserved: Vec<(u64, u64)>,
    fds: Arc<dyn NotifyFds>,
    functions: Mutex<Vec<Decoded>>,
    limit: Mutex<stages::ratelimit::RateLimit>,
    /// Counters.
    pub stats: PciMmioStats,
}

impl std::fmt::Debug for PciMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciMmio")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PciMmio {
    /// A window `start..end`, minus the `reserved` (base, length) ranges other devices own.
    pub fn new(start: u64, end: u64, reserved: Vec<(u64, u64)>, fds: Arc<dyn NotifyFds>) -> Self {
        Self {
            start,
            end,
            reserved,
            fds,
            functions: Mutex::new(Vec::new()),
            limit: Mutex::new(stages::ratelimit::RateLimit::new(
                10,
                std::time::Duration::from_secs(1),
            )),
            stats: PciMmioStats::default(),
        }
    }

    /// The bus ranges to register: the window around the reserved ranges.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = self.start;
        let mut reserved = self.reserved.clone();
        reserved.sort_unstable();
        for (b, l) in reserved {
            if b > at {
                out.push((at, b - at));
            }
            at = at.max(b.saturating_add(l));
        }
        if at < self.end {
            out.push((at, self.end - at));
        }
        out
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = lock(&self.limit).check(std::time::Instant::now()) {
            if suppressed > 0 {
                eprintln!("bhyve: {msg} ({suppressed} similar messages suppressed)");
            } else {
                eprintln!("bhyve: {msg}");
            }
        }
    }

    /// Adds function `dev` (named `at` in logs) with its queues' notify eventfds, decoding where
    /// its BARs say now; returns its index for [`PciMmio::sync`].
    pub fn add(&self, at: String, dev: SharedDevice, notify: Vec<EventFd>) -> usize {
        let mappings = lock(&dev).bar_mappings();
        let idx = {
            let mut f = lock(&self.functions);
            f.push(Decoded {
                at,
                dev,
                notify,
                windows: Vec::new(),
                bound: None,
            });
            f.len() - 1
        };
        self.sync(idx, &mappings);
        idx
    }

    /// Why BAR mapping `m` of function `idx` cannot decode, if it cannot.
    fn refusal(&self, fs: &[Decoded], idx: usize, m: &virtio::pci::BarMapping) -> Option<String> {
        let overlaps =
            |b: u64, l: u64| m.addr < b.saturating_add(l) && b < m.addr.saturating_add(m.len);
        let end = m.addr.checked_add(m.len);
        if end.is_none_or(|e| m.addr < self.start || e > self.end) {
            return Some(format!(
                "outside the PCI memory window {:#x}-{:#x}",
                self.start,
                self.end - 1
            ));
        }
        if let Some((b, l)) = self.reserved.iter().find(|(b, l)| overlaps(*b, *l)) {
            return Some(format!("over the platform's range {b:#x}+{l:#x}"));
        }
        fs.iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .find_map(|(_, f)| {
                f.windows
                    .iter()
                    .find(|(_, b, l)| overlaps(*b, *l))
                    .map(|(bar, b, _)| format!("over BAR {bar} of {} at {b:#x}", f.at))
            })
    }

    /// Follows function `idx`'s BARs to `mappings` (its state after a configuration write).
    pub fn sync(&self, idx: usize, mappings: &[virtio::pci::BarMapping]) {
        let mut fs = lock(&self.functions);
        let mut windows = Vec::new();
        for m in mappings {
            if !m.enabled || m.space != Space::Mmio {
                continue;
            }
            match self.refusal(&fs, idx, m) {
                Some(why) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    let at = fs.get(idx).map_or("?", |f| f.at.as_str());
                    self.log(format_args!(
                        "{at}: BAR {} placed at {:#x} ({:#x} bytes) {why}: it does not decode",
                        m.bar, m.addr, m.len
                    ));
                }
                None => windows.push((m.bar, m.addr, m.len)),
            }
        }
        let Some(f) = fs.get_mut(idx) else {
            return;
        };
        if f.windows != windows {
            self.stats.moves.fetch_add(1, Ordering::Relaxed);
        }
        f.windows = windows;
        let want = f
            .windows
            .iter()
            .find(|(bar, _, _)| *bar == virtio::transport::VIRTIO_BAR)
            .map(|(_, base, _)| base + virtio::transport::NOTIFY_OFFSET);
        if want == f.bound {
            return;
        }
        if let Some(old) = f.bound.take() {
            for (q, fd) in (0u64..).zip(&f.notify) {
                self.stats.unbinds.fetch_add(1, Ordering::Relaxed);
                let _ = self.fds.unbind(old + 4 * q, fd);
            }
        }
        if let Some(new) = want {
            for (q, fd) in (0u64..).zip(&f.notify) {
                self.stats.binds.fetch_add(1, Ordering::Relaxed);
                // A notify the eventfd does not take reaches the register path, which wakes the
                // same worker: a failed binding costs speed, not function.
                if let Err(e) = self.fds.bind(new + 4 * q, fd) {
                    self.log(format_args!(
                        "{}: notify of queue {q} at {new:#x}: {e}",
                        f.at
                    ));
                }
            }
            f.bound = Some(new);
        }
    }

    /// The function, BAR and offset that decode `addr` now.
    pub fn lookup(&self, addr: u64) -> Option<(SharedDevice, u8, u64)> {
        let fs = lock(&self.functions);
        fs.iter().find_map(|f| {
            f.windows
                .iter()
                .find(|(_, b, l)| addr >= *b && addr - *b < *l)
                .map(|(bar, b, _)| (f.dev.clone(), *bar, addr - b))
        })
    }
}

/// One bus range of the [`PciMmio`] window (offsets relative to `base`).
pub struct PciMmioRange {
    /// The decoder.
    pub mmio: Arc<PciMmio>,
    /// Where this range starts.
    pub base: u64,
}

impl BusDevice for PciMmioRange {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self
            .base
            .checked_add(offset)
            .and_then(|a| self.mmio.lookup(a))
        {
            // The decoder's lock is released before the device's is taken.
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => {
                self.mmio.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        match self
            .base
            .checked_add(offset)
            .and_then(|a| self.mmio.lookup(a))
        {
            Some((dev, bar, off)) => lock(&dev).bar_write(bar, off, data),
            None => {
                self.mmio.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A device model's configuration space: after each write that changed where a BAR decodes, the
/// decoder follows.
struct DecodedConfig {
    dev: SharedDevice,
    mmio: Arc<PciMmio>,
    idx: usize,
}

impl PciConfigSpace for DecodedConfig {
    fn config_read(&mut self, _bdf: Bdf, reg: u16, data: &mut [u8]) {
        lock(&self.dev).config_read(reg, data);
    }
    fn config_write(&mut self, _bdf: Bdf, reg: u16, data: &[u8]) {
        let mappings = {
            let mut d = lock(&self.dev);
            d.config_write(reg, data);
            if d.take_bar_changes().is_empty() {
                return;
            }
            d.bar_mappings()
        };
        // Device lock released: the decoder never holds its lock while taking a device's.
        self.mmio.sync(self.idx, &mappings);
    }
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

/// What the platform gives [`add_devices`] to wire the functions to.
#[derive(Clone, Copy)]
pub struct PlatformWiring<'a> {
    /// Configuration space: our functions beside the platform's bridges.
    pub extra: &'a ExtraFunctions,
    /// The VM's GSI routing table (MSI-X vectors).
    pub routes: &'a Arc<GsiRoutes>,
    /// The I/O APIC's INTx inputs.
    pub intx: &'a Arc<IntxLines>,
    /// Platform MMIO inside the PCI window that BARs must not take.
    pub reserved: &'a [(u64, u64)],
}

impl std::fmt::Debug for PlatformWiring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformWiring")
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

/// What [`add_devices`] set up.
#[derive(Debug)]
pub struct PciSetup {
    /// Each device model's counters.
    pub models: Vec<PciModel>,
    /// The BAR window's decoder (none without device models).
    pub mmio: Option<Arc<PciMmio>>,
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
    wiring: &PlatformWiring<'_>,
) -> Result<PciSetup, String> {
    let PlatformWiring {
        extra,
        routes,
        intx,
        reserved,
    } = *wiring;
    let mut models = Vec::new();
    if list.is_empty() {
        return Ok(PciSetup { models, mmio: None });
    }
    // The BARs' window: the DSDT's 32-bit PCI memory window, as ordered slow stages (a register
    // write takes effect before the vCPU's next access, including a notify KVM absorbs).
    let mmio = Arc::new(PciMmio::new(
        loader::layout::PCI_MMIO32_START,
        loader::layout::PCI_MMIO32_END,
        reserved.to_vec(),
        Arc::new(VmNotifyFds(machine.vm().clone())),
    ));
    // One bus device per range (a device sees offsets relative to its range's base).
    for (n, (base, len)) in mmio.ranges().into_iter().enumerate() {
        let name = if n == 0 {
            "pci-mmio".to_string()
        } else {
            format!("pci-mmio-{n}")
        };
        devices
            .add(
                &name,
                Space::Mmio,
                base,
                len,
                Stage::SlowOrdered,
                Arc::new(Mutex::new(PciMmioRange {
                    mmio: mmio.clone(),
                    base,
                })),
            )
            .map_err(|e| e.to_string())?;
    }
    for d in list {
        let what = format!("-s {}:{}", d.slot, d.function);
        for i in &d.ignored {
            eprintln!("bhyve: {what}: ignored: {i}");
        }
        let model: Box<dyn virtio::VirtioDevice> = match &d.spec {
            DeviceSpec::Block(o) => {
                let mut b =
                    virtio::blk::Block::open(o).map_err(|e| format!("{what}: virtio-blk: {e}"))?;
                b.set_io_threads(virtio::blk::default_io_threads());
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
        // The notify eventfds, one per queue, absorbed by KVM where BAR 0 decodes.
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
        let idx = mmio.add(what.clone(), shared.clone(), notify);
        let bdf =
            Bdf::new(0, d.slot, d.function).ok_or_else(|| format!("{what}: not a PCI address"))?;
        models.push(PciModel {
            at: format!("{}.{}", d.slot, d.function),
            name,
            msi: msi_stats,
            virtio: lock(&shared).stats().clone(),
        });
        lock(extra).push((
            bdf,
            Box::new(DecodedConfig {
                dev: shared,
                mmio: mmio.clone(),
                idx,
            }),
        ));
    }
    Ok(PciSetup {
        models,
        mmio: Some(mmio),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio::testing::Harness;

    /// Records bindings: (address, bound now).
    #[derive(Default)]
    struct Fds(Mutex<Vec<u64>>);

    impl NotifyFds for Fds {
        fn bind(&self, addr: u64, _fd: &EventFd) -> Result<(), String> {
            let mut v = lock(&self.0);
            if v.contains(&addr) {
                return Err(format!("{addr:#x} bound twice"));
            }
            v.push(addr);
            Ok(())
        }
        fn unbind(&self, addr: u64, _fd: &EventFd) -> Result<(), String> {
            let mut v = lock(&self.0);
            let i = v.iter().position(|a| *a == addr).ok_or("not bound")?;
            v.remove(i);
            Ok(())
        }
    }

    const W: u64 = 0xc000_0000;

    /// An rng function with BAR 0 at `at`, added to `m` (a guest-style config write enables memory
    /// decode). Returns the config handle and the device.
    fn function(m: &Arc<PciMmio>, at: u64, name: &str) -> (DecodedConfig, SharedDevice) {
        let h = Harness::new(Box::new(virtio::rng::Rng::new()), Execution::Worker).unwrap();
        let dev = h.dev.clone();
        lock(&dev).set_bar_address(0, at).unwrap();
        let notify = vec![lock(&dev).notify_eventfd(0).unwrap().try_clone().unwrap()];
        let idx = m.add(name.into(), dev.clone(), notify);
        let mut cfg = DecodedConfig {
            dev: dev.clone(),
            mmio: m.clone(),
            idx,
        };
        cfg.config_write(Bdf::new(0, 1, 0).unwrap(), 0x04, &[0x06, 0]);
        (cfg, dev)
    }

    fn bar0_write(cfg: &mut DecodedConfig, addr: u64) {
        let b = Bdf::new(0, 1, 0).unwrap();
        cfg.config_write(b, 0x14, &((addr >> 32) as u32).to_le_bytes());
        cfg.config_write(b, 0x10, &(addr as u32).to_le_bytes());
    }

    fn read32(m: &Arc<PciMmio>, addr: u64) -> u32 {
        let mut r = PciMmioRange {
            mmio: m.clone(),
            base: W,
        };
        let mut d = [0u8; 4];
        r.read(addr - W, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn the_window_follows_moves_refuses_overlaps_and_keeps_one_binding_per_queue() {
        let fds = Arc::new(Fds::default());
        let m = Arc::new(PciMmio::new(
            W,
            0xe000_0000,
            vec![(0xd000_0000, 0x1000)],
            fds.clone(),
        ));
        assert_eq!(
            m.ranges(),
            vec![(W, 0x1000_0000), (0xd000_1000, 0x0fff_f000)],
            "the window around the reserved range"
        );
        let (mut a, _) = function(&m, 0xc002_0000, "a");
        let (mut b, _) = function(&m, 0xc004_0000, "b");
        // Device feature select reads 0 (a register), unplaced addresses all-ones.
        assert_eq!(read32(&m, 0xc002_0000), 0);
        assert_eq!(read32(&m, 0xc003_0000), u32::MAX);
        assert_eq!(*lock(&fds.0), vec![0xc002_3000, 0xc004_3000]);
        // A moves: the old place goes dark, the notify follows.
        bar0_write(&mut a, 0xc100_0000);
        assert_eq!(read32(&m, 0xc002_0000), u32::MAX);
        assert_eq!(read32(&m, 0xc100_0000), 0);
        assert_eq!(*lock(&fds.0), vec![0xc004_3000, 0xc100_3000]);
        // Onto B, onto the reserved range, outside the window: refused, A does not decode (B
        // keeps its place), its notify is unbound.
        for bad in [0xc004_0000, 0xd000_0000, 0xe000_0000, 0x1_0000_0000] {
            bar0_write(&mut a, bad);
            assert_eq!(*lock(&fds.0), vec![0xc004_3000], "{bad:#x}");
        }
        // Five: the high dword of 0x1_0000_0000 goes first, placing it at 0x1_e000_0000 too.
        assert_eq!(m.stats.refused.load(Ordering::Relaxed), 5);
        assert_eq!(read32(&m, 0xc004_0000), 0, "B still decodes");
        // Decode off and on (as Linux does around sizing), and churn: one binding per queue
        // whatever the guest does.
        for i in 0..1000u64 {
            bar0_write(&mut b, 0xc200_0000 + (i % 4) * 0x8000);
            b.config_write(Bdf::new(0, 1, 0).unwrap(), 0x04, &[0, 0]);
            b.config_write(Bdf::new(0, 1, 0).unwrap(), 0x04, &[0x06, 0]);
        }
        assert_eq!(*lock(&fds.0), vec![0xc201_8000 + 0x3000]);
        bar0_write(&mut a, 0xc002_0000);
        assert_eq!(read32(&m, 0xc002_0000), 0);
        assert_eq!(lock(&fds.0).len(), 2);
        assert_eq!(
            m.stats.binds.load(Ordering::Relaxed) - m.stats.unbinds.load(Ordering::Relaxed),
            2
        );
    }
}
