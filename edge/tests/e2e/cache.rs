//! The cache through real sockets: a test origin that counts what reaches it.

use std::time::{Duration, Instant};

use meridian_e2e::client::{Conn, get, get_plain, req};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;

use crate::{Edge, basic_config, metric};

fn config(origin: &TestOrigin, extra: &str) -> String {
    format!(
        "{}\n[pools.main.retry]\nattempts = 1\n[pools.main.passive]\nmax_failures = 0\n{extra}",
        basic_config(&[origin.url()], "")
    )
}

async fn fetch(edge: &Edge, path: &str) -> anyhow::Result<meridian_e2e::client::Resp> {
    get_plain(edge.http(), "cache.test", path).await
}

async fn fetch_with(
    edge: &Edge,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<meridian_e2e::client::Resp> {
    let mut r = get("cache.test", path);
    for (k, v) in headers {
        r.headers_mut()
            .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    Conn::plain(edge.http(), false).await?.send(r).await
}

fn status_of(r: &meridian_e2e::client::Resp) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

#[tokio::test]
async fn miss_then_hit_with_age_and_cache_status() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/a?cc=max-age%3D60";
    let r1 = fetch(&edge, path).await?;
    assert_eq!(r1.status, 200);
    assert_eq!(
        status_of(&r1),
        "meridian; fwd=uri-miss; fwd-status=200; stored"
    );
    let hit = eventually(Duration::from_secs(5), || async {
        fetch(&edge, path)
            .await
            .map(|r| status_of(&r).starts_with("meridian; hit"))
            .unwrap_or(false)
    })
    .await;
    assert!(hit, "second request was not a hit");
    let r2 = fetch(&edge, path).await?;
    assert!(
        status_of(&r2).starts_with("meridian; hit; ttl="),
        "{}",
        status_of(&r2)
    );
    assert_eq!(r2.body, r1.body, "the hit serves the stored body");
    assert!(r2.header("age").is_some());
    assert_eq!(origin.count("/cc/a").await, 1);
    // HEAD is answered from the GET entry.
    let h = Conn::plain(edge.http(), false)
        .await?
        .send(req("HEAD", "cache.test", path, ""))
        .await?;
    assert_eq!(
        h.header("content-length"),
        Some(r1.body.len().to_string().as_str())
    );
    assert!(h.body.is_empty() && status_of(&h).starts_with("meridian; hit"));
    assert_eq!(origin.count("/cc/a").await, 1);
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_cache_requests_total", &["result=\"hit\""]) >= 2.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn uncacheable_responses_pass_and_are_not_serialized() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    for cc in ["private", "no-store"] {
        let path = format!("/cc/{cc}?cc={cc}");
        for _ in 0..2 {
            let r = fetch(&edge, &path).await?;
            assert!(status_of(&r).contains("fwd=uri-miss"), "{}", status_of(&r));
        }
        assert_eq!(origin.count(&format!("/cc/{cc}")).await, 2);
    }
    // 20 concurrent requests for a slow uncacheable URL run in parallel
    // (hit-for-pass), not one after another.
    fetch(&edge, "/cc/slowpriv?cc=private&delay=300").await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let http = edge.http();
        tasks.push(tokio::spawn(async move {
            get_plain(http, "cache.test", "/cc/slowpriv?cc=private&delay=300").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await??.status, 200);
    }
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "uncacheable requests were serialized: {:?}",
        start.elapsed()
    );
    assert_eq!(origin.count("/cc/slowpriv").await, 21);
    Ok(())
}

#[tokio::test]
async fn concurrent_misses_make_one_origin_request() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let http = edge.http();
        tasks.push(tokio::spawn(async move {
            get_plain(http, "cache.test", "/cc/hot?cc=max-age%3D60&delay=500").await
        }));
    }
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await??;
        assert_eq!(r.status, 200);
        bodies.insert(r.body);
    }
    assert_eq!(
        origin.count("/cc/hot").await,
        1,
        "100 concurrent misses, one origin fetch"
    );
    assert_eq!(bodies.len(), 1);
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_cache_coalesced_waiters_total", &[]) >= 90.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn vary_keeps_variants_apart() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/v?cc=max-age%3D60&vary=Accept-Language";
    let en = fetch_with(&edge, path, &[("accept-language", "en")]).await?;
    assert!(status_of(&en).contains("fwd=uri-miss"));
    let fr = fetch_with(&edge, path, &[("accept-language", "fr")]).await?;
    assert!(
        status_of(&fr).contains("fwd=vary-miss"),
        "{}",
        status_of(&fr)
    );
    assert_ne!(en.body, fr.body);
    let en2 = fetch_with(&edge, path, &[("accept-language", "EN")]).await?;
    assert!(
        status_of(&en2).starts_with("meridian; hit"),
        "normalised value matches: {}",
        status_of(&en2)
    );
    assert_eq!(en2.body, en.body);
    assert_eq!(origin.count("/cc/v").await, 2);
    Ok(())
}

