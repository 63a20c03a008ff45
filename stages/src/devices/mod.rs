//! The in-module ("in-kernel") device cores: register-level, no runtime dependencies.
//!
//! These are the devices bhyve keeps inside vmm.ko (`sys/amd64/vmm/io/`), at bhyve's addresses:
//!
//! | device | module | where | bhyve |
//! |---|---|---|---|
//! | I/O APIC | [`ioapic`] | MMIO [`ioapic::IOAPIC_BASE`] (0xFEC0_0000), 4 KiB | `vioapic.c` |
//! | 8259A PIC pair + ELCR | [`pic`] | ports 0x20–0x21, 0xA0–0xA1, 0x4D0–0x4D1 | `vatpic.c` |
//! | 8254 PIT + port 0x61 | [`pit`] | ports 0x40–0x43, 0x61 | `vatpit.c` |
//! | HPET | [`hpet`] | MMIO [`hpet::HPET_BASE`] (0xFED0_0000), 1 KiB | `vhpet.c` |
//! | MC146818 RTC/CMOS | [`rtc`] | ports 0x70–0x71 | `vrtc.c` |
//! | ACPI PM timer | [`pmtimer`] | port 0x408 (4 bytes) | `vpmtmr.c` |
//! | PCI configuration mechanism #1 | [`pci`] | ports 0xCF8–0xCFF | `pci_emul.c` (user space in bhyve) |
//!
//! Each device is a plain struct: no locks, no threads, no heap, no host calls. It is generic over
//! where it reads time ([`Clock`], and [`WallClock`] for the RTC's initial date) and takes the
//! interrupt plumbing ([`IrqSink`], [`MsiSink`]) as arguments of the calls that may raise an
//! interrupt. A bus adapter outside this module maps addresses to offsets; **a device only ever sees
//! offsets relative to its own base**, through `read(offset, &mut [u8])` / `write(offset, &[u8])`
//! where the slice length is the access width.
//!
//! # Access widths
//!
//! Every device accepts any offset and any slice length without panicking. What an access of an
//! unsupported width does is documented per device and follows bhyve where bhyve defines it: MMIO
//! devices (I/O APIC, HPET) read 0 and ignore writes of a width or alignment they do not decode (as
//! `vioapic_mmio_rw`/`vhpet_mmio_read` do); byte-wide ISA port devices (PIC, PIT, RTC) treat a wider
//! access as consecutive byte accesses, as the ISA bus would; the PM timer and the PCI data port read
//! all-ones for accesses they cannot decode.
//!
//! # Interrupt lines ([`IrqSink`])
//!
//! A line number below 16 is an **ISA IRQ**: the PIC input of the same number, and the I/O APIC input
//! given by [`isa_irq_to_gsi`] (ISA IRQ 0 is wired to GSI 2, the rest identity, as in bhyve's MADT
//! interrupt source override). A line number of 16 or more is an I/O APIC input (GSI) only.
//! `level == true` means *asserted*; polarity inversion belongs to the wire, not to the sources (bhyve
//! ignores the redirection-table polarity bit the same way). Edge-style sources send a pulse: an
//! assertion immediately followed by a deassertion. [`router::IsaIrqRouter`] is the stock
//! implementation that fans a line out to a [`pic::PicPair`] and an [`ioapic::IoApic`].
//!
//! # Timer protocol ([`TimerDevice`])
//!
//! Timers keep time from the [`Clock`] (host monotonic nanoseconds), never by counting exits. Each
//! timer device reports the earliest time it needs attention with
//! [`TimerDevice::next_deadline_ns`] and does everything that is due in [`TimerDevice::poll`].
//! Register accesses never call an interrupt sink themselves: an access that changes an output line
//! (reading RTC register C, clearing an HPET status bit, reprogramming the PIT) latches the change
//! and makes `next_deadline_ns` return a time in the past (`Some(0)`). The runner's contract is
//! therefore: **after every access to a timer device, and whenever the earliest deadline has passed,
//! call `poll(now)` before re-entering the guest.** [`service`] does exactly that.
//!
//! A hostile guest cannot turn a timer into an interrupt storm:
//! * a periodic timer asserts its line at most once per `poll`, however long the runner stalled:
//!   missed periods are coalesced into that one assertion and the next deadline is the next period
//!   boundary after `now`;
//! * periods shorter than [`MIN_TIMER_PERIOD_NS`] are clamped to it for interrupt generation (the
//!   guest-visible counters still count at the programmed rate);
//! * one-shot timers fire once per programming (or once per 2^32 ticks for a 32-bit HPET timer).

pub mod fuzz;
pub mod hpet;
pub mod ioapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod pmtimer;
pub mod router;
pub mod rtc;
pub mod testing;

pub use router::{isa_irq_to_gsi, IsaIrqRouter};

