//! Synthetic kernel images and guest-memory readers shared by the loader tests.
//!
//! Images are built byte by byte from the specifications (boot.rst setup header offsets, ELF,
//! Multiboot 0.6.96), never from the loader's own structs, so a layout bug in the loader shows.
#![allow(dead_code)]

use loader::MemoryLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MIB: u64 = 1 << 20;

/// Guest memory backing the layout for `size` bytes of RAM.
pub fn guest_mem(size: u64) -> GuestMemoryMmap {
    let layout = MemoryLayout::new(size).unwrap();
    GuestMemoryMmap::from_ranges(&layout.ram_ranges()).unwrap()
}

/// Fills `len` bytes at `addr` with `byte` (to prove the loader zeroes what it should).
pub fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub fn r8(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    read_bytes(mem, addr, 1)[0]
}

pub fn r16(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    u16::from_le_bytes(read_bytes(mem, addr, 2).try_into().unwrap())
}

pub fn r32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes(mem, addr, 4).try_into().unwrap())
}

pub fn r64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes(mem, addr, 8).try_into().unwrap())
}

/// NUL-terminated string at `addr` (at most 64 KiB).
pub fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
    let mut out = Vec::new();
    for i in 0..0x1_0000 {
        let b = r8(mem, addr + i);
        if b == 0 {
            return String::from_utf8(out).unwrap();
        }
        out.push(b);
    }
    panic!("no NUL within 64 KiB of {addr:#x}");
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// xorshift64*: deterministic pseudo-random bytes for the hostile-input tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

// ---------------------------------------------------------------------------------------------
// bzImage
// ---------------------------------------------------------------------------------------------

/// Setup header field offsets (absolute, in the image and in the zero page), from boot.rst.
pub mod hdr {
    pub const SETUP_SECTS: u64 = 0x1f1;
    pub const SYSSIZE: u64 = 0x1f4;
    pub const BOOT_FLAG: u64 = 0x1fe;
    pub const JUMP: u64 = 0x200;
    pub const HEADER: u64 = 0x202;
    pub const VERSION: u64 = 0x206;
    pub const KERNEL_VERSION: u64 = 0x20e;
    pub const TYPE_OF_LOADER: u64 = 0x210;
    pub const LOADFLAGS: u64 = 0x211;
    pub const CODE32_START: u64 = 0x214;
    pub const RAMDISK_IMAGE: u64 = 0x218;
    pub const RAMDISK_SIZE: u64 = 0x21c;
    pub const HEAP_END_PTR: u64 = 0x224;
    pub const CMD_LINE_PTR: u64 = 0x228;
    pub const INITRD_ADDR_MAX: u64 = 0x22c;
    pub const KERNEL_ALIGNMENT: u64 = 0x230;
    pub const RELOCATABLE_KERNEL: u64 = 0x234;
    pub const XLOADFLAGS: u64 = 0x236;
    pub const CMDLINE_SIZE: u64 = 0x238;
    pub const PREF_ADDRESS: u64 = 0x258;
    pub const INIT_SIZE: u64 = 0x260;
}

/// Zero page offsets outside the setup header.
pub mod zp {
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    pub const E820_ENTRIES: u64 = 0x1e8;
    pub const E820_TABLE: u64 = 0x2d0;
}

/// A minimal bzImage: boot sector + setup sectors with a setup header, then protected-mode code.
#[derive(Clone)]
pub struct BzImage {
    pub setup_sects: u8,
    pub version: u16,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: u8,
    pub pref_address: u64,
    pub init_size: u32,
    pub kernel_version_ptr: u16,
    /// Protected-mode kernel (byte 0x200 of it is the 64-bit entry).
    pub payload: Vec<u8>,
}

impl Default for BzImage {
    fn default() -> Self {
        BzImage {
            setup_sects: 4,
            version: 0x020f,
            loadflags: 0x01,    // LOADED_HIGH
            xloadflags: 0x0003, // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable: 0,
            pref_address: 0x20_0000,
            init_size: 0x10_0000,
            kernel_version_ptr: 0x1234,
            payload: pattern(0x1000, 7),
        }
    }
}

impl BzImage {
    /// Length of boot sector + setup (setup_sects 0 means 4).
    pub fn setup_len(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (usize::from(sects) + 1) * 512
    }

