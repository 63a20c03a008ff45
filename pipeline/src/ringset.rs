//! The per-CPU ring set: for every physical CPU, one exit ring (vCPU side → device side) and
//! one completion ring (device side → vCPU side), all in one [`Region`] so that the whole set
//! can be a single memfd mapping shared by the module process and the device-model process.
//!
//! ```text
//! offset 0            set header (magic, ABI version, CPUs, both capacities, header size)
//! offset H            CPU 0: exit ring (header + slots), completion ring (header + slots)
//! offset H + S        CPU 1: ...                         (S = per-CPU stride)
//! ```
//! Every ring starts on a [`Ring::ALIGN`] boundary, so no two rings share a cache line.
//! Each ring is an ordinary [`Ring`] with its own header; the set header only records the
//! geometry, and each side re-validates a ring's own header when it claims it.

use core::fmt;
use core::mem::size_of;

use crossbeam_utils::CachePadded;

use crate::abi::{CompletionRecord, ExitRecord, ABI_VERSION};
use crate::region::Region;
use crate::ring::{AttachError, Consumer, Producer, Ring};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// First word of a ring-set header.
pub const RINGSET_MAGIC: u64 = u64::from_le_bytes(*b"BHVRSET\x01");

/// Most CPUs a ring set may describe (`hw.vmm.maxcpu` is far lower in practice).
pub const MAX_CPUS: u32 = 4096;

#[repr(C)]
struct SetHeader {
    magic: AtomicU64,
    version: AtomicU32,
    cpus: AtomicU32,
    exit_capacity: AtomicU32,
    completion_capacity: AtomicU32,
    header_size: AtomicU32,
}

type PaddedSetHeader = CachePadded<SetHeader>;

#[allow(
    clippy::cast_possible_truncation,
    reason = "the set header is one padded line"
)]
const SET_HEADER_SIZE_U32: u32 = size_of::<PaddedSetHeader>() as u32;

/// Alignment of every ring in the set (and of the set's base).
const ALIGN: usize = if Ring::<ExitRecord>::ALIGN > Ring::<CompletionRecord>::ALIGN {
    Ring::<ExitRecord>::ALIGN
} else {
    Ring::<CompletionRecord>::ALIGN
};

/// Where the rings of a set lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Offset of CPU 0's exit ring.
    first: usize,
    /// Bytes of one exit ring, rounded up to `ALIGN`.
    exit_len: usize,
    /// Bytes of one completion ring, rounded up to `ALIGN`.
    completion_len: usize,
    /// Bytes per CPU.
    stride: usize,
    /// Bytes of the whole set.
    total: usize,
}

impl Geometry {
    fn new(cpus: u32, exit_capacity: u32, completion_capacity: u32) -> Result<Self, AttachError> {
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(AttachError::BadCpuCount(cpus));
        }
        let round = |n: usize, cap: u32| {
            n.checked_next_multiple_of(ALIGN)
                .ok_or(AttachError::BadCapacity(cap))
        };
        let first = size_of::<PaddedSetHeader>().next_multiple_of(ALIGN);
        let exit_len = round(
            Ring::<ExitRecord>::required_size(exit_capacity)?,
            exit_capacity,
        )?;
        let completion_len = round(
            Ring::<CompletionRecord>::required_size(completion_capacity)?,
            completion_capacity,
        )?;
        let overflow = AttachError::BadCapacity(exit_capacity.max(completion_capacity));
        let stride = exit_len.checked_add(completion_len).ok_or(overflow)?;
        let total = usize::try_from(cpus)
            .ok()
            .and_then(|c| stride.checked_mul(c))
            .and_then(|s| s.checked_add(first))
            .ok_or(overflow)?;
        Ok(Self {
            first,
            exit_len,
            completion_len,
            stride,
            total,
        })
    }
}

/// A validated per-CPU ring set; hands out each CPU's vCPU-side and device-side pair.
pub struct RingSet {
    region: Region,
    cpus: u32,
    exit_capacity: u32,
    completion_capacity: u32,
    geometry: Geometry,
}

impl fmt::Debug for RingSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingSet")
            .field("cpus", &self.cpus)
            .field("exit_capacity", &self.exit_capacity)
            .field("completion_capacity", &self.completion_capacity)
            .field("bytes", &self.geometry.total)
            .finish()
    }
}

