//! Hand-written SVG plots: a latency histogram (log-log, percentile markers) and exit rates over
//! time. Plain SVG 1.1, no scripts, no external fonts; loads in a browser, `rsvg-convert`, or
//! Inkscape.

use std::fmt::Write as _;

use crate::clock::u64_to_f64;
use crate::export::format_ns;
use crate::hist::HistogramSnapshot;

const W: f64 = 820.0;
const H: f64 = 470.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 112.0;
const BOTTOM: f64 = 60.0;
const PW: f64 = W - LEFT - RIGHT;
const PH: f64 = H - TOP - BOTTOM;

/// Series colours (Okabe–Ito, readable by colour-blind people).
const COLOURS: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// Escapes text for XML character data and attribute values.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 forbids outright.
            c if (u32::from(c) < 0x20 && !matches!(c, '\t' | '\n' | '\r'))
                || matches!(u32::from(c), 0xFFFE | 0xFFFF) =>
            {
                out.push('\u{FFFD}');
            }
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" \
         font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" \
         font-weight=\"bold\">{}</text>\n",
        W / 2.0,
        xml_escape(title)
    );
}

fn frame(out: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{PW}\" height=\"{PH}\" fill=\"none\" \
         stroke=\"#333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{}</text>\n",
        LEFT + PW / 2.0,
        H - 16.0,
        xml_escape(x_label),
        TOP + PH / 2.0,
        TOP + PH / 2.0,
        xml_escape(y_label)
    );
}

fn no_data(out: &mut String) {
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#666\">no data</text>",
        LEFT + PW / 2.0,
        TOP + PH / 2.0
    );
}

