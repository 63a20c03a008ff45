//! The CPUID table a vCPU really gets (tier: needs `/dev/kvm`), read back with `KVM_GET_CPUID2`.

use kvm_ioctls::{Cap, Kvm};
use vcpu_runner::cpuid::{LEAF1_ECX_HYPERVISOR, LEAF1_ECX_TSC_DEADLINE};
use vcpu_runner::{Hypervisor, KvmHypervisor, Vcpu, Vm};

fn leaf1(split_irqchip: bool, id: u32) -> [u32; 4] {
    let hv = KvmHypervisor::open().expect("this test needs /dev/kvm");
    let vm = hv
        .create_vm(split_irqchip.then_some(24))
        .expect("create VM");
    let vcpu = vm.create_vcpu(id).expect("create vCPU");
    vcpu.cpuid(1, 0).expect("KVM_GET_CPUID2").expect("leaf 1")
}

#[test]
fn tsc_deadline_follows_the_capability_and_the_in_kernel_lapic() {
    let kvm = Kvm::new().expect("this test needs /dev/kvm");
    let cap = kvm.check_extension(Cap::TscDeadlineTimer);
    let with_lapic = leaf1(true, 1);
    assert_eq!(
        with_lapic[2] & LEAF1_ECX_TSC_DEADLINE != 0,
        cap,
        "CPUID.1:ECX[24] must equal KVM_CAP_TSC_DEADLINE_TIMER ({cap}) with an in-kernel LAPIC \
         (ecx {:#010x})",
        with_lapic[2]
    );
    assert_ne!(with_lapic[2] & LEAF1_ECX_HYPERVISOR, 0);
    assert_eq!(with_lapic[1] >> 24, 1, "initial APIC ID of vCPU 1");
    // Without an in-kernel LAPIC nobody emulates the deadline MSR: the bit must be clear.
    let without = leaf1(false, 0);
    assert_eq!(
        without[2] & LEAF1_ECX_TSC_DEADLINE,
        0,
        "ecx {:#010x}",
        without[2]
    );
    let hv = KvmHypervisor::open().unwrap();
    assert_eq!(hv.cpuid_features(true).tsc_deadline, cap);
    assert!(!hv.cpuid_features(false).tsc_deadline);
}