/// The vCPU thread's ends for one CPU: post exits, await completions.
#[derive(Debug)]
pub struct VcpuRings {
    /// Post [`ExitRecord`]s here.
    pub exits: Producer<ExitRecord>,
    /// Wait for [`CompletionRecord`]s here ([`Consumer::wait_completion`]).
    pub completions: Consumer<CompletionRecord>,
}

/// The device-model side's ends for one CPU: drain exits, post completions.
#[derive(Debug)]
pub struct DeviceRings {
    /// Drain [`ExitRecord`]s here (batch with [`Consumer::pop_batch`]).
    pub exits: Consumer<ExitRecord>,
    /// Answer with [`CompletionRecord`]s here.
    pub completions: Producer<CompletionRecord>,
}

fn check(region: &Region, needed: usize) -> Result<(), AttachError> {
    if region.len() < needed {
        return Err(AttachError::TooSmall {
            needed,
            len: region.len(),
        });
    }
    let addr = region.as_ptr().addr();
    if addr % ALIGN != 0 {
        return Err(AttachError::Misaligned { align: ALIGN, addr });
    }
    Ok(())
}

impl RingSet {
    /// Alignment the region's base must have.
    pub const ALIGN: usize = ALIGN;

    /// Bytes a set of `cpus` CPUs with these ring capacities needs.
    pub fn required_size(
        cpus: u32,
        exit_capacity: u32,
        completion_capacity: u32,
    ) -> Result<usize, AttachError> {
        Geometry::new(cpus, exit_capacity, completion_capacity).map(|g| g.total)
    }

    /// Initialise `region` as a set of `cpus` × (exit ring of `exit_capacity`, completion ring
    /// of `completion_capacity`). Must be done before the region is shared.
    pub fn format(
        region: Region,
        cpus: u32,
        exit_capacity: u32,
        completion_capacity: u32,
    ) -> Result<Self, AttachError> {
        Self::format_with(region, cpus, exit_capacity, completion_capacity, true)
    }

    /// As [`RingSet::format`], for a region that is all zero already (a fresh
    /// [`crate::SharedRegion`]): the slots are not written, so their pages are allocated only
    /// as records use them (a 1-vCPU set: ~100 KiB of which a short-lived VM touches a few).
    /// Leaving old contents in the slots would break nothing (a slot is read only after it is
    /// written), but a peer could see them, so use it only on fresh memory.
    pub fn format_zeroed(
        region: Region,
        cpus: u32,
        exit_capacity: u32,
        completion_capacity: u32,
    ) -> Result<Self, AttachError> {
        Self::format_with(region, cpus, exit_capacity, completion_capacity, false)
    }

    fn format_with(
        region: Region,
        cpus: u32,
        exit_capacity: u32,
        completion_capacity: u32,
        zero: bool,
    ) -> Result<Self, AttachError> {
        let geometry = Geometry::new(cpus, exit_capacity, completion_capacity)?;
        check(&region, geometry.total)?;
        let set = Self {
            region,
            cpus,
            exit_capacity,
            completion_capacity,
            geometry,
        };
        // SAFETY: the region holds `total` aligned, writable bytes (checked), and nothing else
        // accesses it while it is formatted.
        unsafe {
            set.region
                .base()
                .cast::<PaddedSetHeader>()
                .as_ptr()
                .write(CachePadded::new(SetHeader {
                    magic: AtomicU64::new(0),
                    version: AtomicU32::new(ABI_VERSION),
                    cpus: AtomicU32::new(cpus),
                    exit_capacity: AtomicU32::new(exit_capacity),
                    completion_capacity: AtomicU32::new(completion_capacity),
                    header_size: AtomicU32::new(SET_HEADER_SIZE_U32),
                }));
        }
        for cpu in 0..cpus {
            Ring::<ExitRecord>::format_with(set.exit_region(cpu)?, exit_capacity, zero)?;
            Ring::<CompletionRecord>::format_with(
                set.completion_region(cpu)?,
                completion_capacity,
                zero,
            )?;
        }
        set.header().magic.store(RINGSET_MAGIC, Ordering::Release);
        Ok(set)
    }

