//! The admin HTTP listener: `/healthz`, `/metrics`, `/regions`, and
//! `POST /regions/NAME/drain|undrain`. A small match-based router on hyper 1.
//!
//! Access (the same contract as the edge's admin):
//! - `/healthz` and `/readyz` are open;
//! - with `admin.token` set, every other request needs
//!   `Authorization: Bearer <token>` (401 with `WWW-Authenticate: Bearer`
//!   otherwise); `admin.read_token` gives the GET endpoints only (403 on the
//!   others);
//! - a mutating request (anything but GET/HEAD) that carries `Origin`, or
//!   `Sec-Fetch-Site` other than `none`/`same-origin`, comes from a browser
//!   page and is refused with 403, token or not;
//! - a non-loopback admin address without a token is a configuration error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::config::{Config, Seg};
use crate::handler::Shared;
use crate::metrics::ReasonLabels;
use crate::model::{FileSource, resolve};

/// The admin tokens in effect (never printed).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminAuth {
    full: Option<Arc<str>>,
    read: Option<Arc<str>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token", &self.full.as_ref().map(|_| "<redacted>"))
            .field("read_token", &self.read.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No or a wrong token: 401.
    Unauthenticated,
    /// The read-only token: GET endpoints.
    Read,
    /// The full token, or no token configured (loopback only).
    Full,
}

/// Compare without an early exit on the first differing byte. Both sides
/// are hashed first, so the time does not depend on where they differ nor
/// (beyond the hash) on the secret's length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use ring::digest::{SHA256, digest};
    let (da, db) = (digest(&SHA256, a), digest(&SHA256, b));
    let diff = da
        .as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl AdminAuth {
    /// Tokens given directly (tests and the demo).
    pub fn new(full: Option<&str>, read: Option<&str>) -> Self {
        Self {
            full: full.map(Arc::from),
            read: read.map(Arc::from),
        }
    }

    /// The token to send for reads: `read_token`, else `token`.
    pub fn read_bearer(&self) -> Option<&str> {
        self.read.as_deref().or(self.full.as_deref())
    }

    /// True when a full-access token is configured.
    pub fn has_token(&self) -> bool {
        self.full.is_some()
    }

    /// The access an `Authorization` header value grants.
    pub fn access(&self, authorization: Option<&[u8]>) -> Access {
        let Some(full) = &self.full else {
            return Access::Full;
        };
        let Some(given) = authorization.and_then(bearer) else {
            return Access::Unauthenticated;
        };
        // Both comparisons always run.
        let is_full = constant_time_eq(given, full.as_bytes());
        let is_read = self
            .read
            .as_ref()
            .is_some_and(|r| constant_time_eq(given, r.as_bytes()));
        if is_full {
            Access::Full
        } else if is_read {
            Access::Read
        } else {
            Access::Unauthenticated
        }
    }
}

