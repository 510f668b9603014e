//! Bad input: each case gets the right status, is counted, and leaves other
//! connections unharmed.

use std::time::Duration;

use meridian_e2e::client::{Conn, get_plain, raw, raw_status, req_h2};
use meridian_e2e::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Edge, Pki, basic_config, metric};

const WAIT: Duration = Duration::from_secs(5);

async fn edge_with_limits() -> anyhow::Result<(TestOrigin, Edge)> {
    let origin = TestOrigin::start("o1").await?;
    let mut cfg = basic_config(&[origin.url()], "");
    cfg.push_str("\n[limits]\nmax_header_bytes = \"8KiB\"\nmax_headers = 20\nmax_body_bytes = 1024\nheader_read_timeout = \"1s\"\n");
    Ok((origin, Edge::start(&cfg)?))
}

#[tokio::test]
async fn smuggling_ambiguity_is_400_and_never_reaches_the_origin() -> anyhow::Result<()> {
    let (origin, edge) = edge_with_limits().await?;
    let cl_te = b"POST /smuggle HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let reply = raw(edge.http(), cl_te, WAIT).await?;
    assert_eq!(raw_status(&reply), Some(400), "{reply}");
    // After a keep-alive request too: the second head is the ambiguous one.
    let two = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n";
    let reply = raw(edge.http(), two, WAIT).await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("HTTP/1.1 400"), "{reply}");
    let dup =
        b"POST /smuggle HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde";
    assert_eq!(raw_status(&raw(edge.http(), dup, WAIT).await?), Some(400));
    assert_eq!(origin.count("/smuggle").await, 0);
    let no_host = b"GET /hello HTTP/1.1\r\n\r\n";
    assert_eq!(
        raw_status(&raw(edge.http(), no_host, WAIT).await?),
        Some(400)
    );
    let m = edge.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_bad_requests_total",
            &["content-length-with-transfer-encoding"]
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "meridian_bad_requests_total", &["missing-host"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_heads_are_431() -> anyhow::Result<()> {
    let (origin, edge) = edge_with_limits().await?;
    let big = format!(
        "GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    assert_eq!(
        raw_status(&raw(edge.http(), big.as_bytes(), WAIT).await?),
        Some(431)
    );
    let mut many = String::from("GET /hello HTTP/1.1\r\nHost: t\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        raw_status(&raw(edge.http(), many.as_bytes(), WAIT).await?),
        Some(431)
    );
    assert_eq!(origin.count("/hello").await, 0);
    Ok(())
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() -> anyhow::Result<()> {
    let (origin, edge) = edge_with_limits().await?;
    let declared = format!(
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n{}",
        "b".repeat(5000)
    );
    assert_eq!(
        raw_status(&raw(edge.http(), declared.as_bytes(), WAIT).await?),
        Some(413)
    );
    assert_eq!(
        origin.count("/upload").await,
        0,
        "a declared oversize body never reaches the origin"
    );
    let mut chunked =
        String::from("POST /upload2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        chunked.push_str(&format!("400\r\n{}\r\n", "c".repeat(1024)));
    }
    chunked.push_str("0\r\n\r\n");
    assert_eq!(
        raw_status(&raw(edge.http(), chunked.as_bytes(), WAIT).await?),
        Some(413)
    );
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_bad_requests_total", &["body-too-large"]) >= 2.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn slow_request_heads_get_408() -> anyhow::Result<()> {
    let (_origin, edge) = edge_with_limits().await?;
    let mut s = tokio::net::TcpStream::connect(edge.http()).await?;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n").await?;
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let reply = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&reply), Some(408), "{reply}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "408 came after {:?}",
        start.elapsed()
    );
    // Other clients are fine meanwhile.
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_bad_requests_total", &["header-timeout"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn origin_refused_is_502_and_origin_timeout_is_504_and_unknown_host_421() -> anyhow::Result<()>
{
    let origin = TestOrigin::start("o1").await?;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let cfg = format!(
        r#"[admin]
listen = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
[[sites]]
hosts = ["dead.test"]
pool = "dead"
[[sites]]
hosts = ["slow.test", "*.slow.test"]
pool = "slow"
[pools.dead]
origins = [{{ url = "http://{dead}" }}]
retry = {{ attempts = 1 }}
passive = {{ max_failures = 0 }}
[pools.slow]
origins = [{{ url = "{}" }}]
timeouts = {{ header = "500ms" }}
"#,
        origin.url()
    );
    let edge = Edge::start(&cfg)?;
    assert_eq!(
        get_plain(edge.http(), "dead.test", "/hello").await?.status,
        502
    );
    let start = std::time::Instant::now();
    assert_eq!(
        get_plain(edge.http(), "x.slow.test", "/slow?ms=3000")
            .await?
            .status,
        504
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the header timeout took {:?}",
        start.elapsed()
    );
    assert_eq!(
        get_plain(edge.http(), "slow.test", "/hello").await?.status,
        200
    );
    assert_eq!(
        get_plain(edge.http(), "other.test", "/hello").await?.status,
        421
    );
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_upstream_errors_total", &["connect-refused"]) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "meridian_upstream_errors_total", &["header-timeout"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn hpack_int(prefix_bits: u8, first: u8, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// GET https://a.test/hello, in HPACK.
fn request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87]; // :method GET, :scheme https
    b.push(0x04); // :path, literal without indexing
    hpack_int(7, 0, 6, &mut b);
    b.extend_from_slice(b"/hello");
    b.push(0x01); // :authority, literal without indexing
    hpack_int(7, 0, 6, &mut b);
    b.extend_from_slice(b"a.test");
    b
}

