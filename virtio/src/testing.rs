//! Test support: a minimal guest driver that performs, register by register, the sequence
//! `virtio/README.md` specifies for the lead's test guests, over the device's
//! [`PciConfigSpace`] and BAR [`BusDevice`] interfaces; and the fuzz harness shared by the
//! cargo-fuzz targets and the deterministic randomized tests.
//!
//! Not used by the monitor itself. Errors are strings: this is a test driver.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stages::devices::pci::{Bdf, PciConfigSpace};
use stages::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{status, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::pci::{IntxLine, MsiTrigger};
use crate::transport::{
    BarRegion, Execution, PciConfigHandle, SharedDevice, VirtioPciDevice, Wiring,
};

/// Records MSI messages and wakes waiters.
#[derive(Debug, Default)]
pub struct RecordingMsi {
    msgs: Mutex<Vec<(u64, u32)>>,
    cv: Condvar,
}

impl RecordingMsi {
    /// Messages so far.
    pub fn messages(&self) -> Vec<(u64, u32)> {
        self.msgs.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl MsiTrigger for RecordingMsi {
    fn trigger(&self, _vector: u16, addr: u64, data: u32) {
        if let Ok(mut m) = self.msgs.lock() {
            m.push((addr, data));
        }
        self.cv.notify_all();
    }
}

/// Records the INTx level.
#[derive(Debug, Default)]
pub struct RecordingIntx {
    level: Mutex<(bool, u32)>,
}

impl RecordingIntx {
    /// (level now, number of assertions).
    pub fn state(&self) -> (bool, u32) {
        self.level.lock().map(|l| *l).unwrap_or_default()
    }
}

impl IntxLine for RecordingIntx {
    fn set_level(&self, asserted: bool) {
        if let Ok(mut l) = self.level.lock() {
            l.0 = asserted;
            if asserted {
                l.1 += 1;
            }
        }
    }
}

/// Where the platform puts BAR 0 in these tests.
pub const TEST_BAR_ADDR: u64 = 0xe000_0000;
/// The MSI address the test driver programs.
pub const MSI_ADDR: u64 = 0xfee0_0000;
/// Guest memory size of the test machine.
pub const TEST_MEM: usize = 0x20_0000;
/// First byte of the data area the tests use for buffers.
pub const DATA_BASE: u64 = 0x10_0000;

/// A device under test and its wiring.
#[derive(Debug)]
pub struct Harness {
    /// The device.
    pub dev: SharedDevice,
    /// MSI messages.
    pub msi: Arc<RecordingMsi>,
    /// INTx line.
    pub intx: Arc<RecordingIntx>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
}

impl Harness {
    /// Wraps `device` with BAR 0 at [`TEST_BAR_ADDR`] over fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>, execution: Execution) -> Result<Self, String> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM)])
            .map_err(|e| e.to_string())?;
        Self::with_memory(device, execution, mem)
    }

    /// Same, over `mem`.
    pub fn with_memory(
        device: Box<dyn VirtioDevice>,
        execution: Execution,
        mem: GuestMemoryMmap,
    ) -> Result<Self, String> {
        let msi = Arc::new(RecordingMsi::default());
        let intx = Arc::new(RecordingIntx::default());
        let name = device.name();
        let mut d = VirtioPciDevice::new(
            device,
            mem.clone(),
            Wiring {
                msi: msi.clone(),
                intx: Some(intx.clone()),
                execution,
                name: format!("{name} test"),
            },
        )
        .map_err(|e| e.to_string())?;
        d.set_bar_address(0, TEST_BAR_ADDR)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            dev: Arc::new(Mutex::new(d)),
            msi,
            intx,
            mem,
        })
    }

    /// A driver for this device.
    pub fn driver(&self) -> Driver {
        Driver::new(self.dev.clone(), self.mem.clone())
    }

    /// Locks the device.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the capability walk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// BAR 0 address.
    pub bar: u64,
    /// Common configuration address.
    pub common: u64,
    /// Notify base address.
    pub notify: u64,
    /// Notify multiplier.
    pub notify_mult: u32,
    /// ISR address.
    pub isr: u64,
    /// Device configuration address (0 if none).
    pub device: u64,
    /// MSI-X table address.
    pub msix_table: u64,
    /// MSI-X vectors.
    pub msix_vectors: u16,
}

