//! Stored metadata and HTTP: headers to and from [`ObjectMeta`], the
//! stored response as the policy judges it, soft purges and freshening.

use std::time::SystemTime;

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::policy::{self, StoredResponse};
use super::storage::{ObjectMeta, Storage};
use crate::config::SetCookie;

/// Stored header marking a soft purge: the object's age (seconds) at the purge.
pub const SOFT_PURGE: &str = "meridian-soft-purge";
pub fn headers_of(meta: &ObjectMeta) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(meta.headers.len());
    for (n, v) in &meta.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(n, v);
        }
    }
    h
}

pub fn meta_headers(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub fn stored_response(meta: &ObjectMeta) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK),
        headers: headers_of(meta),
        request_time: meta.request_time,
        response_time: meta.response_time,
    }
}

/// The response as the policy should judge it: a soft-purged object has been
/// stale since its purge, with its stale windows and revalidation rules kept.
pub fn for_policy(mut stored: StoredResponse) -> StoredResponse {
    let Some(age) = stored.headers.remove(SOFT_PURGE) else {
        return stored;
    };
    let age = age
        .to_str()
        .ok()
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(0);
    let d = policy::effective_response_directives(&stored.headers).directives;
    let mut cc = format!("max-age={age}");
    if let Some(s) = d.stale_while_revalidate {
        cc.push_str(&format!(", stale-while-revalidate={s}"));
    }
    if let Some(s) = d.stale_if_error {
        cc.push_str(&format!(", stale-if-error={s}"));
    }
    if d.must_revalidate {
        cc.push_str(", must-revalidate");
    }
    if d.proxy_revalidate || d.s_maxage.is_some() {
        cc.push_str(", proxy-revalidate");
    }
    if let Ok(v) = HeaderValue::from_str(&cc) {
        stored.headers.insert(policy::MERIDIAN_CACHE_CONTROL, v);
    }
    stored
}

/// A stored object freshened by a 304 (RFC 9111 §4.3.4): the merged
/// response, and the metadata to store. A soft purge ends here. A 304's
/// `Set-Cookie` is stored only where a 200's would be.
pub fn freshened(
    meta: &ObjectMeta,
    not_modified: &HeaderMap,
    set_cookie: SetCookie,
    request_time: SystemTime,
    response_time: SystemTime,
) -> (StoredResponse, ObjectMeta) {
    let mut fresh = stored_response(meta);
    fresh.headers.remove(SOFT_PURGE);
    let mut update = not_modified.clone();
    if set_cookie != SetCookie::Store {
        update.remove(header::SET_COOKIE);
    }
    policy::freshen_stored_response(&mut fresh, &update, request_time, response_time);
    let mut meta = meta.clone();
    meta.headers = meta_headers(&fresh.headers);
    meta.request_time = request_time;
    meta.response_time = response_time;
    (fresh, meta)
}

/// Marks `key` soft-purged: stale from now, its stale windows and
/// revalidation rules kept.
pub async fn soft_purge(storage: &Storage, key: &str, now: SystemTime) -> bool {
    let Ok(Some(hit)) = storage.get(key).await else {
        return false;
    };
    if hit.meta.status == 0 {
        return false;
    }
    let stored = stored_response(&hit.meta);
    let age = policy::current_age(&stored, now).as_secs();
    let mut meta = hit.meta;
    meta.headers.retain(|(n, _)| n != SOFT_PURGE);
    meta.headers
        .push((SOFT_PURGE.to_string(), age.to_string().into_bytes()));
    storage.update_meta(key, meta).await.unwrap_or(false)
}