fn bearer(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

/// A browser sent this request from another site's page: it carries
/// `Origin`, or `Sec-Fetch-Site` other than `none`/`same-origin`. curl and
/// scripts send neither.
pub fn is_cross_site(headers: &http::HeaderMap) -> bool {
    if headers.contains_key(header::ORIGIN) {
        return true;
    }
    match headers.get("sec-fetch-site").map(|v| v.as_bytes()) {
        None => false,
        Some(v) => !(v.eq_ignore_ascii_case(b"none") || v.eq_ignore_ascii_case(b"same-origin")),
    }
}

/// One located problem in the `[admin]` section: key path and reason.
pub type AdminProblem = (Vec<Seg<'static>>, String);

fn read_secret(base: &Path, file: &Path, files: &dyn FileSource) -> Result<String, String> {
    let path: PathBuf = resolve(base, file);
    let text = files
        .read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim_end().to_owned())
}

/// Resolve the tokens of `[admin]` (reading `*_file`s relative to `base`)
/// and check the section, including that a non-loopback address has a
/// token.
pub fn resolve_auth(
    config: &Config,
    base: &Path,
    files: &dyn FileSource,
) -> (AdminAuth, Vec<AdminProblem>) {
    use Seg::Key;
    let a = &config.admin;
    let mut problems: Vec<AdminProblem> = Vec::new();
    let one = |inline: &Option<String>,
               file: &Option<PathBuf>,
               key: &'static str,
               file_key: &'static str,
               problems: &mut Vec<AdminProblem>|
     -> Option<String> {
        let v = match (inline, file) {
            (Some(_), Some(_)) => {
                problems.push((
                    vec![Key("admin"), Key(file_key)],
                    format!("set `{key}` or `{file_key}`, not both"),
                ));
                return None;
            }
            (Some(t), None) => t.clone(),
            (None, Some(f)) => match read_secret(base, f, files) {
                Ok(t) => t,
                Err(e) => {
                    problems.push((vec![Key("admin"), Key(file_key)], e));
                    return None;
                }
            },
            (None, None) => return None,
        };
        if v.is_empty() || v.chars().any(|c| c.is_ascii_whitespace() || c.is_control()) {
            let at = if inline.is_some() { key } else { file_key };
            problems.push((
                vec![Key("admin"), Key(at)],
                format!("`{key}` must be non-empty, without spaces or control characters"),
            ));
            return None;
        }
        Some(v)
    };
    let full = one(
        &a.token,
        &a.token_file,
        "token",
        "token_file",
        &mut problems,
    );
    let read = one(
        &a.read_token,
        &a.read_token_file,
        "read_token",
        "read_token_file",
        &mut problems,
    );
    let full_set = a.token.is_some() || a.token_file.is_some();
    let read_set = a.read_token.is_some() || a.read_token_file.is_some();
    if read_set && !full_set {
        problems.push((
            vec![
                Key("admin"),
                Key(if a.read_token.is_some() {
                    "read_token"
                } else {
                    "read_token_file"
                }),
            ],
            "`read_token` needs `token` (or `token_file`) too".into(),
        ));
    }
    if let (Some(f), Some(r)) = (&full, &read)
        && f == r
    {
        problems.push((
            vec![Key("admin"), Key("read_token")],
            "`read_token` must differ from `token`".into(),
        ));
    }
    if a.listen.is_some() && config.server.admin.is_some() {
        problems.push((
            vec![Key("admin"), Key("listen")],
            "set `admin.listen` or `server.admin`, not both".into(),
        ));
    }
    let addr = config.admin_listen();
    if !full_set && let Some(reason) = exposure(addr, false) {
        let at = if a.listen.is_some() {
            vec![Key("admin"), Key("listen")]
        } else {
            vec![Key("server"), Key("admin")]
        };
        problems.push((at, reason));
    }
    let auth = AdminAuth {
        full: full.map(Arc::from),
        read: read.map(Arc::from),
    };
    (auth, problems)
}

/// Why an admin listener on `addr` is not allowed (`None`: it is).
pub fn exposure(addr: SocketAddr, has_token: bool) -> Option<String> {
    if has_token || addr.ip().is_loopback() {
        None
    } else {
        Some(format!(
            "the admin API on {addr} is not loopback-only and has no token: \
             set `admin.token_file` (or `admin.token`), or listen on 127.0.0.1 / [::1]"
        ))
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

/// Route one request.
pub fn route(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/regions") => {
            let rt = shared.runtime.load();
            let regions: Vec<serde_json::Value> = rt
                .model
                .regions
                .iter()
                .zip(&rt.health)
                .map(|(r, h)| {
                    let s = h.state();
                    serde_json::json!({
                        "name": &*r.name,
                        "lat": r.lat,
                        "lon": r.lon,
                        "weight": r.weight,
                        "healthy": s.healthy,
                        "drained": s.drained,
                        "available": s.available(),
                        "checked": h.is_checked(),
                        "a": r.a.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(),
                        "aaaa": r.aaaa.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "regions": regions }))
        }
        (m, p) if p.starts_with("/regions/") => {
            let rest = &p["/regions/".len()..];
            let (name, action) = match rest.rsplit_once('/') {
                Some((n, a)) => (n, a),
                None => {
                    return json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "not found"}),
                    );
                }
            };
            let drained = match action {
                "drain" => true,
                "undrain" => false,
                _ => {
                    return json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "not found"}),
                    );
                }
            };
            if m != Method::POST {
                return json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &serde_json::json!({"error": "use POST"}),
                );
            }
            if shared.health.set_drained(name, drained, &shared.metrics) {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"region": name, "drained": drained}),
                )
            } else {
                json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("no region {name:?}")}),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}

fn refuse(shared: &Shared, status: StatusCode, reason: &'static str) -> Response<Full<Bytes>> {
    shared
        .metrics
        .ops
        .admin_refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
    let mut r = json(status, &serde_json::json!({ "error": reason }));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"meridian-dns\""),
        );
    }
    r
}

/// Check access, then route.
pub fn handle(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Response<Full<Bytes>> {
    if matches!(path, "/healthz" | "/readyz") {
        return route(shared, method, path);
    }
    let auth = shared.runtime.load().model.admin.clone();
    let access = auth.access(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    let reads_only = matches!(*method, Method::GET | Method::HEAD);
    match access {
        Access::Unauthenticated => {
            return refuse(shared, StatusCode::UNAUTHORIZED, "unauthenticated");
        }
        Access::Read if !reads_only => {
            return refuse(shared, StatusCode::FORBIDDEN, "read_only");
        }
        Access::Read | Access::Full => {}
    }
    if !reads_only && is_cross_site(headers) {
        return refuse(shared, StatusCode::FORBIDDEN, "cross_site");
    }
    route(shared, method, path)
}

/// Serve the admin API until `shutdown` flips to true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = handle(&shared, req.method(), req.uri().path(), req.headers());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(Duration::from_secs(60), conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "admin connection error"),
                Err(_) => debug!(%peer, "admin connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}
