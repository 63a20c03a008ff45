//! PVH boot: ELF note, `hvm_start_info`, module list, memory map, 32-bit entry state.

mod common;

use common::*;
use loader::layout::{CMDLINE_ADDR, PVH_START_INFO_ADDR};
use loader::{detect, load_pvh, BootConfig, BootModule, CpuMode, ImageKind, LoaderError, Segment};
use vm_memory::GuestMemoryMmap;

const SI: u64 = PVH_START_INFO_ADDR;

/// `hvm_start_info` field offsets (xen/include/public/arch-x86/hvm/start_info.h).
mod si {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const FLAGS: u64 = 8;
    pub const NR_MODULES: u64 = 12;
    pub const MODLIST_PADDR: u64 = 16;
    pub const CMDLINE_PADDR: u64 = 24;
    pub const RSDP_PADDR: u64 = 32;
    pub const MEMMAP_PADDR: u64 = 40;
    pub const MEMMAP_ENTRIES: u64 = 48;
    pub const RESERVED: u64 = 52;
}

fn memmap(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32, u32)> {
    let base = r64(mem, SI + si::MEMMAP_PADDR);
    (0..u64::from(r32(mem, SI + si::MEMMAP_ENTRIES)))
        .map(|i| {
            let e = base + i * 24;
            (
                r64(mem, e),
                r64(mem, e + 8),
                r32(mem, e + 16),
                r32(mem, e + 20),
            )
        })
        .collect()
}

#[test]
fn elf64_pvh_start_info_modules_memmap() {
    let mem = guest_mem(64 * MIB);
    fill(&mem, 0x10_0000, 0x1000, 0xaa);
    fill(&mem, SI, 0x2000, 0xaa);
    let image = pvh_elf64().build();
    assert_eq!(detect(&image), ImageKind::ElfPvh);
    let initrd = pattern(0x2345, 6);
    let module = pattern(0x100, 8);
    let mods = [BootModule {
        data: (&module).into(),
        cmdline: "mod1 arg=2",
    }];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        modules: &mods,
        rsdp_addr: Some(0xe_0000),
        ..BootConfig::new(64 * MIB, "console=hvc0")
    };
    let k = load_pvh(&mem, &image, &cfg).unwrap();

    // Entry state: 32-bit protected mode, paging off, ebx = start_info.
    let e = k.entry;
    assert_eq!(e.mode, CpuMode::Protected32);
    assert_eq!(e.rip, 0x10_0100, "entry from the PVH note, not e_entry");
    assert_eq!(e.rbx, SI);
    assert_eq!(e.cr3, None);
    assert_eq!(e.cr0 & 0x8000_0001, 0x1, "PE on, PG off");
    assert_eq!(e.efer, 0);
    assert_eq!(e.code_selector, 0x08);
    let cs = Segment::from_descriptor(0x08, r64(&mem, e.gdt_base + 8));
    assert_eq!(e.code_segment, cs);
    assert!(cs.db && !cs.l && cs.g && cs.base == 0 && cs.limit == 0xffff_ffff);
    let ds = Segment::from_descriptor(0x18, r64(&mem, e.gdt_base + 0x18));
    assert_eq!(e.data_segment, ds);
    assert_eq!((ds.base, ds.limit), (0, 0xffff_ffff));

    // Segment loaded, bss zeroed.
    assert_eq!(read_bytes(&mem, 0x10_0000, 0x200), pattern(0x200, 3));
    assert!(read_bytes(&mem, 0x10_0200, 0xe00).iter().all(|&b| b == 0));

    // hvm_start_info.
    assert_eq!(r32(&mem, SI + si::MAGIC), 0x336e_c578);
    assert_eq!(r32(&mem, SI + si::VERSION), 1);
    assert_eq!(r32(&mem, SI + si::FLAGS), 0);
    assert_eq!(r32(&mem, SI + si::RESERVED), 0);
    assert_eq!(r64(&mem, SI + si::RSDP_PADDR), 0xe_0000);
    let cmdline = r64(&mem, SI + si::CMDLINE_PADDR);
    assert_eq!(cmdline, CMDLINE_ADDR);
    assert_eq!(read_cstr(&mem, cmdline), "console=hvc0");

    // Modules: the initrd is module 0 (no command line), then the extra module.
    assert_eq!(r32(&mem, SI + si::NR_MODULES), 2);
    let list = r64(&mem, SI + si::MODLIST_PADDR);
    let m0 = (
        r64(&mem, list),
        r64(&mem, list + 8),
        r64(&mem, list + 16),
        r64(&mem, list + 24),
    );
    let m1 = (
        r64(&mem, list + 32),
        r64(&mem, list + 40),
        r64(&mem, list + 48),
        r64(&mem, list + 56),
    );
    assert_eq!(m0.1, initrd.len() as u64);
    assert_eq!((m0.2, m0.3), (0, 0), "initrd has no command line");
    assert_eq!(m0.0 % 4096, 0);
    assert_eq!(read_bytes(&mem, m0.0, initrd.len()), initrd);
    assert_eq!(m1.1, module.len() as u64);
    assert_eq!(m1.0 % 4096, 0);
    assert_eq!(read_bytes(&mem, m1.0, module.len()), module);
    assert_eq!(read_cstr(&mem, m1.2), "mod1 arg=2");
    assert!(
        m0.0 + m0.1 <= 64 * MIB && m0.0 + m0.1 > 64 * MIB - 4096,
        "initrd at the top"
    );
    assert!(m1.0 + m1.1 <= m0.0, "modules do not overlap");
    assert!(m1.0 >= k.kernel_end);
    assert_eq!(k.initrd, Some((m0.0, m0.1)));
    assert_eq!(k.modules, vec![(m0.0, m0.1), (m1.0, m1.1)]);

    // Memory map.
    assert_eq!(
        memmap(&mem),
        vec![
            (0, 0x9_fc00, 1, 0),
            (0x9_fc00, 0x6_0400, 2, 0),
            (0x10_0000, 63 * MIB, 1, 0),
        ]
    );
}

