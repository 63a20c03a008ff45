//! PVH boot (xenbits docs/misc/pvh.html): an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note is
//! entered in 32-bit protected mode, paging off, with `ebx` pointing at `hvm_start_info`.

use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{ByteValued, GuestMemory};

use crate::elf::ElfImage;
use crate::entry::{write_gdt, CpuMode, EntryState};
use crate::layout::{
    CMDLINE_ADDR, CMDLINE_AREA_SIZE, MMIO_HOLE_END, MODULE_STRINGS_ADDR, MODULE_STRINGS_SIZE,
    PVH_MEMMAP_ADDR, PVH_MEMMAP_END, PVH_MODLIST_ADDR, PVH_MODLIST_END, PVH_START_INFO_ADDR,
};
use crate::mem::{
    check_backed, cmdline_bytes, len64, place_high, write_blob, write_bytes, StringTable,
};
use crate::{Blob, BootConfig, ImageKind, LoadedKernel, LoaderError};

/// Version of `hvm_start_info` written (1: has the memory map fields).
pub const HVM_START_INFO_VERSION: u32 = 1;

/// Most modules the module list area holds.
pub const PVH_MAX_MODULES: u64 = (PVH_MODLIST_END - PVH_MODLIST_ADDR) / 32;

// The memory map area holds more entries than MemoryLayout ever builds (4).
const _: () = assert!((PVH_MEMMAP_END - PVH_MEMMAP_ADDR) / 24 >= 4);

/// Loads an ELF kernel (ELF32 or ELF64) through its PVH entry note.
///
/// The initrd, when given, is module 0; `cfg.modules` follow. Modules are placed page-aligned
/// as high as possible in RAM below 4 GiB. `cfg.rsdp_addr` becomes `rsdp_paddr`.
pub fn load_pvh<'k, M: GuestMemory + ?Sized>(
    mem: &M,
    image: impl Into<Blob<'k>>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let image = image.into();
    let layout = cfg.layout()?;
    check_backed(mem, &layout)?;
    let elf = ElfImage::parse(image)?;
    let entry = elf.pvh_entry()?.ok_or(LoaderError::PvhNoteMissing)?;
    if entry >= MMIO_HOLE_END {
        return Err(LoaderError::EntryAbove4G { entry });
    }
    if !elf.in_phys_segment(entry) {
        return Err(LoaderError::EntryOutsideImage { entry });
    }
    let cmdline = cmdline_bytes(cfg.cmdline, CMDLINE_AREA_SIZE - 1)?;
    let (kernel_start, kernel_end) = elf.load_extent(&layout)?;

    let modules = cfg.module_list();
    let count = len64(&modules);
    if count > PVH_MAX_MODULES {
        return Err(LoaderError::TooManyModules {
            count,
            max: PVH_MAX_MODULES,
        });
    }
    let sizes: Vec<u64> = modules.iter().map(|m| m.data.len()).collect();
    let addrs = place_high(&sizes, kernel_end, layout.low_ram_end(), layout.mem_size())?;
    let mut strings = StringTable::new(MODULE_STRINGS_ADDR, MODULE_STRINGS_SIZE);
    let mut modlist = Vec::with_capacity(modules.len());
    for (m, &paddr) in modules.iter().zip(&addrs) {
        let cmdline_paddr = if m.cmdline.is_empty() {
            0
        } else {
            strings.push("Module command line", m.cmdline)?
        };
        modlist.push(hvm_modlist_entry {
            paddr,
            size: m.data.len(),
            cmdline_paddr,
            reserved: 0,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.raw(),
            reserved: 0,
        })
        .collect();

    // Everything is validated: write.
    elf.load(mem, &layout)?;
    for (m, &addr) in modules.iter().zip(&addrs) {
        write_blob(mem, "module", addr, m.data)?;
    }
    write_bytes(mem, "command line", CMDLINE_ADDR, &cmdline)?;
    strings.write(mem)?;
    let modlist_bytes: Vec<u8> = modlist.iter().flat_map(|m| m.as_slice().to_vec()).collect();
    write_bytes(mem, "PVH module list", PVH_MODLIST_ADDR, &modlist_bytes)?;
    let memmap_bytes: Vec<u8> = memmap.iter().flat_map(|m| m.as_slice().to_vec()).collect();
    write_bytes(mem, "PVH memory map", PVH_MEMMAP_ADDR, &memmap_bytes)?;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: HVM_START_INFO_VERSION,
        flags: 0,
        nr_modules: u32::try_from(count).unwrap_or(0),
        modlist_paddr: if count == 0 { 0 } else { PVH_MODLIST_ADDR },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: cfg.rsdp_addr.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(0),
        reserved: 0,
    };
    write_bytes(mem, "hvm_start_info", PVH_START_INFO_ADDR, info.as_slice())?;
    write_gdt(mem)?;

    let mut state = EntryState::new(CpuMode::Protected32, entry);
    state.rbx = PVH_START_INFO_ADDR;
    let placed: Vec<(u64, u64)> = addrs.iter().copied().zip(sizes.iter().copied()).collect();
    Ok(LoadedKernel {
        kind: ImageKind::ElfPvh,
        entry: state,
        kernel_start,
        kernel_end,
        initrd: cfg.initrd.and_then(|_| placed.first().copied()),
        modules: placed,
        layout,
    })
}
