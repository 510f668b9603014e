//! Slice assembly (`edge/src/cache/slice.rs`): a GET with an arbitrary
//! `Range` through the real request pipeline of an edge in this process,
//! whose site is in slice mode (slices of 100 bytes), in front of a scripted
//! origin on 127.0.0.1 that serves an object of arbitrary length and
//! misbehaves on chosen range requests (ignores the range, answers 416, a
//! wrong or missing `Content-Range`, a short body, a changed ETag).
//!
//! The edge must never panic nor hang; and when the origin behaves, the
//! response is exactly the bytes it claims: a 200 is the whole object, a
//! 206 the bytes its `Content-Range` names, of the object's real length.
#![no_main]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use meridian_edge::cache::slice;
use meridian_edge::http::body::ClientBody;
use meridian_fuzz::{Fault, Object, SLICE_HOST, downstream, edge};

static SEQ: AtomicU64 = AtomicU64::new(0);

fn fault(code: u8, arg: &[u8]) -> Option<Fault> {
    Some(match code % 8 {
        0 => Fault::Whole,
        1 => Fault::Unsatisfiable,
        2 => Fault::ContentRange(String::from_utf8_lossy(arg).into_owned()),
        3 => Fault::Short,
        4 => Fault::NewEtag,
        5 => Fault::NoContentRange,
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    // len u16 | faults: count u8, then (code u8, arg_len u8, arg)* | Range value
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len) % 1500);
    let Some((&n, mut rest)) = rest.split_first() else {
        return;
    };
    let mut faults = VecDeque::new();
    for _ in 0..(n % 8) {
        let Some((&[code, alen], r)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let alen = usize::from(alen).min(r.len());
        if let Some(f) = fault(code, &r[..alen]) {
            faults.push_back(f);
        }
        rest = &r[alen..];
    }
    let range = rest;
    let well_behaved = faults.is_empty();
    let body: Bytes = (0..len)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let path = format!("/o{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let e = edge();
    e.origin.set(
        &path,
        Object {
            body: body.clone(),
            etag: "v1".into(),
            faults,
        },
    );
    let mut req = Request::builder()
        .uri(&path)
        .header(header::HOST, SLICE_HOST);
    if let Ok(v) = http::HeaderValue::from_bytes(range) {
        req = req.header(header::RANGE, v);
    }
    let Ok(req) = req.body(ClientBody::Empty) else {
        return;
    };
    let ds = downstream();
    let (status, headers, got) = e.rt.block_on(async {
        let exchange = async {
            let resp = e.proxy.handle(req, &ds).await;
            let (parts, b) = resp.into_parts();
            (
                parts.status,
                parts.headers,
                b.collect().await.map(|c| c.to_bytes()),
            )
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the edge answers a sliced GET within 10 s")
    });
    let Ok(got) = got else {
        assert!(
            !well_behaved,
            "a body failed with a well-behaved origin ({status})"
        );
        return;
    };
    if !well_behaved {
        return;
    }
    match status {
        StatusCode::OK => assert_eq!(got, body, "a 200 that is not the object"),
        StatusCode::PARTIAL_CONTENT => {
            let (a, b, total) = slice::content_range(&headers).expect("a 206 has a Content-Range");
            assert_eq!(total, len as u64, "Content-Range names another length");
            assert!(a <= b && b < total, "Content-Range {a}-{b}/{total}");
            assert_eq!(
                got,
                body.slice(a as usize..=b as usize),
                "a 206 with other bytes"
            );
        }
        StatusCode::RANGE_NOT_SATISFIABLE => assert!(got.is_empty()),
        s => panic!("unexpected status {s} with a well-behaved origin"),
    }
});