/// One queue as the driver laid it out.
#[derive(Debug, Clone, Copy)]
pub struct DriverQueue {
    /// Size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Next free descriptor.
    pub next_desc: u16,
    /// Next available index.
    pub avail_idx: u16,
    /// Used index seen last.
    pub used_seen: u16,
    /// Notify offset.
    pub notify_off: u16,
}

/// A buffer of a request: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// Common configuration register offsets.
pub mod common {
    /// device_feature_select.
    pub const DFSELECT: u64 = 0x00;
    /// device_feature.
    pub const DF: u64 = 0x04;
    /// driver_feature_select.
    pub const GFSELECT: u64 = 0x08;
    /// driver_feature.
    pub const GF: u64 = 0x0c;
    /// config_msix_vector.
    pub const MSIX: u64 = 0x10;
    /// num_queues.
    pub const NUMQ: u64 = 0x12;
    /// device_status.
    pub const STATUS: u64 = 0x14;
    /// queue_select.
    pub const Q_SELECT: u64 = 0x16;
    /// queue_size.
    pub const Q_SIZE: u64 = 0x18;
    /// queue_msix_vector.
    pub const Q_MSIX: u64 = 0x1a;
    /// queue_enable.
    pub const Q_ENABLE: u64 = 0x1c;
    /// queue_notify_off.
    pub const Q_NOFF: u64 = 0x1e;
    /// queue_desc.
    pub const Q_DESC: u64 = 0x20;
    /// queue_driver.
    pub const Q_AVAIL: u64 = 0x28;
    /// queue_device.
    pub const Q_USED: u64 = 0x30;
}

/// The test guest's driver.
#[derive(Debug)]
pub struct Driver {
    cfg: PciConfigHandle,
    bar: BarRegion,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Discovered layout.
    pub layout: Layout,
    /// Queues.
    pub queues: Vec<DriverQueue>,
    bdf: Bdf,
}

impl Driver {
    /// A driver for `dev`.
    pub fn new(dev: SharedDevice, mem: GuestMemoryMmap) -> Self {
        Self {
            cfg: PciConfigHandle(dev.clone()),
            bar: BarRegion::new(dev, 0, 0),
            mem,
            layout: Layout::default(),
            queues: Vec::new(),
            bdf: Bdf::new(0, 4, 0).unwrap_or_else(|| Bdf::from_config_address(0)),
        }
    }

    /// Configuration read of `width` bytes.
    pub fn cfg_read(&mut self, reg: u16, width: usize) -> u32 {
        let mut b = [0u8; 4];
        self.cfg
            .config_read(self.bdf, reg, b.get_mut(..width).unwrap_or_default());
        u32::from_le_bytes(b)
    }

    /// Configuration write.
    pub fn cfg_write(&mut self, reg: u16, v: u32, width: usize) {
        let b = v.to_le_bytes();
        self.cfg
            .config_write(self.bdf, reg, b.get(..width).unwrap_or_default());
    }

    /// MMIO read at guest-physical `addr` (inside BAR 0) of `width` bytes.
    pub fn mmio_read(&mut self, addr: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bar.read(
            addr.wrapping_sub(self.layout.bar),
            b.get_mut(..width).unwrap_or_default(),
        );
        u64::from_le_bytes(b)
    }

    /// MMIO write.
    pub fn mmio_write(&mut self, addr: u64, v: u64, width: usize) {
        let b = v.to_le_bytes();
        self.bar.write(
            addr.wrapping_sub(self.layout.bar),
            b.get(..width).unwrap_or_default(),
        );
    }

    fn common_read(&mut self, off: u64, width: usize) -> u64 {
        self.mmio_read(self.layout.common + off, width)
    }

    fn common_write(&mut self, off: u64, v: u64, width: usize) {
        self.mmio_write(self.layout.common + off, v, width);
    }