#[test]
fn no_modules_and_no_rsdp() {
    let mem = guest_mem(16 * MIB);
    fill(&mem, SI, 0x1000, 0xaa);
    let k = load_pvh(&mem, &pvh_elf64().build(), &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(r32(&mem, SI + si::NR_MODULES), 0);
    assert_eq!(r64(&mem, SI + si::MODLIST_PADDR), 0);
    assert_eq!(r64(&mem, SI + si::RSDP_PADDR), 0);
    assert!(k.modules.is_empty() && k.initrd.is_none());
}

#[test]
fn elf32_pvh_with_8_byte_note_descriptor() {
    let mem = guest_mem(16 * MIB);
    let image = Elf::new32(
        0x20_0000,
        vec![
            Seg::load(0x20_0000, pattern(0x100, 1), 0x100),
            Seg::note(note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])),
            Seg::note(note(b"Xen\0", 18, &0x20_0040u64.to_le_bytes())),
        ],
    )
    .build();
    assert_eq!(detect(&image), ImageKind::ElfPvh);
    let k = load_pvh(&mem, &image, &BootConfig::new(16 * MIB, "")).unwrap();
    assert_eq!(k.entry.rip, 0x20_0040);
    assert_eq!(read_bytes(&mem, 0x20_0000, 0x100), pattern(0x100, 1));
}

#[test]
fn large_ram_memmap_has_high_entry() {
    let size = 3 * 1024 * MIB + 512 * MIB;
    let mem = guest_mem(size);
    load_pvh(&mem, &pvh_elf64().build(), &BootConfig::new(size, "")).unwrap();
    let map = memmap(&mem);
    assert_eq!(map.len(), 4);
    assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, 1, 0));
    assert_eq!(map[3], (0x1_0000_0000, 512 * MIB, 1, 0));
}

