//! Operations: check, reload, certificate hot reload, drain, zero-downtime
//! upgrade, the admin API, the demo and the one-line mode.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{Conn, get, get_plain, req, req_h2};
use meridian_e2e::harness::{Proc, eventually};
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;

use crate::{Edge, Pki, basic_config, bin, metric};

#[test]
fn check_reports_file_line_and_column() -> anyhow::Result<()> {
    let dir = TempDir::new("check")?;
    let good = dir.path().join("good.toml");
    std::fs::write(&good, basic_config(&["http://127.0.0.1:9".into()], ""))?;
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        basic_config(&["http://127.0.0.1:9".into()], "")
            .replace("pool = \"main\"", "pool = \"nope\""),
    )?;
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}:12:8: sites[0].pool: no pool named \"nope\"",
            bad.display()
        )),
        "{err}"
    );

    std::fs::write(
        &bad,
        "[[listeners]]\naddress = \"127.0.0.1:0\"\nbogus = 1\n",
    )?;
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.starts_with(&format!("{}:3:1:", bad.display())) && err.contains("bogus"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn reload_swaps_the_config_and_refuses_a_bad_one() -> anyhow::Result<()> {
    let a = TestOrigin::start("a").await?;
    let b = TestOrigin::start("b").await?;
    let edge = Edge::start(&basic_config(&[a.url()], ""))?;
    let mut kept = Conn::plain(edge.http(), false).await?;
    assert_eq!(
        kept.send(get("t", "/hello")).await?.header("x-origin"),
        Some("a")
    );
    // The listener address must stay the same: pin it.
    let pinned = |o: &str| {
        basic_config(&[o.to_string()], "").replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{}\"", edge.http()),
        )
    };
    let pinned_admin = |s: String| {
        s.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", edge.admin()),
        )
    };
    edge.rewrite(&pinned_admin(pinned(&b.url())))?;
    edge.signal(Signal::SIGHUP)?;
    let moved = eventually(Duration::from_secs(10), || async {
        get_plain(edge.http(), "t", "/hello")
            .await
            .ok()
            .and_then(|r| r.header("x-origin").map(str::to_string))
            == Some("b".into())
    })
    .await;
    assert!(moved, "reload did not take effect");
    // A connection opened before the reload still works.
    assert_eq!(
        kept.send(get("t", "/hello")).await?.header("x-origin"),
        Some("b")
    );

    // A bad config is refused; the running one keeps serving.
    edge.rewrite("[[listeners]]\naddress = \"127.0.0.1:0\"\nnot_a_key = true\n")?;
    edge.signal(Signal::SIGHUP)?;
    let refused = eventually(Duration::from_secs(10), || async {
        metric(
            &edge.metrics().await.unwrap_or_default(),
            "meridian_config_reloads_total",
            &["refused"],
        ) >= 1.0
    })
    .await;
    assert!(refused);
    assert_eq!(
        get_plain(edge.http(), "t", "/hello")
            .await?
            .header("x-origin"),
        Some("b")
    );
    // The admin API says why.
    let r = Conn::plain(edge.admin(), false)
        .await?
        .send(req("POST", "admin", "/reload", ""))
        .await?;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("edge.toml:3:1:"), "{}", r.text());
    Ok(())
}

#[tokio::test]
async fn certificates_reload_without_restart() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let cfg = format!(
        "{}\n[tls]\nwatch_interval = \"200ms\"\n",
        basic_config(&[origin.url()], &pki.config())
    );
    let edge = Edge::start(&cfg)?;
    let tls_c = pki.tls("c.test", &["h2"])?;
    assert!(
        Conn::tls(edge.https(), &tls_c).await.is_err(),
        "no certificate for c.test yet"
    );
    // An existing connection survives the swap.
    let mut kept = Conn::tls(edge.https(), &pki.tls("a.test", &["h2"])?).await?;
    // Replace a.test's files with a certificate for both a.test and c.test.
    let tmp = TempDir::new("newcert")?;
    let leaf = pki.ca.leaf(tmp.path(), "ac", &["a.test", "c.test"])?;
    std::fs::copy(&leaf.key, &pki.a.key)?;
    std::fs::copy(&leaf.cert, &pki.a.cert)?;
    let ok = eventually(Duration::from_secs(10), || async {
        Conn::tls(edge.https(), &tls_c).await.is_ok()
    })
    .await;
    assert!(ok, "the new certificate was never served");
    assert_eq!(
        kept.send(req_h2("GET", "https", "a.test", "/hello", ""))
            .await?
            .status,
        200
    );
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_certificate_reloads_total", &["ok"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge_cfg = basic_config(&[origin.url()], "")
        .replace("[log]", "[server]\ndrain_delay = \"500ms\"\n\n[log]");
    let mut edge = Edge::start(&edge_cfg)?;
    let http = edge.http();
    let admin = edge.admin();
    let inflight = tokio::spawn(async move { get_plain(http, "t", "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.signal(Signal::SIGTERM)?;
    // During the drain delay, /readyz answers 503 and /healthz 200.
    let not_ready = eventually(Duration::from_secs(2), || async {
        get_plain(admin, "admin", "/readyz")
            .await
            .map(|r| r.status)
            .unwrap_or(0)
            == 503
    })
    .await;
    assert!(not_ready, "/readyz did not turn 503 on SIGTERM");
    assert_eq!(get_plain(admin, "admin", "/healthz").await?.status, 200);
    let r = inflight.await??;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "slow"),
        "the in-flight request finished"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = edge.wait_exit(Duration::from_secs(10));
        (s, edge)
    })
    .await?;
    let exit = status
        .0?
        .ok_or_else(|| anyhow::anyhow!("edge did not exit"))?;
    assert!(exit.success(), "{exit:?}");
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "still accepting after exit"
    );
    Ok(())
}

