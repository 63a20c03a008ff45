//! Deterministic randomized tests of the loader.conf and pptdevs parsers, so CI exercises them
//! without a nightly toolchain (the cargo-fuzz targets in `fuzz/` need one).
//!
//! A small xorshift generator makes tens of thousands of random and mutated inputs; for each
//! the parsers must not panic and their invariants must hold. pptdevs is also checked against a
//! second, independently written model of the kernel's `sscanf(entry, "%d/%d/%d")`.

use kmod::tunables::pptdevs::{self, Reason};
use kmod::tunables::{Tunables, TunablesError, VM_MAXCPU};
use passthrough::{PciAddress, MAX_FUNCTION, MAX_SLOT};

/// xorshift64* (Vigna): small, fast, and the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).expect("usize fits u64");
        usize::try_from(self.next() % n64).expect("below n")
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const PIECE_CHARS: &[u8] = b"0123456789//// +-x:.,\t\x0babcfX#\"\\$";

fn random_number(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => format!("-{}", rng.below(300)),
        1 => format!("+{}", rng.below(300)),
        2 => "9".repeat(1 + rng.below(40)),
        3 => format!("{}{}", "0".repeat(rng.below(35)), rng.below(300)),
        4 => format!(
            "{}",
            4_294_967_296u64 + u64::try_from(rng.below(300)).unwrap()
        ),
        _ => format!("{}", rng.below(300)),
    }
}

fn random_piece(rng: &mut Rng) -> String {
    match rng.below(8) {
        0..=3 => {
            let mut s = format!(
                "{}/{}/{}",
                random_number(rng),
                random_number(rng),
                random_number(rng)
            );
            if rng.chance(20) {
                let junk: String = (0..1 + rng.below(5))
                    .map(|_| char::from(*rng.pick(PIECE_CHARS)))
                    .collect();
                s.push_str(&junk);
            }
            if rng.chance(10) {
                s.insert(0, *rng.pick(&['\t', '\x0c', '\r']));
            }
            s
        }
        4 => format!(
            "{:04x}:{:02x}:{:02x}.{}",
            0,
            rng.below(256),
            rng.below(32),
            rng.below(8)
        ),
        5 => format!("0x{:x}/{}/{}", rng.below(256), rng.below(32), rng.below(8)),
        _ => (0..1 + rng.below(12))
            .map(|_| char::from(*rng.pick(PIECE_CHARS)))
            .collect(),
    }
}

fn random_value(rng: &mut Rng) -> String {
    let mut v = String::new();
    if rng.chance(10) {
        v.push(' ');
    }
    for i in 0..rng.below(8) {
        if i > 0 {
            v.push_str(&" ".repeat(1 + usize::from(rng.chance(15))));
        }
        v.push_str(&random_piece(rng));
    }
    if rng.chance(3) {
        v.push('\0');
        v.push_str(&random_piece(rng));
    }
    v
}

/// Random edits (insert, delete, replace a byte) of a valid value.
fn mutate(rng: &mut Rng, seed: &str) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(3) {
            0 => bytes.insert(at, *rng.pick(PIECE_CHARS)),
            1 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ if at < bytes.len() => bytes[at] = *rng.pick(PIECE_CHARS),
            _ => {}
        }
    }
    String::from_utf8(bytes).expect("ASCII edits of ASCII")
}

/// The kernel's `sscanf(piece, "%d/%d/%d")`, written independently of the parser under test:
/// the three numbers (as i128, before any cast) when all three convert.
fn reference_scan(piece: &str) -> Option<[i128; 3]> {
    let mut rest = piece;
    let mut out = [0i128; 3];
    for (k, slot) in out.iter_mut().enumerate() {
        if k > 0 {
            rest = rest.strip_prefix('/')?;
        }
        rest = rest.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
        let b = rest.as_bytes();
        let mut n = 0;
        let negative = b.first() == Some(&b'-');
        if matches!(b.first(), Some(b'+' | b'-')) {
            n = 1;
        }
        let first_digit = n;
        while n < 31 && b.get(n).is_some_and(u8::is_ascii_digit) {
            n += 1;
        }
        if n == first_digit {
            return None;
        }
        let magnitude = rest[first_digit..n]
            .bytes()
            .fold(0i128, |acc, d| acc * 10 + i128::from(d - b'0'));
        *slot = if negative { -magnitude } else { magnitude };
        rest = &rest[n..];
    }
    Some(out)
}

