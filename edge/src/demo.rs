//! The embedded demo: a built-in origin with realistic pages, a self-signed
//! certificate for `localhost`, and a config that fronts the origin. Running
//! `meridian-edge` with no arguments starts all of it.
//!
//! The origin is also available alone (`meridian-edge origin`), for trying
//! things out and for the benchmarks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

type DemoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> DemoBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

const INDEX: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Meridian demo origin</title></head>
<body>
<h1>Meridian demo</h1>
<p>This page comes from the built-in demo origin, through meridian-edge.</p>
<ul>
<li><a href="/api/items">/api/items</a>: JSON</li>
<li><a href="/img/logo.png">/img/logo.png</a>: an image</li>
<li><a href="/large?mb=64">/large?mb=64</a>: a large file, streamed</li>
<li><a href="/slow?ms=2000">/slow?ms=2000</a>: a slow endpoint</li>
<li><a href="/cache/public">/cache/public</a>: Cache-Control: public, max-age=60, with validators</li>
<li><a href="/cache/swr">/cache/swr</a>: stale-while-revalidate and stale-if-error</li>
<li><a href="/cache/private">/cache/private</a> and <a href="/cache/no-store">/cache/no-store</a></li>
<li><a href="/echo">/echo</a>: the request as the origin saw it</li>
<li><a href="/status/503">/status/503</a>: any status</li>
</ul>
</body></html>
"#;

fn query_u64(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn respond(status: StatusCode, ctype: &'static str, body: DemoBody) -> Response<DemoBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The demo origin's routes.
pub async fn origin_handle(req: Request<Incoming>) -> Response<DemoBody> {
    let path = req.uri().path().to_string();
    let started = http_date(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600));
    match path.as_str() {
        "/" | "/index.html" => {
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", full(INDEX));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=30"),
            );
            r
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", full("ok\n")),
        "/api/items" => {
            let body = r#"{"items":[{"id":1,"name":"anvil","price_cents":4999},{"id":2,"name":"rocket skates","price_cents":12900},{"id":3,"name":"giant magnet","price_cents":2500}],"count":3}"#;
            let mut r = respond(StatusCode::OK, "application/json", full(body));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=10"),
            );
            r
        }
        "/img/logo.png" => {
            let mut r = respond(StatusCode::OK, "image/png", full(logo_png()));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400, immutable"),
            );
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_static("\"logo-v1\""));
            r
        }
        "/large" => {
            let mb = query_u64(&req, "mb", 64).min(4096);
            let total = mb * 1024 * 1024;
            let chunk = Bytes::from(vec![b'm'; 64 * 1024]);
            let n = total / chunk.len() as u64;
            let stream = futures_util::stream::iter(
                (0..n).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
            );
            let mut r = respond(
                StatusCode::OK,
                "application/octet-stream",
                BodyExt::boxed(StreamBody::new(stream)),
            );
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n * 64 * 1024));
            r
        }
        "/slow" => {
            let ms = query_u64(&req, "ms", 2000).min(60_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            respond(
                StatusCode::OK,
                "text/plain",
                full(format!("waited {ms} ms\n")),
            )
        }
        "/cache/public" => {
            let etag = "\"public-v1\"";
            if req
                .headers()
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v.as_bytes() == etag.as_bytes())
            {
                let mut r = respond(StatusCode::NOT_MODIFIED, "text/plain", full(Bytes::new()));
                r.headers_mut()
                    .insert(header::ETAG, HeaderValue::from_static("\"public-v1\""));
                return r;
            }
            let mut r = respond(
                StatusCode::OK,
                "text/plain",
                full("cacheable for a minute\n"),
            );
            let h = r.headers_mut();
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            );
            h.insert(header::ETAG, HeaderValue::from_static("\"public-v1\""));
            if let Ok(v) = HeaderValue::from_str(&started) {
                h.insert(header::LAST_MODIFIED, v);
            }
            h.insert("surrogate-key", HeaderValue::from_static("demo public"));
            r
        }
        "/cache/swr" => {
            let mut r = respond(
                StatusCode::OK,
                "text/plain",
                full(format!(
                    "generated at {}\n",
                    http_date(std::time::SystemTime::now())
                )),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(
                    "max-age=5, stale-while-revalidate=30, stale-if-error=300",
                ),
            );
            r
        }
        "/cache/private" => {
            let mut r = respond(StatusCode::OK, "text/plain", full("for your eyes only\n"));
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=60"),
            );
            r
        }
        "/cache/no-store" => {
            let mut r = respond(StatusCode::OK, "text/plain", full("never stored\n"));
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        "/echo" => {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            let json = serde_json::json!({ "method": method, "uri": uri, "version": version, "headers": headers, "body_bytes": n });
            respond(StatusCode::OK, "application/json", full(json.to_string()))
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..]
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok());
            match code {
                Some(c) if c.as_u16() >= 200 => respond(c, "text/plain", full(format!("{c}\n"))),
                _ => respond(StatusCode::BAD_REQUEST, "text/plain", full("bad status\n")),
            }
        }
        _ if req.method() == Method::OPTIONS => {
            let mut r = respond(StatusCode::NO_CONTENT, "text/plain", full(Bytes::new()));
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, OPTIONS"),
            );
            r
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", full("not found\n")),
    }
}

