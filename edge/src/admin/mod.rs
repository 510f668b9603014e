//! The admin listener: health, readiness, metrics, the effective config,
//! drain control and reload. Loopback by default; with a token configured,
//! everything but /healthz and /readyz needs `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

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

#[derive(Clone)]
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub token: Option<Arc<str>>,
    pub control: mpsc::Sender<Control>,
    /// Whether the edge is overloaded (readiness fails while it is).
    pub overloaded: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admin")
    }
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
        if !open && let Some(token) = &self.token {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
            if !ok {
                let mut r = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
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
                crate::plugins::update_metrics(&self.proxy.metrics, &self.proxy.runtime().sites);
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
            (&Method::POST, "/purge") => {
                let Some(cache) = self.proxy.cache.clone() else {
                    return text(StatusCode::NOT_FOUND, "no cache is configured\n");
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
                let counts = cache.purge(&self.proxy.runtime(), &purge).await;
                json(StatusCode::OK, &counts)
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

/// Serves the admin API on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Admin,
    mut stop: watch::Receiver<bool>,
) {
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
            _ = stop.changed() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await {
                tracing::debug!(%peer, error = %e, "admin connection timed out");
            }
        });
    }
}

pub fn local_addr(l: &tokio::net::TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