/// The devices bhyve would use from `value` (minus those our overflow rule refuses).
fn reference_devices(value: &str) -> Vec<PciAddress> {
    let value = value.split('\0').next().unwrap_or("");
    value
        .split(' ')
        .filter(|p| !p.is_empty())
        .filter_map(reference_scan)
        .filter_map(|[b, s, f]| {
            let b = u8::try_from(b).ok()?;
            let s = u8::try_from(s).ok().filter(|s| *s <= MAX_SLOT)?;
            let f = u8::try_from(f).ok().filter(|f| *f <= MAX_FUNCTION)?;
            PciAddress::new(b, s, f).ok()
        })
        .collect()
}

fn check_pptdevs(variable: &str, value: &str) {
    let effective = value.split('\0').next().unwrap_or("");
    let parsed = match pptdevs::parse(variable, value) {
        Err(pptdevs::PptdevsError::TooLong {
            variable: v, len, ..
        }) => {
            assert_eq!(v, variable);
            assert_eq!(len, effective.len());
            assert!(len > pptdevs::MAX_LEN, "{value:?}");
            return;
        }
        Ok(p) => p,
    };
    assert!(effective.len() <= pptdevs::MAX_LEN, "{value:?}");

    let devices: Vec<PciAddress> = parsed.accepted.iter().map(|a| a.addr).collect();
    assert_eq!(devices, reference_devices(value), "{value:?}");
    for a in &parsed.accepted {
        assert!(a.addr.slot() <= MAX_SLOT && a.addr.function() <= MAX_FUNCTION);
        assert!(effective[a.offset..].starts_with(|c: char| c != ' '));
    }

    let pieces = effective.split(' ').filter(|p| !p.is_empty()).count();
    let whole_ignored = parsed
        .ignored
        .iter()
        .filter(|i| !matches!(i.reason, Reason::TrailingText { .. } | Reason::AfterNul))
        .count();
    assert_eq!(
        parsed.accepted.len() + whole_ignored,
        pieces,
        "every entry is used or reported: {value:?}"
    );
    for i in &parsed.ignored {
        assert_eq!(i.variable, variable);
        assert!(i.entry >= 1 && i.entry <= pieces + 1, "{i:?}");
        assert!(value[i.offset..].starts_with(&i.text), "{i:?} in {value:?}");
        assert!(i.to_string().starts_with(&format!("{variable}: entry ")));
        if let Reason::TrailingText { device } = i.reason {
            assert!(devices.contains(&device));
        }
    }
}

#[test]
fn random_and_mutated_pptdevs_values() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = ["10/0/0 6/5/0 6/5/1", "1/2/3", "255/31/7 0/0/0", ""];
    for round in 0..40_000 {
        let value = if round % 2 == 0 {
            random_value(&mut rng)
        } else {
            let seed = *rng.pick(&seeds);
            mutate(&mut rng, seed)
        };
        let variable = *rng.pick(&pptdevs::VARIABLES);
        check_pptdevs(variable, &value);
    }
}

