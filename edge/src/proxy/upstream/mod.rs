//! Origins: where they are ([`OriginAddr`]), how to reach them
//! ([`conn`]), whether they are up ([`health`]), which to pick ([`select`]),
//! and how often to retry ([`retry`]). Discovery, health and selection are
//! separate pieces, as in pingora-load-balancing.

pub mod conn;
pub mod health;
pub mod retry;
pub mod select;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use crate::config::OriginAddr;
use crate::config::{PoolConfig, Selection};
use crate::metrics::{Metrics, OriginLabels};
use health::Health;
use retry::RetryBudget;
use select::Selector;

/// One origin server of a pool.
#[derive(Debug)]
pub struct Origin {
    pub index: usize,
    pub addr: OriginAddr,
    pub weight: u32,
    pub label: Arc<str>,
    pub health: Health,
    /// Requests in flight to this origin (for least-connections).
    pub inflight: AtomicUsize,
    pub conns: conn::ConnPool,
}

/// Counts a request in flight to an origin until dropped.
#[derive(Debug)]
pub struct OriginInflight(Arc<Origin>);

impl OriginInflight {
    pub fn new(o: &Arc<Origin>) -> Self {
        o.inflight.fetch_add(1, Ordering::Relaxed);
        OriginInflight(o.clone())
    }
}

impl Drop for OriginInflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named set of origins with its selection, health and retry policy.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub config: PoolConfig,
    pub origins: Vec<Arc<Origin>>,
    pub selector: Selector,
    pub budget: RetryBudget,
    pub connector: conn::Connector,
    /// `meridian_upstream_requests_total` of this pool, resolved once per
    /// config generation.
    pub requests: prometheus_client::metrics::counter::Counter,
}

impl Pool {
    /// Builds a pool. Health state is carried over from `previous` for origins
    /// that are still listed, so a reload does not put a dead origin back.
    pub fn new(
        name: &str,
        config: &PoolConfig,
        previous: Option<&Pool>,
        metrics: &Arc<Metrics>,
    ) -> Result<Pool, String> {
        let name: Arc<str> = Arc::from(name);
        let connector = conn::Connector::new(config)?;
        let mut origins = Vec::with_capacity(config.origins.len());
        for (index, oc) in config.origins.iter().enumerate() {
            let addr = oc.url.clone();
            let label: Arc<str> = Arc::from(addr.to_string());
            let health = Health::new(config.health_check.is_some());
            if let Some(prev) = previous.and_then(|p| p.origins.iter().find(|o| o.addr == addr)) {
                health.copy_from(&prev.health);
            }
            metrics
                .origin_healthy
                .get_or_create(&OriginLabels {
                    pool: name.clone(),
                    origin: label.clone(),
                })
                .set(i64::from(health.is_up_now()));
            origins.push(Arc::new(Origin {
                index,
                weight: oc.weight,
                label,
                health,
                inflight: AtomicUsize::new(0),
                conns: conn::ConnPool::new(&config.connection_pool),
                addr,
            }));
        }
        let selector = Selector::new(config.selection, &origins);
        let requests = metrics
            .upstream_requests
            .get_or_create(&crate::metrics::PoolLabels { pool: name.clone() })
            .clone();
        Ok(Pool {
            requests,
            budget: RetryBudget::new(config.retry.budget_ratio, config.retry.budget_min_per_sec),
            name,
            config: config.clone(),
            origins,
            selector,
            connector,
        })
    }

    pub fn uses_hash(&self) -> bool {
        self.config.selection == Selection::ConsistentHash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_urls() {
        let a = OriginAddr::parse("http://127.0.0.1:8080").expect("valid");
        assert_eq!((a.tls, a.host.as_str(), a.port), (false, "127.0.0.1", 8080));
        let a = OriginAddr::parse("https://example.com").expect("valid");
        assert_eq!((a.tls, a.port), (true, 443));
        let a = OriginAddr::parse("http://[::1]:81/").expect("valid");
        assert_eq!(a.host, "::1");
        assert!(OriginAddr::parse("ftp://x").is_err());
        assert!(OriginAddr::parse("http://x/path").is_err());
        assert!(OriginAddr::parse("http://u:p@x").is_err());
        assert!(OriginAddr::parse("not a url").is_err());
    }
}
