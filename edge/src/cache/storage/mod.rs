//! Cache storage layer of the Meridian edge: objects (metadata + body) in a foyer
//! [`HybridCache`] (memory + disk), plus a persistent [`PurgeIndex`] for purge by tag, URL
//! prefix and host.
//!
//! # Layout of an object in foyer
//! * A **head** entry, keyed by the object key, holds a checksummed frame with the metadata and
//!   either the whole body (bodies up to `chunk_size`) or the chunk layout
//!   (`chunk_size`, `chunks`) and the object's **generation**.
//! * A large body is stored as `chunks` **chunk** entries keyed by `(key, generation, index)`,
//!   each holding at most `chunk_size` bytes. A new version of an object gets a new generation, so
//!   its chunks can never mix with an older version's.
//!
//! The [`ObjectWriter`] inserts chunks as they fill and the head last; the [`PurgeIndex`] is
//! updated after the head. The index is the authority on existence: a head whose key is not
//! indexed, or whose generation is not the indexed one, is a miss. This is what makes a purge
//! durable even if foyer's own tombstone did not reach the disk before a crash.
//!
//! # Disk engine sizing
//! foyer's block engine stores an entry inside one block, and a flusher stages entries in an IO
//! buffer: an entry larger than `block_size - blob_index_size (4 KiB)` or than the IO buffer is
//! silently not written. The largest entry we produce is
//! [`max_entry_size`]`(chunk_size)` = `chunk_size` + [`MAX_META_LEN`] + 2 × [`MAX_KEY_LEN`] + 16 KiB
//! slack (frame headers, foyer's entry header and key encoding), so:
//! * `block_size` = `disk_block_size` if set, else the largest of 16 MiB (foyer's default) and
//!   4 × the max entry, reduced to `disk_capacity / 8` (never below one max entry + 4 KiB) so
//!   small disks still get several blocks; `open` fails if a block cannot hold a max entry or the
//!   disk holds fewer than 4 blocks;
//! * the flush buffer pool is max(16 MiB, 2 × max entry), and the submit queue limit 4 × that.
//!   foyer drops (does not write) entries when the submit queue is over its limit; writers
//!   (chunks and heads) wait for the disk flushers once more than half that limit is unflushed.
//!
//! With the default 1 MiB chunks the max entry is about 1.2 MiB and blocks are 16 MiB.
//!
//! # A full filesystem
//! foyer's files are preallocated at open so that a filling filesystem cannot fail foyer's
//! writes; where that is impossible, entries stay in memory only while the free space is short.
//! See the `space` module.
//!
//! # A failing disk
//! foyer-storage is vendored with a fix (`vendor/foyer-storage/MERIDIAN-PATCH.md`): a failed
//! write no longer stops its flusher. The entries of a failed write, or behind a failed read,
//! are misses. Every IO error is counted and logged (at most once per 10 s) by the `io` module's
//! wrapper of foyer's IO engine.

mod codec;
mod error;
mod eviction;
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod io;
mod space;
mod writer;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::{
    hash::BuildHasher,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, FifoConfig, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, HybridCacheProperties, InvalidRatioPicker, LfuConfig, Location, LruConfig,
    RecoverMode, S3FifoConfig, SieveConfig, Source,
};

use self::space::{DiskHealth, SpaceGuard};

use self::codec::{Corrupt, HeadBody, HeadBodyRef, StoreKey};
pub use self::{
    error::StorageError,
    index::{
        COMPACT_MIN_BYTES, COMPACT_RATIO, FLUSH_INTERVAL, MAX_MARK_SELECTORS, PurgeIndex,
        PurgeMatch, PurgeSelectors, host_of_key,
    },
    writer::ObjectWriter,
};

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 8 * 1024;
/// Longest accepted host (as derived from the key), in bytes.
pub const MAX_HOST_LEN: usize = 255;
/// Most surrogate keys per object.
pub const MAX_TAGS: usize = 64;
/// Longest surrogate key, in bytes.
pub const MAX_TAG_LEN: usize = 256;
/// Most header fields per object.
pub const MAX_HEADERS: usize = 256;
/// Longest header field value, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 64 * 1024;
/// Largest encoded metadata (status, times, headers, tags), in bytes.
pub const MAX_META_LEN: usize = 128 * 1024;
/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

const KEY_STRIPES: usize = 64;
const PAGE: u64 = 4096;

/// The largest foyer entry (key + value) the storage writes for a given chunk size.
pub const fn max_entry_size(chunk_size: u32) -> u64 {
    chunk_size as u64 + MAX_META_LEN as u64 + 2 * MAX_KEY_LEN as u64 + 16 * 1024
}

const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Which tier served a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The in-memory cache.
    Memory,
    /// The disk cache (the entry is promoted to memory by foyer).
    Disk,
}

