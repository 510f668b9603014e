//! The request pipeline. Every request, whatever protocol it came in on
//! (HTTP/1.1, HTTP/2, later HTTP/3), goes through [`Proxy::handle`], in these
//! phases (see `docs/phases.md` for the chart):
//!
//! 1. **request_filter**: refuse malformed or over-limit requests
//!    (smuggling flags, body size, missing Host); later, Wasm request plugins.
//! 2. **route**: pick the site for the host, or answer 421/404.
//! 3. *(cache lookup: the cache plugs in here and may answer.)*
//! 4. **upstream_request**: build the origin request: hop-by-hop removal,
//!    `Via`, forwarding headers, Host.
//! 5. **upstream_peer + send**: pick an origin, check out a connection, send;
//!    on a retry-safe failure and within the retry budget, try another.
//! 6. **upstream_response_filter**: clean the origin's response (before the
//!    cache stores it).
//! 7. **response_filter**: what every client response gets (after the cache).
//! 8. **logging**: when the body ends: access log, metrics, pool check-in.

mod cache;
pub mod headers;
pub mod modules;
pub mod phase;
pub mod router;
mod service;
pub mod session;
mod slice;
pub mod upstream;

pub(crate) use cache::key_for_url;
use phase::{Flow, Modules};
use session::Session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::accesslog::{AccessLog, LogRecord};
use crate::config::Config;
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::{ClientBody, OnBodyEnd, RequestBody, ResponseBody};
use crate::http::io::{ConnHold, InflightGuard};
use crate::metrics::{Metrics, PoolLabels, Protocol, Reason, RequestLabels, SiteBytes};
use router::{HostPattern, Router};
use upstream::conn::{Checkout, Sender};
use upstream::health::now_ms;
use upstream::{Origin, OriginInflight, Pool};

pub use crate::http::{Downstream, Proto};
pub use upstream::health::health_changed;

/// A configured site.
#[derive(Debug)]
pub struct Site {
    pub name: Arc<str>,
    pub pool: Arc<Pool>,
    pub preserve_host: bool,
    /// How the site uses the cache; None when its cache is disabled.
    pub cache: Option<Arc<crate::cache::http::SitePolicy>>,
    /// The site's Wasm plugins, run in order in the request phase.
    pub plugins: crate::plugins::Chain,
    /// The site's modules, in order: the built-in ones and its Wasm chain.
    pub modules: Modules,
    /// `meridian_site_bytes_total` for this site, resolved once per generation.
    pub bytes: SiteCounters,
    /// `meridian_requests_total` for this site, resolved once per generation.
    pub requests: Arc<SiteRequests>,
}

/// `meridian_requests_total` of one site, by protocol and status class:
/// each resolved once, at its first request, then kept for the site's
/// config generation.
#[derive(Debug)]
pub struct SiteRequests {
    metrics: Arc<Metrics>,
    site: Arc<str>,
    cells: [[std::sync::OnceLock<Counter>; 5]; 3],
}

impl SiteRequests {
    pub fn new(metrics: &Arc<Metrics>, site: &Arc<str>) -> Self {
        SiteRequests {
            metrics: metrics.clone(),
            site: site.clone(),
            cells: Default::default(),
        }
    }

    /// Counts a request of `proto` answered with `status`.
    pub fn count(&self, proto: Proto, status: u16) {
        let p = match proto {
            Proto::H1 => 0,
            Proto::H2 => 1,
            Proto::H3 => 2,
        };
        let c = usize::from((status / 100).clamp(1, 5) - 1);
        self.cells[p][c]
            .get_or_init(|| {
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        protocol: proto.label(),
                        status_class: crate::metrics::status_class(status),
                        site: self.site.clone(),
                    })
                    .clone()
            })
            .inc();
    }
}

/// A site's byte counters: read from origins, sent to clients.
#[derive(Clone, Debug, Default)]
pub struct SiteCounters {
    pub origin: Counter,
    pub client: Counter,
}

impl SiteCounters {
    pub fn new(metrics: &Metrics, site: &Arc<str>) -> Self {
        let get = |direction| {
            metrics
                .site_bytes
                .get_or_create(&SiteBytes {
                    site: site.clone(),
                    direction,
                })
                .clone()
        };
        SiteCounters {
            origin: get("origin"),
            client: get("client"),
        }
    }
}

