//! Multiboot v1: header search, ELF and a.out-kludge kernels, the information structure,
//! modules and memory map.

mod common;

use common::*;
use loader::layout::MBI_ADDR;
use loader::multiboot::find_header;
use loader::{
    detect, load_kernel, load_multiboot, BootConfig, BootModule, CpuMode, ImageKind, LoaderError,
};
use vm_memory::GuestMemoryMmap;

/// Multiboot information offsets (Multiboot 0.6.96, section 3.3).
mod mbi {
    pub const FLAGS: u64 = 0;
    pub const MEM_LOWER: u64 = 4;
    pub const MEM_UPPER: u64 = 8;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const BOOT_LOADER_NAME: u64 = 64;
}

fn mmap(mem: &GuestMemoryMmap) -> Vec<(u32, u64, u64, u32)> {
    let addr = u64::from(r32(mem, MBI_ADDR + mbi::MMAP_ADDR));
    let len = u64::from(r32(mem, MBI_ADDR + mbi::MMAP_LENGTH));
    let mut out = Vec::new();
    let mut p = addr;
    // Walk as the spec says: each entry is `size` + 4 bytes long.
    while p < addr + len {
        let size = r32(mem, p);
        out.push((size, r64(mem, p + 4), r64(mem, p + 12), r32(mem, p + 20)));
        p += u64::from(size) + 4;
    }
    out
}

/// (mod_start, mod_end, string) of each module.
fn modules(mem: &GuestMemoryMmap) -> Vec<(u64, u64, String)> {
    let n = r32(mem, MBI_ADDR + mbi::MODS_COUNT);
    let list = u64::from(r32(mem, MBI_ADDR + mbi::MODS_ADDR));
    (0..u64::from(n))
        .map(|i| {
            let e = list + i * 16;
            assert_eq!(r32(mem, e + 12), 0, "reserved field");
            (
                u64::from(r32(mem, e)),
                u64::from(r32(mem, e + 4)),
                read_cstr(mem, u64::from(r32(mem, e + 8))),
            )
        })
        .collect()
}

#[test]
fn elf32_kernel_info_structure_modules_mmap() {
    let mem = guest_mem(64 * MIB);
    fill(&mem, 0x10_0000, 0x3000, 0xaa);
    let elf = mb_elf32(0x3); // page-align modules, memory info
    let image = elf.build();
    assert_eq!(detect(&image), ImageKind::Multiboot);
    let a = pattern(0x1801, 1);
    let b = pattern(0x10, 2);
    let mods = [
        BootModule {
            data: (&a).into(),
            cmdline: "/boot/a.bin arg",
        },
        BootModule {
            data: (&b).into(),
            cmdline: "",
        },
    ];
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(64 * MIB, "kernel.elf console=com1")
    };
    let k = load_multiboot(&mem, &image, &cfg).unwrap();

    let e = k.entry;
    assert_eq!(e.mode, CpuMode::Protected32);
    assert_eq!(e.rax, 0x2bad_b002);
    assert_eq!(e.rbx, MBI_ADDR);
    assert_eq!(e.rip, 0x10_0040);
    assert_eq!(e.cr3, None);
    assert_eq!((e.code_selector, e.data_selector), (0x08, 0x18));
    assert_eq!((k.kernel_start, k.kernel_end), (0x10_0000, 0x10_3000));

    // Kernel loaded and its bss zeroed.
    assert_eq!(read_bytes(&mem, 0x10_0000, 0x400), elf.segs[0].data);
    assert!(read_bytes(&mem, 0x10_0400, 0x2c00).iter().all(|&x| x == 0));

    // The information structure.
    let flags = r32(&mem, MBI_ADDR + mbi::FLAGS);
    for bit in [0, 2, 3, 6, 9] {
        assert_ne!(flags & (1 << bit), 0, "flag bit {bit}");
    }
    assert_eq!(flags & (1 << 1), 0, "no boot device claimed");
    assert_eq!(r32(&mem, MBI_ADDR + mbi::MEM_LOWER), 639);
    assert_eq!(r32(&mem, MBI_ADDR + mbi::MEM_UPPER), 63 * 1024);
    assert_eq!(
        read_cstr(&mem, u64::from(r32(&mem, MBI_ADDR + mbi::CMDLINE))),
        "kernel.elf console=com1"
    );
    assert_eq!(
        read_cstr(&mem, u64::from(r32(&mem, MBI_ADDR + mbi::BOOT_LOADER_NAME))),
        "bhyve-rs"
    );

    // Modules: page-aligned, after the kernel, in order, contents and strings intact.
    let m = modules(&mem);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].0, 0x10_3000, "first module right after the kernel");
    assert_eq!(m[0].1 - m[0].0, a.len() as u64);
    assert_eq!(m[0].2, "/boot/a.bin arg");
    assert_eq!(m[1].0, 0x10_5000, "page-aligned after module 0");
    assert_eq!(m[1].1 - m[1].0, b.len() as u64);
    assert_eq!(m[1].2, "");
    assert_eq!(read_bytes(&mem, m[0].0, a.len()), a);
    assert_eq!(read_bytes(&mem, m[1].0, b.len()), b);
    assert_eq!(k.modules, vec![(0x10_3000, 0x1801), (0x10_5000, 0x10)]);

    // Memory map.
    assert_eq!(r32(&mem, MBI_ADDR + mbi::MMAP_LENGTH), 3 * 24);
    assert_eq!(
        mmap(&mem),
        vec![
            (20, 0, 0x9_fc00, 1),
            (20, 0x9_fc00, 0x6_0400, 2),
            (20, 0x10_0000, 63 * MIB, 1),
        ]
    );
}

