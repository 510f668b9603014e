//! Region health: a pure rise/fall tracker, the shared state the query path
//! reads without locks, operator drains, and the active probes (HTTP, HTTPS,
//! TCP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{HealthConfig, HealthKind, RegionConfig};
use crate::metrics::{Metrics, RegionLabels, TransitionLabels, intern};
use crate::steering::RegionState;

/// Consecutive-result tracker with rise/fall thresholds. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    /// Current state.
    pub up: bool,
    ok_streak: u32,
    fail_streak: u32,
}

impl Tracker {
    /// Start in `up`.
    pub fn new(up: bool) -> Self {
        Self {
            up,
            ok_streak: 0,
            fail_streak: 0,
        }
    }

    /// Record one probe result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
            if !self.up && self.ok_streak >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
            if self.up && self.fail_streak >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// Live state of one region, shared between probes, admin and queries.
#[derive(Debug)]
pub struct RegionHealth {
    /// Name.
    pub name: &'static str,
    healthy: AtomicBool,
    drained: AtomicBool,
    checked: AtomicBool,
}

impl RegionHealth {
    /// Snapshot for the steering policy.
    pub fn state(&self) -> RegionState {
        RegionState {
            healthy: self.healthy.load(Ordering::Relaxed),
            drained: self.drained.load(Ordering::Relaxed),
        }
    }

    /// Does a probe run for this region?
    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }
}

/// All regions' health, keyed by name; survives config reloads.
#[derive(Debug, Default)]
pub struct HealthTable {
    regions: Mutex<HashMap<String, Arc<RegionHealth>>>,
}

impl HealthTable {
    /// The entry for `name`, created healthy and undrained.
    pub fn get_or_create(&self, name: &str) -> Arc<RegionHealth> {
        let Ok(mut map) = self.regions.lock() else {
            return Arc::new(RegionHealth {
                name: intern(name),
                healthy: AtomicBool::new(true),
                drained: AtomicBool::new(false),
                checked: AtomicBool::new(false),
            });
        };
        map.entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(RegionHealth {
                    name: intern(name),
                    healthy: AtomicBool::new(true),
                    drained: AtomicBool::new(false),
                    checked: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// The entry for `name`, if the region exists.
    pub fn get(&self, name: &str) -> Option<Arc<RegionHealth>> {
        self.regions.lock().ok()?.get(name).cloned()
    }

    /// Keep only `names` (after a reload).
    pub fn retain(&self, names: &[&str]) {
        if let Ok(mut map) = self.regions.lock() {
            map.retain(|k, _| names.contains(&k.as_str()));
        }
    }

    /// Drain or undrain; false if there is no such region.
    pub fn set_drained(&self, name: &str, drained: bool, metrics: &Metrics) -> bool {
        match self.get(name) {
            Some(r) => {
                let was = r.drained.swap(drained, Ordering::Relaxed);
                if was != drained {
                    info!(region = name, drained, "region drain state changed");
                }
                metrics
                    .region_drained
                    .get_or_create(&RegionLabels { region: r.name })
                    .set(i64::from(drained));
                true
            }
            None => false,
        }
    }
}

/// Where and how to probe one region.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// Region.
    pub region: Arc<RegionHealth>,
    /// Probe settings.
    pub cfg: HealthConfig,
    /// Resolved target.
    pub target: SocketAddr,
}

impl ProbeSpec {
    /// Resolve the probe target for a region config; None if it has no check.
    pub fn for_region(r: &RegionConfig, region: Arc<RegionHealth>) -> Option<Self> {
        let cfg = r.health.clone();
        if cfg.kind == HealthKind::None {
            region.checked.store(false, Ordering::Relaxed);
            region.healthy.store(true, Ordering::Relaxed);
            return None;
        }
        let target = match cfg.address {
            Some(a) => a,
            None => {
                let ip = r.a.first().or(r.aaaa.first())?.parts().0;
                let port = cfg.port.unwrap_or(match cfg.kind {
                    HealthKind::Https => 443,
                    _ => 80,
                });
                SocketAddr::new(ip, port)
            }
        };
        region.checked.store(true, Ordering::Relaxed);
        Some(Self {
            region,
            cfg,
            target,
        })
    }
}

/// Read an HTTP/1.1 status line from `stream` after sending a GET.
async fn http_status<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> std::io::Result<u16> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meridian-dns-health\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 256];
    let mut n = 0;
    // The status line fits in the first few bytes; read until a newline.
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let line = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP/1.x response",
        )),
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match config {
        Ok(c) => tokio_rustls::TlsConnector::from(Arc::new(c)),
        // The ring provider supports the default versions; this is unreachable
        // in practice, but fall back to an empty client config rather than panic.
        Err(_) => tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )),
    }
}

