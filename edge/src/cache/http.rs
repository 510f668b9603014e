//! The HTTP cache stage of the pipeline: lookup, serving hits (with Age,
//! conditional requests and ranges), revalidation, stale-while-revalidate,
//! stale-if-error, request coalescing with hit-for-pass, storing responses
//! while they stream to the client, invalidation and purge.
//!
//! Every decision about HTTP semantics is the pure [`policy`] module's; this
//! module does the I/O around it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

pub use super::keys::{VARIANT_SEP, keys_of_url, split_variant};
pub use super::machine::FlightState;
pub use super::meta::{for_policy, freshened, headers_of, meta_headers, stored_response};
use super::policy::{self, CacheStatus, ConditionalResult, StoredResponse, UpstreamFailure};
pub use super::purge::{PurgeCounts, PurgeRequest, normalize_prefix};
use super::range::{self, RangeRequest};
pub use super::site::{CACHE_NAME, SitePolicy, downstream_headers};
use super::spool::{Backing, Spool};
use super::storage::{Hit, HitBody, ObjectMeta, ObjectWriter, Storage};
use crate::config::SetCookie;
use crate::http::body::ResponseBody;
use crate::metrics::{CacheResult, KnownCounters, Metrics, Reason};

/// The least memory a fill keeps for its client before it lets go of
/// bytes that storage holds (see [`super::spool`]).
pub(crate) const SPOOL_MEMORY: u64 = 4 << 20;

/// The shared cache: storage plus the in-flight fetches and hit-for-pass memory.
pub struct HttpCache {
    pub storage: Storage,
    /// Background purge jobs (see [`super::purge`]).
    pub purges: super::purge::PurgeJobs,
    flights: Mutex<HashMap<String, watch::Receiver<FlightState>>>,
    pass: Mutex<HashMap<String, Instant>>,
    pub(crate) metrics: Arc<Metrics>,
    /// `meridian_cache_requests_total` by result, resolved once.
    results: KnownCounters<CacheResult>,
    /// `meridian_cache_bytes_total` by tier (and `origin`), resolved once.
    bytes: KnownCounters<Reason>,
}

/// Every result the cache counts; others are counted too, but looked up.
const RESULTS: &[&str] = &[
    "hit",
    "hit-collapsed",
    "hit-partial",
    "miss",
    "miss-head",
    "miss-range",
    "pass",
    "stale",
    "stale-while-revalidate",
    "stale-if-error",
    "stale-replaced",
    "revalidated",
    "revalidated-collapsed",
    "uncacheable",
    "stored",
    "only-if-cached",
    "range-unsatisfiable",
    "background-fill",
    "background-fill-failed",
    "background-revalidation",
    "background-revalidation-failed",
    "fill-abandoned",
    "fill-error",
    "error",
    "partial-stored",
    "partial-not-stored",
    "partial-complete",
];

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("storage", &self.storage)
            .finish()
    }
}

/// The first request for a key fetches; the others wait for it.
pub enum Join {
    Leader(FlightGuard),
    Follower(watch::Receiver<FlightState>),
}

/// Held by the request that fetches a key; dropping it wakes the waiters,
/// and tells them whether the fetch failed.
pub struct FlightGuard {
    cache: Arc<HttpCache>,
    key: String,
    tx: watch::Sender<FlightState>,
    failed: Option<UpstreamFailure>,
}

impl FlightGuard {
    /// The flight's origin request failed so: its waiters learn it when
    /// the guard is dropped, and judge stale-if-error by it.
    pub fn fail(&mut self, failure: UpstreamFailure) {
        self.failed = Some(failure);
    }

    /// How many requests wait for this flight.
    fn waiters(&self) -> usize {
        // The flights map holds one receiver itself.
        self.tx.receiver_count().saturating_sub(1)
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.cache.flights.lock().remove(&self.key);
        let _ = self
            .tx
            .send(self.failed.map_or(FlightState::Done, FlightState::Failed));
    }
}

/// Waits for the flight `rx` follows for at most `timeout`, and says how
/// the wait ended (a leader that went away without a word is done).
pub async fn wait_for_flight(
    mut rx: watch::Receiver<FlightState>,
    timeout: Duration,
) -> super::machine::Waited {
    let state = tokio::time::timeout(timeout, async move {
        rx.wait_for(|f| *f != FlightState::Running)
            .await
            .map_or(FlightState::Done, |f| *f)
    })
    .await
    .ok();
    super::machine::Waited::of(state)
}

