//! The proxy drives the cache (the shape of pingora's `proxy_cache.rs`).
//!
//! For a request of a site that caches, the pipeline's cache phase calls
//! [`handle`]. It asks the per-request [`CacheMachine`] what to do, performs
//! each step (lookups, flights, waits, origin fetches through the
//! [`Session`], stores), and reports back. Every decision is the
//! machine's or the pure policy's; `cache/` never calls back here.
//! Background work (a stale-while-revalidate refresh, a range's background
//! fill) runs as a [`Session::subrequest`] with the real site.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::session::Session;
use super::{Fetched, Runtime, UpstreamRequest};
use crate::cache::http::{
    Answered, ClientRequest, FlightGuard, FlightState, Found, HttpCache, Join, PurgeCounts,
    SitePolicy, StoreTarget, StoredObject, downstream_headers, for_policy, freshened,
    split_variant, stored_response, wait_for_flight, whole_representation,
};
use crate::cache::machine::{
    self, CacheMachine, Entry, Fetch, FetchKind, Revalidated, Step, revalidation_flight,
};
use crate::cache::policy::{self, CacheStatus, FwdReason, KeyOptions};
use crate::cache::storage::Hit;
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::{RequestBody, ResponseBody};
use crate::metrics::Reason;

/// The cache phase of a request whose site caches with policy `sp`.
pub(super) async fn handle(
    s: &mut Session,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let key = cache_key(s, sp)?;
    match Entry::of(&s.up.parts.method, sp) {
        Entry::Purge => return purge_method(s, cache, sp, &key).await,
        Entry::Unsafe => return unsafe_method(s, cache, &key).await,
        Entry::Slice => {
            if let Some(resp) = super::slice::serve(s, cache, sp, &key).await? {
                return Ok(resp);
            }
        }
        Entry::Lookup => {}
    }
    let m = CacheMachine::new(
        sp.clone(),
        s.up.parts.method.clone(),
        s.up.parts.headers.clone(),
        key,
    );
    let mut driver = Driver {
        cache,
        m,
        obj: None,
        guard: None,
        follower: None,
        variant: None,
    };
    driver.run(s).await
}

/// The cache_key phase: the key's scheme is the connection's, never the
/// request target's, so a plaintext client naming `https://` cannot reach
/// HTTPS entries. The host is the target's authority if absolute-form, else
/// Host (the request filter made them agree, RFC 9112 §3.2.2).
fn cache_key(s: &Session, sp: &SitePolicy) -> Result<String, ProxyError> {
    let scheme = if s.up.tls { "https" } else { "http" };
    let bad_key = || ProxyError::downstream(ErrorKind::BadRequest("bad-cache-key"), "cache key");
    let host = s.up.host.as_deref().ok_or_else(bad_key)?;
    policy::normalize_cache_key(
        scheme,
        host,
        s.up.parts.uri.path(),
        s.up.parts.uri.query(),
        &sp.key,
    )
    .map_err(|e| bad_key().with_cause(e))
}

/// Performs the machine's steps for one GET or HEAD.
struct Driver<'a> {
    cache: &'a Arc<HttpCache>,
    m: CacheMachine,
    /// The stored object the request found (a hit, or the stale object
    /// being revalidated).
    obj: Option<StoredObject>,
    /// The flight this request leads.
    guard: Option<FlightGuard>,
    /// The flight this request waits for.
    follower: Option<watch::Receiver<FlightState>>,
    /// A miss's Vary variant key (the URL has a Vary index).
    variant: Option<String>,
}

