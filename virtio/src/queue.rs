//! Split virtqueues from the guest's point of view we do not trust: descriptor chains collected
//! with rust-vmm's `virtio-queue`, then checked before a device touches a byte.
//!
//! `virtio-queue`'s chain iterator stops silently on a loop (after queue-size descriptors), on a
//! `next` index out of range, on a descriptor it cannot read, on a bad indirect table and when the
//! chain's total length passes 2^32. [`Chain::collect`] turns each of those into an error: a chain
//! whose last yielded descriptor still says "next" was cut short. It also refuses empty chains,
//! readable descriptors after writable ones (virtio 1.x §2.7.4.2), more than
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors, and buffers that are not wholly inside guest memory. A
//! device then reads and writes through [`Cursor`]s over the checked buffers only.
//!
//! Every error here is the guest's fault and ends in DEVICE_NEEDS_RESET (see `transport`).

use std::num::Wrapping;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The longest chain accepted (direct or through an indirect table); bounds host memory per chain.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Why a queue could not be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The available index moved more than a queue size past the device's position.
    #[error("Available index jumped from {next_avail} to {avail_idx} (queue size {size})")]
    AvailIndex {
        /// The device's next available index.
        next_avail: u16,
        /// What the guest published.
        avail_idx: u16,
        /// Queue size.
        size: u16,
    },
    /// The rings could not be read or written.
    #[error("Ring access failed: {0}")]
    Ring(String),
    /// The chain is cut short: loop, `next` out of range, unreadable descriptor, bad indirect
    /// table, or more than 2^32 bytes.
    #[error("Descriptor chain at head {0} is malformed (loop, bad next index, bad indirect table, or unreadable)")]
    Malformed(u16),
    /// No descriptor at all.
    #[error("Descriptor chain at head {0} is empty")]
    Empty(u16),
    /// More descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("Descriptor chain at head {0} is longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong(u16),
    /// A device-readable descriptor after a device-writable one.
    #[error("Descriptor chain at head {0} has a readable buffer after a writable one")]
    Order(u16),
    /// A buffer lies (partly) outside guest memory.
    #[error("Descriptor chain at head {head}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Chain head.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The device needs a readable part and got none big enough, or a writable part and got none.
    #[error("Descriptor chain at head {head}: {what}")]
    Layout {
        /// Chain head.
        head: u16,
        /// What is missing.
        what: &'static str,
    },
    /// A guest buffer access failed after the chain was checked.
    #[error("Guest memory access at {0:#x} failed")]
    Memory(u64),
}

/// One checked buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A checked descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index (what goes back in the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Collects and checks the next available chain of `queue`, if there is one.
    pub fn pop(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<Chain>, QueueError> {
        let next_avail = queue.next_avail();
        let size = queue.size();
        let avail_idx = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .unwrap_or(Wrapping(0))
            .0;
        let mut iter = queue.iter(mem).map_err(|e| match e {
            virtio_queue::Error::InvalidAvailRingIndex => QueueError::AvailIndex {
                next_avail,
                avail_idx,
                size,
            },
            other => QueueError::Ring(other.to_string()),
        })?;
        let Some(dc) = iter.next() else {
            return Ok(None);
        };
        let head = dc.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut last_has_next = false;
        let mut count = 0usize;
        for d in dc {
            count += 1;
            if count > MAX_CHAIN_DESCRIPTORS {
                return Err(QueueError::TooLong(head));
            }
            last_has_next = d.has_next();
            let seg = Segment {
                addr: d.addr().0,
                len: d.len(),
            };
            let in_memory = usize::try_from(seg.len)
                .is_ok_and(|len| len == 0 || mem.check_range(GuestAddress(seg.addr), len));
            if !in_memory {
                return Err(QueueError::OutOfMemory {
                    head,
                    addr: seg.addr,
                    len: seg.len,
                });
            }
            if d.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(QueueError::Order(head));
            }
        }
        if count == 0 {
            return Err(QueueError::Empty(head));
        }
        if last_has_next {
            return Err(QueueError::Malformed(head));
        }
        Ok(Some(Chain {
            head,
            readable,
            writable,
        }))
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// A cursor over the readable buffers.
    pub fn reader(&self) -> Cursor<'_> {
        Cursor::new(&self.readable)
    }

    /// A cursor over the writable buffers.
    pub fn writer(&self) -> Cursor<'_> {
        Cursor::new(&self.writable)
    }
}

/// A position in a list of checked buffers.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    segs: &'a [Segment],
    idx: usize,
    off: u32,
    remaining: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            idx: 0,
            off: 0,
            remaining: segs.iter().map(|s| u64::from(s.len)).sum(),
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next piece: (guest address, length ≤ `max`), advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(u64, usize)> {
        loop {
            if self.remaining == 0 {
                return None;
            }
            let seg = self.segs.get(self.idx)?;
            let left = seg.len.saturating_sub(self.off);
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = usize::try_from(left.min(u32::try_from(self.remaining).unwrap_or(u32::MAX)))
                .unwrap_or(usize::MAX)
                .min(max);
            let addr = seg.addr.checked_add(u64::from(self.off))?;
            let n32 = u32::try_from(n).ok()?;
            self.off = self.off.saturating_add(n32);
            self.remaining = self.remaining.saturating_sub(u64::from(n32));
            return Some((addr, n));
        }
    }

    /// Reads up to `buf.len()` bytes from guest memory; returns how many.
    pub fn read(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<usize, QueueError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            let dst = buf
                .get_mut(done..done + n)
                .ok_or(QueueError::Memory(addr))?;
            mem.read_slice(dst, GuestAddress(addr))
                .map_err(|_| QueueError::Memory(addr))?;
            done += n;
        }
        Ok(done)
    }

    /// Writes up to `buf.len()` bytes to guest memory; returns how many fitted.
    pub fn write(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> Result<usize, QueueError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            let src = buf.get(done..done + n).ok_or(QueueError::Memory(addr))?;
            mem.write_slice(src, GuestAddress(addr))
                .map_err(|_| QueueError::Memory(addr))?;
            done += n;
        }
        Ok(done)
    }

    /// Skips `n` bytes (or to the end).
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 {
            let step = usize::try_from(n).unwrap_or(usize::MAX);
            let Some((_, got)) = self.next_piece(step) else {
                break;
            };
            n = n.saturating_sub(u64::try_from(got).unwrap_or(u64::MAX));
        }
    }

    /// A cursor over the last `n` bytes, shortening this one to end before them; `None` if there
    /// are fewer than `n` bytes left.
    pub fn split_tail(&mut self, n: u64) -> Option<Cursor<'a>> {
        let keep = self.remaining.checked_sub(n)?;
        let mut tail = self.clone();
        tail.skip(keep);
        self.remaining = keep;
        Some(tail)
    }
}
