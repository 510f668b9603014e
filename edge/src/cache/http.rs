//! The HTTP cache stage of the pipeline: lookup, serving hits (with Age,
//! conditional requests and ranges), revalidation, stale-while-revalidate,
//! stale-if-error, request coalescing with hit-for-pass, storing responses
//! while they stream to the client, invalidation and purge.
//!
//! Every decision about HTTP semantics is the pure [`policy`] module's; this
//! module does the I/O around it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::acl::Cidr;
use super::policy::{
    self, CacheStatus, ConditionalResult, FwdReason, KeyOptions, Lookup, PolicyConfig,
    StoredResponse,
};
use super::range::{self, RangeRequest};
use super::spool::{Backing, Spool};
use super::storage::{Hit, HitBody, ObjectMeta, ObjectWriter, Storage};
use crate::accesslog::LogRecord;
use crate::config::{CacheConfig, SetCookie, SiteCache};
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::{RequestBody, ResponseBody};
use crate::metrics::{CacheResult, Metrics, Reason};
use crate::proxy::{Downstream, Proxy, Runtime, Site, UpstreamRequest};

/// The name in `Cache-Status`.
const CACHE_NAME: &str = "meridian";
/// Separates a URL key from its Vary variant's secondary key.
const VARIANT_SEP: char = '\u{1}';
/// Stored header marking a soft purge: the object's age (seconds) at the purge.
const SOFT_PURGE: &str = "meridian-soft-purge";
/// The least memory a fill keeps for its client before it lets go of
/// bytes that storage holds (see [`super::spool`]).
const SPOOL_MEMORY: u64 = 4 << 20;

/// A site's cache settings, built once per config generation.
#[derive(Debug)]
pub struct SitePolicy {
    pub policy: PolicyConfig,
    pub key: KeyOptions,
    pub strip_tags: bool,
    pub cache_status: bool,
    pub lock_timeout: Duration,
    pub hit_for_pass: Duration,
    pub purge_allow: Vec<Cidr>,
    /// Slice mode's slice size; 0 when off.
    pub slice_size: u64,
    pub set_cookie: SetCookie,
    /// The largest object fetched whole for no client (see the config).
    pub background_fill_max: u64,
}

impl SitePolicy {
    pub fn new(site: &SiteCache, global: &CacheConfig) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        SitePolicy {
            policy: PolicyConfig {
                default_ttl: nonzero(site.default_ttl.get()),
                default_stale_while_revalidate: nonzero(site.stale_while_revalidate.get()),
                default_stale_if_error: nonzero(site.stale_if_error.get()),
                stale_if_unreachable: nonzero(site.stale_if_unreachable.get()),
                s_maxage_allows_origin_stale: site.s_maxage_allows_stale,
                strip_surrogate_keys: site.strip_tags,
                ..PolicyConfig::default()
            },
            key: KeyOptions {
                sort_query: site.sort_query,
                drop_params: site.ignore_params.clone(),
            },
            strip_tags: site.strip_tags,
            cache_status: site.cache_status,
            lock_timeout: global.lock_timeout.get(),
            hit_for_pass: global.hit_for_pass.get(),
            purge_allow: global
                .purge_allow
                .iter()
                .filter_map(|n| Cidr::parse(n).ok())
                .collect(),
            slice_size: site.slice_size.get(),
            set_cookie: site.set_cookie,
            background_fill_max: global.background_fill_max.get(),
        }
    }
}

/// What a purge asks for (the admin API's JSON body).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Mark stale instead of removing, so stale-while-revalidate and
    /// stale-if-error still protect the origin.
    #[serde(default)]
    pub soft: bool,
}

/// How many objects a purge touched.
#[derive(Debug, Default, serde::Serialize)]
pub struct PurgeCounts {
    pub urls: usize,
    pub tags: usize,
    pub prefixes: usize,
    pub hosts: usize,
    pub purged: usize,
    pub soft: bool,
}

/// The shared cache: storage plus the in-flight fetches and hit-for-pass memory.
pub struct HttpCache {
    pub storage: Storage,
    /// Background purge jobs (see [`super::purge`]).
    pub purges: super::purge::PurgeJobs,
    flights: Mutex<HashMap<String, watch::Receiver<bool>>>,
    pass: Mutex<HashMap<String, Instant>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("storage", &self.storage)
            .finish()
    }
}

/// The first request for a key fetches; the others wait for it.
pub(crate) enum Join {
    Leader(FlightGuard),
    Follower(watch::Receiver<bool>),
}

/// Held by the request that fetches a key; dropping it wakes the waiters.
pub(crate) struct FlightGuard {
    cache: Arc<HttpCache>,
    key: String,
    tx: watch::Sender<bool>,
}

impl FlightGuard {
    /// How many requests wait for this flight.
    fn waiters(&self) -> usize {
        // The flights map holds one receiver itself.
        self.tx.receiver_count().saturating_sub(1)
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.cache.flights.lock().remove(&self.key);
        let _ = self.tx.send(true);
    }
}

