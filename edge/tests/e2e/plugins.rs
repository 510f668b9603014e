//! Wasm plugins (proxy-wasm) in the edge's request phase, through real
//! sockets. The plugins are small WAT modules compiled here, and the
//! example `jwt-auth` built by `wasm-plugins/build` (into `wasm-plugins/dist`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{Conn, get, get_plain};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Edge, basic_config, metric, start_logged};

const PRELUDE: &str = r#"
  (import "env" "proxy_get_header_map_value" (func $get_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65536))
      (then (global.set $heap (i32.const 32768))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
"#;

/// Adds `x-added: yes` to every request.
const ADD_HEADER: &str = r#"
  (data (i32.const 0) "x-added")
  (data (i32.const 16) "yes")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_hdr (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)))
    (i32.const 0))
"#;

/// 401 with `WWW-Authenticate: Bearer` unless the request has Authorization.
const AUTH: &str = r#"
  (data (i32.const 0) "authorization")
  (data (i32.const 32) "denied")
  (data (i32.const 48) "no entry\n")
  (data (i32.const 64) "\01\00\00\00\10\00\00\00\06\00\00\00www-authenticate\00Bearer\00")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 13) (i32.const 16384) (i32.const 16388)) (i32.const 1))
      (then
        (drop (call $send (i32.const 401) (i32.const 32) (i32.const 6) (i32.const 48) (i32.const 9)
                          (i32.const 64) (i32.const 36) (i32.const -1)))
        (return (i32.const 1))))
    (i32.const 0))
"#;

/// Traps on every request.
const TRAP: &str = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    unreachable)
"#;

fn write_plugin(dir: &TempDir, name: &str, body: &str) -> anyhow::Result<String> {
    let wasm = wat::parse_str(format!("(module {PRELUDE} {body})"))?;
    let path = dir.path().join(format!("{name}.wasm"));
    std::fs::write(&path, wasm)?;
    Ok(path.display().to_string())
}

fn with_plugins(origin: &TestOrigin, plugins: &[(&str, &str)]) -> String {
    let mut site = String::from("pool = \"main\"\n");
    for (path, failure) in plugins {
        site.push_str(&format!(
            "[[sites.plugins]]\npath = \"{path}\"\nfailure = \"{failure}\"\n"
        ));
    }
    basic_config(&[origin.url()], "").replace("pool = \"main\"\n", &site)
}

#[tokio::test]
async fn auth_plugin_refuses_at_the_edge_and_header_plugin_reaches_the_origin() -> anyhow::Result<()>
{
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let auth = write_plugin(&dir, "auth", AUTH)?;
    let add = write_plugin(&dir, "add", ADD_HEADER)?;
    let edge = Edge::start(&with_plugins(
        &origin,
        &[(&auth, "closed"), (&add, "closed")],
    ))?;
    // No credentials: 401 from the edge; the origin never sees it.
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.text(), "no entry\n");
    assert_eq!(origin.requests(), 0);
    // With credentials: both plugins run; the origin sees the added header.
    let mut req = get("t", "/echo");
    req.headers_mut()
        .insert("authorization", "Bearer x".parse()?);
    let r = Conn::plain(edge.http(), false).await?.send(req).await?;
    assert_eq!(r.status, 200);
    let j = r.json()?;
    let added = j["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|x| x[0] == "x-added"))
        .map(|x| x[1].clone());
    assert_eq!(added, Some("yes".into()));
    assert_eq!(origin.requests(), 1);
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_plugin_results_total", &["local-response"]) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn failing_plugins_follow_their_policy() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let trap = write_plugin(&dir, "trap", TRAP)?;
    let closed = Edge::start(&with_plugins(&origin, &[(&trap, "closed")]))?;
    for _ in 0..50 {
        assert_eq!(
            get_plain(closed.http(), "t", "/hello").await?.status,
            500,
            "fail-closed"
        );
    }
    assert_eq!(origin.requests(), 0);
    let open = Edge::start(&with_plugins(&origin, &[(&trap, "open")]))?;
    for _ in 0..50 {
        assert_eq!(
            get_plain(open.http(), "t", "/hello").await?.status,
            200,
            "fail-open skips the plugin"
        );
    }
    let m = open.metrics().await?;
    assert!(
        metric(&m, "meridian_plugin_results_total", &["failed"]) >= 50.0,
        "{m}"
    );
    // The process is healthy after all those traps.
    assert_eq!(
        get_plain(closed.admin(), "admin", "/healthz").await?.status,
        200
    );
    Ok(())
}

