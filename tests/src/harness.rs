//! Runs a real Meridian binary as a child process and reads back the
//! addresses it bound from its stdout lines:
//! `<name>: listening <scheme>://<addr>`, `<name>: admin http://<addr>`, and
//! `<name>: ready`. The child is killed when the handle drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct Proc {
    child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

const READY_WAIT: Duration = Duration::from_secs(30);
const MAX_LINES: usize = 200_000;

impl Proc {
    /// Starts `bin args…` and waits until it prints `<name>: ready`.
    pub fn start(bin: &Path, args: &[&str], name: &str) -> anyhow::Result<Proc> {
        Self::start_env(bin, args, name, &[])
    }

    /// Like [`Proc::start`], with extra environment variables.
    pub fn start_env(
        bin: &Path,
        args: &[&str],
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                if let Ok(mut l) = l2.lock()
                    && l.len() < MAX_LINES
                {
                    l.push(line);
                }
            }
        });
        let mut p = Proc {
            child,
            lines,
            http: vec![],
            https: vec![],
            admin: None,
        };
        let deadline = Instant::now() + READY_WAIT;
        let listening = format!("{name}: listening ");
        let admin = format!("{name}: admin http://");
        let ready = format!("{name}: ready");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let status = p.child.try_wait()?;
                    anyhow::bail!(
                        "{name} exited or did not become ready within {READY_WAIT:?} (exit: {status:?}; its stderr is above)"
                    );
                }
            };
            if let Some(rest) = line.strip_prefix(&listening) {
                if let Some(a) = rest.strip_prefix("http://") {
                    p.http.push(a.parse()?);
                } else if let Some(a) = rest.strip_prefix("https://") {
                    p.https.push(a.parse()?);
                }
            } else if let Some(a) = line.strip_prefix(&admin) {
                p.admin = Some(a.parse()?);
            } else if line == ready {
                return Ok(p);
            }
        }
    }

    pub fn proc_id(&self) -> u32 {
        self.child.id()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(self.pid(), sig)?;
        Ok(())
    }

    /// Waits for the process to exit, polling, up to `wait`.
    pub fn wait_exit(&mut self, wait: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// Stdout lines seen so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .map(|l| l.iter().filter(|x| x.contains(needle)).cloned().collect())
            .unwrap_or_default()
    }

    pub fn http(&self) -> SocketAddr {
        self.http[0]
    }
    pub fn https(&self) -> SocketAddr {
        self.https[0]
    }
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("admin listener")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms until it returns true or `wait` passes.
pub async fn eventually<F, Fut>(wait: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