/// The most hit-for-pass keys remembered; the oldest are forgotten first.
const MAX_PASS: usize = 100_000;

impl HttpCache {
    pub fn new(storage: Storage, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(HttpCache {
            purges: super::purge::PurgeJobs::new(&storage, metrics.clone()),
            storage,
            flights: Mutex::default(),
            pass: Mutex::default(),
            results: KnownCounters::new(
                &metrics.cache_requests,
                |result| CacheResult { result },
                RESULTS,
            ),
            bytes: KnownCounters::new(
                &metrics.cache_bytes,
                |reason| Reason { reason },
                &["memory", "disk", "origin"],
            ),
            metrics,
        })
    }

    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut f = self.flights.lock();
        if let Some(rx) = f.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(FlightState::Running);
        f.insert(key.to_string(), rx);
        Join::Leader(FlightGuard {
            cache: self.clone(),
            key: key.to_string(),
            tx,
            failed: None,
        })
    }

    pub fn is_pass(&self, key: &str) -> bool {
        let mut p = self.pass.lock();
        match p.get(key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                p.remove(key);
                false
            }
            None => false,
        }
    }

    fn mark_pass(&self, key: &str, for_: Duration) {
        if for_.is_zero() {
            return;
        }
        let mut p = self.pass.lock();
        if p.len() >= MAX_PASS {
            let now = Instant::now();
            p.retain(|_, until| *until > now);
            if p.len() >= MAX_PASS {
                p.clear();
            }
        }
        p.insert(key.to_string(), Instant::now() + for_);
    }

    /// Every stored key of one URL: its own, its Vary variants', its slices',
    /// its stored part's.
    pub fn keys_of_url(&self, key: &str) -> Vec<String> {
        keys_of_url(&self.storage, key)
    }

    /// Accepts a purge (see [`super::purge::PurgeJobs::submit`]); `key_of`
    /// gives an absolute URL's cache key.
    pub async fn submit_purge(
        &self,
        key_of: &(dyn Fn(&str) -> Option<String> + Sync),
        req: &PurgeRequest,
    ) -> Result<Arc<super::purge::Job>, super::purge::PurgeError> {
        let keys = req
            .urls
            .iter()
            .filter_map(|u| key_of(u))
            .flat_map(|k| self.keys_of_url(&k))
            .collect();
        self.purges.submit(req, keys).await
    }

    /// Sets the occupancy gauges from the storage (called before a scrape).
    pub fn update_gauges(&self) {
        let s = self.storage.stats();
        let m = &self.metrics;
        m.cache_occupancy
            .get_or_create(&Reason { reason: "memory" })
            .set(s.memory_used as i64);
        m.cache_capacity
            .get_or_create(&Reason { reason: "memory" })
            .set(s.memory_capacity as i64);
        m.cache_capacity
            .get_or_create(&Reason { reason: "disk" })
            .set(s.disk_capacity as i64);
        m.cache_disk_io_bytes
            .get_or_create(&Reason { reason: "read" })
            .set(s.disk_read_bytes as i64);
        m.cache_disk_io_bytes
            .get_or_create(&Reason { reason: "write" })
            .set(s.disk_write_bytes as i64);
        if let Some(l) = s.disk_read_latency_avg {
            m.cache_disk_read_latency.set(l.as_secs_f64());
        }
        m.cache_entries.set(s.entries as i64);
        m.cache_corrupt.set(s.corrupt_entries as i64);
        crate::metrics::raise_counter(&m.cache_disk_errors, s.disk_errors);
        crate::metrics::raise_counter(&m.cache_disk_writes_skipped, s.disk_writes_skipped);
    }

    /// The cache-stats document of the admin API.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = self.storage.stats();
        serde_json::json!({
            "memory": { "used_bytes": s.memory_used, "capacity": s.memory_capacity, "hits": s.hits_memory },
            "disk": {
                "enabled": self.storage.has_disk(),
                "capacity": s.disk_capacity,
                "block_size": s.disk_block_size,
                "hits": s.hits_disk,
                "read_bytes": s.disk_read_bytes,
                "write_bytes": s.disk_write_bytes,
                "read_ios": s.disk_read_ios,
                "write_ios": s.disk_write_ios,
                "read_latency_avg_ms": s.disk_read_latency_avg.map(|d| d.as_secs_f64() * 1000.0),
                "flush_wait_avg_ms": s.disk_flush_wait_avg.map(|d| d.as_secs_f64() * 1000.0),
                "errors": s.disk_errors,
                "writes_skipped": s.disk_writes_skipped,
                "preallocated": s.disk_preallocated,
                "admitting": s.disk_admitting,
            },
            "entries": s.entries,
            "misses": s.misses,
            "indexed_keys": self.storage.index().len(),
            "objects_written": s.objects_written,
            "writes_aborted": s.writes_aborted,
            "too_large": s.too_large,
            "chunk_misses": s.chunk_misses,
            "corrupt_entries": s.corrupt_entries,
            "in_flight_fetches": self.flights.lock().len(),
            "hit_for_pass_keys": self.pass.lock().len(),
        })
    }

    pub fn count(&self, result: &'static str) {
        self.results.inc(result);
    }

    /// Counts bytes served from a tier (`memory`, `disk`) or read from
    /// origins (`origin`).
    pub fn count_bytes(&self, tier: &'static str, n: u64) {
        self.bytes.inc_by(tier, n);
    }

    /// Finds the stored object for a request: the URL's entry, or through a
    /// Vary index the variant that matches the request's headers.
    pub async fn find(&self, key: &str, req: &HeaderMap) -> Found {
        let head = match self.storage.get(key).await {
            Ok(Some(h)) => h,
            Ok(None) => return Found::Miss { variant: None },
            Err(e) => {
                // The storage counts its disk errors and warns about them at most once per 10 s.
                tracing::debug!(error = %e, "cache read failed; going to the origin");
                self.count("error");
                return Found::Miss { variant: None };
            }
        };
        if head.meta.status != 0 {
            return Found::Hit {
                key: key.to_string(),
                hit: head,
            };
        }
        // A Vary index: its headers hold the Vary field of the variants.
        let vary = headers_of(&head.meta);
        let Some(secondary) = policy::secondary_key(&vary, req) else {
            return Found::Miss { variant: None };
        };
        let vkey = format!("{key}{VARIANT_SEP}{secondary}");
        match self.storage.get(&vkey).await {
            Ok(Some(h)) => Found::Hit { key: vkey, hit: h },
            _ => Found::Miss {
                variant: Some(vkey),
            },
        }
    }

    /// Removes or soft-purges every key that `req` names; the effect is in
    /// place before this returns. `key_of` gives an absolute URL's cache key
    /// (the proxy knows which site's key options apply).
    pub async fn purge(
        &self,
        key_of: &(dyn Fn(&str) -> Option<String> + Sync),
        req: &PurgeRequest,
    ) -> PurgeCounts {
        let mut keys: Vec<String> = Vec::new();
        let mut counts = PurgeCounts {
            soft: req.soft,
            ..PurgeCounts::default()
        };
        let index = self.storage.index();
        for url in &req.urls {
            if let Some(k) = key_of(url) {
                let ks = self.keys_of_url(&k);
                counts.urls += ks.len();
                keys.extend(ks);
            }
        }
        for tag in &req.tags {
            let ks = index.keys_for_tag(tag);
            counts.tags += ks.len();
            keys.extend(ks);
        }
        for prefix in &req.prefixes {
            let p = normalize_prefix(prefix);
            let ks = index.keys_with_prefix(&p);
            counts.prefixes += ks.len();
            keys.extend(ks);
        }
        for host in &req.hosts {
            let ks = index.keys_for_host(&host.to_ascii_lowercase());
            counts.hosts += ks.len();
            keys.extend(ks);
        }
        keys.sort_unstable();
        keys.dedup();
        let now = SystemTime::now();
        for k in keys {
            let done = if req.soft {
                super::meta::soft_purge(&self.storage, &k, now).await
            } else {
                self.storage.remove(&k).await.unwrap_or(false)
            };
            if done {
                counts.purged += 1;
            }
        }
        let kind = if req.soft { "soft" } else { "hard" };
        self.metrics
            .cache_purges
            .get_or_create(&Reason { reason: kind })
            .inc_by(counts.purged as u64);
        counts
    }
}

