//! Shared by the `pc_*` tests (included with `#[path]`): a bus that dispatches the way the exit
//! handler does (route, lock the device, call it with the offset), a recording MSI closure, and a
//! timer thread handle. Compiled as its own (empty) test crate too, hence the allow.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stages::pc::{PcConfig, PcPlatform};
use stages::{Bus, BusDevice, DeviceId, Space, Stage, VmRequests};

/// The fast-stage bus as the exit handler sees it.
pub struct TestBus {
    bus: Bus,
    devices: Vec<(String, Arc<Mutex<dyn BusDevice>>)>,
}

impl std::fmt::Debug for TestBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBus").field("bus", &self.bus).finish()
    }
}

impl TestBus {
    /// Every window of `pc`, registered through `PcPlatform::register`.
    pub fn new(pc: &Arc<PcPlatform>) -> Self {
        let mut bus = Bus::new();
        let mut devices: Vec<(String, Arc<Mutex<dyn BusDevice>>)> = Vec::new();
        pc.register(&mut |name, space, base, len, dev| {
            let id = DeviceId(u16::try_from(devices.len()).map_err(|e| e.to_string())?);
            bus.insert(space, base, len, id, Stage::Fast)
                .map_err(|e| format!("{name}: {e}"))?;
            devices.push((name.to_string(), dev));
            Ok(())
        })
        .expect("register the platform");
        TestBus { bus, devices }
    }

    /// Names of the registered windows.
    pub fn names(&self) -> Vec<String> {
        self.devices.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Whether anything claims `addr`.
    pub fn claimed(&self, space: Space, addr: u64) -> bool {
        self.bus.route(space, addr).is_some()
    }

    pub fn write(&self, space: Space, addr: u64, data: &[u8]) {
        if let Some(r) = self.bus.route(space, addr) {
            let dev = &self.devices[usize::from(r.device.0)].1;
            dev.lock().unwrap().write(r.offset, data);
        }
    }

    /// A read of `width` bytes; unclaimed reads are all-ones, as the handler fills them.
    pub fn read(&self, space: Space, addr: u64, width: usize) -> u64 {
        let mut buf = [0xffu8; 8];
        if let Some(r) = self.bus.route(space, addr) {
            let dev = &self.devices[usize::from(r.device.0)].1;
            dev.lock().unwrap().read(r.offset, &mut buf[..width]);
        }
        let mut out = [0u8; 8];
        out[..width].copy_from_slice(&buf[..width]);
        u64::from_le_bytes(out)
    }

    pub fn outb(&self, port: u16, v: u8) {
        self.write(Space::Pio, u64::from(port), &[v]);
    }

    pub fn outl(&self, port: u16, v: u32) {
        self.write(Space::Pio, u64::from(port), &v.to_le_bytes());
    }

    pub fn inb(&self, port: u16) -> u8 {
        self.read(Space::Pio, u64::from(port), 1).to_le_bytes()[0]
    }

    pub fn inl(&self, port: u16) -> u32 {
        u32::try_from(self.read(Space::Pio, u64::from(port), 4)).unwrap()
    }

    pub fn mmio_write32(&self, addr: u64, v: u32) {
        self.write(Space::Mmio, addr, &v.to_le_bytes());
    }

    pub fn mmio_write64(&self, addr: u64, v: u64) {
        self.write(Space::Mmio, addr, &v.to_le_bytes());
    }

    pub fn mmio_read32(&self, addr: u64) -> u32 {
        u32::try_from(self.read(Space::Mmio, addr, 4)).unwrap()
    }

    pub fn mmio_read64(&self, addr: u64) -> u64 {
        self.read(Space::Mmio, addr, 8)
    }

    /// Programs I/O APIC redirection entry `pin` as a guest does (high dword first).
    pub fn ioapic_rte(&self, pin: u8, low: u32, dest: u8) {
        let sel = u32::from(0x10 + 2 * pin);
        self.mmio_write32(0xFEC0_0000, sel + 1);
        self.mmio_write32(0xFEC0_0010, u32::from(dest) << 24);
        self.mmio_write32(0xFEC0_0000, sel);
        self.mmio_write32(0xFEC0_0010, low);
    }

    /// Reads the low dword of redirection entry `pin`.
    pub fn ioapic_rte_low(&self, pin: u8) -> u32 {
        self.mmio_write32(0xFEC0_0000, u32::from(0x10 + 2 * pin));
        self.mmio_read32(0xFEC0_0010)
    }

    /// Programs PIT channel 0 in `mode` with `count` (LSB then MSB).
    pub fn pit_program(&self, mode: u8, count: u16) {
        self.outb(0x43, 0x30 | (mode << 1));
        let [lo, hi] = count.to_le_bytes();
        self.outb(0x40, lo);
        self.outb(0x40, hi);
    }

    pub fn rtc_write(&self, index: u8, v: u8) {
        self.outb(0x70, index);
        self.outb(0x71, v);
    }

    pub fn rtc_read(&self, index: u8) -> u8 {
        self.outb(0x70, index);
        self.inb(0x71)
    }
}

/// Every MSI the platform sent, per vector, and the address of the latest.
#[derive(Debug)]
pub struct MsiLog {
    per_vector: Vec<AtomicU64>,
    pub total: AtomicU64,
    pub last_address: AtomicU64,
}

impl MsiLog {
    pub fn new() -> Arc<Self> {
        Arc::new(MsiLog {
            per_vector: (0..256).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            last_address: AtomicU64::new(0),
        })
    }

