//! `Range` parsing (`edge/src/cache/range.rs`) and the `Content-Range`
//! parser of slice mode (`edge/src/cache/slice.rs`), with arbitrary values.
//! Input: 8 bytes of representation length, then the header value.
//! - A parsed range is inside the representation, sorted, merged, and at
//!   most 16 of them; the multipart body built from it holds exactly the
//!   bytes asked for.
//! - Every `Content-Range` the edge writes parses back to what it wrote;
//!   an arbitrary one parses to a range or to nothing, never a panic.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use meridian_edge::cache::range::{self, RangeRequest};
use meridian_edge::cache::slice;

fn content_range_of(v: HeaderValue) -> Option<(u64, u64, u64)> {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_RANGE, v);
    slice::content_range(&h)
}

fuzz_target!(|data: &[u8]| {
    let Some((len, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len);
    // Arbitrary Content-Range values from an origin.
    if let Ok(v) = HeaderValue::from_bytes(value) {
        let _ = content_range_of(v);
    }
    // Small lengths exercise the edges too; keep a body we can build.
    let small = len % 4096;
    for len in [len, small] {
        let ranges = match range::parse(value, len) {
            RangeRequest::Ignore => continue,
            RangeRequest::Unsatisfiable => {
                assert_eq!(content_range_of(range::unsatisfied(len)), None);
                continue;
            }
            RangeRequest::Single(a, b) => vec![(a, b)],
            RangeRequest::Multi(r) => {
                assert!(r.len() >= 2 && r.len() <= 16, "{} ranges", r.len());
                r
            }
        };
        for w in ranges.windows(2) {
            assert!(
                w[0].1.saturating_add(1) < w[1].0,
                "ranges not sorted and merged: {ranges:?}"
            );
        }
        for &(a, b) in &ranges {
            assert!(a <= b && b < len, "range {a}-{b} outside {len} bytes");
            assert_eq!(
                content_range_of(range::content_range(a, b, len)),
                Some((a, b, len)),
                "Content-Range round trip"
            );
        }
        if len == small {
            let body: Bytes = (0..len).map(|i| i as u8).collect::<Vec<u8>>().into();
            let (boundary, out) = range::multipart(&body, &ranges, None);
            let mut want = 0usize;
            for &(a, b) in &ranges {
                want += (b - a + 1) as usize;
            }
            assert!(out.len() > want, "multipart body too short");
            assert!(out.ends_with(format!("\r\n--{boundary}--\r\n").as_bytes()));
            for &(a, b) in &ranges {
                let part = &body[a as usize..=b as usize];
                let head = format!("Content-Range: bytes {a}-{b}/{len}\r\n\r\n");
                let at = out
                    .windows(head.len())
                    .position(|w| w == head.as_bytes())
                    .expect("every range has its part");
                assert_eq!(&out[at + head.len()..at + head.len() + part.len()], part);
            }
        }
    }
});
