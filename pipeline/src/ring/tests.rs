//! Unit tests: layout refusal, corrupted indices, single-thread semantics, the wake-up
//! protocol and completion waits with real threads and futexes.

use super::*;
use crate::abi::{CompletionRecord, ExitKind, ExitRecord};
use crate::barrier;
use crate::wait::Waiter;
use crate::wait::SLEEPING;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::time::{Duration, Instant};

/// A zeroed, page-aligned buffer that outlives the regions carved from it in a test.
struct Buf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Buf {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
        Self { ptr, layout }
    }

    /// `len` bytes starting `offset` bytes into the buffer.
    fn region(&self, offset: usize, len: usize) -> Region {
        assert!(offset + len <= self.layout.size());
        // SAFETY: in bounds of the live allocation; every region is dropped before `self`
        // (tests declare the buffer first).
        let base = unsafe { self.ptr.add(offset) };
        // SAFETY: as above.
        unsafe { Region::from_raw_parts(base, len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Block until thread `tid` of this process is asleep in the kernel (state `S`), i.e. parked.
fn wait_until_parked(tid: i32) {
    let path = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(&path).unwrap();
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        if state == "S" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never parked: {stat}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    i32::try_from(tid).unwrap()
}

fn rec(seq: u64) -> ExitRecord {
    ExitRecord {
        seq,
        addr: 0x1000 + seq,
        offset: seq & 0xff,
        data: seq.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        vcpu: 1,
        device: 2,
        kind: 2,
        size: 4,
        flags: 1,
        reserved: 0,
    }
}

const CAP: u32 = 8;

fn ring_len() -> usize {
    Ring::<ExitRecord>::required_size(CAP).unwrap()
}

fn formatted(buf: &Buf) -> Ring<ExitRecord> {
    Ring::<ExitRecord>::format(buf.region(0, ring_len()), CAP).unwrap()
}

#[test]
fn format_then_attach_round_trips() {
    let buf = Buf::new(ring_len());
    let (mut p, c) = formatted(&buf).split().unwrap();
    p.try_push(rec(1)).unwrap();
    drop(p);
    // A second view of the same memory (as another process would have) sees the record.
    let ring = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap();
    assert_eq!(ring.capacity(), CAP);
    assert_eq!(
        ring.consumer().unwrap_err(),
        AttachError::AlreadyClaimed(Side::Consumer)
    );
    drop(c);
    let mut c2 = ring.consumer().unwrap();
    assert_eq!(c2.try_pop(), Ok(Some(rec(1))));
}

#[test]
fn attach_refuses_a_region_too_small_for_the_header() {
    let buf = Buf::new(ring_len());
    let err = Ring::<ExitRecord>::attach(buf.region(0, HEADER_SIZE - 1)).unwrap_err();
    assert_eq!(
        err,
        AttachError::TooSmall {
            needed: HEADER_SIZE,
            len: HEADER_SIZE - 1
        }
    );
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn attach_refuses_a_region_too_small_for_its_capacity() {
    let buf = Buf::new(ring_len());
    formatted(&buf);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len() - 48)).unwrap_err();
    assert_eq!(
        err,
        AttachError::TooSmall {
            needed: ring_len(),
            len: ring_len() - 48
        }
    );
    // And format refuses it too.
    let err = Ring::<ExitRecord>::format(buf.region(0, ring_len() - 1), CAP).unwrap_err();
    assert!(matches!(err, AttachError::TooSmall { .. }), "{err}");
}

#[test]
fn attach_and_format_refuse_a_misaligned_region() {
    let buf = Buf::new(ring_len() + 64);
    let err = Ring::<ExitRecord>::format(buf.region(8, ring_len()), CAP).unwrap_err();
    assert_eq!(
        err,
        AttachError::Misaligned {
            align: Ring::<ExitRecord>::ALIGN,
            addr: buf.ptr.as_ptr().addr() + 8
        }
    );
    assert!(err.to_string().contains("misaligned"), "{err}");
    let err = Ring::<ExitRecord>::attach(buf.region(64, ring_len())).unwrap_err();
    assert!(matches!(err, AttachError::Misaligned { .. }), "{err}");
}

#[test]
fn attach_refuses_an_unformatted_region_or_a_bad_magic() {
    let buf = Buf::new(ring_len());
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert_eq!(
        err,
        AttachError::BadMagic {
            expected: RING_MAGIC,
            found: 0
        }
    );
    let ring = formatted(&buf);
    ring.header()
        .meta
        .magic
        .store(0xdead_beef, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert!(matches!(
        err,
        AttachError::BadMagic {
            found: 0xdead_beef,
            ..
        }
    ));
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn attach_refuses_another_abi_version() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    ring.header()
        .meta
        .version
        .store(ABI_VERSION + 1, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert_eq!(
        err,
        AttachError::VersionMismatch {
            expected: ABI_VERSION,
            found: ABI_VERSION + 1
        }
    );
    assert!(err.to_string().contains("version"), "{err}");
}

#[test]
fn attach_refuses_another_record_type() {
    let len = Ring::<ExitRecord>::required_size(CAP).unwrap();
    let buf = Buf::new(len);
    Ring::<CompletionRecord>::format(buf.region(0, len), CAP).unwrap();
    let err = Ring::<ExitRecord>::attach(buf.region(0, len)).unwrap_err();
    assert_eq!(
        err,
        AttachError::RecordTypeMismatch {
            expected: ExitRecord::TAG,
            found: CompletionRecord::TAG
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("carries CMPL") && msg.contains("expected EXIT"),
        "{msg}"
    );
}

#[test]
fn attach_refuses_another_record_size_or_header_size() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    ring.header().meta.record_size.store(40, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert_eq!(
        err,
        AttachError::RecordSizeMismatch {
            expected: 48,
            found: 40
        }
    );
    ring.header().meta.record_size.store(48, Ordering::Relaxed);
    ring.header().meta.header_size.store(256, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert!(
        matches!(err, AttachError::HeaderSizeMismatch { found: 256, .. }),
        "{err}"
    );
}

#[test]
fn attach_refuses_another_slot_size() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    ring.header().meta.slot_size.store(48, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert_eq!(
        err,
        AttachError::SlotSizeMismatch {
            expected: 64,
            found: 48
        }
    );
    assert!(
        err.to_string().contains("48 bytes apart, expected 64"),
        "{err}"
    );
}

#[test]
fn slots_are_padded_so_no_record_straddles_a_cache_line() {
    assert_eq!(slot_size(1), 1);
    assert_eq!(slot_size(24), 32);
    assert_eq!(slot_size(32), 32);
    assert_eq!(slot_size(48), 64);
    assert_eq!(slot_size(64), 64);
    assert_eq!(slot_size(65), 128);
    assert_eq!(slot_size(200), 256);
    // An exit ring: header, then CAP 64-byte slots; record k at 512 + 64·k.
    assert_eq!(
        Ring::<ExitRecord>::required_size(CAP).unwrap(),
        512 + 64 * CAP as usize
    );
    assert_eq!(
        Ring::<CompletionRecord>::required_size(CAP).unwrap(),
        512 + 32 * CAP as usize
    );
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    assert_eq!(ring.header().meta.slot_size.load(Ordering::Relaxed), 64);
    let (mut tx, mut rx) = ring.split().unwrap();
    // Single pushes, then batches that wrap around, popped both ways.
    for round in 0..5u64 {
        let base = round * 100;
        assert!(tx.try_push(rec(base)).is_ok());
        assert_eq!(
            tx.push_batch(&[rec(base + 1), rec(base + 2), rec(base + 3)]),
            3
        );
        let base_ptr = buf.ptr.as_ptr().cast_const();
        for k in 0..4u64 {
            let index = round * 4 + k;
            let at = 512 + 64 * usize::try_from(index % u64::from(CAP)).unwrap();
            // SAFETY: `at + 48 <= ring_len()`, inside the buffer.
            let at = unsafe { base_ptr.add(at) };
            // SAFETY: in bounds; the record was published and not yet popped.
            let seq = unsafe { at.cast::<u64>().read_unaligned() };
            assert_eq!(seq, base + k, "record {index}");
        }
        assert_eq!(rx.try_pop().unwrap().unwrap().seq, base);
        let mut out = [ExitRecord::default(); 3];
        assert_eq!(rx.pop_batch(&mut out).unwrap(), 3);
        assert_eq!(out.map(|r| r.seq), [base + 1, base + 2, base + 3]);
    }
}

#[test]
fn a_trickling_producer_is_told_from_a_request_response_exchange() {
    let (mut tx, mut rx) = channel::<ExitRecord>(64);
    // Request/response: between two records the consumer finds the ring empty.
    for seq in 0..10 {
        assert!(tx.try_push(rec(seq)).is_ok());
        assert_eq!(rx.try_pop().unwrap().unwrap().seq, seq);
        assert!(rx.try_pop().unwrap().is_none());
        assert_eq!(rx.trickle, 0, "after answer {seq}");
    }
    // Streaming one or two records ahead: every re-read finds a few, none finds none.
    let mut seq = 10;
    for round in 1..=4u32 {
        for _ in 0..2 {
            assert!(tx.try_push(rec(seq)).is_ok());
            seq += 1;
        }
        assert_eq!(rx.try_pop().unwrap().unwrap().seq, seq - 2);
        assert_eq!(rx.try_pop().unwrap().unwrap().seq, seq - 1);
        assert_eq!(rx.trickle, round);
    }
    // A long run (TRICKLE or more at once) is not a trickle; neither is an empty ring.
    for _ in 0..TRICKLE {
        assert!(tx.try_push(rec(seq)).is_ok());
        seq += 1;
    }
    assert!(rx.try_pop().unwrap().is_some());
    assert_eq!(rx.trickle, 0);
    while rx.try_pop().unwrap().is_some() {}
    assert_eq!(rx.trickle, 0);
}

#[test]
fn a_completion_wait_never_backs_off() {
    let (mut tx, mut rx) = channel::<CompletionRecord>(8);
    rx.trickle = 5;
    assert!(tx
        .try_push(CompletionRecord {
            seq: 3,
            ..CompletionRecord::default()
        })
        .is_ok());
    let c = rx
        .wait_completion(3, Duration::from_millis(1), Duration::from_secs(1))
        .unwrap();
    assert_eq!(c.seq, 3);
    assert!(rx.trickle < 2, "{}", rx.trickle);
}

#[test]
fn capacity_must_be_a_power_of_two_in_range() {
    let buf = Buf::new(ring_len());
    for bad in [0, 3, 6, MAX_CAPACITY + 1, u32::MAX] {
        let err = Ring::<ExitRecord>::format(buf.region(0, ring_len()), bad).unwrap_err();
        assert_eq!(err, AttachError::BadCapacity(bad));
    }
    let ring = formatted(&buf);
    ring.header().meta.capacity.store(12, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert_eq!(err, AttachError::BadCapacity(12));
    // A hostile capacity larger than the region is refused as too small, not trusted.
    ring.header()
        .meta
        .capacity
        .store(1 << 20, Ordering::Relaxed);
    let err = Ring::<ExitRecord>::attach(buf.region(0, ring_len())).unwrap_err();
    assert!(matches!(err, AttachError::TooSmall { .. }), "{err}");
}

#[test]
fn each_end_is_claimed_once_and_released_on_drop() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    let p = ring.producer().unwrap();
    assert_eq!(
        ring.producer().unwrap_err(),
        AttachError::AlreadyClaimed(Side::Producer)
    );
    let c = ring.consumer().unwrap();
    assert_eq!(
        ring.consumer().unwrap_err(),
        AttachError::AlreadyClaimed(Side::Consumer)
    );
    drop((p, c));
    assert!(ring.producer().is_ok());
    assert!(ring.consumer().is_ok());
}

#[test]
fn push_pop_wraps_around_many_times_in_order() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(4);
    let mut next_out = 0;
    for seq in 0..1000 {
        p.try_push(rec(seq)).unwrap();
        if seq % 3 == 2 {
            while let Some(r) = c.try_pop().unwrap() {
                assert_eq!(r, rec(next_out));
                next_out += 1;
            }
        }
    }
    while let Some(r) = c.try_pop().unwrap() {
        assert_eq!(r, rec(next_out));
        next_out += 1;
    }
    assert_eq!(next_out, 1000);
}

#[test]
fn full_gives_the_record_back_and_empty_gives_none() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(4);
    assert!(p.is_empty() && c.is_empty());
    assert_eq!(c.try_pop(), Ok(None));
    for seq in 0..4 {
        p.try_push(rec(seq)).unwrap();
    }
    assert_eq!(p.len(), 4);
    assert_eq!(c.len(), 4);
    assert_eq!(p.try_push(rec(99)), Err(rec(99)));
    assert_eq!(c.try_pop(), Ok(Some(rec(0))));
    p.try_push(rec(4)).unwrap();
    let mut out = [ExitRecord::default(); 8];
    assert_eq!(c.pop_batch(&mut out), Ok(4));
    assert_eq!(&out[..4], &[rec(1), rec(2), rec(3), rec(4)]);
    assert_eq!(c.pop_batch(&mut out), Ok(0));
    assert!(p.poisoned().is_none() && c.poisoned().is_none());
}

#[test]
fn batches_split_across_the_wrap_point() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(8);
    let mut out = [ExitRecord::default(); 8];
    let mut seq = 0;
    let mut expect = 0;
    for round in 0..200u64 {
        let n = usize::try_from(round % 8 + 1).unwrap();
        let batch: Vec<_> = (seq..seq + n as u64).map(rec).collect();
        let pushed = p.push_batch(&batch);
        seq += pushed as u64;
        // Pop a different amount so the two ends drift against the wrap point.
        let want = usize::try_from((round * 5) % 8 + 1).unwrap();
        let got = c.pop_batch(&mut out[..want]).unwrap();
        for r in &out[..got] {
            assert_eq!(*r, rec(expect));
            expect += 1;
        }
    }
    while let Some(r) = c.try_pop().unwrap() {
        assert_eq!(r, rec(expect));
        expect += 1;
    }
    assert_eq!(expect, seq);
    assert!(seq > 400, "batches made progress: {seq}");
    // A batch larger than the free space takes what fits.
    let big: Vec<_> = (0..20).map(rec).collect();
    assert_eq!(p.push_batch(&big), 8);
    assert_eq!(p.push_batch(&big), 0);
}

/// Garbage in the producer index (tail) is detected by the consumer, never trusted.
#[test]
fn corrupt_tail_is_detected_without_panic() {
    for garbage in [u64::MAX, 1 << 40, 2 + u64::from(CAP), 0xdead_beef_dead_beef] {
        let buf = Buf::new(ring_len());
        let ring = formatted(&buf);
        let (mut p, mut c) = (ring.producer().unwrap(), ring.consumer().unwrap());
        p.try_push(rec(0)).unwrap();
        assert_eq!(c.try_pop(), Ok(Some(rec(0))));
        ring.header().tail.store(garbage, Ordering::Relaxed);
        let err = c.try_pop().unwrap_err();
        assert!(
            matches!(err, RingError::CorruptIndex { producer, consumer: 1, capacity: CAP }
                if producer == garbage),
            "{err}"
        );
        assert!(err.to_string().contains("Corrupt ring index"), "{err}");
        // Poisoned: stays an error, even after the index is repaired.
        ring.header().tail.store(1, Ordering::Relaxed);
        assert_eq!(c.try_pop(), Err(err));
        let mut out = [ExitRecord::default(); 4];
        assert_eq!(c.pop_batch(&mut out), Err(err));
        assert_eq!(c.wait_for_records(Duration::ZERO, Duration::ZERO), Err(err));
        assert_eq!(c.poisoned(), Some(err));
    }
}

/// The consumer's `len` never reports more than the capacity, whatever the tail says.
#[test]
fn len_is_bounded_under_corruption() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    let c = ring.consumer().unwrap();
    ring.header().tail.store(1 << 50, Ordering::Relaxed);
    assert_eq!(c.len(), 0);
    assert!(c.is_empty());
}

/// A producer index that moves backwards (but stays within capacity of the consumer's)
/// is also impossible and detected.
#[test]
fn tail_moving_backwards_is_detected() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    let (mut p, mut c) = (ring.producer().unwrap(), ring.consumer().unwrap());
    for seq in 0..4 {
        p.try_push(rec(seq)).unwrap();
    }
    assert_eq!(c.try_pop(), Ok(Some(rec(0)))); // caches tail = 4
    for seq in 1..4 {
        assert_eq!(c.try_pop(), Ok(Some(rec(seq))));
    }
    ring.header().tail.store(2, Ordering::Relaxed); // behind our head (4)
    assert!(matches!(
        c.try_pop(),
        Err(RingError::CorruptIndex { producer: 2, .. })
    ));
}

/// Garbage in the consumer index (head) is detected by the producer: pushes are refused
/// and the handle reports why.
#[test]
fn corrupt_head_is_detected_without_panic() {
    for garbage in [u64::MAX, 1 << 40, 100, 0x8000_0000_0000_0000] {
        let buf = Buf::new(ring_len());
        let ring = formatted(&buf);
        let mut p = ring.producer().unwrap();
        // Fill the ring so the producer must re-read the head.
        for seq in 0..u64::from(CAP) {
            p.try_push(rec(seq)).unwrap();
        }
        ring.header().head.store(garbage, Ordering::Relaxed);
        assert_eq!(p.try_push(rec(99)), Err(rec(99)));
        let err = p.poisoned().expect("poisoned");
        assert!(matches!(err, RingError::CorruptIndex { consumer, .. } if consumer == garbage));
        assert_eq!(p.push_batch(&[rec(1), rec(2)]), 0);
        // Repairing the index does not un-poison.
        ring.header().head.store(u64::from(CAP), Ordering::Relaxed);
        assert_eq!(p.try_push(rec(100)), Err(rec(100)));
        assert!(p.len() <= p.capacity());
    }
}

/// A producer attached to a ring whose indices are already inconsistent starts poisoned.
#[test]
fn producer_attaching_to_corrupt_indices_starts_poisoned() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    ring.header().tail.store(1 << 33, Ordering::Relaxed);
    let mut p = ring.producer().unwrap();
    assert!(p.poisoned().is_some());
    assert_eq!(p.try_push(rec(0)), Err(rec(0)));
}

