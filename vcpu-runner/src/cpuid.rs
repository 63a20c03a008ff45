//! The CPUID policy: what each vCPU sees. KVM absorbs CPUID exits in the kernel from this table.

use kvm_bindings::CpuId;

/// Fixes up the host-supported table for vCPU `id`: its APIC ID in leaves 1, 0xb and 0x1f, and the
/// hypervisor-present bit. Nothing here depends on host-specific bits: we only rewrite fields.
pub fn apply_policy(cpuid: &mut CpuId, id: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24);
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}
