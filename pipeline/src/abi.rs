//! The exit ABI between the vCPU half and the device-model half.
//!
//! Everything that crosses a ring is a [`Record`]: `#[repr(C)]`, `Copy`, fixed size, no padding,
//! no pointers (guest-physical addresses, ports and offsets are plain integers), and valid for
//! every bit pattern. The last point matters because the other end of a ring may be another,
//! possibly hostile, process: a record is always read back as plain integers and then
//! *decoded* ([`ExitRecord::decode`], [`ExitKind::try_from`]); it is never transmuted into an
//! enum.
//!
//! The layout of both records is pinned by compile-time assertions at the bottom of this file
//! (size, alignment and the offset of every field), so it cannot drift silently. Any change to
//! it must bump [`ABI_VERSION`], which every ring header carries and [`crate::Ring::attach`]
//! checks.

use core::fmt;
use core::mem::{align_of, offset_of, size_of};

/// Version of the record layouts and of the ring header. A ring formatted with another version
/// is refused by [`crate::Ring::attach`].
pub const ABI_VERSION: u32 = 1;

/// What may cross a ring.
///
/// # Safety
///
/// An implementor must be `#[repr(C)]` (or `transparent`) and:
/// - contain no padding bytes (a record is copied byte for byte into memory another process can
///   read, so padding would leak stack contents);
/// - contain no pointers or references;
/// - be valid for every bit pattern (a hostile peer can write any bytes into a slot; the ring
///   reads them back as `Self`, and also zero-fills slots with `mem::zeroed`);
/// - have a size that fits in `u32`;
/// - use a [`TAG`](Record::TAG) no other record type uses, so a ring formatted for one record
///   type is refused when attached as another.
pub unsafe trait Record: Copy + Send + 'static {
    /// Identifies the record type in the ring header (four ASCII bytes by convention).
    const TAG: u32;
    /// Size of one record in bytes, stored in the ring header and checked on attach.
    const SIZE: u32 = {
        let size = size_of::<Self>();
        assert!(size > 0 && size <= u32::MAX as usize);
        #[allow(
            clippy::cast_possible_truncation,
            reason = "checked by the assertion just above, at compile time"
        )]
        let size = size as u32;
        size
    };
}

/// One exit handed from a vCPU thread to the device-model side.
///
/// Field meanings (all little-endian integers, 48 bytes in all):
/// - `seq`: per-vCPU sequence number; the completion for this exit carries the same `seq`.
/// - `addr`: the I/O port (PIO) or guest-physical address (MMIO) of the access.
/// - `offset`: the offset of `addr` within the owning device's range (devices see offsets,
///   not addresses).
/// - `data`: for writes, the written value in the low `size` bytes; zero for reads.
/// - `vcpu`: the vCPU that exited.
/// - `device`: the owner id from the bus registry.
/// - `kind`: an [`ExitKind`] as `u8`.
/// - `size`: access width in bytes: 1, 2, 4 or 8.
/// - `flags`: [`ExitFlags`] bits.
/// - `reserved`: zero.
///
/// Read from shared memory, use [`ExitRecord::decode`] before acting on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitRecord {
    /// Per-vCPU sequence number, echoed by the completion.
    pub seq: u64,
    /// Port or guest-physical address.
    pub addr: u64,
    /// Offset within the owning device.
    pub offset: u64,
    /// Write data, little-endian low `size` bytes.
    pub data: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Owner id from the bus registry.
    pub device: u16,
    /// [`ExitKind`] as `u8`.
    pub kind: u8,
    /// Access width: 1, 2, 4 or 8.
    pub size: u8,
    /// [`ExitFlags`] bits: `POSTED` = 1, `NEEDS_COMPLETION` = 2.
    pub flags: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// The answer to an exit that needed one, sent back on the completion ring (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionRecord {
    /// The `seq` of the [`ExitRecord`] this completes.
    pub seq: u64,
    /// Read data, little-endian low `size` bytes of the original access.
    pub data: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// 0 = ok; anything else is a device-model error the vCPU side maps to a guest-visible result.
    pub status: u32,
    /// Must be zero.
    pub reserved: u64,
}