#[tokio::test]
async fn revalidation_and_client_conditionals() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    // max-age=3: ages are whole seconds and an origin's Date may lag by up
    // to a second, so a shorter lifetime can be over at the first hit.
    let path = "/cc/r?cc=max-age%3D3&etag=%22v1%22";
    let r1 = fetch(&edge, path).await?;
    assert_eq!(r1.header("etag"), Some("\"v1\""));
    // The client's If-None-Match is answered 304 from the cache.
    let c = fetch_with(&edge, path, &[("if-none-match", "\"v1\"")]).await?;
    assert_eq!(c.status, 304);
    assert!(
        status_of(&c).starts_with("meridian; hit"),
        "{}",
        status_of(&c)
    );
    assert_eq!(origin.count("/cc/r").await, 1);
    // Once stale, the stored validator revalidates it: the origin answers 304.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let r2 = fetch(&edge, path).await?;
    assert_eq!(r2.status, 200);
    assert_eq!(status_of(&r2), "meridian; fwd=stale; fwd-status=304");
    assert_eq!(r2.body, r1.body);
    assert_eq!(origin.count("/cc/r").await, 2);
    let last = origin.stats.last_headers.lock().await.clone();
    assert!(
        last.iter()
            .any(|(k, v)| k == "if-none-match" && v == "\"v1\""),
        "{last:?}"
    );
    // Freshened by the 304: a hit again.
    assert!(status_of(&fetch(&edge, path).await?).starts_with("meridian; hit"));
    Ok(())
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_in_the_background() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D60&delay=400";
    let r1 = fetch(&edge, path).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Ten concurrent requests for the stale object: all served at once, from the cache...
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let http = edge.http();
        tasks.push(tokio::spawn(async move {
            get_plain(http, "cache.test", path).await
        }));
    }
    for t in tasks {
        let r = t.await??;
        assert!(
            status_of(&r).contains("detail=stale-while-revalidate"),
            "{}",
            status_of(&r)
        );
        assert_eq!(r.body, r1.body);
    }
    assert!(
        start.elapsed() < Duration::from_millis(390),
        "stale was not served at once: {:?}",
        start.elapsed()
    );
    // ...and exactly one background revalidation reaches the origin.
    let refreshed = eventually(Duration::from_secs(5), || async {
        origin.count("/cc/swr").await >= 2
    })
    .await;
    assert!(
        refreshed,
        "the background revalidation never reached the origin"
    );
    assert_eq!(
        origin.count("/cc/swr").await,
        2,
        "one revalidation for ten stale hits"
    );
    let served = eventually(Duration::from_millis(800), || async {
        fetch(&edge, path)
            .await
            .map(|r| r.body != r1.body)
            .unwrap_or(false)
    })
    .await;
    assert!(served, "the refreshed response was never served");
    Ok(())
}

#[tokio::test]
async fn stale_if_error_when_the_origin_is_down_or_failing() -> anyhow::Result<()> {
    let mut origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/sie?cc=max-age%3D1%2C%20stale-if-error%3D300";
    let r1 = fetch(&edge, path).await?;
    // A 503 from the origin: the stale object is served instead.
    let failing = "/cc/sie503?cc=max-age%3D1%2C%20stale-if-error%3D300";
    let f1 = fetch(&edge, failing).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    origin.stop();
    let r2 = fetch(&edge, path).await?;
    assert_eq!(r2.status, 200);
    assert_eq!(r2.body, r1.body);
    assert!(
        status_of(&r2).contains("detail=stale-if-error"),
        "{}",
        status_of(&r2)
    );
    // Without stale-if-error, a stopped origin is a 502.
    assert_eq!(fetch(&edge, "/cc/none?cc=max-age%3D1").await?.status, 502);
    let _ = f1;
    Ok(())
}

