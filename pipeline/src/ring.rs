//! A single-producer single-consumer ring laid out in a caller-provided [`Region`].
//!
//! # Layout
//!
//! ```text
//! offset 0      meta      magic, ABI version, record tag, record size, capacity,
//!                         header size, claim bits, producer mode, slot size
//!                                                           (written at format, read at attach)
//! offset 128    tail      producer index (u64)              written by the producer only
//! offset 256    head      consumer index (u64)              written by the consumer only
//! offset 384    wake      futex word: 0 awake, 1 sleeping   consumer sets, producer clears
//! offset 512    slots     capacity × slot size, capacity a power of two
//! ```
//! A slot holds one record at its start. The slot size is the record size rounded up to a power
//! of two while that is at most a cache line (64 bytes), else to whole cache lines: the 48-byte
//! [`ExitRecord`](crate::ExitRecord) gets a 64-byte slot, the 32-byte
//! [`CompletionRecord`](crate::CompletionRecord) a 32-byte one. So no record straddles two
//! cache lines, and when both ends work one record apart (a near-empty ring) the producer
//! writing record k + 1 no longer shares a line with the consumer reading record k (with
//! 48-byte slots half the records straddled two lines; padding them made single push/pop
//! 1.3–1.5× faster, `docs/perf-ring.md`).
//! (Offsets for x86-64, where `CachePadded` is 128 bytes so that the adjacent-line prefetcher
//! cannot pull the two indices into one false-sharing pair; asserted at compile time. Other
//! architectures keep the order with their own padding; the header size is stored and checked.)
//!
//! # Indices
//!
//! Both indices count records since the ring was formatted and wrap at 2^64; a slot is
//! `index & (capacity - 1)`. `tail - head` (wrapping) is the number of records in the ring and
//! is never more than `capacity`. Each side keeps its own index locally, as the truth, and
//! caches the other side's: the producer re-reads `head` only when its cached view says the
//! ring is full, the consumer re-reads `tail` only when its cached view says it is empty, so in
//! steady state each side touches the other's cache line once per batch, not once per record.
//!
//! The other side's index comes from shared memory a hostile process may scribble on, so it is
//! checked every time it is read: `tail - head` must not exceed `capacity`, and `tail` may not
//! move backwards. A failed check poisons the handle ([`RingError::CorruptIndex`], a terminal
//! state); it never leads to an out-of-bounds access or a panic. Slot positions are always
//! masked, never trusted.
//!
//! # Ordering
//!
//! Acquire/release only on the data path:
//! - producer: write slots, then `tail.store(Release)` (one store for a whole batch);
//! - consumer: `tail.load(Acquire)`, read slots, then `head.store(Release)` (after a batch, or
//!   every few single pops: see `Consumer::release`);
//! - producer: `head.load(Acquire)` before reusing slots the consumer has released.
//!
//! # The "needs wake-up" protocol
//!
//! An idle consumer must be able to sleep without making the producer pay a syscall per record.
//! The consumer, having spun for its budget and found nothing:
//! 1. stores `SLEEPING` into `wake`;
//! 2. `fence(SeqCst)`;
//! 3. re-reads `tail`: if records arrived, it stores `AWAKE` and returns;
//! 4. otherwise `FUTEX_WAIT(wake, SLEEPING, timeout)`, which sleeps only if `wake` still holds
//!    `SLEEPING` (checked atomically by the kernel).
//!
//! The producer, after every publish (the `tail` store):
//! 1. a store→load barrier (see below);
//! 2. loads `wake`: only if it is `SLEEPING` does it `swap(AWAKE)` and, if it won that swap,
//!    issue `FUTEX_WAKE`.
//!
//! Why the barriers (and the only `SeqCst` in the ring): this is Dekker's pattern: each side
//! stores one location then loads the other. Release/acquire do not order a store before a
//! later load (x86 itself reorders exactly that through its store buffer), so without a
//! barrier on both sides they can miss each other: the consumer sees the old `tail` and sleeps
//! while the producer sees the old `wake` and does not wake it, a lost wake-up. With a
//! `SeqCst` fence on each side, one fence comes first in their single total order; if the
//! consumer's does, the producer's load sees `SLEEPING` and wakes it; if the producer's does,
//! the consumer's re-read sees the new `tail` and does not sleep. `loom-tests/` checks this (a
//! lost wake-up shows as a deadlock there).
//!
//! The producer's fence, though, would be paid on every publish, and on x86 it waits for the
//! store buffer to drain, including the `tail` line the consumer keeps reading: a cross-core
//! round trip per record (measured: single-push throughput fell about fourfold). So the
//! barrier is asymmetric (see `barrier.rs`): a producer whose process registered for
//! `membarrier(2)` runs in *light* mode (recorded in the header) with only a compiler fence,
//! and a consumer about to sleep on its ring calls `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`
//! between its fence and its re-read, which forces that barrier into the producer's thread
//! wherever it is. That costs ~0.4 µs once per sleep, instead of a fence per record. Where
//! `membarrier` is unavailable the producer fences every publish instead.
//!
//! A producer that drops its handle also wakes a parked consumer (same handshake, with the
//! claim bit in place of the tail), so the consumer learns at once that nothing more will come.
//!
//! # Sharing between processes
//!
//! Nothing in the header or the slots is a pointer, the futex is shared (not
//! `FUTEX_PRIVATE_FLAG`), and [`Ring::attach`] checks magic, version, record type and size
//! before handing out anything. One producer and one consumer per ring are enforced within a
//! process by claim bits in the header ([`Ring::producer`], [`Ring::consumer`]).

use core::fmt;
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;

use crossbeam_utils::CachePadded;

use crate::abi::{Record, ABI_VERSION};
use crate::barrier;
use crate::region::Region;
use crate::sync::{compiler_fence, fence, AtomicU32, AtomicU64, Ordering, UnsafeCell, PUBLISH};
use crate::wait::{WakeWord, AWAKE};
#[cfg(any(feature = "std", loom))]
use crate::{
    abi::CompletionRecord,
    sync::spin_hint,
    wait::{Clock, WaitOutcome, Waiter, SLEEPING},
};
#[cfg(any(feature = "std", loom))]
use core::time::Duration;

/// First word of every ring header: `"BHVRING"` and a layout generation byte (2: slots padded
/// to [`slot_size`]).
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"BHVRING\x02");

/// Largest capacity a ring may be formatted with.
pub const MAX_CAPACITY: u32 = 1 << 30;

const CLAIM_PRODUCER: u32 = 1;
const CLAIM_CONSUMER: u32 = 2;

/// One slot: a record in a cell (loom's checked cell under `cfg(loom)`), at the start of
/// [`slot_size`] bytes.
type Slot<T> = UnsafeCell<T>;

const CACHE_LINE: usize = 64;

/// A re-read of `tail` that finds fewer records than this (but some) counts towards a trickle.
const TRICKLE: u64 = 8;
/// Spin-loop hints a trickling consumer waits before it re-reads `tail` (~0.7 µs on our hosts:
/// a `PAUSE` takes ~22 ns on their AMD CPUs). Not in the loom models (a hint outside them).
#[cfg(not(loom))]
const TRICKLE_PAUSES: u32 = 32;

