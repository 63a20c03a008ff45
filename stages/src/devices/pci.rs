//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC) over a fixed-size registry of configuration
//! spaces, plus the two functions bhyve always has on bus 0: the host bridge (0:0.0,
//! `pci_hostbridge.c`) and the LPC/ISA bridge (0:31.0, `pci_lpc.c`).
//!
//! # Ports
//!
//! | port | offset | access |
//! |---|---|---|
//! | 0xCF8 | 0 | CONFIG_ADDRESS, 4-byte only: 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2 register; bits 30:24 and 1:0 read 0 |
//! | 0xCFC–0xCFF | 4–7 | CONFIG_DATA: 1-, 2- or 4-byte accesses, naturally aligned within the dword, reach register (CONFIG_ADDRESS & 0xFC) + (port & 3) |
//!
//! Other accesses to 0xCF8–0xCFB (byte or word) are not the address register: they read all-ones
//! and are dropped, so 0xCF9 (the reset control register) belongs to whoever claims it first on
//! the bus; [`PciConfigIo::address_read`] / [`PciConfigIo::data_read`] (and the writes) serve
//! buses that map the two ports as separate ranges. A data access with the enable bit clear, of an
//! odd width or misaligned, or to a function that is not registered, reads all-ones and is dropped.
//! [`PciConfigIo::decode`] tells the runner which function a data access addresses, so it can
//! forward functions it serves elsewhere (slow-path device models) instead of answering all-ones.
//!
//! # Configuration header ([`PciHeader`])
//!
//! A 256-byte type-0 header with a per-byte writable mask: vendor, device, revision, class,
//! header type, BIST, subsystem IDs, capability pointer and interrupt pin are read-only; command
//! (I/O, memory, bus master, parity, SERR, INTx disable), cache line size, latency timer and
//! interrupt line are writable; status is read-only (its write-1-to-clear error bits are never set
//! here). Neither bridge implements a BAR, expansion ROM or capability: those registers read 0 and
//! ignore writes, which is how a function without them answers BAR sizing.

use super::{fill_le, fill_ones, le_value, lo8};

/// CONFIG_ADDRESS port.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// CONFIG_DATA port.
pub const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;
/// Length of the whole mechanism #1 window (0xCF8–0xCFF).
pub const PCI_CONFIG_PORT_LEN: u16 = 8;
/// CONFIG_ADDRESS enable bit.
pub const CONFIG_ENABLE: u32 = 1 << 31;
/// Size of a conventional configuration space.
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;

/// Host bridge vendor ID (bhyve's `pci_hostbridge.c`, NetApp).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1275;
/// Host bridge device ID (bhyve's `pci_hostbridge.c`).
pub const HOST_BRIDGE_DEVICE: u16 = 0x1275;
/// LPC bridge vendor ID (Intel; bhyve's `LPC_VENDOR`).
pub const LPC_VENDOR: u16 = 0x8086;
/// LPC bridge device ID (82371SB PIIX3 ISA bridge; bhyve's `LPC_DEV`).
pub const LPC_DEVICE: u16 = 0x7000;
/// First PIRQ route control register of the LPC bridge (PIRQA–D at 0x60–0x63).
pub const LPC_PIRQ_A_D: u8 = 0x60;
/// Second PIRQ route control block (PIRQE–H at 0x68–0x6B).
pub const LPC_PIRQ_E_H: u8 = 0x68;
/// Reset value of a PIRQ route register: routing disabled.
pub const PIRQ_DISABLED: u8 = 0x80;

/// Header offsets used here.
pub mod reg {
    /// Vendor ID (16).
    pub const VENDOR: u8 = 0x00;
    /// Device ID (16).
    pub const DEVICE: u8 = 0x02;
    /// Command (16).
    pub const COMMAND: u8 = 0x04;
    /// Status (16).
    pub const STATUS: u8 = 0x06;
    /// Revision ID (8).
    pub const REVISION: u8 = 0x08;
    /// Programming interface (8).
    pub const PROG_IF: u8 = 0x09;
    /// Subclass (8).
    pub const SUBCLASS: u8 = 0x0A;
    /// Class (8).
    pub const CLASS: u8 = 0x0B;
    /// Cache line size (8).
    pub const CACHE_LINE: u8 = 0x0C;
    /// Latency timer (8).
    pub const LATENCY: u8 = 0x0D;
    /// Header type (8).
    pub const HEADER_TYPE: u8 = 0x0E;
    /// First BAR (32).
    pub const BAR0: u8 = 0x10;
    /// Interrupt line (8).
    pub const INTERRUPT_LINE: u8 = 0x3C;
    /// Interrupt pin (8).
    pub const INTERRUPT_PIN: u8 = 0x3D;
}

