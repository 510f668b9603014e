//! The chaos scenarios of issue #16. Each runs the real binaries under load,
//! injects one fault on a schedule, judges every request the clients sent,
//! and prints one line of counts (see docs/soak-chaos.md).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_e2e::certs::{TempDir, TestCa};
use meridian_e2e::client::{Resp, Tls};
use meridian_e2e::origin::{Stats as OriginStats, TestOrigin};

use crate::Args;
use crate::dns::{DnsClient, NOERROR, SERVFAIL};
use crate::load::{Check, Client, Mutex, Proto, Req, Stats, Target, Verdict, http_worker};
use crate::procs::{
    Server, admin_get, bin_from_env, dns_config, free_port, metric, proc_cpu, start_dns,
    start_edge, start_edge_with_env,
};

/// Intervals during which a fault was injected, to tell an expected failure
/// (the request overlapped one) from an unexpected one.
#[derive(Default)]
pub struct Windows(Mutex<Vec<(Instant, Option<Instant>)>>);

impl Windows {
    pub fn open(&self) {
        self.0.lock().push((Instant::now(), None));
    }
    pub fn close(&self) {
        if let Some(w) = self.0.lock().last_mut()
            && w.1.is_none()
        {
            w.1 = Some(Instant::now());
        }
    }
    /// Whether `[t0, t1]` overlaps a window widened by `grace` at its end.
    pub fn overlaps(&self, t0: Instant, t1: Instant, grace: Duration) -> bool {
        self.0
            .lock()
            .iter()
            .any(|(a, b)| *a <= t1 && b.is_none_or(|b| t0 <= b + grace))
    }
    pub fn count(&self) -> usize {
        self.0.lock().len()
    }
}

/// A certificate for `localhost` and the client TLS settings trusting it.
struct Pki {
    cert: PathBuf,
    key: PathBuf,
    tls: Tls,
}

fn pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca = TestCa::new(dir)?;
    let leaf = ca.leaf(dir, "localhost", &["localhost"])?;
    Ok(Pki {
        cert: leaf.cert,
        key: leaf.key,
        tls: Tls {
            roots: Arc::new(ca.roots()?),
            sni: "localhost".into(),
            alpn: vec![b"h2".to_vec()],
        },
    })
}