// SAFETY: repr(C), five u64/u32/u16/u8 fields laid out without padding (asserted below),
// no pointers, every bit pattern is a valid value, 48 bytes; the tag "EXIT" is unique.
unsafe impl Record for ExitRecord {
    const TAG: u32 = u32::from_le_bytes(*b"EXIT");
}

// SAFETY: repr(C), integer fields without padding (asserted below), no pointers, every bit
// pattern valid, 32 bytes; the tag "CMPL" is unique.
unsafe impl Record for CompletionRecord {
    const TAG: u32 = u32::from_le_bytes(*b"CMPL");
}

/// The kind of access that caused an exit.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// `in` from an I/O port.
    PioRead = 1,
    /// `out` to an I/O port.
    PioWrite = 2,
    /// Load from an MMIO address.
    MmioRead = 3,
    /// Store to an MMIO address.
    MmioWrite = 4,
}

impl ExitKind {
    /// True for the two read kinds (which always need a completion).
    #[must_use]
    pub const fn is_read(self) -> bool {
        matches!(self, Self::PioRead | Self::MmioRead)
    }

    /// True for port I/O.
    #[must_use]
    pub const fn is_pio(self) -> bool {
        matches!(self, Self::PioRead | Self::PioWrite)
    }
}

impl TryFrom<u8> for ExitKind {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::PioRead),
            2 => Ok(Self::PioWrite),
            3 => Ok(Self::MmioRead),
            4 => Ok(Self::MmioWrite),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

impl From<ExitKind> for u8 {
    fn from(kind: ExitKind) -> Self {
        kind as u8
    }
}

/// Width of an access.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessSize {
    /// 1 byte.
    Byte = 1,
    /// 2 bytes.
    Word = 2,
    /// 4 bytes.
    Dword = 4,
    /// 8 bytes.
    Qword = 8,
}

impl AccessSize {
    /// The width in bytes.
    #[must_use]
    pub const fn bytes(self) -> usize {
        self as usize
    }

    /// The mask of the low `bytes()` bytes of a `u64`.
    #[must_use]
    pub const fn mask(self) -> u64 {
        match self {
            Self::Byte => 0xff,
            Self::Word => 0xffff,
            Self::Dword => 0xffff_ffff,
            Self::Qword => u64::MAX,
        }
    }
}

impl TryFrom<u8> for AccessSize {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Byte),
            2 => Ok(Self::Word),
            4 => Ok(Self::Dword),
            8 => Ok(Self::Qword),
            other => Err(DecodeError::BadSize(other)),
        }
    }
}

/// The bits of [`ExitRecord::flags`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExitFlags(u32);

impl ExitFlags {
    /// A write the vCPU does not wait for: it re-entered the guest as soon as it posted it.
    pub const POSTED: Self = Self(1);
    /// The vCPU waits for a [`CompletionRecord`] with the same `seq` (always set on reads).
    pub const NEEDS_COMPLETION: Self = Self(2);
    /// Every defined bit.
    pub const ALL: Self = Self(Self::POSTED.0 | Self::NEEDS_COMPLETION.0);

