//! Transactional reload (issue #13): a reload whose new listener cannot bind
//! (its TCP port, or the UDP port of its HTTP/3) is refused, through the
//! admin API and through SIGHUP, and leaves every listener, the ALPN of a
//! listener it would have changed, and the pools exactly as they were; the
//! TCP and QUIC listeners keep serving.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use meridian_e2e::client::{Conn, H3Conn, get, get_plain, req, req_h2};
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;

use crate::{Edge, Pki, metric};

/// The edge's config: a plain listener, a TLS listener (with HTTP/3) whose
/// ALPN is `alpn`, `extra` listeners after them, one pool.
fn config(pki: &Pki, origin: &str, plain: &str, tls: &str, alpn: &str, extra: &str) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:0"

[log]
access_log = "off"

[[listeners]]
address = "{plain}"

[[listeners]]
address = "{tls}"
tls = true
alpn = {alpn}

{extra}

[[tls.certificates]]
cert = "{}"
key = "{}"
default = true

[[sites]]
hosts = ["*"]
pool = "main"

[pools.main]
origins = [{{ url = "{origin}" }}]
"#,
        pki.a.cert.display(),
        pki.a.key.display(),
    )
}

async fn reload_status(edge: &Edge) -> anyhow::Result<(u16, String)> {
    let r = Conn::plain(edge.admin(), false)
        .await?
        .send(req("POST", "admin", "/reload", ""))
        .await?;
    Ok((r.status, r.text()))
}

async fn refused(edge: &Edge) -> anyhow::Result<f64> {
    Ok(metric(
        &edge.metrics().await?,
        "meridian_config_reloads_total",
        &["refused"],
    ))
}

/// Everything the edge served before the refused reload still serves, as
/// before: h1 on the plain listener (a connection opened before included),
/// h2 by ALPN and h3 on the TLS listener (an h3 connection opened before
/// included), all from origin `a`.
async fn still_serving(
    edge: &Edge,
    pki: &Pki,
    kept: &mut Conn,
    kept_h3: &mut H3Conn,
) -> anyhow::Result<()> {
    let r = get_plain(edge.http(), "t", "/hello").await?;
    assert_eq!((r.status, r.header("x-origin")), (200, Some("a")));
    let r = kept.send(get("t", "/hello")).await?;
    assert_eq!((r.status, r.header("x-origin")), (200, Some("a")));
    let mut h2 = Conn::tls(edge.https(), &pki.tls("a.test", &["h2"])?).await?;
    let r = h2
        .send(req_h2("GET", "https", "a.test", "/hello", ""))
        .await?;
    assert_eq!(
        (r.status, r.version, r.header("x-origin")),
        (200, http::Version::HTTP_2, Some("a"))
    );
    let r = kept_h3
        .send("GET", "a.test", "/hello", Bytes::new())
        .await?;
    assert_eq!((r.status, r.header("x-origin")), (200, Some("a")));
    let mut h3 = H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
    let r = h3.send("GET", "a.test", "/hello", Bytes::new()).await?;
    assert_eq!(
        (r.status, r.version, r.header("x-origin")),
        (200, http::Version::HTTP_3, Some("a"))
    );
    Ok(())
}

struct Setup {
    a: TestOrigin,
    b: TestOrigin,
    _dir: meridian_e2e::certs::TempDir,
    pki: Pki,
    edge: Edge,
    kept: Conn,
    kept_h3: H3Conn,
}

