//! How the monitor explains itself: a cycle-accurate clock, latency histograms, exit trace rings,
//! exporters (Chrome trace / Perfetto JSON, bhyvectl-style text, JSON), SVG plots and live rates.
//! The benchmarks live in `benches/` (ring throughput and latency, exit round trips, the cost of
//! this instrumentation).
//!
//! This library depends on nothing of ours but `pipeline` (whose ring carries the trace
//! events), so `vcpu-runner` can depend on it. How the exit path calls it, and what each call
//! costs: `docs/perf-instrumentation.md`.
//!
//! # Pieces
//! - [`Clock`]: `rdtsc` calibrated against `Instant` (fallback: `Instant`), ticks → ns.
//! - [`Histogram`]: fixed-size log-linear buckets, single writer, snapshot from anywhere;
//!   [`HistogramSet`]: one per ([`Phase`], [`ExitClass`], [`StageClass`]).
//! - [`VcpuProbe`]: the per-vCPU instrument the run loop calls around `Vcpu::run`.
//! - [`trace_rings`]: a [`TraceSwitch`], one [`TraceWriter`] per vCPU, one [`TraceCollector`].
//! - exporters: [`chrome_trace_json`], [`stats_text`], [`stats_json`], [`histograms_text`],
//!   [`histograms_json`].
//! - plots: [`plot_histogram_svg`], [`plot_rate_svg`], [`plot_rates_svg`].
//! - [`RateSampler`]: per-second rates from successive counter snapshots.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless,
    clippy::indexing_slicing
)]
#![cfg_attr(test, allow(clippy::indexing_slicing))]
#![warn(missing_docs)]

pub mod clock;
pub mod export;
pub mod hist;
pub mod plot;
pub mod probe;
pub mod rate;
pub mod set;
pub mod trace;

pub use clock::{tsc_is_invariant, Calibration, Clock, ClockSource};
pub use export::{
    chrome_trace_json, format_ns, histogram_json, histogram_rows_text, histograms_json,
    histograms_text, stats_json, stats_text, write_chrome_trace, TraceMeta,
};
pub use hist::{Histogram, HistogramSnapshot};
pub use plot::{plot_histogram_svg, plot_rate_svg, plot_rates_svg};
pub use probe::VcpuProbe;
pub use rate::{Rate, RateSampler};
pub use set::{ExitClass, HistKey, HistogramSet, Phase, SetSnapshot, StageClass};
pub use trace::{
    sort_by_time, trace_rings, TraceCollector, TraceError, TraceEvent, TraceRingSnapshot,
    TraceRingStats, TraceSwitch, TraceWriter, NO_OWNER,
};
