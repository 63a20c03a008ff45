//! The PC platform: the in-module devices of [`crate::devices`] wired together as one object that
//! the vCPU threads (bus adapters, EOIs), the device-model threads (UART interrupt lines) and one
//! timer thread share.
//!
//! | device | window | adapter name |
//! |---|---|---|
//! | I/O APIC (ID [`IOAPIC_ID`]) | MMIO 0xFEC0_0000, 0x1000 | `ioapic` |
//! | HPET | MMIO 0xFED0_0000, 0x400 | `hpet` |
//! | 8259A pair | ports 0x20–0x21, 0xA0–0xA1 | `pic-master`, `pic-slave` |
//! | ELCR | ports 0x4D0–0x4D1 | `elcr` |
//! | 8254 PIT, port 0x61 | ports 0x40–0x43, 0x61 | `pit`, `port61` |
//! | RTC/CMOS ([`HostWallClock`]) | ports 0x70–0x71 | `rtc` |
//! | ACPI PM timer (SCI on [`PcConfig::sci_irq`]) | port 0x408, 4 | `pmtimer` |
//! | PCI mechanism #1 (host bridge 0:0.0, LPC 0:31.0) | port 0xCF8 (1, reached by dword accesses), 0xCFC–0xCFF | `pci-address`, `pci-data` |
//!
//! Port 0xCF9 (the reset control register, `acpipm::ResetControl`) is not ours: the address
//! register is registered as a one-port range at 0xCF8, which a dword access at 0xCF8 reaches (the
//! bus routes an access by its first port) while 0xCF9 stays free. Byte and word accesses to
//! 0xCFA–0xCFB are left unclaimed: they read all-ones and are dropped, which is what the core does
//! with them anyway.
//!
//! # Interrupt lines
//!
//! Every source drives lines as in [`crate::devices`] (below 16 an ISA IRQ, reaching the PIC and the
//! I/O APIC through [`IsaIrqRouter`]; 16–31 an I/O APIC input only). A line is a **wired OR** of
//! its sources (PIT, HPET, RTC, PM timer, and "external" for everything driven through
//! [`PcPlatform::set_irq`]: the UARTs, the ACPI PM1 block's SCI): an edge reaches the controllers
//! only when the OR changes, so a pulse on a line another source holds high does nothing, as on a
//! shared wire. While the HPET's legacy replacement route is on, the PIT's drive of IRQ 0 and the
//! RTC's drive of IRQ 8 are disconnected (the chipset gates them).
//!
//! Deliveries of the I/O APIC go to the `msi` closure given to [`PcPlatform::new`] (the front end
//! wraps `KVM_SIGNAL_MSI`). A level-triggered pin stays remote-IRR-busy until
//! [`EoiSink::eoi`](crate::EoiSink) (`KVM_EXIT_IOAPIC_EOI`); KVM reports those EOIs only for vectors
//! its GSI routing table marks as I/O APIC level vectors, so [`PcPlatform::set_route_sink`] hands
//! the front end the table to install whenever the guest changes its level-triggered entries.
//!
//! # Timers
//!
//! Register accesses service their device at once (the timer protocol of [`crate::devices`]).
//! Everything that becomes due later is done by [`PcPlatform::run_timers`], one thread that sleeps
//! until the earliest deadline of the PIT, HPET, RTC and PM timer. Its wake-ups are bounded whatever
//! the guest programs: polling rounds are at least [`TIMER_ROUND_NS`] apart, and an adapter whose
//! access moves a deadline earlier than the thread's wake-up time wakes it at most once per round
//! (after such a wake-up the thread sleeps until the round ends). The worst a guest can do is two
//! wake-ups per [`TIMER_ROUND_NS`]; an idle platform wakes every [`TIMER_MAX_SLEEP_NS`] to look at
//! the stop flag.
//!
//! # Lock order
//!
//! Outermost first; a path may skip levels but never goes back up:
//!
//! 1. a bus adapter's own mutex (taken by the exit handler around `read`/`write`; never by us);
//! 2. `routes` (the KVM route table mirror), taken after an I/O APIC write with nothing else held;
//! 3. one timer device: `pit`, `hpet`, `rtc` or `pmtimer` (never two at once);
//! 4. `irqchip` (PIC pair, ELCR and I/O APIC together: the router needs both);
//! 5. the `msi` closure runs with `irqchip` held and must not call back into the platform.
//!
//! Never the reverse: nothing holding `irqchip` takes a timer device, nothing holding a timer
//! device takes `routes`. `pci` is a leaf taken alone; the route sink runs with `routes` held and
//! nothing else. `wake.state` (the timer thread's sleep) is a leaf too: the timer thread holds it
//! only to scan the published deadlines (atomics) and to sleep, adapters take it only after
//! releasing their device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::bus::Space;
use crate::devices::hpet::{Hpet, HPET_BASE, HPET_SIZE};
use crate::devices::ioapic::RTE_TRIGGER_LEVEL;
use crate::devices::ioapic::{IoApic, MsiMessage, IOAPIC_BASE, IOAPIC_PINS, IOAPIC_SIZE};
use crate::devices::pci::{standard_config_io, BuiltinPciFunction, PciConfigIo};
use crate::devices::pci::{PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};
use crate::devices::pic::{PicPair, PicRange, ELCR_PORT, ELCR_PORT_LEN, PIC_MASTER_PORT};
use crate::devices::pic::{PIC_PORT_LEN, PIC_SLAVE_PORT};
use crate::devices::pit::{Pit, PIT_PORT, PIT_PORT_LEN, PORT61, PORT61_LEN};
use crate::devices::pmtimer::{PmTimer, PM_TIMER_LEN, PM_TIMER_PORT, SCI_IRQ};
use crate::devices::rtc::{Rtc, RTC_PORT, RTC_PORT_LEN};
use crate::devices::{
    Clock, HostClock, HostWallClock, IrqSink, IsaIrqRouter, MsiSink, TimerDevice,
    MIN_TIMER_PERIOD_NS,
};
use crate::models::uart::IrqLine;
use crate::platform::{BusDevice, EoiSink, VmRequests};

