//! virtio 1.x over PCI, modern transport only (virtio 1.2 §4.1).
//!
//! # BAR 0 (64-bit memory, 32 KiB, not prefetchable)
//!
//! | offset | region | capability |
//! |---|---|---|
//! | 0x0000 | common configuration (0x38 bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | 0x1000 | ISR status (1 byte; a read returns and clears it) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | 0x2000 | device-specific configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | 0x3000 | notify: queue *q* at 0x3000 + 4·*q* (`notify_off_multiplier` 4, `queue_notify_off` = *q*) | `VIRTIO_PCI_CAP_NOTIFY_CFG` |
//! | 0x4000 | MSI-X table (queues + 1 vectors) | MSI-X |
//! | 0x5000 | MSI-X PBA | MSI-X |
//!
//! Every region starts on its own 4 KiB page, so the platform can register the notify page as its
//! own posted-write range (or bind a KVM ioeventfd per queue to [`VirtioPciDevice::notify_eventfd`]).
//! A `VIRTIO_PCI_CAP_PCI_CFG` capability gives the configuration-space window the spec requires.
//!
//! # Where queue processing runs ([`Execution`])
//!
//! `Worker` (the default for every device): a per-device thread waits (poll(2)) on one eventfd
//! per queue and on the backend's descriptors. A notify write only writes that eventfd, so the
//! register side returns at once: with the notify region registered as a slow-stage device the
//! vCPU posts the write and re-enters, and the device-model thread pays the wake-up, not the vCPU.
//! `Inline`: the notify write processes the queue on the caller's thread (the device-model thread,
//! under the device lock). Cheap and deterministic; the tests and fuzz targets use it, and it suits
//! virtio-rnd. A device with host input (net RX, console input) in `Inline` mode only sees that
//! input when the caller runs [`VirtioPciDevice::poll_backend`].
//!
//! # Status protocol and the hostile guest
//!
//! * FEATURES_OK is kept only if the driver's features are a subset of the device's and include
//!   VERSION_1; otherwise the bit reads back clear (the driver sees the failure).
//! * DRIVER_OK without FEATURES_OK, a status write that clears bits, queue sizes that are not
//!   powers of two or above the maximum, misaligned rings, rings outside guest memory, a broken
//!   descriptor chain, an available index that jumps: DEVICE_NEEDS_RESET, a counter, a
//!   rate-limited log line, and (if DRIVER_OK was set) a configuration-change interrupt. Nothing is
//!   processed again until the driver writes 0 to the status.
//! * Register accesses of the wrong width or offset read all-ones, are dropped and counted.
//!
//! Lock order: the device's mutex (held by whoever calls in), then the MSI-X state's, then the
//! INTx pin's. The worker thread never takes the device's mutex.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stages::devices::pci::{Bdf, PciConfigSpace, PciIdent};
use stages::platform::{le_value, put_le_value};
use stages::BusDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    status, DeviceError, QueueCtx, QueueHandler, Signals, VirtioDevice,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use crate::log::{Logger, VirtioStats};
use crate::pci::{
    BarChange, BarKind, BarMapping, BarSpec, IntxLine, IntxPin, MsiTrigger, Msix, PciError,
    PciFunction, CAP_ID_VENDOR,
};

/// The BAR holding every virtio region.
pub const VIRTIO_BAR: u8 = 0;
/// Size of BAR 0.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Common configuration offset in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Common configuration length (virtio 1.0 layout).
pub const COMMON_LEN: u64 = 0x38;
/// ISR offset.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Notify region offset.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table offset.
pub const MSIX_TABLE_OFFSET: u32 = 0x4000;
/// MSI-X PBA offset.
pub const MSIX_PBA_OFFSET: u32 = 0x5000;
/// Size of each region's page.
pub const REGION_PAGE: u64 = 0x1000;
/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + virtio device ID.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// How long a reset waits for the worker to stop.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Virtio PCI capability types.
mod cap {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Errors building a transport (host configuration, never guest input).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The PCI layout was refused.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The device asks for no queue, too many, or a size that is not a power of two.
    #[error("Device {0} has an unusable queue layout")]
    Queues(&'static str),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Where queue processing runs (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// A per-device worker thread woken by the notify eventfds and the backend's descriptors.
    #[default]
    Worker,
    /// On the thread that writes the notify register.
    Inline,
}

/// How a function is wired to the platform.
#[derive(Clone)]
pub struct Wiring {
    /// MSI delivery.
    pub msi: Arc<dyn MsiTrigger>,
    /// The INTx line, if the platform wires one.
    pub intx: Option<Arc<dyn IntxLine>>,
    /// Where queue processing runs.
    pub execution: Execution,
    /// Name for logs, for example "virtio-blk 0:4.0".
    pub name: String,
}

impl std::fmt::Debug for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring")
            .field("intx", &self.intx.is_some())
            .field("execution", &self.execution)
            .field("name", &self.name)
            .finish()
    }
}

