//! The admin API's access rules (#13 item 1): bearer tokens, a read-only
//! token, cross-site browser requests, and no token on a non-loopback
//! address refused at startup.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::support::*;

/// (status, headers, body) of one HTTP/1.1 exchange with extra headers.
pub fn http_h(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response {out:?}"))?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((status, head.to_ascii_lowercase(), body.to_owned()))
}

fn drained(admin: SocketAddr, token: &str, region: &str) -> Result<bool> {
    let (st, _, body) = http_h(
        "GET",
        admin,
        "/regions",
        &[("Authorization", &format!("Bearer {token}"))],
    )?;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == region)
        .and_then(|r| r["drained"].as_bool())
        .ok_or_else(|| anyhow!("no region {region} in {body}"))
}

const FULL: &str = "full-7f3a9c2e";
const READ: &str = "read-51bd04aa";

fn tokened_server(tag: &str) -> Result<Server> {
    let dir = tmpdir(tag);
    let tok = dir.join("admin.token");
    // A trailing newline, as `kubectl create secret --from-file` keeps it.
    std::fs::write(&tok, format!("{FULL}\n"))?;
    let cfg = demo_config(
        &dir,
        &[(
            "listen = \"127.0.0.1:9953\"",
            &format!(
                "listen = \"127.0.0.1:9953\"\ntoken_file = \"{}\"\nread_token = \"{READ}\"",
                tok.display()
            ),
        )],
        "",
    );
    Server::run(&cfg)
}

