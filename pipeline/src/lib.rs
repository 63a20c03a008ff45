//! The exit pipeline: the exit ABI records and the per-CPU SPSC rings that carry them.
//!
//! An exit that no fast stage absorbs travels from the vCPU thread to the device-model side as an
//! [`ExitRecord`] on that CPU's exit ring; the answer to a read (or to a write that must complete
//! before the vCPU re-enters the guest) comes back as a [`CompletionRecord`] on the completion
//! ring. See `/docs/architecture.md` and design brief §2.
//!
//! # Pieces
//! - [`abi`]: the records, `#[repr(C)]`, `Copy`, fixed size, no pointers, layout pinned by
//!   compile-time assertions; [`Record`] is the contract a type must meet to cross a ring.
//! - [`ring`]: a single-producer single-consumer ring laid out in a caller-provided [`Region`]
//!   (heap, or a memfd mapping shared by two processes): [`Ring::format`], [`Ring::attach`],
//!   then one [`Producer`] and one [`Consumer`] handle. Indices read from the shared header are
//!   never trusted: a corrupted index is reported as [`RingError::CorruptIndex`], never an
//!   out-of-bounds access or a panic.
//! - the "needs wake-up" protocol ([`Consumer::wait_for_records`],
//!   [`Consumer::wait_completion`]): spin first, then park on a futex in the shared header; a
//!   producer pays the wake-up syscall only when the consumer has said it is going to sleep.
//! - [`ringset`]: one exit ring and one completion ring per physical CPU in one region.
//! - under `std` (default): [`channel`] (heap-backed, in-process) and [`SharedRegion`] (memfd,
//!   for two processes).
//!
//! # Features and cfgs
//! - `std` (default): the OS parts (futex, memfd, `channel`). Without it the crate is `no_std`:
//!   records, format/attach, push/pop; no waiting.
//! - `cfg(loom)`: the ring takes its atomics, cells and parking from `loom` (see `sync`), so
//!   `loom-tests/` can model-check it. `broken-ordering` is a test-only feature that, under
//!   `cfg(loom)` only, weakens the producer's publishing store to `Relaxed` so the loom model can
//!   be seen to fail; it has no effect on normal builds.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]
#![warn(missing_docs)]

#[cfg(all(loom, not(feature = "std")))]
extern crate std;

pub mod abi;
mod barrier;
mod region;
pub mod ring;
pub mod ringset;
mod sync;
mod wait;

#[cfg(all(feature = "std", not(loom)))]
mod shm;

pub use abi::{
    AccessSize, CompletionRecord, DecodeError, Exit, ExitFlags, ExitKind, ExitRecord, Record,
    ABI_VERSION,
};
pub use region::Region;
#[cfg(any(feature = "std", loom))]
pub use ring::{channel, try_channel};
pub use ring::{AttachError, Consumer, Producer, Ring, RingError, Side};
pub use ringset::{DeviceRings, RingSet, VcpuRings};
#[cfg(all(feature = "std", not(loom)))]
pub use shm::SharedRegion;
pub use wait::{WaitOutcome, Waiter};

/// Does the once-per-process set-up of the rings' asymmetric barrier (`membarrier` registration,
/// which can take milliseconds) now, so a caller can do it off its critical path — for example on
/// a background thread while a VM is being built. Rings created later find it done. Returns
/// whether producers will run without a fence per publish.
pub fn warm_up() -> bool {
    barrier::register_producer()
}

/// Makes this process's ring producers fence every publish instead of registering for
/// `membarrier` (call before making rings). For a process where a publish is rare next to its
/// other costs — a vCPU posts one record per exit, each a system call — and where the
/// registration's milliseconds would show in start-up and exit time.
pub fn fence_only() {
    barrier::fence_only()
}
