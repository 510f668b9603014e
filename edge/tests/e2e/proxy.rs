//! Proxy semantics through real sockets: headers, ALPN, SNI, HEAD,
//! streaming, 100-continue, WebSocket, load balancing, retries, health.

use std::time::Duration;

use meridian_e2e::client::{Conn, get, get_plain, raw, raw_status, req, req_h2};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;

use crate::{Edge, Pki, basic_config, metric, peak_rss};

#[tokio::test]
async fn h1_forwarding_headers() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let mut c = Conn::plain(edge.http(), false).await?;
    let mut r = req("GET", "example.test", "/echo?x=1", "");
    r.headers_mut()
        .insert("connection", "keep-alive, x-secret".parse()?);
    r.headers_mut().insert("x-secret", "hop".parse()?);
    r.headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse()?);
    let resp = c.send(r).await?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("via"), Some("1.1 meridian"));
    let j = resp.json()?;
    let hdr = |name: &str| -> Option<String> {
        j["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        hdr("host").as_deref(),
        Some("example.test"),
        "Host passes through"
    );
    assert_eq!(hdr("via").as_deref(), Some("1.1 meridian"));
    assert_eq!(
        hdr("x-forwarded-for").as_deref(),
        Some("198.51.100.7, 127.0.0.1")
    );
    assert_eq!(hdr("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        hdr("x-secret"),
        None,
        "fields named in Connection are removed"
    );
    assert_eq!(j["uri"], "/echo?x=1");
    // Keep-alive: the same connection serves a second request.
    assert_eq!(c.send(get("example.test", "/hello")).await?.text(), "hello");
    Ok(())
}

#[tokio::test]
async fn tls_alpn_chooses_h1_or_h2_and_sni_chooses_the_certificate() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let dir = meridian_e2e::certs::TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&basic_config(&[origin.url()], &pki.config()))?;
    // h2 by ALPN.
    let mut c = Conn::tls(edge.https(), &pki.tls("a.test", &["h2", "http/1.1"])?).await?;
    let r = c
        .send(req_h2("GET", "https", "a.test", "/echo", ""))
        .await?;
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.status, 200);
    let j = r.json()?;
    let via = j["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|x| x[0] == "via"))
        .map(|x| x[1].clone());
    assert_eq!(via, Some("2 meridian".into()));
    let xfp = j["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|x| x[0] == "x-forwarded-proto"))
        .map(|x| x[1].clone());
    assert_eq!(xfp, Some("https".into()));
    // HTTP/1.1 by ALPN.
    let mut c = Conn::tls(edge.https(), &pki.tls("a.test", &["http/1.1"])?).await?;
    let r = c.send(get("a.test", "/hello")).await?;
    assert_eq!((r.version, r.status), (http::Version::HTTP_11, 200));
    // SNI: each name verifies against its own certificate (rustls checks the name).
    for sni in ["a.test", "b.test", "x.w.test"] {
        let mut c = Conn::tls(edge.https(), &pki.tls(sni, &["h2"])?).await?;
        assert_eq!(
            c.send(req_h2("GET", "https", sni, "/hello", ""))
                .await?
                .status,
            200,
            "{sni}"
        );
    }
    // An unknown name gets the default (a.test) certificate, which fails verification for it.
    assert!(
        Conn::tls(edge.https(), &pki.tls("zzz.test", &["h2"])?)
            .await
            .is_err()
    );
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_tls_handshakes_total", &["result=\"ok\""]) >= 5.0,
        "{m}"
    );
    // The server records the failed handshake once the client's alert arrives.
    let failed = eventually(Duration::from_secs(5), || async {
        metric(
            &edge.metrics().await.unwrap_or_default(),
            "meridian_tls_handshakes_total",
            &["result=\"error\""],
        ) >= 1.0
    })
    .await;
    assert!(failed, "the failed handshake was not counted");
    assert!(metric(&m, "meridian_requests_total", &["protocol=\"h2\""]) >= 4.0);
    Ok(())
}

