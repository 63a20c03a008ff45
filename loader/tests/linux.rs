//! Linux boot protocol: bzImage and ELF vmlinux, checked from the guest's point of view.

mod common;

use common::*;
use loader::layout::{CMDLINE_ADDR, GDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use loader::{
    detect, load_kernel, load_linux, BootConfig, BootModule, CpuMode, ImageKind, LoaderError,
    Segment,
};
use vm_memory::GuestMemoryMmap;

const ZP: u64 = ZERO_PAGE_ADDR;

/// Translates `va` through the guest's 4-level page tables at `cr3` (2 MiB pages only).
fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let pml4e = r64(mem, cr3 + ((va >> 39) & 511) * 8);
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = r64(mem, (pml4e & ADDR) + ((va >> 30) & 511) * 8);
    if pdpte & 1 == 0 || pdpte & 0x80 != 0 {
        return None;
    }
    let pde = r64(mem, (pdpte & ADDR) + ((va >> 21) & 511) * 8);
    if pde & 1 == 0 || pde & 2 == 0 || pde & 0x80 == 0 {
        return None;
    }
    Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
}

fn e820(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let n = r8(mem, ZP + zp::E820_ENTRIES);
    (0..u64::from(n))
        .map(|i| {
            let e = ZP + zp::E820_TABLE + i * 20;
            (r64(mem, e), r64(mem, e + 8), r32(mem, e + 16))
        })
        .collect()
}

#[test]
fn bzimage_zero_page_cmdline_initrd_e820() {
    let mem = guest_mem(64 * MIB);
    let bz = BzImage::default();
    let image = bz.build();
    let initrd = pattern(0x3123, 42);
    let cmdline = "console=ttyS0 root=/dev/vda panic=1";
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        rsdp_addr: Some(0xf_0000),
        ..BootConfig::new(64 * MIB, cmdline)
    };
    let k = load_linux(&mem, &image, &cfg).unwrap();

    assert_eq!(k.kind, ImageKind::BzImage);
    assert_eq!(k.entry.mode, CpuMode::Long64);
    assert_eq!(
        k.entry.rip, 0x10_0200,
        "64-bit entry is load address + 0x200"
    );
    assert_eq!(k.entry.rsi, ZP);
    assert_eq!(k.entry.cr3, Some(PML4_ADDR));
    assert_eq!(k.kernel_start, 0x10_0000);
    // The protected-mode kernel (everything after the setup sectors) is at 1 MiB.
    assert_eq!(
        read_bytes(&mem, 0x10_0000, bz.payload.len()),
        bz.payload,
        "protected-mode code at 1 MiB"
    );

    // Setup header copied from the image, loader fields filled in.
    assert_eq!(&read_bytes(&mem, ZP + hdr::HEADER, 4), b"HdrS");
    assert_eq!(r16(&mem, ZP + hdr::VERSION), 0x020f);
    assert_eq!(r16(&mem, ZP + hdr::BOOT_FLAG), 0xaa55);
    assert_eq!(r8(&mem, ZP + hdr::SETUP_SECTS), 4);
    assert_eq!(
        r16(&mem, ZP + hdr::KERNEL_VERSION),
        0x1234,
        "image field kept"
    );
    assert_eq!(r32(&mem, ZP + hdr::CMDLINE_SIZE), 2047, "image field kept");
    assert_eq!(r8(&mem, ZP + hdr::TYPE_OF_LOADER), 0xff);
    let loadflags = r8(&mem, ZP + hdr::LOADFLAGS);
    assert_eq!(loadflags & 0x80, 0x80, "CAN_USE_HEAP");
    assert_eq!(loadflags & 0x01, 0x01, "LOADED_HIGH kept");
    assert_eq!(r16(&mem, ZP + hdr::HEAP_END_PTR), 0xfe00);
    assert_eq!(r32(&mem, ZP + hdr::CODE32_START), 0x10_0000);

    // Command line.
    let ptr = r32(&mem, ZP + hdr::CMD_LINE_PTR);
    assert_eq!(u64::from(ptr), CMDLINE_ADDR);
    assert_eq!(read_cstr(&mem, u64::from(ptr)), cmdline);

    // Initrd: page-aligned, as high as possible below the top of RAM, contents intact.
    let image_addr = u64::from(r32(&mem, ZP + hdr::RAMDISK_IMAGE));
    let size = u64::from(r32(&mem, ZP + hdr::RAMDISK_SIZE));
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(image_addr % 4096, 0);
    assert!(image_addr + size <= 64 * MIB);
    assert!(image_addr + size > 64 * MIB - 4096, "as high as possible");
    assert_eq!(k.initrd, Some((image_addr, size)));
    assert_eq!(read_bytes(&mem, image_addr, initrd.len()), initrd);
    assert!(image_addr >= k.kernel_end, "initrd above the kernel");

    // e820.
    assert_eq!(
        e820(&mem),
        vec![
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x10_0000 - 0x9_fc00, 2),
            (0x10_0000, 63 * MIB, 1),
        ]
    );
    assert_eq!(r64(&mem, ZP + zp::ACPI_RSDP_ADDR), 0xf_0000);
}