/// The most hit-for-pass keys remembered; the oldest are forgotten first.
const MAX_PASS: usize = 100_000;

impl HttpCache {
    pub fn new(storage: Storage, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new_cyclic(|me| HttpCache {
            purges: super::purge::PurgeJobs::new(me.clone(), &storage, metrics.clone()),
            storage,
            flights: Mutex::default(),
            pass: Mutex::default(),
            metrics,
        })
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut f = self.flights.lock();
        if let Some(rx) = f.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        f.insert(key.to_string(), rx);
        Join::Leader(FlightGuard {
            cache: self.clone(),
            key: key.to_string(),
            tx,
        })
    }

    fn is_pass(&self, key: &str) -> bool {
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
    pub(crate) fn keys_of_url(&self, key: &str) -> Vec<String> {
        let mut ks: Vec<String> = self
            .storage
            .index()
            .keys_with_prefix(key)
            .into_iter()
            .filter(|k| {
                k.len() == key.len()
                    || matches!(
                        k[key.len()..].chars().next(),
                        Some(VARIANT_SEP | super::slice::SLICE_SEP | super::partial::PART_SEP)
                    )
            })
            .collect();
        if !ks.iter().any(|k| k == key) {
            ks.push(key.to_string());
        }
        ks
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

    pub(crate) fn count(&self, result: &'static str) {
        self.metrics
            .cache_requests
            .get_or_create(&CacheResult { result })
            .inc();
    }

    /// Finds the stored object for a request: the URL's entry, or through a
    /// Vary index the variant that matches the request's headers.
    async fn find(&self, key: &str, req: &HeaderMap) -> Found {
        let head = match self.storage.get(key).await {
            Ok(Some(h)) => h,
            Ok(None) => return Found::Miss { variant: None },
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; going to the origin");
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
    /// place before this returns.
    pub async fn purge(&self, rt: &Runtime, req: &PurgeRequest) -> PurgeCounts {
        let mut keys: Vec<String> = Vec::new();
        let mut counts = PurgeCounts {
            soft: req.soft,
            ..PurgeCounts::default()
        };
        let index = self.storage.index();
        for url in &req.urls {
            if let Some(k) = key_for_url(rt, url) {
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
                self.soft_purge(&k, now).await
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

    pub(crate) async fn soft_purge(&self, key: &str, now: SystemTime) -> bool {
        let Ok(Some(hit)) = self.storage.get(key).await else {
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
        self.storage.update_meta(key, meta).await.unwrap_or(false)
    }
}

enum Found {
    Hit { key: String, hit: Hit },
    Miss { variant: Option<String> },
}

pub(crate) fn headers_of(meta: &ObjectMeta) -> HeaderMap {
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

pub(crate) fn meta_headers(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn stored_response(meta: &ObjectMeta) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK),
        headers: headers_of(meta),
        request_time: meta.request_time,
        response_time: meta.response_time,
    }
}

/// The response as the policy should judge it: a soft-purged object has been
/// stale since its purge, with its stale windows and revalidation rules kept.
fn for_policy(mut stored: StoredResponse) -> StoredResponse {
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

/// The cache key of an absolute URL, with the options of the site its host routes to.
pub(crate) fn key_for_url(rt: &Runtime, url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.authority()?.as_str().to_string();
    let site = rt.router.route(Some(&host)).and_then(|i| rt.sites.get(i));
    let opts = site
        .and_then(|s| s.cache.as_ref())
        .map(|p| p.key.clone())
        .unwrap_or_default();
    policy::cache_key_for_uri(&uri, None, "https", &opts).ok()
}

/// Lower-cases a prefix's scheme and host, as keys are.
pub(crate) fn normalize_prefix(p: &str) -> String {
    match p.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
            let sep = if rest.contains('/') { "/" } else { "" };
            format!(
                "{}://{}{sep}{path}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            )
        }
        None => p.to_string(),
    }
}

/// The cache stage. Called by the pipeline for every request of a site that
/// caches; answers from the cache, or fetches (and stores) through `proxy`.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    rt: &Runtime,
    site: &Site,
    ds: &Downstream,
    up: UpstreamRequest,
    body: RequestBody,
    too_large: &Arc<AtomicBool>,
    rec: &mut LogRecord,
) -> Result<Response<ResponseBody>, ProxyError> {
    let method = up.parts.method.clone();
    // The key's scheme is the connection's, never the request target's: a
    // plaintext client naming `https://` must not reach HTTPS entries. The
    // host is the target's authority if absolute-form, else Host (the
    // pipeline made them agree, RFC 9112 §3.2.2).
    let scheme = if up.tls { "https" } else { "http" };
    let bad_key = |e: Option<policy::PolicyError>| {
        let err = ProxyError::downstream(ErrorKind::BadRequest("bad-cache-key"), "cache key");
        match e {
            Some(e) => err.with_cause(e),
            None => err,
        }
    };
    let host = up.host.as_deref().ok_or_else(|| bad_key(None))?;
    let key = policy::normalize_cache_key(
        scheme,
        host,
        up.parts.uri.path(),
        up.parts.uri.query(),
        &sp.key,
    )
    .map_err(|e| bad_key(Some(e)))?;

    if method.as_str() == "PURGE" {
        return purge_method(cache, sp, rt, ds, &key).await;
    }
    if method != Method::GET && method != Method::HEAD {
        return unsafe_method(proxy, cache, site, up, body, too_large, rec, &key, scheme).await;
    }
    if sp.slice_size > 0
        && method == Method::GET
        && let Some(resp) = super::slice::serve(proxy, cache, sp, site, &up, rec, &key).await?
    {
        return Ok(resp);
    }
    let req_headers = up.parts.headers.clone();
    let now = SystemTime::now();
    let variant;
    match cache.find(&key, &req_headers).await {
        Found::Hit { key: obj_key, hit } => {
            let stored = for_policy(stored_response(&hit.meta));
            match policy::lookup(&stored, &req_headers, now, &sp.policy) {
                Lookup::Fresh { ttl_left, .. } => {
                    cache.count("hit");
                    let cs = CacheStatus::hit(CACHE_NAME).ttl(ttl_left.as_secs() as i64);
                    return serve_hit(
                        cache,
                        sp,
                        &obj_key,
                        &method,
                        &req_headers,
                        &stored,
                        hit,
                        cs,
                        now,
                    );
                }
                Lookup::StaleWhileRevalidate { staleness, .. } => {
                    cache.count("stale-while-revalidate");
                    spawn_revalidation(proxy, cache, site, &up, &obj_key, &stored);
                    let cs = CacheStatus::hit(CACHE_NAME)
                        .ttl(-(staleness.as_secs() as i64))
                        .detail("stale-while-revalidate");
                    return serve_hit(
                        cache,
                        sp,
                        &obj_key,
                        &method,
                        &req_headers,
                        &stored,
                        hit,
                        cs,
                        now,
                    );
                }
                Lookup::Stale { .. } | Lookup::MustRevalidate { .. } => {
                    return revalidate(proxy, cache, sp, site, up, rec, obj_key, stored, hit, now)
                        .await;
                }
                Lookup::GatewayTimeout => {
                    cache.count("only-if-cached");
                    return Err(ProxyError::downstream(
                        ErrorKind::NotCached,
                        "only-if-cached",
                    ));
                }
            }
        }
        Found::Miss { variant: v } => variant = v,
    }
    // A miss.
    if policy::on_miss(&req_headers) == policy::MissAction::GatewayTimeout {
        cache.count("only-if-cached");
        return Err(ProxyError::downstream(
            ErrorKind::NotCached,
            "only-if-cached",
        ));
    }
    let fwd = if variant.is_some() {
        FwdReason::VaryMiss
    } else {
        FwdReason::UriMiss
    };
    // A range on a miss goes to the origin as a range, so the origin never
    // sends more than was asked; a small object is then filled whole behind it.
    if method == Method::GET && req_headers.contains_key(header::RANGE) && !cache.is_pass(&key) {
        // A stored part of the representation may hold the bytes (RFC 9111 §3.4).
        if variant.is_none()
            && let Some(resp) = super::partial::serve(cache, sp, &key, &method, &req_headers).await
        {
            return Ok(resp);
        }
        return range_miss(proxy, cache, sp, site, up, rec, key, variant, fwd).await;
    }
    // A request that may not store (its own `no-store`) fetches for itself
    // alone: it neither leads a fill others would wait on nor marks the URL.
    let request_no_store = policy::RequestDirectives::from_headers(&req_headers).no_store;
    if method == Method::HEAD || request_no_store || cache.is_pass(&key) {
        let (result, detail) = if method == Method::HEAD {
            ("miss-head", "head")
        } else if request_no_store {
            ("pass", "request-no-store")
        } else {
            ("pass", "hit-for-pass")
        };
        cache.count(result);
        return pass(
            proxy,
            site,
            up,
            body,
            too_large,
            rec,
            sp,
            CacheStatus::forward(CACHE_NAME, fwd).detail(detail),
        )
        .await;
    }
    // Coalesce concurrent misses for this key.
    match cache.join(&key) {
        Join::Leader(guard) => {
            cache.count("miss");
            fetch_and_store(proxy, cache, sp, site, up, rec, key, variant, guard, fwd).await
        }
        Join::Follower(mut rx) => {
            cache.metrics.cache_coalesced.inc();
            let waited = tokio::time::timeout(sp.lock_timeout, async move {
                rx.wait_for(|done| *done).await.is_ok()
            })
            .await;
            if waited.is_ok()
                && let Found::Hit { key: obj_key, hit } = cache.find(&key, &req_headers).await
            {
                let now = SystemTime::now();
                let stored = for_policy(stored_response(&hit.meta));
                if let Lookup::Fresh { ttl_left, .. } =
                    policy::lookup(&stored, &req_headers, now, &sp.policy)
                {
                    cache.count("hit-collapsed");
                    let cs = CacheStatus::hit(CACHE_NAME)
                        .ttl(ttl_left.as_secs() as i64)
                        .collapsed();
                    return serve_hit(
                        cache,
                        sp,
                        &obj_key,
                        &method,
                        &req_headers,
                        &stored,
                        hit,
                        cs,
                        now,
                    );
                }
            }
            // Uncacheable, failed, or the lock timed out: to the origin, unstored.
            cache.count("pass");
            let detail = if waited.is_err() {
                "lock-timeout"
            } else {
                "uncacheable"
            };
            pass(
                proxy,
                site,
                up,
                body,
                too_large,
                rec,
                sp,
                CacheStatus::forward(CACHE_NAME, fwd)
                    .collapsed()
                    .detail(detail),
            )
            .await
        }
    }
}

/// A range request on a miss: forwarded with its `Range`. A 206 goes to the
/// client as is, and if the whole object is at most `background_fill_max`
/// a background fill stores it for the next requests; a 200 (an origin that
/// ignores ranges) is stored like any miss while the client's range is cut
/// from it, and its fill stops once the client has its bytes, unless the
/// object is small. Anything else is passed on, and marks nothing.
#[allow(clippy::too_many_arguments)]
async fn range_miss(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    site: &Site,
    up: UpstreamRequest,
    rec: &mut LogRecord,
    key: String,
    variant: Option<String>,
    fwd: FwdReason,
) -> Result<Response<ResponseBody>, ProxyError> {
    let request_time = SystemTime::now();
    let no_flag = AtomicBool::new(false);
    let fetched = proxy
        .fetch(&site.pool, &up, RequestBody::empty(), &no_flag, rec)
        .await?;
    let response_time = SystemTime::now();
    let status = fetched.resp.status();
    let cs = CacheStatus::forward(CACHE_NAME, fwd).fwd_status(status);
    if status == StatusCode::OK {
        cache.count("miss");
        let guard = match cache.join(&key) {
            Join::Leader(g) => Some(g),
            Join::Follower(_) => None,
        };
        let client_headers = up.parts.headers.clone();
        return store_and_respond(
            proxy,
            cache,
            sp,
            site,
            &up,
            &client_headers,
            key,
            variant,
            fetched,
            request_time,
            response_time,
            guard,
            cs,
        )
        .await;
    }
    cache.count("miss-range");
    if status == StatusCode::PARTIAL_CONTENT
        && super::slice::content_range(fetched.resp.headers())
            .is_some_and(|(_, _, total)| total <= sp.background_fill_max)
        // The request's plugin contexts answer for one response only.
        && up.plugins.is_none()
    {
        spawn_background_fill(proxy, cache, site, &up, key.clone(), variant.clone());
    }
    let mut resp = proxy
        .finish_response(fetched, &site.pool, false, None)
        .await?;
    // A 206 with a strong validator is kept, combined with the stored part.
    if status == StatusCode::PARTIAL_CONTENT && variant.is_none() {
        resp = super::partial::store_behind(
            cache,
            sp,
            &key,
            &up.parts.method,
            &up.parts.headers,
            request_time,
            response_time,
            resp,
        );
    }
    downstream_headers(resp.headers_mut(), sp);
    if sp.cache_status {
        cs.detail("range").append_to(resp.headers_mut());
    }
    Ok(resp)
}

/// Fetches the whole object behind a range request, for no client, and
/// stores it; one per key at a time (it leads the key's flight).
fn spawn_background_fill(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    site: &Site,
    up: &UpstreamRequest,
    key: String,
    variant: Option<String>,
) {
    let Join::Leader(guard) = cache.join(&key) else {
        return; // a fill is already running
    };
    let Some(sp) = site.cache.clone() else { return };
    let (proxy, cache) = (proxy.clone(), cache.clone());
    let site = detached(site);
    let mut up = up.clone();
    whole_representation(&mut up.parts.headers, true);
    tokio::spawn(async move {
        let rec = &mut LogRecord::background();
        let request_time = SystemTime::now();
        let no_flag = AtomicBool::new(false);
        let Ok(fetched) = proxy
            .fetch(&site.pool, &up, RequestBody::empty(), &no_flag, rec)
            .await
        else {
            cache.count("background-fill-failed");
            return;
        };
        cache.count("background-fill");
        let response_time = SystemTime::now();
        let client_headers = up.parts.headers.clone();
        let cs = CacheStatus::forward(CACHE_NAME, FwdReason::UriMiss);
        if let Ok(resp) = store_and_respond(
            &proxy,
            &cache,
            &sp,
            &site,
            &up,
            &client_headers,
            key,
            variant,
            fetched,
            request_time,
            response_time,
            Some(guard),
            cs,
        )
        .await
        {
            // Nobody reads this response: drive it to the end so the fill completes.
            let _ = resp.into_body().collect().await;
        }
    });
}

/// A copy of `site` for work that outlives the request (a background fill
/// or revalidation): its name, pool and cache policy. Plugin contexts travel
/// with the upstream request, not the site.
pub(crate) fn detached(site: &Site) -> Site {
    Site {
        name: site.name.clone(),
        pool: site.pool.clone(),
        preserve_host: site.preserve_host,
        cache: site.cache.clone(),
        plugins: Arc::from(Vec::new()),
        bytes: site.bytes.clone(),
    }
}

/// Forwards without storing; the response still gets the cache's headers.
#[allow(clippy::too_many_arguments)]
async fn pass(
    proxy: &Arc<Proxy>,
    site: &Site,
    up: UpstreamRequest,
    body: RequestBody,
    too_large: &Arc<AtomicBool>,
    rec: &mut LogRecord,
    sp: &SitePolicy,
    cs: CacheStatus,
) -> Result<Response<ResponseBody>, ProxyError> {
    let fetched = proxy.fetch(&site.pool, &up, body, too_large, rec).await?;
    let status = fetched.resp.status();
    let mut resp = proxy
        .finish_response(fetched, &site.pool, false, None)
        .await?;
    downstream_headers(resp.headers_mut(), sp);
    if sp.cache_status {
        cs.fwd_status(status).append_to(resp.headers_mut());
    }
    Ok(resp)
}

/// Unsafe methods go to the origin; a success invalidates the target URI and
/// its Location / Content-Location (RFC 9111 §4.4).
#[allow(clippy::too_many_arguments)]
async fn unsafe_method(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    site: &Site,
    up: UpstreamRequest,
    body: RequestBody,
    too_large: &Arc<AtomicBool>,
    rec: &mut LogRecord,
    key: &str,
    scheme: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    let method = up.parts.method.clone();
    let target: Option<http::Uri> =
        format!("{scheme}://{}{}", up.host.as_deref().unwrap_or(""), up.path)
            .parse()
            .ok();
    let request_time = SystemTime::now();
    let fetched = proxy.fetch(&site.pool, &up, body, too_large, rec).await?;
    let response_time = SystemTime::now();
    let status = fetched.resp.status();
    if let Some(target) = &target
        && let Ok(targets) =
            policy::invalidation_targets(&method, status, target, fetched.resp.headers())
        && !targets.is_empty()
    {
        let mut n = 0;
        for t in targets {
            let k = if t == *target {
                Some(key.to_string())
            } else {
                policy::cache_key_for_uri(&t, None, scheme, &KeyOptions::default()).ok()
            };
            if let Some(k) = k {
                let ks = cache.keys_of_url(&k);
                n += cache.storage.remove_lazy(ks).await.unwrap_or(0) as u64;
            }
        }
        cache
            .metrics
            .cache_purges
            .get_or_create(&Reason {
                reason: "invalidation",
            })
            .inc_by(n);
    }
    // A POST answer that names itself in Content-Location, with explicit
    // freshness, may answer later GETs (RFC 9110 §9.3.3).
    if method == Method::POST
        && let (Some(target), Some(sp)) = (&target, &site.cache)
        && policy::post_response_reusable(
            status,
            target,
            fetched.resp.headers(),
            response_time,
            &sp.policy,
        )
    {
        let mut as_get = up.clone();
        as_get.parts.method = Method::GET;
        let client_headers = up.parts.headers.clone();
        let cs = CacheStatus::forward(CACHE_NAME, FwdReason::Method).fwd_status(status);
        return store_and_respond(
            proxy,
            cache,
            sp,
            site,
            &as_get,
            &client_headers,
            key.to_string(),
            None,
            fetched,
            request_time,
            response_time,
            None,
            cs,
        )
        .await;
    }
    proxy
        .finish_response(fetched, &site.pool, false, None)
        .await
}

/// The HTTP PURGE method (Varnish/Squid style), from allowed networks only.
async fn purge_method(
    cache: &Arc<HttpCache>,
    sp: &SitePolicy,
    rt: &Runtime,
    ds: &Downstream,
    key: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    if !super::acl::allowed(&sp.purge_allow, ds.client.ip()) {
        return Err(ProxyError::downstream(ErrorKind::Forbidden, "purge acl"));
    }
    let req = PurgeRequest {
        urls: Vec::new(),
        ..PurgeRequest::default()
    };
    let mut counts = cache.purge(rt, &req).await;
    // The URL's own key (already normalised by the site's options), variants and slices.
    let ks = cache.keys_of_url(key);
    for k in ks {
        if cache.storage.remove(&k).await.unwrap_or(false) {
            counts.purged += 1;
            counts.urls += 1;
        }
    }
    cache
        .metrics
        .cache_purges
        .get_or_create(&Reason { reason: "method" })
        .inc();
    let body = serde_json::to_vec(&counts).unwrap_or_default();
    let mut resp = Response::new(ResponseBody::full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Headers no client response carries: the targeted cache field consumed here,
/// and (if configured) the surrogate keys.
pub(crate) fn downstream_headers(h: &mut HeaderMap, sp: &SitePolicy) {
    for n in policy::headers_to_strip_downstream(h, &sp.policy) {
        h.remove(n);
    }
    h.remove(SOFT_PURGE);
    if sp.strip_tags {
        h.remove(policy::surrogate::SURROGATE_KEY);
        h.remove(policy::surrogate::CACHE_TAG);
    }
}

/// Serves a stored object: 304 for a matching conditional, 206/416 for a
/// range, else 200; with Age and Cache-Status.
#[allow(clippy::too_many_arguments)]
fn serve_hit(
    cache: &HttpCache,
    sp: &SitePolicy,
    key: &str,
    method: &Method,
    req: &HeaderMap,
    stored: &StoredResponse,
    hit: Hit,
    cs: CacheStatus,
    now: SystemTime,
) -> Result<Response<ResponseBody>, ProxyError> {
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
        return Ok(finish(resp));
    }
    let len = hit.meta.body_len;
    let mut headers = stored.headers.clone();
    headers.remove(header::AGE);
    headers.remove(header::TRANSFER_ENCODING);
    let mut status = stored.status;
    let mut span = (0, len);
    let mut multipart = None;
    if *method == Method::GET
        && status == StatusCode::OK
        && let Some(r) = req.get(header::RANGE)
        && policy::if_range_matches(req, stored)
    {
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
                return Ok(finish(resp));
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
                    if let Ok(v) =
                        HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
                    {
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
    cache
        .metrics
        .cache_bytes
        .get_or_create(&Reason {
            reason: hit.tier.label(),
        })
        .inc_by(span.1 - span.0);
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(finish(resp))
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

/// Whether a storable response is worth storing: it can be fresh, served
/// stale, or revalidated.
pub(crate) fn worth_storing(
    status: StatusCode,
    h: &HeaderMap,
    now: SystemTime,
    sp: &SitePolicy,
) -> bool {
    let f = policy::freshness_lifetime(status, h, now, &sp.policy);
    let d = policy::effective_response_directives(h).directives;
    !f.lifetime.is_zero()
        || h.contains_key(header::ETAG)
        || h.contains_key(header::LAST_MODIFIED)
        || d.stale_while_revalidate.is_some()
        || d.stale_if_error.is_some()
        || sp.policy.default_stale_if_error.is_some()
}

/// The leader of a miss: fetches, and if the response may be stored, streams
/// it to the client while a task writes it to storage.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_store(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    site: &Site,
    mut up: UpstreamRequest,
    rec: &mut LogRecord,
    key: String,
    variant: Option<String>,
    guard: FlightGuard,
    fwd: FwdReason,
) -> Result<Response<ResponseBody>, ProxyError> {
    let client_headers = up.parts.headers.clone();
    // Fetch the whole representation, unconditionally: the cache stores it and
    // answers the client's own conditionals and ranges from it.
    whole_representation(&mut up.parts.headers, true);
    let request_time = SystemTime::now();
    let no_flag = AtomicBool::new(false);
    let fetched = proxy
        .fetch(&site.pool, &up, RequestBody::empty(), &no_flag, rec)
        .await?;
    let response_time = SystemTime::now();
    let cs = CacheStatus::forward(CACHE_NAME, fwd).fwd_status(fetched.resp.status());
    store_and_respond(
        proxy,
        cache,
        sp,
        site,
        &up,
        &client_headers,
        key,
        variant,
        fetched,
        request_time,
        response_time,
        Some(guard),
        cs,
    )
    .await
}

/// Decides whether `fetched` is stored; streams it to the client either way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn store_and_respond(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    site: &Site,
    up: &UpstreamRequest,
    client_headers: &HeaderMap,
    key: String,
    variant: Option<String>,
    fetched: crate::proxy::Fetched,
    request_time: SystemTime,
    response_time: SystemTime,
    guard: Option<FlightGuard>,
    cs: CacheStatus,
) -> Result<Response<ResponseBody>, ProxyError> {
    let method = up.parts.method.clone();
    let resp = proxy
        .finish_response(fetched, &site.pool, false, None)
        .await?;
    let (mut parts, body) = resp.into_parts();
    let storable = policy::storability(&method, &up.parts.headers, parts.status, &parts.headers);
    let max = cache.storage.max_object_size();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let vary = policy::vary_spec(&parts.headers);
    let sets_cookie = parts.headers.contains_key(header::SET_COOKIE);
    // Why it is not stored, if it is not; the response's reasons come last.
    let not_stored = match storable {
        policy::Storability::NotStorable(r) => Some((r.as_str(), !r.from_request())),
        _ if sets_cookie && sp.set_cookie == SetCookie::Pass => Some(("set-cookie", true)),
        _ if !worth_storing(parts.status, &parts.headers, response_time, sp) => {
            Some(("not-worth-storing", true))
        }
        _ if declared.is_some_and(|l| l > max) => Some(("too-large", true)),
        _ if matches!(vary, policy::VarySpec::Star) => Some(("vary-star", true)),
        _ => None,
    };
    if let Some((reason, by_response)) = not_stored {
        // Remember, so later requests for it are not serialized behind a
        // fetch; but only what the response says applies to other clients.
        if by_response {
            cache.mark_pass(&key, sp.hit_for_pass);
        }
        cache.count("uncacheable");
        drop(guard);
        downstream_headers(&mut parts.headers, sp);
        if sp.cache_status {
            cs.detail(reason).append_to(&mut parts.headers);
        }
        return Ok(Response::from_parts(parts, body));
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
            metrics: cache.metrics.clone(),
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
    if policy::evaluate_client_conditionals(&method, client_headers, &stored, now)
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
        return Ok(resp);
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
    Ok(Response::from_parts(parts, body))
}

/// What a fill task needs besides the body, its writer and its spool.
struct Fill {
    storage: Storage,
    metrics: Arc<Metrics>,
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
    let count = |result: &'static str| {
        f.metrics
            .cache_requests
            .get_or_create(&CacheResult { result })
            .inc();
    };
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
    f.metrics
        .cache_bytes
        .get_or_create(&Reason { reason: "origin" })
        .inc_by(len);
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

/// A stale object must be revalidated before use: a conditional request;
/// 304 freshens it, a new response replaces it, an error may serve it stale.
#[allow(clippy::too_many_arguments)]
async fn revalidate(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    site: &Site,
    mut up: UpstreamRequest,
    rec: &mut LogRecord,
    obj_key: String,
    stored: StoredResponse,
    hit: Hit,
    now: SystemTime,
) -> Result<Response<ResponseBody>, ProxyError> {
    let client_headers = up.parts.headers.clone();
    let method = up.parts.method.clone();
    // Revalidations coalesce like misses: one conditional request per stale
    // object, whatever the number of clients (and with a background one).
    let guard = match cache.join(&revalidation_flight(&obj_key)) {
        Join::Leader(g) => Some(g),
        Join::Follower(mut rx) => {
            cache.metrics.cache_coalesced.inc();
            let waited = tokio::time::timeout(sp.lock_timeout, async move {
                rx.wait_for(|done| *done).await.is_ok()
            })
            .await;
            let (url_key, _) = split_variant(&obj_key);
            if waited.is_ok()
                && let Found::Hit { key: k, hit: h } = cache.find(&url_key, &client_headers).await
            {
                let now = SystemTime::now();
                let fresh = for_policy(stored_response(&h.meta));
                if let Lookup::Fresh { ttl_left, .. } =
                    policy::lookup(&fresh, &client_headers, now, &sp.policy)
                {
                    cache.count("revalidated-collapsed");
                    let cs = CacheStatus::hit(CACHE_NAME)
                        .ttl(ttl_left.as_secs() as i64)
                        .collapsed();
                    return serve_hit(cache, sp, &k, &method, &client_headers, &fresh, h, cs, now);
                }
            }
            // Still stale (the origin failed, or the wait timed out): ask
            // the origin ourselves.
            None
        }
    };
    up.parts.headers = policy::revalidation_request_headers(&client_headers, &stored.headers);
    if method == Method::HEAD {
        up.parts.method = Method::GET;
    }
    let request_time = SystemTime::now();
    let no_flag = AtomicBool::new(false);
    let stale_on = |failure| {
        policy::may_serve_stale_on_error(&stored, &client_headers, failure, now, &sp.policy)
    };
    let fetched = match proxy
        .fetch(&site.pool, &up, RequestBody::empty(), &no_flag, rec)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            let failure = match e.kind {
                ErrorKind::ConnectTimeout | ErrorKind::HeaderTimeout => {
                    policy::UpstreamFailure::Timeout
                }
                _ => policy::UpstreamFailure::Connect,
            };
            if stale_on(failure) {
                cache.count("stale-if-error");
                let cs = CacheStatus::hit(CACHE_NAME).detail("stale-if-error");
                return serve_hit(
                    cache,
                    sp,
                    &obj_key,
                    &method,
                    &client_headers,
                    &stored,
                    hit,
                    cs,
                    now,
                );
            }
            return Err(e);
        }
    };
    let response_time = SystemTime::now();
    let status = fetched.resp.status();
    if status == StatusCode::NOT_MODIFIED {
        // Freshen the stored object with the 304's headers (RFC 9111 §4.3.4).
        let not_modified = fetched.resp.headers().clone();
        drain(fetched).await;
        let (fresh, meta) = freshened(
            &hit.meta,
            &not_modified,
            sp.set_cookie,
            request_time,
            response_time,
        );
        let _ = cache.storage.update_meta(&obj_key, meta.clone()).await;
        cache.count("revalidated");
        let cs = CacheStatus::forward(CACHE_NAME, FwdReason::Stale).fwd_status(status);
        let hit = Hit { meta, ..hit };
        return serve_hit(
            cache,
            sp,
            &obj_key,
            &method,
            &client_headers,
            &fresh,
            hit,
            cs,
            SystemTime::now(),
        );
    }
    if policy::UpstreamFailure::Status(status).is_error()
        && stale_on(policy::UpstreamFailure::Status(status))
    {
        drop(fetched);
        cache.count("stale-if-error");
        let cs = CacheStatus::hit(CACHE_NAME)
            .detail("stale-if-error")
            .fwd_status(status);
        return serve_hit(
            cache,
            sp,
            &obj_key,
            &method,
            &client_headers,
            &stored,
            hit,
            cs,
            now,
        );
    }
    // A new representation replaces the stored one.
    cache.count("stale-replaced");
    let (key, variant) = split_variant(&obj_key);
    up.parts.headers = client_headers.clone();
    up.parts.method = method;
    let cs = CacheStatus::forward(CACHE_NAME, FwdReason::Stale).fwd_status(status);
    store_and_respond(
        proxy,
        cache,
        sp,
        site,
        &up,
        &client_headers,
        key,
        variant,
        fetched,
        request_time,
        response_time,
        guard,
        cs,
    )
    .await
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

/// The flight key under which one stale object's revalidations coalesce.
fn revalidation_flight(obj_key: &str) -> String {
    format!("revalidate\u{0}{obj_key}")
}

/// The URL key and, for a Vary variant, the variant key of a stored object.
fn split_variant(obj_key: &str) -> (String, Option<String>) {
    let key = obj_key
        .split(VARIANT_SEP)
        .next()
        .unwrap_or(obj_key)
        .to_string();
    (
        key,
        obj_key.contains(VARIANT_SEP).then(|| obj_key.to_string()),
    )
}

/// A stored object freshened by a 304 (RFC 9111 §4.3.4): the merged
/// response, and the metadata to store. A soft purge ends here. A 304's
/// `Set-Cookie` is stored only where a 200's would be.
fn freshened(
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

/// Reads a response body to its end (so its connection can be reused).
async fn drain(fetched: crate::proxy::Fetched) {
    let crate::proxy::Fetched {
        resp,
        mut pool_return,
        ..
    } = fetched;
    let ok = crate::http::body::drain(resp.into_body(), 1 << 20)
        .await
        .is_ok();
    crate::http::body::OnBodyEnd::finish(&mut pool_return, ok, 0);
}

/// stale-while-revalidate: exactly one background revalidation per object.
fn spawn_revalidation(
    proxy: &Arc<Proxy>,
    cache: &Arc<HttpCache>,
    site: &Site,
    up: &UpstreamRequest,
    obj_key: &str,
    stored: &StoredResponse,
) {
    let Join::Leader(guard) = cache.join(&revalidation_flight(obj_key)) else {
        return; // one is already running
    };
    let (proxy, cache) = (proxy.clone(), cache.clone());
    let pool = site.pool.clone();
    let mut parts = up.parts.clone();
    parts.method = Method::GET;
    parts.headers = policy::revalidation_request_headers(&up.parts.headers, &stored.headers);
    let up = UpstreamRequest {
        bytes: up.bytes.clone(),
        parts,
        host: up.host.clone(),
        path: up.path.clone(),
        preserve_host: up.preserve_host,
        upgrade: false,
        tls: up.tls,
        plugins: up.plugins.clone(),
    };
    let obj_key = obj_key.to_string();
    let sp = site.cache.clone();
    let site = detached(site);
    tokio::spawn(async move {
        let _guard = guard;
        let Some(sp) = sp else { return };
        let ds_rec = &mut LogRecord::background();
        let request_time = SystemTime::now();
        let no_flag = AtomicBool::new(false);
        let Ok(fetched) = proxy
            .fetch(&pool, &up, RequestBody::empty(), &no_flag, ds_rec)
            .await
        else {
            cache.count("background-revalidation-failed");
            return;
        };
        let response_time = SystemTime::now();
        let status = fetched.resp.status();
        cache
            .metrics
            .cache_requests
            .get_or_create(&CacheResult {
                result: "background-revalidation",
            })
            .inc();
        if status == StatusCode::NOT_MODIFIED {
            let not_modified = fetched.resp.headers().clone();
            drain(fetched).await;
            if let Ok(Some(hit)) = cache.storage.get(&obj_key).await {
                let (_, meta) = freshened(
                    &hit.meta,
                    &not_modified,
                    sp.set_cookie,
                    request_time,
                    response_time,
                );
                let _ = cache.storage.update_meta(&obj_key, meta).await;
            }
            return;
        }
        if policy::UpstreamFailure::Status(status).is_error() {
            return; // keep serving what we have
        }
        let (key, variant) = split_variant(&obj_key);
        let client_headers = up.parts.headers.clone();
        let cs = CacheStatus::forward(CACHE_NAME, FwdReason::Stale);
        if let Ok(resp) = store_and_respond(
            &proxy,
            &cache,
            &sp,
            &site,
            &up,
            &client_headers,
            key,
            variant,
            fetched,
            request_time,
            response_time,
            None,
            cs,
        )
        .await
        {
            // Nobody reads this response: drive it to the end so the fill completes.
            let _ = resp.into_body().collect().await;
        }
    });
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
