//! Sockets handed to the edge at start: systemd socket activation
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), done here the way systemd
//! does it: the test binds the sockets, places them at descriptors 3.. of
//! the child, and sets the variables (`LISTEN_PID` through `sh -c 'exec'`,
//! so it is the edge's own pid).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_e2e::certs::TempDir;
use meridian_e2e::client::{H3Conn, get_plain};
use meridian_e2e::origin::TestOrigin;

use crate::{Pki, bin};

struct Activated {
    child: Child,
    lines: Vec<String>,
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Places `fds` at descriptors 3, 4… of the child, before exec.
#[allow(unsafe_code)]
fn pass_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and
    // exec, on descriptors this process owns and keeps open until spawn.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may sit at 3..), then in place.
            let mut high = Vec::with_capacity(fds.len());
            for &fd in &fds {
                let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, &h) in high.iter().enumerate() {
                // dup2 leaves the new descriptor without FD_CLOEXEC.
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn start_activated(
    config: &std::path::Path,
    fds: Vec<RawFd>,
    names: &str,
) -> anyhow::Result<Activated> {
    meridian_e2e::init();
    let n = fds.len().to_string();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(bin())
        .arg(config)
        .env("LISTEN_FDS", &n)
        .env("LISTEN_FDNAMES", names)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    pass_fds(&mut cmd, fds);
    let mut child = cmd.spawn()?;
    let rx = crate::stdout_lines(&mut child)?;
    let mut a = Activated {
        child,
        lines: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            anyhow::bail!(
                "the edge did not become ready (exit: {:?}; its stderr is above)",
                a.child.try_wait()?
            );
        };
        if line == "meridian-edge: ready" {
            return Ok(a);
        }
        a.lines.push(line);
    }
}

/// The edge started with four sockets the "service manager" (the test)
/// bound: a plain listener, a TLS listener and its UDP socket for HTTP/3,
/// and the admin listener. It serves h1, h3 and the admin API on them. It
/// cannot have bound them itself: the test still holds every one of them,
/// bound without SO_REUSEPORT, so a bind of its own would fail (and the
/// edge would exit).
#[tokio::test]
async fn socket_activation_serves_on_the_inherited_sockets() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("activation")?;
    let pki = Pki::new(dir.path())?;
    let plain = std::net::TcpListener::bind("127.0.0.1:0")?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?;
    // A TLS port whose UDP twin is free, for HTTP/3.
    let mut pair = None;
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        if let Ok(udp) = std::net::UdpSocket::bind(tcp.local_addr()?) {
            pair = Some((tcp, udp));
            break;
        }
    }
    let (tls, quic) = pair.ok_or_else(|| anyhow::anyhow!("no TCP port with a free UDP twin"))?;
    let (plain_a, admin_a, tls_a): (SocketAddr, SocketAddr, SocketAddr) =
        (plain.local_addr()?, admin.local_addr()?, tls.local_addr()?);
    let config = format!(
        r#"[admin]
listen = "{admin_a}"

[log]
access_log = "off"

[[listeners]]
address = "{plain_a}"

[[listeners]]
address = "{tls_a}"
tls = true

[[tls.certificates]]
cert = "{}"
key = "{}"
default = true

[[sites]]
hosts = ["*"]
pool = "main"

[pools.main]
origins = [{{ url = "{}" }}]
"#,
        pki.a.cert.display(),
        pki.a.key.display(),
        origin.url()
    );
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config)?;
    let edge = start_activated(
        &path,
        vec![
            plain.as_raw_fd(),
            tls.as_raw_fd(),
            quic.as_raw_fd(),
            admin.as_raw_fd(),
        ],
        "http:https:quic:admin",
    )?;
    assert!(
        edge.lines
            .contains(&format!("meridian-edge: listening http://{plain_a}")),
        "{:?}",
        edge.lines
    );
    assert!(
        edge.lines
            .contains(&format!("meridian-edge: listening https://{tls_a}")),
        "{:?}",
        edge.lines
    );
    assert!(
        edge.lines
            .contains(&format!("meridian-edge: admin http://{admin_a}")),
        "{:?}",
        edge.lines
    );
    let r = get_plain(plain_a, "t", "/hello").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    let mut h3 = H3Conn::connect(tls_a, &pki.tls("a.test", &[])?).await?;
    let r = h3.send("GET", "a.test", "/hello", Bytes::new()).await?;
    assert_eq!(
        (r.status, r.version, r.text().as_str()),
        (200, http::Version::HTTP_3, "hello")
    );
    assert_eq!(get_plain(admin_a, "admin", "/readyz").await?.status, 200);
    drop(edge);
    Ok(())
}

