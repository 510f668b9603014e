//! The load engine shared by the soak and the chaos scenarios: HTTP/1.1,
//! HTTP/2 (over TLS, by ALPN) and HTTP/3 clients that reconnect after a
//! failure, paced or closed-loop workers, and the counters every scenario
//! prints (sent, succeeded, expected failures, unexpected failures, corrupt
//! bodies) with latencies per sampling interval.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Version};
use http_body_util::Full;
pub use lenient::Mutex;
use meridian_e2e::client::{Conn, Resp, Tls};
use meridian_e2e::origin::{DIGEST_HEADER, body_digest, seeded_body};

/// A std mutex that shrugs off poisoning (a panicking worker must not hide
/// the counts of the others).
mod lenient {
    #[derive(Default)]
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Mutex(std::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
    H3,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
            Proto::H3 => "h3",
        }
    }
}

/// Where the clients connect: a plain listener (HTTP/1.1) and, optionally,
/// a TLS listener (HTTP/2 by ALPN, and HTTP/3 on the same UDP port).
#[derive(Clone)]
pub struct Target {
    pub plain: SocketAddr,
    pub tls: Option<(SocketAddr, Tls)>,
    pub host: String,
}

/// One request a scenario wants sent.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// What the body must be.
    pub check: Check,
    /// A label for the scenario's classifier.
    pub class: &'static str,
}

impl Req {
    pub fn get(path: String, check: Check, class: &'static str) -> Req {
        Req {
            method: "GET",
            path,
            headers: vec![],
            body: Bytes::new(),
            check,
            class,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Check {
    /// A 200 must carry the origin's digest header, and the body must match
    /// it and be `size` bytes.
    Digest { size: usize },
    /// A 206 for `bytes=start-end` of `/cc/<path>?size&seed`: the body must
    /// be that slice of the seeded body.
    Range {
        path: String,
        seed: u64,
        size: usize,
        start: usize,
        end: usize,
    },
}

/// Checks a response body against `check`; `Err` describes the corruption.
pub fn verify(check: &Check, r: &Resp) -> Result<(), String> {
    match check {
        Check::Digest { size } => {
            if r.status != 200 {
                return Ok(());
            }
            let Some(want) = r.header(DIGEST_HEADER) else {
                return Err(format!("no {DIGEST_HEADER} header"));
            };
            if r.body.len() != *size {
                return Err(format!("{} bytes, want {size}", r.body.len()));
            }
            let got = body_digest(&r.body);
            if got != want {
                return Err(format!("digest {got}, header says {want}"));
            }
            Ok(())
        }
        Check::Range {
            path,
            seed,
            size,
            start,
            end,
        } => {
            if r.status != 206 {
                return Ok(());
            }
            let full = seeded_body(path, *seed, *size);
            let want = full.slice(*start..=*end);
            if r.body != want {
                return Err(format!(
                    "range {start}-{end}: {} bytes differ from the origin's",
                    r.body.len()
                ));
            }
            Ok(())
        }
    }
}

/// An HTTP/3 connection whose requests carry headers (the shared
/// `H3Conn` sends none).
struct H3 {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    _driver: tokio::task::JoinHandle<()>,
    _conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl H3 {
    async fn connect(addr: SocketAddr, tls: &Tls, timeout: Duration) -> anyhow::Result<H3> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(tls.roots.clone())
            .with_no_client_auth();
        crypto.alpn_protocols = vec![b"h3".to_vec()];
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
        let conn = tokio::time::timeout(timeout, endpoint.connect(addr, &tls.sni)?).await??;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        let _driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3 {
            send,
            _driver,
            _conn: conn,
            _endpoint: endpoint,
        })
    }

    async fn send(&mut self, host: &str, r: &Req) -> anyhow::Result<Resp> {
        let mut b = Request::builder()
            .method(r.method)
            .uri(format!("https://{host}{}", r.path));
        for (k, v) in &r.headers {
            b = b.header(*k, v);
        }
        let mut stream = self.send.send_request(b.body(())?).await?;
        if !r.body.is_empty() {
            stream.send_data(r.body.clone()).await?;
        }
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut out = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            while chunk.has_remaining() {
                let c = chunk.chunk();
                out.extend_from_slice(c);
                let n = c.len();
                chunk.advance(n);
            }
        }
        let (parts, ()) = resp.into_parts();
        Ok(Resp {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body: out.freeze(),
            trailers: None,
        })
    }
}

enum Link {
    Tcp(Conn),
    Quic(H3),
}

/// A client of one protocol that reconnects after any failure.
pub struct Client {
    pub proto: Proto,
    target: Arc<Target>,
    link: Option<Link>,
    pub timeout: Duration,
}

impl Client {
    pub fn new(proto: Proto, target: Arc<Target>, timeout: Duration) -> Client {
        Client {
            proto,
            target,
            link: None,
            timeout,
        }
    }

