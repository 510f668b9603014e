//! The edge under traffic no one here wrote: origins that 503 or vanish,
//! clients that stall, lie about ranges, send absolute-form targets or ask
//! for no-store. Each test is the regression test of a defect found by an
//! independent review (issue "meridian-edge under real and hostile traffic").

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meridian_e2e::client::{Conn, get, get_plain, raw};
use meridian_e2e::harness::{Proc, eventually};
use meridian_e2e::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Edge, Pki, basic_config, bin, metric};

async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<meridian_e2e::client::Resp> {
    let mut r = get("h.test", path);
    for (k, v) in headers {
        r.headers_mut()
            .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    Conn::plain(addr, false).await?.send(r).await
}

fn cache_status(r: &meridian_e2e::client::Resp) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

fn is_hit(r: &meridian_e2e::client::Resp) -> bool {
    cache_status(r).starts_with("meridian; hit")
}

/// Opens a connection, sends a GET and reads nothing: a stalled client.
async fn stalled_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: h.test\r\n\r\n").as_bytes())
        .await?;
    Ok(s)
}

/// Reads a whole HTTP/1.1 response off a raw socket; returns the body length.
async fn read_body_len(s: &mut TcpStream, wait: Duration) -> anyhow::Result<usize> {
    let mut buf = vec![0u8; 1 << 16];
    let mut head = Vec::new();
    let deadline = Instant::now() + wait;
    let (mut body, len) = loop {
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed in the head");
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .ok_or_else(|| anyhow::anyhow!("no content-length in {text}"))?
                .trim()
                .parse()?;
            break (head.len() - end - 4, len);
        }
    };
    while body < len {
        let n = match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("timed out after {body} of {len} body bytes"),
        };
        if n == 0 {
            break;
        }
        body += n;
    }
    Ok(body)
}

/// 1. The defaults never turn an origin's errors into an outage: a pool
///    keeps its last origin (panic mode), so URLs that do not fail still work.
#[tokio::test]
async fn defaults_keep_serving_other_urls_when_the_origin_503s_some() -> anyhow::Result<()> {
    meridian_e2e::init();
    let origin = TestOrigin::start("o").await?;
    let url = origin.url();
    let p = Proc::start(
        bin(),
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--origin",
            &url,
            "--admin",
            "127.0.0.1:0",
            "--access-log",
            "off",
        ],
        "meridian-edge",
    )?;
    for _ in 0..12 {
        let r = get_plain(p.http(), "h.test", "/status/503").await?;
        assert_eq!(r.status, 503, "the origin's own 503 is passed on");
    }
    for i in 0..10 {
        let r = get_plain(p.http(), "h.test", "/hello").await?;
        assert_eq!(r.status, 200, "request {i} to a healthy URL");
        assert_eq!(r.text(), "hello");
    }
    let m = meridian_e2e::client::get_plain(p.admin(), "admin", "/metrics")
        .await?
        .text();
    assert!(
        metric(&m, "meridian_pool_panic_total", &["pool=\"origin\""]) >= 1.0,
        "panic mode is counted"
    );
    Ok(())
}

/// 2. A response that sets a cookie is never replayed to another client.
#[tokio::test]
async fn set_cookie_is_never_replayed_by_default() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let path = "/cc/sid?cc=max-age%3D300&hdr=set-cookie:sid%3Dsecret-of-user-1";
    let first = get_with(edge.http(), path, &[]).await?;
    assert_eq!(first.header("set-cookie"), Some("sid=secret-of-user-1"));
    let second = get_with(edge.http(), path, &[]).await?;
    assert_eq!(second.status, 200);
    assert!(!is_hit(&second), "not stored: {}", cache_status(&second));
    assert_eq!(origin.count("/cc/sid").await, 2);

    // `strip` stores it without the cookie; a client's own Cookie does not stop a hit.
    let edge = Edge::start(&basic_config(
        &[origin.url()],
        "[sites.cache]\nset_cookie = \"strip\"\n",
    ))?;
    let path = "/cc/strip?cc=max-age%3D300&hdr=set-cookie:sid%3Duser-2";
    let first = get_with(edge.http(), path, &[]).await?;
    assert_eq!(
        first.header("set-cookie"),
        Some("sid=user-2"),
        "the filling client gets its cookie"
    );
    let hit = get_with(edge.http(), path, &[("cookie", "sid=someone-else")]).await?;
    assert!(is_hit(&hit), "{}", cache_status(&hit));
    assert_eq!(
        hit.header("set-cookie"),
        None,
        "the stored copy has no cookie"
    );
    assert_eq!(origin.count("/cc/strip").await, 1);
    Ok(())
}

