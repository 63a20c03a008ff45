//! virtio-blk with I/O threads: several requests in flight, completions out of order, the FLUSH
//! barrier, the in-flight bound against a guest that republishes heads, and host faults: an image
//! whose file system runs out of space (ENOSPC) and a disk that fails writes (EIO, a loop device
//! over a full tmpfs) answer IOERR and the device keeps serving. The host-fault tests mount a tmpfs
//! and need root; elsewhere they print why they were skipped.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio::blk::{self, Block};
use virtio::device::device_id;
use virtio::testing::{Driver, Harness, DATA_BASE};
use virtio::transport::Execution;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(30);
const SLOT: u64 = 0x2_0000;
/// Sectors between two requests' places on the image.
const STRIDE: u64 = SLOT / 512;

fn image(len: u64) -> (std::fs::File, std::path::PathBuf) {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "virtio-inflight-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
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

fn hdr(i: u64) -> u64 {
    DATA_BASE + i * 16
}
fn status(i: u64) -> u64 {
    DATA_BASE + 0x800 + i
}
fn data(i: u64) -> u64 {
    DATA_BASE + 0x1000 + i * SLOT
}

fn blk_header(d: &Driver, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Publishes request `i` (type `t` at `sector`, data of `len` bytes in slot `i`). Returns its head.
fn push(d: &mut Driver, i: u64, t: u32, sector: u64, len: u32) -> u16 {
    blk_header(d, hdr(i), t, sector);
    d.mem.write_obj(0xaau8, GuestAddress(status(i))).unwrap();
    let mut bufs = vec![(hdr(i), 16, false)];
    if len > 0 {
        bufs.push((data(i), len, t == blk::req::IN));
    }
    bufs.push((status(i), 1, true));
    d.push(0, &bufs).unwrap()
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| u8::try_from((k as u64 * 31 + i * 7 + 1) % 251).unwrap())
        .collect()
}

fn device(f: std::fs::File, threads: usize) -> (Harness, Driver) {
    device_wb(f, threads, blk::DEFAULT_EAGER_WRITEBACK)
}

/// A device with `threads` I/O threads and eager writeback from `wb` bytes (0: off).
fn device_wb(f: std::fs::File, threads: usize, wb: u64) -> (Harness, Driver) {
    let mut b = Block::from_file(f, false, true, "INFLIGHT").unwrap();
    b.set_io_threads(threads);
    b.set_eager_writeback(wb);
    let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let h = Harness::with_memory(Box::new(b), Execution::Worker, mem).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::BLOCK, u64::MAX, false).unwrap();
    (h, d)
}

