//! The only crate that talks to the hypervisor: the backend trait and its KVM implementation, the
//! pinned vCPU loops, the pure exit handler that classifies every exit into a fast or slow stage, and
//! the machine that ties memory, devices, rings and threads together.
//!
//! Walk it in the order an exit does: [`kvm`] (`KVM_RUN` returns) → [`runner`] (the state machine)
//! → [`handler`] (classify; fast stage inline, or an [`pipeline::ExitRecord`] onto this CPU's exit
//! ring) → `stages::slow` on the device-model thread → a completion back → re-entry.

pub mod backend;
pub mod boot;
pub mod coalesced;
pub mod control;
pub mod cpuid;
pub mod handler;
pub mod kvm;
pub mod machine;
pub use stages::ratelimit;
pub mod routes;
pub mod runner;
pub mod stats;

pub use backend::{
    BackendError, Capabilities, DescriptorTable, EntryRegs, Hypervisor, MpState, Regs, Segment,
    SpecialRegs, Vcpu, VirtKind, Vm, VmExit,
};
pub use control::{ControlError, VcpuOp, VcpuOpResult};
pub use kvm::KvmHypervisor;
pub use machine::{
    completion_spin_for, Devices, Machine, MachineError, RunConfig, RunExit, RunOutcome, RunningVm,
    StopSwitch,
};
pub use routes::{GsiRoutes, IOAPIC_RESERVED_PINS};
