//! Any text as a Prometheus rule file, and its templates expanded: never panics.
#![no_main]

use capstan::alerting::{file, template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = file::parse("fuzz.yml", text);
    // The text itself as a template, over fixed data.
    let d = template::Data {
        labels: [("service".to_owned(), "web".to_owned())].into(),
        external_labels: Default::default(),
        value: 1.5,
        query: Some(&|_: &str| Ok(vec![(Default::default(), 1.0)])),
    };
    let _ = template::expand(text, &d);
});
