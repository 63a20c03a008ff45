//! Exporters: Chrome trace / Perfetto JSON for traces; text (bhyvectl `--get-stats` style) and JSON
//! for counters and histograms. Hand-written JSON (this crate keeps its dependencies to
//! `pipeline`); the tests parse everything with `serde_json`.

use std::fmt::Write as _;
use std::io;

use crate::clock::Clock;
use crate::hist::HistogramSnapshot;
use crate::set::{ExitClass, SetSnapshot, StageClass};
use crate::trace::{TraceEvent, NO_OWNER};

/// Appends `s` as a JSON string literal (quotes included).
pub(crate) fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a finite `f64` as a JSON number (non-finite values, which JSON cannot hold, as 0).
fn json_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push('0');
    }
}

/// Appends `ns` nanoseconds as microseconds with three decimals, exactly (no float rounding).
fn micros(out: &mut String, ns: u64) {
    let _ = write!(out, "{}.{:03}", ns / 1000, ns % 1000);
}

/// The name of a trace event's kind (`kind-N` for a value that names none).
fn kind_name(k: u8) -> String {
    ExitClass::from_u8(k).map_or_else(|| format!("kind-{k}"), |k| k.name().to_string())
}

fn stage_name(s: u8) -> String {
    StageClass::from_u8(s).map_or_else(|| format!("stage-{s}"), |s| s.name().to_string())
}

/// What a trace export needs besides the events.
#[derive(Debug, Clone, Copy)]
pub struct TraceMeta<'a> {
    /// The Chrome trace `pid`: one per VM.
    pub pid: u32,
    /// Shown as the process name (the VM's name).
    pub vm_name: &'a str,
    /// Device names by device id (the `owner` of an event); missing ids show as `dev-N`.
    pub owners: &'a [String],
}

/// Writes `events` as a Chrome trace (the JSON object format, which Perfetto and
/// `chrome://tracing` load): one `"ph":"X"` complete event per exit, `pid` = the VM,
/// `tid` = the vCPU, `name` = `kind owner`, `cat` = stage, `ts`/`dur` in microseconds from the
/// clock's origin, and `args` with the owner id, ring wait and handler time. Metadata events
/// (`"ph":"M"`) name the process and each vCPU thread.
pub fn write_chrome_trace<W: io::Write>(
    w: &mut W,
    events: &[TraceEvent],
    clock: &Clock,
    meta: &TraceMeta<'_>,
) -> io::Result<()> {
    let mut buf = String::with_capacity(256);
    buf.push_str("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[");
    let _ = write!(
        buf,
        "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{},\"tid\":0,\"args\":{{\"name\":",
        meta.pid
    );
    json_str(&mut buf, meta.vm_name);
    buf.push_str("}}");
    let mut vcpus: Vec<u32> = events.iter().map(|e| e.vcpu).collect();
    vcpus.sort_unstable();
    vcpus.dedup();
    for v in vcpus {
        let _ = write!(
            buf,
            ",{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{},\"tid\":{v},\"args\":{{\"name\":\"vcpu {v}\"}}}}",
            meta.pid
        );
    }
    w.write_all(buf.as_bytes())?;
    for e in events {
        buf.clear();
        let mut name = kind_name(e.kind);
        if e.owner != NO_OWNER {
            name.push(' ');
            match meta.owners.get(usize::from(e.owner)) {
                Some(n) => name.push_str(n),
                None => {
                    let _ = write!(name, "dev-{}", e.owner);
                }
            }
        }
        buf.push_str(",{\"name\":");
        json_str(&mut buf, &name);
        buf.push_str(",\"cat\":");
        json_str(&mut buf, &stage_name(e.stage));
        let _ = write!(
            buf,
            ",\"ph\":\"X\",\"pid\":{},\"tid\":{},\"ts\":",
            meta.pid, e.vcpu
        );
        micros(&mut buf, clock.since_origin_ns(e.tsc));
        buf.push_str(",\"dur\":");
        micros(&mut buf, e.duration_ns);
        buf.push_str(",\"args\":{\"owner\":");
        if e.owner == NO_OWNER {
            buf.push_str("null");
        } else {
            let _ = write!(buf, "{}", e.owner);
        }
        buf.push_str(",\"ring_wait_us\":");
        micros(&mut buf, u64::from(e.ring_wait_ns));
        buf.push_str(",\"handler_us\":");
        micros(&mut buf, u64::from(e.handler_ns));
        buf.push_str("}}");
        w.write_all(buf.as_bytes())?;
    }
    w.write_all(b"]}\n")
}

/// [`write_chrome_trace`] into a `String`.
pub fn chrome_trace_json(events: &[TraceEvent], clock: &Clock, meta: &TraceMeta<'_>) -> String {
    let mut out = Vec::with_capacity(256 + events.len() * 200);
    // Writing to a Vec cannot fail.
    let _ = write_chrome_trace(&mut out, events, clock, meta);
    String::from_utf8(out).unwrap_or_default()
}

