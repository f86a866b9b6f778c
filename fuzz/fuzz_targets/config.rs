//! The configuration parser: any text gives a configuration or an error
//! that names a field; it never panics.
#![no_main]

use bond_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml");
    }
});