/// Random garbage written into both index words between operations never causes a panic or
/// an out-of-bounds access; every operation either works or reports the corruption.
#[test]
fn random_index_garbage_never_panics() {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut corrupt_seen = 0;
    for _ in 0..200 {
        let buf = Buf::new(ring_len());
        let ring = formatted(&buf);
        let (mut p, mut c) = (ring.producer().unwrap(), ring.consumer().unwrap());
        let mut out = [ExitRecord::default(); 3];
        for step in 0..50 {
            let r = next();
            match r % 7 {
                0 => ring.header().tail.store(next() % 64, Ordering::Relaxed),
                1 => ring.header().head.store(next(), Ordering::Relaxed),
                2 => {
                    let _ = p.try_push(rec(step));
                }
                3 => {
                    let _ = p.push_batch(&[rec(step), rec(step + 1)]);
                }
                4 => {
                    let _ = c.try_pop();
                }
                5 => {
                    let _ = c.pop_batch(&mut out);
                }
                _ => {
                    assert!(p.len() <= p.capacity());
                    assert!(c.len() <= c.capacity());
                }
            }
        }
        corrupt_seen += usize::from(p.poisoned().is_some()) + usize::from(c.poisoned().is_some());
    }
    assert!(corrupt_seen > 100, "garbage was detected: {corrupt_seen}");
}