/// Bytes from one slot to the next for records of `size` bytes: `size` rounded up to a power of
/// two up to a cache line, else to whole cache lines (see the module docs).
#[must_use]
pub const fn slot_size(size: usize) -> usize {
    if size <= CACHE_LINE {
        size.next_power_of_two()
    } else {
        size.next_multiple_of(CACHE_LINE)
    }
}

/// The slot stride of a ring of `T`.
const fn stride<T>() -> usize {
    let stride = slot_size(size_of::<Slot<T>>());
    assert!(stride % align_of::<Slot<T>>() == 0);
    assert!(stride <= u32::MAX as usize);
    stride
}

/// Slot `i` of the slots starting at `slots`.
///
/// # Safety
/// `i` is below the ring's capacity and `slots` is the first slot of a ring of `T`.
#[inline(always)]
unsafe fn nth_slot<T>(slots: NonNull<Slot<T>>, i: usize) -> NonNull<Slot<T>> {
    // SAFETY: the caller guarantees `i < capacity`, and the region holds `capacity` slots of
    // `stride::<T>()` bytes from `slots`, so the offset stays inside it.
    unsafe { slots.byte_add(i * stride::<T>()) }
}

/// Written once by [`Ring::format`]; read (and checked) by [`Ring::attach`]. All fields are
/// atomics because a peer process may rewrite them at any time; the handles copy what they need
/// at attach and never read them again (except the claim bits).
#[repr(C)]
struct Meta {
    magic: AtomicU64,
    version: AtomicU32,
    record_tag: AtomicU32,
    record_size: AtomicU32,
    capacity: AtomicU32,
    header_size: AtomicU32,
    claims: AtomicU32,
    /// [`barrier::FENCED`] or [`barrier::LIGHT`], written by the producer when it claims.
    producer_mode: AtomicU32,
    /// Bytes from one slot to the next ([`slot_size`] of the record size).
    slot_size: AtomicU32,
}

/// The ring header at the start of the region.
#[repr(C)]
pub(crate) struct RingHeader {
    meta: CachePadded<Meta>,
    /// Producer index: next record to be written. Written by the producer only.
    tail: CachePadded<AtomicU64>,
    /// Consumer index: next record to be read. Written by the consumer only.
    head: CachePadded<AtomicU64>,
    /// The futex word of the wake-up protocol.
    wake: CachePadded<WakeWord>,
}

const HEADER_SIZE: usize = size_of::<RingHeader>();

// The header is part of the shared-memory ABI: pin it (outside loom, whose atomics are larger).
#[cfg(not(loom))]
const _: () = {
    use core::mem::offset_of;
    let line = align_of::<CachePadded<AtomicU64>>();
    assert!(line >= 64);
    assert!(offset_of!(RingHeader, meta) == 0);
    assert!(offset_of!(RingHeader, tail) == line);
    assert!(offset_of!(RingHeader, head) == 2 * line);
    assert!(offset_of!(RingHeader, wake) == 3 * line);
    assert!(HEADER_SIZE == 4 * line);
    assert!(size_of::<Meta>() == 40);
    assert!(offset_of!(Meta, magic) == 0);
    assert!(offset_of!(Meta, version) == 8);
    assert!(offset_of!(Meta, record_tag) == 12);
    assert!(offset_of!(Meta, record_size) == 16);
    assert!(offset_of!(Meta, capacity) == 20);
    assert!(offset_of!(Meta, header_size) == 24);
    assert!(offset_of!(Meta, claims) == 28);
    assert!(offset_of!(Meta, producer_mode) == 32);
    assert!(offset_of!(Meta, slot_size) == 36);
    assert!(size_of::<WakeWord>() == 4);
    // An exit record has a cache line to itself; two completions share one.
    assert!(size_of::<Slot<crate::abi::ExitRecord>>() == 48);
    assert!(stride::<crate::abi::ExitRecord>() == 64);
    assert!(stride::<crate::abi::CompletionRecord>() == 32);
};
#[cfg(all(not(loom), target_arch = "x86_64"))]
const _: () = assert!(HEADER_SIZE == 512);

/// Header size as stored in the header.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the header is a few hundred bytes"
)]
const HEADER_SIZE_U32: u32 = HEADER_SIZE as u32;

/// Which end of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The writing end.
    Producer,
    /// The reading end.
    Consumer,
}

/// Why a region could not be formatted or attached, or a handle not claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The region is shorter than the layout needs.
    TooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes provided.
        len: usize,
    },
    /// The region's base is not aligned enough for the header.
    Misaligned {
        /// Required alignment.
        align: usize,
        /// The base address.
        addr: usize,
    },
    /// The first word is not the expected magic: not a ring (or ring set), or not formatted.
    BadMagic {
        /// The magic expected.
        expected: u64,
        /// The word found.
        found: u64,
    },
    /// Formatted by another version of the ABI.
    VersionMismatch {
        /// Our [`ABI_VERSION`].
        expected: u32,
        /// The header's.
        found: u32,
    },
    /// Formatted for another record type.
    RecordTypeMismatch {
        /// Our record's [`Record::TAG`].
        expected: u32,
        /// The header's tag.
        found: u32,
    },
    /// The header's record size differs from ours.
    RecordSizeMismatch {
        /// Our record size.
        expected: u32,
        /// The header's.
        found: u32,
    },
    /// The header's slot size differs from ours (laid out by another build).
    SlotSizeMismatch {
        /// Our slot size.
        expected: u32,
        /// The header's.
        found: u32,
    },
    /// The header's own size differs from ours (built for another architecture).
    HeaderSizeMismatch {
        /// Our header size.
        expected: u32,
        /// The header's.
        found: u32,
    },
    /// Capacity zero, not a power of two, or above [`MAX_CAPACITY`].
    BadCapacity(u32),
    /// A ring set with zero CPUs or more than [`crate::ringset::MAX_CPUS`].
    BadCpuCount(u32),
    /// A CPU index outside the ring set.
    CpuOutOfRange {
        /// The index asked for.
        cpu: u32,
        /// CPUs in the set.
        cpus: u32,
    },
    /// That end of the ring already has a live handle in some process.
    AlreadyClaimed(Side),
    /// Allocating the memory for [`try_channel`] failed.
    OutOfMemory,
}

/// Shows a record tag as its four ASCII bytes when it is printable, else in hex.
struct Tag(u32);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0.to_le_bytes();
        if bytes.iter().all(u8::is_ascii_graphic) {
            for b in bytes {
                write!(f, "{}", char::from(b))?;
            }
            Ok(())
        } else {
            write!(f, "{:#010x}", self.0)
        }
    }
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooSmall { needed, len } => {
                write!(f, "Region too small: {len} bytes, layout needs {needed}")
            }
            Self::Misaligned { align, addr } => {
                write!(
                    f,
                    "Region misaligned: base {addr:#x} is not {align}-byte aligned"
                )
            }
            Self::BadMagic { expected, found } => {
                write!(f, "Bad magic {found:#018x} (expected {expected:#018x})")
            }
            Self::VersionMismatch { expected, found } => {
                write!(
                    f,
                    "ABI version mismatch: region has {found}, we speak {expected}"
                )
            }
            Self::RecordTypeMismatch { expected, found } => write!(
                f,
                "Record type mismatch: ring carries {}, expected {}",
                Tag(found),
                Tag(expected)
            ),
            Self::RecordSizeMismatch { expected, found } => write!(
                f,
                "Record size mismatch: ring has {found}-byte records, expected {expected}"
            ),
            Self::SlotSizeMismatch { expected, found } => write!(
                f,
                "Slot size mismatch: ring slots are {found} bytes apart, expected {expected}"
            ),
            Self::HeaderSizeMismatch { expected, found } => write!(
                f,
                "Header size mismatch: ring header is {found} bytes, expected {expected}"
            ),
            Self::BadCapacity(c) => write!(
                f,
                "Bad capacity {c}: must be a power of two between 1 and {MAX_CAPACITY}"
            ),
            Self::BadCpuCount(n) => write!(f, "Bad CPU count {n}"),
            Self::CpuOutOfRange { cpu, cpus } => {
                write!(f, "CPU {cpu} out of range: ring set has {cpus}")
            }
            Self::AlreadyClaimed(side) => write!(f, "Ring {side:?} already claimed"),
            Self::OutOfMemory => write!(f, "Out of memory for the ring"),
        }
    }
}