#[test]
fn initrd_is_module_zero() {
    let mem = guest_mem(16 * MIB);
    let initrd = pattern(0x100, 3);
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(16 * MIB, "")
    };
    let k = load_multiboot(&mem, &mb_elf32(0).build(), &cfg).unwrap();
    let m = modules(&mem);
    assert_eq!(m.len(), 1);
    assert_eq!(read_bytes(&mem, m[0].0, initrd.len()), initrd);
    assert_eq!(k.initrd, Some((m[0].0, 0x100)));
}

#[test]
fn aout_kludge_loads_whole_file_with_bss() {
    let mem = guest_mem(16 * MIB);
    fill(&mem, 0x10_0000, 0x4000, 0xaa);
    let image = mb_aout(0x2);
    assert_eq!(detect(&image), ImageKind::Multiboot);
    let module = pattern(0x10, 4);
    let mods = [BootModule {
        data: (&module).into(),
        cmdline: "m",
    }];
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(16 * MIB, "")
    };
    let k = load_kernel(&mem, &image, &cfg).unwrap();
    assert_eq!(k.kind, ImageKind::Multiboot);
    assert_eq!(k.entry.rip, 0x10_0080);
    assert_eq!(k.entry.rax, 0x2bad_b002);
    assert_eq!((k.kernel_start, k.kernel_end), (0x10_0000, 0x10_4000));
    assert_eq!(read_bytes(&mem, 0x10_0000, image.len()), image);
    let bss = read_bytes(&mem, 0x10_0000 + image.len() as u64, 0x4000 - image.len());
    assert!(bss.iter().all(|&x| x == 0), "bss zeroed");
    assert_eq!(modules(&mem)[0].0, 0x10_4000);
}