#[test]
fn publishing_without_a_sleeper_costs_no_wakeup() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(64);
    for seq in 0..1000 {
        p.try_push(rec(seq)).unwrap();
        p.push_batch(&[rec(seq)]);
        c.try_pop().unwrap();
        c.try_pop().unwrap();
    }
    assert_eq!(p.wakeups(), 0);
    assert_eq!(c.parks(), 0);
}

#[test]
fn wait_times_out_on_an_empty_ring_within_bounds() {
    let (_p, mut c) = crate::channel::<ExitRecord>(8);
    let start = Instant::now();
    let out = c
        .wait_for_records(Duration::from_micros(20), Duration::from_millis(30))
        .unwrap();
    let took = start.elapsed();
    assert_eq!(out, WaitOutcome::TimedOut);
    assert!(took >= Duration::from_millis(30), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(c.parks() >= 1);
    // The flag is cleared when the wait gives up, so producers do not pay for a wake-up.
    assert_eq!(c.header().wake.word.load(Ordering::Relaxed), AWAKE);
}

#[test]
fn a_sleeping_consumer_is_woken_by_exactly_one_publish() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(8);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let start = Instant::now();
        // No spin: park at once; a long timeout so only a wake-up can end the wait soon.
        let out = c.wait_for_records(Duration::ZERO, Duration::from_secs(20));
        (out, start.elapsed(), c.try_pop(), c.parks())
    });
    wait_until_parked(tid_rx.recv().unwrap());
    p.try_push(rec(7)).unwrap();
    p.try_push(rec(8)).unwrap();
    let (out, took, popped, parks) = t.join().unwrap();
    assert_eq!(out, Ok(WaitOutcome::Ready { parked: true }));
    assert_eq!(popped, Ok(Some(rec(7))));
    assert!(parks >= 1);
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Only the first publish after the flag was set paid for a wake-up.
    assert_eq!(p.wakeups(), 1);
}

