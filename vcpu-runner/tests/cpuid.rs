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

/// The supported CPUID can be fetched ahead, from another thread, while a VM is being set up; the
/// vCPUs then get exactly what an unprefetched `/dev/kvm` gives (leaf 0: the vendor and the top
/// leaf), with a device node other than the default one asking for itself.
#[test]
fn a_prefetched_supported_cpuid_is_the_one_vcpus_get() {
    let direct = Kvm::new()
        .expect("this test needs /dev/kvm")
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    let leaf0 = direct
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        .expect("leaf 0");
    let hv = KvmHypervisor::open().expect("open");
    let vm = hv.create_vm(Some(24)).expect("create VM");
    let t = std::thread::spawn(vcpu_runner::kvm::prefetch_supported_cpuid);
    let vcpu = vm
        .create_vcpu(0)
        .expect("create vCPU while the prefetch runs");
    t.join().expect("prefetch thread");
    vcpu_runner::kvm::prefetch_supported_cpuid(); // again: nothing to do
    assert_eq!(vcpu.cpuid(0, 0).expect("KVM_GET_CPUID2"), Some(leaf0));
    let second = vm.create_vcpu(1).expect("second vCPU");
    assert_eq!(second.cpuid(0, 0).expect("KVM_GET_CPUID2"), Some(leaf0));
    // Another node (the same device through /dev/kvm's path as a symlink-free alias).
    let other = KvmHypervisor::open_path("/dev/../dev/kvm").expect("open by another path");
    let v = other
        .create_vm(Some(24))
        .expect("VM")
        .create_vcpu(0)
        .expect("vCPU");
    assert_eq!(v.cpuid(0, 0).expect("KVM_GET_CPUID2"), Some(leaf0));
}