pub enum Found {
    Hit { key: String, hit: Hit },
    Miss { variant: Option<String> },
}

/// A stored object as a request holds it: its key (the URL's or its Vary
/// variant's), the response as the policy judges it, and its body.
pub struct StoredObject {
    pub key: String,
    pub stored: StoredResponse,
    pub hit: Hit,
}

/// What the cache answers: the client's method and request headers.
#[derive(Clone, Copy)]
pub struct ClientRequest<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

impl HttpCache {
    /// Serves a stored object: 304 for a matching conditional, 206/416 for
    /// a range, else 200; with Age and Cache-Status.
    pub fn serve_hit(
        &self,
        sp: &SitePolicy,
        client: ClientRequest<'_>,
        obj: StoredObject,
        cs: CacheStatus,
        now: SystemTime,
    ) -> Response<ResponseBody> {
        let cache = self;
        let (method, req) = (client.method, client.headers);
        let StoredObject {
            key,
            stored: owned,
            hit,
        } = obj;
        let stored = &owned;
        let key = key.as_str();
        let age = policy::age_header_value(stored, now);
        let finish = |mut resp: Response<ResponseBody>| {
            resp.headers_mut().insert(header::AGE, age.clone());
            downstream_headers(resp.headers_mut(), sp);
            if sp.cache_status {
                cs.append_to(resp.headers_mut());
            }
            resp
        };
        if policy::evaluate_client_conditionals(method, req, stored, now)
            == ConditionalResult::NotModified
        {
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = policy::not_modified_response_headers(&stored.headers);
            return finish(resp);
        }
        let len = hit.meta.body_len;
        let range_applies = *method == Method::GET
            && stored.status == StatusCode::OK
            && req.contains_key(header::RANGE)
            && policy::if_range_matches(req, stored);
        // The stored object is this request's own copy: its head becomes
        // the response's without another copy.
        let StoredResponse {
            mut status,
            mut headers,
            ..
        } = owned;
        headers.remove(header::AGE);
        headers.remove(header::TRANSFER_ENCODING);
        let mut span = (0, len);
        let mut multipart = None;
        if range_applies && let Some(r) = req.get(header::RANGE) {
            match range::parse(r.as_bytes(), len) {
                RangeRequest::Ignore => {}
                RangeRequest::Unsatisfiable => {
                    cache.count("range-unsatisfiable");
                    let mut resp = Response::new(ResponseBody::empty());
                    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    resp.headers_mut()
                        .insert(header::CONTENT_RANGE, range::unsatisfied(len));
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                    return finish(resp);
                }
                RangeRequest::Single(a, b) => {
                    status = StatusCode::PARTIAL_CONTENT;
                    span = (a, b + 1);
                    headers.insert(header::CONTENT_RANGE, range::content_range(a, b, len));
                }
                RangeRequest::Multi(ranges) => {
                    if let HitBody::Whole(body) = &hit.body {
                        let ctype = headers.get(header::CONTENT_TYPE).cloned();
                        let (boundary, body) = range::multipart(body, &ranges, ctype.as_ref());
                        status = StatusCode::PARTIAL_CONTENT;
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            "multipart/byteranges; boundary={boundary}"
                        )) {
                            headers.insert(header::CONTENT_TYPE, v);
                        }
                        multipart = Some(body);
                    }
                    // A chunked object answers a multi-range request in full.
                }
            }
        }
        let body = match (multipart, &hit.body) {
            (Some(m), _) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(m.len()));
                ResponseBody::full(m)
            }
            (None, HitBody::Whole(b)) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(span.1 - span.0));
                let start = usize::try_from(span.0).unwrap_or(usize::MAX).min(b.len());
                let end = usize::try_from(span.1).unwrap_or(usize::MAX).min(b.len());
                ResponseBody::full(b.slice(start..end))
            }
            (
                None,
                HitBody::Chunked {
                    chunk_size,
                    chunks,
                    generation,
                },
            ) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(span.1 - span.0));
                let (tx, rx) = mpsc::channel(2);
                spawn_chunk_reader(
                    cache.storage.clone(),
                    key.to_string(),
                    *generation,
                    u64::from(*chunk_size),
                    *chunks,
                    span,
                    tx,
                );
                ResponseBody::channel(rx, Some(span.1 - span.0))
            }
        };
        let body = if *method == Method::HEAD {
            ResponseBody::empty()
        } else {
            body
        };
        cache.count_bytes(hit.tier.label(), span.1 - span.0);
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        finish(resp)
    }
}