/// A region of BAR 0, for platforms that register them separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Common configuration (reads wait for an answer).
    Common,
    /// ISR (reads have a side effect: they clear it).
    Isr,
    /// Device-specific configuration.
    DeviceConfig,
    /// Queue notifications: writes only, never waited for (posted).
    Notify,
    /// MSI-X table.
    MsixTable,
    /// MSI-X pending bits.
    MsixPba,
}

/// One region of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What it is.
    pub kind: RegionKind,
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length (a whole page).
    pub len: u64,
}

#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max: u16,
    size: u16,
    enable: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max: u16) -> Self {
        Self {
            max,
            size: max,
            enable: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

struct Running {
    handler: Box<dyn QueueHandler>,
    queues: Vec<Queue>,
    halted: bool,
}

impl Running {
    /// Runs `f`; returns the queues left with work when the chain budget ran out (bit per queue).
    fn run(
        &mut self,
        mem: &GuestMemoryMmap,
        signals: &Signals,
        f: impl FnOnce(&mut dyn QueueHandler, &mut QueueCtx<'_>) -> Result<(), DeviceError>,
    ) -> u64 {
        if self.halted {
            VirtioStats::inc(&signals.stats.notifies_ignored);
            return 0;
        }
        let mut ctx = QueueCtx::new(mem, &mut self.queues, signals);
        let result = f(self.handler.as_mut(), &mut ctx);
        let more = ctx.more;
        match result {
            Ok(()) => more,
            Err(DeviceError::Queue(e)) => {
                self.halted = true;
                signals.needs_reset(&e);
                0
            }
            Err(DeviceError::Backend(e)) => {
                self.halted = true;
                VirtioStats::inc(&signals.stats.backend_failures);
                signals
                    .log
                    .log(format_args!("backend failed, queues stopped: {e}"));
                0
            }
        }
    }
}

struct Worker {
    kill: Arc<EventFd>,
    done: mpsc::Receiver<Running>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Engine {
    Idle,
    Inline(Running),
    Worker(Worker),
}

/// A virtio device on PCI: the function's configuration space, BAR 0 and the device behind them.
pub struct VirtioPciDevice {
    pci: PciFunction,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    signals: Arc<Signals>,
    execution: Execution,
    device_features: u64,
    dfsel: u32,
    gfsel: u32,
    driver_features: u64,
    queue_sel: u16,
    queues: Vec<QueueConfig>,
    notify: Vec<Arc<EventFd>>,
    engine: Engine,
    pci_cfg_cap: u8,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device", &self.device.name())
            .field("status", &self.signals.status())
            .field("pci", &self.pci)
            .finish()
    }
}

fn vendor_cap(cfg_type: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut c = vec![
        CAP_ID_VENDOR,
        0,
        u8::try_from(len).unwrap_or(16),
        cfg_type,
        VIRTIO_BAR,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&length.to_le_bytes());
    c.extend_from_slice(extra);
    c
}

/// MSI-X table entries of the function that wraps `device`: one for configuration changes, one
/// per queue (what a platform that binds a resource per vector needs to know before wiring it).
pub fn msix_vectors(device: &dyn VirtioDevice) -> u16 {
    u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX)
}

impl VirtioPciDevice {
    /// Wraps `device` in a PCI function over guest memory `mem`. BAR 0 starts unplaced: the
    /// platform calls [`VirtioPciDevice::set_bar_address`] before the guest runs.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        wiring: Wiring,
    ) -> Result<Self, TransportError> {
        let name = device.name();
        let sizes = device.queue_max_sizes();
        let nq = sizes.len();
        if nq == 0 || nq > 64 || sizes.iter().any(|s| !s.is_power_of_two() || *s > 32768) {
            return Err(TransportError::Queues(name));
        }
        let config_len = u32::try_from(device.config_len().min(REGION_PAGE)).unwrap_or(0);
        let vectors = msix_vectors(device.as_ref());
        let (class, subclass, prog_if) = device.pci_class();
        let intx = Arc::new(IntxPin::new(wiring.intx.clone()));
        let mut pci = PciFunction::new(
            PciIdent {
                vendor: VIRTIO_PCI_VENDOR,
                device: VIRTIO_PCI_DEVICE_BASE + device.device_id(),
                class,
                subclass,
                prog_if,
                revision: 1,
                header_type: 0,
            },
            VIRTIO_PCI_VENDOR,
            0x1100,
            intx.clone(),
        );
        pci.add_bar(
            VIRTIO_BAR,
            BarSpec {
                kind: BarKind::Mmio64 {
                    prefetchable: false,
                },
                size: VIRTIO_BAR_SIZE,
            },
        )?;
        let nq32 = u32::from(vectors - 1);
        let c = |v: u64| u32::try_from(v).unwrap_or(0);
        pci.add_capability(
            &vendor_cap(cap::COMMON, c(COMMON_OFFSET), c(COMMON_LEN), &[]),
            &[],
        )?;
        pci.add_capability(
            &vendor_cap(
                cap::NOTIFY,
                c(NOTIFY_OFFSET),
                nq32 * NOTIFY_MULTIPLIER,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        pci.add_capability(&vendor_cap(cap::ISR, c(ISR_OFFSET), 1, &[]), &[])?;
        if config_len > 0 {
            pci.add_capability(
                &vendor_cap(cap::DEVICE, c(DEVICE_CFG_OFFSET), config_len, &[]),
                &[],
            )?;
        }
        // PCI_CFG window: bar, offset and length writable; the data dword is served here.
        let pci_cfg_cap = pci.add_capability(
            &vendor_cap(cap::PCI_CFG, 0, 0, &[0; 4]),
            &[
                0, 0, 0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        )?;
        let msix =
            Arc::new(Msix::new(vectors, wiring.msi.clone()).ok_or(TransportError::Queues(name))?);
        pci.add_msix(
            msix.clone(),
            VIRTIO_BAR,
            MSIX_TABLE_OFFSET,
            VIRTIO_BAR,
            MSIX_PBA_OFFSET,
        )?;
        let stats = Arc::new(VirtioStats::default());
        let log = Arc::new(Logger::new(wiring.name));
        let signals = Arc::new(Signals::new(msix, intx, nq, stats, log));
        let notify = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let device_features = device.features() | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
        Ok(Self {
            pci,
            device,
            mem,
            signals,
            execution: wiring.execution,
            device_features,
            dfsel: 0,
            gfsel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: sizes.into_iter().map(QueueConfig::new).collect(),
            notify,
            engine: Engine::Idle,
            pci_cfg_cap,
        })
    }

    /// The PCI function (BAR mappings, MSI-X state, INTx pin).
    pub fn pci(&self) -> &PciFunction {
        &self.pci
    }

    /// Places BAR 0 (the platform's choice; 32 KiB aligned).
    pub fn set_bar_address(&mut self, bar: u8, addr: u64) -> Result<(), PciError> {
        self.pci.set_bar_address(bar, addr)
    }

    /// Writes the interrupt line register (the platform's INTx wiring, as firmware reports it).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.pci.set_interrupt_line(line);
    }

    /// Where the BARs decode now.
    pub fn bar_mappings(&self) -> Vec<BarMapping> {
        self.pci.bar_mappings()
    }

    /// BAR decode changes since the last call (guest relocation, decode enable/disable).
    pub fn take_bar_changes(&mut self) -> Vec<BarChange> {
        self.pci.take_bar_changes()
    }

    /// The regions of BAR 0.
    pub fn regions(&self) -> Vec<Region> {
        let r = |kind, offset| Region {
            kind,
            bar: VIRTIO_BAR,
            offset,
            len: REGION_PAGE,
        };
        vec![
            r(RegionKind::Common, COMMON_OFFSET),
            r(RegionKind::Isr, ISR_OFFSET),
            r(RegionKind::DeviceConfig, DEVICE_CFG_OFFSET),
            r(RegionKind::Notify, NOTIFY_OFFSET),
            r(RegionKind::MsixTable, u64::from(MSIX_TABLE_OFFSET)),
            r(RegionKind::MsixPba, u64::from(MSIX_PBA_OFFSET)),
        ]
    }

    /// The eventfd queue `q`'s notifications wake the worker with: a platform may bind it as a
    /// KVM ioeventfd at BAR 0 + [`NOTIFY_OFFSET`] + 4·`q` (`Execution::Worker` only).
    pub fn notify_eventfd(&self, q: u16) -> Option<&EventFd> {
        if self.execution != Execution::Worker {
            return None;
        }
        self.notify.get(usize::from(q)).map(|e| e.as_ref())
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<VirtioStats> {
        &self.signals.stats
    }

    /// Interrupt and status state.
    pub fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.signals.status()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// Guest read of `bar` at `offset`.
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if bar != VIRTIO_BAR {
            VirtioStats::inc(&self.signals.stats.bad_accesses);
            return;
        }
        if self.pci.msix_bar_read(bar, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o, data),
            ISR_OFFSET => {
                let v = self.signals.take_isr();
                put_le_value(data, u64::from(v));
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_PAGE).contains(&o) => {
                let off = o - DEVICE_CFG_OFFSET;
                let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                if off
                    .checked_add(len)
                    .is_some_and(|e| e <= self.device.config_len())
                {
                    self.device.read_config(off, data);
                } else {
                    VirtioStats::inc(&self.signals.stats.bad_accesses);
                }
            }
            _ => VirtioStats::inc(&self.signals.stats.bad_accesses),
        }
    }

    /// Guest write of `bar` at `offset`.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR {
            VirtioStats::inc(&self.signals.stats.bad_accesses);
            return;
        }
        if self.pci.msix_bar_write(bar, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o, data),
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_PAGE).contains(&o) => {
                let rel = o - NOTIFY_OFFSET;
                let q = rel / u64::from(NOTIFY_MULTIPLIER);
                match u16::try_from(q) {
                    Ok(q) if rel % u64::from(NOTIFY_MULTIPLIER) == 0 && q < self.num_queues() => {
                        self.notify_queue(q)
                    }
                    _ => VirtioStats::inc(&self.signals.stats.notifies_ignored),
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_PAGE).contains(&o) => {
                if !self.device.write_config(o - DEVICE_CFG_OFFSET, data) {
                    VirtioStats::inc(&self.signals.stats.bad_accesses);
                }
            }
            _ => VirtioStats::inc(&self.signals.stats.bad_accesses),
        }
    }

    fn live(&self) -> bool {
        let s = self.signals.status();
        s & status::DRIVER_OK != 0 && s & status::NEEDS_RESET == 0
    }

    fn notify_queue(&mut self, q: u16) {
        if !self.live() {
            VirtioStats::inc(&self.signals.stats.notifies_ignored);
            return;
        }
        VirtioStats::inc(&self.signals.stats.notifies);
        match &mut self.engine {
            // Inline: work left over when the budget ran out waits for the next notify.
            Engine::Inline(r) => {
                r.run(&self.mem, &self.signals, |h, ctx| h.queue_notify(q, ctx));
            }
            Engine::Worker(_) => {
                if let Some(Err(e)) = self.notify.get(usize::from(q)).map(|n| n.write(1)) {
                    self.signals
                        .log
                        .log(format_args!("cannot wake the worker: {e}"));
                }
            }
            Engine::Idle => VirtioStats::inc(&self.signals.stats.notifies_ignored),
        }
    }

    /// `Execution::Inline` only: services the backend's readable descriptors once (host input
    /// for net RX and console). Returns how many were serviced.
    pub fn poll_backend(&mut self) -> usize {
        let Engine::Inline(r) = &mut self.engine else {
            return 0;
        };
        if r.halted {
            return 0;
        }
        let mut fds = Vec::new();
        r.handler.wait_fds(&mut fds);
        let mut served = 0;
        for (fd, token) in fds {
            if poll_readable(fd, 0) {
                served += 1;
                r.run(&self.mem, &self.signals, |h, ctx| h.fd_ready(token, ctx));
            }
        }
        served
    }

    fn sel_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_sel))
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let len = data.len();
        let q = self.sel_queue().copied();
        let qv = self.signals.queue_vector(usize::from(self.queue_sel));
        let v: Option<u64> = match (off, len) {
            (0x00, 4) => Some(u64::from(self.dfsel)),
            (0x04, 4) => Some(match self.dfsel {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            }),
            (0x08, 4) => Some(u64::from(self.gfsel)),
            (0x0c, 4) => Some(match self.gfsel {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            }),
            (0x10, 2) => Some(u64::from(self.signals.config_vector())),
            (0x12, 2) => Some(u64::from(self.num_queues())),
            (0x14, 1) => Some(u64::from(self.signals.status())),
            (0x15, 1) => Some(0),
            (0x16, 2) => Some(u64::from(self.queue_sel)),
            (0x18, 2) => Some(q.map_or(0, |q| u64::from(q.size))),
            (0x1a, 2) => Some(if q.is_some() {
                u64::from(qv)
            } else {
                u64::from(VIRTIO_MSI_NO_VECTOR)
            }),
            (0x1c, 2) => Some(q.map_or(0, |q| u64::from(q.enable))),
            (0x1e, 2) => Some(u64::from(self.queue_sel)),
            (0x20..=0x37, 4 | 8) => q.and_then(|q| {
                let field = [q.desc, q.avail, q.used]
                    .get(usize::try_from((off - 0x20) / 8).ok()?)
                    .copied()?;
                match (off % 8, len) {
                    (0, 8) => Some(field),
                    (0, 4) => Some(field & 0xffff_ffff),
                    (4, 4) => Some(field >> 32),
                    _ => None,
                }
            }),
            _ => None,
        };
        match v {
            Some(v) => put_le_value(data, v),
            None => VirtioStats::inc(&self.signals.stats.bad_accesses),
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let len = data.len();
        let v = le_value(data);
        let v16 = u16::try_from(v & 0xffff).unwrap_or(0);
        let v32 = u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        let st = self.signals.status();
        let configurable = st & status::DRIVER_OK == 0;
        let ok = match (off, len) {
            (0x00, 4) => {
                self.dfsel = v32;
                true
            }
            (0x08, 4) => {
                self.gfsel = v32;
                true
            }
            (0x0c, 4) if st & status::FEATURES_OK == 0 => match self.gfsel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32);
                    true
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32);
                    true
                }
                _ => false,
            },
            (0x10, 2) => {
                self.signals.set_config_vector(self.valid_vector(v16));
                true
            }
            (0x14, 1) => {
                self.write_status(u8::try_from(v & 0xff).unwrap_or(0));
                true
            }
            (0x16, 2) => {
                self.queue_sel = v16;
                true
            }
            (0x1a, 2) if self.sel_queue().is_some() => {
                let vec = self.valid_vector(v16);
                self.signals
                    .set_queue_vector(usize::from(self.queue_sel), vec);
                true
            }
            (0x18 | 0x1c | 0x20..=0x37, _) if configurable => self.queue_write(off, len, v),
            _ => false,
        };
        if !ok {
            VirtioStats::inc(&self.signals.stats.bad_accesses);
        }
    }

    fn queue_write(&mut self, off: u64, len: usize, v: u64) -> bool {
        let Some(q) = self.queues.get_mut(usize::from(self.queue_sel)) else {
            return false;
        };
        match (off, len) {
            (0x18, 2) => {
                // Stored as written; checked (power of two, ≤ max) when the device goes live.
                q.size = u16::try_from(v & 0xffff).unwrap_or(0);
                true
            }
            // Only 1 may be written (virtio 1.x §4.1.4.3.2); 0 is refused.
            (0x1c, 2) if v & 0xffff == 1 => {
                q.enable = true;
                true
            }
            (0x20..=0x37, 4 | 8) => {
                let Some(field) = usize::try_from((off - 0x20) / 8)
                    .ok()
                    .and_then(|i| [&mut q.desc, &mut q.avail, &mut q.used].into_iter().nth(i))
                else {
                    return false;
                };
                match (off % 8, len) {
                    (0, 8) => *field = v,
                    (0, 4) => *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff),
                    (4, 4) => *field = (*field & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
                    _ => return false,
                }
                true
            }
            _ => false,
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        let n = self.pci.msix().map_or(0, |m| m.vectors());
        if v < n {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.signals.status();
        // NEEDS_RESET is the device's bit: the driver cannot set or clear it. Undefined bits
        // (4, 5) are dropped.
        let defined = status::ACKNOWLEDGE
            | status::DRIVER
            | status::DRIVER_OK
            | status::FEATURES_OK
            | status::FAILED;
        let v = (v & defined) | (old & status::NEEDS_RESET);
        if old & !v != 0 {
            VirtioStats::inc(&self.signals.stats.status_violations);
            self.signals.log.log(format_args!(
                "status write {v:#x} clears bits of {old:#x}: ignored"
            ));
            return;
        }
        let mut new = v;
        let newly = v & !old;
        if newly & status::FEATURES_OK != 0 {
            let extra = self.driver_features & !self.device_features;
            if extra != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                VirtioStats::inc(&self.signals.stats.status_violations);
                self.signals.log.log(format_args!(
                    "features {:#x} refused (offered {:#x}; VERSION_1 is required)",
                    self.driver_features, self.device_features
                ));
                new &= !status::FEATURES_OK;
            }
        }
        self.signals.set_status(new);
        if newly & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                VirtioStats::inc(&self.signals.stats.status_violations);
                self.signals.needs_reset(&"DRIVER_OK before FEATURES_OK");
            } else if new & status::NEEDS_RESET == 0 {
                self.activate();
            }
        }
    }

    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        let mut out = Vec::with_capacity(self.queues.len());
        for (i, c) in self.queues.iter().enumerate() {
            let mut q = Queue::new(c.max).map_err(|e| format!("queue {i}: {e}"))?;
            if c.enable {
                q.try_set_size(c.size).map_err(|_| {
                    format!(
                        "queue {i}: size {} is not a power of two of at most {}",
                        c.size, c.max
                    )
                })?;
                q.try_set_desc_table_address(GuestAddress(c.desc))
                    .map_err(|_| format!("queue {i}: descriptor table {:#x} misaligned", c.desc))?;
                q.try_set_avail_ring_address(GuestAddress(c.avail))
                    .map_err(|_| format!("queue {i}: driver area {:#x} misaligned", c.avail))?;
                q.try_set_used_ring_address(GuestAddress(c.used))
                    .map_err(|_| format!("queue {i}: device area {:#x} misaligned", c.used))?;
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i}: rings are not inside guest memory"));
                }
            }
            out.push(q);
        }
        if !out.iter().any(|q| q.ready()) {
            return Err("no queue enabled".into());
        }
        Ok(out)
    }

    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(e) => {
                self.signals.needs_reset(&e);
                return;
            }
        };
        let handler = match self.device.activate(self.driver_features) {
            Ok(h) => h,
            Err(e) => {
                self.signals.needs_reset(&e);
                return;
            }
        };
        VirtioStats::inc(&self.signals.stats.activations);
        let running = Running {
            handler,
            queues,
            halted: false,
        };
        match self.execution {
            Execution::Inline => self.engine = Engine::Inline(running),
            Execution::Worker => match self.spawn_worker(running) {
                Ok(w) => self.engine = Engine::Worker(w),
                Err(e) => self.signals.needs_reset(&e),
            },
        }
    }

    fn spawn_worker(&mut self, running: Running) -> Result<Worker, String> {
        let kill = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?);
        let (tx, rx) = mpsc::channel();
        let mem = self.mem.clone();
        let signals = self.signals.clone();
        let notify = self.notify.clone();
        let k = kill.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{}-worker", self.device.name()))
            .spawn(move || worker_loop(running, &mem, &signals, &notify, &k, &tx))
            .map_err(|e| format!("cannot start the worker thread: {e}"))?;
        Ok(Worker {
            kill,
            done: rx,
            thread: Some(thread),
        })
    }

    fn stop_engine(&mut self) -> Option<Box<dyn QueueHandler>> {
        match std::mem::replace(&mut self.engine, Engine::Idle) {
            Engine::Idle => None,
            Engine::Inline(mut r) => {
                r.handler.quiesce();
                Some(r.handler)
            }
            Engine::Worker(mut w) => {
                let _ = w.kill.write(1);
                match w.done.recv_timeout(WORKER_STOP_TIMEOUT) {
                    Ok(r) => {
                        if let Some(t) = w.thread.take() {
                            let _ = t.join();
                        }
                        Some(r.handler)
                    }
                    Err(_) => {
                        // The worker is stuck in the backend (a hung disk): leave it; the device
                        // cannot be activated again (its backend went with the worker).
                        self.signals.log.log(format_args!(
                            "worker did not stop within {WORKER_STOP_TIMEOUT:?}; backend lost"
                        ));
                        VirtioStats::inc(&self.signals.stats.backend_failures);
                        None
                    }
                }
            }
        }
    }

    /// Device reset (the driver wrote 0 to the status).
    fn reset(&mut self) {
        VirtioStats::inc(&self.signals.stats.resets);
        let handler = self.stop_engine();
        self.device.reset(handler);
        for n in &self.notify {
            let _ = n.read();
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max);
        }
        for i in 0..self.queues.len() {
            self.signals.set_queue_vector(i, VIRTIO_MSI_NO_VECTOR);
        }
        self.signals.set_config_vector(VIRTIO_MSI_NO_VECTOR);
        self.driver_features = 0;
        self.dfsel = 0;
        self.gfsel = 0;
        self.queue_sel = 0;
        self.signals.clear_isr();
        self.signals.set_status(0);
    }

    fn pci_cfg_window(&self) -> Option<(u8, u64, usize)> {
        let c = self.pci_cfg_cap;
        let b = |o: u8| self.pci.header_byte(c.wrapping_add(o));
        let bar = b(4);
        let off = u32::from_le_bytes([b(8), b(9), b(10), b(11)]);
        let len = u32::from_le_bytes([b(12), b(13), b(14), b(15)]);
        matches!(len, 1 | 2 | 4).then_some((bar, u64::from(off), usize::try_from(len).ok()?))
    }

    /// Configuration read (what [`PciConfigSpace`] calls).
    pub fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        let window = u16::from(self.pci_cfg_cap) + 16;
        if reg == window {
            data.fill(0);
            match self.pci_cfg_window() {
                Some((bar, off, len)) => {
                    let mut buf = [0u8; 4];
                    if let Some(b) = buf.get_mut(..len) {
                        self.bar_read(bar, off, b);
                    }
                    for (d, s) in data.iter_mut().zip(buf) {
                        *d = s;
                    }
                }
                None => data.fill(0xff),
            }
            return;
        }
        self.pci.config_read(reg, data);
    }

    /// Configuration write (what [`PciConfigSpace`] calls).
    pub fn config_write(&mut self, reg: u16, data: &[u8]) {
        let window = u16::from(self.pci_cfg_cap) + 16;
        if reg == window {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                if let Some(d) = data.get(..len) {
                    self.bar_write(bar, off, d);
                    return;
                }
            }
            VirtioStats::inc(&self.signals.stats.bad_accesses);
            return;
        }
        self.pci.config_write(reg, data);
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        let h = self.stop_engine();
        self.device.reset(h);
    }
}