/// A plugin that fails on every request is a metric per failure, but at
/// most a warning a second in the edge's log, each saying how many failures
/// it left out: a fault on every request must not become a warning per
/// request, written by the async workers. Those left out are debug lines of
/// their own target, for a filter that asks for them.
#[tokio::test]
async fn a_plugin_failing_on_every_request_logs_once_a_second() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let trap = write_plugin(&dir, "trap", TRAP)?;
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, with_plugins(&origin, &[(&trap, "closed")]))?;
    let log = dir.path().join("edge.log");
    let edge = start_logged(&cfg, &log)?;
    let started = std::time::Instant::now();
    let mut conn = Conn::plain(edge.http, false).await?;
    for _ in 0..300 {
        assert_eq!(conn.send(get("t", "/hello")).await?.status, 500);
    }
    let took = started.elapsed();
    // One more after the interval: its line counts those left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(conn.send(get("t", "/hello")).await?.status, 500);
    let text = std::fs::read_to_string(&log)?;
    assert!(
        !text.contains('\u{1b}'),
        "a log that is not a terminal has no colour sequences"
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("failure warning per plugin per second"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("plugin failed")),
        "{lines:#?}"
    );
    let bound = took.as_secs() as usize + 3;
    assert!(
        (2..=bound).contains(&lines.len()),
        "{} failure lines for 301 failing requests in {took:?}: {lines:#?}",
        lines.len()
    );
    let suppressed: u64 = lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    assert!(
        suppressed + lines.len() as u64 >= 301,
        "every failure is either a line or counted in the next one: {lines:#?}"
    );
    // Each failure left out is a debug line of its own target (this edge's
    // RUST_LOG has meridian_edge at debug).
    let debug = text
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("meridian_edge::plugins::failures"))
        .count();
    assert_eq!(debug as u64, suppressed);
    let m = meridian_e2e::client::get_plain(edge.admin, "admin", "/metrics")
        .await?
        .text();
    assert!(
        metric(&m, "meridian_plugin_results_total", &["failed"]) >= 301.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn plugins_hot_swap_on_reload_under_load() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let add = write_plugin(&dir, "add", ADD_HEADER)?;
    let auth = write_plugin(&dir, "auth", AUTH)?;
    let edge = Edge::start(&with_plugins(&origin, &[(&add, "closed")]))?;
    let http = edge.http();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loops = Vec::new();
    for _ in 0..3 {
        let (stop, ok, other) = (stop.clone(), ok.clone(), other.clone());
        loops.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match get_plain(http, "t", "/hello").await {
                    Ok(r) if r.status == 200 || r.status == 401 => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Swap in the auth plugin: requests without credentials now get 401.
    let cfg = with_plugins(&origin, &[(&auth, "closed")])
        .replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{}\"", edge.http()),
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", edge.admin()),
            1,
        );
    edge.rewrite(&cfg)?;
    edge.signal(Signal::SIGHUP)?;
    let swapped = eventually(Duration::from_secs(10), || async {
        get_plain(edge.http(), "t", "/hello")
            .await
            .map(|r| r.status == 401)
            .unwrap_or(false)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await?;
    }
    assert!(swapped, "the new plugin never took over");
    assert_eq!(
        other.load(Ordering::Relaxed),
        0,
        "requests failed during the swap"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    Ok(())
}

#[test]
fn one_line_mode_takes_plugins_with_their_config() -> anyhow::Result<()> {
    let dir = TempDir::new("plugins")?;
    let add = write_plugin(&dir, "add", ADD_HEADER)?;
    let cfg = dir.path().join("add.json");
    std::fs::write(&cfg, r#"{"header": "x-added"}"#)?;
    let out = std::process::Command::new(crate::bin())
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--origin",
            "http://127.0.0.1:9",
            "--print-config",
        ])
        .arg("--plugin")
        .arg(format!("{add}@{}", cfg.display()))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out.stdout)?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The plugin's config file is named, not copied: secrets stay in it.
    assert!(
        text.contains("[[sites.plugins]]")
            && text.contains(&format!("config_file = \"{}\"", cfg.display()))
            && !text.contains("x-added"),
        "{text}"
    );
    let check = std::process::Command::new(crate::bin())
        .args(["check", "--config"])
        .arg(&printed)
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

/// A built example plugin; missing means `wasm-plugins/build` has not run.
pub(crate) fn dist(name: &str) -> anyhow::Result<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm-plugins/dist")
        .join(format!("{name}.wasm"));
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run wasm-plugins/build first",
        p.display()
    );
    Ok(p.canonicalize()?.display().to_string())
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An HS256 JWT for `secret` with `claims`, signed with the `openssl` command.
pub(crate) fn hs256_token(secret: &str, claims: &serde_json::Value) -> anyhow::Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let input = format!(
        "{}.{}",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(&serde_json::to_vec(claims)?)
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-binary"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("openssl is needed: {e}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "openssl failed");
    Ok(format!("{input}.{}", b64url(&out.stdout)))
}