/// 3. The key's scheme is the connection's: a plaintext client naming
///    `https://` in an absolute-form target cannot fill HTTPS entries.
#[tokio::test]
async fn plaintext_absolute_form_cannot_poison_https_entries() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("scheme")?;
    let pki = Pki::new(dir.path())?;
    let cfg = format!("{}\n{}", basic_config(&[origin.url()], ""), pki.config());
    let edge = Edge::start_in(dir, &cfg)?;
    let path = "/cc/poison?cc=max-age%3D300&text=from-plaintext";
    let reply = raw(
        edge.http(),
        format!("GET https://a.test{path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let mut tls = Conn::tls(edge.https(), &pki.tls("a.test", &["http/1.1"])?).await?;
    let r = tls.send(get("a.test", path)).await?;
    assert_eq!(r.status, 200);
    assert!(
        cache_status(&r).contains("fwd=uri-miss"),
        "the HTTPS client must not get the plaintext client's entry: {}",
        cache_status(&r)
    );
    assert_eq!(origin.count("/cc/poison").await, 2);

    // An absolute-form target replaces Host: routing, key and origin agree.
    let reply = raw(
        edge.http(),
        b"GET http://a.test/echo HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(
        body.contains("\"x-forwarded-host\",\"a.test\"") && !body.contains("other.test"),
        "{reply}"
    );
    Ok(())
}

/// 4. One-byte ranges never pull whole objects from the origin.
#[tokio::test]
async fn one_byte_ranges_do_not_pull_whole_objects() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    const SIZE: u64 = 16 << 20;
    for i in 0..5 {
        let path = format!("/cc/big?size={SIZE}&cc=max-age%3D300&ranges=1&junk={i}");
        let r = get_with(edge.http(), &path, &[("range", "bytes=0-0")]).await?;
        assert_eq!(r.status, 206);
        assert_eq!(r.body.len(), 1);
        assert_eq!(
            r.header("content-range"),
            Some(&*format!("bytes 0-0/{SIZE}"))
        );
    }
    let sent = origin.stats.cc_body_bytes.load(Ordering::SeqCst);
    assert!(
        sent <= 5,
        "the origin sent {sent} bytes for five 1-byte ranges"
    );

    // An origin that ignores Range: its body is cut off once the client has its byte.
    for i in 0..5 {
        let path = format!("/cc/big2?size={SIZE}&cc=max-age%3D300&junk={i}");
        let r = get_with(edge.http(), &path, &[("range", "bytes=0-0")]).await?;
        assert_eq!(r.status, 206);
        assert_eq!(r.body.len(), 1);
    }
    let m = edge.metrics().await?;
    let from_origin = metric(
        &m,
        "meridian_cache_served_bytes_total",
        &["reason=\"origin\""],
    );
    assert!(
        from_origin < (SIZE * 2) as f64,
        "read {from_origin} bytes from the origin for five 1-byte ranges"
    );
    // Per site: what the origins sent against what the clients got.
    let site_origin = metric(
        &m,
        "meridian_site_bytes_total",
        &["site=\"*\"", "direction=\"origin\""],
    );
    let site_client = metric(
        &m,
        "meridian_site_bytes_total",
        &["site=\"*\"", "direction=\"client\""],
    );
    assert!(site_client >= 10.0, "{site_client}");
    assert!(site_origin < (SIZE * 2) as f64, "{site_origin}");

    // A small object behind a range is filled whole in the background.
    let small = "/cc/small?size=100000&cc=max-age%3D300&ranges=1";
    let r = get_with(edge.http(), small, &[("range", "bytes=10-19")]).await?;
    assert_eq!(r.status, 206);
    let hit = eventually(Duration::from_secs(5), || async {
        get_with(edge.http(), small, &[("range", "bytes=20-29")])
            .await
            .map(|r| r.status == 206 && is_hit(&r))
            .unwrap_or(false)
    })
    .await;
    assert!(hit, "the small object was stored by its background fill");
    Ok(())
}

