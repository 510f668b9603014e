//! Metrics defined by plugins through `proxy_define_metric`, readable by the
//! embedder for export.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::abi::{MetricKind, Status};

#[derive(Debug)]
struct Metric {
    name: String,
    kind: MetricKind,
    /// Counter and gauge value; histogram sum.
    value: AtomicI64,
    /// Histogram sample count.
    count: AtomicU64,
}

/// One plugin's metrics. Every instance of the plugin defines the same names
/// and gets the same ids, so values aggregate across the instance pool.
#[derive(Debug, Default)]
pub(crate) struct MetricRegistry {
    inner: RwLock<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    metrics: Vec<Arc<Metric>>,
    by_name: HashMap<(String, u8), u32>,
}

/// A metric as seen by the embedder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSnapshot {
    pub name: String,
    pub kind: MetricKind,
    /// Counter and gauge value; for a histogram, the sum of the samples.
    pub value: i64,
    /// Histogram sample count (0 for counters and gauges).
    pub count: u64,
}

const MAX_METRICS: usize = 4096;

impl MetricRegistry {
    pub(crate) fn define(&self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let key = (name.to_owned(), kind as u8);
        if let Some(&id) = self.inner.read().by_name.get(&key) {
            return Ok(id);
        }
        let mut reg = self.inner.write();
        if let Some(&id) = reg.by_name.get(&key) {
            return Ok(id);
        }
        if reg.metrics.len() >= MAX_METRICS {
            return Err(Status::InternalFailure);
        }
        reg.metrics.push(Arc::new(Metric {
            name: key.0.clone(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }));
        // Ids start at 1 so that 0 is never valid.
        let id = reg.metrics.len() as u32;
        reg.by_name.insert(key, id);
        Ok(id)
    }

    fn get(&self, id: u32) -> Result<Arc<Metric>, Status> {
        let reg = self.inner.read();
        (id as usize)
            .checked_sub(1)
            .and_then(|i| reg.metrics.get(i))
            .cloned()
            .ok_or(Status::NotFound)
    }

    pub(crate) fn increment(&self, id: u32, delta: i64) -> Result<(), Status> {
        let m = self.get(id)?;
        match m.kind {
            MetricKind::Counter if delta < 0 => Err(Status::BadArgument),
            MetricKind::Counter | MetricKind::Gauge => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Ok(())
            }
            MetricKind::Histogram => Err(Status::BadArgument),
        }
    }

    pub(crate) fn record(&self, id: u32, value: u64) -> Result<(), Status> {
        let m = self.get(id)?;
        let v = value as i64;
        match m.kind {
            MetricKind::Counter | MetricKind::Gauge => m.value.store(v, Ordering::Relaxed),
            MetricKind::Histogram => {
                m.value.fetch_add(v, Ordering::Relaxed);
                m.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub(crate) fn value(&self, id: u32) -> Result<u64, Status> {
        let m = self.get(id)?;
        match m.kind {
            MetricKind::Histogram => Err(Status::BadArgument),
            _ => Ok(m.value.load(Ordering::Relaxed) as u64),
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<MetricSnapshot> {
        self.inner
            .read()
            .metrics
            .iter()
            .map(|m| MetricSnapshot {
                name: m.name.clone(),
                kind: m.kind,
                value: m.value.load(Ordering::Relaxed),
                count: m.count.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_is_idempotent_and_kinds_are_checked() {
        let r = MetricRegistry::default();
        let c = r.define(MetricKind::Counter, "hits").unwrap();
        assert_eq!(r.define(MetricKind::Counter, "hits").unwrap(), c);
        let g = r.define(MetricKind::Gauge, "inflight").unwrap();
        let h = r.define(MetricKind::Histogram, "size").unwrap();
        assert_ne!(c, g);
        r.increment(c, 2).unwrap();
        assert_eq!(r.increment(c, -1), Err(Status::BadArgument));
        r.increment(g, -3).unwrap();
        r.record(h, 10).unwrap();
        r.record(h, 5).unwrap();
        assert_eq!(r.value(c), Ok(2));
        assert_eq!(r.value(g), Ok(-3i64 as u64));
        assert_eq!(r.value(h), Err(Status::BadArgument));
        assert_eq!(r.value(0), Err(Status::NotFound));
        assert_eq!(r.increment(99, 1), Err(Status::NotFound));
        let snap = r.snapshot();
        assert_eq!(
            snap[2],
            MetricSnapshot {
                name: "size".into(),
                kind: MetricKind::Histogram,
                value: 15,
                count: 2
            }
        );
    }
}
