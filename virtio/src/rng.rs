//! virtio-rng, bhyve's `virtio-rnd` (virtio 1.2 §5.4): one queue, the device fills each
//! device-writable buffer with bytes from getrandom(2), at most [`MAX_PER_REQUEST`] per chain (the
//! used length says how many; the spec allows fewer than asked).

use crate::device::{device_id, ActivateError, DeviceError, QueueCtx, QueueHandler, VirtioDevice};
use crate::log::VirtioStats;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
/// Bytes of entropy per request at most.
pub const MAX_PER_REQUEST: usize = 64 * 1024;

/// The virtio-rng device type.
#[derive(Debug, Default)]
pub struct Rng;

impl Rng {
    /// An entropy device.
    pub fn new() -> Self {
        Self
    }
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u16 {
        device_id::RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn config_len(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn pci_class(&self) -> (u8, u8, u8) {
        (0xff, 0x00, 0x00)
    }
    fn activate(&mut self, _features: u64) -> Result<Box<dyn QueueHandler>, ActivateError> {
        Ok(Box::new(RngHandler {
            buf: vec![0; MAX_PER_REQUEST],
        }))
    }
    fn reset(&mut self, _handler: Option<Box<dyn QueueHandler>>) {}
    fn name(&self) -> &'static str {
        "virtio-rnd"
    }
}

/// Fills `buf` from getrandom(2).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let rc = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(rc) {
            Ok(n) => done += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// The request processing of an active virtio-rng.
#[derive(Debug)]
pub struct RngHandler {
    buf: Vec<u8>,
}

impl QueueHandler for RngHandler {
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut used = false;
        while let Some(chain) = ctx.pop(q)? {
            let want = usize::try_from(chain.writable_len())
                .unwrap_or(MAX_PER_REQUEST)
                .min(MAX_PER_REQUEST);
            let buf = self.buf.get_mut(..want).unwrap_or_default();
            let len = match fill_random(buf) {
                Ok(()) => chain.writer().write(ctx.mem, buf)?,
                Err(e) => {
                    VirtioStats::inc(&ctx.signals.stats.io_errors);
                    ctx.signals.log.log(format_args!("getrandom failed: {e}"));
                    0
                }
            };
            VirtioStats::add(
                &ctx.signals.stats.bytes_to_guest,
                u64::try_from(len).unwrap_or(0),
            );
            ctx.add_used(q, chain.head, u32::try_from(len).unwrap_or(0))?;
            used = true;
        }
        if used {
            ctx.signal(q);
        }
        Ok(())
    }
}
