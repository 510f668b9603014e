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
//!
//! Failures are [`ProxyError`]s of kind [`crate::error::ErrorKind::Plugin`]:
//! the proxy turns them into responses, counts and logs them as it does
//! every other error. A plugin's own answer (`send_local_response`) is not an
//! error: it comes back as [`Outcome::Respond`].
//!
//! Modules: `load` (host, chains, tickers), `props` (request properties,
//! GeoIP), `request` (the request phase), `response` (the response phase),
//! `body` (the body engine), `headers` (header lists and edits), `metrics`.

mod body;
mod headers;
mod load;
mod metrics;
mod props;
mod request;
mod response;

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use meridian_wasm_host::{FailurePolicy, HeaderList, LocalResponse, PluginError, RequestContext};
use parking_lot::Mutex;

pub use body::{has_request_body_phase, request_body_phase};
pub(crate) use headers::{header_map, push_headers};
pub use load::{Chain, LoadedPlugin, load_chain, new_host, spawn_tickers};
pub use metrics::update_metrics;
pub use props::{GeoIp, RequestProps};
pub use request::{RequestPhase, run_request};
pub use response::{Phase, has_phase, response_phase};

use crate::error::{PluginFailure, ProxyError};
use crate::http::body::ResponseBody;
use crate::metrics::{Metrics, Reason};

/// What a phase leaves the request with: go on (with `T`), or a plugin's
/// own answer (`send_local_response`), which ends the request. Failures
/// are not outcomes but errors ([`ProxyError`]).
#[derive(Debug)]
pub enum Outcome<T> {
    Continue(T),
    Respond(Box<Response<ResponseBody>>),
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
                    lp.warn_failure(&e, format_args!("plugin on_log failed"));
                }
                if let Err(e) = ctx.finish() {
                    lp.warn_failure(&e, format_args!("plugin failed at the end of a request"));
                }
            }
        }
    }
}

/// An [`Exchange`] shared by the pipeline stages that may need it.
pub type SharedExchange = Arc<Mutex<Exchange>>;

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .plugin_results
        .get_or_create(&Reason { reason: result })
        .inc();
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
            lp.warn_failure(e, format_args!("no plugin instance {what}: 503"));
            count(metrics, "overloaded");
            return Self::Overloaded;
        }
        lp.warn_failure(e, format_args!("plugin failed {what}"));
        count(metrics, "failed");
        match lp.plugin.policy() {
            FailurePolicy::Open => Self::Skip,
            FailurePolicy::Closed => Self::Fail,
        }
    }

    /// The failure that ends the request, if any.
    fn failure(self) -> Option<PluginFailure> {
        match self {
            Self::Skip => None,
            Self::Fail => Some(PluginFailure::Failed),
            Self::Overloaded => Some(PluginFailure::Overloaded),
        }
    }

    /// The error that ends the request, if any; `context` says where.
    fn error(self, context: &'static str) -> Option<ProxyError> {
        self.failure().map(|f| ProxyError::plugin(f, context))
    }
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
