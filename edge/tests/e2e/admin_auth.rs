//! The admin API's access rules (issue #13): a full token, a read-only
//! scrape token, open health checks, refusal of cross-site browser requests,
//! no open admin beyond loopback; and secrets that never leave the process
//! (`GET /config` and the daemon's own log, over a reload).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{Conn, Resp, get, req};
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;

use crate::plugins::{dist, hs256_token};
use crate::{Edge, basic_config, bin, metric, start_logged};

/// `method path` on the admin listener, with extra headers.
async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Resp> {
    let mut r = req(method, "admin", path, "");
    for (k, v) in headers {
        r.headers_mut()
            .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    Conn::plain(addr, false).await?.send(r).await
}

const FULL: (&str, &str) = ("authorization", "Bearer full-t0ken");
const READ: (&str, &str) = ("authorization", "Bearer read-t0ken");

#[tokio::test]
async fn read_token_scrapes_full_token_mutates_and_health_stays_open() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("admin-auth")?;
    // The read token from a file, the full one inline.
    let read_file = dir.path().join("read.token");
    std::fs::write(&read_file, "read-t0ken\n")?;
    let cfg = basic_config(&[origin.url()], "").replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken = \"full-t0ken\"\nread_token_file = \"{}\"\n",
            read_file.display()
        ),
    );
    let edge = Edge::start_in(dir, &cfg)?;
    let a = edge.admin();

    for p in ["/healthz", "/readyz"] {
        assert_eq!(admin(a, "GET", p, &[]).await?.status, 200, "{p}");
    }
    // No token, a wrong one, or a malformed header: 401 with the challenge.
    for h in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "full-t0ken")],
        vec![("authorization", "Basic full-t0ken")],
    ] {
        for (m, p) in [("GET", "/metrics"), ("GET", "/config"), ("POST", "/drain")] {
            let r = admin(a, m, p, &h).await?;
            assert_eq!(r.status, 401, "{m} {p} {h:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{m} {p}");
        }
    }
    // The read token: every GET, no mutation.
    for p in ["/metrics", "/config", "/nope"] {
        let r = admin(a, "GET", p, &[READ]).await?;
        assert_ne!(r.status, 401, "GET {p}");
        assert_ne!(r.status, 403, "GET {p}");
    }
    assert_eq!(admin(a, "GET", "/metrics", &[READ]).await?.status, 200);
    let config = admin(a, "GET", "/config", &[READ]).await?;
    assert_eq!(config.status, 200);
    let text = config.text();
    assert!(
        !text.contains("full-t0ken") && !text.contains("read-t0ken"),
        "{text}"
    );
    for (m, p) in [
        ("POST", "/drain"),
        ("POST", "/reload"),
        ("POST", "/undrain"),
        ("POST", "/purge"),
    ] {
        let r = admin(a, m, p, &[READ]).await?;
        assert_eq!(r.status, 403, "{m} {p} with the read token: {}", r.text());
    }
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 200);

    // The full token, from a browser page: refused.
    for h in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let r = admin(a, "POST", "/drain", &[FULL, h]).await?;
        assert_eq!(r.status, 403, "{h:?}: {}", r.text());
    }
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 200);
    // Reads from a browser are not refused (nothing changes).
    assert_eq!(
        admin(a, "GET", "/metrics", &[FULL, ("origin", "http://x")])
            .await?
            .status,
        200
    );
    // The full token from a tool (or typed in the address bar): allowed.
    let r = admin(a, "POST", "/drain", &[FULL, ("sec-fetch-site", "none")]).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 503);
    assert_eq!(admin(a, "POST", "/undrain", &[FULL]).await?.status, 200);
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 200);
    assert_eq!(admin(a, "GET", "/config", &[FULL]).await?.status, 200);
    Ok(())
}

