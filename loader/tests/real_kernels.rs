//! Guest-image tier: loads the stock Debian kernel that `guest-linux/fetch.sh` downloads.
//! Ignored by default (no downloads in unit tests); run with
//!
//! ```text
//! eval "$(guest-linux/fetch.sh)" && GUEST_KERNEL GUEST_VMLINUX GUEST_INITRD \
//!     cargo test -p loader --test real_kernels -- --ignored
//! ```
//!
//! (the variables must be exported). A missing variable fails the test: asking for this tier
//! and not providing its inputs is an error, not a pass.

mod common;

use common::*;
use loader::layout::ZERO_PAGE_ADDR;
use loader::{detect, load_linux, Blob, BootConfig, CpuMode, ImageKind, LoadedKernel};
use vm_memory::GuestMemoryMmap;

fn input(var: &str) -> Vec<u8> {
    std::fs::read(path(var)).unwrap_or_else(|e| panic!("{var}: {e}"))
}

fn path(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set (see guest-linux/fetch.sh)"))
}

/// Loads `var`'s file again as a file (headers read, segments read straight into guest
/// memory) and checks it lands exactly as the bytes did: the same placement, the same guest
/// memory over the kernel's extent.
fn same_from_file(var: &str, mem: &GuestMemoryMmap, k: &LoadedKernel, cfg: &BootConfig<'_>) {
    let file = std::fs::File::open(path(var)).unwrap();
    let len = file.metadata().unwrap().len();
    let mem2 = guest_mem(k.layout.mem_size());
    let k2 = load_linux(&mem2, Blob::File { file: &file, len }, cfg).unwrap();
    assert_eq!(&k2, k);
    let n = (k.kernel_end - k.kernel_start) as usize;
    assert!(
        read_bytes(mem, k.kernel_start, n) == read_bytes(&mem2, k.kernel_start, n),
        "the kernel's memory differs between bytes and file"
    );
}

#[test]
#[ignore = "needs GUEST_KERNEL and GUEST_INITRD from guest-linux/fetch.sh"]
fn debian_bzimage_with_initramfs() {
    let kernel = input("GUEST_KERNEL");
    let initrd = input("GUEST_INITRD");
    assert_eq!(detect(&kernel), ImageKind::BzImage);
    let ram = 256 * MIB;
    let mem = guest_mem(ram);
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(ram, "console=ttyS0 panic=-1")
    };
    let k = load_linux(&mem, &kernel, &cfg).unwrap();
    let zp = ZERO_PAGE_ADDR;
    let setup_sects = u64::from(kernel[0x1f1]);
    let pref = u64::from_le_bytes(kernel[0x258..0x260].try_into().unwrap());
    assert_eq!(k.entry.mode, CpuMode::Long64);
    // Debian kernels are relocatable with pref_address = LOAD_PHYSICAL_ADDR, 2 MiB aligned.
    assert_eq!(k.kernel_start, pref);
    assert_eq!(k.entry.rip, pref + 0x200);
    let pm = &kernel[(setup_sects as usize + 1) * 512..];
    assert_eq!(read_bytes(&mem, pref, 4096), pm[..4096]);
    assert_eq!(
        read_bytes(&mem, pref + pm.len() as u64 - 64, 64),
        pm[pm.len() - 64..]
    );
    assert_eq!(
        r16(&mem, zp + hdr::VERSION),
        u16::from_le_bytes([kernel[0x206], kernel[0x207]])
    );
    assert_eq!(r8(&mem, zp + hdr::TYPE_OF_LOADER), 0xff);
    let (addr, size) = k.initrd.unwrap();
    assert_eq!(size, initrd.len() as u64);
    assert!(addr >= k.kernel_end && addr + size <= ram);
    assert_eq!(read_bytes(&mem, addr, 4096), initrd[..4096]);
    same_from_file("GUEST_KERNEL", &mem, &k, &cfg);
}

#[test]
#[ignore = "needs GUEST_VMLINUX from guest-linux/fetch.sh"]
fn debian_vmlinux_boots_through_pvh() {
    let vmlinux = input("GUEST_VMLINUX");
    assert_eq!(
        detect(&vmlinux),
        ImageKind::ElfPvh,
        "Debian builds CONFIG_PVH=y"
    );
    let ram = 256 * MIB;
    let mem = guest_mem(ram);
    let cfg = BootConfig::new(ram, "console=ttyS0");
    let k = load_linux(&mem, &vmlinux, &cfg).unwrap();
    assert_eq!(k.kind, ImageKind::ElfPvh);
    assert_eq!(k.entry.mode, CpuMode::Protected32);
    assert!(k.entry.rip >= k.kernel_start && k.entry.rip < k.kernel_end);
    same_from_file("GUEST_VMLINUX", &mem, &k, &cfg);
}