/// Streams `span` of a chunked object from storage, one chunk at a time.
fn spawn_chunk_reader(
    storage: Storage,
    key: String,
    generation: u64,
    chunk_size: u64,
    chunks: u32,
    span: (u64, u64),
    tx: mpsc::Sender<Result<Bytes, crate::error::BoxError>>,
) {
    tokio::spawn(async move {
        if chunk_size == 0 {
            return;
        }
        let (mut pos, end) = span;
        while pos < end {
            let index = pos / chunk_size;
            if index >= u64::from(chunks) {
                break;
            }
            let chunk = match storage.get_chunk(&key, generation, index as u32).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    // A lost chunk: the whole version goes at once, so it is
                    // never again served as a 200 that is cut short.
                    let _ = storage.remove_version(&key, generation).await;
                    let _ = tx
                        .send(Err("cached chunk is gone (evicted or corrupt)".into()))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = storage.remove_version(&key, generation).await;
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let off = (pos - index * chunk_size) as usize;
            let take = ((end - pos) as usize).min(chunk.len().saturating_sub(off));
            if take == 0 {
                break;
            }
            if tx.send(Ok(chunk.slice(off..off + take))).await.is_err() {
                return; // the client went away
            }
            pos += take as u64;
        }
    });
}

/// Where and how an origin response is stored.
pub struct StoreTarget {
    /// The URL's key; the object's key adds the Vary variant, if any.
    pub key: String,
    pub variant: Option<String>,
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    /// The flight this fill leads, released when it is stored or will not be.
    pub guard: Option<FlightGuard>,
    /// The `Cache-Status` the client gets.
    pub cs: CacheStatus,
}