/// A client that asks for `path` (with these extra header lines), reads
/// the response head and then nothing more: its request stays open with its
/// body stalled, as long as the connection is kept. Returns the status.
async fn stalled_reader(
    addr: SocketAddr,
    path: &str,
    headers: &str,
) -> anyhow::Result<(TcpStream, u16)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n{headers}\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 16 * 1024, "no end to the response head");
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut byte)).await??;
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad response head: {text}"))?;
    Ok((s, status))
}

/// Issue #12, item 7: slow clients must not exhaust plugin instances. Six
/// clients with valid tokens each fetch a 32 MiB object and read nothing
/// (four instances at most). Before the fix each held an instance until its
/// body ended, so with `failure = "open"` a request without a token skipped
/// `jwt-auth` (200 from the origin), and with `failure = "closed"` valid
/// requests got 500s. Now the stalled requests hold no instance between
/// callbacks: the plugin still refuses (401) and admits (200).
#[tokio::test]
async fn stalled_readers_never_exhaust_the_instances_of_an_auth_plugin() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let jwt = dist("jwt-auth")?;
    let secret = "s3cret";
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let token = hs256_token(secret, &serde_json::json!({"sub": "alice", "exp": exp}))?;
    let auth = format!("authorization: Bearer {token}\r\n");
    for failure in ["open", "closed"] {
        let site = format!(
            "pool = \"main\"\n[[sites.plugins]]\npath = \"{jwt}\"\nfailure = \"{failure}\"\nconfig = {{ alg = \"HS256\", secret = \"{secret}\" }}\n"
        );
        let cfg = basic_config(
            &[origin.url()],
            "[plugins]\nmax_instances = 4\ninstance_wait = \"300ms\"\n",
        )
        .replace("pool = \"main\"\n", &site);
        let edge = Edge::start(&cfg)?;
        let mut stalled = Vec::new();
        for _ in 0..6 {
            let (conn, status) = stalled_reader(edge.http(), "/large?mb=32", &auth).await?;
            assert_eq!(status, 200, "failure = {failure}");
            stalled.push(conn);
        }
        // No token: the plugin runs, and refuses.
        let r = get_plain(edge.http(), "t", "/hello").await?;
        assert_eq!(r.status, 401, "failure = {failure}: {}", r.text());
        // A valid token: the plugin runs, and admits.
        let mut req = get("t", "/hello");
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let r = Conn::plain(edge.http(), false).await?.send(req).await?;
        assert_eq!(r.status, 200, "failure = {failure}: {}", r.text());
        let m = edge.metrics().await?;
        assert!(
            metric(&m, "meridian_plugin_instances", &["kind=\"live\""]) <= 4.0,
            "{m}"
        );
        assert!(
            metric(&m, "meridian_plugin_instances", &["kind=\"contexts\""]) >= 6.0,
            "{m}"
        );
        assert_eq!(
            metric(&m, "meridian_plugin_results_total", &["\"overloaded\""]),
            0.0
        );
        drop(stalled);
    }
    Ok(())
}

