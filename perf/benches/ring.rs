//! Our SPSC ring against `crossbeam_queue::ArrayQueue`, `rtrb` and `heapless::spsc`, in one run.
//!
//! ```sh
//! cargo bench -p perf --bench ring
//! ```
//!
//! Every case moves 48-byte [`ExitRecord`]s between two threads pinned to different cores
//! (producer/ping side on CPU 0, consumer/pong side on CPU 1, `sched_setaffinity`), through a
//! queue of 1024 slots (heapless: 1023, its `N - 1`):
//!
//! - `throughput_single`: one push / one pop per record; criterion reports records/s.
//! - `throughput_batch32`: records move in batches of 32, each queue through its best batch
//!   API: ours `push_batch`/`pop_batch` (one index store per batch), rtrb
//!   `write_chunk_uninit`/`read_chunk`; crossbeam and heapless have none, so they loop.
//! - `round_trip`: ping-pong latency: A pushes on ring 1, B pops it and pushes it back on
//!   ring 2, A pops it; criterion reports the time of one round trip.
//!
//! Each side spins on a full or empty queue (no pause, no yield), the same loop for every
//! queue. The consumer checks every record's `seq`, so nothing can be optimised away and a
//! broken queue fails the run. Every sample is a fresh queue and a fresh pair of threads;
//! only the transfer is timed (from a barrier release to the consumer's last record). Flat
//! sampling: every sample moves the same number of records, so per-sample figures compare.
//! Results and ratios: `docs/perf-ring.md`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use pipeline::ExitRecord;

const CAPACITY: usize = 1024;
const BATCH: usize = 32;
const PING_CPU: usize = 0;
const PONG_CPU: usize = 1;

/// Pin the calling thread to one CPU.
fn pin(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (we only use 0 and 1).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the given size.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity({cpu}): {}",
        std::io::Error::last_os_error()
    );
}

fn record(seq: u64) -> ExitRecord {
    ExitRecord {
        seq,
        addr: 0x3f8,
        offset: 0,
        data: seq,
        vcpu: 0,
        device: 1,
        kind: 2,
        size: 1,
        flags: 1,
        reserved: 0,
    }
}

/// The sending half of a queue under test.
trait Tx: Send {
    fn push(&mut self, r: ExitRecord) -> Result<(), ExitRecord>;

    /// Push a prefix of `rs`; how many were taken.
    fn push_batch(&mut self, rs: &[ExitRecord]) -> usize {
        let mut n = 0;
        for r in rs {
            if self.push(*r).is_err() {
                break;
            }
            n += 1;
        }
        n
    }
}

/// The receiving half of a queue under test.
trait Rx: Send {
    fn pop(&mut self) -> Option<ExitRecord>;

    /// Pop up to `out.len()` records into `out`; how many.
    fn pop_batch(&mut self, out: &mut [ExitRecord]) -> usize {
        let mut n = 0;
        for slot in out {
            match self.pop() {
                Some(r) => *slot = r,
                None => break,
            }
            n += 1;
        }
        n
    }
}

// --- ours ---------------------------------------------------------------------------------

impl Tx for pipeline::Producer<ExitRecord> {
    #[inline]
    fn push(&mut self, r: ExitRecord) -> Result<(), ExitRecord> {
        self.try_push(r)
    }

    #[inline]
    fn push_batch(&mut self, rs: &[ExitRecord]) -> usize {
        pipeline::Producer::push_batch(self, rs)
    }
}

impl Rx for pipeline::Consumer<ExitRecord> {
    #[inline]
    fn pop(&mut self) -> Option<ExitRecord> {
        self.try_pop().expect("ring error")
    }

    #[inline]
    fn pop_batch(&mut self, out: &mut [ExitRecord]) -> usize {
        pipeline::Consumer::pop_batch(self, out).expect("ring error")
    }
}

// --- rtrb -------------------------------------------------------------------------------

impl Tx for rtrb::Producer<ExitRecord> {
    #[inline]
    fn push(&mut self, r: ExitRecord) -> Result<(), ExitRecord> {
        rtrb::Producer::push(self, r).map_err(|rtrb::PushError::Full(r)| r)
    }