/// Serves the demo origin on `listener` forever (HTTP/1.1 and h2c).
pub async fn serve_origin(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                service_fn(|req| async move { Ok::<_, Infallible>(origin_handle(req).await) });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Formats an IMF-fixdate (RFC 9110 §5.6.7).
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let iso = crate::accesslog::rfc3339(t);
    let (y, m, d) = (&iso[0..4], &iso[5..7], &iso[8..10]);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][m.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    format!(
        "{weekday}, {d} {month} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A 64x64 RGB gradient as a valid PNG (stored deflate blocks, no compressor needed).
pub fn logo_png() -> Vec<u8> {
    const W: u32 = 64;
    let mut raw = Vec::with_capacity(((W * 3 + 1) * W) as usize);
    for y in 0..W {
        raw.push(0); // filter: none
        for x in 0..W {
            raw.extend_from_slice(&[(x * 4) as u8, (y * 4) as u8, 0x90]);
        }
    }
    let mut z = vec![0x78, 0x01];
    for (i, block) in raw.chunks(65535).enumerate() {
        let last = (i + 1) * 65535 >= raw.len();
        z.push(u8::from(last));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&W.to_be_bytes());
    ihdr.extend_from_slice(&W.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for (kind, data) in [
        (b"IHDR", ihdr.as_slice()),
        (b"IDAT", z.as_slice()),
        (b"IEND", &[][..]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Writes a self-signed certificate for localhost into `dir`; returns (cert, key).
pub fn write_self_signed(dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let cert = dir.join("localhost.pem");
    let key = dir.join("localhost.key");
    std::fs::write(&cert, ck.cert.pem())?;
    write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(data)
    }
    #[cfg(not(unix))]
    std::fs::write(path, data)
}

/// The demo config, fronting the origin at `origin`.
pub fn config_toml(
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    origin: SocketAddr,
    cert: &Path,
    key: &Path,
) -> String {
    format!(
        r#"# The embedded demo config (meridian-edge with no arguments).
[admin]
listen = "{admin}"

[log]
access_log = "stdout"

[[listeners]]
address = "{http}"

[[listeners]]
address = "{https}"
tls = true

[[tls.certificates]]
cert = "{cert}"
key = "{key}"
default = true

[[sites]]
hosts = ["*"]
pool = "demo"

[pools.demo]
origins = [{{ url = "http://{origin}" }}]

[pools.demo.health_check]
path = "/healthz"
interval = "5s"
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_is_well_formed() {
        let png = logo_png();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.ends_with(&[0xae, 0x42, 0x60, 0x82]), "IEND CRC");
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            http_date(std::time::UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }
}