impl Driver<'_> {
    async fn run(&mut self, s: &mut Session) -> Result<Response<ResponseBody>, ProxyError> {
        let mut step = match self.find().await {
            Some(obj) => {
                let step = self.m.on_lookup(
                    machine::Found::Hit {
                        obj_key: &obj.key,
                        stored: &obj.stored,
                    },
                    SystemTime::now(),
                    false,
                );
                self.obj = Some(obj);
                step
            }
            None => {
                let variant = self.variant.take();
                let pass = self.cache.is_pass(self.m.key());
                self.m
                    .on_lookup(machine::Found::Miss { variant }, SystemTime::now(), pass)
            }
        };
        loop {
            step = match step {
                Step::Serve {
                    status,
                    result,
                    revalidate,
                } => {
                    self.cache.count(result);
                    let Some(obj) = self.obj.take() else {
                        return Err(internal("serve without an object"));
                    };
                    if revalidate {
                        spawn_revalidation(s, self.cache, self.m.policy(), &obj);
                    }
                    return Ok(self.serve(obj, status));
                }
                Step::Join { flight } => match self.cache.join(&flight) {
                    Join::Leader(g) => {
                        self.guard = Some(g);
                        self.m.on_join(true)
                    }
                    Join::Follower(rx) => {
                        self.cache.metrics.cache_coalesced.inc();
                        self.follower = Some(rx);
                        self.m.on_join(false)
                    }
                },
                Step::Wait { timeout } => {
                    let Some(rx) = self.follower.take() else {
                        return Err(internal("wait without a flight"));
                    };
                    let waited = wait_for_flight(rx, timeout).await;
                    let found = self.find().await;
                    let step = self.m.on_wait(
                        found.as_ref().map(|o| (o.key.as_str(), &o.stored)),
                        waited,
                        SystemTime::now(),
                    );
                    if let (Step::Serve { .. }, Some(found)) = (&step, found) {
                        self.obj = Some(found);
                    }
                    step
                }
                Step::TryPart => {
                    let (key, method) = (self.m.key(), &s.up.parts.method);
                    let sp = self.m.policy();
                    let req = self.m.request_headers();
                    if let Some(resp) =
                        crate::cache::partial::serve(self.cache, sp, key, method, req).await
                    {
                        return Ok(resp);
                    }
                    self.m.on_no_part()
                }
                Step::NotCached => {
                    self.cache.count("only-if-cached");
                    return Err(ProxyError::downstream(
                        ErrorKind::NotCached,
                        "only-if-cached",
                    ));
                }
                Step::Fetch(f) => return self.fetch(s, f).await,
            };
        }
    }

    /// The request's stored object: the URL's entry, or its Vary variant.
    /// A miss on a URL with a Vary index leaves the variant's key.
    async fn find(&mut self) -> Option<StoredObject> {
        match self
            .cache
            .find(self.m.key(), self.m.request_headers())
            .await
        {
            Found::Hit { key, hit } => Some(StoredObject {
                stored: for_policy(stored_response(&hit.meta)),
                key,
                hit,
            }),
            Found::Miss { variant } => {
                self.variant = variant;
                None
            }
        }
    }

    fn serve(&self, obj: StoredObject, cs: CacheStatus) -> Response<ResponseBody> {
        let client = ClientRequest {
            method: self.m.method(),
            headers: self.m.request_headers(),
        };
        self.cache
            .serve_hit(self.m.policy(), client, obj, cs, SystemTime::now())
    }

    async fn fetch(
        &mut self,
        s: &mut Session,
        f: Fetch,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match f.kind {
            FetchKind::Fill { variant } => {
                self.cache.count(f.result);
                self.fill(s, variant, f.status).await
            }
            FetchKind::Pass => {
                self.cache.count(f.result);
                let fetched = s.fetch_own().await?;
                let status = fetched.resp.status();
                let mut resp = s.finish(fetched).await?;
                let sp = self.m.policy();
                downstream_headers(resp.headers_mut(), sp);
                if sp.cache_status {
                    f.status.fwd_status(status).append_to(resp.headers_mut());
                }
                Ok(resp)
            }
            FetchKind::Range { variant } => self.range_miss(s, variant, f.status).await,
            FetchKind::Revalidate { .. } => self.revalidate(s).await,
        }
    }

    /// The leader of a miss: fetches the whole representation,
    /// unconditionally (the cache answers the client's own conditionals and
    /// ranges from it), and stores it while it streams to the client.
    async fn fill(
        &mut self,
        s: &mut Session,
        variant: Option<String>,
        cs: CacheStatus,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let mut up = s.up.clone();
        whole_representation(&mut up.parts.headers, true);
        let request_time = SystemTime::now();
        let fetched = match s.fetch(&up, RequestBody::empty()).await {
            Ok(f) => f,
            Err(e) => {
                self.fail_flight(upstream_failure(&e));
                return Err(e);
            }
        };
        let response_time = SystemTime::now();
        let cs = cs.fwd_status(fetched.resp.status());
        let resp = s.finish(fetched).await?;
        let target = StoreTarget {
            key: self.m.key().to_string(),
            variant,
            request_time,
            response_time,
            guard: self.guard.take(),
            cs,
        };
        Ok(self.store(&up, target, resp))
    }

    fn store(
        &self,
        origin: &UpstreamRequest,
        target: StoreTarget,
        resp: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let req = Answered {
            method: &origin.parts.method,
            origin: &origin.parts.headers,
            client: self.m.request_headers(),
        };
        self.cache
            .store_and_respond(self.m.policy(), req, target, resp)
    }

    /// A range request on a miss: forwarded with its `Range`. A 206 goes to
    /// the client as is, and if the whole object is at most
    /// `background_fill_max` a background fill stores it; a 200 (an origin
    /// that ignores ranges) is stored like any miss while the client's
    /// range is cut from it, and its fill stops once the client has its
    /// bytes, unless the object is small. Anything else is passed on, and
    /// marks nothing.
    async fn range_miss(
        &mut self,
        s: &mut Session,
        variant: Option<String>,
        cs: CacheStatus,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let request_time = SystemTime::now();
        let up = s.up.clone();
        let fetched = s.fetch(&up, RequestBody::empty()).await?;
        let response_time = SystemTime::now();
        let status = fetched.resp.status();
        let cs = cs.fwd_status(status);
        let sp = self.m.policy().clone();
        let key = self.m.key().to_string();
        if status == StatusCode::OK {
            self.cache.count("miss");
            let guard = match self.cache.join(&key) {
                Join::Leader(g) => Some(g),
                Join::Follower(_) => None,
            };
            let resp = s.finish(fetched).await?;
            let target = StoreTarget {
                key,
                variant,
                request_time,
                response_time,
                guard,
                cs,
            };
            return Ok(self.store(&up, target, resp));
        }
        self.cache.count("miss-range");
        if status == StatusCode::PARTIAL_CONTENT
            && crate::cache::slice::content_range(fetched.resp.headers())
                .is_some_and(|(_, _, total)| total <= sp.background_fill_max)
            // The request's plugin contexts answer for one response only.
            && up.plugins.is_none()
        {
            spawn_background_fill(s, self.cache, &sp, key.clone(), variant.clone());
        }
        let mut resp = s.finish(fetched).await?;
        // A 206 with a strong validator is kept, combined with the stored part.
        if status == StatusCode::PARTIAL_CONTENT && variant.is_none() {
            resp = crate::cache::partial::store_behind(
                self.cache,
                &sp,
                &key,
                &up.parts.method,
                &up.parts.headers,
                (request_time, response_time),
                resp,
            );
        }
        downstream_headers(resp.headers_mut(), &sp);
        if sp.cache_status {
            cs.detail("range").append_to(resp.headers_mut());
        }
        Ok(resp)
    }

    /// A stale object must be revalidated before use: a conditional
    /// request; a 304 freshens it, a new response replaces it, an error may
    /// serve it stale.
    async fn revalidate(&mut self, s: &mut Session) -> Result<Response<ResponseBody>, ProxyError> {
        let Some(obj) = self.obj.take() else {
            return Err(internal("revalidation without an object"));
        };
        let client_headers = self.m.request_headers().clone();
        let mut up = s.up.clone();
        up.parts.headers =
            policy::revalidation_request_headers(&client_headers, &obj.stored.headers);
        if up.parts.method == Method::HEAD {
            up.parts.method = Method::GET;
        }
        let now = SystemTime::now();
        let request_time = now;
        let fetched = match s.fetch(&up, RequestBody::empty()).await {
            Ok(f) => f,
            Err(e) => {
                let failure = upstream_failure(&e);
                self.fail_flight(failure);
                if self.m.on_revalidation_error(&obj.stored, failure, now) {
                    self.cache.count("stale-if-error");
                    let cs =
                        CacheStatus::hit(crate::cache::http::CACHE_NAME).detail("stale-if-error");
                    return Ok(self.serve_at(obj, cs, now));
                }
                return Err(e);
            }
        };
        let response_time = SystemTime::now();
        let status = fetched.resp.status();
        match self.m.on_revalidation_response(&obj.stored, status, now) {
            Revalidated::Freshen => {
                // Freshen the stored object with the 304's headers (RFC 9111 §4.3.4).
                let not_modified = fetched.resp.headers().clone();
                drain(fetched).await;
                let sp = self.m.policy();
                let (fresh, meta) = freshened(
                    &obj.hit.meta,
                    &not_modified,
                    sp.set_cookie,
                    request_time,
                    response_time,
                );
                let _ = self.cache.storage.update_meta(&obj.key, meta.clone()).await;
                self.cache.count("revalidated");
                let cs = CacheStatus::forward(crate::cache::http::CACHE_NAME, FwdReason::Stale)
                    .fwd_status(status);
                let obj = StoredObject {
                    key: obj.key,
                    stored: fresh,
                    hit: Hit { meta, ..obj.hit },
                };
                Ok(self.serve(obj, cs))
            }
            Revalidated::ServeStale => {
                self.fail_flight(policy::UpstreamFailure::Status(status));
                drop(fetched);
                self.cache.count("stale-if-error");
                let cs = CacheStatus::hit(crate::cache::http::CACHE_NAME)
                    .detail("stale-if-error")
                    .fwd_status(status);
                Ok(self.serve_at(obj, cs, now))
            }
            Revalidated::Replace => {
                // A new representation replaces the stored one. An error
                // this client may not be served stale for is still a failure
                // to the waiters, who judge stale-if-error by their own
                // requests.
                if policy::UpstreamFailure::Status(status).is_error() {
                    self.fail_flight(policy::UpstreamFailure::Status(status));
                }
                self.cache.count("stale-replaced");
                let (key, variant) = split_variant(&obj.key);
                let cs = CacheStatus::forward(crate::cache::http::CACHE_NAME, FwdReason::Stale)
                    .fwd_status(status);
                let resp = s.finish(fetched).await?;
                up.parts.headers = client_headers;
                up.parts.method = s.up.parts.method.clone();
                let target = StoreTarget {
                    key,
                    variant,
                    request_time,
                    response_time,
                    guard: self.guard.take(),
                    cs,
                };
                Ok(self.store(&up, target, resp))
            }
        }
    }

    /// The fetch this request leads (a fill or a revalidation) failed so:
    /// its waiters learn it when the flight ends.
    fn fail_flight(&mut self, failure: policy::UpstreamFailure) {
        if let Some(g) = &mut self.guard {
            g.fail(failure);
        }
    }

    fn serve_at(
        &self,
        obj: StoredObject,
        cs: CacheStatus,
        now: SystemTime,
    ) -> Response<ResponseBody> {
        let client = ClientRequest {
            method: self.m.method(),
            headers: self.m.request_headers(),
        };
        self.cache.serve_hit(self.m.policy(), client, obj, cs, now)
    }
}