/// The request a response answered: the method and headers sent to the
/// origin (storability), and the client's own headers (its Vary variant,
/// conditionals and range).
#[derive(Clone, Copy)]
pub struct Answered<'a> {
    pub method: &'a Method,
    pub origin: &'a HeaderMap,
    pub client: &'a HeaderMap,
}

impl HttpCache {
    /// Decides whether the origin's response `resp` is stored; streams it
    /// to the client either way, answering the client's conditionals and
    /// range from it.
    pub fn store_and_respond(
        self: &Arc<Self>,
        sp: &SitePolicy,
        req: Answered<'_>,
        target: StoreTarget,
        resp: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let cache = self;
        let StoreTarget {
            key,
            variant,
            request_time,
            response_time,
            guard,
            cs,
        } = target;
        let (method, client_headers) = (req.method, req.client);
        let (mut parts, body) = resp.into_parts();
        let max = cache.storage.max_object_size();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let vary = policy::vary_spec(&parts.headers);
        let decision = super::machine::store_decision(
            method,
            req.origin,
            parts.status,
            &parts.headers,
            response_time,
            max,
            sp,
        );
        if let super::machine::StoreDecision::DontStore {
            reason,
            hit_for_pass,
        } = decision
        {
            // Remember, so later requests for it are not serialized behind a
            // fetch; but only what the response says applies to other clients.
            if hit_for_pass {
                cache.mark_pass(&key, sp.hit_for_pass);
            }
            cache.count("uncacheable");
            drop(guard);
            downstream_headers(&mut parts.headers, sp);
            if sp.cache_status {
                cs.detail(reason).append_to(&mut parts.headers);
            }
            return Response::from_parts(parts, body);
        }
        // What is stored: the response head as received, minus what must not be.
        let mut stored_headers = parts.headers.clone();
        policy::prepare_headers_for_storage(&mut stored_headers);
        stored_headers.remove(header::TRANSFER_ENCODING);
        if sp.set_cookie != SetCookie::Store {
            stored_headers.remove(header::SET_COOKIE);
        }
        let tags = policy::surrogate_keys(&stored_headers, policy::SurrogateKeyLimits::default());
        let obj_key = match (&vary, variant) {
            (policy::VarySpec::Fields(_), _) => {
                let secondary =
                    policy::secondary_key(&stored_headers, client_headers).unwrap_or_default();
                format!("{key}{VARIANT_SEP}{secondary}")
            }
            _ => key.clone(),
        };
        let meta = ObjectMeta {
            status: parts.status.as_u16(),
            headers: meta_headers(&stored_headers),
            request_time,
            response_time,
            tags,
            body_len: 0,
        };
        let vary_index = match &vary {
            policy::VarySpec::Fields(_) => stored_headers
                .get(header::VARY)
                .map(|v| (key.clone(), v.as_bytes().to_vec())),
            _ => None,
        };
        let writer = cache.storage.writer(&obj_key);
        let chunk_size = cache.storage.chunk_size();
        let spool = Spool::new(
            Backing {
                storage: cache.storage.clone(),
                key: obj_key.clone(),
                generation: writer.generation(),
                chunk_size,
            },
            usize::try_from((2 * chunk_size).max(SPOOL_MEMORY)).unwrap_or(usize::MAX),
        );
        let client_body = spool.reader(declared);
        tokio::spawn(fill(
            Fill {
                storage: cache.storage.clone(),
                results: cache.results.clone(),
                bytes: cache.bytes.clone(),
                key: obj_key,
                meta,
                vary_index,
                guard,
                max,
                background_max: sp.background_fill_max,
                declared,
            },
            writer,
            body,
            spool,
        ));

        // The client's answer, from the response now known.
        let stored = StoredResponse {
            status: parts.status,
            headers: stored_headers,
            request_time,
            response_time,
        };
        let now = SystemTime::now();
        downstream_headers(&mut parts.headers, sp);
        let cs = cs.stored();
        if policy::evaluate_client_conditionals(method, client_headers, &stored, now)
            == ConditionalResult::NotModified
        {
            // The fill goes on in the background.
            let mut h = policy::not_modified_response_headers(&stored.headers);
            downstream_headers(&mut h, sp);
            if sp.cache_status {
                cs.append_to(&mut h);
            }
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = h;
            return resp;
        }
        let mut body = client_body;
        if let (Some(r), Some(len)) = (client_headers.get(header::RANGE), declared)
            && parts.status == StatusCode::OK
            && policy::if_range_matches(client_headers, &stored)
        {
            match range::parse(r.as_bytes(), len) {
                RangeRequest::Single(a, b) => {
                    parts.status = StatusCode::PARTIAL_CONTENT;
                    parts
                        .headers
                        .insert(header::CONTENT_RANGE, range::content_range(a, b, len));
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(b + 1 - a));
                    body = range::skip_take(body, a, b + 1 - a);
                }
                RangeRequest::Unsatisfiable => {
                    parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
                    parts
                        .headers
                        .insert(header::CONTENT_RANGE, range::unsatisfied(len));
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                    body = ResponseBody::empty();
                }
                // Several ranges on a miss: the whole representation (RFC 9110 allows it).
                RangeRequest::Multi(_) | RangeRequest::Ignore => {}
            }
        }
        if sp.cache_status {
            cs.append_to(&mut parts.headers);
        }
        Response::from_parts(parts, body)
    }
}