/// 5. Hit-for-pass comes from responses only: one client's `no-store` or
///    `Authorization` never switches caching off for the others.
#[tokio::test]
async fn one_client_cannot_switch_caching_off() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    for (n, header) in [
        ("ns", ("cache-control", "no-store")),
        ("auth", ("authorization", "Bearer x")),
    ] {
        let path = format!("/cc/{n}?cc=max-age%3D300");
        let r = get_with(edge.http(), &path, &[header]).await?;
        assert_eq!(r.status, 200);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(cache_status(&get_with(edge.http(), &path, &[]).await?));
        }
        assert!(
            statuses[1].starts_with("meridian; hit") && statuses[2].starts_with("meridian; hit"),
            "after a {header:?} request: {statuses:?}"
        );
        assert_eq!(origin.count(&format!("/cc/{n}")).await, 2, "{header:?}");
    }
    Ok(())
}

/// 6. A stalled client does not split a fill: the second client is served
///    from the first fill, and the stalled one still gets every byte later.
#[tokio::test]
async fn a_stalled_client_does_not_split_a_fill() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    const SIZE: usize = 32 << 20;
    let path = format!("/cc/huge?size={SIZE}&cc=max-age%3D300");
    let mut stalled = stalled_get(edge.http(), &path).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = get_with(edge.http(), &path, &[]).await?;
    assert_eq!(second.status, 200);
    assert_eq!(second.body.len(), SIZE);
    assert!(
        is_hit(&second),
        "served from the first fill: {}",
        cache_status(&second)
    );
    assert_eq!(origin.count("/cc/huge").await, 1, "one origin fetch");
    // The stalled client now reads, and gets the whole object intact in length.
    let got = read_body_len(&mut stalled, Duration::from_secs(30)).await?;
    assert_eq!(got, SIZE);
    Ok(())
}

/// A client that accepts nothing for `send_timeout` is closed.
#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_after_send_timeout() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(
        &[origin.url()],
        "[limits]\nsend_timeout = \"1s\"\n",
    ))?;
    let path = "/cc/st?size=8388608&cc=max-age%3D300";
    let mut stalled = stalled_get(edge.http(), path).await?;
    let closed = eventually(Duration::from_secs(10), || async {
        edge.metrics()
            .await
            .map(|m| metric(&m, "meridian_client_timeouts_total", &["reason=\"send\""]) >= 1.0)
            .unwrap_or(false)
    })
    .await;
    assert!(closed, "send timeout counted");
    let got = read_body_len(&mut stalled, Duration::from_secs(10)).await;
    assert!(
        got.map_or(true, |n| n < 8388608),
        "the connection was cut before the whole body"
    );
    Ok(())
}

/// 8. Revalidations coalesce: 50 clients of one stale object make one
///    conditional request.
#[tokio::test]
async fn revalidations_coalesce() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    // max-age=3: ages are whole seconds and the origin's Date may lag, so
    // the object refreshed by the 304 must stay fresh for its waiters.
    let path = "/cc/herd?cc=max-age%3D3&etag=%22v1%22&delay=300";
    assert_eq!(get_with(edge.http(), path, &[]).await?.status, 200);
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let addr = edge.http();
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(async move { get_with(addr, path, &[]).await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await??.status, 200);
    }
    assert_eq!(
        origin.count("/cc/herd").await,
        2,
        "one fill and one conditional request"
    );
    Ok(())
}