/// Reads frames until GOAWAY (its error code) or EOF (None), within `wait`.
async fn until_goaway<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    wait: Duration,
) -> Option<Option<u32>> {
    tokio::time::timeout(wait, async {
        let mut head = [0u8; 9];
        loop {
            if s.read_exact(&mut head).await.is_err() {
                return None;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return None;
            }
            if head[3] == 0x7 && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn http2_rapid_reset_and_continuation_floods_are_bounded() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o1").await?;
    let dir = meridian_e2e::certs::TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&basic_config(&[origin.url()], &pki.config()))?;
    let tls = pki.tls("a.test", &["h2"])?;

    // Rapid reset: open and cancel streams as fast as possible.
    let mut s = meridian_e2e::client::tls_connect(edge.https(), &tls).await?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&out).await?;
    let block = request_block();
    let mut sent = 0;
    let mut write_failed = false;
    for i in 0..20_000u32 {
        let id = 1 + 2 * i;
        let mut burst = frame(0x1, 0x4 | 0x1, id, &block);
        burst.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
        if s.write_all(&burst).await.is_err() {
            write_failed = true;
            break;
        }
        sent += 1;
    }
    let goaway = if write_failed {
        Some(None)
    } else {
        until_goaway(&mut s, WAIT).await
    };
    assert!(
        goaway.is_some(),
        "the server never ended a connection that reset {sent} streams"
    );
    // A well-behaved client is served meanwhile and after.
    let mut c = Conn::tls(edge.https(), &tls).await?;
    assert_eq!(
        c.send(req_h2("GET", "https", "a.test", "/hello", ""))
            .await?
            .status,
        200
    );

    // CONTINUATION flood: a header block that never ends.
    let mut s = meridian_e2e::client::tls_connect(edge.https(), &tls).await?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x1, 1, &request_block())); // HEADERS without END_HEADERS
    s.write_all(&out).await?;
    let mut junk = Vec::new();
    for i in 0..4 {
        junk.push(0x00);
        let name = format!("x-flood-{i}");
        hpack_int(7, 0, name.len(), &mut junk);
        junk.extend_from_slice(name.as_bytes());
        hpack_int(7, 0, 4000, &mut junk);
        junk.extend(std::iter::repeat_n(b'a', 4000));
    }
    let mut bytes_sent = 0usize;
    let mut closed = false;
    for _ in 0..2_000 {
        if s.write_all(&frame(0x9, 0, 1, &junk)).await.is_err() {
            closed = true;
            break;
        }
        bytes_sent += junk.len();
    }
    if !closed {
        closed = until_goaway(&mut s, WAIT).await.is_some();
    }
    assert!(
        closed,
        "the server kept reading an endless header block ({bytes_sent} bytes)"
    );
    assert_eq!(
        c.send(req_h2("GET", "https", "a.test", "/hello", ""))
            .await?
            .status,
        200
    );
    Ok(())
}
