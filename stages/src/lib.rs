//! Exit classification and the stages: the bus, fast (in-module) devices and slow device models.
//!
//! `bus` classifies every I/O exit (which device, which offset, which stage); `devices` holds the
//! register-level cores of the in-module devices (no_std); `platform` the device trait and VM-level
//! requests; `misc` the small fast platform devices; `models` the slow device models.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod bus;
pub mod devices;
pub mod platform;

#[cfg(feature = "std")]
pub mod acpipm;
#[cfg(feature = "std")]
pub mod misc;
#[cfg(feature = "std")]
pub mod models;
#[cfg(feature = "std")]
pub mod pc;
#[cfg(feature = "std")]
pub mod ratelimit;
#[cfg(feature = "std")]
pub mod slow;

pub use bus::{Bus, BusError, DeviceId, Route, Space, Stage};
pub use platform::{BusDevice, EoiSink, VmRequest, VmRequests};
