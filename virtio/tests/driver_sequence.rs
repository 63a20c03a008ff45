//! The README's guest-driver register sequence, played against each device through its
//! `PciConfigSpace` and BAR `BusDevice` interfaces, with the worker thread doing the I/O.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio::blk::{self, Block};
use virtio::console::{Console, SocketConsole, UnixBackend};
use virtio::device::device_id;
use virtio::net::{self, Net, SocketBackend};
use virtio::rng::Rng;
use virtio::testing::{Driver, Harness, DATA_BASE, MSI_ADDR};
use virtio::transport::Execution;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

fn image(len: u64) -> (std::fs::File, std::path::PathBuf) {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "virtio-test-{}-{}.img",
        std::process::id(),
        rand_suffix()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(len).unwrap();
    (f, path)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn blk_hdr(d: &Driver, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(at)).unwrap();
}

fn status_byte(d: &Driver, at: u64) -> u8 {
    d.mem.read_obj(GuestAddress(at)).unwrap()
}

const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x3000;

/// One blk request: header, optional data, status. Returns (used len, status).
fn blk_req(d: &mut Driver, t: u32, sector: u64, data: Option<(u32, bool)>) -> (u32, u8) {
    blk_hdr(d, HDR, t, sector);
    d.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let mut bufs = vec![(HDR, 16, false)];
    if let Some((len, write)) = data {
        bufs.push((DATA, len, write));
    }
    bufs.push((STATUS, 1, true));
    let head = d.push(0, &bufs).unwrap();
    d.notify(0);
    let (id, len) = d.wait_used(0, T).unwrap();
    assert_eq!(id, u32::from(head));
    (len, status_byte(d, STATUS))
}

#[test]
fn blk_write_flush_read_back_and_file_holds_bytes() {
    let (f, path) = image(1 << 20);
    let h = Harness::new(
        Box::new(Block::from_file(f, false, false, "SERIAL-1").unwrap()),
        Execution::Worker,
    )
    .unwrap();
    let mut d = h.driver();
    let feats = d.bring_up(device_id::BLOCK, u64::MAX, true).unwrap();
    assert_ne!(feats & blk::features::FLUSH, 0);
    assert_eq!(feats & blk::features::RO, 0);
    assert_eq!(d.device_cfg(0, 8), 2048, "capacity in sectors");

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(
        blk_req(&mut d, blk::req::OUT, 8, Some((4096, false))),
        (1, 0)
    );
    assert_eq!(blk_req(&mut d, blk::req::FLUSH, 0, None), (1, 0));
    d.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        blk_req(&mut d, blk::req::IN, 8, Some((4096, true))),
        (4097, 0)
    );
    let mut back = vec![0u8; 4096];
    d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern, "read back what was written");
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern, "the image file holds the bytes");

    // GET_ID.
    assert_eq!(
        blk_req(&mut d, blk::req::GET_ID, 0, Some((20, true))),
        (21, 0)
    );
    let mut id = [0u8; 8];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"SERIAL-1");
    // Out of range, odd length, unknown type.
    assert_eq!(
        blk_req(&mut d, blk::req::IN, 2048, Some((512, true))).1,
        blk::status::IOERR
    );
    assert_eq!(
        blk_req(&mut d, blk::req::OUT, 0, Some((100, false))).1,
        blk::status::IOERR
    );
    assert_eq!(blk_req(&mut d, 99, 0, None).1, blk::status::UNSUPP);
    // Write zeroes, where the host supports it.
    let dev_discard = feats & blk::features::WRITE_ZEROES != 0;
    if dev_discard {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        d.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(
            blk_req(&mut d, blk::req::WRITE_ZEROES, 0, Some((16, false))),
            (1, 0)
        );
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut on_disk, 8 * 512)
            .unwrap();
        assert_eq!(on_disk, vec![0u8; 4096], "zeroed on disk");
    } else {
        eprintln!("skipping WRITE_ZEROES: the host file system cannot punch holes");
    }

    // Completions arrived as MSI-X vector 1 (queue 0), through the trigger.
    assert!(h.msi.messages().contains(&(MSI_ADDR, 0x31)));
    let s = h.lock().stats().clone();
    assert_eq!(s.request_errors.load(Ordering::Relaxed), 3);
    assert_eq!(s.bytes_from_guest.load(Ordering::Relaxed), 4096);
    assert!(s.bytes_to_guest.load(Ordering::Relaxed) >= 4096);
    assert!(s.queue_interrupts.load(Ordering::Relaxed) >= 7);
    assert!(s.notifies.load(Ordering::Relaxed) >= 7);
    assert_eq!(s.activations.load(Ordering::Relaxed), 1);
    drop(d);
    drop(h);
    let _ = std::fs::remove_file(path);
}

