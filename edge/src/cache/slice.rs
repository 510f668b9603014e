//! Slice mode (like nginx's slice module): with `sites.cache.slice_size`, a
//! GET is served from fixed-size slices of the object, each fetched from the
//! origin with its own `Range` request and cached as its own entry. A player
//! seeking through a large video caches what is watched, not whole files.
//!
//! Slices of one object must agree on their `ETag`; a mismatch means the
//! object changed at the origin, and its slices are dropped. An origin that
//! ignores `Range` (answers 200) is served by the normal cache path.

use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

use super::http::HttpCache;
pub(crate) use super::keys::{SLICE_SEP, slice_key};
use super::meta::{headers_of, meta_headers};
use super::policy;
use super::site::SitePolicy;
use super::storage::{HitBody, ObjectMeta};

/// Stored with each slice: the whole object's length.
pub(crate) const TOTAL: &str = "meridian-slice-total";

/// One slice, and what it says about the whole object.
pub(crate) struct Slice {
    pub bytes: Bytes,
    pub total: u64,
    pub headers: HeaderMap,
    pub hit: bool,
}

/// The bytes slice `i` covers, `[i*s, i*s + s - 1]`, its end capped at
/// `u64::MAX` (a client may ask for the last bytes of a 2^64-byte object).
/// `i*s` itself is never past a byte a client asked for.
pub(crate) fn slice_bounds(i: u64, s: u64) -> (u64, u64) {
    let a = i * s;
    (a, a.saturating_add(s - 1))
}

/// Whether an origin's `Content-Range: bytes a-b/…` is slice `i` (the last
/// slice may be shorter).
pub(crate) fn is_slice(a: u64, b: u64, i: u64, s: u64) -> bool {
    a == i * s && b >= a && b - a < s
}

pub(crate) fn etag(h: &HeaderMap) -> Option<&HeaderValue> {
    h.get(header::ETAG)
}

/// Parses `bytes a-b/total`. Public for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn content_range(h: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = h
        .get(header::CONTENT_RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

/// A stored slice, if fresh.
pub(crate) async fn cached_slice(
    cache: &HttpCache,
    sp: &SitePolicy,
    key: &str,
    req: &HeaderMap,
    now: SystemTime,
) -> Option<Slice> {
    let hit = cache.storage.get(key).await.ok()??;
    let headers = headers_of(&hit.meta);
    let total = headers.get(TOTAL)?.to_str().ok()?.parse().ok()?;
    let stored = policy::StoredResponse {
        status: StatusCode::OK,
        headers: headers.clone(),
        request_time: hit.meta.request_time,
        response_time: hit.meta.response_time,
    };
    if !matches!(
        policy::lookup(&stored, req, now, &sp.policy),
        policy::Lookup::Fresh { .. }
    ) {
        return None;
    }
    let bytes = match hit.body {
        HitBody::Whole(b) => b,
        HitBody::Chunked {
            chunks, generation, ..
        } => {
            let mut out = BytesMut::with_capacity(hit.meta.body_len as usize);
            for i in 0..chunks {
                out.extend_from_slice(&cache.storage.get_chunk(key, generation, i).await.ok()??);
            }
            out.freeze()
        }
    };
    Some(Slice {
        bytes,
        total,
        headers,
        hit: true,
    })
}

/// A fetched slice, stored as the representation's own response would be:
/// if its method, request and headers allow it.
pub(crate) struct SliceToStore<'a> {
    pub key: &'a str,
    pub method: &'a http::Method,
    pub request: &'a HeaderMap,
    pub headers: &'a HeaderMap,
    pub bytes: &'a Bytes,
    pub request_time: SystemTime,
    pub response_time: SystemTime,
}

pub(crate) async fn store(cache: &HttpCache, sp: &SitePolicy, s: SliceToStore<'_>) {
    let storable = policy::storability(s.method, s.request, StatusCode::OK, s.headers)
        .is_storable()
        && super::machine::worth_storing(StatusCode::OK, s.headers, s.response_time, sp);
    if !storable {
        return;
    }
    let mut w = cache.storage.writer(s.key);
    let meta = ObjectMeta {
        status: 200,
        headers: meta_headers(s.headers),
        request_time: s.request_time,
        response_time: s.response_time,
        tags: policy::surrogate_keys(s.headers, policy::SurrogateKeyLimits::default()),
        body_len: s.bytes.len() as u64,
    };
    if w.write(s.bytes.clone()).await.is_ok()
        && let Err(e) = w.finish(meta).await
    {
        tracing::debug!(error = %e, "slice not stored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 0-99/1000"),
        );
        assert_eq!(content_range(&h), Some((0, 99, 1000)));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes */1000"),
        );
        assert_eq!(content_range(&h), None);
        assert_eq!(slice_key("k", 3), "k\u{2}3");
    }

    /// Found writing `fuzz/fuzz_targets/slice.rs`: `Range: bytes=18446744073709551615-`
    /// from a client made the slice's end overflow (a panic with overflow
    /// checks, a wrapped Range to the origin without), and an origin's
    /// `Content-Range: bytes 0-18446744073709551615/…` overflowed its length.
    #[test]
    fn slice_arithmetic_at_the_end_of_u64() {
        let s = 100;
        let last = u64::MAX / s;
        assert_eq!(slice_bounds(last, s), (last * s, u64::MAX));
        assert_eq!(slice_bounds(2, s), (200, 299));
        assert!(!is_slice(0, u64::MAX, 0, s));
        assert!(is_slice(0, 99, 0, s));
        assert!(is_slice(100, 149, 1, s));
        assert!(!is_slice(100, 200, 1, s));
        assert!(!is_slice(100, 99, 1, s));
        assert!(is_slice(last * s, u64::MAX, last, s));
    }
}
