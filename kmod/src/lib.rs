//! The module: load/unload lifecycle, tunables, VMs by name, the control ABI.
//!
//! - [`tunables`]: loader.conf(5)-format tunables (`hw.vmm.maxcpu`, `pptdevs`...).
//! - [`vmm`]: [`Vmm`], the module's life (MOD_LOAD/MOD_UNLOAD), VMs by name, `hw.vmm` sysctls.
//! - [`proto`]: the control ABI, a versioned binary protocol modelled on vmm's ioctls.
//! - [`server`]: the control sockets (`<dir>/vmmctl`, `<dir>/NAME`), hardened against hostile
//!   clients.
//! - [`target`]: [`ControlTarget`], what a VM socket needs of a running VM.
//! - [`client`]: the client side (bhyvectl).
//! - [`fake`]: a fake running VM for tests.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod client;
pub mod fake;
pub mod proto;
pub mod server;
pub mod target;
pub mod tunables;
pub mod vmm;

pub use client::{Client, ClientError};
pub use proto::{PinOp, StatScope};
pub use server::{ControlServer, ServerError, ServerLimits, ServerStats};
pub use target::{ControlTarget, TargetError};
pub use vmm::{
    check_capabilities, host_capabilities, validate_name, Diagnostic, LoadOptions, SysfsSource,
    VmId, VmInfo, Vmm, VmmError, DEFAULT_SOCKET_DIR, MODULE_SOCKET, VM_MAX_NAMELEN,
};
