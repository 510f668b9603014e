//! Slice mode (like nginx's slice module): with `sites.cache.slice_size`, a
//! GET is served from fixed-size slices of the object, each fetched from the
//! origin with its own `Range` request and cached as its own entry. A player
//! seeking through a large video caches what is watched, not whole files.
//!
//! Slices of one object must agree on their `ETag`; a mismatch means the
//! object changed at the origin, and its slices are dropped. An origin that
//! ignores `Range` (answers 200) is served by the normal cache path.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::http::{
    HttpCache, Join, SitePolicy, downstream_headers, headers_of, meta_headers, worth_storing,
};
use super::policy::{self, CacheStatus, FwdReason};
use super::range::{self, RangeRequest};
use super::storage::{HitBody, ObjectMeta};
use crate::accesslog::LogRecord;
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::{RequestBody, ResponseBody};
use crate::proxy::{Fetched, Proxy, Site, UpstreamRequest};

/// Separates an object's key from a slice number.
pub(crate) const SLICE_SEP: char = '\u{2}';
/// Stored with each slice: the whole object's length.
const TOTAL: &str = "meridian-slice-total";

/// One slice, and what it says about the whole object.
struct Slice {
    bytes: Bytes,
    total: u64,
    headers: HeaderMap,
    hit: bool,
}

enum Got {
    Slice(Slice),
    /// The origin did not answer with a range: the normal path takes it.
    Whole(Fetched),
    Unsatisfiable,
}

fn slice_key(key: &str, i: u64) -> String {
    format!("{key}{SLICE_SEP}{i}")
}

/// The bytes slice `i` covers, `[i*s, i*s + s - 1]`, its end capped at
/// `u64::MAX` (a client may ask for the last bytes of a 2^64-byte object).
/// `i*s` itself is never past a byte a client asked for.
fn slice_bounds(i: u64, s: u64) -> (u64, u64) {
    let a = i * s;
    (a, a.saturating_add(s - 1))
}

/// Whether an origin's `Content-Range: bytes a-b/…` is slice `i` (the last
/// slice may be shorter).
fn is_slice(a: u64, b: u64, i: u64, s: u64) -> bool {
    a == i * s && b >= a && b - a < s
}