/// Everything built from one config generation. Swapped whole on reload;
/// requests in flight keep the generation they started with.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    pub sites: Vec<Site>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub access_log: AccessLog,
    pub via: headers::ViaValues,
    /// The Wasm host, kept across generations (one engine per process).
    pub plugin_host: Option<Arc<meridian_wasm_host::PluginHost>>,
    /// The GeoIP database behind the plugins' `meridian.client.country`.
    pub geoip: Option<Arc<crate::plugins::GeoIp>>,
    /// The modules that run before routing (early_request_filter, route).
    pub modules: Modules,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("sites", &self.sites.len())
            .finish()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Runtime {
    /// Builds a generation; health state of origins carries over from `previous`.
    /// Must be called inside a tokio runtime (it starts the health checkers).
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Runtime>,
        metrics: &Arc<Metrics>,
    ) -> Result<Runtime, String> {
        let mut pools = HashMap::new();
        for (name, pc) in &config.pools {
            let prev = previous.and_then(|r| r.pools.get(name)).map(|p| p.as_ref());
            pools.insert(name.clone(), Arc::new(Pool::new(name, pc, prev, metrics)?));
        }
        let mut patterns = Vec::new();
        let mut sites = Vec::new();
        let plugin_host = match previous.and_then(|r| r.plugin_host.clone()) {
            Some(h) => Some(h),
            None if config.sites.iter().any(|s| !s.plugins.is_empty()) => {
                Some(crate::plugins::new_host(&config.plugins)?)
            }
            None => None,
        };
        for sc in &config.sites {
            let pool = pools
                .get(&sc.pool)
                .ok_or_else(|| format!("no pool {:?}", sc.pool))?
                .clone();
            patterns.push(sc.hosts.clone());
            let name: Arc<str> = Arc::from(sc.hosts.first().map_or("*", HostPattern::as_str));
            let plugins: crate::plugins::Chain = match &plugin_host {
                Some(h) if !sc.plugins.is_empty() => crate::plugins::load_chain(
                    h,
                    sc.hosts.first().map_or("*", HostPattern::as_str),
                    &sc.plugins,
                )?
                .into(),
                _ => Arc::from(Vec::new()),
            };
            let mut site_modules: Vec<Arc<dyn phase::HttpModule>> =
                vec![Arc::new(modules::ProxyHeaders)];
            if !plugins.is_empty() {
                site_modules.push(Arc::new(modules::WasmChain {
                    chain: plugins.clone(),
                }));
            }
            sites.push(Site {
                bytes: SiteCounters::new(metrics, &name),
                requests: Arc::new(SiteRequests::new(metrics, &name)),
                name,
                pool,
                preserve_host: sc.preserve_host,
                cache: sc.cache.enabled.then(|| {
                    Arc::new(crate::cache::http::SitePolicy::new(
                        &sc.cache,
                        &config.cache,
                    ))
                }),
                plugins,
                modules: phase::ordered(site_modules),
            });
        }
        let access_log = AccessLog::open(&config.log.access_log, metrics.clone())
            .map_err(|e| format!("access log: {e}"))?;
        let geoip = match &config.plugins.geoip {
            Some(p) => Some(Arc::new(crate::plugins::GeoIp::open(p)?)),
            None => None,
        };
        let mut tasks: Vec<_> = pools
            .values()
            .flat_map(|p| upstream::health::spawn_checkers(p.clone(), metrics.clone()))
            .collect();
        for s in &sites {
            tasks.extend(crate::plugins::spawn_tickers(&s.plugins));
        }
        Ok(Runtime {
            router: Router::new(&patterns),
            sites,
            pools,
            access_log,
            via: headers::ViaValues::new(&config.server.via),
            plugin_host,
            geoip,
            modules: phase::ordered(vec![Arc::new(modules::RequestChecks)]),
            tasks,
            config,
        })
    }
}