    pub fn record(&self, addr: u64, data: u32) {
        assert_eq!(addr >> 20, 0xFEE, "MSI outside the local APIC window");
        self.per_vector[usize::from(data.to_le_bytes()[0])].fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        self.last_address.store(addr, Ordering::SeqCst);
    }

    pub fn count(&self, vector: u8) -> u64 {
        self.per_vector[usize::from(vector)].load(Ordering::SeqCst)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }
}

/// A platform for `ncpus` vCPUs whose MSIs land in the returned log.
pub fn platform(ncpus: u32) -> (Arc<PcPlatform>, Arc<MsiLog>, Arc<VmRequests>) {
    let log = MsiLog::new();
    let l = log.clone();
    let requests = Arc::new(VmRequests::new());
    let pc = PcPlatform::new(
        PcConfig {
            ncpus,
            ..PcConfig::default()
        },
        Arc::new(move |a, d| l.record(a, d)),
        requests.clone(),
    );
    (pc, log, requests)
}

/// The timer thread of a test.
#[derive(Debug)]
pub struct Timers {
    pub stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pc: Arc<PcPlatform>,
}

impl Timers {
    pub fn start(pc: &Arc<PcPlatform>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pc.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("pc-timers".into())
            .spawn(move || p.run_timers(&s))
            .unwrap();
        Timers {
            stop,
            handle: Some(handle),
            pc: pc.clone(),
        }
    }

    /// Sets the stop flag, wakes the thread if `notify`, and returns how long the join took.
    pub fn stop(mut self, notify: bool) -> Duration {
        let t0 = Instant::now();
        self.stop.store(true, Ordering::Release);
        if notify {
            self.pc.notify_timers();
        }
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        t0.elapsed()
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.pc.notify_timers();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Counts `vector`'s MSIs over `window` of real time (after `settle`); returns per-second rate.
pub fn measure_rate(log: &MsiLog, vector: u8, settle: Duration, window: Duration) -> f64 {
    std::thread::sleep(settle);
    let c0 = log.count(vector);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let c1 = log.count(vector);
    let secs = t0.elapsed().as_secs_f64();
    (c1 - c0) as f64 / secs
}

/// A small deterministic generator (xorshift64).
#[derive(Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