/// The config of an edge that hands its sockets over on `sock`: a TLS
/// listener (h1, h2, h3), a plain one if `plain`, and the admin listener,
/// none with SO_REUSEPORT, in front of `origin`.
fn handover_config(
    sock: &std::path::Path,
    pki: &Pki,
    origin: &str,
    plain: Option<&str>,
    tls: &str,
    admin: &str,
) -> String {
    let plain = plain.map_or(String::new(), |p| {
        format!("[[listeners]]\naddress = \"{p}\"\nreuse_port = false\n\n")
    });
    format!(
        r#"[server]
handover_socket = "{}"
graceful_timeout = "20s"

[admin]
listen = "{admin}"

[log]
access_log = "off"

{plain}[[listeners]]
address = "{tls}"
tls = true
reuse_port = false

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
        sock.display(),
        pki.a.cert.display(),
        pki.a.key.display(),
    )
}

/// Counts of one kind of load.
#[derive(Default)]
struct Tally {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, r: anyhow::Result<u16>) {
        use std::sync::atomic::Ordering::Relaxed;
        match r {
            Ok(200) => {
                self.ok.fetch_add(1, Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Relaxed);
                if let Ok(mut e) = self.errors.lock()
                    && e.len() < 10
                {
                    e.push(format!("{other:?}"));
                }
            }
        }
    }
    fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The zero-downtime upgrade by socket handover: under h1, h2 and h3 load