/// APIC ID of the I/O APIC: the MADT's (`loader::acpi::IOAPIC_ID`, bhyve's 0). `stages` does not
/// depend on the loader; `bhyve/tests/devices.rs` checks the two agree.
pub const IOAPIC_ID: u8 = 0;

/// Polling rounds of the timer thread are at least this far apart (the device cores' interrupt
/// floor, [`MIN_TIMER_PERIOD_NS`]): a deadline that falls sooner after a round waits for the next
/// one, so the thread's timer slack is at most this.
pub const TIMER_ROUND_NS: u64 = MIN_TIMER_PERIOD_NS;

/// The longest the timer thread sleeps without looking at its stop flag. Every stop of a VM also
/// wakes it ([`PcPlatform::notify_timers`]), and every access that moves a deadline earlier kicks
/// it; this only bounds a stop that does not wake it, and sets how often an idle platform's thread
/// wakes: once a second (with 100 ms it was 10 times, with 20 ms 50).
pub const TIMER_MAX_SLEEP_NS: u64 = 1_000_000_000;

/// Interrupt lines the platform tracks (the I/O APIC's inputs; ISA IRQs are the first 16).
pub const PC_LINES: usize = IOAPIC_PINS;

/// Room in the PCI mechanism #1 registry for fast-path functions.
const PCI_FUNCTIONS: usize = 8;

/// The `sleep_until` value of a timer thread that is running a round (not sleeping).
const AWAKE: u64 = 0;

/// Where the I/O APIC's messages go: `(address, data)` of an x86 MSI.
pub type MsiFn = Arc<dyn Fn(u64, u32) + Send + Sync>;

/// One I/O APIC input as a KVM GSI route: pin `gsi` delivers `address`/`data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The I/O APIC input (GSI) number.
    pub gsi: u32,
    /// MSI address (0xFEEx_xxxx).
    pub address: u64,
    /// MSI data (vector, delivery mode, level-trigger bits).
    pub data: u32,
}

/// Installs a route table (replacing the previous one); errors are counted, not retried.
pub type RouteSink = Arc<dyn Fn(&[MsiRoute]) -> Result<(), String> + Send + Sync>;

/// What [`PcPlatform::register`] calls once per window: `(name, space, base, len, device)`.
pub type AddDevice<'a> =
    dyn FnMut(&str, Space, u64, u64, Arc<Mutex<dyn BusDevice>>) -> Result<(), String> + 'a;

/// How the platform is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcConfig {
    /// Number of vCPUs (APIC IDs `0..ncpus`): a physical-mode MSI addressed elsewhere, other than
    /// the broadcast 0xFF, is counted in [`PcStats::msi_no_target`] (and still sent: the local
    /// APICs drop it, as hardware would).
    pub ncpus: u32,
    /// The I/O APIC's APIC ID (must match the MADT: [`IOAPIC_ID`]).
    pub ioapic_id: u8,
    /// The line of the PM timer's SCI (ISA IRQ 9, bhyve's `SCI_INT`, as the FADT says).
    pub sci_irq: u32,
}

impl Default for PcConfig {
    fn default() -> Self {
        PcConfig {
            ncpus: 1,
            ioapic_id: IOAPIC_ID,
            sci_irq: SCI_IRQ,
        }
    }
}

/// Counters of the platform (vmm_stat style). Every one is incremented somewhere below and read by
/// the tests.
#[derive(Debug, Default)]
pub struct PcStats {
    /// MSIs sent to the `msi` closure.
    pub msi_sent: AtomicU64,
    /// Physical-mode MSIs addressed to an APIC ID that is not a vCPU's (nor broadcast).
    pub msi_no_target: AtomicU64,
    /// Times the timer thread returned from a sleep (timeouts and wake-ups together).
    pub timer_wakeups: AtomicU64,
    /// Wake-ups an adapter gave the sleeping timer thread because a deadline moved earlier.
    pub timer_kicks: AtomicU64,
    /// Polling rounds the timer thread ran.
    pub timer_rounds: AtomicU64,
    /// Device polls done by the timer thread.
    pub timer_polls: AtomicU64,
    /// Device polls done on the exit path (after a register access) or by a platform call.
    pub access_polls: AtomicU64,
    /// EOIs received through [`EoiSink`].
    pub eois: AtomicU64,
    /// Route tables handed to the route sink.
    pub route_updates: AtomicU64,
    /// Route tables the route sink refused.
    pub route_errors: AtomicU64,
    /// Line changes for lines beyond [`PC_LINES`], dropped.
    pub lines_ignored: AtomicU64,
}

