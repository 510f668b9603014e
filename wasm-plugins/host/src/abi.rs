//! proxy-wasm ABI 0.2.1 constants and the wire formats shared by host and guest.
//!
//! Everything here is pure: no wasmtime, no clocks. The header-map codec is the
//! proxy-wasm "serialized map": a little-endian `u32` pair count, then a `u32`
//! key length and a `u32` value length per pair, then every key and value
//! followed by a `0x00` byte.

use std::fmt;

/// A list of header (or trailer, or metadata) fields as the host exchanges them
/// with the embedder. Names are expected in lower case (HTTP/2 style), pseudo
/// headers (`:path`, `:method`, `:authority`, `:status`...) included.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// One change a plugin made to the request or response header map, in the
/// order it made them, so the embedder can apply just those to its own map
/// instead of rebuilding it from the [`HeaderList`]. Names are lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// `proxy_add_header_map_value`: one more value.
    Add(String, Vec<u8>),
    /// `proxy_replace_header_map_value`: every value of the name replaced by this one.
    Replace(String, Vec<u8>),
    /// `proxy_remove_header_map_value`: every value of the name removed.
    Remove(String),
    /// `proxy_set_header_map_pairs`: the whole map replaced; the list as the
    /// callback left it is the only truth.
    ReplaceAll,
}

/// `proxy_status_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    /// The value returned to the guest.
    pub const fn code(self) -> i32 {
        self as u32 as i32
    }
}

/// `wasi_errno_t` values used by the minimal WASI preview1 shim.
pub(crate) mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOSYS: i32 = 52;
    pub const NOTSUP: i32 = 58;
}

/// `proxy_action_t` `PAUSE` (anything else is `CONTINUE`).
pub(crate) const ACTION_PAUSE: i32 = 1;

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub(crate) fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcCallMessage,
    VmConfiguration,
    PluginConfiguration,
    ForeignFunctionArguments,
}

impl BufferType {
    pub(crate) fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestBody,
            1 => Self::ResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::HttpCallResponseBody,
            5 => Self::GrpcCallMessage,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::ForeignFunctionArguments,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }
}

/// Error from [`decode_header_map`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDecodeError(&'static str);

impl fmt::Display for MapDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed serialized header map: {}", self.0)
    }
}

impl std::error::Error for MapDecodeError {}

/// Size in bytes of the serialization of `pairs`.
pub fn encoded_header_map_len<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> usize {
    4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.as_ref().len() + v.as_ref().len() + 2)
        .sum::<usize>()
}

/// Error from [`encode_header_map_into`]: the output buffer has the wrong
/// size, or a name or value is too large for the format's `u32` lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEncodeError(&'static str);

impl fmt::Display for MapEncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot serialize header map: {}", self.0)
    }
}

impl std::error::Error for MapEncodeError {}

/// Serialize `pairs` into `out`, which must be exactly
/// [`encoded_header_map_len`] bytes long. Never panics: a buffer of another
/// size (or a field of 4 GiB or more) is an error, and `out` is then left
/// unspecified.
pub fn encode_header_map_into<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    pairs: &[(K, V)],
    out: &mut [u8],
) -> Result<(), MapEncodeError> {
    if out.len() != encoded_header_map_len(pairs) {
        return Err(MapEncodeError("output buffer has the wrong size"));
    }
    let len32 = |n: usize| {
        u32::try_from(n)
            .map(u32::to_le_bytes)
            .map_err(|_| MapEncodeError("field of 4 GiB or more"))
    };
    // Every range below is within `out`: its length was checked above.
    let mut put = |at: usize, bytes: &[u8]| -> Result<(), MapEncodeError> {
        out.get_mut(at..at + bytes.len())
            .ok_or(MapEncodeError("output buffer has the wrong size"))?
            .copy_from_slice(bytes);
        Ok(())
    };
    put(0, &len32(pairs.len())?)?;
    let mut sizes = 4;
    let mut data = 4 + pairs.len() * 8;
    for (k, v) in pairs {
        let (k, v) = (k.as_ref(), v.as_ref());
        put(sizes, &len32(k.len())?)?;
        put(sizes + 4, &len32(v.len())?)?;
        sizes += 8;
        for field in [k, v] {
            put(data, field)?;
            put(data + field.len(), &[0])?;
            data += field.len() + 1;
        }
    }
    Ok(())
}

/// Serialize `pairs` into a new vector.
pub fn encode_header_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    pairs: &[(K, V)],
) -> Result<Vec<u8>, MapEncodeError> {
    let mut out = vec![0; encoded_header_map_len(pairs)];
    encode_header_map_into(pairs, &mut out)?;
    Ok(out)
}