/// How a fetch that returned no response failed, for stale-if-error.
fn upstream_failure(e: &ProxyError) -> policy::UpstreamFailure {
    match e.kind {
        ErrorKind::ConnectTimeout | ErrorKind::HeaderTimeout => policy::UpstreamFailure::Timeout,
        _ => policy::UpstreamFailure::Connect,
    }
}

fn internal(context: &'static str) -> ProxyError {
    ProxyError::new(
        ErrorKind::Internal,
        crate::error::ErrorSource::Internal,
        context,
    )
}

/// Fetches the whole object behind a range request, for no client, and
/// stores it; one per key at a time (it leads the key's flight).
fn spawn_background_fill(
    s: &Session,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    key: String,
    variant: Option<String>,
) {
    let Join::Leader(guard) = cache.join(&key) else {
        return; // a fill is already running
    };
    let mut up = s.up.clone();
    whole_representation(&mut up.parts.headers, true);
    let mut sub = s.subrequest(up);
    let (cache, sp) = (cache.clone(), sp.clone());
    let mut guard = guard;
    tokio::spawn(async move {
        let request_time = SystemTime::now();
        let fetched = match sub.fetch_own().await {
            Ok(f) => f,
            Err(e) => {
                guard.fail(upstream_failure(&e));
                cache.count("background-fill-failed");
                return;
            }
        };
        cache.count("background-fill");
        let response_time = SystemTime::now();
        let Ok(resp) = sub.finish(fetched).await else {
            return;
        };
        let target = StoreTarget {
            key,
            variant,
            request_time,
            response_time,
            guard: Some(guard),
            cs: CacheStatus::forward(crate::cache::http::CACHE_NAME, FwdReason::UriMiss),
        };
        store_for_nobody(&sub, &cache, &sp, target, resp).await;
    });
}

