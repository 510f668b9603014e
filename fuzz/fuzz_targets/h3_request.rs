//! HTTP/3 request conversion: raw request streams sent over a real QUIC
//! connection to the edge's HTTP/3 endpoint (`edge/src/http3/mod.rs`, h3's
//! QPACK decoding and pseudo-header checks, then the same `Proxy::handle`
//! as HTTP/1.1 and HTTP/2) in this process, in front of an origin on
//! 127.0.0.1.
//!
//! Input: the first byte chooses the form.
//! - Even: field lines `name\0value`, one a line, then after an empty line
//!   the request body; they are QPACK-encoded as literals into a HEADERS
//!   frame, and the body into a DATA frame.
//! - Odd: the rest is sent as is, as the request stream's bytes.
//!
//! The edge must answer or refuse every stream within 5 s, never panic, and
//! go on accepting connections (checked on every reconnect).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_fuzz::{H3Outcome, edge, frame, qpack_literals};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let edge = edge();
    let stream = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let fields: Vec<(&[u8], &[u8])> = head
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| match l.iter().position(|&b| b == 0) {
                Some(i) => (&l[..i], &l[i + 1..]),
                None => (l, &[][..]),
            })
            .collect();
        let mut out = Vec::new();
        frame(&mut out, 0x01, &qpack_literals(&fields));
        if let Some(body) = body {
            frame(&mut out, 0x00, body);
        }
        out
    };
    match edge.h3_raw(&stream) {
        H3Outcome::Answered(_) | H3Outcome::Refused(_) => {}
    }
});
