//! virtio-blk on a raw image file or a block device (virtio 1.2 §5.2; bhyve's `pci_virtio_block.c`).
//!
//! Requests: IN (read), OUT (write), FLUSH (fsync), GET_ID (the serial, 20 bytes), DISCARD and
//! WRITE_ZEROES (fallocate `PUNCH_HOLE` / `ZERO_RANGE`, offered only when the host file system
//! supports hole punching and the image is writable). A read-only image advertises
//! `VIRTIO_BLK_F_RO` and answers writes, discards and write-zeroes with `VIRTIO_BLK_S_IOERR`.
//!
//! I/O runs on the device's worker thread with positional reads and writes (`pread`/`pwrite`)
//! through a 64 KiB bounce buffer — off the vCPU thread, one request at a time. io_uring would let
//! one worker keep several requests in flight; it is the next step, not done yet.
//!
//! Every outcome reaches the guest through [`status_of`], one exhaustive match: guest mistakes
//! that still leave a status byte to write (bad sector, odd length, short header) are IOERR,
//! unknown request types UNSUPP, host errors by errno (EIO, ENOSPC, … IOERR; EOPNOTSUPP UNSUPP). A
//! chain with no writable status byte cannot be answered: DEVICE_NEEDS_RESET.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;

use crate::device::{device_id, ActivateError, DeviceError, QueueCtx, QueueHandler, VirtioDevice};
use crate::log::VirtioStats;
use crate::queue::{Chain, QueueError};

/// Sector size of the protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
const BOUNCE: usize = 64 * 1024;

/// Feature bits.
pub mod features {
    /// Maximum segments in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const RO: u64 = 1 << 5;
    /// Block size in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH supported.
    pub const FLUSH: u64 = 1 << 9;
    /// DISCARD supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Errors opening an image (operator input).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("Cannot open {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its size could not be read.
    #[error("Cannot read the size of {path}: {source}")]
    Size {
        /// Image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a request failed, before it becomes a status byte.
#[derive(Debug)]
pub enum RequestError {
    /// A write-class request on a read-only device.
    ReadOnly,
    /// Sectors past the end of the image.
    OutOfRange,
    /// Data length not a multiple of 512, or a header/segment shorter than its structure.
    BadLength,
    /// A request type this device does not implement (or did not offer).
    Unsupported(u32),
    /// The host failed.
    Host(std::io::Error),
}

/// The guest-visible status of a request outcome: the one place host errors become virtio
/// statuses.
pub fn status_of(r: &Result<(), RequestError>) -> u8 {
    match r {
        Ok(()) => status::OK,
        Err(RequestError::ReadOnly) => status::IOERR,
        Err(RequestError::OutOfRange) => status::IOERR,
        Err(RequestError::BadLength) => status::IOERR,
        Err(RequestError::Unsupported(_)) => status::UNSUPP,
        Err(RequestError::Host(e)) => match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => status::UNSUPP,
            Some(libc::EIO | libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EROFS) => {
                status::IOERR
            }
            Some(_) | None => status::IOERR,
        },
    }
}

/// How to open an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockOptions {
    /// Image path.
    pub path: PathBuf,
    /// Read-only (`ro`).
    pub read_only: bool,
    /// `sync` / `direct`: open with O_SYNC.
    pub sync: bool,
    /// `nodelete`: do not offer DISCARD / WRITE_ZEROES.
    pub no_delete: bool,
    /// `ser=`: the GET_ID answer (at most 20 bytes); default derived from the path like bhyve.
    pub serial: Option<String>,
}

/// bhyve's default identifier: "BHYVE-" and three groups of four hex digits from a digest of the
/// path (bhyve uses MD5; any stable digest serves).
pub fn default_serial(path: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "BHYVE-{:04X}-{:04X}-{:04X}",
        (h >> 48) & 0xffff,
        (h >> 32) & 0xffff,
        (h >> 16) & 0xffff
    )
}

/// The virtio-blk device type.
#[derive(Debug)]
pub struct Block {
    file: Option<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    discard: bool,
}

fn probe_punch_hole(file: &File, at: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(at) else {
        return false;
    };
    // Punching a hole past the end of the file changes nothing (KEEP_SIZE) and fails with
    // EOPNOTSUPP where the file system cannot do it.
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            4096,
        )
    };
    rc == 0
}

