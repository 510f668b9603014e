//! Scenario 4: the network between the edge and its origin degrades. Two
//! network namespaces made here (the edge's and the origin's) joined by a
//! link with addresses only inside them (10.213.0.1, .2): a veth pair with
//! `tc netem` on both ends where the kernel has `sch_netem`, else the
//! user-space wire of [`crate::wire`]. It adds 200 ms of delay, then 5%
//! loss, then drops everything (a partition, with a burst of misses to
//! test the retry budget), then heals. The load client and the edge run in
//! the edge's namespace (this binary re-executes itself there), the test
//! origin in the origin's.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_e2e::certs::{TempDir, TestCa};
use meridian_e2e::client::Tls;

use crate::Args;
use crate::chaos::Windows;
use crate::load::{Check, Client, Proto, Req, Stats, Target, Verdict, http_worker};
use crate::procs::{admin_get, bin_from_env, metric, start_edge};

const EDGE_IP: &str = "10.213.0.1";
const ORIGIN_IP: &str = "10.213.0.2";
const ORIGIN_PORT: u16 = 8080;
/// The edge's worst case for one answer under the scenario's timeouts (see
/// the check at the end of [`inner`]).
const WORST_MS: u64 = 16_000;
/// The load's clients give up after this: past the edge's worst case, so
/// that the check measures the edge and not the client's patience.
const CLIENT_DEADLINE: Duration = Duration::from_secs(20);

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes the namespaces (and with them the veth pair) on drop.
struct Netns {
    edge: String,
    origin: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.edge]);
        let _ = sh(&["ip", "netns", "del", &self.origin]);
    }
}