/// When no instance can be had at all (here: a `fresh_instance` plugin, the
/// one kind whose requests hold their instance for life), the answer is 503,
/// whatever the policy: `failure = "open"` never lets a request skip the
/// plugin because the host is busy. Counted as `overloaded`.
#[tokio::test]
async fn no_instance_to_be_had_is_503_even_for_an_open_plugin() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let auth = write_plugin(&dir, "auth", AUTH)?;
    let site = format!(
        "pool = \"main\"\n[[sites.plugins]]\npath = \"{auth}\"\nfailure = \"open\"\nfresh_instance = true\n"
    );
    let cfg = basic_config(
        &[origin.url()],
        "[plugins]\nmax_instances = 2\ninstance_wait = \"100ms\"\n",
    )
    .replace("pool = \"main\"\n", &site);
    let edge = Edge::start(&cfg)?;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (conn, status) =
            stalled_reader(edge.http(), "/large?mb=32", "authorization: x\r\n").await?;
        assert_eq!(status, 200);
        stalled.push(conn);
    }
    let r = get_plain(edge.http(), "t", "/hello").await?;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_plugin_results_total", &["\"overloaded\""]) >= 1.0,
        "{m}"
    );
    // Once the stalled requests go, the plugin runs again.
    drop(stalled);
    let refused = eventually(Duration::from_secs(10), || async {
        get_plain(edge.http(), "t", "/hello")
            .await
            .is_ok_and(|r| r.status == 401)
    })
    .await;
    assert!(refused);
    Ok(())
}

/// A guest whose allocator adds a request header while the host is
/// returning the header map to it (`proxy_get_header_map_pairs`), on
/// requests with `x-evil`.
const EVIL_ALLOCATOR: &str = r#"
  (import "env" "proxy_get_header_map_value" (func $get_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (global $evil (mut i32) (i32.const 0))
  (data (i32.const 0) "x-evil")
  (data (i32.const 16) "x-sneaked-in")
  (data (i32.const 32) "1")
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (if (global.get $evil)
      (then (drop (call $add_hdr (i32.const 0) (i32.const 16) (i32.const 12) (i32.const 32) (i32.const 1)))))
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65536))
      (then (global.set $heap (i32.const 32768))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then
        (global.set $evil (i32.const 1))
        (drop (call $get_pairs (i32.const 0) (i32.const 16384) (i32.const 16388)))
        (global.set $evil (i32.const 0))))
    (i32.const 0))
"#;