    /// Step 1–3 of the README: identify, read BAR 0, enable memory decode and bus mastering, walk
    /// the capabilities.
    pub fn discover(&mut self, want_device: u16) -> Result<Layout, String> {
        let id = self.cfg_read(0x00, 4);
        if id & 0xffff != 0x1af4 || id >> 16 != u32::from(0x1040 + want_device) {
            return Err(format!("unexpected vendor/device {id:#010x}"));
        }
        let lo = self.cfg_read(0x10, 4);
        if lo & 0x7 != 0x4 {
            return Err(format!("BAR 0 {lo:#x} is not a 64-bit memory BAR"));
        }
        let hi = self.cfg_read(0x14, 4);
        let bar = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        self.cfg_write(0x04, 0x0006, 2);
        let mut l = Layout {
            bar,
            ..Layout::default()
        };
        let mut ptr = self.cfg_read(0x34, 1);
        let mut guard = 0;
        while ptr != 0 && guard < 48 {
            guard += 1;
            let p = u16::try_from(ptr).map_err(|e| e.to_string())?;
            let id = self.cfg_read(p, 1);
            if id == 0x09 {
                let ty = self.cfg_read(p + 3, 1);
                let off = u64::from(self.cfg_read(p + 8, 4));
                match ty {
                    1 => l.common = bar + off,
                    2 => {
                        l.notify = bar + off;
                        l.notify_mult = self.cfg_read(p + 16, 4);
                    }
                    3 => l.isr = bar + off,
                    4 => l.device = bar + off,
                    _ => {}
                }
            } else if id == 0x11 {
                let ctl = self.cfg_read(p + 2, 2);
                l.msix_vectors = u16::try_from((ctl & 0x7ff) + 1).unwrap_or(0);
                let t = self.cfg_read(p + 4, 4);
                l.msix_table = bar + u64::from(t & !7);
            }
            ptr = self.cfg_read(p + 1, 1);
        }
        if l.common == 0 || l.notify == 0 || l.isr == 0 {
            return Err(format!("capabilities incomplete: {l:?}"));
        }
        self.layout = l;
        Ok(l)
    }

    /// The MSI-X capability's offset.
    fn msix_cap(&mut self) -> Option<u16> {
        let mut ptr = self.cfg_read(0x34, 1);
        for _ in 0..48 {
            let p = u16::try_from(ptr).ok().filter(|p| *p != 0)?;
            if self.cfg_read(p, 1) == 0x11 {
                return Some(p);
            }
            ptr = self.cfg_read(p + 1, 1);
        }
        None
    }

    /// Programs MSI-X entry `v` with data `v + 0x30`, unmasked, and enables MSI-X.
    pub fn enable_msix(&mut self) -> Result<(), String> {
        let cap = self.msix_cap().ok_or("no MSI-X capability")?;
        for v in 0..u64::from(self.layout.msix_vectors) {
            let e = self.layout.msix_table + v * 16;
            self.mmio_write(e, MSI_ADDR, 4);
            self.mmio_write(e + 4, 0, 4);
            self.mmio_write(e + 8, 0x30 + v, 4);
            self.mmio_write(e + 12, 0, 4);
        }
        let ctl = self.cfg_read(cap + 2, 2);
        self.cfg_write(cap + 2, ctl | 0x8000, 2);
        Ok(())
    }

    /// Steps 4–5: reset, ACKNOWLEDGE, DRIVER, features (`accept` ∩ offered, plus VERSION_1),
    /// FEATURES_OK and its check. Returns the negotiated features.
    pub fn negotiate(&mut self, accept: u64) -> Result<u64, String> {
        self.common_write(common::STATUS, 0, 1);
        self.common_write(common::STATUS, u64::from(status::ACKNOWLEDGE), 1);
        self.common_write(
            common::STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        self.common_write(common::DFSELECT, 0, 4);
        let lo = self.common_read(common::DF, 4);
        self.common_write(common::DFSELECT, 1, 4);
        let hi = self.common_read(common::DF, 4);
        let offered = (hi << 32) | lo;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err("device does not offer VERSION_1".into());
        }
        let f = offered & (accept | VIRTIO_F_VERSION_1);
        self.common_write(common::GFSELECT, 0, 4);
        self.common_write(common::GF, f & 0xffff_ffff, 4);
        self.common_write(common::GFSELECT, 1, 4);
        self.common_write(common::GF, f >> 32, 4);
        let s = u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.common_write(common::STATUS, s, 1);
        if self.common_read(common::STATUS, 1) & u64::from(status::FEATURES_OK) == 0 {
            return Err("device refused the features".into());
        }
        Ok(f)
    }

