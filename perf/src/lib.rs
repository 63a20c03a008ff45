//! Counters, histograms, traces and exporters: how the monitor explains itself. The benchmarks live in
//! `benches/` (ring throughput and latency, exit round trips, start-up and memory).
