//! Any bytes as a scrape body, in both formats: the parser never panics and every
//! label of every sample it returns can be read.
#![no_main]

use capstan_expfmt::{Entry, Format, Parser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Text, Format::OpenMetrics] {
        let Ok(parser) = Parser::from_bytes(data, format) else { return };
        for entry in parser {
            if let Ok(Entry::Sample(s)) = entry {
                for l in s.labels() {
                    let _ = l;
                }
            }
        }
    }
});
