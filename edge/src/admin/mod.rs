//! The admin listener: health, readiness, metrics, the effective config,
//! drain control and reload. Loopback by default (a non-loopback address
//! without a token is refused by the config check).
//!
//! Access, as Envoy separates its admin's read-only and mutating endpoints:
//! * `/healthz` and `/readyz` are always open;
//! * with `admin.token`, every other request needs `Authorization: Bearer
//!   <token>`; with `admin.read_token` too, that token is enough for GET and
//!   HEAD requests, and a mutating request with it gets 403. A missing or
//!   wrong token gets 401 with `WWW-Authenticate: Bearer`. Tokens are
//!   compared in constant time;
//! * a mutating request (any method but GET and HEAD) that a browser sent
//!   from a web page is refused with 403: one carrying an `Origin` header, or
//!   `Sec-Fetch-Site` other than `none` or `same-origin`. So a page cannot
//!   drain or reload a loopback admin through a form POST.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, watch};

use crate::proxy::Proxy;

/// Asks the server's control loop to do something, and waits for the result.
#[derive(Debug)]
pub enum Control {
    Reload(oneshot::Sender<Result<(), String>>),
}

/// The admin API's bearer tokens (swapped on reload).
#[derive(Clone, Default)]
pub struct Tokens {
    /// Full access; `None`: the API is open (loopback only, by the config check).
    pub full: Option<Arc<str>>,
    /// GET and HEAD only.
    pub read: Option<Arc<str>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("full", &self.full.as_ref().map(|_| crate::config::REDACTED))
            .field("read", &self.read.as_ref().map(|_| crate::config::REDACTED))
            .finish()
    }
}

/// What a request's credentials allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Full,
    Read,
    Denied,
}

impl Tokens {
    /// Reads the tokens of `[admin]`, from the files where they are in files.
    pub fn load(cfg: &crate::config::AdminConfig) -> Result<Tokens, String> {
        let read = |inline: &Option<String>, file: &Option<std::path::PathBuf>| {
            if let Some(t) = inline {
                return Ok(Some(Arc::from(t.as_str())));
            }
            if let Some(f) = file {
                let t = std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {}", f.display(), e.kind()))?;
                let t = t.trim_end();
                if t.is_empty() {
                    return Err(format!("{}: the token file is empty", f.display()));
                }
                return Ok(Some(Arc::from(t)));
            }
            Ok(None)
        };
        Ok(Tokens {
            full: read(&cfg.token, &cfg.token_file)?,
            read: read(&cfg.read_token, &cfg.read_token_file)?,
        })
    }

    /// What `authorization` (the header's value, if any) grants.
    pub fn access(&self, authorization: Option<&[u8]>) -> Access {
        let Some(full) = &self.full else {
            return Access::Full;
        };
        let Some(given) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else {
            return Access::Denied;
        };
        // Both compared, whatever the first gives, so timing tells nothing.
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
            Access::Denied
        }
    }
}

#[derive(Clone)]
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub tokens: Arc<ArcSwap<Tokens>>,
    pub control: mpsc::Sender<Control>,
    /// Whether the edge is overloaded (readiness fails while it is).
    pub overloaded: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admin")
    }
}

