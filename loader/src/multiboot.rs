//! Multiboot (version 1, 0.6.96): ELF kernels and the a.out kludge, entered in 32-bit protected
//! mode with `eax` = 0x2BADB002 and `ebx` pointing at the multiboot information structure.

use vm_memory::GuestMemory;

use crate::elf::ElfImage;
use crate::entry::{write_gdt, CpuMode, EntryState};
use crate::layout::{
    MemoryLayout, CMDLINE_ADDR, CMDLINE_AREA_SIZE, EBDA_START, HIGH_MEMORY_START, MBI_ADDR,
    MB_LOADER_NAME_ADDR, MB_MMAP_ADDR, MB_MMAP_END, MB_MODS_ADDR, MB_MODS_END, MMIO_HOLE_END,
    MODULE_STRINGS_ADDR, MODULE_STRINGS_SIZE,
};
use crate::mem::{
    check_backed, check_segment, cmdline_bytes, image_prefix, le_u32, len64, place_low, write_blob,
    write_blob_range, write_bytes, zero_bytes, StringTable,
};
use crate::{Blob, BootConfig, ImageKind, LoadedKernel, LoaderError};

/// Magic value of the multiboot header.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Magic value in `eax` at entry.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first this many bytes of the image, 4-byte aligned.
pub const MULTIBOOT_SEARCH: u64 = 8192;
/// Bytes read from the image's start to find the header: the search area, and a header begun
/// at its end (at most 48 bytes).
pub(crate) const MULTIBOOT_READ: u64 = MULTIBOOT_SEARCH + 48;
/// Header flag: align modules on 4 KiB boundaries (required).
pub const MB_FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: provide memory information (required).
pub const MB_FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: provide video mode information (required; not supported).
pub const MB_FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the a.out kludge address fields are valid.
pub const MB_FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Required header flags (bits 0-15) this loader honours.
const SUPPORTED_REQUIRED_FLAGS: u32 = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO;

/// Information flag: `mem_lower`/`mem_upper` valid.
pub const MBI_FLAG_MEMORY: u32 = 1 << 0;
/// Information flag: `cmdline` valid.
pub const MBI_FLAG_CMDLINE: u32 = 1 << 2;
/// Information flag: `mods_count`/`mods_addr` valid.
pub const MBI_FLAG_MODS: u32 = 1 << 3;
/// Information flag: `mmap_length`/`mmap_addr` valid.
pub const MBI_FLAG_MMAP: u32 = 1 << 6;
/// Information flag: `boot_loader_name` valid.
pub const MBI_FLAG_LOADER_NAME: u32 = 1 << 9;
/// The `boot_loader_name` string.
pub const BOOT_LOADER_NAME: &str = "bhyve-rs";
/// Size of the multiboot information structure (through the framebuffer fields).
pub const MBI_SIZE: u64 = 0x78;
/// Most modules the module list area holds.
pub const MB_MAX_MODULES: u64 = (MB_MODS_END - MB_MODS_ADDR) / 16;

const MMAP_ENTRY_SIZE: u64 = 24;
const _: () = assert!((MB_MMAP_END - MB_MMAP_ADDR) / MMAP_ENTRY_SIZE >= 4);
const _: () = assert!(MBI_ADDR + MBI_SIZE <= MB_LOADER_NAME_ADDR);
const _: () = assert!(MB_LOADER_NAME_ADDR + 16 <= MB_MMAP_ADDR);

/// A multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the header.
    pub offset: u64,
    /// The header's flags.
    pub flags: u32,
    /// a.out kludge fields (`header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr`,
    /// `entry_addr`), when flags bit 16 is set.
    pub aout: Option<[u32; 5]>,
}

/// Finds the multiboot header: magic 0x1BADB002 at a 4-byte aligned offset in the first 8192
/// bytes, with magic + flags + checksum = 0 (mod 2^32). `Ok(None)` if there is none; an error if
/// the header is cut off by the end of the image. `image` may be the image's first
/// `MULTIBOOT_SEARCH + 48` bytes only: the answer is the same.
pub fn find_header(image: &[u8]) -> Result<Option<MultibootHeader>, LoaderError> {
    let len = len64(image);
    let limit = len.min(MULTIBOOT_SEARCH);
    let mut offset = 0u64;
    while offset + 12 <= limit {
        let word = |o: u64| le_u32(image, offset + o).unwrap_or(0);
        let (magic, flags, checksum) = (word(0), word(4), word(8));
        if magic == MULTIBOOT_HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(checksum) == 0
        {
            let need = if flags & MB_FLAG_VIDEO_MODE != 0 {
                48
            } else if flags & MB_FLAG_AOUT_KLUDGE != 0 {
                32
            } else {
                12
            };
            if offset + need > len {
                return Err(LoaderError::MultibootHeaderTruncated { offset, need, len });
            }
            let aout = (flags & MB_FLAG_AOUT_KLUDGE != 0)
                .then(|| [word(12), word(16), word(20), word(24), word(28)]);
            return Ok(Some(MultibootHeader {
                offset,
                flags,
                aout,
            }));
        }
        offset += 4;
    }
    Ok(None)
}