impl core::error::Error for AttachError {}

/// A fault found while using a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The peer's index in shared memory is impossible (more than `capacity` records apart, or
    /// moved backwards). The handle is poisoned: every later call reports this again.
    CorruptIndex {
        /// Producer index as seen.
        producer: u64,
        /// Consumer index as seen.
        consumer: u64,
        /// Ring capacity.
        capacity: u32,
    },
    /// The wait's timeout passed without the awaited record.
    Timeout,
    /// A completion arrived for a later `seq` than the one awaited: the device side broke the
    /// one-outstanding-request protocol.
    UnexpectedCompletion {
        /// The `seq` awaited.
        expected: u64,
        /// The `seq` received.
        found: u64,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::CorruptIndex {
                producer,
                consumer,
                capacity,
            } => write!(
                f,
                "Corrupt ring index: producer {producer}, consumer {consumer}, capacity {capacity}"
            ),
            Self::Timeout => write!(f, "Timed out waiting on the ring"),
            Self::UnexpectedCompletion { expected, found } => {
                write!(f, "Unexpected completion seq {found} (awaiting {expected})")
            }
        }
    }
}

impl core::error::Error for RingError {}

/// `index` masked to a slot number (always `< capacity`).
#[inline(always)]
fn slot_of(index: u64, mask: u64) -> usize {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "masked by capacity - 1 < 2^30, which fits any usize we build for"
    )]
    let slot = (index & mask) as usize;
    slot
}

/// How many single pops may pass between two stores of the consumer's index: an eighth of the
/// ring, at most 32, at least 1.
fn release_every(capacity: u64) -> u64 {
    (capacity / 8).clamp(1, 32)
}

/// A count already checked to be `<= capacity` (< 2^31) as `usize`.
#[inline(always)]
fn small(n: u64) -> usize {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "only called on values checked against capacity <= 2^30"
    )]
    let n = n as usize;
    n
}

fn check_capacity(capacity: u32) -> Result<(), AttachError> {
    if capacity == 0 || !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
        Err(AttachError::BadCapacity(capacity))
    } else {
        Ok(())
    }
}

fn check_region(region: &Region, needed: usize, align: usize) -> Result<(), AttachError> {
    if region.len() < needed {
        return Err(AttachError::TooSmall {
            needed,
            len: region.len(),
        });
    }
    let addr = region.as_ptr().addr();
    if addr % align != 0 {
        return Err(AttachError::Misaligned { align, addr });
    }
    Ok(())
}

/// A validated view of a ring in a region: hands out the two ends.
///
/// `Ring` itself does no I/O; it checks the layout and claims ends. Obtain it with
/// [`Ring::format`] (initialise a region) or [`Ring::attach`] (check a region someone else
/// formatted), then call [`Ring::producer`] / [`Ring::consumer`] (or [`Ring::split`]).
pub struct Ring<T: Record> {
    region: Region,
    capacity: u32,
    _record: PhantomData<fn() -> T>,
}

impl<T: Record> fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("region", &self.region)
            .field("capacity", &self.capacity)
            .field("record", &Tag(T::TAG).to_string_lossy())
            .finish()
    }
}

impl Tag {
    fn to_string_lossy(&self) -> [char; 4] {
        self.0.to_le_bytes().map(|b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
    }
}

impl<T: Record> Ring<T> {
    /// Offset of slot 0 from the start of the region.
    const SLOTS_OFFSET: usize = HEADER_SIZE.next_multiple_of(align_of::<Slot<T>>());