    /// Check that `region` holds a ring set formatted by this ABI version. Refuses a bad size,
    /// alignment, magic, version, CPU count or capacity with the [`AttachError`] naming it.
    /// The rings themselves are checked when a side is claimed.
    pub fn attach(region: Region) -> Result<Self, AttachError> {
        check(&region, size_of::<PaddedSetHeader>())?;
        // SAFETY: the region holds an aligned header's worth of readable bytes; all fields are
        // atomics, valid for any bit pattern.
        let header = unsafe { region.base().cast::<PaddedSetHeader>().as_ref() };
        let magic = header.magic.load(Ordering::Acquire);
        if magic != RINGSET_MAGIC {
            return Err(AttachError::BadMagic {
                expected: RINGSET_MAGIC,
                found: magic,
            });
        }
        let version = header.version.load(Ordering::Relaxed);
        if version != ABI_VERSION {
            return Err(AttachError::VersionMismatch {
                expected: ABI_VERSION,
                found: version,
            });
        }
        let header_size = header.header_size.load(Ordering::Relaxed);
        if header_size != SET_HEADER_SIZE_U32 {
            return Err(AttachError::HeaderSizeMismatch {
                expected: SET_HEADER_SIZE_U32,
                found: header_size,
            });
        }
        let cpus = header.cpus.load(Ordering::Relaxed);
        let exit_capacity = header.exit_capacity.load(Ordering::Relaxed);
        let completion_capacity = header.completion_capacity.load(Ordering::Relaxed);
        let geometry = Geometry::new(cpus, exit_capacity, completion_capacity)?;
        check(&region, geometry.total)?;
        Ok(Self {
            region,
            cpus,
            exit_capacity,
            completion_capacity,
            geometry,
        })
    }

    fn header(&self) -> &SetHeader {
        // SAFETY: checked by format/attach; kept mapped by `self.region`.
        unsafe { self.region.base().cast::<PaddedSetHeader>().as_ref() }
    }

    /// Number of CPUs in the set.
    #[must_use]
    pub fn cpus(&self) -> u32 {
        self.cpus
    }

    /// Capacity of each exit ring.
    #[must_use]
    pub fn exit_capacity(&self) -> u32 {
        self.exit_capacity
    }

    /// Capacity of each completion ring.
    #[must_use]
    pub fn completion_capacity(&self) -> u32 {
        self.completion_capacity
    }

    fn cpu_offset(&self, cpu: u32) -> Result<usize, AttachError> {
        let out_of_range = AttachError::CpuOutOfRange {
            cpu,
            cpus: self.cpus,
        };
        if cpu >= self.cpus {
            return Err(out_of_range);
        }
        usize::try_from(cpu)
            .ok()
            .and_then(|c| c.checked_mul(self.geometry.stride))
            .and_then(|o| o.checked_add(self.geometry.first))
            .ok_or(out_of_range)
    }

    fn exit_region(&self, cpu: u32) -> Result<Region, AttachError> {
        let offset = self.cpu_offset(cpu)?;
        self.sub(offset, self.geometry.exit_len)
    }

    fn completion_region(&self, cpu: u32) -> Result<Region, AttachError> {
        let offset = self.cpu_offset(cpu)? + self.geometry.exit_len;
        self.sub(offset, self.geometry.completion_len)
    }

    fn sub(&self, offset: usize, len: usize) -> Result<Region, AttachError> {
        self.region
            .subregion(offset, len)
            .ok_or(AttachError::TooSmall {
                needed: offset.saturating_add(len),
                len: self.region.len(),
            })
    }

    /// The exit ring of `cpu`, validated.
    pub fn exit_ring(&self, cpu: u32) -> Result<Ring<ExitRecord>, AttachError> {
        Ring::attach(self.exit_region(cpu)?)
    }

    /// The completion ring of `cpu`, validated.
    pub fn completion_ring(&self, cpu: u32) -> Result<Ring<CompletionRecord>, AttachError> {
        Ring::attach(self.completion_region(cpu)?)
    }

    /// Claim the vCPU side of `cpu`: the exit ring's producer and the completion ring's
    /// consumer. Fails if the CPU is out of range, a ring is corrupt, or either end is
    /// already claimed.
    pub fn vcpu_side(&self, cpu: u32) -> Result<VcpuRings, AttachError> {
        Ok(VcpuRings {
            exits: self.exit_ring(cpu)?.producer()?,
            completions: self.completion_ring(cpu)?.consumer()?,
        })
    }

    /// Claim the device side of `cpu`: the exit ring's consumer and the completion ring's
    /// producer.
    pub fn device_side(&self, cpu: u32) -> Result<DeviceRings, AttachError> {
        Ok(DeviceRings {
            exits: self.exit_ring(cpu)?.consumer()?,
            completions: self.completion_ring(cpu)?.producer()?,
        })
    }
}