/// RFC 9111 §4.2.4 by default: an origin that cannot be reached gets its
/// stale objects served; `must-revalidate` still forbids it.
#[tokio::test]
async fn stale_is_served_by_default_when_the_origin_is_unreachable() -> anyhow::Result<()> {
    let mut origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let ok = "/cc/gone?cc=max-age%3D1&text=kept";
    let strict = "/cc/strict?cc=max-age%3D1%2C%20must-revalidate&text=strict";
    assert_eq!(get_with(edge.http(), ok, &[]).await?.text(), "kept");
    assert_eq!(get_with(edge.http(), strict, &[]).await?.status, 200);
    origin.stop();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get_with(edge.http(), ok, &[]).await?;
    assert_eq!((r.status, r.text()), (200, "kept".to_string()));
    let r = get_with(edge.http(), strict, &[]).await?;
    assert!(
        r.status >= 500,
        "must-revalidate forbids stale: {}",
        r.status
    );
    Ok(())
}

/// An origin that answers `GET`s with a `max-age=1, stale-if-error=600`
/// object until `stall` is set, then reads each request, counts it in
/// `stalled`, and never answers (for at most a minute).
async fn stalling_origin() -> anyhow::Result<(
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicU32>,
)> {
    let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stalled = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (stall2, stalled2) = (stall.clone(), stalled.clone());
    let addr = raw_origin(move |_| {
        if stall2.load(Ordering::SeqCst) {
            stalled2.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        let ok = "HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-if-error=600\r\n\
                  ETag: \"v1\"\r\nContent-Length: 4\r\n\r\nkept";
        Some(vec![(Duration::ZERO, ok.as_bytes().to_vec())])
    })
    .await?;
    Ok((addr, stall, stalled))
}

/// A raw HTTP/1.1 origin. For each request head on each connection,
/// `answer(head)` gives what to write, each part after its delay; `None`
/// stalls the connection (for at most a minute, then closes it).
async fn raw_origin<F>(answer: F) -> anyhow::Result<std::net::SocketAddr>
where
    F: Fn(&str) -> Option<Vec<(Duration, Vec<u8>)>> + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        seen.drain(..end + 4);
                        let Some(parts) = answer(&head) else {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        };
                        for (delay, bytes) in parts {
                            tokio::time::sleep(delay).await;
                            if s.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Two clients of one stale `stale-if-error` object while the origin
/// stalls: the first leads the revalidation, the second (300 ms later)
/// waits for it. Returns both answers and the time the second took.
async fn two_on_a_stalled_revalidation(
    extra: &str,
) -> anyhow::Result<(
    meridian_e2e::client::Resp,
    meridian_e2e::client::Resp,
    Duration,
    u32,
)> {
    let (addr, stall, stalled) = stalling_origin().await?;
    let cfg = basic_config(&[format!("http://{addr}")], extra);
    let edge = Edge::start(&cfg)?;
    let path = "/sie";
    let first = get_with(edge.http(), path, &[]).await?;
    assert_eq!((first.status, first.text()), (200, "kept".to_string()));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    stall.store(true, Ordering::SeqCst);
    let http = edge.http();
    let limit = Duration::from_secs(30);
    let leader =
        tokio::spawn(async move { tokio::time::timeout(limit, get_with(http, path, &[])).await });
    let reached = eventually(Duration::from_secs(5), || {
        let stalled = stalled.clone();
        async move { stalled.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    anyhow::ensure!(reached, "the revalidation never reached the origin");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let waiter = tokio::time::timeout(limit, get_with(edge.http(), path, &[])).await??;
    let took = t.elapsed();
    let leader = leader.await???;
    Ok((leader, waiter, took, stalled.load(Ordering::SeqCst)))
}

/// 9. An origin that stalls on a revalidation: the request that waited for
///    it is answered with the stale copy as soon as the revalidation fails,
///    and never asks the origin again (it used to, after the lock timeout,
///    taking two sets of timeouts: a chaos run's client gave up at 15 s).
#[tokio::test]
async fn a_waiter_on_a_failed_revalidation_is_served_stale_at_once() -> anyhow::Result<()> {
    let (leader, waiter, took, stalled) = two_on_a_stalled_revalidation(
        "[pools.main.timeouts]\nheader = \"2s\"\n[pools.main.retry]\nattempts = 1\n",
    )
    .await?;
    for r in [&leader, &waiter] {
        assert_eq!((r.status, r.text()), (200, "kept".to_string()));
        assert!(
            cache_status(r).contains("detail=stale-if-error"),
            "{}",
            cache_status(r)
        );
    }
    assert!(
        cache_status(&waiter).contains("collapsed"),
        "{}",
        cache_status(&waiter)
    );
    assert_eq!(
        stalled, 1,
        "the waiter did not ask the stalled origin again"
    );
    assert!(
        took < Duration::from_millis(1900),
        "the waiter took {took:?}, more than the leader's header timeout left"
    );
    Ok(())
}

/// 10. When the revalidation has no answer within `cache.lock_timeout`,
///     the waiter serves the stale copy then, rather than wait for the
///     origin's timeouts again itself.
#[tokio::test]
async fn a_waiter_serves_stale_if_error_at_the_lock_timeout() -> anyhow::Result<()> {
    let (leader, waiter, took, stalled) = two_on_a_stalled_revalidation(
        "[pools.main.timeouts]\nheader = \"6s\"\n[pools.main.retry]\nattempts = 1\n\
         [cache]\nlock_timeout = \"1s\"\n",
    )
    .await?;
    assert_eq!((waiter.status, waiter.text()), (200, "kept".to_string()));
    assert!(
        cache_status(&waiter).contains("collapsed; detail=stale-if-error"),
        "{}",
        cache_status(&waiter)
    );
    assert!(
        took < Duration::from_secs(4),
        "the waiter took {took:?}: its lock timeout is 1 s"
    );
    assert_eq!(stalled, 1, "only the leader asked the stalled origin");
    // The leader itself is served stale at its header timeout.
    assert_eq!((leader.status, leader.text()), (200, "kept".to_string()));
    Ok(())
}

/// 11. The waiters of a miss whose fetch failed learn it: each then tries
///     the origin once itself, and its `Cache-Status` says why.
#[tokio::test]
async fn the_waiters_of_a_failed_miss_say_flight_failed() -> anyhow::Result<()> {
    let (addr, stall, stalled) = stalling_origin().await?;
    stall.store(true, Ordering::SeqCst);
    let cfg = basic_config(
        &[format!("http://{addr}")],
        "[pools.main.timeouts]\nheader = \"1s\"\n[pools.main.retry]\nattempts = 1\n",
    );
    let edge = Edge::start(&cfg)?;
    let http = edge.http();
    let limit = Duration::from_secs(30);
    let leader =
        tokio::spawn(async move { tokio::time::timeout(limit, get_with(http, "/m", &[])).await });
    let reached = eventually(Duration::from_secs(5), || {
        let stalled = stalled.clone();
        async move { stalled.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    anyhow::ensure!(reached, "the miss never reached the origin");
    // The origin answers again, but the leader's request stays stalled.
    stall.store(false, Ordering::SeqCst);
    let waiter = tokio::time::timeout(limit, get_with(edge.http(), "/m", &[])).await??;
    let leader = leader.await???;
    assert_eq!(leader.status, 504, "the leader's header timeout");
    assert_eq!((waiter.status, waiter.text()), (200, "kept".to_string()));
    let cs = cache_status(&waiter);
    assert!(
        cs.contains("fwd=uri-miss")
            && cs.contains("collapsed")
            && cs.contains("detail=flight-failed"),
        "{cs}"
    );
    assert_eq!(stalled.load(Ordering::SeqCst), 1);
    Ok(())
}

async fn open_tunnel(addr: std::net::SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    Ok(s)
}

/// Upgrade tunnels (WebSocket) count in `max_connections` and
/// `meridian_connections_active`, and close after the idle timeout.
#[tokio::test]
async fn websocket_tunnels_are_counted_and_time_out_when_idle() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&format!(
        "{}\n[server]\nmax_connections = 1\n",
        basic_config(&[origin.url()], "[pools.main.timeouts]\nidle = \"1s\"\n")
    ))?;
    let mut tunnel = open_tunnel(edge.http()).await?;
    // The tunnel is alive and counted.
    tunnel.write_all(b"ping").await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"ping");
    let m = edge.metrics().await?;
    assert_eq!(
        metric(&m, "meridian_connections_active", &["transport=\"tcp\""]),
        1.0,
        "the tunnel is an active connection"
    );
    let other = get_plain(edge.http(), "t", "/hello").await;
    assert!(
        other.is_err(),
        "max_connections = 1 is taken by the tunnel: {:?}",
        other.map(|r| r.status)
    );
    // Idle for longer than the timeout: the edge closes it.
    let start = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), tunnel.read(&mut buf)).await?;
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not data: {n:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Its slot is free again.
    let ok = eventually(Duration::from_secs(5), || async {
        get_plain(edge.http(), "t", "/hello")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(ok, "the slot came back");
    let m = edge.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_client_timeouts_total",
            &["reason=\"tunnel-idle\""]
        ) >= 1.0
    );
    Ok(())
}

/// HTTP/3 connections count in `max_connections`.
#[tokio::test]
async fn quic_connections_count_in_max_connections() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("h3max")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&format!(
        "{}\n[server]\nmax_connections = 1\n",
        basic_config(&[origin.url()], &pki.config())
    ))?;
    let tls = pki.tls("a.test", &[])?;
    let mut first = meridian_e2e::client::H3Conn::connect(edge.https(), &tls).await?;
    let r = first
        .send("GET", "a.test", "/hello", bytes::Bytes::new())
        .await?;
    assert_eq!(r.status, 200);
    let second = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = meridian_e2e::client::H3Conn::connect(edge.https(), &tls).await?;
        c.send("GET", "a.test", "/hello", bytes::Bytes::new()).await
    })
    .await;
    assert!(
        !matches!(second, Ok(Ok(_))),
        "a second QUIC connection is refused while the only slot is taken"
    );
    let m = edge.metrics().await?;
    assert!(metric(&m, "meridian_connections_rejected_total", &[]) >= 1.0);
    drop(first);
    let ok = eventually(Duration::from_secs(10), || async {
        match meridian_e2e::client::H3Conn::connect(edge.https(), &tls).await {
            Ok(mut c) => c
                .send("GET", "a.test", "/hello", bytes::Bytes::new())
                .await
                .is_ok_and(|r| r.status == 200),
            Err(_) => false,
        }
    })
    .await;
    assert!(ok, "the slot came back when the first connection closed");
    Ok(())
}