/// (each request on a new connection) and admin requests, a second edge
/// started with `run --takeover` receives every listening socket over the
/// handover socket (SCM_RIGHTS), serves, and the first one drains and
/// exits 0. No request fails, and the admin API answers `/readyz` 200 on
/// the same port throughout. The listeners do not set SO_REUSEPORT, so the new process
/// can only be serving on those ports through the handed-over sockets.
#[tokio::test]
async fn upgrade_hands_every_socket_over_under_h1_h2_h3_load() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use meridian_e2e::client::{Conn, req_h2};
    use meridian_e2e::harness::Proc;

    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("upgrade")?;
    let pki = Pki::new(dir.path())?;
    let sock = dir.path().join("handover.sock");
    let config = |plain: &str, tls: &str, admin: &str| {
        handover_config(&sock, &pki, &origin.url(), Some(plain), tls, admin)
    };
    let mut old = crate::Edge::start_in(
        TempDir::new("upgrade-old")?,
        &config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
    )?;
    let (plain, tls, admin) = (old.http(), old.https(), old.admin());

    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..4).map(|_| Arc::new(Tally::default())).collect();
    let mut tasks = Vec::new();
    for (kind, t) in tallies.iter().enumerate() {
        let (t, stop) = (t.clone(), stop.clone());
        let tls_h2 = pki.tls("a.test", &["h2"])?;
        let tls_h3 = pki.tls("a.test", &[])?;
        tasks.push(tokio::spawn(async move {
            // Bounded: 20 000 requests or the stop flag.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = match kind {
                    0 => get_plain(plain, "t", "/hello").await.map(|r| r.status),
                    1 => {
                        async {
                            let mut c = Conn::tls(tls, &tls_h2).await?;
                            Ok(c.send(req_h2("GET", "https", "a.test", "/hello", ""))
                                .await?
                                .status)
                        }
                        .await
                    }
                    2 => {
                        async {
                            let mut c = H3Conn::connect(tls, &tls_h3).await?;
                            Ok(c.send("GET", "a.test", "/hello", Bytes::new())
                                .await?
                                .status)
                        }
                        .await
                    }
                    _ => get_plain(admin, "admin", "/readyz").await.map(|r| r.status),
                };
                t.record(r);
                if kind == 3 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    // Load on the old process first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: Vec<u64> = tallies.iter().map(|t| t.ok()).collect();
    assert!(before.iter().all(|&n| n > 0), "no load before: {before:?}");

    // The new binary, on the same config with the bound ports pinned.
    let path = dir.path().join("edge-new.toml");
    std::fs::write(
        &path,
        config(&plain.to_string(), &tls.to_string(), &admin.to_string()),
    )?;
    let p = path.to_str().ok_or_else(|| anyhow::anyhow!("path"))?;
    let new = tokio::task::spawn_blocking({
        let p = p.to_string();
        move || {
            Proc::start(
                bin(),
                &["run", "--config", &p, "--takeover"],
                "meridian-edge",
            )
        }
    })
    .await??;
    assert_eq!((new.http(), new.https(), new.admin()), (plain, tls, admin));
    // The old one drains and exits 0.
    let status = tokio::task::spawn_blocking(move || {
        let s = old.wait_exit(Duration::from_secs(30));
        (s, old)
    })
    .await?;
    let exit = status.0?;
    assert!(
        exit.is_some_and(|s| s.success()),
        "the old process did not exit 0: {exit:?}"
    );
    // Load on the new process alone.
    let at_exit: Vec<u64> = tallies.iter().map(|t| t.ok()).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let after: Vec<u64> = tallies.iter().map(|t| t.ok()).collect();
    for (i, name) in ["h1", "h2", "h3", "admin"].iter().enumerate() {
        let t = &tallies[i];
        assert_eq!(
            t.failed(),
            0,
            "{name}: {} failed of {}: {:?}",
            t.failed(),
            t.ok() + t.failed(),
            t.errors.lock().map(|e| e.clone()).unwrap_or_default()
        );
        assert!(
            after[i] > at_exit[i],
            "{name}: nothing served by the new process"
        );
    }
    drop(new);
    drop(status.1);
    Ok(())
}

/// A QUIC connection of the old process keeps working through a socket
/// handover. From the handover on, both processes hold the same UDP socket:
/// the new one reads it alone and forwards the packets of the old one's
/// connections, which it tells by their connection ID's tag
/// (`listener::steer`). Here an upload paced over about 3 s starts on the
/// old process, and the new one takes over in its middle: the upload
/// completes whole, and the client's packets are not lost. Without the
/// steering, each packet the new process happened to read was dropped, as
/// it knew no such connection (and a fresh-clone CI run once lost an h3
/// handshake that way).
#[tokio::test]
async fn a_quic_connection_of_the_old_process_survives_the_handover() -> anyhow::Result<()> {
    use meridian_e2e::harness::Proc;

    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("quic-handover")?;
    let pki = Pki::new(dir.path())?;
    let sock = dir.path().join("handover.sock");
    let config =
        |tls: &str, admin: &str| handover_config(&sock, &pki, &origin.url(), None, tls, admin);
    let mut old = crate::Edge::start_in(
        TempDir::new("quic-handover-old")?,
        &config("127.0.0.1:0", "127.0.0.1:0"),
    )?;
    let (tls, admin) = (old.https(), old.admin());
    let client_tls = pki.tls("a.test", &[])?;
    let mut c = H3Conn::connect(tls, &client_tls).await?;
    let r = c.send("GET", "a.test", "/hello", Bytes::new()).await?;
    assert_eq!(r.status, 200);

    // 3 MiB in 64 KiB pieces, one every 60 ms: about 3 s on the old process.
    const SIZE: usize = 48 * 64 * 1024;
    let upload = tokio::spawn(async move {
        let r = c
            .send_paced(
                "POST",
                "a.test",
                "/echo",
                Bytes::from(vec![b'u'; SIZE]),
                Duration::from_millis(60),
            )
            .await;
        (r, c)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;

    let path = dir.path().join("edge-new.toml");
    std::fs::write(&path, config(&tls.to_string(), &admin.to_string()))?;
    let p = path
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("path"))?
        .to_string();
    let new = tokio::task::spawn_blocking(move || {
        Proc::start(
            bin(),
            &["run", "--config", &p, "--takeover"],
            "meridian-edge",
        )
    })
    .await??;
    assert_eq!(new.https(), tls);
    // New connections go to the new process meanwhile.
    let mut fresh = H3Conn::connect(tls, &client_tls).await?;
    assert_eq!(
        fresh
            .send("GET", "a.test", "/hello", Bytes::new())
            .await?
            .status,
        200
    );

    let (r, c) = upload.await?;
    let r = r?;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(echo["body_bytes"], SIZE as u64, "{echo}");
    let stats = c.conn.stats();
    // A few losses can come from a full queue between the processes; half
    // of the packets after the handover (what the new process reads) cannot.
    assert!(
        stats.path.lost_packets * 50 <= stats.path.sent_packets,
        "the client lost {} of {} packets",
        stats.path.lost_packets,
        stats.path.sent_packets
    );
    drop(c);
    // The old process drains and exits 0.
    let exit =
        tokio::task::spawn_blocking(move || old.wait_exit(Duration::from_secs(30))).await??;
    assert!(
        exit.is_some_and(|s| s.success()),
        "the old process did not exit 0: {exit:?}"
    );
    drop(new);
    Ok(())
}
