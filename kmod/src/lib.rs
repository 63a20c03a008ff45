//! The module: load/unload lifecycle, tunables, VMs by name, the control ABI.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod tunables;