impl PcStats {
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (name, value) of every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("msi_sent", get(&self.msi_sent)),
            ("msi_no_target", get(&self.msi_no_target)),
            ("timer_wakeups", get(&self.timer_wakeups)),
            ("timer_kicks", get(&self.timer_kicks)),
            ("timer_rounds", get(&self.timer_rounds)),
            ("timer_polls", get(&self.timer_polls)),
            ("access_polls", get(&self.access_polls)),
            ("eois", get(&self.eois)),
            ("route_updates", get(&self.route_updates)),
            ("route_errors", get(&self.route_errors)),
            ("lines_ignored", get(&self.lines_ignored)),
        ]
    }
}

/// Who drives a line (one bit each in [`IrqChip::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Pit = 0,
    Hpet = 1,
    Rtc = 2,
    PmTimer = 3,
    External = 4,
}

impl Source {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The interrupt controllers and the per-source state of every line, under one lock.
#[derive(Debug)]
struct IrqChip {
    pic: PicPair,
    ioapic: IoApic,
    /// Per line: which sources assert it.
    sources: [u8; PC_LINES],
    /// Per line (bit n): the OR last reported to the controllers.
    reported: u32,
    /// HPET legacy replacement: the PIT's IRQ 0 and the RTC's IRQ 8 are disconnected.
    legacy_replacement: bool,
}

fn line_bit(line: usize) -> u32 {
    u32::try_from(line)
        .ok()
        .and_then(|l| 1u32.checked_shl(l))
        .unwrap_or(0)
}

impl IrqChip {
    fn connected(&self, line: usize) -> u8 {
        match (self.legacy_replacement, line) {
            (true, 0) => !Source::Pit.bit(),
            (true, 8) => !Source::Rtc.bit(),
            _ => u8::MAX,
        }
    }

    /// Drive `line` from `source`; returns false for a line we do not have.
    fn drive(&mut self, source: Source, line: u32, level: bool, msi: &mut MsiOut<'_>) -> bool {
        let Some(idx) = usize::try_from(line).ok().filter(|&i| i < PC_LINES) else {
            return false;
        };
        if let Some(s) = self.sources.get_mut(idx) {
            if level {
                *s |= source.bit();
            } else {
                *s &= !source.bit();
            }
        }
        self.update(idx, msi);
        true
    }

    /// Report line `idx`'s wired OR to the controllers if it changed.
    fn update(&mut self, idx: usize, msi: &mut MsiOut<'_>) {
        let sources = self.sources.get(idx).copied().unwrap_or(0);
        let level = sources & self.connected(idx) != 0;
        let bit = line_bit(idx);
        if (self.reported & bit != 0) == level {
            return;
        }
        if level {
            self.reported |= bit;
        } else {
            self.reported &= !bit;
        }
        let line = u32::try_from(idx).unwrap_or(u32::MAX);
        IsaIrqRouter::new(&mut self.pic, &mut self.ioapic, msi).set_irq(line, level);
    }

    fn set_legacy_replacement(&mut self, on: bool, msi: &mut MsiOut<'_>) {
        self.legacy_replacement = on;
        self.update(0, msi);
        self.update(8, msi);
    }

    /// Every level-triggered redirection entry as a route (masked ones too: KVM must keep
    /// reporting EOIs for a vector still in service when the guest masks its pin).
    fn level_routes(&self) -> Vec<MsiRoute> {
        (0..IOAPIC_PINS)
            .filter_map(|pin| {
                let entry = self.ioapic.redirection_entry(pin)?;
                if entry & RTE_TRIGGER_LEVEL == 0 {
                    return None;
                }
                let m = IoApic::entry_to_msi(entry);
                Some(MsiRoute {
                    gsi: u32::try_from(pin).ok()?,
                    address: m.address,
                    data: m.data,
                })
            })
            .collect()
    }
}

/// The I/O APIC's [`MsiSink`]: counts, checks the destination, calls the `msi` closure.
struct MsiOut<'a> {
    pc: &'a PcPlatform,
}

impl MsiSink for MsiOut<'_> {
    fn send_msi(&mut self, addr: u64, data: u32) {
        let pc = self.pc;
        PcStats::inc(&pc.stats.msi_sent);
        let logical = addr & (1 << 2) != 0;
        let dest = (addr >> 12) & 0xff;
        if !logical && dest != 0xff && dest >= u64::from(pc.cfg.ncpus) {
            PcStats::inc(&pc.stats.msi_no_target);
        }
        (pc.msi)(addr, data);
    }
}

/// What a timer device's `poll` drives: the lines of one source.
struct SourceSink<'a, 'b> {
    chip: &'a mut IrqChip,
    source: Source,
    msi: MsiOut<'b>,
}

