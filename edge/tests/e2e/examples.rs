//! The example plugins of `wasm-plugins/examples` (built by
//! `wasm-plugins/build` into `wasm-plugins/dist`) and a plugin written
//! against the upstream `proxy-wasm` crate, through the real edge and real
//! sockets. Tokens and signatures are made with the `openssl` command.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{Conn, Resp, get, get_plain, raw, raw_status, req};
use meridian_e2e::origin::TestOrigin;

use crate::{Edge, basic_config, metric};

/// A built plugin; missing means `wasm-plugins/build` has not run.
fn dist(name: &str) -> anyhow::Result<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm-plugins/dist")
        .join(format!("{name}.wasm"));
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run wasm-plugins/build first (tests/run.sh does)",
        p.display()
    );
    Ok(p.canonicalize()?.display().to_string())
}

fn testdata(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm-plugins/examples/jwt-auth/testdata")
        .join(name)
        .display()
        .to_string()
}

/// One `[[sites.plugins]]` entry.
fn plugin(path: &str, config: &str, extra: &str) -> String {
    format!("[[sites.plugins]]\npath = \"{path}\"\nconfig = {config}\n{extra}\n")
}

/// The basic config with these plugins in the site, and `top` appended.
fn config_with(origin: &TestOrigin, plugins: &str, top: &str) -> String {
    basic_config(&[origin.url()], top)
        .replace("pool = \"main\"\n", &format!("pool = \"main\"\n{plugins}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
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

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn openssl(args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("openssl is needed (apt-get install openssl): {e}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(input)?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn hmac_sha256(secret: &str, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    openssl(&["dgst", "-sha256", "-hmac", secret, "-binary"], data)
}

/// A DER ECDSA signature as JWS wants it: r || s, 32 bytes each.
fn der_to_raw(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let bad = || anyhow::anyhow!("bad DER signature");
    anyhow::ensure!(der.first() == Some(&0x30), bad());
    let mut i = if der.get(1).is_some_and(|l| l & 0x80 != 0) {
        3
    } else {
        2
    };
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        anyhow::ensure!(der.get(i) == Some(&0x02), bad());
        let len = usize::from(*der.get(i + 1).ok_or_else(bad)?);
        let mut int = der.get(i + 2..i + 2 + len).ok_or_else(bad)?;
        while int.len() > 32 && int[0] == 0 {
            int = &int[1..];
        }
        anyhow::ensure!(int.len() <= 32, bad());
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    Ok(out)
}

enum Key<'a> {
    Hs(&'a str),
    Rsa(&'a str),
    Ec(&'a str),
}

fn jwt(key: &Key<'_>, kid: Option<&str>, claims: &serde_json::Value) -> anyhow::Result<String> {
    let alg = match key {
        Key::Hs(_) => "HS256",
        Key::Rsa(_) => "RS256",
        Key::Ec(_) => "ES256",
    };
    let mut header = serde_json::json!({"alg": alg, "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = k.into();
    }
    let input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&header)?),
        b64url(&serde_json::to_vec(claims)?)
    );
    let sig = match key {
        Key::Hs(s) => hmac_sha256(s, input.as_bytes())?,
        Key::Rsa(pem) => openssl(
            &["dgst", "-sha256", "-sign", pem, "-binary"],
            input.as_bytes(),
        )?,
        Key::Ec(pem) => der_to_raw(&openssl(
            &["dgst", "-sha256", "-sign", pem, "-binary"],
            input.as_bytes(),
        )?)?,
    };
    Ok(format!("{input}.{}", b64url(&sig)))
}

async fn with_header(edge: &Edge, path: &str, name: &str, value: &str) -> anyhow::Result<Resp> {
    let mut req = get("t", path);
    req.headers_mut().insert(
        http::HeaderName::from_bytes(name.as_bytes())?,
        value.parse()?,
    );
    Conn::plain(edge.http(), false).await?.send(req).await
}

fn echoed(r: &Resp, name: &str) -> Vec<String> {
    r.json()
        .ok()
        .and_then(|j| {
            j["headers"].as_array().map(|h| {
                h.iter()
                    .filter(|x| x[0] == name)
                    .filter_map(|x| x[1].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn jwt_auth_hs256_refuses_at_the_edge_and_passes_the_subject() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = r#"{ alg = "HS256", secret = "s3cret", issuer = "https://issuer.test", audience = "meridian" }"#;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("jwt-auth")?, cfg, "failure = \"closed\""),
        "",
    ))?;
    let key = Key::Hs("s3cret");
    let t = now();
    let good = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": ["x", "meridian"], "exp": t + 600, "nbf": t - 10});

    // No token: 401 with a bare challenge, and the origin never sees it.
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(challenge.contains("realm=\"meridian\""), "{challenge}");
    // Each bad token: 401 invalid_token.
    let mut bad = vec![
        ("garbage".to_string(), "not a jwt"),
        (jwt(&Key::Hs("wrong"), None, &good)?, "bad signature"),
    ];
    for (field, value, why) in [
        ("exp", serde_json::json!(t - 5), "expired"),
        ("nbf", serde_json::json!(t + 600), "not yet valid"),
        (
            "iss",
            serde_json::json!("https://evil.test"),
            "wrong issuer",
        ),
        ("aud", serde_json::json!("other"), "wrong audience"),
    ] {
        let mut c = good.clone();
        c[field] = value;
        bad.push((jwt(&key, None, &c)?, why));
    }
    // alg confusion: "none" with no signature.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(&serde_json::to_vec(&good)?)
    );
    bad.push((none, "alg none"));
    for (token, why) in &bad {
        let r = with_header(&edge, "/echo", "authorization", &format!("Bearer {token}")).await?;
        assert_eq!(r.status, 401, "{why}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.contains("invalid_token"), "{why}: {challenge}");
    }
    assert_eq!(
        origin.requests(),
        0,
        "no refused request reached the origin"
    );

    // A good token: the origin gets the subject, not the client's forgery.
    let token = jwt(&key, None, &good)?;
    let mut req = get("t", "/echo");
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    req.headers_mut()
        .insert("x-auth-subject", "mallory".parse()?);
    let r = Conn::plain(edge.http(), false).await?.send(req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(echoed(&r, "x-auth-subject"), vec!["alice".to_string()]);
    assert_eq!(origin.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn jwt_auth_rs256_and_es256_with_an_inline_jwks() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let jwks = std::fs::read_to_string(testdata("jwks.json"))?;
    let t = now();
    let claims = serde_json::json!({"sub": "bob", "exp": t + 600});
    for (alg, key, kid) in [
        ("RS256", Key::Rsa(&testdata("rsa1.pem")), "rsa1"),
        ("ES256", Key::Ec(&testdata("ec1.pem")), "ec1"),
    ] {
        // The JWKS goes in as a JSON string inside the JSON config.
        let cfg = serde_json::json!({"alg": alg, "jwks": serde_json::from_str::<serde_json::Value>(&jwks)?});
        let cfg_toml = format!("'{}'", serde_json::to_string(&cfg)?);
        let edge = Edge::start(&config_with(
            &origin,
            &plugin(&dist("jwt-auth")?, &cfg_toml, ""),
            "",
        ))?;
        let token = jwt(&key, Some(kid), &claims)?;
        let r = with_header(&edge, "/echo", "authorization", &format!("Bearer {token}")).await?;
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(
            echoed(&r, "x-auth-subject"),
            vec!["bob".to_string()],
            "{alg}"
        );
        // Tampered payload, same signature: refused.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64url(&serde_json::to_vec(
            &serde_json::json!({"sub": "root", "exp": t + 600}),
        )?);
        parts[1] = &forged;
        let r = with_header(
            &edge,
            "/echo",
            "authorization",
            &format!("Bearer {}", parts.join(".")),
        )
        .await?;
        assert_eq!(r.status, 401, "{alg} forged");
        // An HS256 token signed with the public JWKS as the secret (alg confusion).
        let confused = jwt(&Key::Hs(&jwks), Some(kid), &claims)?;
        let r = with_header(
            &edge,
            "/echo",
            "authorization",
            &format!("Bearer {confused}"),
        )
        .await?;
        assert_eq!(r.status, 401, "{alg} alg confusion");
    }
    Ok(())
}

#[tokio::test]
async fn signed_url_checks_signature_and_expiry_and_strips_them() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("signed-url")?, r#"{ secret = "k3y" }"#, ""),
        "",
    ))?;
    let sign = |path_query: &str| -> anyhow::Result<String> {
        Ok(hex(&hmac_sha256("k3y", path_query.as_bytes())?))
    };
    let exp = now() + 300;
    let pq = format!("/echo?a=1&expires={exp}");
    let url = format!("{pq}&signature={}", sign(&pq)?);
    let r = get_plain(edge.http(), "t", &url).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    // The origin sees the URL without the token, so every signed variant shares a cache key.
    let j = r.json()?;
    let seen = j["uri"].as_str().or(j["path"].as_str()).unwrap_or_default();
    assert!(seen.contains("a=1"), "{j}");
    assert!(
        !seen.contains("signature") && !seen.contains("expires"),
        "{j}"
    );

    let old = now() - 10;
    let expired = format!("/echo?expires={old}");
    for (bad, why) in [
        ("/echo?a=1".to_string(), "unsigned"),
        (
            format!("/echo?a=2&expires={exp}&signature={}", sign(&pq)?),
            "tampered",
        ),
        (
            format!("{expired}&signature={}", sign(&expired)?),
            "expired",
        ),
        (format!("{pq}&signature=00"), "malformed"),
    ] {
        let r = get_plain(edge.http(), "t", &bad).await?;
        assert_eq!(r.status, 403, "{why}");
    }
    assert_eq!(origin.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn headers_plugin_edits_both_directions_and_the_cached_object() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = r#"'{"request":{"add":{"X-From-Edge":"1"},"remove":["X-Debug"]},"response":{"add":{"Strict-Transport-Security":"max-age=63072000"},"remove":["Server"],"rename":{"X-Powered-By":"X-Origin-Stack"}}}'"#;
    let every = r#"'{"response":{"set":{"X-Served-By":"meridian"}}}'"#;
    let plugins = format!(
        "{}{}",
        plugin(&dist("headers")?, cfg, ""),
        plugin(&dist("headers")?, every, "every_response = true")
    );
    let edge = Edge::start(&config_with(&origin, &plugins, ""))?;
    let r = with_header(&edge, "/echo", "x-debug", "1").await?;
    assert_eq!(r.status, 200);
    assert_eq!(echoed(&r, "x-from-edge"), vec!["1".to_string()]);
    assert!(echoed(&r, "x-debug").is_empty());

    let path = "/cc/h?cc=max-age%3D60&hdr=x-powered-by:php";
    for round in 0..2 {
        let r = get_plain(edge.http(), "t", path).await?;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("strict-transport-security"),
            Some("max-age=63072000"),
            "round {round}"
        );
        assert_eq!(r.header("x-origin-stack"), Some("php"), "round {round}");
        assert_eq!(r.header("x-powered-by"), None, "round {round}");
        assert_eq!(r.header("x-served-by"), Some("meridian"), "round {round}");
        let cs = r.header("cache-status").unwrap_or_default().to_string();
        if round == 1 {
            assert!(cs.contains("hit"), "{cs}");
        }
    }
    assert_eq!(
        origin.count("/cc/h").await,
        1,
        "transformed once, then served from the cache"
    );
    Ok(())
}

#[tokio::test]
async fn rewrite_plugin_transforms_text_bodies_before_storing() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let cfg = r#"'{"rules":[{"find":"origin.internal","replace":"www.example.com"},{"regex":"https?://cdn[0-9]+\\.origin\\.test","replace":"https://static.example.com"}],"max_body_bytes":8388608}'"#;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(
            &dist("rewrite")?,
            cfg,
            "failure = \"open\"\nbody_buffer = \"256KiB\"",
        ),
        "",
    ))?;
    let text = "see http://origin.internal/a and http://cdn7.origin.test/x; ";
    let enc = text
        .replace(' ', "%20")
        .replace(':', "%3A")
        .replace('/', "%2F")
        .replace(';', "%3B");
    let want = "see http://www.example.com/a and https://static.example.com/x; ".repeat(3);
    let path = format!("/cc/page?cc=max-age%3D60&ct=text%2Fhtml&repeat=3&text={enc}");
    for round in 0..2 {
        let r = get_plain(edge.http(), "t", &path).await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), want, "round {round}");
        assert_eq!(
            r.header("content-length"),
            Some(want.len().to_string().as_str()),
            "an exact length for a body transformed whole (round {round})"
        );
    }
    assert_eq!(
        origin.count("/cc/page").await,
        1,
        "rewritten once, then cached"
    );

    // Not text, or compressed: untouched.
    let bin = format!("/cc/bin?ct=application%2Foctet-stream&text={enc}");
    let r = get_plain(edge.http(), "t", &bin).await?;
    assert_eq!(r.text(), text);
    let gz = format!("/cc/gz?ct=text%2Fhtml&ce=gzip&text={enc}");
    let r = get_plain(edge.http(), "t", &gz).await?;
    assert_eq!(r.text(), text, "an encoded body is never rewritten");
    assert_eq!(r.header("content-encoding"), Some("gzip"));

    // Bigger than the plugin's body_buffer, under the open policy: the body
    // goes through whole and untransformed.
    let big = format!("/cc/big?ct=text%2Fplain&repeat=20000&text={enc}");
    let r = get_plain(edge.http(), "t", &big).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), text.len() * 20000);
    assert_eq!(&r.body[..text.len()], text.as_bytes());
    let m = edge.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_plugin_results_total",
            &["body-buffer-exceeded"]
        ) >= 1.0,
        "{m}"
    );

    // The default 1MiB buffer and a closed policy: a body of many chunks is
    // rewritten whole, with its exact length; one over the buffer fails (500).
    let closed = Edge::start(&config_with(
        &origin,
        // A generous deadline: this checks buffering, not speed, on a loaded CI machine.
        &plugin(
            &dist("rewrite")?,
            cfg,
            "failure = \"closed\"\ndeadline = \"2s\"",
        ),
        "",
    ))?;
    let medium = format!("/cc/medium?ct=text%2Fplain&repeat=5000&text={enc}");
    let r = get_plain(closed.http(), "t", &medium).await?;
    assert_eq!(r.status, 200);
    let want_medium =
        "see http://www.example.com/a and https://static.example.com/x; ".repeat(5000);
    assert!(
        r.text() == want_medium,
        "a {}-byte body rewritten whole",
        text.len() * 5000
    );
    assert_eq!(
        r.header("content-length"),
        Some(want_medium.len().to_string().as_str())
    );
    let r = get_plain(closed.http(), "t", &big).await?;
    assert_eq!(r.status, 500, "over body_buffer under the closed policy");
    Ok(())
}