/// Without `read_token`, reads need the full token; with no token at all
/// (loopback), the API is open but still refuses cross-site mutations.
#[tokio::test]
async fn reads_need_the_full_token_without_a_read_token_and_loopback_refuses_browsers()
-> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg =
        basic_config(&[origin.url()], "").replace("[admin]\n", "[admin]\ntoken = \"full-t0ken\"\n");
    let edge = Edge::start(&cfg)?;
    assert_eq!(
        admin(edge.admin(), "GET", "/metrics", &[READ])
            .await?
            .status,
        401
    );
    assert_eq!(
        admin(edge.admin(), "GET", "/metrics", &[FULL])
            .await?
            .status,
        200
    );
    drop(edge);

    let edge = Edge::start(&basic_config(&[origin.url()], ""))?;
    let a = edge.admin();
    assert_eq!(admin(a, "GET", "/metrics", &[]).await?.status, 200);
    // A form POST from a page the operator's browser visits.
    let r = admin(
        a,
        "POST",
        "/drain",
        &[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
    )
    .await?;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = admin(a, "POST", "/reload", &[("sec-fetch-site", "cross-site")]).await?;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 200);
    assert_eq!(admin(a, "POST", "/drain", &[]).await?.status, 200);
    assert_eq!(admin(a, "GET", "/readyz", &[]).await?.status, 503);
    Ok(())
}

/// An admin address beyond loopback without a token is refused, with the
/// file and line, by `check`, by `run`, by `run --admin` and by the one-line
/// mode; the one-line mode's defaults (loopback admin) pass the check.
#[test]
fn an_open_admin_beyond_loopback_is_refused() -> anyhow::Result<()> {
    let dir = TempDir::new("admin-open")?;
    let path = dir.path().join("edge.toml");
    let cfg = basic_config(&["http://127.0.0.1:9".into()], "")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    std::fs::write(&path, &cfg)?;
    let p = path.to_str().ok_or_else(|| anyhow::anyhow!("path"))?;
    for args in [vec!["check", "--config", p], vec!["run", "--config", p]] {
        let out = Command::new(bin()).args(&args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{p}:2:10: admin.listen: 0.0.0.0:0 is not a loopback address"
            )),
            "{args:?}: {err}"
        );
    }
    // With a token it passes.
    std::fs::write(&path, cfg.replace("[admin]\n", "[admin]\ntoken = \"t\"\n"))?;
    let out = Command::new(bin())
        .args(["check", "--config", p])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `run --admin` overriding a loopback file without a token.
    std::fs::write(&path, basic_config(&["http://127.0.0.1:9".into()], ""))?;
    let out = Command::new(bin())
        .args(["run", "--config", p, "--admin", "[::]:0"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    // The one-line mode: its defaults are a loopback admin, and pass.
    let out = Command::new(bin())
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--origin",
            "http://127.0.0.1:9",
            "--print-config",
        ])
        .output()?;
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout)?;
    assert!(printed.contains("listen = \"127.0.0.1:9901\""), "{printed}");
    std::fs::write(&path, &printed)?;
    let out = Command::new(bin())
        .args(["check", "--config", p])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin())
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--origin",
            "http://127.0.0.1:9",
            "--admin",
            "0.0.0.0:0",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    Ok(())
}

async fn status_with(addr: SocketAddr, token: &str) -> anyhow::Result<u16> {
    let mut r = get("t", "/hello");
    r.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(Conn::plain(addr, false).await?.send(r).await?.status)
}