/// The size of an image: a regular file's length, or where a block device ends (its metadata
/// says 0 bytes; bhyve(8) takes disks, partitions and zvols as well as files).
fn image_len(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // I/O is positional (pread/pwrite): the file offset this moves is never used.
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

impl Block {
    /// Opens the image named by `opts`.
    pub fn open(opts: &BlockOptions) -> Result<Self, BlockError> {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.sync {
            oo.custom_flags(libc::O_SYNC);
        }
        let file = oo.open(&opts.path).map_err(|source| BlockError::Open {
            path: opts.path.clone(),
            source,
        })?;
        let serial = opts
            .serial
            .clone()
            .unwrap_or_else(|| default_serial(&opts.path));
        Self::from_file(file, opts.read_only, opts.no_delete, &serial).map_err(|source| {
            BlockError::Size {
                path: opts.path.clone(),
                source,
            }
        })
    }

    /// A device over an open `file`.
    pub fn from_file(
        file: File,
        read_only: bool,
        no_delete: bool,
        serial: &str,
    ) -> std::io::Result<Self> {
        let len = image_len(&file)?;
        let mut id = [0u8; ID_LEN];
        for (d, s) in id.iter_mut().zip(serial.bytes()) {
            *d = s;
        }
        let discard = !read_only && !no_delete && probe_punch_hole(&file, len);
        Ok(Self {
            file: Some(file),
            read_only,
            capacity: len / SECTOR_SIZE,
            id,
            discard,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether DISCARD and WRITE_ZEROES are offered.
    pub fn discard_supported(&self) -> bool {
        self.discard
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let mut put = |off: usize, b: &[u8]| {
            if let Some(d) = c.get_mut(off..off + b.len()) {
                d.copy_from_slice(b);
            }
        };
        put(0, &self.capacity.to_le_bytes());
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &512u32.to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        if self.discard {
            let max = u32::MAX / 512;
            put(36, &max.to_le_bytes()); // max_discard_sectors
            put(40, &1u32.to_le_bytes()); // max_discard_seg
            put(44, &1u32.to_le_bytes()); // discard_sector_alignment
            put(48, &max.to_le_bytes()); // max_write_zeroes_sectors
            put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
            put(56, &[1]); // write_zeroes_may_unmap
        }
        c
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u16 {
        device_id::BLOCK
    }
    fn features(&self) -> u64 {
        let mut f = features::SEG_MAX | features::BLK_SIZE | features::FLUSH;
        if self.read_only {
            f |= features::RO;
        }
        if self.discard {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn config_len(&self) -> u64 {
        60
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
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
        (0x01, 0x00, 0x00)
    }
    fn activate(&mut self, features: u64) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let file = self.file.take().ok_or(ActivateError::NoBackend)?;
        Ok(Box::new(BlockHandler {
            file,
            read_only: self.read_only,
            capacity: self.capacity,
            id: self.id,
            discard: self.discard && features & features::DISCARD != 0,
            write_zeroes: self.discard && features & features::WRITE_ZEROES != 0,
            buf: vec![0; BOUNCE],
        }))
    }
    fn reset(&mut self, handler: Option<Box<dyn QueueHandler>>) {
        if let Some(f) = handler
            .and_then(|h| h.into_backend())
            .and_then(|b| b.downcast::<File>().ok())
        {
            self.file = Some(*f);
        }
    }
    fn name(&self) -> &'static str {
        "virtio-blk"
    }
}

/// The request processing of an active virtio-blk.
#[derive(Debug)]
pub struct BlockHandler {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    discard: bool,
    write_zeroes: bool,
    buf: Vec<u8>,
}

impl BlockHandler {
    fn check_range(&self, sector: u64, bytes: u64) -> Result<u64, RequestError> {
        if bytes % SECTOR_SIZE != 0 {
            return Err(RequestError::BadLength);
        }
        let end = sector
            .checked_add(bytes / SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)?;
        if end > self.capacity {
            return Err(RequestError::OutOfRange);
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)
    }

    /// Runs one request; returns the bytes written into the guest's buffers (status included).
    fn request(
        &mut self,
        chain: &Chain,
        mem: &GuestMemoryMmap,
        stats: &VirtioStats,
    ) -> Result<u32, QueueError> {
        let mut w = chain.writer();
        let Some(mut status_cur) = w.split_tail(1) else {
            return Err(QueueError::Layout {
                head: chain.head,
                what: "no writable status byte",
            });
        };
        let mut r = chain.reader();
        let mut hdr = [0u8; 16];
        let got = r.read(mem, &mut hdr)?;
        let mut written: u64 = 0;
        let result = if got < hdr.len() {
            Err(RequestError::BadLength)
        } else {
            let [t0, t1, t2, t3, _, _, _, _, s @ ..] = hdr;
            let rtype = u32::from_le_bytes([t0, t1, t2, t3]);
            let sector = u64::from_le_bytes(s);
            self.execute(rtype, sector, &mut r, &mut w, mem, &mut written, stats)
        };
        if let Err(RequestError::Host(_)) = &result {
            VirtioStats::inc(&stats.io_errors);
        }
        if result.is_err() {
            VirtioStats::inc(&stats.request_errors);
        }
        status_cur.write(mem, &[status_of(&result)])?;
        Ok(u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX))
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        rtype: u32,
        sector: u64,
        r: &mut crate::queue::Cursor<'_>,
        w: &mut crate::queue::Cursor<'_>,
        mem: &GuestMemoryMmap,
        written: &mut u64,
        stats: &VirtioStats,
    ) -> Result<(), RequestError> {
        match rtype {
            req::IN => {
                let mut off = self.check_range(sector, w.remaining())?;
                while w.remaining() > 0 {
                    let n = usize::try_from(w.remaining()).unwrap_or(BOUNCE).min(BOUNCE);
                    let buf = self.buf.get_mut(..n).ok_or(RequestError::BadLength)?;
                    self.file
                        .read_exact_at(buf, off)
                        .map_err(RequestError::Host)?;
                    let put = w.write(mem, buf).map_err(|_| RequestError::BadLength)?;
                    let put = u64::try_from(put).unwrap_or(0);
                    *written += put;
                    off += put;
                    VirtioStats::add(&stats.bytes_to_guest, put);
                }
                Ok(())
            }
            req::OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let mut off = self.check_range(sector, r.remaining())?;
                while r.remaining() > 0 {
                    let n = usize::try_from(r.remaining()).unwrap_or(BOUNCE).min(BOUNCE);
                    let buf = self.buf.get_mut(..n).ok_or(RequestError::BadLength)?;
                    let got = r.read(mem, buf).map_err(|_| RequestError::BadLength)?;
                    let data = buf.get(..got).ok_or(RequestError::BadLength)?;
                    self.file
                        .write_all_at(data, off)
                        .map_err(RequestError::Host)?;
                    let got = u64::try_from(got).unwrap_or(0);
                    off += got;
                    VirtioStats::add(&stats.bytes_from_guest, got);
                }
                Ok(())
            }
            req::FLUSH => self.file.sync_all().map_err(RequestError::Host),
            req::GET_ID => {
                let put = w
                    .write(mem, &self.id)
                    .map_err(|_| RequestError::BadLength)?;
                *written += u64::try_from(put).unwrap_or(0);
                Ok(())
            }
            req::DISCARD | req::WRITE_ZEROES => {
                let offered = if rtype == req::DISCARD {
                    self.discard
                } else {
                    self.write_zeroes
                };
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                if !offered {
                    return Err(RequestError::Unsupported(rtype));
                }
                // max_*_seg is 1: exactly one 16-byte segment.
                if r.remaining() != 16 {
                    return Err(RequestError::BadLength);
                }
                let mut seg = [0u8; 16];
                r.read(mem, &mut seg).map_err(|_| RequestError::BadLength)?;
                let [a0, a1, a2, a3, a4, a5, a6, a7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
                let start = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
                let count = u64::from(u32::from_le_bytes([n0, n1, n2, n3]));
                let flags = u32::from_le_bytes([f0, f1, f2, f3]);
                if flags & !1 != 0 || (rtype == req::DISCARD && flags != 0) {
                    return Err(RequestError::Unsupported(rtype));
                }
                let off = self.check_range(start, count * SECTOR_SIZE)?;
                let mode = if rtype == req::WRITE_ZEROES && flags & 1 == 0 {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                match fallocate(&self.file, mode, off, count * SECTOR_SIZE) {
                    // A file system that punches holes but cannot zero a range: a hole reads
                    // back as zeroes too.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                            && mode & libc::FALLOC_FL_ZERO_RANGE != 0 =>
                    {
                        fallocate(
                            &self.file,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            off,
                            count * SECTOR_SIZE,
                        )
                    }
                    other => other,
                }
                .map_err(RequestError::Host)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }
}

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let off = libc::off_t::try_from(off).map_err(|_| bad())?;
    let len = libc::off_t::try_from(len).map_err(|_| bad())?;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl QueueHandler for BlockHandler {
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut used = false;
        while let Some(chain) = ctx.pop(q)? {
            let len = self.request(&chain, ctx.mem, &ctx.signals.stats)?;
            ctx.add_used(q, chain.head, len)?;
            used = true;
        }
        if used {
            ctx.signal(q);
        }
        Ok(())
    }

    fn into_backend(self: Box<Self>) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.file))
    }
}