/// Writable bits of the command register: I/O, memory, bus master, parity error response, SERR,
/// INTx disable.
pub const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;

/// A bus/device/function address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(u16);

impl Bdf {
    /// `bus:device.function`; `None` if device > 31 or function > 7.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device > 31 || function > 7 {
            return None;
        }
        Some(Bdf((u16::from(bus) << 8)
            | (u16::from(device) << 3)
            | u16::from(function)))
    }

    /// The BDF encoded in bits 23:8 of a CONFIG_ADDRESS value.
    pub fn from_config_address(address: u32) -> Bdf {
        let [_, lo, hi, _] = address.to_le_bytes();
        Bdf(u16::from_le_bytes([lo, hi]))
    }

    /// Bus number.
    pub fn bus(self) -> u8 {
        self.0.to_be_bytes()[0]
    }

    /// Device number (0–31).
    pub fn device(self) -> u8 {
        lo8(u64::from(self.0 >> 3)) & 0x1f
    }

    /// Function number (0–7).
    pub fn function(self) -> u8 {
        lo8(u64::from(self.0)) & 0x7
    }

    /// The 16-bit routing ID (bus << 8 | device << 3 | function).
    pub fn raw(self) -> u16 {
        self.0
    }
}

/// The host bridge's address, 0:0.0.
pub const HOST_BRIDGE_BDF: Bdf = Bdf(0);
/// The LPC bridge's address, 0:31.0 (where bhyve users put `-s 31,lpc`).
pub const LPC_BDF: Bdf = Bdf(31 << 3);

/// One function's (or a group of functions') configuration space.
///
/// `reg` is the byte offset of the access and `data.len()` its width (1, 2 or 4, naturally
/// aligned, as mechanism #1 guarantees; other callers may pass anything and must get no panic).
/// Reads must fill all of `data`.
pub trait PciConfigSpace {
    /// Read `data.len()` bytes at `reg` of function `bdf`.
    fn config_read(&mut self, bdf: Bdf, reg: u16, data: &mut [u8]);
    /// Write `data` at `reg` of function `bdf`.
    fn config_write(&mut self, bdf: Bdf, reg: u16, data: &[u8]);
}

impl<T: PciConfigSpace + ?Sized> PciConfigSpace for &mut T {
    fn config_read(&mut self, bdf: Bdf, reg: u16, data: &mut [u8]) {
        (**self).config_read(bdf, reg, data);
    }
    fn config_write(&mut self, bdf: Bdf, reg: u16, data: &[u8]) {
        (**self).config_write(bdf, reg, data);
    }
}

#[cfg(feature = "std")]
impl<T: PciConfigSpace + ?Sized> PciConfigSpace for std::boxed::Box<T> {
    fn config_read(&mut self, bdf: Bdf, reg: u16, data: &mut [u8]) {
        (**self).config_read(bdf, reg, data);
    }
    fn config_write(&mut self, bdf: Bdf, reg: u16, data: &[u8]) {
        (**self).config_write(bdf, reg, data);
    }
}

/// Why [`PciConfigIo::register`] refused a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciRegisterError {
    /// A function is already registered at this address.
    Duplicate(Bdf),
    /// The registry has no free slot.
    Full,
}

impl core::fmt::Display for PciRegisterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PciRegisterError::Duplicate(b) => {
                write!(
                    f,
                    "PCI function {:02x}:{:02x}.{} already registered",
                    b.bus(),
                    b.device(),
                    b.function()
                )
            }
            PciRegisterError::Full => write!(f, "PCI configuration registry full"),
        }
    }
}

impl core::error::Error for PciRegisterError {}

/// Configuration mechanism #1 dispatching to up to `N` registered functions of type `D`.
///
/// `D` is typically an enum of the fast-path functions ([`BuiltinPciFunction`]), or
/// `Box<dyn PciConfigSpace>` with `std`.
#[derive(Debug)]
pub struct PciConfigIo<D, const N: usize> {
    address: u32,
    functions: heapless::Vec<(Bdf, D), N>,
}

impl<D: PciConfigSpace, const N: usize> Default for PciConfigIo<D, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: PciConfigSpace, const N: usize> PciConfigIo<D, N> {
    /// An empty registry, CONFIG_ADDRESS 0.
    pub fn new() -> Self {
        PciConfigIo {
            address: 0,
            functions: heapless::Vec::new(),
        }
    }

