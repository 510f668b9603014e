//! Connections to origins: the connector (TCP, TLS with verification and SNI,
//! ALPN) and a keep-alive pool per origin with limits.
//!
//! HTTP/1.1 connections are checked out one request at a time and come back
//! when the response body ends. An HTTP/2 connection is shared by all
//! requests to the origin.

use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::OriginAddr;
use crate::config::{ConnPoolConfig, OriginProtocol, PoolConfig};
use crate::error::{ErrorKind, ProxyError};
use crate::http::body::RequestBody;

/// A ready-to-use sender to an origin.
pub enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sender::H1(_) => "Sender::H1",
            Sender::H2(_) => "Sender::H2",
        })
    }
}

/// A checked-out connection: the sender, whether it was reused, and the
/// permit that counts it against the pool's connection limit.
#[derive(Debug)]
pub struct Checkout {
    pub sender: Sender,
    pub reused: bool,
    pub permit: Option<Arc<OwnedSemaphorePermit>>,
}

/// How to connect to the origins of one pool.
#[derive(Clone)]
pub struct Connector {
    protocol: OriginProtocol,
    tls: Option<tokio_rustls::TlsConnector>,
    sni: Option<String>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Connector {
    pub fn new(cfg: &PoolConfig) -> Result<Self, String> {
        let any_tls = cfg.origins.iter().any(|o| o.url.tls);
        let tls = if any_tls {
            Some(tls_connector(cfg)?)
        } else {
            None
        };
        Ok(Connector {
            protocol: cfg.protocol,
            tls,
            sni: cfg.tls.sni.clone(),
            connect_timeout: cfg.timeouts.connect.get(),
        })
    }

    /// Opens a new connection, within the connect timeout.
    pub async fn connect(&self, addr: &OriginAddr, upgrades: bool) -> Result<Sender, ProxyError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(addr, upgrades)).await {
            Ok(r) => r,
            Err(_) => {
                Err(ProxyError::upstream(ErrorKind::ConnectTimeout, "connect").retry_safe(true))
            }
        }
    }

    async fn connect_inner(&self, addr: &OriginAddr, upgrades: bool) -> Result<Sender, ProxyError> {
        let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    ErrorKind::ConnectRefused
                } else {
                    ErrorKind::ConnectFailed
                };
                ProxyError::upstream(kind, "connect")
                    .with_cause(e)
                    .retry_safe(true)
            })?;
        let _ = tcp.set_nodelay(true);
        // Upgrades (WebSocket) need HTTP/1.1 whatever the pool prefers.
        let want_h2 = !upgrades && self.protocol == OriginProtocol::Http2;
        if addr.tls {
            let Some(tls) = &self.tls else {
                return Err(ProxyError::upstream(
                    ErrorKind::Internal,
                    "tls connector missing",
                ));
            };
            let name = self.sni.as_deref().unwrap_or(&addr.host);
            let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
                ProxyError::upstream(ErrorKind::ConnectFailed, "sni name").with_cause(e)
            })?;
            let stream = tls.connect(server_name, tcp).await.map_err(|e| {
                ProxyError::upstream(ErrorKind::ConnectFailed, "tls handshake")
                    .with_cause(e)
                    .retry_safe(true)
            })?;
            let h2 = !upgrades
                && self.protocol != OriginProtocol::Http1
                && stream.get_ref().1.alpn_protocol() == Some(b"h2");
            handshake(TokioIo::new(stream), h2, upgrades).await
        } else {
            handshake(TokioIo::new(tcp), want_h2, upgrades).await
        }
    }
}

async fn handshake<T>(io: TokioIo<T>, h2: bool, upgrades: bool) -> Result<Sender, ProxyError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let fail = |e: hyper::Error| {
        ProxyError::upstream(ErrorKind::ConnectFailed, "handshake")
            .with_cause(e)
            .retry_safe(true)
    };
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(fail)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "origin h2 connection ended");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(fail)?;
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "origin h1 connection ended");
            }
        });
        Ok(Sender::H1(sender))
    }
}

