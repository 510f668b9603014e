//! Origin health: the verdict of active probes (rise/fall), passive ejection
//! after consecutive failed requests, and the slow-start ramp after an origin
//! returns. The state transitions are pure functions of `now` (milliseconds
//! since process start), so they are tested without clocks.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::{Origin, Pool};
use crate::config::{HealthCheckConfig, StatusSet};
use crate::http::body::RequestBody;
use crate::metrics::{Metrics, OriginLabels, OriginTransition};

/// Milliseconds since the process started; the time base of health state.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

impl Transition {
    pub fn label(self) -> &'static str {
        match self {
            Transition::Up => "up",
            Transition::Down => "down",
        }
    }
}

#[derive(Debug)]
pub struct Health {
    /// The active probes' verdict.
    probe_up: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    passive_failures: AtomicU32,
    ejected_until: AtomicU64,
    /// When the origin last came (back) into rotation; 0 = since start.
    up_since: AtomicU64,
}

impl Health {
    /// Origins start in rotation; active probes take them out within `fall`.
    pub fn new(_active: bool) -> Self {
        Health {
            probe_up: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            up_since: AtomicU64::new(0),
        }
    }

    pub fn copy_from(&self, other: &Health) {
        for (a, b) in [
            (&self.successes, &other.successes),
            (&self.failures, &other.failures),
            (&self.passive_failures, &other.passive_failures),
        ] {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.probe_up
            .store(other.probe_up.load(Ordering::Relaxed), Ordering::Relaxed);
        self.ejected_until.store(
            other.ejected_until.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.up_since
            .store(other.up_since.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn is_up(&self, now: u64) -> bool {
        self.probe_up.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    pub fn is_up_now(&self) -> bool {
        self.is_up(now_ms())
    }

    /// Records an active probe result; returns a transition if it caused one.
    pub fn record_probe(&self, ok: bool, rise: u32, fall: u32, now: u64) -> Option<Transition> {
        let up = self.probe_up.load(Ordering::Relaxed);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let s = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !up && s >= rise {
                self.probe_up.store(true, Ordering::Relaxed);
                self.passive_failures.store(0, Ordering::Relaxed);
                self.ejected_until.store(0, Ordering::Relaxed);
                self.up_since.store(now, Ordering::Relaxed);
                return Some(Transition::Up);
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let f = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if up && f >= fall {
                self.probe_up.store(false, Ordering::Relaxed);
                return Some(Transition::Down);
            }
        }
        None
    }

    /// Records a proxied request's outcome toward this origin.
    pub fn record_request(
        &self,
        ok: bool,
        max_failures: u32,
        ejection_ms: u64,
        now: u64,
    ) -> Option<Transition> {
        if ok {
            self.passive_failures.store(0, Ordering::Relaxed);
            return None;
        }
        if max_failures == 0 {
            return None;
        }
        let f = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if f >= max_failures && self.ejected_until.load(Ordering::Relaxed) <= now {
            self.passive_failures.store(0, Ordering::Relaxed);
            self.ejected_until
                .store(now + ejection_ms, Ordering::Relaxed);
            // Slow start applies when it comes back.
            self.up_since.store(now + ejection_ms, Ordering::Relaxed);
            return Some(Transition::Down);
        }
        None
    }

    /// The share of its weight an origin gets now: ramps linearly from 10% to
    /// 100% over `slow_start_ms` after it came back into rotation.
    pub fn weight_factor(&self, now: u64, slow_start_ms: u64) -> f64 {
        let since = self.up_since.load(Ordering::Relaxed);
        if slow_start_ms == 0 || since == 0 || now >= since + slow_start_ms {
            return 1.0;
        }
        let elapsed = now.saturating_sub(since) as f64;
        0.1 + 0.9 * (elapsed / slow_start_ms as f64)
    }
}

/// Starts one active probe loop per origin of `pool` (none without a
/// `health_check`). The loops stop when their handles are aborted.
pub fn spawn_checkers(pool: Arc<Pool>, metrics: Arc<Metrics>) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(hc) = pool.config.health_check.clone() else {
        return Vec::new();
    };
    let Ok(expect) = StatusSet::parse(&hc.expected_status) else {
        return Vec::new();
    };
    let expect = Arc::new(expect);
    (0..pool.origins.len())
        .map(|i| {
            let (pool, metrics, hc, expect) = (pool.clone(), metrics.clone(), hc.clone(), expect.clone());
            tokio::spawn(async move {
                let origin = pool.origins[i].clone();
                let mut tick = tokio::time::interval(hc.interval.get());
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let ok = match tokio::time::timeout(hc.timeout.get(), probe(&pool, &origin, &hc)).await {
                        Ok(Ok(status)) => expect.contains(status),
                        Ok(Err(e)) => {
                            tracing::debug!(origin = %origin.label, error = %e, "health probe failed");
                            false
                        }
                        Err(_) => false,
                    };
                    if let Some(t) = origin.health.record_probe(ok, hc.rise, hc.fall, now_ms()) {
                        health_changed(&metrics, &pool, &origin, t, "probe");
                    }
                }
            })
        })
        .collect()
}

/// One probe: a fresh connection, `GET path`, the status.
async fn probe(
    pool: &Pool,
    origin: &Origin,
    hc: &HealthCheckConfig,
) -> Result<u16, crate::error::ProxyError> {
    use crate::proxy::upstream::conn::Sender;
    let sender = pool.connector.connect(&origin.addr, false).await?;
    let host = hc
        .host
        .clone()
        .unwrap_or_else(|| origin.addr.authority.to_string());
    let fail = |e: hyper::Error| {
        crate::error::ProxyError::upstream(crate::error::ErrorKind::UpstreamProtocol, "probe")
            .with_cause(e)
    };
    // HTTP/1.1 takes the origin form; HTTP/2 the absolute form.
    let uri = match &sender {
        Sender::H1(_) => hc.path.clone(),
        Sender::H2(_) => format!("{}://{}{}", origin.addr.scheme(), host, hc.path),
    };
    let req = http::Request::builder()
        .method(http::Method::GET)
        .uri(uri)
        .header(http::header::USER_AGENT, "meridian-health-check");
    let req = match &sender {
        Sender::H1(_) => req
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONNECTION, "close"),
        Sender::H2(_) => req,
    };
    let req = req.body(RequestBody::empty()).map_err(|e| {
        crate::error::ProxyError::upstream(crate::error::ErrorKind::Internal, "probe request")
            .with_cause(e)
    })?;
    let resp = match sender {
        Sender::H1(mut s) => s.send_request(req).await.map_err(fail)?,
        Sender::H2(mut s) => s.send_request(req).await.map_err(fail)?,
    };
    let status = resp.status().as_u16();
    let _ = crate::http::body::drain(resp.into_body(), 64 * 1024).await;
    Ok(status)
}

/// Logs and counts a health transition.
pub fn health_changed(
    metrics: &Metrics,
    pool: &Pool,
    origin: &Origin,
    t: Transition,
    by: &'static str,
) {
    tracing::warn!(pool = %pool.name, origin = %origin.label, to = t.label(), by, "origin health changed");
    metrics
        .origin_health_transitions
        .get_or_create(&OriginTransition {
            pool: pool.name.clone(),
            origin: origin.label.clone(),
            to: t.label(),
        })
        .inc();
    metrics
        .origin_healthy
        .get_or_create(&OriginLabels {
            pool: pool.name.clone(),
            origin: origin.label.clone(),
        })
        .set(i64::from(t == Transition::Up));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let h = Health::new(true);
        assert!(h.is_up(1));
        assert_eq!(h.record_probe(false, 2, 3, 10), None);
        assert_eq!(h.record_probe(false, 2, 3, 20), None);
        assert_eq!(h.record_probe(false, 2, 3, 30), Some(Transition::Down));
        assert!(!h.is_up(31));
        assert_eq!(h.record_probe(true, 2, 3, 40), None);
        assert_eq!(
            h.record_probe(false, 2, 3, 50),
            None,
            "a failure resets the rise count"
        );
        assert_eq!(h.record_probe(true, 2, 3, 60), None);
        assert_eq!(h.record_probe(true, 2, 3, 70), Some(Transition::Up));
        assert!(h.is_up(71));
    }

    #[test]
    fn passive_ejection_expires() {
        let h = Health::new(false);
        for t in 0..4 {
            assert_eq!(h.record_request(false, 5, 1000, t), None);
        }
        assert_eq!(h.record_request(false, 5, 1000, 10), Some(Transition::Down));
        assert!(!h.is_up(500));
        assert!(h.is_up(1010));
        assert_eq!(h.record_request(true, 5, 1000, 1020), None);
    }

    #[test]
    fn slow_start_ramps() {
        let h = Health::new(true);
        assert_eq!(h.weight_factor(100, 10_000), 1.0, "never down: full weight");
        for t in [0, 10, 20] {
            h.record_probe(false, 1, 3, t);
        }
        h.record_probe(true, 1, 3, 1000);
        assert!((h.weight_factor(1000, 10_000) - 0.1).abs() < 1e-9);
        assert!((h.weight_factor(6000, 10_000) - 0.55).abs() < 1e-9);
        assert_eq!(h.weight_factor(11_000, 10_000), 1.0);
    }
}
