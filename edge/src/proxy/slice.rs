//! Slice mode's I/O (the decisions and storage are `cache::slice`'s): a GET
//! on a site with `sites.cache.slice_size` is served slice by slice, each
//! fetched with its own `Range` request, coalesced per slice and stored.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::Fetched;
use super::session::Session;
use crate::cache::http::{
    Answered, FlightState, HttpCache, Join, SitePolicy, StoreTarget, downstream_headers,
};
use crate::cache::policy::{self, CacheStatus, FwdReason};
use crate::cache::range::{self, RangeRequest};
use crate::cache::slice::{
    SLICE_SEP, Slice, SliceToStore, TOTAL, cached_slice, content_range, etag, is_slice,
    slice_bounds, slice_key,
};
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::{RequestBody, ResponseBody};

enum Got {
    Slice(Slice),
    /// The origin did not answer with a range: the normal path takes it.
    Whole(Fetched),
    Unsatisfiable,
}

/// What every slice of one request shares.
struct Sliced<'a> {
    cache: &'a Arc<HttpCache>,
    sp: &'a SitePolicy,
    key: &'a str,
}

/// Slice `i` of the object: from the cache, or fetched with a Range request
/// (coalesced per slice) and stored.
async fn get_slice(s: &mut Session, o: &Sliced<'_>, i: u64) -> Result<Got, ProxyError> {
    let (cache, sp, key) = (o.cache, o.sp, o.key);
    let skey = slice_key(key, i);
    let req = s.up.parts.headers.clone();
    if let Some(sl) = cached_slice(cache, sp, &skey, &req, SystemTime::now()).await {
        return Ok(Got::Slice(sl));
    }
    let guard = match cache.join(&skey) {
        Join::Leader(g) => g,
        Join::Follower(mut rx) => {
            let _ = tokio::time::timeout(sp.lock_timeout, async move {
                rx.wait_for(|f| *f != FlightState::Running).await.is_ok()
            })
            .await;
            if let Some(sl) = cached_slice(cache, sp, &skey, &req, SystemTime::now()).await {
                return Ok(Got::Slice(sl));
            }
            match cache.join(&skey) {
                Join::Leader(g) => g,
                Join::Follower(_) => {
                    return Err(ProxyError::upstream(ErrorKind::HeaderTimeout, "slice lock"));
                }
            }
        }
    };
    let size = sp.slice_size;
    let mut slice_up = s.up.clone();
    crate::cache::http::whole_representation(&mut slice_up.parts.headers, false);
    let (first_byte, last_byte) = slice_bounds(i, size);
    let range = format!("bytes={first_byte}-{last_byte}");
    if let Ok(v) = HeaderValue::from_str(&range) {
        slice_up.parts.headers.insert(header::RANGE, v);
    }
    let request_time = SystemTime::now();
    let fetched = s.fetch(&slice_up, RequestBody::empty()).await?;
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
    if !is_slice(a, b, i, size) {
        return Err(ProxyError::upstream(
            ErrorKind::UpstreamProtocol,
            "slice range mismatch",
        ));
    }
    let resp = s.finish(fetched).await?;
    let (parts, body) = resp.into_parts();
    let bytes = http_body_util::Limited::new(
        body,
        usize::try_from(size)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
    )
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
    crate::cache::slice::store(
        cache,
        sp,
        SliceToStore {
            key: &skey,
            method: &slice_up.parts.method,
            request: &req,
            headers: &headers,
            bytes: &bytes,
            request_time,
            response_time,
        },
    )
    .await;
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
pub(super) async fn serve(
    s: &mut Session,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    key: &str,
) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    let o = Sliced { cache, sp, key };
    let size = sp.slice_size;
    // A whole object is stored (its origin ignored ranges): the normal path serves it.
    if matches!(cache.storage.get(key).await, Ok(Some(_))) {
        return Ok(None);
    }
    let client = s.up.parts.headers.clone();
    // The first byte wanted decides the first slice to fetch.
    let start = client
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, _)| a.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let first = start / size;
    let head = match get_slice(s, &o, first).await? {
        Got::Slice(sl) => sl,
        Got::Unsatisfiable => return Ok(None),
        Got::Whole(fetched) => {
            // The origin does not do ranges: the whole response, through the normal store path.
            let now = SystemTime::now();
            let cs = CacheStatus::forward("meridian", FwdReason::UriMiss)
                .fwd_status(fetched.resp.status())
                .detail("no-ranges");
            let resp = s.finish(fetched).await?;
            let target = StoreTarget {
                key: key.to_string(),
                variant: None,
                request_time: now,
                response_time: now,
                guard: None,
                cs,
            };
            let req = Answered {
                method: &s.up.parts.method,
                origin: &s.up.parts.headers,
                client: &client,
            };
            return Ok(Some(cache.store_and_respond(sp, req, target, resp)));
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
    let (cache, sp) = (cache.clone(), sp.clone());
    let mut sub = s.subrequest(s.up.clone());
    let key = key.to_string();
    let want_etag = etag(&head.headers).cloned();
    tokio::spawn(async move {
        if total == 0 {
            return;
        }
        let o = Sliced {
            cache: &cache,
            sp: &sp,
            key: &key,
        };
        for i in (a / size)..=(b / size) {
            let sl = if i == first {
                Slice {
                    bytes: head.bytes.clone(),
                    total,
                    headers: HeaderMap::new(),
                    hit: true,
                }
            } else {
                match get_slice(&mut sub, &o, i).await {
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
            let from = a.max(i * size) - i * size;
            let to = (b + 1).min((i * size).saturating_add(sl.bytes.len() as u64)) - i * size;
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