/// The proxy: the current generation plus process-wide state.
pub struct Proxy {
    runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// `Alt-Svc` values by local TLS port, for listeners that serve HTTP/3.
    alt_svc: ArcSwap<HashMap<u16, HeaderValue>>,
    /// The shared cache (its storage outlives config generations).
    pub cache: Option<Arc<crate::cache::http::HttpCache>>,
    /// `meridian_requests_total` of requests no site took.
    unrouted: Arc<SiteRequests>,
    /// `meridian_request_duration_seconds` by protocol, resolved once.
    durations: [prometheus_client::metrics::histogram::Histogram; 3],
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proxy")
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Proxy {
    pub fn new(
        runtime: Runtime,
        metrics: Arc<Metrics>,
        cache: Option<Arc<crate::cache::http::HttpCache>>,
    ) -> Arc<Self> {
        let duration = |p: Proto| {
            metrics
                .request_duration
                .get_or_create(&Protocol {
                    protocol: p.label(),
                })
                .clone()
        };
        Arc::new(Proxy {
            unrouted: Arc::new(SiteRequests::new(&metrics, &Arc::from("-"))),
            durations: [
                duration(Proto::H1),
                duration(Proto::H2),
                duration(Proto::H3),
            ],
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            draining: AtomicBool::new(false),
            alt_svc: ArcSwap::from_pointee(HashMap::new()),
            cache,
        })
    }

    /// The `Alt-Svc` value advertised on a TLS port, if it serves HTTP/3.
    pub fn alt_svc_for(&self, port: u16) -> Option<HeaderValue> {
        self.alt_svc.load().get(&port).cloned()
    }

    /// Sets the `Alt-Svc` value advertised on each TLS port.
    pub fn set_alt_svc(&self, by_port: HashMap<u16, HeaderValue>) {
        self.alt_svc.store(Arc::new(by_port));
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn swap(&self, rt: Runtime) {
        self.runtime.store(Arc::new(rt));
    }

    pub fn set_draining(&self, v: bool) {
        self.draining.store(v, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Runs one request through the phases (see `docs/phases.md`).
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<ClientBody>,
        ds: &Downstream,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let rt = self.runtime();
        let seq = ds.conn.requests.fetch_add(1, Ordering::AcqRel);
        let inflight = InflightGuard::new(&ds.conn);
        let rec = LogRecord::begin(&req, ds, rt.access_log.enabled());
        let (parts, body) = req.into_parts();
        let up = UpstreamRequest::from_client(parts, ds.tls);
        let mut s = Session::new(self.clone(), rt, ds.clone(), up, rec, (seq, body));
        let mut resp = match self.pipeline(&mut s).await {
            Ok(r) => r,
            Err(e) => s.error_response(e),
        };
        // response_filter: every client response, in module order.
        let modules = s.site_modules();
        s.response_filter(&mut resp, &modules).await;
        let d = match ds.proto {
            Proto::H1 => &self.durations[0],
            Proto::H2 => &self.durations[1],
            Proto::H3 => &self.durations[2],
        };
        d.observe(start.elapsed().as_secs_f64());
        s.rec.status = resp.status().as_u16();
        let end = s.into_end(start, inflight, modules);
        resp.body_mut().on_end(end);
        resp
    }

    /// The request phases, then the cache or the origin.
    async fn pipeline(
        self: &Arc<Self>,
        s: &mut Session,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let rt = s.rt.clone();
        // 1. early_request_filter
        for m in rt.modules.iter() {
            if let Flow::Respond(r) = m.early_request_filter(s)? {
                return Ok(*r);
            }
        }
        // 2. route: a module may choose; the router decides otherwise.
        let site_idx = rt
            .modules
            .iter()
            .find_map(|m| m.route(s))
            .or_else(|| rt.router.route(s.up.host.as_deref()))
            .ok_or_else(|| ProxyError::downstream(ErrorKind::UnknownHost, "route"))?;
        s.set_site(site_idx);
        let site = rt
            .sites
            .get(site_idx)
            .ok_or_else(|| ProxyError::downstream(ErrorKind::UnknownHost, "route"))?;
        s.rec.site = Some(site.name.clone());
        s.up.bytes = site.bytes.clone();
        s.up.preserve_host = site.preserve_host;
        let modules = site.modules.clone();
        // 3. request_filter, 4. request_body_filter: the site's modules.
        for m in modules.iter() {
            if let Some(f) = m.request_filter(s)
                && let Flow::Respond(r) = f.await?
            {
                return Ok(*r);
            }
        }
        for m in modules.iter() {
            if let Some(f) = m.request_body_filter(s)
                && let Flow::Respond(r) = f.await?
            {
                return Ok(*r);
            }
        }
        // 5. upstream_request_filter: what goes to the origin, whatever
        // answers it.
        s.up.upgrade = s.ds.proto == Proto::H1 && headers::wants_upgrade(&s.up.parts.headers);
        let client_upgrade = if s.up.upgrade {
            s.up.parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        for m in modules.iter() {
            m.upstream_request_filter(s)?;
        }
        // upstream_peer: a module may choose the origin to try first.
        let peer = modules.iter().find_map(|m| m.upstream_peer(s, &site.pool));
        s.up.peer = peer.filter(|&i| i < site.pool.origins.len());
        s.up.path =
            s.up.parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
        let pool = site.pool.clone();
        let max_body = rt.config.limits.max_body_bytes.get();
        let client_body = s.client_body.take().unwrap_or(ClientBody::Empty);
        s.body = Some(
            RequestBody::new(client_body, max_body, s.too_large.clone())
                .with_idle_timeout(pool.config.timeouts.idle.get()),
        );

        // 6. cache: may answer, or fetch and store.
        if !s.up.upgrade
            && let (Some(cache), Some(policy)) = (&self.cache, &site.cache)
        {
            let policy = policy.clone();
            return cache::handle(s, cache, &policy).await;
        }

        // 7. upstream_peer + send, with retries.
        let fetched = s.fetch_own().await?;
        // An upgraded connection stays counted while its tunnel lives.
        let client_upgrade = client_upgrade.map(|u| (u, s.ds.conn.hold.get().cloned()));
        let upgrade = s.up.upgrade;
        let mut resp = self
            .finish_response(fetched, &pool, upgrade, client_upgrade)
            .await?;
        // A switched connection belongs to its tunnel: no module sees it.
        if !(upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
            s.upstream_response_filter(&mut resp).await?;
        }
        Ok(resp)
    }

    /// Sends a request to `pool`: picks an origin, checks out a connection,
    /// sends, and retries on another origin when that is safe and the retry
    /// budget allows. The response's connection goes back to the pool when
    /// its body ends ([`Fetched::pool_return`]).
    pub async fn fetch(
        &self,
        pool: &Arc<Pool>,
        up: &UpstreamRequest,
        body: RequestBody,
        too_large: &AtomicBool,
        rec: &mut LogRecord,
    ) -> Result<Fetched, ProxyError> {
        let hash_key = if pool.uses_hash() {
            upstream::select::hash64(&[
                up.host.as_deref().unwrap_or("").as_bytes(),
                up.path.as_bytes(),
            ])
        } else {
            0
        };
        let replayable = body.is_empty() && is_idempotent(&up.parts.method);
        let mut body = Some(body);
        pool.budget.deposit(now_ms() / 1000);
        let mut tried: Vec<usize> = Vec::with_capacity(2);
        let mut attempt = 0u32;
        let mut pending: Option<Request<RequestBody>> = None;
        let origin_bytes = &up.bytes.origin;
        loop {
            attempt += 1;
            let now = now_ms();
            let slow = pool
                .config
                .slow_start
                .map_or(0, |d| d.get().as_millis() as u64);
            let panic =
                upstream::select::in_panic(&pool.origins, now, pool.config.healthy_panic_threshold);
            if panic {
                self.metrics
                    .pool_panic
                    .get_or_create(&PoolLabels {
                        pool: pool.name.clone(),
                    })
                    .inc();
            }
            let chosen = up.peer.filter(|&i| attempt == 1 && i < pool.origins.len());
            let idx = match chosen {
                Some(i) => i,
                None => pool
                    .selector
                    .pick(&pool.origins, hash_key, now, slow, &tried, panic)
                    .ok_or_else(|| ProxyError::upstream(ErrorKind::NoHealthyOrigin, "select"))?,
            };
            let origin = pool.origins[idx].clone();
            tried.push(idx);
            rec.origin = Some(origin.label.clone());
            rec.attempts = attempt;
            let req = match pending.take() {
                Some(r) => r,
                None => {
                    let b = if replayable {
                        RequestBody::empty()
                    } else {
                        body.take().unwrap_or_else(RequestBody::empty)
                    };
                    build_upstream_request(
                        &up.parts,
                        &origin,
                        up.preserve_host,
                        up.host.as_deref(),
                        &up.path,
                        b,
                    )?
                }
            };
            let err = match self
                .send(pool, &origin, req, up.upgrade, origin_bytes.clone())
                .await
            {
                Ok((resp, pool_return)) => {
                    let status = resp.status();
                    self.record_outcome(pool, &origin, !matches!(status.as_u16(), 502..=504));
                    rec.upstream_status = Some(status.as_u16());
                    return Ok(Fetched { resp, pool_return });
                }
                Err((e, returned)) => {
                    pending = returned;
                    e
                }
            };
            if too_large.load(Ordering::Acquire) {
                return Err(ProxyError::downstream(ErrorKind::BodyTooLarge, "body"));
            }
            if err.source == crate::error::ErrorSource::Upstream {
                self.record_outcome(pool, &origin, false);
            }
            let can_retry = (err.retry_safe && (pending.is_some() || replayable || body.is_some()))
                || (replayable
                    && matches!(
                        err.kind,
                        ErrorKind::HeaderTimeout | ErrorKind::UpstreamProtocol
                    ));
            if !can_retry
                || attempt >= pool.config.retry.attempts
                || !pool.budget.try_withdraw(now_ms() / 1000)
            {
                return Err(err);
            }
            tracing::debug!(error = %err, attempt, method = %up.parts.method, "retrying on another origin");
            self.metrics
                .upstream_retries
                .get_or_create(&PoolLabels {
                    pool: pool.name.clone(),
                })
                .inc();
            // A retried attempt's error is counted here; the last one where
            // it becomes the response (`Session::error_response`).
            err.count(&self.metrics, Some(&pool.name));
        }
    }

    /// A plugin's `http_call`: to the pool named `upstream` in the config,
    /// bounded by the call's timeout (at most 60 s) and by
    /// `[plugins] http_call_max_body`. `None` when it fails.
    async fn plugin_http_call(
        self: &Arc<Self>,
        rt: &Runtime,
        call: meridian_wasm_host::HttpCallRequest,
    ) -> Option<meridian_wasm_host::HttpCallResponse> {
        let Some(pool) = rt.pools.get(&call.upstream).cloned() else {
            tracing::warn!(upstream = %call.upstream, "plugin http_call to a pool that is not configured");
            return None;
        };
        let (mut parts, ()) = Request::new(()).into_parts();
        let mut host = None;
        let mut path = String::from("/");
        let mut method = Some(Method::GET);
        parts.headers = crate::plugins::header_map(&call.headers, |n, v| match n {
            ":method" => method = Method::from_bytes(v).ok(),
            ":path" => path = String::from_utf8_lossy(v).into_owned(),
            ":authority" => host = Some(String::from_utf8_lossy(v).into_owned()),
            _ => {}
        });
        parts.method = method?;
        parts.uri = path.parse().ok()?;
        let body = if call.body.is_empty() {
            RequestBody::empty()
        } else {
            RequestBody::new(ClientBody::Full(Some(call.body.clone())), 0, Arc::default())
        };
        let up = UpstreamRequest {
            // A plugin's call is not a site's traffic: counted nowhere.
            bytes: SiteCounters::default(),
            parts,
            host,
            path,
            preserve_host: true,
            upgrade: false,
            tls: false,
            plugins: None,
            peer: None,
        };
        let max = usize::try_from(rt.config.plugins.http_call_max_body.get()).unwrap_or(usize::MAX);
        let timeout = call
            .timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(60));
        let exchange = async {
            let mut rec = LogRecord::background();
            let flag = AtomicBool::new(false);
            let fetched = self.fetch(&pool, &up, body, &flag, &mut rec).await.ok()?;
            let resp = self
                .finish_response(fetched, &pool, false, None)
                .await
                .ok()?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, max)
                .collect()
                .await
                .ok()?
                .to_bytes();
            let mut headers: meridian_wasm_host::HeaderList =
                Vec::with_capacity(parts.headers.len() + 1);
            headers.push((":status".into(), parts.status.as_str().as_bytes().to_vec()));
            crate::plugins::push_headers(&mut headers, &parts.headers);
            Some(meridian_wasm_host::HttpCallResponse {
                headers,
                body,
                trailers: Vec::new(),
            })
        };
        let r = tokio::time::timeout(timeout, exchange).await.ok().flatten();
        if r.is_none() {
            tracing::info!(upstream = %call.upstream, "plugin http_call failed or timed out");
        }
        r
    }

    fn record_outcome(&self, pool: &Pool, origin: &Origin, ok: bool) {
        let p = &pool.config.passive;
        if let Some(t) = origin.health.record_request(
            ok,
            p.max_failures,
            p.ejection_time.get().as_millis() as u64,
            now_ms(),
        ) {
            health_changed(&self.metrics, pool, origin, t, "passive");
        }
    }

    /// Sends one attempt. On failure, gives back the request if it was never
    /// sent, so it can go to another origin unchanged.
    async fn send(
        &self,
        pool: &Arc<Pool>,
        origin: &Arc<Origin>,
        req: Request<RequestBody>,
        upgrade: bool,
        origin_bytes: prometheus_client::metrics::counter::Counter,
    ) -> Result<(Response<Incoming>, PoolReturn), (ProxyError, Option<Request<RequestBody>>)> {
        pool.requests.inc();
        let t = pool.config.timeouts.connect.get();
        let connect_start = Instant::now();
        let checkout = if upgrade {
            match pool.connector.connect(&origin.addr, true).await {
                Ok(sender) => Checkout {
                    sender,
                    reused: false,
                    permit: None,
                },
                Err(e) => return Err((e, Some(req))),
            }
        } else {
            match origin
                .conns
                .checkout(&pool.connector, &origin.addr, t)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    self.metrics
                        .upstream_connects
                        .get_or_create(&crate::metrics::Outcome {
                            result: e.kind.label(),
                        })
                        .inc();
                    return Err((e, Some(req)));
                }
            }
        };
        if !checkout.reused {
            self.metrics.conn.upstream_connect_ok.inc();
            self.metrics
                .upstream_connect_duration
                .observe(connect_start.elapsed().as_secs_f64());
        }
        let header_timeout = pool.config.timeouts.header.get();
        let guard = OriginInflight::new(origin);
        let Checkout {
            sender,
            permit,
            reused,
        } = checkout;
        let mut req = req;
        let (sender, fut) = match sender {
            Sender::H1(mut s) => {
                // HTTP/1.1 sends the origin form; the authority is in Host.
                let pq = req.uri().path_and_query().cloned();
                let mut up = http::uri::Parts::default();
                up.path_and_query = pq;
                if let Ok(u) = http::Uri::from_parts(up) {
                    *req.uri_mut() = u;
                }
                // The origin's 1xx interim responses go on to an HTTP/1.1 client.
                if let Some(sink) = req
                    .extensions_mut()
                    .remove::<crate::http::interim::InterimSink>()
                {
                    hyper::ext::on_informational(&mut req, move |r| {
                        sink.push(r.status(), r.headers());
                    });
                }
                let f = s.try_send_request(req);
                (Sender::H1(s), futures_util::future::Either::Left(f))
            }
            Sender::H2(mut s) => {
                // HTTP/2 carries the authority as :authority, not Host.
                req.headers_mut().remove(header::HOST);
                let f = s.try_send_request(req);
                (Sender::H2(s), futures_util::future::Either::Right(f))
            }
        };
        match tokio::time::timeout(header_timeout, fut).await {
            // An HTTP/2 connection stays usable: only this stream timed out.
            Err(_) => Err((
                ProxyError::upstream(ErrorKind::HeaderTimeout, "response head"),
                None,
            )),
            Ok(Err(mut e)) => {
                let returned = e.take_message();
                if matches!(sender, Sender::H2(_)) {
                    origin.conns.forget_h2();
                }
                let err = ProxyError::upstream(
                    ErrorKind::UpstreamProtocol,
                    if reused {
                        "reused connection"
                    } else {
                        "exchange"
                    },
                )
                .with_cause(e.into_error())
                .retry_safe(returned.is_some());
                Err((err, returned))
            }
            Ok(Ok(resp)) => Ok((
                resp,
                PoolReturn {
                    origin: origin.clone(),
                    sender: Some(sender),
                    permit,
                    origin_bytes,
                    _guard: guard,
                },
            )),
        }
    }

