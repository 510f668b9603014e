//! Picking an origin: smooth weighted round-robin, least-connections, or a
//! ketama consistent-hash ring. Down origins are skipped; weights follow the
//! slow-start ramp; origins already tried for this request are avoided.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::Origin;
use crate::config::Selection;
pub use crate::util::hash64;

/// Ring points per unit of weight.
const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug)]
pub enum Selector {
    RoundRobin(Mutex<Vec<f64>>),
    LeastConnections(AtomicUsize),
    ConsistentHash(Vec<(u64, usize)>),
}

/// Envoy's panic mode: when fewer than `threshold_percent` of a pool's
/// origins are healthy, health is not to be trusted (a bad deploy, a
/// too-eager check, an origin that 503s a few URLs), and traffic goes to all
/// of them rather than piling onto the few left or failing outright. A pool
/// therefore never ejects its last origins. 0 disables panic mode.
pub fn in_panic(origins: &[Arc<Origin>], now: u64, threshold_percent: u32) -> bool {
    if threshold_percent == 0 || origins.is_empty() {
        return false;
    }
    let healthy = origins.iter().filter(|o| o.health.is_up(now)).count() as u64;
    healthy * 100 < u64::from(threshold_percent) * origins.len() as u64
}

impl Selector {
    pub fn new(kind: Selection, origins: &[Arc<Origin>]) -> Self {
        match kind {
            Selection::RoundRobin => Selector::RoundRobin(Mutex::new(vec![0.0; origins.len()])),
            Selection::LeastConnections => Selector::LeastConnections(AtomicUsize::new(0)),
            Selection::ConsistentHash => {
                let mut ring = Vec::new();
                for o in origins {
                    let label = o.addr.to_string();
                    for i in 0..o.weight * POINTS_PER_WEIGHT {
                        ring.push((hash64(&[label.as_bytes(), &i.to_le_bytes()]), o.index));
                    }
                }
                ring.sort_unstable();
                Selector::ConsistentHash(ring)
            }
        }
    }