    #[inline]
    fn push_batch(&mut self, rs: &[ExitRecord]) -> usize {
        let n = rs.len().min(self.slots());
        match self.write_chunk_uninit(n) {
            Ok(chunk) => chunk.fill_from_iter(rs.iter().copied()),
            Err(_) => 0,
        }
    }
}

impl Rx for rtrb::Consumer<ExitRecord> {
    #[inline]
    fn pop(&mut self) -> Option<ExitRecord> {
        rtrb::Consumer::pop(self).ok()
    }

    #[inline]
    fn pop_batch(&mut self, out: &mut [ExitRecord]) -> usize {
        let n = out.len().min(self.slots());
        let Ok(chunk) = self.read_chunk(n) else {
            return 0;
        };
        let (a, b) = chunk.as_slices();
        out[..a.len()].copy_from_slice(a);
        out[a.len()..n].copy_from_slice(b);
        chunk.commit_all();
        n
    }
}

// --- crossbeam ----------------------------------------------------------------------------

/// `ArrayQueue` is multi-producer multi-consumer and shared by reference.
struct Shared<'q>(&'q crossbeam_queue::ArrayQueue<ExitRecord>);

impl Tx for Shared<'_> {
    #[inline]
    fn push(&mut self, r: ExitRecord) -> Result<(), ExitRecord> {
        self.0.push(r)
    }
}

impl Rx for Shared<'_> {
    #[inline]
    fn pop(&mut self) -> Option<ExitRecord> {
        self.0.pop()
    }
}

// --- heapless -----------------------------------------------------------------------------

type HeaplessQueue = heapless::spsc::Queue<ExitRecord, CAPACITY>;

impl Tx for heapless::spsc::Producer<'_, ExitRecord> {
    #[inline]
    fn push(&mut self, r: ExitRecord) -> Result<(), ExitRecord> {
        self.enqueue(r)
    }
}

impl Rx for heapless::spsc::Consumer<'_, ExitRecord> {
    #[inline]
    fn pop(&mut self) -> Option<ExitRecord> {
        self.dequeue()
    }
}

// --- the measurements ---------------------------------------------------------------------

/// Move `n` records from `tx` (this thread, CPU 0) to `rx` (a thread on CPU 1); the time from
/// the start signal to the last record received.
fn transfer(mut tx: impl Tx, mut rx: impl Rx, n: u64, batched: bool) -> Duration {
    let start = &Barrier::new(2);
    std::thread::scope(|s| {
        // `move`: each handle lives on the stack of the thread that uses it, so the two
        // handles' own fields cannot share a cache line.
        let consumer = s.spawn(move || {
            pin(PONG_CPU);
            start.wait();
            let mut next = 0u64;
            let mut buf = [ExitRecord::default(); BATCH];
            while next < n {
                if batched {
                    let got = rx.pop_batch(&mut buf);
                    for r in &buf[..got] {
                        assert_eq!(r.seq, next);
                        next += 1;
                    }
                } else if let Some(r) = rx.pop() {
                    assert_eq!(r.seq, next);
                    next += 1;
                }
            }
            black_box(&buf);
        });
        pin(PING_CPU);
        start.wait();
        let t0 = Instant::now();
        let mut seq = 0u64;
        if batched {
            let mut buf = [ExitRecord::default(); BATCH];
            while seq < n {
                let len = usize::try_from((n - seq).min(BATCH as u64)).unwrap();
                for (i, r) in buf[..len].iter_mut().enumerate() {
                    *r = record(seq + i as u64);
                }
                let mut sent = 0;
                while sent < len {
                    sent += tx.push_batch(&buf[sent..len]);
                }
                seq += len as u64;
            }
        } else {
            while seq < n {
                let mut r = record(seq);
                while let Err(back) = tx.push(r) {
                    r = back;
                }
                seq += 1;
            }
        }
        consumer.join().unwrap();
        t0.elapsed()
    })
}

