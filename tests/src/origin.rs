//! A real origin for tests: HTTP/1.1 and h2c on 127.0.0.1, counting every
//! request it receives, with routes that misbehave on purpose.
//!
//! Routes: `/hello`, `/echo` (the request as JSON), `/slow?ms=N`,
//! `/status/N`, `/large?mb=N`, `/trailers` (a body ending in trailers), `/healthz` (503 while unhealthy), `/ws`
//! (upgrades and echoes bytes), `.../echo-body` (the request body back, its
//! framing in `x-request-content-length` and `x-request-chunked`), and
//! anything else: 200 with the path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Mutex;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|n| match n {})
        .boxed()
}

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub by_path: Mutex<HashMap<String, u64>>,
    pub unhealthy: AtomicBool,
    /// The last request's headers seen on `/echo`-style routes.
    pub last_headers: Mutex<Vec<(String, String)>>,
    /// The Range header of the last `/cc/` request.
    pub last_range: Mutex<Option<String>>,
    /// Body bytes the `/cc/` route has answered with (whole bodies, or the
    /// range it honoured).
    pub cc_body_bytes: AtomicU64,
}

pub struct TestOrigin {
    pub addr: SocketAddr,
    pub name: String,
    pub stats: Arc<Stats>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestOrigin {
    /// Starts an origin on an ephemeral port.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, name, Arc::new(Stats::default())).await
    }

    /// Starts (or restarts) an origin on `addr`, sharing `stats`.
    pub async fn start_on(addr: SocketAddr, name: &str, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (n, s) = (name.to_string(), stats.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, s) = (n.clone(), s.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let (n, s) = (n.clone(), s.clone());
                        async move { Ok::<_, Infallible>(handle(req, &n, &s).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(TestOrigin {
            addr,
            name: name.to_string(),
            stats,
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }

    pub async fn count(&self, path: &str) -> u64 {
        self.stats
            .by_path
            .lock()
            .await
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub fn set_healthy(&self, ok: bool) {
        self.stats.unhealthy.store(!ok, Ordering::SeqCst);
    }

    /// Stops listening and drops every open connection.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

async fn handle(req: Request<Incoming>, name: &str, stats: &Stats) -> Response<Body> {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    *stats.by_path.lock().await.entry(path.clone()).or_default() += 1;
    *stats.last_headers.lock().await = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut resp = match path.as_str() {
        "/hello" => Response::new(full("hello")),
        "/healthz" => {
            let mut r = Response::new(full("ok"));
            if stats.unhealthy.load(Ordering::SeqCst) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
            Response::new(full("slow"))
        }
        "/large" => {
            let mb = query(&req, "mb").unwrap_or(1);
            let chunk = Bytes::from(vec![b'x'; 1 << 20]);
            let stream = futures_util::stream::iter(
                (0..mb).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
            );
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(mb << 20));
            if let Some(cc) = param(&req, "cc").and_then(|c| HeaderValue::from_str(&c).ok()) {
                r.headers_mut().insert(header::CACHE_CONTROL, cc);
            }
            r
        }
        "/trailers" => {
            // Two data frames, then trailers (gRPC style); h2, or h1 chunked
            // when the client sent `TE: trailers`.
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            t.insert("x-trailer", HeaderValue::from_static("yes"));
            let stream = futures_util::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part one, "))),
                Ok(Frame::data(Bytes::from_static(b"part two"))),
                Ok(Frame::trailers(t)),
            ]);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        "/ws" if req.headers().contains_key(header::UPGRADE) => {
            let on = hyper::upgrade::on(req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio::io::copy(&mut r, &mut w),
                    )
                    .await;
                }
            });
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
        }
        p if p.starts_with("/cc/") => cacheable(&req, stats).await,
        p if p.ends_with("/echo-body") => {
            let cl = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::from_static(b"<body failed>"),
            };
            let mut r = Response::new(full(body));
            if let Ok(v) = HeaderValue::from_str(&cl) {
                r.headers_mut().insert("x-request-content-length", v);
            }
            r.headers_mut().insert(
                "x-request-chunked",
                HeaderValue::from_static(if chunked { "yes" } else { "no" }),
            );
            r
        }
        p if p.starts_with("/status/") => {
            let code = p[8..]
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            let mut r = Response::new(full(code.to_string()));
            *r.status_mut() = code;
            r
        }
        _ => {
            // /echo and anything else: the request as JSON, body counted.
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            let json = serde_json::json!({"origin": name, "method": method, "uri": uri, "version": version, "headers": headers, "body_bytes": n});
            let mut r = Response::new(full(json.to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-origin", v);
    }
    resp
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(
                std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())]).unwrap_or(""),
                16,
            )
        {
            out.push(v);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| pct_decode(v))
    })
}

/// The header `/cc/` adds with `digest=1`: [`body_digest`] of the whole body.
pub const DIGEST_HEADER: &str = "x-body-digest";

