//! The RFC 1035 zone file parser and the zone's checks with arbitrary text;
//! a zone that loads is then looked up at every name its text mentions.
#![no_main]

use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use hickory_proto::rr::{LowerName, Name, RecordType};
use libfuzzer_sys::fuzz_target;
use meridian_dns::zone::{Lookup, Zone};

fn origin() -> &'static Name {
    static O: OnceLock<Name> = OnceLock::new();
    O.get_or_init(|| Name::from_str("demo.meridian.test.").expect("origin"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(zone) = Zone::parse(text, Path::new("fuzz.zone"), origin()) else {
        return;
    };
    assert!(zone.len() > 0, "a loaded zone has at least its SOA");
    let mut names = vec![zone.origin().clone()];
    for word in text.split_whitespace().take(64) {
        let Ok(n) = Name::parse(word, Some(origin())) else {
            continue;
        };
        names.push(LowerName::new(&n));
    }
    for name in &names {
        let _ = zone.types_at(name);
        let _ = zone.exists(name);
        for t in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::CNAME,
            RecordType::NS,
            RecordType::ANY,
        ] {
            match zone.lookup(name, t) {
                Lookup::Records(r) | Lookup::Referral(r) => {
                    assert!(!r.is_empty(), "empty RRset for {name} {t}")
                }
                _ => {}
            }
            let _ = zone.lookup_glue(name, t);
        }
    }
});
