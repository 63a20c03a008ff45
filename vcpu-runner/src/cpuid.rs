//! The CPUID policy: what each vCPU sees. KVM absorbs CPUID exits in the kernel from this table.

use kvm_bindings::CpuId;

/// CPUID.1:ECX bit 24: the local APIC's TSC-deadline timer mode.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31: a hypervisor is present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Features the policy adds to the host-supported table because the hypervisor emulates them
/// without listing them in `KVM_GET_SUPPORTED_CPUID`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidFeatures {
    /// Offer the TSC-deadline timer (CPUID.1:ECX[24]). KVM emulates `IA32_TSC_DEADLINE` (MSR 0x6e0)
    /// in its in-kernel local APIC and says so with `KVM_CAP_TSC_DEADLINE_TIMER`, but never sets
    /// the bit in the supported table (QEMU adds it the same way). With it, Linux programs its
    /// clock events through the MSR and skips the ~100 ms LAPIC timer calibration at boot.
    /// Only meaningful with an in-kernel local APIC.
    pub tsc_deadline: bool,
}

/// Fixes up the host-supported table for vCPU `id`: its APIC ID in leaves 1, 0xb and 0x1f, the
/// hypervisor-present bit, and the emulated `features`. Nothing here depends on host-specific bits:
/// we only rewrite fields, and clear what `features` does not offer.
pub fn apply_policy(cpuid: &mut CpuId, id: u32, features: CpuidFeatures) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if features.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn table(leaf1_ecx: u32) -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xab00_0800,
                ecx: leaf1_ecx,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ecx: 0xffff_ffff,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn leaf(c: &CpuId, f: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f).unwrap()
    }

    #[test]
    fn tsc_deadline_is_offered_only_when_the_hypervisor_emulates_it() {
        let mut c = table(0x0000_0001);
        apply_policy(&mut c, 3, CpuidFeatures { tsc_deadline: true });
        let l1 = leaf(&c, 1);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(l1.ecx & 1, 1, "other host bits are kept");

        // A table that claims the bit loses it when the hypervisor cannot emulate the timer: the
        // guest would program an MSR nobody serves.
        let mut c = table(LEAF1_ECX_TSC_DEADLINE | 1);
        apply_policy(&mut c, 0, CpuidFeatures::default());
        assert_eq!(leaf(&c, 1).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(leaf(&c, 1).ecx & 1, 1);
    }

    #[test]
    fn apic_id_and_hypervisor_bit_are_per_vcpu() {
        let mut c = table(0);
        apply_policy(&mut c, 5, CpuidFeatures::default());
        let l1 = leaf(&c, 1);
        assert_eq!(l1.ebx >> 24, 5, "initial APIC ID");
        assert_eq!(l1.ebx & 0x00ff_ffff, 0x0000_0800, "the rest of EBX is kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf(&c, 0xb).edx, 5, "x2APIC ID");
        assert_eq!(leaf(&c, 7).ecx, 0xffff_ffff, "other leaves untouched");
    }
}