/// Issue #12, item 9: a guest whose allocator changes the header map while
/// the host returns it tripped an assertion in the host: the request task
/// panicked and the client got an empty reply. Now it is a guest error: the
/// request fails by policy (500 closed, on to the origin open), and the
/// process serves the next requests.
#[tokio::test]
async fn an_allocator_changing_the_header_map_fails_the_request_by_policy() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let path = dir.path().join("evil.wasm");
    std::fs::write(&path, wat::parse_str(format!("(module {EVIL_ALLOCATOR})"))?)?;
    let evil = path.display().to_string();
    for (failure, expect) in [("closed", 500), ("open", 200)] {
        let edge = Edge::start(&with_plugins(&origin, &[(&evil, failure)]))?;
        for _ in 0..3 {
            let mut req = get("t", "/hello");
            req.headers_mut().insert("x-evil", "1".parse()?);
            let r = Conn::plain(edge.http(), false).await?.send(req).await?;
            assert_eq!(r.status, expect, "failure = {failure}: {}", r.text());
            // Healthy: the next request goes through the plugin and on.
            assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
        }
        let m = edge.metrics().await?;
        assert!(
            metric(&m, "meridian_plugin_failures", &["kind=\"trap\""]) >= 3.0,
            "{m}"
        );
        assert_eq!(
            get_plain(edge.admin(), "admin", "/healthz").await?.status,
            200
        );
    }
    Ok(())
}

/// A request that finds no instance waits for one, up to `instance_wait`,
/// then gets 503. Only `fresh_instance` plugins make requests hold an
/// instance for their life (shared ones never run out: see above), so
/// that is the case here: one instance slot, held by a slow request.
#[tokio::test]
async fn requests_wait_for_a_fresh_instance_up_to_instance_wait() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let add = write_plugin(&dir, "add", ADD_HEADER)?;
    for (wait, expect) in [("5s", 200), ("50ms", 503)] {
        let site = format!(
            "pool = \"main\"\n[[sites.plugins]]\npath = \"{add}\"\nfailure = \"open\"\nfresh_instance = true\n"
        );
        let cfg = basic_config(
            &[origin.url()],
            &format!("[plugins]\nmax_instances = 1\ninstance_wait = \"{wait}\"\n"),
        )
        .replace("pool = \"main\"\n", &site);
        let edge = Edge::start(&cfg)?;
        let addr = edge.http();
        let slow = tokio::spawn(async move { get_plain(addr, "t", "/slow?ms=700").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = std::time::Instant::now();
        let r = get_plain(edge.http(), "t", "/hello").await?;
        let waited = t0.elapsed();
        assert_eq!(slow.await??.status, 200);
        assert_eq!(r.status, expect, "instance_wait {wait}: {}", r.text());
        let m = edge.metrics().await?;
        if expect == 200 {
            // It waited for the slow request to give the instance back.
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
            assert!(
                metric(
                    &m,
                    "meridian_plugin_results_total",
                    &["\"waited-for-instance\""]
                ) >= 1.0
            );
        } else {
            assert!(metric(&m, "meridian_plugin_results_total", &["\"overloaded\""]) >= 1.0);
        }
        // Once the instance is free again, requests go through.
        assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    }
    Ok(())
}

/// Continues the request, traps on the response headers.
const RESPONSE_TRAP: &str = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    unreachable)
"#;

/// Issue #14: a plugin's failure is an error like any other, in the request
/// phase and in the response phase alike. It is answered by the one error
/// path (the same status and body as before, now `text/plain`), counted in
/// `meridian_internal_errors_total{reason="plugin-failed"}` (not as an
/// origin's error), and named in the access log's `error`.
#[tokio::test]
async fn plugin_failures_go_through_the_one_error_path() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let request_trap = write_plugin(&dir, "trap", TRAP)?;
    let response_trap = write_plugin(&dir, "response-trap", RESPONSE_TRAP)?;
    for (plugin, host, reaches_origin) in [
        (&request_trap, "request-phase.test", false),
        (&response_trap, "response-phase.test", true),
    ] {
        let edge = Edge::start(&with_plugins(&origin, &[(plugin, "closed")]))?;
        let before = origin.requests();
        let r = get_plain(edge.http(), host, "/hello").await?;
        assert_eq!(r.status, 500, "{host}: {}", r.text());
        assert_eq!(r.text(), "plugin failure\n", "{host}");
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{host}: built by ProxyError::to_response"
        );
        assert_eq!(r.header("cache-control"), Some("no-store"), "{host}");
        assert_eq!(origin.requests() > before, reaches_origin, "{host}");
        let m = edge.metrics().await?;
        assert_eq!(
            metric(
                &m,
                "meridian_internal_errors_total",
                &["reason=\"plugin-failed\""]
            ),
            1.0,
            "{host}: {m}"
        );
        assert_eq!(
            metric(&m, "meridian_upstream_errors_total", &[]),
            0.0,
            "{host}: not an origin's error: {m}"
        );
        let logged = eventually(Duration::from_secs(5), || async {
            !edge.lines_with(host).is_empty()
        })
        .await;
        assert!(logged, "{host}: no access log line");
        let line = edge.lines_with(host).remove(0);
        let j: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(j["status"], 500, "{line}");
        assert_eq!(j["error"], "plugin-failed", "{line}");
    }
    Ok(())
}