/// FNV-1a (64 bits) of `body`, as `fnv1a64:<16 hex digits>`: enough to catch
/// a torn, truncated or mixed-up body (not a cryptographic checksum).
pub fn body_digest(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in body {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fnv1a64:{h:016x}")
}

/// The body `/cc/<path>?size=N&seed=S` answers: N pseudo-random bytes
/// (xorshift64*) from the path and the seed, so every object differs and a
/// client can rebuild any of them (to check a range, say).
pub fn seeded_body(path: &str, seed: u64, size: usize) -> Bytes {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    for &b in path.as_bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

/// `/cc/<anything>?cc=&etag=&lm=&vary=&tag=&size=&delay=&status=`: a response
/// whose caching headers the request chooses; `text=` (with `repeat=`) sets
/// the body, `ct=` the Content-Type, `ce=` a Content-Encoding and
/// `hdr=name:value` one more header; `seed=S` (with `size`) makes the body
/// [`seeded_body`], and `digest=1` adds [`DIGEST_HEADER`]. Answers 304 to a matching
/// If-None-Match. The body is `size` bytes (default: a short text naming the
/// request count, so tests can tell fetches apart).
async fn cacheable(req: &Request<Incoming>, stats: &Stats) -> Response<Body> {
    if let Some(ms) = param(req, "delay").and_then(|d| d.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let etag = param(req, "etag");
    if let (Some(e), Some(inm)) = (&etag, req.headers().get(header::IF_NONE_MATCH))
        && inm
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == e))
    {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        if let Ok(v) = HeaderValue::from_str(e) {
            r.headers_mut().insert(header::ETAG, v);
        }
        if let Some(cc) = param(req, "cc").and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::CACHE_CONTROL, cc);
        }
        return r;
    }
    let n = stats.requests.load(Ordering::SeqCst);
    let repeat = param(req, "repeat")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .min(1 << 20);
    let body = match (
        param(req, "size").and_then(|s| s.parse::<usize>().ok()),
        param(req, "text"),
    ) {
        (Some(size), _) => match param(req, "seed").and_then(|s| s.parse::<u64>().ok()) {
            Some(seed) => seeded_body(req.uri().path(), seed, size),
            None => Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        },
        (None, Some(t)) => Bytes::from(t.repeat(repeat)),
        (None, None) => Bytes::from(format!("response {n} for {}", req.uri().path())),
    };
    // A single `bytes=a-b` range is honoured (with `ranges=1`), as origins behind a slicing cache do.
    let range = (param(req, "ranges").as_deref() == Some("1"))
        .then(|| {
            req.headers()
                .get(header::RANGE)?
                .to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.parse::<usize>().ok(), b.parse::<usize>().ok()))
        })
        .flatten();
    *stats.last_range.lock().await = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let total = body.len();
    let digest = (param(req, "digest").as_deref() == Some("1")).then(|| body_digest(&body));
    let (body, content_range) = match range {
        Some((Some(a), b)) if a < total => {
            let end = b.unwrap_or(total - 1).min(total - 1);
            (
                body.slice(a..end + 1),
                Some(format!("bytes {a}-{end}/{total}")),
            )
        }
        _ => (body, None),
    };
    stats
        .cc_body_bytes
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    let mut r = Response::new(full(body));
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        r.headers_mut().insert(header::CONTENT_RANGE, cr);
    }
    if let Some(s) = param(req, "status")
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        *r.status_mut() = s;
    }
    let h = r.headers_mut();
    for (q, name) in [
        ("cc", header::CACHE_CONTROL),
        ("etag", header::ETAG),
        ("lm", header::LAST_MODIFIED),
        ("vary", header::VARY),
        ("expires", header::EXPIRES),
    ] {
        if let Some(v) = param(req, q).and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(name, v);
        }
    }
    // `cl=self`: a Content-Location naming the request's own target.
    if param(req, "cl").as_deref() == Some("self")
        && let Some(v) = req
            .uri()
            .path_and_query()
            .and_then(|pq| HeaderValue::from_str(pq.as_str()).ok())
    {
        h.insert(header::CONTENT_LOCATION, v);
    }
    if let Some(v) = digest.and_then(|d| HeaderValue::from_str(&d).ok()) {
        h.insert(DIGEST_HEADER, v);
    }
    if let Some(v) = param(req, "cdncc").and_then(|v| HeaderValue::from_str(&v).ok()) {
        h.insert("cdn-cache-control", v);
    }
    if let Some(v) = param(req, "tag").and_then(|v| HeaderValue::from_str(&v).ok()) {
        h.insert("surrogate-key", v);
    }
    let ct = param(req, "ct").and_then(|v| HeaderValue::from_str(&v).ok());
    h.insert(
        header::CONTENT_TYPE,
        ct.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Some(v) = param(req, "ce").and_then(|v| HeaderValue::from_str(&v).ok()) {
        h.insert(header::CONTENT_ENCODING, v);
    }
    if let Some((n, v)) = param(req, "hdr").as_deref().and_then(|v| v.split_once(':'))
        && let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(n.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        )
    {
        h.insert(n, v);
    }
    r
}
