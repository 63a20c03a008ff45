//! virtio-net on a tap device (virtio 1.2 §5.1; bhyve's `pci_virtio_net.c`).
//!
//! Queue 0 receives (host → guest), queue 1 transmits. Every frame crossing the backend carries the
//! 12-byte virtio 1.x header (`virtio_net_hdr_v1`) in front: the tap is opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12, so the header passes through
//! unchanged in both directions. Offloads only as negotiated: the device offers checksum and TSO
//! only if the backend can do them, and at activation `TUNSETOFFLOAD` enables exactly the guest
//! offloads the driver accepted (none: the tap hands over complete, checksummed frames).
//! No mergeable RX buffers: a frame must fit one chain; one that does not is dropped (counted).
//!
//! The backend is a [`NetBackend`]: [`Tap`] for real use, [`SocketBackend`] (a Unix datagram
//! socket pair) for tests. A backend that fails for good (the tap disappeared) stops the queues
//! with a rate-limited log line; a full host queue drops the frame, as a NIC would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;

use crate::device::{device_id, ActivateError, DeviceError, QueueCtx, QueueHandler, VirtioDevice};
use crate::log::VirtioStats;

/// Size of the virtio 1.x net header.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame with its header (64 KiB GSO frame + Ethernet/VLAN header + virtio header).
pub const MAX_FRAME: usize = 65_562;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Frames moved per wake-up before the worker looks at the other queue again.
const BUDGET: usize = 64;

/// Feature bits.
pub mod features {
    /// Device handles packets with partial checksum (host offload).
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (guest offload).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` field valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` field valid.
    pub const MAC: u64 = 1 << 5;
    /// Guest can receive TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Guest can receive TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Device can receive TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device can receive TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// `status` field valid.
    pub const STATUS: u64 = 1 << 16;
}

/// Where frames go and come from. Frames include the 12-byte header.
pub trait NetBackend: Send {
    /// Reads one frame into `buf`; `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Readable when a frame is waiting.
    fn fd(&self) -> RawFd;
    /// Whether checksum / TSO offloads can be offered.
    fn offloads_supported(&self) -> bool {
        false
    }
    /// Enables the offloads the driver negotiated (guest feature bits).
    fn set_offloads(&mut self, _features: u64) -> std::io::Result<()> {
        Ok(())
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 1;
const TUN_F_TSO4: libc::c_uint = 2;
const TUN_F_TSO6: libc::c_uint = 4;

/// A Linux tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens (or creates, with CAP_NET_ADMIN) tap interface `name` on `/dev/net/tun`.
    pub fn open(name: &str) -> std::io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tap name {name:?} must be 1 to 15 bytes"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = libc::c_char::from_ne_bytes([s]);
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is, for the call's duration.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) };
        ioctl_result(rc)?;
        let hdr: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) };
        ioctl_result(rc)?;
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.set_offload_flags(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_offload_flags(&self, flags: libc::c_uint) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags) };
        ioctl_result(rc)
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn offloads_supported(&self) -> bool {
        true
    }
    fn set_offloads(&mut self, f: u64) -> std::io::Result<()> {
        let mut flags = 0;
        if f & features::GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if f & features::GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if f & features::GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
        }
        self.set_offload_flags(flags)
    }
}

/// One end of a Unix datagram socket pair: each datagram is one frame (header included).
#[derive(Debug)]
pub struct SocketBackend {
    sock: UnixDatagram,
}

impl SocketBackend {
    /// A backend and the peer socket a test (or another process) talks to.
    pub fn pair() -> std::io::Result<(Self, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        Ok((Self { sock: a }, b))
    }
}

impl NetBackend for SocketBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A MAC address.
pub type Mac = [u8; 6];

/// bhyve's default MAC: the NetApp OUI 00:a0:98 and three bytes of a digest of the VM name and the
/// slot (bhyve uses MD5 of "slot-function-vmname"; any stable digest serves).
pub fn default_mac(vm_name: &str, slot: u8, function: u8) -> Mac {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{slot}-{function}-{vm_name}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x00, 0xa0, 0x98, b[0], b[1], b[2]]
}