fn etag(h: &HeaderMap) -> Option<&HeaderValue> {
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
async fn cached_slice(
    cache: &HttpCache,
    sp: &SitePolicy,
    key: &str,
    req: &HeaderMap,
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
        policy::lookup(&stored, req, SystemTime::now(), &sp.policy),
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

/// Slice `i` of the object: from the cache, or fetched with a Range request
/// (coalesced per slice) and stored.
#[allow(clippy::too_many_arguments)]
async fn get_slice(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &SitePolicy,
    site: &Site,
    up: &UpstreamRequest,
    key: &str,
    i: u64,
    rec: &mut LogRecord,
) -> Result<Got, ProxyError> {
    let skey = slice_key(key, i);
    let req = &up.parts.headers;
    if let Some(s) = cached_slice(cache, sp, &skey, req).await {
        return Ok(Got::Slice(s));
    }
    let guard =
        match cache.join(&skey) {
            Join::Leader(g) => g,
            Join::Follower(mut rx) => {
                let _ = tokio::time::timeout(sp.lock_timeout, async move {
                    rx.wait_for(|d| *d).await.is_ok()
                })
                .await;
                if let Some(s) = cached_slice(cache, sp, &skey, req).await {
                    return Ok(Got::Slice(s));
                }
                match cache.join(&skey) {
                    Join::Leader(g) => g,
                    Join::Follower(_) => {
                        return Err(ProxyError::upstream(ErrorKind::HeaderTimeout, "slice lock"));
                    }
                }
            }
        };
    let s = sp.slice_size;
    let mut slice_up = up.clone();
    super::http::whole_representation(&mut slice_up.parts.headers, false);
    let (first_byte, last_byte) = slice_bounds(i, s);
    let range = format!("bytes={first_byte}-{last_byte}");
    if let Ok(v) = HeaderValue::from_str(&range) {
        slice_up.parts.headers.insert(header::RANGE, v);
    }
    let request_time = SystemTime::now();
    let fetched = proxy
        .fetch(
            &site.pool,
            &slice_up,
            RequestBody::empty(),
            &AtomicBool::new(false),
            rec,
        )
        .await?;
    let response_time = SystemTime::now();
    match fetched.resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::RANGE_NOT_SATISFIABLE => return Ok(Got::Unsatisfiable),
        _ => return Ok(Got::Whole(fetched)),
    }
    let Some((a, b, total)) = content_range(fetched.resp.headers()) else {
        return Err(ProxyError::upstream(
            ErrorKind::UpstreamProtocol,
            "slice without Content-Range",
        ));
    };
    if !is_slice(a, b, i, s) {
        return Err(ProxyError::upstream(
            ErrorKind::UpstreamProtocol,
            "slice range mismatch",
        ));
    }
    let resp = proxy
        .finish_response(fetched, &site.pool, false, None)
        .await?;
    let (parts, body) = resp.into_parts();
    let bytes = http_body_util::Limited::new(body, s as usize + 1)
        .collect()
        .await
        .map_err(|e| ProxyError::upstream(ErrorKind::UpstreamProtocol, "slice body").with_cause(e))?
        .to_bytes();
    if bytes.len() as u64 != b - a + 1 {
        return Err(ProxyError::upstream(
            ErrorKind::UpstreamProtocol,
            "short slice",
        ));
    }
    let mut headers = parts.headers;
    headers.remove(header::CONTENT_RANGE);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(TOTAL, HeaderValue::from(total));
    policy::prepare_headers_for_storage(&mut headers);
    // A slice is stored as the representation's own response would be.
    let storable = policy::storability(&slice_up.parts.method, req, StatusCode::OK, &headers)
        .is_storable()
        && worth_storing(StatusCode::OK, &headers, response_time, sp);
    if storable {
        let mut w = cache.storage.writer(&skey);
        let meta = ObjectMeta {
            status: 200,
            headers: meta_headers(&headers),
            request_time,
            response_time,
            tags: policy::surrogate_keys(&headers, policy::SurrogateKeyLimits::default()),
            body_len: bytes.len() as u64,
        };
        if w.write(bytes.clone()).await.is_ok()
            && let Err(e) = w.finish(meta).await
        {
            tracing::debug!(error = %e, "slice not stored");
        }
    }
    drop(guard);
    Ok(Got::Slice(Slice {
        bytes,
        total,
        headers,
        hit: false,
    }))
}

/// Serves a GET in slice mode. `None` hands the request to the normal path
/// (a whole object is stored already, or the client's Range is not one the
/// slices serve).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    site: &Site,
    up: &UpstreamRequest,
    rec: &mut LogRecord,
    key: &str,
) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    let s = sp.slice_size;
    // A whole object is stored (its origin ignored ranges): the normal path serves it.
    if matches!(cache.storage.get(key).await, Ok(Some(_))) {
        return Ok(None);
    }
    let client = up.parts.headers.clone();
    // The first byte wanted decides the first slice to fetch.
    let start = client
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, _)| a.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let first = start / s;
    let head = match get_slice(proxy, cache, sp, site, up, key, first, rec).await? {
        Got::Slice(sl) => sl,
        Got::Unsatisfiable => return Ok(None),
        Got::Whole(fetched) => {
            // The origin does not do ranges: the whole response, through the normal store path.
            let now = SystemTime::now();
            let cs = CacheStatus::forward("meridian", FwdReason::UriMiss)
                .fwd_status(fetched.resp.status())
                .detail("no-ranges");
            return super::http::store_and_respond(
                proxy,
                cache,
                sp,
                site,
                up,
                &client,
                key.to_string(),
                None,
                fetched,
                now,
                now,
                None,
                cs,
            )
            .await
            .map(Some);
        }
    };
    let total = head.total;
    let (status, a, b) = match client.get(header::RANGE) {
        Some(r)
            if policy::if_range_matches(
                &client,
                &policy::StoredResponse {
                    status: StatusCode::OK,
                    headers: head.headers.clone(),
                    request_time: SystemTime::now(),
                    response_time: SystemTime::now(),
                },
            ) =>
        {
            match range::parse(r.as_bytes(), total) {
                RangeRequest::Single(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
                RangeRequest::Unsatisfiable => {
                    let mut resp = Response::new(ResponseBody::empty());
                    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    resp.headers_mut()
                        .insert(header::CONTENT_RANGE, range::unsatisfied(total));
                    return Ok(Some(resp));
                }
                _ => (StatusCode::OK, 0, total.saturating_sub(1)),
            }
        }
        _ => (StatusCode::OK, 0, total.saturating_sub(1)),
    };
    let mut headers = head.headers.clone();
    headers.remove(TOTAL);
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(if total == 0 { 0 } else { b - a + 1 }),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(header::CONTENT_RANGE, range::content_range(a, b, total));
    }
    downstream_headers(&mut headers, sp);
    if sp.cache_status {
        let cs = if head.hit {
            CacheStatus::hit("meridian").detail("slice")
        } else {
            CacheStatus::forward("meridian", FwdReason::UriMiss)
                .stored()
                .detail("slice")
        };
        cs.append_to(&mut headers);
    }
    // The bytes [a, b], slice by slice, fetching what is missing as it goes.
    let (tx, rx) = mpsc::channel::<Result<Bytes, crate::error::BoxError>>(2);
    let (proxy, cache, sp) = (proxy.clone(), cache.clone(), sp.clone());
    let site = super::http::detached(site);
    let up = up.clone();
    let key = key.to_string();
    let want_etag = etag(&head.headers).cloned();
    tokio::spawn(async move {
        if total == 0 {
            return;
        }
        let mut rec = LogRecord::background();
        for i in (a / s)..=(b / s) {
            let sl = if i == first {
                Slice {
                    bytes: head.bytes.clone(),
                    total,
                    headers: HeaderMap::new(),
                    hit: true,
                }
            } else {
                match get_slice(&proxy, &cache, &sp, &site, &up, &key, i, &mut rec).await {
                    Ok(Got::Slice(sl))
                        if etag(&sl.headers) == want_etag.as_ref() && sl.total == total =>
                    {
                        sl
                    }
                    Ok(Got::Slice(_)) => {
                        // The object changed at the origin: drop its slices; the next request starts over.
                        for k in cache
                            .storage
                            .index()
                            .keys_with_prefix(&format!("{key}{SLICE_SEP}"))
                        {
                            let _ = cache.storage.remove(&k).await;
                        }
                        let _ = tx
                            .send(Err(
                                "slices disagree (ETag or length changed at the origin)".into(),
                            ))
                            .await;
                        return;
                    }
                    Ok(_) => {
                        let _ = tx
                            .send(Err("the origin stopped answering ranges".into()))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                }
            };
            let from = a.max(i * s) - i * s;
            let to = (b + 1).min((i * s).saturating_add(sl.bytes.len() as u64)) - i * s;
            if from < to
                && tx
                    .send(Ok(sl.bytes.slice(from as usize..to as usize)))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    let mut resp = Response::new(ResponseBody::channel(
        rx,
        Some(if total == 0 { 0 } else { b - a + 1 }),
    ));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(Some(resp))
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