/// Loops forever on requests with an `x-loop` header; passes the others.
const LOOP_ON_HEADER: &str = r#"
  (data (i32.const 0) "x-loop")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then (loop $l (br $l))))
    (i32.const 0))
"#;

/// With the defaults (a 50 ms deadline, a 10 s clamp), a plugin that loops
/// on some requests fails those with its policy's 500, and after its first
/// miss its loops are cut at the fuel of its clamp (shown in
/// `meridian_plugin_deadline_clamp`, with that fuel; the host's tests check
/// the clamp's fuel and its error) while its other requests pass.
#[tokio::test]
async fn a_looping_plugin_is_clamped_after_its_first_missed_deadline() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let looping = write_plugin(&dir, "loop", LOOP_ON_HEADER)?;
    let edge = Edge::start(&with_plugins(&origin, &[(&looping, "closed")]))?;
    let looped = || async {
        let mut req = get("t", "/hello");
        req.headers_mut().insert("x-loop", "1".parse()?);
        anyhow::Ok(
            Conn::plain(edge.http(), false)
                .await?
                .send(req)
                .await?
                .status,
        )
    };
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    let m = edge.metrics().await?;
    assert_eq!(
        metric(&m, "meridian_plugin_deadline_clamp", &["kind=\"clamped\""]),
        0.0,
        "{m}"
    );
    assert_eq!(looped().await?, 500);
    for _ in 0..5 {
        assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
        assert_eq!(looped().await?, 500);
    }
    let m = edge.metrics().await?;
    assert_eq!(
        metric(&m, "meridian_plugin_deadline_clamp", &["kind=\"clamps\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meridian_plugin_deadline_clamp", &["kind=\"clamped\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meridian_plugin_deadline_clamp", &["kind=\"fuel\""]),
        100_000.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meridian_plugin_failures", &["kind=\"deadline\""]),
        6.0,
        "{m}"
    );
    Ok(())
}

/// With `[plugins] fuel = false` no plugin is clamped: every loop runs its
/// whole deadline and fails with it, and the metrics show no clamp.
#[tokio::test]
async fn with_fuel_off_a_looping_plugin_is_never_clamped() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let looping = write_plugin(&dir, "loop", LOOP_ON_HEADER)?;
    let config = with_plugins(&origin, &[(&looping, "closed")]).replacen(
        "[[listeners]]",
        "[plugins]\nfuel = false\n\n[[listeners]]",
        1,
    );
    let edge = Edge::start(&config)?;
    for _ in 0..3 {
        let mut req = get("t", "/hello");
        req.headers_mut().insert("x-loop", "1".parse()?);
        let r = Conn::plain(edge.http(), false).await?.send(req).await?;
        assert_eq!(r.status, 500);
        assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    }
    let m = edge.metrics().await?;
    for (kind, want) in [("clamps", 0.0), ("clamped", 0.0)] {
        assert_eq!(
            metric(
                &m,
                "meridian_plugin_deadline_clamp",
                &[&format!("kind=\"{kind}\"")]
            ),
            want,
            "{kind}: {m}"
        );
    }
    assert_eq!(
        metric(&m, "meridian_plugin_failures", &["kind=\"deadline\""]),
        3.0,
        "{m}"
    );
    let shown = get_plain(edge.admin(), "admin", "/config").await?.text();
    assert!(shown.contains("fuel = false"), "{shown}");
    Ok(())
}

