//! Small fast-stage platform devices: the debug-exit port, the i8042 reset line, the boot-done port.

use std::sync::Arc;
use std::time::Instant;

use crate::platform::{le_value, BusDevice, VmRequest, VmRequests};

/// The isa-debug-exit port (QEMU's convention, used by standard x86 test kernels).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Our boot-done port: the guest writes any value once when it has booted, so the monitor can time it.
pub const BOOT_DONE_PORT: u64 = 0xf5;
/// The i8042 data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// The i8042 command/status port (0x61, between them, is the PIT's port 0x61).
pub const I8042_COMMAND_PORT: u64 = 0x64;

/// Legacy ports a guest is expected to probe where this machine has nothing: the COM3/COM4 bases
/// (and COM2's when it is not configured), whose whole 8-port window Linux's 8250 driver probes on
/// every boot, and 0xCFA–0xCFB beside the PCI configuration address (Linux's mechanism #1 probe
/// writes a byte to 0xCFB).
pub const COM3_BASE: u64 = 0x3e8;
/// Base port of COM4.
pub const COM4_BASE: u64 = 0x2e8;
/// The two ports between the reset control register 0xCF9 and the PCI data port 0xCFC.
pub const PCI_CFA_PORT: u64 = 0xcfa;
/// Length of the window at [`PCI_CFA_PORT`].
pub const PCI_CFA_LEN: u64 = 2;

/// A claimed window with nothing behind it (a floating ISA bus): reads are all-ones, writes are
/// dropped — exactly what an unclaimed access gets, without the "unclaimed" log line. For ports a
/// guest probes on every boot, whose silence is expected.
#[derive(Debug, Default, Clone, Copy)]
pub struct Absent;

impl BusDevice for Absent {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// A write of `v` ends the VM with status `(v << 1) | 1`.
#[derive(Debug)]
pub struct DebugExit {
    requests: Arc<VmRequests>,
}

impl DebugExit {
    /// The device, raising its request on `requests`.
    pub fn new(requests: Arc<VmRequests>) -> Self {
        Self { requests }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let v = u32::try_from(le_value(data) & 0xffff_ffff).unwrap_or(u32::MAX);
        self.requests.request(VmRequest::DebugExit(v));
    }
}

/// Just enough of an i8042 keyboard controller for the reset line: command 0xfe on port 0x64 pulses
/// the CPU reset, which ends the VM with the reboot status. Status reads say "no data, input empty"
/// so a kernel's probe gives up quickly. One instance per port (0x60 data, 0x64 command/status).
#[derive(Debug)]
pub struct I8042 {
    requests: Arc<VmRequests>,
    command_port: bool,
}

impl I8042 {
    /// The data port (0x60).
    pub fn data_port(requests: Arc<VmRequests>) -> Self {
        Self {
            requests,
            command_port: false,
        }
    }

