//! The README's HTTP/3 settings, each shown over the wire: 0-RTT resumption
//! (`early_data`), Retry (`retry = "always"`), several UDP sockets per
//! listener (`endpoints`), and the congestion controllers (`congestion`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use meridian_e2e::certs::TempDir;
use meridian_e2e::client::H3Conn;
use meridian_e2e::origin::TestOrigin;
use tokio::net::UdpSocket;

use crate::{Edge, Pki, basic_config, metric};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn edge_with(http3: &str) -> anyhow::Result<(TestOrigin, TempDir, Pki, Edge)> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&format!(
        "{}\n[http3]\n{http3}\n",
        basic_config(&[origin.url()], &pki.config())
    ))?;
    Ok((origin, dir, pki, edge))
}

/// `retry = "always"`: every new client address is validated with a Retry
/// packet first, and the client's handshake still completes.
#[tokio::test]
async fn retry_always_validates_every_client_address() -> anyhow::Result<()> {
    let (_origin, _dir, pki, edge) = edge_with("retry = \"always\"").await?;
    for _ in 0..3 {
        let mut c = H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
        let r = c.send("GET", "a.test", "/hello", Bytes::new()).await?;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    }
    let m = edge.metrics().await?;
    assert_eq!(metric(&m, "meridian_quic_retries_total", &[]), 3.0, "{m}");
    assert_eq!(
        metric(&m, "meridian_quic_handshakes_total", &["result=\"ok\""]),
        3.0
    );
    Ok(())
}

/// `retry = "never"` (and `auto` below its threshold) sends none.
#[tokio::test]
async fn retry_auto_sends_none_when_idle() -> anyhow::Result<()> {
    let (_origin, _dir, pki, edge) = edge_with("").await?;
    let mut c = H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
    let r = c.send("GET", "a.test", "/hello", Bytes::new()).await?;
    assert_eq!(r.status, 200);
    let m = edge.metrics().await?;
    assert_eq!(metric(&m, "meridian_quic_retries_total", &[]), 0.0, "{m}");
    Ok(())
}

/// `endpoints = 2`: two UDP sockets share the port (SO_REUSEPORT) and the
/// kernel spreads clients over both. Clients come from 32 source ports; all
/// 32 landing on one socket would have probability 2^-31.
#[tokio::test]
async fn two_endpoints_both_receive_connections() -> anyhow::Result<()> {
    let (_origin, _dir, pki, edge) = edge_with("endpoints = 2").await?;
    let tls = pki.tls("a.test", &[])?;
    for _ in 0..32 {
        let mut c = H3Conn::connect(edge.https(), &tls).await?;
        let r = c.send("GET", "a.test", "/hello", Bytes::new()).await?;
        assert_eq!(r.status, 200);
    }
    let m = edge.metrics().await?;
    let per = |i: u32| {
        metric(
            &m,
            "meridian_quic_endpoint_connections_total",
            &[&format!("endpoint=\"{i}\"")],
        )
    };
    assert_eq!(per(0) + per(1), 32.0, "{m}");
    assert!(
        per(0) > 0.0 && per(1) > 0.0,
        "both sockets took clients: {m}"
    );
    Ok(())
}

/// `congestion`: each controller serves a download that needs many round
/// trips of congestion window.
#[tokio::test]
async fn every_congestion_controller_serves() -> anyhow::Result<()> {
    for cc in ["cubic", "bbr", "newreno"] {
        let (_origin, _dir, pki, edge) = edge_with(&format!("congestion = \"{cc}\"")).await?;
        let mut c = H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
        let r = c
            .send("GET", "a.test", "/large?mb=16", Bytes::new())
            .await?;
        assert_eq!((r.status, r.body.len()), (200, 16 << 20), "{cc}");
    }
    Ok(())
}

/// A UDP relay between one client and the edge that holds back the
/// client's datagrams carrying Handshake or 1-RTT packets for `hold`, so the
/// edge sees the client's early data before the handshake can complete, as
/// it would over a long path.
async fn relay(
    server: SocketAddr,
    hold: Duration,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(server).await?;
    let addr = front.local_addr()?;
    let task = tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    let d = a[..n].to_vec();
                    if holds_handshake_or_1rtt(&d) {
                        let back = back.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(hold).await;
                            let _ = back.send(&d).await;
                        });
                    } else {
                        let _ = back.send(&d).await;
                    }
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    Ok((addr, task))
}

fn varint(d: &mut &[u8]) -> Option<u64> {
    let first = *d.first()?;
    let len = 1usize << (first >> 6);
    if d.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &x in &d[1..len] {
        v = (v << 8) | u64::from(x);
    }
    *d = &d[len..];
    Some(v)
}