#[test]
fn writes_run_in_parallel_complete_out_of_order_and_a_flush_waits_for_them() {
    let (f, path) = image(4 << 20);
    let (h, mut d) = device(f, 4);
    // 15 writes of 128 KiB, a FLUSH, then 8 reads of what the first 8 wrote: one notify.
    let mut heads = Vec::new();
    for i in 0..15u64 {
        d.mem
            .write_slice(&pattern(i, SLOT as usize), GuestAddress(data(i)))
            .unwrap();
        heads.push(push(&mut d, i, blk::req::OUT, i * STRIDE, SLOT as u32));
    }
    let flush = push(&mut d, 15, blk::req::FLUSH, 0, 0);
    let mut reads = Vec::new();
    for i in 16..24u64 {
        d.mem
            .write_slice(&vec![0u8; SLOT as usize], GuestAddress(data(i)))
            .unwrap();
        reads.push(push(
            &mut d,
            i,
            blk::req::IN,
            (i - 16) * STRIDE,
            SLOT as u32,
        ));
    }
    d.notify(0);
    let mut order = Vec::new();
    for _ in 0..24 {
        let (id, len) = d.wait_used(0, T).unwrap();
        order.push((u16::try_from(id).unwrap(), len));
    }
    let pos = |head: u16| order.iter().position(|(h, _)| *h == head).unwrap();
    // Every write before the FLUSH completed before it; every read after it.
    let fp = pos(flush);
    assert!(heads.iter().all(|h| pos(*h) < fp), "{order:?}");
    assert!(reads.iter().all(|h| pos(*h) > fp), "{order:?}");
    for i in 0..24u64 {
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
            blk::status::OK,
            "request {i}"
        );
    }
    // Used lengths: 1 for writes and the flush, data + 1 for reads.
    for (h, len) in &order {
        let want = if reads.contains(h) {
            SLOT as u32 + 1
        } else {
            1
        };
        assert_eq!(*len, want, "head {h}");
    }
    for (k, i) in (16..24u64).enumerate() {
        let mut got = vec![0u8; SLOT as usize];
        d.mem.read_slice(&mut got, GuestAddress(data(i))).unwrap();
        assert!(got == pattern(k as u64, SLOT as usize), "read {i}");
    }
    // The image holds every write.
    let file = std::fs::File::open(&path).unwrap();
    for i in 0..15u64 {
        let mut got = vec![0u8; SLOT as usize];
        file.read_exact_at(&mut got, i * STRIDE * 512).unwrap();
        assert!(got == pattern(i, SLOT as usize), "write {i} in the image");
    }
    // Several were in flight at once: the 15 writes all went to the threads before any result
    // was taken.
    let s = h.lock().stats().clone();
    assert_eq!(s.in_flight_high.load(Ordering::Relaxed), 15);
    assert_eq!(s.chains.load(Ordering::Relaxed), 24);
    assert_eq!(s.bytes_from_guest.load(Ordering::Relaxed), 15 * SLOT);
    assert_eq!(s.bytes_to_guest.load(Ordering::Relaxed), 8 * SLOT);
    drop(d);
    drop(h);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn eager_writeback_starts_for_large_writes_only_and_a_flush_still_syncs_everything() {
    for (threads, wb) in [(0, blk::DEFAULT_EAGER_WRITEBACK), (2, 64 << 10), (2, 0)] {
        let what = format!("{threads} I/O threads, eager writeback from {wb} bytes");
        let (f, path) = image(4 << 20);
        let (h, mut d) = device_wb(f, threads, wb);
        // Four sequential 128 KiB writes in flight together, then a 4 KiB one alone.
        for i in 0..4u64 {
            d.mem
                .write_slice(&pattern(i, SLOT as usize), GuestAddress(data(i)))
                .unwrap();
            push(&mut d, i, blk::req::OUT, i * STRIDE, SLOT as u32);
        }
        d.notify(0);
        for _ in 0..4 {
            d.wait_used(0, T).unwrap();
        }
        d.mem
            .write_slice(&pattern(4, 4096), GuestAddress(data(4)))
            .unwrap();
        push(&mut d, 4, blk::req::OUT, 4 * STRIDE, 4096);
        d.notify(0);
        d.wait_used(0, T).unwrap();
        let s = h.lock().stats().clone();
        // The 512 KiB range is started once the writes pause (a few ms); the 4 KiB write is
        // below the threshold.
        let want = if wb > 0 { 4 * SLOT } else { 0 };
        let t = std::time::Instant::now();
        while s.writeback_started.load(Ordering::Relaxed) < want {
            assert!(t.elapsed() < T, "{what}: writeback never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.writeback_started.load(Ordering::Relaxed), want, "{what}");
        assert_eq!(s.writeback_errors.load(Ordering::Relaxed), 0, "{what}");
        // The FLUSH still answers OK after all of it, and the image holds every write.
        let flush = push(&mut d, 5, blk::req::FLUSH, 0, 0);
        d.notify(0);
        assert_eq!(d.wait_used(0, T).unwrap().0, u32::from(flush), "{what}");
        for i in 0..6u64 {
            assert_eq!(
                d.mem.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
                blk::status::OK,
                "{what}: request {i}"
            );
        }
        let file = std::fs::File::open(&path).unwrap();
        for (i, len) in [(0u64, SLOT), (1, SLOT), (2, SLOT), (3, SLOT), (4, 4096)] {
            let mut got = vec![0u8; len as usize];
            file.read_exact_at(&mut got, i * STRIDE * 512).unwrap();
            assert!(got == pattern(i, len as usize), "{what}: write {i}");
        }
        drop(d);
        drop(h);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn a_lone_large_request_runs_on_the_worker_without_a_hand_off() {
    let (f, path) = image(1 << 20);
    let (h, mut d) = device(f, 4);
    for i in 0..3u64 {
        d.mem
            .write_slice(&pattern(i, SLOT as usize), GuestAddress(data(0)))
            .unwrap();
        push(&mut d, 0, blk::req::OUT, i * STRIDE, SLOT as u32);
        d.notify(0);
        d.wait_used(0, T).unwrap();
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(status(0))).unwrap(),
            blk::status::OK
        );
    }
    // Queue depth 1: nothing ever went to the threads.
    let s = h.lock().stats().clone();
    assert_eq!(s.in_flight_high.load(Ordering::Relaxed), 0);
    assert_eq!(s.bytes_from_guest.load(Ordering::Relaxed), 3 * SLOT);
    drop(d);
    drop(h);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_guest_republishing_one_head_cannot_exceed_the_in_flight_bound() {
    let (f, path) = image(4 << 20);
    f.write_all_at(&vec![0x5a; 4 << 20], 0).unwrap();
    // One I/O thread and 4 MiB reads (each far slower than popping one), so requests pile up in
    // flight.
    let (h, mut d) = device(f, 1);
    blk_header(&d, hdr(0), blk::req::IN, 0);
    let buf = 8 << 20;
    let head = d
        .push(
            0,
            &[
                (hdr(0), 16, false),
                (buf, 4 << 20, true),
                (status(0), 1, true),
            ],
        )
        .unwrap();
    d.notify(0);
    // The same head published again and again, 200 at a time, each time the device has popped
    // all but 56 of what was published (so the available index is never more than a queue size
    // ahead of the device: the test is about the in-flight bound, not the avail-index check).
    let s = h.lock().stats().clone();
    let popped = || s.chains.load(Ordering::Relaxed) + s.in_flight.load(Ordering::Relaxed);
    let q = d.queues[0];
    let mut idx = d.mem.read_obj::<u16>(GuestAddress(q.avail + 2)).unwrap();
    let mut published = 1u64;
    let start = std::time::Instant::now();
    while published < 1001 {
        while popped() + 56 < published {
            assert!(start.elapsed() < T, "the device stopped popping");
            std::thread::sleep(Duration::from_micros(200));
        }
        for _ in 0..200 {
            let slot = q.avail + 4 + u64::from(idx % q.size) * 2;
            d.mem.write_obj(head, GuestAddress(slot)).unwrap();
            idx = idx.wrapping_add(1);
            d.mem.write_obj(idx, GuestAddress(q.avail + 2)).unwrap();
        }
        published += 200;
        d.notify(0);
    }
    while s.chains.load(Ordering::Relaxed) < published && start.elapsed() < T {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        s.chains.load(Ordering::Relaxed),
        published,
        "every request answered"
    );
    assert_eq!(d.status() & virtio::device::status::NEEDS_RESET, 0);
    // The bound was reached and held: the rest waited in the ring until requests completed.
    assert_eq!(
        s.in_flight_high.load(Ordering::Relaxed),
        blk::MAX_IN_FLIGHT as u64
    );
    assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
    drop(d);
    drop(h);
    let _ = std::fs::remove_file(&path);
}

/// A directory with a 1 MiB tmpfs mounted on it (unmounted on drop), or `None` where mounting is
/// not allowed.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount() -> Option<Self> {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "virtio-smallfs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Self(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn an_image_that_runs_out_of_space_answers_ioerr_and_the_device_keeps_serving() {
    let Some(fs) = SmallFs::mount() else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // An 8 MiB sparse image on a 1 MiB file system.
    let path = fs.0.join("img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(8 << 20).unwrap();
    let (h, mut d) = device(f, 4);
    // 40 writes of 128 KiB (5 MiB) at distinct places: those that find no space fail (which
    // ones depends on the order the threads ran them in).
    let mut written = Vec::new();
    let mut failed = 0u64;
    for i in 0..40u64 {
        let slot = i % 16;
        d.mem
            .write_slice(&pattern(i, SLOT as usize), GuestAddress(data(slot)))
            .unwrap();
        push(&mut d, slot, blk::req::OUT, i * STRIDE, SLOT as u32);
        if slot == 15 || i == 39 {
            d.notify(0);
            for _ in 0..=slot {
                d.wait_used(0, T).unwrap();
            }
            for k in 0..=slot {
                match d.mem.read_obj::<u8>(GuestAddress(status(k))).unwrap() {
                    blk::status::OK => written.push(i - slot + k),
                    blk::status::IOERR => failed += 1,
                    other => panic!("status {other}"),
                }
            }
        }
    }
    let s = h.lock().stats().clone();
    assert!(failed > 0, "no write failed on a full file system");
    assert!(!written.is_empty(), "every write failed");
    assert_eq!(s.io_errors.load(Ordering::Relaxed), failed);
    // The device still answers: a read gives what a successful write put there.
    let i = written[0];
    push(&mut d, 16, blk::req::IN, i * STRIDE, SLOT as u32);
    d.notify(0);
    d.wait_used(0, T).unwrap();
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(status(16))).unwrap(),
        blk::status::OK
    );
    let mut got = vec![0u8; SLOT as usize];
    d.mem.read_slice(&mut got, GuestAddress(data(16))).unwrap();
    assert!(got == pattern(i, SLOT as usize));
    assert_eq!(d.status() & virtio::device::status::NEEDS_RESET, 0);
    drop(d);
    drop(h);
}

#[test]
fn host_errors_map_to_virtio_statuses() {
    use virtio::blk::{status_of, RequestError};
    let host = |e| {
        status_of(&Err(RequestError::Host(std::io::Error::from_raw_os_error(
            e,
        ))))
    };
    assert_eq!(host(libc::EIO), blk::status::IOERR);
    assert_eq!(host(libc::ENOSPC), blk::status::IOERR);
    assert_eq!(host(libc::EOPNOTSUPP), blk::status::UNSUPP);
}

/// A loop device over a sparse 8 MiB file on a 1 MiB tmpfs: writes past the first MiB fail with
/// EIO (the loop driver's answer to the backing file's ENOSPC). Detached on drop.
struct FailingDisk {
    _fs: SmallFs,
    dev: String,
}

impl FailingDisk {
    fn attach() -> Option<Self> {
        let fs = SmallFs::mount()?;
        let img = fs.0.join("backing");
        std::fs::File::create(&img).ok()?.set_len(8 << 20).ok()?;
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(Self { _fs: fs, dev })
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

#[test]
fn a_disk_that_returns_eio_answers_ioerr_and_the_device_keeps_serving() {
    let Some(disk) = FailingDisk::attach() else {
        eprintln!("skipped: cannot set up a loop device on a tmpfs here (needs root)");
        return;
    };
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&disk.dev)
            .unwrap()
    };
    // The fault is EIO: a synchronous write past the backing file system's space.
    let probe = open();
    let e = probe
        .write_all_at(&vec![1u8; 2 << 20], 6 << 20)
        .expect_err("a write past the backing space failed");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(probe);
    // The device over the block device (its size comes from the device, 8 MiB).
    let mut b = Block::open(&blk::BlockOptions {
        path: disk.dev.clone().into(),
        sync: true,
        no_delete: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(b.capacity(), (8 << 20) / 512);
    b.set_io_threads(4);
    let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let h = Harness::with_memory(Box::new(b), Execution::Worker, mem).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::BLOCK, u64::MAX, false).unwrap();
    // 16 writes of 128 KiB over the last 2 MiB: the probe used up the backing space with the
    // first of them, so the writes past it fail.
    for i in 0..16u64 {
        d.mem
            .write_slice(&pattern(i, SLOT as usize), GuestAddress(data(i)))
            .unwrap();
        push(
            &mut d,
            i,
            blk::req::OUT,
            (6 << 20) / 512 + i * STRIDE,
            SLOT as u32,
        );
    }
    d.notify(0);
    for _ in 0..16 {
        d.wait_used(0, T).unwrap();
    }
    let failed = (0..16u64)
        .filter(|i| d.mem.read_obj::<u8>(GuestAddress(status(*i))).unwrap() == blk::status::IOERR)
        .count();
    assert!(failed > 0, "no write failed");
    let s = h.lock().stats().clone();
    assert_eq!(s.io_errors.load(Ordering::Relaxed), failed as u64);
    // Still serving: GET_ID answers.
    push(&mut d, 16, blk::req::GET_ID, 0, 20);
    d.notify(0);
    d.wait_used(0, T).unwrap();
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(status(16))).unwrap(),
        blk::status::OK
    );
    assert_eq!(d.status() & virtio::device::status::NEEDS_RESET, 0);
    drop(d);
    drop(h);
}