fn completion(seq: u64) -> CompletionRecord {
    CompletionRecord {
        seq,
        data: seq * 3,
        vcpu: 0,
        status: 0,
        reserved: 0,
    }
}

#[test]
fn wait_completion_skips_stale_answers_and_refuses_future_ones() {
    let (mut p, mut c) = crate::channel::<CompletionRecord>(8);
    let w = Waiter::default();
    p.try_push(completion(3)).unwrap();
    p.try_push(completion(4)).unwrap();
    p.try_push(completion(5)).unwrap();
    assert_eq!(c.wait_completion(5, w.spin, w.timeout), Ok(completion(5)));
    assert_eq!(c.stale_completions(), 2);
    p.try_push(completion(9)).unwrap();
    assert_eq!(
        c.wait_completion(6, w.spin, w.timeout),
        Err(RingError::UnexpectedCompletion {
            expected: 6,
            found: 9
        })
    );
}

#[test]
fn wait_completion_times_out_with_an_error() {
    let (_p, mut c) = crate::channel::<CompletionRecord>(8);
    let start = Instant::now();
    assert_eq!(
        c.wait_completion(1, Duration::from_micros(10), Duration::from_millis(25)),
        Err(RingError::Timeout)
    );
    assert!(start.elapsed() >= Duration::from_millis(25));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn read_round_trips_between_threads() {
    let (mut exits, mut dev_exits) = crate::channel::<ExitRecord>(16);
    let (mut dev_done, mut done) = crate::channel::<CompletionRecord>(16);
    const N: u64 = 20_000;
    let device = std::thread::spawn(move || {
        let mut served = 0;
        while served < N {
            match dev_exits.wait_for_records(Duration::from_micros(50), Duration::from_secs(5)) {
                Ok(WaitOutcome::Ready { .. }) => {}
                other => panic!("device side: {other:?}"),
            }
            while let Some(r) = dev_exits.try_pop().unwrap() {
                let e = r.decode().unwrap();
                let answer = CompletionRecord {
                    seq: e.seq,
                    data: e.addr ^ 0x55,
                    vcpu: e.vcpu,
                    status: 0,
                    reserved: 0,
                };
                while dev_done.try_push(answer).is_err() {
                    std::hint::spin_loop();
                }
                served += 1;
            }
        }
    });
    for seq in 0..N {
        let r = ExitRecord {
            kind: ExitKind::MmioRead as u8,
            flags: crate::abi::ExitFlags::NEEDS_COMPLETION.bits(),
            ..rec(seq)
        };
        exits.try_push(r).unwrap();
        let c = done
            .wait_completion(seq, Duration::from_micros(50), Duration::from_secs(5))
            .unwrap();
        assert_eq!(c.data, r.addr ^ 0x55);
        // Now and then pause, so the device side falls asleep and must be woken.
        if seq % 5000 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    device.join().unwrap();
    assert!(exits.wakeups() >= 1, "the pauses made the device side park");
}

/// Wait until this process is registered for membarrier (the first registration takes
/// milliseconds, and a producer made while it is in flight fences instead of waiting).
fn registered() -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !crate::warm_up() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn the_producer_mode_is_recorded_in_the_header() {
    assert!(registered(), "membarrier registration failed on this host");
    let (p, c) = crate::channel::<ExitRecord>(8);
    let mode = c.header().meta.producer_mode.load(Ordering::Relaxed);
    let expected = if p.uses_membarrier() {
        barrier::LIGHT
    } else {
        barrier::FENCED
    };
    assert_eq!(mode, expected);
    // On Linux >= 4.16 without a seccomp filter (our hosts), registration succeeds.
    assert!(
        p.uses_membarrier(),
        "membarrier registration failed on this host"
    );
}

#[test]
fn a_failed_membarrier_caps_every_park() {
    assert!(registered(), "membarrier registration failed on this host");
    let (p, mut c) = crate::channel::<ExitRecord>(8);
    assert!(
        p.uses_membarrier(),
        "membarrier registration failed on this host"
    );
    crate::barrier::FAIL_BARRIER_FOR_TEST.set(true);
    let out = c.wait_for_records(Duration::ZERO, Duration::from_millis(30));
    crate::barrier::FAIL_BARRIER_FOR_TEST.set(false);
    assert_eq!(out, Ok(WaitOutcome::TimedOut));
    // 30 ms in slices of at most FALLBACK_PARK (1 ms), instead of PARK_SLICE (1 s).
    assert!(
        c.fallback_parks() >= 5,
        "fallback parks: {}",
        c.fallback_parks()
    );
    assert_eq!(c.fallback_parks(), c.parks());
    // With the barrier working, parks are not capped and not counted.
    let (_p, mut c) = crate::channel::<ExitRecord>(8);
    let out = c.wait_for_records(Duration::ZERO, Duration::from_millis(30));
    assert_eq!(out, Ok(WaitOutcome::TimedOut));
    assert_eq!(c.fallback_parks(), 0);
    assert!(c.parks() <= 5, "parks: {}", c.parks());
}

#[test]
fn a_producer_that_lets_go_before_the_consumer_ever_parked_is_gone() {
    // The consumer is busy the whole time its producer is attached (records keep coming, it never
    // parks), so it never looks at the claims until the producer has let go. It must still learn
    // at its first park that nothing more will come, not sleep out its timeout: this cost a
    // short-lived VM 100 ms at its end when its device-model thread had started late.
    let (mut p, mut c) = crate::channel::<ExitRecord>(8);
    p.try_push(rec(1)).unwrap();
    assert_eq!(
        c.wait_for_records(Duration::ZERO, Duration::from_secs(1)),
        Ok(WaitOutcome::Ready { parked: false })
    );
    assert_eq!(c.try_pop().unwrap().map(|r| r.seq), Some(1));
    drop(p);
    let out = c.wait_for_records(Duration::ZERO, Duration::from_secs(2));
    assert_eq!(out, Ok(WaitOutcome::TimedOut));
    assert_eq!(c.parks(), 0, "it slept although its producer was gone");
    assert!(c.producer_gone());

    // The same when the producer published nothing at all before letting go.
    let (p, mut c) = crate::channel::<ExitRecord>(8);
    drop(p);
    assert!(c.producer_gone());
    // A producer that published and let go before this handle was made is seen through its
    // records once they are read; one that never attached is not "gone".
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    let mut c = ring.consumer().unwrap();
    assert!(!c.producer_gone(), "no producer has attached yet");
    drop(c);
    let mut p = ring.producer().unwrap();
    p.try_push(rec(7)).unwrap();
    drop(p);
    let mut c = ring.consumer().unwrap();
    assert_eq!(c.try_pop(), Ok(Some(rec(7))));
    assert!(c.producer_gone());
}

#[test]
fn a_woken_park_is_not_late() {
    let (mut p, mut c) = crate::channel::<ExitRecord>(8);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let out = c.wait_for_records(Duration::ZERO, Duration::from_secs(20));
        (out, c.late_wakeups(), c.parks())
    });
    wait_until_parked(tid_rx.recv().unwrap());
    p.try_push(rec(1)).unwrap();
    let (out, late, parks) = t.join().unwrap();
    assert_eq!(out, Ok(WaitOutcome::Ready { parked: true }));
    assert!(parks >= 1);
    assert_eq!(
        late, 0,
        "the publish woke the consumer; it did not wait for its timeout"
    );
}

