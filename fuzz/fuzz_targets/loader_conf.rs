//! Fuzzes the loader.conf(5) parser: any bytes, as a file.
#![no_main]

use kmod::tunables::{Tunables, VM_MAXCPU};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|&b| b == b'\n').count();
    match Tunables::parse("fuzz.conf", data, 8) {
        Ok(parsed) => {
            let t = &parsed.tunables;
            assert!((1..=VM_MAXCPU).contains(&t.maxcpu));
            for (i, a) in t.pptdevs.iter().enumerate() {
                assert!(a.slot() <= passthrough::MAX_SLOT);
                assert!(a.function() <= passthrough::MAX_FUNCTION);
                assert!(!t.pptdevs[..i].contains(a));
            }
            for d in &parsed.diagnostics {
                assert!(!d.variable.is_empty());
                assert!(d.line >= 1 && d.line <= lines);
                assert!(d.position >= 1);
                let shown = d.to_string();
                assert!(shown.starts_with(&format!(
                    "fuzz.conf:{}:{}: {}: ",
                    d.line, d.position, d.variable
                )));
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.conf:")),
    }
});
