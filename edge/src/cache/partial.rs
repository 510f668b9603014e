//! Partial content (RFC 9111 §3.3 and §3.4): a 206 from the origin is
//! stored, combined with the stored part of the same representation, and
//! ranges inside what is stored are served from it.
//!
//! - A URL has at most one stored part: a contiguous run of bytes of one
//!   representation, kept under its own key (the URL's key and
//!   [`PART_SEP`](super::keys::PART_SEP)), so a part is never taken for the whole object.
//! - A new 206 combines with the stored part when both carry the same strong
//!   `ETag` and the same complete length, and their ranges touch or overlap;
//!   the most recent response's header fields are kept (§3.4). Otherwise the
//!   new part replaces the old one.
//! - When the combination covers the whole representation, it is stored as
//!   the URL's complete 200 response, and the part is removed.
//! - Only parts of at most `cache.background_fill_max` bytes are kept (the
//!   bytes are held in memory while they stream to the client), only with a
//!   strong validator, a single `Content-Range` with a known complete length,
//!   no `Vary`, and only when the response would be storable as a 200.
//! - A stale part is not revalidated: a range it cannot serve fresh goes to
//!   the origin, and the answer replaces or extends the part.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::http::HttpCache;
use super::keys::part_key;
use super::machine::worth_storing;
use super::meta::{headers_of, meta_headers};
use super::policy::{self, CacheStatus, StoredResponse};
use super::range::{self, RangeRequest};
use super::site::{CACHE_NAME, SitePolicy, downstream_headers};
use super::storage::{HitBody, ObjectMeta, Tier};
use crate::config::SetCookie;
use crate::http::body::ResponseBody;

/// Bytes `first..=last` of a representation of `total` bytes.
#[derive(Clone, Debug)]
struct Part {
    first: u64,
    total: u64,
    bytes: Bytes,
    /// The response's header fields, without `Content-Range` and `Content-Length`.
    headers: HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    tier: Option<Tier>,
}

impl Part {
    fn last(&self) -> u64 {
        self.first + self.bytes.len() as u64 - 1
    }

    fn stored(&self) -> StoredResponse {
        StoredResponse {
            // Judged as the representation's own response would be.
            status: StatusCode::OK,
            headers: self.headers.clone(),
            request_time: self.request_time,
            response_time: self.response_time,
        }
    }

    fn etag(&self) -> Option<&HeaderValue> {
        strong_etag(&self.headers)
    }
}

fn strong_etag(h: &HeaderMap) -> Option<&HeaderValue> {
    h.get(header::ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/"))
}

/// The URL's stored part, fresh or not.
async fn load(cache: &HttpCache, key: &str) -> Option<Part> {
    let pkey = part_key(key);
    let hit = cache.storage.get(&pkey).await.ok()??;
    let mut headers = headers_of(&hit.meta);
    let (first, last, total) = super::slice::content_range(&headers)?;
    let bytes = match hit.body {
        HitBody::Whole(b) => b,
        HitBody::Chunked {
            chunks, generation, ..
        } => {
            let mut out = BytesMut::with_capacity(usize::try_from(hit.meta.body_len).ok()?);
            for i in 0..chunks {
                match cache.storage.get_chunk(&pkey, generation, i).await {
                    Ok(Some(c)) => out.extend_from_slice(&c),
                    _ => {
                        let _ = cache.storage.remove_version(&pkey, generation).await;
                        return None;
                    }
                }
            }
            out.freeze()
        }
    };
    if last < first || bytes.len() as u64 != last - first + 1 || last >= total {
        return None;
    }
    headers.remove(header::CONTENT_RANGE);
    headers.remove(header::CONTENT_LENGTH);
    Some(Part {
        first,
        total,
        bytes,
        headers,
        request_time: hit.meta.request_time,
        response_time: hit.meta.response_time,
        tier: Some(hit.tier),
    })
}

/// Answers a single-range GET from the URL's stored part, when the part is
/// fresh and holds every byte asked for. `None` sends the request on.
pub(crate) async fn serve(
    cache: &HttpCache,
    sp: &SitePolicy,
    key: &str,
    method: &Method,
    req: &HeaderMap,
) -> Option<Response<ResponseBody>> {
    if *method != Method::GET {
        return None;
    }
    let r = req.get(header::RANGE)?;
    // Conditional requests other than If-Range go on to the normal path.
    if [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
    ]
    .iter()
    .any(|h| req.contains_key(h))
    {
        return None;
    }
    let part = load(cache, key).await?;
    let stored = part.stored();
    let now = SystemTime::now();
    if !policy::if_range_matches(req, &stored) {
        return None;
    }
    let policy::Lookup::Fresh { ttl_left, .. } = policy::lookup(&stored, req, now, &sp.policy)
    else {
        return None;
    };
    let RangeRequest::Single(a, b) = range::parse(r.as_bytes(), part.total) else {
        return None;
    };
    if a < part.first || b > part.last() {
        return None;
    }
    cache.count("hit-partial");
    let mut headers = part.headers.clone();
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::AGE, policy::age_header_value(&stored, now));
    headers.insert(
        header::CONTENT_RANGE,
        range::content_range(a, b, part.total),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b + 1 - a));
    downstream_headers(&mut headers, sp);
    if sp.cache_status {
        CacheStatus::hit(CACHE_NAME)
            .ttl(ttl_left.as_secs() as i64)
            .detail("partial")
            .append_to(&mut headers);
    }
    if let Some(tier) = part.tier {
        cache.count_bytes(tier.label(), b + 1 - a);
    }
    let start = usize::try_from(a - part.first).ok()?;
    let end = usize::try_from(b + 1 - part.first).ok()?;
    let mut resp = Response::new(ResponseBody::full(part.bytes.slice(start..end)));
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers;
    Some(resp)
}