#[tokio::test]
async fn head_and_large_bodies_stream_with_bounded_memory() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let edge = Edge::start(&basic_config(
        &[origin.url()],
        "[limits]\nmax_body_bytes = \"1GiB\"\n",
    ))?;
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("HEAD", "t", "/large?mb=3", ""))
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("3145728"));
    assert!(r.body.is_empty());
    // 1 GiB down, read as a stream.
    let mut s = tokio::net::TcpStream::connect(edge.http()).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /large?mb=1024 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(total > 1024 * 1024 * 1024, "got {total} bytes");
    // 256 MiB up.
    let body = bytes::Bytes::from(vec![b'u'; 256 << 20]);
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("POST", "t", "/echo", body))
        .await?;
    assert_eq!(r.json()?["body_bytes"], 256u64 << 20);
    let peak = peak_rss(edge.proc_id()).unwrap_or(0);
    assert!(
        peak > 0 && peak < 160 << 20,
        "edge peak RSS {} MiB after 1 GiB down and 256 MiB up",
        peak >> 20
    );
    Ok(())
}

#[tokio::test]
async fn expect_100_continue() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.http()).await?;
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    s.write_all(b"hello").await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains("body_bytes") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_bytes\":5"), "{text}");
    Ok(())
}

#[tokio::test]
async fn websocket_upgrade_passes_through() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.http()).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"ping-through-the-tunnel").await?;
    let mut got = Vec::new();
    while got.len() < 23 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "tunnel closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got[..], b"ping-through-the-tunnel");
    Ok(())
}

#[tokio::test]
async fn round_robin_and_consistent_hash() -> anyhow::Result<()> {
    let a = TestOrigin::start("a").await?;
    let b = TestOrigin::start("b").await?;
    let edge = Edge::start(&basic_config(&[a.url(), b.url()], ""))?;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        let r = get_plain(edge.http(), "t", "/hello").await?;
        *seen
            .entry(r.header("x-origin").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        (seen.get("a"), seen.get("b")),
        (Some(&10), Some(&10)),
        "{seen:?}"
    );

    let edge = Edge::start(&basic_config(
        &[a.url(), b.url()],
        "selection = \"consistent_hash\"",
    ))?;
    for path in ["/obj/1", "/obj/2", "/obj/3", "/obj/4"] {
        let first = get_plain(edge.http(), "t", path)
            .await?
            .header("x-origin")
            .map(str::to_string);
        for _ in 0..5 {
            let again = get_plain(edge.http(), "t", path)
                .await?
                .header("x-origin")
                .map(str::to_string);
            assert_eq!(first, again, "{path} moved");
        }
    }
    Ok(())
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_origin() -> anyhow::Result<()> {
    let live = TestOrigin::start("live").await?;
    // A port that refuses connections.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let edge = Edge::start(&basic_config(
        &[format!("http://{dead}"), live.url()],
        "[pools.main.passive]\nmax_failures = 0\n",
    ))?;
    for i in 0..10 {
        let r = get_plain(edge.http(), "t", "/hello").await?;
        assert_eq!(r.status, 200, "GET {i}");
        // A POST is retried too when nothing reached the origin.
        let r = Conn::plain(edge.http(), false)
            .await?
            .send(req("POST", "t", "/echo", "data"))
            .await?;
        assert_eq!(r.status, 200, "POST {i}");
        assert_eq!(r.json()?["body_bytes"], 4);
    }
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_upstream_retries_total", &[]) >= 5.0,
        "{m}"
    );
    assert!(metric(&m, "meridian_upstream_errors_total", &["connect-refused"]) >= 5.0);
    Ok(())
}