impl IrqSink for SourceSink<'_, '_> {
    fn set_irq(&mut self, line: u32, level: bool) {
        if !self.chip.drive(self.source, line, level, &mut self.msi) {
            PcStats::inc(&self.msi.pc.stats.lines_ignored);
        }
    }
}

/// The timer devices, by the line source each one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerId {
    Pit,
    Hpet,
    Rtc,
    PmTimer,
}

const TIMERS: [TimerId; 4] = [TimerId::Pit, TimerId::Hpet, TimerId::Rtc, TimerId::PmTimer];

impl TimerId {
    fn index(self) -> usize {
        self as usize
    }

    fn source(self) -> Source {
        match self {
            TimerId::Pit => Source::Pit,
            TimerId::Hpet => Source::Hpet,
            TimerId::Rtc => Source::Rtc,
            TimerId::PmTimer => Source::PmTimer,
        }
    }
}

/// The timer thread's sleep, as the adapters see it.
#[derive(Debug, Default)]
struct TimerWake {
    /// Held by the timer thread while it scans deadlines and until it sleeps.
    state: Mutex<()>,
    cv: Condvar,
    /// When the sleeping thread wakes on its own (host ns), or [`AWAKE`].
    sleep_until: AtomicU64,
    /// The thread will not start a round before this (host ns).
    round_floor: AtomicU64,
}

/// Which register window an adapter serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    IoApic,
    Hpet,
    PicMaster,
    PicSlave,
    Elcr,
    Pit,
    Port61,
    Rtc,
    PmTimer,
    PciAddress,
    PciData,
}

/// One register window: where it is and which adapter serves it.
#[derive(Debug, Clone, Copy)]
struct WindowDef {
    name: &'static str,
    space: Space,
    base: u64,
    len: u64,
    window: Window,
}

/// A port window (`u64::from` is not const; the widening casts are lossless).
#[allow(clippy::cast_lossless)]
const fn pio(name: &'static str, port: u16, len: u16, window: Window) -> WindowDef {
    WindowDef {
        name,
        space: Space::Pio,
        base: port as u64,
        len: len as u64,
        window,
    }
}

const fn mmio(name: &'static str, base: u64, len: u64, window: Window) -> WindowDef {
    WindowDef {
        name,
        space: Space::Mmio,
        base,
        len,
        window,
    }
}

/// Every window.
const WINDOWS: [WindowDef; 11] = [
    mmio("ioapic", IOAPIC_BASE, IOAPIC_SIZE, Window::IoApic),
    mmio("hpet", HPET_BASE, HPET_SIZE, Window::Hpet),
    pio(
        "pic-master",
        PIC_MASTER_PORT,
        PIC_PORT_LEN,
        Window::PicMaster,
    ),
    pio("pic-slave", PIC_SLAVE_PORT, PIC_PORT_LEN, Window::PicSlave),
    pio("elcr", ELCR_PORT, ELCR_PORT_LEN, Window::Elcr),
    pio("pit", PIT_PORT, PIT_PORT_LEN, Window::Pit),
    pio("port61", PORT61, PORT61_LEN, Window::Port61),
    pio("rtc", RTC_PORT, RTC_PORT_LEN, Window::Rtc),
    pio("pmtimer", PM_TIMER_PORT, PM_TIMER_LEN, Window::PmTimer),
    // One port: a dword access at 0xCF8 reaches it, 0xCF9 stays free for the reset register.
    pio(
        "pci-address",
        PCI_CONFIG_ADDRESS_PORT,
        1,
        Window::PciAddress,
    ),
    pio("pci-data", PCI_CONFIG_DATA_PORT, 4, Window::PciData),
];

/// The bus face of one window: what the exit handler locks and calls.
struct Adapter {
    pc: Arc<PcPlatform>,
    window: Window,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("window", &self.window)
            .finish()
    }
}

impl BusDevice for Adapter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.pc
            .window_access(self.window, offset, Access::Read(data));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.pc
            .window_access(self.window, offset, Access::Write(data));
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// An ISA IRQ line for a device model (the UARTs): `pulse` is an edge (assert, deassert).
struct IsaLine {
    pc: Arc<PcPlatform>,
    irq: u32,
}

impl IrqLine for IsaLine {
    fn pulse(&self) {
        self.pc.pulse_irq(self.irq);
    }
}

/// What the route mirror last installed.
#[derive(Debug, Default)]
struct RouteState {
    installed: Option<Vec<MsiRoute>>,
}

/// The in-module device set of a PC (see the module documentation).
pub struct PcPlatform {
    cfg: PcConfig,
    clock: HostClock,
    msi: MsiFn,
    requests: Arc<VmRequests>,
    irqchip: Mutex<IrqChip>,
    pit: Mutex<Pit<HostClock>>,
    hpet: Mutex<Hpet<HostClock>>,
    rtc: Mutex<Rtc<HostClock>>,
    pmtimer: Mutex<PmTimer<HostClock>>,
    pci: Mutex<PciConfigIo<BuiltinPciFunction, PCI_FUNCTIONS>>,
    /// Mirror of the HPET's legacy replacement bit, written under the `hpet` lock.
    hpet_legacy: AtomicBool,
    /// The I/O APIC's redirection-table generation the route mirror last looked at.
    route_generation: AtomicU64,
    route_sink: OnceLock<RouteSink>,
    routes: Mutex<RouteState>,
    wake: TimerWake,
    /// Each timer device's next deadline (host ns, `u64::MAX` for none), stored with the device's
    /// lock held whenever it may have changed: the timer thread reads these without locking the
    /// devices, and locks only the ones that are due.
    deadlines: [AtomicU64; 4],
    stats: PcStats,
}

