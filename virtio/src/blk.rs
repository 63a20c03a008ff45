//! virtio-blk on a raw image file or a block device (virtio 1.2 §5.2; bhyve's `pci_virtio_block.c`).
//!
//! Requests: IN (read), OUT (write), FLUSH (fsync), GET_ID (the serial, 20 bytes), DISCARD and
//! WRITE_ZEROES (fallocate `PUNCH_HOLE` / `ZERO_RANGE`, offered only when the host file system
//! supports hole punching and the image is writable). A read-only image advertises
//! `VIRTIO_BLK_F_RO` and answers writes, discards and write-zeroes with `VIRTIO_BLK_S_IOERR`.
//!
//! I/O runs off the vCPU thread, straight between guest memory and the image: one
//! `preadv`/`pwritev` per request over the guest's buffers (no bounce buffer). Without I/O threads
//! the device's worker runs each request in turn; with [`Block::set_io_threads`] (bhyve: one per
//! host CPU, at most 4) the requests of a batch run in parallel on a small pool, at most [`MAX_IN_FLIGHT`] at a time, and
//! complete out of order; a FLUSH (`fdatasync`) waits for every request before it
//! ([`BlockHandler`]).
//!
//! Eager writeback ([`Block::set_eager_writeback`], option `eagerwb=`): once a write of 64 KiB or
//! more has completed, a thread of the device asks the host to start writing that range to
//! storage (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later FLUSH has little left to
//! do. A FLUSH is still an `fdatasync` after every write before it.
//!
//! Every outcome reaches the guest through [`status_of`], one exhaustive match: guest mistakes
//! that still leave a status byte to write (bad sector, odd length, short header) are IOERR,
//! unknown request types UNSUPP, host errors by errno (EIO, ENOSPC, … IOERR; EOPNOTSUPP UNSUPP). A
//! chain with no writable status byte cannot be answered: DEVICE_NEEDS_RESET.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{device_id, ActivateError, DeviceError, QueueCtx, QueueHandler, VirtioDevice};
use crate::log::{Logger, VirtioStats};
use crate::queue::{Chain, QueueError, Segment};

/// Sector size of the protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

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
    /// `eagerwb=SIZE|off`: start the host's writeback of every write of at least this many bytes
    /// as soon as it completes ([`Block::set_eager_writeback`]); `Some(0)` is off, `None` the
    /// default ([`DEFAULT_EAGER_WRITEBACK`]).
    pub eager_writeback: Option<u64>,
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
    io_threads: usize,
    eager_writeback: u64,
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
        let mut b =
            Self::from_file(file, opts.read_only, opts.no_delete, &serial).map_err(|source| {
                BlockError::Size {
                    path: opts.path.clone(),
                    source,
                }
            })?;
        // With O_SYNC every write is on stable storage when it completes: nothing to start.
        let wb = if opts.sync {
            0
        } else {
            opts.eager_writeback.unwrap_or(DEFAULT_EAGER_WRITEBACK)
        };
        b.set_eager_writeback(wb);
        Ok(b)
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
            io_threads: 0,
            eager_writeback: if read_only {
                0
            } else {
                DEFAULT_EAGER_WRITEBACK
            },
        })
    }

    /// Eager writeback: once a write of at least `min` bytes has completed (its status is on the
    /// way to the guest), the device has the host start writing that range back to storage
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the disk), on a thread
    /// of its own, [`WRITEBACK_BATCH`] at a time. A later FLUSH's `fdatasync`
    /// then finds most of the data written or on its way instead of starting all of it.
    /// Semantics do not change: a FLUSH still waits for every write before it and then runs
    /// `fdatasync`, which waits for that writeback and reports its errors. The cost: the host
    /// spends the writeback's CPU time while the guest is still writing, not at the FLUSH, so on
    /// a host without idle CPU a burst of writes completes more slowly (docs/perf-virtio.md). 0
    /// turns it off. Where the host cannot do it (`sync_file_range` refused) the device logs
    /// once and carries on without.
    pub fn set_eager_writeback(&mut self, min: u64) {
        self.eager_writeback = if self.read_only { 0 } else { min };
    }

    /// Runs requests on `n` I/O threads (started at the first request of each activation) so
    /// several are in flight; 0 (the default) runs them one by one on the device's worker.
    pub fn set_io_threads(&mut self, n: usize) {
        self.io_threads = n.min(MAX_IN_FLIGHT);
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
            threads: self.io_threads,
            wb_min: self.eager_writeback,
            wb: None,
            wb_pending: Vec::new(),
            pool: None,
            in_flight: 0,
            stats: None,
            barrier: None,
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

/// Requests one handler keeps in flight at most (the queue size: a guest that publishes a head
/// again while it is in flight cannot make the device hold more).
pub const MAX_IN_FLIGHT: usize = QUEUE_SIZE as usize;

/// At most this many I/O threads [`default_io_threads`] suggests.
pub const DEFAULT_IO_THREADS: usize = 4;

/// I/O threads for a monitor to give [`Block::set_io_threads`] (bhyve does): one per host CPU, at
/// most [`DEFAULT_IO_THREADS`]. Writes into the page cache are CPU work (a copy per MiB): threads
/// beyond the CPUs only add switches. Measured on a 2-CPU host (2026-11-25, `VBLK_REPS=5 cargo
/// bench -p bhyve --bench virtio_blk`, ours/QEMU for 1 MiB writes at depth 4, to FLUSH done):
/// 2 threads 1.07, 1.06, 0.96 polled and 1.16, 1.10, 1.02 with MSI-X in three runs; 4 threads
/// 1.09, 1.00 and 0.98, 1.06 in two (the runs' own spread is about ±6 %).
pub fn default_io_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, DEFAULT_IO_THREADS)
}