async fn setup() -> anyhow::Result<Setup> {
    let a = TestOrigin::start("a").await?;
    let b = TestOrigin::start("b").await?;
    let dir = meridian_e2e::certs::TempDir::new("reload-pki")?;
    let pki = Pki::new(dir.path())?;
    let alpn = r#"["h2", "http/1.1"]"#;
    let edge = Edge::start(&config(
        &pki,
        &a.url(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        alpn,
        "",
    ))?;
    let kept = Conn::plain(edge.http(), false).await?;
    let kept_h3 = H3Conn::connect(edge.https(), &pki.tls("a.test", &[])?).await?;
    let mut s = Setup {
        a,
        b,
        _dir: dir,
        pki,
        edge,
        kept,
        kept_h3,
    };
    still_serving(&s.edge, &s.pki, &mut s.kept, &mut s.kept_h3).await?;
    Ok(s)
}

impl Setup {
    /// A new config: the pool moved to origin `b`, the TLS listener's ALPN
    /// changed to http/1.1 only, and `extra` added after it.
    fn changed(&self, extra: &str) -> String {
        config(
            &self.pki,
            &self.b.url(),
            &self.edge.http().to_string(),
            &self.edge.https().to_string(),
            r#"["http/1.1"]"#,
            extra,
        )
    }

    /// Refused twice, by the admin API (422, naming `why`) and by SIGHUP;
    /// afterwards everything serves as before.
    async fn refused_both_ways(&mut self, why: &str) -> anyhow::Result<()> {
        let before = refused(&self.edge).await?;
        let (status, text) = reload_status(&self.edge).await?;
        assert_eq!(status, 422, "{text}");
        assert!(text.contains(why), "{text}");
        still_serving(&self.edge, &self.pki, &mut self.kept, &mut self.kept_h3).await?;
        self.edge.signal(Signal::SIGHUP)?;
        let mut n = 0.0;
        for _ in 0..200 {
            n = refused(&self.edge).await?;
            if n >= before + 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(n, before + 2.0, "the SIGHUP reload was not refused");
        still_serving(&self.edge, &self.pki, &mut self.kept, &mut self.kept_h3).await?;
        assert!(self.a.count("/hello").await >= 15);
        assert_eq!(self.b.count("/hello").await, 0);
        Ok(())
    }

    /// The new config, once the port is free: taken in whole.
    async fn accepted(&mut self, new: SocketAddr, tls: bool) -> anyhow::Result<()> {
        let (status, text) = reload_status(&self.edge).await?;
        assert_eq!(status, 200, "{text}");
        let r = get_plain(self.edge.http(), "t", "/hello").await?;
        assert_eq!(r.header("x-origin"), Some("b"));
        if tls {
            let mut h3 = H3Conn::connect(new, &self.pki.tls("a.test", &[])?).await?;
            let r = h3.send("GET", "a.test", "/hello", Bytes::new()).await?;
            assert_eq!((r.status, r.header("x-origin")), (200, Some("b")));
        } else {
            let r = get_plain(new, "t", "/hello").await?;
            assert_eq!((r.status, r.header("x-origin")), (200, Some("b")));
        }
        // The ALPN change took effect on the kept TCP socket: h2 is no longer offered.
        let mut tls = Conn::tls(
            self.edge.https(),
            &self.pki.tls("a.test", &["h2", "http/1.1"])?,
        )
        .await?;
        let r = tls.send(get("a.test", "/hello")).await?;
        assert_eq!(
            (r.version, r.header("x-origin")),
            (http::Version::HTTP_11, Some("b"))
        );
        // HTTP/3 on the kept UDP sockets, under the new settings.
        let mut h3 = H3Conn::connect(self.edge.https(), &self.pki.tls("a.test", &[])?).await?;
        let r = h3.send("GET", "a.test", "/hello", Bytes::new()).await?;
        assert_eq!((r.status, r.header("x-origin")), (200, Some("b")));
        Ok(())
    }
}

#[tokio::test]
async fn a_reload_whose_tcp_port_is_taken_changes_nothing() -> anyhow::Result<()> {
    let mut s = setup().await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?;
    s.edge
        .rewrite(&s.changed(&format!("[[listeners]]\naddress = \"{port}\"\n")))?;
    s.refused_both_ways(&format!("cannot bind {port}")).await?;
    drop(taken);
    s.accepted(port, false).await?;
    Ok(())
}

#[tokio::test]
async fn a_reload_whose_http3_udp_port_is_taken_changes_nothing() -> anyhow::Result<()> {
    let mut s = setup().await?;
    // A UDP port taken by another socket, whose TCP port is free.
    let mut found = None;
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?;
        if std::net::TcpListener::bind(port).is_ok() {
            found = Some((udp, port));
            break;
        }
    }
    let (udp, port) = found.ok_or_else(|| anyhow::anyhow!("no UDP port with a free TCP twin"))?;
    s.edge.rewrite(&s.changed(&format!(
        "[[listeners]]\naddress = \"{port}\"\ntls = true\n"
    )))?;
    s.refused_both_ways(&port.to_string()).await?;
    // The TCP socket the refused reload had bound for it is closed again.
    drop(std::net::TcpListener::bind(port)?);
    drop(udp);
    s.accepted(port, true).await?;
    Ok(())
}