/// What a 206 from the origin needs to be kept as a part.
struct Plan {
    first: u64,
    len: u64,
    total: u64,
    headers: HeaderMap,
}

/// Whether this 206 may be kept (see the module's rules).
fn plan(
    h: &HeaderMap,
    req_method: &Method,
    req: &HeaderMap,
    sp: &SitePolicy,
    max: u64,
    response_time: SystemTime,
) -> Option<Plan> {
    strong_etag(h)?;
    if h.contains_key(header::VARY) {
        return None;
    }
    if h.contains_key(header::SET_COOKIE) && sp.set_cookie == SetCookie::Pass {
        return None;
    }
    let (first, last, total) = super::slice::content_range(h)?;
    if last < first || last >= total {
        return None;
    }
    let len = last - first + 1;
    if len > max {
        return None;
    }
    let mut headers = h.clone();
    headers.remove(header::CONTENT_RANGE);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    if sp.set_cookie != SetCookie::Store {
        headers.remove(header::SET_COOKIE);
    }
    policy::prepare_headers_for_storage(&mut headers);
    let storable = policy::storability(req_method, req, StatusCode::OK, &headers).is_storable()
        && worth_storing(StatusCode::OK, &headers, response_time, sp);
    storable.then_some(Plan {
        first,
        len,
        total,
        headers,
    })
}

/// Passes a 206 from the origin to the client and, if it may be kept,
/// stores it behind the client (combined with the stored part) once every
/// byte has arrived. The bytes are read at the origin's pace into a small
/// channel for the client; a client that goes away does not stop the part,
/// which is small.
pub(crate) fn store_behind(
    cache: &Arc<HttpCache>,
    sp: &SitePolicy,
    key: &str,
    req_method: &Method,
    req: &HeaderMap,
    (request_time, response_time): (SystemTime, SystemTime),
    resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let Some(plan) = plan(
        resp.headers(),
        req_method,
        req,
        sp,
        sp.background_fill_max,
        response_time,
    ) else {
        return resp;
    };
    let (parts, mut body) = resp.into_parts();
    let (tx, rx) = mpsc::channel(4);
    let cache = cache.clone();
    let key = key.to_string();
    let max = sp.background_fill_max;
    tokio::spawn(async move {
        let Ok(cap) = usize::try_from(plan.len) else {
            return;
        };
        let mut buf = BytesMut::with_capacity(cap);
        let mut client = Some(tx);
        let mut complete = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    let Ok(data) = f.into_data() else { continue };
                    if buf.len() + data.len() > cap {
                        complete = false;
                    } else if complete {
                        buf.extend_from_slice(&data);
                    }
                    if let Some(tx) = &client
                        && tx.send(Ok(data)).await.is_err()
                    {
                        client = None; // read on: the part is small
                    }
                }
                Err(e) => {
                    complete = false;
                    if let Some(tx) = client.take() {
                        let _ = tx.send(Err(e.into())).await;
                    }
                    break;
                }
            }
        }
        drop(client);
        if !complete || buf.len() != cap {
            cache.count("partial-not-stored");
            return;
        }
        let part = Part {
            first: plan.first,
            total: plan.total,
            bytes: buf.freeze(),
            headers: plan.headers,
            request_time,
            response_time,
            tier: None,
        };
        store(&cache, &key, part, max).await;
    });
    Response::from_parts(parts, ResponseBody::channel(rx, Some(plan.len)))
}

