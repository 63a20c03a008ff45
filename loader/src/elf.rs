//! A small, bounds-checked ELF32/ELF64 reader: header, program headers, notes, and loading of
//! `PT_LOAD` segments at their physical addresses.
//!
//! linux-loader's ELF loader only reads ELF64 and does not say which field is wrong; PVH and
//! multiboot kernels are often ELF32, and hostile images deserve precise errors, so the loaders
//! read ELF here.

use vm_memory::GuestMemory;

use crate::layout::MemoryLayout;
use crate::mem::{
    check_segment, image_prefix, le_u16, le_u32, le_u64, read_image, slice, write_blob_range,
    zero_bytes,
};
use crate::{Blob, LoaderError};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
/// Note type of the PVH 32-bit entry point.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// ELF class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ElfClass {
    Elf32,
    Elf64,
}

/// One program header, widened to 64 bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProgramHeader {
    pub p_type: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// Largest note segment read (the PVH note is searched for in each): a kernel's notes take a few
/// hundred bytes, and an image is read from its file a header at a time, never whole.
pub(crate) const MAX_NOTE_SEGMENT: u64 = 1 << 20;

/// A parsed, validated ELF executable.
#[derive(Debug)]
pub(crate) struct ElfImage<'a> {
    image: Blob<'a>,
    pub class: ElfClass,
    pub entry: u64,
    pub phdrs: Vec<ProgramHeader>,
}