    /// Register `dev` at `bdf`.
    pub fn register(&mut self, bdf: Bdf, dev: D) -> Result<(), PciRegisterError> {
        if self.functions.iter().any(|(b, _)| *b == bdf) {
            return Err(PciRegisterError::Duplicate(bdf));
        }
        self.functions
            .push((bdf, dev))
            .map_err(|_| PciRegisterError::Full)
    }

    /// The function registered at `bdf`.
    pub fn function_mut(&mut self, bdf: Bdf) -> Option<&mut D> {
        self.functions
            .iter_mut()
            .find(|(b, _)| *b == bdf)
            .map(|(_, d)| d)
    }

    /// Whether a function is registered at `bdf`.
    pub fn is_registered(&self, bdf: Bdf) -> bool {
        self.functions.iter().any(|(b, _)| *b == bdf)
    }

    /// The current CONFIG_ADDRESS value.
    pub fn address(&self) -> u32 {
        self.address
    }

    /// The (function, register) a CONFIG_DATA access at data-port offset `data_offset` (0–3) of
    /// width `len` addresses, or `None` if it would read all-ones whoever owned the function
    /// (enable bit clear, odd width, misaligned).
    pub fn decode(&self, data_offset: u64, len: usize) -> Option<(Bdf, u16)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let width = u64::try_from(len).ok()?;
        if !matches!(width, 1 | 2 | 4) || data_offset >= 4 || data_offset % width != 0 {
            return None;
        }
        let reg = u16::from(lo8(u64::from(self.address) & 0xfc)) + u16::from(lo8(data_offset));
        Some((Bdf::from_config_address(self.address), reg))
    }

    /// Read from port `0xCF8 + offset` (the whole 8-port window).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 => self.address_read(data),
            4..=7 => self.data_read(offset - 4, data),
            _ => fill_ones(data),
        }
    }

    /// Write to port `0xCF8 + offset` (the whole 8-port window).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => self.address_write(data),
            4..=7 => self.data_write(offset - 4, data),
            _ => {}
        }
    }

    /// Read CONFIG_ADDRESS (4-byte reads only; others read all-ones).
    pub fn address_read(&mut self, data: &mut [u8]) {
        if data.len() == 4 {
            fill_le(data, u64::from(self.address));
        } else {
            fill_ones(data);
        }
    }

    /// Write CONFIG_ADDRESS (4-byte writes only; others are dropped).
    pub fn address_write(&mut self, data: &[u8]) {
        if data.len() != 4 {
            return;
        }
        if let Some(v) = le_value(data) {
            let b = v.to_le_bytes();
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            self.address = v & (CONFIG_ENABLE | 0x00ff_fffc);
        }
    }

    /// Read CONFIG_DATA at data-port offset `offset` (0–3).
    pub fn data_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((bdf, reg)) = self.decode(offset, data.len()) else {
            fill_ones(data);
            return;
        };
        match self.function_mut(bdf) {
            Some(dev) => dev.config_read(bdf, reg, data),
            None => fill_ones(data),
        }
    }

    /// Write CONFIG_DATA at data-port offset `offset` (0–3).
    pub fn data_write(&mut self, offset: u64, data: &[u8]) {
        let Some((bdf, reg)) = self.decode(offset, data.len()) else {
            return;
        };
        if let Some(dev) = self.function_mut(bdf) {
            dev.config_write(bdf, reg, data);
        }
    }
}

/// Identification of a type-0 function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdent {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision ID.
    pub revision: u8,
    /// Header type (bit 7 = multi-function).
    pub header_type: u8,
}

/// A 256-byte configuration header with per-byte write masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHeader {
    bytes: [u8; PCI_CONFIG_SPACE_SIZE],
    writable: [u8; PCI_CONFIG_SPACE_SIZE],
}

