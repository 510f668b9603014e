//! Shared pieces of the fuzz targets (see docs/fuzzing.md): an edge built
//! in this process (the real config loader, runtime, cache and HTTP/3
//! endpoint) in front of a scripted origin on 127.0.0.1, and a QUIC client
//! that sends raw HTTP/3 frames to it. Everything listens on 127.0.0.1 on
//! ephemeral ports and lives as long as the fuzzing process.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meridian_edge::cache::http::HttpCache;
use meridian_edge::cache::storage::{Storage, StorageConfig};
use meridian_edge::config::{Config, RetryMode};
use meridian_edge::http::io::ConnShared;
use meridian_edge::http3::H3Ctx;
use meridian_edge::listener::tls::{CertSet, CertStore};
use meridian_edge::metrics::Metrics;
use meridian_edge::proxy::{Downstream, Proto, Proxy, Runtime};
use tokio::sync::watch;

/// The host of the site in slice mode, and its slice size (not a power of
/// two, so slice arithmetic near `u64::MAX` is exercised).
pub const SLICE_HOST: &str = "slice.test";
pub const SLICE_SIZE: u64 = 100;

/// How the origin misbehaves on one range request of slice mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers 200 with the whole object (ignores Range).
    Whole,
    /// Answers 416.
    Unsatisfiable,
    /// Answers 206 with this Content-Range value and the body asked for.
    ContentRange(String),
    /// Answers 206 with a correct Content-Range and a body one byte short.
    Short,
    /// Answers with another ETag (the object changed).
    NewEtag,
    /// Answers 206 without a Content-Range.
    NoContentRange,
}

/// One object the origin serves, at one path.
#[derive(Clone, Debug)]
pub struct Object {
    pub body: Bytes,
    pub etag: String,
    /// Consumed one per request; a request with none left is answered right.
    pub faults: VecDeque<Fault>,
}

/// The scripted origin: objects by path; any other path answers a small 200.
#[derive(Default)]
pub struct Origin {
    objects: Mutex<HashMap<String, Object>>,
    pub requests: AtomicUsize,
}

