//! Two processes over one memfd mapping.
//!
//! The test re-executes its own binary (`current_exe`) to run the other half, passing the
//! memfd by inheritance (its number in an environment variable). The child halves are
//! `#[ignore]`d tests that do nothing unless that variable is set.
//!
//! - `ten_million_records_between_two_processes`: a producer process pushes 10,000,000
//!   records (1,000,000 in a debug build, where an unoptimised ring is ~30x slower; CI runs
//!   `cargo test -p pipeline --release --test two_process` for the full count) through one ring;
//!   the consumer (this process) checks that none is lost, duplicated or reordered (the `seq`
//!   numbering) and that every payload field is the one derived from its `seq`. The producer
//!   pauses now and then, so the consumer parks on the shared futex and must be woken from
//!   the other process.
//! - `read_round_trips_between_two_processes`: a ring set in a memfd; the child is the vCPU
//!   side (posts reads, waits for each completion), this process the device side.
//!
//! Both are bounded: every wait has a timeout, and the parent kills the child (by its PID) and
//! fails if the whole exchange takes longer than `DEADLINE`.
#![cfg(not(loom))]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeline::{
    CompletionRecord, ExitFlags, ExitKind, ExitRecord, Ring, RingSet, SharedRegion, WaitOutcome,
};

const ENV_FD: &str = "PIPELINE_TWO_PROCESS_FD";
const DEADLINE: Duration = Duration::from_secs(120);

/// Records moved by the ten-million test (see the module docs for the debug count).
const RECORDS: u64 = if cfg!(debug_assertions) {
    1_000_000
} else {
    10_000_000
};
const CAPACITY: u32 = 1024;
/// The producer sleeps this long every `PAUSE_EVERY` records, so the consumer parks.
const PAUSE: Duration = Duration::from_millis(3);
const PAUSE_EVERY: u64 = RECORDS / 8;
const BATCH: usize = 32;

/// Every field derived from `seq`, so a lost, duplicated, reordered or torn record shows.
fn payload(seq: u64) -> ExitRecord {
    ExitRecord {
        seq,
        addr: seq.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        offset: seq ^ 0x5555_5555,
        data: !seq,
        vcpu: u32::try_from(seq % 61).unwrap(),
        device: u16::try_from(seq % 7).unwrap(),
        kind: if seq % 2 == 0 {
            ExitKind::PioWrite.into()
        } else {
            ExitKind::MmioWrite.into()
        },
        size: [1, 2, 4, 8][usize::try_from(seq % 4).unwrap()],
        flags: ExitFlags::POSTED.bits(),
        reserved: 0,
    }
}