    pub(crate) async fn finish_response(
        &self,
        fetched: Fetched,
        pool: &Pool,
        upgrade: bool,
        client_upgrade: Option<(hyper::upgrade::OnUpgrade, Option<ConnHold>)>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Fetched { resp, pool_return } = fetched;
        let (mut parts, body) = resp.into_parts();
        if upgrade && parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let Some((client_upgrade, hold)) = client_upgrade else {
                return Err(ProxyError::upstream(ErrorKind::Internal, "upgrade"));
            };
            let Some(origin_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
            else {
                return Err(ProxyError::upstream(
                    ErrorKind::UpstreamProtocol,
                    "origin upgrade",
                ));
            };
            let idle = pool.config.timeouts.idle.get();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                tunnel(client_upgrade, origin_upgrade, idle, &metrics).await;
                drop(hold);
            });
            headers::strip_hop_by_hop(&mut parts.headers, true);
            // The connection now belongs to the tunnel: never back to the pool.
            drop(pool_return);
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }
        // The proxy's part of upstream_response_filter: hop-by-hop fields go,
        // and the body gets the pool's timeouts. The modules' part is
        // `Session::upstream_response_filter`.
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let deadline = pool.config.timeouts.total.map(|t| Instant::now() + t.get());
        let mut body = ResponseBody::upstream(body, pool.config.timeouts.idle.get(), deadline);
        body.on_end(pool_return);
        Ok(Response::from_parts(parts, body))
    }
}

