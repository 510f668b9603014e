//! The adapter between the request pipeline and the Wasm host
//! (`meridian-wasm-host`): loads each site's plugin chain from the config,
//! and runs it in the request phase, after routing and before the cache, so
//! a request a plugin refuses never reaches the cache or the origin.
//!
//! Callbacks run synchronously on the worker thread. Each is bounded by the
//! plugin's deadline (epoch interruption), and a failure (trap, deadline,
//! memory limit) is mapped by the plugin's failure policy.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, Uri, request};
use meridian_wasm_host::{Action, FailurePolicy, HostConfig, Limits, Plugin, PluginHost};

use crate::config::PluginConfig;
use crate::http::body::ResponseBody;
use crate::metrics::{Metrics, Reason};

/// One loaded plugin of a site's chain.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub plugin: Plugin,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .finish()
    }
}

/// The process's plugin host (one wasmtime engine), created on first need.
pub fn new_host() -> Result<Arc<PluginHost>, String> {
    PluginHost::new(HostConfig::default())
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
        let config: Vec<u8> = match &c.config {
            None => Vec::new(),
            Some(toml::Value::String(s)) => s.clone().into_bytes(),
            Some(v) => serde_json::to_vec(v).map_err(|e| format!("plugin config: {e}"))?,
        };
        let limits = Limits {
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
        }));
    }
    Ok(out)
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .plugin_results
        .get_or_create(&Reason { reason: result })
        .inc();
}

/// Runs the request-header phase of every plugin, in order. Modified headers
/// (and `:path`) are written back into `parts`. `Some` is the response a
/// plugin answered with (or its failure policy's): the request goes no further.
pub fn run_request(
    chain: &[Arc<LoadedPlugin>],
    parts: &mut request::Parts,
    scheme: &str,
    end_of_stream: bool,
    metrics: &Metrics,
) -> Option<Response<ResponseBody>> {
    for lp in chain {
        let policy = lp.plugin.policy();
        let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(parts.headers.len() + 4);
        headers.push((":method".into(), parts.method.as_str().as_bytes().to_vec()));
        headers.push((":scheme".into(), scheme.as_bytes().to_vec()));
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        headers.push((
            ":authority".into(),
            authority.unwrap_or_default().into_bytes(),
        ));
        headers.push((
            ":path".into(),
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes()
                .to_vec(),
        ));
        for (n, v) in &parts.headers {
            headers.push((n.as_str().to_string(), v.as_bytes().to_vec()));
        }
        let result = lp.plugin.request_context().and_then(|mut ctx| {
            let action = ctx.on_request_headers(&mut headers, end_of_stream);
            let _ = ctx.finish();
            action
        });
        if result.is_err() {
            count(metrics, "failed");
        }
        match policy.apply(result) {
            Action::Continue => {
                count(metrics, "continue");
                write_back(parts, headers);
            }
            Action::LocalResponse(lr) => {
                count(metrics, "local-response");
                let mut resp = Response::new(ResponseBody::full(lr.body));
                *resp.status_mut() =
                    StatusCode::from_u16(lr.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                for (n, v) in lr.headers {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(n.as_bytes()),
                        HeaderValue::from_bytes(&v),
                    ) {
                        resp.headers_mut().append(n, v);
                    }
                }
                return Some(resp);
            }
            // Pausing for an http_call is not wired into the edge yet: the
            // plugin's failure policy decides.
            _ => {
                count(metrics, "unsupported");
                tracing::warn!(plugin = %lp.name, "plugin paused or closed the stream; not supported yet");
                if policy == FailurePolicy::Closed {
                    let mut resp =
                        Response::new(ResponseBody::full(Bytes::from_static(b"plugin failure\n")));
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    return Some(resp);
                }
            }
        }
    }
    None
}

fn write_back(parts: &mut request::Parts, headers: Vec<(String, Vec<u8>)>) {
    let mut map = http::HeaderMap::with_capacity(headers.len());
    for (n, v) in headers {
        if n == ":path" {
            if let Ok(pq) = http::uri::PathAndQuery::try_from(v.as_slice()) {
                let mut up = parts.uri.clone().into_parts();
                up.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(up) {
                    parts.uri = u;
                }
            }
            continue;
        }
        if n.starts_with(':') {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            map.append(n, v);
        }
    }
    parts.headers = map;
}