/// Nanoseconds in one second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// The shortest interrupt period any timer here will generate: 100 µs (10 kHz).
///
/// A PIT with count 1, or an HPET timer whose period is one tick, would otherwise ask for an
/// interrupt every 838 ns or 100 ns. The floor is chosen below the fastest rate real guests program
/// (the RTC's 8192 Hz periodic rate, 122 µs, and 1 ms kernel ticks are untouched) and at half of
/// KVM's own floor for its in-kernel PIT and LAPIC timer (`min_timer_period_us`, 200 µs).
pub const MIN_TIMER_PERIOD_NS: u64 = 100_000;

/// Host monotonic time, as seen by the device cores.
///
/// Implementations must be monotonic (never go backwards); the devices tolerate a clock that
/// stands still or jumps forward. Tests use [`testing::ManualClock`].
pub trait Clock {
    /// Nanoseconds since an arbitrary fixed origin.
    fn now_ns(&self) -> u64;
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

/// A point in wall-clock time: seconds since 1970-01-01T00:00:00 UTC plus nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct WallTime {
    /// Whole seconds since the epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds within the second, `0..1_000_000_000` (larger values are clamped by users).
    pub nanos: u32,
}

/// The host's wall clock, read by the RTC when it is created or re-synchronised.
pub trait WallClock {
    /// The current wall-clock time.
    fn wall_now(&self) -> WallTime;
}

impl<T: WallClock + ?Sized> WallClock for &T {
    fn wall_now(&self) -> WallTime {
        (**self).wall_now()
    }
}

/// Drives interrupt lines (ISA IRQs below 16, I/O APIC inputs from 16 up; see the module docs).
pub trait IrqSink {
    /// Set `line` to `level` (`true` = asserted).
    fn set_irq(&mut self, line: u32, level: bool);
}

impl<T: IrqSink + ?Sized> IrqSink for &mut T {
    fn set_irq(&mut self, line: u32, level: bool) {
        (**self).set_irq(line, level);
    }
}

/// Sends a message-signalled interrupt to the local APICs, in the x86 MSI format
/// (address 0xFEEx_xxxx, data = vector | delivery mode << 8 | level << 14 | trigger << 15).
///
/// The runner turns this into `KVM_SIGNAL_MSI` towards KVM's in-kernel LAPIC.
pub trait MsiSink {
    /// Deliver one MSI.
    fn send_msi(&mut self, addr: u64, data: u32);
}

impl<T: MsiSink + ?Sized> MsiSink for &mut T {
    fn send_msi(&mut self, addr: u64, data: u32) {
        (**self).send_msi(addr, data);
    }
}

/// The timer protocol every time-keeping device implements (PIT, HPET, RTC, PM timer).
///
/// The trait is object safe, so a runner can keep its timers as `&mut dyn TimerDevice` and arm one
/// host timer for the earliest deadline among them.
pub trait TimerDevice {
    /// The earliest host-monotonic time (ns, same clock as [`Clock::now_ns`]) at which the device
    /// needs [`TimerDevice::poll`], or `None` when nothing is scheduled. A value at or before the
    /// current time (the devices use `Some(0)` for latched line changes) means "poll now".
    fn next_deadline_ns(&self) -> Option<u64>;

    /// Do everything due at `now_ns`: fire expired timers (at most one assertion per timer per call,
    /// missed periods coalesced) and deliver latched line changes to `irq`. Calling it early or
    /// repeatedly is harmless.
    fn poll(&mut self, now_ns: u64, irq: &mut dyn IrqSink);
}

/// Poll `dev` if its deadline has passed at `now_ns`; returns whether it was polled.
///
/// This is the runner's whole obligation under the timer protocol: call it after every access to
/// `dev` and whenever a host timer armed for [`TimerDevice::next_deadline_ns`] expires.
pub fn service<T: TimerDevice + ?Sized>(dev: &mut T, now_ns: u64, irq: &mut dyn IrqSink) -> bool {
    match dev.next_deadline_ns() {
        Some(deadline) if deadline <= now_ns => {
            dev.poll(now_ns, irq);
            true
        }
        _ => false,
    }
}

/// Little-endian value carried by an access of width 1, 2, 4 or 8; `None` for any other width.
pub(crate) fn le_value(data: &[u8]) -> Option<u64> {
    match data.len() {
        1 | 2 | 4 | 8 => {
            let mut buf = [0u8; 8];
            for (dst, src) in buf.iter_mut().zip(data.iter()) {
                *dst = *src;
            }
            Some(u64::from_le_bytes(buf))
        }
        _ => None,
    }
}

/// Fill `data` with the low bytes of `value`, little-endian (bytes past 8 are zero).
pub(crate) fn fill_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, dst) in data.iter_mut().enumerate() {
        *dst = bytes.get(i).copied().unwrap_or(0);
    }
}