#[tokio::test]
async fn per_site_stale_defaults_apply_when_the_origin_sends_none() -> anyhow::Result<()> {
    let mut origin = TestOrigin::start("o").await?;
    let cfg = config(&origin, "").replace(
        "pool = \"main\"",
        "pool = \"main\"\n[sites.cache]\nstale_if_error = \"5m\"",
    );
    let edge = Edge::start(&cfg)?;
    let path = "/cc/grace?cc=max-age%3D1";
    let r1 = fetch(&edge, path).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    origin.stop();
    let r2 = fetch(&edge, path).await?;
    assert_eq!((r2.status, r2.body.clone()), (200, r1.body));
    assert!(status_of(&r2).contains("stale-if-error"));
    Ok(())
}

#[tokio::test]
async fn purge_by_url_tag_prefix_host_soft_and_method() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let paths = [
        "/cc/p1?cc=max-age%3D60&tag=red%20blue",
        "/cc/p2?cc=max-age%3D60&tag=blue",
        "/cc/dir/p3?cc=max-age%3D60",
        "/cc/dir/p4?cc=max-age%3D60",
    ];
    for p in paths {
        fetch(&edge, p).await?;
    }
    let is_hit = |p: &'static str| {
        let edge = &edge;
        async move { status_of(&fetch(edge, p).await.expect("fetch")).starts_with("meridian; hit") }
    };
    for p in paths {
        assert!(
            eventually(Duration::from_secs(5), || is_hit(p)).await,
            "{p} never became a hit"
        );
    }
    // Tags are stripped from what clients see.
    assert!(
        fetch(&edge, paths[0])
            .await?
            .header("surrogate-key")
            .is_none()
    );
    let purge = |body: String| {
        let admin = edge.admin();
        async move {
            let r = Conn::plain(admin, false)
                .await?
                .send(req("POST", "admin", "/purge?wait", body))
                .await?;
            anyhow::ensure!(r.status == 200, "purge failed: {} {}", r.status, r.text());
            r.json()
        }
    };
    let j = purge(r#"{"tags":["blue"]}"#.into()).await?;
    assert_eq!(j["purged"], 2, "{j}");
    assert!(!is_hit(paths[0]).await && !is_hit(paths[1]).await);
    let j = purge(r#"{"prefixes":["http://cache.test/cc/dir/"]}"#.into()).await?;
    assert_eq!(j["purged"], 2, "{j}");
    assert!(status_of(&fetch(&edge, paths[2]).await?).contains("fwd=uri-miss"));
    // URL purge, with the query as the client sent it.
    assert!(eventually(Duration::from_secs(5), || is_hit(paths[2])).await);
    let j = purge(format!(r#"{{"urls":["http://cache.test{}"]}}"#, paths[2])).await?;
    assert_eq!(j["purged"], 1, "{j}");
    // Soft purge: stale, not gone; revalidated on next use.
    assert!(eventually(Duration::from_secs(5), || is_hit(paths[3])).await);
    let j = purge(format!(
        r#"{{"urls":["http://cache.test{}"], "soft": true}}"#,
        paths[3]
    ))
    .await?;
    assert_eq!(j["purged"], 1, "{j}");
    let r = fetch(&edge, paths[3]).await?;
    assert!(status_of(&r).contains("fwd=stale"), "{}", status_of(&r));
    // Host purge.
    assert!(eventually(Duration::from_secs(5), || is_hit(paths[3])).await);
    let j = purge(r#"{"hosts":["cache.test"]}"#.into()).await?;
    assert!(j["purged"].as_u64().unwrap_or(0) >= 1, "{j}");
    // The PURGE method from an allowed network (loopback is allowed by default).
    fetch(&edge, paths[1]).await?;
    assert!(eventually(Duration::from_secs(5), || is_hit(paths[1])).await);
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("PURGE", "cache.test", paths[1], ""))
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(status_of(&fetch(&edge, paths[1]).await?).contains("fwd=uri-miss"));
    // Bad purge bodies are refused.
    let r = Conn::plain(edge.admin(), false)
        .await?
        .send(req("POST", "admin", "/purge", "{\"bogus\":1}"))
        .await?;
    assert_eq!(r.status, 400);
    Ok(())
}

#[tokio::test]
async fn purge_method_is_refused_from_other_networks() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(
        &origin,
        "[cache]\npurge_allow = [\"10.0.0.0/8\"]\n",
    ))?;
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("PURGE", "cache.test", "/cc/x", ""))
        .await?;
    assert_eq!(r.status, 403);
    Ok(())
}

