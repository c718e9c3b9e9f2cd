//! Any text as a .dockerignore, its lines also tried as paths: never panics.
#![no_main]

use capstan::supervisor::driver::dockerignore::Ignore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let ignore = Ignore::parse(text);
    for line in text.lines().take(64) {
        let _ = ignore.excludes(line.trim_start_matches('!'));
        let _ = ignore.may_include_under(line);
    }
});