/// An edge config: a plain and a TLS listener, admin (their addresses in
/// `addrs`), one site on `origin`. `pool` and `site` are appended to the
/// pool and the site, `top` at the top.
fn edge_config(
    (plain, tls, admin): (&str, &str, &str),
    pki: &Pki,
    origin: &str,
    top: &str,
    site: &str,
    pool: &str,
) -> String {
    format!(
        r#"[admin]
listen = "{admin}"

[log]
access_log = "off"

{top}

[[listeners]]
address = "{plain}"

[[listeners]]
address = "{tls}"
tls = true

[[tls.certificates]]
cert = "{cert}"
key = "{key}"
default = true

[[sites]]
hosts = ["*"]
pool = "origin"
{site}

[pools.origin]
origins = [{{ url = "{origin}" }}]
{pool}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

fn target(edge: &Server, tls: &Tls) -> anyhow::Result<Arc<Target>> {
    Ok(Arc::new(Target {
        plain: *edge
            .http
            .first()
            .ok_or_else(|| anyhow::anyhow!("no plain listener"))?,
        tls: edge.https.first().map(|a| (*a, tls.clone())),
        host: "localhost".into(),
    }))
}

fn status_of(res: &anyhow::Result<Resp>) -> Option<u16> {
    res.as_ref().ok().map(|r| r.status)
}

/// Prints the scenario's line and fails if anything unexpected happened.
fn finish(name: &str, stats: &Stats, other: Vec<String>) -> anyhow::Result<()> {
    println!("{}", stats.line(name));
    let mut problems = other;
    if stats.failures() > 0 {
        problems.push(format!(
            "unexpected failures or corrupt bodies, first ones: {:?}",
            stats.samples.lock().clone()
        ));
    }
    if stats.ok.load(Ordering::Relaxed) == 0 {
        problems.push("no request succeeded".into());
    }
    if problems.is_empty() {
        println!("{name}: PASS");
        Ok(())
    } else {
        anyhow::bail!("{name}: {}", problems.join("; "))
    }
}

fn sie_path(n: u64) -> String {
    format!("/cc/sie-{n}?cc=public,max-age=1,stale-if-error=3600&size=2048&seed=4&digest=1")
}

async fn warm(
    client: &mut Client,
    paths: impl Iterator<Item = (String, usize)>,
) -> anyhow::Result<()> {
    for (p, size) in paths {
        let r = Req::get(p, Check::Digest { size }, "warm");
        let resp = client.send(&r).await?;
        anyhow::ensure!(resp.status == 200, "warming {}: {}", r.path, resp.status);
        crate::load::verify(&r.check, &resp)
            .map_err(|e| anyhow::anyhow!("warming {}: {e}", r.path))?;
    }
    Ok(())
}

/// Where a scenario's server logs go: kept after the run (the scratch
/// directory is not), overwritten by the next run of the same scenario.
pub fn log_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("MERIDIAN_CHAOS_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("meridian-chaos-logs"));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&p);
    p
}

// ---------------------------------------------------------------------------
// 1. The origin flaps.

/// The origin is up `period` seconds, down `period` seconds. Objects with
/// `stale-if-error` must always be served (200, right body); new objects may
/// fail only with 502/503/504 while the origin is down; nothing may take
/// longer than the pool's timeouts allow.
pub async fn flap(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.get("duration", 60u64)?);
    let period = Duration::from_secs(args.get("period", 5u64)?);
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let work = TempDir::new("chaos-flap")?;
    let pki = pki(work.path())?;
    let ostats = Arc::new(OriginStats::default());
    let origin = TestOrigin::start_on("127.0.0.1:0".parse()?, "flap", ostats.clone()).await?;
    let oaddr = origin.addr;
    let cfg = work.path().join("edge.toml");
    // connect 1 s + header 2 s, two attempts: a request needs at most ~6 s.
    std::fs::write(
        &cfg,
        edge_config(
            ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
            &pki,
            &origin.url(),
            "[cache]\nmemory = \"64MiB\"",
            "",
            "timeouts = { connect = \"1s\", header = \"2s\" }",
        ),
    )?;
    let edge = start_edge(&edge_bin, &cfg, &log_path("flap-edge"))?;
    let target = target(&edge, &pki.tls)?;
    let mut c = Client::new(Proto::H1, target.clone(), Duration::from_secs(10));
    warm(&mut c, (0..100).map(|n| (sie_path(n), 2048))).await?;

    let down = Arc::new(Windows::default());
    let stats = Stats::new(false);
    let until = Instant::now() + duration;
    let fresh = Arc::new(AtomicU64::new(0));
    let max_stale_ms = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (w, proto) in [Proto::H1, Proto::H1, Proto::H2, Proto::H3]
        .into_iter()
        .enumerate()
    {
        let client = Client::new(proto, target.clone(), Duration::from_secs(8));
        let (stats, fresh, down, max_stale) = (
            stats.clone(),
            fresh.clone(),
            down.clone(),
            max_stale_ms.clone(),
        );
        set.spawn(async move {
            http_worker(
                client,
                stats,
                Some(50.0),
                until,
                u64::MAX,
                move |i| {
                    if (i + w as u64).is_multiple_of(4) {
                        let n = fresh.fetch_add(1, Ordering::Relaxed);
                        Req::get(
                            format!("/cc/new-{n}?cc=public,max-age=60&size=1024&seed=5&digest=1"),
                            Check::Digest { size: 1024 },
                            "fresh",
                        )
                    } else {
                        Req::get(
                            sie_path((i * 7 + w as u64) % 100),
                            Check::Digest { size: 2048 },
                            "stale",
                        )
                    }
                },
                move |r, res, t0, t1| {
                    if r.class == "stale" {
                        max_stale.fetch_max((t1 - t0).as_millis() as u64, Ordering::Relaxed);
                    }
                    match (r.class, status_of(res)) {
                        (_, Some(200)) => Verdict::Ok,
                        ("fresh", Some(502..=504)) if down.overlaps(t0, t1, Duration::ZERO) => {
                            Verdict::Expected
                        }
                        _ => Verdict::Unexpected,
                    }
                },
            )
            .await
        });
    }
    let flapper = {
        let down = down.clone();
        tokio::spawn(async move {
            let mut origin = Some(origin);
            let mut problems = Vec::new();
            while Instant::now() + period < until {
                tokio::time::sleep(period).await;
                down.open();
                if let Some(mut o) = origin.take() {
                    o.stop();
                }
                tokio::time::sleep(period).await;
                match TestOrigin::start_on(oaddr, "flap", ostats.clone()).await {
                    Ok(o) => origin = Some(o),
                    Err(e) => problems.push(format!("origin restart: {e:#}")),
                }
                down.close();
            }
            problems
        })
    };
    while set.join_next().await.is_some() {}
    let problems = flapper
        .await
        .unwrap_or_else(|e| vec![format!("flapper: {e}")]);
    let m = admin_get(edge.admin()?, "/metrics")
        .await
        .unwrap_or_default();
    println!(
        "flap: {} origin outages of {} s; slowest stale-if-error answer {} ms; cache results: stale-if-error {}, hit {}",
        down.count(),
        period.as_secs(),
        max_stale_ms.load(Ordering::Relaxed),
        metric(
            &m,
            "meridian_cache_requests_total",
            &["result=\"stale-if-error\""]
        ),
        metric(&m, "meridian_cache_requests_total", &["result=\"hit\""]),
    );
    let mut other = problems;
    if down.count() == 0 {
        other.push("the origin never went down".into());
    }
    finish("flap", &stats, other)
}

// ---------------------------------------------------------------------------
// 2. kill -9 of the edge.

/// The kill9 edge's disk tier.
const KILL9_DISK: u64 = 256 << 20;
/// The share of objects (stored 2 s or more before a check, within half the disk's capacity)
/// that may be lost, before or after a kill: none. Before foyer's sequence race was closed
/// (`disk_order` in edge/src/cache/storage/mod.rs), 8.3% of them were lost across kills, in runs
/// of consecutive objects (docs/soak-chaos.md).
const KILL9_MAX_LOSS_PCT: f64 = 0.0;
/// The load's requests per second (all five workers; 70% of them new 16 KiB objects): about
/// 5.6 MB/s of disk writes, so half the disk holds the last 20 s or so of writes, and the
/// objects checked at each kill (2 s old or more) span most of the 20 s between kills. An
/// unpaced load wrote half the disk in under 2 s in a release build, which left nothing to
/// check.
const KILL9_RATE: f64 = 500.0;

#[derive(Default)]
struct Kill9Counts {
    kills: u64,
    live_checked: u64,
    live_restored: u64,
    checked: u64,
    restored: u64,
    too_old: u64,
}

fn w_path(n: u64) -> String {
    format!("/cc/w-{n}?cc=public,max-age=3600&size=16384&seed=6&digest=1")
}

/// A write-heavy load (`rate` req/s, [`KILL9_RATE`] unless given; 70% new
/// objects, each written to the disk tier; 30% re-reads), `kill -9` of the
/// edge every `every` seconds, restarted on the
/// same ports. Every body must match the origin's digest; requests may fail
/// only across a kill; objects stored at least 2 s before a kill (and within
/// half the disk's capacity of it) must be hits without the origin, asked for
/// with the protocol that stored them: a sample just before the kill, another
/// after the restart, none of them lost ([`KILL9_MAX_LOSS_PCT`]).
pub async fn kill9(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.get("duration", 70u64)?);
    let every = Duration::from_secs(args.get("every", 20u64)?);
    let rate: f64 = args.get("rate", KILL9_RATE)?;
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let work = TempDir::new("chaos-kill9")?;
    let pki = pki(work.path())?;
    let origin = TestOrigin::start("kill9").await?;
    let (plain, tls, admin) = (free_port()?, free_port()?, free_port()?);
    let cfg = work.path().join("edge.toml");
    std::fs::write(
        &cfg,
        edge_config(
            (
                &format!("127.0.0.1:{plain}"),
                &format!("127.0.0.1:{tls}"),
                &format!("127.0.0.1:{admin}"),
            ),
            &pki,
            &origin.url(),
            &format!(
                "[cache]\nmemory = \"2MiB\"\ndisk_dir = \"{}\"\ndisk = \"{}MiB\"",
                work.path().join("disk").display(),
                KILL9_DISK >> 20
            ),
            "",
            "",
        ),
    )?;
    let log = log_path("kill9-edge");
    let edge = start_edge(&edge_bin, &cfg, &log)?;
    let target = target(&edge, &pki.tls)?;
    let down = Arc::new(Windows::default());
    let stats = Stats::new(false);
    let until = Instant::now() + duration;
    let next = Arc::new(AtomicU64::new(0));
    // Objects whose fill completed, with when and by which protocol: the cache key's scheme is
    // the connection's (http or https), so an object is asked for again the same way.
    let done: Arc<Mutex<Vec<(u64, Instant, Proto)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut set = tokio::task::JoinSet::new();
    for (w, proto) in [Proto::H1, Proto::H1, Proto::H1, Proto::H2, Proto::H2]
        .into_iter()
        .enumerate()
    {
        let client = Client::new(proto, target.clone(), Duration::from_secs(10));
        let (stats, next, down, done) = (stats.clone(), next.clone(), down.clone(), done.clone());
        let done2 = done.clone();
        set.spawn(async move {
            http_worker(
                client,
                stats,
                Some(rate / 5.0),
                until,
                u64::MAX,
                move |i| {
                    let old = {
                        let d = done.lock();
                        (!d.is_empty() && (i + w as u64) % 10 < 3)
                            .then(|| d[(i as usize * 31 + w) % d.len()].0)
                    };
                    let n = old.unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed));
                    Req::get(w_path(n), Check::Digest { size: 16384 }, "write")
                },
                move |r, res, t0, t1| match status_of(res) {
                    Some(200) => {
                        if let Some(n) = r
                            .path
                            .strip_prefix("/cc/w-")
                            .and_then(|p| p.split('?').next())
                            .and_then(|n| n.parse().ok())
                        {
                            done2.lock().push((n, t1, proto));
                        }
                        Verdict::Ok
                    }
                    _ if down.overlaps(t0, t1, Duration::from_millis(200)) => Verdict::Expected,
                    _ => Verdict::Unexpected,
                },
            )
            .await
        });
    }
    // Cumulative bytes the disk tier wrote (over every edge process), sampled every 250 ms:
    // an object followed by more than half the disk's capacity may have been evicted by the
    // disk tier itself, and is not counted as lost.
    let written: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let written = written.clone();
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, admin));
        tokio::spawn(async move {
            let (mut base, mut last_raw) = (0u64, 0u64);
            while Instant::now() < until {
                if let Ok(t) = admin_get(admin, "/cache").await {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    if let Some(raw) = v["disk"]["write_bytes"].as_u64() {
                        if raw < last_raw {
                            base += last_raw; // a new process
                        }
                        last_raw = raw;
                        written.lock().push((Instant::now(), base + raw));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let killer = {
        let (down, done, origin_stats) = (down.clone(), done.clone(), origin.stats.clone());
        let written = written.clone();
        let (cfg, log, edge_bin, target) =
            (cfg.clone(), log.clone(), edge_bin.clone(), target.clone());
        tokio::spawn(async move {
            let mut edge = edge;
            let mut problems: Vec<String> = Vec::new();
            let mut counts = Kill9Counts::default();
            // Asks for each object once; counts those served without a new origin request.
            let check = |sample: Vec<(u64, Duration, Proto)>, when: &'static str, kills: u64| {
                let (target, origin_stats) = (target.clone(), origin_stats.clone());
                async move {
                    let mut h1 = Client::new(Proto::H1, target.clone(), Duration::from_secs(10));
                    let mut h2 = Client::new(Proto::H2, target, Duration::from_secs(10));
                    let (mut restored, mut lost, mut problems) = (0u64, Vec::new(), Vec::new());
                    for &(n, age, proto) in &sample {
                        let c = if proto == Proto::H1 { &mut h1 } else { &mut h2 };
                        let path = format!("/cc/w-{n}");
                        let count = || async {
                            origin_stats
                                .by_path
                                .lock()
                                .await
                                .get(&path)
                                .copied()
                                .unwrap_or(0)
                        };
                        let before = count().await;
                        let r = Req::get(w_path(n), Check::Digest { size: 16384 }, "restored");
                        match c.send(&r).await {
                            Ok(resp)
                                if resp.status == 200
                                    && crate::load::verify(&r.check, &resp).is_ok() =>
                            {
                                if count().await == before {
                                    restored += 1;
                                } else {
                                    lost.push(format!(
                                        "w-{n} ({proto:?}) stored {} ms before the kill",
                                        age.as_millis()
                                    ));
                                }
                            }
                            Ok(resp) => problems.push(format!(
                                "{when} kill {kills}: {} -> {} (or a bad body)",
                                r.path, resp.status
                            )),
                            Err(e) => {
                                problems.push(format!("{when} kill {kills}: {}: {e:#}", r.path))
                            }
                        }
                    }
                    if !lost.is_empty() {
                        println!(
                            "kill9: {when} kill {kills}, {} of {} not served from the cache: {}",
                            lost.len(),
                            sample.len(),
                            lost.join("; ")
                        );
                    }
                    (sample.len() as u64, restored, problems)
                }
            };
            // When each kill landed: an object stored less than 2 s before an earlier kill
            // may have died with it (still in foyer's flush buffer), and is not checked.
            let mut kills_at: Vec<Instant> = Vec::new();
            while Instant::now() + every < until {
                tokio::time::sleep(every).await;
                let cutoff = Instant::now() - Duration::from_secs(2);
                let now = Instant::now();
                // Disk bytes written at a time (the last sample before it).
                let bytes_at = |t: Instant| {
                    let w = written.lock();
                    w.iter()
                        .take_while(|(at, _)| *at <= t)
                        .last()
                        .map_or(0, |(_, b)| *b)
                };
                let written_now = bytes_at(now);
                let (mut stored, mut too_old) = (Vec::new(), 0u64);
                {
                    let d = done.lock();
                    let mut seen = HashSet::new();
                    let in_flight = |t: Instant| {
                        kills_at
                            .iter()
                            .any(|&k| t <= k && k.duration_since(t) < Duration::from_secs(2))
                    };
                    for &(n, t, proto) in d.iter().filter(|(_, t, _)| *t < cutoff && !in_flight(*t))
                    {
                        if !seen.insert((n, proto == Proto::H1)) {
                            continue;
                        }
                        if written_now.saturating_sub(bytes_at(t)) > KILL9_DISK / 2 {
                            too_old += 1;
                        } else {
                            stored.push((n, t, proto));
                        }
                    }
                }
                // Two disjoint samples of up to 40: one asked before the kill (lost while
                // the edge ran), one after the restart (lost across the kill).
                let sample: Vec<(u64, Instant, Proto)> = stored
                    .iter()
                    .rev()
                    .step_by((stored.len() / 80).max(1))
                    .copied()
                    .collect();
                let (live, after): (Vec<_>, Vec<_>) =
                    sample.iter().enumerate().partition(|(i, _)| i % 2 == 0);
                let (live, after): (Vec<_>, Vec<_>) = (
                    live.into_iter().map(|(_, x)| *x).collect(),
                    after.into_iter().map(|(_, x)| *x).collect(),
                );
                let (c, r, p) = check(
                    live.iter().map(|&(n, t, p)| (n, now - t, p)).collect(),
                    "before",
                    counts.kills + 1,
                )
                .await;
                (counts.live_checked, counts.live_restored) =
                    (counts.live_checked + c, counts.live_restored + r);
                problems.extend(p);
                let kill_at = Instant::now();
                kills_at.push(kill_at);
                down.open();
                edge.kill9();
                counts.kills += 1;
                counts.too_old += too_old;
                match start_edge(&edge_bin, &cfg, &log) {
                    Ok(e) => edge = e,
                    Err(e) => {
                        problems.push(format!("restart {}: {e:#}", counts.kills));
                        down.close();
                        return (edge, problems, counts);
                    }
                }
                down.close();
                let (c, r, p) = check(
                    after.iter().map(|&(n, t, p)| (n, kill_at - t, p)).collect(),
                    "after",
                    counts.kills,
                )
                .await;
                (counts.checked, counts.restored) = (counts.checked + c, counts.restored + r);
                problems.extend(p);
            }
            (edge, problems, counts)
        })
    };
    while set.join_next().await.is_some() {}
    let (edge, mut problems, k) = killer.await?;
    sampler.abort();
    let cache = admin_get(edge.admin()?, "/cache").await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&cache).unwrap_or_default();
    let share = |lost: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            100.0 * lost as f64 / of as f64
        }
    };
    println!(
        "kill9: {} kills; objects stored 2 s or more before a kill and within half the disk's capacity of it: before the kill {} of {} were served from the cache (lost {:.1}%), after the restart {} of {} (lost {:.1}%); {} older objects not checked; entries now {}, corrupt entries {}",
        k.kills,
        k.live_restored,
        k.live_checked,
        share(k.live_checked - k.live_restored, k.live_checked),
        k.restored,
        k.checked,
        share(k.checked - k.restored, k.checked),
        k.too_old,
        v["entries"],
        v["corrupt_entries"]
    );
    if k.kills == 0 {
        problems.push("the edge was never killed".into());
    }
    // Entries come back: at most KILL9_MAX_LOSS_PCT% of those sampled may be lost, before or
    // after a kill (see docs/soak-chaos.md).
    for (what, checked, restored) in [
        ("before a kill", k.live_checked, k.live_restored),
        ("after a restart", k.checked, k.restored),
    ] {
        if checked == 0 || share(checked - restored, checked) > KILL9_MAX_LOSS_PCT {
            problems.push(format!(
                "{what}: only {restored} of {checked} stored objects were served from the cache (at most {KILL9_MAX_LOSS_PCT}% may be lost; none checked fails too)"
            ));
        }
    }
    drop(edge);
    finish("kill9", &stats, problems)
}

