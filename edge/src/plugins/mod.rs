//! The adapter between the request pipeline and the Wasm host
//! (`meridian-wasm-host`).
//!
//! - **Loading:** [`load_chain`] compiles each site's plugin chain when a
//!   config generation is built; a bad module refuses the config.
//! - **Request phase:** [`run_request`] runs after routing and before the
//!   cache, so a request a plugin refuses never reaches the cache or the
//!   origin. A plugin that pauses for an `http_call` is resumed when the call
//!   (to a pool named in the config) answers.
//! - **Response phase:** [`response_phase`] runs the same contexts, in reverse
//!   chain order (as Envoy does), on origin responses before they are stored
//!   ([`Phase::Store`]), or on every client response, cache hits included,
//!   for plugins with `every_response` ([`Phase::Deliver`]).
//! - **Request bodies:** [`request_body_phase`] runs a request's body (and
//!   its trailers) through `on_request_body` in chain order before the cache
//!   and the origin, with the same buffering rules as response bodies.
//! - **Instances:** a plugin instance hosts many requests' contexts (as an
//!   Envoy VM does). A request is pinned to one instance but holds it only
//!   while one of its callbacks runs, so slow or stalled clients hold no
//!   instance and cannot exhaust them. A plugin with no instance at all, and
//!   no slot to make one, makes the request wait (bounded by `[plugins]
//!   instance_wait`, which also bounds the wait for an instance busy with
//!   other requests' callbacks). When no instance can be had the answer is
//!   **503** (counted as `overloaded`), whatever the plugin's `failure`
//!   policy: `failure = "open"` covers a plugin that traps or runs out of
//!   time or memory, never a busy host, so an auth plugin is never skipped.
//! - **Bodies:** chunks go through `on_response_body` as they arrive. A plugin
//!   that pauses makes the edge buffer (up to its `body_buffer`) and call it
//!   again with everything so far. The response head is held until the chain
//!   releases its first bytes, so a body transformed in one piece gets an
//!   exact Content-Length; a streamed one keeps the origin's length only if
//!   no plugin changes it. Encoded (compressed) bodies, ranges and bodiless
//!   responses skip the body callbacks. Trailers go through
//!   `on_response_trailers` after the last data and are sent on.
//!
//! Callbacks run synchronously on the worker thread. Each is bounded by the
//! plugin's deadline (epoch interruption), and a failure (trap, deadline,
//! memory limit) is mapped by the plugin's failure policy. A failure
//! discards its instance; the other requests pinned to it fail by their
//! policy at their next callback.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Response, StatusCode, Uri, header, request};
use http_body_util::BodyExt;
use meridian_wasm_host::{
    Action, ErrorKind, FailurePolicy, HeaderEdit, HeaderList, HostConfig, HttpCallRequest,
    HttpCallResponse, LocalResponse, MetricKind, Plugin, PluginError, PluginHost, PropertyResolver,
    RequestContext,
};
use parking_lot::Mutex;

use crate::config::{PluginConfig, PluginsConfig};
use crate::http::body::ResponseBody;
use crate::metrics::{Metrics, Reason};

/// One loaded plugin of a site's chain.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub plugin: Plugin,
    /// Response phase on every client response (hits too), not before storing.
    pub every_response: bool,
    /// The most body bytes the plugin may hold back by pausing.
    pub body_buffer: usize,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .finish()
    }
}

/// A site's plugin chain, shared by its requests' exchanges.
pub type Chain = Arc<[Arc<LoadedPlugin>]>;

/// The process's plugin host (one wasmtime engine), created on first need.
pub fn new_host(cfg: &PluginsConfig) -> Result<Arc<PluginHost>, String> {
    PluginHost::new(HostConfig {
        max_instances: cfg.max_instances,
        // Every instance a burst needed stays pooled: re-instantiating copies
        // the module's data segments, which costs far more than the memory.
        max_idle_instances_per_plugin: cfg.max_instances as usize,
        // A callback waits this long for an instance busy with others'.
        lock_wait: cfg.instance_wait.get(),
        ..HostConfig::default()
    })
    .map(Arc::new)
    .map_err(|e| format!("starting the Wasm host: {e}"))
}

/// Loads (compiles and configures) a site's plugins; any failure refuses the config.
pub fn load_chain(
    host: &PluginHost,
    site: &str,
    cfgs: &[PluginConfig],
) -> Result<Vec<Arc<LoadedPlugin>>, String> {
    let mut out = Vec::with_capacity(cfgs.len());
    for (i, c) in cfgs.iter().enumerate() {
        let wasm = std::fs::read(&c.path).map_err(|e| format!("{}: {e}", c.path.display()))?;
        // Inline, or read from `config_file` (again on every reload).
        let config: Vec<u8> = c.config_bytes()?;
        let limits = meridian_wasm_host::Limits {
            memory_bytes: c.memory.get() as usize,
            callback_deadline: c.deadline.get(),
            fresh_instance_per_request: c.fresh_instance,
        };
        let policy = if c.failure == "open" {
            FailurePolicy::Open
        } else {
            FailurePolicy::Closed
        };
        let stem = c.path.file_stem().map_or_else(
            || format!("plugin{i}"),
            |s| s.to_string_lossy().into_owned(),
        );
        let name = format!("{site}/{stem}");
        let plugin = host
            .load(&name, &wasm, &config, limits, policy)
            .map_err(|e| format!("{}: {e}", c.path.display()))?;
        out.push(Arc::new(LoadedPlugin {
            name: Arc::from(name),
            plugin,
            every_response: c.every_response,
            body_buffer: usize::try_from(c.body_buffer.get()).unwrap_or(usize::MAX),
        }));
    }
    Ok(out)
}

