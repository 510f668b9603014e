//! Header helpers shared by the phases: proxy-wasm header lists to and
//! from `http` header maps, and a plugin's edits applied in place.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use meridian_wasm_host::{HeaderEdit, HeaderList};

/// Appends `headers` to a proxy-wasm header list.
pub(crate) fn push_headers(list: &mut HeaderList, headers: &http::HeaderMap) {
    for (n, v) in headers {
        list.push((n.as_str().to_string(), v.as_bytes().to_vec()));
    }
}

/// The regular headers of a proxy-wasm list as a `HeaderMap` (entries that
/// are not valid HTTP are dropped); `pseudo` sees the `:name` entries.
pub(crate) fn header_map(
    list: &HeaderList,
    mut pseudo: impl FnMut(&str, &[u8]),
) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(list.len());
    for (n, v) in list {
        if n.starts_with(':') {
            pseudo(n, v);
        } else if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// A header name and value a plugin gave, if they are valid HTTP (others
/// are dropped, as when a whole map is rebuilt). The value is not copied.
fn valid_header(name: &str, value: Vec<u8>) -> Option<(HeaderName, HeaderValue)> {
    let n = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let v = HeaderValue::from_maybe_shared(Bytes::from(value)).ok()?;
    Some((n, v))
}

/// Applies a plugin's edits (in order) to `map`; `pseudo` gets the values
/// it gave to `:name` entries. `false`: the plugin replaced the whole map,
/// and the caller must rebuild it from the list.
pub(super) fn apply_edits(
    map: &mut http::HeaderMap,
    edits: Vec<HeaderEdit>,
    mut pseudo: impl FnMut(&str, &[u8]),
) -> bool {
    for e in edits {
        match e {
            HeaderEdit::ReplaceAll => return false,
            HeaderEdit::Add(n, v) | HeaderEdit::Replace(n, v) if n.starts_with(':') => {
                pseudo(&n, &v)
            }
            HeaderEdit::Add(n, v) => {
                if let Some((n, v)) = valid_header(&n, v) {
                    map.append(n, v);
                }
            }
            HeaderEdit::Replace(n, v) => {
                if let Some((n, v)) = valid_header(&n, v) {
                    map.insert(n, v);
                }
            }
            HeaderEdit::Remove(n) => {
                map.remove(n.as_str());
            }
        }
    }
    true
}