/// Stores `new`, combined with the stored part when they are parts of one
/// representation and touch; a combination that covers the representation
/// becomes the URL's complete response.
async fn store(cache: &HttpCache, key: &str, new: Part, max: u64) {
    let combined = match load(cache, key).await {
        Some(old) => combine(old, new.clone(), max).unwrap_or(new),
        None => new,
    };
    let tags = policy::surrogate_keys(&combined.headers, policy::SurrogateKeyLimits::default());
    let pkey = part_key(key);
    if combined.first == 0 && combined.bytes.len() as u64 == combined.total {
        let mut headers = combined.headers.clone();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(combined.total));
        let meta = ObjectMeta {
            status: 200,
            headers: meta_headers(&headers),
            request_time: combined.request_time,
            response_time: combined.response_time,
            tags,
            body_len: combined.total,
        };
        let mut w = cache.storage.writer(key);
        match w.write(combined.bytes).await {
            Ok(()) => match w.finish(meta).await {
                Ok(()) => {
                    cache.count("partial-complete");
                    let _ = cache.storage.remove_lazy([pkey]).await;
                }
                Err(e) => tracing::debug!(error = %e, "combined response not stored"),
            },
            Err(e) => tracing::debug!(error = %e, "combined response not stored"),
        }
        return;
    }
    let mut headers = combined.headers.clone();
    headers.insert(
        header::CONTENT_RANGE,
        range::content_range(combined.first, combined.last(), combined.total),
    );
    let meta = ObjectMeta {
        status: 206,
        headers: meta_headers(&headers),
        request_time: combined.request_time,
        response_time: combined.response_time,
        tags,
        body_len: combined.bytes.len() as u64,
    };
    let mut w = cache.storage.writer(&pkey);
    let stored = match w.write(combined.bytes).await {
        Ok(()) => w.finish(meta).await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(()) => cache.count("partial-stored"),
        Err(e) => tracing::debug!(error = %e, "partial response not stored"),
    }
}

/// `old` and `new` as one part: same strong validator and complete length,
/// ranges that touch or overlap, at most `max` bytes. The newer response's
/// bytes and header fields win.
fn combine(old: Part, new: Part, max: u64) -> Option<Part> {
    let (a, b) = (old.etag()?, new.etag()?);
    if a != b || old.total != new.total {
        return None;
    }
    if new.first > old.last() + 1 || old.first > new.last() + 1 {
        return None;
    }
    let first = old.first.min(new.first);
    let last = old.last().max(new.last());
    if last - first + 1 > max {
        return None;
    }
    let mut buf = BytesMut::with_capacity(usize::try_from(last - first + 1).ok()?);
    if old.first < new.first {
        buf.extend_from_slice(&old.bytes[..usize::try_from(new.first - old.first).ok()?]);
    }
    buf.extend_from_slice(&new.bytes);
    if old.last() > new.last() {
        let from = usize::try_from(new.last() + 1 - old.first).ok()?;
        buf.extend_from_slice(&old.bytes[from..]);
    }
    Some(Part {
        first,
        bytes: buf.freeze(),
        ..new
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(first: u64, bytes: &'static [u8], etag: &str) -> Part {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_str(etag).expect("etag"));
        Part {
            first,
            total: 10,
            bytes: Bytes::from_static(bytes),
            headers,
            request_time: SystemTime::UNIX_EPOCH,
            response_time: SystemTime::UNIX_EPOCH,
            tier: None,
        }
    }

    #[test]
    fn combines_touching_and_overlapping_parts_of_one_representation() {
        let c =
            combine(part(0, b"0123", "\"a\""), part(4, b"456", "\"a\""), 100).expect("combined");
        assert_eq!((c.first, &c.bytes[..]), (0, &b"0123456"[..]));
        // The newer bytes win where the parts overlap.
        let c =
            combine(part(2, b"23456", "\"a\""), part(0, b"xyz", "\"a\""), 100).expect("combined");
        assert_eq!((c.first, &c.bytes[..]), (0, &b"xyz3456"[..]));
        // A new part inside the old one.
        let c = combine(
            part(0, b"0123456789", "\"a\""),
            part(3, b"ab", "\"a\""),
            100,
        )
        .expect("combined");
        assert_eq!(&c.bytes[..], b"012ab56789");
    }

    #[test]
    fn refuses_other_representations_gaps_weak_validators_and_size() {
        assert!(combine(part(0, b"0123", "\"a\""), part(4, b"456", "\"b\""), 100).is_none());
        assert!(combine(part(0, b"0123", "\"a\""), part(5, b"56", "\"a\""), 100).is_none());
        assert!(combine(part(0, b"0123", "W/\"a\""), part(4, b"456", "W/\"a\""), 100).is_none());
        assert!(combine(part(0, b"0123", "\"a\""), part(4, b"456", "\"a\""), 6).is_none());
    }
}