// ---------------------------------------------------------------------------
// 3. The disk fills.

/// The disk tier on a tmpfs of `--tmpfs-mb` (mounted here) that a ballast
/// file fills; under load, every request must still be served (memory and
/// origin), the write errors are counted (`meridian_cache_disk_errors_total`)
/// and logged a bounded number of times, and once the ballast goes the tier
/// stores again: objects stored after that come back from the disk.
pub async fn diskfull(args: &Args) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.get("phase", 15u64)?);
    let mb: u64 = args.get("tmpfs-mb", 64u64)?;
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let work = TempDir::new("chaos-diskfull")?;
    let mnt = work.path().join("disk");
    std::fs::create_dir_all(&mnt)?;
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mb}m"),
            "meridian-chaos",
        ])
        .arg(&mnt)
        .status()?;
    anyhow::ensure!(
        st.success(),
        "mounting a tmpfs needs root (mount -t tmpfs failed)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    disk_scenario(
        "diskfull",
        phase,
        &edge_bin,
        &work,
        &mnt,
        mb * 3 / 4,
        DiskFault::Full {
            ballast: mnt.join("ballast"),
            mb,
        },
    )
    .await
}

/// The disk tier's reads and writes fail: half of the edge's `pread`s and
/// `pwrite`s answer `EIO` for `--phase` seconds, injected with libfiu
/// (`fiu-utils`: its `LD_PRELOAD` library and `fiu-ctrl`). The same load and
/// checks as `diskfull`: every request is served (memory and origin), the
/// errors are counted and logged a bounded number of times, and once the
/// faults stop the tier stores again. Needs no root.
pub async fn diskerror(args: &Args) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.get("phase", 15u64)?);
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    anyhow::ensure!(
        Path::new(FIU_POSIX_PRELOAD).exists() && Path::new(FIU_RUN_PRELOAD).exists(),
        "diskerror needs libfiu's preload libraries ({FIU_POSIX_PRELOAD}): apt-get install fiu-utils"
    );
    let work = TempDir::new("chaos-diskerror")?;
    let disk = work.path().join("disk");
    std::fs::create_dir_all(&disk)?;
    let fifo = work.path().join("fiu");
    disk_scenario(
        "diskerror",
        phase,
        &edge_bin,
        &work,
        &disk,
        48,
        DiskFault::Eio { fifo },
    )
    .await
}