/// A latency histogram: x = latency on a log scale (1 ns … seconds), y = exits per bucket on a
/// log scale (so that the tail stays visible next to the mode), one bar per non-empty bucket,
/// and vertical markers at p50, p99, p99.9 and the maximum.
pub fn plot_histogram_svg(h: &HistogramSnapshot, title: &str) -> String {
    let mut out = String::new();
    header(&mut out, title);
    frame(
        &mut out,
        "latency (log scale)",
        "exits per bucket (log scale)",
    );
    if h.is_empty() {
        no_data(&mut out);
        out.push_str("</svg>\n");
        return out;
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"44\" text-anchor=\"middle\" fill=\"#444\">{} exits, mean {}, \
         min {}</text>",
        W / 2.0,
        h.count(),
        xml_escape(&format_ns(crate::clock::f64_to_u64(h.mean()))),
        xml_escape(&format_ns(h.min()))
    );

    // x: decades covering [min, max].
    let lo_dec = u64_to_f64(h.min().max(1)).log10().floor();
    let mut hi_dec = (u64_to_f64(h.max().saturating_add(1)).log10()).ceil();
    if hi_dec <= lo_dec {
        hi_dec = lo_dec + 1.0;
    }
    let x_of = |v: f64| -> f64 {
        let l = v.max(1.0).log10().clamp(lo_dec, hi_dec);
        LEFT + (l - lo_dec) / (hi_dec - lo_dec) * PW
    };
    // y: from 0.5 (so a count of 1 shows) to the decade above the highest count.
    let max_count = h.buckets().map(|(_, _, c)| c).max().unwrap_or(1);
    let y_top = u64_to_f64(max_count).log10().ceil().max(1.0);
    let y_bottom = 0.5f64.log10();
    let y_of = |c: f64| -> f64 {
        let l = c.max(0.5).log10();
        TOP + PH - (l - y_bottom) / (y_top - y_bottom) * PH
    };

    // Grid and ticks.
    out.push_str("<g stroke=\"#ddd\">\n");
    let mut d = lo_dec;
    while d <= hi_dec {
        let x = x_of(10f64.powf(d));
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\"/>",
            TOP + PH
        );
        d += 1.0;
    }
    let mut e = 0.0;
    while e <= y_top {
        let y = y_of(10f64.powf(e));
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>",
            LEFT + PW
        );
        e += 1.0;
    }
    out.push_str("</g>\n");
    let mut d = lo_dec;
    while d <= hi_dec {
        let v = 10f64.powf(d);
        let x = x_of(v);
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            TOP + PH + 18.0,
            xml_escape(&format_ns(crate::clock::f64_to_u64(v)))
        );
        // Minor ticks at 2..9 × 10^d.
        for m in 2..10 {
            let xm = x_of(v * f64::from(m));
            if d < hi_dec {
                let _ = writeln!(
                    out,
                    "<line x1=\"{xm:.1}\" y1=\"{}\" x2=\"{xm:.1}\" y2=\"{}\" stroke=\"#333\"/>",
                    TOP + PH,
                    TOP + PH + 4.0
                );
            }
        }
        d += 1.0;
    }
    let mut e = 0.0;
    while e <= y_top {
        let y = y_of(10f64.powf(e));
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            format_count(10f64.powf(e))
        );
        e += 1.0;
    }

    // Bars.
    out.push_str("<g fill=\"#0072B2\" fill-opacity=\"0.85\">\n");
    for (lo, hi, c) in h.buckets() {
        let x0 = x_of(u64_to_f64(lo));
        let x1 = x_of(u64_to_f64(hi) + 1.0);
        let y = y_of(u64_to_f64(c));
        let _ = writeln!(
            out,
            "<rect x=\"{x0:.2}\" y=\"{y:.2}\" width=\"{:.2}\" height=\"{:.2}\"><title>{} – {}: \
             {c}</title></rect>",
            (x1 - x0).max(1.0),
            (TOP + PH - y).max(0.0),
            xml_escape(&format_ns(lo)),
            xml_escape(&format_ns(hi))
        );
    }
    out.push_str("</g>\n");

    // Percentile markers, labels staggered in rows above the plot so they never overlap.
    let markers = [
        (50.0, "p50", "#009E73"),
        (99.0, "p99", "#E69F00"),
        (99.9, "p99.9", "#D55E00"),
        (100.0, "max", "#CC79A7"),
    ];
    for (row, (p, name, colour)) in markers.iter().enumerate() {
        let v = h.percentile(*p);
        let x = x_of(u64_to_f64(v));
        let label_y = TOP - 6.0 - 13.0 * f64::from(u8::try_from(3 - row).unwrap_or(0));
        let anchor = if x > LEFT + PW * 0.8 { "end" } else { "start" };
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{label_y:.1}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{colour}\" \
             stroke-width=\"1.5\" stroke-dasharray=\"5,3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"{colour}\">{} {}</text>",
            TOP + PH,
            if anchor == "end" { x - 3.0 } else { x + 3.0 },
            label_y - 1.0,
            name,
            xml_escape(&format_ns(v))
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Formats a count or rate compactly: `950`, `12k`, `3.4M`.
fn format_count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        trim(format!("{:.2}", v / 1e9)) + "G"
    } else if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim(format!("{:.2}", v / 1e3)) + "k"
    } else {
        trim(format!("{v:.2}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for about `n` ticks over `range`.
fn nice_step(range: f64, n: f64) -> f64 {
    if !(range.is_finite() && range > 0.0) {
        return 1.0;
    }
    let raw = range / n;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Exit rate over time, one line: `points` are `(seconds, rate per second)`.
pub fn plot_rate_svg(points: &[(f64, f64)], title: &str) -> String {
    plot_rates_svg(&[("exits/s", points)], title)
}

/// Several rates over time (per vCPU or per exit kind), one line and one legend entry each.
/// Non-finite points are skipped.
pub fn plot_rates_svg<N: AsRef<str>>(series: &[(N, &[(f64, f64)])], title: &str) -> String {
    let mut out = String::new();
    header(&mut out, title);
    frame(&mut out, "time (s)", "rate (per second)");
    let finite = |&&(t, r): &&(f64, f64)| t.is_finite() && r.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().filter(finite).copied())
        .collect();
    if all.is_empty() {
        no_data(&mut out);
        out.push_str("</svg>\n");
        return out;
    }
    let t0 = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let mut t1 = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    if t1 <= t0 {
        t1 = t0 + 1.0;
    }
    let r_max = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let r_min = all.iter().map(|p| p.1).fold(0.0, f64::min);
    let y_step = nice_step(r_max - r_min, 5.0);
    let y_hi = ((r_max / y_step).ceil() * y_step).max(y_step);
    let y_lo = (r_min / y_step).floor() * y_step;
    let x_of = |t: f64| LEFT + (t - t0) / (t1 - t0) * PW;
    let y_of = |r: f64| TOP + PH - (r - y_lo) / (y_hi - y_lo) * PH;

    // Grid, ticks and labels.
    out.push_str("<g stroke=\"#ddd\">\n");
    let x_step = nice_step(t1 - t0, 8.0);
    let mut ticks_x = Vec::new();
    let mut t = (t0 / x_step).ceil() * x_step;
    while t <= t1 + x_step * 1e-9 && ticks_x.len() < 50 {
        ticks_x.push(t);
        t += x_step;
    }
    let mut ticks_y = Vec::new();
    let mut r = y_lo;
    while r <= y_hi + y_step * 1e-9 && ticks_y.len() < 50 {
        ticks_y.push(r);
        r += y_step;
    }
    for &t in &ticks_x {
        let x = x_of(t);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\"/>",
            TOP + PH
        );
    }
    for &r in &ticks_y {
        let y = y_of(r);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>",
            LEFT + PW
        );
    }
    out.push_str("</g>\n");
    for &t in &ticks_x {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x_of(t),
            TOP + PH + 18.0,
            format_count(t)
        );
    }
    for &r in &ticks_y {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y_of(r) + 4.0,
            format_count(r)
        );
    }

    // Lines and legend.
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS.get(i % COLOURS.len()).copied().unwrap_or("#000");
        let mut path = String::new();
        for &(t, r) in pts.iter().filter(finite) {
            let _ = write!(path, "{:.1},{:.1} ", x_of(t), y_of(r));
        }
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" \
             stroke-linejoin=\"round\" points=\"{}\"/>",
            path.trim_end()
        );
        let ly = TOP - 44.0 + 14.0 * f64::from(u8::try_from(i % 3).unwrap_or(0));
        let lx = LEFT + 10.0 + 250.0 * f64::from(u8::try_from((i / 3) % 3).unwrap_or(0));
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" \
             stroke-width=\"3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 24.0,
            ly,
            xml_escape(name.as_ref())
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            xml_escape("a<b & \"c\" 'd'\u{1}"),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;\u{FFFD}"
        );
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(9.0, 8.0), 2.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(nice_step(f64::NAN, 5.0), 1.0);
        assert_eq!(format_count(120_000.0), "120k");
        assert_eq!(format_count(3_400_000.0), "3.4M");
        assert_eq!(format_count(2.5), "2.5");
    }
}
