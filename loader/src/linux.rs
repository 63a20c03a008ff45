//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst): bzImage and ELF vmlinux with
//! the 64-bit entry, zero page, command line, initramfs and e820 map.

use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use crate::elf::{ElfClass, ElfImage};
use crate::entry::{write_gdt, write_identity_page_tables, CpuMode, EntryState};
use crate::layout::{
    MemoryLayout, CMDLINE_ADDR, CMDLINE_AREA_SIZE, HIGH_MEMORY_START, KERNEL_LOAD_ADDR,
    MMIO_HOLE_END, PD_COUNT, ZERO_PAGE_ADDR,
};
use crate::mem::{
    align_up, check_backed, cmdline_bytes, image_prefix, le_u16, len64, place_high, slice,
    write_blob, write_blob_range, write_bytes,
};
use crate::{Blob, BootConfig, ImageKind, LoadedKernel, LoaderError};

/// Offset of the setup header in the image and in `boot_params`.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the "HdrS" magic.
const HDRS_OFFSET: u64 = 0x202;
/// "HdrS", little-endian.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Oldest boot protocol we accept (2.06: `cmdline_size`, relocatable kernels).
const MIN_VERSION: u16 = 0x0206;
/// End of the setup header fields a 2.06 header must have (through `cmdline_size`).
const HEADER_END_2_06: u64 = 0x23c;
/// The 64-bit entry point is this far into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// The real-mode setup must fit in 32 KiB (arch/x86/boot/setup.ld), i.e. 63 sectors after
/// the boot sector.
const MAX_SETUP_SECTS: u8 = 63;
/// `type_of_loader` for a loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `heap_end_ptr`: end of the setup heap relative to the real-mode code, minus 0x200.
const HEAP_END_PTR: u16 = 0xfe00;
/// `initrd_addr_max` used for an ELF vmlinux (no header to ask).
const VMLINUX_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// x86 COMMAND_LINE_SIZE: the limit for an ELF vmlinux, including the NUL.
const VMLINUX_CMDLINE_SIZE: u64 = 2048;

/// Bytes of a bzImage read to parse its setup header (which ends by 0x202 + 255).
pub(crate) const SETUP_HEADER_READ: u64 = 0x400;

/// Whether `image` (its start, at least) carries the bzImage "HdrS" magic at 0x202.
pub(crate) fn has_bzimage_magic(image: &[u8]) -> bool {
    slice(image, HDRS_OFFSET, 4).is_some_and(|b| b == HDRS_MAGIC.to_le_bytes())
}

/// A setup header read from the image, with the facts derived from it.
struct BzImage {
    hdr: setup_header,
    /// Offset of the protected-mode kernel in the file.
    setup_size: u64,
    /// Length of the protected-mode kernel.
    pm_size: u64,
}

/// Parses the setup header from `image`'s first [`SETUP_HEADER_READ`] bytes.
fn parse_bzimage(image: Blob<'_>) -> Result<BzImage, LoaderError> {
    let len = image.len();
    let head = image_prefix(image, SETUP_HEADER_READ)?;
    let image = &head[..];
    let truncated = |what, need| LoaderError::BzImageTruncated { what, need, len };
    if !has_bzimage_magic(image) {
        return Err(LoaderError::NotLinux { len });
    }
    let version = le_u16(image, 0x206).ok_or(truncated("setup header version", 0x208))?;
    if version < MIN_VERSION {
        return Err(LoaderError::BzImageVersion { version });
    }
    // The header ends at 0x202 + the byte at 0x201 (the jump over the header).
    let jump = slice(image, 0x201, 1).map_or(0, |b| u64::from(b[0]));
    let header_end = HDRS_OFFSET + jump;
    if header_end < HEADER_END_2_06 {
        return Err(LoaderError::BzImageHeaderShort { end: header_end });
    }
    if header_end > len {
        return Err(truncated("setup header", header_end));
    }
    let mut hdr = setup_header::default();
    let hdr_bytes = hdr.as_mut_slice();
    let copy_len = (header_end - SETUP_HEADER_OFFSET).min(len64(hdr_bytes));
    let src =
        slice(image, SETUP_HEADER_OFFSET, copy_len).ok_or(truncated("setup header", header_end))?;
    hdr_bytes[..src.len()].copy_from_slice(src);

    let sects = match hdr.setup_sects {
        0 => 4,
        s if s > MAX_SETUP_SECTS => return Err(LoaderError::BzImageSetupSects { sects: s }),
        s => s,
    };
    let setup_size = (u64::from(sects) + 1) * 512;
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(LoaderError::BzImageNotLoadedHigh {
            loadflags: hdr.loadflags,
        });
    }
    if hdr.version >= 0x020c && hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::BzImageNo64BitEntry {
            xloadflags: hdr.xloadflags,
        });
    }
    let min_len = setup_size + ENTRY_64_OFFSET + 1;
    if len < min_len {
        return Err(truncated(
            "protected-mode kernel with its 64-bit entry",
            min_len,
        ));
    }
    // syssize counts 16-byte paragraphs of protected-mode code (the build pads to it).
    let sys_len = setup_size + u64::from(hdr.syssize) * 16;
    if len < sys_len {
        return Err(truncated("protected-mode kernel (syssize)", sys_len));
    }
    Ok(BzImage {
        hdr,
        setup_size,
        pm_size: len - setup_size,
    })
}