    /// [`slot_size`] for `T`, as stored in the header.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "`stride` asserts at compile time that it fits"
    )]
    const SLOT_SIZE_U32: u32 = stride::<T>() as u32;

    /// Alignment the region's base must have.
    pub const ALIGN: usize = if align_of::<RingHeader>() > align_of::<Slot<T>>() {
        align_of::<RingHeader>()
    } else {
        align_of::<Slot<T>>()
    };

    /// Bytes a ring of `capacity` records needs (header plus slots).
    pub fn required_size(capacity: u32) -> Result<usize, AttachError> {
        check_capacity(capacity)?;
        usize::try_from(capacity)
            .ok()
            .and_then(|c| c.checked_mul(stride::<T>()))
            .and_then(|s| s.checked_add(Self::SLOTS_OFFSET))
            .ok_or(AttachError::BadCapacity(capacity))
    }

    /// Size and alignment of a region for a ring of `capacity` records, for callers that
    /// allocate it themselves.
    pub fn layout(capacity: u32) -> Result<core::alloc::Layout, AttachError> {
        core::alloc::Layout::from_size_align(Self::required_size(capacity)?, Self::ALIGN)
            .map_err(|_| AttachError::BadCapacity(capacity))
    }

    /// Initialise `region` as an empty ring of `capacity` records of type `T`.
    ///
    /// Writes the header (the magic last, with release ordering, so that an attacher that sees
    /// the magic sees the rest) and zero-fills the slots. Must be done before the region is
    /// shared, or while no handle to a previous ring in it is alive.
    pub fn format(region: Region, capacity: u32) -> Result<Self, AttachError> {
        Self::format_with(region, capacity, true)
    }

    /// As [`Ring::format`]; `zero` false leaves the slots as they are, for a region known to be
    /// all zero already (fresh anonymous pages), so they are touched only once records use them.
    pub(crate) fn format_with(
        region: Region,
        capacity: u32,
        zero: bool,
    ) -> Result<Self, AttachError> {
        let needed = Self::required_size(capacity)?;
        check_region(&region, needed, Self::ALIGN)?;
        let header = region.base().cast::<RingHeader>();
        // SAFETY: the region is valid for writes of `needed >= HEADER_SIZE` bytes and aligned
        // for the header (checked above); nothing else accesses it while it is formatted.
        unsafe {
            header.as_ptr().write(RingHeader {
                meta: CachePadded::new(Meta {
                    magic: AtomicU64::new(0),
                    version: AtomicU32::new(ABI_VERSION),
                    record_tag: AtomicU32::new(T::TAG),
                    record_size: AtomicU32::new(T::SIZE),
                    capacity: AtomicU32::new(capacity),
                    header_size: AtomicU32::new(HEADER_SIZE_U32),
                    claims: AtomicU32::new(0),
                    producer_mode: AtomicU32::new(barrier::FENCED),
                    slot_size: AtomicU32::new(Self::SLOT_SIZE_U32),
                }),
                tail: CachePadded::new(AtomicU64::new(0)),
                head: CachePadded::new(AtomicU64::new(0)),
                wake: CachePadded::new(WakeWord::new()),
            });
        }
        let ring = Self {
            region,
            capacity,
            _record: PhantomData,
        };
        // Under loom every slot is an object that must be constructed in place.
        if zero || cfg!(loom) {
            ring.zero_slots();
        }
        ring.header()
            .meta
            .magic
            .store(RING_MAGIC, Ordering::Release);
        Ok(ring)
    }

    #[cfg(not(loom))]
    fn zero_slots(&self) {
        let bytes = small(u64::from(self.capacity)) * stride::<T>();
        // SAFETY: the slots span `capacity * stride::<T>()` bytes inside the region
        // (checked by `format`); zero is a valid bit pattern for every `Record`.
        unsafe { self.slots().as_ptr().cast::<u8>().write_bytes(0, bytes) };
    }

    /// Under loom each slot is a loom object and must be constructed in place.
    #[cfg(loom)]
    fn zero_slots(&self) {
        for i in 0..small(u64::from(self.capacity)) {
            // SAFETY: `i < capacity`, so the slot lies inside the region.
            let slot = unsafe { nth_slot(self.slots(), i) }.as_ptr();
            // SAFETY: every bit pattern, zero included, is a valid `Record` (trait contract).
            let zero = unsafe { core::mem::zeroed::<T>() };
            // SAFETY: `slot` is in bounds and aligned; nothing else accesses it yet.
            unsafe { slot.write(Slot::new(zero)) };
        }
    }

    /// Check that `region` holds a ring of `T` formatted by this ABI version.
    ///
    /// Refuses, naming the problem: a region too small for the header or for the capacity the
    /// header claims ([`AttachError::TooSmall`]), a misaligned base
    /// ([`AttachError::Misaligned`]), a wrong magic ([`AttachError::BadMagic`]), another ABI
    /// version ([`AttachError::VersionMismatch`]), another record type or size
    /// ([`AttachError::RecordTypeMismatch`], [`AttachError::RecordSizeMismatch`]), a header
    /// of another size ([`AttachError::HeaderSizeMismatch`]) or a bad capacity
    /// ([`AttachError::BadCapacity`]).
    pub fn attach(region: Region) -> Result<Self, AttachError> {
        check_region(&region, HEADER_SIZE, Self::ALIGN)?;
        // SAFETY: the region holds at least a header's worth of aligned, readable memory;
        // every header field is an atomic, valid for any bit pattern.
        let meta = unsafe { &region.base().cast::<RingHeader>().as_ref().meta };
        let magic = meta.magic.load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(AttachError::BadMagic {
                expected: RING_MAGIC,
                found: magic,
            });
        }
        let version = meta.version.load(Ordering::Relaxed);
        if version != ABI_VERSION {
            return Err(AttachError::VersionMismatch {
                expected: ABI_VERSION,
                found: version,
            });
        }
        let tag = meta.record_tag.load(Ordering::Relaxed);
        if tag != T::TAG {
            return Err(AttachError::RecordTypeMismatch {
                expected: T::TAG,
                found: tag,
            });
        }
        let size = meta.record_size.load(Ordering::Relaxed);
        if size != T::SIZE {
            return Err(AttachError::RecordSizeMismatch {
                expected: T::SIZE,
                found: size,
            });
        }
        let slot_size = meta.slot_size.load(Ordering::Relaxed);
        if slot_size != Self::SLOT_SIZE_U32 {
            return Err(AttachError::SlotSizeMismatch {
                expected: Self::SLOT_SIZE_U32,
                found: slot_size,
            });
        }
        let header_size = meta.header_size.load(Ordering::Relaxed);
        if header_size != HEADER_SIZE_U32 {
            return Err(AttachError::HeaderSizeMismatch {
                expected: HEADER_SIZE_U32,
                found: header_size,
            });
        }
        let capacity = meta.capacity.load(Ordering::Relaxed);
        let needed = Self::required_size(capacity)?;
        check_region(&region, needed, Self::ALIGN)?;
        Ok(Self {
            region,
            capacity,
            _record: PhantomData,
        })
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: format/attach checked that the region holds an aligned header; the region
        // (kept in `self`) keeps it mapped; all fields are atomics.
        unsafe { self.region.base().cast::<RingHeader>().as_ref() }
    }

    fn slots(&self) -> NonNull<Slot<T>> {
        // SAFETY: SLOTS_OFFSET < required_size <= region length (checked by format/attach).
        unsafe { self.region.base().add(Self::SLOTS_OFFSET).cast::<Slot<T>>() }
    }

    fn claim(&self, side: Side) -> Result<(), AttachError> {
        let bit = match side {
            Side::Producer => CLAIM_PRODUCER,
            Side::Consumer => CLAIM_CONSUMER,
        };
        let before = self.header().meta.claims.fetch_or(bit, Ordering::AcqRel);
        if before & bit == 0 {
            Ok(())
        } else {
            Err(AttachError::AlreadyClaimed(side))
        }
    }

    /// Take the producing end. Fails with [`AttachError::AlreadyClaimed`] while another
    /// producer handle for this ring is alive (the claim is released when it drops).
    ///
    /// The producer resumes from the indices in the header (so a restarted process continues
    /// where its predecessor stopped); if they are inconsistent it starts poisoned.
    pub fn producer(&self) -> Result<Producer<T>, AttachError> {
        self.claim(Side::Producer)?;
        let h = self.header();
        let light = barrier::register_producer();
        h.meta.producer_mode.store(
            if light {
                barrier::LIGHT
            } else {
                barrier::FENCED
            },
            Ordering::Relaxed,
        );
        // Pairs with the consumer's fence before it reads the mode: either the consumer sees
        // LIGHT (and issues membarrier before sleeping), or its "sleeping" flag is visible to
        // every flag load this producer makes from now on (so it will be woken).
        fence(Ordering::SeqCst);
        let tail = h.tail.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        let capacity = u64::from(self.capacity);
        let poison = (tail.wrapping_sub(head) > capacity).then_some(RingError::CorruptIndex {
            producer: tail,
            consumer: head,
            capacity: self.capacity,
        });
        Ok(Producer {
            tail,
            // A poisoned producer starts "full", so every push goes to `refresh_head`.
            limit: if poison.is_some() {
                tail
            } else {
                head.wrapping_add(capacity)
            },
            mask: capacity - 1,
            slots: self.slots(),
            header: self.region.base().cast(),
            capacity,
            light,
            poison,
            wakeups: 0,
            _region: self.region.clone(),
            _record: PhantomData,
        })
    }

    /// Take the consuming end. Fails with [`AttachError::AlreadyClaimed`] while another
    /// consumer handle for this ring is alive.
    pub fn consumer(&self) -> Result<Consumer<T>, AttachError> {
        self.claim(Side::Consumer)?;
        let head = self.header().head.load(Ordering::Acquire);
        let capacity = u64::from(self.capacity);
        Ok(Consumer {
            head,
            cached_tail: head,
            released: head,
            release_every: release_every(capacity),
            trickle: 0,
            mask: capacity - 1,
            slots: self.slots(),
            header: self.region.base().cast(),
            capacity,
            poison: None,
            parks: 0,
            fallback_parks: 0,
            late_wakeups: 0,
            stale_completions: 0,
            // A producer that attached before us must count as seen at once: a consumer that is
            // kept busy until its producer lets go never looks at the claims in between, and
            // would take that producer's going for "not attached yet" and sleep out its timeout.
            #[cfg(any(feature = "std", loom))]
            producer_seen: self.header().meta.claims.load(Ordering::Acquire) & CLAIM_PRODUCER != 0,
            #[cfg(any(feature = "std", loom))]
            attached_at: head,
            _region: self.region.clone(),
            _record: PhantomData,
        })
    }

    /// Both ends at once.
    pub fn split(self) -> Result<(Producer<T>, Consumer<T>), AttachError> {
        Ok((self.producer()?, self.consumer()?))
    }

    /// Clear the claim bits left behind by a process that died holding a handle.
    ///
    /// # Safety
    ///
    /// No handle to this ring may be alive in any process (otherwise two producers or two
    /// consumers could race on the same slots).
    pub unsafe fn reset_claims(&self) {
        self.header().meta.claims.store(0, Ordering::Release);
    }
}