    /// Step 6: sets up queue `q` with `size` entries (0: the maximum) at `base` (desc at base,
    /// avail at base + 0x1000, used at base + 0x2000), MSI-X vector `q + 1`.
    pub fn setup_queue(&mut self, q: u16, size: u16, base: u64) -> Result<DriverQueue, String> {
        self.common_write(common::Q_SELECT, u64::from(q), 2);
        let max = u16::try_from(self.common_read(common::Q_SIZE, 2)).unwrap_or(0);
        if max == 0 {
            return Err(format!("queue {q} does not exist"));
        }
        let size = if size == 0 { max } else { size };
        self.common_write(common::Q_SIZE, u64::from(size), 2);
        self.common_write(common::Q_MSIX, u64::from(q) + 1, 2);
        let notify_off = u16::try_from(self.common_read(common::Q_NOFF, 2)).unwrap_or(0);
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        for (reg, v) in [
            (common::Q_DESC, desc),
            (common::Q_AVAIL, avail),
            (common::Q_USED, used),
        ] {
            self.common_write(reg, v & 0xffff_ffff, 4);
            self.common_write(reg + 4, v >> 32, 4);
        }
        self.common_write(common::Q_ENABLE, 1, 2);
        let dq = DriverQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            notify_off,
        };
        let i = usize::from(q);
        if self.queues.len() <= i {
            self.queues.resize(i + 1, dq);
        }
        if let Some(s) = self.queues.get_mut(i) {
            *s = dq;
        }
        Ok(dq)
    }

    /// Steps 7–8: config vector 0, DRIVER_OK; returns the status read back.
    pub fn driver_ok(&mut self) -> u8 {
        self.common_write(common::MSIX, 0, 2);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.common_write(common::STATUS, u64::from(s), 1);
        u8::try_from(self.common_read(common::STATUS, 1)).unwrap_or(0)
    }

    /// The device status.
    pub fn status(&mut self) -> u8 {
        u8::try_from(self.common_read(common::STATUS, 1)).unwrap_or(0)
    }

    /// Reads the ISR (clears it).
    pub fn isr(&mut self) -> u8 {
        u8::try_from(self.mmio_read(self.layout.isr, 1)).unwrap_or(0)
    }

    /// Device configuration read.
    pub fn device_cfg(&mut self, off: u64, width: usize) -> u64 {
        self.mmio_read(self.layout.device + off, width)
    }

    /// Step 9: places a chain of `bufs` on queue `q` and publishes it (no notify). Returns the head.
    pub fn push(&mut self, q: u16, bufs: &[Buf]) -> Result<u16, String> {
        let dq = *self.queues.get(usize::from(q)).ok_or("no such queue")?;
        let n = u16::try_from(bufs.len()).map_err(|e| e.to_string())?;
        if n == 0 || n > dq.size {
            return Err("bad chain length".into());
        }
        let head = dq.next_desc % dq.size;
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let i = u16::try_from(i).map_err(|e| e.to_string())?;
            let idx = (head + i) % dq.size;
            let last = i + 1 == n;
            let flags: u16 = u16::from(!last) | (u16::from(*write) << 1);
            let next = (idx + 1) % dq.size;
            let d = dq.desc + u64::from(idx) * 16;
            self.write_desc(d, *addr, *len, flags, next)?;
        }
        let slot = dq.avail + 4 + u64::from(dq.avail_idx % dq.size) * 2;
        self.mem
            .write_obj(head, GuestAddress(slot))
            .map_err(|e| e.to_string())?;
        let idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(idx, GuestAddress(dq.avail + 2))
            .map_err(|e| e.to_string())?;
        if let Some(s) = self.queues.get_mut(usize::from(q)) {
            s.avail_idx = idx;
            s.next_desc = (head + n) % dq.size;
        }
        Ok(head)
    }

    /// Writes one raw descriptor at guest address `at`.
    pub fn write_desc(
        &self,
        at: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), String> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(at))
            .map_err(|e| e.to_string())
    }

    /// Writes the 16-bit queue index at the queue's notify address.
    pub fn notify(&mut self, q: u16) {
        let Some(dq) = self.queues.get(usize::from(q)).copied() else {
            return;
        };
        let at = self.layout.notify + u64::from(dq.notify_off) * u64::from(self.layout.notify_mult);
        self.mmio_write(at, u64::from(q), 2);
    }

    /// The used index of queue `q` in guest memory.
    pub fn used_idx(&self, q: u16) -> u16 {
        self.queues
            .get(usize::from(q))
            .and_then(|dq| self.mem.read_obj::<u16>(GuestAddress(dq.used + 2)).ok())
            .unwrap_or(0)
    }

    /// Step 10: waits (bounded) for the next used element of queue `q`: (id, len).
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> Result<(u32, u32), String> {
        let dq = *self.queues.get(usize::from(q)).ok_or("no such queue")?;
        let start = Instant::now();
        while self.used_idx(q) == dq.used_seen {
            if start.elapsed() > timeout {
                return Err(format!("queue {q}: no used element within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let e = dq.used + 4 + u64::from(dq.used_seen % dq.size) * 8;
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(e))
            .map_err(|e| e.to_string())?;
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(e + 4))
            .map_err(|e| e.to_string())?;
        if let Some(s) = self.queues.get_mut(usize::from(q)) {
            s.used_seen = s.used_seen.wrapping_add(1);
        }
        Ok((id, len))
    }

    /// The whole bring-up: discover, MSI-X, negotiate `accept`, queues at 0x10000 + 0x4000·q with
    /// their maximum size, DRIVER_OK.
    pub fn bring_up(&mut self, device: u16, accept: u64, msix: bool) -> Result<u64, String> {
        self.discover(device)?;
        if msix {
            self.enable_msix()?;
        }
        let f = self.negotiate(accept)?;
        let nq = u16::try_from(self.common_read(common::NUMQ, 2)).unwrap_or(0);
        for q in 0..nq {
            self.setup_queue(q, 0, 0x1_0000 + 0x4000 * u64::from(q))?;
        }
        let s = self.driver_ok();
        if s & status::DRIVER_OK == 0 || s & status::NEEDS_RESET != 0 {
            return Err(format!("DRIVER_OK refused: status {s:#x}"));
        }
        Ok(f)
    }
}

/// Which device a fuzz case drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuzzDevice {
    /// virtio-blk, writable image.
    Block,
    /// virtio-blk, read-only.
    BlockReadOnly,
    /// virtio-net over a socket pair.
    Net,
    /// virtio-console over a socket pair.
    Console,
    /// virtio-rnd.
    Rng,
}