/// An a.out-kludge kernel's load: `file_len` bytes of the image from `file_start` at guest
/// address `addr`, then zeroes up to `mem_len` (its bss).
#[derive(Debug, Clone, Copy)]
struct AoutLoad {
    addr: u64,
    file_start: u64,
    file_len: u64,
    mem_len: u64,
}

/// Where the kernel was put, before anything is written.
struct Placement<'a> {
    /// a.out kludge: what to read from the file, and where.
    aout: Option<AoutLoad>,
    /// ELF: the parsed image, whose segments are loaded at their physical addresses.
    elf: Option<ElfImage<'a>>,
    /// Lowest address of the image.
    start: u64,
    /// End (exclusive) of the image including bss.
    end: u64,
    /// Physical entry point.
    entry: u64,
}

fn place_aout<'a>(
    image: Blob<'a>,
    header: &MultibootHeader,
    fields: [u32; 5],
    layout: &MemoryLayout,
) -> Result<Placement<'a>, LoaderError> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = fields;
    let bad = |what| LoaderError::MultibootAout {
        what,
        header_addr,
        load_addr,
        load_end_addr,
        bss_end_addr,
    };
    if load_addr > header_addr {
        return Err(bad("load_addr is above header_addr"));
    }
    let header_delta = u64::from(header_addr - load_addr);
    let file_start = header.offset.checked_sub(header_delta).ok_or(bad(
        "header_addr - load_addr exceeds the header's file offset",
    ))?;
    let len = image.len();
    let load = u64::from(load_addr);
    let load_end = if load_end_addr == 0 {
        load + (len - file_start)
    } else {
        let end = u64::from(load_end_addr);
        if end <= load {
            return Err(bad("load_end_addr is not above load_addr"));
        }
        if file_start + (end - load) > len {
            return Err(bad(
                "load_end_addr - load_addr runs past the end of the file",
            ));
        }
        end
    };
    let bss_end = if bss_end_addr == 0 {
        load_end
    } else if u64::from(bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below load_end_addr"));
    } else {
        u64::from(bss_end_addr)
    };
    check_segment(layout, load, bss_end)?;
    let entry = u64::from(entry_addr);
    if entry < load || entry >= bss_end {
        return Err(LoaderError::EntryOutsideImage { entry });
    }
    Ok(Placement {
        aout: Some(AoutLoad {
            addr: load,
            file_start,
            file_len: load_end - load,
            mem_len: bss_end - load,
        }),
        elf: None,
        start: load,
        end: bss_end,
        entry,
    })
}

fn place_elf<'a>(image: Blob<'a>, layout: &MemoryLayout) -> Result<Placement<'a>, LoaderError> {
    let elf = ElfImage::parse(image).map_err(|e| LoaderError::MultibootNotElf {
        source: Box::new(e),
    })?;
    let (start, end) = elf.load_extent(layout)?;
    let entry = elf
        .phys_addr(elf.entry)
        .ok_or(LoaderError::EntryOutsideImage { entry: elf.entry })?;
    Ok(Placement {
        aout: None,
        elf: Some(elf),
        start,
        end,
        entry,
    })
}

