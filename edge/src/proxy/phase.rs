//! The phases of the request path, as a trait with documented defaults
//! (the shape of pingora's `ProxyHttp` phases and `HttpModule`).
//!
//! A feature of the request path is a module: a type implementing
//! [`HttpModule`] for the phases it cares about, with an [`HttpModule::order`]
//! that places it among the others. The built-in stages (`super::modules`)
//! and a site's Wasm plugin chain are modules; rate limiting or compression
//! would be one more. `docs/phases.md` draws the chart.
//!
//! Phases that may wait (the Wasm chain's) return `Some(future)`; the
//! default `None` costs nothing, so built-in modules never box a future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Response;

use super::session::Session;
use super::upstream::Pool;
use crate::accesslog::LogRecord;
use crate::error::ProxyError;
use crate::http::body::{BodyFilter, ResponseBody};

/// A boxed phase future, for the modules whose phases wait.
pub type PhaseFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a request phase decided.
pub enum Flow {
    /// Go on: the next module, then the next phase.
    Continue,
    /// Answer the client with this response; later request phases are
    /// skipped, the response phases still run.
    Respond(Box<Response<ResponseBody>>),
}

/// One module of the request path. Every method has a default that leaves
/// the request as it is, so a module implements only its phases. In each
/// phase the modules run in ascending [`order`](HttpModule::order); the
/// response phases run in the same order.
pub trait HttpModule: Send + Sync {
    /// The module's name, for logs and `docs/phases.md`.
    fn name(&self) -> &'static str;

    /// Where the module runs among the others in each phase (lower first).
    fn order(&self) -> i32 {
        0
    }

    /// **early_request_filter**: the request as received, before routing.
    /// Refuse malformed requests here (an `Err` becomes the error response).
    /// Default: continue.
    fn early_request_filter(&self, _s: &mut Session) -> Result<Flow, ProxyError> {
        Ok(Flow::Continue)
    }

    /// **route**: the site for the request, as an index into the
    /// generation's sites. `None` leaves the choice to the next module;
    /// the built-in router is last. Default: no opinion.
    fn route(&self, _s: &Session) -> Option<usize> {
        None
    }

    /// **request_filter**: after routing, the site's modules see the
    /// request; they may change its head or answer it. Default: continue.
    fn request_filter<'a>(
        &'a self,
        _s: &'a mut Session,
    ) -> Option<PhaseFuture<'a, Result<Flow, ProxyError>>> {
        None
    }

    /// **request_body_filter**: the request body on its way to the origin.
    /// Default: unchanged.
    fn request_body_filter<'a>(
        &'a self,
        _s: &'a mut Session,
    ) -> Option<PhaseFuture<'a, Result<Flow, ProxyError>>> {
        None
    }

    /// **upstream_request_filter**: the request as it will go to the
    /// origin, whatever answers it (cache fill or pass). Default: unchanged.
    fn upstream_request_filter(&self, _s: &mut Session) -> Result<(), ProxyError> {
        Ok(())
    }

    /// **cache_key**: may change the cache key the site's options built.
    /// Default: unchanged.
    fn cache_key(&self, _s: &Session, _key: &mut String) {}

    /// **upstream_peer**: the origin of the site's pool to try first, as an
    /// index into `pool.origins`, asked once per request after
    /// upstream_request_filter; the first module with an answer decides,
    /// and an index out of range is ignored. The choice holds for every
    /// fetch of the request (a cache fill, a revalidation, a pass); only
    /// the first attempt goes to it: a retry after a retry-safe failure
    /// goes through the pool's load balancer, which skips the origins
    /// already tried. The module owns the choice: a chosen origin is tried
    /// even when its health checks fail. Default: `None`, the pool's load
    /// balancer (its policy, health, slow start and panic mode) picks.
    fn upstream_peer(&self, _s: &Session, _pool: &Pool) -> Option<usize> {
        None
    }

    /// **upstream_response_filter**: an origin's response, before the
    /// cache stores it. An `Err` fails the request. Default: unchanged.
    fn upstream_response_filter<'a>(
        &'a self,
        _s: &'a Session,
        _resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        None
    }

    /// **response_filter**: every response the client gets, from the
    /// cache, the origin or an error, including its body (a module that
    /// transforms bodies wraps it here). An `Err` replaces the response
    /// with the error's. Default: unchanged.
    fn response_filter<'a>(
        &'a self,
        _s: &'a Session,
        _resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        None
    }

    /// **response_body_filter**: a filter for the data of this response's
    /// body, created after every module's response_filter (so it sees the
    /// final head), run chunk by chunk as the body streams to the client,
    /// in module order, and once more at the end of the data (see
    /// [`BodyFilter`]). A filter that changes the length must remove
    /// `Content-Length` in its response_filter. Default: `None`, the body
    /// passes untouched and nothing is allocated.
    fn response_body_filter(
        &self,
        _s: &Session,
        _resp: &Response<ResponseBody>,
    ) -> Option<Box<dyn BodyFilter>> {
        None
    }

    /// **logging**: when the response body has ended (complete or not),
    /// with the finished log record. Default: nothing.
    fn logging(&self, _rec: &LogRecord) {}
}

impl std::fmt::Debug for dyn HttpModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An ordered list of modules.
pub type Modules = Arc<[Arc<dyn HttpModule>]>;

/// Sorts modules by their order (stable: equal orders keep their place).
pub fn ordered(mut v: Vec<Arc<dyn HttpModule>>) -> Modules {
    v.sort_by_key(|m| m.order());
    v.into()
}