fn tls_connector(cfg: &PoolConfig) -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if cfg.tls.verify {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &cfg.tls.ca_file {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify))
            .with_no_client_auth()
    };
    config.alpn_protocols = match cfg.protocol {
        OriginProtocol::Http1 => vec![b"http/1.1".to_vec()],
        OriginProtocol::Http2 => vec![b"h2".to_vec()],
        OriginProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts any origin certificate; only with `tls.verify = false`.
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An idle HTTP/1.1 connection: its sender, since when, its limit permit.
type IdleH1 = (
    http1::SendRequest<RequestBody>,
    Instant,
    Option<Arc<OwnedSemaphorePermit>>,
);
/// The shared HTTP/2 connection of an origin and its limit permit.
type SharedH2 = (
    http2::SendRequest<RequestBody>,
    Option<Arc<OwnedSemaphorePermit>>,
);

/// The keep-alive pool of one origin.
#[derive(Debug)]
pub struct ConnPool {
    idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Option<SharedH2>>,
    limit: Option<Arc<Semaphore>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl ConnPool {
    pub fn new(cfg: &ConnPoolConfig) -> Self {
        ConnPool {
            idle: Mutex::new(Vec::with_capacity(cfg.max_idle.min(64))),
            h2: Mutex::new(None),
            limit: (cfg.max_connections > 0).then(|| Arc::new(Semaphore::new(cfg.max_connections))),
            max_idle: cfg.max_idle,
            idle_timeout: cfg.idle_timeout.get(),
        }
    }

    /// A pooled connection if one is ready, else a new one.
    pub async fn checkout(
        &self,
        connector: &Connector,
        addr: &OriginAddr,
        wait: Duration,
    ) -> Result<Checkout, ProxyError> {
        if let Some(c) = self.take_idle().await {
            return Ok(c);
        }
        let permit = match &self.limit {
            Some(sem) => match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
                Ok(Ok(p)) => Some(Arc::new(p)),
                _ => {
                    return Err(ProxyError::upstream(ErrorKind::PoolExhausted, "pool limit")
                        .retry_safe(true));
                }
            },
            None => None,
        };
        let sender = connector.connect(addr, false).await?;
        if let Sender::H2(s) = &sender {
            *self.h2.lock() = Some((s.clone(), permit.clone()));
        }
        Ok(Checkout {
            sender,
            reused: false,
            permit,
        })
    }

    async fn take_idle(&self) -> Option<Checkout> {
        {
            let h2 = self.h2.lock();
            if let Some((s, permit)) = h2.as_ref()
                && !s.is_closed()
                && s.is_ready()
            {
                return Some(Checkout {
                    sender: Sender::H2(s.clone()),
                    reused: true,
                    permit: permit.clone(),
                });
            }
        }
        loop {
            let (mut s, since, permit) = self.idle.lock().pop()?;
            if s.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            if s.is_ready() {
                return Some(Checkout {
                    sender: Sender::H1(s),
                    reused: true,
                    permit,
                });
            }
            // The previous response may have ended a moment ago: give the
            // connection task a moment to be ready again.
            match tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
                Ok(Ok(())) => {
                    return Some(Checkout {
                        sender: Sender::H1(s),
                        reused: true,
                        permit,
                    });
                }
                _ => continue,
            }
        }
    }

    /// Returns an HTTP/1.1 connection after its response ended cleanly.
    pub fn checkin(
        &self,
        s: http1::SendRequest<RequestBody>,
        permit: Option<Arc<OwnedSemaphorePermit>>,
    ) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push((s, Instant::now(), permit));
        }
    }

    /// Drops a broken HTTP/2 connection so the next request opens a new one.
    pub fn forget_h2(&self) {
        self.h2.lock().take();
    }

    /// Number of idle HTTP/1.1 connections (for tests and stats).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}
