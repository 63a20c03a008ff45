//! A PCI function for device models: a type-0 configuration space with a capability list, up to six
//! BARs, an MSI-X capability (table and PBA in a BAR) and INTx as the fallback.
//!
//! The header storage and its per-byte write masks are the colleague's [`PciHeader`]
//! (`stages::devices::pci`); this module adds what a device with BARs and interrupts needs:
//!
//! * **BARs** (0x10–0x24): 32-bit and 64-bit memory BARs and I/O BARs, each a power of two. The
//!   address bits below the size are read-only zero, so the guest sizes a BAR the usual way (write
//!   all-ones, read back, restore). **Placement is the platform's**: it calls
//!   [`PciFunction::set_bar_address`] before the guest runs (our guests have no firmware that
//!   assigns BARs). A guest may still reprogram a BAR, exactly as hardware allows; every change of
//!   where a BAR decodes (address or the command register's I/O / memory enable) is recorded as a
//!   [`BarChange`], read with [`PciFunction::take_bar_changes`], and the current state is always
//!   available from [`PciFunction::bar_mappings`]. The platform follows them (bhyve:
//!   `bhyve/src/pci.rs` `PciMmio` decodes its PCI window by the current mappings and moves the
//!   notify ioeventfds).
//! * **Capabilities** from 0x40 on, linked in the order they were added; status bit 4 is set when
//!   the list is not empty.
//! * **MSI-X** ([`msix`]): the capability's control word (enable, function mask) is writable; the
//!   table and PBA are served through [`PciFunction::bar_read`]/[`PciFunction::bar_write`] when an
//!   access falls in their window.
//! * **INTx** ([`IntxPin`]): interrupt pin INTA when the platform wired a line, none (pin 0)
//!   otherwise, so a guest never falls back to an interrupt nobody delivers; interrupt line
//!   writable; the device raises a level through the shared pin, the command register's
//!   INTx-disable bit and an enabled MSI-X gate it, status bit 3 shows it.

pub mod msix;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use stages::devices::pci::{reg, PciHeader, PciIdent};
use stages::Space;

pub use msix::{MsiTrigger, Msix, MsixOutcome};

/// Errors building a function (host configuration mistakes, never guest input).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PciError {
    /// BAR index past 5, or a 64-bit BAR at index 5.
    #[error("BAR {0} does not exist or cannot hold this BAR")]
    BadBarIndex(u8),
    /// The BAR slot is taken (also by the upper half of a 64-bit BAR).
    #[error("BAR {0} is already defined")]
    BarInUse(u8),
    /// Size not a power of two, or too small for its kind.
    #[error("BAR size {0:#x} is not a power of two of at least 16 (memory) or 4 (I/O) bytes")]
    BadBarSize(u64),
    /// No room left in the 256-byte space for a capability.
    #[error("No room for a {0}-byte capability")]
    NoCapabilityRoom(usize),
    /// The MSI-X table or PBA does not fit in its BAR, or the vector count is out of range.
    #[error("MSI-X layout does not fit: {0}")]
    BadMsix(&'static str),
    /// The platform asked for an address the BAR cannot hold.
    #[error("BAR {bar} cannot be placed at {addr:#x}")]
    BadBarAddress {
        /// BAR index.
        bar: u8,
        /// Address asked for.
        addr: u64,
    },
}

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mmio32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory BAR (takes this slot and the next).
    Mmio64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// I/O BAR.
    Io,
}

/// A BAR as the device defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// Kind.
    pub kind: BarKind,
    /// Size in bytes (power of two).
    pub size: u64,
}

/// Where a BAR decodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR index (0–5; a 64-bit BAR is named by its lower slot).
    pub bar: u8,
    /// Address space.
    pub space: Space,
    /// Programmed base address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Whether the command register enables decoding for this space (and the address is not 0).
    pub enabled: bool,
}

/// A change of where a BAR decodes: `old`/`new` are `None` when the BAR does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarChange {
    /// BAR index.
    pub bar: u8,
    /// Address space.
    pub space: Space,
    /// Length.
    pub len: u64,
    /// Previous decoded base.
    pub old: Option<u64>,
    /// New decoded base.
    pub new: Option<u64>,
}