fn put_u32(buf: &mut [u8], offset: usize, v: u32) {
    if let Some(b) = buf.get_mut(offset..offset + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

fn u32_field(what: &'static str, v: u64) -> Result<u32, LoaderError> {
    u32::try_from(v).map_err(|_| LoaderError::AddressAbove4G { what, addr: v })
}

/// Loads a multiboot v1 kernel (ELF32, ELF64 or a.out kludge).
///
/// Modules (the initrd as module 0 when given, then `cfg.modules`) are placed page-aligned, one
/// after another above the kernel (what GRUB does; this satisfies header flag bit 0). Memory
/// information (`mem_lower`, `mem_upper`, the memory map) is always provided (flag bit 1).
/// Header flags 2-15 are refused.
pub fn load_multiboot<'k, M: GuestMemory + ?Sized>(
    mem: &M,
    image: impl Into<Blob<'k>>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let image = image.into();
    let layout = cfg.layout()?;
    check_backed(mem, &layout)?;
    let header = find_header(&image_prefix(image, MULTIBOOT_READ)?)?.ok_or(
        LoaderError::MultibootHeaderMissing {
            searched: image.len().min(MULTIBOOT_SEARCH),
        },
    )?;
    let unsupported = header.flags & 0xffff & !SUPPORTED_REQUIRED_FLAGS;
    if unsupported != 0 {
        return Err(LoaderError::MultibootUnsupportedFlags {
            flags: header.flags,
            unsupported,
        });
    }
    let placement = match header.aout {
        Some(fields) => place_aout(image, &header, fields, &layout)?,
        None => place_elf(image, &layout)?,
    };
    if placement.entry >= MMIO_HOLE_END {
        return Err(LoaderError::EntryAbove4G {
            entry: placement.entry,
        });
    }
    let cmdline = cmdline_bytes(cfg.cmdline, CMDLINE_AREA_SIZE - 1)?;

    let modules = cfg.module_list();
    let count = len64(&modules);
    if count > MB_MAX_MODULES {
        return Err(LoaderError::TooManyModules {
            count,
            max: MB_MAX_MODULES,
        });
    }
    let sizes: Vec<u64> = modules.iter().map(|m| m.data.len()).collect();
    let low = placement.end.max(HIGH_MEMORY_START);
    let addrs = place_low(&sizes, low, layout.low_ram_end(), layout.mem_size())?;
    let mut strings = StringTable::new(MODULE_STRINGS_ADDR, MODULE_STRINGS_SIZE);
    let mut mods = vec![0u8; modules.len() * 16];
    for ((m, (&addr, &size)), entry) in modules
        .iter()
        .zip(addrs.iter().zip(&sizes))
        .zip(mods.chunks_exact_mut(16))
    {
        let string = strings.push("Module command line", m.cmdline)?;
        put_u32(entry, 0, u32_field("module start", addr)?);
        put_u32(entry, 4, u32_field("module end", addr + size)?);
        put_u32(entry, 8, u32_field("module string", string)?);
    }

    let mut mmap = Vec::new();
    for e in layout.e820() {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.raw().to_le_bytes());
    }

    let mut mbi = [0u8; 0x78];
    put_u32(
        &mut mbi,
        0,
        MBI_FLAG_MEMORY | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME,
    );
    put_u32(&mut mbi, 4, u32_field("mem_lower", EBDA_START / 1024)?);
    put_u32(
        &mut mbi,
        8,
        u32_field(
            "mem_upper",
            (layout.low_ram_end() - HIGH_MEMORY_START) / 1024,
        )?,
    );
    put_u32(&mut mbi, 16, u32_field("command line", CMDLINE_ADDR)?);
    put_u32(&mut mbi, 20, u32_field("mods_count", count)?);
    put_u32(&mut mbi, 24, u32_field("mods_addr", MB_MODS_ADDR)?);
    put_u32(&mut mbi, 44, u32_field("mmap_length", len64(&mmap))?);
    put_u32(&mut mbi, 48, u32_field("mmap_addr", MB_MMAP_ADDR)?);
    put_u32(
        &mut mbi,
        64,
        u32_field("boot_loader_name", MB_LOADER_NAME_ADDR)?,
    );

    // Everything is validated: write.
    if let Some(elf) = &placement.elf {
        elf.load(mem, &layout)?;
    }
    if let Some(a) = placement.aout {
        write_blob_range(
            mem,
            "a.out kernel image",
            a.addr,
            image,
            a.file_start,
            a.file_len,
        )?;
        zero_bytes(
            mem,
            "a.out bss",
            a.addr + a.file_len,
            a.mem_len - a.file_len,
        )?;
    }
    for (m, &addr) in modules.iter().zip(&addrs) {
        write_blob(mem, "module", addr, m.data)?;
    }
    write_bytes(mem, "command line", CMDLINE_ADDR, &cmdline)?;
    strings.write(mem)?;
    let mut name = BOOT_LOADER_NAME.as_bytes().to_vec();
    name.push(0);
    write_bytes(mem, "boot loader name", MB_LOADER_NAME_ADDR, &name)?;
    write_bytes(mem, "multiboot memory map", MB_MMAP_ADDR, &mmap)?;
    write_bytes(mem, "multiboot module list", MB_MODS_ADDR, &mods)?;
    write_bytes(mem, "multiboot information", MBI_ADDR, &mbi)?;
    write_gdt(mem)?;

    let mut state = EntryState::new(CpuMode::Protected32, placement.entry);
    state.rax = u64::from(MULTIBOOT_BOOTLOADER_MAGIC);
    state.rbx = MBI_ADDR;
    let placed: Vec<(u64, u64)> = addrs.iter().copied().zip(sizes.iter().copied()).collect();
    Ok(LoadedKernel {
        kind: ImageKind::Multiboot,
        entry: state,
        kernel_start: placement.start,
        kernel_end: placement.end,
        initrd: cfg.initrd.and_then(|_| placed.first().copied()),
        modules: placed,
        layout,
    })
}