#[test]
fn tokens_gate_reads_and_writes() -> Result<()> {
    let s = tokened_server("admin-tokens")?;
    let a = s.admin();
    let bearer = |t: &str| format!("Bearer {t}");

    // Health stays open.
    assert_eq!(http_h("GET", a, "/healthz", &[])?.0, 200);

    // No token, a wrong token, another scheme: 401 with a Bearer challenge.
    for hdrs in [
        vec![],
        vec![("Authorization", "Bearer nope")],
        vec![("Authorization", "Basic Zm9vOmJhcg==")],
    ] {
        let (st, head, _) = http_h("GET", a, "/metrics", &hdrs)?;
        assert_eq!(st, 401, "{hdrs:?}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
    }
    let (st, _, _) = http_h("POST", a, "/regions/eu-west/drain", &[])?;
    assert_eq!(st, 401);
    assert!(!drained(a, FULL, "eu-west")?);

    // The read token reads...
    let (st, _, body) = http_h("GET", a, "/metrics", &[("Authorization", &bearer(READ))])?;
    assert_eq!(st, 200);
    assert!(body.contains("meridian_dns_tcp_connections"), "{body}");
    assert!(!drained(a, READ, "eu-west")?);
    // ...and cannot drain.
    let (st, _, body) = http_h(
        "POST",
        a,
        "/regions/eu-west/drain",
        &[("Authorization", &bearer(READ))],
    )?;
    assert_eq!(st, 403, "{body}");
    assert!(!drained(a, FULL, "eu-west")?, "read token drained a region");

    // The full token drains (the token file's trailing newline is trimmed).
    let (st, _, body) = http_h(
        "POST",
        a,
        "/regions/eu-west/drain",
        &[("Authorization", &bearer(FULL))],
    )?;
    assert_eq!(st, 200, "{body}");
    assert!(drained(a, FULL, "eu-west")?);

    // A browser page on another site: refused even with the token.
    for (k, v) in [
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
    ] {
        let (st, _, body) = http_h(
            "POST",
            a,
            "/regions/eu-west/undrain",
            &[("Authorization", &bearer(FULL)), (k, v)],
        )?;
        assert_eq!(st, 403, "{k}: {v}: {body}");
        assert!(drained(a, FULL, "eu-west")?, "{k}: {v} undrained");
    }
    // A user typing the URL (Sec-Fetch-Site: none) is not cross-site.
    let (st, _, _) = http_h(
        "POST",
        a,
        "/regions/eu-west/undrain",
        &[("Authorization", &bearer(FULL)), ("Sec-Fetch-Site", "none")],
    )?;
    assert_eq!(st, 200);
    assert!(!drained(a, FULL, "eu-west")?);

    let (_, _, m) = http_h("GET", a, "/metrics", &[("Authorization", &bearer(READ))])?;
    for (reason, n) in [("unauthenticated", 4), ("read_only", 1), ("cross_site", 3)] {
        let line = format!("meridian_dns_admin_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(m.contains(&line), "{line} missing:\n{m}");
    }
    Ok(())
}

#[test]
fn cross_site_post_refused_without_token() -> Result<()> {
    // Loopback and no token: the case a browser on the host could abuse.
    let s = Server::demo()?;
    let a = s.admin();
    let (st, _, _) = http_h(
        "POST",
        a,
        "/regions/eu-west/drain",
        &[("Origin", "http://evil.example")],
    )?;
    assert_eq!(st, 403);
    let (st, _, _) = http_h("GET", a, "/regions", &[("Origin", "http://evil.example")])?;
    assert_eq!(st, 200, "reads stay allowed (no token configured)");
    assert!(!drained(a, "", "eu-west")?);
    Ok(())
}

/// Start `meridian-dns ARGS` and expect it to exit within 10 s; returns
/// (exit code, stderr).
fn run_to_exit(args: &[&str]) -> Result<(i32, String)> {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            return Ok((st.code().unwrap_or(-1), err));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("meridian-dns {args:?} kept running: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn non_loopback_admin_without_token_is_refused() -> Result<()> {
    let dir = tmpdir("admin-exposed");
    let cfg = demo_config(
        &dir,
        &[("listen = \"127.0.0.1:9953\"", "listen = \"0.0.0.0:0\"")],
        "",
    );
    let c = cfg.to_str().ok_or_else(|| anyhow!("path"))?;
    let src = std::fs::read_to_string(&cfg)?;
    let line = src
        .lines()
        .position(|l| l.starts_with("listen = \"0.0.0.0:0\""))
        .ok_or_else(|| anyhow!("listen line"))?
        + 1;
    let want = format!("{c}:{line}:10: the admin API on 0.0.0.0:0 is not loopback-only");
    let (code, err) = run_to_exit(&["run", "--config", c, "--listen", "127.0.0.1:0"])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want), "want {want:?} in {err}");
    let (code, err) = run_to_exit(&["check", "--config", c])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want), "{err}");

    // The older spelling, server.admin, is held to the same rule.
    let cfg = demo_config(
        &dir,
        &[
            (
                "listen = [\"127.0.0.1:5353\"]",
                "listen = [\"127.0.0.1:5353\"]\nadmin = \"[::]:0\"",
            ),
            ("listen = \"127.0.0.1:9953\"\n", ""),
        ],
        "",
    );
    let (code, err) = run_to_exit(&["check", "--config", cfg.to_str().expect("p")])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the admin API on [::]:0 is not loopback-only"),
        "{err}"
    );

    // So is the command line's --admin.
    let (code, err) = run_to_exit(&["demo", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--admin 0.0.0.0:0"), "{err}");

    // With a token it is accepted (checked, not bound).
    let cfg = demo_config(
        &dir,
        &[(
            "listen = \"127.0.0.1:9953\"",
            "listen = \"0.0.0.0:9953\"\ntoken = \"abc123\"",
        )],
        "",
    );
    let (code, err) = run_to_exit(&["check", "--config", cfg.to_str().expect("p")])?;
    assert_eq!(code, 0, "{err}");
    Ok(())
}

#[test]
fn browser_form_post_cannot_drain() -> Result<()> {
    use std::net::TcpListener;
    // A real browser: headless Chromium loads a page from another origin
    // (another port) that auto-submits a form POST to the admin API.
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| anyhow!("chromium is not installed (Debian package `chromium`)"))?;
    let s = Server::demo()?;
    let admin = s.admin();
    let page = format!(
        "<html><body><form id=f method=POST action=\"http://{admin}/regions/eu-west/drain\">\
         <input name=x value=1></form><script>document.getElementById('f').submit()</script>\
         </body></html>"
    );
    let site = TcpListener::bind("127.0.0.1:0")?;
    let site_addr = site.local_addr()?;
    site.set_nonblocking(true)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match site.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                        page.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let profile = tmpdir("chromium");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            &format!("http://{site_addr}/"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // The browser did send the POST: the refusal is counted.
    let refused = eventually(Duration::from_secs(20), || {
        http("GET", admin, "/metrics")
            .map(|(_, m)| m.contains("meridian_dns_admin_refused_total{reason=\"cross_site\"} 1"))
            .unwrap_or(false)
    });
    let _ = child.kill();
    let _ = child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    assert!(
        refused,
        "the browser's cross-site POST never reached the admin API"
    );
    assert!(
        !drained(admin, "", "eu-west")?,
        "a cross-site form drained a region"
    );
    Ok(())
}
