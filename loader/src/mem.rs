//! Helpers shared by the loaders: bounds-checked reads from the image, guest memory writes with
//! errors that say what was written where, and placement rules.

use std::borrow::Cow;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::layout::{MemoryLayout, LOADER_AREA_END, PAGE_SIZE};
use crate::{Blob, LoaderError};

/// `len` bytes of `image` at `offset`, or None if out of bounds.
pub(crate) fn slice(image: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    image.get(start..start.checked_add(len)?)
}

/// Little-endian u16 at `offset`.
pub(crate) fn le_u16(image: &[u8], offset: u64) -> Option<u16> {
    let b = slice(image, offset, 2)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// Little-endian u32 at `offset`.
pub(crate) fn le_u32(image: &[u8], offset: u64) -> Option<u32> {
    let b = slice(image, offset, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Little-endian u64 at `offset`.
pub(crate) fn le_u64(image: &[u8], offset: u64) -> Option<u64> {
    let b = slice(image, offset, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Length of a host slice as u64 (lossless: usize is at most 64 bits).
pub(crate) fn len64<T>(b: &[T]) -> u64 {
    u64::try_from(b.len()).unwrap_or(u64::MAX)
}

/// Writes `data` at `addr`, naming `what` on failure.
pub(crate) fn write_bytes<M: GuestMemory + ?Sized>(
    mem: &M,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), LoaderError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| LoaderError::GuestWrite {
            what,
            addr,
            len: len64(data),
            source,
        })
}

/// Writes `blob` at `addr` (a file is read straight into guest memory), naming `what` on failure.
pub(crate) fn write_blob<M: GuestMemory + ?Sized>(
    mem: &M,
    what: &'static str,
    addr: u64,
    blob: Blob<'_>,
) -> Result<(), LoaderError> {
    write_blob_range(mem, what, addr, blob, 0, blob.len())
}

/// Writes `len` bytes of `blob` from `offset` at `addr`: bytes in memory are copied, a file is
/// read straight into guest memory. The range must lie inside the blob (callers check it
/// against [`Blob::len`]); a file that turns out shorter is an error naming `what`.
pub(crate) fn write_blob_range<M: GuestMemory + ?Sized>(
    mem: &M,
    what: &'static str,
    addr: u64,
    blob: Blob<'_>,
    offset: u64,
    len: u64,
) -> Result<(), LoaderError> {
    match blob {
        Blob::Bytes(data) => {
            let data = slice(data, offset, len).ok_or_else(|| LoaderError::ImageRead {
                offset,
                len,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
            write_bytes(mem, what, addr, data)
        }
        Blob::File { file, .. } => {
            let err = |source| LoaderError::GuestWrite {
                what,
                addr,
                len,
                source,
            };
            let count = usize::try_from(len).map_err(|_| {
                err(vm_memory::GuestMemoryError::InvalidGuestAddress(
                    GuestAddress(addr),
                ))
            })?;
            // From `offset`, whatever an earlier read left the file's offset at.
            let mut src = file;
            std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(offset))
                .map_err(|e| err(vm_memory::GuestMemoryError::IOError(e)))?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut src, count)
                .map_err(err)
        }
    }
}

/// `len` bytes of `image` at `offset`, for the loaders to parse: borrowed from bytes in memory,
/// read (`pread`) from a file. `Ok(None)` when the range lies beyond the image's length.
/// Callers ask for headers and tables only, never for the bulk of an image.
pub(crate) fn read_image<'a>(
    image: Blob<'a>,
    offset: u64,
    len: u64,
) -> Result<Option<Cow<'a, [u8]>>, LoaderError> {
    if offset.checked_add(len).is_none_or(|end| end > image.len()) {
        return Ok(None);
    }
    match image {
        Blob::Bytes(b) => Ok(slice(b, offset, len).map(Cow::Borrowed)),
        Blob::File { file, .. } => {
            let err = |source| LoaderError::ImageRead {
                offset,
                len,
                source,
            };
            let n =
                usize::try_from(len).map_err(|_| err(std::io::ErrorKind::OutOfMemory.into()))?;
            let mut buf = vec![0u8; n];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, offset).map_err(err)?;
            Ok(Some(Cow::Owned(buf)))
        }
    }
}

