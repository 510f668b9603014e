//! How stored objects are keyed: a URL's key, and the keys derived from it
//! for its Vary variants, its slices and its stored part.

use super::storage::Storage;

/// Separates a URL key from its Vary variant's secondary key.
pub const VARIANT_SEP: char = '\u{1}';
/// Separates an object's key from a slice number.
pub const SLICE_SEP: char = '\u{2}';
/// Separates a URL's key from its stored part's.
pub const PART_SEP: char = '\u{3}';

/// The key of slice `i` of the object `key`.
pub fn slice_key(key: &str, i: u64) -> String {
    format!("{key}{SLICE_SEP}{i}")
}

/// The key a URL's part is stored under.
pub fn part_key(key: &str) -> String {
    format!("{key}{PART_SEP}")
}

/// The URL key and, for a Vary variant, the variant key of a stored object.
pub fn split_variant(obj_key: &str) -> (String, Option<String>) {
    let key = obj_key
        .split(VARIANT_SEP)
        .next()
        .unwrap_or(obj_key)
        .to_string();
    (
        key,
        obj_key.contains(VARIANT_SEP).then(|| obj_key.to_string()),
    )
}

/// Every stored key of one URL: its own, its Vary variants', its slices',
/// its stored part's.
pub fn keys_of_url(storage: &Storage, key: &str) -> Vec<String> {
    let mut ks: Vec<String> = storage
        .index()
        .keys_with_prefix(key)
        .into_iter()
        .filter(|k| {
            k.len() == key.len()
                || matches!(
                    k[key.len()..].chars().next(),
                    Some(VARIANT_SEP | SLICE_SEP | PART_SEP)
                )
        })
        .collect();
    if !ks.iter().any(|k| k == key) {
        ks.push(key.to_string());
    }
    ks
}