#[test]
fn missing_or_malformed_note_is_refused() {
    let mem = guest_mem(16 * MIB);
    let cfg = BootConfig::new(16 * MIB, "");
    let plain = Elf::new64(0x10_0000, vec![Seg::load(0x10_0000, vec![0; 16], 16)]).build();
    let err = load_pvh(&mem, &plain, &cfg).unwrap_err();
    assert!(matches!(err, LoaderError::PvhNoteMissing), "{err:?}");
    assert!(err.to_string().contains("XEN_ELFNOTE_PHYS32_ENTRY"));

    let bad_desc = Elf::new64(
        0x10_0000,
        vec![
            Seg::note(note(b"Xen\0", 18, &[0, 1])),
            Seg::load(0x10_0000, vec![0; 16], 16),
        ],
    )
    .build();
    let err = load_pvh(&mem, &bad_desc, &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::PvhNoteDescSize { size: 2 }),
        "{err:?}"
    );

    // A note whose descriptor size runs past the end of the PT_NOTE segment.
    let mut n = pvh_note(0x10_0000);
    n[4..8].copy_from_slice(&0x1000u32.to_le_bytes());
    let overrun = Elf::new64(
        0x10_0000,
        vec![Seg::note(n), Seg::load(0x10_0000, vec![0; 16], 16)],
    );
    let off = overrun.data_offset(0) as u64;
    let err = load_pvh(&mem, &overrun.build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::ElfNote { offset, .. } if offset == off),
        "{err:?}"
    );

    // Trailing garbage shorter than a note header.
    let mut n = pvh_note(0x10_0000);
    n.extend_from_slice(&[0; 4]);
    let trailing = Elf::new64(
        0x10_0000,
        vec![Seg::note(n), Seg::load(0x10_0000, vec![0; 16], 16)],
    );
    let err = load_pvh(&mem, &trailing.build(), &cfg).unwrap_err();
    assert!(matches!(err, LoaderError::ElfNote { .. }), "{err:?}");
}

#[test]
fn entry_outside_image_or_above_4g_is_refused() {
    let mem = guest_mem(16 * MIB);
    let cfg = BootConfig::new(16 * MIB, "");
    let outside = Elf::new64(
        0x10_0000,
        vec![
            Seg::note(pvh_note(0x30_0000)),
            Seg::load(0x10_0000, vec![0; 16], 0x1000),
        ],
    )
    .build();
    let err = load_pvh(&mem, &outside, &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::EntryOutsideImage { entry: 0x30_0000 }),
        "{err:?}"
    );

    let high = Elf::new64(
        0x10_0000,
        vec![
            Seg::note(note(b"Xen\0", 18, &0x1_0000_0000u64.to_le_bytes())),
            Seg::load(0x10_0000, vec![0; 16], 0x1000),
        ],
    )
    .build();
    let err = load_pvh(&mem, &high, &cfg).unwrap_err();
    assert!(matches!(err, LoaderError::EntryAbove4G { .. }), "{err:?}");
}

#[test]
fn segments_must_be_in_ram_and_clear_of_loader_structures() {
    let mem = guest_mem(16 * MIB);
    let cfg = BootConfig::new(16 * MIB, "");
    let with_seg = |paddr: u64, memsz: u64| {
        Elf::new64(
            paddr,
            vec![
                Seg::note(pvh_note(paddr as u32)),
                Seg::load(paddr, vec![0x90; 16], memsz),
            ],
        )
        .build()
    };
    // Over the zero page / start_info area.
    let err = load_pvh(&mem, &with_seg(0x6000, 0x100), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::SegmentOverlapsReserved {
                area_end: 0x4_0000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("loader"), "{err}");
    // Over the legacy EBDA/BIOS area.
    let err = load_pvh(&mem, &with_seg(0x9_0000, 0x2_0000), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::SegmentOverlapsReserved {
                area_start: 0x9_fc00,
                ..
            }
        ),
        "{err:?}"
    );
    // Beyond the end of RAM.
    let err = load_pvh(&mem, &with_seg(0xf0_0000, 0x20_0000), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::SegmentNotInRam {
                start: 0xf0_0000,
                end: 0x110_0000
            }
        ),
        "{err:?}"
    );
    // Below 1 MiB but above the loader area is fine.
    let k = load_pvh(&mem, &with_seg(0x5_0000, 0x1000), &cfg).unwrap();
    assert_eq!(k.entry.rip, 0x5_0000);
}

#[test]
fn too_many_modules_or_strings_are_refused() {
    let mem = guest_mem(16 * MIB);
    let data = [1u8; 8];
    let mods: Vec<BootModule> = (0..200)
        .map(|_| BootModule {
            data: (&data).into(),
            cmdline: "",
        })
        .collect();
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(16 * MIB, "")
    };
    let err = load_pvh(&mem, &pvh_elf64().build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::TooManyModules { count: 200, .. }),
        "{err:?}"
    );

    let long = "s".repeat(0x1_0000);
    let mods = [BootModule {
        data: (&data).into(),
        cmdline: &long,
    }];
    let cfg = BootConfig {
        modules: &mods,
        ..BootConfig::new(16 * MIB, "")
    };
    let err = load_pvh(&mem, &pvh_elf64().build(), &cfg).unwrap_err();
    assert!(
        matches!(err, LoaderError::ModuleStringsTooLong { .. }),
        "{err:?}"
    );
}