#[test]
fn a_park_that_times_out_with_records_is_counted_late() {
    let buf = Buf::new(ring_len());
    let ring = formatted(&buf);
    let mut c = ring.consumer().unwrap();
    let mut p = ring.producer().unwrap();
    // A producer that publishes but never wakes (as a stalled or broken peer would): write the
    // slot and the tail directly, behind the protocol's back, while the consumer sleeps.
    let t = std::thread::spawn(move || {
        let out = c.wait_for_records(Duration::ZERO, Duration::from_secs(20));
        (out, c.late_wakeups())
    });
    while p.header().wake.word.load(Ordering::Relaxed) != SLEEPING {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(2));
    p.slot(0).with_mut(|s| {
        // SAFETY: slot 0 is free; the consumer reads it only after seeing the tail below.
        unsafe { s.write(rec(0)) }
    });
    p.header().tail.store(1, Ordering::Release);
    let (out, late) = t.join().unwrap();
    assert_eq!(out, Ok(WaitOutcome::Ready { parked: true }));
    assert_eq!(late, 1);
    p.tail = 1;
}

/// Single pops hand slots back to the producer in runs of `release_every` (8 for 64 slots), at
/// once when the consumer finds the ring empty, and on drop, so a successor never re-reads.
#[test]
fn single_pops_release_slots_in_runs_and_when_caught_up() {
    const BIG: u32 = 64;
    let buf = Buf::new(Ring::<ExitRecord>::required_size(BIG).unwrap());
    let ring = Ring::<ExitRecord>::format(
        buf.region(0, Ring::<ExitRecord>::required_size(BIG).unwrap()),
        BIG,
    )
    .unwrap();
    assert_eq!(release_every(u64::from(BIG)), 8);
    let (mut p, mut c) = (ring.producer().unwrap(), ring.consumer().unwrap());
    for seq in 0..u64::from(BIG) {
        p.try_push(rec(seq)).unwrap();
    }
    assert_eq!(p.try_push(rec(99)), Err(rec(99)), "full");
    for seq in 0..7 {
        assert_eq!(c.try_pop(), Ok(Some(rec(seq))));
    }
    // Seven read, none released yet: still full for the producer.
    assert_eq!(ring.header().head.load(Ordering::Relaxed), 0);
    assert_eq!(p.try_push(rec(99)), Err(rec(99)));
    assert_eq!(c.try_pop(), Ok(Some(rec(7))));
    // The eighth releases all eight.
    assert_eq!(ring.header().head.load(Ordering::Relaxed), 8);
    for seq in 64..72 {
        p.try_push(rec(seq)).unwrap();
    }
    assert_eq!(p.try_push(rec(99)), Err(rec(99)));
    // Drain: the pop that finds the ring empty releases the rest.
    for seq in 8..72 {
        assert_eq!(c.try_pop(), Ok(Some(rec(seq))));
    }
    assert_eq!(c.try_pop(), Ok(None));
    assert_eq!(ring.header().head.load(Ordering::Relaxed), 72);
    // Three more read, then the consumer goes away: its successor starts after them.
    for seq in 72..75 {
        p.try_push(rec(seq)).unwrap();
    }
    for seq in 72..75 {
        assert_eq!(c.try_pop(), Ok(Some(rec(seq))));
    }
    assert_eq!(ring.header().head.load(Ordering::Relaxed), 72);
    drop(c);
    assert_eq!(ring.header().head.load(Ordering::Relaxed), 75);
    let mut c = ring.consumer().unwrap();
    p.try_push(rec(75)).unwrap();
    assert_eq!(c.try_pop(), Ok(Some(rec(75))));
}