/// Whether `image` starts with the ELF magic.
pub(crate) fn has_elf_magic(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

impl<'a> ElfImage<'a> {
    /// Parses and validates the ELF header and program headers (read from the image; its
    /// segments are read only by [`ElfImage::load`]).
    pub fn parse(image: Blob<'a>) -> Result<Self, LoaderError> {
        let len = image.len();
        let head = image_prefix(image, 64)?;
        let head = &head[..];
        if !has_elf_magic(head) {
            return Err(LoaderError::NotElf);
        }
        let truncated = |what, need| LoaderError::ElfTruncated { what, need, len };
        let ident = slice(head, 0, 16).ok_or(truncated("e_ident", 16))?;
        let class = match ident[4] {
            1 => ElfClass::Elf32,
            2 => ElfClass::Elf64,
            class => return Err(LoaderError::ElfClass { class }),
        };
        if ident[5] != 1 {
            return Err(LoaderError::ElfEndian { data: ident[5] });
        }
        let (ehsize, phentsize_expected) = match class {
            ElfClass::Elf32 => (52u64, 32u16),
            ElfClass::Elf64 => (64u64, 56u16),
        };
        if len < ehsize {
            return Err(truncated("ELF header", ehsize));
        }
        // The header is in bounds, so the fixed-offset reads below cannot fail.
        let e_type = le_u16(head, 16).unwrap_or(0);
        let machine = le_u16(head, 18).unwrap_or(0);
        if e_type != ET_EXEC {
            return Err(LoaderError::ElfType { e_type });
        }
        let (expected_machine, expected_name) = match class {
            ElfClass::Elf32 => (EM_386, "i386 (3)"),
            ElfClass::Elf64 => (EM_X86_64, "x86-64 (62)"),
        };
        if machine != expected_machine {
            return Err(LoaderError::ElfMachine {
                machine,
                expected: expected_name,
            });
        }
        let (entry, phoff, phentsize, phnum) = match class {
            ElfClass::Elf32 => (
                u64::from(le_u32(head, 24).unwrap_or(0)),
                u64::from(le_u32(head, 28).unwrap_or(0)),
                le_u16(head, 42).unwrap_or(0),
                le_u16(head, 44).unwrap_or(0),
            ),
            ElfClass::Elf64 => (
                le_u64(head, 24).unwrap_or(0),
                le_u64(head, 32).unwrap_or(0),
                le_u16(head, 54).unwrap_or(0),
                le_u16(head, 56).unwrap_or(0),
            ),
        };
        if phentsize != phentsize_expected {
            return Err(LoaderError::ElfPhentsize {
                size: phentsize,
                expected: phentsize_expected,
            });
        }
        let table_end = u64::from(phnum)
            .checked_mul(u64::from(phentsize))
            .and_then(|n| n.checked_add(phoff))
            .unwrap_or(u64::MAX);
        if table_end > len {
            return Err(truncated("program header table", table_end));
        }
        // At most 65535 entries of 56 bytes (3.5 MiB), inside the image.
        let table = read_image(image, phoff, table_end - phoff)?
            .ok_or(truncated("program header table", table_end))?;
        let table = &table[..];
        let mut phdrs = Vec::with_capacity(usize::from(phnum));
        for i in 0..u64::from(phnum) {
            let base = i * u64::from(phentsize);
            let ph = match class {
                ElfClass::Elf32 => {
                    let f = |o: u64| u64::from(le_u32(table, base + o).unwrap_or(0));
                    ProgramHeader {
                        p_type: le_u32(table, base).unwrap_or(0),
                        offset: f(4),
                        vaddr: f(8),
                        paddr: f(12),
                        filesz: f(16),
                        memsz: f(20),
                    }
                }
                ElfClass::Elf64 => {
                    let f = |o: u64| le_u64(table, base + o).unwrap_or(0);
                    ProgramHeader {
                        p_type: le_u32(table, base).unwrap_or(0),
                        offset: f(8),
                        vaddr: f(16),
                        paddr: f(24),
                        filesz: f(32),
                        memsz: f(40),
                    }
                }
            };
            let bad = |what| LoaderError::ElfSegment { index: i, what };
            let has_file_data = ph.p_type == PT_LOAD || ph.p_type == PT_NOTE;
            if has_file_data && ph.offset.checked_add(ph.filesz).is_none_or(|end| end > len) {
                return Err(bad("file data lies beyond the end of the image"));
            }
            if ph.p_type == PT_LOAD {
                if ph.filesz > ph.memsz {
                    return Err(bad("p_filesz exceeds p_memsz"));
                }
                if ph.paddr.checked_add(ph.memsz).is_none() {
                    return Err(bad("p_paddr + p_memsz overflows"));
                }
            }
            phdrs.push(ph);
        }
        Ok(ElfImage {
            image,
            class,
            entry,
            phdrs,
        })
    }

    /// Loadable segments that occupy memory.
    fn load_segments(&self) -> impl Iterator<Item = &ProgramHeader> {
        self.phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.memsz > 0)
    }

    /// The PVH 32-bit entry point from a `XEN_ELFNOTE_PHYS32_ENTRY` note, if there is one.
    /// Every note is checked; a malformed note is an error.
    pub fn pvh_entry(&self) -> Result<Option<u64>, LoaderError> {
        let mut found = None;
        for ph in self.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
            if ph.filesz > MAX_NOTE_SEGMENT {
                return Err(LoaderError::ElfNote {
                    offset: ph.offset,
                    what: "note segment is larger than 1 MiB",
                });
            }
            // In bounds (checked in parse); positions below are within the segment.
            let notes = read_image(self.image, ph.offset, ph.filesz)?.unwrap_or_default();
            let notes = &notes[..];
            let end = ph.filesz;
            let mut pos = 0;
            while pos < end {
                let bad = |what| LoaderError::ElfNote {
                    offset: ph.offset + pos,
                    what,
                };
                if end - pos < 12 {
                    return Err(bad("note header runs past the end of its segment"));
                }
                let namesz = u64::from(le_u32(notes, pos).unwrap_or(0));
                let descsz = le_u32(notes, pos + 4).unwrap_or(0);
                let n_type = le_u32(notes, pos + 8).unwrap_or(0);
                let name_off = pos + 12;
                let desc_off = name_off + ((namesz + 3) & !3);
                let next = desc_off + ((u64::from(descsz) + 3) & !3);
                if next > end {
                    return Err(bad(
                        "note name or descriptor runs past the end of its segment",
                    ));
                }
                let name = slice(notes, name_off, namesz).unwrap_or(&[]);
                if found.is_none() && n_type == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
                    let value = match descsz {
                        4 => le_u32(notes, desc_off).map(u64::from),
                        8 => le_u64(notes, desc_off),
                        size => return Err(LoaderError::PvhNoteDescSize { size }),
                    };
                    found = value;
                }
                pos = next;
            }
        }
        Ok(found)
    }

    /// Whether `addr` is inside some loadable segment's physical range.
    pub fn in_phys_segment(&self, addr: u64) -> bool {
        self.load_segments()
            .any(|p| addr >= p.paddr && addr - p.paddr < p.memsz)
    }

    /// Converts the ELF entry (or any address in the image) to the physical address it is loaded
    /// at: an address inside a segment's physical range is taken as is, one inside a segment's
    /// virtual range is translated.
    pub fn phys_addr(&self, addr: u64) -> Option<u64> {
        let inside = |start: u64, p: &ProgramHeader| addr >= start && addr - start < p.memsz;
        if self.load_segments().any(|p| inside(p.paddr, p)) {
            return Some(addr);
        }
        self.load_segments()
            .find(|p| inside(p.vaddr, p))
            .map(|p| p.paddr + (addr - p.vaddr))
    }

    /// Checks every loadable segment's placement; returns (lowest start, highest end).
    pub fn load_extent(&self, layout: &MemoryLayout) -> Result<(u64, u64), LoaderError> {
        let mut lo = u64::MAX;
        let mut hi = 0;
        for p in self.load_segments() {
            let end = p.paddr + p.memsz; // overflow checked in parse
            check_segment(layout, p.paddr, end)?;
            lo = lo.min(p.paddr);
            hi = hi.max(end);
        }
        if hi == 0 {
            return Err(LoaderError::ElfNoLoadSegments);
        }
        Ok((lo, hi))
    }

    /// Checks every loadable segment's placement, then copies the segments to guest memory at
    /// their physical addresses and zeroes their bss. Returns (lowest start, highest end).
    pub fn load<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        layout: &MemoryLayout,
    ) -> Result<(u64, u64), LoaderError> {
        let extent = self.load_extent(layout)?;
        for p in self.load_segments() {
            // In bounds (checked in parse).
            write_blob_range(mem, "ELF segment", p.paddr, self.image, p.offset, p.filesz)?;
            zero_bytes(mem, "ELF bss", p.paddr + p.filesz, p.memsz - p.filesz)?;
        }
        Ok(extent)
    }
}