/// Whether a browser sent this request from a web page of another site:
/// an `Origin` header, or `Sec-Fetch-Site` other than `none` (typed by the
/// user) or `same-origin`. curl and other tools send neither.
pub fn cross_site(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none" && v.as_bytes() != b"same-origin")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let open = matches!(path, "/healthz" | "/readyz");
        let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
        if !open {
            let access = self.tokens.load().access(
                req.headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            );
            match access {
                Access::Denied => {
                    let mut r = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                    return r;
                }
                Access::Read if mutating => {
                    return text(
                        StatusCode::FORBIDDEN,
                        "403 Forbidden: the read-only token cannot change anything\n",
                    );
                }
                Access::Read | Access::Full => {}
            }
        }
        if mutating && cross_site(req.headers()) {
            tracing::warn!(%path, "admin: cross-site browser request refused");
            return text(
                StatusCode::FORBIDDEN,
                "403 Forbidden: cross-site requests cannot change anything\n",
            );
        }
        match (req.method(), path) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if self.proxy.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if (self.overloaded)() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "overloaded\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                if let Some(c) = &self.proxy.cache {
                    c.update_gauges();
                }
                let rt = self.proxy.runtime();
                crate::plugins::update_metrics(
                    &self.proxy.metrics,
                    rt.sites.iter().map(|s| &s.plugins[..]),
                    rt.plugin_host.as_deref(),
                );
                self.proxy.metrics.update_allocator();
                let mut r = text(StatusCode::OK, self.proxy.metrics.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/config") => {
                let cfg = self.proxy.runtime().config.redacted();
                match toml::to_string_pretty(&cfg) {
                    Ok(s) => text(StatusCode::OK, s),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            (&Method::POST, "/purge") => self.purge_post(req).await,
            (&Method::GET, "/purge") => self.purge_list(),
            (&Method::GET, p) if p.starts_with("/purge/") => self.purge_status(p),
            (_, p) if p.starts_with("/purge/") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n")
            }
            (&Method::GET, "/cache") => match &self.proxy.cache {
                Some(c) => json(StatusCode::OK, &c.stats_json()),
                None => text(StatusCode::NOT_FOUND, "no cache is configured\n"),
            },
            (&Method::POST, "/drain") => {
                self.proxy.set_draining(true);
                tracing::warn!("drain requested through the admin API: /readyz now answers 503");
                text(StatusCode::OK, "draining\n")
            }
            (&Method::POST, "/undrain") => {
                self.proxy.set_draining(false);
                tracing::warn!("undrain requested through the admin API");
                text(StatusCode::OK, "ready\n")
            }
            (&Method::POST, "/reload") => {
                let (tx, rx) = oneshot::channel();
                if self.control.send(Control::Reload(tx)).await.is_err() {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
                }
                match rx.await {
                    Ok(Ok(())) => text(StatusCode::OK, "reloaded\n"),
                    Ok(Err(e)) => text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("reload refused: {e}\n"),
                    ),
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
                }
            }
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/config" | "/drain" | "/undrain" | "/reload"
                | "/purge" | "/cache",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "404 Not Found\n"),
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let mut r = text(status, serde_json::to_vec_pretty(v).unwrap_or_default());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin API on `listener` until `stop` turns true. Then it
/// stops accepting, lets each open connection finish the request it is
/// serving (HTTP/1.1 graceful shutdown: idle ones close at once), and
/// returns when they are done, or after [`ADMIN_DRAIN`]. A request accepted
/// just before a socket handover is still answered by this process.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Admin,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        while conns.try_join_next().is_some() {}
        let admin = admin.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = requests.clone();
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                counted.fetch_add(1, std::sync::atomic::Ordering::Release);
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let served = async {
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stopped(&mut stop) => {
                        // A connection that has not sent its first request
                        // yet (accepted just before the stop) gets a moment
                        // to send it: it is answered, not dropped.
                        let deadline = tokio::time::Instant::now() + ADMIN_FIRST_REQUEST;
                        while requests.load(std::sync::atomic::Ordering::Acquire) == 0
                            && tokio::time::Instant::now() < deadline
                        {
                            tokio::select! {
                                r = conn.as_mut() => return r,
                                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                            }
                        }
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            };
            if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(60), served).await {
                tracing::debug!(%peer, error = %e, "admin connection timed out");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(ADMIN_DRAIN, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::debug!(
            left = conns.len(),
            "admin connections still open at the end of the drain"
        );
    }
}

/// Resolves once `stop` turns true (never, if its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long a connection without a request yet may take to send its first
/// one once the admin listener stops.
const ADMIN_FIRST_REQUEST: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a stopping admin listener waits for its open connections.
const ADMIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

