//! TraceQL queries (`/api/search?q=`): any text parses or fails with a column,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = std::str::from_utf8(data)
        && let Err(e) = capstan::traceql::parse(q)
    {
        assert!(e.column >= 1 && e.column <= q.chars().count() + 1);
    }
});
