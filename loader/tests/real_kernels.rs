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
use loader::{detect, load_linux, BootConfig, CpuMode, ImageKind};

fn input(var: &str) -> Vec<u8> {
    let path = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set (see guest-linux/fetch.sh)"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{var}={path}: {e}"))
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
    let k = load_linux(&mem, &vmlinux, &BootConfig::new(ram, "console=ttyS0")).unwrap();
    assert_eq!(k.kind, ImageKind::ElfPvh);
    assert_eq!(k.entry.mode, CpuMode::Protected32);
    assert!(k.entry.rip >= k.kernel_start && k.entry.rip < k.kernel_end);
}
