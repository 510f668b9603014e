//! HTTP caching conformance through the real binary: how the cache reads
//! `Age`, `Expires`, repeated or invalid `Cache-Control` directives and
//! `Vary`'d request fields, and what a 304 updates (RFC 9110, RFC 9111).
//!
//! A scripted origin writes its responses byte for byte, so a test can send
//! what the shared test origin cannot: repeated field lines, and 304s that
//! carry any field.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meridian_e2e::client::{Conn, Resp, get};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;
use meridian_edge::cache::policy::fmt_http_date;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::{Edge, basic_config};

const HOST: &str = "conformance.test";

/// A request as the scripted origin saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    /// How many requests for this path came before this one.
    n: usize,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response the scripted origin writes as given (it adds only
/// `Content-Length`, and no body for a 304). Status 0 closes the connection
/// without an answer.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn new(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
        Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            body: body.to_string(),
        }
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// An HTTP/1.1 origin whose answers a closure writes.
struct Scripted {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Handler = Arc::new(handler);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, handler) = (s.clone(), handler.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &seen, &handler).await;
                });
            }
        });
        Ok(Scripted { addr, seen, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self, path: &str) -> usize {
        self.requests(path).len()
    }

    fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    seen: &Mutex<Vec<Seen>>,
    handler: &Handler,
) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let req = {
            let mut all = seen.lock().expect("seen");
            let n = all.iter().filter(|s| s.path == path).count();
            let req = Seen { path, headers, n };
            all.push(req.clone());
            req
        };
        let reply = handler(&req);
        if reply.status == 0 {
            return Ok(()); // status 0: close without an answer
        }
        let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if reply.status != 304 {
            out.push_str(&format!("content-length: {}\r\n", reply.body.len()));
        }
        out.push_str("\r\n");
        if reply.status != 304 {
            out.push_str(&reply.body);
        }
        w.write_all(out.as_bytes()).await?;
    }
}

/// An IMF-fixdate `secs` seconds from now.
fn date(secs: i64) -> String {
    let now = SystemTime::now();
    let d = Duration::from_secs(secs.unsigned_abs());
    fmt_http_date(if secs >= 0 { now + d } else { now - d })
}

fn config(origin: &str) -> String {
    format!(
        "{}\n[pools.main.retry]\nattempts = 1\n[pools.main.passive]\nmax_failures = 0\n",
        basic_config(&[origin.to_string()], "")
    )
}