impl std::fmt::Debug for PcPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcPlatform")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the platform down with it: device state stays consistent
    // between register accesses, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn due(deadline: Option<u64>, now: u64) -> bool {
    deadline.is_some_and(|d| d <= now)
}

impl PcPlatform {
    /// Builds the platform: every device in its reset state, the RTC set from the host's wall
    /// clock, all on one [`HostClock`].
    pub fn new(cfg: PcConfig, msi: MsiFn, requests: Arc<VmRequests>) -> Arc<PcPlatform> {
        let clock = HostClock::new();
        // Two functions in a registry of eight cannot fail; an empty bus would be the fallback.
        let pci: PciConfigIo<BuiltinPciFunction, PCI_FUNCTIONS> =
            standard_config_io().unwrap_or_default();
        let pc = Arc::new(PcPlatform {
            cfg,
            clock,
            msi,
            requests,
            irqchip: Mutex::new(IrqChip {
                pic: PicPair::new(),
                ioapic: IoApic::with_id(cfg.ioapic_id),
                sources: [0; PC_LINES],
                reported: 0,
                legacy_replacement: false,
            }),
            pit: Mutex::new(Pit::new(clock)),
            hpet: Mutex::new(Hpet::new(clock)),
            rtc: Mutex::new(Rtc::new(clock, &HostWallClock)),
            pmtimer: Mutex::new(PmTimer::with_sci(clock, cfg.sci_irq)),
            pci: Mutex::new(pci),
            hpet_legacy: AtomicBool::new(false),
            route_generation: AtomicU64::new(u64::MAX),
            route_sink: OnceLock::new(),
            routes: Mutex::new(RouteState::default()),
            wake: TimerWake::default(),
            deadlines: [const { AtomicU64::new(u64::MAX) }; 4],
            stats: PcStats::default(),
        });
        for id in TIMERS {
            pc.with_timer(id, |dev| pc.publish(id, dev.next_deadline_ns()));
        }
        pc
    }

    /// The configuration.
    pub fn config(&self) -> &PcConfig {
        &self.cfg
    }

    /// The counters.
    pub fn stats(&self) -> &PcStats {
        &self.stats
    }

