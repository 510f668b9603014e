//! Entry points for the fuzz targets in `fuzz/` (docs/fuzzing.md): the
//! on-disk frame codec and the index-log replay, which read what is on the
//! disk. Not an API: hidden from the docs, and it may change with them.

use bytes::Bytes;
use foyer::Code;

use super::codec::{self, HeadBody, HeadBodyRef, StoreKey};
use super::{ObjectMeta, PurgeIndex};

/// A decoded head frame.
#[derive(Debug)]
pub struct Head {
    pub meta: ObjectMeta,
    pub generation: u64,
    /// The inline body of a small object; `None` for a chunked one.
    pub whole: Option<Bytes>,
    pub chunk_size: u32,
    pub chunks: u32,
}

/// Decodes and verifies a head frame stored under `key`.
pub fn decode_head(key: &str, frame: &Bytes) -> Result<Head, &'static str> {
    let d = codec::decode_head(key, frame).map_err(|c| c.0)?;
    let (whole, chunk_size, chunks) = match d.body {
        HeadBody::Whole(b) => (Some(b), 0, 0),
        HeadBody::Chunked { chunk_size, chunks } => (None, chunk_size, chunks),
    };
    Ok(Head {
        meta: d.meta,
        generation: d.generation,
        whole,
        chunk_size,
        chunks,
    })
}

/// Encodes a head as the storage does, after the same checks.
pub fn encode_head(
    key: &str,
    meta: &ObjectMeta,
    generation: u64,
    whole: Option<&[u8]>,
    chunk_size: u32,
    chunks: u32,
) -> Result<Bytes, &'static str> {
    super::index::validate_key(key).map_err(|_| "bad key")?;
    let len = codec::validate_meta(meta)?;
    let body = match whole {
        Some(b) => HeadBodyRef::Whole(b),
        None => HeadBodyRef::Chunked { chunk_size, chunks },
    };
    Ok(codec::encode_head(key, meta, generation, &body, len))
}

/// Decodes and verifies a chunk frame.
pub fn decode_chunk(
    key: &str,
    generation: u64,
    index: u32,
    frame: &Bytes,
) -> Result<Bytes, &'static str> {
    codec::decode_chunk(key, generation, index, frame).map_err(|c| c.0)
}

/// Encodes a chunk frame.
pub fn encode_chunk(key: &str, generation: u64, index: u32, data: &[u8]) -> Bytes {
    codec::encode_chunk(key, generation, index, data)
}

/// Decodes a foyer key as foyer reads it back from the disk: the object key,
/// and `(generation, index)` for a chunk's key. Re-encoding it must give back
/// the bytes it was read from, which is checked here.
pub fn decode_store_key(bytes: &[u8]) -> Option<(String, Option<(u64, u32)>)> {
    let mut r = bytes;
    let k = StoreKey::decode(&mut r).ok()?;
    let used = bytes.len() - r.len();
    let mut again = Vec::new();
    k.encode(&mut again).ok()?;
    assert_eq!(again, bytes[..used], "a store key re-encodes differently");
    Some(match k {
        StoreKey::Head(key) => (key, None),
        StoreKey::Chunk {
            key,
            generation,
            index,
        } => (key, Some((generation, index))),
    })
}

/// One replayed index entry: key, host, tags, generation, chunks.
pub type Entry = (String, String, Vec<String>, u64, u32);

/// Replays an index-log image (magic included) as the storage does on open.
/// Returns the index, the length of the valid prefix (where `open` cuts the
/// log), and the image a compaction would write.
pub fn replay_index(image: &[u8]) -> Option<(PurgeIndex, usize, Vec<u8>)> {
    PurgeIndex::replay_image(image)
}

/// Every entry of an index, sorted by key.
pub fn index_entries(index: &PurgeIndex) -> Vec<Entry> {
    index
        .keys_with_prefix("")
        .into_iter()
        .filter_map(|k| {
            let e = index.lookup(&k)?;
            let tags = e.tags.iter().map(|t| t.to_string()).collect();
            Some((k, e.host.to_string(), tags, e.generation, e.chunks))
        })
        .collect()
}