const FIU_RUN_PRELOAD: &str = "/usr/lib/fiu/fiu_run_preload.so";
const FIU_POSIX_PRELOAD: &str = "/usr/lib/fiu/fiu_posix_preload.so";

/// How a disk scenario breaks the disk tier.
enum DiskFault {
    /// A file fills the filesystem until `ENOSPC`.
    Full { ballast: PathBuf, mb: u64 },
    /// libfiu fails half of the edge's `pread`s and `pwrite`s with `EIO`; `fifo` is the base
    /// name of its remote control.
    Eio { fifo: PathBuf },
}

impl DiskFault {
    /// Breaks the disk; says what it did.
    async fn inject(&self, edge_pid: u32) -> anyhow::Result<String> {
        match self {
            DiskFault::Full { ballast, mb } => {
                let mb = *mb;
                let filled = tokio::task::spawn_blocking({
                    let ballast = ballast.clone();
                    move || -> u64 {
                        use std::io::Write;
                        let Ok(mut f) = std::fs::File::create(&ballast) else {
                            return 0;
                        };
                        let chunk = vec![0u8; 1 << 20];
                        let mut n = 0u64;
                        for _ in 0..(mb * 2) {
                            match f.write(&chunk) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => n += k as u64,
                            }
                        }
                        let _ = f.sync_all();
                        n
                    }
                })
                .await?;
                anyhow::ensure!(filled > 0, "could not write the ballast");
                Ok(format!("ballast {} MiB on a {mb} MiB tmpfs", filled >> 20))
            }
            DiskFault::Eio { fifo } => {
                for point in ["pwrite", "pread"] {
                    fiu_ctrl(
                        fifo,
                        edge_pid,
                        &format!(
                            "enable_random name=posix/io/rw/{point},probability=0.5,failinfo={EIO}"
                        ),
                    )
                    .await?;
                }
                Ok("half of the edge's preads and pwrites fail with EIO".into())
            }
        }
    }

    /// Mends the disk.
    async fn clear(&self, edge_pid: u32) -> anyhow::Result<()> {
        match self {
            DiskFault::Full { ballast, .. } => Ok(std::fs::remove_file(ballast)?),
            DiskFault::Eio { fifo } => {
                for point in ["pwrite", "pread"] {
                    fiu_ctrl(fifo, edge_pid, &format!("disable name=posix/io/rw/{point}")).await?;
                }
                Ok(())
            }
        }
    }
}

/// `EIO` on Linux: libfiu's `failinfo` is the errno a failed call sets.
const EIO: i32 = 5;

