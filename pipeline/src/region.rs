//! [`Region`]: the memory a ring (or ring set) lives in.

use core::fmt;
use core::ptr::NonNull;

#[cfg(any(feature = "std", loom))]
use std::sync::Arc;

/// Something that keeps a region's memory mapped while handles into it exist.
#[cfg(any(feature = "std", loom))]
pub(crate) type Owner = Arc<dyn Send + Sync>;

/// A caller-provided span of memory that rings are laid out in.
///
/// A region is only a descriptor (base, length and, under `std`, a reference-counted owner
/// that keeps the memory alive). Every ring handle derived from it holds a clone, so memory
/// obtained from [`crate::channel`] or [`crate::SharedRegion`] stays mapped while any handle
/// lives. A region built with [`Region::from_raw_parts`] has no owner: its creator promises the
/// lifetime instead.
///
/// The memory may be shared with another process that does not follow the protocol. The ring
/// code therefore reads everything in it (header words and records) as plain integers that are
/// valid for every bit pattern, and validates every index before using it.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    #[cfg(any(feature = "std", loom))]
    owner: Option<Owner>,
}

// SAFETY: a Region is a pointer and a length; all access to the memory behind it goes through
// the ring protocol (atomics for shared words, one owner per slot at a time), so moving or
// sharing the descriptor between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only exposes the base pointer and the length.
unsafe impl Sync for Region {}

impl Region {
    /// A region over `len` bytes at `base`, with no owner.
    ///
    /// # Safety
    ///
    /// For as long as this region, any clone of it, or any ring handle created from it exists:
    /// - `base..base + len` must stay valid for reads and writes (mapped, not freed);
    /// - this process must not access the memory other than through the rings laid out in it.
    ///   Another process may write anything into it at any time: the rings tolerate that.
    #[must_use]
    pub unsafe fn from_raw_parts(base: NonNull<u8>, len: usize) -> Self {
        Self {
            base,
            len,
            #[cfg(any(feature = "std", loom))]
            owner: None,
        }
    }

    /// A region kept alive by `owner`.
    ///
    /// # Safety
    ///
    /// As for [`Region::from_raw_parts`], except that the memory need only stay valid while
    /// `owner` (which every clone and handle keeps a reference to) is alive.
    #[cfg(any(feature = "std", loom))]
    pub(crate) unsafe fn with_owner(base: NonNull<u8>, len: usize, owner: Owner) -> Self {
        Self {
            base,
            len,
            owner: Some(owner),
        }
    }

    /// The first byte.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The first byte, non-null.
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length region.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-span `offset..offset + len`, sharing this region's owner, or `None` if it does
    /// not fit.
    #[must_use]
    pub fn subregion(&self, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // `offset <= self.len`, so the result stays inside (or one past) the same allocation.
        let base = NonNull::new(self.base.as_ptr().wrapping_add(offset))?;
        Some(Self {
            base,
            len,
            #[cfg(any(feature = "std", loom))]
            owner: self.owner.clone(),
        })
    }
}

impl Clone for Region {
    fn clone(&self) -> Self {
        Self {
            base: self.base,
            len: self.len,
            #[cfg(any(feature = "std", loom))]
            owner: self.owner.clone(),
        }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