/// stale-while-revalidate: exactly one background revalidation per object,
/// under the flight the clients' revalidations share.
fn spawn_revalidation(
    s: &Session,
    cache: &Arc<HttpCache>,
    sp: &Arc<SitePolicy>,
    obj: &StoredObject,
) {
    let Join::Leader(guard) = cache.join(&revalidation_flight(&obj.key)) else {
        return; // one is already running
    };
    let mut up = s.up.clone();
    up.parts.method = Method::GET;
    up.parts.headers =
        policy::revalidation_request_headers(&s.up.parts.headers, &obj.stored.headers);
    up.upgrade = false;
    let mut sub = s.subrequest(up);
    let (cache, sp) = (cache.clone(), sp.clone());
    let obj_key = obj.key.clone();
    tokio::spawn(async move {
        let mut guard = guard;
        let request_time = SystemTime::now();
        let fetched = match sub.fetch_own().await {
            Ok(f) => f,
            Err(e) => {
                guard.fail(upstream_failure(&e));
                cache.count("background-revalidation-failed");
                return;
            }
        };
        let response_time = SystemTime::now();
        let status = fetched.resp.status();
        cache.count("background-revalidation");
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
            guard.fail(policy::UpstreamFailure::Status(status));
            return; // keep serving what we have
        }
        let Ok(resp) = sub.finish(fetched).await else {
            return;
        };
        let (key, variant) = split_variant(&obj_key);
        let target = StoreTarget {
            key,
            variant,
            request_time,
            response_time,
            guard: None,
            cs: CacheStatus::forward(crate::cache::http::CACHE_NAME, FwdReason::Stale),
        };
        store_for_nobody(&sub, &cache, &sp, target, resp).await;
    });
}