impl Tier {
    /// The tier's metric label.
    pub fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// What is stored about an object besides its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Response status code.
    pub status: u16,
    /// Response header fields in order (names lowercase).
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the request that produced the response was sent.
    pub request_time: SystemTime,
    /// When the response was received.
    pub response_time: SystemTime,
    /// Surrogate keys.
    pub tags: Vec<String>,
    /// Body length; set by the storage from the bytes actually written.
    pub body_len: u64,
}

/// The body of a hit.
#[derive(Clone, Debug)]
pub enum HitBody {
    /// Small objects: the whole body, served from memory without copying.
    Whole(Bytes),
    /// Large objects: stored in fixed-size chunks, read one at a time with
    /// [`Storage::get_chunk`]. Every chunk but the last is exactly `chunk_size` bytes.
    Chunked {
        /// Bytes per chunk.
        chunk_size: u32,
        /// Number of chunks.
        chunks: u32,
        /// The object version the chunks belong to.
        generation: u64,
    },
}

/// A cache hit.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The stored metadata.
    pub meta: ObjectMeta,
    /// The body, or how to read it.
    pub body: HitBody,
    /// Which tier served the head.
    pub tier: Tier,
    /// The version of the object (unique per `finish`, kept by `update_meta`).
    pub generation: u64,
}

/// In-memory eviction policy (foyer's implementations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryEviction {
    /// First in, first out.
    Fifo,
    /// S3-FIFO.
    S3Fifo,
    /// Least recently used.
    Lru,
    /// w-TinyLFU.
    Lfu,
    /// SIEVE.
    Sieve,
}

/// Storage configuration.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Memory tier capacity, bytes (keys + encoded values).
    pub memory_capacity: u64,
    /// Directory of the disk tier and the index log; `None` = memory only.
    pub disk_dir: Option<PathBuf>,
    /// Disk tier capacity, bytes (foyer's files, including its tombstone log).
    pub disk_capacity: u64,
    /// Objects larger than this are chunked (default 1 MiB).
    pub chunk_size: u32,
    /// Larger objects are not stored at all.
    pub max_object_size: u64,
    /// Memory eviction policy; `None` = foyer's default (LRU in foyer 0.22.6).
    pub memory_eviction: Option<MemoryEviction>,
    /// foyer block size; `None` = derived from `chunk_size` and `disk_capacity` (see module docs).
    pub disk_block_size: Option<u64>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            memory_capacity: 256 * 1024 * 1024,
            disk_dir: None,
            disk_capacity: 4 * 1024 * 1024 * 1024,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_object_size: 1024 * 1024 * 1024,
            memory_eviction: None,
            disk_block_size: None,
        }
    }
}

/// Counters and occupancy.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct StorageStats {
    /// Bytes used in the memory tier.
    pub memory_used: u64,
    /// Memory tier capacity.
    pub memory_capacity: u64,
    /// Disk tier capacity (0 without disk).
    pub disk_capacity: u64,
    /// foyer block size in use (0 without disk).
    pub disk_block_size: u64,
    /// Bytes written to / read from the disk device since open.
    pub disk_write_bytes: u64,
    /// See `disk_write_bytes`.
    pub disk_read_bytes: u64,
    /// Write IOs since open.
    pub disk_write_ios: u64,
    /// Read IOs since open.
    pub disk_read_ios: u64,
    /// Keys in the purge index.
    pub entries: u64,
    /// Head hits served by memory.
    pub hits_memory: u64,
    /// Head hits served by disk.
    pub hits_disk: u64,
    /// Head misses.
    pub misses: u64,
    /// Heads found whose generation is not the indexed one (treated as misses).
    pub stale_heads: u64,
    /// Chunk reads that found nothing.
    pub chunk_misses: u64,
    /// Entries that failed to decode or verify (treated as misses and removed).
    pub corrupt_entries: u64,
    /// Objects committed by `finish`.
    pub objects_written: u64,
    /// Writers dropped or failed before `finish`.
    pub writes_aborted: u64,
    /// Writers aborted by `max_object_size`.
    pub too_large: u64,
    /// Mean latency of reads served by the disk tier.
    pub disk_read_latency_avg: Option<Duration>,
    /// Mean time spent waiting for foyer's disk flushers (writer back-pressure, remove, flush).
    pub disk_flush_wait_avg: Option<Duration>,
    /// Errors of the storage's own disk writes (index log, preallocation), e.g. a full disk.
    pub disk_errors: u64,
    /// Entries kept in memory only because the disk tier's filesystem was short of space.
    pub disk_writes_skipped: u64,
    /// Whether foyer's files are preallocated (writes cannot fail for want of space).
    pub disk_preallocated: bool,
    /// Whether new entries go to the disk now (false while short of space).
    pub disk_admitting: bool,
}

