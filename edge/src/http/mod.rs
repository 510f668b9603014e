//! Client connections: TLS handshake, protocol choice (ALPN on TLS; the
//! HTTP/2 preface on plaintext), hyper's HTTP/1.1 or HTTP/2 server with the
//! configured limits, and graceful shutdown.

pub mod body;
mod downstream;
pub mod h1guard;
mod hop;
pub mod interim;
pub mod io;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use body::{ClientBody, ResponseBody};
pub use downstream::{Downstream, Proto};
pub use hop::strip_hop_by_hop;
use io::{ClientIo, ConnShared, IoSettings};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client connections hand their requests to: the request pipeline
/// (`proxy::Proxy` in the daemon). The connection code is generic over it, so
/// it needs nothing from the layers above and boxes no future per request.
pub trait Service: Send + Sync + 'static {
    /// Answers one request. Every error is already a response.
    fn handle(
        self: &Arc<Self>,
        req: http::Request<ClientBody>,
        ds: &Downstream,
    ) -> impl Future<Output = http::Response<ResponseBody>> + Send;

    /// The metrics the connections count into.
    fn metrics(&self) -> &Arc<Metrics>;

    /// The limits a connection accepted now is served with.
    fn limits(&self) -> ConnLimits;
}

/// Limits a connection is served with, taken from the config at accept time.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub h2: crate::config::Http2Config,
}

impl ConnLimits {
    pub fn from_config(c: &Config) -> Self {
        ConnLimits {
            max_header_bytes: c.limits.max_header_bytes.get() as usize,
            max_headers: c.limits.max_headers,
            header_read_timeout: c.limits.header_read_timeout.get(),
            idle_timeout: c.limits.idle_timeout.get(),
            send_timeout: c.limits.send_timeout.get(),
            tls_handshake_timeout: c.limits.tls_handshake_timeout.get(),
            h2: c.http2.clone(),
        }
    }
}

