//! The TOML config parser and validator (against the demo's files).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meridian_dns::model::{DemoFiles, load};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = load(text, Path::new("/fuzz/config.toml"), &DemoFiles);
});