/// The writing end of a ring. Exactly one exists per ring at a time.
///
/// `repr(C)` only to keep the fields the hot path touches (`tail`, `limit`, `mask`, `slots`,
/// `header`) together at the front, in one cache line.
#[repr(C)]
pub struct Producer<T: Record> {
    /// Next index to write; the truth (never read back from shared memory).
    tail: u64,
    /// `cached head + capacity`: we may write while `tail != limit`.
    limit: u64,
    mask: u64,
    slots: NonNull<Slot<T>>,
    header: NonNull<RingHeader>,
    capacity: u64,
    /// Light mode: no fence after publishing (see [`crate::barrier`]).
    light: bool,
    poison: Option<RingError>,
    wakeups: u64,
    /// Keeps the memory mapped (for owned regions).
    _region: Region,
    _record: PhantomData<T>,
}

// SAFETY: the handle owns its end of the ring exclusively (claim bit); the memory is kept alive
// by `region` (or by the creator's promise for raw regions) and accessed only through atomics
// and slots this end owns under the protocol; `T: Send`.
unsafe impl<T: Record> Send for Producer<T> {}

impl<T: Record> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("capacity", &self.capacity)
            .field("poison", &self.poison)
            .field("wakeups", &self.wakeups)
            .field("light", &self.light)
            .finish_non_exhaustive()
    }
}

impl<T: Record> Producer<T> {
    #[inline(always)]
    fn header(&self) -> &RingHeader {
        // SAFETY: the header was validated when the ring was formatted/attached and stays
        // mapped while `self.region` (or the raw region's contract) lives; fields are atomics.
        unsafe { self.header.as_ref() }
    }

    #[inline(always)]
    fn slot(&self, index: u64) -> &Slot<T> {
        let i = slot_of(index, self.mask);
        // SAFETY: `i <= mask < capacity` and the region holds `capacity` slots from `slots`.
        let slot = unsafe { nth_slot(self.slots, i) };
        // SAFETY: in bounds, aligned, initialised by `format`; cells allow shared references.
        unsafe { slot.as_ref() }
    }

    /// Re-read the consumer's index. Returns the number of free slots (0 when full or
    /// poisoned), poisoning the handle if the index is impossible.
    #[inline(never)]
    fn refresh_head(&mut self) -> usize {
        if self.poison.is_some() {
            return 0;
        }
        let head = self.header().head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.capacity {
            self.poison = Some(RingError::CorruptIndex {
                producer: self.tail,
                consumer: head,
                capacity: u32::try_from(self.capacity).unwrap_or(u32::MAX),
            });
            // Send every later push to this (cold) path, which refuses it.
            self.limit = self.tail;
            return 0;
        }
        self.limit = head.wrapping_add(self.capacity);
        small(self.capacity - used)
    }

    /// Make everything up to `self.tail` visible, then run the producer half of the wake-up
    /// protocol (see the module docs).
    #[inline(always)]
    fn publish(&mut self) {
        let h = self.header();
        h.tail.store(self.tail, PUBLISH);
        // Dekker: order the tail store before the wake-flag load (pairs with the consumer's
        // fence between setting the flag and re-reading the tail). In light mode the consumer's
        // membarrier supplies this barrier when it matters, so a compiler fence suffices; the
        // loom models always take the fence (see `barrier`).
        if cfg!(loom) || !self.light {
            fence(Ordering::SeqCst);
        } else {
            compiler_fence(Ordering::SeqCst);
        }
        if h.wake.word.load(Ordering::Relaxed) != AWAKE {
            self.wake_consumer();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_consumer(&mut self) {
        let wake = &self.header().wake;
        // Only the producer that flips the flag pays the syscall.
        if wake.word.swap(AWAKE, Ordering::Relaxed) != AWAKE {
            wake.wake();
            self.wakeups += 1;
        }
    }

    /// Append one record and publish it (waking a sleeping consumer if, and only if, it has set
    /// the wake flag). Gives the record back if the ring is full or the handle is poisoned.
    #[inline(always)]
    pub fn try_push(&mut self, record: T) -> Result<(), T> {
        if self.tail == self.limit && self.refresh_head() == 0 {
            return Err(record);
        }
        self.slot(self.tail).with_mut(|p| {
            // SAFETY: the slot at `tail` is free: `tail - head < capacity` per the acquire
            // load of `head`, so the consumer has finished reading it; only we write it.
            unsafe { p.write(record) }
        });
        self.tail = self.tail.wrapping_add(1);
        self.publish();
        Ok(())
    }

    /// Append as many of `records` as fit, in order, with one publishing store (and at most one
    /// wake-up) for the lot. Returns how many were taken (0 when full or poisoned).
    #[inline]
    pub fn push_batch(&mut self, records: &[T]) -> usize {
        let mut free = small(self.limit.wrapping_sub(self.tail));
        if free < records.len() {
            free = self.refresh_head();
        }
        let n = free.min(records.len());
        if n == 0 {
            return 0;
        }
        let (batch, _) = records.split_at(n);
        self.copy_in(batch);
        self.tail = self.tail.wrapping_add(n as u64);
        self.publish();
        n
    }

    /// Write `src` into the slots from `tail` on (free: checked against the consumer's index).
    #[inline(always)]
    fn copy_in(&self, src: &[T]) {
        #[cfg(not(loom))]
        if stride::<T>() == size_of::<T>() {
            self.copy_in_packed(src);
            return;
        }
        let mut index = self.tail;
        for record in src {
            self.slot(index).with_mut(|p| {
                // SAFETY: the slot is free (see `try_push`).
                unsafe { p.write(*record) }
            });
            index = index.wrapping_add(1);
        }
    }

    /// `copy_in` for slots exactly a record long: runs of records in one copy each.
    #[cfg(not(loom))]
    #[inline(always)]
    fn copy_in_packed(&self, src: &[T]) {
        let start = slot_of(self.tail, self.mask);
        let first = src.len().min(small(self.capacity) - start);
        let (a, b) = src.split_at(first);
        let dst = core::ptr::from_ref(self.slot(self.tail))
            .cast_mut()
            .cast::<T>();
        // SAFETY: slots start..start + a.len() lie inside the ring (a.len() <= capacity -
        // start), are free (checked against the consumer's index) and `Slot<T>` is a
        // transparent cell around `T`; `src` is a separate allocation.
        unsafe { core::ptr::copy_nonoverlapping(a.as_ptr(), dst, a.len()) };
        if !b.is_empty() {
            let dst = self.slots.as_ptr().cast::<T>();
            // SAFETY: as above for slots 0..b.len(), b.len() < capacity.
            unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), dst, b.len()) };
        }
    }

    /// Records in the ring as the producer sees it now (clamped to the capacity if the
    /// consumer's index is corrupt; the next push reports that).
    #[must_use]
    pub fn len(&self) -> usize {
        let head = self.header().head.load(Ordering::Acquire);
        small(self.tail.wrapping_sub(head).min(self.capacity))
    }

    /// True if the ring is empty as the producer sees it now.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        small(self.capacity)
    }

    /// The corruption that poisoned this handle, if any. A poisoned producer accepts nothing.
    #[must_use]
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    /// How many wake-up syscalls this producer has issued (counts only actual wakes of a
    /// consumer that had set the flag).
    #[must_use]
    pub fn wakeups(&self) -> u64 {
        self.wakeups
    }

    /// True if this producer publishes without a fence, relying on sleeping consumers'
    /// `membarrier` ("light" mode, see the module docs); false if it fences every publish.
    #[must_use]
    pub fn uses_membarrier(&self) -> bool {
        self.light
    }
}

