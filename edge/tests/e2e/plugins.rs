//! Wasm plugins (proxy-wasm) in the edge's request phase, through real
//! sockets. The plugins are small WAT modules compiled here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{Conn, get, get_plain};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;

use crate::{Edge, basic_config, metric};

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
    assert!(
        text.contains("[[sites.plugins]]") && text.contains("x-added"),
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
