//! The soak: the edge (memory and disk tiers, the `headers` plugin, a TLS
//! listener for h2 and h3, a plain one for h1) and meridian-dns under a
//! steady mixed load at a fraction of their measured capacity, sampled
//! every 10 s into `soak.csv`, judged at the end (see docs/soak-chaos.md).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_e2e::certs::TestCa;
use meridian_e2e::client::Tls;
use meridian_e2e::origin::TestOrigin;
use nix::sys::signal::Signal;

use crate::Args;
use crate::dns::{DnsClient, NOERROR};
use crate::load::{Check, Client, Proto, Req, Stats, Target, Verdict, http_worker, quantile_ms};
use crate::procs::{
    Server, admin_get, admin_post, bin_from_env, dns_config, metric, proc_cpu, proc_cpu_split,
    proc_usage, repo_root, start_dns, start_edge,
};

pub const HOT: u64 = 500;
pub const HOT_SIZE: usize = 4096;
const REVAL: u64 = 100;
const MISS_KEYS: u64 = 20_000;
const SAMPLE: Duration = Duration::from_secs(10);
/// The defaults of `--purge-every` and `--reload-every` (seconds).
const PURGE_EVERY: u64 = 3;
const RELOAD_EVERY: u64 = 60;
/// h1, h2 and h3 workers, one request in flight each.
const PROTOS: [Proto; 9] = [
    Proto::H1,
    Proto::H1,
    Proto::H1,
    Proto::H2,
    Proto::H2,
    Proto::H2,
    Proto::H3,
    Proto::H3,
    Proto::H3,
];
const DNS_WORKERS: usize = 2;

pub fn hot_path(n: u64) -> String {
    format!("/cc/hot-{n}?cc=public,max-age=3600&size={HOT_SIZE}&seed=1&digest=1&tag=hot%20hot-{n}")
}

/// The i-th request of a soak worker: 60% hits, 10% misses (keys the
/// purges keep missing), 15% revalidations (max-age=1 with an ETag, so
/// each is a 304 from the origin once stale) and 15% ranges of hot objects.
fn soak_request(i: u64, worker: u64, misses: &AtomicU64) -> Req {
    let k = (i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(worker.wrapping_mul(1442695040888963407)))
        >> 17;
    match k % 100 {
        0..60 => Req::get(hot_path(k % HOT), Check::Digest { size: HOT_SIZE }, "hit"),
        60..70 => {
            let n = misses.fetch_add(1, Ordering::Relaxed) % MISS_KEYS;
            Req::get(
                format!("/cc/miss-{n}?cc=public,max-age=3600&size=8192&seed=2&digest=1&tag=miss"),
                Check::Digest { size: 8192 },
                "miss",
            )
        }
        70..85 => {
            let n = k % REVAL;
            Req::get(
                format!(
                    "/cc/reval-{n}?cc=public,max-age=1&etag=%22r{n}%22&size=2048&seed=3&digest=1"
                ),
                Check::Digest { size: 2048 },
                "revalidation",
            )
        }
        _ => {
            let n = k % HOT;
            let start = ((k >> 8) % 3900) as usize;
            let end = start + 99;
            let mut r = Req::get(
                hot_path(n),
                Check::Range {
                    path: format!("/cc/hot-{n}"),
                    seed: 1,
                    size: HOT_SIZE,
                    start,
                    end,
                },
                "range",
            );
            r.headers.push(("range", format!("bytes={start}-{end}")));
            r
        }
    }
}

fn soak_judge(
    r: &Req,
    res: &anyhow::Result<meridian_e2e::client::Resp>,
    _: Instant,
    _: Instant,
) -> Verdict {
    match res {
        Ok(resp) if r.class == "range" && resp.status == 206 => Verdict::Ok,
        Ok(resp) if r.class != "range" && resp.status == 200 => Verdict::Ok,
        _ => Verdict::Unexpected,
    }
}

/// The edge's config for the soak.
pub fn edge_config(dir: &Path, origin: &str, cert: &Path, key: &Path, plugin: &Path) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:0"

[log]
access_log = "off"
level = "warn"

[cache]
memory = "4MiB"
disk_dir = "{disk}"
disk = "256MiB"

[[listeners]]
address = "127.0.0.1:0"

[[listeners]]
address = "127.0.0.1:0"
tls = true

[[tls.certificates]]
cert = "{cert}"
key = "{key}"
default = true

[[sites]]
hosts = ["*"]
pool = "origin"

[[sites.plugins]]
path = "{plugin}"
config = '{{"request":{{"add":{{"X-From-Edge":"1"}}}},"response":{{"add":{{"Strict-Transport-Security":"max-age=63072000"}},"remove":["Server"]}}}}'

[pools.origin]
origins = [{{ url = "{origin}" }}]
"#,
        disk = dir.join("disk").display(),
        cert = cert.display(),
        key = key.display(),
        plugin = plugin.display(),
    )
}

pub struct Rig {
    pub _origin: TestOrigin,
    pub edge: Server,
    pub dns: Server,
    pub target: Arc<Target>,
}

