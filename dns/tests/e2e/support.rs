//! Test support: start the real binary on port 0, query it with raw
//! hickory-proto messages over UDP/TCP, talk to the admin API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};

pub const BIN: &str = env!("CARGO_BIN_EXE_meridian-dns");
pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

/// A fresh directory for one test.
pub fn tmpdir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "dns-e2e-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create tmpdir");
    d
}

/// The demo config with `extra` appended and paths made absolute, written
/// into `dir`. `replace` pairs are applied to the base text first.
pub fn demo_config(dir: &Path, replace: &[(&str, &str)], extra: &str) -> PathBuf {
    let mut text =
        std::fs::read_to_string(Path::new(EXAMPLES).join("demo.toml")).expect("demo.toml");
    text = text.replace(
        "file = \"demo.meridian.test.zone\"",
        &format!("file = \"{EXAMPLES}/demo.meridian.test.zone\""),
    );
    text = text.replace(
        "csv = \"demo-geo.csv\"",
        &format!("csv = \"{EXAMPLES}/demo-geo.csv\""),
    );
    for (a, b) in replace {
        assert!(text.contains(a), "demo.toml lacks {a:?}");
        text = text.replace(a, b);
    }
    text.push('\n');
    text.push_str(extra);
    let p = dir.join("config.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// A running `meridian-dns`.
pub struct Server {
    pub child: Child,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub all: Vec<(SocketAddr, SocketAddr)>,
    /// Keeps the stdout reader thread alive so the pipe never fills.
    _stdout: mpsc::Receiver<String>,
}

impl Server {
    /// `meridian-dns ARGS...`; waits (bounded) for the address line.
    pub fn start(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info,hickory_server=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning meridian-dns")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("meridian-dns did not print its addresses within 20s");
                }
            };
            if let Some(rest) = line.strip_prefix("meridian-dns: dns ") {
                let toks: Vec<&str> = rest.split_whitespace().collect();
                let mut all = Vec::new();
                let mut admin = None;
                let mut i = 0;
                while i + 1 < toks.len() {
                    match toks[i] {
                        "udp" if i + 3 < toks.len() && toks[i + 2] == "tcp" => {
                            all.push((toks[i + 1].parse()?, toks[i + 3].parse()?));
                            i += 4;
                        }
                        "admin" => {
                            admin = toks[i + 1].parse().ok();
                            i += 2;
                        }
                        other => bail!("unexpected token {other:?} in {line:?}"),
                    }
                }
                let (udp, tcp) = *all
                    .first()
                    .ok_or_else(|| anyhow!("no dns listener in {line:?}"))?;
                return Ok(Self {
                    child,
                    udp,
                    tcp,
                    admin,
                    all,
                    _stdout: rx,
                });
            }
        }
    }

    /// `run --config FILE` on 127.0.0.1:0 with an admin listener.
    pub fn run(config: &Path) -> Result<Self> {
        let c = config.to_str().ok_or_else(|| anyhow!("path"))?;
        Self::start(&[
            "run",
            "--config",
            c,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
    }

    /// The demo on 127.0.0.1:0.
    pub fn demo() -> Result<Self> {
        Self::start(&["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("admin listener")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait (bounded) for exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query message.
pub fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m
}

fn rand_id() -> u16 {
    static N: AtomicUsize = AtomicUsize::new(1);
    (N.fetch_add(7919, Ordering::Relaxed) & 0xffff) as u16
}

/// Add EDNS (payload 1232) and optionally ECS.
pub fn with_edns(mut m: Message, ecs: Option<(&str, u8)>) -> Message {
    let mut e = Edns::new();
    e.set_max_payload(1232);
    if let Some((addr, len)) = ecs {
        let ip: IpAddr = addr.parse().expect("ecs addr");
        e.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(ip, len, 0)));
    }
    m.edns = Some(e);
    m
}

/// One UDP exchange from `bind` (bounded by a 3s timeout).
pub fn udp_from(bind: &str, server: SocketAddr, m: &Message) -> Result<Message> {
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.send_to(&m.to_vec()?, server)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, _) = s.recv_from(&mut buf).context("no UDP response within 3s")?;
        let r = Message::from_vec(&buf[..n])?;
        if r.metadata.id == m.metadata.id {
            return Ok(r);
        }
    }
}

pub fn udp(server: SocketAddr, m: &Message) -> Result<Message> {
    let bind = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    udp_from(bind, server, m)
}

/// One TCP exchange (bounded by a 3s timeout).
pub fn tcp(server: SocketAddr, m: &Message) -> Result<Message> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let bytes = m.to_vec()?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(Message::from_vec(&buf)?)
}

/// Addresses in the answer section (A and AAAA), as strings.
pub fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// The ECS option of a response: (address, source, scope).
pub fn ecs_of(m: &Message) -> Option<(IpAddr, u8, u8)> {
    match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(cs) => Some((cs.addr(), cs.source_prefix(), cs.scope_prefix())),
        _ => None,
    }
}

/// A tiny blocking HTTP/1.1 client: (status, body).
pub fn http(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Poll `f` every 50ms until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A toggleable HTTP health endpoint on 127.0.0.1 (fixed port once bound,
/// so it can be stopped and restarted).
pub struct HealthEndpoint {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthEndpoint {
    pub fn start_on(addr: &str) -> Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: exits when stopped; each connection has timeouts.
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port with nothing listening (bound then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}