    /// No bits set.
    #[must_use]
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The raw bits.
    #[must_use]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The flags for `bits`, or `None` if an undefined bit is set.
    #[must_use]
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !Self::ALL.0 == 0 {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// True if every bit of `other` is set in `self`.
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for ExitFlags {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Why an [`ExitRecord`] read from a ring was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// `kind` is not an [`ExitKind`].
    UnknownKind(u8),
    /// `size` is not 1, 2, 4 or 8.
    BadSize(u8),
    /// `flags` has bits outside [`ExitFlags::ALL`].
    UnknownFlags(u32),
    /// Both `POSTED` and `NEEDS_COMPLETION` are set.
    ConflictingFlags,
    /// A read without `NEEDS_COMPLETION`: nobody would wait for its answer.
    ReadWithoutCompletion,
    /// `reserved` is not zero.
    ReservedNotZero(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind(k) => write!(f, "Unknown exit kind {k}"),
            Self::BadSize(s) => write!(f, "Bad access size {s} (expected 1, 2, 4 or 8)"),
            Self::UnknownFlags(b) => write!(f, "Unknown exit flags {b:#x}"),
            Self::ConflictingFlags => write!(f, "Exit is both posted and needs completion"),
            Self::ReadWithoutCompletion => write!(f, "Read exit without NEEDS_COMPLETION"),
            Self::ReservedNotZero(r) => write!(f, "Reserved field is {r:#x}, not zero"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// A validated [`ExitRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Sequence number.
    pub seq: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Owner id.
    pub device: u16,
    /// Access kind.
    pub kind: ExitKind,
    /// Access width.
    pub size: AccessSize,
    /// Port or guest-physical address.
    pub addr: u64,
    /// Offset within the device.
    pub offset: u64,
    /// Write data masked to `size` bytes (zero for reads).
    pub data: u64,
    /// Flags.
    pub flags: ExitFlags,
}

impl Exit {
    /// True if the vCPU waits for a completion of this exit.
    #[must_use]
    pub const fn needs_completion(&self) -> bool {
        self.flags.contains(ExitFlags::NEEDS_COMPLETION)
    }
}

impl ExitRecord {
    /// Decode and validate a record read from a ring (which a hostile peer may have written).
    ///
    /// Rules: `kind` and `size` must be defined values; `flags` may not have undefined bits nor
    /// both `POSTED` and `NEEDS_COMPLETION`; a read must have `NEEDS_COMPLETION`; a write with
    /// neither flag is treated as posted; `reserved` must be zero. Write data is masked to
    /// `size` bytes, read data is ignored (returned as zero).
    pub fn decode(&self) -> Result<Exit, DecodeError> {
        let kind = ExitKind::try_from(self.kind)?;
        let size = AccessSize::try_from(self.size)?;
        let flags =
            ExitFlags::from_bits(self.flags).ok_or(DecodeError::UnknownFlags(self.flags))?;
        if flags.contains(ExitFlags::ALL) {
            return Err(DecodeError::ConflictingFlags);
        }
        if kind.is_read() && !flags.contains(ExitFlags::NEEDS_COMPLETION) {
            return Err(DecodeError::ReadWithoutCompletion);
        }
        if self.reserved != 0 {
            return Err(DecodeError::ReservedNotZero(self.reserved));
        }
        let data = if kind.is_read() {
            0
        } else {
            self.data & size.mask()
        };
        Ok(Exit {
            seq: self.seq,
            vcpu: self.vcpu,
            device: self.device,
            kind,
            size,
            addr: self.addr,
            offset: self.offset,
            data,
            flags,
        })
    }
}

impl From<&Exit> for ExitRecord {
    fn from(e: &Exit) -> Self {
        Self {
            seq: e.seq,
            addr: e.addr,
            offset: e.offset,
            data: e.data & e.size.mask(),
            vcpu: e.vcpu,
            device: e.device,
            kind: e.kind.into(),
            size: e.size as u8,
            flags: e.flags.bits(),
            reserved: 0,
        }
    }
}

// The layout is the ABI: pin every field.
const _: () = {
    assert!(size_of::<ExitRecord>() == 48);
    assert!(align_of::<ExitRecord>() == 8);
    assert!(offset_of!(ExitRecord, seq) == 0);
    assert!(offset_of!(ExitRecord, addr) == 8);
    assert!(offset_of!(ExitRecord, offset) == 16);
    assert!(offset_of!(ExitRecord, data) == 24);
    assert!(offset_of!(ExitRecord, vcpu) == 32);
    assert!(offset_of!(ExitRecord, device) == 36);
    assert!(offset_of!(ExitRecord, kind) == 38);
    assert!(offset_of!(ExitRecord, size) == 39);
    assert!(offset_of!(ExitRecord, flags) == 40);
    assert!(offset_of!(ExitRecord, reserved) == 44);
    // No padding: the fields add up to the size.
    assert!(8 + 8 + 8 + 8 + 4 + 2 + 1 + 1 + 4 + 4 == size_of::<ExitRecord>());

    assert!(size_of::<CompletionRecord>() == 32);
    assert!(align_of::<CompletionRecord>() == 8);
    assert!(offset_of!(CompletionRecord, seq) == 0);
    assert!(offset_of!(CompletionRecord, data) == 8);
    assert!(offset_of!(CompletionRecord, vcpu) == 16);
    assert!(offset_of!(CompletionRecord, status) == 20);
    assert!(offset_of!(CompletionRecord, reserved) == 24);
    assert!(8 + 8 + 4 + 4 + 8 == size_of::<CompletionRecord>());

    assert!(size_of::<ExitKind>() == 1);
    assert!(ExitRecord::SIZE == 48);
    assert!(CompletionRecord::SIZE == 32);
    assert!(ExitRecord::TAG != CompletionRecord::TAG);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_kind_decodes_every_byte_without_panicking() {
        let mut ok = 0;
        for b in 0..=u8::MAX {
            match ExitKind::try_from(b) {
                Ok(k) => {
                    assert_eq!(u8::from(k), b);
                    ok += 1;
                }
                Err(e) => assert_eq!(e, DecodeError::UnknownKind(b)),
            }
        }
        assert_eq!(ok, 4);
    }

    fn write(kind: ExitKind, size: u8, data: u64, flags: ExitFlags) -> ExitRecord {
        ExitRecord {
            seq: 7,
            addr: 0x3f8,
            offset: 0,
            data,
            vcpu: 1,
            device: 3,
            kind: kind.into(),
            size,
            flags: flags.bits(),
            reserved: 0,
        }
    }

    #[test]
    fn decode_masks_write_data_to_access_width() {
        let e = write(ExitKind::PioWrite, 1, 0xdead_beef, ExitFlags::POSTED)
            .decode()
            .unwrap();
        assert_eq!(e.data, 0xef);
        assert_eq!(e.size, AccessSize::Byte);
        assert!(!e.needs_completion());
        assert_eq!(ExitRecord::from(&e).data, 0xef);
    }

    #[test]
    fn decode_rejects_hostile_records_naming_the_field() {
        let good = write(ExitKind::MmioRead, 4, 0, ExitFlags::NEEDS_COMPLETION);
        assert!(good.decode().is_ok());
        assert_eq!(
            ExitRecord { kind: 9, ..good }.decode(),
            Err(DecodeError::UnknownKind(9))
        );
        assert_eq!(
            ExitRecord { size: 3, ..good }.decode(),
            Err(DecodeError::BadSize(3))
        );
        assert_eq!(
            ExitRecord {
                flags: 0x10,
                ..good
            }
            .decode(),
            Err(DecodeError::UnknownFlags(0x10))
        );
        assert_eq!(
            ExitRecord { flags: 3, ..good }.decode(),
            Err(DecodeError::ConflictingFlags)
        );
        assert_eq!(
            ExitRecord { flags: 1, ..good }.decode(),
            Err(DecodeError::ReadWithoutCompletion)
        );
        assert_eq!(
            ExitRecord {
                reserved: 5,
                ..good
            }
            .decode(),
            Err(DecodeError::ReservedNotZero(5))
        );
    }

    #[test]
    fn record_tags_and_sizes() {
        assert_eq!(ExitRecord::SIZE, 48);
        assert_eq!(CompletionRecord::SIZE, 32);
        assert_eq!(&ExitRecord::TAG.to_le_bytes(), b"EXIT");
        assert_eq!(&CompletionRecord::TAG.to_le_bytes(), b"CMPL");
    }
}