#[tokio::test]
async fn unsafe_methods_invalidate() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/inv?cc=max-age%3D60";
    fetch(&edge, path).await?;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&fetch(&edge, path).await.expect("fetch")).starts_with("meridian; hit")
        })
        .await
    );
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("POST", "cache.test", path, "x"))
        .await?;
    assert_eq!(r.status, 200);
    assert!(status_of(&fetch(&edge, path).await?).contains("fwd=uri-miss"));
    Ok(())
}

#[tokio::test]
async fn ranges_from_cache_and_on_miss() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    let path = "/cc/big?cc=max-age%3D60&size=10000";
    let full: Vec<u8> = (0..10000).map(|i| (i % 251) as u8).collect();
    // A miss with Range: the whole object is fetched and stored; the range is served.
    let r = fetch_with(&edge, path, &[("range", "bytes=100-199")]).await?;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/10000"));
    assert_eq!(&r.body[..], &full[100..200]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&fetch(&edge, path).await.expect("fetch")).starts_with("meridian; hit")
        })
        .await
    );
    let r = fetch_with(&edge, path, &[("range", "bytes=-50")]).await?;
    assert_eq!((r.status, &r.body[..]), (206, &full[9950..]));
    let r = fetch_with(&edge, path, &[("range", "bytes=0-9,20-29")]).await?;
    assert_eq!(r.status, 206);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("multipart/byteranges; boundary="))
    );
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("Content-Range: bytes 0-9/10000")
            && text.contains("Content-Range: bytes 20-29/10000")
    );
    let r = fetch_with(&edge, path, &[("range", "bytes=20000-")]).await?;
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */10000"))
    );
    assert_eq!(origin.count("/cc/big").await, 1);
    Ok(())
}

#[tokio::test]
async fn large_objects_are_chunked_and_served_whole() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, "[cache]\nchunk_size = \"64KiB\"\n"))?;
    let path = "/cc/huge?cc=max-age%3D60&size=1000000";
    let full: Vec<u8> = (0..1_000_000).map(|i| (i % 251) as u8).collect();
    assert_eq!(&fetch(&edge, path).await?.body[..], &full[..]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&fetch(&edge, path).await.expect("fetch")).starts_with("meridian; hit")
        })
        .await
    );
    let r = fetch(&edge, path).await?;
    assert_eq!(r.body.len(), full.len());
    assert!(
        r.body[..] == full[..],
        "the chunked hit has the right bytes"
    );
    let r = fetch_with(&edge, path, &[("range", "bytes=65530-131080")]).await?;
    assert_eq!(
        &r.body[..],
        &full[65530..=131080],
        "a range across chunk boundaries"
    );
    assert_eq!(origin.count("/cc/huge").await, 1);
    Ok(())
}

#[tokio::test]
async fn cdn_cache_control_overrides_cache_control() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin, ""))?;
    // Cache-Control says no-store to browsers; CDN-Cache-Control lets the CDN cache.
    let path = "/cc/cdn?cc=no-store&cdncc=max-age%3D60";
    fetch(&edge, path).await?;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&fetch(&edge, path).await.expect("fetch")).starts_with("meridian; hit")
        })
        .await
    );
    let r = fetch(&edge, path).await?;
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "Cache-Control passes through to the client"
    );
    assert_eq!(origin.count("/cc/cdn").await, 1);
    Ok(())
}

fn disk_config(origin: &TestOrigin, dir: &std::path::Path, extra: &str) -> String {
    let cfg = config(
        origin,
        &format!(
            "[cache]\nmemory = \"8MiB\"\ndisk = \"64MiB\"\ndisk_dir = \"{}\"\n{extra}",
            dir.join("cache").display()
        ),
    );
    // Keep the edge's port across restarts of the test.
    cfg
}