    async fn connect(&self) -> anyhow::Result<Link> {
        match self.proto {
            Proto::H1 => Ok(Link::Tcp(Conn::plain(self.target.plain, false).await?)),
            Proto::H2 => {
                let (addr, tls) = self
                    .target
                    .tls
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("h2 needs a TLS listener"))?;
                let mut tls = tls.clone();
                tls.alpn = vec![b"h2".to_vec()];
                Ok(Link::Tcp(Conn::tls(*addr, &tls).await?))
            }
            Proto::H3 => {
                let (addr, tls) = self
                    .target
                    .tls
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("h3 needs a TLS listener"))?;
                Ok(Link::Quic(H3::connect(*addr, tls, self.timeout).await?))
            }
        }
    }

    /// Sends `r`, whole, within `self.timeout` (connecting included).
    pub async fn send(&mut self, r: &Req) -> anyhow::Result<Resp> {
        let timeout = self.timeout;
        let res = tokio::time::timeout(timeout, self.send_inner(r)).await;
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                self.link = None;
                Err(e)
            }
            Err(_) => {
                self.link = None;
                Err(anyhow::anyhow!("timed out after {timeout:?}"))
            }
        }
    }

    async fn send_inner(&mut self, r: &Req) -> anyhow::Result<Resp> {
        if self.link.is_none() {
            self.link = Some(self.connect().await?);
        }
        let host = self.target.host.clone();
        match self.link.as_mut() {
            Some(Link::Tcp(c)) => {
                let req = if self.proto == Proto::H2 {
                    let mut b = Request::builder()
                        .method(r.method)
                        .version(Version::HTTP_2)
                        .uri(format!("https://{host}{}", r.path));
                    for (k, v) in &r.headers {
                        b = b.header(*k, v);
                    }
                    b.body(Full::new(r.body.clone()))?
                } else {
                    let mut b = Request::builder()
                        .method(r.method)
                        .uri(&r.path)
                        .header(http::header::HOST, &host);
                    for (k, v) in &r.headers {
                        b = b.header(*k, v);
                    }
                    b.body(Full::new(r.body.clone()))?
                };
                c.send(req).await
            }
            Some(Link::Quic(q)) => q.send(&host, r).await,
            None => anyhow::bail!("not connected"),
        }
    }
}

/// What a scenario's classifier decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Expected,
    Unexpected,
    Corrupt,
}

/// The counts every scenario prints, and the latencies of the current
/// sampling interval.
#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub expected: AtomicU64,
    pub unexpected: AtomicU64,
    pub corrupt: AtomicU64,
    lat_us: Mutex<Vec<u32>>,
    /// Per second of the run (`now_ms() / 1000`), a histogram of that second's
    /// latencies: bounded memory (3.5 KiB a second) however long the run.
    by_second: Mutex<Vec<(u64, LatHist)>>,
    pub samples: Mutex<Vec<String>>,
    keep_all: bool,
}

const MAX_EXAMPLES: usize = 20;

/// Sub-buckets per power of two: a latency is known within 1/32 (3%).
const SUB: u32 = 32;
const BUCKETS: usize = 28 * SUB as usize;

