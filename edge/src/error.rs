//! The data plane's one error type, and the one place errors become HTTP
//! responses ([`ProxyError::to_response`]).
//!
//! An error carries what went wrong ([`ErrorKind`]), which side caused it
//! ([`ErrorSource`]), whether the request may safely be retried, and a cause.

use std::fmt;
use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};

use crate::http::body::ResponseBody;
use crate::metrics::{Metrics, Reason, UpstreamError};

pub use crate::util::BoxError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed (reason in the metric label).
    BadRequest(&'static str),
    /// The request body is larger than `limits.max_body_bytes`.
    BodyTooLarge,
    /// The client stopped sending its body mid-way.
    ClientBodyError,
    /// The client's body stalled for the idle timeout while plugins read it.
    ClientBodyTimeout,
    /// No site is configured for the request's host.
    UnknownHost,
    /// Every origin of the pool is down or ejected.
    NoHealthyOrigin,
    /// The pool's connection limit was reached and none freed in time.
    PoolExhausted,
    ConnectRefused,
    ConnectTimeout,
    /// Other connect failures: DNS, unreachable, TLS handshake.
    ConnectFailed,
    /// The origin did not send a response head in time.
    HeaderTimeout,
    /// The origin closed or broke the exchange.
    UpstreamProtocol,
    /// The origin's body stalled for the idle timeout while the response
    /// head was still held (plugins buffering the body).
    UpstreamBodyTimeout,
    /// The server is shutting down.
    ShuttingDown,
    /// An unsafe request arrived in TLS early data (RFC 8470): retry after the handshake.
    TooEarly,
    /// `only-if-cached` and nothing usable is stored (RFC 9111 §5.2.1.7): 504.
    NotCached,
    /// The client may not do this (e.g. PURGE from an unlisted network).
    Forbidden,
    /// A Wasm plugin stopped the request: it failed under a closed policy,
    /// had no instance, or closed the stream. Not a plugin's deliberate
    /// answer (`send_local_response`), which is a response, not an error.
    Plugin(PluginFailure),
    Internal,
}

