//! What a virtio device type provides to the PCI transport, and what its queue handler sees.
//!
//! A device type has two halves:
//!
//! * [`VirtioDevice`] — identity, offered features, queue sizes and the device-specific
//!   configuration structure; it lives with the transport, under the device's lock, on the
//!   device-model thread.
//! * [`QueueHandler`] — the request processing, handed out by [`VirtioDevice::activate`] when the
//!   driver sets DRIVER_OK and handed back by [`VirtioDevice::reset`]. It runs on the device's
//!   worker thread (or inline on the device-model thread, see `transport::Execution`), with a
//!   [`QueueCtx`]: guest memory, the live queues and the interrupt [`Signals`].

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::log::{Logger, VirtioStats};
use crate::pci::{IntxPin, Msix, MsixOutcome};
use crate::queue::{Chain, QueueError};

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_INDIRECT_DESC.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// The MSI-X "no vector" value.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER.
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED.
    pub const FAILED: u8 = 0x80;
}

/// Virtio device IDs (virtio 1.x §5).
pub mod device_id {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
    /// Console.
    pub const CONSOLE: u16 = 3;
    /// Entropy source.
    pub const RNG: u16 = 4;
}

/// Why a handler stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The guest broke the queue protocol: the device enters DEVICE_NEEDS_RESET.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The host backend is gone for good (a tap that disappeared, a closed socket): the queues stop.
    #[error("Backend failed: {0}")]
    Backend(#[source] std::io::Error),
}

/// Why a device could not be activated (a host problem; the device enters DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The backend was lost in an earlier reset that did not finish.
    #[error("Backend is not available (lost in an unfinished reset)")]
    NoBackend,
    /// Configuring the backend for the negotiated features failed.
    #[error("Cannot configure the backend: {0}")]
    Backend(#[source] std::io::Error),
}

/// A virtio device type, as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID ([`device_id`]).
    fn device_id(&self) -> u16;
    /// Device feature bits offered (VERSION_1 and INDIRECT_DESC are added by the transport).
    fn features(&self) -> u64;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Length of the device-specific configuration structure.
    fn config_len(&self) -> u64;
    /// Reads the device-specific configuration at `offset` (all of `data`; past the end reads 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration (most fields are read-only: the default drops it).
    /// Returns `false` if the write was refused.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }
    /// PCI class, subclass and programming interface.
    fn pci_class(&self) -> (u8, u8, u8);
    /// Starts processing with the negotiated `features`.
    fn activate(&mut self, features: u64) -> Result<Box<dyn QueueHandler>, ActivateError>;
    /// Takes the handler back after a reset (to recover the backend for the next activation).
    fn reset(&mut self, handler: Option<Box<dyn QueueHandler>>);
    /// Short name for logs ("virtio-blk").
    fn name(&self) -> &'static str;
}

/// The request processing of an active device.
pub trait QueueHandler: Send {
    /// The driver notified queue `q` (or the transport asks for a pass after activation).
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError>;
    /// Host descriptors the worker should wait on for readability now, each with a token for
    /// [`QueueHandler::fd_ready`]. A handler lists a descriptor only while it can take input, so a
    /// readable descriptor it cannot serve never makes the worker spin.
    fn wait_fds(&self, _out: &mut Vec<(RawFd, u32)>) {}
    /// A descriptor from [`QueueHandler::wait_fds`] is readable (or hung up).
    fn fd_ready(&mut self, _token: u32, _ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The queues are going away (reset, stop): finish or wait for work started on other threads.
    /// Called on the worker thread before it hands the handler back; the transport bounds how long
    /// it waits for that.
    fn quiesce(&mut self) {}
    /// Gives the backend back (at reset), for the device to use in its next activation.
    fn into_backend(self: Box<Self>) -> Option<Box<dyn std::any::Any + Send>> {
        None
    }
}

/// Interrupts and the device-side status bits, shared by the register side and the worker.
pub struct Signals {
    msix: Arc<Msix>,
    intx: Arc<IntxPin>,
    isr: AtomicU8,
    status: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// Counters of the function.
    pub stats: Arc<VirtioStats>,
    /// The function's log.
    pub log: Arc<Logger>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals")
            .field("isr", &self.isr)
            .field("status", &self.status)
            .finish()
    }
}

/// ISR bit 0: a queue interrupt; bit 1: a configuration change.
pub const ISR_QUEUE: u8 = 1;
/// ISR configuration-change bit.
pub const ISR_CONFIG: u8 = 2;

impl Signals {
    /// Signals for `queues` queues.
    pub fn new(
        msix: Arc<Msix>,
        intx: Arc<IntxPin>,
        queues: usize,
        stats: Arc<VirtioStats>,
        log: Arc<Logger>,
    ) -> Self {
        Self {
            msix,
            intx,
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            stats,
            log,
        }
    }

