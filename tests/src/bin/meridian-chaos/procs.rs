//! Starting the real binaries (stdout parsed for their addresses, stderr to
//! a log file), reading /proc, and scraping the admin endpoints.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_e2e::client::get_plain;

/// The repository's root (for dns/examples and wasm-plugins/dist).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The binary named by `var`, which must exist.
pub fn bin_from_env(var: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var(var).map_err(|_| {
        anyhow::anyhow!("{var} must name the binary to test (see bench/chaos/run.sh)")
    })?;
    let p = PathBuf::from(p);
    anyhow::ensure!(p.is_file(), "{var}={} is not a file", p.display());
    Ok(p)
}

/// A running child: its addresses, its stderr log, killed on drop.
pub struct Server {
    pub child: Child,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub udp: Option<SocketAddr>,
}

const READY_WAIT: Duration = Duration::from_secs(60);

impl Server {
    /// `cmd` with stdout read until the ready line of `name`
    /// (`meridian-edge` prints `: ready`; `meridian-dns` its `dns udp …`
    /// line). stderr is appended to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> anyhow::Result<Server> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Read to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut s = Server {
            child,
            http: vec![],
            https: vec![],
            admin: None,
            udp: None,
        };
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let status = s.child.try_wait()?;
                anyhow::bail!(
                    "{name} did not become ready within {READY_WAIT:?} (exit: {status:?}; log: {})",
                    log.display()
                );
            };
            if let Some(rest) = line.strip_prefix(&format!("{name}: listening ")) {
                if let Some(a) = rest.strip_prefix("http://") {
                    s.http.push(a.parse()?);
                } else if let Some(a) = rest.strip_prefix("https://") {
                    s.https.push(a.parse()?);
                }
            } else if let Some(a) = line.strip_prefix(&format!("{name}: admin http://")) {
                s.admin = Some(a.parse()?);
            } else if line == format!("{name}: ready") {
                return Ok(s);
            } else if let Some(rest) = line.strip_prefix("meridian-dns: dns ") {
                let t: Vec<&str> = rest.split_whitespace().collect();
                for w in t.windows(2) {
                    match w[0] {
                        "udp" if s.udp.is_none() => s.udp = Some(w[1].parse()?),
                        "admin" => s.admin = Some(w[1].parse()?),
                        _ => {}
                    }
                }
                return Ok(s);
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn admin(&self) -> anyhow::Result<SocketAddr> {
        self.admin
            .ok_or_else(|| anyhow::anyhow!("no admin listener"))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command for `bin` that the kernel kills with SIGKILL when this process
/// ends, however it ends (util-linux `setpriv --pdeathsig`, which then execs
/// `bin` in the same process), so an interrupted run never leaves servers.
pub fn dies_with_us(bin: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(bin);
    cmd
}

/// `meridian-edge run --config FILE`, stderr to `log`.
pub fn start_edge(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Server> {
    let mut cmd = dies_with_us(bin);
    cmd.arg("run").arg("--config").arg(config);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    Server::spawn(cmd, "meridian-edge", log)
}

/// [`start_edge`] with `env` set for the edge only (through `env(1)`, so that a preloaded
/// library is loaded by the edge, not by `setpriv`).
pub fn start_edge_with_env(
    bin: &Path,
    config: &Path,
    log: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<Server> {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "env"]);
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(bin).arg("run").arg("--config").arg(config);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    Server::spawn(cmd, "meridian-edge", log)
}

/// `meridian-dns run --config FILE` on 127.0.0.1:0 with an admin listener.
pub fn start_dns(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Server> {
    let mut cmd = dies_with_us(bin);
    cmd.arg("run").arg("--config").arg(config).args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn,hickory_server=error");
    }
    Server::spawn(cmd, "meridian-dns", log)
}

/// The DNS demo config with absolute paths, `replace` pairs applied, in `dir`.
pub fn dns_config(dir: &Path, replace: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let ex = repo_root().join("dns/examples");
    let mut text = std::fs::read_to_string(ex.join("demo.toml"))?;
    text = text.replace(
        "file = \"demo.meridian.test.zone\"",
        &format!("file = \"{}/demo.meridian.test.zone\"", ex.display()),
    );
    text = text.replace(
        "csv = \"demo-geo.csv\"",
        &format!("csv = \"{}/demo-geo.csv\"", ex.display()),
    );
    for (a, b) in replace {
        anyhow::ensure!(text.contains(a), "demo.toml lacks {a:?}");
        text = text.replace(a, b);
    }
    let p = dir.join("dns.toml");
    std::fs::write(&p, text)?;
    Ok(p)
}

/// Resident set size (kB), open descriptors and threads of `pid`.
pub fn proc_usage(pid: i32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

/// The CPU time (user and system) `pid` has used, from `/proc/PID/stat`
/// (clock ticks of 1/100 s, as Linux reports them to user space).
pub fn proc_cpu(pid: i32) -> Duration {
    let (user, system) = proc_cpu_split(pid);
    user + system
}

/// The user and the system CPU time `pid` has used (see [`proc_cpu`]);
/// zeros if it cannot be read.
pub fn proc_cpu_split(pid: i32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu(&stat)
}

/// utime and stime of a `/proc/PID/stat` line.
fn stat_cpu(stat: &str) -> (Duration, Duration) {
    // The command name (field 2) may hold spaces and parentheses: count
    // from after its last `)`.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let at = |i: usize| {
        let ticks = f
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Duration::from_millis(ticks * 10)
    };
    (at(14), at(15))
}

/// GET `path` on an admin listener, as text.
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let r = get_plain(admin, "admin", path).await?;
    anyhow::ensure!(r.status == 200, "GET {path}: {}", r.status);
    Ok(r.text())
}

/// POST `body` to `path` on an admin listener.
pub async fn admin_post(admin: SocketAddr, path: &str, body: &str) -> anyhow::Result<String> {
    let mut c = meridian_e2e::client::Conn::plain(admin, false).await?;
    let r = c
        .send(meridian_e2e::client::req(
            "POST",
            "admin",
            path,
            body.to_string(),
        ))
        .await?;
    // A purge answers 200 (done) or 202 (queued, done in the background).
    anyhow::ensure!(
        matches!(r.status, 200 | 202),
        "POST {path}: {} {}",
        r.status,
        r.text()
    );
    Ok(r.text())
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

/// A free TCP (and UDP) port on 127.0.0.1, for listeners that must keep
/// their address across restarts.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = t.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port with both TCP and UDP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_time_are_read_past_an_odd_command_name() {
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 16 0 100 123456 789 18446744073709551615";
        assert_eq!(
            stat_cpu(line),
            (Duration::from_millis(2500), Duration::from_millis(750))
        );
        assert_eq!(stat_cpu(""), (Duration::ZERO, Duration::ZERO));
    }
}