/// `n` round trips: this thread (CPU 0) sends on `ping`, the other (CPU 1) echoes each record
/// back on `pong`; the total time.
fn round_trips(
    mut ping_tx: impl Tx,
    mut ping_rx: impl Rx,
    mut pong_tx: impl Tx,
    mut pong_rx: impl Rx,
    n: u64,
) -> Duration {
    let start = &Barrier::new(2);
    std::thread::scope(|s| {
        let echo = s.spawn(move || {
            pin(PONG_CPU);
            start.wait();
            for _ in 0..n {
                let mut r = loop {
                    if let Some(r) = ping_rx.pop() {
                        break r;
                    }
                };
                while let Err(back) = pong_tx.push(r) {
                    r = back;
                }
            }
        });
        pin(PING_CPU);
        start.wait();
        let t0 = Instant::now();
        for seq in 0..n {
            let mut r = record(seq);
            while let Err(back) = ping_tx.push(r) {
                r = back;
            }
            let back = loop {
                if let Some(r) = pong_rx.pop() {
                    break r;
                }
            };
            assert_eq!(back.seq, seq);
        }
        let elapsed = t0.elapsed();
        echo.join().unwrap();
        elapsed
    })
}

fn cap_u32() -> u32 {
    u32::try_from(CAPACITY).unwrap()
}

/// Run `f(n)` for each of the four queues, as one criterion group.
fn throughput_group(c: &mut Criterion, name: &str, batched: bool) {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(1));
    g.bench_function("pipeline", |b| {
        b.iter_custom(|n| {
            let (tx, rx) = pipeline::channel::<ExitRecord>(cap_u32());
            transfer(tx, rx, n, batched)
        });
    });
    g.bench_function("rtrb", |b| {
        b.iter_custom(|n| {
            let (tx, rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            transfer(tx, rx, n, batched)
        });
    });
    g.bench_function("crossbeam_ArrayQueue", |b| {
        b.iter_custom(|n| {
            let q = crossbeam_queue::ArrayQueue::new(CAPACITY);
            transfer(Shared(&q), Shared(&q), n, batched)
        });
    });
    g.bench_function("heapless_spsc", |b| {
        b.iter_custom(|n| {
            let mut q = Box::new(HeaplessQueue::new());
            let (tx, rx) = q.split();
            transfer(tx, rx, n, batched)
        });
    });
    g.finish();
}

fn throughput_single(c: &mut Criterion) {
    throughput_group(c, "throughput_single", false);
}

