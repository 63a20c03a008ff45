//! The only crate that talks to the hypervisor: backend trait, KVM backend, pinned vCPU loops.