/// The session's parts that need the module lists (kept here, so that the
/// session and the phases do not import each other).
impl Session {
    /// The modules of the routed site; before routing, the generation's.
    pub fn site_modules(&self) -> Modules {
        match self.site() {
            Ok(site) => site.modules.clone(),
            Err(_) => self.rt.modules.clone(),
        }
    }

    /// response_filter: the modules on the client's response; a module's
    /// failure replaces the response with its error's, which the later
    /// modules then see.
    pub async fn response_filter(&mut self, resp: &mut Response<ResponseBody>, modules: &Modules) {
        for m in modules.iter() {
            let r = match m.response_filter(self, resp) {
                Some(f) => f.await,
                None => Ok(()),
            };
            if let Err(e) = r {
                *resp = self.error_response(e);
            }
        }
        // response_body_filter: the modules' filters over the body's data.
        for m in modules.iter() {
            if let Some(f) = m.response_body_filter(self, resp) {
                resp.body_mut().add_filter(f);
            }
        }
    }

    /// The end-of-exchange hook for the response body: it holds the plugin
    /// contexts, the log record and the modules' logging phase.
    pub(super) fn into_end(
        self,
        start: Instant,
        inflight: InflightGuard,
        modules: Modules,
    ) -> ExchangeEnd {
        let site = self.site().ok();
        ExchangeEnd {
            requests: site.map_or_else(|| self.proxy.unrouted.clone(), |s| s.requests.clone()),
            client_bytes: site.map(|s| s.bytes.client.clone()),
            rec: Some(self.rec),
            start,
            proto: self.ds.proto,
            modules,
            _plugins: self.up.plugins,
            _inflight: inflight,
            rt: self.rt,
        }
    }
}

