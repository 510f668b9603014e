//! HTTP clients for tests: HTTP/1.1 or HTTP/2 over plain TCP or TLS with a
//! chosen SNI and ALPN, plus raw byte exchanges for malformed input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TIMEOUT: Duration = Duration::from_secs(15);

/// TLS settings of a test client.
#[derive(Clone)]
pub struct Tls {
    pub roots: Arc<rustls::RootCertStore>,
    pub sni: String,
    pub alpn: Vec<Vec<u8>>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub version: Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The trailers that ended the body, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// Opens a TLS connection; returns the stream.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &Tls,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(tls.roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = tls.alpn.clone();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(tls.sni.clone())?;
    Ok(tokio::time::timeout(TIMEOUT, conn.connect(name, tcp)).await??)
}

/// A connection that can send several requests.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn over<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        io: T,
        h2: bool,
    ) -> anyhow::Result<Conn> {
        let io = TokioIo::new(io);
        if h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(c);
            Ok(Conn::H2(s))
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(c.with_upgrades());
            Ok(Conn::H1(s))
        }
    }

    /// Plain TCP; `h2` selects HTTP/2 with prior knowledge.
    pub async fn plain(addr: SocketAddr, h2: bool) -> anyhow::Result<Conn> {
        Self::over(TcpStream::connect(addr).await?, h2).await
    }

    /// TLS; HTTP/2 if the server chose "h2" by ALPN.
    pub async fn tls(addr: SocketAddr, tls: &Tls) -> anyhow::Result<Conn> {
        let s = tls_connect(addr, tls).await?;
        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
        Self::over(s, h2).await
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Resp> {
        let fut = async {
            let resp: Response<hyper::body::Incoming> = match self {
                Conn::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Conn::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
            };
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            Ok::<_, anyhow::Error>(Resp {
                status: parts.status.as_u16(),
                version: parts.version,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        tokio::time::timeout(TIMEOUT, fut).await?
    }
}

/// A GET request for `path` with `Host: host` (HTTP/1.1 form).
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    req("GET", host, path, Bytes::new())
}

pub fn req(method: &str, host: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(body.into()))
        .expect("valid test request")
}

/// An HTTP/2 request: the authority goes in the URI.
pub fn req_h2(
    method: &str,
    scheme: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .version(Version::HTTP_2)
        .uri(format!("{scheme}://{host}{path}"))
        .body(Full::new(body.into()))
        .expect("valid test request")
}

/// One HTTP/1.1 GET on a fresh plain connection.
pub async fn get_plain(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Resp> {
    Conn::plain(addr, false).await?.send(get(host, path)).await
}

/// Writes `bytes` and reads until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The status code of the first response in a raw HTTP/1 reply.
pub fn raw_status(reply: &str) -> Option<u16> {
    reply.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// An HTTP/3 connection (quinn + h3) for tests.
pub struct H3Conn {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    _driver: tokio::task::JoinHandle<()>,
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    /// The interim (1xx) responses that came before the last final one.
    pub interim: Vec<(u16, http::HeaderMap)>,
}

impl H3Conn {
    /// Connects over QUIC with ALPN h3, verifying against `tls.roots` and `tls.sni`.
    pub async fn connect(addr: SocketAddr, tls: &Tls) -> anyhow::Result<H3Conn> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(tls.roots.clone())
            .with_no_client_auth();
        crypto.alpn_protocols = vec![b"h3".to_vec()];
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
        let mut endpoint = quinn::Endpoint::client(if addr.is_ipv6() {
            "[::1]:0".parse()?
        } else {
            "127.0.0.1:0".parse()?
        })?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
        let conn = tokio::time::timeout(TIMEOUT, endpoint.connect(addr, &tls.sni)?).await??;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        let _driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Conn {
            send,
            _driver,
            conn,
            _endpoint: endpoint,
            interim: Vec::new(),
        })
    }

    /// Sends `method https://authority/path` with `body`; reads the response whole.
    pub async fn send(
        &mut self,
        method: &str,
        authority: &str,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Resp> {
        self.send_paced(method, authority, path, body, Duration::ZERO)
            .await
    }

    /// As [`H3Conn::send`], with a pause of `gap` after each 64 KiB of the body.
    pub async fn send_paced(
        &mut self,
        method: &str,
        authority: &str,
        path: &str,
        body: Bytes,
        gap: Duration,
    ) -> anyhow::Result<Resp> {
        let fut = async {
            let req = Request::builder()
                .method(method)
                .uri(format!("https://{authority}{path}"))
                .body(())?;
            let mut stream = self.send.send_request(req).await?;
            if !body.is_empty() {
                for chunk in body.chunks(64 * 1024) {
                    stream.send_data(Bytes::copy_from_slice(chunk)).await?;
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
            }
            stream.finish().await?;
            // Interim (1xx) responses come first, each a HEADERS frame.
            let mut resp = stream.recv_response().await?;
            let mut interim = Vec::new();
            while resp.status().is_informational() {
                interim.push((resp.status().as_u16(), resp.headers().clone()));
                resp = stream.recv_response().await?;
            }
            self.interim = interim;
            let mut out = bytes::BytesMut::new();
            while let Some(mut chunk) = stream.recv_data().await? {
                use bytes::Buf;
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    out.extend_from_slice(c);
                    let n = c.len();
                    chunk.advance(n);
                }
            }
            let (parts, ()) = resp.into_parts();
            Ok::<_, anyhow::Error>(Resp {
                status: parts.status.as_u16(),
                version: parts.version,
                headers: parts.headers,
                body: out.freeze(),
                trailers: None,
            })
        };
        tokio::time::timeout(TIMEOUT, fut).await?
    }
}