#[tokio::test]
async fn disk_tier_survives_restart_and_kill_9_and_purges_stick() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("disk")?;
    let cfg = disk_config(&origin, dir.path(), "");
    let paths = [
        "/cc/d1?cc=max-age%3D600",
        "/cc/d2?cc=max-age%3D600",
        "/cc/d3?cc=max-age%3D600",
    ];
    let hit = |edge: &Edge, p: &'static str| {
        let http = edge.http();
        async move {
            get_plain(http, "cache.test", p)
                .await
                .map(|r| status_of(&r).starts_with("meridian; hit"))
                .unwrap_or(false)
        }
    };
    let mut edge = Edge::start(&cfg)?;
    let mut bodies = Vec::new();
    for p in paths {
        bodies.push(fetch(&edge, p).await?.body);
        assert!(
            eventually(Duration::from_secs(5), || hit(&edge, p)).await,
            "{p}"
        );
    }
    // Purge d3: it must stay purged after the restart.
    let r = Conn::plain(edge.admin(), false)
        .await?
        .send(req(
            "POST",
            "admin",
            "/purge?wait",
            r#"{"urls":["http://cache.test/cc/d3?cc=max-age%3D600"]}"#,
        ))
        .await?;
    assert_eq!(r.json()?["purged"], 1);
    // A clean restart.
    edge.signal(Signal::SIGTERM)?;
    let (status, mut edge) =
        tokio::task::spawn_blocking(move || (edge.wait_exit(Duration::from_secs(15)), edge))
            .await?;
    assert!(status?.is_some_and(|s| s.success()));
    let _ = &mut edge;
    let edge = Edge::start(&cfg)?;
    for (p, body) in paths[..2].iter().zip(&bodies) {
        let r = fetch(&edge, p).await?;
        assert!(
            status_of(&r).starts_with("meridian; hit"),
            "{p} after restart: {}",
            status_of(&r)
        );
        assert_eq!(&r.body, body, "{p}: the same bytes after restart");
    }
    assert!(
        status_of(&fetch(&edge, paths[2]).await?).contains("fwd=uri-miss"),
        "a purge survives restart"
    );
    assert_eq!(origin.count("/cc/d1").await, 1);
    // Store one more, then kill -9 (no shutdown at all).
    let p4 = "/cc/d4?cc=max-age%3D600";
    let b4 = fetch(&edge, p4).await?.body;
    assert!(eventually(Duration::from_secs(5), || hit(&edge, p4)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    edge.signal(Signal::SIGKILL)?;
    let mut edge = edge;
    let _ = tokio::task::spawn_blocking(move || edge.wait_exit(Duration::from_secs(10))).await?;
    let edge = Edge::start(&cfg)?;
    let r = fetch(&edge, p4).await?;
    assert!(
        status_of(&r).starts_with("meridian; hit"),
        "after kill -9: {}",
        status_of(&r)
    );
    assert_eq!(r.body, b4);
    assert_eq!(origin.count("/cc/d4").await, 1);
    let stats = get_plain(edge.admin(), "admin", "/cache").await?.json()?;
    assert!(stats["disk"]["hits"].as_u64().unwrap_or(0) >= 1, "{stats}");
    Ok(())
}

#[tokio::test]
async fn corrupt_disk_files_give_misses_never_bad_bodies() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("corrupt")?;
    let cfg = disk_config(&origin, dir.path(), "");
    let edge = Edge::start(&cfg)?;
    let mut want = Vec::new();
    for i in 0..8 {
        let p = format!("/cc/x{i}?cc=max-age%3D600&size=20000");
        want.push((p.clone(), fetch(&edge, &p).await?.body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    edge.signal(Signal::SIGTERM)?;
    let mut edge = edge;
    let _ = tokio::task::spawn_blocking(move || edge.wait_exit(Duration::from_secs(15))).await?;
    // Flip bytes all over the cache's files.
    let mut flipped = 0;
    for entry in walk(&dir.path().join("cache")) {
        let mut data = std::fs::read(&entry)?;
        if data.len() < 64 {
            continue;
        }
        for i in (32..data.len()).step_by(997) {
            data[i] ^= 0x5a;
            flipped += 1;
        }
        std::fs::write(&entry, &data)?;
    }
    assert!(flipped > 0, "no cache files found to corrupt");
    let edge = Edge::start(&cfg)?;
    for (p, body) in &want {
        let r = fetch(&edge, p).await?;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body, body, "{p}: a corrupt entry must never be served");
    }
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn objects_over_max_object_size_stream_uncached_with_bounded_memory() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(
        &origin,
        "[cache]\nmax_object_size = \"64MiB\"\nmemory = \"32MiB\"\n[limits]\nmax_body_bytes = 0\n",
    ))?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.http()).await?;
    s.write_all(b"GET /large?mb=1024&cc=max-age%3D600 HTTP/1.1\r\nHost: cache.test\r\nConnection: close\r\n\r\n").await?;
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
    assert!(total > 1 << 30, "got {total} bytes");
    let peak = crate::peak_rss(edge.proc_id()).unwrap_or(0);
    assert!(
        peak > 0 && peak < 200 << 20,
        "edge peak RSS {} MiB streaming 1 GiB",
        peak >> 20
    );
    let stats = get_plain(edge.admin(), "admin", "/cache").await?.json()?;
    assert_eq!(
        stats["indexed_keys"], 0,
        "the object was not stored: {stats}"
    );
    Ok(())
}