/// The virtio-net device type.
pub struct Net {
    backend: Option<Box<dyn NetBackend>>,
    mac: Mac,
    mtu: Option<u16>,
    offloads: bool,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl Net {
    /// A NIC with address `mac` (and an advertised `mtu`) over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: Mac, mtu: Option<u16>) -> Self {
        let offloads = backend.offloads_supported();
        Self {
            backend: Some(backend),
            mac,
            mtu,
            offloads,
        }
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u16 {
        device_id::NET
    }
    fn features(&self) -> u64 {
        let mut f = features::MAC | features::STATUS;
        if self.mtu.is_some() {
            f |= features::MTU;
        }
        if self.offloads {
            f |= features::CSUM
                | features::GUEST_CSUM
                | features::GUEST_TSO4
                | features::GUEST_TSO6
                | features::HOST_TSO4
                | features::HOST_TSO6;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn config_len(&self) -> u64 {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn pci_class(&self) -> (u8, u8, u8) {
        (0x02, 0x00, 0x00)
    }
    fn activate(&mut self, features: u64) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let mut backend = self.backend.take().ok_or(ActivateError::NoBackend)?;
        if let Err(e) = backend.set_offloads(features) {
            self.backend = Some(backend);
            return Err(ActivateError::Backend(e));
        }
        Ok(Box::new(NetHandler {
            backend,
            frame: vec![0; MAX_FRAME],
            pending: None,
        }))
    }
    fn reset(&mut self, handler: Option<Box<dyn QueueHandler>>) {
        if let Some(b) = handler
            .and_then(|h| h.into_backend())
            .and_then(|b| b.downcast::<Box<dyn NetBackend>>().ok())
        {
            self.backend = Some(*b);
        }
    }
    fn name(&self) -> &'static str {
        "virtio-net"
    }
}

/// The request processing of an active virtio-net.
pub struct NetHandler {
    backend: Box<dyn NetBackend>,
    frame: Vec<u8>,
    /// Length of a received frame waiting in `frame` for an RX buffer.
    pending: Option<usize>,
}

impl std::fmt::Debug for NetHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandler")
            .field("pending", &self.pending)
            .finish()
    }
}

const RXQ: u16 = 0;
const TXQ: u16 = 1;

/// Whether a backend error means the backend is gone for good.
fn backend_gone(e: &std::io::Error) -> bool {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => false,
        _ => !matches!(
            e.raw_os_error(),
            Some(libc::ENOBUFS | libc::EMSGSIZE | libc::EINVAL)
        ),
    }
}

impl NetHandler {
    /// Delivers the pending frame and then whatever the backend has, up to the budget. Returns
    /// whether a frame reached the guest.
    fn receive(&mut self, ctx: &mut QueueCtx<'_>) -> Result<bool, DeviceError> {
        let mut delivered = false;
        for _ in 0..BUDGET {
            let len = match self.pending {
                Some(l) => l,
                None => match self.backend.read_frame(&mut self.frame) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if !backend_gone(&e) => break,
                    Err(e) => return Err(DeviceError::Backend(e)),
                },
            };
            self.pending = Some(len);
            let Some(chain) = ctx.pop(RXQ)? else {
                // No buffer: keep the frame, stop reading the backend until the driver adds some.
                break;
            };
            self.pending = None;
            let stats = &ctx.signals.stats;
            let frame = self.frame.get_mut(..len).unwrap_or_default();
            let used = if len < NET_HDR_LEN
                || chain.writable_len() < u64::try_from(len).unwrap_or(u64::MAX)
            {
                VirtioStats::inc(&stats.dropped);
                0
            } else {
                // num_buffers: always 1 (no mergeable buffers).
                if let Some(nb) = frame.get_mut(10..12) {
                    nb.copy_from_slice(&1u16.to_le_bytes());
                }
                let n = chain.writer().write(ctx.mem, frame)?;
                VirtioStats::add(&stats.bytes_to_guest, u64::try_from(n).unwrap_or(0));
                u32::try_from(n).unwrap_or(0)
            };
            ctx.add_used(RXQ, chain.head, used)?;
            delivered = true;
        }
        if delivered {
            ctx.signal(RXQ);
        }
        Ok(delivered)
    }

    fn transmit(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut used = false;
        let mut gone = None;
        while let Some(chain) = ctx.pop(TXQ)? {
            let stats = &ctx.signals.stats;
            let len = chain.readable_len();
            if gone.is_some() || len < NET_HDR_LEN as u64 || len > MAX_FRAME as u64 {
                VirtioStats::inc(&stats.dropped);
            } else {
                let n = chain.reader().read(ctx.mem, &mut self.frame)?;
                match self
                    .backend
                    .write_frame(self.frame.get(..n).unwrap_or_default())
                {
                    Ok(()) => {
                        VirtioStats::add(&stats.bytes_from_guest, u64::try_from(n).unwrap_or(0))
                    }
                    Err(e) if backend_gone(&e) => {
                        VirtioStats::inc(&stats.io_errors);
                        gone = Some(e);
                    }
                    Err(_) => VirtioStats::inc(&stats.dropped),
                }
            }
            ctx.add_used(TXQ, chain.head, 0)?;
            used = true;
        }
        if used {
            ctx.signal(TXQ);
        }
        match gone {
            Some(e) => Err(DeviceError::Backend(e)),
            None => Ok(()),
        }
    }
}

impl QueueHandler for NetHandler {
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        match q {
            RXQ => self.receive(ctx).map(|_| ()),
            TXQ => self.transmit(ctx),
            _ => Ok(()),
        }
    }
    fn wait_fds(&self, out: &mut Vec<(RawFd, u32)>) {
        if self.pending.is_none() {
            out.push((self.backend.fd(), 0));
        }
    }
    fn fd_ready(&mut self, _token: u32, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        self.receive(ctx).map(|_| ())
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.backend))
    }
}