#[tokio::test]
async fn active_health_checks_take_origins_out_and_back() -> anyhow::Result<()> {
    let a = TestOrigin::start("a").await?;
    let b = TestOrigin::start("b").await?;
    let edge = Edge::start(&basic_config(
        &[a.url(), b.url()],
        "[pools.main.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n",
    ))?;
    a.set_healthy(false);
    let out = eventually(Duration::from_secs(10), || async {
        let m = edge.metrics().await.unwrap_or_default();
        metric(&m, "meridian_origin_healthy", &[&format!("{}", a.addr)]) == 0.0
    })
    .await;
    assert!(out, "origin a never marked down");
    for _ in 0..10 {
        assert_eq!(
            get_plain(edge.http(), "t", "/hello")
                .await?
                .header("x-origin"),
            Some("b")
        );
    }
    a.set_healthy(true);
    let back = eventually(Duration::from_secs(10), || async {
        get_plain(edge.http(), "t", "/hello")
            .await
            .ok()
            .and_then(|r| r.header("x-origin").map(str::to_string))
            == Some("a".into())
    })
    .await;
    assert!(back, "origin a never came back");
    let m = edge.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_origin_health_transitions_total",
            &["to=\"down\""]
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "meridian_origin_health_transitions_total",
            &["to=\"up\""]
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn passive_ejection_after_consecutive_failures() -> anyhow::Result<()> {
    let live = TestOrigin::start("live").await?;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let edge = Edge::start(&basic_config(
        &[format!("http://{dead}"), live.url()],
        "[pools.main.retry]\nattempts = 1\n[pools.main.passive]\nmax_failures = 2\nejection_time = \"60s\"\n",
    ))?;
    let mut failures = 0;
    for _ in 0..20 {
        if get_plain(edge.http(), "t", "/hello").await?.status == 502 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "two failures eject the dead origin; the rest go to the live one"
    );
    Ok(())
}

/// Raw probe kept in this module: the edge still answers after everything above.
#[tokio::test]
async fn http10_request_is_served() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let reply = raw(
        edge.http(),
        b"GET /hello HTTP/1.0\r\nHost: t\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(
        reply.starts_with("HTTP/1.0 200") || raw_status(&reply) == Some(200),
        "{reply}"
    );
    assert!(reply.ends_with("hello"), "{reply}");
    Ok(())
}

#[tokio::test]
async fn ipv6_listener_and_h2_over_tls_to_a_verified_origin() -> anyhow::Result<()> {
    // The origin: an edge terminating TLS for a.test (our test PKI), in front of a plain origin.
    let plain = TestOrigin::start("deep").await?;
    let dir = meridian_e2e::certs::TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let tls_origin = Edge::start(&basic_config(&[plain.url()], &pki.config()))?;
    let ca = pki.ca.path.display().to_string();
    let origin_url = format!("https://127.0.0.1:{}", tls_origin.https().port());
    // The edge under test: an IPv6 listener, HTTP/2 over TLS to that origin,
    // verifying its certificate against the test CA with SNI a.test.
    let cfg = basic_config(
        std::slice::from_ref(&origin_url),
        &format!("protocol = \"http2\"\n[pools.main.tls]\nca_file = \"{ca}\"\nsni = \"a.test\"\n"),
    )
    .replace("address = \"127.0.0.1:0\"", "address = \"[::1]:0\"");
    let edge = Edge::start(&cfg)?;
    assert!(edge.http().is_ipv6());
    let r = get_plain(edge.http(), "v6.test", "/echo").await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json()?;
    assert_eq!(j["origin"], "deep");
    // The TLS origin saw HTTP/2 from us: its Via toward the deep origin says "2".
    let via: Vec<String> = j["headers"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|x| x[0] == "via")
                .filter_map(|x| x[1].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        via,
        ["1.1 meridian", "2 meridian"],
        "h1 from the client, then h2 between the edges"
    );
    assert_eq!(
        j["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|x| x[0] == "x-forwarded-for"))
            .map(|x| x[1].clone()),
        Some("::1, 127.0.0.1".into())
    );
    // A wrong SNI name fails verification: 502, never an unverified connection.
    let bad = basic_config(
        &[origin_url],
        &format!(
            "[pools.main.tls]\nca_file = \"{ca}\"\nsni = \"evil.test\"\n[pools.main.retry]\nattempts = 1\n"
        ),
    );
    let edge2 = Edge::start(&bad)?;
    assert_eq!(get_plain(edge2.http(), "t", "/hello").await?.status, 502);
    let m = edge2.metrics().await?;
    assert!(
        metric(&m, "meridian_upstream_errors_total", &["connect-failed"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn pool_connection_limit_gives_503_when_full() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(
        &[origin.url()],
        "[pools.main.connection_pool]\nmax_connections = 1\n[pools.main.timeouts]\nconnect = \"300ms\"\n[pools.main.retry]\nattempts = 1\n",
    ))?;
    let http = edge.http();
    let slow = tokio::spawn(async move { get_plain(http, "t", "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get_plain(edge.http(), "t", "/hello").await?;
    assert_eq!(r.status, 503, "the one connection is busy");
    assert_eq!(slow.await??.status, 200);
    assert_eq!(
        get_plain(edge.http(), "t", "/hello").await?.status,
        200,
        "free again"
    );
    Ok(())
}