#[test]
fn loader_owned_header_fields_are_overwritten() {
    let mem = guest_mem(16 * MIB);
    let mut image = BzImage::default().build();
    // Garbage in fields the loader owns: setup_data, type_of_loader, ext_loader_*, subarch.
    image[0x250..0x258].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    image[0x210] = 0x12;
    image[0x226] = 0x34;
    image[0x227] = 0x56;
    image[0x23c..0x240].copy_from_slice(&2u32.to_le_bytes());
    image[0x228..0x22c].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    load_linux(&mem, &image, &BootConfig::new(16 * MIB, "x")).unwrap();
    assert_eq!(r64(&mem, ZP + 0x250), 0, "setup_data");
    assert_eq!(r8(&mem, ZP + hdr::TYPE_OF_LOADER), 0xff);
    assert_eq!(
        (r8(&mem, ZP + 0x226), r8(&mem, ZP + 0x227)),
        (0, 0),
        "ext_loader_ver/type"
    );
    assert_eq!(r32(&mem, ZP + 0x23c), 0, "hardware_subarch");
    assert_eq!(u64::from(r32(&mem, ZP + hdr::CMD_LINE_PTR)), CMDLINE_ADDR);
}

#[test]
fn initrd_stays_below_initrd_addr_max() {
    let mem = guest_mem(64 * MIB);
    let image = BzImage {
        initrd_addr_max: 0x1ff_ffff,
        ..Default::default()
    }
    .build();
    let initrd = pattern(0x2000, 1);
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(64 * MIB, "")
    };
    let k = load_linux(&mem, &image, &cfg).unwrap();
    let (addr, size) = k.initrd.unwrap();
    assert_eq!(addr + size, 0x200_0000, "ends right at initrd_addr_max + 1");
    assert_eq!(u64::from(r32(&mem, ZP + hdr::RAMDISK_IMAGE)), addr);
}

#[test]
fn no_initrd_means_zero_ramdisk_fields() {
    let mem = guest_mem(16 * MIB);
    fill(&mem, ZP, 4096, 0xaa);
    let k = load_linux(
        &mem,
        &BzImage::default().build(),
        &BootConfig::new(16 * MIB, ""),
    )
    .unwrap();
    assert_eq!(k.initrd, None);
    assert_eq!(r32(&mem, ZP + hdr::RAMDISK_IMAGE), 0);
    assert_eq!(r32(&mem, ZP + hdr::RAMDISK_SIZE), 0);
    assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "");
    // The zero page is rewritten whole: fields the loader does not set are zero, not stale.
    assert_eq!(r64(&mem, ZP + zp::ACPI_RSDP_ADDR), 0);
}

#[test]
fn relocatable_kernel_loads_at_pref_address() {
    let mem = guest_mem(64 * MIB);
    let bz = BzImage {
        relocatable: 1,
        pref_address: 0x100_0000,
        kernel_alignment: 0x20_0000,
        ..Default::default()
    };
    let k = load_linux(&mem, &bz.build(), &BootConfig::new(64 * MIB, "")).unwrap();
    assert_eq!(k.kernel_start, 0x100_0000);
    assert_eq!(k.entry.rip, 0x100_0200);
    assert_eq!(read_bytes(&mem, 0x100_0000, 64), bz.payload[..64]);
    assert_eq!(r32(&mem, ZP + hdr::CODE32_START), 0x100_0000);

    // Not relocatable: 1 MiB, but the kernel still needs pref_address + init_size.
    let fixed = BzImage {
        relocatable: 0,
        ..bz.clone()
    };
    let k = load_linux(&mem, &fixed.build(), &BootConfig::new(64 * MIB, "")).unwrap();
    assert_eq!(k.kernel_start, 0x10_0000);
    assert_eq!(k.kernel_end, 0x100_0000 + 0x10_0000);

    // A pref_address not aligned to kernel_alignment: load at 1 MiB; the kernel runs at
    // max(1 MiB rounded up to the alignment, pref_address).
    let k = load_linux(
        &mem,
        &BzImage {
            pref_address: 0x18_0000,
            ..bz.clone()
        }
        .build(),
        &BootConfig::new(64 * MIB, ""),
    )
    .unwrap();
    assert_eq!(k.kernel_start, 0x10_0000);
    assert_eq!(k.entry.rip, 0x10_0200);
    assert_eq!(k.kernel_end, 0x20_0000 + 0x10_0000);

    // A kernel that runs at 16 MiB does not fit 8 MiB of RAM, wherever it is loaded.
    let small = guest_mem(8 * MIB);
    let err = load_linux(&small, &bz.build(), &BootConfig::new(8 * MIB, "")).unwrap_err();
    assert!(
        matches!(err, LoaderError::KernelTooLarge { end: 0x110_0000, ram_end, .. } if ram_end == 8 * MIB),
        "{err:?}"
    );
}

