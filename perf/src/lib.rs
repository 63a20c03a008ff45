//! Counters, histograms, traces and the benchmarks.
