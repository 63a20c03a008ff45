//! Guest RAM as the host kernel sees it (tier: needs `/dev/kvm`).

use vcpu_runner::{KvmHypervisor, Machine};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The `VmFlags` line of the mapping of /proc/self/smaps that holds `addr`.
fn vm_flags(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                let hex = |v: &str| {
                    (!v.is_empty() && v.chars().all(|c| c.is_ascii_hexdigit()))
                        .then(|| usize::from_str_radix(v, 16).ok())
                        .flatten()
                };
                if let (Some(lo), Some(hi)) = (hex(lo), hex(hi)) {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_string());
            }
        }
    }
    None
}

#[test]
fn guest_ram_is_advised_for_huge_pages() {
    let hv = KvmHypervisor::open().expect("this test needs /dev/kvm");
    let boot = loader::BootConfig::new(64 << 20, "");
    let layout = boot.layout().unwrap();
    let machine = Machine::new(&hv, &layout.ram_ranges(), 1, true).unwrap();
    let mem = machine.memory();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok();
    let small = vcpu_runner::machine::SMALL_PAGES_BELOW;
    for r in mem.iter() {
        let host = mem.get_host_address(r.start_addr()).unwrap() as usize;
        let flags = vm_flags(host).unwrap_or_else(|| panic!("no smaps entry at {host:#x}"));
        let gpa = r.start_addr().0;
        // `hg`: MADV_HUGEPAGE (only a kernel built with THP knows the flag). Below
        // SMALL_PAGES_BELOW the mapping is left alone and splits there.
        let (advised_at, small_part) = if gpa < small {
            (host + usize::try_from(small - gpa).unwrap(), true)
        } else {
            (host, false)
        };
        if small_part && thp {
            assert!(
                !flags.split_whitespace().any(|f| f == "hg"),
                "guest RAM below {small:#x} (host {host:#x}) is advised: VmFlags {flags}"
            );
        }
        // A region that ends below SMALL_PAGES_BELOW has no advised part.
        if advised_at >= host + usize::try_from(r.len()).unwrap() {
            continue;
        }
        let flags = vm_flags(advised_at)
            .unwrap_or_else(|| panic!("no smaps entry at {advised_at:#x} (guest RAM at {gpa:#x})"));
        assert_eq!(
            flags.split_whitespace().any(|f| f == "hg"),
            thp,
            "guest RAM at {gpa:#x} (host {advised_at:#x}): VmFlags {flags}",
        );
    }
}

#[test]
fn guest_ram_without_huge_pages_is_not_advised() {
    let hv = KvmHypervisor::open().expect("this test needs /dev/kvm");
    let boot = loader::BootConfig::new(64 << 20, "");
    let layout = boot.layout().unwrap();
    let machine = Machine::with_huge_pages(&hv, &layout.ram_ranges(), 1, true, false).unwrap();
    let mem = machine.memory();
    for r in mem.iter() {
        let host = mem.get_host_address(r.start_addr()).unwrap() as usize;
        let flags = vm_flags(host).unwrap_or_else(|| panic!("no smaps entry at {host:#x}"));
        assert!(
            !flags.split_whitespace().any(|f| f == "hg"),
            "guest RAM at {:#x} (host {host:#x}): VmFlags {flags}",
            r.start_addr().0
        );
    }
}

#[test]
fn advice_is_refused_for_memory_that_is_not_mapped_and_taken_otherwise() {
    let len = 4 << 20;
    // SAFETY: a fresh anonymous private mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok();
    assert_eq!(
        vcpu_runner::machine::advise_huge_pages(p.cast(), len as u64),
        thp
    );
    // SAFETY: unmapping the mapping made above; nothing refers to it.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    assert!(!vcpu_runner::machine::advise_huge_pages(
        p.cast(),
        len as u64
    ));
}