#[test]
fn page_tables_identity_map_first_4_gib() {
    let mem = guest_mem(16 * MIB);
    let k = load_linux(
        &mem,
        &BzImage::default().build(),
        &BootConfig::new(16 * MIB, ""),
    )
    .unwrap();
    let cr3 = k.entry.cr3.unwrap();
    for va in [
        0u64,
        ZP,
        CMDLINE_ADDR,
        k.entry.rip,
        0x3f_ffff,
        0xbfe0_1234,
        0xfee0_0000,
        0xffff_ffff,
    ] {
        assert_eq!(walk(&mem, cr3, va), Some(va), "identity map at {va:#x}");
    }
    assert_eq!(walk(&mem, cr3, 0x1_0000_0000), None, "nothing above 4 GiB");
}

#[test]
fn gdt_has_linux_boot_cs_and_ds() {
    let mem = guest_mem(16 * MIB);
    let k = load_linux(
        &mem,
        &BzImage::default().build(),
        &BootConfig::new(16 * MIB, ""),
    )
    .unwrap();
    let e = k.entry;
    assert_eq!((e.code_selector, e.data_selector), (0x10, 0x18));
    assert_eq!(e.gdt_base, GDT_ADDR);
    assert_eq!(e.gdt_limit, 0x2f);
    let desc = |sel: u16| r64(&mem, e.gdt_base + u64::from(sel));
    assert_eq!(desc(0), 0, "null descriptor");
    assert_eq!(desc(0x10), 0x00af_9b00_0000_ffff, "64-bit code");
    assert_eq!(desc(0x18), 0x00cf_9300_0000_ffff, "flat data");
    // The decoded segments the runner loads agree with what is in guest memory.
    assert_eq!(e.code_segment, Segment::from_descriptor(0x10, desc(0x10)));
    assert_eq!(e.data_segment, Segment::from_descriptor(0x18, desc(0x18)));
    assert!(e.code_segment.l && !e.code_segment.db);
    assert_eq!(e.tss_segment, Segment::from_descriptor(0x20, desc(0x20)));
    assert_eq!(
        (e.tss_segment.base, e.tss_segment.limit, e.tss_segment.type_),
        (0, 0x67, 0xb)
    );
    assert_eq!(e.cr0 & 0x8000_0001, 0x8000_0001, "PG and PE");
    assert_eq!(e.cr4 & 0x20, 0x20, "PAE");
    assert_eq!(e.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(e.rflags, 0x2, "interrupts off");
}

#[test]
fn large_ram_e820_continues_above_4_gib() {
    let size = 3 * 1024 * MIB + 256 * MIB;
    let mem = guest_mem(size);
    let initrd = pattern(0x1000, 2);
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(size, "")
    };
    let image = BzImage {
        initrd_addr_max: 0xffff_ffff,
        ..Default::default()
    }
    .build();
    let k = load_linux(&mem, &image, &cfg).unwrap();
    assert_eq!(
        e820(&mem),
        vec![
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x6_0400, 2),
            (0x10_0000, 0xc000_0000 - 0x10_0000, 1),
            (0x1_0000_0000, 256 * MIB, 1),
        ]
    );
    // The initrd goes at the top of RAM below the MMIO hole, not into it.
    let (addr, len) = k.initrd.unwrap();
    assert_eq!(addr + len, 0xc000_0000);
}