/// Copies bytes both ways between an upgraded client and origin connection,
/// until either side closes or nothing moves either way for `idle` (the
/// pool's idle timeout, as nginx's `proxy_read_timeout` bounds WebSockets).
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    origin: hyper::upgrade::OnUpgrade,
    idle: Duration,
    metrics: &Metrics,
) {
    let (Ok(c), Ok(o)) = tokio::join!(client, origin) else {
        tracing::debug!("upgrade did not complete");
        return;
    };
    let last = Arc::new(parking_lot::Mutex::new(Instant::now()));
    let mut c = Watched {
        io: hyper_util::rt::TokioIo::new(c),
        last: last.clone(),
    };
    let mut o = Watched {
        io: hyper_util::rt::TokioIo::new(o),
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut o);
    tokio::pin!(copy);
    loop {
        let deadline = *last.lock() + idle;
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                if *last.lock() + idle <= Instant::now() {
                    tracing::debug!("tunnel idle: closing");
                    metrics
                        .client_timeouts
                        .get_or_create(&Reason { reason: "tunnel-idle" })
                        .inc();
                    return;
                }
            }
        }
    }
}

/// An upgraded stream that records when bytes last moved.
struct Watched<T> {
    io: T,
    last: Arc<parking_lot::Mutex<Instant>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            *self.last.lock() = Instant::now();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            *self.last.lock() = Instant::now();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn build_upstream_request(
    parts: &http::request::Parts,
    origin: &Origin,
    preserve_host: bool,
    host: Option<&str>,
    path: &str,
    body: RequestBody,
) -> Result<Request<RequestBody>, ProxyError> {
    let mut b = Request::builder().method(parts.method.clone());
    let mut headers = parts.headers.clone();
    let authority: &str = match host {
        Some(h) if preserve_host => h,
        _ => origin.addr.authority.as_str(),
    };
    // HTTP/2 to the origin carries the authority in the URI; HTTP/1.1 in Host.
    let uri = format!("{}://{}{}", origin.addr.scheme(), authority, path);
    b = b.uri(uri.as_str());
    headers.insert(
        header::HOST,
        HeaderValue::from_str(authority)
            .map_err(|_| ProxyError::downstream(ErrorKind::BadRequest("bad-host"), "host"))?,
    );
    let mut req = b.body(body).map_err(|e| {
        ProxyError::downstream(ErrorKind::BadRequest("bad-uri"), "uri").with_cause(e)
    })?;
    *req.headers_mut() = headers;
    if let Some(sink) = parts.extensions.get::<crate::http::interim::InterimSink>() {
        req.extensions_mut().insert(sink.clone());
    }
    Ok(req)
}

/// An origin's response and the connection it came on.
pub struct Fetched {
    pub resp: Response<Incoming>,
    /// Returns the connection to its pool when the body ends complete.
    pub pool_return: PoolReturn,
}

/// The request that goes to the origin, prepared once per client request.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The byte counters of the site the request was routed to.
    pub bytes: SiteCounters,
    /// Method, URI, version and headers after the request filters.
    pub parts: http::request::Parts,
    pub host: Option<String>,
    pub path: String,
    pub preserve_host: bool,
    pub upgrade: bool,
    /// The client came over TLS (the cache key's scheme).
    pub tls: bool,
    /// The request's live plugin contexts, for the response phase.
    pub plugins: Option<crate::plugins::SharedExchange>,
    /// The origin (index into the pool's origins) a module's upstream_peer
    /// chose for the first attempt; None: the load balancer picks.
    pub peer: Option<usize>,
}