#[test]
fn aout_kludge_with_header_deep_in_file_and_explicit_load_end() {
    let mem = guest_mem(16 * MIB);
    // Header at file offset 0x1000; header_addr - load_addr = 0x10, so loading starts at file
    // offset 0xff0 and copies load_end_addr - load_addr = 0x100 bytes.
    let mut image = pattern(0x1000, 1);
    let fields = [0x20_0010, 0x20_0000, 0x20_0100, 0, 0x20_0020];
    image.extend_from_slice(&mb_header(1 << 16, Some(fields)));
    image.extend_from_slice(&pattern(0x400, 2));
    fill(&mem, 0x20_0100, 0x100, 0xaa);
    let k = load_multiboot(&mem, &image, &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(read_bytes(&mem, 0x20_0000, 0x100), image[0xff0..0x10f0]);
    assert_eq!(
        r8(&mem, 0x20_0100),
        0xaa,
        "nothing written past load_end_addr"
    );
    assert_eq!((k.kernel_start, k.kernel_end), (0x20_0000, 0x20_0100));
    assert_eq!(k.entry.rip, 0x20_0020);
}

#[test]
fn elf64_multiboot_kernel_is_entered_in_32_bit_mode() {
    let mem = guest_mem(16 * MIB);
    let mut code = mb_header(0, None);
    code.resize(0x100, 0x90);
    let image = Elf::new64(0x10_0010, vec![Seg::load(0x10_0000, code, 0x100)]).build();
    assert_eq!(detect(&image), ImageKind::Multiboot);
    let k = load_kernel(&mem, &image, &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(k.kind, ImageKind::Multiboot);
    assert_eq!(k.entry.mode, CpuMode::Protected32);
    assert_eq!(k.entry.rip, 0x10_0010);
}

#[test]
fn header_search_rules() {
    // Found at a 4-byte aligned offset below 8192.
    let mut img = vec![0u8; 0x1ff4];
    img.extend_from_slice(&mb_header(0, None));
    assert_eq!(find_header(&img).unwrap().unwrap().offset, 0x1ff4);
    // Not at an unaligned offset.
    let mut img = vec![0u8; 0x102];
    img.extend_from_slice(&mb_header(0, None));
    img.resize(0x400, 0);
    assert_eq!(find_header(&img).unwrap(), None);
    // Not past the first 8192 bytes.
    let mut img = vec![0u8; 0x2000];
    img.extend_from_slice(&mb_header(0, None));
    assert_eq!(find_header(&img).unwrap(), None);
    // Not with a bad checksum.
    let mut img = mb_header(0, None);
    img[8] ^= 1;
    img.resize(0x100, 0);
    assert_eq!(find_header(&img).unwrap(), None);
    let err = load_multiboot(&guest_mem(8 * MIB), &img, &BootConfig::new(8 * MIB, "")).unwrap_err();
    assert!(
        matches!(err, LoaderError::MultibootHeaderMissing { searched: 0x100 }),
        "{err:?}"
    );
    // An a.out header cut off by the end of the file.
    let mut img = vec![0u8; 0x20];
    img.extend_from_slice(&mb_header(1 << 16, None));
    img.extend_from_slice(&[0; 8]);
    let err = find_header(&img).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::MultibootHeaderTruncated {
                offset: 0x20,
                need: 32,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn unsupported_required_flags_are_refused() {
    let mem = guest_mem(16 * MIB);
    let cfg = BootConfig::new(16 * MIB, "");
    // Video mode (bit 2) needs a 48-byte header; give it one.
    let mut code = mb_header(0x7, None);
    code.resize(0x40, 0);
    let image = Elf::new32(0x10_0040, vec![Seg::load(0x10_0000, code, 0x100)]).build();
    let err = load_multiboot(&mem, &image, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::MultibootUnsupportedFlags {
                flags: 0x7,
                unsupported: 0x4
            }
        ),
        "{err:?}"
    );
    let err = load_multiboot(&mem, &mb_elf32(1 << 5).build(), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::MultibootUnsupportedFlags {
                unsupported: 0x20,
                ..
            }
        ),
        "{err:?}"
    );
    // Optional bits (17-31) other than 16 are ignored.
    load_multiboot(&mem, &mb_elf32(1 << 20).build(), &cfg).unwrap();
}

#[test]
fn inconsistent_aout_fields_are_refused() {
    let mem = guest_mem(16 * MIB);
    let cfg = BootConfig::new(16 * MIB, "");
    let with = |fields: [u32; 5]| {
        let mut img = vec![0u8; 0x20];
        img.extend_from_slice(&mb_header(1 << 16, Some(fields)));
        img.extend_from_slice(&[0x90; 0x100]);
        img
    };
    let cases: [([u32; 5], &str); 5] = [
        (
            [0x10_0000, 0x10_0100, 0, 0, 0x10_0100],
            "load_addr is above header_addr",
        ),
        (
            [0x10_0100, 0x10_0000, 0, 0, 0x10_0100],
            "exceeds the header's file offset",
        ),
        (
            [0x10_0020, 0x10_0000, 0x10_0000, 0, 0x10_0000],
            "load_end_addr is not above",
        ),
        (
            [0x10_0020, 0x10_0000, 0x10_1000, 0, 0x10_0000],
            "runs past the end of the file",
        ),
        (
            [0x10_0020, 0x10_0000, 0x10_0100, 0x10_0010, 0x10_0000],
            "bss_end_addr is below",
        ),
    ];
    for (fields, what) in cases {
        let err = load_multiboot(&mem, &with(fields), &cfg).unwrap_err();
        assert!(matches!(err, LoaderError::MultibootAout { .. }), "{err:?}");
        assert!(err.to_string().contains(what), "{err} should say {what}");
    }
    let err =
        load_multiboot(&mem, &with([0x10_0020, 0x10_0000, 0, 0, 0x20_0000]), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::EntryOutsideImage { entry: 0x20_0000 }),
        "{err:?}"
    );
    // Loading over the loader's structures.
    let err = load_multiboot(&mem, &with([0x8020, 0x8000, 0, 0, 0x8000]), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::SegmentOverlapsReserved { .. }),
        "{err:?}"
    );
}

#[test]
fn header_without_aout_needs_an_elf() {
    let mem = guest_mem(16 * MIB);
    let mut img = mb_header(0, None);
    img.resize(0x200, 0);
    let err = load_multiboot(&mem, &img, &BootConfig::new(16 * MIB, "")).unwrap_err();
    assert!(
        matches!(&err, LoaderError::MultibootNotElf { source } if matches!(**source, LoaderError::NotElf)),
        "{err:?}"
    );
}

#[test]
fn modules_that_do_not_fit_are_refused() {
    let mem = guest_mem(4 * MIB);
    let big = vec![0u8; 3 * MIB as usize];
    let mods = [BootModule {
        data: (&big).into(),
        cmdline: "",
    }];
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(4 * MIB, "")
    };
    let err = load_multiboot(&mem, &mb_elf32(0).build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::ModuleNoRoom { index: 0, low: 0x10_3000, high, .. } if high == 4 * MIB),
        "{err:?}"
    );
    let huge = vec![0u8; 5 * MIB as usize];
    let mods = [BootModule {
        data: (&huge).into(),
        cmdline: "",
    }];
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(4 * MIB, "")
    };
    let err = load_multiboot(&mem, &mb_elf32(0).build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::InitrdLargerThanRam { .. }),
        "{err:?}"
    );
}