/// Sends one remote-control command to a process that runs with libfiu preloaded.
async fn fiu_ctrl(fifo: &Path, pid: u32, command: &str) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("fiu-ctrl")
            .arg("-f")
            .arg(fifo)
            .arg("-c")
            .arg(command)
            .arg(pid.to_string())
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("fiu-ctrl {command:?}: no answer in 10 s"))?
    .map_err(|e| anyhow::anyhow!("fiu-ctrl (apt-get install fiu-utils): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "fiu-ctrl {command:?}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The load, phases and checks of `diskfull` and `diskerror`: the disk tier in `disk`
/// (`disk_mb` of it), normal for `phase`, broken by `fault` for `phase`, then mended.
async fn disk_scenario(
    name: &'static str,
    phase: Duration,
    edge_bin: &Path,
    work: &TempDir,
    disk: &Path,
    disk_mb: u64,
    fault: DiskFault,
) -> anyhow::Result<()> {
    let pki = pki(work.path())?;
    let origin = TestOrigin::start(name).await?;
    let cfg = work.path().join("edge.toml");
    std::fs::write(
        &cfg,
        edge_config(
            ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
            &pki,
            &origin.url(),
            &format!(
                "[cache]\nmemory = \"4MiB\"\ndisk_dir = \"{}\"\ndisk = \"{disk_mb}MiB\"",
                disk.display(),
            ),
            "",
            "",
        ),
    )?;
    let log = log_path(&format!("{name}-edge"));
    let edge = match &fault {
        DiskFault::Full { .. } => start_edge(edge_bin, &cfg, &log)?,
        DiskFault::Eio { fifo } => start_edge_with_env(
            edge_bin,
            &cfg,
            &log,
            &[
                (
                    "LD_PRELOAD",
                    format!("{FIU_RUN_PRELOAD} {FIU_POSIX_PRELOAD}"),
                ),
                ("FIU_CTRL_FIFO", fifo.display().to_string()),
            ],
        )?,
    };
    let edge_pid = edge.child.id();
    let admin = edge.admin()?;
    let target = target(&edge, &pki.tls)?;
    let stats = Stats::new(false);
    let next = Arc::new(AtomicU64::new(0));
    let cache = |t: &str| -> serde_json::Value { serde_json::from_str(t).unwrap_or_default() };

    // Phases: normal, full (ballast), recovered (ballast removed).
    // The protocol each object was first stored by: the cache key's scheme is the connection's
    // (http or https), so it is asked for again the same way.
    let stored_by: Arc<Mutex<std::collections::HashMap<u64, Proto>>> = Arc::default();
    let run_phase = |name: &'static str| {
        let (stats, next, target, stored_by) = (
            stats.clone(),
            next.clone(),
            target.clone(),
            stored_by.clone(),
        );
        async move {
            let until = Instant::now() + phase;
            let mut set = tokio::task::JoinSet::new();
            for proto in [Proto::H1, Proto::H1, Proto::H2] {
                let client = Client::new(proto, target.clone(), Duration::from_secs(10));
                let (stats, next, stored_by) = (stats.clone(), next.clone(), stored_by.clone());
                set.spawn(async move {
                    http_worker(
                        client,
                        stats,
                        Some(60.0),
                        until,
                        u64::MAX,
                        move |i| {
                            // Two thirds new objects (disk writes), a third
                            // re-reads of recent ones.
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            let n = if i % 3 == 2 { n.saturating_sub(50) } else { n };
                            Req::get(
                                format!(
                                    "/cc/d-{n}?cc=public,max-age=3600&size=32768&seed=7&digest=1"
                                ),
                                Check::Digest { size: 32768 },
                                name,
                            )
                        },
                        move |r, res, _, _| match status_of(res) {
                            Some(200) => {
                                if let Some(n) = r
                                    .path
                                    .strip_prefix("/cc/d-")
                                    .and_then(|p| p.split('?').next())
                                    .and_then(|n| n.parse::<u64>().ok())
                                {
                                    stored_by.lock().entry(n).or_insert(proto);
                                }
                                Verdict::Ok
                            }
                            _ => Verdict::Unexpected,
                        },
                    )
                    .await
                });
            }
            while set.join_next().await.is_some() {}
        }
    };
    run_phase("normal").await;
    let before = cache(&admin_get(admin, "/cache").await?);
    let what = fault.inject(edge_pid).await?;
    let logged_before = edge_log_errors(&log);
    let full_start = Instant::now();
    run_phase("full").await;
    let full_secs = full_start.elapsed().as_secs_f64();
    let during = cache(&admin_get(admin, "/cache").await?);
    let logged_full = edge_log_errors(&log) - logged_before;
    let errors_full = metric(
        &admin_get(admin, "/metrics").await.unwrap_or_default(),
        "meridian_cache_disk_errors_total",
        &[],
    );
    fault.clear(edge_pid).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recovered_from = next.load(Ordering::Relaxed);
    run_phase("recovered").await;
    let after = cache(&admin_get(admin, "/cache").await?);
    let m = admin_get(admin, "/metrics").await.unwrap_or_default();
    let wb = |v: &serde_json::Value| v["disk"]["write_bytes"].as_f64().unwrap_or(0.0);
    let hits = |v: &serde_json::Value| v["disk"]["hits"].as_u64().unwrap_or(0);
    // Objects stored after the space returned come back from the disk: no new origin request,
    // a disk hit each. Those followed by 250 to 450 others (of about 36 KiB on disk each): out
    // of the 4 MiB memory tier, and well inside the disk tier's capacity (the phase may write
    // more than that capacity).
    let last = next.load(Ordering::Relaxed);
    let first = last.saturating_sub(450).max(recovered_from);
    let mut h1 = Client::new(Proto::H1, target.clone(), Duration::from_secs(10));
    let mut h2 = Client::new(Proto::H2, target.clone(), Duration::from_secs(10));
    let (mut checked, mut restored, mut lost) = (0u64, 0u64, Vec::new());
    for n in (first..last.saturating_sub(250)).step_by(5) {
        let path = format!("/cc/d-{n}");
        let before_n = origin
            .stats
            .by_path
            .lock()
            .await
            .get(&path)
            .copied()
            .unwrap_or(0);
        let proto = stored_by.lock().get(&n).copied();
        let Some(proto) = proto.filter(|_| before_n > 0) else {
            continue; // a number a re-read used up: never stored
        };
        let client = if proto == Proto::H1 { &mut h1 } else { &mut h2 };
        checked += 1;
        let r = Req::get(
            format!("/cc/d-{n}?cc=public,max-age=3600&size=32768&seed=7&digest=1"),
            Check::Digest { size: 32768 },
            "restored",
        );
        let resp = client.send(&r).await?;
        crate::load::verify(&r.check, &resp)
            .map_err(|e| anyhow::anyhow!("reading back {}: {e}", r.path))?;
        let after_n = origin
            .stats
            .by_path
            .lock()
            .await
            .get(&path)
            .copied()
            .unwrap_or(0);
        if resp.status == 200 && after_n == before_n {
            restored += 1;
        } else {
            lost.push(format!("d-{n}"));
        }
    }
    let end = cache(&admin_get(admin, "/cache").await?);
    let disk_hits = hits(&end).saturating_sub(hits(&after));
    let errors_total = metric(&m, "meridian_cache_disk_errors_total", &[]);
    println!(
        "{name}: {what}; disk bytes written: {:.0} before, {:.0} while broken, {:.0} after; warnings or errors logged while broken: {logged_full} in {full_secs:.0} s; storage error metric: {errors_full} after the broken phase, {errors_total} at the end; disk writes skipped: {}; preallocated: {}",
        wb(&before),
        wb(&during) - wb(&before),
        wb(&after) - wb(&during),
        end["disk"]["writes_skipped"],
        end["disk"]["preallocated"],
    );
    println!(
        "{name}: {restored} of {checked} objects stored after the disk was mended were served without the origin, with {disk_hits} disk hits{}",
        if lost.is_empty() {
            String::new()
        } else {
            format!("; from the origin again: {}", lost.join(" "))
        }
    );
    let mut problems = Vec::new();
    let panics = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("panicked at")
        .count();
    if panics > 0 {
        problems.push(format!(
            "{panics} panics in the edge's log ({})",
            log.display()
        ));
    }
    if wb(&after) <= wb(&during) {
        problems.push("the disk tier wrote nothing after the disk was mended".into());
    }
    if errors_full < 1.0 {
        problems.push("meridian_cache_disk_errors_total did not count the broken disk".into());
    }
    // Recovery, as the clients see it: the objects come back, and from the disk.
    if checked < 15 || restored * 10 < checked * 9 {
        problems.push(format!(
            "only {restored} of {checked} objects stored after the disk was mended were served from the cache"
        ));
    }
    if disk_hits * 10 < restored * 9 {
        problems.push(format!(
            "{restored} objects stored after the disk was mended came back, but only {disk_hits} from the disk"
        ));
    }
    // Once per interval: no more than one line a second while full.
    if logged_full as f64 > full_secs.ceil() + 2.0 {
        problems.push(format!("{logged_full} warning/error lines in {full_secs:.0} s while the disk was broken (want at most one per second)"));
    }
    if logged_full == 0 {
        problems.push("nothing was logged while the disk was broken".into());
    }
    finish(name, &stats, problems)
}

/// Warning and error lines (and panics) in an edge log.
fn edge_log_errors(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(strip_ansi)
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            level == "WARN" || level == "ERROR" || l.contains("panicked at")
        })
        .count() as u64
}

/// `line` without ANSI colour sequences (the edge's text log has them).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// 5. A plugin misbehaves.