/// A clamped loop's failure in the edge's log says it used all the fuel its
/// deadline is clamped to, and how much: the first loop ran its whole
/// (unclamped) 50 ms deadline, and the three after it were cut at the
/// clamp's 100,000 units. (Before fuel, the log gave a CPU time charged
/// and the wall time since the loop started, and loops in the plugin chaos
/// scenario used about twice what they were charged.)
#[tokio::test]
async fn a_clamped_loops_failure_logs_its_fuel() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let looping = write_plugin(&dir, "loop", LOOP_ON_HEADER)?;
    let config = dir.path().join("edge.toml");
    let log = dir.path().join("stderr.log");
    std::fs::write(&config, with_plugins(&origin, &[(&looping, "closed")]))?;
    let edge = start_logged(&config, &log)?;
    for _ in 0..4 {
        let mut req = get("t", "/hello");
        req.headers_mut().insert("x-loop", "1".parse()?);
        let r = Conn::plain(edge.http, false).await?.send(req).await?;
        assert_eq!(r.status, 500);
    }
    // Each failure is a warning or (throttled) a debug line.
    const CLAMPED: &str =
        "used all 100000 units of fuel its deadline is clamped to after a missed deadline";
    let count = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(what)
            .count()
    };
    let logged = eventually(Duration::from_secs(10), || async {
        count(CLAMPED) >= 3 && count("exceeded its 50ms deadline") >= 1
    })
    .await;
    let text = std::fs::read_to_string(&log)?;
    assert!(
        logged,
        "not 1 missed deadline and 3 clamped failures in the log: {text}"
    );
    assert_eq!(count(CLAMPED), 3, "{text}");
    Ok(())
}

/// The Wasm host outlives reloads: a reload that changes `[plugins]
/// max_instances`, `instance_wait` or `fuel` is applied otherwise, keeps the
/// running values of those three, and `GET /config` shows what is in force
/// (before, it showed the new values, which nothing applied).
#[tokio::test]
async fn plugin_host_settings_change_on_restart_only() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let add = write_plugin(&dir, "add", ADD_HEADER)?;
    let cfg = |max: u32, wait: &str, fuel: bool, header: &str| {
        with_plugins(&origin, &[(&add, "closed")]).replacen(
            "[[listeners]]",
            &format!(
                "[plugins]\nmax_instances = {max}\ninstance_wait = \"{wait}\"\nfuel = {fuel}\n\n[[listeners]]"
            ),
            1,
        ) + &format!("\n# {header}\n")
    };
    let edge = Edge::start(&cfg(64, "1s", true, "first"))?;
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    let pinned = cfg(32, "2s", false, "second")
        .replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{}\"", edge.http()),
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", edge.admin()),
            1,
        );
    edge.rewrite(&pinned)?;
    let r = Conn::plain(edge.admin(), false)
        .await?
        .send(meridian_e2e::client::req("POST", "admin", "/reload", ""))
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let config = get_plain(edge.admin(), "admin", "/config").await?.text();
    assert!(config.contains("max_instances = 64"), "{config}");
    assert!(config.contains("instance_wait = \"1s\""), "{config}");
    assert!(config.contains("fuel = true"), "{config}");
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    Ok(())
}