/// Start `child_test` (an ignored test of this binary) with the memfd inherited.
fn spawn_child(child_test: &str, shm: &SharedRegion) -> Child {
    // `dup` clears close-on-exec on the copy, so the child inherits it.
    // SAFETY: plain syscall on a descriptor we own; the copy is closed below.
    let raw = unsafe { libc::dup(shm.fd().as_raw_fd()) };
    assert!(raw >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let inherited = unsafe { OwnedFd::from_raw_fd(raw) };
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            child_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_FD, raw.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("re-exec the test binary");
    drop(inherited);
    child
}

/// The memfd handed to a child half, or `None` when the test runs on its own.
fn inherited_region() -> Option<SharedRegion> {
    let raw: i32 = std::env::var(ENV_FD).ok()?.parse().expect("fd number");
    // SAFETY: the parent passed us this inherited descriptor to own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Some(SharedRegion::from_fd(fd).expect("map the inherited memfd"))
}

/// Wait for the child to exit within `deadline`, killing it if it does not; its stdout.
fn finish(mut child: Child, deadline: Instant) -> String {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert!(status.success(), "child failed: {status}; stdout: {out}");
            return out;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("child did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The number the child printed as `key=N` (libtest may prefix the line).
fn stat(out: &str, key: &str) -> u64 {
    let tag = format!("{key}=");
    out.lines()
        .find_map(|l| {
            let rest = &l[l.find(&tag)? + tag.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("child printed no {key}: {out}"))
}

#[test]
fn ten_million_records_between_two_processes() {
    let start = Instant::now();
    let deadline = start + DEADLINE;
    let len = Ring::<ExitRecord>::required_size(CAPACITY).unwrap();
    let shm = SharedRegion::create(len).unwrap();
    let ring = Ring::<ExitRecord>::format(shm.region(), CAPACITY).unwrap();
    let mut consumer = ring.consumer().unwrap();
    let child = spawn_child("child_producer", &shm);

    let mut buf = vec![ExitRecord::default(); BATCH];
    let mut next = 0u64;
    let mut parked_waits = 0u64;
    while next < RECORDS {
        assert!(Instant::now() < deadline, "consumer stuck at {next}");
        match consumer.wait_for_records(Duration::from_micros(50), Duration::from_secs(10)) {
            Ok(WaitOutcome::Ready { parked }) => parked_waits += u64::from(parked),
            Ok(WaitOutcome::TimedOut) => panic!("no record for 10 s at {next}: lost wake-up?"),
            Err(e) => panic!("ring error at {next}: {e}"),
        }
        // Alternate batch and single pops.
        if next % 2 == 0 {
            let n = consumer.pop_batch(&mut buf).unwrap();
            for r in &buf[..n] {
                assert_eq!(*r, payload(next), "record {next}");
                next += 1;
            }
        } else if let Some(r) = consumer.try_pop().unwrap() {
            assert_eq!(r, payload(next), "record {next}");
            next += 1;
        }
    }
    let out = finish(child, deadline);
    // Nothing more than RECORDS was sent: no duplicates at the end.
    assert_eq!(consumer.try_pop().unwrap(), None);
    let wakeups = stat(&out, "wakeups");
    let elapsed = start.elapsed();
    eprintln!(
        "two processes: {RECORDS} records in {elapsed:.2?} ({:.1} M records/s), \
         consumer parked {} times ({parked_waits} waits ended after a park, {} late), \
         producer woke it {wakeups} times",
        RECORDS as f64 / elapsed.as_secs_f64() / 1e6,
        consumer.parks(),
        consumer.late_wakeups(),
    );
    // The pauses made the consumer sleep, and only a cross-process futex wake ended those
    // sleeps promptly (a 10 s timeout would have failed the test above).
    assert!(consumer.parks() > 0, "consumer never parked");
    // Parks are cut into 10 ms slices, so a lost wake-up would not hang the test; it would show
    // as a park that timed out with records waiting. A few can happen legitimately (the
    // producer descheduled between publishing and waking); a lost-wake-up bug makes most of
    // the parks during the pauses late.
    assert!(
        consumer.late_wakeups() * 10 <= consumer.parks(),
        "late wake-ups: {} of {} parks",
        consumer.late_wakeups(),
        consumer.parks()
    );
    assert_eq!(
        consumer.fallback_parks(),
        0,
        "membarrier failed in this process"
    );
    // (Wake-ups may exceed parks: a consumer that set its flag and then found the record on
    // its re-check returns without parking, though the producer saw the flag and woke it.)
    assert!(wakeups > 0, "producer never woke the consumer");
}

/// Child half of `ten_million_records_between_two_processes`.
#[test]
#[ignore = "child half of ten_million_records_between_two_processes; runs only when re-executed"]
fn child_producer() {
    let Some(shm) = inherited_region() else {
        return;
    };
    let ring = Ring::<ExitRecord>::attach(shm.region()).unwrap();
    let mut producer = ring.producer().unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut batch = Vec::with_capacity(BATCH);
    let mut seq = 0u64;
    let mut next_pause = PAUSE_EVERY;
    let mut full_spins = 0u64;
    while seq < RECORDS {
        if seq >= next_pause {
            std::thread::sleep(PAUSE);
            next_pause += PAUSE_EVERY;
        }
        // Alternate batch publishes and single pushes.
        let pushed = if (seq / BATCH as u64) % 2 == 0 {
            batch.clear();
            let end = (seq + BATCH as u64).min(RECORDS);
            batch.extend((seq..end).map(payload));
            producer.push_batch(&batch) as u64
        } else {
            u64::from(producer.try_push(payload(seq)).is_ok())
        };
        if pushed == 0 {
            assert!(producer.poisoned().is_none(), "{:?}", producer.poisoned());
            assert!(Instant::now() < deadline, "producer stuck at {seq}");
            full_spins += 1;
            // On an oversubscribed machine the consumer may share our core: do not spin a
            // whole timeslice away waiting for it.
            if full_spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        seq += pushed;
    }
    println!("wakeups={}", producer.wakeups());
}

const ROUND_TRIPS: u64 = if cfg!(debug_assertions) {
    20_000
} else {
    200_000
};

#[test]
fn read_round_trips_between_two_processes() {
    let start = Instant::now();
    let deadline = start + DEADLINE;
    let len = RingSet::required_size(2, 64, 64).unwrap();
    let shm = SharedRegion::create(len).unwrap();
    let set = RingSet::format(shm.region(), 2, 64, 64).unwrap();
    let mut dev = set.device_side(1).unwrap();
    let child = spawn_child("child_vcpu", &shm);
    let mut buf = [ExitRecord::default(); 16];
    let mut served = 0;
    while served < ROUND_TRIPS {
        assert!(Instant::now() < deadline, "device side stuck at {served}");
        match dev
            .exits
            .wait_for_records(Duration::from_micros(50), Duration::from_secs(10))
        {
            Ok(WaitOutcome::Ready { .. }) => {}
            other => panic!("device side at {served}: {other:?}"),
        }
        let n = dev.exits.pop_batch(&mut buf).unwrap();
        for r in &buf[..n] {
            let e = r.decode().unwrap();
            assert_eq!(e.seq, served);
            assert!(e.needs_completion());
            let answer = CompletionRecord {
                seq: e.seq,
                data: e.addr.rotate_left(7),
                vcpu: e.vcpu,
                status: 0,
                reserved: 0,
            };
            assert!(
                dev.completions.try_push(answer).is_ok(),
                "one outstanding read"
            );
            served += 1;
        }
    }
    let out = finish(child, deadline);
    eprintln!(
        "two processes: {ROUND_TRIPS} read round trips in {:.2?}; device side parked {} times, \
         vCPU side parked {} times",
        start.elapsed(),
        dev.exits.parks(),
        stat(&out, "parks"),
    );
    assert!(dev.exits.parks() > 0, "device side never parked");
    assert!(
        dev.exits.late_wakeups() * 10 <= dev.exits.parks(),
        "late wake-ups: {} of {} parks",
        dev.exits.late_wakeups(),
        dev.exits.parks()
    );
}

/// Child half of `read_round_trips_between_two_processes`: the vCPU side of CPU 1.
#[test]
#[ignore = "child half of read_round_trips_between_two_processes; runs only when re-executed"]
fn child_vcpu() {
    let Some(shm) = inherited_region() else {
        return;
    };
    let set = RingSet::attach(shm.region()).unwrap();
    assert_eq!(set.cpus(), 2);
    let mut vcpu = set.vcpu_side(1).unwrap();
    for seq in 0..ROUND_TRIPS {
        let r = ExitRecord {
            seq,
            addr: 0xfed0_0000 + (seq % 4096),
            offset: seq % 4096,
            data: 0,
            vcpu: 1,
            device: 3,
            kind: ExitKind::MmioRead.into(),
            size: 4,
            flags: ExitFlags::NEEDS_COMPLETION.bits(),
            reserved: 0,
        };
        vcpu.exits.try_push(r).unwrap();
        let c = vcpu
            .completions
            .wait_completion(seq, Duration::from_micros(50), Duration::from_secs(10))
            .unwrap();
        assert_eq!(c.data, r.addr.rotate_left(7));
        // Now and then let the device side fall asleep, so this side must wake it.
        if seq % (ROUND_TRIPS / 5) == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    println!("parks={}", vcpu.completions.parks());
}