/// Changes kept until the platform reads them; more are dropped (and counted), so a guest that
/// toggles BARs in a loop cannot grow host memory.
pub const MAX_PENDING_BAR_CHANGES: usize = 64;

/// An INTx line as the platform wires it (an I/O APIC pin through an irqfd, or the in-module
/// I/O APIC/PIC router).
pub trait IntxLine: Send + Sync {
    /// Drives the line: `true` asserted, `false` deasserted (level-triggered).
    fn set_level(&self, asserted: bool);
}

#[derive(Debug, Default, Clone, Copy)]
struct PinState {
    requested: bool,
    disabled: bool,
    driven: bool,
}

/// The function's INTx pin, shared by the register side (command register) and the interrupt
/// raisers.
pub struct IntxPin {
    line: Option<Arc<dyn IntxLine>>,
    state: Mutex<PinState>,
}

impl std::fmt::Debug for IntxPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxPin")
            .field("wired", &self.line.is_some())
            .field("state", &*self.lock())
            .finish()
    }
}

impl IntxPin {
    /// A pin wired to `line` (or to nothing).
    pub fn new(line: Option<Arc<dyn IntxLine>>) -> Self {
        Self {
            line,
            state: Mutex::new(PinState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` and drives the line if its level changed. The line is driven with the pin's
    /// lock held, so a raiser (the worker) and the ISR read (the register side) cannot reach the
    /// line in the opposite order of their state changes; the line must not call back into the
    /// pin.
    fn update(&self, f: impl FnOnce(&mut PinState)) {
        let mut s = self.lock();
        f(&mut s);
        let want = s.requested && !s.disabled;
        if want != s.driven {
            s.driven = want;
            if let Some(line) = &self.line {
                line.set_level(want);
            }
        }
    }

    /// The device wants the line asserted (`true`) or released.
    pub fn set_requested(&self, asserted: bool) {
        self.update(|s| s.requested = asserted);
    }

    /// The command register's INTx-disable bit.
    pub fn set_disabled(&self, disabled: bool) {
        self.update(|s| s.disabled = disabled);
    }

    /// Whether the device requests the line (status bit 3, "interrupt status").
    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Whether the line is driven now.
    pub fn driven(&self) -> bool {
        self.lock().driven
    }

    /// Whether the platform wired a line to this pin.
    pub fn wired(&self) -> bool {
        self.line.is_some()
    }
}

/// Counters of one function.
#[derive(Debug, Default)]
pub struct PciStats {
    /// Configuration writes.
    pub config_writes: AtomicU64,
    /// BAR decode changes recorded.
    pub bar_changes: AtomicU64,
    /// BAR decode changes dropped because the platform did not read them.
    pub bar_changes_dropped: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum BarSlot {
    Empty,
    Bar { spec: BarSpec, addr: u64 },
    Upper,
}

#[derive(Debug, Clone, Copy)]
struct MsixLayout {
    cap: u8,
    table_bar: u8,
    table_off: u64,
    pba_bar: u8,
    pba_off: u64,
}

/// Command register bits.
const CMD_IO: u16 = 1;
const CMD_MEM: u16 = 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Status: capabilities list; interrupt status.
const STATUS_CAP_LIST: u16 = 1 << 4;
const STATUS_INTX: u16 = 1 << 3;
/// Header offsets not in the colleague's `reg`.
const SUBSYS_VENDOR: u8 = 0x2c;
const SUBSYS_ID: u8 = 0x2e;
const CAP_PTR: u8 = 0x34;
/// First capability offset.
const CAP_START: u8 = 0x40;
/// MSI-X capability ID.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Vendor-specific capability ID.
pub const CAP_ID_VENDOR: u8 = 0x09;

/// A type-0 function with BARs, capabilities, MSI-X and INTx.
pub struct PciFunction {
    header: PciHeader,
    bars: [BarSlot; 6],
    next_cap: u8,
    last_cap: Option<u8>,
    msix: Option<(Arc<Msix>, MsixLayout)>,
    intx: Arc<IntxPin>,
    changes: Vec<BarChange>,
    /// Counters.
    pub stats: PciStats,
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciFunction")
            .field("vendor", &self.header.get16(reg::VENDOR))
            .field("device", &self.header.get16(reg::DEVICE))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciFunction {
    /// A function carrying `id` and the subsystem IDs, with INTA as its interrupt pin wired to
    /// `intx`, or no interrupt pin (0) when `intx` is not wired: an OS then does not look for an
    /// INTx route (Linux warned "can't derive routing for PCI INT A") and cannot fall back to a
    /// line nobody drives.
    pub fn new(id: PciIdent, subsystem_vendor: u16, subsystem_id: u16, intx: Arc<IntxPin>) -> Self {
        let mut header = PciHeader::new(id);
        header.set16(SUBSYS_VENDOR, subsystem_vendor);
        header.set16(SUBSYS_ID, subsystem_id);
        header.set8(reg::INTERRUPT_PIN, u8::from(intx.wired()));
        Self {
            header,
            bars: [BarSlot::Empty; 6],
            next_cap: CAP_START,
            last_cap: None,
            msix: None,
            intx,
            changes: Vec::new(),
            stats: PciStats::default(),
        }
    }

    /// Defines BAR `index`.
    pub fn add_bar(&mut self, index: u8, spec: BarSpec) -> Result<(), PciError> {
        let i = usize::from(index);
        let wide = matches!(spec.kind, BarKind::Mmio64 { .. });
        if i >= 6 || (wide && i >= 5) {
            return Err(PciError::BadBarIndex(index));
        }
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        if !spec.size.is_power_of_two() || spec.size < min {
            return Err(PciError::BadBarSize(spec.size));
        }
        if matches!(spec.kind, BarKind::Mmio32 { .. } | BarKind::Io) && spec.size > 1 << 31 {
            return Err(PciError::BadBarSize(spec.size));
        }
        let slots = if wide { i..i + 2 } else { i..i + 1 };
        for s in slots.clone() {
            if !matches!(self.bars.get(s), Some(BarSlot::Empty)) {
                return Err(PciError::BarInUse(index));
            }
        }
        if let Some(slot) = self.bars.get_mut(i) {
            *slot = BarSlot::Bar { spec, addr: 0 };
        }
        if wide {
            if let Some(slot) = self.bars.get_mut(i + 1) {
                *slot = BarSlot::Upper;
            }
        }
        Ok(())
    }

    /// The platform places BAR `index` at `addr` (aligned to its size). Recorded as a change like a
    /// guest write.
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        let before = self.bar_mappings();
        let Some(BarSlot::Bar { spec, addr: a }) = self.bars.get_mut(usize::from(index)) else {
            return Err(PciError::BadBarIndex(index));
        };
        let limit = match spec.kind {
            BarKind::Mmio64 { .. } => u64::MAX,
            BarKind::Mmio32 { .. } => u64::from(u32::MAX),
            BarKind::Io => 0xffff,
        };
        let fits = addr
            .checked_add(spec.size - 1)
            .is_some_and(|end| end <= limit);
        if addr % spec.size != 0 || !fits {
            return Err(PciError::BadBarAddress { bar: index, addr });
        }
        *a = addr;
        self.record_changes(&before);
        Ok(())
    }

    /// Appends a capability (`body[0]` is its ID; `body[1]`, the next pointer, is filled in).
    /// `writable` gives per-byte guest write masks for the capability (shorter means read-only).
    /// Returns its offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<u8, PciError> {
        let len = body.len();
        let at = self.next_cap;
        let end = usize::from(at) + len.next_multiple_of(4);
        if len < 2 || end > 256 {
            return Err(PciError::NoCapabilityRoom(len));
        }
        for (i, b) in body.iter().enumerate() {
            let off =
                u8::try_from(usize::from(at) + i).map_err(|_| PciError::NoCapabilityRoom(len))?;
            self.header.set8(off, if i == 1 { 0 } else { *b });
        }
        self.header.set_writable(at, writable);
        match self.last_cap {
            Some(prev) => self.header.set8(prev.wrapping_add(1), at),
            None => {
                self.header.set8(CAP_PTR, at);
                let st = self.header.get16(reg::STATUS) | STATUS_CAP_LIST;
                self.header.set16(reg::STATUS, st);
            }
        }
        self.last_cap = Some(at);
        self.next_cap = u8::try_from(end).unwrap_or(u8::MAX);
        Ok(at)
    }

    /// Adds the MSI-X capability for `msix`, its table at `table_off` in BAR `table_bar` and its
    /// PBA at `pba_off` in BAR `pba_bar` (offsets 8-byte aligned, inside already defined BARs).
    pub fn add_msix(
        &mut self,
        msix: Arc<Msix>,
        table_bar: u8,
        table_off: u32,
        pba_bar: u8,
        pba_off: u32,
    ) -> Result<u8, PciError> {
        let inside = |bar: u8, off: u32, len: u64| -> bool {
            match self.bars.get(usize::from(bar)) {
                Some(BarSlot::Bar { spec, .. }) => {
                    spec.kind != BarKind::Io
                        && u64::from(off) % 8 == 0
                        && u64::from(off)
                            .checked_add(len)
                            .is_some_and(|e| e <= spec.size)
                }
                _ => false,
            }
        };
        if !inside(table_bar, table_off, msix.table_len()) {
            return Err(PciError::BadMsix("table outside its BAR"));
        }
        if !inside(pba_bar, pba_off, msix.pba_len()) {
            return Err(PciError::BadMsix("PBA outside its BAR"));
        }
        let control = msix.vectors() - 1;
        let mut body = [0u8; 12];
        body[0] = CAP_ID_MSIX;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&(table_off | u32::from(table_bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_off | u32::from(pba_bar)).to_le_bytes());
        // Enable (bit 15) and function mask (bit 14) are the only writable bits.
        let cap = self.add_capability(&body, &[0, 0, 0, 0xc0])?;
        self.msix = Some((
            msix,
            MsixLayout {
                cap,
                table_bar,
                table_off: u64::from(table_off),
                pba_bar,
                pba_off: u64::from(pba_off),
            },
        ));
        Ok(cap)
    }

    /// The MSI-X state, if the function has the capability.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.msix.as_ref().map(|(m, _)| m)
    }

    /// The INTx pin.
    pub fn intx(&self) -> &Arc<IntxPin> {
        &self.intx
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.header.get16(reg::COMMAND)
    }

    /// The interrupt line register (what the guest, or firmware, wrote).
    pub fn interrupt_line(&self) -> u8 {
        self.header.get8(reg::INTERRUPT_LINE)
    }

    /// The platform writes the interrupt line register, as firmware does: the I/O APIC input
    /// (or ISA IRQ) its INTx pin is wired to, for guests that do not read the ACPI routing.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.header.set8(reg::INTERRUPT_LINE, line);
    }

    /// Where every BAR decodes now.
    pub fn bar_mappings(&self) -> Vec<BarMapping> {
        let cmd = self.command();
        let mut out = Vec::new();
        for (i, slot) in self.bars.iter().enumerate() {
            let BarSlot::Bar { spec, addr } = *slot else {
                continue;
            };
            let (space, on) = match spec.kind {
                BarKind::Io => (Space::Pio, cmd & CMD_IO != 0),
                _ => (Space::Mmio, cmd & CMD_MEM != 0),
            };
            out.push(BarMapping {
                bar: u8::try_from(i).unwrap_or(u8::MAX),
                space,
                addr,
                len: spec.size,
                enabled: on && addr != 0,
            });
        }
        out
    }

    /// The mapping of BAR `bar`, if it is defined.
    pub fn bar_mapping(&self, bar: u8) -> Option<BarMapping> {
        self.bar_mappings().into_iter().find(|m| m.bar == bar)
    }

    /// Takes the BAR decode changes recorded since the last call (oldest first).
    pub fn take_bar_changes(&mut self) -> Vec<BarChange> {
        std::mem::take(&mut self.changes)
    }

    fn record_changes(&mut self, before: &[BarMapping]) {
        let after = self.bar_mappings();
        for (b, a) in before.iter().zip(after.iter()) {
            let old = b.enabled.then_some(b.addr);
            let new = a.enabled.then_some(a.addr);
            if old == new {
                continue;
            }
            self.stats.bar_changes.fetch_add(1, Ordering::Relaxed);
            if self.changes.len() >= MAX_PENDING_BAR_CHANGES {
                self.stats
                    .bar_changes_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.changes.push(BarChange {
                bar: a.bar,
                space: a.space,
                len: a.len,
                old,
                new,
            });
        }
    }

    fn bar_dword(&self, i: usize) -> u32 {
        let low32 = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        match self.bars.get(i) {
            Some(BarSlot::Bar { spec, addr }) => match spec.kind {
                BarKind::Io => low32(*addr) | 1,
                BarKind::Mmio32 { prefetchable } => low32(*addr) | (u32::from(prefetchable) << 3),
                BarKind::Mmio64 { prefetchable } => {
                    low32(*addr) | 0b100 | (u32::from(prefetchable) << 3)
                }
            },
            Some(BarSlot::Upper) => match i.checked_sub(1).and_then(|l| self.bars.get(l)) {
                Some(BarSlot::Bar { addr, .. }) => low32(*addr >> 32),
                _ => 0,
            },
            _ => 0,
        }
    }

    fn bar_dword_write(&mut self, i: usize, v: u32) {
        let upper = matches!(self.bars.get(i), Some(BarSlot::Upper));
        let idx = if upper { i.wrapping_sub(1) } else { i };
        let Some(BarSlot::Bar { spec, addr }) = self.bars.get_mut(idx) else {
            return;
        };
        let mask = !(spec.size - 1);
        let v = u64::from(v);
        *addr = match (spec.kind, upper) {
            (BarKind::Io, _) => v & mask & 0xffff_fffc,
            (BarKind::Mmio32 { .. }, _) => v & mask & 0xffff_fff0,
            (BarKind::Mmio64 { .. }, false) => (*addr & !0xffff_ffff) | (v & mask & 0xffff_fff0),
            (BarKind::Mmio64 { .. }, true) => (*addr & 0xffff_ffff) | ((v << 32) & mask),
        };
    }

    fn read_dword(&self, dw: u16) -> u32 {
        let off = dw * 4;
        if (0x10..0x28).contains(&off) {
            return self.bar_dword(usize::from((off - 0x10) / 4));
        }
        let mut b = [0u8; 4];
        self.header.read(off, &mut b);
        let mut v = u32::from_le_bytes(b);
        if off == u16::from(reg::COMMAND) && self.intx.requested() {
            v |= u32::from(STATUS_INTX) << 16;
        }
        v
    }

    /// Guest configuration read: fills all of `data` (all-ones past 256 bytes).
    pub fn config_read(&self, reg: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let Some(at) = usize::from(reg)
                .checked_add(i)
                .and_then(|a| u16::try_from(a).ok())
                .filter(|a| *a < 256)
            else {
                *d = 0xff;
                continue;
            };
            *d = self.read_dword(at / 4).to_le_bytes()[usize::from(at % 4)];
        }
    }

    /// Guest configuration write.
    pub fn config_write(&mut self, reg: u16, data: &[u8]) {
        self.stats.config_writes.fetch_add(1, Ordering::Relaxed);
        let before = self.bar_mappings();
        // Group the bytes by dword, so a BAR or a control word sees one merged value.
        let mut i = 0usize;
        while i < data.len() {
            let Some(at) = usize::from(reg)
                .checked_add(i)
                .and_then(|a| u16::try_from(a).ok())
                .filter(|a| *a < 256)
            else {
                break;
            };
            let dw = at / 4;
            let mut bytes = self.read_dword(dw).to_le_bytes();
            let mut mask = [false; 4];
            let mut j = usize::from(at % 4);
            while j < 4 && i < data.len() {
                if let (Some(b), Some(m), Some(v)) =
                    (bytes.get_mut(j), mask.get_mut(j), data.get(i))
                {
                    *b = *v;
                    *m = true;
                }
                j += 1;
                i += 1;
            }
            self.write_dword(dw, u32::from_le_bytes(bytes), mask);
        }
        self.record_changes(&before);
    }

    fn write_dword(&mut self, dw: u16, v: u32, mask: [bool; 4]) {
        let off = dw * 4;
        if (0x10..0x28).contains(&off) {
            self.bar_dword_write(usize::from((off - 0x10) / 4), v);
            return;
        }
        let bytes = v.to_le_bytes();
        for (k, (b, m)) in bytes.iter().zip(mask).enumerate() {
            if m {
                self.header
                    .write(off + u16::try_from(k).unwrap_or(0), &[*b]);
            }
        }
        let mut gate = off == u16::from(reg::COMMAND);
        if let Some((m, l)) = &self.msix {
            if off == u16::from(l.cap) {
                let ctl = self.header.get16(l.cap.wrapping_add(2));
                m.set_control(ctl & 0x8000 != 0, ctl & 0x4000 != 0);
                gate = true;
            }
        }
        if gate {
            // INTx is off while the command register disables it or MSI-X is enabled (a function
            // with MSI-X enabled must not use its INTx pin, PCI 3.0 §6.8.2).
            let msix_on = self.msix.as_ref().is_some_and(|(m, _)| m.enabled());
            self.intx
                .set_disabled(self.command() & CMD_INTX_DISABLE != 0 || msix_on);
        }
    }

    /// Serves an access to BAR `bar` at `offset` if it falls in the MSI-X table or PBA. Returns
    /// whether it did.
    pub fn msix_bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let Some((m, l)) = &self.msix else {
            return false;
        };
        if bar == l.table_bar {
            if let Some(o) = offset
                .checked_sub(l.table_off)
                .filter(|o| *o < m.table_len())
            {
                m.table_read(o, data);
                return true;
            }
        }
        if bar == l.pba_bar {
            if let Some(o) = offset.checked_sub(l.pba_off).filter(|o| *o < m.pba_len()) {
                m.pba_read(o, data);
                return true;
            }
        }
        false
    }

    /// Write counterpart of [`PciFunction::msix_bar_read`].
    pub fn msix_bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let Some((m, l)) = &self.msix else {
            return false;
        };
        if bar == l.table_bar {
            if let Some(o) = offset
                .checked_sub(l.table_off)
                .filter(|o| *o < m.table_len())
            {
                m.table_write(o, data);
                return true;
            }
        }
        if bar == l.pba_bar {
            if let Some(o) = offset.checked_sub(l.pba_off).filter(|o| *o < m.pba_len()) {
                m.pba_write(o, data);
                return true;
            }
        }
        false
    }

    /// Raw header byte (for tests and the device layer).
    pub fn header_byte(&self, offset: u8) -> u8 {
        self.header.get8(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn ident() -> PciIdent {
        PciIdent {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            header_type: 0,
        }
    }

    fn rd(f: &PciFunction, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        f.config_read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(f: &mut PciFunction, reg: u16, v: u32) {
        f.config_write(reg, &v.to_le_bytes());
    }

    struct NoMsi;
    impl MsiTrigger for NoMsi {
        fn trigger(&self, _: u16, _: u64, _: u32) {}
    }

    #[test]
    fn no_interrupt_pin_without_an_intx_line() {
        let f = PciFunction::new(ident(), 0x1af4, 0x1100, Arc::new(IntxPin::new(None)));
        assert_eq!(rd(&f, 0x3c) >> 8 & 0xff, 0, "interrupt pin: none");
    }

    #[test]
    fn bar_sizing_and_placement() {
        let mut f = PciFunction::new(ident(), 0x1af4, 0x1100, Arc::new(IntxPin::new(None)));
        f.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mmio64 {
                    prefetchable: false,
                },
                size: 0x4000,
            },
        )
        .unwrap();
        f.add_bar(
            2,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
            },
        )
        .unwrap();
        f.add_bar(
            3,
            BarSpec {
                kind: BarKind::Mmio32 { prefetchable: true },
                size: 0x1000,
            },
        )
        .unwrap();
        assert_eq!(
            f.add_bar(
                1,
                BarSpec {
                    kind: BarKind::Io,
                    size: 4
                }
            ),
            Err(PciError::BarInUse(1))
        );
        assert_eq!(
            f.add_bar(
                5,
                BarSpec {
                    kind: BarKind::Mmio64 {
                        prefetchable: false
                    },
                    size: 16
                }
            ),
            Err(PciError::BadBarIndex(5))
        );
        assert_eq!(
            f.add_bar(
                4,
                BarSpec {
                    kind: BarKind::Io,
                    size: 6
                }
            ),
            Err(PciError::BadBarSize(6))
        );
        // Sizing.
        wr(&mut f, 0x10, u32::MAX);
        wr(&mut f, 0x14, u32::MAX);
        assert_eq!(rd(&f, 0x10), 0xffff_c004);
        assert_eq!(rd(&f, 0x14), 0xffff_ffff);
        wr(&mut f, 0x18, u32::MAX);
        assert_eq!(rd(&f, 0x18), 0xffff_ffe1);
        wr(&mut f, 0x1c, u32::MAX);
        assert_eq!(rd(&f, 0x1c), 0xffff_f008);
        assert_eq!(rd(&f, 0x20), 0, "absent BAR");
        // Platform placement.
        f.set_bar_address(0, 0x1_0000_0000).unwrap();
        assert_eq!(
            f.set_bar_address(3, 0x800),
            Err(PciError::BadBarAddress {
                bar: 3,
                addr: 0x800
            })
        );
        f.set_bar_address(2, 0xc000).unwrap();
        assert_eq!(rd(&f, 0x10), 0x4);
        assert_eq!(rd(&f, 0x14), 1);
        assert!(f.take_bar_changes().is_empty(), "nothing decodes yet");
        // Enable memory decode: BAR 0 and BAR 3 (whose address is the sizing leftover).
        wr(&mut f, 0x04, 0x2);
        let ch = f.take_bar_changes();
        assert_eq!(ch.len(), 2);
        assert_eq!(ch[0].new, Some(0x1_0000_0000));
        assert_eq!(ch[0].old, None);
        // Guest moves BAR 0 (low dword then high dword): two changes, final address visible.
        wr(&mut f, 0x10, 0x8000_0000);
        wr(&mut f, 0x14, 0);
        let ch = f.take_bar_changes();
        assert_eq!(ch.last().unwrap().new, Some(0x8000_0000));
        let m = f.bar_mapping(0).unwrap();
        assert_eq!(
            (m.space, m.addr, m.len, m.enabled),
            (Space::Mmio, 0x8000_0000, 0x4000, true)
        );
        let io = f.bar_mapping(2).unwrap();
        assert!(!io.enabled, "I/O decode off");
        assert_eq!(f.stats.bar_changes.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn bar_change_queue_is_bounded() {
        let mut f = PciFunction::new(ident(), 0, 0, Arc::new(IntxPin::new(None)));
        f.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mmio32 {
                    prefetchable: false,
                },
                size: 0x1000,
            },
        )
        .unwrap();
        f.set_bar_address(0, 0x1000).unwrap();
        for _ in 0..1000 {
            wr(&mut f, 0x04, 2);
            wr(&mut f, 0x04, 0);
        }
        assert_eq!(f.take_bar_changes().len(), MAX_PENDING_BAR_CHANGES);
        assert_eq!(
            f.stats.bar_changes_dropped.load(Ordering::Relaxed),
            2000 - 64
        );
    }

    #[test]
    fn capabilities_msix_control_and_intx() {
        struct Line(AtomicBool);
        impl IntxLine for Line {
            fn set_level(&self, a: bool) {
                self.0.store(a, Ordering::SeqCst);
            }
        }
        let line = Arc::new(Line(AtomicBool::new(false)));
        let pin = Arc::new(IntxPin::new(Some(line.clone())));
        let mut f = PciFunction::new(ident(), 0, 0, pin.clone());
        assert_eq!(rd(&f, 0x04) >> 16 & 0x10, 0, "no capability list yet");
        f.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mmio32 {
                    prefetchable: false,
                },
                size: 0x1000,
            },
        )
        .unwrap();
        let v = f.add_capability(&[CAP_ID_VENDOR, 0xee, 4, 1], &[]).unwrap();
        let msix = Arc::new(Msix::new(4, Arc::new(NoMsi)).unwrap());
        assert!(f.add_msix(msix.clone(), 0, 0xff8, 0, 0x800).is_err());
        let m = f.add_msix(msix.clone(), 0, 0x800, 0, 0xc00).unwrap();
        assert_eq!(v, 0x40);
        assert_eq!(m, 0x44);
        assert_eq!(rd(&f, 0x34) & 0xff, 0x40);
        assert_eq!(rd(&f, 0x04) >> 16 & 0x10, 0x10);
        assert_eq!(rd(&f, 0x40) & 0xffff, 0x4409, "vendor cap links to MSI-X");
        assert_eq!(rd(&f, 0x44), 0x0003_0011, "MSI-X, last, 4 vectors");
        assert_eq!(rd(&f, 0x48), 0x800);
        assert_eq!(rd(&f, 0x4c), 0xc00);
        // Control: only enable and mask stick; table size is read-only.
        wr(&mut f, 0x44, 0xffff_ffff);
        assert_eq!(rd(&f, 0x44), 0xc003_0011);
        assert!(msix.enabled() && msix.function_masked());
        f.config_write(0x47, &[0x80]);
        assert!(msix.enabled() && !msix.function_masked());
        // MSI-X table and PBA through the BAR.
        let mut d = [0u8; 4];
        assert!(f.msix_bar_read(0, 0x800 + 12, &mut d));
        assert_eq!(u32::from_le_bytes(d), 1);
        assert!(!f.msix_bar_read(0, 0x840, &mut d), "past the table");
        assert!(f.msix_bar_read(0, 0xc00, &mut d));
        // INTx: pin A, line writable, disable bit gates the line, status bit 3.
        assert_eq!(rd(&f, 0x3c) >> 8 & 0xff, 1);
        f.config_write(0x3c, &[11]);
        assert_eq!(f.interrupt_line(), 11);
        pin.set_requested(true);
        assert!(
            !line.0.load(Ordering::SeqCst),
            "no INTx while MSI-X is enabled"
        );
        f.config_write(0x47, &[0]);
        assert!(!msix.enabled());
        assert!(
            line.0.load(Ordering::SeqCst),
            "MSI-X off: the request drives the line"
        );
        assert_eq!(rd(&f, 0x04) >> 16 & 0x8, 0x8);
        wr(&mut f, 0x04, 1 << 10);
        assert!(!line.0.load(Ordering::SeqCst), "INTx disabled");
        wr(&mut f, 0x04, 0);
        assert!(line.0.load(Ordering::SeqCst));
        pin.set_requested(false);
        assert!(!line.0.load(Ordering::SeqCst));
        // Read-only identity, odd offsets past the space.
        wr(&mut f, 0x00, 0);
        assert_eq!(rd(&f, 0x00), 0x1042_1af4);
        let mut far = [0u8; 4];
        f.config_read(0xfe, &mut far);
        assert_eq!(&far[2..], &[0xff, 0xff]);
        f.config_write(0xfe, &[1, 2, 3, 4]);
        f.config_write(u16::MAX, &[1, 2]);
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut f = PciFunction::new(ident(), 0, 0, Arc::new(IntxPin::new(None)));
        let mut n = 0;
        while f
            .add_capability(
                &[CAP_ID_VENDOR, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[],
            )
            .is_ok()
        {
            n += 1;
        }
        assert_eq!(n, (256 - 0x40) / 16);
    }
}
