//! Helpers shared by the module's integration tests: fake backend capabilities, load options in
//! a temporary directory, and a raw socket client that reads reply frames with a deadline.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kmod::proto::{Header, HEADER_LEN};
use kmod::{LoadOptions, ServerLimits, SysfsSource};
use passthrough::fake::FakeSysfs;
use vcpu_runner::{Capabilities, VirtKind};

/// A backend with everything the module needs (AMD SVM, 288 vCPUs per VM).
pub fn caps() -> Capabilities {
    Capabilities {
        api_version: 12,
        virt: VirtKind::SvmNpt,
        split_irqchip: true,
        immediate_exit: true,
        irqfd: true,
        ioeventfd: true,
        signal_msi: true,
        irq_routes: 4096,
        max_vcpus: 288,
    }
}

/// Limits small enough for tests to observe timeouts and the connection cap quickly.
pub fn fast_limits() -> ServerLimits {
    ServerLimits {
        max_connections: 4,
        idle_timeout: Duration::from_millis(1500),
        request_timeout: Duration::from_millis(400),
        write_timeout: Duration::from_millis(500),
        max_payload: kmod::proto::MAX_PAYLOAD,
    }
}

/// Options for a module in `dir`: sockets in `dir/run`, 4 host CPUs, an empty fake sysfs.
pub fn opts(dir: &Path) -> LoadOptions {
    let mut o = LoadOptions::new(caps());
    o.socket_dir = dir.join("run");
    o.host_cpus = Some(4);
    o.sysfs = SysfsSource::Shared(Arc::new(FakeSysfs::new()));
    o.limits = fast_limits();
    o
}

/// Connects a raw stream with a read timeout.
pub fn raw(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one reply frame: header and payload; `None` if the server closed the connection.
pub fn read_frame(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).ok()?;
    let h = Header::decode(&head).expect("server sent a bad header");
    let mut payload = vec![0u8; usize::try_from(h.length).unwrap()];
    s.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

/// Whether the server has closed the stream (a read returns end of file, or the connection
/// was reset) within the stream's read timeout.
pub fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Sends `bytes`, ignoring a peer that has already closed.
pub fn send(s: &mut UnixStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// A deterministic xorshift64 generator.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}