/// Starts the origin, the edge and meridian-dns; scratch files in `dir`,
/// server logs in `logs`.
pub async fn start_rig(dir: &Path, logs: &Path) -> anyhow::Result<Rig> {
    let edge_bin = bin_from_env("MERIDIAN_EDGE_BIN")?;
    let dns_bin = bin_from_env("MERIDIAN_DNS_BIN")?;
    let plugin = repo_root().join("wasm-plugins/dist/headers.wasm");
    anyhow::ensure!(
        plugin.is_file(),
        "{} is missing: run wasm-plugins/build first",
        plugin.display()
    );
    let origin = TestOrigin::start("soak-origin").await?;
    let ca = TestCa::new(dir)?;
    let leaf = ca.leaf(dir, "localhost", &["localhost"])?;
    let cfg = dir.join("edge.toml");
    std::fs::write(
        &cfg,
        edge_config(dir, &origin.url(), &leaf.cert, &leaf.key, &plugin),
    )?;
    let (edge_log, dns_log) = (logs.join("edge.log"), logs.join("dns.log"));
    let _ = std::fs::remove_file(&edge_log);
    let _ = std::fs::remove_file(&dns_log);
    let edge = start_edge(&edge_bin, &cfg, &edge_log)?;
    let dns = start_dns(&dns_bin, &dns_config(dir, &[])?, &dns_log)?;
    let tls = Tls {
        roots: Arc::new(ca.roots()?),
        sni: "localhost".into(),
        alpn: vec![b"h2".to_vec()],
    };
    let target = Arc::new(Target {
        plain: *edge
            .http
            .first()
            .ok_or_else(|| anyhow::anyhow!("no plain listener"))?,
        tls: Some((
            *edge
                .https
                .first()
                .ok_or_else(|| anyhow::anyhow!("no TLS listener"))?,
            tls,
        )),
        host: "localhost".into(),
    });
    Ok(Rig {
        _origin: origin,
        edge,
        dns,
        target,
    })
}

const ECS: [Option<(Ipv4Addr, u8)>; 3] = [
    None,
    Some((Ipv4Addr::new(198, 51, 100, 0), 24)),
    Some((Ipv4Addr::new(203, 0, 113, 0), 24)),
];

async fn dns_worker(
    server: std::net::SocketAddr,
    stats: Arc<Stats>,
    rate: Option<f64>,
    until: Instant,
) {
    let Ok(mut c) = DnsClient::new(server, Duration::from_secs(2)).await else {
        stats.sent.fetch_add(1, Ordering::Relaxed);
        stats.record(Verdict::Unexpected, Duration::ZERO, || {
            "cannot open a UDP socket".into()
        });
        return;
    };
    let mut pacer = crate::load::Pacer::new(rate);
    let mut i = 0usize;
    while Instant::now() < until {
        pacer.tick().await;
        let ecs = ECS[i % ECS.len()];
        i += 1;
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let res = c.ask("www.demo.meridian.test.", ecs).await;
        let v = match &res {
            Ok(a) if a.rcode == NOERROR && !a.a.is_empty() => Verdict::Ok,
            _ => Verdict::Unexpected,
        };
        stats.record(v, t0.elapsed(), || format!("dns ecs={ecs:?}: {res:?}"));
    }
}

/// Runs the HTTP and DNS workers until `until`, at `rates` (None: closed loop).
fn spawn_load(
    rig: &Rig,
    http: &Arc<Stats>,
    dns: &Arc<Stats>,
    rates: (Option<f64>, Option<f64>),
    until: Instant,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    let misses = Arc::new(AtomicU64::new(0));
    for (w, proto) in PROTOS.iter().enumerate() {
        let client = Client::new(*proto, rig.target.clone(), Duration::from_secs(10));
        let (stats, misses) = (http.clone(), misses.clone());
        let rate = rates.0.map(|r| r / PROTOS.len() as f64);
        set.spawn(async move {
            http_worker(
                client,
                stats,
                rate,
                until,
                u64::MAX,
                move |i| soak_request(i, w as u64, &misses),
                soak_judge,
            )
            .await;
        });
    }
    let udp = rig.dns.udp;
    for _ in 0..DNS_WORKERS {
        let stats = dns.clone();
        let rate = rates.1.map(|r| r / DNS_WORKERS as f64);
        if let Some(udp) = udp {
            set.spawn(dns_worker(udp, stats, rate, until));
        }
    }
    set
}

struct Row {
    t: f64,
    http_rps: f64,
    http_p50: f64,
    http_p99: f64,
    dns_qps: f64,
    dns_p50: f64,
    dns_p99: f64,
    errors: u64,
    edge_rss: u64,
    edge_fds: u64,
    edge_threads: u64,
    dns_rss: u64,
    dns_fds: u64,
    entries: f64,
    memory_bytes: f64,
    disk_written: f64,
    disk_hits: f64,
    /// jemalloc's `allocated` and `resident` bytes (NaN with another allocator).
    heap_allocated: f64,
    heap_resident: f64,
    /// The edge's CPU time (user and system, from /proc) over the interval,
    /// per HTTP request: a cost per request that climbs shows a drift even
    /// when the machine has spare cores to hide it from the latencies.
    edge_cpu_us_per_req: f64,
    /// The system (kernel) part of it.
    edge_sys_us_per_req: f64,
    /// meridian-dns's CPU time per DNS query over the interval.
    dns_cpu_us_per_query: f64,
    /// This harness's own CPU time (the load's clients, HTTP and DNS) per
    /// HTTP request. The three costs moving together over a run point to
    /// the machine, one moving alone to that process.
    load_cpu_us_per_req: f64,
    /// The whole machine over the interval (`/proc/stat`): the share of its
    /// CPU time that was busy (neither idle nor waiting for IO), and the
    /// share its hypervisor took (steal), in percent. A burst of latency
    /// with the servers' own CPU flat and the machine busier, or stolen
    /// from, is the machine's.
    machine_busy_pct: f64,
    machine_steal_pct: f64,
}

