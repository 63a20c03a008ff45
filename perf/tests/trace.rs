//! Trace rings and the Chrome trace exporter: drop-when-full is counted, a collector drains
//! while vCPUs write, and the exported JSON parses with exactly one complete event per exit.

use std::sync::Arc;

use perf::{
    chrome_trace_json, trace_rings, Clock, ExitClass, HistogramSet, StageClass, TraceEvent,
    TraceMeta, VcpuProbe, NO_OWNER,
};

fn ev(vcpu: u32, i: u64) -> TraceEvent {
    TraceEvent {
        tsc: 1_000 + i,
        duration_ns: 8_600,
        vcpu,
        owner: 1,
        kind: ExitClass::PioWrite as u8,
        stage: StageClass::SlowPosted as u8,
        ..TraceEvent::default()
    }
}

#[test]
fn full_ring_drops_and_counts_never_blocks() {
    let (switch, mut writers, mut collector) = trace_rings(2, 16).unwrap();
    switch.enable();
    let w = &mut writers[1];
    let mut pushed = 0;
    for i in 0..100 {
        if w.record(ev(1, i)) {
            pushed += 1;
        }
    }
    assert_eq!(pushed, 16, "exactly the capacity fits");
    let stats = collector.stats();
    assert_eq!((stats[1].written, stats[1].dropped), (16, 84));
    assert_eq!((stats[0].written, stats[0].dropped), (0, 0));
    assert_eq!(collector.dropped(), 84);

    // The oldest 16 survive, in order; after draining there is room again.
    let mut out = Vec::new();
    assert_eq!(collector.drain(&mut out), Ok(16));
    assert_eq!(out, (0..16).map(|i| ev(1, i)).collect::<Vec<_>>());
    assert!(w.record(ev(1, 100)));
    assert_eq!(collector.stats()[1].collected, 16);
    assert_eq!(collector.stats()[1].written, 17);
}

#[test]
fn collector_drains_while_vcpus_write() {
    const PER_VCPU: u64 = 200_000;
    let (switch, writers, mut collector) = trace_rings(2, 1024).unwrap();
    switch.enable();
    let handles: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            std::thread::spawn(move || {
                let v = w.vcpu();
                for i in 0..PER_VCPU {
                    w.record(ev(v, i));
                }
                w
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut writers = Vec::new();
    for h in handles {
        while !h.is_finished() {
            collector.drain(&mut out).unwrap();
        }
        writers.push(h.join().unwrap());
    }
    collector.drain(&mut out).unwrap();
    // Every event either arrived or was counted as dropped; per vCPU they arrive in order.
    for s in collector.stats() {
        assert_eq!(s.written + s.dropped, PER_VCPU, "vcpu {}", s.vcpu);
        assert_eq!(s.collected, s.written);
        let mine: Vec<u64> = out
            .iter()
            .filter(|e| e.vcpu == s.vcpu)
            .map(|e| e.tsc)
            .collect();
        assert_eq!(mine.len() as u64, s.written);
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "out of order");
    }
}

/// Runs `exits` simulated exits through probes on `vcpus` vCPUs with tracing on; returns the
/// collected events.
fn traced_exits(vcpus: u32, exits: u64) -> (Vec<TraceEvent>, Clock) {
    let clock = Clock::new();
    let (switch, writers, mut collector) = trace_rings(vcpus, 4096).unwrap();
    switch.enable();
    for w in writers {
        let v = w.vcpu();
        let mut p = VcpuProbe::new(v, clock, Arc::new(HistogramSet::new()), Some(w));
        for i in 0..exits {
            p.enter();
            p.exited();
            match i % 3 {
                0 => p.classify(ExitClass::PioWrite, StageClass::SlowPosted, 1),
                1 => p.classify(ExitClass::MmioRead, StageClass::Fast, 0),
                _ => {} // unclassified: other/loop, no owner
            }
        }
        p.finish();
    }
    let mut out = Vec::new();
    collector.drain(&mut out).unwrap();
    assert_eq!(collector.dropped(), 0);
    (out, clock)
}

#[test]
fn chrome_trace_parses_with_one_event_per_exit() {
    let (events, clock) = traced_exits(3, 500);
    assert_eq!(events.len(), 1500);
    let owners = vec!["hpet\"quoted\"".to_string(), "com1".to_string()];
    let json = chrome_trace_json(
        &events,
        &clock,
        &TraceMeta {
            pid: 42,
            vm_name: "test-vm",
            owners: &owners,
        },
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let all = v["traceEvents"].as_array().expect("traceEvents array");
    let complete: Vec<&serde_json::Value> = all.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(complete.len(), events.len(), "one X event per exit");
    for e in &complete {
        assert_eq!(e["pid"], 42);
        assert!(e["tid"].as_u64().unwrap() < 3);
        assert!(e["ts"].as_f64().unwrap() >= 0.0);
        assert!(e["dur"].as_f64().unwrap() >= 0.0);
    }
    let names: std::collections::BTreeSet<&str> = complete
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["mmio-read hpet\"quoted\"", "other", "pio-write com1"]
    );
    let x = complete
        .iter()
        .find(|e| e["name"] == "pio-write com1")
        .unwrap();
    assert_eq!(x["cat"], "slow-posted");
    assert_eq!(x["args"]["owner"], 1);
    // Per vCPU, the events are its exits in order.
    for tid in 0..3u64 {
        let ts: Vec<f64> = complete
            .iter()
            .filter(|e| e["tid"] == tid)
            .map(|e| e["ts"].as_f64().unwrap())
            .collect();
        assert_eq!(ts.len(), 500);
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    }
    // Metadata names the VM and each vCPU thread.
    assert!(all
        .iter()
        .any(|e| e["ph"] == "M" && e["args"]["name"] == "test-vm"));
    assert_eq!(
        all.iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .count(),
        3
    );
}

#[test]
fn chrome_trace_of_hostile_fields_still_parses() {
    // Undecodable kinds/stages and unknown owners (a trace ring can sit in shared memory).
    let events = [
        TraceEvent {
            tsc: 0,
            duration_ns: u64::MAX,
            ring_wait_ns: u32::MAX,
            handler_ns: u32::MAX,
            vcpu: u32::MAX,
            owner: 999,
            kind: 255,
            stage: 255,
        },
        TraceEvent {
            owner: NO_OWNER,
            ..TraceEvent::default()
        },
    ];
    let json = chrome_trace_json(
        &events,
        &Clock::monotonic(),
        &TraceMeta {
            pid: 1,
            vm_name: "",
            owners: &[],
        },
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let complete: Vec<&serde_json::Value> = v["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .collect();
    assert_eq!(complete.len(), 2);
    assert_eq!(complete[0]["name"], "kind-255 dev-999");
    assert_eq!(complete[0]["cat"], "stage-255");
    assert!(complete[1]["args"]["owner"].is_null());
}

#[test]
fn empty_trace_is_valid_json() {
    let json = chrome_trace_json(
        &[],
        &Clock::monotonic(),
        &TraceMeta {
            pid: 1,
            vm_name: "vm",
            owners: &[],
        },
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .count(),
        0
    );
}
