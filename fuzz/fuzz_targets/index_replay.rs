//! Replay of the storage's index log (`edge/src/cache/storage/index.rs`),
//! which `Storage::open` reads from the disk after any crash. The input is a
//! log image after the magic. Replay must never panic, and:
//! - the valid prefix it keeps, replayed again, is entirely valid and gives
//!   the same index (so cutting the log there loses nothing more);
//! - the image a compaction writes replays to the same index;
//! - the index's lookups by tag, host and prefix agree with its entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_edge::cache::storage::fuzzing::{index_entries, replay_index};

const MAGIC: &[u8; 8] = b"MRDIDX\0\x01";

fuzz_target!(|data: &[u8]| {
    let mut image = MAGIC.to_vec();
    image.extend_from_slice(data);
    let (index, valid, snapshot) = replay_index(&image).expect("the magic is there");
    assert!(valid >= MAGIC.len() && valid <= image.len());
    let entries = index_entries(&index);
    assert_eq!(entries.len(), index.len());

    let (again, valid_again, _) = replay_index(&image[..valid]).expect("magic");
    assert_eq!(valid_again, valid, "the kept prefix is not wholly valid");
    assert_eq!(
        index_entries(&again),
        entries,
        "the kept prefix replays differently"
    );

    let (compacted, valid_c, _) = replay_index(&snapshot).expect("magic");
    assert_eq!(
        valid_c,
        snapshot.len(),
        "a compacted log is not wholly valid"
    );
    assert_eq!(
        index_entries(&compacted),
        entries,
        "a compacted log replays differently"
    );

    for (key, host, tags, _, _) in &entries {
        assert!(index.contains(key));
        assert!(index.keys_for_host(host).contains(key) || host.to_ascii_lowercase() != *host);
        for t in tags {
            assert!(
                index.keys_for_tag(t).contains(key),
                "tag {t:?} lost {key:?}"
            );
        }
        assert!(index.keys_with_prefix(key).contains(key));
    }
});