/// The upgrade is lossless only with `net.ipv4.tcp_migrate_req=1` (Linux
/// 5.14+): without it, connections queued on the old listener when it closes
/// are reset. tests/run.sh sets it; so does this test when it may.
fn ensure_tcp_migrate_req() -> anyhow::Result<()> {
    const P: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    let v =
        std::fs::read_to_string(P).map_err(|e| anyhow::anyhow!("{P}: {e} (needs Linux 5.14+)"))?;
    if v.trim() == "1" || std::fs::write(P, "1").is_ok() {
        return Ok(());
    }
    anyhow::bail!(
        "net.ipv4.tcp_migrate_req is 0 and cannot be set here: run `sysctl -w net.ipv4.tcp_migrate_req=1` as root (tests/run.sh does)"
    )
}

#[tokio::test]
async fn zero_downtime_upgrade_with_reuseport() -> anyhow::Result<()> {
    ensure_tcp_migrate_req()?;
    let origin = TestOrigin::start("o").await?;
    let old = Edge::start(
        &basic_config(&[origin.url()], "")
            .replace("[log]", "[server]\ndrain_delay = \"300ms\"\n\n[log]"),
    )?;
    let http = old.http();
    // The new process binds the same port while the old one still listens.
    let cfg = basic_config(&[origin.url()], "")
        .replacen(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{http}\""),
            1,
        )
        .replace(
            "[log]\naccess_log = \"stdout\"",
            "[log]\naccess_log = \"off\"",
        );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        loops.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match get_plain(http, "t", "/hello").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("upgrade loop failure: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = Edge::start(&cfg)?;
    assert_eq!(new.http(), http);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ok.load(Ordering::Relaxed);
    old.signal(Signal::SIGTERM)?;
    let mut old = old;
    let exited = tokio::task::spawn_blocking(move || {
        old.wait_exit(Duration::from_secs(15)).map(|s| (s, old))
    })
    .await??;
    assert!(
        exited.0.is_some_and(|s| s.success()),
        "the old process did not exit cleanly"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed requests of {}", ok + failed);
    assert!(
        ok > before && before > 0,
        "the loop ran across the swap ({before} then {ok})"
    );
    assert_eq!(get_plain(new.http(), "t", "/hello").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn admin_token_config_redaction_and_access_log() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = basic_config(&[origin.url()], "")
        .replace("[admin]\n", "[admin]\ntoken = \"s3cret-token\"\n");
    let edge = Edge::start(&cfg)?;
    assert_eq!(
        get_plain(edge.admin(), "admin", "/healthz").await?.status,
        200
    );
    assert_eq!(
        get_plain(edge.admin(), "admin", "/metrics").await?.status,
        401
    );
    let mut authed = get("admin", "/config");
    authed
        .headers_mut()
        .insert("authorization", "Bearer s3cret-token".parse()?);
    let r = Conn::plain(edge.admin(), false).await?.send(authed).await?;
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("<redacted>") && !r.text().contains("s3cret-token"),
        "{}",
        r.text()
    );
    // POST /drain flips readiness; /undrain flips it back.
    let mut drain = req("POST", "admin", "/drain", "");
    drain
        .headers_mut()
        .insert("authorization", "Bearer s3cret-token".parse()?);
    assert_eq!(
        Conn::plain(edge.admin(), false)
            .await?
            .send(drain)
            .await?
            .status,
        200
    );
    assert_eq!(
        get_plain(edge.admin(), "admin", "/readyz").await?.status,
        503
    );
    let mut undrain = req("POST", "admin", "/undrain", "");
    undrain
        .headers_mut()
        .insert("authorization", "Bearer s3cret-token".parse()?);
    assert_eq!(
        Conn::plain(edge.admin(), false)
            .await?
            .send(undrain)
            .await?
            .status,
        200
    );
    assert_eq!(
        get_plain(edge.admin(), "admin", "/readyz").await?.status,
        200
    );
    // The access log: one JSON object per request, on stdout.
    assert_eq!(
        get_plain(edge.http(), "logged.test", "/hello?q=1")
            .await?
            .status,
        200
    );
    let found = eventually(Duration::from_secs(5), || async {
        !edge.lines_with("logged.test").is_empty()
    })
    .await;
    assert!(found, "no access log line");
    let line = edge.lines_with("logged.test").remove(0);
    let j: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(j["status"], 200);
    assert_eq!(j["path"], "/hello?q=1");
    assert_eq!(j["proto"], "h1");
    assert_eq!(j["bytes_out"], 5);
    assert_eq!(j["complete"], true);
    assert!(
        j["origin"]
            .as_str()
            .is_some_and(|o| o.contains(&origin.addr.to_string()))
    );
    Ok(())
}

#[tokio::test]
async fn demo_starts_and_answers() -> anyhow::Result<()> {
    meridian_e2e::init();
    let demo = Proc::start(
        bin(),
        &[
            "demo",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        "meridian-edge",
    )?;
    let r = get_plain(demo.http(), "localhost", "/").await?;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Meridian demo"));
    assert_eq!(
        get_plain(demo.http(), "localhost", "/api/items")
            .await?
            .json()?["count"],
        3
    );
    // Over TLS with the generated localhost certificate (not verified here;
    // the interop test checks TLS against a CA with curl).
    let r = get_plain(demo.admin(), "admin", "/readyz").await?;
    assert_eq!(r.status, 200);
    // The demo caches: a miss, then a hit.
    let first = get_plain(demo.http(), "localhost", "/cache/public").await?;
    assert!(
        first
            .header("cache-status")
            .is_some_and(|c| c.contains("fwd=uri-miss")),
        "{:?}",
        first.header("cache-status")
    );
    let hit = eventually(Duration::from_secs(5), || async {
        get_plain(demo.http(), "localhost", "/cache/public")
            .await
            .is_ok_and(|r| {
                r.header("cache-status")
                    .is_some_and(|c| c.starts_with("meridian; hit"))
            })
    })
    .await;
    assert!(hit, "the demo never served /cache/public from the cache");
    let png = get_plain(demo.http(), "localhost", "/img/logo.png").await?;
    assert!(png.body.starts_with(b"\x89PNG"));
    assert_eq!(png.header("content-type"), Some("image/png"));
    Ok(())
}

#[tokio::test]
async fn one_line_proxy_mode_and_its_config_equivalent() -> anyhow::Result<()> {
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
    assert_eq!(get_plain(p.http(), "t", "/hello").await?.text(), "hello");
    let out = Command::new(bin())
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--origin",
            &url,
            "--cache-dir",
            "/var/cache/meridian-test",
            "--print-config",
        ])
        .output()?;
    assert!(out.status.success());
    let dir = TempDir::new("oneline")?;
    let f = dir.path().join("printed.toml");
    std::fs::write(&f, &out.stdout)?;
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("[cache]\ndisk_dir = \"/var/cache/meridian-test\"")
    );
    let check = Command::new(bin())
        .args(["check", "--config"])
        .arg(&f)
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn systemd_notify_ready_reloading_stopping() -> anyhow::Result<()> {
    meridian_e2e::init();
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("notify")?;
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, basic_config(&[origin.url()], ""))?;
    let sock_env = sock_path.display().to_string();
    let cfg_arg = cfg.display().to_string();
    let mut edge = Proc::start_env(
        bin(),
        &["run", "--config", &cfg_arg],
        "meridian-edge",
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "400000")],
    )?;
    let mut buf = [0u8; 512];
    let mut recv_until = |want: &str| -> anyhow::Result<Vec<String>> {
        let mut seen = Vec::new();
        for _ in 0..100 {
            let n = sock
                .recv(&mut buf)
                .map_err(|e| anyhow::anyhow!("waiting for {want}: {e}; seen {seen:?}"))?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return Ok(seen);
            }
        }
        anyhow::bail!("never saw {want}: {seen:?}")
    };
    recv_until("READY=1")?;
    recv_until("WATCHDOG=1")?;
    edge.signal(Signal::SIGHUP)?;
    let seen = recv_until("RELOADING=1")?;
    assert!(
        seen.last().is_some_and(|m| m.contains("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    recv_until("READY=1")?;
    edge.signal(Signal::SIGTERM)?;
    recv_until("STOPPING=1")?;
    assert!(
        edge.wait_exit(Duration::from_secs(10))?
            .is_some_and(|s| s.success())
    );
    Ok(())
}

#[tokio::test]
async fn readyz_fails_while_overloaded() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = basic_config(&[origin.url()], "")
        .replace("[log]", "[server]\noverload_connections = 2\n\n[log]");
    let edge = Edge::start(&cfg)?;
    assert_eq!(
        get_plain(edge.admin(), "admin", "/readyz").await?.status,
        200
    );
    // Two idle client connections reach the overload mark.
    let _c1 = tokio::net::TcpStream::connect(edge.http()).await?;
    let _c2 = tokio::net::TcpStream::connect(edge.http()).await?;
    let over = eventually(Duration::from_secs(5), || async {
        get_plain(edge.admin(), "admin", "/readyz")
            .await
            .map(|r| r.status == 503 && r.text() == "overloaded\n")
            .unwrap_or(false)
    })
    .await;
    assert!(over, "/readyz did not report overload");
    drop((_c1, _c2));
    let ok = eventually(Duration::from_secs(5), || async {
        get_plain(edge.admin(), "admin", "/readyz")
            .await
            .map(|r| r.status == 200)
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "/readyz did not recover");
    Ok(())
}

/// The `THP_enabled` line of a process's /proc status (Linux 6.x).
fn thp_enabled(pid: u32) -> anyhow::Result<Option<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string()))
}

