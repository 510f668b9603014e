//! `h3load`: an HTTP/3 load generator (quinn + h3), in the spirit of h2load.
//!
//! ```text
//! h3load --connect 127.0.0.1:8443 --ca ca.pem -c 50 -m 10 -d 10 https://localhost/obj
//! ```
//!
//! Opens `-c` QUIC connections, keeps `-m` requests in flight on each for
//! `-d` seconds, and prints requests/s and latency percentiles. Every request
//! reads its whole body. Errors are counted, never retried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Buf;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "h3load", version, about = "HTTP/3 load generator (quinn + h3)")]
struct Args {
    /// The URL; its host is the SNI and :authority.
    url: String,
    /// Where to connect (host:port); default: the URL's host and port.
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// PEM CA to trust; without it, certificates are not verified.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Connections.
    #[arg(short = 'c', default_value_t = 10)]
    connections: usize,
    /// Concurrent requests per connection.
    #[arg(short = 'm', default_value_t = 1)]
    streams: usize,
    /// Duration in seconds.
    #[arg(short = 'd', default_value_t = 10)]
    duration: u64,
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(ca: Option<&std::path::Path>) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut crypto = match ca {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_file_iter(path)? {
                roots.add(c?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    Ok(quinn::ClientConfig::new(Arc::new(qc)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: http::Uri = args.url.parse().context("bad URL")?;
    let host = uri.host().context("URL has no host")?.to_string();
    let authority = uri.authority().context("URL has no authority")?.to_string();
    let target = match args.connect {
        Some(a) => a,
        None => tokio::net::lookup_host((host.as_str(), uri.port_u16().unwrap_or(443)))
            .await?
            .next()
            .context("cannot resolve host")?,
    };
    let cfg = client_config(args.ca.as_deref())?;
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(cfg);

    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let conn = endpoint
            .connect(target, &host)?
            .await
            .context("QUIC connect")?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        for _ in 0..args.streams {
            let mut send = send.clone();
            let (ok, errors, bytes) = (ok.clone(), errors.clone(), bytes.clone());
            let uri = format!(
                "https://{authority}{}",
                uri.path_and_query().map_or("/", |p| p.as_str())
            );
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let r = async {
                        let req = http::Request::get(uri.as_str()).body(())?;
                        let mut s = send.send_request(req).await?;
                        s.finish().await?;
                        let resp = s.recv_response().await?;
                        let mut n = 0u64;
                        while let Some(chunk) = s.recv_data().await? {
                            n += chunk.remaining() as u64;
                        }
                        Ok::<_, anyhow::Error>((resp.status(), n))
                    }
                    .await;
                    match r {
                        Ok((status, n)) if status.is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                            lat.push(start.elapsed().as_micros() as u64);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            }));
        }
    }
    let started = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .max(args.duration as f64)
        .max(1e-9);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "requests: {ok} ok, {} errors in {elapsed:.2}s; {:.1} req/s; {:.1} MB/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        errors.load(Ordering::Relaxed),
        ok as f64 / elapsed,
        bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    endpoint.close(quinn::VarInt::from_u32(0), b"done");
    Ok(())
}