/// A TERM, INT or HUP (`timeout`, Ctrl-C, a closed terminal) ends the run
/// without unwinding, so `Netns`'s drop would not run and the namespaces
/// (with the TUN devices or veth pair in them) would be left behind: this
/// deletes them, then exits with 128 + the signal's number. The edge, origin
/// and inner harness die with this process (`setpriv --pdeathsig KILL`).
fn delete_on_signal(ns: &Netns) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let names = [ns.edge.clone(), ns.origin.clone()];
    tokio::spawn(async move {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("TERM", 128 + 15),
            _ = int.recv() => ("INT", 128 + 2),
            _ = hup.recv() => ("HUP", 128 + 1),
        };
        for n in &names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
        eprintln!(
            "meridian-chaos: netem: SIG{name}: deleted the network namespaces {} and {}",
            names[0], names[1]
        );
        std::process::exit(code);
    });
    Ok(())
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    if args.str("inner").is_some() {
        return inner(args).await;
    }
    let phase: u64 = args.get("phase", 15u64)?;
    let id = std::process::id() % 100_000;
    let ns = Netns {
        edge: format!("mchaos-e{id}"),
        origin: format!("mchaos-o{id}"),
    };
    let (dev_e, dev_o) = (format!("mce{id}"), format!("mco{id}"));
    delete_on_signal(&ns)?;
    sh(&["ip", "netns", "add", &ns.edge])
        .map_err(|e| anyhow::anyhow!("network namespaces need root: {e:#}"))?;
    sh(&["ip", "netns", "add", &ns.origin])?;
    for n in [&ns.edge, &ns.origin] {
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    // netem if this kernel has it (sch_netem), else the user-space wire
    // (`--link netem` insists on netem; `--link wire` on the wire).
    let netem_here = sh(&[
        "ip", "netns", "exec", &ns.origin, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
        "delay", "1ms",
    ]);
    let link = match (args.str("link").unwrap_or("auto"), &netem_here) {
        ("netem", Err(e)) => {
            anyhow::bail!("tc netem is not available here (the kernel needs sch_netem): {e:#}")
        }
        ("netem", Ok(())) | ("auto", Ok(())) => Link::Netem,
        ("wire", _) => Link::Wire,
        ("auto", Err(e)) => {
            println!(
                "netem: no netem in this kernel ({e:#}); the link is meridian-chaos's \
                 user-space wire (TUN devices), with the same delay, loss and partition"
            );
            Link::Wire
        }
        (other, _) => anyhow::bail!("--link {other}: auto, netem or wire"),
    };
    if netem_here.is_ok() {
        sh(&[
            "ip", "netns", "exec", &ns.origin, "tc", "qdisc", "del", "dev", "lo", "root",
        ])?;
    }
    if let Link::Netem = link {
        println!("netem: the link is a veth pair with `tc qdisc … netem` on both ends");
    }
    let wire = match link {
        Link::Netem => {
            sh(&[
                "ip", "link", "add", &dev_e, "type", "veth", "peer", "name", &dev_o,
            ])?;
            None
        }
        Link::Wire => {
            let (a, b) = (crate::wire::tun(&dev_e)?, crate::wire::tun(&dev_o)?);
            Some(crate::wire::Wire::start(a, b)?)
        }
    };
    sh(&["ip", "link", "set", &dev_e, "netns", &ns.edge])?;
    sh(&["ip", "link", "set", &dev_o, "netns", &ns.origin])?;
    for (n, dev, ip, peer) in [
        (&ns.edge, &dev_e, EDGE_IP, ORIGIN_IP),
        (&ns.origin, &dev_o, ORIGIN_IP, EDGE_IP),
    ] {
        let addr = format!("{ip}/30");
        let mut a = vec!["ip", "-n", n, "addr", "add"];
        match link {
            Link::Netem => a.push(&addr),
            // A point-to-point device: the other end is the peer.
            Link::Wire => a.extend([ip, "peer", peer]),
        }
        a.extend(["dev", dev]);
        sh(&a)?;
        sh(&["ip", "-n", n, "link", "set", dev, "up"])?;
    }

    let me = std::env::current_exe()?;
    let mut origin_cmd = Command::new("ip");
    origin_cmd
        .args([
            "netns",
            "exec",
            &ns.origin,
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
        ])
        .arg(&me)
        .args([
            "origin",
            "--listen",
            &format!("{ORIGIN_IP}:{ORIGIN_PORT}"),
            "--max-seconds",
            &(phase * 6 + 120).to_string(),
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut origin = Kill(origin_cmd.spawn()?);
    let out = origin
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no origin stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    anyhow::ensure!(
        line.starts_with("origin: listening"),
        "the origin did not start: {line:?}"
    );

    let mut inner = Command::new("ip");
    inner
        .args([
            "netns",
            "exec",
            &ns.edge,
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
        ])
        .arg(&me)
        .args([
            "netem",
            "--inner",
            "1",
            "--phase",
            &phase.to_string(),
            "--ns-edge",
            &ns.edge,
            "--dev-edge",
            &dev_e,
            "--ns-origin",
            &ns.origin,
            "--dev-origin",
            &dev_o,
            "--link",
            link.name(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = Kill(inner.spawn()?);
    // The inner run's output, passed on; its `@wire` lines set the wire,
    // each answered on its stdin once applied.
    let (Some(mut to_inner), Some(from_inner)) = (child.0.stdin.take(), child.0.stdout.take())
    else {
        anyhow::bail!("no pipes to the inner run");
    };
    let control_wire = wire.clone();
    let relay = std::thread::spawn(move || -> anyhow::Result<()> {
        use std::io::Write;
        for line in BufReader::new(from_inner).lines() {
            let line = line?;
            let Some(cmd) = line.strip_prefix("@wire ") else {
                println!("{line}");
                continue;
            };
            let w = control_wire
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{line:?} without a wire"))?;
            let (delay, loss) = parse_wire(cmd)?;
            w.set(delay, loss);
            writeln!(to_inner, "ok")?;
            to_inner.flush()?;
        }
        Ok(())
    });
    let deadline = Instant::now() + Duration::from_secs(phase * 6 + 120);
    loop {
        if let Some(st) = child.0.try_wait()? {
            let relayed = relay
                .join()
                .map_err(|_| anyhow::anyhow!("the relay of the inner run panicked"))?;
            // What the link itself dropped: the loss and the partition
            // must have reached it, or the phases tested nothing.
            let lost = if let Some(w) = &wire {
                let c = &w.counts;
                let lost = c.lost.load(Ordering::Relaxed);
                println!(
                    "netem: wire: {} packets forwarded, {lost} lost, {} over the queue limit",
                    c.forwarded.load(Ordering::Relaxed),
                    c.overflow.load(Ordering::Relaxed)
                );
                lost
            } else {
                let mut lost = 0;
                for (n, dev) in [(&ns.edge, &dev_e), (&ns.origin, &dev_o)] {
                    let out = Command::new("ip")
                        .args(["netns", "exec", n, "tc", "-s", "qdisc", "show", "dev", dev])
                        .output()?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    let (sent, dropped) = qdisc_counts(&text).ok_or_else(|| {
                        anyhow::anyhow!(
                            "no netem counts from `tc -s qdisc show dev {dev}`: {text:?}"
                        )
                    })?;
                    println!("netem: tc netem on {dev}: {sent} packets sent, {dropped} dropped");
                    lost += dropped;
                }
                lost
            };
            anyhow::ensure!(st.success(), "the netem scenario failed ({st})");
            anyhow::ensure!(
                lost > 0,
                "the link dropped no packet: the loss and the partition never reached it"
            );
            return relayed;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the netem scenario did not finish in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Link {
    /// A veth pair, with `tc netem` on both ends.
    Netem,
    /// Two TUN devices joined by [`crate::wire::Wire`] in the outer run.
    Wire,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Netem => "netem",
            Link::Wire => "wire",
        }
    }
}

/// Packets sent and dropped by the root netem qdisc in `tc -s qdisc show`:
/// `qdisc netem 8001: root … \n Sent B bytes P pkt (dropped D, …)`.
fn qdisc_counts(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.find("qdisc netem ")?..];
    let sent = &rest[rest.find(" Sent ")?..];
    let mut words = sent.split_whitespace();
    let pkt = words.nth(3)?.parse().ok()?;
    let dropped = sent.split_once("(dropped ")?.1;
    let dropped = dropped.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((pkt, dropped.parse().ok()?))
}

/// `delay_ms=D loss=L` (percent).
fn parse_wire(cmd: &str) -> anyhow::Result<(Duration, f64)> {
    let (mut delay, mut loss) = (None, None);
    for kv in cmd.split_whitespace() {
        match kv.split_once('=') {
            Some(("delay_ms", v)) => delay = Some(Duration::from_millis(v.parse()?)),
            Some(("loss", v)) => loss = Some(v.parse::<f64>()?),
            _ => anyhow::bail!("bad wire setting {kv:?}"),
        }
    }
    match (delay, loss) {
        (Some(d), Some(l)) => Ok((d, l)),
        _ => anyhow::bail!("bad wire command {cmd:?}"),
    }
}

fn qdisc(ns: &str, dev: &str, netem: &[&str]) -> anyhow::Result<()> {
    let mut a = vec![
        "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
    ];
    a.extend_from_slice(netem);
    sh(&a)
}

/// The link from now on: `delay` each way and `loss_pct` percent of the
/// packets lost each way; as netem on both ends, or through the outer run's
/// wire (asked on stdout, applied when it answers on stdin).
async fn both(
    args: &Args,
    answers: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    delay: Duration,
    loss_pct: f64,
) -> anyhow::Result<()> {
    let need = |k: &str| args.str(k).ok_or_else(|| anyhow::anyhow!("--{k}"));
    if args.str("link") == Some("wire") {
        println!("@wire delay_ms={} loss={loss_pct}", delay.as_millis());
        use std::io::Write;
        std::io::stdout().flush()?;
        let ok = tokio::time::timeout(Duration::from_secs(5), answers.next_line()).await;
        anyhow::ensure!(
            matches!(&ok, Ok(Ok(Some(l))) if l == "ok"),
            "the wire did not answer: {ok:?}"
        );
        return Ok(());
    }
    let (d, l) = (format!("{}ms", delay.as_millis()), format!("{loss_pct}%"));
    let netem = ["delay", d.as_str(), "loss", l.as_str()];
    qdisc(need("ns-edge")?, need("dev-edge")?, &netem)?;
    qdisc(need("ns-origin")?, need("dev-origin")?, &netem)
}

/// Upstream requests and retries so far (the edge's metrics).
async fn upstream(admin: SocketAddr) -> (f64, f64) {
    let m = admin_get(admin, "/metrics").await.unwrap_or_default();
    (
        metric(&m, "meridian_upstream_requests_total", &[]),
        metric(&m, "meridian_upstream_retries_total", &[]),
    )
}

async fn inner(args: &Args) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.get("phase", 15u64)?);
    // Misses sent at once when the partition starts: enough that retrying
    // every one would pass the retry budget.
    let burst: u64 = args.get("burst", 500u64)?;
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let work = TempDir::new("chaos-netem")?;
    let ca = TestCa::new(work.path())?;
    let leaf = ca.leaf(work.path(), "localhost", &["localhost"])?;
    let cfg = work.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[admin]
listen = "127.0.0.1:0"
[log]
access_log = "{}"
[cache]
memory = "64MiB"
[[listeners]]
address = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
tls = true
[[tls.certificates]]
cert = "{}"
key = "{}"
default = true
[[sites]]
hosts = ["*"]
pool = "origin"
[pools.origin]
origins = [{{ url = "http://{ORIGIN_IP}:{ORIGIN_PORT}" }}]
timeouts = {{ connect = "3s", header = "3s", idle = "3s" }}
"#,
            // Kept with the edge's log, to read a slow or failed request's
            // timing and upstream attempts after a run.
            crate::chaos::log_path("netem-access").display(),
            leaf.cert.display(),
            leaf.key.display()
        ),
    )?;
    let edge = start_edge(&edge_bin, &cfg, &crate::chaos::log_path("netem-edge"))?;
    let admin = edge.admin()?;
    let target = Arc::new(Target {
        plain: edge.http[0],
        tls: edge.https.first().map(|a| {
            (
                *a,
                Tls {
                    roots: Arc::new(
                        ca.roots()
                            .unwrap_or_else(|_| rustls::RootCertStore::empty()),
                    ),
                    sni: "localhost".into(),
                    alpn: vec![b"h2".to_vec()],
                },
            )
        }),
        host: "localhost".into(),
    });
    let sie = |n: u64| {
        format!("/cc/n-{n}?cc=public,max-age=1,stale-if-error=3600&size=2048&seed=9&digest=1")
    };
    let mut c = Client::new(Proto::H1, target.clone(), Duration::from_secs(10));
    for n in 0..50 {
        let r = Req::get(sie(n), Check::Digest { size: 2048 }, "warm");
        let resp = c.send(&r).await?;
        anyhow::ensure!(resp.status == 200, "warming: {}", resp.status);
    }
    let partition = Arc::new(Windows::default());
    let stats = Stats::new(false);
    let phases = ["clean", "delay 200ms", "loss 5%", "partition", "healed"];
    let until = Instant::now() + phase * phases.len() as u32;
    let fresh = Arc::new(AtomicU64::new(0));
    let slowest_fresh = Arc::new(AtomicU64::new(0));
    let slowest_stale = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (w, proto) in [Proto::H1, Proto::H1, Proto::H2].into_iter().enumerate() {
        let client = Client::new(proto, target.clone(), CLIENT_DEADLINE);
        let (stats, fresh, partition, slowest, slowest_stale) = (
            stats.clone(),
            fresh.clone(),
            partition.clone(),
            slowest_fresh.clone(),
            slowest_stale.clone(),
        );
        set.spawn(async move {
            http_worker(
                client,
                stats,
                Some(20.0),
                until,
                u64::MAX,
                move |i| {
                    if (i + w as u64).is_multiple_of(2) {
                        let n = fresh.fetch_add(1, Ordering::Relaxed);
                        Req::get(
                            format!("/cc/f-{n}?cc=public,max-age=60&size=1024&seed=10&digest=1"),
                            Check::Digest { size: 1024 },
                            "fresh",
                        )
                    } else {
                        Req::get(
                            sie((i * 3 + w as u64) % 50),
                            Check::Digest { size: 2048 },
                            "stale",
                        )
                    }
                },
                move |r, res, t0, t1| {
                    let took = (t1 - t0).as_millis() as u64;
                    if r.class == "fresh" {
                        slowest.fetch_max(took, Ordering::Relaxed);
                    } else {
                        slowest_stale.fetch_max(took, Ordering::Relaxed);
                    }
                    match (r.class, res.as_ref().ok().map(|r| r.status)) {
                        (_, Some(200)) => Verdict::Ok,
                        ("fresh", Some(502..=504))
                            if partition.overlaps(t0, t1, Duration::ZERO) =>
                        {
                            Verdict::Expected
                        }
                        // A response whose head came just before the
                        // partition, and whose body the partition then
                        // stalled, is cut at the pool's idle timeout: the
                        // client sees its connection end early. Stale-if-error
                        // cannot help once the head is sent. The client's own
                        // deadline is never expected.
                        (_, None)
                            if t1 - t0 < CLIENT_DEADLINE
                                && partition.overlaps(t0, t1, Duration::ZERO) =>
                        {
                            Verdict::Expected
                        }
                        _ => Verdict::Unexpected,
                    }
                },
            )
            .await
        });
    }
    // The edge's counters every 500 ms, to know the requests of the 10 s
    // before a phase (the retry budget's window).
    let series: Arc<crate::load::Mutex<Vec<(Instant, f64, f64)>>> = Arc::default();
    let sampler = {
        let series = series.clone();
        tokio::spawn(async move {
            while Instant::now() < until + Duration::from_secs(1) {
                let (r, t) = upstream(admin).await;
                series.lock().push((Instant::now(), r, t));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let at = |when: Instant| -> (f64, f64) {
        // One lock: `or`'s argument is evaluated while the guard lives.
        let s = series.lock();
        s.iter()
            .rev()
            .find(|(t, _, _)| *t <= when)
            .or(s.first())
            .map(|(_, r, t)| (*r, *t))
            .unwrap_or((0.0, 0.0))
    };
    let mut problems = Vec::new();
    let mut answers =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    let ms = Duration::from_millis;
    for (i, name) in phases.iter().enumerate() {
        let before = upstream(admin).await;
        let t = Instant::now();
        let mut bursting = tokio::task::JoinSet::new();
        match i {
            1 => both(args, &mut answers, ms(200), 0.0).await?,
            2 => both(args, &mut answers, ms(0), 5.0).await?,
            3 => {
                partition.open();
                both(args, &mut answers, ms(0), 100.0).await?;
                // Each on its own connection, so the edge has `burst`
                // upstream attempts in flight that all time out.
                for b in 0..burst {
                    let client = Client::new(Proto::H1, target.clone(), CLIENT_DEADLINE);
                    let (stats, partition, slowest) =
                        (stats.clone(), partition.clone(), slowest_fresh.clone());
                    bursting.spawn(http_worker(
                        client,
                        stats,
                        None,
                        t + phase,
                        1,
                        move |_| {
                            Req::get(
                                format!(
                                    "/cc/b-{b}?cc=public,max-age=60&size=1024&seed=11&digest=1"
                                ),
                                Check::Digest { size: 1024 },
                                "burst",
                            )
                        },
                        move |_, res, t0, t1| {
                            slowest.fetch_max((t1 - t0).as_millis() as u64, Ordering::Relaxed);
                            match res.as_ref().ok().map(|r| r.status) {
                                Some(502..=504) if partition.overlaps(t0, t1, Duration::ZERO) => {
                                    Verdict::Expected
                                }
                                _ => Verdict::Unexpected,
                            }
                        },
                    ));
                }
            }
            4 => {
                both(args, &mut answers, ms(0), 0.0).await?;
                partition.close();
            }
            _ => {}
        }
        tokio::time::sleep(phase).await;
        while bursting.join_next().await.is_some() {}
        let after = upstream(admin).await;
        let (reqs, retries) = (after.0 - before.0, after.1 - before.1);
        // The budget (retry.budget_ratio 0.2, budget_min_per_sec 10): in
        // any 10 s, retries <= 20% of the requests + 100. Over a phase:
        // 20% of the first attempts from 10 s before it to its end, plus
        // 100 per 10 s window it touches.
        let earlier = at(t - Duration::from_secs(10));
        let first_attempts = (after.0 - after.1) - (earlier.0 - earlier.1);
        let windows = (t.elapsed().as_secs_f64() / 10.0).ceil() + 1.0;
        let budget = 0.2 * first_attempts.max(0.0) + 100.0 * windows;
        println!(
            "netem: phase {name}: {reqs:.0} upstream requests, {retries:.0} retries (budget {budget:.0})"
        );
        if retries > budget + 1.0 {
            problems.push(format!(
                "phase {name}: {retries} retries over the budget {budget:.0}"
            ));
        }
        if i == 3 {
            // Every miss of the burst fails its first attempt, and with
            // attempts = 2 each would be retried: the budget must refuse
            // some of those retries.
            println!(
                "netem: partition: {burst} misses at once, {retries:.0} retries in the phase \
                 (without a retry budget at least {burst})"
            );
            if retries >= burst as f64 {
                problems.push(format!(
                    "partition: {retries} retries for a burst of {burst} misses: the budget did not bound them"
                ));
            }
        }
    }
    while set.join_next().await.is_some() {}
    sampler.abort();
    // The worst any answer may take: 2 attempts, each its connect timeout
    // (3 s) and its header timeout (3 s), each packet 200 ms late at most, to
    // the head (13 s); then one idle gap of the body (3 s). A request that
    // waits for another's revalidation of a stale-if-error object is
    // answered at its lock timeout (10 s) at the latest: it never takes a
    // second set of timeouts.
    for (what, slowest) in [
        ("a miss", &slowest_fresh),
        ("a stale-if-error object", &slowest_stale),
    ] {
        let slowest = slowest.load(Ordering::Relaxed);
        println!(
            "netem: slowest answer for {what} {slowest} ms (connect 3 s + header 3 s, 2 attempts, then a 3 s idle gap: at most {WORST_MS} ms)"
        );
        if slowest > WORST_MS {
            problems.push(format!(
                "{what} took {slowest} ms, past its timeouts ({WORST_MS} ms)"
            ));
        }
    }
    drop(edge);
    println!("{}", stats.line("netem"));
    if stats.failures() > 0 {
        problems.push(format!("unexpected: {:?}", stats.samples.lock().clone()));
    }
    anyhow::ensure!(problems.is_empty(), "netem: {}", problems.join("; "));
    println!("netem: PASS");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_counts_are_read_from_tc() {
        let tc = "qdisc netem 8001: root refcnt 2 limit 1000 delay 200ms loss 5%\n \
                  Sent 1234567 bytes 8910 pkt (dropped 446, overlimits 0 requeues 0) \n \
                  backlog 0b 0p requeues 0\n";
        assert_eq!(qdisc_counts(tc), Some((8910, 446)));
        // Another qdisc's counts are not netem's.
        let other =
            "qdisc noqueue 0: root refcnt 2 \n Sent 5 bytes 1 pkt (dropped 0, overlimits 0)\n";
        assert_eq!(qdisc_counts(other), None);
        assert_eq!(qdisc_counts(""), None);
    }

    #[test]
    fn wire_commands_parse_and_bad_ones_are_refused() {
        let (d, l) = parse_wire("delay_ms=200 loss=5").expect("valid");
        assert_eq!((d, l), (Duration::from_millis(200), 5.0));
        let (d, l) = parse_wire("loss=100 delay_ms=0").expect("valid");
        assert_eq!((d, l), (Duration::ZERO, 100.0));
        for bad in [
            "",
            "delay_ms=200",
            "loss=5",
            "delay_ms=x loss=5",
            "delay=1 loss=5",
        ] {
            assert!(parse_wire(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
