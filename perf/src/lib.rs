//! Counters, histograms, traces and the benchmarks' shared code.
//!
//! - [`exits`]: exit round trips under our machine and under a raw `KVM_RUN` loop.

pub mod exits;