impl Origin {
    /// Serves `obj` at `path` from now on, and forgets every other object.
    pub fn set(&self, path: &str, obj: Object) {
        let mut m = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        m.clear();
        m.insert(path.to_string(), obj);
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let path = req.uri().path().to_string();
        let mut m = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let Some(obj) = m.get_mut(&path) else {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return r;
        };
        let fault = obj.faults.pop_front();
        let len = obj.body.len() as u64;
        let mut etag = obj.etag.clone();
        if fault == Some(Fault::NewEtag) {
            etag.push('x');
            obj.etag = etag.clone();
        }
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        let mut resp = Response::new(Full::new(obj.body.clone()));
        let h = resp.headers_mut();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=3600"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
            h.insert(header::ETAG, v);
        }
        let Some((a, b)) = range else { return resp };
        if fault == Some(Fault::Whole) {
            return resp;
        }
        if a >= len || fault == Some(Fault::Unsatisfiable) {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            *resp.body_mut() = Full::new(Bytes::new());
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
        let b = b.min(len - 1);
        let mut part = obj.body.slice(a as usize..=b as usize);
        if fault == Some(Fault::Short) {
            part = part.slice(..part.len() - 1);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        *resp.body_mut() = Full::new(part);
        let cr = match fault {
            Some(Fault::ContentRange(v)) => Some(v),
            Some(Fault::NoContentRange) => None,
            _ => Some(format!("bytes {a}-{b}/{len}")),
        };
        if let Some(v) = cr.and_then(|v| HeaderValue::from_str(&v).ok()) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        resp
    }
}

/// The edge under test, built once per process.
pub struct Edge {
    pub rt: tokio::runtime::Runtime,
    pub proxy: Arc<Proxy>,
    pub origin: Arc<Origin>,
    /// The HTTP/3 endpoint's address.
    pub h3_addr: SocketAddr,
    h3_client: quinn::Endpoint,
    h3_conn: Mutex<Option<quinn::Connection>>,
    _stop: watch::Sender<bool>,
}

/// The process's edge.
pub fn edge() -> &'static Edge {
    static EDGE: OnceLock<Edge> = OnceLock::new();
    EDGE.get_or_init(|| build().unwrap_or_else(|e| panic!("the fuzz edge starts: {e}")))
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn build() -> Result<Edge, Error> {
    meridian_edge::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let origin = Arc::new(Origin::default());
    let origin_addr = rt.block_on(start_origin(origin.clone()))?;

    // A self-signed certificate for the HTTP/3 endpoint, in a private temp dir.
    let dir = std::env::temp_dir().join(format!("meridian-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["fuzz.test".to_string()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;

    let src = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"
[log]
access_log = "off"
[cache]
memory = "32MiB"
lock_timeout = "2s"
[tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[[sites]]
hosts = ["{SLICE_HOST}"]
pool = "o"
[sites.cache]
slice_size = {SLICE_SIZE}
[[sites]]
hosts = ["*"]
pool = "o"
[sites.cache]
enabled = false
[pools.o]
origins = [{{ url = "http://{origin_addr}" }}]
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let cfg = Arc::new(Config::from_toml(&src, "fuzz.toml")?);
    let metrics = Metrics::new();
    let runtime = Runtime::build(cfg.clone(), None, &metrics)?;
    let storage = rt.block_on(Storage::open(StorageConfig {
        memory_capacity: 32 << 20,
        disk_dir: None,
        chunk_size: 256,
        ..StorageConfig::default()
    }))?;
    let cache = HttpCache::new(storage, metrics.clone());
    let proxy = Proxy::new(runtime, metrics, Some(cache));

    // The HTTP/3 endpoint, served as the edge serves it.
    let store = CertStore::new(CertSet::load(&cfg.tls)?);
    let sc = meridian_edge::http3::server_config(store, &cfg.http3)?;
    // Loaded: nothing reads the files again (no watch_interval).
    let _ = std::fs::remove_dir_all(&dir);
    let (stop, stop_rx) = watch::channel(false);
    let (h3_addr, h3_client) = rt.block_on(async {
        let ep = meridian_edge::http3::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1, sc)?
            .pop()
            .ok_or("no endpoint")?;
        let addr = ep.local_addr()?;
        let ctx = H3Ctx {
            proxy: proxy.clone(),
            retry: RetryMode::Never,
            retry_threshold: usize::MAX,
            early_data: false,
            handshake_timeout: Duration::from_secs(5),
            max_header_bytes: 64 * 1024,
            handshaking: Arc::default(),
            accepted: Default::default(),
        };
        tokio::spawn(meridian_edge::http3::serve(ep, ctx, stop_rx, || Some(())));
        let client = h3_client_endpoint(ck.cert.der().clone())?;
        Ok::<_, Error>((addr, client))
    })?;
    Ok(Edge {
        rt,
        proxy,
        origin,
        h3_addr,
        h3_client,
        h3_conn: Mutex::new(None),
        _stop: stop,
    })
}

async fn start_origin(origin: Arc<Origin>) -> Result<SocketAddr, Error> {
    let l = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let o = origin.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = o.answer(&req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn h3_client_endpoint(
    cert: rustls_pki_types::CertificateDer<'static>,
) -> Result<quinn::Endpoint, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    Ok(ep)
}

/// A downstream as an HTTP/1.1 connection from 127.0.0.1 gives it.
pub fn downstream() -> Downstream {
    Downstream {
        client: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 80)),
        tls: false,
        proto: Proto::H1,
        conn: Arc::new(ConnShared::default()),
        early: false,
    }
}

/// What happened to one raw HTTP/3 request.
#[derive(Debug)]
pub enum H3Outcome {
    /// The stream ended; these are the response's raw frames.
    Answered(Vec<u8>),
    /// The server reset the stream or closed the connection (a stream or
    /// connection error, as RFC 9114 wants for a malformed request).
    Refused(String),
}

impl Edge {
    async fn h3_connection(&self) -> Result<quinn::Connection, Error> {
        let cached = self
            .h3_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(c) = cached
            && c.close_reason().is_none()
        {
            return Ok(c);
        }
        let c = tokio::time::timeout(
            Duration::from_secs(5),
            self.h3_client.connect(self.h3_addr, "fuzz.test")?,
        )
        .await??;
        *self.h3_conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Sends `frames` (raw HTTP/3 frames) on a new request stream, finishes
    /// it, and reads the answer. Panics if the edge neither answers nor
    /// refuses within 5 s, or cannot be connected to: it must never hang or
    /// stop accepting.
    pub fn h3_raw(&self, frames: &[u8]) -> H3Outcome {
        self.rt.block_on(async {
            let conn = self
                .h3_connection()
                .await
                .unwrap_or_else(|e| panic!("the edge accepts a QUIC connection: {e}"));
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(frames).await?;
                send.finish()?;
                let out = recv.read_to_end(1 << 20).await?;
                Ok::<_, Error>(out)
            };
            match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                Ok(Ok(out)) => H3Outcome::Answered(out),
                Ok(Err(e)) => H3Outcome::Refused(e.to_string()),
                Err(_) => panic!("the edge neither answered nor refused an HTTP/3 request in 5 s"),
            }
        })
    }
}

/// QUIC variable-length integer (RFC 9000 §16).
pub fn varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16383 => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        16384..=1_073_741_823 => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// QPACK/HPACK prefixed integer (RFC 7541 §5.1) with an `n`-bit prefix and `flags` above it.
pub fn prefixed_int(out: &mut Vec<u8>, flags: u8, n: u32, v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A QPACK field section of literal fields (no dynamic table, no Huffman).
pub fn qpack_literals(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = vec![0, 0]; // Required Insert Count 0, Delta Base 0
    for (name, value) in fields {
        // Literal Field Line with Literal Name: 001N H + 3-bit name length.
        prefixed_int(&mut out, 0x20, 3, name.len());
        out.extend_from_slice(name);
        prefixed_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// An HTTP/3 frame.
pub fn frame(out: &mut Vec<u8>, ty: u64, payload: &[u8]) {
    varint(out, ty);
    varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}