impl UpstreamRequest {
    /// The client's request as it arrived, before any phase: the site's
    /// fields are filled in by routing, the host by the request checks, the
    /// path by upstream_request_filter.
    pub(crate) fn from_client(parts: http::request::Parts, tls: bool) -> Self {
        UpstreamRequest {
            bytes: SiteCounters::default(),
            parts,
            host: None,
            path: String::new(),
            preserve_host: false,
            upgrade: false,
            tls,
            plugins: None,
            peer: None,
        }
    }
}

/// The connection an exchange used, returned to its pool when the body ends.
pub struct PoolReturn {
    origin: Arc<Origin>,
    sender: Option<Sender>,
    permit: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    origin_bytes: prometheus_client::metrics::counter::Counter,
    _guard: OriginInflight,
}

/// Runs when a response body ends: metrics, the access log, and the
/// modules' logging phase. Holds the plugin contexts until then (dropping
/// them runs their `on_log`).
pub(crate) struct ExchangeEnd {
    rt: Arc<Runtime>,
    rec: Option<LogRecord>,
    start: Instant,
    proto: Proto,
    /// `meridian_requests_total` of the routed site.
    requests: Arc<SiteRequests>,
    /// The routed site's client byte counter.
    client_bytes: Option<Counter>,
    modules: Modules,
    /// Plugin contexts live until the response body ends (then `on_log`).
    _plugins: Option<crate::plugins::SharedExchange>,
    _inflight: InflightGuard,
}

impl OnBodyEnd for PoolReturn {
    fn finish(&mut self, complete: bool, bytes: u64) {
        self.origin_bytes.inc_by(bytes);
        if complete && let Some(Sender::H1(s)) = self.sender.take() {
            self.origin.conns.checkin(s, self.permit.take());
        }
    }
}