impl PciConfigSpace for VirtioPciDevice {
    fn config_read(&mut self, _bdf: Bdf, reg: u16, data: &mut [u8]) {
        VirtioPciDevice::config_read(self, reg, data);
    }
    fn config_write(&mut self, _bdf: Bdf, reg: u16, data: &[u8]) {
        VirtioPciDevice::config_write(self, reg, data);
    }
}

fn lock(d: &Mutex<VirtioPciDevice>) -> MutexGuard<'_, VirtioPciDevice> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shared device, for the configuration mechanism and the bus at the same time.
pub type SharedDevice = Arc<Mutex<VirtioPciDevice>>;

/// The configuration space of a shared device, to register with
/// `stages::devices::pci::PciConfigIo` (as `Box<dyn PciConfigSpace>`).
#[derive(Debug, Clone)]
pub struct PciConfigHandle(pub SharedDevice);

impl PciConfigSpace for PciConfigHandle {
    fn config_read(&mut self, _bdf: Bdf, reg: u16, data: &mut [u8]) {
        lock(&self.0).config_read(reg, data);
    }
    fn config_write(&mut self, _bdf: Bdf, reg: u16, data: &[u8]) {
        lock(&self.0).config_write(reg, data);
    }
}

/// A window of a BAR as a bus device: offsets are relative to `base` within BAR `bar`. Register the
/// whole BAR (`base` 0, length [`VIRTIO_BAR_SIZE`]) or one [`Region`] per range.
#[derive(Debug, Clone)]
pub struct BarRegion {
    dev: SharedDevice,
    bar: u8,
    base: u64,
}

