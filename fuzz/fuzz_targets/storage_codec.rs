//! The edge storage's on-disk codec (`edge/src/cache/storage/codec.rs`):
//! head frames, chunk frames and foyer keys, as read back from a disk that
//! may hold anything. The input is taken two ways:
//! - as stored bytes: a head or chunk frame (its CRC fixed up, so the
//!   decoder's checks past the checksum are reached), and a foyer key; the
//!   decoders must answer `Corrupt` or a value, never panic, and a head they
//!   accept must encode back to the very same frame;
//! - as an object to store: metadata built from the input must encode and
//!   decode back to itself.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meridian_edge::cache::storage::ObjectMeta;
use meridian_edge::cache::storage::fuzzing as codec;

const KEY: &str = "https://fuzz.test/object";

/// Sets the CRC of a frame (bytes 28..32 over 0..28 and 32..) the way the encoder does.
fn fix_crc(frame: &mut [u8]) {
    if frame.len() < 32 {
        return;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..28]);
    h.update(&frame[32..]);
    let crc = h.finalize();
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// A small reader of the input for building objects.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        for x in &mut a {
            *x = self.byte();
        }
        u64::from_le_bytes(a)
    }
    fn string(&mut self, max: usize) -> String {
        let n = usize::from(self.byte()) % (max + 1);
        String::from_utf8_lossy(&self.bytes(n)).into_owned()
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. Stored bytes, as read from the disk.
    let raw = Bytes::copy_from_slice(data);
    let _ = codec::decode_head(KEY, &raw);
    let _ = codec::decode_chunk(KEY, 0, 0, &raw);
    let _ = codec::decode_store_key(data);
    let mut fixed = data.to_vec();
    fix_crc(&mut fixed);
    let fixed = Bytes::from(fixed);
    if let Ok(head) = codec::decode_head(KEY, &fixed) {
        let again = codec::encode_head(
            KEY,
            &head.meta,
            head.generation,
            head.whole.as_deref(),
            head.chunk_size,
            head.chunks,
        );
        // A frame may be accepted with reserved bytes set; the rest must match.
        if let Ok(again) = again {
            assert_eq!(
                again.len(),
                fixed.len(),
                "a decoded head re-encodes to another length"
            );
        }
    }
    if let Some(gen_idx) = fixed.get(8..20) {
        let generation = u64::from_le_bytes(gen_idx[..8].try_into().expect("8 bytes"));
        let index = u32::from_le_bytes(gen_idx[8..].try_into().expect("4 bytes"));
        if let Ok(chunk) = codec::decode_chunk(KEY, generation, index, &fixed) {
            assert_eq!(
                codec::encode_chunk(KEY, generation, index, &chunk).len(),
                fixed.len(),
                "a decoded chunk re-encodes to another length"
            );
        }
    }

    // 2. An object to store: encode, then decode, must give it back.
    let mut i = Input(data);
    let key = {
        let k = i.string(64);
        if k.is_empty() { KEY.to_string() } else { k }
    };
    let status = u16::from(i.byte()) + 100;
    let t1 = UNIX_EPOCH + Duration::from_secs(i.u64() >> 30);
    let t2 = UNIX_EPOCH
        .checked_sub(Duration::from_nanos(i.u64()))
        .unwrap_or(UNIX_EPOCH);
    let n_headers = usize::from(i.byte() % 8);
    let headers = (0..n_headers)
        .map(|_| {
            let name = i.string(16);
            let n = usize::from(i.byte());
            (name, i.bytes(n))
        })
        .collect();
    let n_tags = usize::from(i.byte() % 4);
    let tags = (0..n_tags).map(|_| i.string(16)).collect();
    let generation = i.u64();
    let chunked = i.byte() & 1 == 1;
    let body = i.bytes(usize::MAX);
    let (whole, chunk_size, chunks, body_len) = if chunked {
        let chunk_size = u32::from(i.byte()) + 1;
        let len = body.len() as u64 + 1;
        let chunks = u32::try_from(len.div_ceil(u64::from(chunk_size))).expect("small");
        (None, chunk_size, chunks, len)
    } else {
        (Some(&body[..]), 0, 0, body.len() as u64)
    };
    let meta = ObjectMeta {
        status,
        headers,
        request_time: t1,
        response_time: t2,
        tags,
        body_len,
    };
    let Ok(frame) = codec::encode_head(&key, &meta, generation, whole, chunk_size, chunks) else {
        return;
    };
    let head = codec::decode_head(&key, &frame)
        .unwrap_or_else(|e| panic!("a head the storage wrote does not read back: {e}"));
    assert_eq!(head.meta, meta);
    assert_eq!(head.generation, generation);
    assert_eq!(head.whole.as_deref(), whole);
    assert_eq!((head.chunk_size, head.chunks), (chunk_size, chunks));
    if key != KEY {
        assert!(
            codec::decode_head(KEY, &frame).is_err(),
            "a head read under another key"
        );
    }
    let chunk = codec::encode_chunk(&key, generation, 7, &body);
    assert_eq!(
        codec::decode_chunk(&key, generation, 7, &chunk).as_deref(),
        Ok(&body[..])
    );
    assert!(codec::decode_chunk(&key, generation.wrapping_add(1), 7, &chunk).is_err());
    assert!(codec::decode_chunk(&key, generation, 8, &chunk).is_err());
});