impl<T: Record> Drop for Producer<T> {
    fn drop(&mut self) {
        // A failing loom model unwinds outside its execution, where loom atomics must not be
        // touched (it would abort the whole test binary instead of failing one test).
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        self.header()
            .meta
            .claims
            .fetch_and(!CLAIM_PRODUCER, Ordering::AcqRel);
        // A consumer parked (or about to park) on this ring learns at once that no more records
        // will come: the same Dekker handshake as `publish`, with the claim bit in place of the
        // tail (the consumer re-checks the claim after setting SLEEPING).
        #[cfg(not(loom))]
        {
            fence(Ordering::SeqCst);
            if self.header().wake.word.swap(AWAKE, Ordering::Relaxed) != AWAKE {
                self.header().wake.wake();
            }
        }
    }
}

/// The reading end of a ring. Exactly one exists per ring at a time.
///
/// `repr(C)` only to keep the hot fields (`head`, `cached_tail`, `mask`, `slots`, `header`)
/// together at the front, in one cache line.
#[repr(C)]
pub struct Consumer<T: Record> {
    /// Next index to read; the truth.
    head: u64,
    /// Last validated producer index: records `head..cached_tail` are ready.
    cached_tail: u64,
    /// The index last stored into the header's `head` (see [`Consumer::release`]).
    released: u64,
    /// Store `head` at least every this many pops ([`release_every`]).
    release_every: u64,
    /// How many re-reads of `tail` in a row found a few records (fewer than [`TRICKLE`]) and
    /// none found none: 2 or more means the producer is streaming just ahead of us (see
    /// [`Consumer::try_pop`]).
    trickle: u32,
    mask: u64,
    slots: NonNull<Slot<T>>,
    header: NonNull<RingHeader>,
    capacity: u64,
    poison: Option<RingError>,
    parks: u64,
    fallback_parks: u64,
    late_wakeups: u64,
    stale_completions: u64,
    /// Whether a producer has been seen attached (so a detached one means "gone", not "not yet").
    #[cfg(any(feature = "std", loom))]
    producer_seen: bool,
    /// `head` when this handle was made: records published after it prove a producer was here.
    #[cfg(any(feature = "std", loom))]
    attached_at: u64,
    /// Keeps the memory mapped (for owned regions).
    _region: Region,
    _record: PhantomData<T>,
}

// SAFETY: as for `Producer`: exclusive end, memory kept alive by `region`, `T: Send`.
unsafe impl<T: Record> Send for Consumer<T> {}

impl<T: Record> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("head", &self.head)
            .field("capacity", &self.capacity)
            .field("poison", &self.poison)
            .field("parks", &self.parks)
            .finish_non_exhaustive()
    }
}

impl<T: Record> Consumer<T> {
    #[inline(always)]
    fn header(&self) -> &RingHeader {
        // SAFETY: as for `Producer::header`.
        unsafe { self.header.as_ref() }
    }

    #[inline(always)]
    fn slot(&self, index: u64) -> &Slot<T> {
        let i = slot_of(index, self.mask);
        // SAFETY: `i <= mask < capacity` and the region holds `capacity` slots from `slots`.
        let slot = unsafe { nth_slot(self.slots, i) };
        // SAFETY: in bounds, aligned, initialised by `format`; cells allow shared references.
        unsafe { slot.as_ref() }
    }

