//! Fuzzes the pptdevs parser: any UTF-8 string as a variable's value.
#![no_main]

use kmod::tunables::pptdevs::{self, Reason};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    let effective = value.split('\0').next().unwrap_or("");
    match pptdevs::parse("pptdevs", value) {
        Err(pptdevs::PptdevsError::TooLong { len, .. }) => assert!(len > pptdevs::MAX_LEN),
        Ok(parsed) => {
            assert!(effective.len() <= pptdevs::MAX_LEN);
            let pieces = effective.split(' ').filter(|p| !p.is_empty()).count();
            let whole = parsed
                .ignored
                .iter()
                .filter(|i| !matches!(i.reason, Reason::TrailingText { .. } | Reason::AfterNul))
                .count();
            assert_eq!(parsed.accepted.len() + whole, pieces);
            for a in &parsed.accepted {
                assert!(a.addr.slot() <= passthrough::MAX_SLOT);
                assert!(a.addr.function() <= passthrough::MAX_FUNCTION);
            }
            for i in &parsed.ignored {
                assert_eq!(i.variable, "pptdevs");
                assert!(value[i.offset..].starts_with(&i.text));
            }
        }
    }
});