/// RFC 9110 §9.3.3: a POST answer with explicit freshness and a
/// Content-Location naming its own target answers later GETs.
#[tokio::test]
async fn a_post_answer_that_names_itself_is_reused_for_gets() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let path = "/cc/post?cc=max-age%3D60&cl=self&text=posted";
    let mut c = Conn::plain(edge.http(), false).await?;
    let r = c
        .send(meridian_e2e::client::req("POST", "h.test", path, "form=1"))
        .await?;
    assert_eq!((r.status, r.text()), (200, "posted".to_string()));
    // The answer is stored once its body has gone to the client, so a GET
    // sent at once can come first and go to the origin (seen once in CI):
    // wait until the cache holds it, then one GET must be a hit.
    let stored = eventually(Duration::from_secs(5), || async {
        edge.metrics()
            .await
            .is_ok_and(|m| metric(&m, "meridian_cache_entries", &[]) >= 1.0)
    })
    .await;
    assert!(stored, "the POST's answer was never stored");
    let r = get_with(edge.http(), path, &[]).await?;
    assert!(
        is_hit(&r) && r.text() == "posted",
        "the GET is answered from the POST's response: {}",
        cache_status(&r)
    );
    assert_eq!(origin.count("/cc/post").await, 1);
    // Without Content-Location naming the target, nothing is stored.
    let other = "/cc/post2?cc=max-age%3D60&text=posted";
    c.send(meridian_e2e::client::req("POST", "h.test", other, "form=1"))
        .await?;
    let r = get_with(edge.http(), other, &[]).await?;
    assert!(!is_hit(&r), "{}", cache_status(&r));
    Ok(())
}