/// Counters as text, bhyvectl `--get-stats` style: a header line, then one line per counter with
/// the description left-aligned and the value right-aligned in a column.
///
/// ```text
/// vcpu0 stats:
/// total number of vm exits                            1234567
/// number of times in/out was intercepted                 1200
/// ```
pub fn stats_text<N: AsRef<str>>(header: &str, counters: &[(N, u64)]) -> String {
    let desc_w = counters
        .iter()
        .map(|(n, _)| n.as_ref().chars().count())
        .max()
        .unwrap_or(0)
        .max(40);
    let val_w = counters
        .iter()
        .map(|(_, v)| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(8);
    let mut out = String::new();
    if !header.is_empty() {
        out.push_str(header);
        out.push('\n');
    }
    for (n, v) in counters {
        let _ = writeln!(out, "{:<desc_w$}  {v:>val_w$}", n.as_ref());
    }
    out
}

/// Counters as JSON: `[{"name": "...", "value": N}, ...]`, in order.
pub fn stats_json<N: AsRef<str>>(counters: &[(N, u64)]) -> String {
    let mut out = String::from("[");
    for (i, (n, v)) in counters.iter().enumerate() {
        if i != 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_str(&mut out, n.as_ref());
        let _ = write!(out, ",\"value\":{v}}}");
    }
    out.push(']');
    out
}

/// The percentiles every report shows.
pub const REPORT_PERCENTILES: [(f64, &str); 4] = [
    (50.0, "p50"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (100.0, "max"),
];

/// Histograms as a text table: one line per (phase, kind, stage), nanoseconds.
///
/// ```text
/// latency (ns)                          count       p50       p99     p99.9       max      mean
/// exit pio-write/slow-posted           100000      2943      8191     12287     40123      3012
/// ```
pub fn histograms_text(snap: &SetSnapshot) -> String {
    let rows: Vec<(String, &HistogramSnapshot)> =
        snap.entries().iter().map(|(k, s)| (k.label(), s)).collect();
    histogram_rows_text(&rows)
}

/// As [`histograms_text`] for any labelled snapshots (e.g. VM-wide totals).
pub fn histogram_rows_text<L: AsRef<str>>(rows: &[(L, &HistogramSnapshot)]) -> String {
    let label_w = rows
        .iter()
        .map(|(l, _)| l.as_ref().chars().count())
        .max()
        .unwrap_or(0)
        .max(30);
    let mut out = String::new();
    let _ = write!(out, "{:<label_w$}  {:>10}", "latency (ns)", "count");
    for (_, name) in REPORT_PERCENTILES {
        let _ = write!(out, "  {name:>10}");
    }
    let _ = writeln!(out, "  {:>10}", "mean");
    for (label, s) in rows {
        let _ = write!(out, "{:<label_w$}  {:>10}", label.as_ref(), s.count());
        for (p, _) in REPORT_PERCENTILES {
            let _ = write!(out, "  {:>10}", s.percentile(p));
        }
        let _ = writeln!(out, "  {:>10.0}", s.mean());
    }
    out
}

fn histogram_json_fields(out: &mut String, s: &HistogramSnapshot) {
    let _ = write!(
        out,
        "\"count\":{},\"sum_ns\":{},\"min_ns\":{},\"max_ns\":{},\"mean_ns\":",
        s.count(),
        s.sum(),
        s.min(),
        s.max()
    );
    json_f64(out, s.mean());
    for (p, name) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p999")] {
        let _ = write!(out, ",\"{name}_ns\":{}", s.percentile(p));
    }
    out.push_str(",\"buckets\":[");
    for (i, (lo, hi, c)) in s.buckets().enumerate() {
        if i != 0 {
            out.push(',');
        }
        let _ = write!(out, "[{lo},{hi},{c}]");
    }
    out.push(']');
}

/// One histogram as a JSON object: count, sum, min, max, mean, p50/p90/p99/p99.9 and the
/// non-empty buckets as `[lowest, highest, count]`.
pub fn histogram_json(s: &HistogramSnapshot) -> String {
    let mut out = String::from("{");
    histogram_json_fields(&mut out, s);
    out.push('}');
    out
}

/// Histograms as JSON: `[{"phase", "kind", "stage", ...the fields of histogram_json}, ...]`.
pub fn histograms_json(snap: &SetSnapshot) -> String {
    let mut out = String::from("[");
    for (i, (k, s)) in snap.entries().iter().enumerate() {
        if i != 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"phase\":\"{}\",\"kind\":\"{}\",\"stage\":\"{}\",",
            k.phase, k.kind, k.stage
        );
        histogram_json_fields(&mut out, s);
        out.push('}');
    }
    out.push(']');
    out
}

/// Formats nanoseconds for people: `850 ns`, `8.6 µs`, `10 µs`, `12.3 ms`, `1.25 s`.
pub fn format_ns(ns: u64) -> String {
    let f = crate::clock::u64_to_f64(ns);
    let (v, unit, decimals) = if ns < 1_000 {
        return format!("{ns} ns");
    } else if ns < 1_000_000 {
        (f / 1e3, "µs", 1)
    } else if ns < 1_000_000_000 {
        (f / 1e6, "ms", 1)
    } else {
        (f / 1e9, "s", 2)
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }

    #[test]
    fn micros_are_exact() {
        let mut s = String::new();
        micros(&mut s, 8_601);
        s.push(' ');
        micros(&mut s, 7);
        assert_eq!(s, "8.601 0.007");
    }

    #[test]
    fn stats_text_aligns() {
        let t = stats_text(
            "vcpu0 stats:",
            &[("short", 5u64), ("a longer description", 12345)],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "vcpu0 stats:");
        assert!(lines[1].starts_with("short "));
        assert!(lines[1].ends_with(" 5"));
        assert!(lines[2].ends_with(" 12345"));
        assert_eq!(lines[1].len(), lines[2].len(), "values end in one column");
    }

    #[test]
    fn format_ns_units() {
        assert_eq!(format_ns(850), "850 ns");
        assert_eq!(format_ns(8_600), "8.6 µs");
        assert_eq!(format_ns(12_300_000), "12.3 ms");
        assert_eq!(format_ns(1_200_000_000), "1.2 s");
        assert_eq!(format_ns(10_000), "10 µs");
        assert_eq!(format_ns(1_000_000), "1 ms");
        assert_eq!(format_ns(1_256_000_000), "1.26 s");
    }
}