/// What a fill task needs besides the body, its writer and its spool.
struct Fill {
    storage: Storage,
    results: KnownCounters<CacheResult>,
    bytes: KnownCounters<Reason>,
    key: String,
    meta: ObjectMeta,
    vary_index: Option<(String, Vec<u8>)>,
    guard: Option<FlightGuard>,
    max: u64,
    /// The largest object fetched on when no client wants it any more.
    background_max: u64,
    declared: Option<u64>,
}

/// Reads the origin's body at the origin's pace into storage and the spool,
/// from which the client reads at its own (see [`super::spool`]). A slow
/// client therefore never slows the fill, nor the requests coalesced behind
/// it: they are released when the object is committed, or as soon as it will
/// not be. When no client reads and none waits, a large fill stops.
async fn fill(mut f: Fill, writer: ObjectWriter, mut body: ResponseBody, spool: Arc<Spool>) {
    let chunk_size = f.storage.chunk_size();
    let mut writer = Some(writer);
    let mut len: u64 = 0;
    let mut backed: u64 = 0;
    let count = |result: &'static str| f.results.inc(result);
    let end = loop {
        let Some(frame) = body.frame().await else {
            break None;
        };
        let data = match frame {
            Ok(fr) => match fr.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Err(e) => break Some(Arc::<str>::from(e.to_string())),
        };
        len += data.len() as u64;
        if let Some(w) = &mut writer {
            let stored = if len > f.max {
                Err(None)
            } else {
                w.write(data.clone()).await.map_err(Some)
            };
            match stored {
                Ok(()) => backed = u64::from(w.chunks_written()) * chunk_size,
                Err(e) => {
                    if let Some(e) = e {
                        tracing::debug!(error = %e, key = f.key, "not storing");
                    }
                    writer = None;
                    // It will not be stored: the coalesced requests go to
                    // the origin themselves instead of waiting for it.
                    f.guard = None;
                }
            }
        }
        spool.push(data, backed);
        if spool.reader_gone()
            && (writer.is_none()
                || (f.guard.as_ref().is_none_or(|g| g.waiters() == 0)
                    && f.declared.unwrap_or(len) > f.background_max))
        {
            // Nobody reads or waits, and the object is large (or is not
            // being stored): stop fetching it.
            count("fill-abandoned");
            break Some(Arc::from("fill abandoned"));
        }
        spool.room().await;
    };
    f.bytes.inc_by("origin", len);
    if let Some(why) = end {
        if &*why != "fill abandoned" {
            count("fill-error");
        }
        spool.end(Err(why));
        return;
    }
    let complete = body_is_complete(&f.meta, len);
    spool.end(if complete {
        Ok(())
    } else {
        Err(Arc::from("origin body shorter than its Content-Length"))
    });
    if let (Some(w), true) = (writer, complete) {
        let mut meta = f.meta;
        meta.body_len = len;
        if let Some((primary, vary)) = f.vary_index {
            let idx = ObjectMeta {
                status: 0,
                headers: vec![("vary".to_string(), vary)],
                request_time: meta.request_time,
                response_time: meta.response_time,
                tags: Vec::new(),
                body_len: 0,
            };
            if let Err(e) = f.storage.writer(&primary).finish(idx).await {
                tracing::debug!(error = %e, "vary index not stored");
            }
        }
        match w.finish(meta).await {
            Ok(()) => count("stored"),
            Err(e) => tracing::debug!(error = %e, key = f.key, "object not stored"),
        }
    }
    drop(f.guard);
}

