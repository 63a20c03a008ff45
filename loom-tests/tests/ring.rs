//! loom models of the SPSC ring and its wake-up protocol.
//!
//! Slots are loom `UnsafeCell`s under `cfg(loom)`, so any slot read that is not ordered after
//! the write that filled it (or a write that races a read) fails the model with a causality
//! violation, and a lost wake-up fails it as a deadlock (the modelled futex has no timeout).
#![cfg(loom)]

use std::time::Duration;

use loom::thread;
use loom_tests::{answer, check, push, read, write};
use pipeline::{channel, CompletionRecord, ExitRecord, WaitOutcome};

/// Long enough never to expire; under loom time does not pass anyway.
const FOREVER: Duration = Duration::from_secs(3600);
/// Non-zero: the waiter spins (yields) once before it decides to sleep.
const SPIN: Duration = Duration::from_nanos(1);

/// More records than slots, so both indices wrap: capacity 2, four records, each checked for
/// order and payload.
#[test]
fn push_pop_wraps_around() {
    check("push_pop_wraps_around", || {
        let (mut p, mut c) = channel::<ExitRecord>(2);
        let producer = thread::spawn(move || {
            for seq in 0..4 {
                push(&mut p, write(seq));
            }
        });
        let mut next = 0;
        while next < 4 {
            match c.try_pop().unwrap() {
                Some(r) => {
                    assert_eq!(r, write(next));
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(c.try_pop().unwrap(), None);
    });
}

/// Full gives the record back intact; empty gives `None`; a slot freed by the consumer is
/// reused by the producer only after the consumer has read it.
#[test]
fn full_and_empty() {
    check("full_and_empty", || {
        let (mut p, mut c) = channel::<ExitRecord>(2);
        p.try_push(write(0)).unwrap();
        p.try_push(write(1)).unwrap();
        assert_eq!(p.try_push(write(2)), Err(write(2)));
        let consumer = thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 3 {
                match c.try_pop().unwrap() {
                    Some(r) => seen.push(r),
                    None => thread::yield_now(),
                }
            }
            assert_eq!(c.try_pop().unwrap(), None);
            seen
        });
        push(&mut p, write(2));
        let seen = consumer.join().unwrap();
        assert_eq!(seen, [write(0), write(1), write(2)]);
    });
}

/// Single pops store the consumer's index only every `release_every` records (2 for 16 slots)
/// or when the ring is found empty: a full ring, one more record pushed while the consumer
/// drains it; the producer reuses a slot only after it was read, every record arrives once, in
/// order, and the odd last record is released when the consumer finds the ring empty (the
/// consumer handle is kept alive, so its drop cannot do it).
#[test]
fn deferred_release_of_a_full_ring() {
    check("deferred_release_of_a_full_ring", || {
        let (mut p, mut c) = channel::<ExitRecord>(16);
        for seq in 0..16 {
            p.try_push(write(seq)).unwrap();
        }
        assert_eq!(p.try_push(write(16)), Err(write(16)));
        let consumer = thread::spawn(move || {
            let mut next = 0;
            while next < 17 {
                match c.try_pop().unwrap() {
                    Some(r) => {
                        assert_eq!(r, write(next));
                        next += 1;
                    }
                    None => thread::yield_now(),
                }
            }
            assert_eq!(c.try_pop().unwrap(), None);
            c
        });
        push(&mut p, write(16));
        let c = consumer.join().unwrap();
        assert!(
            p.is_empty(),
            "the consumer released every slot once caught up"
        );
        drop(c);
    });
}

/// Batch publish (N slots, one release store) and batch consume, across the wrap point:
/// capacity 4, batches of 3 and 2, consumed in chunks of up to 4.
#[test]
fn batch_publish_and_consume() {
    check("batch_publish_and_consume", || {
        let (mut p, mut c) = channel::<ExitRecord>(4);
        let producer = thread::spawn(move || {
            let all = [write(0), write(1), write(2), write(3), write(4)];
            let mut sent = 0;
            for end in [3, 5] {
                while sent < end {
                    let n = p.push_batch(&all[sent..end]);
                    if n == 0 {
                        thread::yield_now();
                    }
                    sent += n;
                }
            }
        });
        let mut buf = [ExitRecord::default(); 4];
        let mut next = 0;
        while next < 5 {
            let n = c.pop_batch(&mut buf).unwrap();
            if n == 0 {
                thread::yield_now();
            }
            for r in &buf[..n] {
                assert_eq!(*r, write(next));
                next += 1;
            }
        }
        producer.join().unwrap();
    });
}

/// No lost wake-up: the consumer spins once, then goes through flag / fence / re-check /
/// park while the producer publishes. Whatever the interleaving, the consumer ends up with the
/// record (a lost wake-up would leave it parked forever: a loom deadlock). The producer pays
/// a wake-up only if the consumer had set the flag, and at most once.
#[test]
fn wakeup_is_never_lost() {
    check("wakeup_is_never_lost", || {
        let (mut p, mut c) = channel::<ExitRecord>(2);
        let producer = thread::spawn(move || {
            p.try_push(write(0)).unwrap();
            p.wakeups()
        });
        let out = c.wait_for_records(SPIN, FOREVER).unwrap();
        assert!(matches!(out, WaitOutcome::Ready { .. }), "{out:?}");
        assert_eq!(c.try_pop().unwrap(), Some(write(0)));
        let wakeups = producer.join().unwrap();
        assert!(wakeups <= 1);
        if wakeups == 1 {
            // Somebody was (about to be) asleep; never a wake-up without the flag.
            assert!(c.parks() <= 1);
        }
    });
}

/// The wake flag re-arms: two waits, two separate publishes. Exercises the path where the
/// consumer finds a record after setting the flag (and must clear it) and the path where it
/// sleeps, in every bounded interleaving with the producer's publishes.
#[test]
fn wakeup_rearms_for_the_next_wait() {
    check("wakeup_rearms_for_the_next_wait", || {
        let (mut p, mut c) = channel::<ExitRecord>(2);
        let producer = thread::spawn(move || {
            p.try_push(write(0)).unwrap();
            push(&mut p, write(1));
        });
        for seq in 0..2 {
            let out = c.wait_for_records(SPIN, FOREVER).unwrap();
            assert!(matches!(out, WaitOutcome::Ready { .. }), "{out:?}");
            assert_eq!(c.try_pop().unwrap(), Some(write(seq)));
        }
        producer.join().unwrap();
    });
}

/// The completion wait: the vCPU posts a read and waits for its completion (spin, then park);
/// the device side waits for the exit (spin, then park), answers on the completion ring.
/// Both directions use the wake-up protocol; the vCPU always gets the right answer.
#[test]
fn completion_wait_gets_the_matching_answer() {
    check("completion_wait_gets_the_matching_answer", || {
        let (mut exits, mut dev_exits) = channel::<ExitRecord>(2);
        let (mut dev_done, mut done) = channel::<CompletionRecord>(2);
        let device = thread::spawn(move || {
            let out = dev_exits.wait_for_records(SPIN, FOREVER).unwrap();
            assert!(matches!(out, WaitOutcome::Ready { .. }));
            let r = dev_exits.try_pop().unwrap().unwrap();
            dev_done.try_push(answer(&r)).unwrap();
        });
        let r = read(7);
        exits.try_push(r).unwrap();
        let c = done.wait_completion(7, SPIN, FOREVER).unwrap();
        assert_eq!(c, answer(&r));
        device.join().unwrap();
    });
}

/// Two round trips: each ring's wake flag is armed, cleared and re-armed while the other
/// side runs, and a posted write (no completion) travels ahead of the second read.
#[test]
fn completion_wait_two_round_trips_with_a_posted_write() {
    check(
        "completion_wait_two_round_trips_with_a_posted_write",
        || {
            let (mut exits, mut dev_exits) = channel::<ExitRecord>(2);
            let (mut dev_done, mut done) = channel::<CompletionRecord>(2);
            let device = thread::spawn(move || {
                let mut served = 0;
                while served < 3 {
                    let out = dev_exits.wait_for_records(SPIN, FOREVER).unwrap();
                    assert!(matches!(out, WaitOutcome::Ready { .. }));
                    while let Some(r) = dev_exits.try_pop().unwrap() {
                        served += 1;
                        if r.decode().unwrap().needs_completion() {
                            push(&mut dev_done, answer(&r));
                        }
                    }
                }
            });
            let first = read(1);
            exits.try_push(first).unwrap();
            assert_eq!(
                done.wait_completion(1, SPIN, FOREVER).unwrap(),
                answer(&first)
            );
            push(&mut exits, write(2));
            let second = read(3);
            push(&mut exits, second);
            assert_eq!(
                done.wait_completion(3, SPIN, FOREVER).unwrap(),
                answer(&second)
            );
            device.join().unwrap();
        },
    );
}