/// The first line of `/proc/stat` (every CPU): (busy, steal, total) in
/// clock ticks since boot; zeros if it cannot be read.
fn machine_cpu() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user and nice).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    if v.len() < 8 {
        return (0, 0, 0);
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    (total - idle - v[7], v[7], total)
}

const HEADER: &str = "t_s,http_rps,http_p50_ms,http_p99_ms,dns_qps,dns_p50_ms,dns_p99_ms,errors_total,edge_rss_kb,edge_fds,edge_threads,dns_rss_kb,dns_fds,cache_entries,cache_memory_bytes,cache_disk_written_bytes,cache_disk_hits,edge_heap_allocated_bytes,edge_heap_resident_bytes,edge_cpu_us_per_req,machine_busy_pct,machine_steal_pct,edge_sys_us_per_req,dns_cpu_us_per_query,load_cpu_us_per_req";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{:.0},{:.1},{:.3},{:.3},{:.1},{:.3},{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{:.2},{:.1},{:.1},{:.2},{:.2},{:.2}",
            self.t,
            self.http_rps,
            self.http_p50,
            self.http_p99,
            self.dns_qps,
            self.dns_p50,
            self.dns_p99,
            self.errors,
            self.edge_rss,
            self.edge_fds,
            self.edge_threads,
            self.dns_rss,
            self.dns_fds,
            self.entries,
            self.memory_bytes,
            self.disk_written,
            self.disk_hits,
            self.heap_allocated,
            self.heap_resident,
            self.edge_cpu_us_per_req,
            self.machine_busy_pct,
            self.machine_steal_pct,
            self.edge_sys_us_per_req,
            self.dns_cpu_us_per_query,
            self.load_cpu_us_per_req
        )
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The one-sided Mann–Kendall test for an upward trend: the normal score `Z`
/// of `S = Σ_{i<j} sgn(x_j − x_i)`, with the tie correction and the
/// continuity correction. `Z > 1.645` is an upward trend at the 5% level.
/// Non-finite values (an interval with no request) are left out. Fewer than
/// four values give 0 (no evidence either way).
fn mann_kendall_z(xs: &[f64]) -> f64 {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < 4 {
        return 0.0;
    }
    let mut s = 0i64;
    for i in 0..n {
        for j in i + 1..n {
            s += match v[j].partial_cmp(&v[i]) {
                Some(std::cmp::Ordering::Greater) => 1,
                Some(std::cmp::Ordering::Less) => -1,
                _ => 0,
            };
        }
    }
    // Groups of tied values, for the variance.
    let mut sorted = v.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mut ties = 0.0;
    let mut k = 0;
    while k < n {
        let mut e = k + 1;
        while e < n && sorted[e] == sorted[k] {
            e += 1;
        }
        let t = (e - k) as f64;
        ties += t * (t - 1.0) * (2.0 * t + 5.0);
        k = e;
    }
    let nf = n as f64;
    let var = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    if var <= 0.0 {
        return 0.0;
    }
    let s = s as f64;
    if s > 0.0 {
        (s - 1.0) / var.sqrt()
    } else if s < 0.0 {
        (s + 1.0) / var.sqrt()
    } else {
        0.0
    }
}

/// One-sided 5% critical value of the standard normal.
const TREND_Z: f64 = 1.645;

/// A drift between the first and last quarters: `last` above `first` by more
/// than `limit` percent and by more than `floor` (in their unit), *and* an
/// upward trend in the figures of the 10 s intervals after warm-up
/// (Mann–Kendall, 5%): a spike of the machine's noise inside the last
/// quarter is not a drift, a figure that climbs (or steps up and stays) is.
/// Returns the growth in percent, the Z, and whether it is a drift.
fn drift(first: f64, last: f64, per_interval: &[f64], limit: f64, floor: f64) -> (f64, f64, bool) {
    let growth = (last - first) / first * 100.0;
    let z = mann_kendall_z(per_interval);
    (
        growth,
        z,
        growth > limit && last - first > floor && z > TREND_Z,
    )
}

/// The p99 verdict: `Some(reason)` when the p99 over every request of each
/// quarter drifted (by more than 1 ms too, so that sub-ms jitter does not
/// fail a run).
fn p99_drift(
    p99_first: f64,
    p99_last: f64,
    per_interval: &[f64],
    limit: f64,
) -> (f64, f64, Option<String>) {
    let (growth, z, drifted) = drift(p99_first, p99_last, per_interval, limit, 1.0);
    let verdict = drifted.then(|| {
        format!(
            "HTTP p99 drifted {growth:.1}% ({p99_first:.2} -> {p99_last:.2} ms, limit +{limit}%) with an upward trend (Mann-Kendall Z {z:.2} > {TREND_Z})"
        )
    });
    (growth, z, verdict)
}

