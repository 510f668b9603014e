//! Byte ranges (RFC 9110 §14): parsing `Range`, `Content-Range` values,
//! multipart/byteranges bodies, and serving a range of a streamed body.

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body_util::BodyExt;

use crate::http::body::ResponseBody;

/// Most ranges honoured in one request; more is treated as no Range (RFC 9110 §14.2 allows ignoring).
const MAX_RANGES: usize = 16;

#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range: serve the whole representation.
    Ignore,
    /// None of the ranges overlaps the representation: 416.
    Unsatisfiable,
    /// One range, inclusive.
    Single(u64, u64),
    /// Several ranges, inclusive, sorted and merged.
    Multi(Vec<(u64, u64)>),
}

/// Parses a `Range` value against a representation of `len` bytes.
pub fn parse(value: &[u8], len: u64) -> RangeRequest {
    let Ok(s) = std::str::from_utf8(value) else {
        return RangeRequest::Ignore;
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut any = false;
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        any = true;
        if out.len() >= MAX_RANGES {
            return RangeRequest::Ignore;
        }
        let Some((a, b)) = part.split_once('-') else {
            return RangeRequest::Ignore;
        };
        let (a, b) = (a.trim(), b.trim());
        let range = if a.is_empty() {
            // Suffix: the last N bytes.
            let Ok(n) = b.parse::<u64>() else {
                return RangeRequest::Ignore;
            };
            if n == 0 || len == 0 {
                continue;
            }
            (len.saturating_sub(n), len - 1)
        } else {
            let Ok(first) = a.parse::<u64>() else {
                return RangeRequest::Ignore;
            };
            let last = if b.is_empty() {
                u64::MAX
            } else {
                match b.parse::<u64>() {
                    Ok(l) if l >= first => l,
                    _ => return RangeRequest::Ignore,
                }
            };
            if first >= len {
                continue;
            }
            (first, last.min(len - 1))
        };
        out.push(range);
    }
    if !any {
        return RangeRequest::Ignore;
    }
    if out.is_empty() {
        return RangeRequest::Unsatisfiable;
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (a, b) in out {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.len() == 1 {
        RangeRequest::Single(merged[0].0, merged[0].1)
    } else {
        RangeRequest::Multi(merged)
    }
}

pub fn content_range(first: u64, last: u64, len: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes {first}-{last}/{len}"))
        .unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

pub fn unsatisfied(len: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes */{len}"))
        .unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

/// A multipart/byteranges body of `ranges` of `body`; returns (boundary, body).
pub fn multipart(
    body: &Bytes,
    ranges: &[(u64, u64)],
    ctype: Option<&HeaderValue>,
) -> (String, Bytes) {
    let boundary = format!(
        "meridian-{:016x}",
        crate::util::hash64(&[
            &body.len().to_le_bytes(),
            &(ranges.len() as u64).to_le_bytes()
        ])
    );
    let len = body.len() as u64;
    let mut out = BytesMut::new();
    for &(a, b) in ranges {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        if let Some(ct) = ctype {
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(ct.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("Content-Range: bytes {a}-{b}/{len}\r\n\r\n").as_bytes());
        let (s, e) = (a as usize, (b as usize + 1).min(body.len()));
        out.extend_from_slice(&body[s.min(e)..e]);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (boundary, out.freeze())
}

/// Serves bytes `[skip, skip+take)` of a streamed body.
pub fn skip_take(mut body: ResponseBody, skip: u64, take: u64) -> ResponseBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut pos = 0u64;
        let end = skip + take;
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as crate::error::BoxError)).await;
                    return;
                }
            };
            let (start, stop) = (pos, pos + data.len() as u64);
            pos = stop;
            if stop <= skip {
                continue;
            }
            let a = skip.saturating_sub(start) as usize;
            let b = (end.min(stop) - start) as usize;
            if a < b && tx.send(Ok(data.slice(a..b))).await.is_err() {
                return;
            }
            if stop >= end {
                break;
            }
        }
        // The client has its bytes. A fill behind this body goes on without
        // it (at the origin's pace) only if the object is worth finishing.
    });
    ResponseBody::channel(rx, Some(take))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse(b"bytes=0-99", 1000), RangeRequest::Single(0, 99));
        assert_eq!(parse(b"bytes=900-", 1000), RangeRequest::Single(900, 999));
        assert_eq!(parse(b"bytes=-100", 1000), RangeRequest::Single(900, 999));
        assert_eq!(parse(b"bytes=0-5000", 1000), RangeRequest::Single(0, 999));
        assert_eq!(parse(b"bytes=1000-", 1000), RangeRequest::Unsatisfiable);
        assert_eq!(
            parse(b"bytes=0-1,5-9", 10),
            RangeRequest::Multi(vec![(0, 1), (5, 9)])
        );
        assert_eq!(
            parse(b"bytes=0-4,3-9", 10),
            RangeRequest::Single(0, 9),
            "overlaps merge"
        );
        assert_eq!(parse(b"items=0-4", 10), RangeRequest::Ignore);
        assert_eq!(parse(b"bytes=5-2", 10), RangeRequest::Ignore);
        assert_eq!(parse(b"bytes=abc", 10), RangeRequest::Ignore);
        assert_eq!(parse(b"bytes=-0", 10), RangeRequest::Unsatisfiable);
        assert_eq!(content_range(0, 9, 10), "bytes 0-9/10");
        assert_eq!(unsatisfied(10), "bytes */10");
    }

    #[test]
    fn multipart_body() {
        let body = Bytes::from_static(b"0123456789");
        let (b, out) = multipart(
            &body,
            &[(0, 1), (8, 9)],
            Some(&HeaderValue::from_static("text/plain")),
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains(&format!(
            "--{b}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01"
        )));
        assert!(text.contains("Content-Range: bytes 8-9/10\r\n\r\n89"));
        assert!(text.ends_with(&format!("--{b}--\r\n")));
    }

    proptest::proptest! {
        #[test]
        fn parser_is_total_and_in_bounds(v in "\\PC{0,40}", len in 0u64..10_000) {
            match parse(v.as_bytes(), len) {
                RangeRequest::Single(a, b) => proptest::prop_assert!(a <= b && b < len),
                RangeRequest::Multi(rs) => {
                    for (a, b) in rs { proptest::prop_assert!(a <= b && b < len); }
                }
                _ => {}
            }
        }
    }
}