/// Tasks that call `proxy_on_tick` for plugins that asked for a tick period.
/// They end when the plugin is unloaded (the generation is dropped).
pub fn spawn_tickers(chain: &[Arc<LoadedPlugin>]) -> Vec<tokio::task::JoinHandle<()>> {
    chain
        .iter()
        .filter_map(|lp| {
            let period = lp.plugin.tick_period()?.max(Duration::from_millis(10));
            let weak = Arc::downgrade(lp);
            Some(tokio::spawn(async move {
                let mut iv = tokio::time::interval(period);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                iv.tick().await;
                loop {
                    iv.tick().await;
                    let Some(lp) = weak.upgrade() else { break };
                    if let Err(e) = lp.plugin.on_tick() {
                        tracing::warn!(plugin = %lp.name, error = %e, "plugin tick failed");
                    }
                }
            }))
        })
        .collect()
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .plugin_results
        .get_or_create(&Reason { reason: result })
        .inc();
}

/// A MaxMind database for the `meridian.client.country` property.
pub struct GeoIp(maxminddb::Reader<Vec<u8>>);

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeoIp")
    }
}

#[derive(serde::Deserialize)]
struct GeoRecord<'a> {
    #[serde(borrow, default)]
    country: Option<GeoNames<'a>>,
}

#[derive(serde::Deserialize)]
struct GeoNames<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

impl GeoIp {
    /// Opens and checks the database (reads it whole into memory).
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        let r = maxminddb::Reader::open_readfile(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self(r))
    }

    /// The ISO 3166 alpha-2 country of `ip`, if the database knows it.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let res = self.0.lookup(ip).ok()?;
        let rec = res.decode::<GeoRecord<'_>>().ok()??;
        let c = rec.country?;
        let code = c.iso_code.or(c.code)?;
        (code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()))
            .then(|| code.to_ascii_uppercase())
    }
}

/// Per-request properties: `source.*`, `destination.*`, `request.protocol`,
/// `connection.tls`, and Meridian's `meridian.client.country` / `.ip`; and
/// the request's own `request.path`, `.url_path`, `.query`, `.method`,
/// `.host` and `.scheme` as the client sent them, for the phases where the
/// host's built-in request properties (the live header map) are gone.
pub struct RequestProps {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub protocol: &'static str,
    pub geo: Option<Arc<GeoIp>>,
    /// Method, URI (its path and query as the client sent them), host.
    pub request: (http::Method, Uri, String),
    country: OnceLock<Option<String>>,
}

impl RequestProps {
    pub fn new(
        client: SocketAddr,
        local: SocketAddr,
        tls: bool,
        protocol: &'static str,
        geo: Option<Arc<GeoIp>>,
        request: (http::Method, Uri, String),
    ) -> Self {
        Self {
            client,
            local,
            tls,
            protocol,
            geo,
            request,
            country: OnceLock::new(),
        }
    }
}

impl PropertyResolver for RequestProps {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        // Integers are 8-byte little-endian, booleans one byte, as in Envoy.
        match path {
            ["source", "address"] => Some(self.client.to_string().into_bytes()),
            ["source", "port"] => Some(u64::from(self.client.port()).to_le_bytes().to_vec()),
            ["destination", "address"] => Some(self.local.to_string().into_bytes()),
            ["destination", "port"] => Some(u64::from(self.local.port()).to_le_bytes().to_vec()),
            ["connection", "tls"] => Some(vec![u8::from(self.tls)]),
            ["request", "protocol"] => Some(self.protocol.as_bytes().to_vec()),
            ["request", "method"] => Some(self.request.0.as_str().as_bytes().to_vec()),
            ["request", "path"] => Some(
                self.request
                    .1
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .as_bytes()
                    .to_vec(),
            ),
            ["request", "url_path"] => Some(self.request.1.path().as_bytes().to_vec()),
            ["request", "query"] => Some(self.request.1.query().unwrap_or("").as_bytes().to_vec()),
            ["request", "host"] => Some(self.request.2.as_bytes().to_vec()),
            ["request", "scheme"] => Some(if self.tls { &b"https"[..] } else { b"http" }.to_vec()),
            ["meridian", "client", "ip"] => Some(self.client.ip().to_string().into_bytes()),
            ["meridian", "client", "country"] => self
                .country
                .get_or_init(|| self.geo.as_ref().and_then(|g| g.country(self.client.ip())))
                .as_ref()
                .map(|c| c.as_bytes().to_vec()),
            _ => None,
        }
    }
}

/// The live plugin contexts of one exchange, kept from the request phase to
/// the end of the response. Dropping it ends the contexts (`on_log`,
/// `on_done`, `on_delete`) and returns their instances to the pools.
pub struct Exchange {
    chain: Chain,
    ctxs: Vec<Option<RequestContext>>,
    head: bool,
    metrics: Arc<Metrics>,
    response_headers: HeaderList,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("plugins", &self.chain.len())
            .finish()
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Lent to each plugin in turn (moved in and out, not copied). The
        // request headers are the ones each context kept from its request phase.
        let mut req = HeaderList::new();
        let mut resp = std::mem::take(&mut self.response_headers);
        for (lp, ctx) in self.chain.iter().zip(self.ctxs.iter_mut()) {
            if let Some(mut ctx) = ctx.take() {
                if let Err(e) = ctx.on_log(&mut req, &mut resp) {
                    tracing::warn!(plugin = %lp.name, error = %e, "plugin on_log failed");
                }
                if let Err(e) = ctx.finish() {
                    tracing::warn!(plugin = %lp.name, error = %e, "plugin failed at the end of a request");
                }
            }
        }
    }
}

/// An [`Exchange`] shared by the pipeline stages that may need it.
pub type SharedExchange = Arc<Mutex<Exchange>>;

/// Which plugins a response phase runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Origin responses, before the cache stores them.
    Store,
    /// Every response the client gets (plugins with `every_response`).
    Deliver,
}

