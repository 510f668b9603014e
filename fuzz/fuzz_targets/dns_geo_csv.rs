//! The GeoIP CSV parser and the MaxMind DB writer: whatever parses must
//! build into a database maxminddb accepts.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meridian_dns::geo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rows) = geo::parse_csv(text, Path::new("fuzz.csv")) else {
        return;
    };
    let bytes = geo::build_mmdb(&rows).expect("parsed rows always build");
    let db = geo::GeoDb::from_bytes(Some(bytes), None).expect("maxminddb reads what we write");
    for r in &rows {
        let _ = db.lookup(r.network.addr());
    }
});