    /// Nanoseconds on the platform's clock (the devices' time base).
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Registers every window as a fast-stage device through `add(name, space, base, len,
    /// device)`. Each range gets its own adapter, so offsets are relative to that range's base.
    pub fn register(self: &Arc<Self>, add: &mut AddDevice<'_>) -> Result<(), String> {
        for w in WINDOWS {
            let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Adapter {
                pc: self.clone(),
                window: w.window,
            }));
            add(w.name, w.space, w.base, w.len, dev)?;
        }
        Ok(())
    }

    /// An ISA IRQ line for a device model (the UART's IRQ 4 or 3).
    pub fn isa_line(self: &Arc<Self>, irq: u32) -> Arc<dyn IrqLine> {
        Arc::new(IsaLine {
            pc: self.clone(),
            irq,
        })
    }

    /// Drive `line` (below 16 an ISA IRQ, 16–31 an I/O APIC input) from outside the platform
    /// (device models, the ACPI PM1 block's SCI). All outside drivers of one line share one input
    /// of its wired OR.
    pub fn set_irq(&self, line: u32, level: bool) {
        let mut chip = lock(&self.irqchip);
        if !chip.drive(Source::External, line, level, &mut MsiOut { pc: self }) {
            PcStats::inc(&self.stats.lines_ignored);
        }
    }

    /// An edge on `line`: assert, then deassert.
    pub fn pulse_irq(&self, line: u32) {
        let mut chip = lock(&self.irqchip);
        let mut msi = MsiOut { pc: self };
        if !chip.drive(Source::External, line, true, &mut msi) {
            PcStats::inc(&self.stats.lines_ignored);
            return;
        }
        chip.drive(Source::External, line, false, &mut msi);
    }

    /// The PIC pair's INT output (for ExtINT injection by the runner).
    pub fn pic_output(&self) -> bool {
        lock(&self.irqchip).pic.intr_output()
    }

    /// If the PIC pair's INT is asserted, run its interrupt-acknowledge cycle and return the vector
    /// to inject as ExtINT.
    pub fn pic_acknowledge(&self) -> Option<u8> {
        lock(&self.irqchip).pic.pending_vector()
    }

    /// The MSI I/O APIC input `pin` would send now (`None` if masked or out of range).
    pub fn ioapic_message(&self, pin: usize) -> Option<MsiMessage> {
        lock(&self.irqchip).ioapic.msi_message(pin)
    }

    /// Sets where the I/O APIC's level-triggered entries are mirrored as KVM GSI routes (so KVM
    /// reports their EOIs); the current table is installed at once. Only the first call counts.
    pub fn set_route_sink(&self, sink: RouteSink) {
        let _ = self.route_sink.set(sink);
        self.sync_routes();
    }

    /// TMR_EN of the ACPI PM1 enable register, for whoever owns PM1: while it and TMR_STS are set,
    /// the SCI line is asserted.
    pub fn pm_timer_set_enable(&self, enable: bool) {
        let mut pm = lock(&self.pmtimer);
        pm.set_timer_enable(enable);
        let next = self.service(TimerId::PmTimer, &mut *pm, self.clock.now_ns());
        drop(pm);
        self.kick_timers(next);
    }

    /// TMR_STS: the PM timer's top bit toggled since the status was last cleared.
    pub fn pm_timer_status(&self) -> bool {
        let mut pm = lock(&self.pmtimer);
        let status = pm.timer_status();
        let next = self.service(TimerId::PmTimer, &mut *pm, self.clock.now_ns());
        drop(pm);
        self.kick_timers(next);
        status
    }

    /// Clear TMR_STS (the guest wrote 1 to PM1_STS bit 0).
    pub fn pm_timer_clear_status(&self) {
        let mut pm = lock(&self.pmtimer);
        pm.clear_timer_status();
        let next = self.service(TimerId::PmTimer, &mut *pm, self.clock.now_ns());
        drop(pm);
        self.kick_timers(next);
    }

    /// Wakes the timer thread now (after setting its stop flag, for a prompt stop).
    pub fn notify_timers(&self) {
        let _g = lock(&self.wake.state);
        self.wake.cv.notify_all();
    }

    /// Polls `dev` if it is due at `now` (routing what it drives through the irqchip); publishes
    /// and returns its next deadline. Called with `dev`'s lock held, after every access to it.
    fn service(&self, id: TimerId, dev: &mut dyn TimerDevice, now: u64) -> Option<u64> {
        if self.poll_if_due(id, dev, now) {
            PcStats::inc(&self.stats.access_polls);
        }
        let next = dev.next_deadline_ns();
        self.publish(id, next);
        next
    }

    /// Polls `dev` if its deadline has passed at `now`; returns whether it did.
    fn poll_if_due(&self, id: TimerId, dev: &mut dyn TimerDevice, now: u64) -> bool {
        if !due(dev.next_deadline_ns(), now) {
            return false;
        }
        let mut chip = lock(&self.irqchip);
        let mut sink = SourceSink {
            chip: &mut chip,
            source: id.source(),
            msi: MsiOut { pc: self },
        };
        dev.poll(now, &mut sink);
        true
    }

    /// Records `id`'s next deadline for the timer thread (with the device's lock held).
    fn publish(&self, id: TimerId, next: Option<u64>) {
        if let Some(slot) = self.deadlines.get(id.index()) {
            slot.store(next.unwrap_or(u64::MAX), Ordering::SeqCst);
        }
    }

    /// The published deadline of `id` (`u64::MAX` for none).
    fn published(&self, id: TimerId) -> u64 {
        self.deadlines
            .get(id.index())
            .map_or(u64::MAX, |d| d.load(Ordering::SeqCst))
    }

    /// Wakes the sleeping timer thread if `deadline` comes before it would wake on its own
    /// (at most once per polling round). Called with no device lock held.
    fn kick_timers(&self, deadline: Option<u64>) {
        let Some(d) = deadline else { return };
        let needs = |s: u64| s != AWAKE && d.max(self.wake.round_floor.load(Ordering::SeqCst)) < s;
        let s = self.wake.sleep_until.load(Ordering::SeqCst);
        if s != AWAKE && !needs(s) {
            return;
        }
        let _g = lock(&self.wake.state);
        // Under the lock: AWAKE means the thread has yet to scan the deadlines (it scans holding
        // this lock), so it will see this one.
        if needs(self.wake.sleep_until.load(Ordering::SeqCst)) {
            PcStats::inc(&self.stats.timer_kicks);
            // A woken thread sleeps until the end of its round and then scans every deadline:
            // say so now, so that no other access kicks it again before it runs.
            self.wake.sleep_until.store(
                self.wake.round_floor.load(Ordering::SeqCst),
                Ordering::SeqCst,
            );
            self.wake.cv.notify_one();
        }
    }

    fn window_access(&self, window: Window, offset: u64, access: Access<'_>) {
        match window {
            Window::IoApic => self.ioapic_access(offset, access),
            Window::PicMaster | Window::PicSlave | Window::Elcr => {
                let range = match window {
                    Window::PicMaster => PicRange::Master,
                    Window::PicSlave => PicRange::Slave,
                    _ => PicRange::Elcr,
                };
                let mut chip = lock(&self.irqchip);
                match access {
                    Access::Read(d) => chip.pic.read(range, offset, d),
                    Access::Write(d) => chip.pic.write(range, offset, d),
                }
            }
            Window::PciAddress | Window::PciData => {
                let mut pci = lock(&self.pci);
                match (window, access) {
                    (Window::PciAddress, Access::Read(d)) => pci.address_read(d),
                    (Window::PciAddress, Access::Write(d)) => pci.address_write(d),
                    (_, Access::Read(d)) => pci.data_read(offset, d),
                    (_, Access::Write(d)) => pci.data_write(offset, d),
                }
            }
            Window::Pit | Window::Port61 => {
                let mut pit = lock(&self.pit);
                match (window, access) {
                    (Window::Pit, Access::Read(d)) => pit.read(offset, d),
                    (Window::Pit, Access::Write(d)) => pit.write(offset, d),
                    (_, Access::Read(d)) => pit.read_port61(offset, d),
                    (_, Access::Write(d)) => pit.write_port61(offset, d),
                }
                let next = self.service(TimerId::Pit, &mut *pit, self.clock.now_ns());
                drop(pit);
                self.kick_timers(next);
            }
            Window::Rtc => {
                let mut rtc = lock(&self.rtc);
                match access {
                    Access::Read(d) => rtc.read(offset, d),
                    Access::Write(d) => rtc.write(offset, d),
                }
                let next = self.service(TimerId::Rtc, &mut *rtc, self.clock.now_ns());
                drop(rtc);
                self.kick_timers(next);
            }
            Window::PmTimer => {
                let mut pm = lock(&self.pmtimer);
                match access {
                    Access::Read(d) => pm.read(offset, d),
                    Access::Write(d) => pm.write(offset, d),
                }
                let next = self.service(TimerId::PmTimer, &mut *pm, self.clock.now_ns());
                drop(pm);
                self.kick_timers(next);
            }
            Window::Hpet => {
                let mut hpet = lock(&self.hpet);
                let wrote = matches!(access, Access::Write(_));
                match access {
                    Access::Read(d) => hpet.read(offset, d),
                    Access::Write(d) => hpet.write(offset, d),
                }
                if wrote {
                    let legacy = hpet.legacy_replacement();
                    if self.hpet_legacy.swap(legacy, Ordering::Relaxed) != legacy {
                        lock(&self.irqchip)
                            .set_legacy_replacement(legacy, &mut MsiOut { pc: self });
                    }
                }
                let next = self.service(TimerId::Hpet, &mut *hpet, self.clock.now_ns());
                drop(hpet);
                self.kick_timers(next);
            }
        }
    }

    fn ioapic_access(&self, offset: u64, access: Access<'_>) {
        let generation = {
            let mut chip = lock(&self.irqchip);
            match access {
                Access::Read(d) => {
                    chip.ioapic.read(offset, d);
                    return;
                }
                Access::Write(d) => chip.ioapic.write(offset, d),
            }
            if chip.ioapic.needs_flush() {
                chip.ioapic.flush(&mut MsiOut { pc: self });
            }
            chip.ioapic.rte_generation()
        };
        if self.route_generation.load(Ordering::Relaxed) != generation {
            self.sync_routes();
        }
    }

    /// Installs the level-triggered routes through the route sink if they changed.
    fn sync_routes(&self) {
        let Some(sink) = self.route_sink.get() else {
            return;
        };
        let mut state = lock(&self.routes);
        let table = {
            let chip = lock(&self.irqchip);
            self.route_generation
                .store(chip.ioapic.rte_generation(), Ordering::Relaxed);
            chip.level_routes()
        };
        if state.installed.as_ref() == Some(&table) {
            return;
        }
        PcStats::inc(&self.stats.route_updates);
        if let Err(e) = sink(&table) {
            let n = self.stats.route_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                eprintln!("pc: I/O APIC route table refused ({n} so far): {e}");
            }
        }
        state.installed = Some(table);
    }

    /// Runs `f` on timer device `id` with its lock held.
    fn with_timer<R>(&self, id: TimerId, f: impl FnOnce(&mut dyn TimerDevice) -> R) -> R {
        match id {
            TimerId::Pit => f(&mut *lock(&self.pit)),
            TimerId::Hpet => f(&mut *lock(&self.hpet)),
            TimerId::Rtc => f(&mut *lock(&self.rtc)),
            TimerId::PmTimer => f(&mut *lock(&self.pmtimer)),
        }
    }

    /// The timer service: sleeps until the earliest deadline of the PIT, HPET, RTC and PM timer,
    /// polls what is due and routes the lines it drives to the controllers. Returns when `stop` is
    /// set (within [`TIMER_MAX_SLEEP_NS`], at once after [`PcPlatform::notify_timers`]) or when
    /// the VM has a pending request (it is stopping).
    pub fn run_timers(self: &Arc<Self>, stop: &AtomicBool) {
        let mut floor = 0u64;
        let mut woke_early = false;
        loop {
            if stop.load(Ordering::Acquire) || self.requests.pending().is_some() {
                break;
            }
            let now = self.clock.now_ns();
            if now >= floor {
                PcStats::inc(&self.stats.timer_rounds);
                // Only the devices that are due are locked: a vCPU busy with, say, the PM timer
                // never waits for this thread, nor this thread for it.
                for id in TIMERS.into_iter().filter(|&id| self.published(id) <= now) {
                    self.with_timer(id, |dev| {
                        if self.poll_if_due(id, dev, now) {
                            PcStats::inc(&self.stats.timer_polls);
                        }
                        self.publish(id, dev.next_deadline_ns());
                    });
                }
                floor = now.saturating_add(TIMER_ROUND_NS);
                self.wake.round_floor.store(floor, Ordering::SeqCst);
                woke_early = false;
            }
            let guard = lock(&self.wake.state);
            let target = if woke_early {
                // Woken before its time in this round (a kick): sleep out the round, which takes
                // every later deadline into account and refuses further kicks.
                floor
            } else {
                // Scanned with this lock held: an access that moves a deadline after the scan
                // takes the lock after the thread sleeps and sees the published sleep.
                let earliest = TIMERS
                    .iter()
                    .map(|&id| self.published(id))
                    .min()
                    .unwrap_or(u64::MAX);
                earliest
                    .max(floor)
                    .min(now.saturating_add(TIMER_MAX_SLEEP_NS))
            };
            self.wake.sleep_until.store(target, Ordering::SeqCst);
            let wait = target.saturating_sub(self.clock.now_ns());
            let (guard, _) = self
                .wake
                .cv
                .wait_timeout(guard, Duration::from_nanos(wait))
                .unwrap_or_else(|p| p.into_inner());
            self.wake.sleep_until.store(AWAKE, Ordering::SeqCst);
            drop(guard);
            PcStats::inc(&self.stats.timer_wakeups);
            woke_early = self.clock.now_ns() < target;
        }
        self.wake.sleep_until.store(AWAKE, Ordering::SeqCst);
    }
}

