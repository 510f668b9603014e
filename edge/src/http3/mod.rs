//! HTTP/3 over QUIC (quinn + h3), on the same address and port as a TLS
//! listener. It shares that listener's certificate resolver (the same SNI
//! choice and hot reload), and every request goes to the same
//! [`Service`] as HTTP/1.1 and HTTP/2.
//!
//! h3 is still young; everything that touches it lives in this module.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response};
use http_body_util::BodyExt;
use quinn::crypto::rustls::QuicServerConfig;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::config::{Congestion, Http3Config, RetryMode};
use crate::http::body::{ClientBody, H3Body, RecvStream};
use crate::http::io::ConnShared;
use crate::http::{Downstream, Proto, Service, strip_hop_by_hop};
use crate::listener::tls::CertStore;
use crate::metrics::{Outcome, Transport};

type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum H3Error {
    #[error("QUIC TLS config: {0}")]
    Tls(String),
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The quinn server config: TLS 1.3, ALPN h3, the shared certificate resolver.
pub fn server_config(
    certs: Arc<CertStore>,
    cfg: &Http3Config,
) -> Result<quinn::ServerConfig, H3Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| H3Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![b"h3".to_vec()];
    if cfg.early_data {
        tls.max_early_data_size = u32::MAX;
    }
    let quic = QuicServerConfig::try_from(tls).map_err(|e| H3Error::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    let var = |n: u64| quinn::VarInt::from_u64(n).unwrap_or(quinn::VarInt::MAX);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout.get()).ok())
        .max_concurrent_bidi_streams(var(u64::from(cfg.max_concurrent_streams)))
        .max_concurrent_uni_streams(var(16))
        .stream_receive_window(var(cfg.stream_receive_window.get()))
        .receive_window(var(cfg.receive_window.get()))
        .send_window(cfg.send_window.get())
        .keep_alive_interval(None);
    match cfg.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    sc.transport_config(Arc::new(t));
    Ok(sc)
}

/// Binds `n` UDP sockets on `addr` with SO_REUSEPORT, one quinn endpoint each.
pub fn bind(
    addr: SocketAddr,
    n: usize,
    sc: quinn::ServerConfig,
) -> Result<Vec<quinn::Endpoint>, H3Error> {
    let err = |source| H3Error::Bind { addr, source };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        #[cfg(unix)]
        socket.set_reuse_port(true).map_err(err)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true).map_err(err)?;
        }
        socket.bind(&addr.into()).map_err(err)?;
        let udp: std::net::UdpSocket = socket.into();
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(sc.clone()),
            udp,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(err)?;
        out.push(ep);
    }
    Ok(out)
}

/// Per-endpoint serving state.
pub struct H3Ctx<P> {
    /// Where requests go.
    pub proxy: Arc<P>,
    pub retry: RetryMode,
    pub retry_threshold: usize,
    pub early_data: bool,
    pub handshake_timeout: Duration,
    pub max_header_bytes: u64,
    pub handshaking: Arc<AtomicUsize>,
    /// Connections accepted on this endpoint (`meridian_quic_endpoint_connections_total`).
    pub accepted: prometheus_client::metrics::counter::Counter,
}

// Not derived: a derive would ask `P: Clone`, and only the `Arc` is cloned.
impl<P> Clone for H3Ctx<P> {
    fn clone(&self) -> Self {
        H3Ctx {
            proxy: self.proxy.clone(),
            retry: self.retry,
            retry_threshold: self.retry_threshold,
            early_data: self.early_data,
            handshake_timeout: self.handshake_timeout,
            max_header_bytes: self.max_header_bytes,
            handshaking: self.handshaking.clone(),
            accepted: self.accepted.clone(),
        }
    }
}

/// Accepts QUIC connections until `stop`, then stops accepting; each open
/// connection gets GOAWAY and finishes its requests in flight. `track`
/// returns a token held for the life of each connection (its
/// `max_connections` slot and drain token), or `None` when every slot is
/// taken, and the connection is refused.
pub async fn serve<P: Service, T: Send + 'static>(
    ep: quinn::Endpoint,
    ctx: H3Ctx<P>,
    mut stop: watch::Receiver<bool>,
    track: impl Fn() -> Option<T>,
) {
    let local = ep
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let validate = match ctx.retry {
            RetryMode::Always => true,
            RetryMode::Never => false,
            RetryMode::Auto => ctx.handshaking.load(Ordering::Relaxed) >= ctx.retry_threshold,
        };
        if validate && !incoming.remote_address_validated() && incoming.may_retry() {
            ctx.proxy.metrics().quic_retries.inc();
            let _ = incoming.retry();
            continue;
        }
        let Some(token) = track() else {
            // Every `max_connections` slot is taken.
            ctx.proxy.metrics().connections_rejected.inc();
            incoming.refuse();
            continue;
        };
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "QUIC accept failed");
                continue;
            }
        };
        ctx.accepted.inc();
        let (ctx2, stop2) = (ctx.clone(), stop.clone());
        tokio::spawn(async move {
            serve_conn(connecting, local, ctx2, stop2).await;
            drop(token);
        });
    }
    // Refuse new connections; existing ones drain in their own tasks.
    ep.set_server_config(None);
    tracing::info!(%local, "HTTP/3 listener closed");
}