impl PciHeader {
    /// A header carrying `id`, with the standard writable registers (command, cache line size,
    /// latency timer, interrupt line) and everything else read-only.
    pub fn new(id: PciIdent) -> Self {
        let mut h = PciHeader {
            bytes: [0; PCI_CONFIG_SPACE_SIZE],
            writable: [0; PCI_CONFIG_SPACE_SIZE],
        };
        h.set16(reg::VENDOR, id.vendor);
        h.set16(reg::DEVICE, id.device);
        h.set8(reg::REVISION, id.revision);
        h.set8(reg::PROG_IF, id.prog_if);
        h.set8(reg::SUBCLASS, id.subclass);
        h.set8(reg::CLASS, id.class);
        h.set8(reg::HEADER_TYPE, id.header_type);
        h.set_writable(reg::COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        h.set_writable(reg::CACHE_LINE, &[0xff, 0xff]);
        h.set_writable(reg::INTERRUPT_LINE, &[0xff]);
        h
    }

    /// Set a byte (device-side; ignores the write mask).
    pub fn set8(&mut self, offset: u8, v: u8) {
        if let Some(b) = self.bytes.get_mut(usize::from(offset)) {
            *b = v;
        }
    }

    /// Set a 16-bit value (device-side; ignores the write mask).
    pub fn set16(&mut self, offset: u8, v: u16) {
        let [lo, hi] = v.to_le_bytes();
        self.set8(offset, lo);
        self.set8(offset.wrapping_add(1), hi);
    }

    /// Mark the bits in `mask` (bytes from `offset` on) guest-writable.
    pub fn set_writable(&mut self, offset: u8, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.writable.get_mut(usize::from(offset) + i) {
                *w = *m;
            }
        }
    }

    /// A byte of the header.
    pub fn get8(&self, offset: u8) -> u8 {
        self.bytes.get(usize::from(offset)).copied().unwrap_or(0xff)
    }

    /// A 16-bit value of the header.
    pub fn get16(&self, offset: u8) -> u16 {
        u16::from_le_bytes([self.get8(offset), self.get8(offset.wrapping_add(1))])
    }

    /// Guest read: all-ones beyond the 256-byte space.
    pub fn read(&self, reg: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::from(reg)
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Guest write: only writable bits change.
    pub fn write(&mut self, reg: u16, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = usize::from(reg).checked_add(i) else {
                continue;
            };
            if let (Some(b), Some(w)) = (self.bytes.get_mut(o), self.writable.get(o)) {
                *b = (*b & !*w) | (*v & *w);
            }
        }
    }
}

/// The host bridge at 0:0.0: class 06/00/00, vendor/device 0x1275/0x1275 as bhyve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBridge {
    header: PciHeader,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// bhyve's host bridge identity. (bhyve also gives it a PCIe root-port capability; ours has
    /// no capabilities.)
    pub fn new() -> Self {
        HostBridge {
            header: PciHeader::new(PciIdent {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0x00,
                revision: 0,
                header_type: 0,
            }),
        }
    }

    /// The configuration header.
    pub fn header(&self) -> &PciHeader {
        &self.header
    }
}

impl PciConfigSpace for HostBridge {
    fn config_read(&mut self, _bdf: Bdf, reg: u16, data: &mut [u8]) {
        self.header.read(reg, data);
    }
    fn config_write(&mut self, _bdf: Bdf, reg: u16, data: &[u8]) {
        self.header.write(reg, data);
    }
}

/// The LPC (PCI-to-ISA) bridge at 0:31.0: class 06/01/00, Intel 82371SB ids (0x8086/0x7000) as
/// bhyve's `pci_lpc.c`, with the PIIX PIRQ route control registers at 0x60–0x63 and 0x68–0x6B
/// (read/write, reset 0x80 = disabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpcBridge {
    header: PciHeader,
}

impl Default for LpcBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl LpcBridge {
    /// bhyve's LPC bridge identity.
    pub fn new() -> Self {
        let mut header = PciHeader::new(PciIdent {
            vendor: LPC_VENDOR,
            device: LPC_DEVICE,
            class: 0x06,
            subclass: 0x01,
            prog_if: 0x00,
            revision: 0,
            header_type: 0,
        });
        for base in [LPC_PIRQ_A_D, LPC_PIRQ_E_H] {
            for i in 0..4u8 {
                header.set8(base + i, PIRQ_DISABLED);
            }
            header.set_writable(base, &[0x8f; 4]);
        }
        LpcBridge { header }
    }

    /// PIRQ route register `pin` (0 = PIRQA … 7 = PIRQH): `None` when routing is disabled, else
    /// the ISA IRQ it is routed to.
    pub fn pirq_route(&self, pin: u8) -> Option<u8> {
        let off = match pin {
            0..=3 => LPC_PIRQ_A_D + pin,
            4..=7 => LPC_PIRQ_E_H + (pin - 4),
            _ => return None,
        };
        let v = self.header.get8(off);
        (v & PIRQ_DISABLED == 0).then_some(v & 0x0f)
    }