#[derive(Default)]
struct Counters {
    hits_memory: AtomicU64,
    hits_disk: AtomicU64,
    misses: AtomicU64,
    stale_heads: AtomicU64,
    chunk_misses: AtomicU64,
    corrupt: AtomicU64,
    objects_written: AtomicU64,
    writes_aborted: AtomicU64,
    too_large: AtomicU64,
    disk_reads: AtomicU64,
    disk_read_nanos: AtomicU64,
    flush_waits: AtomicU64,
    flush_wait_nanos: AtomicU64,
}

fn avg(nanos: &AtomicU64, count: &AtomicU64) -> Option<Duration> {
    let n = count.load(Ordering::Relaxed);
    (n > 0).then(|| Duration::from_nanos(nanos.load(Ordering::Relaxed) / n))
}

struct Inner {
    cache: HybridCache<StoreKey, Bytes>,
    index: PurgeIndex,
    chunk_size: u32,
    max_object_size: u64,
    has_disk: bool,
    disk_capacity: u64,
    block_size: u64,
    memory_capacity: u64,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    stripe_hasher: std::collections::hash_map::RandomState,
    next_generation: AtomicU64,
    counters: Counters,
    unflushed: AtomicU64,
    backpressure_bytes: u64,
    closed: AtomicBool,
    flusher: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A batched sync of lazy removals is scheduled.
    sync_scheduled: AtomicBool,
    /// Disk errors and entries kept in memory for want of space.
    health: Arc<DiskHealth>,
    /// The disk tier's space guard (`None` without disk).
    space: Option<Arc<SpaceGuard>>,
    /// The guard's periodic check, while foyer's files are not preallocated.
    space_task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held across every foyer call that takes a disk sequence number (an insert queued for
    /// the disk, a removal). foyer 0.22.6 takes the number and then sends the entry to its
    /// flusher in two steps, so two concurrent inserts can reach a block in the opposite
    /// order of their numbers; on recovery foyer reads a block only up to the first entry
    /// whose number goes down, and loses the rest of the block (up to `block_size` of
    /// objects, written seconds before a crash). Under this lock numbers reach the flushers
    /// in order.
    disk_order: parking_lot::Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.flusher.lock().take() {
            h.abort();
        }
        if let Some(h) = self.space_task.lock().take() {
            h.abort();
        }
    }
}

/// The cache storage. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl Storage {
    /// The largest object stored; larger ones stream through uncached.
    pub fn max_object_size(&self) -> u64 {
        self.inner.max_object_size
    }

    /// The size of the chunks large objects are stored in.
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.inner.chunk_size)
    }

    /// Whether the disk tier is configured.
    pub fn has_disk(&self) -> bool {
        self.inner.has_disk
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("has_disk", &self.inner.has_disk)
            .field("chunk_size", &self.inner.chunk_size)
            .field("entries", &self.inner.index.len())
            .finish()
    }
}

struct DiskPlan {
    block_size: u64,
    buffer_pool: u64,
    submit_queue: u64,
}

fn plan_disk(cfg: &StorageConfig) -> Result<DiskPlan, StorageError> {
    let entry = max_entry_size(cfg.chunk_size);
    let min_block = align_up(entry + PAGE, PAGE);
    let block_size = match cfg.disk_block_size {
        Some(b) => align_up(b, PAGE),
        None => {
            let want = align_up((4 * entry).max(16 * 1024 * 1024), PAGE);
            want.min(cfg.disk_capacity / 8 / PAGE * PAGE).max(min_block)
        }
    };
    if block_size < min_block {
        return Err(StorageError::InvalidConfig(format!(
            "disk_block_size {block_size} cannot hold a chunk entry of up to {entry} bytes (need >= {min_block})"
        )));
    }
    if cfg.disk_capacity < 4 * block_size + 1024 * 1024 {
        return Err(StorageError::InvalidConfig(format!(
            "disk_capacity {} holds fewer than 4 blocks of {block_size} bytes",
            cfg.disk_capacity
        )));
    }
    let buffer_pool = align_up((2 * entry).max(16 * 1024 * 1024), PAGE);
    Ok(DiskPlan {
        block_size,
        buffer_pool,
        submit_queue: 4 * buffer_pool,
    })
}

impl Storage {
    /// Opens the storage; with a disk directory, recovers foyer's disk tier (in `disk_dir/foyer`)
    /// and replays the purge index log (`disk_dir/index.log`).
    pub async fn open(cfg: StorageConfig) -> Result<Storage, StorageError> {
        Self::open_with(cfg, io::CountingIoEngineConfig::new).await
    }

    /// [`Storage::open`], with write faults injected into the disk tier.
    #[cfg(test)]
    async fn open_with_faults(
        cfg: StorageConfig,
        faults: Arc<io::faults::WriteFaults>,
    ) -> Result<Storage, StorageError> {
        Self::open_with(cfg, |h| {
            io::CountingIoEngineConfig::new(h).with_faults(Some(faults))
        })
        .await
    }