fn throughput_batch32(c: &mut Criterion) {
    throughput_group(c, "throughput_batch32", true);
}

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_trip");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("pipeline", |b| {
        b.iter_custom(|n| {
            let (a_tx, a_rx) = pipeline::channel::<ExitRecord>(cap_u32());
            let (b_tx, b_rx) = pipeline::channel::<ExitRecord>(cap_u32());
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        });
    });
    g.bench_function("rtrb", |b| {
        b.iter_custom(|n| {
            let (a_tx, a_rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            let (b_tx, b_rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        });
    });
    g.bench_function("crossbeam_ArrayQueue", |b| {
        b.iter_custom(|n| {
            let qa = crossbeam_queue::ArrayQueue::new(CAPACITY);
            let qb = crossbeam_queue::ArrayQueue::new(CAPACITY);
            round_trips(Shared(&qa), Shared(&qa), Shared(&qb), Shared(&qb), n)
        });
    });
    g.bench_function("heapless_spsc", |b| {
        b.iter_custom(|n| {
            let mut qa = Box::new(HeaplessQueue::new());
            let mut qb = Box::new(HeaplessQueue::new());
            let (a_tx, a_rx) = qa.split();
            let (b_tx, b_rx) = qb.split();
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        });
    });
    g.finish();
}

fn config() -> Criterion {
    // About 2 s per case; 30 short samples, so a burst of load from other work on the machine
    // spoils a few samples rather than the estimate (docs/perf-ring.md reports the median).
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput_single, throughput_batch32, round_trip
}

// --- interleaved rounds (`RING_ROUNDS=N`) -------------------------------------------------

/// The queues, in report order.
const QUEUES: [&str; 4] = ["pipeline", "rtrb", "crossbeam_ArrayQueue", "heapless_spsc"];

/// One transfer of `n` records through queue `q` (an index into [`QUEUES`]).
fn transfer_on(q: usize, n: u64, batched: bool) -> Duration {
    match q {
        0 => {
            let (tx, rx) = pipeline::channel::<ExitRecord>(cap_u32());
            transfer(tx, rx, n, batched)
        }
        1 => {
            let (tx, rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            transfer(tx, rx, n, batched)
        }
        2 => {
            let q = crossbeam_queue::ArrayQueue::new(CAPACITY);
            transfer(Shared(&q), Shared(&q), n, batched)
        }
        _ => {
            let mut q = Box::new(HeaplessQueue::new());
            let (tx, rx) = q.split();
            transfer(tx, rx, n, batched)
        }
    }
}

/// `n` round trips through a pair of queue `q`.
fn round_trips_on(q: usize, n: u64) -> Duration {
    match q {
        0 => {
            let (a_tx, a_rx) = pipeline::channel::<ExitRecord>(cap_u32());
            let (b_tx, b_rx) = pipeline::channel::<ExitRecord>(cap_u32());
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        }
        1 => {
            let (a_tx, a_rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            let (b_tx, b_rx) = rtrb::RingBuffer::<ExitRecord>::new(CAPACITY);
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        }
        2 => {
            let qa = crossbeam_queue::ArrayQueue::new(CAPACITY);
            let qb = crossbeam_queue::ArrayQueue::new(CAPACITY);
            round_trips(Shared(&qa), Shared(&qa), Shared(&qb), Shared(&qb), n)
        }
        _ => {
            let mut qa = Box::new(HeaplessQueue::new());
            let mut qb = Box::new(HeaplessQueue::new());
            let (a_tx, a_rx) = qa.split();
            let (b_tx, b_rx) = qb.split();
            round_trips(a_tx, a_rx, b_tx, b_rx, n)
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Criterion measures one queue after another, so a host that speeds up or slows down during
/// the run (ours does: see docs/perf-ring.md) favours whichever queue ran in the better minutes.
/// Here every round measures all four queues back to back, in an order that rotates from round
/// to round, and each round gives our ratio against the best peer *of that round*; the report is
/// the median over rounds, with the spread and how many rounds we won.
fn interleaved(rounds: usize) {
    const SINGLE: u64 = 2_000_000;
    const RT: u64 = 100_000;
    let cases: [(&str, bool); 3] = [
        ("throughput_single (M records/s)", false),
        ("throughput_batch32 (M records/s)", true),
        ("round_trip (ns, lower is better)", false),
    ];
    println!(
        "ring, interleaved: {rounds} rounds, each queue once per round in rotating order; \
         {SINGLE} records per transfer, {RT} round trips per latency sample"
    );
    println!();
    println!("| case | ours | rtrb | crossbeam | heapless | ours ÷ best peer, per round: median [min, max] | rounds ours ≥ best peer |");
    println!("|---|---:|---:|---:|---:|---|---:|");
    for (ci, (name, batched)) in cases.iter().enumerate() {
        let latency = ci == 2;
        let mut per_queue: Vec<Vec<f64>> = vec![Vec::new(); QUEUES.len()];
        let mut ratios = Vec::new();
        for r in 0..rounds {
            let mut this = [0f64; 4];
            for k in 0..QUEUES.len() {
                let q = (k + r) % QUEUES.len();
                this[q] = if latency {
                    round_trips_on(q, RT).as_nanos() as f64 / RT as f64
                } else {
                    SINGLE as f64 / transfer_on(q, SINGLE, *batched).as_secs_f64() / 1e6
                };
            }
            for (q, v) in this.iter().enumerate() {
                per_queue[q].push(*v);
            }
            // Ours against the best peer of this round (throughput: higher is better, so the
            // ratio is ours / best; latency: best / ours, so > 1 always means ours is better).
            let ratio = if latency {
                this[1..].iter().copied().fold(f64::INFINITY, f64::min) / this[0]
            } else {
                this[0] / this[1..].iter().copied().fold(0.0, f64::max)
            };
            ratios.push(ratio);
        }
        let wins = ratios.iter().filter(|&&x| x >= 1.0).count();
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        let m: Vec<f64> = per_queue.iter_mut().map(|v| median(v)).collect();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} [{lo:.3}, {hi:.3}] | {wins} of {rounds} |",
            m[0],
            m[1],
            m[2],
            m[3],
            median(&mut ratios)
        );
    }
    println!();
    println!("(round trip: the ratio is best peer ÷ ours, so above 1 means ours is faster)");
}

fn main() {
    if let Some(rounds) = std::env::var("RING_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        if std::env::args().any(|a| a == "--list") {
            return;
        }
        interleaved(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