    /// The configuration header.
    pub fn header(&self) -> &PciHeader {
        &self.header
    }
}

impl PciConfigSpace for LpcBridge {
    fn config_read(&mut self, _bdf: Bdf, reg: u16, data: &mut [u8]) {
        self.header.read(reg, data);
    }
    fn config_write(&mut self, _bdf: Bdf, reg: u16, data: &[u8]) {
        self.header.write(reg, data);
    }
}

/// The functions the fast path serves itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuiltinPciFunction {
    /// 0:0.0.
    HostBridge(HostBridge),
    /// 0:31.0.
    Lpc(LpcBridge),
}

impl PciConfigSpace for BuiltinPciFunction {
    fn config_read(&mut self, bdf: Bdf, reg: u16, data: &mut [u8]) {
        match self {
            BuiltinPciFunction::HostBridge(h) => h.config_read(bdf, reg, data),
            BuiltinPciFunction::Lpc(l) => l.config_read(bdf, reg, data),
        }
    }
    fn config_write(&mut self, bdf: Bdf, reg: u16, data: &[u8]) {
        match self {
            BuiltinPciFunction::HostBridge(h) => h.config_write(bdf, reg, data),
            BuiltinPciFunction::Lpc(l) => l.config_write(bdf, reg, data),
        }
    }
}

/// Mechanism #1 with bhyve's standard bus-0 bridges registered, room for `N` functions in all.
pub fn standard_config_io<const N: usize>(
) -> Result<PciConfigIo<BuiltinPciFunction, N>, PciRegisterError> {
    let mut io = PciConfigIo::new();
    io.register(
        HOST_BRIDGE_BDF,
        BuiltinPciFunction::HostBridge(HostBridge::new()),
    )?;
    io.register(LPC_BDF, BuiltinPciFunction::Lpc(LpcBridge::new()))?;
    Ok(io)
}