/// Loads a bzImage: protected-mode kernel at 1 MiB (or `pref_address`), zero page, command line,
/// initramfs, page tables and GDT; entry at the 64-bit entry point.
pub(crate) fn load_bzimage<M: GuestMemory + ?Sized>(
    mem: &M,
    image: Blob<'_>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let layout = cfg.layout()?;
    check_backed(mem, &layout)?;
    if !cfg.modules.is_empty() {
        return Err(LoaderError::LinuxModules {
            count: len64(cfg.modules),
        });
    }
    let bz = parse_bzimage(image)?;
    let mut hdr = bz.hdr;
    let ram_end = layout.low_ram_end();

    // Memory the kernel needs: its image, and init_size from where it will run (2.10+).
    let (init_size, pref_address, kernel_alignment) = if hdr.version >= 0x020a {
        (
            u64::from(hdr.init_size),
            hdr.pref_address,
            u64::from(hdr.kernel_alignment),
        )
    } else {
        (0, 0, 0)
    };
    let relocatable = hdr.relocatable_kernel != 0 && kernel_alignment.is_power_of_two();
    // Where the kernel decompresses and runs when loaded at `load` (arch/x86/boot/compressed/
    // head_64.S): a relocatable kernel at `load` rounded up to kernel_alignment, and never
    // below LOAD_PHYSICAL_ADDR (= pref_address); a fixed one at LOAD_PHYSICAL_ADDR.
    let fits = |load: u64| {
        let aligned = if relocatable {
            align_up(load, kernel_alignment).unwrap_or(u64::MAX)
        } else {
            load
        };
        let run = if pref_address < MMIO_HOLE_END {
            aligned.max(pref_address)
        } else {
            aligned
        };
        let end = load
            .saturating_add(bz.pm_size)
            .max(run.saturating_add(init_size));
        (end <= ram_end, end)
    };
    // A relocatable kernel can run where it is loaded: load it at pref_address when that is
    // aligned and fits, so the decompressor does not copy itself; otherwise at 1 MiB.
    let use_pref = relocatable
        && pref_address >= HIGH_MEMORY_START
        && pref_address % kernel_alignment == 0
        && fits(pref_address).0;
    let load_addr = if use_pref {
        pref_address
    } else {
        KERNEL_LOAD_ADDR
    };
    let (ok, kernel_end) = fits(load_addr);
    if !ok {
        return Err(LoaderError::KernelTooLarge {
            start: load_addr,
            end: kernel_end,
            ram_end,
        });
    }

    // Protocol 2.06+ (checked in parse_bzimage) has cmdline_size and initrd_addr_max.
    let max_cmdline = u64::from(hdr.cmdline_size).min(CMDLINE_AREA_SIZE - 1);
    let cmdline = cmdline_bytes(cfg.cmdline, max_cmdline)?;
    let initrd = place_initrd(cfg, &layout, kernel_end, u64::from(hdr.initrd_addr_max))?;

    // Everything is validated: write.
    // setup_size + pm_size is the image's length (parse_bzimage).
    write_blob_range(
        mem,
        "protected-mode kernel",
        load_addr,
        image,
        bz.setup_size,
        bz.pm_size,
    )?;
    hdr.code32_start = to_u32("code32_start", load_addr)?;
    write_common(mem, &layout, cfg, hdr, &cmdline, initrd)?;

    let mut entry = EntryState::new(CpuMode::Long64, load_addr + ENTRY_64_OFFSET);
    entry.rsi = ZERO_PAGE_ADDR;
    Ok(LoadedKernel {
        kind: ImageKind::BzImage,
        entry,
        kernel_start: load_addr,
        kernel_end,
        initrd,
        modules: initrd.into_iter().collect(),
        layout,
    })
}

