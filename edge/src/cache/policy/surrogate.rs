//! Surrogate keys (purge tags) from `Surrogate-Key` (space-separated, Fastly
//! style) and `Cache-Tag` (comma-separated, Cloudflare style).
//!
//! Keys are case-sensitive and deduplicated in first-seen order
//! (`Surrogate-Key` lines first). A key containing bytes outside visible ASCII
//! or longer than [`SurrogateKeyLimits::max_key_len`] is skipped (never
//! truncated: truncation could make two keys collide and over-purge). Once
//! [`SurrogateKeyLimits::max_keys`] keys are collected the rest are ignored.

use std::collections::HashSet;

use http::{HeaderMap, HeaderName};

use super::split_list;

/// `Surrogate-Key` header name.
pub const SURROGATE_KEY: &str = "surrogate-key";
/// `Cache-Tag` header name.
pub const CACHE_TAG: &str = "cache-tag";

/// Bounds applied while collecting keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SurrogateKeyLimits {
    /// Maximum number of keys kept per response.
    pub max_keys: usize,
    /// Maximum length of one key, in bytes.
    pub max_key_len: usize,
}

impl Default for SurrogateKeyLimits {
    fn default() -> Self {
        Self {
            max_keys: 256,
            max_key_len: 1024,
        }
    }
}

/// Collects the surrogate keys of a response.
pub fn surrogate_keys(headers: &HeaderMap, limits: SurrogateKeyLimits) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut push = |key: &[u8], out: &mut Vec<String>| {
        if out.len() >= limits.max_keys || key.is_empty() || key.len() > limits.max_key_len {
            return;
        }
        if !key.iter().all(|b| b.is_ascii_graphic()) {
            return;
        }
        let key = String::from_utf8_lossy(key).into_owned();
        if seen.insert(key.clone()) {
            out.push(key);
        }
    };
    for v in headers.get_all(HeaderName::from_static(SURROGATE_KEY)) {
        for key in v.as_bytes().split(|b| *b == b' ' || *b == b'\t') {
            push(key, &mut out);
        }
    }
    for v in headers.get_all(HeaderName::from_static(CACHE_TAG)) {
        for key in split_list(v.as_bytes()) {
            push(key, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn surrogate_key_is_space_separated_and_deduplicated() {
        let h = headers(&[("surrogate-key", "  a b\tc a  "), ("surrogate-key", "d b")]);
        assert_eq!(
            surrogate_keys(&h, SurrogateKeyLimits::default()),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn cache_tag_is_comma_separated_and_merged_after_surrogate_key() {
        let h = headers(&[("cache-tag", "x, y ,,a"), ("surrogate-key", "a")]);
        assert_eq!(
            surrogate_keys(&h, SurrogateKeyLimits::default()),
            ["a", "x", "y"]
        );
    }

    #[test]
    fn keys_are_case_sensitive() {
        let h = headers(&[("surrogate-key", "Key key")]);
        assert_eq!(
            surrogate_keys(&h, SurrogateKeyLimits::default()),
            ["Key", "key"]
        );
    }

    #[test]
    fn limits_bound_count_and_skip_oversized_keys() {
        let long = "k".repeat(11);
        let h = headers(&[("surrogate-key", &format!("a {long} b c d"))]);
        let limits = SurrogateKeyLimits {
            max_keys: 3,
            max_key_len: 10,
        };
        assert_eq!(surrogate_keys(&h, limits), ["a", "b", "c"]);
    }

    #[test]
    fn keys_with_inner_whitespace_or_non_ascii_are_skipped() {
        let mut h = headers(&[("cache-tag", "good, has space")]);
        h.append(
            HeaderName::from_static(CACHE_TAG),
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text"),
        );
        assert_eq!(surrogate_keys(&h, SurrogateKeyLimits::default()), ["good"]);
    }

    proptest! {
        #[test]
        fn prop_keys_are_bounded(raw in "[ -~]{0,300}", max_keys in 0_usize..20, max_len in 0_usize..20) {
            let h = headers(&[("surrogate-key", raw.as_str()), ("cache-tag", raw.as_str())]);
            let keys = surrogate_keys(&h, SurrogateKeyLimits { max_keys, max_key_len: max_len });
            prop_assert!(keys.len() <= max_keys);
            prop_assert!(keys.iter().all(|k| !k.is_empty() && k.len() <= max_len));
            let unique: HashSet<_> = keys.iter().collect();
            prop_assert_eq!(unique.len(), keys.len());
        }
    }
}