/// Whether a client datagram holds a Handshake packet or a short-header
/// (1-RTT) one: walks coalesced long-header packets (RFC 9000 §17.2).
fn holds_handshake_or_1rtt(mut d: &[u8]) -> bool {
    while let Some(&first) = d.first() {
        if first & 0x80 == 0 {
            return true; // short header
        }
        let kind = (first & 0x30) >> 4;
        if kind == 2 {
            return true;
        }
        let parse = |mut p: &[u8]| -> Option<usize> {
            let start = p.len();
            p = p.get(5..)?; // first byte, version
            let dcid = usize::from(*p.first()?);
            p = p.get(1 + dcid..)?;
            let scid = usize::from(*p.first()?);
            p = p.get(1 + scid..)?;
            if kind == 0 {
                let token = usize::try_from(varint(&mut p)?).ok()?;
                p = p.get(token..)?;
            }
            let len = usize::try_from(varint(&mut p)?).ok()?;
            Some(start - p.len() + len)
        };
        let Some(total) = parse(d) else { return false };
        let Some(rest) = d.get(total..) else {
            return false;
        };
        d = rest;
    }
    false
}

async fn h3_request(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> anyhow::Result<(u16, Bytes)> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://a.test{path}"))
        .body(())?;
    let mut stream = send.send_request(req).await?;
    if !body.is_empty() {
        stream.send_data(Bytes::from_static(body)).await?;
    }
    stream.finish().await?;
    let resp = stream.recv_response().await?;
    let mut out = BytesMut::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        while chunk.has_remaining() {
            let c = chunk.chunk();
            out.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok((resp.status().as_u16(), out.freeze()))
}

/// `early_data = true`: a client that resumes its TLS session sends its
/// requests in 0-RTT. The GET is served and reaches the origin marked
/// `Early-Data: 1`; the POST gets 425 Too Early (RFC 8470). The same
/// requests after the handshake are ordinary.
#[tokio::test]
async fn zero_rtt_resumption_serves_get_and_refuses_post_with_425() -> anyhow::Result<()> {
    let (origin, _dir, pki, edge) = edge_with("early_data = true").await?;
    let (front, relay_task) = relay(edge.https(), Duration::from_millis(300)).await?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.tls("a.test", &[])?.roots.clone())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    crypto.enable_early_data = true;
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));

    // A first connection: a full handshake, which leaves a session ticket.
    let first = async {
        let conn = endpoint.connect(front, "a.test")?.await?;
        let (mut driver, mut send) =
            h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let (status, body) = h3_request(&mut send, "GET", "/echo", b"").await?;
        anyhow::ensure!(status == 200, "first GET: {status}");
        let j: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(!has_early_header(&j), "a full handshake is not early: {j}");
        // Give the tickets (sent after the handshake) time to arrive.
        tokio::time::sleep(Duration::from_millis(700)).await;
        conn.close(0u32.into(), b"done");
        drive.abort();
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(TIMEOUT, first).await??;

    // The second connection resumes and sends its requests in 0-RTT.
    let second = async {
        let connecting = endpoint.connect(front, "a.test")?;
        let (conn, accepted) = connecting.into_0rtt().map_err(|_| {
            anyhow::anyhow!("the client could not attempt 0-RTT: no resumable session")
        })?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let (mut s1, mut s2) = (send.clone(), send);
        let (get, post) = tokio::join!(
            h3_request(&mut s1, "GET", "/echo", b""),
            h3_request(&mut s2, "POST", "/echo", b"payload"),
        );
        let accepted = accepted.await;
        drive.abort();
        Ok::<_, anyhow::Error>((get?, post?, accepted))
    };
    let ((get_status, get_body), (post_status, _), accepted) =
        tokio::time::timeout(TIMEOUT, second).await??;
    assert!(accepted, "the edge accepted the early data");
    assert_eq!(get_status, 200);
    let j: serde_json::Value = serde_json::from_slice(&get_body)?;
    assert!(
        has_early_header(&j),
        "the GET from early data reaches the origin with Early-Data: 1: {j}"
    );
    assert_eq!(post_status, 425, "a POST in early data is Too Early");
    assert_eq!(
        origin.count("/echo").await,
        2,
        "the POST never reached the origin"
    );
    relay_task.abort();
    Ok(())
}

fn has_early_header(echo: &serde_json::Value) -> bool {
    echo["headers"]
        .as_array()
        .is_some_and(|h| h.iter().any(|x| x[0] == "early-data" && x[1] == "1"))
}
