//! End-to-end tests of meridian-edge: the real binary on ephemeral ports, a
//! real origin, real sockets. One test binary, with modules.

mod admin_auth;
mod anycast;
mod bad_input;
mod cache;
mod conformance;
mod examples;
mod handover;
mod hostile;
mod http3;
mod interop;
mod ops;
mod plugins;
mod proxy;
mod purge_jobs;
mod quic_claims;
mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meridian_e2e::certs::{Leaf, TempDir, TestCa};
use meridian_e2e::client::Tls;
use meridian_e2e::harness::Proc;

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian-edge"))
}

/// A running edge with its config file and scratch directory.
pub struct Edge {
    pub proc: Proc,
    pub dir: TempDir,
    pub config: PathBuf,
}

impl std::ops::Deref for Edge {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Edge {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Edge {
    /// Writes `config` to a file and runs `meridian-edge run --config` on it.
    pub fn start(config: &str) -> anyhow::Result<Edge> {
        let dir = TempDir::new("edge")?;
        Self::start_in(dir, config)
    }

    pub fn start_in(dir: TempDir, config: &str) -> anyhow::Result<Edge> {
        meridian_e2e::init();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, config)?;
        let p = path
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("path"))?
            .to_string();
        let proc = Proc::start(bin(), &["run", "--config", &p], "meridian-edge")?;
        Ok(Edge {
            proc,
            dir,
            config: path,
        })
    }

    pub fn rewrite(&self, config: &str) -> anyhow::Result<()> {
        std::fs::write(&self.config, config)?;
        Ok(())
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(
            meridian_e2e::client::get_plain(self.admin(), "admin", "/metrics")
                .await?
                .text(),
        )
    }
}

/// The sum of a metric's samples whose line contains every `needles`.
pub fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.len() == name.len() || matches!(l.as_bytes()[name.len()], b'{' | b' '))
        })
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal config: one plain listener, admin, one site for every host.
pub fn basic_config(origins: &[String], extra: &str) -> String {
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ url = \"{o}\" }}"))
        .collect();
    format!(
        r#"[admin]
listen = "127.0.0.1:0"

[log]
access_log = "stdout"

[[listeners]]
address = "127.0.0.1:0"

[[sites]]
hosts = ["*"]
pool = "main"

[pools.main]
origins = [{}]
{extra}
"#,
        list.join(", ")
    )
}

/// A CA with leaf certificates for a.test, b.test and *.w.test.
pub struct Pki {
    pub ca: TestCa,
    pub a: Leaf,
    pub b: Leaf,
    pub w: Leaf,
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let ca = TestCa::new(dir)?;
        let a = ca.leaf(dir, "a", &["a.test"])?;
        let b = ca.leaf(dir, "b", &["b.test"])?;
        let w = ca.leaf(dir, "w", &["*.w.test"])?;
        Ok(Pki { ca, a, b, w })
    }

    pub fn tls(&self, sni: &str, alpn: &[&str]) -> anyhow::Result<Tls> {
        Ok(Tls {
            roots: Arc::new(self.ca.roots()?),
            sni: sni.into(),
            alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        })
    }

    /// `[tls]` and a TLS listener for the three leaves.
    pub fn config(&self) -> String {
        format!(
            r#"
[[listeners]]
address = "127.0.0.1:0"
tls = true

[[tls.certificates]]
cert = "{}"
key = "{}"
default = true

[[tls.certificates]]
cert = "{}"
key = "{}"

[[tls.certificates]]
cert = "{}"
key = "{}"
"#,
            self.a.cert.display(),
            self.a.key.display(),
            self.b.cert.display(),
            self.b.key.display(),
            self.w.cert.display(),
            self.w.key.display()
        )
    }
}

/// The peak resident set size of a process, in bytes (Linux).
pub fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The edge with its stderr (the daemon's own log) in a file.
pub struct Logged {
    pub child: std::process::Child,
    pub http: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_logged(config: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Logged> {
    meridian_e2e::init();
    let mut child = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        // Our crates at debug (wasmtime's compiler at debug would drown it).
        .env(
            "RUST_LOG",
            "info,meridian_edge=debug,meridian_wasm_host=debug",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let rx = stdout_lines(&mut child)?;
    let (mut http, mut admin) = (None, None);
    // Compiling two plugins in a debug build on a loaded 2-core machine
    // was seen to take 40 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let text = std::fs::read_to_string(log)?;
            let tail = &text[text.len().saturating_sub(4000)..];
            anyhow::bail!("the edge did not become ready: …{tail}");
        };
        if let Some(a) = line.strip_prefix("meridian-edge: listening http://") {
            http = Some(a.parse()?);
        } else if let Some(a) = line.strip_prefix("meridian-edge: admin http://") {
            admin = Some(a.parse()?);
        } else if line == "meridian-edge: ready" {
            break;
        }
    }
    Ok(Logged {
        child,
        http: http.ok_or_else(|| anyhow::anyhow!("no http listener"))?,
        admin: admin.ok_or_else(|| anyhow::anyhow!("no admin listener"))?,
    })
}

/// The lines a started daemon writes to its (piped) stdout, read by a
/// thread of their own.
pub fn stdout_lines(
    child: &mut std::process::Child,
) -> anyhow::Result<std::sync::mpsc::Receiver<String>> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
