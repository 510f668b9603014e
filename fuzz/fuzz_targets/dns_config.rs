//! meridian-dns's config parser (`dns/src/config.rs`) with arbitrary text,
//! and the error locator it uses for every validation message.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meridian_dns::config::{Config, line_col};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(c) => {
            for r in &c.regions {
                for a in r.a.iter() {
                    let _ = a.parts();
                }
            }
        }
        Err(e) => {
            let first = &e.0[0];
            assert!(first.line >= 1 && first.col >= 1, "{e}");
        }
    }
    for offset in [0, text.len() / 2, text.len()] {
        let (line, col) = line_col(text, offset);
        assert!(line >= 1 && col >= 1);
    }
});