/// The edge turns transparent huge pages off for itself (a 2 MiB region with
/// one live page is otherwise wholly resident; docs/soak-chaos.md), unless
/// `MERIDIAN_ALLOW_THP` (or mimalloc's `MIMALLOC_ALLOW_THP`) is set.
#[test]
fn transparent_huge_pages_are_off_unless_allowed() -> anyhow::Result<()> {
    let edge = Edge::start(&basic_config(&["http://127.0.0.1:9".into()], ""))?;
    let off = thp_enabled(edge.proc.proc_id())?;
    anyhow::ensure!(
        off.is_some(),
        "this kernel's /proc/PID/status has no THP_enabled line: the check cannot run"
    );
    assert_eq!(
        off.as_deref(),
        Some("0"),
        "the default edge runs without THP"
    );
    drop(edge);

    let dir = TempDir::new("thp")?;
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, basic_config(&["http://127.0.0.1:9".into()], ""))?;
    let cfg = cfg.to_str().ok_or_else(|| anyhow::anyhow!("path"))?;
    for switch in ["MERIDIAN_ALLOW_THP", "MIMALLOC_ALLOW_THP"] {
        let on = Proc::start_env(
            bin(),
            &["run", "--config", cfg],
            "meridian-edge",
            &[(switch, "1")],
        )?;
        assert_eq!(
            thp_enabled(on.proc_id())?.as_deref(),
            Some("1"),
            "{switch}=1 keeps transparent huge pages"
        );
    }
    Ok(())
}