/// At most this many iovecs per preadv/pwritev call (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// What a request does, once its chain has been checked and decoded.
#[derive(Debug)]
enum Op {
    /// preadv into the guest's data buffers.
    Read { off: u64, data: Vec<Segment> },
    /// pwritev from the guest's data buffers.
    Write { off: u64, data: Vec<Segment> },
    /// fdatasync.
    Flush,
    /// fallocate (discard, write-zeroes).
    Fallocate { mode: i32, off: u64, len: u64 },
}

/// A decoded request, ready to run on any thread.
#[derive(Debug)]
struct Job {
    head: u16,
    /// Guest address of the status byte.
    status: u64,
    op: Op,
}

impl Job {
    /// Reads and writes of at most [`INLINE_MAX`] bytes (served from the page cache in about the
    /// time a hand-off to an I/O thread takes).
    fn small(&self) -> bool {
        match &self.op {
            Op::Read { data, .. } | Op::Write { data, .. } => {
                data.iter().map(|s| u64::from(s.len)).sum::<u64>() <= INLINE_MAX
            }
            Op::Flush | Op::Fallocate { .. } => false,
        }
    }
}

/// Reads and writes up to this size run on the worker itself; larger ones, and discards, go to the
/// I/O threads.
pub const INLINE_MAX: u64 = 64 * 1024;

/// A finished request, for the worker to answer.
#[derive(Debug)]
struct Done {
    head: u16,
    status: u64,
    result: Result<(), RequestError>,
    /// Bytes placed in the guest's buffers (reads, GET_ID).
    to_guest: u64,
    /// Bytes taken from the guest's buffers (writes).
    from_guest: u64,
    /// A write that succeeded: its offset and length on the image (for eager writeback).
    written: Option<(u64, u64)>,
}

/// What decoding a chain gives.
enum Prepared {
    /// Answered at once (GET_ID, and every request refused before any I/O).
    Now(Done),
    /// I/O to run.
    Io(Job),
    /// A FLUSH: runs once everything before it has completed.
    Flush(Job),
}

/// The first `take` bytes after `skip` bytes of `segs`.
fn sub_segments(segs: &[Segment], mut skip: u64, mut take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if take == 0 {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push(Segment {
            addr: s.addr + skip,
            len: u32::try_from(n).unwrap_or(u32::MAX),
        });
        take -= n;
        skip = 0;
    }
    out
}

/// Guest address of the last writable byte of `chain` (the status byte).
fn status_byte(chain: &Chain) -> Option<u64> {
    let last = chain.writable.iter().rev().find(|s| s.len > 0)?;
    last.addr.checked_add(u64::from(last.len) - 1)
}