    /// Re-read the producer's index; returns the number of records ready, or the corruption
    /// (which poisons the handle).
    #[inline(never)]
    fn refresh_tail(&mut self) -> Result<usize, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        let tail = self.header().tail.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(self.head);
        // `tail - cached_tail > capacity` means the tail moved backwards.
        if ready > self.capacity || tail.wrapping_sub(self.cached_tail) > self.capacity {
            let e = RingError::CorruptIndex {
                producer: tail,
                consumer: self.head,
                capacity: u32::try_from(self.capacity).unwrap_or(u32::MAX),
            };
            self.poison = Some(e);
            return Err(e);
        }
        self.cached_tail = tail;
        self.trickle = if ready != 0 && ready < TRICKLE {
            self.trickle.saturating_add(1)
        } else {
            0
        };
        if ready == 0 && self.released != self.head {
            // Caught up: hand every slot we have read back before we idle.
            self.release();
        }
        Ok(small(ready))
    }

    /// Store `head`, releasing the slots read so far to the producer.
    ///
    /// Single pops store it only every [`release_every`] records (and whenever the consumer
    /// finds the ring empty, before it parks, and when it drops): when the ring runs full the
    /// producer then gets slots back in runs instead of one at a time, each run one transfer of
    /// the `head` line instead of one per record. The producer's view of free space is at most
    /// `release_every - 1` slots behind, and never while the consumer is idle.
    #[inline(always)]
    fn release(&mut self) {
        self.header().head.store(self.head, Ordering::Release);
        self.released = self.head;
    }

    /// A consumer that pops one record at a time as fast as a producer pushes them keeps
    /// catching up with it: each re-read of `tail` then finds one or two new records, and the
    /// `tail` line and the slot being written bounce between the two cores once per record (the
    /// "lock-step" that held single push/pop to under half its speed, `docs/perf-ring.md`).
    /// When two re-reads in a row found only a few records, and none found the ring empty, the
    /// consumer waits a moment before the next: the producer meanwhile writes a run of records
    /// undisturbed, and one `tail` read then covers the whole run. A request/response exchange
    /// never waits here: between two answers its consumer finds the ring empty, which resets
    /// the count. Only [`Consumer::try_pop`] waits; [`Consumer::pop_batch`] and the waits do not.
    #[cfg(not(loom))]
    #[inline(always)]
    fn let_the_producer_run_ahead() {
        for _ in 0..TRICKLE_PAUSES {
            core::hint::spin_loop();
        }
    }

    /// Take the oldest record, `Ok(None)` if the ring is empty, or the corruption that
    /// poisoned this handle.
    ///
    /// When the producer has been trickling records just ahead of this consumer (see
    /// `let_the_producer_run_ahead`), a pop that has used up what it saw last waits ~0.7 µs
    /// before it looks again.
    #[inline(always)]
    pub fn try_pop(&mut self) -> Result<Option<T>, RingError> {
        if self.head == self.cached_tail {
            #[cfg(not(loom))]
            if self.trickle >= 2 {
                Self::let_the_producer_run_ahead();
            }
            if self.refresh_tail()? == 0 {
                return Ok(None);
            }
        }
        let record = self.slot(self.head).with(|p| {
            // SAFETY: `head < cached_tail`, which the producer published with release ordering
            // and we loaded with acquire, so the slot is fully written and the producer will
            // not touch it until we advance `head`; every bit pattern is a valid `T`.
            unsafe { p.read() }
        });
        self.head = self.head.wrapping_add(1);
        if self.head.wrapping_sub(self.released) >= self.release_every {
            self.release();
        }
        Ok(Some(record))
    }

    /// Take up to `out.len()` records, oldest first, releasing their slots with one store.
    /// Returns how many were written to the front of `out`.
    #[inline]
    pub fn pop_batch(&mut self, out: &mut [T]) -> Result<usize, RingError> {
        let mut ready = small(self.cached_tail.wrapping_sub(self.head));
        if ready < out.len() {
            match self.refresh_tail() {
                Ok(n) => ready = n,
                Err(e) if ready == 0 => return Err(e),
                Err(_) => {}
            }
        }
        let n = ready.min(out.len());
        if n == 0 {
            return Ok(0);
        }
        let (batch, _) = out.split_at_mut(n);
        self.copy_out(batch);
        self.head = self.head.wrapping_add(n as u64);
        self.release();
        Ok(n)
    }

    /// Read the records from `head` on into `dst` (published: see `try_pop`).
    #[inline(always)]
    fn copy_out(&self, dst: &mut [T]) {
        #[cfg(not(loom))]
        if stride::<T>() == size_of::<T>() {
            self.copy_out_packed(dst);
            return;
        }
        let mut index = self.head;
        for out in dst {
            *out = self.slot(index).with(|p| {
                // SAFETY: the slot is published (see `try_pop`).
                unsafe { p.read() }
            });
            index = index.wrapping_add(1);
        }
    }

    /// `copy_out` for slots exactly a record long: runs of records in one copy each.
    #[cfg(not(loom))]
    #[inline(always)]
    fn copy_out_packed(&self, dst: &mut [T]) {
        let start = slot_of(self.head, self.mask);
        let first = dst.len().min(small(self.capacity) - start);
        let (a, b) = dst.split_at_mut(first);
        let src = core::ptr::from_ref(self.slot(self.head)).cast::<T>();
        // SAFETY: slots start..start + a.len() lie inside the ring and are published (see
        // `try_pop`); `Slot<T>` is a transparent cell around `T`; `dst` is a separate buffer.
        unsafe { core::ptr::copy_nonoverlapping(src, a.as_mut_ptr(), a.len()) };
        if !b.is_empty() {
            let src = self.slots.as_ptr().cast::<T>().cast_const();
            // SAFETY: as above for slots 0..b.len().
            unsafe { core::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), b.len()) };
        }
    }

    /// Records ready now (0 if the producer's index is corrupt; the next pop reports that).
    #[must_use]
    pub fn len(&self) -> usize {
        let tail = self.header().tail.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(self.head);
        if ready > self.capacity {
            0
        } else {
            small(ready)
        }
    }

    /// True if no record is ready now.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        small(self.capacity)
    }

    /// The corruption that poisoned this handle, if any.
    #[must_use]
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    /// How many times this consumer has parked (slept on the futex).
    #[must_use]
    pub fn parks(&self) -> u64 {
        self.parks
    }

    /// Parks that ended by their timeout although records had arrived meanwhile: a wake-up
    /// that came late (the producer stalled between publishing and waking) or was lost. With a
    /// live producer this stays near zero; the two-process test checks it.
    #[must_use]
    pub fn late_wakeups(&self) -> u64 {
        self.late_wakeups
    }

    /// Parks cut short to [`crate::Waiter::FALLBACK_PARK`] because the producer runs in light
    /// mode and this process's `membarrier` call failed (see the module docs). Non-zero means
    /// wake-ups may be late by up to that much; the fix is to allow `membarrier(2)` here.
    #[must_use]
    pub fn fallback_parks(&self) -> u64 {
        self.fallback_parks
    }

    /// Completions discarded by [`Consumer::wait_completion`] because they answered an earlier
    /// request (one that had already timed out).
    #[must_use]
    pub fn stale_completions(&self) -> u64 {
        self.stale_completions
    }
}

#[cfg(any(feature = "std", loom))]
impl<T: Record> Consumer<T> {
    /// Whether a producer holds the other end right now.
    pub fn producer_attached(&self) -> bool {
        self.header().meta.claims.load(Ordering::Acquire) & CLAIM_PRODUCER != 0
    }

    /// Whether the producer has gone: it was attached when this handle was made or at some point
    /// this consumer looked, or it published records since, and is not attached now (dropped; in
    /// the two-process layout, the producing process let go). A producer that has not attached
    /// yet is not "gone".
    pub fn producer_gone(&mut self) -> bool {
        let attached = self.producer_attached();
        self.producer_seen |= attached || self.cached_tail != self.attached_at;
        self.producer_seen && !attached
    }

    /// Wait until at least one record is ready: spin for `spin` (yielding the CPU every 20 µs once
    /// it has spun 5 µs, so a spinning device-model thread never keeps another thread from a CPU
    /// for long), then park on the futex (the consumer half of the wake-up protocol in the module
    /// docs) until woken, re-checking at least every [`crate::Waiter::PARK_SLICE`], for at most
    /// `timeout` in all. ([`Consumer::wait_completion`], a vCPU's wait, does not yield.)
    ///
    /// Returns [`WaitOutcome::Ready`] (records can be popped), [`WaitOutcome::TimedOut`], or
    /// the corruption that poisoned the handle.
    pub fn wait_for_records(
        &mut self,
        spin: Duration,
        timeout: Duration,
    ) -> Result<WaitOutcome, RingError> {
        self.wait_since(&mut Clock::start_yielding(), spin, timeout)
    }