/// 1xx interim responses (103 Early Hints, 102 Processing) from an origin
/// are never stored, nor taken for the final response's headers.
#[tokio::test]
async fn interim_responses_are_never_stored_as_final() -> anyhow::Result<()> {
    let (addr, served) = interim_origin(
        |_| {
            "HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\nCache-Control: no-store\r\n\r\n".into()
        },
        Duration::ZERO,
    )
    .await?;
    let edge = Edge::start(&basic_config(&[format!("http://{addr}")], ""))?;
    let first = get_with(edge.http(), "/x", &[]).await?;
    assert_eq!((first.status, first.text()), (200, "/x".to_string()));
    assert!(
        first.header("link").is_none(),
        "no interim field in the final head"
    );
    let second = get_with(edge.http(), "/x", &[]).await?;
    assert_eq!((second.status, second.text()), (200, "/x".to_string()));
    assert!(
        is_hit(&second),
        "the final 200 was stored: {}",
        cache_status(&second)
    );
    assert!(second.header("link").is_none());
    assert_eq!(served.load(Ordering::SeqCst), 1);
    Ok(())
}

/// An origin that answers every request with the interim heads
/// `interims(path)` gives, then, after `delay`, the final 200
/// (`max-age=60`) whose body is the path. Counts the requests it answers.
async fn interim_origin(
    interims: fn(&str) -> String,
    delay: Duration,
) -> anyhow::Result<(std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>)> {
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = served.clone();
    let addr = raw_origin(move |head| {
        count.fetch_add(1, Ordering::SeqCst);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let fin = format!(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n{path}",
            path.len()
        );
        Some(vec![
            (Duration::ZERO, interims(&path).into_bytes()),
            (delay, fin.into_bytes()),
        ])
    })
    .await?;
    Ok((addr, served))
}