/// The first `max` bytes of `image`, or all of it when it is shorter.
pub(crate) fn image_prefix(image: Blob<'_>, max: u64) -> Result<Cow<'_, [u8]>, LoaderError> {
    Ok(read_image(image, 0, image.len().min(max))?.unwrap_or_default())
}

/// Zeroes `len` bytes at `addr` (guest memory may not be fresh).
pub(crate) fn zero_bytes<M: GuestMemory + ?Sized>(
    mem: &M,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), LoaderError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK);
        // n <= CHUNK, which fits in usize.
        let n_usize = usize::try_from(n).unwrap_or(zeros.len());
        write_bytes(mem, what, addr + done, &zeros[..n_usize])?;
        done += n;
    }
    Ok(())
}

/// Checks that `mem` backs every RAM entry of `layout`.
pub(crate) fn check_backed<M: GuestMemory + ?Sized>(
    mem: &M,
    layout: &MemoryLayout,
) -> Result<(), LoaderError> {
    for e in layout.e820() {
        let backed = usize::try_from(e.size)
            .map(|len| mem.check_range(GuestAddress(e.addr), len, Permissions::Write))
            .unwrap_or(false);
        if !backed {
            return Err(LoaderError::MemoryNotBacked {
                start: e.addr,
                end: e.end(),
                mem_size: layout.mem_size(),
            });
        }
    }
    Ok(())
}

/// Checks a string handed to the guest has no interior NUL; returns it with a NUL appended.
pub(crate) fn c_string(what: &'static str, s: &str) -> Result<Vec<u8>, LoaderError> {
    if let Some(pos) = s.bytes().position(|b| b == 0) {
        return Err(LoaderError::StringHasNul {
            what,
            offset: u64::try_from(pos).unwrap_or(u64::MAX),
        });
    }
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    Ok(v)
}

/// Checks the command line (no NUL, at most `max` bytes without the NUL); returns it
/// NUL-terminated.
pub(crate) fn cmdline_bytes(cmdline: &str, max: u64) -> Result<Vec<u8>, LoaderError> {
    let len = u64::try_from(cmdline.len()).unwrap_or(u64::MAX);
    if len > max {
        return Err(LoaderError::CmdlineTooLong { len, max });
    }
    c_string("Command line", cmdline)
}

/// NUL-terminated strings packed into a fixed guest area; each `push` returns the string's
/// guest address.
#[derive(Debug)]
pub(crate) struct StringTable {
    base: u64,
    cap: u64,
    bytes: Vec<u8>,
}

impl StringTable {
    /// An empty table for the area `base..base + cap`.
    pub fn new(base: u64, cap: u64) -> Self {
        StringTable {
            base,
            cap,
            bytes: Vec::new(),
        }
    }

    /// Appends `s` with its NUL; fails if the area would overflow.
    pub fn push(&mut self, what: &'static str, s: &str) -> Result<u64, LoaderError> {
        let c = c_string(what, s)?;
        let used = len64(&self.bytes);
        let len = used.saturating_add(len64(&c));
        if len > self.cap {
            return Err(LoaderError::ModuleStringsTooLong { len, max: self.cap });
        }
        self.bytes.extend_from_slice(&c);
        Ok(self.base + used)
    }

    /// Writes the table to guest memory.
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), LoaderError> {
        write_bytes(mem, "module strings", self.base, &self.bytes)
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two); None on overflow.
pub(crate) fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Checks that the image range `start..end` may be loaded: inside one RAM entry, clear of the
/// loader's low-memory area.
pub(crate) fn check_segment(
    layout: &MemoryLayout,
    start: u64,
    end: u64,
) -> Result<(), LoaderError> {
    if start < LOADER_AREA_END {
        return Err(LoaderError::SegmentOverlapsReserved {
            start,
            end,
            area: "loader's boot structures",
            area_start: 0,
            area_end: LOADER_AREA_END,
        });
    }
    for h in layout.holes() {
        if start < h.end() && end > h.start {
            return Err(LoaderError::SegmentOverlapsReserved {
                start,
                end,
                area: h.name,
                area_start: h.start,
                area_end: h.end(),
            });
        }
    }
    if !layout.is_ram(start, end) {
        return Err(LoaderError::SegmentNotInRam { start, end });
    }
    Ok(())
}

