//! The signature cache: RRSIGs per (owner, type, RRset content), bounded,
//! sharded, read-locked on hits. An entry is fresh until its `refresh_at`;
//! after that the next query re-signs (the old signatures are still valid
//! for the rest of their lifetime, so refreshing early never serves an
//! expired signature).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use hickory_proto::rr::Record;

const SHARDS: usize = 16;

/// One cached signature set.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The RRSIG records (one per signing key).
    pub sigs: Arc<[Record]>,
    /// Unix time after which the entry is re-signed.
    pub refresh_at: u32,
}

/// Counters, read by the metrics and the benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Lookups served from the cache.
    pub hits: AtomicU64,
    /// Lookups that had to sign (absent, or due for refresh).
    pub misses: AtomicU64,
    /// Nanoseconds spent signing on misses.
    pub sign_nanos: AtomicU64,
}

/// A bounded map from RRset content to signatures.
#[derive(Debug)]
pub struct SigCache {
    shards: Vec<RwLock<HashMap<Vec<u8>, Entry>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    /// Hit/miss counters.
    pub stats: Stats,
}

impl SigCache {
    /// A cache holding at most about `capacity` RRsets.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
            stats: Stats::default(),
        }
    }

    fn shard(&self, key: &[u8]) -> &RwLock<HashMap<Vec<u8>, Entry>> {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Fresh signatures for `key` at `now`, or None (absent or due).
    pub fn get(&self, key: &[u8], now: u32) -> Option<Arc<[Record]>> {
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        match shard.get(key) {
            Some(e) if now < e.refresh_at => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.sigs.clone())
            }
            _ => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Store signatures; a full shard first drops one entry (an arbitrary
    /// one: the map's order is randomly seeded).
    pub fn insert(&self, key: Vec<u8>, entry: Entry) {
        let mut shard = self.shard(&key).write().unwrap_or_else(|e| e.into_inner());
        if shard.len() >= self.per_shard
            && !shard.contains_key(&key)
            && let Some(victim) = shard.keys().next().cloned()
        {
            shard.remove(&victim);
        }
        shard.insert(key, entry);
    }

    /// Number of cached RRsets.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(refresh_at: u32) -> Entry {
        Entry {
            sigs: Arc::from(Vec::new()),
            refresh_at,
        }
    }

    #[test]
    fn hit_until_refresh_then_miss() {
        let c = SigCache::new(10);
        assert!(c.get(b"k", 100).is_none());
        c.insert(b"k".to_vec(), entry(200));
        assert!(c.get(b"k", 199).is_some());
        assert!(c.get(b"k", 200).is_none(), "due for refresh");
        assert_eq!(c.stats.hits.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats.misses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn bounded() {
        let c = SigCache::new(32);
        for i in 0..10_000u32 {
            c.insert(i.to_be_bytes().to_vec(), entry(u32::MAX));
        }
        assert!(c.len() <= 32, "{}", c.len());
        assert!(c.len() >= 16);
    }
}