fn request_header_list(parts: &request::Parts, scheme: &str) -> HeaderList {
    let mut headers: HeaderList = Vec::with_capacity(parts.headers.len() + 4);
    headers.push((":method".into(), parts.method.as_str().as_bytes().to_vec()));
    headers.push((":scheme".into(), scheme.as_bytes().to_vec()));
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes().to_vec())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .map(|h| h.as_bytes().to_vec())
        })
        .unwrap_or_default();
    headers.push((":authority".into(), authority));
    headers.push((
        ":path".into(),
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes()
            .to_vec(),
    ));
    push_headers(&mut headers, &parts.headers);
    headers
}

/// No plugin instance to be had: overload, whatever the plugin's policy.
fn overloaded_response() -> Response<ResponseBody> {
    let mut resp = failure_response(StatusCode::SERVICE_UNAVAILABLE, b"plugin host overloaded\n");
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// What a plugin's error does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A failure under an open policy: go on without the plugin.
    Skip,
    /// A failure under a closed policy: 500.
    Fail,
    /// No instance to be had: 503, whatever the policy.
    Overloaded,
}

impl Verdict {
    /// Decides (and counts) what `e` does; `what` says where, for the log.
    fn of(metrics: &Metrics, lp: &LoadedPlugin, e: &PluginError, what: &'static str) -> Self {
        if e.is_overload() {
            tracing::warn!(plugin = %lp.name, error = %e, "no plugin instance {what}: 503");
            count(metrics, "overloaded");
            return Self::Overloaded;
        }
        tracing::warn!(plugin = %lp.name, error = %e, "plugin failed {what}");
        count(metrics, "failed");
        match lp.plugin.policy() {
            FailurePolicy::Open => Self::Skip,
            FailurePolicy::Closed => Self::Fail,
        }
    }

    /// The response that ends the request, if any.
    fn response(self) -> Option<Response<ResponseBody>> {
        match self {
            Self::Skip => None,
            Self::Fail => Some(failure_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                b"plugin failure\n",
            )),
            Self::Overloaded => Some(overloaded_response()),
        }
    }

    /// What stops a body, if anything.
    fn body_failure(self) -> Option<BodyFailure> {
        match self {
            Self::Skip => None,
            Self::Fail => Some(BodyFailure::Failed),
            Self::Overloaded => Some(BodyFailure::Overloaded),
        }
    }
}