    /// The command/status port (0x64).
    pub fn command_port(requests: Arc<VmRequests>) -> Self {
        Self {
            requests,
            command_port: true,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing pending.
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if self.command_port && data.first() == Some(&0xfe) {
            self.requests.request(VmRequest::Reset);
        }
    }
}

/// The boot-done port: the first write records the host time.
#[derive(Debug)]
pub struct BootDone {
    requests: Arc<VmRequests>,
    start: Instant,
}

impl BootDone {
    /// The device; times are measured from `start`.
    pub fn new(requests: Arc<VmRequests>, start: Instant) -> Self {
        Self { requests, start }
    }
}

impl BusDevice for BootDone {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.requests.set_boot_done(ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_and_reset_raise_requests() {
        let r = Arc::new(VmRequests::new());
        DebugExit::new(r.clone()).write(0, &[0x10, 0, 0, 0]);
        assert_eq!(r.pending(), Some(VmRequest::DebugExit(0x10)));
        assert_eq!(r.pending().unwrap().exit_status(), 0x21);

        let r = Arc::new(VmRequests::new());
        let (mut data, mut cmd) = (I8042::data_port(r.clone()), I8042::command_port(r.clone()));
        cmd.write(0, &[0xd1]);
        assert_eq!(r.pending(), None);
        data.write(0, &[0xfe]);
        assert_eq!(r.pending(), None, "0xfe on the data port is not a reset");
        let mut st = [0xffu8];
        cmd.read(0, &mut st);
        assert_eq!(st, [0], "status: both buffers empty");
        cmd.write(0, &[0xfe]);
        assert_eq!(r.pending(), Some(VmRequest::Reset));
    }

    #[test]
    fn boot_done_records_first_write() {
        let r = Arc::new(VmRequests::new());
        let mut b = BootDone::new(r.clone(), Instant::now());
        assert_eq!(r.boot_done(), None);
        b.write(0, &[1]);
        let t = r.boot_done().unwrap();
        b.write(0, &[1]);
        assert_eq!(r.boot_done(), Some(t));
    }
}

/// Base of the slow-stage scratch test device (ports).
pub const SCRATCH_SLOW_PORT: u64 = 0x500;
/// Base of the fast-stage scratch test device (ports).
pub const SCRATCH_FAST_PORT: u64 = 0x510;
/// Ports a scratch device decodes.
pub const SCRATCH_PORT_LEN: u64 = 16;
/// Base of the slow-stage scratch memory (MMIO).
pub const SCRATCH_MMIO_BASE: u64 = 0xd000_0000;
/// Bytes of scratch memory.
pub const SCRATCH_MMIO_LEN: u64 = 0x1000;

/// A register test device for the test guests: offset 0 stores a value and counts writes; offset 4
/// reads the write count; offset 8 returns a read counter that advances on every read.
#[derive(Debug, Default)]
pub struct Scratch {
    value: u32,
    writes: u32,
    reads: u32,
}

impl BusDevice for Scratch {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.value,
            4 => self.writes,
            8 => {
                let r = self.reads;
                self.reads = self.reads.wrapping_add(1);
                r
            }
            _ => return,
        };
        crate::platform::put_le_value(data, u64::from(v));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.value = u32::try_from(le_value(data) & 0xffff_ffff).unwrap_or(0);
            self.writes = self.writes.wrapping_add(1);
        }
    }
}

/// Scratch memory for the MMIO test guest: reads return what was written, at any width up to 8.
#[derive(Debug)]
pub struct ScratchMem {
    bytes: Box<[u8]>,
}

impl Default for ScratchMem {
    fn default() -> Self {
        Self {
            bytes: vec![0; usize::try_from(SCRATCH_MMIO_LEN).unwrap_or(4096)].into_boxed_slice(),
        }
    }
}

impl ScratchMem {
    fn window(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        self.bytes.get_mut(start..end)
    }
}

impl BusDevice for ScratchMem {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(w) = self.window(offset, data.len()) {
            data.copy_from_slice(w);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(w) = self.window(offset, data.len()) {
            w.copy_from_slice(data);
        }
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    #[test]
    fn absent_reads_all_ones_and_ignores_writes() {
        let mut a = Absent;
        for len in [1usize, 2, 4] {
            let mut d = vec![0u8; len];
            a.read(1, &mut d);
            assert!(d.iter().all(|&b| b == 0xff), "{len}-byte read: {d:?}");
        }
        a.write(0, &[0x80]);
        let mut d = [0u8];
        a.read(0, &mut d);
        assert_eq!(
            d,
            [0xff],
            "a written value does not stick (no scratch register)"
        );
    }

    #[test]
    fn scratch_counts_and_echoes() {
        let mut s = Scratch::default();
        s.write(0, &7u32.to_le_bytes());
        s.write(0, &9u32.to_le_bytes());
        let mut d = [0u8; 4];
        s.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 9);
        s.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2);
        s.read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        s.read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);

        let mut m = ScratchMem::default();
        m.write(8, &0x1122334455667788u64.to_le_bytes());
        let mut w = [0u8; 2];
        m.read(10, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5566);
        // Out of the window: nothing happens, no panic.
        m.write(4095, &[1, 2]);
        m.read(u64::MAX, &mut w);
    }
}