const MISBEHAVING_PLUGIN: &str = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65536))
      (then (global.set $heap (i32.const 32768))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (data (i32.const 0) "x-misbehave")
  ;; x-misbehave: trap | loop | memory; anything else (or none) passes.
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $c i32)
    (if (i32.ne (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 11) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then (return (i32.const 0))))
    (if (i32.eqz (i32.load (i32.const 16388))) (then (return (i32.const 0))))
    (local.set $c (i32.load8_u (i32.load (i32.const 16384))))
    (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $l (br $l))))
    (if (i32.eq (local.get $c) (i32.const 109))
      (then
        (loop $g (br_if $g (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        unreachable))
    (i32.const 0))
)"#;

/// Clients sending the plugin scenario's misbehaving requests (each paced, so
/// a loop that runs to its deadline does not slow the others).
const PLUGIN_BAD_CLIENTS: u64 = 6;
/// The plugin's `deadline` in the plugin scenario (`--deadline-ms`).
const PLUGIN_DEADLINE_MS: u64 = 50;

/// Every 100th request asks the plugin to trap, loop or exhaust its memory
/// (in turn). Those, and only those, fail (500, the plugin is fail-closed);
/// the others' throughput stays within 10% of runs with no misbehaviour
/// (`--rounds` runs with it, each between two without, `--phase` seconds
/// each; the median of the rounds' changes is judged).
pub async fn plugin(args: &Args) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.get("phase", 3u64)?);
    let rounds: u32 = args.get("rounds", 7u32)?;
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    let deadline_ms: u64 = args.get("deadline-ms", PLUGIN_DEADLINE_MS)?;
    // One request in `every` misbehaves (100 is the issue's; fewer make a
    // misbehaviour's cost stand out of the noise, to measure it).
    let every: u32 = args.get("every", 100u32)?;
    anyhow::ensure!(every >= 2, "--every must be at least 2");
    let good_per_bad = f64::from(every - 1);
    // Which misbehaviours take turns (all three by default); one alone tells
    // what each costs the others.
    let kinds: Vec<&'static str> = match args.str("kinds") {
        None => vec!["trap", "loop", "memory"],
        Some(v) => v
            .split(',')
            .map(|k| match k.trim() {
                "trap" => Ok("trap"),
                "loop" => Ok("loop"),
                "memory" => Ok("memory"),
                other => Err(anyhow::anyhow!(
                    "--kinds: unknown misbehaviour {other:?} (trap, loop, memory)"
                )),
            })
            .collect::<anyhow::Result<_>>()?,
    };
    anyhow::ensure!(!kinds.is_empty(), "--kinds needs at least one misbehaviour");
    let kinds: Arc<[&'static str]> = kinds.into();
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let work = TempDir::new("chaos-plugin")?;
    let pki = pki(work.path())?;
    let wasm = wat::parse_str(MISBEHAVING_PLUGIN)?;
    let plugin = work.path().join("misbehave.wasm");
    std::fs::write(&plugin, wasm)?;
    let origin = TestOrigin::start("plugin").await?;
    let cfg = work.path().join("edge.toml");
    std::fs::write(
        &cfg,
        edge_config(
            ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
            &pki,
            &origin.url(),
            "[cache]\nmemory = \"64MiB\"",
            &format!(
                "[[sites.plugins]]\npath = \"{}\"\nfailure = \"closed\"\nmemory = \"16MiB\"\ndeadline = \"{deadline_ms}ms\"",
                plugin.display()
            ),
            "",
        ),
    )?;
    let edge = start_edge(&edge_bin, &cfg, &log_path("plugin-edge"))?;
    let target = target(&edge, &pki.tls)?;
    let mut c = Client::new(Proto::H1, target.clone(), Duration::from_secs(10));
    warm(
        &mut c,
        (0..200).map(|n| {
            (
                format!("/cc/p-{n}?cc=public,max-age=3600&size=4096&seed=8&digest=1"),
                4096,
            )
        }),
    )
    .await?;

    let stats = Stats::new(false);
    // The well-behaved load is closed-loop, so its throughput is what the box
    // does. With `bad` (misbehaving requests per second), separate clients
    // send the misbehaving requests, paced: a closed-loop client that waited
    // for its own misbehaving request would send fewer good ones however
    // well the server isolated the failure.
    let edge_pid = edge.pid();
    // Each run gives the well-behaved throughput (req/s) and the edge's CPU
    // time per well-behaved request (µs, over every request it served).
    // `side` requests a second go to separate, paced clients in every run;
    // with `misbehave` they misbehave, else they are the same requests
    // without the header, so that a run alone and one with misbehaviour
    // differ only by the misbehaviour (not by connections or requests).
    // The clients, and so their connections, live across the runs: which
    // of the edge's workers serves a connection stays the same, so a run
    // alone and one with misbehaviour differ by nothing else.
    let good_clients: Vec<Client> = [Proto::H1, Proto::H1, Proto::H2, Proto::H2]
        .into_iter()
        .map(|proto| Client::new(proto, target.clone(), Duration::from_secs(10)))
        .collect();
    let side_clients: Vec<Client> = (0..PLUGIN_BAD_CLIENTS)
        .map(|_| Client::new(Proto::H1, target.clone(), Duration::from_secs(10)))
        .collect();
    let clients = Arc::new(Mutex::new((good_clients, side_clients)));
    let run = |side: f64, misbehave: bool| {
        let (stats, kinds, clients) = (stats.clone(), kinds.clone(), clients.clone());
        async move {
            let (good_clients, side_clients) = std::mem::take(&mut *clients.lock());
            let cpu0 = proc_cpu(edge_pid);
            let good = Arc::new(AtomicU64::new(0));
            let until = Instant::now() + phase;
            let mut goods = tokio::task::JoinSet::new();
            for (w, client) in good_clients.into_iter().enumerate() {
                let (stats, good) = (stats.clone(), good.clone());
                goods.spawn(async move {
                    http_worker(
                        client,
                        stats,
                        None,
                        until,
                        u64::MAX,
                        move |i| {
                            Req::get(
                                format!(
                                    "/cc/p-{}?cc=public,max-age=3600&size=4096&seed=8&digest=1",
                                    (i * 4 + w as u64) % 200
                                ),
                                Check::Digest { size: 4096 },
                                "good",
                            )
                        },
                        move |r, res, _, _| match (r.class, status_of(res)) {
                            ("good", Some(200)) => {
                                good.fetch_add(1, Ordering::Relaxed);
                                Verdict::Ok
                            }
                            _ => Verdict::Unexpected,
                        },
                    )
                    .await
                });
            }
            let mut sides = tokio::task::JoinSet::new();
            let rate = side / PLUGIN_BAD_CLIENTS as f64;
            for (b, client) in side_clients.into_iter().enumerate() {
                let b = b as u64;
                let (stats, kinds) = (stats.clone(), kinds.clone());
                sides.spawn(async move {
                    if side <= 0.0 {
                        return client;
                    }
                    http_worker(
                        client,
                        stats,
                        Some(rate),
                        until,
                        u64::MAX,
                        move |i| {
                            let kind = if misbehave {
                                kinds[((i * PLUGIN_BAD_CLIENTS + b) % kinds.len() as u64) as usize]
                            } else {
                                "side"
                            };
                            let mut r = Req::get(
                                format!(
                                    "/cc/p-{}?cc=public,max-age=3600&size=4096&seed=8&digest=1",
                                    i % 200
                                ),
                                Check::Digest { size: 4096 },
                                kind,
                            );
                            r.headers.push(("x-misbehave", kind.into()));
                            r
                        },
                        move |r, res, _, _| match (r.class, status_of(res)) {
                            ("trap" | "loop" | "memory", Some(500)) => Verdict::Expected,
                            ("side", Some(200)) => Verdict::Ok,
                            _ => Verdict::Unexpected,
                        },
                    )
                    .await
                });
            }
            let goods = goods.join_all().await;
            let sides = sides.join_all().await;
            *clients.lock() = (goods, sides);
            let good = good.load(Ordering::Relaxed) as f64;
            let cpu = proc_cpu(edge_pid).saturating_sub(cpu0);
            (
                good / phase.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / good.max(1.0),
            )
        }
    };
    // A warm-up run (instances, connections), counted but not measured.
    let warm = run(0.0, false).await.0;
    // Then runs alone and with misbehaviour (one misbehaving request per 99
    // good ones, at the rate of the run alone just before) take turns,
    // starting and ending alone, so that a drift of the machine's speed
    // (frequency, neighbours) weighs on both sides alike.
    //
    // A run alone starts only once the plugin is no longer clamped: a missed
    // deadline clamps it for its `deadline_clamp` (10 s by default) after
    // the last miss, and what the clamp costs the well-behaved requests is
    // part of what the misbehaviour costs. (Runs alone that followed the
    // runs with misbehaviour at once were clamped throughout: they hid that
    // cost, and the scenario judged −8% where the edge had lost 25%.)
    let admin = edge.admin()?;
    let mut alone = vec![run(warm / good_per_bad, false).await];
    let mut with_bad = Vec::new();
    let mut waited = Duration::ZERO;
    for _ in 0..rounds {
        let before = alone.last().map(|r| r.0).unwrap_or_default();
        with_bad.push(run(before / good_per_bad, true).await);
        waited += unclamped(admin).await?;
        alone.push(run(before / good_per_bad, false).await);
    }
    let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let (baseline, with) = (mean(&alone, |r| r.0), mean(&with_bad, |r| r.0));
    let (cpu_alone, cpu_with) = (mean(&alone, |r| r.1), mean(&with_bad, |r| r.1));
    // The verdict: each run with misbehaviour against the mean of the runs
    // alone on either side of it, and the median of those changes, which a
    // drift of the machine's speed, or one disturbed run, does not move.
    let throughput = paired_changes(&alone, &with_bad, |r| r.0);
    let cpu = paired_changes(&alone, &with_bad, |r| r.1);
    let (throughput_change, cpu_change) = (median(&throughput), median(&cpu));
    // What the misbehaving requests cost the edge, each: the extra CPU per
    // well-behaved request, times the well-behaved requests per misbehaving one.
    let per_bad = match cpu_change / 100.0 * cpu_alone * good_per_bad {
        c if c > 0.0 => format!("about {c:.0} µs more per misbehaving request"),
        _ => "no more per misbehaving request than the runs' noise".to_string(),
    };
    let m = admin_get(edge.admin()?, "/metrics")
        .await
        .unwrap_or_default();
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let column = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).collect::<Vec<_>>();
    println!(
        "plugin: well-behaved throughput, median change {throughput_change:+.1}% (each run with misbehaviour against the runs alone around it: {}); edge CPU per well-behaved request, median change {cpu_change:+.1}% ({}), {per_bad}; runs alone {baseline:.0} req/s, {cpu_alone:.1} µs ({}; {}), with every {every}th request misbehaving {with:.0} req/s, {cpu_with:.1} µs ({}; {}); plugin failures: trap {}, deadline {}, memory {}, instance-lost {}; deadline clamps {}; waited {:.1} s in all for the clamp to end before the runs alone",
        list(&throughput, 1),
        list(&cpu, 1),
        list(&column(&alone, |r| r.0), 0),
        list(&column(&alone, |r| r.1), 1),
        list(&column(&with_bad, |r| r.0), 0),
        list(&column(&with_bad, |r| r.1), 1),
        metric(&m, "meridian_plugin_failures", &["kind=\"trap\""]),
        metric(&m, "meridian_plugin_failures", &["kind=\"deadline\""]),
        metric(&m, "meridian_plugin_failures", &["kind=\"memory\""]),
        metric(&m, "meridian_plugin_failures", &["kind=\"instance-lost\""]),
        metric(&m, "meridian_plugin_deadline_clamp", &["kind=\"clamps\""]),
        waited.as_secs_f64(),
    );
    let mut problems = Vec::new();
    if throughput_change < -10.0 {
        problems.push(format!(
            "well-behaved throughput fell {:.1}% (median of {} rounds; > 10%)",
            -throughput_change,
            throughput.len()
        ));
    }
    if stats.expected.load(Ordering::Relaxed) == 0 {
        problems.push("no misbehaving request was sent".into());
    }
    finish("plugin", &stats, problems)
}