/// Run one probe; Ok(()) if healthy. Bounded by the configured timeout.
pub async fn probe_once(spec: &ProbeSpec) -> Result<(), String> {
    let timeout = Duration::from_millis(spec.cfg.timeout_ms.max(1));
    let fut = async {
        let tcp = TcpStream::connect(spec.target)
            .await
            .map_err(|e| format!("connect {}: {e}", spec.target))?;
        let host = spec
            .cfg
            .host
            .clone()
            .unwrap_or_else(|| spec.target.ip().to_string());
        let status = match spec.cfg.kind {
            HealthKind::None | HealthKind::Tcp => return Ok(()),
            HealthKind::Http => http_status(tcp, &host, &spec.cfg.path)
                .await
                .map_err(|e| format!("http: {e}"))?,
            HealthKind::Https => {
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("bad TLS name {host:?}: {e}"))?;
                let tls = tls_connector()
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                http_status(tls, &host, &spec.cfg.path)
                    .await
                    .map_err(|e| format!("https: {e}"))?
            }
        };
        if status == spec.cfg.expect_status {
            Ok(())
        } else {
            Err(format!(
                "status {status}, expected {}",
                spec.cfg.expect_status
            ))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

/// Start the probe loop for one region.
pub fn spawn_probe(spec: ProbeSpec, metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let r = spec.region.clone();
        let mut tracker = Tracker::new(r.healthy.load(Ordering::Relaxed));
        let labels = RegionLabels { region: r.name };
        metrics
            .region_up
            .get_or_create(&labels)
            .set(i64::from(tracker.up));
        let mut tick = tokio::time::interval(Duration::from_millis(spec.cfg.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = probe_once(&spec).await;
            if let Err(e) = &result {
                debug!(region = r.name, target = %spec.target, error = %e, "health probe failed");
            }
            if let Some(up) = tracker.observe(result.is_ok(), spec.cfg.rise, spec.cfg.fall) {
                r.healthy.store(up, Ordering::Relaxed);
                let to = if up { "up" } else { "down" };
                if up {
                    info!(region = r.name, target = %spec.target, "region is up");
                } else {
                    warn!(region = r.name, target = %spec.target, error = ?result.err(), "region is down");
                }
                metrics
                    .transitions
                    .get_or_create(&TransitionLabels { region: r.name, to })
                    .inc();
                metrics.region_up.get_or_create(&labels).set(i64::from(up));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut t = Tracker::new(true);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), None); // streak broken
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), Some(false));
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), Some(true));
    }

    #[tokio::test]
    async fn http_probe_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let spec = ProbeSpec {
            region: HealthTable::default().get_or_create("t"),
            cfg: HealthConfig {
                kind: HealthKind::Http,
                timeout_ms: 2000,
                ..HealthConfig::default()
            },
            target: addr,
        };
        assert_eq!(probe_once(&spec).await, Ok(()));
        assert!(probe_once(&spec).await.is_err());
        server.abort();
        // Nothing listening any more (or a refused connect): failure, bounded.
        let closed = ProbeSpec {
            target: "127.0.0.1:1".parse().expect("addr"),
            ..spec
        };
        assert!(probe_once(&closed).await.is_err());
    }
}