/// `ADD_HEADER` and `n` functions of filler that nothing calls (wasmtime
/// compiles them all), so that compiling takes a while; `seed` makes the
/// bytes differ.
fn big_plugin(dir: &TempDir, n: usize, seed: u32) -> anyhow::Result<String> {
    let mut body = String::from(ADD_HEADER);
    for k in 0..n {
        body.push_str("(func (param i32) (result i32) (local.get 0)");
        for j in 0..24u32 {
            body.push_str(&format!(
                " (i32.const {}) (i32.mul) (i32.const {}) (i32.xor)",
                k as u32 * 31 + j + 3,
                seed.wrapping_add(j)
            ));
        }
        body.push_str(")\n");
    }
    write_plugin(dir, "big", &body)
}

/// A config reload that keeps a plugin's file does not compile it again
/// (`meridian_plugin_module_loads`), and one that changes it compiles off
/// the async workers: on a one-worker runtime, requests during that compile
/// are answered at once. The reload used to compile on a worker, which on
/// one worker stalled every connection, the admin listener included, for
/// the whole compile (seconds for a large plugin in a debug build; in the
/// soak a CI run's p99 stepped up at each reload).
#[tokio::test]
async fn a_reload_compiles_only_changed_plugins_and_never_on_a_worker() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("plugins")?;
    let path = big_plugin(&dir, 1200, 1)?;
    let cfg = format!(
        "[server]\nworker_threads = 1\n\n{}",
        with_plugins(&origin, &[(&path, "closed")])
    );
    let edge = Edge::start(&cfg)?;
    let loads = |m: &str, result: &str| {
        metric(
            m,
            "meridian_plugin_module_loads",
            &[&format!("result=\"{result}\"")],
        )
    };
    let reloads = |m: &str| metric(m, "meridian_config_reloads_total", &["result=\"ok\""]);
    let added = |r: &meridian_e2e::client::Resp| -> anyhow::Result<bool> {
        Ok(r.json()?["headers"]
            .as_array()
            .is_some_and(|h| h.iter().any(|x| x[0] == "x-added")))
    };
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert!(r.status == 200 && added(&r)?, "{}", r.status);
    let m = edge.metrics().await?;
    assert_eq!((loads(&m, "compiled"), loads(&m, "reused")), (1.0, 0.0));

    // 1. The same file: reused, not compiled.
    edge.signal(Signal::SIGHUP)?;
    let done = eventually(Duration::from_secs(30), || async {
        edge.metrics().await.is_ok_and(|m| reloads(&m) == 1.0)
    })
    .await;
    assert!(done, "the first reload did not finish");
    let m = edge.metrics().await?;
    assert_eq!((loads(&m, "compiled"), loads(&m, "reused")), (1.0, 1.0));
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert!(r.status == 200 && added(&r)?, "{}", r.status);

    // 2. A changed file: compiled, while a client on a kept-alive
    // connection goes on being answered.
    big_plugin(&dir, 1200, 2)?;
    let mut conn = Conn::plain(edge.http(), false).await?;
    let r = conn.send(get("t", "/hello")).await?;
    assert_eq!(r.status, 200);
    let start = tokio::time::Instant::now();
    edge.signal(Signal::SIGHUP)?;
    let mut slowest = Duration::ZERO;
    let mut answered = 0u32;
    let took = loop {
        let t = tokio::time::Instant::now();
        let r =
            tokio::time::timeout(Duration::from_secs(30), conn.send(get("t", "/hello"))).await??;
        assert_eq!(r.status, 200);
        slowest = slowest.max(t.elapsed());
        answered += 1;
        let m = edge.metrics().await?;
        if reloads(&m) == 2.0 {
            assert_eq!((loads(&m, "compiled"), loads(&m, "reused")), (2.0, 1.0));
            break start.elapsed();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the second reload did not finish in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The test tells the two apart only if compiling takes a while.
    anyhow::ensure!(
        took >= Duration::from_millis(300),
        "the reload took {took:?}: too quick for this test to tell (make the plugin bigger)"
    );
    assert!(
        slowest < took / 3,
        "a request waited {slowest:?} during a reload of {took:?} ({answered} answered)"
    );
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert!(r.status == 200 && added(&r)?, "{}", r.status);
    Ok(())
}
