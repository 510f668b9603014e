//! The built-in modules of the request path, and the adapter that makes a
//! site's Wasm plugin chain a module. Each implements only its phases of
//! [`HttpModule`]; `docs/phases.md` lists them in order.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Response, Version};

use super::headers;
use super::phase::{Flow, HttpModule, PhaseFuture};
use super::session::Session;
use crate::error::{ErrorKind, ProxyError};
use crate::http::Proto;
use crate::http::body::ResponseBody;

/// Order of the built-in request checks: before anything else.
pub const ORDER_REQUEST_CHECKS: i32 = -1000;
/// Order of a site's Wasm chain.
pub const ORDER_WASM: i32 = 0;
/// Order of the proxy's own header rules: after every other module, so the
/// origin and the client get them whatever a module did.
pub const ORDER_PROXY_HEADERS: i32 = 1000;

/// Refuses malformed or over-limit requests (smuggling flags, duplicate or
/// missing Host, an unsafe method in 0-RTT data, a declared body over
/// `limits.max_body_bytes`), and makes an absolute-form target and Host
/// agree, so that the router, the plugins, the cache key and the origin see
/// one host (RFC 9112 §3.2.2).
#[derive(Debug, Default)]
pub struct RequestChecks;

impl HttpModule for RequestChecks {
    fn name(&self) -> &'static str {
        "request-checks"
    }

    fn order(&self) -> i32 {
        ORDER_REQUEST_CHECKS
    }

    fn early_request_filter(&self, s: &mut Session) -> Result<Flow, ProxyError> {
        if s.ds.proto == Proto::H1
            && let Some(flag) = s.ds.conn.take_flag(s.seq)
        {
            return Err(ProxyError::downstream(
                ErrorKind::BadRequest(flag.reason()),
                "h1 framing",
            ));
        }
        let parts = &mut s.up.parts;
        if parts.headers.get_all(header::HOST).iter().count() > 1 {
            return Err(ProxyError::downstream(
                ErrorKind::BadRequest("duplicate-host"),
                "host",
            ));
        }
        let host: Option<String> = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        if s.ds.proto == Proto::H1
            && let Some(a) = parts.uri.authority()
        {
            match HeaderValue::from_str(a.as_str()) {
                Ok(v) => {
                    parts.headers.insert(header::HOST, v);
                }
                Err(_) => {
                    return Err(ProxyError::downstream(
                        ErrorKind::BadRequest("bad-host"),
                        "host",
                    ));
                }
            }
        }
        if host.is_none() && parts.version == Version::HTTP_11 {
            return Err(ProxyError::downstream(
                ErrorKind::BadRequest("missing-host"),
                "host",
            ));
        }
        // 0-RTT data can be replayed: only safe methods, marked for the
        // origin (RFC 8470).
        if s.ds.early {
            if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
                return Err(ProxyError::downstream(ErrorKind::TooEarly, "early data"));
            }
            parts
                .headers
                .insert("early-data", HeaderValue::from_static("1"));
        }
        let max_body = s.rt.config.limits.max_body_bytes.get();
        if max_body > 0
            && let Some(len) = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            && len > max_body
        {
            return Err(ProxyError::downstream(
                ErrorKind::BodyTooLarge,
                "content-length",
            ));
        }
        s.up.host = host;
        Ok(Flow::Continue)
    }
}

/// The proxy's own header rules (RFC 9110 §7.6): toward the origin,
/// hop-by-hop fields go, `Expect` goes (the proxy answers it), `Via` and
/// the forwarding fields are added; toward the client, `Via` and, on TLS
/// listeners that serve HTTP/3, `Alt-Svc`.
#[derive(Debug, Default)]
pub struct ProxyHeaders;

impl HttpModule for ProxyHeaders {
    fn name(&self) -> &'static str {
        "proxy-headers"
    }

    fn order(&self) -> i32 {
        ORDER_PROXY_HEADERS
    }

    fn upstream_request_filter(&self, s: &mut Session) -> Result<(), ProxyError> {
        let parts = &mut s.up.parts;
        headers::strip_hop_by_hop(&mut parts.headers, s.up.upgrade);
        parts.headers.remove(header::EXPECT);
        s.rt.via.add(&mut parts.headers, parts.version);
        headers::add_forwarded(
            &mut parts.headers,
            s.rt.config.server.forwarded,
            s.ds.client.ip(),
            s.ds.tls,
            s.up.host.as_deref(),
        );
        Ok(())
    }

    fn response_filter<'a>(
        &'a self,
        s: &'a Session,
        resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        let version = resp.version();
        s.rt.via.add(resp.headers_mut(), version);
        if s.ds.tls
            && s.ds.proto != Proto::H3
            && let Some(v) = s.proxy.alt_svc_for(s.ds.local.port())
        {
            resp.headers_mut().insert(header::ALT_SVC, v);
        }
        None
    }
}