    async fn open_with(
        cfg: StorageConfig,
        io_engine: impl FnOnce(Arc<DiskHealth>) -> io::CountingIoEngineConfig,
    ) -> Result<Storage, StorageError> {
        if cfg.chunk_size == 0 || cfg.chunk_size > 64 * 1024 * 1024 {
            return Err(StorageError::InvalidConfig(
                "chunk_size must be in 1..=64 MiB".into(),
            ));
        }
        if cfg.memory_capacity == 0 {
            return Err(StorageError::InvalidConfig(
                "memory_capacity must be > 0".into(),
            ));
        }
        let memory_capacity = usize::try_from(cfg.memory_capacity)
            .map_err(|_| StorageError::InvalidConfig("memory_capacity too large".into()))?;

        let mut builder = HybridCacheBuilder::<StoreKey, Bytes>::new()
            .with_name("meridian-cache")
            // Entries reach the disk when inserted, so they survive a restart or kill -9.
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            // Everything in memory was already enqueued for disk at insertion.
            .with_flush_on_close(false)
            .memory(memory_capacity)
            .with_weighter(|k: &StoreKey, v: &Bytes| foyer::Code::estimated_size(k) + v.len());
        builder = match cfg.memory_eviction {
            None => builder,
            Some(MemoryEviction::Fifo) => builder.with_eviction_config(FifoConfig::default()),
            Some(MemoryEviction::S3Fifo) => builder.with_eviction_config(S3FifoConfig::default()),
            Some(MemoryEviction::Lru) => builder.with_eviction_config(LruConfig::default()),
            Some(MemoryEviction::Lfu) => builder.with_eviction_config(LfuConfig::default()),
            Some(MemoryEviction::Sieve) => builder.with_eviction_config(SieveConfig),
        };
        let mut storage = builder.storage();

        let health = Arc::new(DiskHealth::default());
        let mut opened = None;
        let (index, block_size, submit_queue, space) = match &cfg.disk_dir {
            Some(dir) => {
                let plan = plan_disk(&cfg)?;
                let capacity = usize::try_from(cfg.disk_capacity)
                    .map_err(|_| StorageError::InvalidConfig("disk_capacity too large".into()))?;
                let foyer_dir = dir.join("foyer");
                tokio::fs::create_dir_all(&foyer_dir).await?;
                let index = PurgeIndex::open(dir.join("index.log")).await?;
                // The order the blocks on disk were filled in, read before foyer opens them.
                let (d, b) = (foyer_dir.clone(), plan.block_size);
                let order =
                    tokio::task::spawn_blocking(move || eviction::recovered_order(&d, b)).await?;
                let (picker, flag) = eviction::RestartFifo::new(order);
                opened = Some(flag);
                let device = FsDeviceBuilder::new(&foyer_dir)
                    .with_capacity(capacity)
                    .build()?;
                storage = storage
                    .with_io_engine_config(Box::new(io_engine(health.clone()))
                        as Box<dyn foyer_storage::IoEngineConfig>)
                    .with_engine_config(
                        BlockEngineConfig::new(device)
                            .with_block_size(plan.block_size as usize)
                            .with_buffer_pool_size(plan.buffer_pool as usize)
                            .with_submit_queue_size_threshold(plan.submit_queue as usize)
                            // Removals must survive a restart.
                            .with_tombstone_log(true)
                            // foyer's default pickers, but recovered blocks leave oldest first.
                            .with_eviction_pickers(vec![
                                Box::new(InvalidRatioPicker::new(0.8)),
                                Box::new(picker),
                            ]),
                    )
                    .with_recover_mode(RecoverMode::Quiet);
                // The most foyer writes between two checks: the back-pressure bound (half the
                // submit queue) plus its two IO buffers.
                let margin = plan.submit_queue / 2 + 2 * plan.buffer_pool;
                let guard = Arc::new(SpaceGuard::new(foyer_dir, margin));
                (index, plan.block_size, plan.submit_queue, Some(guard))
            }
            None => (PurgeIndex::in_memory(), 0, 0, None),
        };
        let cache = storage.build().await?;
        if let Some(flag) = opened {
            // Recovery is over: blocks becoming evictable from now on were just written.
            flag.store(true, Ordering::Release);
        }
        if let Some(guard) = &space {
            // foyer has created its files: allocate them before the first write.
            let (g, h) = (guard.clone(), health.clone());
            let found = tokio::task::spawn_blocking(move || g.check(&h)).await?;
            if !guard.is_allocated() {
                tracing::warn!(
                    ?found,
                    "disk tier: its files could not be preallocated; guarding disk writes by the free space"
                );
            }
        }

        let now_nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2));
        let next_generation = now_nanos
            .max(index.max_generation().saturating_add(1))
            .max(index.max_marker_bound())
            .max(1);

        let flusher = index.spawn_flusher(health.clone());
        let inner = Inner {
            cache,
            index,
            chunk_size: cfg.chunk_size,
            max_object_size: cfg.max_object_size,
            has_disk: cfg.disk_dir.is_some(),
            disk_capacity: if cfg.disk_dir.is_some() {
                cfg.disk_capacity
            } else {
                0
            },
            block_size,
            memory_capacity: cfg.memory_capacity,
            stripes: (0..KEY_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            stripe_hasher: Default::default(),
            next_generation: AtomicU64::new(next_generation),
            counters: Counters::default(),
            unflushed: AtomicU64::new(0),
            backpressure_bytes: submit_queue / 2,
            closed: AtomicBool::new(false),
            flusher: parking_lot::Mutex::new(flusher),
            sync_scheduled: AtomicBool::new(false),
            health,
            space,
            space_task: parking_lot::Mutex::new(None),
            disk_order: parking_lot::Mutex::new(()),
        };
        let storage = Storage {
            inner: Arc::new(inner),
        };
        storage.spawn_space_task();
        Ok(storage)
    }

    /// While foyer's files are not preallocated, checks the free space every
    /// [`space::CHECK_INTERVAL`] (retrying the preallocation); ends once they are, or when the
    /// storage is closed or dropped.
    fn spawn_space_task(&self) {
        let Some(guard) = self.inner.space.clone() else {
            return;
        };
        if guard.is_allocated() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(space::CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            while !guard.is_allocated() {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Acquire) {
                    break;
                }
                let (g, h) = (guard.clone(), inner.health.clone());
                drop(inner);
                if let Err(e) = tokio::task::spawn_blocking(move || g.check(&h)).await {
                    tracing::warn!(error = %e, "disk tier: space check failed");
                }
            }
        });
        *self.inner.space_task.lock() = Some(task);
    }

    fn check_open(&self) -> Result<(), StorageError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    async fn lock_key(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let h = self.inner.stripe_hasher.hash_one(key) as usize;
        self.inner.stripes[h % self.inner.stripes.len()]
            .lock()
            .await
    }

    fn record_disk_read(&self, start: Instant) {
        let c = &self.inner.counters;
        c.disk_reads.fetch_add(1, Ordering::Relaxed);
        c.disk_read_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Waits until everything enqueued for disk so far has been written by foyer's flushers.
    async fn wait_disk(&self) {
        if !self.inner.has_disk {
            return;
        }
        let start = Instant::now();
        self.inner.unflushed.store(0, Ordering::Relaxed);
        self.inner.cache.storage().wait().await;
        let c = &self.inner.counters;
        c.flush_waits.fetch_add(1, Ordering::Relaxed);
        c.flush_wait_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Inserts an encoded entry into memory, and queues it for the disk unless the disk
    /// tier's filesystem is short of space (then it stays in memory only). Returns the bytes
    /// queued for the disk, for [`Self::backpressure`].
    fn insert_entry(&self, key: StoreKey, frame: Bytes) -> u64 {
        let len = frame.len() as u64;
        match &self.inner.space {
            Some(guard) if !guard.admits() => {
                self.inner.health.skipped();
                let memory_only = HybridCacheProperties::default().with_location(Location::InMem);
                self.inner
                    .cache
                    .insert_with_properties(key, frame, memory_only);
                0
            }
            Some(_) => {
                let _order = self.inner.disk_order.lock();
                self.inner.cache.insert(key, frame);
                len
            }
            None => {
                self.inner.cache.insert(key, frame);
                0
            }
        }
    }

    /// Waits for foyer's flushers once more than the back-pressure bound is queued.
    async fn backpressure(&self, queued: u64) {
        if queued == 0 {
            return;
        }
        let pending = self.inner.unflushed.fetch_add(queued, Ordering::Relaxed) + queued;
        if pending > self.inner.backpressure_bytes {
            self.wait_disk().await;
        }
    }

    /// Inserts an encoded entry (memory, and disk on insertion), applying back-pressure.
    async fn put_entry(&self, key: StoreKey, frame: Bytes) {
        let queued = self.insert_entry(key, frame);
        self.backpressure(queued).await;
    }

    /// Removes an entry from memory and disk (foyer writes a tombstone), in disk order.
    fn remove_entry(&self, key: &StoreKey) {
        let _order = self.inner.disk_order.lock();
        self.inner.cache.remove(key);
    }

    fn drop_corrupt(&self, what: &StoreKey, why: Corrupt) {
        self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = ?what, reason = why.0, "corrupt cache entry; treating as a miss and removing it");
        self.remove_entry(what);
    }

    /// Sets the space guard's verdict as a check finding the filesystem short of space (or
    /// not) would (tests only).
    #[cfg(test)]
    pub(crate) fn force_disk_admission(&self, admit: bool) {
        if let Some(g) = &self.inner.space {
            g.force_admission(admit);
        }
    }

    /// Drops one chunk, as an eviction or a failed write would (tests only).
    #[cfg(test)]
    pub(crate) fn lose_chunk(&self, key: &str, generation: u64, index: u32) {
        self.remove_entry(&StoreKey::Chunk {
            key: key.to_owned(),
            generation,
            index,
        });
    }

    fn remove_chunks(&self, key: &str, generation: u64, chunks: u32) {
        for index in 0..chunks {
            self.remove_entry(&StoreKey::Chunk {
                key: key.to_owned(),
                generation,
                index,
            });
        }
    }

    /// Looks up an object. A corrupt, torn, stale or unindexed entry is a miss (`Ok(None)`).
    pub async fn get(&self, key: &str) -> Result<Option<Hit>, StorageError> {
        self.check_open()?;
        let c = &self.inner.counters;
        let Some(expected) = self.inner.index.generation_of(key) else {
            c.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let start = Instant::now();
        let skey = StoreKey::Head(key.to_owned());
        let Some(entry) = self.inner.cache.get(&skey).await? else {
            c.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let tier = match entry.source() {
            Source::Disk => {
                self.record_disk_read(start);
                Tier::Disk
            }
            _ => Tier::Memory,
        };
        let head = match codec::decode_head(key, entry.value()) {
            Ok(h) => h,
            Err(why) => {
                drop(entry);
                self.drop_corrupt(&skey, why);
                c.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
        };
        if head.generation != expected {
            c.stale_heads.fetch_add(1, Ordering::Relaxed);
            c.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match tier {
            Tier::Memory => c.hits_memory.fetch_add(1, Ordering::Relaxed),
            Tier::Disk => c.hits_disk.fetch_add(1, Ordering::Relaxed),
        };
        let body = match head.body {
            HeadBody::Whole(b) => HitBody::Whole(b),
            HeadBody::Chunked { chunk_size, chunks } => HitBody::Chunked {
                chunk_size,
                chunks,
                generation: head.generation,
            },
        };
        Ok(Some(Hit {
            meta: head.meta,
            body,
            tier,
            generation: head.generation,
        }))
    }

    /// Reads chunk `index` of version `generation` of `key`. `Ok(None)` if it is gone (evicted,
    /// dropped under disk pressure, purged) or corrupt: the caller must then abandon the body.
    pub async fn get_chunk(
        &self,
        key: &str,
        generation: u64,
        index: u32,
    ) -> Result<Option<Bytes>, StorageError> {
        self.check_open()?;
        let skey = StoreKey::Chunk {
            key: key.to_owned(),
            generation,
            index,
        };
        let start = Instant::now();
        let Some(entry) = self.inner.cache.get(&skey).await? else {
            self.inner
                .counters
                .chunk_misses
                .fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        if entry.source() == Source::Disk {
            self.record_disk_read(start);
        }
        match codec::decode_chunk(key, generation, index, entry.value()) {
            Ok(data) => Ok(Some(data)),
            Err(why) => {
                drop(entry);
                self.drop_corrupt(&skey, why);
                self.inner
                    .counters
                    .chunk_misses
                    .fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Starts writing a new version of `key`. Nothing is visible until [`ObjectWriter::finish`].
    pub fn writer(&self, key: &str) -> ObjectWriter {
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        ObjectWriter::new(self.clone(), key.to_owned(), generation)
    }

    /// Replaces the metadata of a stored object (e.g. after a 304 merge); the body is untouched
    /// and `meta.body_len` is ignored. Returns `false` if the object is not stored.
    pub async fn update_meta(&self, key: &str, meta: ObjectMeta) -> Result<bool, StorageError> {
        self.update_meta_inner(key, None, meta).await
    }

    /// Like [`Self::update_meta`], but only if the stored version is `generation` (from
    /// [`Hit::generation`]): a revalidation of an old version never rewrites a newer one.
    pub async fn update_meta_if(
        &self,
        key: &str,
        generation: u64,
        meta: ObjectMeta,
    ) -> Result<bool, StorageError> {
        self.update_meta_inner(key, Some(generation), meta).await
    }

    async fn update_meta_inner(
        &self,
        key: &str,
        generation: Option<u64>,
        mut meta: ObjectMeta,
    ) -> Result<bool, StorageError> {
        self.check_open()?;
        let meta_len = codec::validate_meta(&meta).map_err(StorageError::InvalidMeta)?;
        let host = host_of_key(key);
        let _guard = self.lock_key(key).await;
        let Some(indexed) = self.inner.index.lookup(key) else {
            return Ok(false);
        };
        if generation.is_some_and(|g| g != indexed.generation) {
            return Ok(false);
        }
        let skey = StoreKey::Head(key.to_owned());
        let Some(entry) = self.inner.cache.get(&skey).await? else {
            return Ok(false);
        };
        let head = match codec::decode_head(key, entry.value()) {
            Ok(h) => h,
            Err(why) => {
                drop(entry);
                self.drop_corrupt(&skey, why);
                return Ok(false);
            }
        };
        if head.generation != indexed.generation {
            return Ok(false);
        }
        meta.body_len = head.meta.body_len;
        let frame = match &head.body {
            HeadBody::Whole(b) => codec::encode_head(
                key,
                &meta,
                head.generation,
                &HeadBodyRef::Whole(b),
                meta_len,
            ),
            HeadBody::Chunked { chunk_size, chunks } => codec::encode_head(
                key,
                &meta,
                head.generation,
                &HeadBodyRef::Chunked {
                    chunk_size: *chunk_size,
                    chunks: *chunks,
                },
                meta_len,
            ),
        };
        drop(entry);
        let inserted = self.inner.index.insert_object(
            key,
            &host,
            &meta.tags,
            head.generation,
            indexed.chunks,
        )?;
        if inserted.purged {
            // A purge marker written meanwhile kills this version: drop it instead.
            self.remove_entry(&skey);
            self.remove_chunks(key, head.generation, indexed.chunks);
            return Ok(false);
        }
        self.put_entry(skey, frame).await;
        Ok(true)
    }

    /// Removes an object from both tiers and the index. When this returns the object is a miss,
    /// the index record is on disk (fdatasync) and foyer has written its tombstone, so the
    /// removal survives a restart or a crash. Returns whether the object was stored.
    pub async fn remove(&self, key: &str) -> Result<bool, StorageError> {
        let removed = self.remove_no_sync(key).await?;
        self.sync_removals().await?;
        Ok(removed)
    }

    /// Removes many objects with one sync at the end (purge by tag / prefix / host).
    /// Returns how many were stored.
    pub async fn remove_many<I, S>(&self, keys: I) -> Result<usize, StorageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let n = self.remove_all_no_sync(keys).await?;
        self.sync_removals().await?;
        Ok(n)
    }

    async fn remove_all_no_sync<I, S>(&self, keys: I) -> Result<usize, StorageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut n = 0;
        for k in keys {
            if self.remove_no_sync(k.as_ref()).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn remove_no_sync(&self, key: &str) -> Result<bool, StorageError> {
        self.check_open()?;
        let skey = StoreKey::Head(key.to_owned());
        let _guard = self.lock_key(key).await;
        let old = self.inner.index.remove_object(key);
        let present = self.inner.cache.contains(&skey);
        self.remove_entry(&skey);
        if let Some(old) = &old {
            self.remove_chunks(key, old.generation, old.chunks);
        }
        Ok(old.is_some() || present)
    }

    /// Removes objects at once (they are misses when this returns) without
    /// a sync of their own: one sync, shortly after, makes every removal of
    /// that moment durable together. For invalidations (RFC 9111 §4.4), which
    /// are many and small, and need not survive a crash of the next 50 ms.
    pub async fn remove_lazy<I, S>(&self, keys: I) -> Result<usize, StorageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let n = self.remove_all_no_sync(keys).await?;
        if n > 0 {
            self.schedule_sync();
        }
        Ok(n)
    }

    /// Removes `key` if its stored version is still `generation` (a version
    /// found broken: a lost or torn chunk), so it is never served again.
    pub async fn remove_version(&self, key: &str, generation: u64) -> Result<bool, StorageError> {
        if self.inner.index.generation_of(key) != Some(generation) {
            return Ok(false);
        }
        let removed = self.remove_no_sync(key).await?;
        if removed {
            self.schedule_sync();
        }
        Ok(removed)
    }

    fn schedule_sync(&self) {
        if self.inner.sync_scheduled.swap(true, Ordering::AcqRel) {
            return; // one is already on its way
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            this.inner.sync_scheduled.store(false, Ordering::Release);
            if this.check_open().is_ok()
                && let Err(e) = this.sync_removals().await
            {
                this.inner.health.error("syncing removals failed", &e);
            }
        });
    }

    async fn sync_removals(&self) -> Result<(), StorageError> {
        self.inner.index.sync(true).await?;
        self.wait_disk().await;
        Ok(())
    }

    /// Writes a purge marker for `sel`: from when this returns, every object it matches that was
    /// stored (or whose fetch began) before the call is a miss, and stays one across a crash or
    /// restart — the marker record is synced once, whatever the number of objects. Returns the
    /// marker's id (a generation: also the bound below which objects are killed) and the objects
    /// it matched, which the caller removes with [`Self::remove_purged`] and then
    /// [`Self::retire_purge`].
    pub async fn mark_purge(
        &self,
        sel: &PurgeSelectors,
    ) -> Result<(u64, PurgeMatch), StorageError> {
        self.check_open()?;
        let id = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let matched = self.inner.index.mark(id, id, sel)?;
        if let Err(e) = self.inner.index.sync(true).await {
            // Not durable: undo, so that the caller's error is the whole truth.
            self.inner.index.retire(id);
            return Err(e);
        }
        Ok((id, matched))
    }

    /// A fresh id, from the same sequence as generations and purge markers.
    pub fn next_id(&self) -> u64 {
        self.inner.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes `key` if its stored version is older than generation `below` (a purge marker's
    /// bound), without a sync of its own: the marker already makes the removal durable.
    pub async fn remove_purged(&self, key: &str, below: u64) -> Result<bool, StorageError> {
        self.check_open()?;
        let _guard = self.lock_key(key).await;
        if self
            .inner
            .index
            .raw_generation_of(key)
            .is_none_or(|g| g >= below)
        {
            return Ok(false);
        }
        let skey = StoreKey::Head(key.to_owned());
        if let Some(old) = self.inner.index.remove_object(key) {
            self.remove_entry(&skey);
            self.remove_chunks(key, old.generation, old.chunks);
            return Ok(true);
        }
        Ok(false)
    }

    /// Ends purge `id` once [`Self::remove_purged`] was called for each of its keys: drops the
    /// marker and syncs the index log (its removals, then the retirement) and foyer's queue.
    pub async fn retire_purge(&self, id: u64) -> Result<(), StorageError> {
        self.check_open()?;
        self.inner.index.retire(id);
        self.inner.index.sync(true).await?;
        self.wait_disk().await;
        Ok(())
    }

    /// Purge markers still active: `(id, selectors)`. After an open, these are purges that had
    /// not finished; [`PurgeIndex::marker_matches`] gives what each still has to remove.
    pub fn pending_purges(&self) -> Vec<(u64, PurgeSelectors)> {
        self.inner
            .index
            .markers()
            .into_iter()
            .map(|(id, _, sel)| (id, sel))
            .collect()
    }

    /// Drops index entries whose head is in neither tier any more (evicted by foyer, which does
    /// not report disk evictions). Checks only in-memory structures of foyer (no disk reads).
    /// Meant to be run periodically by the owner; returns how many entries were dropped.
    pub async fn sweep_index(&self) -> Result<usize, StorageError> {
        self.check_open()?;
        let mut dropped = 0;
        for (key, generation) in self.inner.index.keys_and_generations() {
            let skey = StoreKey::Head(key);
            let present = self.inner.cache.memory().contains(&skey)
                || (self.inner.has_disk && self.inner.cache.storage().may_contains(&skey));
            if present {
                continue;
            }
            let StoreKey::Head(key) = skey else { continue };
            let _guard = self.lock_key(&key).await;
            if self.inner.index.generation_of(&key) != Some(generation) {
                continue; // rewritten meanwhile
            }
            let head = StoreKey::Head(key.clone());
            if self.inner.cache.memory().contains(&head)
                || (self.inner.has_disk && self.inner.cache.storage().may_contains(&head))
            {
                continue;
            }
            if let Some(old) = self.inner.index.remove_object(&key) {
                self.remove_chunks(&key, old.generation, old.chunks);
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Makes everything written so far durable: index records and foyer's queued disk writes.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.inner.index.sync(true).await?;
        self.wait_disk().await;
        Ok(())
    }

    /// The purge index.
    pub fn index(&self) -> &PurgeIndex {
        &self.inner.index
    }

    /// Occupancy and counters.
    pub fn stats(&self) -> StorageStats {
        let i = &self.inner;
        let c = &i.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = StorageStats {
            memory_used: i.cache.memory().usage() as u64,
            memory_capacity: i.memory_capacity,
            disk_capacity: i.disk_capacity,
            disk_block_size: i.block_size,
            entries: i.index.len() as u64,
            hits_memory: l(&c.hits_memory),
            hits_disk: l(&c.hits_disk),
            misses: l(&c.misses),
            stale_heads: l(&c.stale_heads),
            chunk_misses: l(&c.chunk_misses),
            corrupt_entries: l(&c.corrupt),
            objects_written: l(&c.objects_written),
            writes_aborted: l(&c.writes_aborted),
            too_large: l(&c.too_large),
            disk_read_latency_avg: avg(&c.disk_read_nanos, &c.disk_reads),
            disk_flush_wait_avg: avg(&c.flush_wait_nanos, &c.flush_waits),
            disk_errors: i.health.errors(),
            disk_writes_skipped: i.health.skipped_count(),
            disk_preallocated: i.space.as_ref().is_some_and(|g| g.is_allocated()),
            disk_admitting: i.space.as_ref().is_some_and(|g| g.admits()),
            ..Default::default()
        };
        if i.has_disk {
            let st = i.cache.statistics();
            s.disk_write_bytes = st.disk_write_bytes() as u64;
            s.disk_read_bytes = st.disk_read_bytes() as u64;
            s.disk_write_ios = st.disk_write_ios() as u64;
            s.disk_read_ios = st.disk_read_ios() as u64;
        }
        s
    }

    /// Flushes the index log and foyer, then closes foyer. Later calls fail with `Closed`.
    pub async fn close(&self) -> Result<(), StorageError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(h) = self.inner.flusher.lock().take() {
            h.abort();
        }
        if let Some(h) = self.inner.space_task.lock().take() {
            h.abort();
        }
        self.inner.index.sync(true).await?;
        self.inner.cache.close().await?;
        Ok(())
    }
}