    fn raise(&self, vector: u16, isr_bit: u8) {
        match self.msix.notify(vector) {
            MsixOutcome::Delivered | MsixOutcome::Pending | MsixOutcome::NoSuchVector => {}
            MsixOutcome::Disabled => {
                self.isr.fetch_or(isr_bit, Ordering::AcqRel);
                self.intx.set_requested(true);
            }
        }
    }

    /// Raises queue `q`'s interrupt (its MSI-X vector, or INTx with ISR bit 0).
    pub fn signal_queue(&self, q: u16) {
        VirtioStats::inc(&self.stats.queue_interrupts);
        let v = self
            .queue_vectors
            .get(usize::from(q))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.raise(v, ISR_QUEUE);
    }

    /// Raises the configuration-change interrupt.
    pub fn signal_config(&self) {
        VirtioStats::inc(&self.stats.config_interrupts);
        self.raise(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }

    /// Enters DEVICE_NEEDS_RESET (once) and tells the driver.
    pub fn needs_reset(&self, why: &dyn std::fmt::Display) {
        let old = self.status.fetch_or(status::NEEDS_RESET, Ordering::AcqRel);
        if old & status::NEEDS_RESET == 0 {
            VirtioStats::inc(&self.stats.needs_reset);
            self.log.log(format_args!("device needs reset: {why}"));
            if old & status::DRIVER_OK != 0 {
                self.signal_config();
            }
        }
    }

    /// Reads and clears the ISR (INTx deasserts).
    pub fn take_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::AcqRel);
        self.intx.set_requested(false);
        v
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    pub(crate) fn set_status(&self, v: u8) {
        self.status.store(v, Ordering::Release);
    }

    pub(crate) fn set_queue_vector(&self, q: usize, v: u16) {
        if let Some(slot) = self.queue_vectors.get(q) {
            slot.store(v, Ordering::Release);
        }
    }

    pub(crate) fn queue_vector(&self, q: usize) -> u16 {
        self.queue_vectors
            .get(q)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_config_vector(&self, v: u16) {
        self.config_vector.store(v, Ordering::Release);
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub(crate) fn clear_isr(&self) {
        self.isr.store(0, Ordering::Release);
        self.intx.set_requested(false);
    }
}

/// Chains one handler call may take before it must yield (the rest wait for the next pass). A
/// guest whose buffers overwrite its own available index could otherwise keep a device busy
/// forever without spending a cycle of its own.
pub const CHAIN_BUDGET: usize = 1024;

/// What a handler works with.
pub struct QueueCtx<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The queues, by index; a queue the driver did not enable is not ready.
    pub queues: &'a mut [Queue],
    /// Interrupts, status, counters, log.
    pub signals: &'a Signals,
    /// Chains popped in this call.
    pub(crate) popped: usize,
    /// Queues left with work when the budget ran out (bit per queue).
    pub(crate) more: u64,
}

impl std::fmt::Debug for QueueCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueCtx")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl<'a> QueueCtx<'a> {
    /// The next checked chain of queue `q`, if any (a queue not enabled never has one).
    pub fn pop(&mut self, q: u16) -> Result<Option<Chain>, QueueError> {
        if self.popped >= CHAIN_BUDGET {
            self.more |= 1u64.checked_shl(u32::from(q)).unwrap_or(0);
            return Ok(None);
        }
        let chain = match self.queues.get_mut(usize::from(q)) {
            Some(queue) if queue.ready() => Chain::pop(queue, self.mem)?,
            _ => None,
        };
        if chain.is_some() {
            self.popped += 1;
        }
        Ok(chain)
    }

    /// A context over `queues` (for handlers driven outside the transport: fuzzing, benchmarks).
    pub fn new(mem: &'a GuestMemoryMmap, queues: &'a mut [Queue], signals: &'a Signals) -> Self {
        Self {
            mem,
            queues,
            signals,
            popped: 0,
            more: 0,
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, q: u16, head: u16, len: u32) -> Result<(), QueueError> {
        let queue = self
            .queues
            .get_mut(usize::from(q))
            .ok_or(QueueError::Ring(format!("no queue {q}")))?;
        queue
            .add_used(self.mem, head, len)
            .map_err(|e| QueueError::Ring(e.to_string()))?;
        VirtioStats::inc(&self.signals.stats.chains);
        Ok(())
    }

    /// Raises queue `q`'s interrupt.
    pub fn signal(&self, q: u16) {
        self.signals.signal_queue(q);
    }

    /// Whether queue `q` is enabled.
    pub fn ready(&self, q: u16) -> bool {
        self.queues.get(usize::from(q)).is_some_and(|q| q.ready())
    }
}