/// CONFIG_ADDRESS value for (bdf, reg) with the enable bit set.
pub fn config_address(bdf: Bdf, reg: u8) -> u32 {
    CONFIG_ENABLE | (u32::from(bdf.raw()) << 8) | u32::from(reg & 0xfc)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Io = PciConfigIo<BuiltinPciFunction, 4>;

    fn io() -> Io {
        match standard_config_io() {
            Ok(io) => io,
            Err(e) => panic!("{e}"),
        }
    }

    fn read(io: &mut Io, bdf: Bdf, reg: u8, width: usize) -> u32 {
        io.write(0, &config_address(bdf, reg).to_le_bytes());
        let mut b = [0u8; 4];
        let off = u64::from(reg & 3);
        io.read(4 + off, &mut b[..width]);
        u32::from_le_bytes(b)
    }

    fn write(io: &mut Io, bdf: Bdf, reg: u8, data: &[u8]) {
        io.write(0, &config_address(bdf, reg).to_le_bytes());
        io.write(4 + u64::from(reg & 3), data);
    }

    #[test]
    fn bdf_encoding() {
        let b = Bdf::new(3, 31, 7).unwrap_or(HOST_BRIDGE_BDF);
        assert_eq!((b.bus(), b.device(), b.function()), (3, 31, 7));
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
        assert_eq!(LPC_BDF, Bdf::new(0, 31, 0).unwrap_or(HOST_BRIDGE_BDF));
        assert_eq!(Bdf::from_config_address(0x8001_f800).raw(), 0x01f8);
    }

    #[test]
    fn host_bridge_and_lpc_ids() {
        let mut io = io();
        assert_eq!(read(&mut io, HOST_BRIDGE_BDF, 0, 4), 0x1275_1275);
        assert_eq!(read(&mut io, HOST_BRIDGE_BDF, 0x08, 4), 0x0600_0000);
        assert_eq!(read(&mut io, LPC_BDF, 0, 4), 0x7000_8086);
        assert_eq!(read(&mut io, LPC_BDF, 0x08, 4), 0x0601_0000);
        assert_eq!(read(&mut io, LPC_BDF, 0x0b, 1), 0x06);
        assert_eq!(read(&mut io, LPC_BDF, 0x0a, 2), 0x0601);
        assert_eq!(read(&mut io, LPC_BDF, 0x02, 2), 0x7000);
        assert_eq!(read(&mut io, LPC_BDF, 0x0e, 1), 0x00);
    }

    #[test]
    fn absent_functions_and_disabled_accesses_read_all_ones() {
        let mut io = io();
        let b = Bdf::new(0, 1, 0).unwrap_or(HOST_BRIDGE_BDF);
        assert_eq!(read(&mut io, b, 0, 4), 0xffff_ffff);
        let b = Bdf::new(1, 0, 0).unwrap_or(HOST_BRIDGE_BDF);
        assert_eq!(read(&mut io, b, 0, 4), 0xffff_ffff);
        io.write(0, &0x0000_0000u32.to_le_bytes()); // enable clear
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Misaligned and odd-width data accesses.
        io.write(0, &config_address(HOST_BRIDGE_BDF, 0).to_le_bytes());
        let mut w = [0u8; 2];
        io.read(5, &mut w);
        assert_eq!(w, [0xff; 2]);
        let mut t = [0u8; 3];
        io.read(4, &mut t);
        assert_eq!(t, [0xff; 3]);
        let mut q = [0u8; 4];
        io.read(6, &mut q);
        assert_eq!(q, [0xff; 4]);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut io = io();
        write(&mut io, LPC_BDF, 0, &0xdead_beefu32.to_le_bytes());
        write(&mut io, LPC_BDF, 0x08, &0xffff_ffffu32.to_le_bytes());
        write(&mut io, LPC_BDF, 0x0e, &[0x80]);
        write(&mut io, LPC_BDF, 0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&mut io, LPC_BDF, 0, 4), 0x7000_8086);
        assert_eq!(read(&mut io, LPC_BDF, 0x08, 4), 0x0601_0000);
        assert_eq!(read(&mut io, LPC_BDF, 0x0e, 1), 0);
        assert_eq!(read(&mut io, LPC_BDF, 0x10, 4), 0, "no BAR: sizing reads 0");
        // Command: only the defined bits stick; status stays 0.
        write(
            &mut io,
            HOST_BRIDGE_BDF,
            0x04,
            &0xffff_ffffu32.to_le_bytes(),
        );
        assert_eq!(
            read(&mut io, HOST_BRIDGE_BDF, 0x04, 4),
            u32::from(COMMAND_WRITABLE)
        );
        write(&mut io, HOST_BRIDGE_BDF, 0x3c, &[0x0b]);
        assert_eq!(read(&mut io, HOST_BRIDGE_BDF, 0x3c, 1), 0x0b);
        assert_eq!(
            read(&mut io, HOST_BRIDGE_BDF, 0x3d, 1),
            0,
            "no interrupt pin"
        );
    }

    #[test]
    fn lpc_pirq_routing_registers() {
        let mut io = io();
        assert_eq!(read(&mut io, LPC_BDF, 0x60, 4), 0x8080_8080);
        write(&mut io, LPC_BDF, 0x61, &[0x0b]);
        write(&mut io, LPC_BDF, 0x68, &[0xff]);
        assert_eq!(read(&mut io, LPC_BDF, 0x60, 4), 0x8080_0b80);
        assert_eq!(read(&mut io, LPC_BDF, 0x68, 1), 0x8f);
        let lpc = match io.function_mut(LPC_BDF) {
            Some(BuiltinPciFunction::Lpc(l)) => l.clone(),
            _ => panic!("LPC missing"),
        };
        assert_eq!(lpc.pirq_route(1), Some(0x0b));
        assert_eq!(lpc.pirq_route(0), None);
        assert_eq!(lpc.pirq_route(9), None);
    }

    #[test]
    fn address_register_round_trip_and_reserved_bits() {
        let mut io = io();
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        io.write(1, &[0x06]); // byte to 0xCF9: not ours
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        let mut s = [0u8; 2];
        io.read(0, &mut s);
        assert_eq!(s, [0xff; 2]);
        io.read(2, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(io.decode(1, 1).map(|(_, r)| r), Some(0xfd));
    }

    #[test]
    fn registry_rejects_duplicates_and_overflow() {
        let mut io: PciConfigIo<HostBridge, 1> = PciConfigIo::new();
        assert_eq!(io.register(HOST_BRIDGE_BDF, HostBridge::new()), Ok(()));
        assert_eq!(
            io.register(HOST_BRIDGE_BDF, HostBridge::new()),
            Err(PciRegisterError::Duplicate(HOST_BRIDGE_BDF))
        );
        assert_eq!(
            io.register(LPC_BDF, HostBridge::new()),
            Err(PciRegisterError::Full)
        );
        assert!(io.is_registered(HOST_BRIDGE_BDF));
    }
}
