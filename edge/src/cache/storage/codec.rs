//! On-media encoding of the values stored in foyer.
//!
//! Every value is a self-describing frame: a magic, a format version, explicit lengths and a
//! CRC32 (crc32fast, IEEE) over the fixed header and the whole payload (key + metadata + body,
//! or key + chunk data). The stored key is repeated inside the frame and checked on read, so a
//! hash collision or a misplaced entry can never be served as another object's bytes. Any
//! mismatch makes the decoder return [`Corrupt`], which the storage turns into a miss.
//!
//! Head frame (`MRDH`), fixed 32 bytes then payload:
//! ```text
//! 0..4 magic | 4 version | 5 kind (0 whole, 1 chunked) | 6..8 zero
//! 8..12 key_len u32 | 12..16 meta_len u32 | 16..24 inline_len u64 | 24..28 zero
//! 28..32 crc32(frame[0..28] ++ payload) | payload = key | meta | inline body
//! ```
//! Chunk frame (`MRDC`), fixed 32 bytes then payload:
//! ```text
//! 0..4 magic | 4 version | 5..8 zero | 8..16 generation u64 | 16..20 index u32
//! 20..24 key_len u32 | 24..28 data_len u32 | 28..32 crc32(frame[0..28] ++ payload)
//! payload = key | data
//! ```
//! All integers are little endian.

use std::{
    hash::Hash,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes, BytesMut};
use foyer::{Code, Error as FoyerError, ErrorKind as FoyerErrorKind};

use super::{
    MAX_HEADER_VALUE_LEN, MAX_HEADERS, MAX_KEY_LEN, MAX_META_LEN, MAX_TAG_LEN, MAX_TAGS, ObjectMeta,
};

pub(super) const FORMAT_VERSION: u8 = 1;
const HEAD_MAGIC: &[u8; 4] = b"MRDH";
const CHUNK_MAGIC: &[u8; 4] = b"MRDC";
pub(super) const FIXED_LEN: usize = 32;
const CRC_AT: usize = 28;
const MAX_HEADER_NAME_LEN: usize = 1024;

/// Key of a foyer entry: an object head, or one chunk of one generation of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum StoreKey {
    Head(String),
    Chunk {
        key: String,
        generation: u64,
        index: u32,
    },
}

impl StoreKey {
    fn key_str(&self) -> &str {
        match self {
            StoreKey::Head(k) | StoreKey::Chunk { key: k, .. } => k,
        }
    }
}

fn parse_err(msg: &'static str) -> FoyerError {
    FoyerError::new(FoyerErrorKind::Parse, msg)
}

