//! A 16550A UART (COM1/COM2) on top of rust-vmm's `vm-superio` register core.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::platform::BusDevice;

/// Base port of COM1 and COM2, and the length of a UART's port range.
pub const COM1_BASE: u64 = 0x3f8;
/// Base port of COM2.
pub const COM2_BASE: u64 = 0x2f8;
/// Ports a 16550 decodes.
pub const UART_LEN: u64 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// ISA IRQ of COM2.
pub const COM2_IRQ: u32 = 3;

/// How the UART raises its interrupt line (edge: vm-superio triggers once per event).
pub trait IrqLine: Send + Sync {
    /// Pulses the line.
    fn pulse(&self);
}

/// An interrupt line that goes nowhere (a guest that polls the UART).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn pulse(&self) {}
}

/// Adapter from our [`IrqLine`] to vm-superio's `Trigger`.
#[derive(Clone)]
pub struct UartTrigger(pub Arc<dyn IrqLine>);

impl std::fmt::Debug for UartTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UartTrigger")
    }
}

impl Trigger for UartTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// The UART as a bus device: register core from vm-superio, output to any writer.
pub struct Uart {
    serial: Serial<UartTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Bytes the guest wrote (for counters and boot-time measurement).
    bytes_out: u64,
    /// Host time (ns since the VM started) of the first byte the guest wrote.
    first_byte_ns: Option<u64>,
    clock: fn() -> u64,
    /// The line control register as last written (its DLAB bit decides what offset 0 is).
    lcr: u8,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart")
            .field("bytes_out", &self.bytes_out)
            .finish()
    }
}

impl Uart {
    /// A UART writing guest output to `out`, raising `irq` on events, timestamping with `clock`.
    pub fn new(out: Box<dyn Write + Send>, irq: Arc<dyn IrqLine>, clock: fn() -> u64) -> Self {
        Self {
            serial: Serial::new(UartTrigger(irq), out),
            bytes_out: 0,
            first_byte_ns: None,
            clock,
            lcr: 0,
        }
    }

    /// Queues host input bytes for the guest to read; returns how many fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = bytes.len().min(room);
        self.serial
            .enqueue_raw_bytes(&bytes[..n])
            .unwrap_or_default()
    }

    /// Bytes the guest has written to the transmit register.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// When the first output byte was written, if any.
    pub fn first_byte_ns(&self) -> Option<u64> {
        self.first_byte_ns
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only byte accesses are meaningful; wider reads see the register in the low byte.
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if off == 3 {
            self.lcr = v;
        }
        // Offset 0 is the transmit register unless DLAB selects the divisor latch.
        if off == 0 && self.lcr & 0x80 == 0 {
            self.bytes_out += 1;
            if self.first_byte_ns.is_none() {
                self.first_byte_ns = Some((self.clock)());
            }
        }
        // Errors are host output errors (a closed stdout); the guest cannot be told, drop them.
        let _ = self.serial.write(off, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::models::test_sink::Sink;

    struct Count(AtomicU32);
    impl IrqLine for Count {
        fn pulse(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The register file behaves the same whatever the output is: here output goes through the
    /// console ring to a writer thread, as the front end wires it.
    #[test]
    fn interrupts_and_status_with_output_through_the_console_ring() {
        const IER: u64 = 1;
        const IIR: u64 = 2;
        const LSR: u64 = 5;
        let sink = Sink::default();
        let (ring, mut writer) =
            crate::models::console::spawn("uart-test-out", Box::new(sink.clone()), 4).unwrap();
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let mut u = Uart::new(Box::new(ring), irq.clone(), || 7);
        let read = |u: &mut Uart, off: u64| {
            let mut d = [0u8];
            u.read(off, &mut d);
            d[0]
        };
        assert_eq!(read(&mut u, LSR), 0x60, "THR empty and transmitter idle");
        assert_eq!(read(&mut u, IIR), 0xc1, "FIFOs on, no interrupt pending");
        // Enabling the THR-empty interrupt raises it at once (the THR is empty).
        u.write(IER, &[0x02]);
        assert_eq!(irq.0.load(Ordering::Relaxed), 1);
        assert_eq!(read(&mut u, IIR), 0xc2, "THR empty pending");
        assert_eq!(read(&mut u, IIR), 0xc1, "reading IIR acknowledged it");
        // Every transmitted byte empties the THR again: one more interrupt each, even with the
        // ring (4 bytes) full behind a slower writer.
        for (i, b) in b"hello, world".iter().enumerate() {
            u.write(0, &[*b]);
            assert_eq!(irq.0.load(Ordering::Relaxed), 2 + u32::try_from(i).unwrap());
            assert_eq!(read(&mut u, IIR), 0xc2);
            assert_eq!(read(&mut u, LSR), 0x60);
        }
        // Interrupts off: bytes still go out, no interrupt.
        u.write(IER, &[0x00]);
        u.write(0, b"!");
        assert_eq!(irq.0.load(Ordering::Relaxed), 13);
        assert_eq!(read(&mut u, IIR), 0xc1);
        // DLAB: the divisor latch, not the data registers.
        u.write(3, &[0x80]);
        u.write(0, &[0x0c]);
        assert_eq!(read(&mut u, 0), 0x0c);
        u.write(3, &[0x03]);
        assert!(writer.finish(std::time::Duration::from_secs(10)));
        assert_eq!(&*sink.0.lock().unwrap(), b"hello, world!");
        assert_eq!(u.bytes_out(), 13);
        assert_eq!(u.first_byte_ns(), Some(7));
    }

    #[test]
    fn transmits_bytes_and_reads_input() {
        let sink = Sink::default();
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let mut u = Uart::new(Box::new(sink.clone()), irq.clone(), || 42);
        for b in b"hi" {
            u.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_eq!(u.bytes_out(), 2);
        assert_eq!(u.first_byte_ns(), Some(42));
        // Enable the received-data interrupt, then feed input.
        u.write(1, &[0x01]);
        assert_eq!(u.enqueue_input(b"x"), 1);
        assert!(irq.0.load(Ordering::Relaxed) >= 1);
        let mut lsr = [0u8];
        u.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        u.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        // Odd accesses never panic.
        u.read(0x1_0000, &mut [0u8; 4]);
        u.write(3, &[]);
    }
}