impl BarRegion {
    /// The window of `bar` starting at `base`.
    pub fn new(dev: SharedDevice, bar: u8, base: u64) -> Self {
        Self { dev, bar, base }
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.base.checked_add(offset) {
            Some(o) => lock(&self.dev).bar_read(self.bar, o, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(o) = self.base.checked_add(offset) {
            lock(&self.dev).bar_write(self.bar, o, data);
        }
    }
}

/// Whether `fd` is readable within `timeout_ms` (0: now).
fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    rc > 0 && p.revents != 0
}

fn worker_loop(
    mut r: Running,
    mem: &GuestMemoryMmap,
    signals: &Signals,
    notify: &[Arc<EventFd>],
    kill: &EventFd,
    done: &mpsc::Sender<Running>,
) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut extra: Vec<(RawFd, u32)> = Vec::new();
    let pfd = |fd: RawFd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        fds.clear();
        extra.clear();
        fds.push(pfd(kill.as_raw_fd()));
        fds.extend(notify.iter().map(|n| pfd(n.as_raw_fd())));
        if !r.halted {
            r.handler.wait_fds(&mut extra);
        }
        fds.extend(extra.iter().map(|(fd, _)| pfd(*fd)));
        let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` holds `n` valid pollfd entries and lives across the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            signals
                .log
                .log(format_args!("worker poll failed, stopping: {e}"));
            break;
        }
        if fds.first().is_some_and(|p| p.revents != 0) {
            break;
        }
        let mut more = 0u64;
        for (q, n) in notify.iter().enumerate() {
            let fired = fds.get(q + 1).is_some_and(|p| p.revents != 0);
            if fired && n.read().is_ok() {
                let q = u16::try_from(q).unwrap_or(u16::MAX);
                more |= r.run(mem, signals, |h, ctx| h.queue_notify(q, ctx));
            }
        }
        let base = 1 + notify.len();
        for (i, (_, token)) in extra.iter().enumerate() {
            if fds.get(base + i).is_some_and(|p| p.revents != 0) {
                let t = *token;
                more |= r.run(mem, signals, |h, ctx| h.fd_ready(t, ctx));
            }
        }
        // Budget ran out: come back to those queues after looking at everything else (and at the
        // kill eventfd) once more.
        for (q, n) in notify.iter().enumerate() {
            if more & (1u64 << (q % 64)) != 0 {
                let _ = n.write(1);
            }
        }
    }
    r.handler.quiesce();
    let _ = done.send(r);
}
