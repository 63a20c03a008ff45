//! loader.conf(5) tunables: syntax, our tunables' values, and every pptdevs shape bhyve meets.

use kmod::tunables::pptdevs::{self, Field, Reason};
use kmod::tunables::{Diagnostic, DiagnosticKind, Parsed, Tunables, TunablesError, VM_MAXCPU};
use passthrough::PciAddress;

const FILE: &str = "loader.conf";

fn addr(b: u8, s: u8, f: u8) -> PciAddress {
    PciAddress::new(b, s, f).unwrap()
}

/// Parses `text` with 8 host CPUs and checks what every diagnostic must do: name the file, the
/// line, the variable, and a column on that line.
fn parse(text: &str) -> Parsed {
    let parsed = Tunables::parse(FILE, text.as_bytes(), 8).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &parsed.diagnostics {
        check_diagnostic(d, &lines);
    }
    parsed
}

fn check_diagnostic(d: &Diagnostic, lines: &[&str]) {
    assert_eq!(d.file, FILE);
    assert!(!d.variable.is_empty(), "{d:?}");
    assert!(d.line >= 1 && d.line <= lines.len(), "{d:?}");
    let line = lines[d.line - 1];
    assert!(
        d.position >= 1 && d.position <= line.len() + 1,
        "{d:?} on {line:?}"
    );
    let shown = d.to_string();
    assert!(
        shown.starts_with(&format!(
            "{FILE}:{}:{}: {}: ",
            d.line, d.position, d.variable
        )),
        "{shown}"
    );
}

fn parse_err(text: &str) -> TunablesError {
    match Tunables::parse(FILE, text.as_bytes(), 8) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e,
    }
}

fn kinds(p: &Parsed) -> Vec<&DiagnosticKind> {
    p.diagnostics.iter().map(|d| &d.kind).collect()
}

