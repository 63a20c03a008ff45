//! PCI passthrough: reservation of host devices (pptdevs) through sysfs and VFIO.
//!
//! FreeBSD's vmm.ko claims the devices named by the `pptdevs` tunables with its `ppt` driver,
//! and `devctl set driver` moves a device between `ppt` and a host driver at run time. Here the
//! part of `ppt` is played by Linux's `vfio-pci`, reached through sysfs:
//!
//! - [`PciAddress`]: a `bus/slot/function` on segment 0, as `pptdevs` names it;
//! - [`Sysfs`]: the three sysfs operations we need, with [`RealSysfs`] over a directory (`/sys`
//!   by default) and [`fake::FakeSysfs`], which simulates the kernel's reactions for tests;
//! - [`Passthrough`]: reserve (`take`, `reserve_all`), hand back (`release`, `release_all`),
//!   and track assignment to VMs (`assign`, `unassign`), each all-or-nothing in sysfs.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

mod address;
pub mod fake;
mod reserve;
mod sysfs;

pub use address::{AddressError, PciAddress, MAX_FUNCTION, MAX_SLOT};
pub use reserve::{
    DeviceState, Passthrough, PassthroughError, Step, PCI_HEADER_TYPE_OFFSET, VFIO_PCI,
};
pub use sysfs::{RealSysfs, Sysfs, DEFAULT_SYSFS_ROOT};
