//! Platform plumbing shared by the fast devices and the runner: the device trait the bus dispatches to,
//! and the VM-level requests a device can make (power off, reset, debug exit, boot done).

use core::sync::atomic::{AtomicU64, Ordering};

/// A device on the bus. It sees offsets relative to its own base, never addresses.
///
/// `data.len()` is the access width (1, 2, 4 or 8; anything else must be handled without panicking).
/// The bus fills `data` with all-ones before `read`, so a device that does not implement a register
/// leaves it as an unclaimed read would.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Receives end-of-interrupt notifications for level-triggered vectors routed through our I/O APIC
/// (`KVM_EXIT_IOAPIC_EOI`), on the vCPU thread that took the EOI.
pub trait EoiSink: Send + Sync {
    /// The guest's local APIC signalled EOI for `vector`.
    fn eoi(&self, vector: u8);
}

/// What a device can ask of the VM as a whole. Exit statuses follow bhyve(8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// Guest reset (i8042 0xfe, ACPI reset register): bhyve exits 0.
    Reset,
    /// Guest power-off (ACPI S5): bhyve exits 1.
    PowerOff,
    /// Guest halted (all vCPUs halted with interrupts off): bhyve exits 2.
    Halt,
    /// Triple fault: bhyve exits 3.
    TripleFault,
    /// The isa-debug-exit convention: a write of `v` ends the VM with status `(v << 1) | 1`.
    DebugExit(u32),
}

impl VmRequest {
    /// The process exit status bhyve(8) reports for this request.
    pub fn exit_status(self) -> i32 {
        match self {
            VmRequest::Reset => 0,
            VmRequest::PowerOff => 1,
            VmRequest::Halt => 2,
            VmRequest::TripleFault => 3,
            // Only the low byte reaches a process exit status, as with QEMU's isa-debug-exit.
            VmRequest::DebugExit(v) => i32::from(u8::try_from((v << 1 | 1) & 0xff).unwrap_or(0xff)),
        }
    }

    fn encode(self) -> u64 {
        match self {
            VmRequest::Reset => 1 << 32,
            VmRequest::PowerOff => 2 << 32,
            VmRequest::Halt => 3 << 32,
            VmRequest::TripleFault => 4 << 32,
            VmRequest::DebugExit(v) => (5 << 32) | u64::from(v),
        }
    }

    fn decode(v: u64) -> Option<Self> {
        let low = u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        match v >> 32 {
            1 => Some(VmRequest::Reset),
            2 => Some(VmRequest::PowerOff),
            3 => Some(VmRequest::Halt),
            4 => Some(VmRequest::TripleFault),
            5 => Some(VmRequest::DebugExit(low)),
            _ => None,
        }
    }
}

/// VM-wide request word and boot-done timestamp, shared by every vCPU and the device-model side.
/// The first request wins; later ones are ignored (a VM stops once).
#[derive(Debug, Default)]
pub struct VmRequests {
    request: AtomicU64,
    boot_done: AtomicU64,
}

impl VmRequests {
    /// No request pending.
    pub const fn new() -> Self {
        Self {
            request: AtomicU64::new(0),
            boot_done: AtomicU64::new(0),
        }
    }

    /// Records `req` unless another request came first. Returns whether this one won.
    pub fn request(&self, req: VmRequest) -> bool {
        self.request
            .compare_exchange(0, req.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The pending request, if any.
    #[inline]
    pub fn pending(&self) -> Option<VmRequest> {
        VmRequest::decode(self.request.load(Ordering::Acquire))
    }

    /// Records the boot-done timestamp (first write wins).
    pub fn set_boot_done(&self, now_ns: u64) {
        let _ =
            self.boot_done
                .compare_exchange(0, now_ns.max(1), Ordering::AcqRel, Ordering::Acquire);
    }

    /// The boot-done timestamp, if the guest signalled it.
    pub fn boot_done(&self) -> Option<u64> {
        match self.boot_done.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }
}

/// Little-endian value of an access of 1 to 8 bytes (longer slices use the first 8 bytes).
#[inline]
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes `v` little-endian into `data` (truncated to its width, at most 8 bytes).
#[inline]
pub fn put_le_value(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_statuses_match_bhyve() {
        let r = VmRequests::new();
        assert_eq!(r.pending(), None);
        assert!(r.request(VmRequest::DebugExit(0x21)));
        assert!(!r.request(VmRequest::PowerOff));
        assert_eq!(r.pending(), Some(VmRequest::DebugExit(0x21)));
        assert_eq!(VmRequest::DebugExit(0x21).exit_status(), 0x43);
        assert_eq!(VmRequest::DebugExit(0).exit_status(), 1);
        assert_eq!(VmRequest::Reset.exit_status(), 0);
        assert_eq!(VmRequest::PowerOff.exit_status(), 1);
        assert_eq!(VmRequest::Halt.exit_status(), 2);
        assert_eq!(VmRequest::TripleFault.exit_status(), 3);
    }

    #[test]
    fn le_helpers_handle_every_width() {
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[]), 0);
        assert_eq!(le_value(&[1; 12]), 0x0101_0101_0101_0101);
        let mut d = [0u8; 3];
        put_le_value(&mut d, 0xaabbccdd);
        assert_eq!(d, [0xdd, 0xcc, 0xbb]);
    }
}