/// Places modules top-down: each page-aligned, as high as possible below `high`, above `low`.
/// Returns each module's address, in input order.
pub(crate) fn place_high(
    sizes: &[u64],
    low: u64,
    high: u64,
    ram: u64,
) -> Result<Vec<u64>, LoaderError> {
    let mut top = high & !(PAGE_SIZE - 1);
    let mut out = Vec::with_capacity(sizes.len());
    for (index, &size) in sizes.iter().enumerate() {
        let index = u64::try_from(index).unwrap_or(u64::MAX);
        if size > ram {
            return Err(LoaderError::InitrdLargerThanRam { initrd: size, ram });
        }
        let addr = top
            .checked_sub(size)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|&a| a >= low)
            .ok_or(LoaderError::ModuleNoRoom {
                index,
                size,
                low,
                high: top,
            })?;
        out.push(addr);
        top = addr;
    }
    Ok(out)
}

/// Places modules bottom-up: each page-aligned, one after another from `low`, below `high`.
pub(crate) fn place_low(
    sizes: &[u64],
    low: u64,
    high: u64,
    ram: u64,
) -> Result<Vec<u64>, LoaderError> {
    let mut next = low;
    let mut out = Vec::with_capacity(sizes.len());
    for (index, &size) in sizes.iter().enumerate() {
        let index = u64::try_from(index).unwrap_or(u64::MAX);
        if size > ram {
            return Err(LoaderError::InitrdLargerThanRam { initrd: size, ram });
        }
        let no_room = || LoaderError::ModuleNoRoom {
            index,
            size,
            low: next,
            high,
        };
        let addr = align_up(next, PAGE_SIZE).ok_or_else(no_room)?;
        let end = addr
            .checked_add(size)
            .filter(|&e| e <= high)
            .ok_or_else(no_room)?;
        out.push(addr);
        next = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_high_is_page_aligned_and_descending() {
        let a = place_high(&[0x1800, 0x10], 0x10_0000, 0x20_0000, 0x20_0000).unwrap();
        assert_eq!(a, vec![0x1f_e000, 0x1f_d000]);
        let err = place_high(&[0x20_0000], 0x10_0000, 0x20_0000, 0x40_0000).unwrap_err();
        assert!(matches!(err, LoaderError::ModuleNoRoom { index: 0, .. }));
        let err = place_high(&[0x80_0000], 0x10_0000, 0x20_0000, 0x40_0000).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdLargerThanRam { .. }));
    }

    #[test]
    fn place_low_is_page_aligned_and_ascending() {
        let a = place_low(&[0x1800, 0x10, 0], 0x10_0001, 0x20_0000, 0x20_0000).unwrap();
        assert_eq!(a, vec![0x10_1000, 0x10_3000, 0x10_4000]);
        let err = place_low(&[0x10_0000], 0x10_0001, 0x20_0000, 0x40_0000).unwrap_err();
        assert!(matches!(err, LoaderError::ModuleNoRoom { index: 0, .. }));
    }

    #[test]
    fn image_reads_are_bounds_checked() {
        let b = [1u8, 2, 3, 4];
        assert_eq!(le_u16(&b, 2), Some(0x0403));
        assert_eq!(le_u32(&b, 1), None);
        assert_eq!(le_u64(&b, 0), None);
        assert_eq!(slice(&b, u64::MAX, 2), None);
    }

    #[test]
    fn cmdline_limits() {
        assert_eq!(cmdline_bytes("ab", 2).unwrap(), b"ab\0");
        assert!(matches!(
            cmdline_bytes("abc", 2),
            Err(LoaderError::CmdlineTooLong { len: 3, max: 2 })
        ));
        assert!(matches!(
            cmdline_bytes("a\0b", 20),
            Err(LoaderError::StringHasNul { offset: 1, .. })
        ));
    }
}