/// A 103 Early Hints with a preload link for `{path}.css`, and a
/// connection-specific field that must not be forwarded.
fn early_hints(path: &str) -> String {
    format!(
        "HTTP/1.1 103 Early Hints\r\nLink: <{path}.css>; rel=preload\r\nConnection: keep-alive\r\n\r\n"
    )
}

/// Reads from `s` until `buf` holds `needle`, for at most `limit`.
async fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    needle: &[u8],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no {:?} within {limit:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(buf)
                )
            })??;
        anyhow::ensure!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// An origin's 103 Early Hints reaches an HTTP/1.1 client before the final
/// response, while the origin is still working on it (RFC 9110 §15.2), and
/// is never part of what the cache stores.
#[tokio::test]
async fn early_hints_reach_http1_clients_before_the_final_response() -> anyhow::Result<()> {
    let (origin, _) = interim_origin(early_hints, Duration::from_millis(800)).await?;
    let edge = Edge::start(&basic_config(&[format!("http://{origin}")], ""))?;
    let mut s = TcpStream::connect(edge.http()).await?;
    let start = Instant::now();
    s.write_all(b"GET /page HTTP/1.1\r\nHost: h.test\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n", Duration::from_secs(5)).await?;
    let early = start.elapsed();
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 103 early hints\r\n"),
        "the interim head comes first: {text:?}"
    );
    assert!(
        text.contains("link: </page.css>; rel=preload\r\n"),
        "{text:?}"
    );
    assert!(
        !text.contains("connection:"),
        "hop-by-hop fields stay behind: {text:?}"
    );
    assert!(
        !text.contains("200 ok"),
        "before the final response: {text:?}"
    );
    assert!(
        early < Duration::from_millis(700),
        "the hints arrive while the origin works ({early:?})"
    );
    read_until(&mut s, &mut buf, b"\r\n\r\n/page", Duration::from_secs(5)).await?;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let fin = &text[text.find("http/1.1 200").expect("a final 200")..];
    assert!(
        !fin.contains("link:"),
        "no interim field in the final head: {fin:?}"
    );

    // The hit on the same connection has no interim head: only the final
    // response was stored.
    buf.clear();
    s.write_all(b"GET /page HTTP/1.1\r\nHost: h.test\r\n\r\n")
        .await?;
    read_until(&mut s, &mut buf, b"\r\n\r\n/page", Duration::from_secs(5)).await?;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text:?}");
    assert!(text.contains("cache-status: meridian; hit"), "{text:?}");
    assert!(!text.contains("link:"), "{text:?}");

    // Pipelined requests: each interim head comes right before its own
    // final response, and the stream stays in order.
    let mut s = TcpStream::connect(edge.http()).await?;
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: h.test\r\n\r\nGET /p2 HTTP/1.1\r\nHost: h.test\r\n\r\n",
    )
    .await?;
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n/p2", Duration::from_secs(10)).await?;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let order: Vec<usize> = [
        "http/1.1 103 early hints\r\nlink: </p1.css>",
        "\r\n\r\n/p1",
        "http/1.1 103 early hints\r\nlink: </p2.css>",
        "\r\n\r\n/p2",
    ]
    .iter()
    .map(|n| text.find(n).unwrap_or(usize::MAX))
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]) && order[3] != usize::MAX,
        "in order: {text:?}"
    );

    // HTTP/2 clients get the final response (hyper's HTTP/2 server cannot
    // send interim responses).
    let r = Conn::plain(edge.http(), true)
        .await?
        .send(get("h.test", "/h2"))
        .await?;
    assert_eq!((r.status, r.text()), (200, "/h2".to_string()));
    Ok(())
}