/// A GeoIP database where 127.0.0.0/8 is in Germany.
fn geoip(dir: &TempDir) -> anyhow::Result<String> {
    let csv = dir.path().join("geo.csv");
    std::fs::write(&csv, "127.0.0.0/8,DE,EU,51.0,9.0,\n")?;
    let rows = meridian_dns::geo::parse_csv(&std::fs::read_to_string(&csv)?, &csv)?;
    let db = dir.path().join("geo.mmdb");
    std::fs::write(&db, meridian_dns::geo::build_mmdb(&rows)?)?;
    Ok(db.display().to_string())
}

#[tokio::test]
async fn geo_redirect_uses_the_clients_country() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("geo")?;
    let db = geoip(&dir)?;
    let top = format!("[plugins]\ngeoip = \"{db}\"\n");
    let redirect = r#"'{"rules":[{"countries":["DE","AT"],"redirect":"https://de.example.com{path}","status":302}],"default":"continue"}'"#;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("geo-redirect")?, redirect, ""),
        &top,
    ))?;
    let r = get_plain(edge.http(), "t", "/shop?item=1").await?;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://de.example.com/shop?item=1")
    );
    assert_eq!(origin.requests(), 0);

    let deny = r#"'{"rules":[{"countries":["DE"],"deny":451}],"default":"continue"}'"#;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("geo-redirect")?, deny, ""),
        &top,
    ))?;
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 451);

    let other = r#"'{"rules":[{"countries":["FR"],"deny":451}],"default":"continue"}'"#;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("geo-redirect")?, other, ""),
        &top,
    ))?;
    assert_eq!(get_plain(edge.http(), "t", "/hello").await?.status, 200);
    assert_eq!(origin.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn upstream_proxy_wasm_plugin_behaves_as_in_envoy() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let authz = TestOrigin::start("authz").await?;
    let top = format!(
        "[pools.authz]\norigins = [{{ url = \"{}\" }}]\n",
        authz.url()
    );
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("compat")?, "\"hello-config\"", "failure = \"closed\""),
        &top,
    ))?;
    let n = 5;
    for _ in 0..n {
        let r = get_plain(edge.http(), "t", "/cc/x?hdr=x-powered-by:php").await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-compat-plugin"), Some("upstream-proxy-wasm"));
        assert_eq!(r.header("x-compat-config"), Some("hello-config"));
        assert_eq!(r.header("x-powered-by"), None);
        // The request's headers stay readable in the response phase, as in Envoy.
        assert_eq!(
            r.header("x-compat-request-path"),
            Some("/cc/x?hdr=x-powered-by:php")
        );
    }
    let r = get_plain(edge.http(), "t", "/echo").await?;
    assert_eq!(echoed(&r, "x-compat-seen"), vec!["1".to_string()]);
    let r = get_plain(edge.http(), "t", "/compat-deny").await?;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-compat"), Some("denied"));
    assert_eq!(r.text(), "denied by compat\n");

    // http_call: the plugin asks the authz pool, and resumes or refuses.
    let r = get_plain(edge.http(), "t", "/compat-authz/ok").await?;
    assert_eq!(
        r.status,
        200,
        "resumed and proxied to the origin: {}",
        r.text()
    );
    assert_eq!(echoed(&r, "x-authz-checked"), vec!["200".to_string()]);
    let r = with_header(&edge, "/compat-authz", "x-authz-status", "403").await?;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(authz.requests() >= 2, "the plugin called the authz pool");

    let m = edge.metrics().await?;
    assert!(
        metric(&m, "meridian_plugin_metric", &["compat_requests"]) >= f64::from(n),
        "{m}"
    );
    assert!(metric(&m, "meridian_plugin_results_total", &["\"http-call\""]) >= 2.0);

    // An authz answer slower than the plugin's call timeout: the call fails
    // at the timeout, and the plugin refuses without waiting for the answer.
    let mut slow = get("t", "/compat-authz/slow");
    slow.headers_mut()
        .insert("x-authz-path", "/slow?ms=3000".parse()?);
    slow.headers_mut()
        .insert("x-authz-timeout-ms", "200".parse()?);
    let t0 = std::time::Instant::now();
    let r = Conn::plain(edge.http(), false).await?.send(slow).await?;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        t0.elapsed() < std::time::Duration::from_millis(2500),
        "the call was not cut at its timeout: {:?}",
        t0.elapsed()
    );
    let m = edge.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_plugin_results_total",
            &["\"http-call-failed\""]
        ) >= 1.0
    );

    // Tick timers: the plugin asked for one every 100 ms and counts them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = edge.metrics().await?;
        if metric(&m, "meridian_plugin_metric", &["compat_ticks"]) >= 3.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ticks counted: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // An authz pool that cannot answer: the call fails, the plugin is told
    // so (no :status), and it refuses, as it would under Envoy.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let top = format!("[pools.authz]\norigins = [{{ url = \"http://{dead}\" }}]\n");
    let down = Edge::start(&config_with(
        &origin,
        &plugin(&dist("compat")?, "\"x\"", "failure = \"closed\""),
        &top,
    ))?;
    let r = get_plain(down.http(), "t", "/compat-authz/ok").await?;
    assert_eq!(r.status, 403, "{}", r.text());
    let m = down.metrics().await?;
    assert!(
        metric(&m, "meridian_plugin_results_total", &["http-call-failed"]) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "meridian_plugin_callbacks", &["callbacks"]) > 0.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn request_bodies_go_through_plugins_before_the_origin() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let path = dist("compat")?;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&path, "\"x\"", "failure = \"closed\"\nbody_buffer = 64"),
        "",
    ))?;
    let post = |body: &'static str| req("POST", "t", "/compat-body/echo-body", body);

    // A body with a Content-Length, buffered whole by the plugin: it reaches
    // the origin transformed, with its exact length.
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(post("hello plugin"))
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "HELLO PLUGIN");
    assert_eq!(r.header("x-request-content-length"), Some("12"));
    assert_eq!(r.header("x-request-chunked"), Some("no"));

    // Chunked, in two chunks the plugin holds back until the end: it goes on
    // whole, with a length.
    let reply = raw(
        edge.http(),
        b"POST /compat-body/echo-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await?;
    assert_eq!(raw_status(&reply), Some(200), "{reply}");
    assert!(reply.ends_with("HELLO WORLD"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("x-request-content-length: 11"),
        "{reply}"
    );

    // Refused on its body: the origin never sees the request.
    let before = origin.requests();
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(post("this is forbidden"))
        .await?;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-compat"), Some("body"));
    assert_eq!(r.text(), "body refused\n");
    assert_eq!(
        origin.requests(),
        before,
        "a refused body never reaches the origin"
    );

    // Over the plugin's body_buffer (64 bytes) under the closed policy: 413,
    // and the origin is not contacted.
    let big = "a".repeat(100);
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("POST", "t", "/compat-body/echo-body", big.clone()))
        .await?;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(origin.requests(), before);

    // Paths the plugin does not buffer stream through untouched.
    let r = Conn::plain(edge.http(), false)
        .await?
        .send(req("POST", "t", "/other/echo-body", big.clone()))
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), big);

    // Released chunk by chunk while still arriving: it streams to the origin
    // (chunked, as it came).
    let reply = raw(
        edge.http(),
        b"POST /other/echo-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await?;
    assert_eq!(raw_status(&reply), Some(200), "{reply}");
    assert!(reply.ends_with("hello world"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("x-request-chunked: yes"),
        "{reply}"
    );

    // Under the open policy the plugin is skipped for an over-large body,
    // which goes to the origin untransformed.
    let open = Edge::start(&config_with(
        &origin,
        &plugin(&path, "\"x\"", "failure = \"open\"\nbody_buffer = 64"),
        "",
    ))?;
    let r = Conn::plain(open.http(), false)
        .await?
        .send(req("POST", "t", "/compat-body/echo-body", big.clone()))
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), big);
    let m = open.metrics().await?;
    assert!(
        metric(
            &m,
            "meridian_plugin_results_total",
            &["\"body-buffer-exceeded\""]
        ) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn trailers_go_through_the_plugins_body_stages() -> anyhow::Result<()> {
    // h2 to the origin and to the client, so trailers can travel end to end
    // (gRPC's grpc-status rides in them).
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config_with(
        &origin,
        &plugin(&dist("compat")?, "\"x\"", ""),
        "protocol = \"http2\"\n",
    ))?;
    let mut conn = Conn::plain(edge.http(), true).await?;
    for _ in 0..2 {
        let r = conn
            .send(meridian_e2e::client::req_h2(
                "GET",
                "http",
                "t",
                "/trailers",
                "",
            ))
            .await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "part one, part two");
        // The response went through the plugin (its response-phase header)...
        assert_eq!(r.header("x-compat-plugin"), Some("upstream-proxy-wasm"));
        // ...and its trailers came out the other side.
        let t = r.trailers.as_ref().expect("trailers");
        assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert_eq!(t.get("x-trailer").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    }
    Ok(())
}
