//! Anycast for real: BIRD 2 and meridian-edge in network namespaces this
//! test creates (and always deletes).
//!
//! ```text
//!            ns R: router BIRD (AS 65000) + the client
//!         198.18.1.1 /          \ 198.18.2.1
//!   ns A: POP A (AS 65001)      ns B: POP B (AS 65002)
//!   edge + origin + BIRD        edge + origin + BIRD
//!   + anycast controller        + anycast controller
//!   198.18.100.1/32 on lo       198.18.100.1/32 on lo
//! ```
//!
//! Both POPs announce 198.18.100.1/32 while their edge is ready. The router
//! prefers A (lower router id). SIGTERM on A's edge makes /readyz fail
//! during its drain delay; A's controller withdraws the route, the router
//! moves to B, and a client loop running through it sees no failed request.
//!
//! Needs root, iproute2, bird2 and curl (tests/run.sh installs them).
//! Everything stays inside the namespaces; every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_e2e::certs::TempDir;

use crate::bin;

const ANYCAST: &str = "198.18.100.1";

struct Lab {
    tag: String,
    children: Vec<Child>,
    dir: TempDir,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("mr{}{name}", self.tag)
    }

    /// Runs a command in namespace `ns` and returns its stdout; fails on a non-zero exit.
    fn exec(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{ns}: {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &str) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Any process still inside a namespace (e.g. a child of `ip netns exec`).
        for ns in ["r", "a", "b"] {
            let name = self.ns(ns);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn require_tools() -> anyhow::Result<()> {
    for t in ["ip", "bird", "birdc", "curl", "bash"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()?
            .status
            .success();
        anyhow::ensure!(
            found,
            "the anycast test needs {t} (apt-get install iproute2 bird2 curl; tests/run.sh does)"
        );
    }
    let uid = Command::new("id").arg("-u").output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "the anycast test needs root to create network namespaces"
    );
    Ok(())
}

fn bird_pop(router_id: &str, peer: &str, asn: u32) -> String {
    format!(
        r#"router id {router_id};
protocol device {{}}
protocol static anycast {{
  ipv4;
  route {ANYCAST}/32 blackhole;
}}
protocol bgp upstream {{
  local {router_id} as {asn};
  neighbor {peer} as 65000;
  hold time 3; keepalive time 1; connect retry time 1; connect delay time 1; error wait time 1, 2;
  ipv4 {{ import none; export where proto = "anycast"; }};
}}
"#
    )
}

const BIRD_ROUTER: &str = r#"router id 198.18.1.1;
protocol device {}
protocol kernel { ipv4 { import none; export all; }; }
protocol bgp pop_a {
  local 198.18.1.1 as 65000; neighbor 198.18.1.2 as 65001;
  hold time 3; keepalive time 1; connect retry time 1; connect delay time 1; error wait time 1, 2;
  ipv4 { import all; export none; };
}
protocol bgp pop_b {
  local 198.18.2.1 as 65000; neighbor 198.18.2.2 as 65002;
  hold time 3; keepalive time 1; connect retry time 1; connect delay time 1; error wait time 1, 2;
  ipv4 { import all; export none; };
}
"#;

fn edge_config(pop: &str) -> String {
    format!(
        r#"[server]
via = "{pop}"
drain_delay = "3s"
graceful_timeout = "5s"
[admin]
listen = "127.0.0.1:9901"
[log]
access_log = "off"
[[listeners]]
address = "0.0.0.0:8080"
[[sites]]
hosts = ["*"]
pool = "origin"
[sites.cache]
enabled = false
[pools.origin]
origins = [{{ url = "http://127.0.0.1:8081" }}]
"#
    )
}

/// Polls `f` every 100 ms for up to `wait`.
fn wait_for(wait: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn anycast_failover_with_bird_in_network_namespaces() -> anyhow::Result<()> {
    require_tools()?;
    let mut lab = Lab {
        tag: format!("{}", std::process::id() % 100_000),
        children: Vec::new(),
        dir: TempDir::new("anycast")?,
    };
    for ns in ["r", "a", "b"] {
        let name = lab.ns(ns);
        sh(&["ip", "netns", "add", &name])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
    }
    // Router <-> POP links.
    for (pop, net) in [("a", "1"), ("b", "2")] {
        let (r, p) = (
            format!("mr{}r{pop}", lab.tag),
            format!("mr{}{pop}r", lab.tag),
        );
        sh(&["ip", "link", "add", &r, "type", "veth", "peer", "name", &p])?;
        sh(&["ip", "link", "set", &r, "netns", &lab.ns("r")])?;
        sh(&["ip", "link", "set", &p, "netns", &lab.ns(pop)])?;
        sh(&[
            "ip",
            "-n",
            &lab.ns("r"),
            "addr",
            "add",
            &format!("198.18.{net}.1/30"),
            "dev",
            &r,
        ])?;
        sh(&[
            "ip",
            "-n",
            &lab.ns(pop),
            "addr",
            "add",
            &format!("198.18.{net}.2/30"),
            "dev",
            &p,
        ])?;
        sh(&["ip", "-n", &lab.ns("r"), "link", "set", &r, "up"])?;
        sh(&["ip", "-n", &lab.ns(pop), "link", "set", &p, "up"])?;
        sh(&[
            "ip",
            "-n",
            &lab.ns(pop),
            "addr",
            "add",
            &format!("{ANYCAST}/32"),
            "dev",
            "lo",
        ])?;
        sh(&[
            "ip",
            "-n",
            &lab.ns(pop),
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{net}.1"),
        ])?;
    }
    // BIRD everywhere.
    std::fs::write(lab.path("bird-r.conf"), BIRD_ROUTER)?;
    std::fs::write(
        lab.path("bird-a.conf"),
        bird_pop("198.18.1.2", "198.18.1.1", 65001),
    )?;
    std::fs::write(
        lab.path("bird-b.conf"),
        bird_pop("198.18.2.2", "198.18.2.1", 65002),
    )?;
    for ns in ["r", "a", "b"] {
        let (conf, sock) = (
            lab.path(&format!("bird-{ns}.conf")),
            lab.path(&format!("bird-{ns}.ctl")),
        );
        let (conf, sock) = (conf.display().to_string(), sock.display().to_string());
        lab.spawn(
            ns,
            &["bird", "-f", "-c", &conf, "-s", &sock],
            &format!("bird-{ns}.log"),
        )?;
    }
    // Each POP: origin, edge, anycast controller.
    let edge = bin().display().to_string();
    let mut edge_pids = Vec::new();
    for pop in ["a", "b"] {
        let cfg = lab.path(&format!("edge-{pop}.toml"));
        std::fs::write(&cfg, edge_config(&format!("pop-{pop}")))?;
        lab.spawn(
            pop,
            &[&edge, "origin", "--listen", "127.0.0.1:8081"],
            &format!("origin-{pop}.log"),
        )?;
        let cfg = cfg.display().to_string();
        edge_pids.push(lab.spawn(
            pop,
            &[&edge, "run", "--config", &cfg],
            &format!("edge-{pop}.log"),
        )?);
        let sock = lab.path(&format!("bird-{pop}.ctl")).display().to_string();
        lab.spawn(
            pop,
            &[
                &edge,
                "anycast",
                "--admin",
                "127.0.0.1:9901",
                "--birdc",
                "birdc",
                "--socket",
                &sock,
                "--protocol",
                "anycast",
                "--interval",
                "200ms",
                "--rise",
                "2",
                "--fall",
                "1",
            ],
            &format!("anycast-{pop}.log"),
        )?;
    }
    // 1. The client reaches the anycast address, through POP A.
    let get = |lab: &Lab| -> Option<String> {
        lab.exec(
            "r",
            &[
                "curl",
                "-s",
                "-m",
                "2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{via}",
                &format!("http://{ANYCAST}:8080/api/items"),
            ],
        )
        .ok()
    };
    let up = wait_for(Duration::from_secs(30), || {
        get(&lab).is_some_and(|o| o.starts_with("200 ") && o.contains("pop-a"))
    });
    if !up {
        let logs: Vec<String> = ["bird-r.log", "bird-a.log", "anycast-a.log", "edge-a.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(lab.path(f)).unwrap_or_default()
                )
            })
            .collect();
        let routes = lab.exec("r", &["ip", "route"]).unwrap_or_default();
        anyhow::bail!(
            "the anycast address never answered through POP A; router routes:\n{routes}\n{}",
            logs.join("\n")
        );
    }
    // B must be announcing too before we drain A.
    let both = wait_for(Duration::from_secs(15), || {
        lab.exec(
            "r",
            &[
                "birdc",
                "-s",
                &lab.path("bird-r.ctl").display().to_string(),
                "show",
                "route",
                "all",
                &format!("{ANYCAST}/32"),
            ],
        )
        .is_ok_and(|o| o.contains("198.18.1.2") && o.contains("198.18.2.2"))
    });
    anyhow::ensure!(both, "the router never learned the route from both POPs");

    // 2 and 3. A client loop runs while POP A drains (SIGTERM); traffic moves to B.
    let script = format!(
        "end=$((SECONDS+12)); while [ $SECONDS -lt $end ]; do \
         printf '%s ' \"$(date +%s.%N)\"; curl -s -m 2 -o /dev/null -w '%{{http_code}} %header{{via}}\\n' http://{ANYCAST}:8080/api/items || echo 'fail'; \
         sleep 0.05; done"
    );
    let client = Command::new("ip")
        .args(["netns", "exec", &lab.ns("r"), "bash", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let drained_at = std::time::SystemTime::now();
    // `ip netns exec` execs the program, so this is the edge itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(edge_pids[0] as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let out = client.wait_with_output()?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    anyhow::ensure!(lines.len() > 50, "the client loop barely ran: {lines:?}");
    let failed: Vec<&String> = lines
        .iter()
        .filter(|l| l.split_whitespace().nth(1).is_none_or(|c| c != "200"))
        .collect();
    let drain_t = drained_at
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    // On failure, the whole client log and the SIGTERM's time: whether a
    // request failed when the route moved, or when A stopped listening at
    // the end of its drain delay, shows there.
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} requests failed across the drain (SIGTERM at {drain_t:.3}): {failed:?}; the client's log: {lines:?}",
        failed.len(),
        lines.len()
    );
    let first_b = lines
        .iter()
        .filter(|l| l.contains("pop-b"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .find(|t| *t >= drain_t);
    let a_after = lines
        .iter()
        .filter(|l| l.contains("pop-a"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .filter(|t| *t >= drain_t)
        .count();
    let first_b =
        first_b.ok_or_else(|| anyhow::anyhow!("traffic never moved to POP B: {lines:?}"))?;
    let moved = first_b - drain_t;
    eprintln!(
        "anycast failover: traffic moved to POP B {moved:.2}s after SIGTERM to POP A ({a_after} requests still served by A while it drained, 0 failed of {})",
        lines.len()
    );
    anyhow::ensure!(
        moved < 3.0,
        "the move took {moved:.2}s, longer than the 3 s drain delay"
    );
    let controller = std::fs::read_to_string(lab.path("anycast-a.log"))?;
    anyhow::ensure!(
        controller.contains("meridian-edge anycast: withdrawn"),
        "{controller}"
    );
    Ok(())
}