    /// Picks an origin that is up and not in `tried`. Returns its index.
    /// `key` is the request's hash (used by consistent hashing only). In
    /// `panic` (see [`in_panic`]) health is ignored: every origin is usable.
    pub fn pick(
        &self,
        origins: &[Arc<Origin>],
        key: u64,
        now: u64,
        slow_start_ms: u64,
        tried: &[usize],
        panic: bool,
    ) -> Option<usize> {
        let up = |o: &Origin| panic || o.health.is_up(now);
        let usable = |o: &Origin| up(o) && !tried.contains(&o.index);
        if !origins.iter().any(|o| usable(o)) {
            // Retry on an origin already tried rather than fail, if it is up.
            if tried.is_empty() || !origins.iter().any(|o| up(o)) {
                return None;
            }
            return self.pick(origins, key, now, slow_start_ms, &[], panic);
        }
        let weight = |o: &Origin| f64::from(o.weight) * o.health.weight_factor(now, slow_start_ms);
        match self {
            Selector::RoundRobin(current) => {
                // nginx's smooth weighted round-robin.
                let mut cur = current.lock();
                let mut total = 0.0;
                let mut best: Option<usize> = None;
                for o in origins.iter().filter(|o| usable(o)) {
                    let w = weight(o);
                    cur[o.index] += w;
                    total += w;
                    if best.is_none_or(|b| cur[o.index] > cur[b]) {
                        best = Some(o.index);
                    }
                }
                let b = best?;
                cur[b] -= total;
                Some(b)
            }
            Selector::LeastConnections(rotate) => {
                let start = rotate.fetch_add(1, Ordering::Relaxed);
                let n = origins.len();
                let mut best: Option<(f64, usize)> = None;
                for k in 0..n {
                    let o = &origins[(start + k) % n];
                    if !usable(o) {
                        continue;
                    }
                    let load = (o.inflight.load(Ordering::Relaxed) as f64 + 1.0) / weight(o);
                    if best.is_none_or(|(l, _)| load < l) {
                        best = Some((load, o.index));
                    }
                }
                best.map(|(_, i)| i)
            }
            Selector::ConsistentHash(ring) => {
                if ring.is_empty() {
                    return None;
                }
                let start = ring.partition_point(|&(h, _)| h < key);
                (0..ring.len())
                    .map(|k| ring[(start + k) % ring.len()].1)
                    .find(|&i| usable(&origins[i]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConnPoolConfig, OriginAddr, OriginConfig, PoolConfig};
    use crate::proxy::upstream::Pool;

    fn pool(sel: Selection, weights: &[u32]) -> Pool {
        let cfg: PoolConfig = toml::from_str(&format!(
            "selection = {:?}\norigins = []",
            match sel {
                Selection::RoundRobin => "round_robin",
                Selection::LeastConnections => "least_connections",
                Selection::ConsistentHash => "consistent_hash",
            }
        ))
        .expect("pool config");
        let mut cfg = cfg;
        cfg.connection_pool = ConnPoolConfig::default();
        cfg.origins = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| OriginConfig {
                url: OriginAddr::parse(&format!("http://10.0.0.{}:80", i + 1)).expect("url"),
                weight: w,
            })
            .collect();
        Pool::new("t", &cfg, None, &crate::metrics::Metrics::new()).expect("pool")
    }

    #[test]
    fn smooth_round_robin_follows_weights() {
        let p = pool(Selection::RoundRobin, &[5, 1, 1]);
        let picks: Vec<usize> = (0..7)
            .map(|_| {
                p.selector
                    .pick(&p.origins, 0, 1, 0, &[], false)
                    .expect("up")
            })
            .collect();
        assert_eq!(
            picks,
            vec![0, 0, 1, 0, 2, 0, 0],
            "nginx's sequence for 5,1,1"
        );
    }

    #[test]
    fn down_origins_are_skipped_and_tried_ones_avoided() {
        let p = pool(Selection::RoundRobin, &[1, 1]);
        p.origins[0].health.record_probe(false, 1, 1, 1);
        for _ in 0..5 {
            assert_eq!(p.selector.pick(&p.origins, 0, 2, 0, &[], false), Some(1));
        }
        assert_eq!(
            p.selector.pick(&p.origins, 0, 2, 0, &[1], false),
            Some(1),
            "only one up: reuse it"
        );
        p.origins[1].health.record_probe(false, 1, 1, 1);
        assert_eq!(p.selector.pick(&p.origins, 0, 2, 0, &[], false), None);
    }

    #[test]
    fn panic_mode_routes_to_every_origin_below_the_threshold() {
        let p = pool(Selection::RoundRobin, &[1, 1, 1, 1]);
        assert!(!in_panic(&p.origins, 2, 50));
        p.origins[0].health.record_probe(false, 1, 1, 1);
        p.origins[1].health.record_probe(false, 1, 1, 1);
        assert!(
            !in_panic(&p.origins, 2, 50),
            "2 of 4 healthy is 50%: not below"
        );
        p.origins[2].health.record_probe(false, 1, 1, 1);
        assert!(in_panic(&p.origins, 2, 50), "1 of 4 is below 50%");
        assert!(!in_panic(&p.origins, 2, 0), "0 disables panic mode");
        let picks: std::collections::HashSet<usize> = (0..8)
            .filter_map(|_| p.selector.pick(&p.origins, 0, 2, 0, &[], true))
            .collect();
        assert_eq!(picks.len(), 4, "in panic every origin takes traffic");
        // A single origin, ejected, is still used.
        let one = pool(Selection::RoundRobin, &[1]);
        one.origins[0].health.record_request(false, 1, 30_000, 1);
        assert!(in_panic(&one.origins, 2, 50));
        assert_eq!(one.selector.pick(&one.origins, 0, 2, 0, &[], true), Some(0));
        assert_eq!(one.selector.pick(&one.origins, 0, 2, 0, &[], false), None);
    }

    #[test]
    fn least_connections_prefers_idle() {
        let p = pool(Selection::LeastConnections, &[1, 1, 1]);
        p.origins[0].inflight.store(5, Ordering::Relaxed);
        p.origins[2].inflight.store(1, Ordering::Relaxed);
        assert_eq!(p.selector.pick(&p.origins, 0, 1, 0, &[], false), Some(1));
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_little() {
        let p = pool(Selection::ConsistentHash, &[1, 1, 1, 1]);
        let keys: Vec<u64> = (0..2000u32)
            .map(|i| hash64(&[b"host", format!("/obj/{i}").as_bytes()]))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| {
                p.selector
                    .pick(&p.origins, k, 1, 0, &[], false)
                    .expect("up")
            })
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|&k| {
                p.selector
                    .pick(&p.origins, k, 1, 0, &[], false)
                    .expect("up")
            })
            .collect();
        assert_eq!(before, again);
        // Every origin gets a fair share.
        for i in 0..4 {
            let n = before.iter().filter(|&&x| x == i).count();
            assert!((350..650).contains(&n), "origin {i} got {n} of 2000");
        }
        // Take origin 2 down: only its keys move.
        p.origins[2].health.record_probe(false, 1, 1, 1);
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| {
                p.selector
                    .pick(&p.origins, k, 2, 0, &[], false)
                    .expect("up")
            })
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "a key not on the failed origin moved");
            } else {
                assert_ne!(*a, 2);
            }
        }
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash64(&[b"a", b"b"]), hash64(&[b"a", b"b"]));
        assert_ne!(hash64(&[b"ab"]), hash64(&[b"a", b"b"]));
    }
}