/// Serves one accepted TCP connection until it ends or shutdown completes.
pub async fn serve_tcp<P: Service>(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy: Arc<P>,
    shutdown: watch::Receiver<bool>,
    hold: io::ConnHold,
) {
    let limits = proxy.limits();
    let t = crate::metrics::ConnHandles::transport(tls.is_some());
    let m = proxy.metrics().clone();
    m.conn.total[t].inc();
    let active = io::Active::new(m.conn.active[t].clone());
    let shared = Arc::new(ConnShared::default());
    let _ = shared.hold.set(Arc::new((hold, active)));
    match tls {
        Some(acceptor) => {
            let hs =
                tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await;
            let stream = match hs {
                Ok(Ok(s)) => {
                    m.conn.tls_ok.inc();
                    s
                }
                Ok(Err(e)) => {
                    m.conn.tls_error.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    m.conn.tls_timeout.inc();
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let ds = Downstream {
                client: peer,
                local,
                tls: true,
                proto: if h2 { Proto::H2 } else { Proto::H1 },
                conn: shared,
                early: false,
            };
            serve_io(stream, Bytes::new(), ds, proxy, limits, shutdown).await;
        }
        None => {
            match sniff_h2(&stream, limits.header_read_timeout.min(limits.idle_timeout)).await {
                Some(h2) => {
                    let ds = Downstream {
                        client: peer,
                        local,
                        tls: false,
                        proto: if h2 { Proto::H2 } else { Proto::H1 },
                        conn: shared,
                        early: false,
                    };
                    serve_io(stream, Bytes::new(), ds, proxy, limits, shutdown).await;
                }
                None => tracing::debug!(%peer, "connection closed or silent before a request"),
            }
        }
    }
}

/// Peeks at the first bytes to tell an HTTP/2 prior-knowledge preface from
/// HTTP/1. None if the client closed or sent nothing in time.
async fn sniff_h2(stream: &TcpStream, wait: Duration) -> Option<bool> {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + wait;
    for _ in 0..64 {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far: wait for more.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(false)
}

/// Serves one connection (HTTP/1.1 or HTTP/2, as `ds.proto` says) whose
/// first bytes, already read, are `prefix`.
pub async fn serve_io<S, P>(
    stream: S,
    prefix: Bytes,
    ds: Downstream,
    proxy: Arc<P>,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Service,
{
    let h2 = ds.proto == Proto::H2;
    let peer = ds.client;
    let settings = IoSettings {
        http1: !h2,
        max_head: limits.max_header_bytes,
        max_headers: limits.max_headers,
        idle: limits.idle_timeout,
        head_timeout: limits.header_read_timeout,
        send_timeout: limits.send_timeout,
    };
    let shared = ds.conn.clone();
    let io = ClientIo::new(
        stream,
        prefix,
        settings,
        shared.clone(),
        proxy.metrics().clone(),
    );
    let stop = shutdown_signal(shutdown, shared.clone(), limits.header_read_timeout);
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let ds = ds.clone();
        async move {
            if h2 {
                return Ok::<_, Infallible>(proxy.handle(req.map(ClientBody::Hyper), &ds).await);
            }
            // HTTP/1.1: the origin's 1xx interim responses reach the client
            // through the connection's I/O (see `interim`).
            let sink = interim::InterimSink::open(&ds.conn.interim);
            req.extensions_mut().insert(sink.clone());
            let mut handled = std::pin::pin!(proxy.handle(req.map(ClientBody::Hyper), &ds));
            let resp = std::future::poll_fn(|cx| {
                sink.register(cx.waker());
                handled.as_mut().poll(cx)
            })
            .await;
            sink.close();
            Ok(resp)
        }
    });
    let io = TokioIo::new(io);
    if h2 {
        let h = &limits.h2;
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(h.max_concurrent_streams)
            .max_pending_accept_reset_streams(h.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(h.max_local_error_reset_streams)
            .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
            .initial_stream_window_size(h.initial_stream_window.get().min(i32::MAX as u64) as u32)
            .initial_connection_window_size(
                h.initial_connection_window.get().min(i32::MAX as u64) as u32
            )
            .keep_alive_interval(h.keepalive_interval.map(|d| d.get()))
            .keep_alive_timeout(Duration::from_secs(20));
        drive(b.serve_connection(io, service), stop, peer).await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .max_header_size(limits.max_header_bytes)
            .header_read_timeout(None)
            .keep_alive(true);
        // hyper keeps up to 100 headers on the stack; another limit costs a heap allocation.
        if limits.max_headers != 100 {
            b.max_headers(limits.max_headers);
        }
        drive(b.serve_connection(io, service).with_upgrades(), stop, peer).await;
    }
}

/// A served connection that can be asked to finish gracefully.
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves a connection to its end; on shutdown, finishes it gracefully
/// (HTTP/1.1: after the request in flight; HTTP/2: GOAWAY, then drain).
async fn drive<C: Graceful>(
    conn: C,
    stop: impl std::future::Future<Output = ()>,
    peer: SocketAddr,
) {
    tokio::pin!(conn);
    tokio::pin!(stop);
    tokio::select! {
        r = conn.as_mut() => log_conn_end(r, peer),
        _ = &mut stop => {
            conn.as_mut().shut_down();
            log_conn_end(conn.await, peer);
        }
    }
}

/// Resolves when the server shuts down. A connection that has not sent its
/// first request yet gets until the header timeout to send it, so a client
/// that connected just before the drain is served, not dropped.
async fn shutdown_signal(
    mut rx: watch::Receiver<bool>,
    shared: Arc<ConnShared>,
    first_wait: Duration,
) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
    let deadline = tokio::time::Instant::now() + first_wait;
    while shared.requests.load(std::sync::atomic::Ordering::Acquire) == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn log_conn_end(r: Result<(), hyper::Error>, peer: SocketAddr) {
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