/// How a Wasm plugin stopped a request ([`ErrorKind::Plugin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PluginFailure {
    /// It trapped, ran out of time or memory, stalled, or broke a body,
    /// under `failure = "closed"`.
    Failed,
    /// No instance could be had for it (whatever its failure policy).
    Overloaded,
    /// It closed the stream in the request phase.
    ClosedRequest,
    /// It closed the stream in the response phase.
    ClosedResponse,
    /// Under a closed policy, it held back more of the request body than
    /// its `body_buffer`.
    RequestBodyOverBuffer,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest(_) => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::ClientBodyError => StatusCode::BAD_REQUEST,
            ErrorKind::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::UnknownHost => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::NoHealthyOrigin | ErrorKind::PoolExhausted | ErrorKind::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::ConnectRefused | ErrorKind::ConnectFailed | ErrorKind::UpstreamProtocol => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::ConnectTimeout
            | ErrorKind::HeaderTimeout
            | ErrorKind::UpstreamBodyTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::TooEarly => StatusCode::TOO_EARLY,
            ErrorKind::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Plugin(p) => match p {
                PluginFailure::Failed => StatusCode::INTERNAL_SERVER_ERROR,
                PluginFailure::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                PluginFailure::ClosedRequest => StatusCode::FORBIDDEN,
                PluginFailure::ClosedResponse => StatusCode::BAD_GATEWAY,
                PluginFailure::RequestBodyOverBuffer => StatusCode::PAYLOAD_TOO_LARGE,
            },
        }
    }

    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::BadRequest(r) => r,
            ErrorKind::BodyTooLarge => "body-too-large",
            ErrorKind::ClientBodyError => "client-body-error",
            ErrorKind::ClientBodyTimeout => "client-body-timeout",
            ErrorKind::UnknownHost => "unknown-host",
            ErrorKind::NoHealthyOrigin => "no-healthy-origin",
            ErrorKind::PoolExhausted => "pool-exhausted",
            ErrorKind::ConnectRefused => "connect-refused",
            ErrorKind::ConnectTimeout => "connect-timeout",
            ErrorKind::ConnectFailed => "connect-failed",
            ErrorKind::HeaderTimeout => "header-timeout",
            ErrorKind::UpstreamProtocol => "upstream-protocol",
            ErrorKind::UpstreamBodyTimeout => "upstream-body-timeout",
            ErrorKind::ShuttingDown => "shutting-down",
            ErrorKind::TooEarly => "too-early",
            ErrorKind::NotCached => "not-cached",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Plugin(p) => match p {
                PluginFailure::Failed => "plugin-failed",
                PluginFailure::Overloaded => "plugin-overloaded",
                PluginFailure::ClosedRequest | PluginFailure::ClosedResponse => "plugin-closed",
                PluginFailure::RequestBodyOverBuffer => "plugin-body-buffer",
            },
            ErrorKind::Internal => "internal",
        }
    }

    /// The body of the error response, where it is not the status line.
    fn body(self) -> Option<&'static str> {
        match self {
            ErrorKind::Plugin(p) => Some(match p {
                PluginFailure::Failed => "plugin failure\n",
                PluginFailure::Overloaded => "plugin host overloaded\n",
                PluginFailure::ClosedRequest | PluginFailure::ClosedResponse => {
                    "closed by plugin\n"
                }
                PluginFailure::RequestBodyOverBuffer => "request body over a plugin's buffer\n",
            }),
            _ => None,
        }
    }

    /// The connection may be out of step with the client (a request or its
    /// body was cut short): the response ends it.
    fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorKind::BadRequest(_)
                | ErrorKind::BodyTooLarge
                | ErrorKind::ClientBodyError
                | ErrorKind::ClientBodyTimeout
                | ErrorKind::TooEarly
                | ErrorKind::Plugin(PluginFailure::RequestBodyOverBuffer)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub source: ErrorSource,
    /// Nothing reached the origin, or the request is idempotent and its body
    /// can be replayed: another attempt is safe.
    pub retry_safe: bool,
    pub cause: Option<BoxError>,
    pub context: &'static str,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, source: ErrorSource, context: &'static str) -> Self {
        ProxyError {
            kind,
            source,
            retry_safe: false,
            cause: None,
            context,
        }
    }

    pub fn downstream(kind: ErrorKind, context: &'static str) -> Self {
        Self::new(kind, ErrorSource::Downstream, context)
    }

    pub fn upstream(kind: ErrorKind, context: &'static str) -> Self {
        Self::new(kind, ErrorSource::Upstream, context)
    }

    /// A Wasm plugin's failure: an internal error, neither the client's nor
    /// an origin's.
    pub fn plugin(failure: PluginFailure, context: &'static str) -> Self {
        Self::new(ErrorKind::Plugin(failure), ErrorSource::Internal, context)
    }

    pub fn with_cause(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn retry_safe(mut self, safe: bool) -> Self {
        self.retry_safe = safe;
        self
    }

    /// The response a client gets for this error; the only such mapping.
    pub fn to_response(&self, unknown_host_status: StatusCode) -> Response<ResponseBody> {
        let status = match self.kind {
            ErrorKind::UnknownHost => unknown_host_status,
            k => k.status(),
        };
        let body = match self.kind.body() {
            Some(b) => bytes::Bytes::from_static(b.as_bytes()),
            None => format!(
                "{} {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            )
            .into(),
        };
        let mut resp = Response::new(ResponseBody::full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.kind.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.kind == ErrorKind::Plugin(PluginFailure::Overloaded) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }

    /// Counts this error in the error metrics; the only place errors are
    /// counted and labelled. By source: the client's
    /// (`meridian_bad_requests_total{reason}`), an origin's
    /// (`meridian_upstream_errors_total{pool,kind}`, `pool` being the
    /// request's pool if it was routed), or the edge's own, plugin failures
    /// included (`meridian_internal_errors_total{reason}`). Unknown hosts
    /// are not counted (scanners would drown the rest).
    pub fn count(&self, metrics: &Metrics, pool: Option<&Arc<str>>) {
        let label = self.kind.label();
        match self.source {
            ErrorSource::Downstream if self.kind == ErrorKind::UnknownHost => {}
            ErrorSource::Downstream => {
                metrics
                    .bad_requests
                    .get_or_create(&Reason { reason: label })
                    .inc();
            }
            ErrorSource::Upstream => {
                let pool = pool.cloned().unwrap_or_else(|| Arc::from("-"));
                metrics
                    .upstream_errors
                    .get_or_create(&UpstreamError { pool, kind: label })
                    .inc();
            }
            ErrorSource::Internal => {
                metrics
                    .internal_errors
                    .get_or_create(&Reason { reason: label })
                    .inc();
            }
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}, {})",
            self.kind.label(),
            self.source,
            self.context
        )?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_ref().map(|c| c.as_ref() as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ErrorKind::ConnectRefused.status(), 502);
        assert_eq!(ErrorKind::HeaderTimeout.status(), 504);
        assert_eq!(ErrorKind::BodyTooLarge.status(), 413);
        let r = ProxyError::downstream(ErrorKind::UnknownHost, "route")
            .to_response(StatusCode::NOT_FOUND);
        assert_eq!(r.status(), 404);
        let r = ProxyError::downstream(ErrorKind::BadRequest("x"), "t")
            .to_response(StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }

    fn body_text(r: Response<ResponseBody>) -> String {
        let b =
            futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(r.into_body()))
                .and_then(Result::ok)
                .map(|c| c.to_bytes())
                .unwrap_or_default();
        String::from_utf8_lossy(&b).into_owned()
    }

    /// Plugin failures keep the statuses and bodies they had before they
    /// went through `to_response`.
    #[test]
    fn plugin_failures_answer_as_before() {
        let any = StatusCode::MISDIRECTED_REQUEST;
        for (f, status, body, label) in [
            (
                PluginFailure::Failed,
                500,
                "plugin failure\n",
                "plugin-failed",
            ),
            (
                PluginFailure::Overloaded,
                503,
                "plugin host overloaded\n",
                "plugin-overloaded",
            ),
            (
                PluginFailure::ClosedRequest,
                403,
                "closed by plugin\n",
                "plugin-closed",
            ),
            (
                PluginFailure::ClosedResponse,
                502,
                "closed by plugin\n",
                "plugin-closed",
            ),
            (
                PluginFailure::RequestBodyOverBuffer,
                413,
                "request body over a plugin's buffer\n",
                "plugin-body-buffer",
            ),
        ] {
            let e = ProxyError::plugin(f, "test");
            assert_eq!(e.source, ErrorSource::Internal);
            assert_eq!(e.kind.label(), label);
            let r = e.to_response(any);
            assert_eq!(r.status(), status, "{f:?}");
            assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
            assert_eq!(
                r.headers().get(header::RETRY_AFTER).is_some(),
                f == PluginFailure::Overloaded,
                "{f:?}"
            );
            assert_eq!(
                r.headers().get(header::CONNECTION).is_some(),
                f == PluginFailure::RequestBodyOverBuffer,
                "{f:?}: only a cut-short body closes the connection"
            );
            assert_eq!(body_text(r), body, "{f:?}");
        }
        let r = ProxyError::upstream(ErrorKind::UpstreamBodyTimeout, "t").to_response(any);
        assert_eq!(r.status(), 504);
        assert_eq!(body_text(r), "504 Gateway Timeout\n");
        let r = ProxyError::downstream(ErrorKind::ClientBodyTimeout, "t").to_response(any);
        assert_eq!(r.status(), 408);
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }

    /// Each source has its metric; the label is the kind's.
    #[test]
    fn errors_are_counted_by_source() {
        let m = Metrics::new();
        let pool: Arc<str> = Arc::from("p");
        ProxyError::plugin(PluginFailure::Failed, "t").count(&m, Some(&pool));
        ProxyError::downstream(ErrorKind::ClientBodyError, "t").count(&m, Some(&pool));
        ProxyError::downstream(ErrorKind::UnknownHost, "t").count(&m, None);
        ProxyError::upstream(ErrorKind::ConnectRefused, "t").count(&m, Some(&pool));
        ProxyError::upstream(ErrorKind::HeaderTimeout, "t").count(&m, None);
        use prometheus_client::metrics::{counter::Counter, family::Family};
        let get = |f: &Family<Reason, Counter>, r| f.get(&Reason { reason: r }).map(|c| c.get());
        assert_eq!(get(&m.internal_errors, "plugin-failed"), Some(1));
        assert_eq!(get(&m.bad_requests, "client-body-error"), Some(1));
        assert_eq!(get(&m.bad_requests, "unknown-host"), None);
        let up = |pool: &str, kind| {
            m.upstream_errors
                .get(&UpstreamError {
                    pool: Arc::from(pool),
                    kind,
                })
                .map(|c| c.get())
        };
        assert_eq!(up("p", "connect-refused"), Some(1));
        assert_eq!(up("-", "header-timeout"), Some(1));
        assert_eq!(up("p", "plugin-failed"), None);
    }
}