/// A body is complete if it has the length the origin declared (or it
/// declared none and the stream ended cleanly).
fn body_is_complete(meta: &ObjectMeta, len: u64) -> bool {
    meta.headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
        .is_none_or(|declared| declared == len)
}

/// Removes what makes a request conditional (and, with `range`, partial):
/// the cache fetches whole representations for itself, and answers the
/// client's own conditionals and ranges from them.
pub(crate) fn whole_representation(h: &mut HeaderMap, range: bool) {
    for n in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ] {
        h.remove(n);
    }
    if range {
        h.remove(header::RANGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::storage::StorageConfig;

    #[tokio::test]
    async fn a_lost_chunk_removes_the_whole_object() {
        let storage = Storage::open(StorageConfig {
            chunk_size: 4096,
            ..StorageConfig::default()
        })
        .await
        .expect("storage");
        let key = "http://a.test/obj";
        let mut w = storage.writer(key);
        let generation = w.generation();
        w.write(Bytes::from(vec![1u8; 3 * 4096]))
            .await
            .expect("write");
        w.finish(ObjectMeta {
            status: 200,
            headers: Vec::new(),
            request_time: SystemTime::now(),
            response_time: SystemTime::now(),
            tags: Vec::new(),
            body_len: 0,
        })
        .await
        .expect("finish");
        let Some(Hit {
            body: HitBody::Chunked { chunks, .. },
            ..
        }) = storage.get(key).await.expect("get")
        else {
            panic!("a chunked object");
        };
        storage.lose_chunk(key, generation, 1);
        let (tx, mut rx) = mpsc::channel(4);
        spawn_chunk_reader(
            storage.clone(),
            key.to_string(),
            generation,
            4096,
            chunks,
            (0, 3 * 4096),
            tx,
        );
        let mut saw_error = false;
        while let Some(item) = rx.recv().await {
            saw_error |= item.is_err();
        }
        assert!(
            saw_error,
            "the cut body ends in an error, never a short 200"
        );
        assert!(
            storage.get(key).await.expect("get").is_none(),
            "the whole object is gone at once"
        );
    }
}