/// Fill `data` with all-ones (the "nothing answered" value of the PC buses).
pub(crate) fn fill_ones(data: &mut [u8]) {
    for b in data.iter_mut() {
        *b = 0xff;
    }
}

/// Low byte of a value (a truncation made explicit).
pub(crate) fn lo8(value: u64) -> u8 {
    value.to_le_bytes()[0]
}

/// Low 32 bits of a value (a truncation made explicit).
pub(crate) fn lo32(value: u64) -> u32 {
    let b = value.to_le_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// `ceil(a * b / c)` in 128-bit arithmetic, saturated to `u64`; `c == 0` gives `u64::MAX`.
pub(crate) fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return u64::MAX;
    }
    let num = u128::from(a) * u128::from(b);
    let c = u128::from(c);
    let q = num / c + u128::from(num % c != 0);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// `floor(a * b / c)` in 128-bit arithmetic, saturated to `u64`; `c == 0` gives `u64::MAX`.
pub(crate) fn mul_div_floor(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return u64::MAX;
    }
    let q = u128::from(a) * u128::from(b) / u128::from(c);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// The level of one output line, with the changes not yet reported to an [`IrqSink`].
///
/// Register accesses change `level`; `flush` (called from `poll`) reports it. A high-low-high
/// sequence between two flushes is reported as a low then a high, so an edge is never lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LineLatch {
    level: bool,
    reported: bool,
    dipped: bool,
}

impl LineLatch {
    /// Set the line's level.
    pub(crate) fn set(&mut self, level: bool) {
        if self.level && !level {
            self.dipped = true;
        }
        self.level = level;
    }

    /// Whether `flush` would call the sink.
    pub(crate) fn dirty(&self) -> bool {
        self.level != self.reported || (self.dipped && self.reported)
    }

    /// Report pending changes of `line` to `sink`.
    pub(crate) fn flush(&mut self, line: u32, sink: &mut dyn IrqSink) {
        if self.dipped && self.reported {
            sink.set_irq(line, false);
            self.reported = false;
        }
        self.dipped = false;
        if self.level != self.reported {
            sink.set_irq(line, self.level);
            self.reported = self.level;
        }
    }
}

/// A host monotonic clock from `std::time::Instant` (nanoseconds since the clock was created).
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    origin: std::time::Instant,
}

#[cfg(feature = "std")]
impl HostClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        HostClock {
            origin: std::time::Instant::now(),
        }
    }
}

#[cfg(feature = "std")]
impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "std")]
impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The host's wall clock from `std::time::SystemTime`.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy, Default)]
pub struct HostWallClock;

#[cfg(feature = "std")]
impl WallClock for HostWallClock {
    fn wall_now(&self) -> WallTime {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => WallTime {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: negative seconds, nanoseconds counted forward within the second.
                let d = e.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                if d.subsec_nanos() == 0 {
                    WallTime {
                        secs: -secs,
                        nanos: 0,
                    }
                } else {
                    WallTime {
                        secs: -secs - 1,
                        nanos: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::IrqRecorder;
    use super::*;

    #[test]
    fn le_helpers_round_trip_and_reject_odd_widths() {
        assert_eq!(le_value(&[0x34, 0x12]), Some(0x1234));
        assert_eq!(le_value(&[1, 2, 3]), None);
        assert_eq!(le_value(&[]), None);
        let mut b = [0u8; 3];
        fill_le(&mut b, 0x00ab_cdef);
        assert_eq!(b, [0xef, 0xcd, 0xab]);
        let mut big = [0u8; 10];
        fill_le(&mut big, u64::MAX);
        assert_eq!(big[8], 0);
        fill_ones(&mut b);
        assert_eq!(b, [0xff; 3]);
    }

    #[test]
    fn mul_div_saturates_and_survives_zero() {
        assert_eq!(mul_div_ceil(3, 1, 2), 2);
        assert_eq!(mul_div_floor(3, 1, 2), 1);
        assert_eq!(mul_div_floor(u64::MAX, u64::MAX, 1), u64::MAX);
        assert_eq!(mul_div_ceil(1, 1, 0), u64::MAX);
    }

    #[test]
    fn line_latch_reports_a_dip_between_flushes() {
        let mut l = LineLatch::default();
        let mut rec = IrqRecorder::new();
        l.set(true);
        assert!(l.dirty());
        l.flush(8, &mut rec);
        assert_eq!(rec.rising(8), 1);
        l.set(false);
        l.set(true);
        assert!(l.dirty());
        l.flush(8, &mut rec);
        assert_eq!(rec.rising(8), 2, "high-low-high must produce a second edge");
        assert!(rec.level(8));
        assert!(!l.dirty());
    }
}