/// Waits until the edge's plugin is no longer clamped after a missed deadline
/// (its `meridian_plugin_deadline_clamp{kind="clamped"}` is 0), at most 30 s;
/// returns how long that took.
async fn unclamped(admin: SocketAddr) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let m = admin_get(admin, "/metrics").await?;
        let clamped = m.lines().find(|l| {
            l.starts_with("meridian_plugin_deadline_clamp{") && l.contains("kind=\"clamped\"")
        });
        let Some(clamped) = clamped else {
            anyhow::bail!(
                "the edge's /metrics has no meridian_plugin_deadline_clamp{{kind=\"clamped\"}}"
            );
        };
        if clamped.ends_with(" 0") {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "the plugin was still clamped 30 s after the last run with misbehaviour: {clamped}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The change (%) of `f` in each run of `with` (run i came between runs i
/// and i + 1 of `alone`) against the mean of those two runs alone.
fn paired_changes(
    alone: &[(f64, f64)],
    with: &[(f64, f64)],
    f: fn(&(f64, f64)) -> f64,
) -> Vec<f64> {
    with.iter()
        .zip(alone.windows(2))
        .map(|(w, around)| {
            let base = (f(&around[0]) + f(&around[1])) / 2.0;
            (f(w) - base) / base.max(f64::MIN_POSITIVE) * 100.0
        })
        .collect()
}

/// The median of `v` (the mean of the middle two for an even count); 0 if
/// empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------
// 6. DNS health checks flap.

const EU: &str = "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n";
const US: &str = "a = [\"192.0.2.1\"]\naaaa = [\"2001:db8:ff::1\"]\n";
const AP: &str = "a = [\"192.0.2.3\"]\naaaa = [\"2001:db8:ff::3\"]\n";
/// Each region's health changes: (when, up).
type Health = [Vec<(Instant, bool)>; 3];
const INTERVAL_MS: u64 = 100;
const TIMEOUT_MS: u64 = 300;
const FALL: u64 = 3;
const RISE: u64 = 2;

fn health(region: &str, addr: SocketAddr) -> String {
    format!(
        "{region}[regions.health]\nkind = \"http\"\naddress = \"{addr}\"\npath = \"/healthz\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nfall = {FALL}\nrise = {RISE}\nexpect_status = 200\n"
    )
}

/// Each region (eu-west, us-east, ap-southeast) is probed at its own
/// endpoint, and the three flap on different periods (2, 3 and 5 s), so the
/// steered name goes through every combination, all regions down
/// (fail-open) included. The answer of each combination is measured first,
/// once settled. Under a query load, every answer must then be the one of a
/// combination the regions had at most max(fall, rise) × interval +
/// timeout (+ slack) before the query, and none may be SERVFAIL.
pub async fn dnsflap(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.get("duration", 40u64)?);
    let rate: f64 = args.get("rate", 1000.0)?;
    let dns_bin = bin_from_env("MERIDIAN_DNS_BIN")?;
    let work = TempDir::new("chaos-dnsflap")?;
    let eps = [
        TestOrigin::start("health-eu").await?,
        TestOrigin::start("health-us").await?,
        TestOrigin::start("health-ap").await?,
    ];
    let cfg = dns_config(
        work.path(),
        &[
            (EU, &health(EU, eps[0].addr)),
            (US, &health(US, eps[1].addr)),
            (AP, &health(AP, eps[2].addr)),
        ],
    )?;
    anyhow::ensure!(
        std::fs::read_to_string(&cfg)?.contains("fail_mode = \"open\""),
        "the demo's steered name is expected to fail open"
    );
    let dns = start_dns(&dns_bin, &cfg, &log_path("dnsflap-dns"))?;
    let udp = dns.udp.ok_or_else(|| anyhow::anyhow!("no UDP listener"))?;
    let fr = Some((Ipv4Addr::new(198, 51, 100, 0), 24));
    let queries: [Option<(Ipv4Addr, u8)>; 2] = [fr, None];
    let set_state = |st: u8| {
        for (i, e) in eps.iter().enumerate() {
            e.set_healthy(st & (1 << i) != 0);
        }
    };

    // The answer of each combination (bit i: region i up), once settled.
    let mut c = DnsClient::new(udp, Duration::from_secs(2)).await?;
    let settle = Duration::from_millis((FALL.max(RISE) * INTERVAL_MS + TIMEOUT_MS) * 2);
    let mut reference = std::collections::HashMap::new();
    for st in 0..8u8 {
        set_state(st);
        tokio::time::sleep(settle).await;
        for (qi, q) in queries.iter().enumerate() {
            let ans = c.ask("www.demo.meridian.test.", *q).await?;
            anyhow::ensure!(ans.rcode == NOERROR, "state {st:03b}: rcode {}", ans.rcode);
            let mut v = ans.a.clone();
            v.sort();
            reference.insert((st, qi), v);
        }
    }
    let ip = |d: u8| Ipv4Addr::new(192, 0, 2, d);
    anyhow::ensure!(
        reference[&(7, 0)] == vec![ip(2)],
        "a French client with every region up should get eu-west: {:?}",
        reference[&(7, 0)]
    );
    anyhow::ensure!(
        !reference[&(6, 0)].contains(&ip(2)),
        "with eu-west down, eu-west must not be answered: {:?}",
        reference[&(6, 0)]
    );
    anyhow::ensure!(
        reference[&(0, 0)] == vec![ip(1), ip(2), ip(3)],
        "with every region down, fail-open answers every region: {:?}",
        reference[&(0, 0)]
    );
    set_state(7);
    tokio::time::sleep(settle).await;

    // Region i's health over time.
    let history: Arc<Mutex<Health>> = Arc::new(Mutex::new([
        vec![(Instant::now(), true)],
        vec![(Instant::now(), true)],
        vec![(Instant::now(), true)],
    ]));
    let until = Instant::now() + duration;
    let eps = Arc::new(eps);
    let flapper = {
        let (history, eps) = (history.clone(), eps.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut up = [true; 3];
            let mut changes = 0usize;
            // Half-second ticks: eu every 2 s, us every 3 s, ap every 5 s.
            for tick in 1u64.. {
                let at = t0 + Duration::from_millis(500 * tick);
                if at >= until {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                for (i, (period, phase)) in [(4u64, 0u64), (6, 1), (10, 3)].into_iter().enumerate()
                {
                    if tick % period == phase {
                        up[i] = !up[i];
                        eps[i].set_healthy(up[i]);
                        history.lock()[i].push((Instant::now(), up[i]));
                        changes += 1;
                    }
                }
            }
            changes
        })
    };
    // An answer is right if it is the reference of a combination whose
    // every region had that health at some time in [t0 - allowance, t1].
    let allowance = Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + TIMEOUT_MS + 400);
    let stats = Stats::new(false);
    let servfails = Arc::new(AtomicU64::new(0));
    let reference = Arc::new(reference);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..2usize {
        let (stats, history, reference, servfails) = (
            stats.clone(),
            history.clone(),
            reference.clone(),
            servfails.clone(),
        );
        set.spawn(async move {
            let Ok(mut c) = DnsClient::new(udp, Duration::from_secs(2)).await else {
                stats.record(Verdict::Unexpected, Duration::ZERO, || {
                    "no UDP socket".into()
                });
                return;
            };
            let mut pacer = crate::load::Pacer::new(Some(rate / 2.0));
            let mut i = w;
            while Instant::now() < until {
                pacer.tick().await;
                let qi = i % 2;
                i += 1;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let res = c.ask("www.demo.meridian.test.", queries[qi]).await;
                let t1 = Instant::now();
                let from = t0.checked_sub(allowance).unwrap_or(t0);
                let possible: [Vec<bool>; 3] = {
                    let h = history.lock();
                    std::array::from_fn(|r| {
                        let mut v: Vec<bool> = h[r]
                            .iter()
                            .rev()
                            .find(|(t, _)| *t <= from)
                            .map(|(_, u)| vec![*u])
                            .unwrap_or_default();
                        v.extend(
                            h[r].iter()
                                .filter(|(t, _)| *t > from && *t <= t1)
                                .map(|(_, u)| *u),
                        );
                        v
                    })
                };
                let v = match &res {
                    Ok(ans) if ans.rcode == SERVFAIL => {
                        servfails.fetch_add(1, Ordering::Relaxed);
                        Verdict::Unexpected
                    }
                    Ok(ans) if ans.rcode == NOERROR => {
                        let mut got = ans.a.clone();
                        got.sort();
                        let ok = (0..8u8).any(|st| {
                            (0..3).all(|r| possible[r].contains(&(st & (1 << r) != 0)))
                                && reference.get(&(st, qi)) == Some(&got)
                        });
                        if ok { Verdict::Ok } else { Verdict::Unexpected }
                    }
                    _ => Verdict::Unexpected,
                };
                stats.record(v, t1 - t0, || {
                    format!("query {qi}: {res:?}; possible health (eu, us, ap) {possible:?}")
                });
            }
        });
    }
    while set.join_next().await.is_some() {}
    let changes = flapper.await.unwrap_or(0);
    let m = admin_get(dns.admin()?, "/metrics")
        .await
        .unwrap_or_default();
    println!(
        "dnsflap: {changes} health changes, answers allowed to lag {} ms (max(fall {FALL}, rise {RISE}) x {INTERVAL_MS} ms + timeout {TIMEOUT_MS} ms + 400 ms); SERVFAIL {}; health transitions counted by meridian-dns: {}",
        allowance.as_millis(),
        servfails.load(Ordering::Relaxed),
        metric(&m, "meridian_dns_health_transitions_total", &[]),
    );
    let mut problems = Vec::new();
    if changes < 6 {
        problems.push("too few health changes".into());
    }
    finish("dnsflap", &stats, problems)
}