/// What a fuzz case did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuzzReport {
    /// Chains completed.
    pub chains: u64,
    /// Whether the device ended in DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// Whether the device refused DRIVER_OK or features.
    pub refused: bool,
}

/// Size of the guest memory of a fuzz case.
pub const FUZZ_MEM: usize = 0x1_0000;

/// Runs one fuzz case: the bytes become the rings and buffers of the device's queues (guest memory
/// from 0x1000 on), byte 0 picks the queue size (any value, including non-powers of two), byte 1
/// which queues to notify. The device runs inline; the invariants a device must keep under any
/// input are checked and reported as `Err`.
pub fn fuzz_case(kind: FuzzDevice, data: &[u8]) -> Result<FuzzReport, String> {
    use crate::{blk, console, net, rng};
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM)]).map_err(|e| e.to_string())?;
    let end = data.len().min(FUZZ_MEM - 0x1000);
    mem.write_slice(data.get(..end).unwrap_or_default(), GuestAddress(0x1000))
        .map_err(|e| e.to_string())?;
    let mut peers: (Option<UnixDatagram>, Option<UnixStream>) = (None, None);
    let device: Box<dyn VirtioDevice> = match kind {
        FuzzDevice::Block | FuzzDevice::BlockReadOnly => {
            let path = std::env::temp_dir().join(format!(
                "virtio-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&path);
            f.set_len(0x4000).map_err(|e| e.to_string())?;
            let ro = kind == FuzzDevice::BlockReadOnly;
            Box::new(blk::Block::from_file(f, ro, false, "FUZZ").map_err(|e| e.to_string())?)
        }
        FuzzDevice::Net => {
            let (b, peer) = net::SocketBackend::pair().map_err(|e| e.to_string())?;
            peer.set_nonblocking(true).map_err(|e| e.to_string())?;
            for chunk in data.chunks(700).take(3) {
                let _ = peer.send(chunk);
            }
            peers.0 = Some(peer);
            Box::new(net::Net::new(Box::new(b), [0, 0xa0, 0x98, 0, 0, 1], None))
        }
        FuzzDevice::Console => {
            let (b, mut peer) = console::SocketConsole::pair().map_err(|e| e.to_string())?;
            peer.set_nonblocking(true).map_err(|e| e.to_string())?;
            let _ = std::io::Write::write(&mut peer, data.get(..end.min(512)).unwrap_or_default());
            peers.1 = Some(peer);
            Box::new(console::Console::new(Box::new(b)))
        }
        FuzzDevice::Rng => Box::new(rng::Rng::new()),
    };
    let h = Harness::with_memory(device, Execution::Inline, mem)?;
    let mut d = h.driver();
    let id = h.lock().pci().header_byte(2);
    d.discover(u16::from(id) - 0x40)?;
    d.enable_msix()?;
    // High bit set: the raw value (often not a power of two); else a valid power of two.
    let b0 = data.first().copied().unwrap_or(4);
    let size = if b0 & 0x80 != 0 {
        u16::from(b0 & 0x7f)
    } else {
        1u16 << (b0 % 7)
    };
    let which = data.get(1).copied().unwrap_or(0xff);
    let mut report = FuzzReport::default();
    if d.negotiate(u64::MAX).is_err() {
        return Err("a well-behaved negotiation was refused".into());
    }
    let nq = h.lock().num_queues();
    for q in 0..nq {
        // Queue q's rings at 0x1000 + 0x3000·q: the fuzz bytes are their contents.
        let base = 0x1000 + 0x3000 * u64::from(q);
        d.setup_queue(q, size, base)?;
        // setup_queue lays avail/used at +0x1000/+0x2000 of base.
    }
    let st = d.driver_ok();
    if st & status::NEEDS_RESET != 0 {
        report.refused = true;
        let valid = size.is_power_of_two() && size <= 64;
        if valid && kind == FuzzDevice::Rng {
            return Err(format!("valid queue size {size} refused"));
        }
        return Ok(report);
    }
    for round in 0..2 {
        for q in 0..nq {
            if which & (1 << ((q + round) % 8)) != 0 {
                d.notify(q);
            }
        }
        h.lock().poll_backend();
    }
    let dev = h.lock();
    let stats = dev.stats();
    report.chains = crate::log::VirtioStats::get(&stats.chains);
    report.needs_reset = dev.status() & status::NEEDS_RESET != 0;
    let nr = crate::log::VirtioStats::get(&stats.needs_reset);
    if report.needs_reset != (nr == 1) {
        return Err(format!(
            "needs_reset status {} but counter {nr}",
            report.needs_reset
        ));
    }
    // Each handler call takes at most CHAIN_BUDGET chains, however the guest rewrites its rings.
    let calls = 2 * (u64::from(nq) + 1);
    let bound = calls * crate::device::CHAIN_BUDGET as u64;
    if report.chains > bound {
        return Err(format!(
            "{} chains completed from rings of {size}",
            report.chains
        ));
    }
    if kind == FuzzDevice::BlockReadOnly
        && crate::log::VirtioStats::get(&stats.bytes_from_guest) != 0
    {
        return Err("a read-only device accepted written bytes".into());
    }
    drop(peers);
    Ok(report)
}
