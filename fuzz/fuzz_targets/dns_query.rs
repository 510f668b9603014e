//! Raw bytes through the whole query path (decode, steer, ECS, encode) of
//! the embedded demo, over UDP and TCP semantics.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use hickory_server::net::xfer::Protocol;
use libfuzzer_sys::fuzz_target;
use meridian_dns::geo::GeoDb;
use meridian_dns::handler::Runtime;
use meridian_dns::health::HealthTable;

fn demo() -> &'static (Runtime, GeoDb) {
    static DEMO: OnceLock<(Runtime, GeoDb)> = OnceLock::new();
    DEMO.get_or_init(|| {
        let (m, g) = meridian_dns::model::load_demo().expect("the embedded demo loads");
        (Runtime::new(m, &HealthTable::default()), g)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, geo) = demo();
    let src: SocketAddr = ([198, 51, 100, 7], 5353).into();
    for proto in [Protocol::Udp, Protocol::Tcp] {
        if let Some(out) = rt.answer_bytes(geo, data, src, proto, Instant::now()) {
            if proto == Protocol::Udp {
                assert!(
                    out.len() <= 1232,
                    "UDP response over the configured ceiling"
                );
            }
        }
    }
});