/// Resolves once `stop` turns true (never, if its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Handshaking(c.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether requests on a connection may still be early data (0-RTT): true
/// until quinn confirms the handshake. Checked per request, so a request is
/// marked early exactly when it is processed before the handshake completed
/// (RFC 8470 §5.1: after completion a replay cannot have succeeded).
struct EarlyData(Option<quinn::ZeroRttAccepted>);

impl EarlyData {
    fn is_early(&mut self) -> bool {
        let Some(fut) = self.0.as_mut() else {
            return false;
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if Pin::new(fut).poll(&mut cx).is_ready() {
            self.0 = None;
            return false;
        }
        true
    }
}

async fn handshake<P>(
    connecting: quinn::Connecting,
    ctx: &H3Ctx<P>,
) -> Result<(quinn::Connection, EarlyData), &'static str> {
    let _hs = Handshaking::new(&ctx.handshaking);
    let connecting = if ctx.early_data {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => return Ok((conn, EarlyData(Some(accepted)))),
            Err(c) => c,
        }
    } else {
        connecting
    };
    match tokio::time::timeout(ctx.handshake_timeout, connecting).await {
        Ok(Ok(c)) => Ok((c, EarlyData(None))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            Err("error")
        }
        Err(_) => Err("timeout"),
    }
}

async fn serve_conn<P: Service>(
    connecting: quinn::Connecting,
    local: SocketAddr,
    ctx: H3Ctx<P>,
    mut stop: watch::Receiver<bool>,
) {
    let m = ctx.proxy.metrics().clone();
    let (conn, mut early) = match handshake(connecting, &ctx).await {
        Ok(c) => {
            m.quic_handshakes
                .get_or_create(&Outcome { result: "ok" })
                .inc();
            c
        }
        Err(result) => {
            m.quic_handshakes.get_or_create(&Outcome { result }).inc();
            return;
        }
    };
    let active = m
        .connections_active
        .get_or_create(&Transport { transport: "quic" })
        .clone();
    active.inc();
    m.connections_total
        .get_or_create(&Transport { transport: "quic" })
        .inc();
    let peer = conn.remote_address();
    let shared = Arc::new(ConnShared::default());
    let built = h3::server::builder()
        .max_field_section_size(ctx.max_header_bytes)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await;
    let mut h3conn = match built {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "h3 setup failed");
            active.dec();
            return;
        }
    };
    let mut requests = tokio::task::JoinSet::new();
    let mut draining = false;
    loop {
        tokio::select! {
            r = h3conn.accept() => match r {
                Ok(Some(resolver)) => {
                    let ds = Downstream {
                        client: peer,
                        local,
                        tls: true,
                        proto: Proto::H3,
                        conn: shared.clone(),
                        early: early.is_early(),
                    };
                    let proxy = ctx.proxy.clone();
                    requests.spawn(async move {
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => serve_request(req, stream, proxy, ds).await,
                            Err(e) => tracing::debug!(error = %e, "h3 request head failed"),
                        }
                    });
                    while requests.try_join_next().is_some() {}
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "h3 connection ended");
                    break;
                }
            },
            _ = stopped(&mut stop), if !draining => {
                draining = true;
                // GOAWAY: no new requests; those in flight finish.
                let _ = h3conn.shutdown(0).await;
            }
        }
    }
    while requests.join_next().await.is_some() {}
    let stats = conn.stats();
    m.quic_rtt.observe(conn.rtt().as_secs_f64());
    m.quic_lost_packets.inc_by(stats.path.lost_packets);
    conn.close(quinn::VarInt::from_u32(0x100), b""); // H3_NO_ERROR
    active.dec();
}

async fn serve_request<P: Service>(
    req: http::Request<()>,
    stream: h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    proxy: Arc<P>,
    ds: Downstream,
) {
    let head = req.method() == Method::HEAD;
    let (mut send, recv): (SendStream, RecvStream) = stream.split();
    let mut req = req.map(|()| ClientBody::H3(H3Body::new(recv)));
    // The origin's 1xx interim responses go out as HEADERS frames before
    // the final response (RFC 9114 §4.1).
    let (sink, mut interim) = crate::http::interim::InterimSink::h3();
    req.extensions_mut().insert(sink);
    let resp = {
        let handled = proxy.handle(req, &ds);
        tokio::pin!(handled);
        loop {
            tokio::select! {
                resp = &mut handled => break resp,
                Some((status, headers)) = interim.recv() => {
                    let mut r = Response::new(());
                    *r.status_mut() = status;
                    *r.headers_mut() = headers;
                    if let Err(e) = send.send_response(r).await {
                        tracing::debug!(error = %e, "h3 send interim response failed");
                    }
                }
            }
        }
    };
    drop(interim);
    let (mut parts, mut body) = resp.into_parts();
    // Connection-specific fields do not exist in HTTP/3.
    strip_hop_by_hop(&mut parts.headers, false);
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(error = %e, "h3 send response head failed");
        return;
    }
    if !head {
        while let Some(frame) = body.frame().await {
            let r = match frame {
                Ok(f) => match f.into_data() {
                    Ok(data) => send.send_data(data).await,
                    Err(f) => match f.into_trailers() {
                        Ok(t) => send.send_trailers(t).await,
                        Err(_) => Ok(()),
                    },
                },
                Err(e) => {
                    tracing::debug!(error = %e, "response body failed mid-stream");
                    send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                    return;
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "h3 send failed");
                return;
            }
        }
    }
    let _ = send.finish().await;
}