/// Over HTTP/3 the origin's 103 is an interim HEADERS frame before the
/// final response (RFC 9114 §4.1), without connection-specific fields, and
/// a hit has none.
#[tokio::test]
async fn early_hints_reach_http3_clients_as_interim_headers() -> anyhow::Result<()> {
    let (origin, _) = interim_origin(early_hints, Duration::from_millis(300)).await?;
    let dir = meridian_e2e::certs::TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&basic_config(&[format!("http://{origin}")], &pki.config()))?;
    let mut c =
        meridian_e2e::client::H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
    let r = c
        .send("GET", "a.test", "/h3page", bytes::Bytes::new())
        .await?;
    assert_eq!((r.status, r.text()), (200, "/h3page".to_string()));
    assert!(
        r.header("link").is_none(),
        "no interim field in the final head"
    );
    assert_eq!(c.interim.len(), 1, "{:?}", c.interim);
    let (status, h) = &c.interim[0];
    assert_eq!(*status, 103);
    assert_eq!(
        h.get("link").and_then(|v| v.to_str().ok()),
        Some("</h3page.css>; rel=preload")
    );
    assert!(h.get("connection").is_none());
    let r = c
        .send("GET", "a.test", "/h3page", bytes::Bytes::new())
        .await?;
    assert!(is_hit(&r), "{}", cache_status(&r));
    assert!(c.interim.is_empty(), "a hit has no interim response");
    Ok(())
}