/// A plugin's failure under a closed policy, or a stream it closed.
fn failure_response(status: StatusCode, body: &'static [u8]) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A plugin's `send_local_response`. Not stored unless the plugin says how.
fn local_response(lr: LocalResponse) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(lr.body));
    *resp.status_mut() =
        StatusCode::from_u16(lr.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *resp.headers_mut() = header_map(&lr.headers, |_, _| {});
    if !resp.headers().contains_key(header::CACHE_CONTROL) {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The most HTTP-call rounds one plugin may go through in one request.
const MAX_CALL_ROUNDS: usize = 8;

/// Runs the request-header phase of every plugin, in order. Modified headers
/// (and `:path`) are written back into `parts`. `Ok` carries the live
/// contexts for the response phase; `Err` is the response a plugin answered
/// with (or its failure policy's): the request goes no further.
///
/// `call` performs a plugin's `http_call` (`None`: failed or timed out).
#[allow(clippy::too_many_arguments)]
pub async fn run_request<F, Fut>(
    chain: &Chain,
    parts: &mut request::Parts,
    scheme: &str,
    end_of_stream: bool,
    metrics: &Arc<Metrics>,
    props: Arc<dyn PropertyResolver>,
    instance_wait: Duration,
    call: F,
) -> Result<SharedExchange, Response<ResponseBody>>
where
    F: Fn(HttpCallRequest) -> Fut,
    Fut: Future<Output = Option<HttpCallResponse>>,
{
    let mut ex = Exchange {
        chain: chain.clone(),
        ctxs: Vec::with_capacity(chain.len()),
        head: parts.method == http::Method::HEAD,
        metrics: metrics.clone(),
        response_headers: Vec::new(),
    };
    for lp in chain.iter() {
        let policy = lp.plugin.policy();
        // `Some` is the response that ends the request; `None` skips the plugin.
        let fail = |ex: &mut Exchange, e: &PluginError| -> Option<Response<ResponseBody>> {
            let r = Verdict::of(metrics, lp, e, "in the request phase").response();
            if r.is_none() {
                ex.ctxs.push(None);
            }
            r
        };
        let mut ctx = match context_waiting(lp, &props, instance_wait, metrics).await {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = fail(&mut ex, &e) {
                    return Err(r);
                }
                continue;
            }
        };
        let mut headers = request_header_list(parts, scheme);
        let mut action = ctx.on_request_headers(&mut headers, end_of_stream);
        let mut rounds = 0;
        loop {
            match action {
                Err(e) => {
                    if let Some(r) = fail(&mut ex, &e) {
                        return Err(r);
                    }
                    break;
                }
                Ok(Action::Continue) => {
                    metrics.plugin_continue.inc();
                    apply_request_edits(parts, &headers, ctx.take_request_header_edits());
                    ctx.keep_request_headers(headers);
                    ex.ctxs.push(Some(ctx));
                    break;
                }
                Ok(Action::LocalResponse(lr)) => {
                    count(metrics, "local-response");
                    return Err(local_response(lr));
                }
                Ok(Action::Close) => {
                    count(metrics, "close");
                    return Err(failure_response(
                        StatusCode::FORBIDDEN,
                        b"closed by plugin\n",
                    ));
                }
                Ok(Action::Pause) => {
                    let calls = ctx.take_http_calls();
                    if calls.is_empty() || rounds >= MAX_CALL_ROUNDS {
                        // Nothing can resume it: the failure policy decides.
                        tracing::warn!(plugin = %lp.name, rounds, "plugin paused with no call to wait for");
                        count(metrics, "stalled");
                        if policy == FailurePolicy::Closed {
                            return Err(failure_response(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                b"plugin failure\n",
                            ));
                        }
                        ex.ctxs.push(Some(ctx));
                        break;
                    }
                    rounds += 1;
                    let results =
                        futures_util::future::join_all(calls.iter().map(|c| call(c.clone()))).await;
                    action = Ok(Action::Pause);
                    for (c, r) in calls.iter().zip(results) {
                        count(
                            metrics,
                            if r.is_some() {
                                "http-call"
                            } else {
                                "http-call-failed"
                            },
                        );
                        action = ctx.on_http_call_response(c.token, r, &mut headers);
                        if !matches!(action, Ok(Action::Pause)) {
                            break;
                        }
                    }
                }
                Ok(_) => {
                    count(metrics, "unsupported");
                    ex.ctxs.push(Some(ctx));
                    break;
                }
            }
        }
    }
    Ok(Arc::new(Mutex::new(ex)))
}

/// A request context for `lp`. When the plugin has no instance and the host
/// no slot for one (every instance hosts requests), waits for one, polling
/// with a backoff of 1 to 20 ms, for up to `wait`.
async fn context_waiting(
    lp: &LoadedPlugin,
    props: &Arc<dyn PropertyResolver>,
    wait: Duration,
    metrics: &Metrics,
) -> meridian_wasm_host::Result<RequestContext> {
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut waited = false;
    loop {
        match lp.plugin.request_context_with(props.clone()) {
            Err(e) if e.kind() == ErrorKind::Exhausted && start.elapsed() + pause <= wait => {
                if !waited {
                    waited = true;
                    count(metrics, "waited-for-instance");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Appends `headers` to a proxy-wasm header list.
pub(crate) fn push_headers(list: &mut HeaderList, headers: &http::HeaderMap) {
    for (n, v) in headers {
        list.push((n.as_str().to_string(), v.as_bytes().to_vec()));
    }
}

/// The regular headers of a proxy-wasm list as a `HeaderMap` (entries that
/// are not valid HTTP are dropped); `pseudo` sees the `:name` entries.
pub(crate) fn header_map(
    list: &HeaderList,
    mut pseudo: impl FnMut(&str, &[u8]),
) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(list.len());
    for (n, v) in list {
        if n.starts_with(':') {
            pseudo(n, v);
        } else if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// A header name and value a plugin gave, if they are valid HTTP (others
/// are dropped, as when a whole map is rebuilt). The value is not copied.
fn valid_header(name: &str, value: Vec<u8>) -> Option<(HeaderName, HeaderValue)> {
    let n = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let v = HeaderValue::from_maybe_shared(Bytes::from(value)).ok()?;
    Some((n, v))
}

/// Applies a plugin's edits (in order) to `map`; `pseudo` gets the values
/// it gave to `:name` entries. `false`: the plugin replaced the whole map,
/// and the caller must rebuild it from the list.
fn apply_edits(
    map: &mut http::HeaderMap,
    edits: Vec<HeaderEdit>,
    mut pseudo: impl FnMut(&str, &[u8]),
) -> bool {
    for e in edits {
        match e {
            HeaderEdit::ReplaceAll => return false,
            HeaderEdit::Add(n, v) | HeaderEdit::Replace(n, v) if n.starts_with(':') => {
                pseudo(&n, &v)
            }
            HeaderEdit::Add(n, v) => {
                if let Some((n, v)) = valid_header(&n, v) {
                    map.append(n, v);
                }
            }
            HeaderEdit::Replace(n, v) => {
                if let Some((n, v)) = valid_header(&n, v) {
                    map.insert(n, v);
                }
            }
            HeaderEdit::Remove(n) => {
                map.remove(n.as_str());
            }
        }
    }
    true
}

/// Writes a plugin's request-phase edits back into the request: regular
/// headers, and `:path`, whose change rewrites the URI.
fn apply_request_edits(parts: &mut request::Parts, list: &HeaderList, edits: Vec<HeaderEdit>) {
    if edits.is_empty() {
        return;
    }
    let mut path = None;
    let mut on_pseudo = |n: &str, v: &[u8]| {
        if n == ":path" {
            path = http::uri::PathAndQuery::try_from(v).ok();
        }
    };
    if !apply_edits(&mut parts.headers, edits, &mut on_pseudo) {
        parts.headers = header_map(list, &mut on_pseudo);
    }
    if let Some(pq) = path {
        let mut up = parts.uri.clone().into_parts();
        up.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(up) {
            parts.uri = u;
        }
    }
}

/// Whether the exchange has plugins for `phase`.
pub fn has_phase(ex: &SharedExchange, phase: Phase) -> bool {
    let ex = ex.lock();
    ex.chain
        .iter()
        .zip(&ex.ctxs)
        .any(|(lp, c)| c.is_some() && lp.every_response == (phase == Phase::Deliver))
}

/// A response body stage: one plugin's buffer while it holds data back.
struct Stage {
    idx: usize,
    buf: BytesMut,
    active: bool,
}

/// What stopped a body from going through the chain.
enum BodyFailure {
    /// A plugin failed under a closed policy, or closed the stream.
    Failed,
    /// No instance to be had for a plugin (503, whatever its policy).
    Overloaded,
    /// A plugin with a closed policy held back more than its `body_buffer`.
    TooLarge,
    /// A plugin answered with a local response mid-body.
    Local(LocalResponse),
}

/// Which body goes through the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

/// Pushes one chunk through the stages; returns what comes out the far end.
fn push_chunk(
    ex: &mut Exchange,
    stages: &mut [Stage],
    chunk: Bytes,
    eos: bool,
    dir: Dir,
) -> Result<Bytes, BodyFailure> {
    let mut data = chunk;
    for st in stages.iter_mut() {
        if !st.active || (data.is_empty() && !eos && st.buf.is_empty()) {
            continue;
        }
        let lp = ex.chain[st.idx].clone();
        if st.buf.is_empty() {
            // Nothing held back: take the chunk as is (no copy when unshared).
            st.buf = data
                .try_into_mut()
                .unwrap_or_else(|b| BytesMut::from(&b[..]));
        } else {
            st.buf.extend_from_slice(&data);
        }
        let Some(ctx) = ex.ctxs[st.idx].as_mut() else {
            st.active = false;
            data = st.buf.split().freeze();
            continue;
        };
        let r = match dir {
            Dir::Request => ctx.on_request_body(&mut st.buf, eos),
            Dir::Response => ctx.on_response_body(&mut st.buf, eos),
        };
        match r {
            // Held back: the limit is on what the plugin makes the edge keep.
            Ok(Action::Pause) if !eos && st.buf.len() > lp.body_buffer => {
                tracing::warn!(plugin = %lp.name, limit = lp.body_buffer, ?dir, "plugin held back more body than its body_buffer");
                count(&ex.metrics, "body-buffer-exceeded");
                if lp.plugin.policy() == FailurePolicy::Closed {
                    return Err(BodyFailure::TooLarge);
                }
                st.active = false;
                data = st.buf.split().freeze();
            }
            Ok(Action::Pause) if !eos => return Ok(Bytes::new()),
            Ok(Action::Continue | Action::Pause) => data = st.buf.split().freeze(),
            Ok(Action::LocalResponse(lr)) => return Err(BodyFailure::Local(lr)),
            Ok(_) => return Err(BodyFailure::Failed),
            Err(e) => {
                let stop = body_error(&ex.metrics, &lp, &e, dir);
                ex.ctxs[st.idx] = None;
                if let Some(f) = stop {
                    return Err(f);
                }
                st.active = false;
                data = st.buf.split().freeze();
            }
        }
    }
    Ok(data)
}

/// What a plugin's error on a body (or its trailers) does: `Some` stops the
/// body (overload, or a failure under a closed policy); `None` skips the
/// plugin for the rest of it.
fn body_error(
    metrics: &Metrics,
    lp: &LoadedPlugin,
    e: &PluginError,
    dir: Dir,
) -> Option<BodyFailure> {
    let what = match dir {
        Dir::Request => "on a request body",
        Dir::Response => "on a response body",
    };
    Verdict::of(metrics, lp, e, what).body_failure()
}

fn response_header_list(resp: &Response<ResponseBody>) -> HeaderList {
    let mut list: HeaderList = Vec::with_capacity(resp.headers().len() + 1);
    list.push((":status".into(), resp.status().as_str().as_bytes().to_vec()));
    push_headers(&mut list, resp.headers());
    list
}

/// Writes one plugin's response-phase edits back into the response. A
/// whole-map replacement rebuilds the headers from `list` (which holds every
/// plugin's edits so far).
fn apply_response_edits(
    resp: &mut Response<ResponseBody>,
    list: &HeaderList,
    edits: Vec<HeaderEdit>,
) {
    if edits.is_empty() {
        return;
    }
    let mut status = None;
    let mut on_pseudo = |n: &str, v: &[u8]| {
        if n == ":status" {
            status = StatusCode::from_bytes(v).ok();
        }
    };
    if !apply_edits(resp.headers_mut(), edits, &mut on_pseudo) {
        *resp.headers_mut() = header_map(list, &mut on_pseudo);
    }
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
}

/// Runs the response phase of the exchange's plugins for `phase`, in reverse
/// chain order: headers, then (unless skipped) the body, which may be
/// buffered or streamed (see the module docs).
pub async fn response_phase(
    ex: &SharedExchange,
    phase: Phase,
    mut resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let eos = http_body::Body::is_end_stream(resp.body());
    let mut stages: Vec<Stage> = Vec::new();
    {
        let mut guard = ex.lock();
        let ex_ref = &mut *guard;
        let mut list = response_header_list(&resp);
        for idx in (0..ex_ref.chain.len()).rev() {
            let lp = ex_ref.chain[idx].clone();
            if lp.every_response != (phase == Phase::Deliver) {
                continue;
            }
            let Some(ctx) = ex_ref.ctxs[idx].as_mut() else {
                continue;
            };
            let r = ctx.on_response_headers(&mut list, eos);
            apply_response_edits(&mut resp, &list, ctx.take_response_header_edits());
            match r {
                // A pause on the head waits for the body: the head is held anyway.
                Ok(Action::Continue | Action::Pause) => {
                    ex_ref.metrics.plugin_response_continue.inc();
                    stages.push(Stage {
                        idx,
                        buf: BytesMut::new(),
                        active: true,
                    });
                }
                Ok(Action::LocalResponse(lr)) => {
                    count(&ex_ref.metrics, "local-response");
                    let r = local_response(lr);
                    ex_ref.response_headers = response_header_list(&r);
                    return r;
                }
                Ok(_) => {
                    count(&ex_ref.metrics, "close");
                    return failure_response(StatusCode::BAD_GATEWAY, b"closed by plugin\n");
                }
                Err(e) => {
                    ex_ref.ctxs[idx] = None;
                    if let Some(r) =
                        Verdict::of(&ex_ref.metrics, &lp, &e, "on response headers").response()
                    {
                        return r;
                    }
                }
            }
        }
        ex_ref.response_headers = list;
        let status = resp.status();
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded && !stages.is_empty() && !eos {
            count(&ex_ref.metrics, "body-skipped-encoded");
        }
        if stages.is_empty()
            || eos
            || ex_ref.head
            || encoded
            || status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            )
        {
            return resp;
        }
    }
    transform_body(ex.clone(), stages, resp).await
}

/// One step of a body: its next data, or its end, with the trailers that
/// end it, if any.
struct Piece {
    data: Bytes,
    eos: bool,
    trailers: Option<http::HeaderMap>,
}

async fn next_chunk<B>(body: &mut B) -> Result<Piece, crate::error::BoxError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::error::BoxError>,
{
    let piece = |data, eos, trailers| Piece {
        data,
        eos,
        trailers,
    };
    loop {
        match body.frame().await {
            None => return Ok(piece(Bytes::new(), true, None)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => return Ok(piece(d, false, None)),
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        // Trailers are the last frame.
                        return Ok(piece(Bytes::new(), true, Some(t)));
                    }
                }
            },
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Runs trailers through the stages' plugins (`on_request_trailers` /
/// `on_response_trailers`), in stage order; a plugin may edit them. A plugin
/// that fails under a closed policy fails the body.
fn push_trailers(
    ex: &mut Exchange,
    stages: &[Stage],
    trailers: http::HeaderMap,
    dir: Dir,
) -> Result<http::HeaderMap, BodyFailure> {
    let mut list: HeaderList = Vec::with_capacity(trailers.len());
    push_headers(&mut list, &trailers);
    let mut edited = false;
    for st in stages {
        let lp = ex.chain[st.idx].clone();
        let Some(ctx) = ex.ctxs[st.idx].as_mut() else {
            continue;
        };
        let before = list.clone();
        let r = match dir {
            Dir::Request => ctx.on_request_trailers(&mut list),
            Dir::Response => ctx.on_response_trailers(&mut list),
        };
        edited |= list != before;
        if let Err(e) = r {
            let stop = body_error(&ex.metrics, &lp, &e, dir);
            ex.ctxs[st.idx] = None;
            if let Some(f) = stop {
                return Err(f);
            }
        }
    }
    Ok(if edited {
        header_map(&list, |_, _| {})
    } else {
        trailers
    })
}

/// Whether the exchange has a live plugin to run the request body through.
pub fn has_request_body_phase(ex: &SharedExchange) -> bool {
    ex.lock().ctxs.iter().any(Option::is_some)
}

/// Runs the client's request body through the plugins (`on_request_body`),
/// in chain order, before it goes to the origin, as the response phase does
/// for response bodies: chunks stream through; a plugin that pauses makes
/// the edge buffer (up to its `body_buffer`) and call it again with
/// everything so far. A body the chain releases whole goes on with an exact
/// Content-Length; one released while still arriving streams on, keeping the
/// client's length only while no plugin changes it.
///
/// `Err` is the response that ends the request: a plugin's local response,
/// its failure under a closed policy (500; 413 for a body over its
/// `body_buffer`), no instance for it (503), or a client body that failed
/// (400) or stalled for `idle` (408).
pub async fn request_body_phase(
    ex: &SharedExchange,
    parts: &mut request::Parts,
    mut body: crate::http::body::ClientBody,
    idle: Duration,
) -> Result<crate::http::body::ClientBody, Response<ResponseBody>> {
    use crate::http::body::ClientBody;
    let mut stages: Vec<Stage> = {
        let g = ex.lock();
        (0..g.chain.len())
            .filter(|&i| g.ctxs[i].is_some())
            .map(|idx| Stage {
                idx,
                buf: BytesMut::new(),
                active: true,
            })
            .collect()
    };
    if stages.is_empty() || http_body::Body::is_end_stream(&body) {
        return Ok(body);
    }
    let fail = |f: BodyFailure| match f {
        BodyFailure::Local(lr) => local_response(lr),
        BodyFailure::Overloaded => overloaded_response(),
        BodyFailure::TooLarge => failure_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            b"request body over a plugin's buffer\n",
        ),
        BodyFailure::Failed => {
            failure_response(StatusCode::INTERNAL_SERVER_ERROR, b"plugin failure\n")
        }
    };
    // 1. Until the chain releases bytes: nothing has gone to the origin yet.
    let p = match until_release(ex, &mut stages, &mut body, Dir::Request, Some(idle)).await {
        Ok(p) => p,
        Err(BodyStop::Plugin(f)) => return Err(fail(f)),
        Err(BodyStop::Source(e)) => {
            tracing::debug!(error = %e, "client request body failed in the plugin phase");
            return Err(failure_response(
                StatusCode::BAD_REQUEST,
                b"request body failed\n",
            ));
        }
        Err(BodyStop::Idle) => {
            return Err(failure_response(
                StatusCode::REQUEST_TIMEOUT,
                b"request body timed out\n",
            ));
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    if p.finished {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(p.out.len()));
        let out = p.out.freeze();
        return Ok(match p.trailers {
            None => ClientBody::Full(Some(out)),
            Some(t) => ClientBody::Channel(frames_of(out, t)),
        });
    }
    // 2. Streaming to the origin.
    if p.out.len() as u64 != p.in_total {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let declared = parts.headers.contains_key(header::CONTENT_LENGTH);
    Ok(ClientBody::Channel(stream_rest(
        ex.clone(),
        stages,
        body,
        Dir::Request,
        Some(idle),
        p,
        declared,
    )))
}

/// Runs the body through the stages. The head is held until the chain
/// releases its first bytes (or the body ends).
async fn transform_body(
    ex: SharedExchange,
    mut stages: Vec<Stage>,
    resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let (mut parts, mut body) = resp.into_parts();
    // 1. Until the first release: nothing has been sent yet. (The origin
    // body has its own idle timer.)
    let p = match until_release(&ex, &mut stages, &mut body, Dir::Response, None).await {
        Ok(p) => p,
        Err(BodyStop::Plugin(BodyFailure::Local(lr))) => return local_response(lr),
        Err(BodyStop::Plugin(BodyFailure::Overloaded)) => return overloaded_response(),
        Err(BodyStop::Plugin(_)) => {
            return failure_response(StatusCode::INTERNAL_SERVER_ERROR, b"plugin failure\n");
        }
        Err(BodyStop::Source(e)) => {
            tracing::info!(error = %e, "origin body failed before the plugins released it");
            return failure_response(StatusCode::BAD_GATEWAY, b"origin body failed\n");
        }
        Err(BodyStop::Idle) => {
            return failure_response(StatusCode::GATEWAY_TIMEOUT, b"origin body timed out\n");
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    if p.finished {
        // The whole body went through: its length is known exactly.
        let len = p.out.len() as u64;
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let out = p.out.freeze();
        let body = match p.trailers {
            None => ResponseBody::full(out),
            Some(t) => ResponseBody::frames(frames_of(out, t), Some(len)),
        };
        return Response::from_parts(parts, body);
    }
    // 2. Streaming. The origin's Content-Length holds only while no plugin
    // changes the length; it is dropped now if one already has.
    if p.out.len() as u64 != p.in_total {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let rx = stream_rest(ex, stages, body, Dir::Response, None, p, declared.is_some());
    Response::from_parts(parts, ResponseBody::frames(rx, declared))
}

/// The frames of a body going out of the plugins.
type FrameRx = tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, crate::error::BoxError>>;

/// Why a body stopped before the plugins released any of it.
enum BodyStop {
    /// The body itself failed.
    Source(crate::error::BoxError),
    /// No frame for the idle timeout.
    Idle,
    Plugin(BodyFailure),
}

/// A body's way through the stages up to the first release.
struct Progress {
    /// What the chain released.
    out: BytesMut,
    /// What came in.
    in_total: u64,
    /// The trailers, as the plugins left them, if the body ended with some.
    trailers: Option<http::HeaderMap>,
    /// The body ended (everything went through).
    finished: bool,
}

/// The next piece of `body`, within `idle` if given.
async fn next_piece<B>(body: &mut B, idle: Option<Duration>) -> Result<Piece, BodyStop>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::error::BoxError>,
{
    let r = match idle {
        Some(d) => tokio::time::timeout(d, next_chunk(body))
            .await
            .map_err(|_| BodyStop::Idle)?,
        None => next_chunk(body).await,
    };
    r.map_err(BodyStop::Source)
}

/// One piece through the stages: the bytes released, and the trailers.
fn push_piece(
    ex: &SharedExchange,
    stages: &mut [Stage],
    piece: Piece,
    dir: Dir,
) -> Result<(Bytes, Option<http::HeaderMap>), BodyFailure> {
    let mut g = ex.lock();
    let b = push_chunk(&mut g, stages, piece.data, piece.eos, dir)?;
    let t = piece
        .trailers
        .map(|t| push_trailers(&mut g, stages, t, dir))
        .transpose()?;
    Ok((b, t))
}

/// Feeds `body` through the stages until the chain releases its first bytes
/// while more is to come, or the body ends (a body whose last bytes just
/// came goes round once more to see its end, and counts as finished).
async fn until_release<B>(
    ex: &SharedExchange,
    stages: &mut [Stage],
    body: &mut B,
    dir: Dir,
    idle: Option<Duration>,
) -> Result<Progress, BodyStop>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::error::BoxError>,
{
    let mut p = Progress {
        out: BytesMut::new(),
        in_total: 0,
        trailers: None,
        finished: false,
    };
    loop {
        let piece = next_piece(body, idle).await?;
        p.in_total += piece.data.len() as u64;
        let eos = piece.eos;
        let (b, t) = push_piece(ex, stages, piece, dir).map_err(BodyStop::Plugin)?;
        p.out.extend_from_slice(&b);
        p.trailers = t;
        if eos {
            p.finished = true;
            return Ok(p);
        }
        if !p.out.is_empty() && !body.is_end_stream() {
            return Ok(p);
        }
    }
}

/// A whole body and its trailers as frames (the channel holds both).
fn frames_of(data: Bytes, trailers: http::HeaderMap) -> FrameRx {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let _ = tx.try_send(Ok(http_body::Frame::data(data)));
    let _ = tx.try_send(Ok(http_body::Frame::trailers(trailers)));
    rx
}

/// Streams the rest of a body through the stages from a task, after what
/// `p` released first. With `declared` (a Content-Length already sent on)
/// the stream is cut rather than sent with another length.
fn stream_rest<B>(
    ex: SharedExchange,
    mut stages: Vec<Stage>,
    mut body: B,
    dir: Dir,
    idle: Option<Duration>,
    p: Progress,
    declared: bool,
) -> FrameRx
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let first = p.out.freeze();
    let mut in_total = p.in_total;
    tokio::spawn(async move {
        let mut out_total = first.len() as u64;
        if tx.send(Ok(http_body::Frame::data(first))).await.is_err() {
            return;
        }
        loop {
            let piece = match next_piece(&mut body, idle).await {
                Ok(p) => p,
                Err(BodyStop::Idle) => {
                    let _ = tx.send(Err("body timed out".into())).await;
                    return;
                }
                Err(BodyStop::Source(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(BodyStop::Plugin(_)) => return,
            };
            in_total += piece.data.len() as u64;
            let eos = piece.eos;
            let Ok((b, trailers)) = push_piece(&ex, &mut stages, piece, dir) else {
                let _ = tx
                    .send(Err("a plugin failed while streaming the body".into()))
                    .await;
                return;
            };
            out_total += b.len() as u64;
            if declared && (out_total > in_total || (eos && out_total != in_total)) {
                tracing::warn!(
                    ?dir,
                    "a plugin changed the body's length after Content-Length was sent"
                );
                let _ = tx
                    .send(Err("a plugin changed the length of a streamed body".into()))
                    .await;
                return;
            }
            if !b.is_empty() && tx.send(Ok(http_body::Frame::data(b))).await.is_err() {
                return;
            }
            if let Some(t) = trailers {
                let _ = tx.send(Ok(http_body::Frame::trailers(t))).await;
            }
            if eos {
                return;
            }
        }
    });
    rx
}

/// Exports each plugin's own metrics and the host's counters for it.
pub fn update_metrics(metrics: &Metrics, sites: &[crate::proxy::Site]) {
    use crate::metrics::{PluginLabels, PluginMetricLabels};
    metrics.plugin_metric.clear();
    metrics.plugin_histogram_count.clear();
    metrics.plugin_callbacks.clear();
    metrics.plugin_failures.clear();
    metrics.plugin_instances.clear();
    for site in sites {
        for lp in site.plugins.iter() {
            for m in lp.plugin.metrics() {
                let labels = PluginMetricLabels {
                    plugin: lp.name.clone(),
                    name: Arc::from(m.name.as_str()),
                    kind: match m.kind {
                        MetricKind::Counter => "counter",
                        MetricKind::Gauge => "gauge",
                        _ => "histogram",
                    },
                };
                metrics.plugin_metric.get_or_create(&labels).set(m.value);
                if m.kind == MetricKind::Histogram {
                    metrics
                        .plugin_histogram_count
                        .get_or_create(&labels)
                        .set(i64::try_from(m.count).unwrap_or(i64::MAX));
                }
            }
            let s = lp.plugin.stats();
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            metrics
                .plugin_callbacks
                .get_or_create(&PluginLabels {
                    plugin: lp.name.clone(),
                    kind: "callbacks",
                })
                .set(g(s.callbacks));
            // Besides the guest failures: contexts lost with an instance
            // another request's failure discarded, requests that found no
            // instance (overload: 503), log lines over the rate limit, and
            // shared-data writes over its limit.
            for (kind, v) in [
                ("trap", s.traps),
                ("deadline", s.deadline_exceeded),
                ("memory", s.memory_limit),
                ("exit", s.exits),
                ("instance-lost", s.lost_contexts),
                ("overload", s.overloads),
                ("log-suppressed", s.logs_suppressed),
                ("shared-data-full", s.shared_data_rejected),
            ] {
                metrics
                    .plugin_failures
                    .get_or_create(&PluginLabels {
                        plugin: lp.name.clone(),
                        kind,
                    })
                    .set(g(v));
            }
            for (kind, v) in [
                ("live", s.live_instances),
                ("idle", s.idle_instances as u64),
                ("contexts", s.live_contexts),
            ] {
                metrics
                    .plugin_instances
                    .get_or_create(&PluginLabels {
                        plugin: lp.name.clone(),
                        kind,
                    })
                    .set(g(v));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_properties_follow_envoys_encoding() {
        let p = RequestProps::new(
            "192.0.2.7:5555".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
            true,
            "h2",
            None,
            (
                http::Method::GET,
                Uri::from_static("/a/b?x=1"),
                "example.com".into(),
            ),
        );
        assert_eq!(p.property(&["request", "url_path"]), Some(b"/a/b".to_vec()));
        assert_eq!(p.property(&["request", "query"]), Some(b"x=1".to_vec()));
        assert_eq!(p.property(&["request", "scheme"]), Some(b"https".to_vec()));
        assert_eq!(
            p.property(&["source", "address"]),
            Some(b"192.0.2.7:5555".to_vec())
        );
        assert_eq!(
            p.property(&["source", "port"]),
            Some(5555u64.to_le_bytes().to_vec())
        );
        assert_eq!(p.property(&["connection", "tls"]), Some(vec![1]));
        assert_eq!(p.property(&["request", "protocol"]), Some(b"h2".to_vec()));
        assert_eq!(
            p.property(&["meridian", "client", "ip"]),
            Some(b"192.0.2.7".to_vec())
        );
        // No GeoIP database: the country is unknown (NotFound to the plugin).
        assert_eq!(p.property(&["meridian", "client", "country"]), None);
        assert_eq!(p.property(&["nope"]), None);
    }

    #[test]
    fn response_edits_apply_in_place_or_rebuild() {
        let mut resp = Response::new(ResponseBody::empty());
        resp.headers_mut()
            .insert("x-a", HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert("server", HeaderValue::from_static("o"));
        let list = response_header_list(&resp);
        assert_eq!(list[0], (":status".to_string(), b"200".to_vec()));
        apply_response_edits(
            &mut resp,
            &list,
            vec![
                HeaderEdit::Replace(":status".into(), b"203".to_vec()),
                HeaderEdit::Add("x-a".into(), b"2".to_vec()),
                HeaderEdit::Add("bad name".into(), b"x".to_vec()),
                HeaderEdit::Remove("server".into()),
                HeaderEdit::Replace("x-b".into(), b"3".to_vec()),
            ],
        );
        assert_eq!(resp.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        let all: Vec<_> = resp.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(resp.headers()["x-b"], "3");
        assert!(!resp.headers().contains_key("server"));
        assert_eq!(resp.headers().len(), 3);
        // A whole-map replacement: the list is the truth.
        let list = vec![
            (":status".to_string(), b"404".to_vec()),
            ("x-only".to_string(), b"1".to_vec()),
            ("bad name".to_string(), b"x".to_vec()),
        ];
        apply_response_edits(
            &mut resp,
            &list,
            vec![HeaderEdit::Remove("x-a".into()), HeaderEdit::ReplaceAll],
        );
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers().len(), 1);
        assert_eq!(resp.headers()["x-only"], "1");
    }

    #[test]
    fn request_edits_rewrite_the_path_and_headers() {
        let (mut parts, ()) = http::Request::builder()
            .uri("http://example.com/a?x=1")
            .header("x-keep", "1")
            .header("x-drop", "2")
            .body(())
            .unwrap()
            .into_parts();
        let list = request_header_list(&parts, "http");
        apply_request_edits(&mut parts, &list, Vec::new());
        assert_eq!(parts.headers.len(), 2, "no edits, nothing touched");
        apply_request_edits(
            &mut parts,
            &list,
            vec![
                HeaderEdit::Replace(":path".into(), b"/b?y=2".to_vec()),
                HeaderEdit::Remove("x-drop".into()),
                HeaderEdit::Add("x-new".into(), b"3".to_vec()),
            ],
        );
        assert_eq!(parts.uri.to_string(), "http://example.com/b?y=2");
        assert_eq!(parts.headers.len(), 2);
        assert_eq!(parts.headers["x-new"], "3");
        assert!(!parts.headers.contains_key("x-drop"));
    }
}