/// A block device as the image (bhyve(8) takes disks and zvols too): its size comes from where
/// it ends, not from its metadata (0 bytes). Uses a loop device over a file; skipped where
/// losetup is unavailable (not root, no loop driver).
#[test]
fn blk_on_a_block_device() {
    let (f, path) = image(1 << 20);
    drop(f);
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&path)
        .output();
    let loopdev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            eprintln!(
                "SKIP blk_on_a_block_device: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let _ = std::fs::remove_file(&path);
            return;
        }
        Err(e) => {
            eprintln!("SKIP blk_on_a_block_device: no losetup: {e}");
            let _ = std::fs::remove_file(&path);
            return;
        }
    };
    struct Cleanup(String, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let _cleanup = Cleanup(loopdev.clone(), path.clone());
    let dev = Block::open(&blk::BlockOptions {
        path: loopdev.clone().into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(dev.capacity(), 2048, "{loopdev}: capacity in sectors");
    let h = Harness::new(Box::new(dev), Execution::Worker).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::BLOCK, u64::MAX, true).unwrap();
    assert_eq!(d.device_cfg(0, 8), 2048, "capacity the guest reads");
    // The last sector is writable, the one after it is not.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 13 + 5) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(
        blk_req(&mut d, blk::req::OUT, 2047, Some((512, false))),
        (1, 0)
    );
    assert_eq!(blk_req(&mut d, blk::req::FLUSH, 0, None), (1, 0));
    assert_eq!(
        blk_req(&mut d, blk::req::OUT, 2048, Some((512, false))).1,
        blk::status::IOERR
    );
    let mut on_disk = vec![0u8; 512];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 2047 * 512)
        .unwrap();
    assert_eq!(
        on_disk, pattern,
        "the file under the loop device holds the bytes"
    );
}

#[test]
fn read_only_blk_rejects_writes_with_ioerr() {
    let (f, path) = image(64 * 1024);
    f.write_all_at(&[0x5a; 512], 0).unwrap();
    let h = Harness::new(
        Box::new(Block::from_file(f, true, false, "RO").unwrap()),
        Execution::Worker,
    )
    .unwrap();
    let mut d = h.driver();
    let feats = d.bring_up(device_id::BLOCK, u64::MAX, true).unwrap();
    assert_ne!(feats & blk::features::RO, 0, "VIRTIO_BLK_F_RO advertised");
    assert_eq!(feats & blk::features::DISCARD, 0);
    d.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        blk_req(&mut d, blk::req::OUT, 0, Some((512, false))),
        (1, blk::status::IOERR)
    );
    assert_eq!(
        blk_req(&mut d, blk::req::WRITE_ZEROES, 0, Some((16, false))).1,
        blk::status::IOERR
    );
    assert_eq!(blk_req(&mut d, blk::req::FLUSH, 0, None).1, blk::status::OK);
    assert_eq!(
        blk_req(&mut d, blk::req::IN, 0, Some((512, true))),
        (513, 0)
    );
    let mut back = [0u8; 512];
    d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 512], "the image is unchanged");
    drop(h);
    let _ = std::fs::remove_file(path);
}

#[test]
fn console_bytes_round_trip() {
    let (backend, mut peer) = SocketConsole::pair().unwrap();
    let h = Harness::new(Box::new(Console::new(Box::new(backend))), Execution::Worker).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::CONSOLE, u64::MAX, true).unwrap();
    // Guest → host on transmitq0.
    d.mem
        .write_slice(b"hello, host", GuestAddress(DATA))
        .unwrap();
    d.push(1, &[(DATA, 11, false)]).unwrap();
    d.notify(1);
    assert_eq!(d.wait_used(1, T).unwrap().1, 0);
    peer.set_read_timeout(Some(T)).unwrap();
    let mut got = [0u8; 11];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello, host");
    // Host → guest on receiveq0.
    d.push(0, &[(DATA + 0x100, 64, true)]).unwrap();
    d.notify(0);
    peer.write_all(b"hi guest").unwrap();
    let (_, len) = d.wait_used(0, T).unwrap();
    let mut buf = vec![0u8; len as usize];
    d.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(buf, b"hi guest");
    assert!(
        h.msi.messages().contains(&(MSI_ADDR, 0x31)),
        "receiveq0 vector"
    );
    assert!(
        h.msi.messages().contains(&(MSI_ADDR, 0x32)),
        "transmitq0 vector"
    );
}

