//! The HTTP/1 framing guard (`edge/src/http/h1guard.rs`) that watches every
//! byte a client sends. The input is a byte stream and the sizes of the
//! reads it arrives in: the guard must never panic, and what it sees (heads
//! counted, ambiguous heads flagged, stepping aside) must not depend on how
//! the stream was split, as long as every head fits the size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_edge::http::h1guard::{H1Guard, Seen};

const MAX_HEAD: usize = 512;
const MAX_HEADERS: usize = 16;

fn run<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (H1Guard, Seen) {
    let mut g = H1Guard::new(MAX_HEAD, MAX_HEADERS);
    let mut all = Seen::default();
    for p in pieces {
        let mut seen = Seen::default();
        g.feed(p, &mut seen);
        all.flagged.extend(seen.flagged);
    }
    (g, all)
}

fuzz_target!(|data: &[u8]| {
    // First byte: the read size of the split run (1..=64).
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let split = usize::from(split % 64) + 1;
    let (whole, seen_whole) = run(std::iter::once(stream));
    let (pieces, seen_pieces) = run(stream.chunks(split));
    let (bytes, seen_bytes) = run(stream.chunks(1));
    // A head longer than the limit may be followed or not depending on where
    // reads end (hyper answers 431 to it anyway); compare only streams whose
    // every line is short enough that no head can pass the limit unseen.
    if stream.len() <= MAX_HEAD {
        for (g, s, how) in [
            (&pieces, &seen_pieces, "split"),
            (&bytes, &seen_bytes, "bytewise"),
        ] {
            assert_eq!(s, &seen_whole, "flags differ when fed {how}");
            assert_eq!(
                g.heads(),
                whole.heads(),
                "head count differs when fed {how}"
            );
            assert_eq!(
                g.is_passthrough(),
                whole.is_passthrough(),
                "passthrough differs when fed {how}"
            );
            assert_eq!(
                g.in_partial_head(),
                whole.in_partial_head(),
                "partial head differs when fed {how}"
            );
        }
    }
});
