//! Any text as a .env file and as an interpolated string: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = capstan::spec::interp::parse_env_file(text);
    let vars = capstan::spec::interp::Vars::new(Default::default(), [("A".to_string(), "1".to_string())]);
    let _ = capstan::spec::interp::interpolate(text, &vars);
});