/// The pptdevs diagnostics of `p`: (variable, column, entry, text, reason).
fn ppt_diags(p: &Parsed) -> Vec<(String, usize, usize, String, Reason)> {
    p.diagnostics
        .iter()
        .filter_map(|d| match &d.kind {
            DiagnosticKind::PptdevsEntry {
                entry,
                text,
                reason,
            } => Some((
                d.variable.clone(),
                d.position,
                *entry,
                text.clone(),
                reason.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// Devices and ignored (text, reason) pairs for `pptdevs="value"`.
fn ppt(value: &str) -> (Vec<PciAddress>, Vec<(String, Reason)>) {
    let p = parse(&format!("pptdevs=\"{value}\"\n"));
    let ignored = ppt_diags(&p)
        .into_iter()
        .map(|(_, _, _, text, reason)| (text, reason))
        .collect();
    (p.tunables.pptdevs, ignored)
}

#[test]
fn the_vmm4_example_gives_three_devices() {
    let p = parse("vmm_load=\"YES\"\npptdevs=\"10/0/0 6/5/0 6/5/1\"\n");
    assert!(p.tunables.vmm_load);
    assert_eq!(
        p.tunables.pptdevs,
        vec![addr(10, 0, 0), addr(6, 5, 0), addr(6, 5, 1)]
    );
    assert_eq!(p.diagnostics, vec![]);
}

#[test]
fn an_empty_file_gives_the_defaults() {
    let p = parse("");
    assert_eq!(p.tunables, Tunables::defaults(8));
    assert_eq!(p.tunables.maxcpu, 8);
    assert!(p.tunables.halt_detection);
    assert!(!p.tunables.vmm_load);
    assert_eq!(Tunables::defaults(0).maxcpu, 1);
    assert_eq!(Tunables::defaults(5000).maxcpu, VM_MAXCPU);
}

#[test]
fn comments_blanks_spaces_and_crlf() {
    let text = "# vmm settings\n\
                \n   \t\n\
                \x20  # indented comment\n\
                hw.vmm.maxcpu = \"4\"   # trailing comment\n\
                hw.vmm.halt_detection=0# no space before the comment\r\n\
                \tvmm_load\t=\tYES\t\n\
                pptdevs=\"1/0/0\" # a comment with \"quotes\" in it\n";
    let p = parse(text);
    assert_eq!(p.tunables.maxcpu, 4);
    assert!(!p.tunables.halt_detection);
    assert!(p.tunables.vmm_load);
    assert_eq!(p.tunables.pptdevs, vec![addr(1, 0, 0)]);
    assert_eq!(p.diagnostics, vec![]);
}

#[test]
fn unquoted_values_are_words_as_in_the_loader() {
    let p = parse("hw.vmm.maxcpu=6\nhw.vmm.halt_detection=0x0\nfoo.bar=a-b_c.d\n");
    assert_eq!(p.tunables.maxcpu, 6);
    assert!(!p.tunables.halt_detection);
    assert_eq!(p.tunables.others["foo.bar"], "a-b_c.d");

    // A slash is not a word character: the loader rejects the line, so do we, and say where.
    let p = parse("pptdevs=10/0/0\n");
    assert_eq!(p.tunables.pptdevs, vec![]);
    assert_eq!(p.diagnostics.len(), 1);
    let d = &p.diagnostics[0];
    assert_eq!(
        (d.line, d.variable.as_str(), d.position),
        (1, "pptdevs", 11)
    );
    match &d.kind {
        DiagnosticKind::MalformedLine { reason, text } => {
            assert_eq!(text, "/0/0");
            assert!(reason.contains("quote"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_tunables_are_kept_and_reported() {
    let p = parse("kern.geom.label.gptid.enable=\"0\"\nhw.vmm.amdvi.enable=1\n");
    assert_eq!(p.tunables.others.len(), 2);
    assert_eq!(p.tunables.others["kern.geom.label.gptid.enable"], "0");
    assert_eq!(p.tunables.others["hw.vmm.amdvi.enable"], "1");
    let d = &p.diagnostics[1];
    assert_eq!((d.line, d.position), (2, 1));
    assert_eq!(d.variable, "hw.vmm.amdvi.enable");
    assert_eq!(d.kind, DiagnosticKind::UnknownTunable { value: "1".into() });
    assert!(
        d.to_string()
            .contains("hw.vmm.amdvi.enable: Unknown tunable, ignored"),
        "{d}"
    );
}

#[test]
fn module_settings() {
    let p = parse("zfs_load=\"YES\"\nvmm_flags=\"-v\"\nif_bnxt_load=\"YES\"\nvmm_load=\"yes\"\n");
    assert!(p.tunables.vmm_load, "YES in any case");
    assert!(
        p.tunables.others.is_empty(),
        "module settings are not variables"
    );
    assert_eq!(
        kinds(&p),
        vec![
            &DiagnosticKind::OtherModule {
                module: "zfs".into()
            },
            &DiagnosticKind::UnsupportedSetting { value: "-v".into() },
            &DiagnosticKind::OtherModule {
                module: "if_bnxt".into()
            },
        ]
    );

    let p = parse("vmm_load=\"maybe\"\n");
    assert!(!p.tunables.vmm_load);
    assert_eq!(
        kinds(&p),
        vec![&DiagnosticKind::NotYesOrNo {
            value: "maybe".into()
        }]
    );
    assert!(!parse("vmm_load=\"NO\"\n").tunables.vmm_load);
    assert_eq!(parse("vmm_load=\"NO\"\n").diagnostics, vec![]);
}

#[test]
fn maxcpu_reads_like_getenv_int_and_clamps_like_vmm() {
    let cases = [
        ("8", 8, false),
        ("0x10", 16, false),
        ("010", 8, false),
        ("1k", 1024, false),
        ("1024", 1024, false),
        ("0", 1, true),
        ("-4", 1, true),
        ("1025", 1024, true),
        ("4g", 1024, true),
    ];
    for (value, want, clamped) in cases {
        let p = parse(&format!("hw.vmm.maxcpu=\"{value}\"\n"));
        assert_eq!(p.tunables.maxcpu, want, "{value}");
        let expect: Vec<DiagnosticKind> = if clamped {
            vec![DiagnosticKind::Clamped {
                value: value.into(),
                to: want,
            }]
        } else {
            vec![]
        };
        assert_eq!(
            p.diagnostics
                .iter()
                .map(|d| d.kind.clone())
                .collect::<Vec<_>>(),
            expect,
            "{value}"
        );
    }
}

#[test]
fn a_maxcpu_that_is_not_an_integer_refuses_the_file_naming_it() {
    let err = parse_err("# x\n\nhw.vmm.maxcpu=\"four\"\n");
    match &err {
        TunablesError::InvalidValue {
            file,
            line,
            variable,
            value,
            ..
        } => {
            assert_eq!((file.as_str(), *line), (FILE, 3));
            assert_eq!(variable, "hw.vmm.maxcpu");
            assert_eq!(value, "four");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "loader.conf:3: hw.vmm.maxcpu: invalid value \"four\": not an integer"
    );
    assert!(matches!(
        parse_err("hw.vmm.maxcpu=\"4 cpus\"\n"),
        TunablesError::InvalidValue { .. }
    ));
}

#[test]
fn halt_detection_is_0_or_1() {
    assert!(
        !parse("hw.vmm.halt_detection=\"0\"\n")
            .tunables
            .halt_detection
    );
    assert!(
        parse("hw.vmm.halt_detection=\"1\"\n")
            .tunables
            .halt_detection
    );
    let err = parse_err("hw.vmm.halt_detection=\"2\"\n");
    assert!(err.to_string().contains("must be 0 or 1"), "{err}");
    assert!(err.to_string().contains("hw.vmm.halt_detection"), "{err}");
    let err = parse_err("hw.vmm.halt_detection=\"yes\"\n");
    assert!(err.to_string().contains("\"yes\""), "{err}");
}

#[test]
fn the_earliest_bad_line_is_the_error_reported() {
    let err = parse_err("hw.vmm.halt_detection=\"7\"\nhw.vmm.maxcpu=\"x\"\n");
    assert!(err.to_string().starts_with("loader.conf:1:"), "{err}");
}

/// A pptdevs value, the devices it gives, and the (text, reason) of each ignored part.
type Case = (&'static str, Vec<PciAddress>, Vec<(&'static str, Reason)>);

#[test]
fn pptdevs_shapes_bhyve_ignores_are_reported() {
    let not_triple = |n| Reason::NotATriple { converted: n };
    let cases: Vec<Case> = vec![
        ("0x10/0/0", vec![], vec![("0x10/0/0", not_triple(1))]),
        ("10:0:0", vec![], vec![("10:0:0", not_triple(1))]),
        (
            "0000:0a:00.0",
            vec![],
            vec![("0000:0a:00.0", not_triple(1))],
        ),
        ("10,0,0", vec![], vec![("10,0,0", not_triple(1))]),
        ("10/0", vec![], vec![("10/0", not_triple(2))]),
        ("10/0/", vec![], vec![("10/0/", not_triple(2))]),
        ("10//0", vec![], vec![("10//0", not_triple(1))]),
        ("/0/0", vec![], vec![("/0/0", not_triple(0))]),
        ("a/b/c", vec![], vec![("a/b/c", not_triple(0))]),
        ("-/0/0", vec![], vec![("-/0/0", not_triple(0))]),
        ("\t", vec![], vec![("\t", not_triple(0))]),
        (
            "-1/0/0",
            vec![],
            vec![(
                "-1/0/0",
                Reason::OutOfRange {
                    field: Field::Bus,
                    value: -1,
                    max: 255,
                },
            )],
        ),
        (
            "256/0/0",
            vec![],
            vec![(
                "256/0/0",
                Reason::OutOfRange {
                    field: Field::Bus,
                    value: 256,
                    max: 255,
                },
            )],
        ),
        (
            "0/32/0",
            vec![],
            vec![(
                "0/32/0",
                Reason::OutOfRange {
                    field: Field::Slot,
                    value: 32,
                    max: 31,
                },
            )],
        ),
        (
            "0/0/8",
            vec![],
            vec![(
                "0/0/8",
                Reason::OutOfRange {
                    field: Field::Function,
                    value: 8,
                    max: 7,
                },
            )],
        ),
        (
            "4294967306/0/0",
            vec![],
            vec![(
                "4294967306/0/0",
                Reason::Overflow {
                    field: Field::Bus,
                    wrapped: 10,
                },
            )],
        ),
        // Things sscanf accepts.
        ("+1/-0/007", vec![addr(1, 0, 7)], vec![]),
        ("\t10/0/0", vec![addr(10, 0, 0)], vec![]),
        ("10/\t0/\x0b0", vec![addr(10, 0, 0)], vec![]),
        ("255/31/7", vec![addr(255, 31, 7)], vec![]),
        ("10/0/0  6/5/0", vec![addr(10, 0, 0), addr(6, 5, 0)], vec![]),
        ("  10/0/0 ", vec![addr(10, 0, 0)], vec![]),
        ("", vec![], vec![]),
        ("   ", vec![], vec![]),
        // A valid triple with text after it: the triple is used, the rest is not.
        (
            "10/0/0,6/5/0",
            vec![addr(10, 0, 0)],
            vec![(
                ",6/5/0",
                Reason::TrailingText {
                    device: addr(10, 0, 0),
                },
            )],
        ),
        (
            "10/0/0\t6/5/0",
            vec![addr(10, 0, 0)],
            vec![(
                "\t6/5/0",
                Reason::TrailingText {
                    device: addr(10, 0, 0),
                },
            )],
        ),
        (
            "10/0/0junk",
            vec![addr(10, 0, 0)],
            vec![(
                "junk",
                Reason::TrailingText {
                    device: addr(10, 0, 0),
                },
            )],
        ),
        (
            "1/2/3/4",
            vec![addr(1, 2, 3)],
            vec![(
                "/4",
                Reason::TrailingText {
                    device: addr(1, 2, 3),
                },
            )],
        ),
        (
            "0x10/0/0 6/5/0",
            vec![addr(6, 5, 0)],
            vec![("0x10/0/0", not_triple(1))],
        ),
    ];
    for (value, devices, ignored) in cases {
        let (got_devices, got_ignored) = ppt(value);
        assert_eq!(got_devices, devices, "{value:?}");
        let ignored: Vec<(String, Reason)> = ignored
            .into_iter()
            .map(|(t, r)| (t.to_owned(), r))
            .collect();
        assert_eq!(got_ignored, ignored, "{value:?}");
    }
}

#[test]
fn pptdevs_diagnostics_give_variable_entry_and_column() {
    // Columns:            1234567890123456789012345678
    let p = parse("pptdevs=\"10/0/0 0x10/0/0 1/2/3x\"\n");
    assert_eq!(p.tunables.pptdevs, vec![addr(10, 0, 0), addr(1, 2, 3)]);
    assert_eq!(
        ppt_diags(&p),
        vec![
            (
                "pptdevs".into(),
                17,
                2,
                "0x10/0/0".into(),
                Reason::NotATriple { converted: 1 }
            ),
            (
                "pptdevs".into(),
                31,
                3,
                "x".into(),
                Reason::TrailingText {
                    device: addr(1, 2, 3)
                }
            ),
        ]
    );
    let d = &p.diagnostics[0];
    assert_eq!(
        d.to_string(),
        "loader.conf:1:17: pptdevs: Entry 2 \"0x10/0/0\" ignored: \
         not decimal bus/slot/function (only 1 of 3 numbers read)"
    );
}

#[test]
fn an_overlong_pptdevs_is_an_error_and_none_of_its_entries_apply() {
    // 32 entries of "1/0/0" plus spaces: 191 bytes.
    let long = vec!["1/0/0"; 32].join(" ");
    let err = parse_err(&format!("pptdevs=\"2/0/0\"\npptdevs2=\"{long}\"\n"));
    match &err {
        TunablesError::Pptdevs {
            line,
            variable,
            source: pptdevs::PptdevsError::TooLong { len, .. },
            ..
        } => {
            assert_eq!(
                (*line, variable.as_str(), *len),
                (2, "pptdevs2", long.len())
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string(), "loader.conf:2: pptdevs2 not used");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("over the limit of 128"), "{source}");
    assert!(source.contains("1/0/0 1/0/0"), "{source}");

    // Exactly 128 bytes is fine.
    let entries = vec!["10/0/0"; 17].join(" ");
    let at_limit = format!("{entries} 1/2/3");
    let at_limit = format!("{at_limit}{}", " ".repeat(128 - at_limit.len()));
    assert_eq!(at_limit.len(), 128);
    let p = parse(&format!("pptdevs=\"{at_limit}\"\n"));
    assert_eq!(p.tunables.pptdevs, vec![addr(10, 0, 0), addr(1, 2, 3)]);
    let dups = p
        .diagnostics
        .iter()
        .filter(|d| matches!(d.kind, DiagnosticKind::DuplicateDevice { .. }))
        .count();
    assert_eq!(dups, 16);
}

#[test]
fn pptdevs_variables_merge_in_order_without_duplicates() {
    let p = parse("pptdevs3=\"3/0/0\"\npptdevs2=\"2/0/0 1/0/0\"\npptdevs=\"1/0/0\"\n");
    assert_eq!(
        p.tunables.pptdevs,
        vec![addr(1, 0, 0), addr(2, 0, 0), addr(3, 0, 0)]
    );
    let d = p
        .diagnostics
        .iter()
        .find(|d| matches!(d.kind, DiagnosticKind::DuplicateDevice { .. }))
        .unwrap();
    assert_eq!(
        (d.line, d.variable.as_str(), d.position),
        (2, "pptdevs2", 17)
    );
    assert_eq!(
        d.kind,
        DiagnosticKind::DuplicateDevice {
            device: addr(1, 0, 0),
            first_variable: "pptdevs".into(),
            first_line: 3,
        }
    );
}

#[test]
fn a_later_setting_replaces_an_earlier_one_and_says_so() {
    let p = parse("pptdevs=\"1/0/0\"\nhw.vmm.maxcpu=2\npptdevs=\"2/0/0\"\nhw.vmm.maxcpu=3\n");
    assert_eq!(p.tunables.pptdevs, vec![addr(2, 0, 0)]);
    assert_eq!(p.tunables.maxcpu, 3);
    let overridden: Vec<(usize, &str, &DiagnosticKind)> = p
        .diagnostics
        .iter()
        .map(|d| (d.line, d.variable.as_str(), &d.kind))
        .collect();
    assert_eq!(
        overridden,
        vec![
            (1, "pptdevs", &DiagnosticKind::Overridden { by_line: 3 }),
            (
                2,
                "hw.vmm.maxcpu",
                &DiagnosticKind::Overridden { by_line: 4 }
            ),
        ]
    );
}

#[test]
fn escapes_and_variable_expansion_as_in_the_loader() {
    let p = parse("nics=\"10/0/0 6/5/0\"\npptdevs=\"${nics} $usb 1/\\2/3\"\nusb=\"0/20/0\"\n");
    assert_eq!(
        p.tunables.pptdevs,
        vec![addr(10, 0, 0), addr(6, 5, 0), addr(1, 2, 3)]
    );
    let unset: Vec<_> = p
        .diagnostics
        .iter()
        .filter(|d| matches!(d.kind, DiagnosticKind::UnsetReference { .. }))
        .collect();
    assert_eq!(unset.len(), 1);
    assert_eq!(
        (unset[0].line, unset[0].position, &unset[0].kind),
        (
            2,
            18,
            &DiagnosticKind::UnsetReference { name: "usb".into() }
        )
    );

    // An escaped quote is part of the value; its entry's column is where it was written.
    let p = parse("pptdevs=\"1/0/0 \\\"2/0/0\"\n");
    assert_eq!(p.tunables.pptdevs, vec![addr(1, 0, 0)]);
    assert_eq!(
        ppt_diags(&p),
        vec![(
            "pptdevs".into(),
            16,
            2,
            "\"2/0/0".into(),
            Reason::NotATriple { converted: 0 }
        )]
    );
}

#[test]
fn value_syntax_errors_leave_the_variable_unset() {
    for (line, reason) in [
        ("pptdevs=\"1/0/0 $\"", "unescaped $ at end of value"),
        ("pptdevs=\"${x\"", "malformed ${...} expression"),
        ("pptdevs=\"${}\"", "malformed ${...} expression"),
        ("pptdevs=\"$/\"", "malformed $ expression"),
    ] {
        let p = parse(&format!("{line}\n"));
        assert_eq!(p.tunables.pptdevs, vec![], "{line}");
        match &p.diagnostics[..] {
            [d] => {
                assert_eq!(d.variable, "pptdevs");
                assert_eq!(d.position, 10, "{line}");
                assert!(
                    matches!(&d.kind, DiagnosticKind::BadValue { reason: r, .. } if *r == reason),
                    "{line}: {d}"
                );
            }
            other => panic!("{line}: {other:?}"),
        }
    }
}

#[test]
fn malformed_lines_are_skipped_and_named() {
    let text = "garbage\n=x\n_x=1\na=\"x\" junk\nb = \"unterminated\nc=\nd=\"ok\\\"\nexec=\"load foo\"\nhw.vmm.maxcpu=2\n";
    let p = parse(text);
    assert_eq!(p.tunables.maxcpu, 2, "good lines still count");
    let got: Vec<(usize, &str, usize, String)> = p
        .diagnostics
        .iter()
        .map(|d| (d.line, d.variable.as_str(), d.position, d.message()))
        .collect();
    let malformed =
        |reason: &str, text: &str| format!("Malformed line, ignored: {reason}: {text:?}");
    assert_eq!(
        got,
        vec![
            (1, "garbage", 8, malformed("expected name=\"value\"", "")),
            (2, "=x", 1, malformed("expected name=\"value\"", "=x")),
            (
                3,
                "_x",
                1,
                malformed("a variable name starts with a letter or digit", "_x=1")
            ),
            (4, "a", 7, malformed("text after the closing quote", "junk")),
            (
                5,
                "b",
                5,
                malformed("missing closing quote", "\"unterminated")
            ),
            (6, "c", 3, malformed("missing value", "")),
            (7, "d", 3, malformed("missing closing quote", "\"ok\\\"")),
            (8, "exec", 1, "Loader command not run: \"load foo\"".into()),
        ]
    );
}

#[test]
fn a_line_that_is_not_utf8_is_skipped() {
    let text = b"hw.vmm.maxcpu=3\nfoo=\"\xff\xfe\"\npptdevs=\"1/0/0\"\n";
    let p = Tunables::parse(FILE, text, 8).unwrap();
    assert_eq!(p.tunables.maxcpu, 3);
    assert_eq!(p.tunables.pptdevs, vec![addr(1, 0, 0)]);
    assert_eq!(p.diagnostics.len(), 1);
    assert_eq!(p.diagnostics[0].line, 2);
    assert_eq!(p.diagnostics[0].variable, "foo");
}

#[test]
fn a_nul_byte_ends_a_pptdevs_value() {
    let p = parse("pptdevs=\"1/0/0\0 2/0/0\"\n");
    assert_eq!(p.tunables.pptdevs, vec![addr(1, 0, 0)]);
    assert_eq!(
        ppt_diags(&p),
        vec![("pptdevs".into(), 15, 2, "\0 2/0/0".into(), Reason::AfterNul)]
    );
}

#[test]
fn from_file_reads_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loader.conf");
    std::fs::write(&path, "pptdevs=\"10/0/0 x\"\n").unwrap();
    let p = Tunables::from_file(&path, 2).unwrap();
    assert_eq!(p.tunables.pptdevs, vec![addr(10, 0, 0)]);
    assert_eq!(p.tunables.maxcpu, 2);
    assert!(
        p.diagnostics[0]
            .to_string()
            .starts_with(&format!("{}:1:17: pptdevs: ", path.display())),
        "{}",
        p.diagnostics[0]
    );

    let missing = dir.path().join("nope.conf");
    let err = Tunables::from_file(&missing, 2).unwrap_err();
    assert!(matches!(err, TunablesError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.conf"), "{err}");
}

#[test]
fn pptdevs_parse_reports_each_ignored_piece_with_variable_and_offset() {
    let parsed = pptdevs::parse("pptdevs3", "1/0/0 bad 2/0/0x").unwrap();
    let accepted: Vec<(PciAddress, usize, usize)> = parsed
        .accepted
        .iter()
        .map(|a| (a.addr, a.entry, a.offset))
        .collect();
    assert_eq!(
        accepted,
        vec![(addr(1, 0, 0), 1, 0), (addr(2, 0, 0), 3, 10)]
    );
    let ignored: Vec<String> = parsed.ignored.iter().map(ToString::to_string).collect();
    assert_eq!(
        ignored,
        vec![
            "pptdevs3: entry 2 \"bad\" at offset 6 ignored: \
             not decimal bus/slot/function (only 0 of 3 numbers read)",
            "pptdevs3: entry 3 \"x\" at offset 15 ignored: \
             text after 2/0/0 is not read; entries are separated by single spaces only",
        ]
    );
}
