//! The admin HTTP listener: `/healthz`, `/metrics`, `/regions`, and
//! `POST /regions/NAME/drain|undrain`. A small match-based router on hyper 1.

use std::convert::Infallible;
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

use crate::handler::Shared;

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
                let resp = route(&shared, req.method(), req.uri().path());
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
