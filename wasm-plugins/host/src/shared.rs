//! The shared key-value store (`proxy_get_shared_data` / `proxy_set_shared_data`).

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::abi::Status;

/// Key-value data shared by every instance of a plugin, with compare-and-swap
/// tokens as proxy-wasm defines them (same semantics as Envoy's host):
/// every successful write assigns a new non-zero CAS value; a write with
/// `cas == 0` always succeeds; a write with a non-zero `cas` to an existing key
/// fails with `CasMismatch` unless it equals the key's current CAS value.
#[derive(Debug, Default)]
pub struct SharedData {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, (Bytes, u32)>,
    next_cas: u32,
}

/// Upper bounds that keep a plugin from exhausting host memory through the store.
const MAX_KEYS: usize = 65_536;
const MAX_VALUE_BYTES: usize = 1 << 20;

impl SharedData {
    /// Value and CAS token for `key`.
    pub fn get(&self, key: &str) -> Option<(Bytes, u32)> {
        self.inner.lock().map.get(key).cloned()
    }

    /// Set `key` to `value`, checking `cas` as described on the type. Returns the new CAS.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<u32, Status> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut inner = self.inner.lock();
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        let new_cas = inner.next_cas;
        let len = inner.map.len();
        match inner.map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                *entry = (Bytes::copy_from_slice(value), new_cas);
            }
            None => {
                if len >= MAX_KEYS {
                    return Err(Status::InternalFailure);
                }
                inner
                    .map
                    .insert(key.to_owned(), (Bytes::copy_from_slice(value), new_cas));
            }
        }
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
    }
}