impl EoiSink for PcPlatform {
    fn eoi(&self, vector: u8) {
        PcStats::inc(&self.stats.eois);
        lock(&self.irqchip)
            .ioapic
            .eoi(vector, &mut MsiOut { pc: self });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type MsiLog = Arc<Mutex<Vec<(u64, u32)>>>;

    fn platform() -> (Arc<PcPlatform>, MsiLog) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let pc = PcPlatform::new(
            PcConfig {
                ncpus: 2,
                ..PcConfig::default()
            },
            Arc::new(move |a, d| lock(&l).push((a, d))),
            Arc::new(VmRequests::new()),
        );
        (pc, log)
    }

    fn ioapic_rte(pc: &PcPlatform, pin: u8, low: u32, high: u32) {
        let sel = u32::from(0x10 + 2 * pin);
        pc.window_access(Window::IoApic, 0, Access::Write(&(sel + 1).to_le_bytes()));
        pc.window_access(Window::IoApic, 0x10, Access::Write(&high.to_le_bytes()));
        pc.window_access(Window::IoApic, 0, Access::Write(&sel.to_le_bytes()));
        pc.window_access(Window::IoApic, 0x10, Access::Write(&low.to_le_bytes()));
    }

    #[test]
    fn windows_do_not_overlap_and_leave_0xcf9_free() {
        let mut bus = crate::Bus::new();
        for (i, w) in WINDOWS.iter().enumerate() {
            let id = crate::DeviceId(u16::try_from(i).unwrap_or(0));
            assert!(bus
                .insert(w.space, w.base, w.len, id, crate::Stage::Fast)
                .is_ok());
        }
        assert!(bus.route(Space::Pio, 0xcf9).is_none());
        assert!(bus.route(Space::Pio, 0xcf8).is_some());
        assert!(bus
            .insert(
                Space::Pio,
                0xcf9,
                1,
                crate::DeviceId(99),
                crate::Stage::Fast
            )
            .is_ok());
    }

