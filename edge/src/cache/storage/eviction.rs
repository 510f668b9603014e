//! The disk tier's block eviction order across a restart.
//!
//! foyer's block engine evicts whole blocks, first in first out: a block joins the queue when
//! its writing finishes. At open, though, foyer 0.22.6 registers the blocks it recovered from
//! a `HashSet`, in an arbitrary order (`BlockManager::init`), so after a restart on a full disk
//! it evicts recovered blocks at random: often the block written just before the restart first,
//! while blocks written many minutes earlier stay. The kill9 chaos scenario saw this as runs of
//! objects stored seconds before a restart missing just after it.
//!
//! [`RestartFifo`] is foyer's FIFO picker with the recovered blocks put in the order they were
//! filled. That order is read from the disk before foyer opens it ([`recovered_order`]): each
//! block's first blob index begins with the sequence number of the block's first entry, and
//! foyer fills blocks one after another, so the first sequence numbers order the blocks.

use std::{
    fs::File,
    io::Read,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use foyer::{EvictionInfo, EvictionPicker, FifoPicker};

/// foyer's block ids are `u32`.
type BlockId = u32;

/// Prefix of foyer's device files (`FsDevice`): `foyer-storage-direct-fs-NNNNNNNN`, one per
/// partition. With the tombstone log on, partition 0 is the log and block `i` is partition
/// `i + 1`.
const FILE_PREFIX: &str = "foyer-storage-direct-fs-";
/// A blob index: checksum `u64`, count `u32`, then entries of hash `u64`, sequence `u64`,
/// offset `u32`, length `u32`, all big-endian.
const FIRST_SEQUENCE_AT: usize = 8 + 4 + 8;

/// The first sequence number of each block in `foyer_dir`, by block id (`None` for a block
/// with no entry or that cannot be read). Blocks of the tombstone log's layout only: partition
/// 0 is the log, and every block file must be `block_size` long, or nothing is returned (an
/// unknown layout: foyer's own order stands).
pub(super) fn recovered_order(foyer_dir: &Path, block_size: u64) -> Vec<Option<u64>> {
    let Ok(dir) = std::fs::read_dir(foyer_dir) else {
        return Vec::new();
    };
    let mut parts: Vec<(u32, std::path::PathBuf)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(FILE_PREFIX)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    parts.sort_unstable_by_key(|(n, _)| *n);
    let numbered = parts.iter().enumerate().all(|(i, (n, _))| *n as usize == i);
    if !numbered || parts.len() < 2 {
        return Vec::new();
    }
    let mut order = Vec::with_capacity(parts.len() - 1);
    for (_, path) in &parts[1..] {
        let Ok(mut f) = File::open(path) else {
            return Vec::new();
        };
        if f.metadata().map(|m| m.len()).ok() != Some(block_size) {
            return Vec::new();
        }
        let mut head = [0u8; FIRST_SEQUENCE_AT + 8];
        let first = f.read_exact(&mut head).ok().and_then(|()| {
            let count = u32::from_be_bytes(head[8..12].try_into().ok()?);
            if count == 0 {
                return None;
            }
            Some(u64::from_be_bytes(
                head[FIRST_SEQUENCE_AT..].try_into().ok()?,
            ))
        });
        order.push(first);
    }
    order
}

/// foyer's [`FifoPicker`], except that the blocks registered while foyer opens (the recovered
/// ones) join the queue in the order they were filled (oldest first), before any block written
/// since.
#[derive(Debug)]
pub(super) struct RestartFifo {
    inner: FifoPicker,
    /// The first sequence number of each block found on disk, by block id.
    first_sequence: Vec<Option<u64>>,
    /// Set once foyer has opened: a block becoming evictable after that was just written.
    opened: Arc<AtomicBool>,
    /// Recovered blocks not handed to `inner` yet.
    recovered: Vec<BlockId>,
}

impl RestartFifo {
    /// A picker, and the flag to set once foyer has opened.
    pub(super) fn new(first_sequence: Vec<Option<u64>>) -> (Self, Arc<AtomicBool>) {
        let opened = Arc::new(AtomicBool::new(false));
        let picker = RestartFifo {
            inner: FifoPicker::default(),
            first_sequence,
            opened: opened.clone(),
            recovered: Vec::new(),
        };
        (picker, opened)
    }

    /// Hands the recovered blocks to the FIFO, oldest first (unknown ones first of all).
    fn release(&mut self, info: &EvictionInfo<'_>) {
        if self.recovered.is_empty() {
            return;
        }
        let mut blocks = std::mem::take(&mut self.recovered);
        blocks.sort_by_key(|&b| {
            let seq = self.first_sequence.get(b as usize).copied().flatten();
            (seq, b)
        });
        for b in blocks {
            self.inner.on_block_evictable(copy(info), b);
        }
    }
}

fn copy<'a>(info: &EvictionInfo<'a>) -> EvictionInfo<'a> {
    EvictionInfo {
        blocks: info.blocks,
        evictable: info.evictable,
        clean: info.clean,
    }
}

impl EvictionPicker for RestartFifo {
    fn init(&mut self, blocks: &[BlockId], block_size: usize) {
        self.inner.init(blocks, block_size);
    }

    fn pick(&mut self, info: EvictionInfo<'_>) -> Option<BlockId> {
        self.release(&info);
        self.inner.pick(info)
    }

    fn on_block_evictable(&mut self, info: EvictionInfo<'_>, block: BlockId) {
        if !self.opened.load(Ordering::Acquire) {
            self.recovered.push(block);
            return;
        }
        self.release(&info);
        self.inner.on_block_evictable(info, block);
    }

    fn on_block_evict(&mut self, info: EvictionInfo<'_>, block: BlockId) {
        self.release(&info);
        self.inner.on_block_evict(info, block);
    }
}