/// A site's Wasm plugin chain as a module: the plugins' request headers
/// and body phases, their response phase on origin responses (before the
/// cache stores them) and, for plugins with `every_response`, on every
/// client response. Their contexts live in the session's exchange until
/// the response body ends (then `on_log`).
pub struct WasmChain {
    pub chain: crate::plugins::Chain,
}

impl HttpModule for WasmChain {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn order(&self) -> i32 {
        ORDER_WASM
    }

    fn request_filter<'a>(
        &'a self,
        s: &'a mut Session,
    ) -> Option<PhaseFuture<'a, Result<Flow, ProxyError>>> {
        if self.chain.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            let eos = s
                .client_body
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream);
            let scheme = if s.ds.tls { "https" } else { "http" };
            let props = Arc::new(crate::plugins::RequestProps::new(
                s.ds.client,
                s.ds.local,
                s.ds.tls,
                s.ds.proto.label(),
                s.rt.geoip.clone(),
                (
                    s.up.parts.method.clone(),
                    s.up.parts.uri.clone(),
                    s.up.host.clone().unwrap_or_default(),
                ),
            ));
            let (proxy, rt) = (s.proxy.clone(), s.rt.clone());
            let call = |c| proxy.plugin_http_call(&rt, c);
            let phase = crate::plugins::RequestPhase {
                chain: &self.chain,
                scheme,
                end_of_stream: eos,
                metrics: &s.proxy.metrics,
                props,
                instance_wait: s.rt.config.plugins.instance_wait.get(),
            };
            match crate::plugins::run_request(phase, &mut s.up.parts, call).await? {
                crate::plugins::Outcome::Continue(ex) => {
                    s.up.plugins = Some(ex);
                    Ok(Flow::Continue)
                }
                crate::plugins::Outcome::Respond(resp) => Ok(Flow::Respond(resp)),
            }
        }))
    }

    fn request_body_filter<'a>(
        &'a self,
        s: &'a mut Session,
    ) -> Option<PhaseFuture<'a, Result<Flow, ProxyError>>> {
        let ex = s.up.plugins.clone()?;
        let eos = s
            .client_body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream);
        if eos || !crate::plugins::has_request_body_phase(&ex) {
            return None;
        }
        Some(Box::pin(async move {
            let Some(body) = s.client_body.take() else {
                return Ok(Flow::Continue);
            };
            let idle = s.site()?.pool.config.timeouts.idle.get();
            match crate::plugins::request_body_phase(&ex, &mut s.up.parts, body, idle).await? {
                crate::plugins::Outcome::Continue(b) => {
                    s.client_body = Some(b);
                    Ok(Flow::Continue)
                }
                crate::plugins::Outcome::Respond(resp) => Ok(Flow::Respond(resp)),
            }
        }))
    }

    fn upstream_response_filter<'a>(
        &'a self,
        s: &'a Session,
        resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        self.response_phase(s, crate::plugins::Phase::Store, resp)
    }

    fn response_filter<'a>(
        &'a self,
        s: &'a Session,
        resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        self.response_phase(s, crate::plugins::Phase::Deliver, resp)
    }
}

impl WasmChain {
    fn response_phase<'a>(
        &'a self,
        s: &'a Session,
        phase: crate::plugins::Phase,
        resp: &'a mut Response<ResponseBody>,
    ) -> Option<PhaseFuture<'a, Result<(), ProxyError>>> {
        let ex = s.up.plugins.as_ref()?;
        if !crate::plugins::has_phase(ex, phase) {
            return None;
        }
        Some(Box::pin(async move {
            let r = std::mem::replace(resp, Response::new(ResponseBody::empty()));
            *resp = crate::plugins::response_phase(ex, phase, r).await?;
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::phase::ordered;

    #[test]
    fn modules_run_in_their_order() {
        let m = ordered(vec![
            Arc::new(ProxyHeaders),
            Arc::new(WasmChain {
                chain: Arc::from(Vec::new()),
            }),
            Arc::new(RequestChecks),
        ]);
        let names: Vec<_> = m.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["request-checks", "wasm", "proxy-headers"]);
    }
}
