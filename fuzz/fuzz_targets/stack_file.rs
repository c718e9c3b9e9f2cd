//! Any bytes as a stack file: parsing never panics, and what parses renders back.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let opts = capstan::spec::LoadOptions { env: BTreeMap::from([("A".into(), "1".into())]), profiles: Vec::new() };
    if let Ok((stack, _)) = capstan::spec::parse_text(text, "capstan.yaml", Path::new("/nonexistent"), "app", BTreeMap::new(), &opts) {
        let _ = capstan::spec::to_yaml(&stack);
    }
});