/// A GET with these header lines (a repeated name sends several lines).
async fn fetch(edge: &Edge, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    let mut r = get(HOST, path);
    for (k, v) in headers {
        r.headers_mut()
            .append(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    Conn::plain(edge.http(), false).await?.send(r).await
}

fn cache_status(r: &Resp) -> &str {
    r.header("cache-status").unwrap_or("")
}

fn is_hit(r: &Resp) -> bool {
    cache_status(r).starts_with("meridian; hit")
}

/// Whether a request for `path` is soon answered from the cache.
async fn becomes_hit(edge: &Edge, path: &str, headers: &[(&str, &str)]) -> bool {
    eventually(Duration::from_secs(5), || async {
        fetch(edge, path, headers).await.is_ok_and(|r| is_hit(&r))
    })
    .await
}

/// Fetches `path` twice, giving the first response time to be stored, and
/// returns the second.
async fn fetch_twice(edge: &Edge, path: &str) -> anyhow::Result<Resp> {
    fetch(edge, path, &[]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fetch(edge, path, &[]).await
}

#[tokio::test]
async fn rfc9111_5_1_age_uses_the_first_member_and_ignores_an_invalid_one() -> anyhow::Result<()> {
    // max-age=3600 with an Age of 7200 is stale; with 0 it is fresh.
    let origin = Scripted::start(|req| {
        let ages: &[&str] = match req.path.as_str() {
            "/age/list-first-zero" => &["0, 7200"],
            "/age/lines-first-zero" => &["0", "7200"],
            "/age/list-first-invalid" => &["abc, 7200"],
            "/age/list-first-old" => &["7200, 0"],
            _ => &[],
        };
        let date = date(0);
        let mut h = vec![("cache-control", "max-age=3600"), ("date", date.as_str())];
        h.extend(ages.iter().map(|a| ("age", *a)));
        Reply::new(200, &h, &format!("{} #{}", req.path, req.n))
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    for path in [
        "/age/list-first-zero",
        "/age/lines-first-zero",
        "/age/list-first-invalid",
    ] {
        fetch(&edge, path, &[]).await?;
        assert!(becomes_hit(&edge, path, &[]).await, "{path} is fresh");
        let r = fetch(&edge, path, &[]).await?;
        let age: u64 = r.header("age").unwrap_or("").parse()?;
        assert!(age < 60, "{path}: Age {age}");
        assert_eq!(origin.count(path), 1, "{path}");
    }
    let path = "/age/list-first-old";
    let r = fetch_twice(&edge, path).await?;
    assert!(
        cache_status(&r).contains("fwd=stale"),
        "{path}: {}",
        cache_status(&r)
    );
    assert_eq!(origin.count(path), 2);
    Ok(())
}

#[tokio::test]
async fn rfc9111_4_2_expires_dates_match_case_insensitively() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin.url()))?;
    for (i, expires) in [
        "thu, 01 jan 2099 00:00:00 gmt",
        "THU, 01 JAN 2099 00:00:00 GMT",
        "thu jan  1 00:00:00 2099",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/cc/exp{i}?expires={}", expires.replace(' ', "%20"));
        fetch(&edge, &path, &[]).await?;
        assert!(becomes_hit(&edge, &path, &[]).await, "Expires: {expires}");
        assert_eq!(origin.count(&format!("/cc/exp{i}")).await, 1, "{expires}");
    }
    // A zone other than GMT is invalid for expiration (RFC 9111 §4.2).
    let path = "/cc/exp-utc?expires=Thu,%2001%20Jan%202099%2000:00:00%20UTC";
    let r = fetch_twice(&edge, path).await?;
    assert!(!is_hit(&r), "{}", cache_status(&r));
    assert_eq!(origin.count("/cc/exp-utc").await, 2);
    Ok(())
}

#[tokio::test]
async fn rfc9111_4_2_1_repeated_and_invalid_cache_control_directives() -> anyhow::Result<()> {
    let origin = Scripted::start(|req| {
        let cc: &[&str] = match req.path.as_str() {
            "/cc/quoted" => &["max-age=\"3600\""],
            "/cc/same-twice" => &["max-age=3600", "max-age=3600"],
            "/cc/leading-zeros" => &["max-age=003600"],
            "/cc/space-before-equals" => &["max-age =3600"],
            "/cc/space-after-equals" => &["max-age= 3600"],
            "/cc/trailing-alpha" => &["max-age=3600a"],
            "/cc/decimal" => &["max-age=3600.0"],
            "/cc/single-quoted" => &["max-age='3600'"],
            "/cc/fresh-then-stale" => &["max-age=3600, max-age=1"],
            "/cc/fresh-then-stale-lines" => &["max-age=3600", "max-age=1"],
            "/cc/max-age-and-no-cache" => &["max-age=3600, no-cache"],
            _ => &[],
        };
        let mut h: Vec<(&str, &str)> = cc.iter().map(|c| ("cache-control", *c)).collect();
        h.push(("content-type", "text/plain"));
        Reply::new(200, &h, &format!("{} #{}", req.path, req.n))
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    // Recipients accept the quoted form (§5.2) and a repeated identical value.
    for path in ["/cc/quoted", "/cc/same-twice", "/cc/leading-zeros"] {
        fetch(&edge, path, &[]).await?;
        assert!(becomes_hit(&edge, path, &[]).await, "{path} is reused");
        assert_eq!(origin.count(path), 1, "{path}");
    }
    // Invalid values (§1.2.2, §5.2 grammar) and conflicting repeats mean
    // stale (§4.2.1); so does max-age next to no-cache (most restrictive).
    for path in [
        "/cc/space-before-equals",
        "/cc/space-after-equals",
        "/cc/trailing-alpha",
        "/cc/decimal",
        "/cc/single-quoted",
        "/cc/fresh-then-stale",
        "/cc/fresh-then-stale-lines",
        "/cc/max-age-and-no-cache",
    ] {
        let r = fetch_twice(&edge, path).await?;
        assert!(!is_hit(&r), "{path} was reused: {}", cache_status(&r));
        assert_eq!(origin.count(path), 2, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn rfc9111_4_1_vary_normalises_request_fields_by_their_grammar() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let edge = Edge::start(&config(&origin.url()))?;
    // Each request is stored under its field value; one that differs only in
    // what the field's grammar makes insignificant (OWS, case of language
    // tags and codings, several lines, the spelling of a weight) is the
    // same variant, served from the cache.
    let cases: [(&str, &str, &[&[&str]], &str); 2] = [
        (
            "/cc/lang?cc=max-age%3D60&vary=Accept-Language",
            "accept-language",
            &[
                &["en-US, fr;q=0.5"],
                &["en-us,fr;q=0.5"],
                &["EN-US ,  FR ; Q=0.50"],
                &["en-US", "fr;q=0.500"],
            ],
            // Order carries preference: another variant.
            "fr;q=0.5, en-US",
        ),
        (
            "/cc/enc?cc=max-age%3D60&vary=Accept-Encoding",
            "accept-encoding",
            &[
                &["gzip,  br"],
                &["gzip, br"],
                &["GZIP,br"],
                &["gzip", "br"],
                &["gzip;q=1, br;q=1.0"],
            ],
            "gzip;q=0.9, br",
        ),
    ];
    for (path, field, same, other) in cases {
        let lines = |values: &[&str]| -> Vec<(&str, String)> {
            values.iter().map(|v| (field, (*v).to_string())).collect()
        };
        let first = lines(same[0]);
        let first: Vec<(&str, &str)> = first.iter().map(|(k, v)| (*k, v.as_str())).collect();
        fetch(&edge, path, &first).await?;
        assert!(becomes_hit(&edge, path, &first).await, "{first:?}");
        for values in &same[1..] {
            let h = lines(values);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = fetch(&edge, path, &h).await?;
            assert!(is_hit(&r), "{h:?}: {}", cache_status(&r));
        }
        let r = fetch(&edge, path, &[(field, other)]).await?;
        assert!(
            cache_status(&r).contains("fwd=vary-miss"),
            "{other}: {}",
            cache_status(&r)
        );
        let origin_path = path.split('?').next().unwrap_or(path);
        assert_eq!(origin.count(origin_path).await, 2, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn rfc9111_3_2_a_304_updates_the_stored_fields_it_carries() -> anyhow::Result<()> {
    let origin = Scripted::start(|req| {
        let etag = "\"v1\"";
        if req.header("if-none-match") == Some(etag) {
            let (date, expires) = (date(0), date(3600));
            return Reply::new(
                304,
                &[
                    ("cache-control", "max-age=3600"),
                    ("etag", etag),
                    ("date", &date),
                    ("expires", &expires),
                    ("x-test-header", "B"),
                    ("content-type", "text/plain;charset=utf-8"),
                    ("content-location", "/bar"),
                    ("content-encoding", "identity"),
                    ("x-frame-options", "sameorigin"),
                    ("link", "</c>; rel=preload"),
                    ("proxy-authentication-info", "nextnonce=\"x\""),
                ],
                "",
            );
        }
        let (date, expires) = (date(0), date(1));
        Reply::new(
            200,
            &[
                ("cache-control", "max-age=1"),
                ("etag", etag),
                ("date", &date),
                ("expires", &expires),
                ("x-test-header", "A"),
                ("x-kept", "K"),
                ("content-type", "text/plain"),
                ("content-location", "/foo"),
                ("x-frame-options", "deny"),
                ("link", "</a>; rel=preload"),
                ("link", "</b>; rel=preload"),
            ],
            &format!("body #{}", req.n),
        )
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    let path = "/update";
    let r1 = fetch(&edge, path, &[]).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Stale: revalidated with the stored ETag, and the origin says 304.
    let r2 = fetch(&edge, path, &[]).await?;
    assert!(
        cache_status(&r2).contains("fwd-status=304"),
        "{}",
        cache_status(&r2)
    );
    assert_eq!(origin.count(path), 2);
    // Both the response to the revalidating request and later hits carry
    // the 304's fields; the stored body and its length are untouched.
    let r3 = fetch(&edge, path, &[]).await?;
    assert!(is_hit(&r3), "{}", cache_status(&r3));
    assert_eq!(origin.count(path), 2);
    for r in [&r2, &r3] {
        assert_eq!(r.body, r1.body);
        assert_eq!(
            r.header("content-length"),
            Some(r1.body.len().to_string().as_str())
        );
        assert_eq!(r.header("x-test-header"), Some("B"));
        assert_eq!(r.header("x-kept"), Some("K"));
        assert_eq!(r.header("content-type"), Some("text/plain;charset=utf-8"));
        assert_eq!(r.header("content-location"), Some("/bar"));
        assert_eq!(r.header("content-encoding"), Some("identity"));
        assert_eq!(r.header("x-frame-options"), Some("sameorigin"));
        assert_eq!(r.header("cache-control"), Some("max-age=3600"));
        let links: Vec<_> = r.headers.get_all("link").iter().collect();
        assert_eq!(
            links,
            ["</c>; rel=preload"],
            "all lines of a field are replaced"
        );
        // Fields specific to the proxy connection are never stored (§3.1).
        assert_eq!(r.header("proxy-authentication-info"), None);
    }
    Ok(())
}

/// A `Set-Cookie` on a 304 is no more stored than one on a 200: the client
/// after a revalidation never gets the revalidating request's cookie.
#[tokio::test]
async fn a_304_set_cookie_is_never_stored() -> anyhow::Result<()> {
    let origin = Scripted::start(|req| {
        let etag = "\"v1\"";
        if req.header("if-none-match") == Some(etag) {
            return Reply::new(
                304,
                &[
                    ("cache-control", "max-age=3600"),
                    ("etag", etag),
                    ("set-cookie", "sess=alice"),
                ],
                "",
            );
        }
        Reply::new(
            200,
            &[("cache-control", "max-age=1"), ("etag", etag)],
            "body",
        )
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    let path = "/cookie304";
    fetch(&edge, path, &[]).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let revalidated = fetch(&edge, path, &[]).await?;
    assert!(
        cache_status(&revalidated).contains("fwd-status=304"),
        "{}",
        cache_status(&revalidated)
    );
    let later = fetch(&edge, path, &[]).await?;
    assert!(is_hit(&later), "{}", cache_status(&later));
    assert_eq!(
        later.header("set-cookie"),
        None,
        "alice's cookie is not replayed"
    );
    Ok(())
}

/// RFC 9111 §3.3 and §3.4: a 206 is stored; a range inside it is served
/// from it; parts of one representation (same strong validator, touching
/// ranges) combine; once they cover the representation, a plain GET is
/// served from the combination. A part with another validator replaces,
/// and never combines with, the stored one.
#[tokio::test]
async fn rfc9111_3_4_partial_responses_are_stored_and_combined() -> anyhow::Result<()> {
    const BODY: &str = "0123456789abcdefghij";
    let origin = Scripted::start(|req| {
        let etag = if req.path == "/changed" && req.n >= 1 {
            "\"v2\""
        } else {
            "\"v1\""
        };
        let range = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
        match range {
            Some((a, b)) if a <= b && b < BODY.len() => {
                let cr = format!("bytes {a}-{b}/{}", BODY.len());
                Reply::new(
                    206,
                    &[
                        ("cache-control", "max-age=300"),
                        ("etag", etag),
                        ("content-range", cr.as_str()),
                    ],
                    &BODY[a..=b],
                )
            }
            // This origin serves ranges only: the edge's background fill of
            // the whole fails, so only stored parts can make a hit.
            _ => Reply::new(0, &[], ""),
        }
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    let path = "/part";
    let ranges = |path: &'static str| {
        let origin = &origin;
        move || {
            origin
                .requests(path)
                .iter()
                .filter(|s| s.header("range").is_some())
                .count()
        }
    };
    let part_requests = ranges(path);

    let r = fetch(&edge, path, &[("range", "bytes=0-4")]).await?;
    assert_eq!((r.status, r.text()), (206, "01234".to_string()));
    // A range inside the stored part is a hit.
    let hit = eventually(Duration::from_secs(5), || async {
        fetch(&edge, path, &[("range", "bytes=1-3")])
            .await
            .is_ok_and(|r| r.status == 206 && r.text() == "123" && is_hit(&r))
    })
    .await;
    assert!(hit, "a range inside the stored 206 is served from it");
    let r = fetch(&edge, path, &[("range", "bytes=1-3")]).await?;
    assert_eq!(r.header("content-range"), Some("bytes 1-3/20"));
    assert!(cache_status(&r).contains("partial"), "{}", cache_status(&r));
    assert_eq!(part_requests(), 1);

    // A range beyond it goes to the origin; the two parts combine.
    let r = fetch(&edge, path, &[("range", "bytes=5-9")]).await?;
    assert_eq!((r.status, r.text()), (206, "56789".to_string()));
    let hit = eventually(Duration::from_secs(5), || async {
        fetch(&edge, path, &[("range", "bytes=3-7")])
            .await
            .is_ok_and(|r| r.status == 206 && r.text() == "34567" && is_hit(&r))
    })
    .await;
    assert!(
        hit,
        "a range across both parts is served from their combination"
    );
    assert_eq!(part_requests(), 2);

    // The last part completes the representation: a plain GET is a hit.
    let r = fetch(&edge, path, &[("range", "bytes=10-19")]).await?;
    assert_eq!((r.status, r.text()), (206, "abcdefghij".to_string()));
    assert!(
        becomes_hit(&edge, path, &[]).await,
        "the combined parts answer a GET of the whole"
    );
    let r = fetch(&edge, path, &[]).await?;
    assert_eq!((r.status, r.text()), (200, BODY.to_string()));
    assert_eq!(r.header("content-length"), Some("20"));
    assert!(r.header("content-range").is_none());
    assert_eq!(part_requests(), 3);

    // Another validator: the new part replaces the old, never combines.
    let path = "/changed";
    let changed_parts = ranges(path);
    fetch(&edge, path, &[("range", "bytes=0-4")]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = fetch(&edge, path, &[("range", "bytes=5-9")]).await?;
    assert_eq!(r.header("etag"), Some("\"v2\""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = fetch(&edge, path, &[("range", "bytes=3-7")]).await?;
    assert!(
        !is_hit(&r),
        "parts of two representations: {}",
        cache_status(&r)
    );
    assert_eq!(r.text(), "34567");
    assert_eq!(changed_parts(), 3);
    Ok(())
}

/// RFC 9111 §4.2.4 and §5.2.1.2: a stale object the client accepts with
/// `max-stale` is served as it is, without a request to the origin (the
/// cache machine's `Lookup::Stale`); without `max-stale` it is revalidated.
#[tokio::test]
async fn rfc9111_5_2_1_2_max_stale_serves_a_stale_object_unrevalidated() -> anyhow::Result<()> {
    let origin = Scripted::start(|req| {
        Reply::new(
            200,
            &[("cache-control", "max-age=1"), ("etag", "\"v1\"")],
            &format!("body #{}", req.n),
        )
    })
    .await?;
    let edge = Edge::start(&config(&origin.url()))?;
    let path = "/max-stale";
    let r1 = fetch(&edge, path, &[]).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r2 = fetch(&edge, path, &[("cache-control", "max-stale=60")]).await?;
    assert!(is_hit(&r2), "{}", cache_status(&r2));
    assert!(
        cache_status(&r2).contains("detail=max-stale"),
        "{}",
        cache_status(&r2)
    );
    assert_eq!(r2.body, r1.body);
    assert_eq!(origin.count(path), 1, "no request to the origin");
    // Too stale for the client's bound: revalidated.
    let r3 = fetch(&edge, path, &[("cache-control", "max-stale=0")]).await?;
    assert!(!is_hit(&r3), "{}", cache_status(&r3));
    assert_eq!(origin.count(path), 2);
    Ok(())
}