#[test]
fn vmlinux_elf64_enters_at_elf_entry() {
    let mem = guest_mem(64 * MIB);
    // vmlinux: virtual addresses in the kernel map, physical at 16 MiB, e_entry physical.
    let code = pattern(0x800, 4);
    let mut seg = Seg::load(0x100_0000, code.clone(), 0x2000);
    seg.vaddr = 0xffff_ffff_8100_0000;
    let image = Elf::new64(0x100_0000, vec![seg.clone()]).build();
    assert_eq!(detect(&image), ImageKind::ElfVmlinux);
    fill(&mem, 0x100_0000, 0x2000, 0xaa);
    let k = load_linux(&mem, &image, &BootConfig::new(64 * MIB, "root=/dev/vda")).unwrap();
    assert_eq!(k.kind, ImageKind::ElfVmlinux);
    assert_eq!(k.entry.mode, CpuMode::Long64);
    assert_eq!(k.entry.rip, 0x100_0000);
    assert_eq!(k.entry.rsi, ZP);
    assert_eq!((k.kernel_start, k.kernel_end), (0x100_0000, 0x100_2000));
    assert_eq!(read_bytes(&mem, 0x100_0000, code.len()), code);
    assert!(
        read_bytes(&mem, 0x100_0800, 0x1800).iter().all(|&b| b == 0),
        "bss zeroed"
    );
    assert_eq!(&read_bytes(&mem, ZP + hdr::HEADER, 4), b"HdrS");
    assert_eq!(r16(&mem, ZP + hdr::BOOT_FLAG), 0xaa55);
    assert_eq!(r8(&mem, ZP + hdr::TYPE_OF_LOADER), 0xff);
    assert_eq!(
        read_cstr(&mem, u64::from(r32(&mem, ZP + hdr::CMD_LINE_PTR))),
        "root=/dev/vda"
    );
    assert_eq!(r8(&mem, ZP + zp::E820_ENTRIES), 3);

    // An entry given as a virtual address is translated to the physical load address.
    let image = Elf::new64(0xffff_ffff_8100_0100, vec![seg]).build();
    let k = load_linux(&mem, &image, &BootConfig::new(64 * MIB, "")).unwrap();
    assert_eq!(k.entry.rip, 0x100_0100);
}

#[test]
fn elf_with_pvh_note_boots_through_pvh() {
    let mem = guest_mem(16 * MIB);
    let image = pvh_elf64().build();
    let k = load_linux(&mem, &image, &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(k.kind, ImageKind::ElfPvh);
    assert_eq!(k.entry.mode, CpuMode::Protected32);
    assert_eq!(k.entry.rip, 0x10_0100);
    // And the generic entry point agrees.
    let k = load_kernel(&mem, &image, &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(k.kind, ImageKind::ElfPvh);
}

#[test]
fn cmdline_longer_than_header_limit_is_refused() {
    let mem = guest_mem(16 * MIB);
    let image = BzImage {
        cmdline_size: 16,
        ..Default::default()
    }
    .build();
    assert!(load_linux(&mem, &image, &BootConfig::new(16 * MIB, "0123456789abcdef")).is_ok());
    let err = load_linux(
        &mem,
        &image,
        &BootConfig::new(16 * MIB, "0123456789abcdefg"),
    )
    .unwrap_err();
    assert!(
        matches!(err, LoaderError::CmdlineTooLong { len: 17, max: 16 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("16"), "names the limit: {err}");

    let err = load_linux(&mem, &image, &BootConfig::new(16 * MIB, "a\0b")).unwrap_err();
    assert!(
        matches!(err, LoaderError::StringHasNul { offset: 1, .. }),
        "{err:?}"
    );

    // vmlinux: x86 COMMAND_LINE_SIZE (2048 with the NUL).
    let vmlinux = Elf::new64(0x100_0000, vec![Seg::load(0x100_0000, vec![0x90; 16], 16)]).build();
    let long = "x".repeat(2048);
    let err = load_linux(&mem, &vmlinux, &BootConfig::new(16 * MIB, &long)).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        ),
        "{err:?}"
    );
}

#[test]
fn initrd_larger_than_ram_names_both_sizes() {
    let mem = guest_mem(16 * MIB);
    let initrd = vec![0u8; 17 * MIB as usize];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(16 * MIB, "")
    };
    let err = load_linux(&mem, &BzImage::default().build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::InitrdLargerThanRam { initrd, ram } if initrd == 17 * MIB && ram == 16 * MIB),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0x1100000") && msg.contains("0x1000000"),
        "{msg}"
    );
}