#[test]
fn console_unix_socket_backend() {
    let path = std::env::temp_dir().join(format!("virtio-con-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let backend = UnixBackend::bind(&path).unwrap();
    let h = Harness::new(Box::new(Console::new(Box::new(backend))), Execution::Worker).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::CONSOLE, u64::MAX, true).unwrap();
    d.push(0, &[(DATA, 64, true)]).unwrap();
    d.notify(0);
    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client.write_all(b"typed").unwrap();
    let (_, len) = d.wait_used(0, T).unwrap();
    let mut buf = vec![0u8; len as usize];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, b"typed");
    d.mem
        .write_slice(b"echo", GuestAddress(DATA + 0x100))
        .unwrap();
    d.push(1, &[(DATA + 0x100, 4, false)]).unwrap();
    d.notify(1);
    d.wait_used(1, T).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut got = [0u8; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"echo");
    drop(d);
    drop(h);
    assert!(!path.exists(), "socket removed when the device goes away");
}

#[test]
fn rng_returns_bytes() {
    let h = Harness::new(Box::new(Rng::new()), Execution::Worker).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::RNG, u64::MAX, true).unwrap();
    d.push(0, &[(DATA, 256, true)]).unwrap();
    d.notify(0);
    assert_eq!(d.wait_used(0, T).unwrap().1, 256);
    let mut buf = [0u8; 256];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(
        buf.iter().filter(|b| **b != 0).count() > 200,
        "random bytes"
    );
    assert_eq!(h.lock().stats().bytes_to_guest.load(Ordering::Relaxed), 256);
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; net::NET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(seed)));
    f
}

#[test]
fn net_tx_and_rx_over_a_socket_pair() {
    let (backend, peer) = SocketBackend::pair().unwrap();
    let mac = [0x00, 0xa0, 0x98, 0x12, 0x34, 0x56];
    let h = Harness::new(
        Box::new(Net::new(Box::new(backend), mac, Some(9000))),
        Execution::Worker,
    )
    .unwrap();
    let mut d = h.driver();
    let f = d.bring_up(device_id::NET, u64::MAX, true).unwrap();
    assert_eq!(f & net::features::CSUM, 0, "no offloads over a socket pair");
    assert_ne!(f & net::features::MAC, 0);
    let cfg_mac: Vec<u8> = (0..6).map(|i| d.device_cfg(i, 1) as u8).collect();
    assert_eq!(cfg_mac, mac);
    assert_eq!(d.device_cfg(6, 2), 1, "link up");
    assert_eq!(d.device_cfg(10, 2), 9000, "mtu");
    // TX.
    let tx = frame(60, 3);
    d.mem.write_slice(&tx, GuestAddress(DATA)).unwrap();
    d.push(1, &[(DATA, 12, false), (DATA + 12, 60, false)])
        .unwrap();
    d.notify(1);
    d.wait_used(1, T).unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let mut got = vec![0u8; 2048];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &tx[..]);
    // RX.
    d.push(0, &[(DATA + 0x1000, 2048, true)]).unwrap();
    d.notify(0);
    let rx = frame(100, 5);
    peer.send(&rx).unwrap();
    let (_, len) = d.wait_used(0, T).unwrap();
    assert_eq!(len as usize, rx.len());
    let mut buf = vec![0u8; rx.len()];
    d.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&buf[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(&buf[12..], &rx[12..]);
    // A frame bigger than the guest's buffer is dropped, the buffer returned empty.
    d.push(0, &[(DATA + 0x2000, 64, true)]).unwrap();
    d.notify(0);
    peer.send(&frame(200, 7)).unwrap();
    assert_eq!(d.wait_used(0, T).unwrap().1, 0);
    assert_eq!(h.lock().stats().dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn net_peer_gone_stops_the_queues() {
    let (backend, peer) = SocketBackend::pair().unwrap();
    let h = Harness::new(
        Box::new(Net::new(Box::new(backend), [0, 0xa0, 0x98, 0, 0, 9], None)),
        Execution::Worker,
    )
    .unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::NET, u64::MAX, true).unwrap();
    drop(peer);
    d.mem
        .write_slice(&frame(60, 1), GuestAddress(DATA))
        .unwrap();
    // Another test of this binary may fork (losetup, ip) while `peer` is still open: the child
    // holds a copy of the socket until it execs, and a frame sent in that window is accepted
    // (one CI run saw exactly that). So send until the backend reports the peer gone.
    let deadline = std::time::Instant::now() + T;
    let failures = || h.lock().stats().backend_failures.load(Ordering::Relaxed);
    while failures() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "backend failure not noticed"
        );
        d.push(1, &[(DATA, 72, false)]).unwrap();
        d.notify(1);
        d.wait_used(1, T).unwrap();
        let settle = std::time::Instant::now() + Duration::from_millis(100);
        while failures() == 0 && std::time::Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let used = d.used_idx(1);
    // Stopped: further work is not processed, and the device did not ask for a reset (host fault).
    d.push(1, &[(DATA, 72, false)]).unwrap();
    d.notify(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(1), used);
    assert_eq!(d.status() & 0x40, 0);
    assert!(h.lock().stats().notifies_ignored.load(Ordering::Relaxed) >= 1);
}