/// jwt-auth with its HS256 secret inline on one site and from `config_file`
/// on another, admin tokens set: `GET /config` shows none of the secrets,
/// the file is read again on reload (the new secret takes effect), a refused
/// reload names no secret, and the daemon's log (at debug) over all of it
/// contains none.
#[tokio::test]
async fn secrets_stay_out_of_config_and_logs_over_reloads() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let jwt = dist("jwt-auth")?;
    let dir = TempDir::new("secrets")?;
    let (inline, filed, filed2) = (
        "inl1ne-secret-4f1c",
        "f1led-secret-9a2e",
        "f1led-secret-rotated-77b0",
    );
    let (full, read) = ("adm1n-full-c0ffee", "adm1n-read-be7a");
    let secret_file = dir.path().join("jwt.json");
    std::fs::write(
        &secret_file,
        format!(r#"{{"alg":"HS256","secret":"{filed}"}}"#),
    )?;
    let config = |extra_plugin_line: &str| {
        format!(
            r#"[admin]
listen = "127.0.0.1:0"
token = "{full}"
read_token = "{read}"

[log]
access_log = "off"

[[listeners]]
address = "127.0.0.1:0"

[[sites]]
hosts = ["inline.test"]
pool = "main"
[[sites.plugins]]
path = "{jwt}"
config = {{ alg = "HS256", secret = "{inline}" }}

[[sites]]
hosts = ["*"]
pool = "main"
[[sites.plugins]]
path = "{jwt}"
config_file = "{}"
{extra_plugin_line}

[pools.main]
origins = [{{ url = "{}" }}]
"#,
            secret_file.display(),
            origin.url()
        )
    };
    let path = dir.path().join("edge.toml");
    let log = dir.path().join("stderr.log");
    std::fs::write(&path, config(""))?;
    let edge = start_logged(&path, &log)?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let claims = serde_json::json!({"sub": "alice", "exp": exp});
    let (t_inline, t_filed, t_filed2) = (
        hs256_token(inline, &claims)?,
        hs256_token(filed, &claims)?,
        hs256_token(filed2, &claims)?,
    );
    // Both secrets are in force.
    let mut r = get("inline.test", "/hello");
    r.headers_mut()
        .insert("authorization", format!("Bearer {t_inline}").parse()?);
    assert_eq!(
        Conn::plain(edge.http, false).await?.send(r).await?.status,
        200
    );
    assert_eq!(status_with(edge.http, &t_filed).await?, 200);
    assert_eq!(status_with(edge.http, &t_filed2).await?, 401);

    let show = |r: Resp| r.text();
    let cfg_text = show(
        admin(
            edge.admin,
            "GET",
            "/config",
            &[("authorization", &format!("Bearer {read}"))],
        )
        .await?,
    );
    for s in [inline, filed, full, read] {
        assert!(!cfg_text.contains(s), "{s} in GET /config:\n{cfg_text}");
    }
    assert!(cfg_text.contains("<redacted>"), "{cfg_text}");
    assert!(cfg_text.contains("config_file"), "{cfg_text}");

    // Rotate the filed secret and reload: the file is read again.
    std::fs::write(
        &secret_file,
        format!(r#"{{"alg":"HS256","secret":"{filed2}"}}"#),
    )?;
    let auth = format!("Bearer {full}");
    // By SIGHUP: the plugins compile again, which takes long in a debug build.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(edge.child.id() as i32),
        Signal::SIGHUP,
    )?;
    let mut rotated = false;
    for _ in 0..1800 {
        if status_with(edge.http, &t_filed2).await? == 200 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the rotated secret never took effect");
    assert_eq!(status_with(edge.http, &t_filed).await?, 401);
    // Both `config` and `config_file`: refused, by SIGHUP and by the API.
    std::fs::write(&path, config(&format!("config = \"{inline}\"")))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(edge.child.id() as i32),
        Signal::SIGHUP,
    )?;
    let r = admin(edge.admin, "POST", "/reload", &[("authorization", &auth)]).await?;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("set config or config_file, not both"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains(inline), "{}", r.text());
    // The SIGHUP's refusal too (the control loop takes them in turn).
    let mut refused = 0.0;
    for _ in 0..100 {
        let m = admin(edge.admin, "GET", "/metrics", &[("authorization", &auth)])
            .await?
            .text();
        refused = metric(&m, "meridian_config_reloads_total", &["refused"]);
        if refused >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused, 2.0);
    assert_eq!(status_with(edge.http, &t_filed2).await?, 200);
    let cfg_text = show(admin(edge.admin, "GET", "/config", &[("authorization", &auth)]).await?);
    for s in [inline, filed, filed2, full, read] {
        assert!(!cfg_text.contains(s), "{s} in GET /config:\n{cfg_text}");
    }
    drop(edge);

    let logged = std::fs::read_to_string(&log)?;
    assert!(logged.contains("config reloaded"), "{logged}");
    assert!(logged.contains("reload refused"), "{logged}");
    for s in [inline, filed, filed2, full, read] {
        assert!(!logged.contains(s), "{s} in the log:\n{logged}");
    }
    Ok(())
}