    /// Ask for the line of the next record to be written while we wait for it, so that once
    /// the producer has written it the line travels alongside the `tail` line we poll instead
    /// of after it (two cross-core transfers in parallel rather than in turn). A hint only: it
    /// reads nothing and cannot fault (the slot lies inside our mapping).
    #[inline(always)]
    fn prefetch_next(&self) {
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        {
            let line = core::ptr::from_ref(self.slot(self.head)).cast::<i8>();
            // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has; a prefetch of any
            // address is architecturally harmless, and this one is inside the ring's slots.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line)
            };
        }
    }

    /// Records ready according to the cached producer index, refreshing it if that says none.
    #[inline]
    fn ready(&mut self) -> Result<usize, RingError> {
        match small(self.cached_tail.wrapping_sub(self.head)) {
            0 => self.refresh_tail(),
            n => Ok(n),
        }
    }

    fn wait_since(
        &mut self,
        clock: &mut Clock,
        spin: Duration,
        timeout: Duration,
    ) -> Result<WaitOutcome, RingError> {
        if self.ready()? > 0 {
            return Ok(WaitOutcome::Ready { parked: false });
        }
        while clock.keep_spinning(spin) {
            spin_hint();
            self.prefetch_next();
            if self.refresh_tail()? > 0 {
                return Ok(WaitOutcome::Ready { parked: false });
            }
        }
        let mut parked = false;
        loop {
            let Some(budget) = clock.park_budget(timeout) else {
                // Leave the flag clear, so producers stop paying for wake-ups nobody awaits.
                self.header().wake.set(AWAKE);
                return Ok(WaitOutcome::TimedOut);
            };
            let wake = &self.header().wake;
            wake.set(SLEEPING);
            // Dekker: order the flag store before the tail re-read (pairs with the producer's
            // fence between its tail store and its flag load).
            fence(Ordering::SeqCst);
            // A light producer has no fence of its own: supply it (see `barrier`).
            let mut budget = budget;
            let mut fallback = false;
            if self.header().meta.producer_mode.load(Ordering::Relaxed) != barrier::FENCED
                && !barrier::heavy_barrier()
            {
                budget = budget.min(Waiter::FALLBACK_PARK);
                fallback = true;
            }
            let ready = self.refresh_tail();
            if !matches!(ready, Ok(0)) {
                self.header().wake.set(AWAKE);
                return ready.map(|_| WaitOutcome::Ready { parked });
            }
            // A producer that let go after our fence swaps the flag back and wakes us; one that
            // let go before it is seen here.
            #[cfg(not(loom))]
            if self.producer_gone() {
                self.header().wake.set(AWAKE);
                return Ok(WaitOutcome::TimedOut);
            }
            let timed_out = self.header().wake.sleep(budget);
            self.parks += 1;
            self.fallback_parks += u64::from(fallback);
            parked = true;
            let ready = self.refresh_tail();
            if !matches!(ready, Ok(0)) {
                // Records arrived while we slept, yet nobody woke us: the producer stalled
                // between publishing and waking, or a wake-up was lost.
                self.late_wakeups += u64::from(timed_out);
                self.header().wake.set(AWAKE);
                return ready.map(|_| WaitOutcome::Ready { parked });
            }
            // The producer is gone and the ring is empty: nothing more will come.
            #[cfg(not(loom))]
            if self.producer_gone() {
                self.header().wake.set(AWAKE);
                return Ok(WaitOutcome::TimedOut);
            }
        }
    }
}

#[cfg(any(feature = "std", loom))]
impl Consumer<CompletionRecord> {
    /// Wait for the completion of request `seq` (the vCPU side after posting a read, or a
    /// write with `NEEDS_COMPLETION`): spin for `spin`, then park, for at most `timeout`.
    ///
    /// Completions for earlier requests (answers that arrive after their request timed out)
    /// are discarded and counted ([`Consumer::stale_completions`]). A completion for a later
    /// `seq` is a protocol violation: [`RingError::UnexpectedCompletion`]. No completion in
    /// time: [`RingError::Timeout`]; the caller decides what the guest sees.
    pub fn wait_completion(
        &mut self,
        seq: u64,
        spin: Duration,
        timeout: Duration,
    ) -> Result<CompletionRecord, RingError> {
        let mut clock = Clock::start();
        // A vCPU waiting for its answer must never wait on purpose.
        self.trickle = 0;
        loop {
            while let Some(c) = self.try_pop()? {
                if c.seq == seq {
                    return Ok(c);
                }
                let behind = seq.wrapping_sub(c.seq);
                if behind < 1 << 63 {
                    self.stale_completions += 1;
                } else {
                    return Err(RingError::UnexpectedCompletion {
                        expected: seq,
                        found: c.seq,
                    });
                }
            }
            if self.wait_since(&mut clock, spin, timeout)? == WaitOutcome::TimedOut {
                return Err(RingError::Timeout);
            }
        }
    }
}

impl<T: Record> Drop for Consumer<T> {
    fn drop(&mut self) {
        // A failing loom model unwinds outside its execution, where loom atomics must not be
        // touched (it would abort the whole test binary instead of failing one test).
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        // A successor resumes from the stored index: it must not see records twice.
        if self.released != self.head {
            self.release();
        }
        self.header()
            .meta
            .claims
            .fetch_and(!CLAIM_CONSUMER, Ordering::AcqRel);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

/// Memory for [`channel`], freed when the last handle drops: fresh anonymous pages of its own
/// (zero, and touched only once records use them), not the allocator's, whose `alloc_zeroed`
/// writes every page at once (a 4,096-record trace ring: 128 KiB resident and ~60 µs of page
/// faults per vCPU at start-up, for tracing that is off). Under loom: the allocator.
#[cfg(any(feature = "std", loom))]
struct HeapMemory {
    base: NonNull<u8>,
    layout: core::alloc::Layout,
}

#[cfg(any(feature = "std", loom))]
impl HeapMemory {
    /// Zeroed memory for `layout` (whose alignment is at most a page), or `None`.
    fn new(layout: core::alloc::Layout) -> Option<Self> {
        #[cfg(not(loom))]
        // SAFETY: a new private anonymous mapping; no address hint, no file.
        let base = unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                core::ptr::null_mut()
            } else {
                p.cast::<u8>()
            }
        };
        #[cfg(loom)]
        // SAFETY: the layout has a non-zero size (it includes the header).
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(Self {
            base: NonNull::new(base)?,
            layout,
        })
    }
}

// SAFETY: plain owned memory; all access goes through the ring protocol.
#[cfg(any(feature = "std", loom))]
unsafe impl Send for HeapMemory {}
// SAFETY: as above.
#[cfg(any(feature = "std", loom))]
unsafe impl Sync for HeapMemory {}

#[cfg(any(feature = "std", loom))]
impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: mapped (under loom: allocated) by `HeapMemory::new` with exactly this size,
        // released once; no handle is left to use it.
        #[cfg(not(loom))]
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.layout.size());
        }
        // SAFETY: as above.
        #[cfg(loom)]
        unsafe {
            std::alloc::dealloc(self.base.as_ptr(), self.layout);
        }
    }
}

/// An in-process ring of `capacity` records on the heap; the memory lives while either
/// handle does. See [`channel`].
#[cfg(any(feature = "std", loom))]
pub fn try_channel<T: Record>(capacity: u32) -> Result<(Producer<T>, Consumer<T>), AttachError> {
    let layout = Ring::<T>::layout(capacity)?;
    let memory = HeapMemory::new(layout).ok_or(AttachError::OutOfMemory)?;
    let base = memory.base;
    let owner = std::sync::Arc::new(memory);
    // SAFETY: `layout.size()` bytes at `base` stay allocated while `owner` lives, and every
    // handle keeps a clone of it; nothing else touches the memory.
    let region = unsafe { Region::with_owner(base, layout.size(), owner) };
    // Fresh memory is zero already.
    Ring::format_with(region, capacity, false)?.split()
}

/// An in-process ring of `capacity` records on the heap: `(producer, consumer)`.
///
/// # Panics
///
/// If `capacity` is not a power of two in `1..=MAX_CAPACITY` (a programming error; use
/// [`try_channel`] for a configured value) or the allocation fails.
#[cfg(any(feature = "std", loom))]
#[must_use]
pub fn channel<T: Record>(capacity: u32) -> (Producer<T>, Consumer<T>) {
    match try_channel(capacity) {
        Ok(pair) => pair,
        Err(e) => panic!("pipeline::channel({capacity}): {e}"),
    }
}