/// Runs `ip` with `args`; Err with its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn net_real_tap_in_a_network_namespace() {
    let ns = format!("virtio-t{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &ns]) {
        eprintln!(
            "SKIP net_real_tap_in_a_network_namespace: cannot create a network namespace: {e}"
        );
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.0]);
        }
    }
    let _cleanup = Cleanup(ns.clone());
    // Open the tap from a thread that entered the namespace (setns is per thread).
    let ns2 = ns.clone();
    let tap = std::thread::spawn(move || -> Result<net::Tap, String> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns2}")).map_err(|e| e.to_string())?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor we hold; affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        net::Tap::open("vtap0").map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    let tap = match tap {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIP net_real_tap_in_a_network_namespace: cannot open a tap: {e}");
            return;
        }
    };
    ip(&["-n", &ns, "addr", "add", "10.99.0.1/24", "dev", "vtap0"]).unwrap();
    ip(&["-n", &ns, "link", "set", "vtap0", "up"]).unwrap();
    let h = Harness::new(
        Box::new(Net::new(Box::new(tap), [0, 0xa0, 0x98, 1, 2, 3], None)),
        Execution::Worker,
    )
    .unwrap();
    let mut d = h.driver();
    // Accept no offloads: the tap must then hand over plain frames.
    let f = d
        .bring_up(
            device_id::NET,
            net::features::MAC | net::features::STATUS,
            true,
        )
        .unwrap();
    assert_eq!(f & net::features::GUEST_CSUM, 0);
    for i in 0..8u64 {
        d.push(0, &[(DATA + 0x1000 * i, 2048, true)]).unwrap();
    }
    d.notify(0);
    // Something in the namespace sends to 10.99.0.2: the kernel ARPs for it on the tap.
    let _ = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "bash",
            "-c",
            "echo x > /dev/udp/10.99.0.2/9",
        ])
        .status();
    let mut saw_arp = false;
    let deadline = std::time::Instant::now() + T;
    while !saw_arp && std::time::Instant::now() < deadline {
        let Ok((id, len)) = d.wait_used(0, Duration::from_millis(500)) else {
            continue;
        };
        let mut buf = vec![0u8; len as usize];
        d.mem
            .read_slice(&mut buf, GuestAddress(DATA + 0x1000 * u64::from(id)))
            .unwrap();
        saw_arp = buf.len() >= 26 && buf[24..26] == [0x08, 0x06];
    }
    assert!(
        saw_arp,
        "an ARP request from the namespace reached the guest"
    );
    // TX: a broadcast frame from the guest is counted by the tap.
    let mut fr = vec![0u8; 12];
    fr.extend_from_slice(&[0xff; 6]);
    fr.extend_from_slice(&[0, 0xa0, 0x98, 1, 2, 3, 0x88, 0xb5]);
    fr.resize(12 + 60, 0);
    d.mem
        .write_slice(&fr, GuestAddress(DATA + 0x20000))
        .unwrap();
    d.push(1, &[(DATA + 0x20000, fr.len() as u32, false)])
        .unwrap();
    d.notify(1);
    d.wait_used(1, T).unwrap();
    assert!(h.lock().stats().bytes_from_guest.load(Ordering::Relaxed) >= 72);
    // The tap disappears: the queues stop with a log line, no panic, no spin.
    ip(&["-n", &ns, "link", "del", "vtap0"]).unwrap();
    d.push(1, &[(DATA + 0x20000, fr.len() as u32, false)])
        .unwrap();
    d.notify(1);
    let deadline = std::time::Instant::now() + T;
    while h.lock().stats().backend_failures.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a deleted tap was not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