/// jemalloc's byte counts are on the admin listener, read at each scrape:
/// caching 96 objects of 64 KiB raises `allocated` by about their size, and
/// the counts keep jemalloc's order (allocated ≤ active ≤ resident, mapped).
#[tokio::test]
async fn allocator_statistics_follow_the_heap() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&basic_config(
        &[origin.url()],
        "[sites.cache]\nenabled = true",
    ))?;
    let bytes = |m: &str, stat: &str| {
        metric(
            m,
            "meridian_allocator_bytes",
            &[&format!("stat=\"{stat}\"")],
        )
    };
    let before = edge.metrics().await?;
    let a0 = bytes(&before, "allocated");
    assert!(a0 > 0.0, "no allocator statistics:\n{before}");
    const N: usize = 96;
    const SIZE: usize = 64 * 1024;
    for n in 0..N {
        let path = format!("/cc/alloc-{n}?cc=public,max-age=3600&size={SIZE}&seed=3");
        let r = get_plain(edge.http(), "a.test", &path).await?;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body.len(), SIZE, "{path}");
    }
    // The cached bodies stay allocated; the connections and buffers of the
    // requests are gone.
    let after = edge.metrics().await?;
    let grew = bytes(&after, "allocated") - a0;
    assert!(
        grew >= (N * SIZE) as f64 * 0.8,
        "allocated grew {grew} bytes for {} bytes of cached bodies",
        N * SIZE
    );
    let (allocated, active, resident, mapped) = (
        bytes(&after, "allocated"),
        bytes(&after, "active"),
        bytes(&after, "resident"),
        bytes(&after, "mapped"),
    );
    // jemalloc's definitions: active counts whole pages of live objects;
    // resident and mapped both cover the active pages (resident adds dirty
    // pages and metadata, so neither bounds the other).
    assert!(
        allocated <= active && active <= resident && active <= mapped,
        "allocated {allocated}, active {active}, resident {resident}, mapped {mapped}"
    );
    Ok(())
}