    #[test]
    fn wired_or_and_legacy_gating() {
        let (pc, log) = platform();
        ioapic_rte(&pc, 2, 0x30, 0);
        // PIT holds line 0 high (mode 0 style): one edge; an external pulse on top adds nothing.
        {
            let mut chip = lock(&pc.irqchip);
            let mut msi = MsiOut { pc: &pc };
            assert!(chip.drive(Source::Pit, 0, true, &mut msi));
            assert!(chip.drive(Source::External, 0, true, &mut msi));
            assert!(chip.drive(Source::External, 0, false, &mut msi));
        }
        assert_eq!(lock(&log).len(), 1);
        // Legacy replacement disconnects the PIT: the line falls; an HPET edge then goes through.
        {
            let mut chip = lock(&pc.irqchip);
            let mut msi = MsiOut { pc: &pc };
            chip.set_legacy_replacement(true, &mut msi);
            assert!(chip.drive(Source::Hpet, 0, true, &mut msi));
            assert!(chip.drive(Source::Hpet, 0, false, &mut msi));
            assert!(!chip.drive(Source::Hpet, 40, true, &mut msi));
        }
        assert_eq!(lock(&log).len(), 2);
        assert_eq!(lock(&log)[1], (0xFEE0_0000, 0x30));
    }

    #[test]
    fn msi_to_a_missing_cpu_is_counted() {
        let (pc, log) = platform();
        ioapic_rte(&pc, 5, 0x41, 7 << 24);
        pc.pulse_irq(5);
        ioapic_rte(&pc, 6, 0x42, 0xff << 24);
        pc.pulse_irq(6);
        assert_eq!(lock(&log).len(), 2);
        assert_eq!(pc.stats().msi_no_target.load(Ordering::Relaxed), 1);
        assert_eq!(pc.stats().msi_sent.load(Ordering::Relaxed), 2);
    }
}