    pub fn build(&self) -> Vec<u8> {
        let setup_len = self.setup_len();
        let mut img = vec![0u8; setup_len];
        img[0x1f1] = self.setup_sects;
        put(
            &mut img,
            0x1f4,
            &((self.payload.len() as u32).div_ceil(16)).to_le_bytes(),
        );
        put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
        img[0x200] = 0xeb; // jmp short
        img[0x201] = 0x6a; // header ends at 0x26c (protocol 2.15)
        put(&mut img, 0x202, b"HdrS");
        put(&mut img, 0x206, &self.version.to_le_bytes());
        put(&mut img, 0x20e, &self.kernel_version_ptr.to_le_bytes());
        img[0x211] = self.loadflags;
        put(&mut img, 0x214, &0x10_0000u32.to_le_bytes());
        put(&mut img, 0x22c, &self.initrd_addr_max.to_le_bytes());
        put(&mut img, 0x230, &self.kernel_alignment.to_le_bytes());
        img[0x234] = self.relocatable;
        put(&mut img, 0x236, &self.xloadflags.to_le_bytes());
        put(&mut img, 0x238, &self.cmdline_size.to_le_bytes());
        put(&mut img, 0x258, &self.pref_address.to_le_bytes());
        put(&mut img, 0x260, &self.init_size.to_le_bytes());
        let mut payload = self.payload.clone();
        // The build pads the protected-mode code to whole 16-byte paragraphs.
        payload.resize(payload.len().div_ceil(16) * 16, 0);
        img.extend_from_slice(&payload);
        img
    }
}

// ---------------------------------------------------------------------------------------------
// ELF
// ---------------------------------------------------------------------------------------------

pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;

/// One program header and its file contents.
#[derive(Clone)]
pub struct Seg {
    pub p_type: u32,
    pub paddr: u64,
    pub vaddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

impl Seg {
    pub fn load(paddr: u64, data: Vec<u8>, memsz: u64) -> Self {
        Seg {
            p_type: PT_LOAD,
            paddr,
            vaddr: paddr,
            data,
            memsz,
        }
    }
    pub fn note(data: Vec<u8>) -> Self {
        let memsz = data.len() as u64;
        Seg {
            p_type: PT_NOTE,
            paddr: 0,
            vaddr: 0,
            data,
            memsz,
        }
    }
}

/// An ELF note: header, name and descriptor, each padded to 4 bytes.
pub fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_le_bytes());
    v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    v.extend_from_slice(&n_type.to_le_bytes());
    v.extend_from_slice(name);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v.extend_from_slice(desc);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

/// The PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen").
pub fn pvh_note(entry: u32) -> Vec<u8> {
    note(b"Xen\0", 18, &entry.to_le_bytes())
}

/// A minimal ELF executable.
#[derive(Clone)]
pub struct Elf {
    pub class64: bool,
    pub data_encoding: u8,
    pub e_type: u16,
    pub machine: u16,
    pub entry: u64,
    pub segs: Vec<Seg>,
}

impl Elf {
    pub fn new64(entry: u64, segs: Vec<Seg>) -> Self {
        Elf {
            class64: true,
            data_encoding: 1,
            e_type: 2,
            machine: 62,
            entry,
            segs,
        }
    }

    pub fn new32(entry: u32, segs: Vec<Seg>) -> Self {
        Elf {
            class64: false,
            data_encoding: 1,
            e_type: 2,
            machine: 3,
            entry: u64::from(entry),
            segs,
        }
    }

    /// File offset at which segment `i`'s data will be placed.
    pub fn data_offset(&self, i: usize) -> usize {
        let (ehsize, phentsize) = if self.class64 { (64, 56) } else { (52, 32) };
        let mut off = ehsize + phentsize * self.segs.len();
        for s in &self.segs[..i] {
            off = off.div_ceil(16) * 16 + s.data.len();
        }
        off.div_ceil(16) * 16
    }

