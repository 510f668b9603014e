//! The shared key-value store (`proxy_get_shared_data` / `proxy_set_shared_data`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::abi::Status;

/// Key-value data shared by every instance of a plugin, with compare-and-swap
/// tokens as proxy-wasm defines them (same semantics as Envoy's host):
/// every successful write assigns a new non-zero CAS value; a write with
/// `cas == 0` always succeeds; a write with a non-zero `cas` to an existing key
/// fails with `CasMismatch` unless it equals the key's current CAS value.
///
/// The store is bounded: at most [`SharedData::max_bytes`] bytes of keys and
/// values together (and 65 536 keys, and 1 MiB per value). A write that
/// would go past a bound fails with `InternalFailure` (`BadArgument` for an
/// oversized value) and is counted in [`SharedData::rejected`]; the data
/// already stored is kept.
#[derive(Debug)]
pub struct SharedData {
    inner: Mutex<Inner>,
    max_bytes: usize,
    rejected: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, (Bytes, u32)>,
    next_cas: u32,
    /// Bytes of keys and values stored.
    bytes: usize,
}

/// Upper bounds that keep a plugin from exhausting host memory through the store.
const MAX_KEYS: usize = 65_536;
const MAX_VALUE_BYTES: usize = 1 << 20;
/// The default total: keys and values together.
pub(crate) const DEFAULT_MAX_BYTES: usize = 16 << 20;

impl Default for SharedData {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

impl SharedData {
    /// An empty store holding at most `max_bytes` of keys and values.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_bytes,
            rejected: AtomicU64::new(0),
        }
    }

    /// The most bytes of keys and values the store holds.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes of keys and values stored now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Writes refused because a bound would have been exceeded.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Value and CAS token for `key`.
    pub fn get(&self, key: &str) -> Option<(Bytes, u32)> {
        self.inner.lock().map.get(key).cloned()
    }

    fn reject(&self, status: Status) -> Result<u32, Status> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Err(status)
    }

    /// Set `key` to `value`, checking `cas` as described on the type. Returns the new CAS.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<u32, Status> {
        if value.len() > MAX_VALUE_BYTES {
            return self.reject(Status::BadArgument);
        }
        let mut inner = self.inner.lock();
        let len = inner.map.len();
        let old = match inner.map.get(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                Some(key.len() + entry.0.len())
            }
            None if len >= MAX_KEYS => return self.reject(Status::InternalFailure),
            None => None,
        };
        let bytes = inner.bytes - old.unwrap_or(0) + key.len() + value.len();
        if bytes > self.max_bytes {
            return self.reject(Status::InternalFailure);
        }
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        let new_cas = inner.next_cas;
        let entry = (Bytes::copy_from_slice(value), new_cas);
        match inner.map.get_mut(key) {
            Some(e) => *e = entry,
            None => {
                inner.map.insert(key.to_owned(), entry);
            }
        }
        inner.bytes = bytes;
        Ok(new_cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics() {
        let s = SharedData::default();
        assert!(s.get("k").is_none());
        let c1 = s.set("k", b"v1", 0).unwrap();
        assert_ne!(c1, 0);
        assert_eq!(s.get("k").unwrap(), (Bytes::from_static(b"v1"), c1));
        // Right CAS wins and changes the token.
        let c2 = s.set("k", b"v2", c1).unwrap();
        assert_ne!(c2, c1);
        // Stale CAS loses and leaves the value alone.
        assert_eq!(s.set("k", b"v3", c1), Err(Status::CasMismatch));
        assert_eq!(s.get("k").unwrap().0, Bytes::from_static(b"v2"));
        // cas == 0 is an unconditional write.
        s.set("k", b"v4", 0).unwrap();
        assert_eq!(s.get("k").unwrap().0, Bytes::from_static(b"v4"));
        assert_eq!(s.rejected(), 0);
    }

    #[test]
    fn total_bytes_are_bounded_and_overwrites_are_accounted() {
        let s = SharedData::new(100);
        s.set("a", &[0; 40], 0).unwrap(); // 41
        s.set("b", &[0; 40], 0).unwrap(); // 82
        assert_eq!(s.bytes(), 82);
        // A new key past the total is refused, and nothing changes.
        assert_eq!(s.set("c", &[0; 40], 0), Err(Status::InternalFailure));
        assert_eq!(s.bytes(), 82);
        assert!(s.get("c").is_none());
        // Overwriting counts the difference only.
        s.set("a", &[0; 58], 0).unwrap(); // 100
        assert_eq!(s.bytes(), 100);
        assert_eq!(s.set("a", &[0; 59], 0), Err(Status::InternalFailure));
        // Shrinking frees room.
        s.set("a", b"", 0).unwrap();
        assert_eq!(s.bytes(), 42);
        s.set("c", &[0; 40], 0).unwrap();
        // Oversized values are refused outright.
        assert_eq!(
            SharedData::default().set("x", &vec![0; MAX_VALUE_BYTES + 1], 0),
            Err(Status::BadArgument)
        );
        assert_eq!(s.rejected(), 2);
    }
}