/// The edge's CPU time per HTTP request (the quarters' means of the
/// interval figures, in µs): `Some(reason)` when it drifted, the edge itself
/// getting more expensive per request, which a p99 shows only through the
/// queueing of a busy machine.
fn cpu_drift(
    first: f64,
    last: f64,
    per_interval: &[f64],
    limit: f64,
) -> (f64, f64, Option<String>) {
    let (growth, z, drifted) = drift(first, last, per_interval, limit, 0.0);
    let verdict = drifted.then(|| {
        format!(
            "edge CPU per request grew {growth:.1}% ({first:.0} -> {last:.0} µs, limit +{limit}%) with an upward trend (Mann-Kendall Z {z:.2} > {TREND_Z})"
        )
    });
    (growth, z, verdict)
}

/// How long capacity is measured (closed loop, the whole mix) when
/// `--calibrate` is not given. The edge's heap grows for its first half
/// million or so requests as its buffers and pools reach their working size
/// (about 90 s at 70% on this 2-core machine), and calibration at full load is
/// its warm-up too: a run under 10 minutes, whose own warm-up is a fifth of
/// it, gets 60 s of it, so that its quarters compare the working set, not its
/// growth; a longer run, 10 s.
fn default_calibrate(duration: Duration) -> u64 {
    if duration < Duration::from_secs(600) {
        60
    } else {
        10
    }
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.get("duration", 120u64)?);
    let load: f64 = args.get("load", 0.7)?;
    let calibrate = Duration::from_secs(args.get("calibrate", default_calibrate(duration))?);
    let warmup = Duration::from_secs(args.get("warmup", (duration.as_secs() / 5).max(20))?);
    // The RSS growth allowed between the first and last quarter, in percent:
    // 5 (the issue's bound), CI's 2-minute run included.
    let rss_limit: f64 = args.get("rss-limit", 5.0)?;
    // The p99 growth allowed between the first and last quarter, in
    // percent: 20 (the issue's bound) for real soaks. CI's 2-minute debug
    // run on a shared 2-core machine passes a looser bound (see
    // docs/soak-chaos.md: at 70% of capacity a 12% slowdown of the machine
    // made its p99 73% higher) that still catches a gross drift.
    let p99_limit: f64 = args.get("p99-limit", 20.0)?;
    // The growth of the edge's CPU time per request allowed between the
    // first and last quarters, in percent, for every run, CI's included.
    let cpu_limit: f64 = args.get("cpu-limit", 20.0)?;
    // Shorter intervals amplify what each purge or reload leaves behind.
    let purge_every = Duration::from_secs_f64(args.get("purge-every", PURGE_EVERY as f64)?);
    let reload_every = Duration::from_secs_f64(args.get("reload-every", RELOAD_EVERY as f64)?);
    anyhow::ensure!(
        purge_every >= Duration::from_millis(100) && reload_every >= Duration::from_millis(500),
        "--purge-every must be at least 0.1 s and --reload-every at least 0.5 s"
    );
    let out = PathBuf::from(args.str("out").unwrap_or("soak-out"));
    std::fs::create_dir_all(&out)?;
    anyhow::ensure!(
        duration >= Duration::from_secs(60),
        "--duration must be at least 60 s"
    );
    let work = meridian_e2e::certs::TempDir::new("soak")?;
    let rig = start_rig(work.path(), &out).await?;
    let admin = rig.edge.admin()?;

    // Fill the hot set, then measure what the box (servers and this client
    // on the same cores) does closed-loop with the same mix.
    let mut c = Client::new(Proto::H1, rig.target.clone(), Duration::from_secs(10));
    for n in 0..HOT {
        let r = Req::get(hot_path(n), Check::Digest { size: HOT_SIZE }, "hit");
        let resp = c.send(&r).await?;
        anyhow::ensure!(resp.status == 200, "warming {}: {}", r.path, resp.status);
        crate::load::verify(&r.check, &resp)
            .map_err(|e| anyhow::anyhow!("warming {}: {e}", r.path))?;
    }
    let cal_http = Stats::new(false);
    let cal_dns = Stats::new(false);
    let skip = Duration::from_secs(2).min(calibrate / 4);
    let t_cal = Instant::now();
    let mut set = spawn_load(&rig, &cal_http, &cal_dns, (None, None), t_cal + calibrate);
    tokio::time::sleep(skip).await;
    let (h0, d0) = (
        cal_http.sent.load(Ordering::Relaxed),
        cal_dns.sent.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    while set.join_next().await.is_some() {}
    let secs = t0.elapsed().as_secs_f64();
    let cap_http = (cal_http.sent.load(Ordering::Relaxed) - h0) as f64 / secs;
    let cap_dns = (cal_dns.sent.load(Ordering::Relaxed) - d0) as f64 / secs;
    anyhow::ensure!(
        cal_http.failures() == 0 && cal_dns.failures() == 0,
        "failures during calibration: http {:?} dns {:?}",
        cal_http.samples.lock().clone(),
        cal_dns.samples.lock().clone()
    );
    let (rate_http, rate_dns) = (cap_http * load, cap_dns * load);
    println!(
        "soak: capacity (closed loop, {:.0} s, HTTP and DNS together): {cap_http:.0} req/s, {cap_dns:.0} DNS q/s; soaking at {:.0}%: {rate_http:.0} req/s and {rate_dns:.0} q/s for {} s (warm-up {} s)",
        secs,
        load * 100.0,
        duration.as_secs(),
        warmup.as_secs()
    );

    let http = Stats::new(true);
    let dnss = Stats::new(false);
    let start_ms = crate::now_ms();
    let start = Instant::now();
    let until = start + duration;
    let mut set = spawn_load(&rig, &http, &dnss, (Some(rate_http), Some(rate_dns)), until);

    // Purges every few seconds (the miss keys by tag, and a few hot objects
    // by their own tag); a SIGHUP reload every minute.
    let stop = Arc::new(AtomicBool::new(false));
    let purges = Arc::new(AtomicU64::new(0));
    let purge_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let purger = {
        let (stop, purges, errs) = (stop.clone(), purges.clone(), purge_errors.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                tokio::time::sleep(purge_every).await;
                n += 1;
                let body = format!(
                    r#"{{"tags": ["miss", "hot-{}", "hot-{}"]}}"#,
                    (n * 7) % HOT,
                    (n * 13) % HOT
                );
                match admin_post(admin, "/purge", &body).await {
                    Ok(_) => {
                        purges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut v) = errs.lock()
                            && v.len() < 5
                        {
                            v.push(format!("purge: {e:#}"));
                        }
                    }
                }
            }
        })
    };
    let reloads = Arc::new(AtomicU64::new(0));
    let edge_pid = rig.edge.pid();
    let reloader = {
        let (stop, reloads) = (stop.clone(), reloads.clone());
        tokio::spawn(async move {
            let mut next = Instant::now() + reload_every;
            while !stop.load(Ordering::Relaxed) && next < until {
                tokio::time::sleep_until(next.into()).await;
                next += reload_every;
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(edge_pid), Signal::SIGHUP)
                    .is_ok()
                {
                    reloads.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let csv_path = out.join("soak.csv");
    let mut csv = String::from(HEADER);
    csv.push('\n');
    std::fs::write(&csv_path, &csv)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut next = start + SAMPLE;
    let (mut last_h, mut last_d, mut last_t) = (0u64, 0u64, start);
    let me = std::process::id() as i32;
    let mut last_cpu = proc_cpu_split(rig.edge.pid());
    let mut last_dns_cpu = proc_cpu(rig.dns.pid());
    let mut last_load_cpu = proc_cpu(me);
    let mut last_machine = machine_cpu();
    let mut scrape_errors = Vec::new();
    while next <= until + Duration::from_millis(500) {
        tokio::time::sleep_until(next.into()).await;
        next += SAMPLE;
        let now = Instant::now();
        let dt = (now - last_t).as_secs_f64();
        last_t = now;
        let (h, d) = (
            http.sent.load(Ordering::Relaxed),
            dnss.sent.load(Ordering::Relaxed),
        );
        let mut hl = http.take_interval();
        let mut dl = dnss.take_interval();
        let (edge_rss, edge_fds, edge_threads) = proc_usage(rig.edge.pid());
        let cpu = proc_cpu_split(rig.edge.pid());
        let (user_used, sys_used) = (
            cpu.0.saturating_sub(last_cpu.0),
            cpu.1.saturating_sub(last_cpu.1),
        );
        let cpu_used = user_used + sys_used;
        last_cpu = cpu;
        let (dns_cpu, load_cpu) = (proc_cpu(rig.dns.pid()), proc_cpu(me));
        let (dns_used, load_used) = (
            dns_cpu.saturating_sub(last_dns_cpu),
            load_cpu.saturating_sub(last_load_cpu),
        );
        (last_dns_cpu, last_load_cpu) = (dns_cpu, load_cpu);
        let machine = machine_cpu();
        let pct = |a: u64, b: u64| {
            let total = machine.2.saturating_sub(last_machine.2);
            if total == 0 {
                f64::NAN
            } else {
                a.saturating_sub(b) as f64 * 100.0 / total as f64
            }
        };
        let (machine_busy_pct, machine_steal_pct) = (
            pct(machine.0, last_machine.0),
            pct(machine.1, last_machine.1),
        );
        last_machine = machine;
        let (dns_rss, dns_fds, _) = proc_usage(rig.dns.pid());
        let cache: serde_json::Value = match admin_get(admin, "/cache").await {
            Ok(t) => serde_json::from_str(&t).unwrap_or_default(),
            Err(e) => {
                scrape_errors.push(format!("GET /cache: {e:#}"));
                serde_json::Value::Null
            }
        };
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        // The edge's heap (jemalloc's statistics): what it holds against
        // what it keeps resident, to tell a leak from the allocator's
        // retention.
        let metrics = admin_get(admin, "/metrics").await.unwrap_or_default();
        let heap = |stat: &str| {
            if metrics.contains("meridian_allocator_bytes{") {
                metric(
                    &metrics,
                    "meridian_allocator_bytes",
                    &[&format!("stat=\"{stat}\"")],
                )
            } else {
                f64::NAN
            }
        };
        let row = Row {
            t: (now - start).as_secs_f64(),
            http_rps: (h - last_h) as f64 / dt,
            http_p50: quantile_ms(&mut hl, 0.5),
            http_p99: quantile_ms(&mut hl, 0.99),
            dns_qps: (d - last_d) as f64 / dt,
            dns_p50: quantile_ms(&mut dl, 0.5),
            dns_p99: quantile_ms(&mut dl, 0.99),
            errors: http.failures() + dnss.failures(),
            edge_rss,
            edge_fds,
            edge_threads,
            dns_rss,
            dns_fds,
            entries: f(&cache["entries"]),
            memory_bytes: f(&cache["memory"]["used_bytes"]),
            disk_written: f(&cache["disk"]["write_bytes"]),
            disk_hits: f(&cache["disk"]["hits"]),
            heap_allocated: heap("allocated"),
            heap_resident: heap("resident"),
            edge_cpu_us_per_req: cpu_used.as_secs_f64() * 1e6 / (h - last_h).max(1) as f64,
            edge_sys_us_per_req: sys_used.as_secs_f64() * 1e6 / (h - last_h).max(1) as f64,
            dns_cpu_us_per_query: dns_used.as_secs_f64() * 1e6 / (d - last_d).max(1) as f64,
            load_cpu_us_per_req: load_used.as_secs_f64() * 1e6 / (h - last_h).max(1) as f64,
            machine_busy_pct,
            machine_steal_pct,
        };
        (last_h, last_d) = (h, d);
        csv.push_str(&row.csv());
        csv.push('\n');
        std::fs::write(&csv_path, &csv)?;
        println!("soak: {}", row.csv());
        rows.push(row);
    }
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    let _ = purger.await;
    let _ = reloader.await;
    let end_ms = crate::now_ms();

    // The verdict.
    let mut failures: Vec<String> = Vec::new();
    let mut report = String::new();
    let measured: Vec<&Row> = rows
        .iter()
        .filter(|r| r.t > warmup.as_secs_f64() + 0.5)
        .collect();
    let q = (measured.len() / 4).max(1);
    anyhow::ensure!(
        measured.len() >= 4,
        "too few samples after warm-up: {}",
        measured.len()
    );
    let first = &measured[..q];
    let last = &measured[measured.len() - q..];
    let rss_first = mean(&first.iter().map(|r| r.edge_rss as f64).collect::<Vec<_>>());
    let rss_last = mean(&last.iter().map(|r| r.edge_rss as f64).collect::<Vec<_>>());
    let rss_growth = (rss_last - rss_first) / rss_first * 100.0;
    let drss_first = mean(&first.iter().map(|r| r.dns_rss as f64).collect::<Vec<_>>());
    let drss_last = mean(&last.iter().map(|r| r.dns_rss as f64).collect::<Vec<_>>());
    let drss_growth = (drss_last - drss_first) / drss_first * 100.0;
    // The heap (informational: the bound is on RSS).
    let heap_first = mean(&first.iter().map(|r| r.heap_allocated).collect::<Vec<_>>());
    let heap_last = mean(&last.iter().map(|r| r.heap_allocated).collect::<Vec<_>>());
    let fd_first = first.iter().map(|r| r.edge_fds).max().unwrap_or(0);
    let fd_last = last.iter().map(|r| r.edge_fds).min().unwrap_or(0);
    let dfd_first = first.iter().map(|r| r.dns_fds).max().unwrap_or(0);
    let dfd_last = last.iter().map(|r| r.dns_fds).min().unwrap_or(0);
    // p99 over every request of each quarter (not a mean of per-interval p99s).
    let ms = |r: &Row| start_ms + (r.t * 1000.0) as u64;
    let from_a = ms(first[0]) - SAMPLE.as_millis() as u64;
    let lat_first = http.latencies_between(from_a, ms(first[q - 1]));
    let from_b = ms(last[0]) - SAMPLE.as_millis() as u64;
    let lat_last = http.latencies_between(from_b, ms(last[q - 1]).max(end_ms));
    let p99_first = lat_first.quantile_ms(0.99);
    let p99_last = lat_last.quantile_ms(0.99);
    let per_interval: Vec<f64> = measured.iter().map(|r| r.http_p99).collect();
    let (p99_drift, trend_z, drift_failure) =
        p99_drift(p99_first, p99_last, &per_interval, p99_limit);
    let cpu_of = |rows: &[&Row]| {
        mean(
            &rows
                .iter()
                .map(|r| r.edge_cpu_us_per_req)
                .collect::<Vec<_>>(),
        )
    };
    let (cpu_first, cpu_last) = (cpu_of(first), cpu_of(last));
    let cpu_per_interval: Vec<f64> = measured.iter().map(|r| r.edge_cpu_us_per_req).collect();
    let (cpu_growth, cpu_z, cpu_failure) =
        cpu_drift(cpu_first, cpu_last, &cpu_per_interval, cpu_limit);
    let _ = writeln!(
        report,
        "soak: {} s at {:.0}% of capacity ({rate_http:.0} req/s, {rate_dns:.0} DNS q/s); capacity {cap_http:.0} req/s and {cap_dns:.0} q/s",
        duration.as_secs(),
        load * 100.0
    );
    let _ = writeln!(
        report,
        "soak: samples after the {} s warm-up: {}; quarters of {q}",
        warmup.as_secs(),
        measured.len()
    );
    let _ = writeln!(
        report,
        "soak: edge RSS {:.1} MiB -> {:.1} MiB ({rss_growth:+.1}%, limit +{rss_limit}%); dns RSS {:.1} MiB -> {:.1} MiB ({drss_growth:+.1}%)",
        rss_first / 1024.0,
        rss_last / 1024.0,
        drss_first / 1024.0,
        drss_last / 1024.0
    );
    if heap_first.is_finite() && heap_last.is_finite() && heap_first > 0.0 {
        let _ = writeln!(
            report,
            "soak: edge heap allocated (jemalloc) {:.1} MiB -> {:.1} MiB ({:+.1}%)",
            heap_first / 1048576.0,
            heap_last / 1048576.0,
            (heap_last - heap_first) / heap_first * 100.0
        );
    }
    let _ = writeln!(
        report,
        "soak: edge fds {fd_first} (first quarter max) -> {fd_last} (last quarter min); dns fds {dfd_first} -> {dfd_last}"
    );
    let _ = writeln!(
        report,
        "soak: HTTP p99 {p99_first:.2} ms -> {p99_last:.2} ms ({p99_drift:+.1}%, limit +{p99_limit}% and at least 1 ms, with an upward trend); trend of the interval p99s: Mann-Kendall Z {trend_z:.2} (trend above {TREND_Z})"
    );
    let _ = writeln!(
        report,
        "soak: edge CPU per HTTP request {cpu_first:.0} µs -> {cpu_last:.0} µs ({cpu_growth:+.1}%, limit +{cpu_limit}% with an upward trend); Mann-Kendall Z {cpu_z:.2}"
    );
    let _ = writeln!(
        report,
        "soak: purges {}, SIGHUP reloads {}, final cache entries {}",
        purges.load(Ordering::Relaxed),
        reloads.load(Ordering::Relaxed),
        rows.last().map(|r| r.entries).unwrap_or(f64::NAN)
    );
    if rss_growth > rss_limit {
        failures.push(format!("edge RSS grew {rss_growth:.1}% (> {rss_limit}%)"));
    }
    if drss_growth > rss_limit {
        failures.push(format!(
            "meridian-dns RSS grew {drss_growth:.1}% (> {rss_limit}%)"
        ));
    }
    if fd_last > fd_first {
        failures.push(format!(
            "edge descriptors grew: the last quarter never went below {fd_last}, the first quarter never above {fd_first}"
        ));
    }
    if dfd_last > dfd_first {
        failures.push(format!(
            "meridian-dns descriptors grew: {dfd_first} -> {dfd_last}"
        ));
    }
    if lat_first.len() == 0 || lat_last.len() == 0 {
        failures.push(format!(
            "no latencies in a quarter ({} first, {} last): p99 drift unknown",
            lat_first.len(),
            lat_last.len()
        ));
    } else if let Some(f) = drift_failure {
        failures.push(f);
    }
    if let Some(f) = cpu_failure {
        failures.push(f);
    }
    if http.failures() > 0 {
        failures.push(format!("HTTP failures: {:?}", http.samples.lock().clone()));
    }
    if dnss.failures() > 0 {
        failures.push(format!("DNS failures: {:?}", dnss.samples.lock().clone()));
    }
    if let Ok(errs) = purge_errors.lock()
        && !errs.is_empty()
    {
        failures.push(format!("purges failed: {errs:?}"));
    }
    if !scrape_errors.is_empty() {
        failures.push(format!("admin scrapes failed: {scrape_errors:?}"));
    }
    let planned = (duration.as_secs_f64() / reload_every.as_secs_f64()) as u64;
    if reloads.load(Ordering::Relaxed) < planned.saturating_sub(1) {
        failures.push("fewer SIGHUP reloads than planned".into());
    }
    let m = admin_get(admin, "/metrics").await.unwrap_or_default();
    let refused = metric(&m, "meridian_config_reloads_total", &["refused"]);
    if refused > 0.0 {
        failures.push(format!("{refused} reloads refused"));
    }
    let _ = writeln!(report, "{}", http.line("soak-http"));
    let _ = writeln!(report, "{}", dnss.line("soak-dns"));
    let _ = writeln!(
        report,
        "soak: {}",
        if failures.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        }
    );
    print!("{report}");
    std::fs::write(out.join("soak-summary.txt"), &report)?;
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mann_kendall_matches_the_textbook_values() {
        // Strictly increasing, n = 10: S = 45, Var(S) = 10·9·25/18 = 125.
        let up: Vec<f64> = (0..10).map(f64::from).collect();
        assert!((mann_kendall_z(&up) - 44.0 / 125f64.sqrt()).abs() < 1e-9);
        let down: Vec<f64> = up.iter().rev().copied().collect();
        assert!((mann_kendall_z(&down) + 44.0 / 125f64.sqrt()).abs() < 1e-9);
        // All tied: no variance, no trend.
        assert_eq!(mann_kendall_z(&[3.0; 12]), 0.0);
        // Too short, and NaN intervals left out.
        assert_eq!(mann_kendall_z(&[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(mann_kendall_z(&[1.0, f64::NAN, 2.0, 3.0]), 0.0);
    }

    /// The 2-minute CI soak of 3 December 2026 (debug build, shared 2-core
    /// machine): per-interval p99s after warm-up. The last quarter's p99 was
    /// 39.5% above the first's, but the series has no trend (the worst
    /// interval is in the middle): noise, not a drift.
    #[test]
    fn a_noisy_flat_series_is_not_a_drift() {
        let ci = [
            14.412, 15.581, 21.808, 25.426, 48.908, 18.726, 14.616, 11.913, 16.358, 23.777,
        ];
        let (drift, z, verdict) = p99_drift(15.23, 21.25, &ci, 20.0);
        assert!(drift > 39.0, "{drift}");
        assert!(z < TREND_Z, "{z}");
        assert!(verdict.is_none());
    }

    #[test]
    fn a_climbing_p99_is_a_drift() {
        // +3% an interval with jitter, 40 intervals.
        let climb: Vec<f64> = (0..40)
            .map(|i| 5.0 * 1.03f64.powi(i) + if i % 3 == 0 { 1.5 } else { 0.0 })
            .collect();
        let (_, z, verdict) = p99_drift(6.0, 15.0, &climb, 20.0);
        assert!(z > TREND_Z, "{z}");
        assert!(verdict.is_some());
    }

    #[test]
    fn a_p99_that_steps_up_and_stays_is_a_drift() {
        let mut step: Vec<f64> = (0..20).map(|i| 5.0 + (i % 4) as f64 * 0.5).collect();
        step.extend((0..20).map(|i| 9.0 + (i % 4) as f64 * 0.5));
        let (_, _, verdict) = p99_drift(5.8, 9.8, &step, 20.0);
        assert!(verdict.is_some());
    }

    #[test]
    fn a_trend_below_the_bound_is_not_a_drift() {
        // A clear trend, but +10% only: within the issue's 20%.
        let small: Vec<f64> = (0..20).map(|i| 10.0 + i as f64 * 0.05).collect();
        let (_, z, verdict) = p99_drift(10.1, 11.0, &small, 20.0);
        assert!(z > TREND_Z);
        assert!(verdict.is_none());
        // +25% but under 1 ms: sub-millisecond jitter.
        let (_, _, verdict) = p99_drift(0.8, 1.0, &small, 20.0);
        assert!(verdict.is_none());
    }

    /// The 2-minute CI soak of 5 December 2026 (fresh clone of b8f6872,
    /// debug build): flat, then the last two intervals' p99 rose with the
    /// edge's CPU per request (+12%) and meridian-dns's latencies. A drift by
    /// the issue's bound; within CI's looser one.
    #[test]
    fn the_edge_growing_more_expensive_per_request_fails_but_a_bump_does_not() {
        // CI's soak of 827d6f2: flat, with a bump at 90 s.
        let flat = [
            1005.4, 999.1, 1015.5, 1002.9, 1002.9, 1006.7, 1028.2, 1049.3, 1019.8, 985.0,
        ];
        let (growth, _, verdict) = cpu_drift(1002.0, 1004.5, &flat, 20.0);
        assert!(growth.abs() < 1.0 && verdict.is_none());
        // A rise of 12% at the end, shaped like the run of b8f6872 whose p99
        // burst there (965 -> 1,078 µs in its last intervals): within.
        let burst = [
            965.0, 970.0, 968.0, 975.0, 972.0, 980.0, 990.0, 1010.0, 1049.0, 1078.0,
        ];
        assert!(cpu_drift(967.5, 1063.5, &burst, 20.0).2.is_none());
        // A climb past 20% fails; the same growth without a trend does not.
        let climb: Vec<f64> = (0..10).map(|i| 1000.0 + 40.0 * f64::from(i)).collect();
        assert!(cpu_drift(1020.0, 1340.0, &climb, 20.0).2.is_some());
        let noise = [
            1000.0, 1400.0, 1010.0, 990.0, 1300.0, 1005.0, 995.0, 1000.0, 1010.0, 1350.0,
        ];
        assert!(cpu_drift(1000.0, 1250.0, &noise, 20.0).2.is_none());
    }

    #[test]
    fn a_burst_at_the_end_is_a_drift_by_20_percent_but_not_by_ci_bound() {
        let ci = [
            9.616, 9.573, 9.915, 10.511, 10.992, 9.948, 10.412, 10.040, 14.830, 17.786,
        ];
        let (drift, _, verdict) = p99_drift(9.60, 16.64, &ci, 20.0);
        assert!(drift > 70.0 && verdict.is_some());
        let (_, _, verdict) = p99_drift(9.60, 16.64, &ci, 100.0);
        assert!(verdict.is_none());
        // A p99 that doubles still fails there.
        let (_, _, verdict) = p99_drift(9.60, 20.0, &ci, 100.0);
        assert!(verdict.is_some());
    }
}