    pub fn build(&self) -> Vec<u8> {
        let (ehsize, phentsize) = if self.class64 {
            (64usize, 56usize)
        } else {
            (52, 32)
        };
        let phoff = ehsize;
        let mut img = vec![0u8; ehsize + phentsize * self.segs.len()];
        put(&mut img, 0, b"\x7fELF");
        img[4] = if self.class64 { 2 } else { 1 };
        img[5] = self.data_encoding;
        img[6] = 1;
        put(&mut img, 16, &self.e_type.to_le_bytes());
        put(&mut img, 18, &self.machine.to_le_bytes());
        put(&mut img, 20, &1u32.to_le_bytes());
        if self.class64 {
            put(&mut img, 24, &self.entry.to_le_bytes());
            put(&mut img, 32, &(phoff as u64).to_le_bytes());
            put(&mut img, 52, &(ehsize as u16).to_le_bytes());
            put(&mut img, 54, &(phentsize as u16).to_le_bytes());
            put(&mut img, 56, &(self.segs.len() as u16).to_le_bytes());
        } else {
            put(&mut img, 24, &(self.entry as u32).to_le_bytes());
            put(&mut img, 28, &(phoff as u32).to_le_bytes());
            put(&mut img, 40, &(ehsize as u16).to_le_bytes());
            put(&mut img, 42, &(phentsize as u16).to_le_bytes());
            put(&mut img, 44, &(self.segs.len() as u16).to_le_bytes());
        }
        for (i, s) in self.segs.iter().enumerate() {
            let off = self.data_offset(i);
            img.resize(off, 0);
            img.extend_from_slice(&s.data);
            let ph = phoff + i * phentsize;
            let filesz = s.data.len() as u64;
            if self.class64 {
                put(&mut img, ph, &s.p_type.to_le_bytes());
                put(&mut img, ph + 4, &5u32.to_le_bytes()); // R+X
                put(&mut img, ph + 8, &(off as u64).to_le_bytes());
                put(&mut img, ph + 16, &s.vaddr.to_le_bytes());
                put(&mut img, ph + 24, &s.paddr.to_le_bytes());
                put(&mut img, ph + 32, &filesz.to_le_bytes());
                put(&mut img, ph + 40, &s.memsz.to_le_bytes());
                put(&mut img, ph + 48, &0x1000u64.to_le_bytes());
            } else {
                put(&mut img, ph, &s.p_type.to_le_bytes());
                put(&mut img, ph + 4, &(off as u32).to_le_bytes());
                put(&mut img, ph + 8, &(s.vaddr as u32).to_le_bytes());
                put(&mut img, ph + 12, &(s.paddr as u32).to_le_bytes());
                put(&mut img, ph + 16, &(filesz as u32).to_le_bytes());
                put(&mut img, ph + 20, &(s.memsz as u32).to_le_bytes());
                put(&mut img, ph + 24, &5u32.to_le_bytes());
                put(&mut img, ph + 28, &0x1000u32.to_le_bytes());
            }
        }
        img
    }
}

/// An ELF64 PVH kernel: code at 0x100000 (0x200 bytes of file data, 0x1000 of memory), entry
/// note pointing at 0x100100.
pub fn pvh_elf64() -> Elf {
    Elf::new64(
        0x10_0000,
        vec![
            Seg::note(pvh_note(0x10_0100)),
            Seg::load(0x10_0000, pattern(0x200, 3), 0x1000),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Multiboot
// ---------------------------------------------------------------------------------------------

pub const MB_MAGIC: u32 = 0x1bad_b002;

/// A multiboot header; `aout` holds header_addr, load_addr, load_end_addr, bss_end_addr,
/// entry_addr.
pub fn mb_header(flags: u32, aout: Option<[u32; 5]>) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MB_MAGIC.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(0u32.wrapping_sub(MB_MAGIC).wrapping_sub(flags)).to_le_bytes());
    if let Some(a) = aout {
        for f in a {
            v.extend_from_slice(&f.to_le_bytes());
        }
    }
    v
}

/// An ELF32 multiboot kernel: one segment at 0x100000 starting with the header, entry 0x100040,
/// 0x400 bytes of file data and 0x3000 of memory (bss).
pub fn mb_elf32(flags: u32) -> Elf {
    let mut code = mb_header(flags, None);
    code.resize(0x40, 0);
    code.extend_from_slice(&pattern(0x3c0, 9));
    Elf::new32(0x10_0040, vec![Seg::load(0x10_0000, code, 0x3000)])
}

/// An a.out-kludge multiboot image loaded at 0x100000: header at file offset 0x20,
/// loads the whole file, bss to 0x104000, entry 0x100080.
pub fn mb_aout(flags: u32) -> Vec<u8> {
    let mut img = pattern(0x20, 5);
    let fields = [0x10_0020, 0x10_0000, 0, 0x10_4000, 0x10_0080];
    img.extend_from_slice(&mb_header(flags | (1 << 16), Some(fields)));
    img.extend_from_slice(&pattern(0x1000, 11));
    img
}
