//! The request phase: `on_request_headers` for every plugin, in chain
//! order, with the plugins' `http_call`s, before the cache and the origin.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Uri, header, request};
use meridian_wasm_host::{
    Action, ErrorKind, FailurePolicy, HeaderEdit, HeaderList, HttpCallRequest, HttpCallResponse,
    PluginError, PropertyResolver, RequestContext,
};
use parking_lot::Mutex;

use super::headers::{apply_edits, header_map, push_headers};
use super::{
    Chain, Exchange, LoadedPlugin, Outcome, SharedExchange, Verdict, count, local_response,
};
use crate::error::{PluginFailure, ProxyError};
use crate::metrics::Metrics;

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

/// The most HTTP-call rounds one plugin may go through in one request.
const MAX_CALL_ROUNDS: usize = 8;

/// What the request phase needs besides the request: the site's chain and
/// the request's context. Built once per request by the proxy.
pub struct RequestPhase<'a> {
    pub chain: &'a Chain,
    /// `http` or `https`, for `:scheme`.
    pub scheme: &'static str,
    /// The request has no body.
    pub end_of_stream: bool,
    pub metrics: &'a Arc<Metrics>,
    pub props: Arc<dyn PropertyResolver>,
    /// How long to wait for a plugin instance (`[plugins] instance_wait`).
    pub instance_wait: Duration,
}

impl std::fmt::Debug for RequestPhase<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPhase")
            .field("plugins", &self.chain.len())
            .field("scheme", &self.scheme)
            .field("end_of_stream", &self.end_of_stream)
            .finish_non_exhaustive()
    }
}

/// Runs the request-header phase of every plugin, in order. Modified headers
/// (and `:path`) are written back into `parts`. [`Outcome::Continue`]
/// carries the live contexts for the response phase; [`Outcome::Respond`] is
/// a plugin's own answer, and `Err` its failure (by its failure policy), or
/// no instance for it: either way the request goes no further.
///
/// `call` performs a plugin's `http_call` (`None`: failed or timed out).
pub async fn run_request<F, Fut>(
    phase: RequestPhase<'_>,
    parts: &mut request::Parts,
    call: F,
) -> Result<Outcome<SharedExchange>, ProxyError>
where
    F: Fn(HttpCallRequest) -> Fut,
    Fut: Future<Output = Option<HttpCallResponse>>,
{
    let RequestPhase {
        chain,
        scheme,
        end_of_stream,
        metrics,
        props,
        instance_wait,
    } = phase;
    let mut ex = Exchange {
        chain: chain.clone(),
        ctxs: Vec::with_capacity(chain.len()),
        head: parts.method == http::Method::HEAD,
        metrics: metrics.clone(),
        response_headers: Vec::new(),
    };
    for lp in chain.iter() {
        let policy = lp.plugin.policy();
        // `Some` is the error that ends the request; `None` skips the plugin.
        let fail = |ex: &mut Exchange, e: &PluginError| -> Option<ProxyError> {
            let r = Verdict::of(metrics, lp, e, "in the request phase").error("request phase");
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
                    return Ok(Outcome::Respond(Box::new(local_response(lr))));
                }
                Ok(Action::Close) => {
                    count(metrics, "close");
                    return Err(ProxyError::plugin(
                        PluginFailure::ClosedRequest,
                        "request phase",
                    ));
                }
                Ok(Action::Pause) => {
                    let calls = ctx.take_http_calls();
                    if calls.is_empty() || rounds >= MAX_CALL_ROUNDS {
                        // Nothing can resume it: the failure policy decides.
                        lp.warn_failure(
                            &format_args!("{rounds} rounds of calls"),
                            format_args!("plugin paused with no call to wait for"),
                        );
                        count(metrics, "stalled");
                        if policy == FailurePolicy::Closed {
                            return Err(ProxyError::plugin(
                                PluginFailure::Failed,
                                "request phase: stalled",
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
    Ok(Outcome::Continue(Arc::new(Mutex::new(ex))))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