#[test]
fn initrd_that_does_not_fit_above_kernel_is_refused() {
    let mem = guest_mem(16 * MIB);
    // 15 MiB is smaller than RAM but cannot fit above a kernel occupying 1 MiB..1 MiB + 4 KiB.
    let image = BzImage {
        init_size: 0x1000,
        pref_address: 0x10_0000,
        ..Default::default()
    }
    .build();
    let initrd = vec![0u8; 15 * MIB as usize];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(16 * MIB, "")
    };
    let err = load_linux(&mem, &image, &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::ModuleNoRoom { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn modules_are_refused_by_the_linux_protocol() {
    let mem = guest_mem(16 * MIB);
    let m = [BootModule {
        data: b"x".into(),
        cmdline: "",
    }];
    let cfg = BootConfig {
        modules: &m,
        ..BootConfig::new(16 * MIB, "")
    };
    let err = load_linux(&mem, &BzImage::default().build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::LinuxModules { count: 1 }),
        "{err:?}"
    );
}

#[test]
fn memory_smaller_than_configured_is_refused() {
    let mem = guest_mem(8 * MIB);
    let err = load_linux(
        &mem,
        &BzImage::default().build(),
        &BootConfig::new(16 * MIB, ""),
    )
    .unwrap_err();
    assert!(
        matches!(err, LoaderError::MemoryNotBacked { mem_size, .. } if mem_size == 16 * MIB),
        "{err:?}"
    );
}

#[test]
fn cpu_count_is_checked() {
    let mem = guest_mem(8 * MIB);
    let cfg = BootConfig {
        ncpus: 0,
        ..BootConfig::new(8 * MIB, "")
    };
    let err = load_linux(&mem, &BzImage::default().build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::CpuCount { ncpus: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn vmlinux_outside_identity_map_or_entry_outside_is_refused() {
    let size = 3 * 1024 * MIB + 256 * MIB;
    let mem = guest_mem(size);
    let cfg = BootConfig::new(size, "");
    // RAM above 4 GiB exists, but the 64-bit entry only gets the first 4 GiB identity-mapped.
    let high = Elf::new64(
        0x1_0000_0000,
        vec![Seg::load(0x1_0000_0000, vec![0x90; 16], 0x1000)],
    )
    .build();
    let err = load_linux(&mem, &high, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::NotIdentityMapped {
                start: 0x1_0000_0000,
                limit: 0x1_0000_0000,
                ..
            }
        ),
        "{err:?}"
    );
    let outside = Elf::new64(
        0x200_0000,
        vec![Seg::load(0x100_0000, vec![0x90; 16], 0x1000)],
    )
    .build();
    let err = load_linux(&mem, &outside, &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::EntryOutsideImage { entry: 0x200_0000 }),
        "{err:?}"
    );
}

/// An initrd given as a file is read straight into guest memory: the same placement and bytes as
/// the same initrd given in memory; a file shorter than its announced length is an error naming
/// the initrd, not a partly loaded guest.
#[test]
fn an_initrd_file_loads_like_its_bytes_and_a_short_one_is_refused() {
    use std::io::Write;
    let image = BzImage::default().build();
    let initrd = pattern(0x5_4321, 7);
    let path = std::env::temp_dir().join(format!("loader-initrd-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&initrd)
        .unwrap();

    let from_bytes = guest_mem(64 * MIB);
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(64 * MIB, "")
    };
    let a = load_linux(&from_bytes, &image, &cfg).unwrap();

    let from_file = guest_mem(64 * MIB);
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let cfg = BootConfig {
        initrd: Some(loader::Blob::File { file: &file, len }),
        ..BootConfig::new(64 * MIB, "")
    };
    let b = load_linux(&from_file, &image, &cfg).unwrap();
    assert_eq!(a.initrd, b.initrd);
    // The same blob loads again (from the file's start, not where the first load left it).
    let again = guest_mem(64 * MIB);
    let c = load_linux(&again, &image, &cfg).unwrap();
    assert_eq!(
        read_bytes(&again, c.initrd.unwrap().0, initrd.len()),
        initrd
    );
    let (addr, size) = b.initrd.unwrap();
    assert_eq!(size, len);
    assert_eq!(read_bytes(&from_file, addr, initrd.len()), initrd);

    // Announced longer than the file is (it shrank after it was measured).
    let file = std::fs::File::open(&path).unwrap();
    let cfg = BootConfig {
        initrd: Some(loader::Blob::File {
            file: &file,
            len: len + 4096,
        }),
        ..BootConfig::new(64 * MIB, "")
    };
    let e = load_linux(&guest_mem(64 * MIB), &image, &cfg).unwrap_err();
    assert!(
        matches!(e, LoaderError::GuestWrite { what: "initrd", .. }),
        "{e:?}"
    );
    assert!(e.is_file_read_failure(), "{e:?}");
    std::fs::remove_file(&path).unwrap();
}