/// Loads an ELF64 vmlinux at its physical addresses and enters it at the ELF entry through the
/// 64-bit boot protocol (zero page with a synthesised setup header).
pub(crate) fn load_vmlinux<M: GuestMemory + ?Sized>(
    mem: &M,
    image: Blob<'_>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let layout = cfg.layout()?;
    check_backed(mem, &layout)?;
    if !cfg.modules.is_empty() {
        return Err(LoaderError::LinuxModules {
            count: len64(cfg.modules),
        });
    }
    let elf = ElfImage::parse(image)?;
    if elf.class != ElfClass::Elf64 {
        return Err(LoaderError::Elf32WithoutPvh);
    }
    let rip = elf
        .phys_addr(elf.entry)
        .ok_or(LoaderError::EntryOutsideImage { entry: elf.entry })?;
    let cmdline = cmdline_bytes(cfg.cmdline, VMLINUX_CMDLINE_SIZE - 1)?;
    // Validate placement of everything before the first write.
    let (start, end) = elf.load_extent(&layout)?;
    let limit = PD_COUNT << 30;
    if end > limit || rip >= limit {
        return Err(LoaderError::NotIdentityMapped {
            start: start.min(rip),
            end: end.max(rip),
            limit,
        });
    }
    let initrd = place_initrd(cfg, &layout, end, VMLINUX_INITRD_ADDR_MAX)?;
    elf.load(mem, &layout)?;

    let mut hdr = setup_header {
        boot_flag: 0xaa55,
        header: HDRS_MAGIC,
        version: 0x020f,
        loadflags: LOADED_HIGH,
        kernel_alignment: 0x0100_0000,
        initrd_addr_max: to_u32("initrd_addr_max", VMLINUX_INITRD_ADDR_MAX)?,
        cmdline_size: to_u32("cmdline_size", VMLINUX_CMDLINE_SIZE - 1)?,
        ..Default::default()
    };
    hdr.code32_start = to_u32("code32_start", start)?;
    write_common(mem, &layout, cfg, hdr, &cmdline, initrd)?;

    let mut entry = EntryState::new(CpuMode::Long64, rip);
    entry.rsi = ZERO_PAGE_ADDR;
    Ok(LoadedKernel {
        kind: ImageKind::ElfVmlinux,
        entry,
        kernel_start: start,
        kernel_end: end,
        initrd,
        modules: initrd.into_iter().collect(),
        layout,
    })
}

fn to_u32(what: &'static str, v: u64) -> Result<u32, LoaderError> {
    u32::try_from(v).map_err(|_| LoaderError::AddressAbove4G { what, addr: v })
}

/// Places the initramfs page-aligned as high as possible below min(`initrd_addr_max` + 1, end
/// of RAM below 4 GiB), above `kernel_end`.
fn place_initrd(
    cfg: &BootConfig<'_>,
    layout: &MemoryLayout,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Result<Option<(u64, u64)>, LoaderError> {
    let Some(initrd) = cfg.initrd else {
        return Ok(None);
    };
    let size = initrd.len();
    let high = initrd_addr_max.saturating_add(1).min(layout.low_ram_end());
    let addr = place_high(&[size], kernel_end, high, layout.mem_size())?;
    Ok(addr.first().map(|&a| (a, size)))
}

/// Writes the initrd, command line, zero page, GDT and page tables.
fn write_common<M: GuestMemory + ?Sized>(
    mem: &M,
    layout: &MemoryLayout,
    cfg: &BootConfig<'_>,
    mut hdr: setup_header,
    cmdline: &[u8],
    initrd: Option<(u64, u64)>,
) -> Result<(), LoaderError> {
    if let (Some(data), Some((addr, _))) = (cfg.initrd, initrd) {
        write_blob(mem, "initrd", addr, data)?;
    }
    write_bytes(mem, "command line", CMDLINE_ADDR, cmdline)?;

    // Fields the loader owns are set here whatever the image carried (a stale setup_data
    // pointer would send the kernel walking garbage).
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.ext_loader_ver = 0;
    hdr.ext_loader_type = 0;
    hdr.setup_data = 0;
    hdr.hardware_subarch = 0;
    hdr.hardware_subarch_data = 0;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END_PTR;
    hdr.cmd_line_ptr = to_u32("command line", CMDLINE_ADDR)?;
    let (ramdisk_image, ramdisk_size) = initrd.unwrap_or((0, 0));
    hdr.ramdisk_image = to_u32("initrd", ramdisk_image)?;
    hdr.ramdisk_size = to_u32("initrd size", ramdisk_size)?;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, e) in table.iter_mut().zip(layout.e820()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.raw(),
        };
    }
    params.e820_table = table;
    // At most 4 entries (MemoryLayout never builds more), far below E820_MAX_ENTRIES_ZEROPAGE.
    params.e820_entries =
        u8::try_from(layout.e820().len().min(E820_MAX_ENTRIES_ZEROPAGE)).unwrap_or(u8::MAX);
    params.acpi_rsdp_addr = cfg.rsdp_addr.unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| LoaderError::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_ADDR,
            len: len64(params.as_slice()),
            source,
        })?;
    write_gdt(mem)?;
    write_identity_page_tables(mem)
}