impl OnBodyEnd for ExchangeEnd {
    fn finish(&mut self, complete: bool, bytes: u64) {
        if let Some(mut rec) = self.rec.take() {
            rec.bytes_out = bytes;
            rec.complete = complete;
            rec.duration = self.start.elapsed();
            if let Some(c) = &self.client_bytes {
                c.inc_by(bytes);
            }
            self.requests.count(self.proto, rec.status);
            for m in self.modules.iter() {
                m.logging(&rec);
            }
            self.rt.access_log.write(&rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use meridian_e2e::origin::TestOrigin;

    async fn proxy_for(origin: &TestOrigin) -> Arc<Proxy> {
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[log]\naccess_log = \"off\"\n[[sites]]\nhosts = [\"*\"]\npool = \"o\"\n[pools.o]\norigins = [{{ url = \"{}\" }}]\n",
            origin.url()
        );
        let cfg = Arc::new(Config::from_toml(&src, "test").expect("config"));
        let metrics = Metrics::new();
        Proxy::new(
            Runtime::build(cfg, None, &metrics).expect("runtime"),
            metrics,
            None,
        )
    }

    fn downstream(early: bool) -> Downstream {
        Downstream {
            client: "127.0.0.1:1".parse().expect("addr"),
            local: "127.0.0.1:443".parse().expect("addr"),
            tls: true,
            proto: Proto::H3,
            conn: Arc::default(),
            early,
        }
    }

    fn request(method: Method) -> Request<ClientBody> {
        Request::builder()
            .method(method)
            .uri("https://a.test/echo")
            .body(ClientBody::Empty)
            .expect("request")
    }

    #[tokio::test]
    async fn early_data_allows_only_safe_methods_and_marks_them() {
        let origin = TestOrigin::start("o").await.expect("origin");
        let proxy = proxy_for(&origin).await;
        let r = proxy.handle(request(Method::POST), &downstream(true)).await;
        assert_eq!(r.status(), StatusCode::TOO_EARLY);
        assert_eq!(
            origin.requests(),
            0,
            "a 0-RTT POST never reaches the origin"
        );

        let r = proxy.handle(request(Method::GET), &downstream(true)).await;
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.expect("body").to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let early = j["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|x| x[0] == "early-data"))
            .map(|x| x[1].clone());
        assert_eq!(
            early,
            Some("1".into()),
            "RFC 8470: Early-Data: 1 toward the origin"
        );

        // Not early: POST goes through, without the marker.
        let r = proxy
            .handle(request(Method::POST), &downstream(false))
            .await;
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("early-data"));
    }
}

/// The upstream_peer and response_body_filter phases, through a proxy in
/// front of two real origins.
#[cfg(test)]
mod phase_tests {
    use super::phase::{HttpModule, PhaseFuture};
    use super::*;
    use crate::http::body::BodyFilter;
    use crate::util::BoxError;
    use bytes::Bytes;
    use meridian_e2e::origin::TestOrigin;

    /// Sends every request to the pool's second origin.
    struct SecondOrigin;

    impl HttpModule for SecondOrigin {
        fn name(&self) -> &'static str {
            "second-origin"
        }
        fn upstream_peer(&self, _s: &Session, pool: &Pool) -> Option<usize> {
            (pool.origins.len() > 1).then_some(1)
        }
    }

    /// Upper-cases the body and appends the count of chunks it saw.
    struct Shout;

    struct ShoutFilter {
        chunks: usize,
        ended: usize,
    }

    impl BodyFilter for ShoutFilter {
        fn filter(&mut self, chunk: &mut Bytes, end: bool) -> Result<(), BoxError> {
            if end {
                self.ended += 1;
                *chunk = Bytes::from(format!("\n[{} chunks, end {}]", self.chunks, self.ended));
            } else {
                self.chunks += 1;
                *chunk = Bytes::from(chunk.to_ascii_uppercase());
            }
            Ok(())
        }
    }

    impl HttpModule for Shout {
        fn name(&self) -> &'static str {
            "shout"
        }
        fn response_filter<'a>(
            &'a self,
            _s: &'a Session,
            resp: &'a mut Response<ResponseBody>,
        ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            None
        }
        fn response_body_filter(
            &self,
            _s: &Session,
            _resp: &Response<ResponseBody>,
        ) -> Option<Box<dyn BodyFilter>> {
            Some(Box::new(ShoutFilter {
                chunks: 0,
                ended: 0,
            }))
        }
    }

    /// A proxy over one pool of `urls`: its site's modules plus `extra`.
    fn proxy_over(urls: &[String], extra: Vec<Arc<dyn HttpModule>>) -> Arc<Proxy> {
        let origins: Vec<String> = urls
            .iter()
            .map(|u| format!("{{ url = \"{u}\" }}"))
            .collect();
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[log]\naccess_log = \"off\"\n[[sites]]\nhosts = [\"*\"]\npool = \"o\"\n[pools.o]\norigins = [{}]\n",
            origins.join(", ")
        );
        let cfg = Arc::new(Config::from_toml(&src, "test").expect("config"));
        let metrics = Metrics::new();
        let mut rt = Runtime::build(cfg, None, &metrics).expect("runtime");
        let mut mods: Vec<Arc<dyn HttpModule>> = rt.sites[0].modules.iter().cloned().collect();
        mods.extend(extra);
        rt.sites[0].modules = phase::ordered(mods);
        Proxy::new(rt, metrics, None)
    }

    fn ds() -> crate::http::Downstream {
        crate::http::Downstream {
            client: "127.0.0.1:1".parse().expect("addr"),
            local: "127.0.0.1:80".parse().expect("addr"),
            tls: false,
            proto: Proto::H1,
            conn: Arc::default(),
            early: false,
        }
    }

    fn get(path: &str) -> Request<ClientBody> {
        Request::builder()
            .uri(format!("http://a.test{path}"))
            .header("host", "a.test")
            .body(ClientBody::Empty)
            .expect("request")
    }

    #[tokio::test]
    async fn upstream_peer_chooses_the_origin_and_the_balancer_decides_by_default() {
        let (a, b) = (
            TestOrigin::start("a").await.expect("origin a"),
            TestOrigin::start("b").await.expect("origin b"),
        );
        // Default: the balancer spreads the requests over both origins.
        let proxy = proxy_over(&[a.url(), b.url()], vec![]);
        for _ in 0..8 {
            let r = proxy.handle(get("/echo"), &ds()).await;
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.expect("body");
        }
        assert!(
            a.requests() > 0 && b.requests() > 0,
            "a {} b {}",
            a.requests(),
            b.requests()
        );

        let (a, b) = (
            TestOrigin::start("a").await.expect("origin a"),
            TestOrigin::start("b").await.expect("origin b"),
        );
        let proxy = proxy_over(&[a.url(), b.url()], vec![Arc::new(SecondOrigin)]);
        for _ in 0..8 {
            let r = proxy.handle(get("/echo"), &ds()).await;
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.expect("body");
        }
        assert_eq!(
            (a.requests(), b.requests()),
            (0, 8),
            "every request to the chosen origin"
        );
    }

    #[tokio::test]
    async fn upstream_peer_retries_go_through_the_balancer() {
        let a = TestOrigin::start("a").await.expect("origin a");
        // The chosen origin refuses connections: a closed port.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
        drop(dead);
        let proxy = proxy_over(&[a.url(), dead_url], vec![Arc::new(SecondOrigin)]);
        let r = proxy.handle(get("/echo"), &ds()).await;
        assert_eq!(r.status(), 200, "the retry went to the live origin");
        r.into_body().collect().await.expect("body");
        assert_eq!(a.requests(), 1);
    }

    #[tokio::test]
    async fn response_body_filter_sees_every_chunk_and_the_end_once() {
        let (a, b) = (
            TestOrigin::start("a").await.expect("origin a"),
            TestOrigin::start("b").await.expect("origin b"),
        );
        let proxy = proxy_over(&[a.url(), b.url()], vec![Arc::new(Shout)]);
        let r = proxy.handle(get("/echo"), &ds()).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get(header::CONTENT_LENGTH).is_none());
        let body = r.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("\"HEADERS\""), "upper-cased: {text}");
        assert!(text.ends_with(", end 1]"), "the end, once: {text}");
        assert!(!text.contains("\"headers\""));
    }
}