/// Through a whole file: with no `\`, `$` or `"` in the value, a diagnostic's column is exactly
/// where its text was written.
#[test]
fn random_pptdevs_lines_report_exact_columns() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for _ in 0..10_000 {
        let value: String = random_value(&mut rng)
            .chars()
            .filter(|c| !matches!(c, '\\' | '$' | '"' | '\n' | '\0'))
            .collect();
        let line = format!("pptdevs=\"{value}\"");
        let parsed = match Tunables::parse("f", line.as_bytes(), 4) {
            Ok(p) => p,
            Err(TunablesError::Pptdevs { .. }) => {
                assert!(value.len() > pptdevs::MAX_LEN);
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let direct = pptdevs::parse("pptdevs", &value).unwrap();
        let value_col = "pptdevs=\"".len() + 1;
        let mut expected: Vec<usize> = direct
            .ignored
            .iter()
            .map(|i| value_col + i.offset)
            .collect();
        let mut seen = Vec::new();
        for a in &direct.accepted {
            if seen.contains(&a.addr) {
                expected.push(value_col + a.offset);
            }
            seen.push(a.addr);
        }
        expected.sort_unstable();
        let got: Vec<usize> = parsed.diagnostics.iter().map(|d| d.position).collect();
        assert_eq!(got, expected, "{line:?}");
        for d in &parsed.diagnostics {
            let text_at = &line[d.position - 1..];
            if let kmod::tunables::DiagnosticKind::PptdevsEntry { text, .. } = &d.kind {
                assert!(text_at.starts_with(text.as_str()), "{d} in {line:?}");
            }
        }
    }
}

const NAMES: &[&str] = &[
    "pptdevs",
    "pptdevs2",
    "pptdevs3",
    "hw.vmm.maxcpu",
    "hw.vmm.halt_detection",
    "vmm_load",
    "vmm_flags",
    "zfs_load",
    "exec",
    "kern.hz",
    "hw.vmm.amdvi.enable",
    "_bad",
    "a",
];

fn random_line(rng: &mut Rng) -> Vec<u8> {
    let name = *rng.pick(NAMES);
    let value = match name {
        "hw.vmm.maxcpu" => (*rng.pick(&["4", "0", "-1", "5000", "0x8", "2k", "x", ""])).to_owned(),
        "hw.vmm.halt_detection" => (*rng.pick(&["0", "1", "2", "yes"])).to_owned(),
        "vmm_load" => (*rng.pick(&["YES", "yes", "NO", "maybe"])).to_owned(),
        _ => random_value(rng),
    };
    let spaces = |rng: &mut Rng| " ".repeat(rng.below(3));
    let mut line = match rng.below(12) {
        0 => format!("# {value}"),
        1 => String::new(),
        2 => format!("{name}={value}"),
        3 => format!(
            "{}{name}{}={}\"{value}\"",
            spaces(rng),
            spaces(rng),
            spaces(rng)
        ),
        4 => format!("{name}=\"{value}\" # trailing"),
        5 => format!("{name}=\"${{{}}} {value}\"", rng.pick(NAMES)),
        _ => format!("{name}=\"{value}\""),
    }
    .into_bytes();
    match rng.below(20) {
        0 => line.push(b'\r'),
        1 => {
            let at = rng.below(line.len() + 1);
            line.insert(at, 0xff);
        }
        2 => {
            let at = rng.below(line.len() + 1);
            line.insert(at, *rng.pick(b"\"\\$#={}"));
        }
        _ => {}
    }
    line
}

#[test]
fn random_loader_conf_files() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let ours = [
        "pptdevs",
        "pptdevs2",
        "pptdevs3",
        "hw.vmm.maxcpu",
        "hw.vmm.halt_detection",
    ];
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..6_000 {
        let lines: Vec<Vec<u8>> = (0..rng.below(12)).map(|_| random_line(&mut rng)).collect();
        let text = lines.join(&b'\n');
        let host = u32::try_from(rng.below(2000)).unwrap();
        let result = Tunables::parse("rand.conf", &text, host);
        // Deterministic.
        assert_eq!(
            format!("{result:?}"),
            format!("{:?}", Tunables::parse("rand.conf", &text, host))
        );
        let line_count = text.split(|&b| b == b'\n').count();
        match result {
            Ok(parsed) => {
                ok += 1;
                let t = &parsed.tunables;
                assert!((1..=VM_MAXCPU).contains(&t.maxcpu));
                for (i, a) in t.pptdevs.iter().enumerate() {
                    assert!(a.slot() <= MAX_SLOT && a.function() <= MAX_FUNCTION);
                    assert!(!t.pptdevs[..i].contains(a), "listed once");
                }
                for name in ours {
                    assert!(!t.others.contains_key(name));
                }
                let mut last = (0, 0);
                for d in &parsed.diagnostics {
                    assert!(!d.variable.is_empty(), "{d:?}");
                    assert!(d.line >= 1 && d.line <= line_count, "{d:?}");
                    assert!(d.position >= 1, "{d:?}");
                    assert!((d.line, d.position) >= last, "in file order");
                    last = (d.line, d.position);
                    let prefix = format!("rand.conf:{}:{}: {}: ", d.line, d.position, d.variable);
                    assert!(d.to_string().starts_with(&prefix), "{d}");
                }
            }
            Err(err) => {
                refused += 1;
                let msg = err.to_string();
                assert!(msg.starts_with("rand.conf:"), "{msg}");
                assert!(ours.iter().any(|n| msg.contains(n)), "{msg}");
            }
        }
    }
    // The generator reaches both outcomes.
    assert!(ok > 1000 && refused > 100, "ok {ok}, refused {refused}");
}