impl Code for StoreKey {
    fn encode(&self, writer: &mut impl std::io::Write) -> foyer::Result<()> {
        let key = self.key_str().as_bytes();
        let len = u32::try_from(key.len()).map_err(|_| parse_err("key too long"))?;
        let mut buf = Vec::with_capacity(1 + 4 + key.len() + 12);
        match self {
            StoreKey::Head(_) => buf.push(0u8),
            StoreKey::Chunk { .. } => buf.push(1u8),
        }
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(key);
        if let StoreKey::Chunk {
            generation, index, ..
        } = self
        {
            buf.extend_from_slice(&generation.to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
        }
        writer.write_all(&buf).map_err(FoyerError::io_error)
    }

    fn decode(reader: &mut impl std::io::Read) -> foyer::Result<Self> {
        let mut tag = [0u8; 1];
        reader.read_exact(&mut tag).map_err(FoyerError::io_error)?;
        let mut len = [0u8; 4];
        reader.read_exact(&mut len).map_err(FoyerError::io_error)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_KEY_LEN {
            return Err(parse_err("stored key too long"));
        }
        let mut key = vec![0u8; len];
        reader.read_exact(&mut key).map_err(FoyerError::io_error)?;
        let key = String::from_utf8(key).map_err(|_| parse_err("stored key is not utf-8"))?;
        match tag[0] {
            0 => Ok(StoreKey::Head(key)),
            1 => {
                let mut gen_buf = [0u8; 8];
                reader
                    .read_exact(&mut gen_buf)
                    .map_err(FoyerError::io_error)?;
                let mut idx = [0u8; 4];
                reader.read_exact(&mut idx).map_err(FoyerError::io_error)?;
                Ok(StoreKey::Chunk {
                    key,
                    generation: u64::from_le_bytes(gen_buf),
                    index: u32::from_le_bytes(idx),
                })
            }
            _ => Err(parse_err("unknown store key kind")),
        }
    }

    fn estimated_size(&self) -> usize {
        1 + 4 + self.key_str().len() + 12
    }
}

/// Why a frame was rejected. Only used for logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Corrupt(pub &'static str);

/// The body part of a decoded head.
#[derive(Debug)]
pub(super) enum HeadBody {
    Whole(Bytes),
    Chunked { chunk_size: u32, chunks: u32 },
}

#[derive(Debug)]
pub(super) struct DecodedHead {
    pub meta: ObjectMeta,
    pub generation: u64,
    pub body: HeadBody,
}

/// A bounds-checked little-endian reader over a slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self.pos.checked_add(n).ok_or(Corrupt("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or(Corrupt("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, Corrupt> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, Corrupt> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, Corrupt> {
        self.array().map(u64::from_le_bytes)
    }
    fn i128(&mut self) -> Result<i128, Corrupt> {
        self.array().map(i128::from_le_bytes)
    }
    fn rest(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn time_to_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn nanos_to_time(n: i128) -> Result<SystemTime, Corrupt> {
    let abs = n.unsigned_abs();
    let secs = u64::try_from(abs / 1_000_000_000).map_err(|_| Corrupt("time out of range"))?;
    // The remainder is < 1e9, so it fits a u32.
    let nanos = (abs % 1_000_000_000) as u32;
    let d = Duration::new(secs, nanos);
    let t = if n >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    };
    t.ok_or(Corrupt("time out of range"))
}

/// Checks the per-object metadata bounds. Returns the encoded length of the metadata.
pub(super) fn validate_meta(meta: &ObjectMeta) -> Result<usize, &'static str> {
    if meta.headers.len() > MAX_HEADERS {
        return Err("too many header fields");
    }
    if meta.tags.len() > MAX_TAGS {
        return Err("too many surrogate keys");
    }
    let mut len = 2 + 16 + 16 + 8 + 8 + 4 + 4 + 4 + 2;
    for (name, value) in &meta.headers {
        if name.len() > MAX_HEADER_NAME_LEN {
            return Err("header name too long");
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err("header value too long");
        }
        len += 2 + name.len() + 4 + value.len();
    }
    for tag in &meta.tags {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err("surrogate key empty or too long");
        }
        len += 2 + tag.len();
    }
    if len > MAX_META_LEN {
        return Err("metadata too large");
    }
    Ok(len)
}

fn put_meta(out: &mut BytesMut, meta: &ObjectMeta, generation: u64, chunk_size: u32, chunks: u32) {
    out.put_u16_le(meta.status);
    out.put_i128_le(time_to_nanos(meta.request_time));
    out.put_i128_le(time_to_nanos(meta.response_time));
    out.put_u64_le(meta.body_len);
    out.put_u64_le(generation);
    out.put_u32_le(chunk_size);
    out.put_u32_le(chunks);
    // Bounds were checked by `validate_meta`, so these casts cannot truncate.
    out.put_u32_le(meta.headers.len() as u32);
    for (name, value) in &meta.headers {
        out.put_u16_le(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32_le(value.len() as u32);
        out.put_slice(value);
    }
    out.put_u16_le(meta.tags.len() as u16);
    for tag in &meta.tags {
        out.put_u16_le(tag.len() as u16);
        out.put_slice(tag.as_bytes());
    }
}

fn utf8(b: &[u8]) -> Result<String, Corrupt> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| Corrupt("not utf-8"))
}