#[tokio::test]
async fn slice_mode_fetches_and_caches_only_the_slices_asked_for() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = config(&origin, "").replace(
        "pool = \"main\"",
        "pool = \"main\"\n[sites.cache]\nslice_size = \"64KiB\"",
    );
    let edge = Edge::start(&cfg)?;
    let path = "/cc/video?cc=max-age%3D600&size=300000&etag=%22v1%22&ranges=1";
    let full: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
    // A range in slice 1: only slice 1 is fetched.
    let r = fetch_with(&edge, path, &[("range", "bytes=100000-100099")]).await?;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 100000-100099/300000")
    );
    assert_eq!(&r.body[..], &full[100_000..100_100]);
    assert_eq!(origin.count("/cc/video").await, 1);
    assert_eq!(
        origin.stats.last_range.lock().await.as_deref(),
        Some("bytes=65536-131071")
    );
    // The same range again: from the cached slice.
    let r = fetch_with(&edge, path, &[("range", "bytes=100000-100099")]).await?;
    assert_eq!(&r.body[..], &full[100_000..100_100]);
    assert!(
        status_of(&r).starts_with("meridian; hit"),
        "{}",
        status_of(&r)
    );
    assert_eq!(origin.count("/cc/video").await, 1);
    // The whole object: the four missing slices are fetched, then all is cached.
    let r = fetch(&edge, path).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("300000"));
    assert!(
        r.body[..] == full[..],
        "the assembled object has the right bytes"
    );
    assert_eq!(origin.count("/cc/video").await, 5);
    let r = fetch(&edge, path).await?;
    assert!(r.body[..] == full[..]);
    assert_eq!(
        origin.count("/cc/video").await,
        5,
        "every slice came from the cache"
    );
    // An origin that ignores Range: the normal path stores the whole object.
    let plain = "/cc/plain?cc=max-age%3D600&size=100000";
    let r = fetch_with(&edge, plain, &[("range", "bytes=10-19")]).await?;
    assert_eq!((r.status, &r.body[..]), (206, &full[10..20]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&fetch(&edge, plain).await.expect("fetch")).starts_with("meridian; hit")
        })
        .await
    );
    assert_eq!(origin.count("/cc/plain").await, 1);
    Ok(())
}

#[tokio::test]
async fn url_purge_removes_slices_too() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = config(&origin, "").replace(
        "pool = \"main\"",
        "pool = \"main\"\n[sites.cache]\nslice_size = \"64KiB\"",
    );
    let edge = Edge::start(&cfg)?;
    let path = "/cc/sliced?cc=max-age%3D600&size=200000&etag=%22v1%22&ranges=1";
    fetch(&edge, path).await?;
    assert_eq!(origin.count("/cc/sliced").await, 4);
    let body = format!(r#"{{"urls":["http://cache.test{path}"]}}"#);
    let j = Conn::plain(edge.admin(), false)
        .await?
        .send(req("POST", "admin", "/purge?wait", body))
        .await?
        .json()?;
    assert_eq!(j["purged"], 4, "{j}");
    fetch(&edge, path).await?;
    assert_eq!(
        origin.count("/cc/sliced").await,
        8,
        "every slice was fetched again"
    );
    Ok(())
}
