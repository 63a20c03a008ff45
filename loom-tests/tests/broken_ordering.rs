//! The demonstration that the models can fail: built only with the `broken-ordering`
//! feature, which (under `cfg(loom)` only) makes the producer publish its index with a
//! `Relaxed` store instead of `Release`. The consumer may then read a slot before the write
//! that filled it is visible to it, and loom's checked cell reports it.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release --features broken-ordering --test broken_ordering
//! ```
//! passes because the model fails as expected; running the ordinary models with the same
//! feature (`--test ring`) shows the raw failures (README.md).
#![cfg(all(loom, feature = "broken-ordering"))]

use loom::thread;
use loom_tests::{check, push, write};
use pipeline::{channel, ExitRecord};

#[test]
#[should_panic(expected = "Causality violation")]
fn relaxed_publish_is_caught() {
    check("relaxed_publish_is_caught", || {
        let (mut p, mut c) = channel::<ExitRecord>(2);
        let producer = thread::spawn(move || push(&mut p, write(0)));
        loop {
            if let Some(r) = c.try_pop().unwrap() {
                assert_eq!(r, write(0));
                break;
            }
            thread::yield_now();
        }
        producer.join().unwrap();
    });
}