pub fn local_addr(l: &tokio::net::TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

/// The purge routes: `POST /purge` accepts a job (202, or 200 once done with `?wait`),
/// `GET /purge` lists the kept jobs and `GET /purge/ID` shows one.
impl Admin {
    async fn purge_post(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        use crate::cache::purge::{JobState, PurgeError, parse_wait};
        let Some(cache) = self.proxy.cache.clone() else {
            return text(StatusCode::NOT_FOUND, "no cache is configured\n");
        };
        let wait = match parse_wait(req.uri().query()) {
            Ok(w) => w,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let body = match http_body_util::Limited::new(req.into_body(), 1 << 20)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}\n"),
                );
            }
        };
        let purge: crate::cache::http::PurgeRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, format!("bad purge request: {e}\n"));
            }
        };
        let rt = self.proxy.runtime();
        let key_of = |url: &str| crate::proxy::key_for_url(&rt, url);
        let job = match cache.submit_purge(&key_of, &purge).await {
            Ok(j) => j,
            Err(e @ PurgeError::Busy) => {
                let mut r = text(StatusCode::TOO_MANY_REQUESTS, format!("{e}\n"));
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                return r;
            }
            Err(e @ PurgeError::TooMany(_)) => {
                return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "purge refused");
                return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
            }
        };
        // Without `wait` the answer is always 202, whatever the job's state by now.
        let mut code = StatusCode::ACCEPTED;
        if let Some(w) = wait {
            job.wait(w).await;
            code = match job.status().state {
                JobState::Done => StatusCode::OK,
                JobState::Failed => StatusCode::INTERNAL_SERVER_ERROR,
                JobState::Queued | JobState::Running => StatusCode::ACCEPTED,
            };
        }
        let status = job.status();
        let mut r = json(code, &status);
        if let Ok(v) = header::HeaderValue::from_str(&format!("/purge/{}", status.id)) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    fn purge_list(&self) -> Response<Full<Bytes>> {
        match &self.proxy.cache {
            Some(c) => json(StatusCode::OK, &c.purges.list()),
            None => text(StatusCode::NOT_FOUND, "no cache is configured\n"),
        }
    }

    fn purge_status(&self, path: &str) -> Response<Full<Bytes>> {
        let id = path.trim_start_matches("/purge/");
        match self.proxy.cache.as_ref().and_then(|c| c.purges.get(id)) {
            Some(job) => json(StatusCode::OK, &job.status()),
            None => text(StatusCode::NOT_FOUND, "no such purge job\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(full: Option<&str>, read: Option<&str>) -> Tokens {
        Tokens {
            full: full.map(Arc::from),
            read: read.map(Arc::from),
        }
    }

    #[test]
    fn access_by_token() {
        let t = tokens(Some("full"), Some("read"));
        assert_eq!(t.access(Some(b"Bearer full")), Access::Full);
        assert_eq!(t.access(Some(b"Bearer read")), Access::Read);
        assert_eq!(t.access(Some(b"Bearer nope")), Access::Denied);
        assert_eq!(t.access(Some(b"Bearer ")), Access::Denied);
        assert_eq!(t.access(Some(b"full")), Access::Denied);
        assert_eq!(t.access(None), Access::Denied);
        // No read token: reads need the full one.
        let t = tokens(Some("full"), None);
        assert_eq!(t.access(Some(b"Bearer read")), Access::Denied);
        assert_eq!(t.access(Some(b"Bearer full")), Access::Full);
        // No token at all (a loopback admin): open.
        assert_eq!(tokens(None, None).access(None), Access::Full);
    }

    #[test]
    fn cross_site_requests() {
        let mut h = http::HeaderMap::new();
        assert!(!cross_site(&h));
        h.insert("sec-fetch-site", "none".parse().expect("value"));
        assert!(!cross_site(&h));
        h.insert("sec-fetch-site", "same-origin".parse().expect("value"));
        assert!(!cross_site(&h));
        h.insert("sec-fetch-site", "cross-site".parse().expect("value"));
        assert!(cross_site(&h));
        h.insert("sec-fetch-site", "same-site".parse().expect("value"));
        assert!(cross_site(&h));
        let mut h = http::HeaderMap::new();
        h.insert(header::ORIGIN, "null".parse().expect("value"));
        assert!(cross_site(&h));
    }

    #[test]
    fn tokens_never_show_in_debug() {
        let t = tokens(Some("s3cret"), Some("r3ad"));
        let d = format!("{t:?}");
        assert!(!d.contains("s3cret") && !d.contains("r3ad"), "{d}");
    }
}
