//! Any bytes as a block's lines in templates: decoding never panics, and any
//! text comes back from its templates and variables byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| capstan_logstore::fuzzing::lines(data));