fn finish_crc(frame: &mut BytesMut) {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..CRC_AT]);
    h.update(&frame[FIXED_LEN..]);
    let crc = h.finalize();
    frame[CRC_AT..FIXED_LEN].copy_from_slice(&crc.to_le_bytes());
}

fn check_crc(frame: &[u8]) -> Result<(), Corrupt> {
    let fixed = frame.get(..FIXED_LEN).ok_or(Corrupt("truncated header"))?;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&fixed[CRC_AT..FIXED_LEN]);
    let mut h = crc32fast::Hasher::new();
    h.update(&fixed[..CRC_AT]);
    h.update(&frame[FIXED_LEN..]);
    if h.finalize() == u32::from_le_bytes(stored) {
        Ok(())
    } else {
        Err(Corrupt("checksum mismatch"))
    }
}

/// Encodes a head. `inline` is the whole body for small objects; for chunked objects it is
/// empty and `chunks > 0`. `meta` must have passed [`validate_meta`] and `key` must be at most
/// [`MAX_KEY_LEN`] bytes.
pub(super) fn encode_head(
    key: &str,
    meta: &ObjectMeta,
    generation: u64,
    body: &HeadBodyRef<'_>,
    meta_len_hint: usize,
) -> Bytes {
    let (kind, inline, chunk_size, chunks): (u8, &[u8], u32, u32) = match body {
        HeadBodyRef::Whole(b) => (0, b, 0, 0),
        HeadBodyRef::Chunked { chunk_size, chunks } => (1, &[], *chunk_size, *chunks),
    };
    let mut out = BytesMut::with_capacity(FIXED_LEN + key.len() + meta_len_hint + inline.len());
    out.put_slice(HEAD_MAGIC);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(kind);
    out.put_u16_le(0);
    out.put_u32_le(key.len() as u32);
    out.put_u32_le(0); // meta_len, patched below
    out.put_u64_le(inline.len() as u64);
    out.put_u32_le(0);
    out.put_u32_le(0); // crc
    out.put_slice(key.as_bytes());
    let meta_start = out.len();
    put_meta(&mut out, meta, generation, chunk_size, chunks);
    let meta_len = (out.len() - meta_start) as u32;
    out[12..16].copy_from_slice(&meta_len.to_le_bytes());
    out.put_slice(inline);
    finish_crc(&mut out);
    out.freeze()
}

/// Borrowed body description for [`encode_head`].
pub(super) enum HeadBodyRef<'a> {
    Whole(&'a [u8]),
    Chunked { chunk_size: u32, chunks: u32 },
}

