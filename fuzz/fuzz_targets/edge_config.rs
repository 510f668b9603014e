//! The edge's config parser and validator with arbitrary text. A config that
//! loads must survive what `GET /config` does with it: redaction and
//! serialization back to TOML, which must load again to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_edge::config::{Config, parse_duration, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The unit parsers on their own, on every line (they parse short values).
    for line in text.lines().take(64) {
        let _ = parse_duration(line);
        let _ = parse_size(line);
    }
    let Ok(cfg) = Config::from_toml(text, "fuzz.toml") else {
        return;
    };
    let shown = toml::to_string(&cfg.redacted()).expect("a loaded config serializes");
    let again = toml::to_string(&cfg).expect("a loaded config serializes");
    let reloaded = Config::from_toml(&again, "again.toml")
        .unwrap_or_else(|e| panic!("a serialized config loads again: {e}\n{again}"));
    assert_eq!(
        toml::to_string(&reloaded).expect("serializes"),
        again,
        "a config changes on a round trip"
    );
    drop(shown);
});