/// A latency histogram (µs), log-linear: exact below 32 µs, then 32
/// buckets per power of two.
#[derive(Clone)]
pub struct LatHist {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl Default for LatHist {
    fn default() -> Self {
        LatHist {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl LatHist {
    fn bucket(us: u32) -> usize {
        if us < SUB {
            return us as usize;
        }
        let e = 31 - us.leading_zeros(); // >= 5
        let sub = (us >> (e - 5)) & (SUB - 1);
        (e - 4) as usize * SUB as usize + sub as usize
    }

    /// The middle of bucket `b`, in µs.
    fn value(b: usize) -> f64 {
        let (g, sub) = (b / SUB as usize, (b % SUB as usize) as u64);
        if g == 0 {
            return sub as f64;
        }
        let shift = g as u32 - 1; // e - 5
        let lo = (u64::from(SUB) + sub) << shift;
        lo as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
    }

    pub fn add(&mut self, us: u32) {
        self.counts[Self::bucket(us)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &LatHist) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1) in milliseconds, as [`quantile_ms`] picks
    /// it (the element at rank round((n-1)·q)); NaN when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        let rank = ((self.total as f64 - 1.0) * q).round() as u64;
        let mut seen = 0u64;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen > rank {
                return Self::value(b) / 1000.0;
            }
        }
        Self::value(BUCKETS - 1) / 1000.0
    }
}

impl Stats {
    pub fn new(keep_all: bool) -> Arc<Stats> {
        Arc::new(Stats {
            lat_us: Mutex::new(Vec::new()),
            by_second: Mutex::new(Vec::new()),
            samples: Mutex::new(Vec::new()),
            keep_all,
            ..Default::default()
        })
    }

    pub fn record(&self, v: Verdict, latency: Duration, what: impl FnOnce() -> String) {
        let n = match v {
            Verdict::Ok => &self.ok,
            Verdict::Expected => &self.expected,
            Verdict::Unexpected => &self.unexpected,
            Verdict::Corrupt => &self.corrupt,
        };
        n.fetch_add(1, Ordering::Relaxed);
        if matches!(v, Verdict::Unexpected | Verdict::Corrupt) {
            let mut s = self.samples.lock();
            if s.len() < MAX_EXAMPLES {
                let line = format!("{v:?}: {}", what());
                eprintln!("meridian-chaos: {} {line}", humantime_now());
                s.push(line);
            }
        }
        if v == Verdict::Ok {
            let us = latency.as_micros().min(u32::MAX as u128) as u32;
            self.lat_us.lock().push(us);
            if self.keep_all {
                let sec = crate::now_ms() / 1000;
                let mut all = self.by_second.lock();
                match all.last_mut() {
                    Some((s, h)) if *s == sec => h.add(us),
                    _ => {
                        let mut h = LatHist::default();
                        h.add(us);
                        all.push((sec, h));
                    }
                }
            }
        }
    }

    /// The latencies since the last call (successful requests only).
    pub fn take_interval(&self) -> Vec<u32> {
        std::mem::take(&mut *self.lat_us.lock())
    }

    /// The latencies of the whole seconds in `[from_ms, to_ms)` (ms since
    /// the harness started), as one histogram.
    pub fn latencies_between(&self, from_ms: u64, to_ms: u64) -> LatHist {
        let mut h = LatHist::default();
        for (_, s) in self
            .by_second
            .lock()
            .iter()
            .filter(|(sec, _)| sec * 1000 >= from_ms && sec * 1000 < to_ms)
        {
            h.merge(s);
        }
        h
    }

    pub fn failures(&self) -> u64 {
        self.unexpected.load(Ordering::Relaxed) + self.corrupt.load(Ordering::Relaxed)
    }