/// Decodes and verifies a head frame stored under `expected_key`.
pub(super) fn decode_head(expected_key: &str, frame: &Bytes) -> Result<DecodedHead, Corrupt> {
    check_crc(frame)?;
    let mut r = Reader::new(frame);
    if r.take(4)? != HEAD_MAGIC {
        return Err(Corrupt("bad head magic"));
    }
    let [version, kind, _, _] = r.array::<4>()?;
    if version != FORMAT_VERSION {
        return Err(Corrupt("unknown format version"));
    }
    let key_len = r.u32()? as usize;
    let meta_len = r.u32()? as usize;
    let inline_len = usize::try_from(r.u64()?).map_err(|_| Corrupt("inline length"))?;
    let _ = r.u32()?;
    let _crc = r.u32()?;
    if key_len > MAX_KEY_LEN || meta_len > MAX_META_LEN + 64 {
        return Err(Corrupt("length out of bounds"));
    }
    if r.take(key_len)? != expected_key.as_bytes() {
        return Err(Corrupt("key mismatch"));
    }
    let meta_bytes = r.take(meta_len)?;
    let body_start = r.pos;
    if r.rest() != inline_len {
        return Err(Corrupt("inline length mismatch"));
    }

    let mut m = Reader::new(meta_bytes);
    let status = m.u16()?;
    let request_time = nanos_to_time(m.i128()?)?;
    let response_time = nanos_to_time(m.i128()?)?;
    let body_len = m.u64()?;
    let generation = m.u64()?;
    let chunk_size = m.u32()?;
    let chunks = m.u32()?;
    let n_headers = m.u32()? as usize;
    if n_headers > MAX_HEADERS {
        return Err(Corrupt("too many headers"));
    }
    let mut headers = Vec::with_capacity(n_headers);
    for _ in 0..n_headers {
        let nl = m.u16()? as usize;
        let name = utf8(m.take(nl)?)?;
        let vl = m.u32()? as usize;
        let value = m.take(vl)?.to_vec();
        headers.push((name, value));
    }
    let n_tags = m.u16()? as usize;
    if n_tags > MAX_TAGS {
        return Err(Corrupt("too many tags"));
    }
    let mut tags = Vec::with_capacity(n_tags);
    for _ in 0..n_tags {
        let tl = m.u16()? as usize;
        tags.push(utf8(m.take(tl)?)?);
    }
    if m.rest() != 0 {
        return Err(Corrupt("trailing metadata bytes"));
    }

    let body = match kind {
        0 => {
            if body_len != inline_len as u64 {
                return Err(Corrupt("body length mismatch"));
            }
            HeadBody::Whole(frame.slice(body_start..))
        }
        1 => {
            if inline_len != 0 || chunk_size == 0 || chunks == 0 {
                return Err(Corrupt("bad chunk layout"));
            }
            let cap = u64::from(chunk_size) * u64::from(chunks);
            let floor = u64::from(chunk_size) * u64::from(chunks - 1);
            if body_len > cap || body_len <= floor {
                return Err(Corrupt("chunk count does not match body length"));
            }
            HeadBody::Chunked { chunk_size, chunks }
        }
        _ => return Err(Corrupt("unknown head kind")),
    };

    Ok(DecodedHead {
        meta: ObjectMeta {
            status,
            headers,
            request_time,
            response_time,
            tags,
            body_len,
        },
        generation,
        body,
    })
}

/// Encodes one chunk. `key` must be at most [`MAX_KEY_LEN`] bytes and `data` at most u32::MAX.
pub(super) fn encode_chunk(key: &str, generation: u64, index: u32, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FIXED_LEN + key.len() + data.len());
    out.put_slice(CHUNK_MAGIC);
    out.put_u8(FORMAT_VERSION);
    out.put_slice(&[0u8; 3]);
    out.put_u64_le(generation);
    out.put_u32_le(index);
    out.put_u32_le(key.len() as u32);
    out.put_u32_le(data.len() as u32);
    out.put_u32_le(0); // crc
    out.put_slice(key.as_bytes());
    out.put_slice(data);
    finish_crc(&mut out);
    out.freeze()
}

/// Decodes and verifies a chunk frame; the returned bytes share the frame's buffer.
pub(super) fn decode_chunk(
    expected_key: &str,
    generation: u64,
    index: u32,
    frame: &Bytes,
) -> Result<Bytes, Corrupt> {
    check_crc(frame)?;
    let mut r = Reader::new(frame);
    if r.take(4)? != CHUNK_MAGIC {
        return Err(Corrupt("bad chunk magic"));
    }
    let [version, _, _, _] = r.array::<4>()?;
    if version != FORMAT_VERSION {
        return Err(Corrupt("unknown format version"));
    }
    if r.u64()? != generation || r.u32()? != index {
        return Err(Corrupt("chunk identity mismatch"));
    }
    let key_len = r.u32()? as usize;
    let data_len = r.u32()? as usize;
    let _crc = r.u32()?;
    if key_len > MAX_KEY_LEN {
        return Err(Corrupt("length out of bounds"));
    }
    if r.take(key_len)? != expected_key.as_bytes() {
        return Err(Corrupt("key mismatch"));
    }
    if r.rest() != data_len {
        return Err(Corrupt("chunk length mismatch"));
    }
    Ok(frame.slice(r.pos..))
}