/// Stores a subrequest's response, which no client reads: its body is
/// driven to the end so the fill completes.
async fn store_for_nobody(
    sub: &Session,
    cache: &Arc<HttpCache>,
    sp: &SitePolicy,
    target: StoreTarget,
    resp: Response<ResponseBody>,
) {
    let req = Answered {
        method: &sub.up.parts.method,
        origin: &sub.up.parts.headers,
        client: &sub.up.parts.headers,
    };
    let resp = cache.store_and_respond(sp, req, target, resp);
    let _ = resp.into_body().collect().await;
}

/// Reads a response body to its end (so its connection can be reused).
async fn drain(fetched: Fetched) {
    let Fetched {
        resp,
        mut pool_return,
        ..
    } = fetched;
    let ok = crate::http::body::drain(resp.into_body(), 1 << 20)
        .await
        .is_ok();
    crate::http::body::OnBodyEnd::finish(&mut pool_return, ok, 0);
}

/// Unsafe methods go to the origin; a success invalidates the target URI and
/// its Location / Content-Location (RFC 9111 §4.4).
async fn unsafe_method(
    s: &mut Session,
    cache: &Arc<HttpCache>,
    key: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    let scheme = if s.up.tls { "https" } else { "http" };
    let method = s.up.parts.method.clone();
    let target: Option<http::Uri> = format!(
        "{scheme}://{}{}",
        s.up.host.as_deref().unwrap_or(""),
        s.up.path
    )
    .parse()
    .ok();
    let request_time = SystemTime::now();
    let fetched = s.fetch_own().await?;
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
    let sp = s.site()?.cache.clone();
    if method == Method::POST
        && let (Some(target), Some(sp)) = (&target, &sp)
        && policy::post_response_reusable(
            status,
            target,
            fetched.resp.headers(),
            response_time,
            &sp.policy,
        )
    {
        let mut as_get = s.up.clone();
        as_get.parts.method = Method::GET;
        let cs = CacheStatus::forward(crate::cache::http::CACHE_NAME, FwdReason::Method)
            .fwd_status(status);
        let resp = s.finish(fetched).await?;
        let target = StoreTarget {
            key: key.to_string(),
            variant: None,
            request_time,
            response_time,
            guard: None,
            cs,
        };
        let req = Answered {
            method: &as_get.parts.method,
            origin: &as_get.parts.headers,
            client: &s.up.parts.headers,
        };
        return Ok(cache.store_and_respond(sp, req, target, resp));
    }
    s.finish(fetched).await
}

/// The HTTP PURGE method (Varnish/Squid style), from allowed networks only.
async fn purge_method(
    s: &Session,
    cache: &Arc<HttpCache>,
    sp: &SitePolicy,
    key: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    if !crate::cache::acl::allowed(&sp.purge_allow, s.ds.client.ip()) {
        return Err(ProxyError::downstream(ErrorKind::Forbidden, "purge acl"));
    }
    let mut counts = PurgeCounts::default();
    // The URL's own key (already normalised by the site's options), variants and slices.
    for k in cache.keys_of_url(key) {
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

/// The cache key of an absolute URL, with the options of the site its host
/// routes to (for purges by URL).
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