    /// The one line every scenario prints.
    pub fn line(&self, name: &str) -> String {
        format!(
            "{name}: sent={} succeeded={} expected_failures={} unexpected_failures={} corrupt_bodies={}",
            self.sent.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.expected.load(Ordering::Relaxed),
            self.unexpected.load(Ordering::Relaxed),
            self.corrupt.load(Ordering::Relaxed)
        )
    }
}

/// The `q` quantile (0..=1) of `v` in milliseconds (sorts `v`).
pub fn quantile_ms(v: &mut [u32], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

/// Paces a worker at `rate` per second (None: as fast as it can). A worker
/// that falls more than a second behind drops the backlog rather than
/// bursting.
pub struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Pacer {
        Pacer {
            interval: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            next: Instant::now(),
        }
    }

    pub async fn tick(&mut self) {
        let Some(iv) = self.interval else {
            return;
        };
        let now = Instant::now();
        if self.next + Duration::from_secs(1) < now {
            self.next = now;
        }
        if self.next > now {
            tokio::time::sleep_until(self.next.into()).await;
        }
        self.next += iv;
    }
}

/// Runs one HTTP worker until `until`: `make(i)` gives the i-th request,
/// `judge` classifies what came back. Gives the client back (with its
/// connection, if it still has one) for another run.
pub async fn http_worker<M, J>(
    mut client: Client,
    stats: Arc<Stats>,
    rate: Option<f64>,
    until: Instant,
    max_requests: u64,
    mut make: M,
    judge: J,
) -> Client
where
    M: FnMut(u64) -> Req,
    J: Fn(&Req, &anyhow::Result<Resp>, Instant, Instant) -> Verdict,
{
    let mut pacer = Pacer::new(rate);
    let mut i = 0u64;
    while Instant::now() < until && i < max_requests {
        pacer.tick().await;
        if Instant::now() >= until {
            break;
        }
        let r = make(i);
        i += 1;
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let res = client.send(&r).await;
        let t1 = Instant::now();
        let mut v = judge(&r, &res, t0, t1);
        let mut why = String::new();
        if let Ok(resp) = &res
            && let Err(e) = verify(&r.check, resp)
        {
            v = Verdict::Corrupt;
            why = e;
        }
        stats.record(v, t1 - t0, || {
            let proto = client.proto.name();
            match &res {
                Ok(resp) => format!(
                    "{proto} {} {} [{}{}] -> {} {} {why}",
                    r.method,
                    r.path,
                    r.class,
                    r.headers
                        .iter()
                        .map(|(k, v)| format!(" {k}: {v}"))
                        .collect::<String>(),
                    resp.status,
                    resp.header("cache-status").unwrap_or("")
                ),
                Err(e) => format!("{proto} {} {} -> error: {e:#}", r.method, r.path),
            }
        });
        if res.is_err() {
            // A failed exchange leaves no connection; a short pause keeps a
            // dead server from turning the loop into a busy spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    client
}

/// The wall-clock time as `HH:MM:SS.mmm` UTC (to match server logs).
fn humantime_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_three_percent() {
        let mut exact: Vec<u32> = (0..100_000u32).map(|i| (i * 7919) % 250_000 + 1).collect();
        let mut h = LatHist::default();
        for &v in &exact {
            h.add(v);
        }
        assert_eq!(h.len(), exact.len() as u64);
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let want = quantile_ms(&mut exact, q);
            let got = h.quantile_ms(q);
            assert!(
                (got - want).abs() <= want * 0.035 + 0.001,
                "q={q}: histogram {got} ms, exact {want} ms"
            );
        }
        assert!(LatHist::default().quantile_ms(0.99).is_nan());
        let mut big = LatHist::default();
        big.add(u32::MAX);
        big.add(0);
        assert!(big.quantile_ms(1.0) > 4_000_000.0);
        assert_eq!(big.quantile_ms(0.0), 0.0);
    }

    #[test]
    fn latencies_between_merges_whole_seconds() {
        let s = Stats::new(true);
        for _ in 0..10 {
            s.record(Verdict::Ok, Duration::from_millis(3), String::new);
        }
        let now = crate::now_ms();
        let h = s.latencies_between(now.saturating_sub(5_000), now + 5_000);
        assert_eq!(h.len(), 10);
        assert!((h.quantile_ms(0.99) - 3.0).abs() < 0.1);
        assert_eq!(s.latencies_between(now + 5_000, now + 9_000).len(), 0);
    }
}