/// preadv/pwritev of all of `segs` at `off`, straight between guest memory and the file; returns
/// the bytes moved (all of them, or an error with the count in `done`).
fn vectored(
    file: &File,
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut off: u64,
    write: bool,
    done: &mut u64,
) -> std::io::Result<()> {
    let mut slices = Vec::with_capacity(segs.len());
    for s in segs {
        let len =
            usize::try_from(s.len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        for sl in mem.get_slices(GuestAddress(s.addr), len) {
            // The chain was checked to lie inside guest memory: an error here is a bug, not I/O.
            slices.push(sl.map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?);
        }
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .filter(|g| g.len() > 0)
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    let mut first = 0usize;
    while first < iov.len() {
        let end = iov.len().min(first + IOV_MAX);
        let batch = iov.get(first..end).unwrap_or_default();
        let cnt = libc::c_int::try_from(batch.len()).unwrap_or(0);
        let at = libc::off_t::try_from(off)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = file.as_raw_fd();
        let rc = if write {
            // SAFETY: every iovec points into a guest-memory mapping that `mem` (and the guards
            // above) keep mapped for the call; the kernel only reads those bytes. Guest memory is
            // never referenced from Rust while this runs (the guest may change it concurrently,
            // which only changes what bytes move).
            unsafe { libc::pwritev(fd, batch.as_ptr(), cnt, at) }
        } else {
            // SAFETY: as above; the kernel writes only into those guest-memory bytes.
            unsafe { libc::preadv(fd, batch.as_ptr(), cnt, at) }
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = usize::try_from(rc).unwrap_or(0);
        if n == 0 {
            // End of file inside the image's capacity (the file shrank), or a write that made no
            // progress: an I/O error for the guest.
            return Err(std::io::Error::from_raw_os_error(if write {
                libc::ENOSPC
            } else {
                libc::EIO
            }));
        }
        *done += u64::try_from(n).unwrap_or(0);
        off += u64::try_from(n).unwrap_or(0);
        // Skip what was moved; a partial iovec keeps its remainder.
        while n > 0 {
            let Some(v) = iov.get_mut(first) else { break };
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced base stays inside the same slice.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Runs one job (on the worker or an I/O thread).
fn execute(job: Job, file: &File, mem: &GuestMemoryMmap) -> Done {
    let mut moved = 0u64;
    let mut written = None;
    let (result, read) = match &job.op {
        Op::Read { off, data } => (vectored(file, mem, data, *off, false, &mut moved), true),
        Op::Write { off, data } => {
            let r = vectored(file, mem, data, *off, true, &mut moved);
            if r.is_ok() {
                written = Some((*off, moved));
            }
            (r, false)
        }
        // The image never changes size: fdatasync puts the data on stable storage.
        Op::Flush => (file.sync_data(), false),
        Op::Fallocate { mode, off, len } => {
            let r = match fallocate(file, *mode, *off, *len) {
                // A file system that punches holes but cannot zero a range: a hole reads back
                // as zeroes too.
                Err(e)
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                        && mode & libc::FALLOC_FL_ZERO_RANGE != 0 =>
                {
                    fallocate(
                        file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        *off,
                        *len,
                    )
                }
                other => other,
            };
            (r, false)
        }
    };
    Done {
        head: job.head,
        status: job.status,
        result: result.map_err(RequestError::Host),
        to_guest: if read { moved } else { 0 },
        from_guest: if read { 0 } else { moved },
        written,
    }
}

/// Default of [`Block::set_eager_writeback`] (and of the `eagerwb=` option): writes of at least
/// 64 KiB, the size above which a request goes to the I/O threads. Smaller writes (a database's
/// random 4 KiB pages) are left to the host's own writeback, which can merge them.
pub const DEFAULT_EAGER_WRITEBACK: u64 = 64 * 1024;

/// What starts the writeback of a range, on whichever thread runs it.
#[derive(Debug)]
struct WbStarter {
    /// Cleared for good when the host refuses `sync_file_range`.
    on: AtomicBool,
    stats: Arc<VirtioStats>,
    log: Arc<Logger>,
}

impl WbStarter {
    /// Starts the host's writeback of `len` bytes at `off` without waiting for it to finish.
    /// Failures only cost the head start: the data is in the page cache, and the next FLUSH's
    /// `fdatasync` writes it and reports any error (`SYNC_FILE_RANGE_WRITE` alone leaves the
    /// file's writeback error state for `fdatasync` to see).
    fn start(&self, file: &File, off: u64, len: u64) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
        let rc =
            unsafe { libc::sync_file_range(file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
        if rc == 0 {
            VirtioStats::add(&self.stats.writeback_started, len);
            return;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            // Not something the host can write back this way (ESPIPE: not a regular file or
            // block device; ENOSYS, EINVAL, EOPNOTSUPP: not supported): stop trying.
            Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::ESPIPE) => {
                if self.on.swap(false, Ordering::Relaxed) {
                    self.log.log(format_args!(
                        "sync_file_range: {e}: eager writeback off (a FLUSH still syncs everything)"
                    ));
                }
            }
            _ => {
                VirtioStats::inc(&self.stats.writeback_errors);
                self.log.log(format_args!(
                    "sync_file_range at {off} ({len} bytes): {e} (the next FLUSH reports it)"
                ));
            }
        }
    }
}

/// The writeback thread starts a contiguous range once it reaches this size (a stream of 64 KiB
/// writes makes one `sync_file_range` per 4 MiB, not 64). Measured on the 2-CPU host
/// (2026-11-25, `VBLK_B_OPTS=eagerwb=off` in the `virtio_blk` bench, 1 MiB writes, ours with eager
/// writeback over ours without): every range at once 1.47–1.88 to FLUSH done and 0.55–0.84 writes
/// only; batches of 4 MiB 1.30–1.55 and 0.60–0.75; of 16 MiB 1.32–1.48 and 0.56–0.63. Within the
/// noise of one another.
pub const WRITEBACK_BATCH: u64 = 4 << 20;

/// A shorter range is started once no write has extended it for this long,
const WRITEBACK_QUIET: std::time::Duration = std::time::Duration::from_millis(2);
/// or once the oldest range held has waited this long,
const WRITEBACK_MAX_HOLD: std::time::Duration = std::time::Duration::from_millis(20);
/// or once more than this many separate ranges are held.
const WRITEBACK_MAX_HELD: usize = 64;
/// Ranges queued to the writeback thread at most; more are dropped (left to the host's own
/// writeback and the next FLUSH), so a slow disk cannot make the queue grow without bound.
const WRITEBACK_QUEUE: usize = 1024;

/// Eager writeback of one active device, shared by its worker and its I/O threads: ranges go to
/// a thread of its own ("virtio-blk-wb"), which merges adjacent ones and starts the writeback of
/// every [`WRITEBACK_BATCH`] (and of what is left once the writes pause).
/// `sync_file_range` can block (writeback throttling, a full device queue): on its own thread that
/// never holds up a request. Without the thread (it could not be started) the thread that
/// completed the write starts it.
#[derive(Debug)]
struct Writeback {
    /// Writes of at least this many bytes qualify.
    min: u64,
    starter: Arc<WbStarter>,
    tx: Option<mpsc::SyncSender<(u64, u64)>>,
}

impl Writeback {
    fn new(min: u64, file: &File, stats: Arc<VirtioStats>, log: Arc<Logger>) -> Self {
        let starter = Arc::new(WbStarter {
            on: AtomicBool::new(true),
            stats,
            log,
        });
        let tx = match Self::spawn(file, starter.clone()) {
            Ok(tx) => Some(tx),
            Err(e) => {
                starter.log.log(format_args!(
                    "cannot start the writeback thread, writes start their own: {e}"
                ));
                None
            }
        };
        Self { min, starter, tx }
    }

    fn spawn(
        file: &File,
        starter: Arc<WbStarter>,
    ) -> std::io::Result<mpsc::SyncSender<(u64, u64)>> {
        let (tx, rx) = mpsc::sync_channel::<(u64, u64)>(WRITEBACK_QUEUE);
        let file = file.try_clone()?;
        std::thread::Builder::new()
            .name("virtio-blk-wb".into())
            .spawn(move || {
                // Ranges not yet started: shorter than WRITEBACK_BATCH, waiting for the writes
                // that extend them, since `since`.
                let mut held: Vec<(u64, u64)> = Vec::new();
                let mut since = std::time::Instant::now();
                loop {
                    let next = if held.is_empty() {
                        rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                    } else {
                        let left = WRITEBACK_MAX_HOLD.saturating_sub(since.elapsed());
                        rx.recv_timeout(WRITEBACK_QUIET.min(left))
                    };
                    match next {
                        Ok(r) => {
                            if held.is_empty() {
                                since = std::time::Instant::now();
                            }
                            held.push(r);
                            held.extend(rx.try_iter());
                        }
                        // The writes paused, or the oldest range waited long enough.
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Every sender is gone: the device was reset or dropped.
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    let merged = merge_ranges(&mut held);
                    held.clear();
                    // Writes that never line up (a random-write stream) must not wait forever.
                    let all = next.is_err()
                        || merged.len() > WRITEBACK_MAX_HELD
                        || since.elapsed() >= WRITEBACK_MAX_HOLD;
                    for (off, len) in merged {
                        if all || len >= WRITEBACK_BATCH {
                            starter.start(&file, off, len);
                        } else {
                            held.push((off, len));
                        }
                    }
                }
            })?;
        Ok(tx)
    }

    fn wants(&self, written: Option<(u64, u64)>) -> Option<(u64, u64)> {
        written.filter(|&(_, len)| len > 0 && len >= self.min)
    }

    /// Has the writeback of `len` bytes at `off` started (`file` is the image, for the case
    /// without a thread).
    fn queue(&self, file: &File, off: u64, len: u64) {
        if !self.starter.on.load(Ordering::Relaxed) {
            return;
        }
        match self.tx.as_ref().map(|tx| tx.try_send((off, len))) {
            Some(Ok(())) => {}
            // The thread is WRITEBACK_QUEUE ranges behind (its disk is slow): this range is left
            // to the host's own writeback and the next FLUSH.
            Some(Err(mpsc::TrySendError::Full(_))) => {}
            Some(Err(mpsc::TrySendError::Disconnected(_))) | None => {
                self.starter.start(file, off, len);
            }
        }
    }
}

/// Sorts `(offset, length)` ranges and merges those that touch or overlap.
fn merge_ranges(ranges: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(off, len) in ranges.iter() {
        match merged.last_mut() {
            Some((o, l)) if o.saturating_add(*l) >= off => {
                *l = (*l).max(off.saturating_add(len) - *o);
            }
            _ => merged.push((off, len)),
        }
    }
    merged
}

/// The I/O threads of one active device, and the way their results come back.
#[derive(Debug)]
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Written by an I/O thread after each result; the worker waits on it.
    wake: Arc<EventFd>,
}

impl Pool {
    fn start(
        n: usize,
        file: &File,
        mem: &GuestMemoryMmap,
        wb: Option<&Arc<Writeback>>,
    ) -> std::io::Result<Self> {
        let (jtx, jrx) = mpsc::channel::<Job>();
        let (dtx, drx) = mpsc::channel::<Done>();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let jrx = Arc::new(Mutex::new(jrx));
        for i in 0..n {
            let (jrx, dtx, wake, wb) = (jrx.clone(), dtx.clone(), wake.clone(), wb.cloned());
            let file = file.try_clone()?;
            let mem = mem.clone();
            std::thread::Builder::new()
                .name(format!("virtio-blk-io{i}"))
                .spawn(move || loop {
                    let job = {
                        let rx = jrx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    // The sender is gone: the device was reset or dropped.
                    let Ok(job) = job else { break };
                    let done = execute(job, &file, &mem);
                    let range = wb.as_ref().and_then(|w| w.wants(done.written));
                    if dtx.send(done).is_err() {
                        break;
                    }
                    let _ = wake.write(1);
                    // The answer is on its way: now the head start for a later FLUSH.
                    if let (Some(wb), Some((off, len))) = (&wb, range) {
                        wb.queue(&file, off, len);
                    }
                })?;
        }
        Ok(Self {
            jobs: Some(jtx),
            done: drx,
            wake,
        })
    }
}

/// The request processing of an active virtio-blk.
///
/// The worker pops and decodes chains; with I/O threads ([`Block::set_io_threads`]) transfers
/// larger than [`INLINE_MAX`] (and discards) go to the threads, so several are in flight, while
/// small ones run on the worker at once (a hand-off would cost more than the copy). A large
/// request that turns out to be alone (nothing in flight, nothing behind it in the ring) runs on
/// the worker too: at queue depth 1 a hand-off only adds latency. Results come back through an eventfd
/// the worker waits on ([`QueueHandler::wait_fds`]); completions go to the used ring in the order
/// they finish. At most [`MAX_IN_FLIGHT`] requests are in flight; past that the worker stops
/// popping until some complete. A FLUSH is a barrier: it runs once every request popped before it
/// has completed, and nothing after it is popped until it has.
#[derive(Debug)]
pub struct BlockHandler {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    discard: bool,
    write_zeroes: bool,
    /// I/O threads to start at the first request (0: every request runs on the worker).
    threads: usize,
    /// Eager writeback's threshold until the first request (0: off).
    wb_min: u64,
    wb: Option<Arc<Writeback>>,
    /// Ranges written on the worker, to start writing back once their answers are out.
    wb_pending: Vec<(u64, u64)>,
    pool: Option<Pool>,
    in_flight: usize,
    /// The function's counters (for the in-flight gauge at quiesce).
    stats: Option<Arc<VirtioStats>>,
    /// A FLUSH waiting for the requests before it.
    barrier: Option<Job>,
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

    /// Decodes `chain`. `Err` only for a chain that cannot be answered (no status byte).
    fn prepare(&self, chain: &Chain, mem: &GuestMemoryMmap) -> Result<Prepared, QueueError> {
        let Some(status) = status_byte(chain) else {
            return Err(QueueError::Layout {
                head: chain.head,
                what: "no writable status byte",
            });
        };
        let now = |result, to_guest| {
            Prepared::Now(Done {
                head: chain.head,
                status,
                result,
                to_guest,
                from_guest: 0,
                written: None,
            })
        };
        let job = |op| Job {
            head: chain.head,
            status,
            op,
        };
        let mut r = chain.reader();
        let mut hdr = [0u8; 16];
        if r.read(mem, &mut hdr)? < hdr.len() {
            return Ok(now(Err(RequestError::BadLength), 0));
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = hdr;
        let rtype = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        // Data bytes: readable after the header, writable before the status byte.
        let data_in = r.remaining();
        let data_out = chain.writable_len().saturating_sub(1);
        Ok(match rtype {
            req::IN => match self.check_range(sector, data_out) {
                Ok(off) => Prepared::Io(job(Op::Read {
                    off,
                    data: sub_segments(&chain.writable, 0, data_out),
                })),
                Err(e) => now(Err(e), 0),
            },
            req::OUT if self.read_only => now(Err(RequestError::ReadOnly), 0),
            req::OUT => match self.check_range(sector, data_in) {
                Ok(off) => Prepared::Io(job(Op::Write {
                    off,
                    data: sub_segments(&chain.readable, 16, data_in),
                })),
                Err(e) => now(Err(e), 0),
            },
            req::FLUSH => Prepared::Flush(job(Op::Flush)),
            req::GET_ID => {
                let mut w = chain.writer();
                let _ = w.split_tail(1);
                let put = w.write(mem, &self.id)?;
                now(Ok(()), u64::try_from(put).unwrap_or(0))
            }
            req::DISCARD | req::WRITE_ZEROES => match self.fallocate_op(rtype, &mut r, mem)? {
                Ok(op) => Prepared::Io(job(op)),
                Err(e) => now(Err(e), 0),
            },
            other => now(Err(RequestError::Unsupported(other)), 0),
        })
    }

    fn fallocate_op(
        &self,
        rtype: u32,
        r: &mut crate::queue::Cursor<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<Result<Op, RequestError>, QueueError> {
        let offered = if rtype == req::DISCARD {
            self.discard
        } else {
            self.write_zeroes
        };
        if self.read_only {
            return Ok(Err(RequestError::ReadOnly));
        }
        if !offered {
            return Ok(Err(RequestError::Unsupported(rtype)));
        }
        // max_*_seg is 1: exactly one 16-byte segment.
        if r.remaining() != 16 {
            return Ok(Err(RequestError::BadLength));
        }
        let mut seg = [0u8; 16];
        if r.read(mem, &mut seg)? != 16 {
            return Ok(Err(RequestError::BadLength));
        }
        let [a0, a1, a2, a3, a4, a5, a6, a7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
        let start = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let count = u64::from(u32::from_le_bytes([n0, n1, n2, n3]));
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        if flags & !1 != 0 || (rtype == req::DISCARD && flags != 0) {
            return Ok(Err(RequestError::Unsupported(rtype)));
        }
        let off = match self.check_range(start, count * SECTOR_SIZE) {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        let mode = if rtype == req::WRITE_ZEROES && flags & 1 == 0 {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        Ok(Ok(Op::Fallocate {
            mode,
            off,
            len: count * SECTOR_SIZE,
        }))
    }

    /// Answers a finished request: status byte, counters, used ring.
    fn complete(&self, q: u16, d: Done, ctx: &mut QueueCtx<'_>) -> Result<(), QueueError> {
        let stats = &ctx.signals.stats;
        VirtioStats::add(&stats.bytes_to_guest, d.to_guest);
        VirtioStats::add(&stats.bytes_from_guest, d.from_guest);
        if let Err(RequestError::Host(_)) = &d.result {
            VirtioStats::inc(&stats.io_errors);
        }
        if d.result.is_err() {
            VirtioStats::inc(&stats.request_errors);
        }
        ctx.mem
            .write_obj(status_of(&d.result), GuestAddress(d.status))
            .map_err(|_| QueueError::Memory(d.status))?;
        let len = u32::try_from(d.to_guest.saturating_add(1)).unwrap_or(u32::MAX);
        ctx.add_used(q, d.head, len)
    }

    /// Hands `job` to an I/O thread, or runs it here without threads. Returns whether a
    /// completion went to the used ring.
    fn submit(&mut self, q: u16, job: Job, ctx: &mut QueueCtx<'_>) -> Result<bool, QueueError> {
        if let Some(tx) = self.pool.as_ref().and_then(|p| p.jobs.as_ref()) {
            match tx.send(job) {
                Ok(()) => {
                    self.in_flight += 1;
                    VirtioStats::inc(&ctx.signals.stats.in_flight);
                    ctx.signals.stats.in_flight_high.fetch_max(
                        u64::try_from(self.in_flight).unwrap_or(u64::MAX),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    return Ok(false);
                }
                // The threads are gone (cannot happen while the sender lives): run it here.
                Err(mpsc::SendError(job)) => {
                    self.run_here(q, job, ctx)?;
                    return Ok(true);
                }
            }
        }
        self.run_here(q, job, ctx)?;
        Ok(true)
    }

    /// Runs `job` on the worker and answers it; a write that qualifies for eager writeback is
    /// noted for [`Self::start_writeback`].
    fn run_here(&mut self, q: u16, job: Job, ctx: &mut QueueCtx<'_>) -> Result<(), QueueError> {
        if matches!(job.op, Op::Flush) {
            // fdatasync writes them anyway.
            self.wb_pending.clear();
        }
        let d = execute(job, &self.file, ctx.mem);
        if let Some((off, len)) = self.wb.as_ref().and_then(|w| w.wants(d.written)) {
            // Sequential writes become one range.
            match self.wb_pending.last_mut() {
                Some((o, l)) if o.checked_add(*l) == Some(off) => *l += len,
                _ => self.wb_pending.push((off, len)),
            }
        }
        self.complete(q, d, ctx)
    }

    /// Starts the writeback of what the worker wrote, once the answers have been signalled.
    fn start_writeback(&mut self) {
        let Some(wb) = &self.wb else { return };
        for (off, len) in self.wb_pending.drain(..) {
            wb.queue(&self.file, off, len);
        }
    }

    /// Takes the I/O threads' results. Returns whether any went to the used ring.
    fn reap(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<bool, QueueError> {
        let Some(pool) = &self.pool else {
            return Ok(false);
        };
        let _ = pool.wake.read();
        let done: Vec<Done> = pool.done.try_iter().collect();
        let any = !done.is_empty();
        for d in done {
            self.in_flight = self.in_flight.saturating_sub(1);
            // The gauge drops before the chain counts as completed: an observer adding the two
            // never counts a request twice.
            ctx.signals
                .stats
                .in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.complete(q, d, ctx)?;
        }
        Ok(any)
    }

    /// Pops and starts requests until the ring is empty, the chain budget or the in-flight
    /// bound is reached, or a FLUSH has to wait. Returns whether any completion was placed.
    fn pump(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        let wb_min = std::mem::take(&mut self.wb_min);
        if wb_min > 0 {
            self.wb = Some(Arc::new(Writeback::new(
                wb_min,
                &self.file,
                ctx.signals.stats.clone(),
                ctx.signals.log.clone(),
            )));
        }
        if self.threads > 0 {
            let n = std::mem::take(&mut self.threads);
            match Pool::start(n, &self.file, ctx.mem, self.wb.as_ref()) {
                Ok(p) => {
                    self.pool = Some(p);
                    self.stats = Some(ctx.signals.stats.clone());
                }
                Err(e) => ctx.signals.log.log(format_args!(
                    "cannot start {n} I/O threads, requests run on the worker: {e}"
                )),
            }
        }
        // A FLUSH whose predecessors are done runs now (on this thread: nothing else is popped
        // until it completes anyway).
        if self.in_flight == 0 {
            if let Some(f) = self.barrier.take() {
                self.run_here(q, f, ctx)?;
                used = true;
            }
        }
        // A large request arriving while nothing is in flight is held: if it stays alone (queue
        // depth 1) it runs here, without a hand-off; if another follows, both go to the threads.
        let mut held: Option<Job> = None;
        while self.barrier.is_none() && self.in_flight + usize::from(held.is_some()) < MAX_IN_FLIGHT
        {
            let Some(chain) = ctx.pop(q)? else {
                break;
            };
            match self.prepare(&chain, ctx.mem)? {
                Prepared::Now(d) => {
                    self.complete(q, d, ctx)?;
                    used = true;
                }
                // Small transfers cost less than a hand-off: they run here.
                Prepared::Io(job) if job.small() => {
                    self.run_here(q, job, ctx)?;
                    used = true;
                }
                Prepared::Io(job) => {
                    if let Some(first) = held.take() {
                        used |= self.submit(q, first, ctx)?;
                    }
                    if self.in_flight == 0 && self.pool.is_some() {
                        held = Some(job);
                    } else {
                        used |= self.submit(q, job, ctx)?;
                    }
                }
                Prepared::Flush(job) => {
                    if let Some(first) = held.take() {
                        self.run_here(q, first, ctx)?;
                        used = true;
                    }
                    if self.in_flight == 0 {
                        self.run_here(q, job, ctx)?;
                        used = true;
                    } else {
                        self.barrier = Some(job);
                    }
                }
            }
        }
        if let Some(job) = held {
            self.run_here(q, job, ctx)?;
            used = true;
        }
        Ok(used)
    }

    /// Waits for every request handed to the I/O threads (their results are dropped: the queues
    /// are going away) and stops the threads.
    fn quiesce(&mut self) {
        if let Some(mut pool) = self.pool.take() {
            pool.jobs = None;
            while self.in_flight > 0 {
                if pool.done.recv().is_err() {
                    break;
                }
                self.in_flight -= 1;
            }
        }
        if let Some(st) = &self.stats {
            st.in_flight.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.in_flight = 0;
        self.barrier = None;
        self.wb_pending.clear();
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

/// The one queue.
const REQUEST_QUEUE: u16 = 0;

impl QueueHandler for BlockHandler {
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        if q != REQUEST_QUEUE {
            return Ok(());
        }
        let mut used = self.reap(q, ctx)?;
        used |= self.pump(q, ctx)?;
        if used {
            ctx.signal(q);
        }
        self.start_writeback();
        Ok(())
    }

    fn wait_fds(&self, out: &mut Vec<(RawFd, u32)>) {
        if let Some(p) = &self.pool {
            out.push((p.wake.as_raw_fd(), 0));
        }
    }

    fn fd_ready(&mut self, _token: u32, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        // Completions free room in flight (and may release a FLUSH): pop what waited.
        let q = REQUEST_QUEUE;
        let mut used = self.reap(q, ctx)?;
        used |= self.pump(q, ctx)?;
        if used {
            ctx.signal(q);
        }
        self.start_writeback();
        Ok(())
    }

    fn quiesce(&mut self) {
        BlockHandler::quiesce(self);
    }

    fn into_backend(mut self: Box<Self>) -> Option<Box<dyn std::any::Any + Send>> {
        BlockHandler::quiesce(&mut self);
        Some(Box::new(self.file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    fn starter() -> Arc<WbStarter> {
        Arc::new(WbStarter {
            on: AtomicBool::new(true),
            stats: Arc::new(VirtioStats::default()),
            log: Arc::new(Logger::new("test")),
        })
    }

    /// `(dirty, under writeback)` pages of `file`'s first `len` bytes (cachestat(2), Linux 6.5),
    /// or `None` where the kernel lacks it.
    fn cachestat(file: &File, len: u64) -> Option<(u64, u64)> {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        let range = Range { off: 0, len };
        let mut st = Stat::default();
        const SYS_CACHESTAT: libc::c_long = 451;
        // SAFETY: cachestat reads `range` and writes `st`, both valid for the call; the
        // descriptor is ours.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0u32,
            )
        };
        (rc == 0).then_some((st.dirty, st.writeback))
    }

    #[test]
    fn eager_writeback_cleans_the_pages_without_a_flush() {
        let path = std::env::temp_dir().join(format!("virtio-blk-wb-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let len = 4u64 << 20;
        file.write_all_at(&vec![0xa5u8; 4 << 20], 0).unwrap();
        let dirty = cachestat(&file, len);
        let _ = std::fs::remove_file(&path);
        match dirty {
            Some((d, _)) if d > 0 => {}
            other => {
                eprintln!("skipped: no dirty pages to see here (cachestat {other:?}; tmpfs?)");
                return;
            }
        }
        let s = starter();
        s.start(&file, 0, len);
        assert_eq!(VirtioStats::get(&s.stats.writeback_started), len);
        // The host's own writeback would wait dirty_expire_centisecs (30 s by default).
        let t = Instant::now();
        while cachestat(&file, len) != Some((0, 0)) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "still dirty: {:?}",
                cachestat(&file, len)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.log.lines.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_host_that_cannot_start_writeback_turns_it_off_and_logs_once() {
        // sync_file_range on a pipe: ESPIPE.
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: a fresh descriptor from pipe(2), owned by nothing else.
        let r = unsafe { File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let w = unsafe { File::from_raw_fd(fds[1]) };
        let stats = Arc::new(VirtioStats::default());
        let log = Arc::new(Logger::new("test"));
        let wb = Writeback::new(64 << 10, &w, stats.clone(), log.clone());
        wb.queue(&w, 0, 8 << 20);
        let t = Instant::now();
        while wb.starter.on.load(Ordering::Relaxed) {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 1..100u64 {
            wb.queue(&w, i << 23, 8 << 20);
            wb.starter.start(&w, i << 23, 8 << 20);
        }
        drop(wb);
        assert_eq!(log.lines.load(Ordering::Relaxed), 1);
        assert_eq!(VirtioStats::get(&stats.writeback_started), 0);
        assert_eq!(VirtioStats::get(&stats.writeback_errors), 0);
        drop(r);
    }

    #[test]
    fn ranges_that_never_line_up_are_started_without_waiting_for_a_pause() {
        let path = std::env::temp_dir().join(format!("virtio-blk-wbr-{}.img", std::process::id()));
        let file = File::create(&path).unwrap();
        let stats = Arc::new(VirtioStats::default());
        let wb = Writeback::new(1, &file, stats.clone(), Arc::new(Logger::new("test")));
        // A random-write stream: 64 KiB ranges 1 MiB apart, never a 2 ms pause.
        let t = Instant::now();
        let mut i = 0u64;
        while VirtioStats::get(&stats.writeback_started) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nothing started while the stream ran"
            );
            wb.queue(&file, (i % 4096) << 20, 64 << 10);
            i += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        drop(wb);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let mut v = vec![(8, 4), (0, 4), (4, 4), (20, 1), (13, 2), (14, 4)];
        assert_eq!(merge_ranges(&mut v), vec![(0, 12), (13, 5), (20, 1)]);
        assert_eq!(merge_ranges(&mut []), vec![]);
        let mut v = vec![(0, 10), (2, 3)];
        assert_eq!(merge_ranges(&mut v), vec![(0, 10)]);
    }

    #[test]
    fn eager_writeback_follows_the_options() {
        let path = std::env::temp_dir().join(format!("virtio-blk-wbo-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let open = |sync, ro, wb| {
            Block::open(&BlockOptions {
                path: path.clone(),
                read_only: ro,
                sync,
                eager_writeback: wb,
                ..BlockOptions::default()
            })
            .unwrap()
            .eager_writeback
        };
        assert_eq!(open(false, false, None), DEFAULT_EAGER_WRITEBACK);
        assert_eq!(open(false, false, Some(0)), 0);
        assert_eq!(open(false, false, Some(1 << 20)), 1 << 20);
        assert_eq!(
            open(true, false, None),
            0,
            "O_SYNC: nothing left to write back"
        );
        assert_eq!(open(false, true, Some(4096)), 0, "read-only");
        let _ = std::fs::remove_file(&path);
    }
}
