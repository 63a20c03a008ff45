//! Text and JSON exports of counters and histograms; SVG plots are well-formed XML with the
//! marks a reader expects.

use perf::{
    histogram_json, histograms_json, histograms_text, plot_histogram_svg, plot_rate_svg,
    plot_rates_svg, stats_json, stats_text, ExitClass, HistKey, HistogramSet, HistogramSnapshot,
    Phase, RateSampler, StageClass,
};

fn sample_set() -> HistogramSet {
    let set = HistogramSet::new();
    for i in 0..10_000u64 {
        set.record(
            Phase::Exit,
            ExitClass::PioWrite,
            StageClass::SlowPosted,
            2_500 + (i * 7919) % 3_000,
        );
        if i % 10 == 0 {
            set.record(
                Phase::RingWait,
                ExitClass::PioRead,
                StageClass::SlowWaited,
                60 + i,
            );
        }
    }
    set.record(
        Phase::Exit,
        ExitClass::PioWrite,
        StageClass::SlowPosted,
        2_000_000,
    );
    set
}

#[test]
fn counters_text_and_json() {
    let counters = vec![
        ("total number of vm exits".to_string(), 1_234_567u64),
        ("number of times in/out was \"intercepted\"".to_string(), 12),
    ];
    let text = stats_text("vcpu0 stats:", &counters);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[1].starts_with("total number of vm exits "));
    assert!(lines[1].ends_with(" 1234567"));
    assert!(lines[2].ends_with(" 12"));
    assert_eq!(lines[1].chars().count(), lines[2].chars().count());

    let v: serde_json::Value = serde_json::from_str(&stats_json(&counters)).unwrap();
    assert_eq!(v[0]["name"], "total number of vm exits");
    assert_eq!(v[0]["value"], 1_234_567);
    assert_eq!(v[1]["name"], "number of times in/out was \"intercepted\"");
}

#[test]
fn histograms_text_and_json() {
    let snap = sample_set().snapshot();
    let text = histograms_text(&snap);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("latency (ns)"));
    assert!(lines[0].contains("p99.9"));
    let exit_line = lines
        .iter()
        .find(|l| l.starts_with("exit pio-write/slow-posted"))
        .unwrap();
    assert!(exit_line.split_whitespace().any(|f| f == "10001"));
    assert!(exit_line.split_whitespace().any(|f| f == "2000000"), "max");

    let v: serde_json::Value = serde_json::from_str(&histograms_json(&snap)).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let exit = arr.iter().find(|h| h["phase"] == "exit").unwrap();
    assert_eq!(exit["kind"], "pio-write");
    assert_eq!(exit["stage"], "slow-posted");
    assert_eq!(exit["count"], 10_001);
    assert_eq!(exit["max_ns"], 2_000_000);
    let bucket_total: u64 = exit["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[2].as_u64().unwrap())
        .sum();
    assert_eq!(bucket_total, 10_001);
    let p99 = exit["p99_ns"].as_u64().unwrap();
    assert!((5_400..=5_900).contains(&p99), "p99 {p99}");

    let key = HistKey {
        phase: Phase::RingWait,
        kind: ExitClass::PioRead,
        stage: StageClass::SlowWaited,
    };
    let one: serde_json::Value =
        serde_json::from_str(&histogram_json(snap.get(key).unwrap())).unwrap();
    assert_eq!(one["count"], 1_000);
    let empty: serde_json::Value =
        serde_json::from_str(&histogram_json(&HistogramSnapshot::new())).unwrap();
    assert_eq!(empty["count"], 0);
}

fn parse_svg(svg: &str) -> roxmltree::Document<'_> {
    let doc = roxmltree::Document::parse(svg).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc
}

fn texts<'a>(doc: &'a roxmltree::Document<'_>) -> Vec<&'a str> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect()
}

#[test]
fn histogram_svg_is_well_formed_with_markers() {
    let snap = sample_set().snapshot();
    let h = snap.total(Phase::Exit);
    let svg = plot_histogram_svg(&h, "exit latency <pio-write & co>");
    let doc = parse_svg(&svg);
    let t = texts(&doc);
    assert!(
        t.contains(&"exit latency <pio-write & co>"),
        "title escaped"
    );
    for marker in ["p50", "p99", "p99.9", "max"] {
        assert!(
            t.iter().any(|s| s.starts_with(&format!("{marker} "))),
            "{marker} marker missing: {t:?}"
        );
    }
    assert!(t.contains(&"max 2 ms"), "{t:?}");
    let bars = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.children().any(|c| c.has_tag_name("title")))
        .count();
    assert_eq!(bars, h.buckets().count(), "one bar per non-empty bucket");

    // Empty and single-value histograms still make valid documents.
    parse_svg(&plot_histogram_svg(&HistogramSnapshot::new(), "empty"));
    parse_svg(&plot_histogram_svg(
        &HistogramSnapshot::from_values(&[0]),
        "zero",
    ));
    parse_svg(&plot_histogram_svg(
        &HistogramSnapshot::from_values(&[u64::MAX]),
        "huge",
    ));
}

#[test]
fn rate_svg_is_well_formed() {
    let mut rates = RateSampler::new(100);
    let mut exits = 0u64;
    for s in 0..30u64 {
        exits += 100_000 + (s % 7) * 15_000;
        rates.sample(
            std::time::Duration::from_secs(s),
            &[("vcpu0 exits", exits), ("vcpu1 exits", exits / 3)],
        );
    }
    let series = rates.series("vcpu0 exits");
    assert_eq!(series.len(), 29);
    let svg = plot_rate_svg(&series, "exit rate");
    let doc = parse_svg(&svg);
    assert_eq!(
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count(),
        1
    );
    let s1 = rates.series("vcpu1 exits");
    let svg = plot_rates_svg(
        &[("vcpu0", &series[..]), ("vcpu1 <&>", &s1[..])],
        "per vCPU",
    );
    let doc = parse_svg(&svg);
    let lines: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .collect();
    assert_eq!(lines.len(), 2);
    let points = lines[0].attribute("points").unwrap().split(' ').count();
    assert_eq!(points, 29);
    assert!(texts(&doc).contains(&"vcpu1 <&>"));
    // Degenerate inputs.
    parse_svg(&plot_rate_svg(&[], "nothing"));
    parse_svg(&plot_rate_svg(&[(1.0, 5.0)], "one point"));
    parse_svg(&plot_rate_svg(
        &[(f64::NAN, 1.0), (2.0, f64::INFINITY)],
        "junk",
    ));
}
