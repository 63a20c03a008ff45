//! virtio 1.x over PCI (modern transport) and bhyve(8)'s virtio device models.
//!
//! | module | role |
//! |---|---|
//! | [`pci`] | a type-0 PCI function: configuration space with capabilities, BARs (sizing, platform placement, relocation reported for the platform to follow), MSI-X table and PBA, INTx |
//! | [`transport`] | virtio-over-PCI: common/notify/ISR/device capabilities in BAR 0, feature negotiation, the status state machine, queue setup; [`transport::VirtioPciDevice`] implements the colleague's `PciConfigSpace`, [`transport::BarRegion`] is the BAR as a `stages::BusDevice` |
//! | [`device`] | the [`device::VirtioDevice`] / [`device::QueueHandler`] split and the interrupt [`device::Signals`] |
//! | [`queue`] | checked descriptor chains over rust-vmm `virtio-queue` |
//! | [`blk`], [`net`], [`console`], [`rng`] | the device models |
//! | [`options`] | bhyve(8) `-s slot[:function],emulation[,options]` parsing for these devices |
//! | [`log`] | counters and rate-limited logging |
//!
//! `virtio/README.md` is the guest driver's view: the register sequence a minimal driver performs.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod blk;
pub mod console;
pub mod device;
pub mod log;
pub mod net;
pub mod options;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod testing;
pub mod transport;

pub use device::{QueueCtx, QueueHandler, Signals, VirtioDevice};
pub use pci::{IntxLine, MsiTrigger};
pub use transport::{BarRegion, Execution, PciConfigHandle, VirtioPciDevice, Wiring};