/// Parse a serialized map. Accepts the two encodings of the empty map that the
/// spec allows (no bytes, or a single `0x00`). Names must be UTF-8; values are
/// arbitrary bytes. Never panics, whatever the input.
pub fn decode_header_map(buf: &[u8]) -> Result<HeaderList, MapDecodeError> {
    if buf.is_empty() || buf == [0] {
        return Ok(Vec::new());
    }
    let read_u32 = |at: usize| -> Result<usize, MapDecodeError> {
        let b = buf
            .get(at..at + 4)
            .ok_or(MapDecodeError("truncated size table"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = read_u32(0)?;
    // Each pair needs at least 8 bytes of sizes and 2 terminators.
    if count > buf.len() / 10 {
        return Err(MapDecodeError("pair count larger than the buffer"));
    }
    let mut out = Vec::with_capacity(count);
    let mut data = 4 + count * 8;
    for i in 0..count {
        let klen = read_u32(4 + i * 8)?;
        let vlen = read_u32(8 + i * 8)?;
        let mut field = |len: usize| -> Result<&[u8], MapDecodeError> {
            let end = data
                .checked_add(len)
                .filter(|&e| e < buf.len())
                .ok_or(MapDecodeError("field runs past the end"))?;
            if buf[end] != 0 {
                return Err(MapDecodeError("field not NUL-terminated"));
            }
            let s = &buf[data..end];
            data = end + 1;
            Ok(s)
        };
        let key = std::str::from_utf8(field(klen)?)
            .map_err(|_| MapDecodeError("name is not UTF-8"))?
            .to_owned();
        let value = field(vlen)?.to_vec();
        out.push((key, value));
    }
    Ok(out)
}

/// Split a property path (`request\0headers\0x-foo`) into its segments.
pub(crate) fn split_property_path(path: &[u8]) -> Vec<&str> {
    path.split(|&b| b == 0)
        .map(|s| std::str::from_utf8(s).unwrap_or(""))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example() {
        let pairs = vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"22".to_vec()),
        ];
        let enc = encode_header_map(&pairs).unwrap();
        assert_eq!(
            enc,
            [
                2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b',
                0, b'2', b'2', 0
            ]
        );
        assert_eq!(decode_header_map(&enc).unwrap(), pairs);
    }

    #[test]
    fn empty_forms() {
        assert!(decode_header_map(&[]).unwrap().is_empty());
        assert!(decode_header_map(&[0]).unwrap().is_empty());
        assert!(decode_header_map(&[0, 0, 0, 0]).unwrap().is_empty());
        let empty: HeaderList = Vec::new();
        assert_eq!(encode_header_map(&empty).unwrap(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn malformed_is_an_error_not_a_panic() {
        let good = encode_header_map(&[("key", "value"), ("k2", "")]).unwrap();
        for cut in 1..good.len() {
            assert!(decode_header_map(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] = 0xff; // absurd count
        assert!(decode_header_map(&bad).is_err());
        let mut bad = good.clone();
        bad[4] = 0xff; // key length past the end
        assert!(decode_header_map(&bad).is_err());
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] = b'x'; // missing terminator
        assert!(decode_header_map(&bad).is_err());
        assert!(decode_header_map(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// Deterministic xorshift so the randomized test needs no extra crate.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn randomized_round_trip_and_garbage() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000 {
            let n = (rng(&mut seed) % 12) as usize;
            let pairs: HeaderList = (0..n)
                .map(|_| {
                    let klen = (rng(&mut seed) % 20) as usize;
                    let vlen = (rng(&mut seed) % 40) as usize;
                    let key: String = (0..klen)
                        .map(|_| (b'a' + (rng(&mut seed) % 26) as u8) as char)
                        .collect();
                    // Values may contain any byte, NUL included.
                    let value: Vec<u8> = (0..vlen).map(|_| rng(&mut seed) as u8).collect();
                    (key, value)
                })
                .collect();
            let enc = encode_header_map(&pairs).unwrap();
            assert_eq!(enc.len(), encoded_header_map_len(&pairs));
            assert_eq!(decode_header_map(&enc).unwrap(), pairs);
            // Random corruption must never panic.
            let mut garbage = enc.clone();
            if !garbage.is_empty() {
                let at = (rng(&mut seed) as usize) % garbage.len();
                garbage[at] = rng(&mut seed) as u8;
                let _ = decode_header_map(&garbage);
            }
            let junk: Vec<u8> = (0..(rng(&mut seed) % 64))
                .map(|_| rng(&mut seed) as u8)
                .collect();
            let _ = decode_header_map(&junk);
        }
    }

    #[test]
    fn encoding_into_a_wrong_sized_buffer_is_an_error_not_a_panic() {
        let pairs = [("a", "1"), ("bb", "22")];
        let n = encoded_header_map_len(&pairs);
        for len in [0, 1, n - 1, n + 1, 2 * n] {
            let mut out = vec![0; len];
            assert!(encode_header_map_into(&pairs, &mut out).is_err(), "{len}");
        }
        let mut out = vec![0; n];
        encode_header_map_into(&pairs, &mut out).unwrap();
        assert_eq!(decode_header_map(&out).unwrap().len(), 2);
    }

    #[test]
    fn property_path() {
        assert_eq!(
            split_property_path(b"request\0path"),
            vec!["request", "path"]
        );
        assert_eq!(split_property_path(b"plugin_name"), vec!["plugin_name"]);
    }
}
