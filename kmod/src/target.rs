//! What the control server needs of a running VM: [`ControlTarget`].
//!
//! The module's registry holds one per VM once bhyve attaches to it; the server calls it for
//! every request on the VM's socket. It is free of KVM types, so the server can be tested with a
//! fake ([`crate::fake::FakeTarget`]) and the front end implements it for its running machine.

use std::fmt;

use passthrough::PciAddress;
use stages::VmRequest;
use vcpu_runner::{Regs, SpecialRegs};

use crate::proto::status;
pub use crate::proto::{PinOp, StatScope};

/// Why a [`ControlTarget`] refused or failed: an errno-style status for the reply, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError {
    /// Status for the reply ([`crate::proto::status`]).
    pub status: u32,
    /// What went wrong, for the operator.
    pub message: String,
}

impl TargetError {
    /// A bad argument (EINVAL).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::with(status::EINVAL, message)
    }

    /// The VM is busy or in the wrong state (EBUSY).
    pub fn busy(message: impl Into<String>) -> Self {
        Self::with(status::EBUSY, message)
    }

    /// The operation failed (EIO).
    pub fn failed(message: impl Into<String>) -> Self {
        Self::with(status::EIO, message)
    }

    /// The VM cannot do this (ENOSYS).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::with(status::ENOSYS, message)
    }

    /// The VM did not answer in time (ETIMEDOUT).
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::with(status::ETIMEDOUT, message)
    }

    /// Already done (EALREADY), as vm_suspend answers a second suspend.
    pub fn already(message: impl Into<String>) -> Self {
        Self::with(status::EALREADY, message)
    }

    /// Any status.
    pub fn with(status: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// A plain message is a failure (EIO).
impl From<String> for TargetError {
    fn from(message: String) -> Self {
        Self::failed(message)
    }
}

/// A plain message is a failure (EIO).
impl From<&str> for TargetError {
    fn from(message: &str) -> Self {
        Self::failed(message)
    }
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, status::name(self.status))
    }
}

impl std::error::Error for TargetError {}

/// A running VM as the control server sees it.
///
/// Every method may be called from a server thread at any time, concurrently with the VM's own
/// threads and with other calls. The server checks a vCPU index against [`ncpus`](Self::ncpus)
/// before calling; an implementation must still refuse an index it cannot serve, never panic.
/// Calls should be bounded in time (a vCPU that does not answer is an error, not a hang).
pub trait ControlTarget: Send + Sync {
    /// Number of vCPUs.
    fn ncpus(&self) -> u32;
    /// General registers of `vcpu`.
    fn regs(&self, vcpu: u32) -> Result<Regs, TargetError>;
    /// Writes the general registers of `vcpu` (the server reads, changes what was asked, and
    /// writes back; an implementation should do this with the vCPU out of the guest).
    fn set_regs(&self, vcpu: u32, regs: &Regs) -> Result<(), TargetError>;
    /// Special registers of `vcpu`.
    fn sregs(&self, vcpu: u32) -> Result<SpecialRegs, TargetError>;
    /// Guest memory as (guest-physical address, length) ranges.
    fn memory_segments(&self) -> Vec<(u64, u64)>;
    /// Asserts, deasserts or pulses I/O APIC pin `pin`.
    fn ioapic_pin(&self, pin: u32, op: PinOp) -> Result<(), TargetError>;
    /// Injects an MSI.
    fn inject_msi(&self, addr: u64, data: u32) -> Result<(), TargetError>;
    /// Counters: one scope per vCPU (`vcpu0`...) and any VM-wide or device-model scopes.
    fn stats(&self) -> Vec<StatScope>;
    /// Stops the VM for `how` (vm_suspend): bhyve exits with that reason's status.
    fn suspend(&self, how: VmRequest) -> Result<(), TargetError>;
    /// Parks every vCPU.
    fn pause(&self) -> Result<(), TargetError>;
    /// Lets parked vCPUs run again.
    fn resume(&self) -> Result<(), TargetError>;
    /// Turns exit tracing on or off. Not supported unless implemented.
    fn set_tracing(&self, on: bool) -> Result<(), TargetError> {
        let _ = on;
        Err(TargetError::unsupported("This VM has no exit tracing"))
    }
    /// Puts the VM back to its power-on state in place (vm_reinit). Not supported unless
    /// implemented.
    fn reset(&self) -> Result<(), TargetError> {
        Err(TargetError::unsupported("This VM cannot be reset in place"))
    }
    /// Attaches a device the module has just assigned to this VM. A running VM cannot take a
    /// device unless it implements this; on failure the module takes the assignment back.
    fn assign_device(&self, addr: PciAddress) -> Result<(), TargetError> {
        Err(TargetError::unsupported(format!(
            "This VM cannot attach PCI device {addr} while running"
        )))
    }
    /// Detaches a device before the module takes the assignment back.
    fn unassign_device(&self, addr: PciAddress) -> Result<(), TargetError> {
        Err(TargetError::unsupported(format!(
            "This VM cannot detach PCI device {addr} while running"
        )))
    }
}