// ---------------------------------------------------------------------------
// 4. The network degrades (namespaces, tc netem).

/// The test origin alone on `--listen ADDR`, until killed (for netem, in
/// the origin's namespace). Prints `origin: listening ADDR`.
pub async fn origin_only(args: &Args) -> anyhow::Result<()> {
    let addr: SocketAddr = args
        .str("listen")
        .ok_or_else(|| anyhow::anyhow!("--listen ADDR"))?
        .parse()?;
    let max = Duration::from_secs(args.get("max-seconds", 3600u64)?);
    let o = TestOrigin::start_on(addr, "netem-origin", Arc::new(OriginStats::default())).await?;
    println!("origin: listening {}", o.addr);
    tokio::time::sleep(max).await;
    Ok(())
}

/// Writes the plugin scenario's misbehaving plugin (`x-misbehave: trap |
/// loop | memory`) to `--out`, for `bench/plugin/run.sh`.
pub fn plugin_wasm(args: &Args) -> anyhow::Result<()> {
    let out = args
        .str("out")
        .ok_or_else(|| anyhow::anyhow!("--out PATH"))?;
    std::fs::write(out, wat::parse_str(MISBEHAVING_PLUGIN)?)?;
    Ok(())
}

pub async fn netem(args: &Args) -> anyhow::Result<()> {
    crate::netem::run(args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_with_misbehaviour_is_compared_with_the_runs_alone_around_it() {
        // A machine slowing down: 100, 80, 60 alone; 81 and 63 between.
        let alone = [(100.0, 10.0), (80.0, 12.0), (60.0, 14.0)];
        let with = [(81.0, 11.0), (63.0, 14.0)];
        let t = paired_changes(&alone, &with, |r| r.0);
        assert_eq!(t.len(), 2);
        assert!((t[0] - -10.0).abs() < 1e-9, "{t:?}");
        assert!((t[1] - -10.0).abs() < 1e-9, "{t:?}");
        let c = paired_changes(&alone, &with, |r| r.1);
        assert!(
            (c[0] - 0.0).abs() < 1e-9 && (c[1] - 7.692_307_692).abs() < 1e-6,
            "{c:?}"
        );
    }

    #[test]
    fn the_median_ignores_one_disturbed_round() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[-3.0, -40.0, -2.0]), -3.0);
        assert_eq!(median(&[4.0, -1.0, -40.0, 2.0]), 0.5);
    }
}
