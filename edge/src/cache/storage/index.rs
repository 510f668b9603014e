//! Persistent purge index: which keys are stored, with their host and surrogate keys (tags).
//!
//! The index lives in memory (a hash map, a sorted set for prefix scans, and reverse maps for
//! tags and hosts, with tag and host strings shared between entries) and is persisted by an
//! append-only log file (`index.log` in the storage directory):
//!
//! ```text
//! file   = b"MRDIDX\0\x01" record*
//! record = payload_len u32 | crc32(payload) u32 | payload
//! insert = 1u8 | generation u64 | chunks u32 | key_len u16 | key | host_len u8 | host
//!              | tag_count u16 | (tag_len u16 | tag)*
//! remove = 2u8 | key_len u16 | key
//! mark   = 3u8 | id u64 | below u64 | count u16 | (kind u8 | len u16 | value)*
//! retire = 4u8 | id u64
//! ```
//!
//! A **purge marker** (`mark`) names what a purge covers (exact keys, tags, key prefixes, hosts)
//! and a generation bound: every indexed object it matches whose generation is below `below` is
//! dead from the moment the marker is in memory, and, once the record is synced, across a crash
//! or restart too. Lookups ([`PurgeIndex::generation_of`], [`PurgeIndex::lookup`]) check the
//! active markers, so a purge is effective before its objects are removed one by one. When they
//! all are, the purge writes `retire` and the marker is dropped. Markers are kept by compaction;
//! a marker still active after a replay is a purge that did not finish, and its owner resumes it.
//!
//! Mutations update memory at once and queue their record; [`PurgeIndex::sync`] writes the
//! queued records (on a blocking thread) and the storage calls it after every removal, and a
//! background task calls it every [`FLUSH_INTERVAL`]. On open the log is replayed up to the first
//! torn or corrupt record (the tail is cut off: a record is either whole or absent). When the log
//! grows past [`COMPACT_MIN_BYTES`] and [`COMPACT_RATIO`] times the live set it is rewritten from
//! memory into a temporary file which is fsynced and renamed over the log.
//!
//! The storage treats the index as the authority on which objects exist: a head found in foyer
//! whose key is not in the index, or whose generation differs from the index's, is a miss.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::{Read, Seek, SeekFrom, Write},
    ops::Bound,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use parking_lot::{Mutex, RwLock};

use super::{MAX_HOST_LEN, MAX_KEY_LEN, MAX_TAG_LEN, MAX_TAGS, StorageError};

const LOG_MAGIC: &[u8; 8] = b"MRDIDX\0\x01";
const OP_INSERT: u8 = 1;
const OP_REMOVE: u8 = 2;
const OP_MARK: u8 = 3;
const OP_RETIRE: u8 = 4;
const SEL_KEY: u8 = 1;
const SEL_TAG: u8 = 2;
const SEL_PREFIX: u8 = 3;
const SEL_HOST: u8 = 4;
/// Most selectors (keys, tags, prefixes and hosts together) in one purge marker.
pub const MAX_MARK_SELECTORS: usize = 16 * 1024;
/// The log is never compacted while smaller than this.
pub const COMPACT_MIN_BYTES: u64 = 1024 * 1024;
/// The log is compacted when it is this many times larger than a snapshot of the live set.
pub const COMPACT_RATIO: u64 = 4;
/// How often the background task writes queued index records.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// What [`PurgeIndex::insert_object`] did.
#[derive(Debug)]
pub(super) struct Inserted {
    /// The entry replaced.
    pub old: Option<IndexEntry>,
    /// The new version was killed by a purge marker and is not indexed.
    pub purged: bool,
}

/// One indexed object.
#[derive(Clone, Debug)]
pub(super) struct IndexEntry {
    pub host: Arc<str>,
    pub tags: Box<[Arc<str>]>,
    pub generation: u64,
    pub chunks: u32,
}

/// What a purge covers: exact keys, surrogate keys (tags), key prefixes and hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeSelectors {
    /// Exact keys.
    pub keys: Vec<String>,
    /// Surrogate keys.
    pub tags: Vec<String>,
    /// Plain string prefixes of keys.
    pub prefixes: Vec<String>,
    /// Hosts (lowercase), as derived from the keys.
    pub hosts: Vec<String>,
}

impl PurgeSelectors {
    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.keys.len() + self.tags.len() + self.prefixes.len() + self.hosts.len()
    }

    /// Whether it selects nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The objects a purge marker matched when it was written, by kind of selector (an object
/// matched by two selectors counts in both) and deduplicated.
#[derive(Clone, Debug, Default)]
pub struct PurgeMatch {
    /// Matched through `keys`.
    pub keys: usize,
    /// Matched through `tags`.
    pub tags: usize,
    /// Matched through `prefixes`.
    pub prefixes: usize,
    /// Matched through `hosts`.
    pub hosts: usize,
    /// Every matched key once.
    pub matched: Vec<Arc<str>>,
}

/// An active purge marker.
#[derive(Debug)]
struct Marker {
    id: u64,
    below: u64,
    keys: HashSet<Arc<str>>,
    tags: Box<[Arc<str>]>,
    prefixes: Box<[Arc<str>]>,
    hosts: Box<[Arc<str>]>,
}

impl Marker {
    fn new(id: u64, below: u64, sel: &PurgeSelectors) -> Self {
        let arcs = |v: &[String]| v.iter().map(|s| Arc::from(s.as_str())).collect();
        Marker {
            id,
            below,
            keys: sel.keys.iter().map(|s| Arc::from(s.as_str())).collect(),
            tags: arcs(&sel.tags),
            prefixes: arcs(&sel.prefixes),
            hosts: arcs(&sel.hosts),
        }
    }

    fn selectors(&self) -> PurgeSelectors {
        let strings = |v: &[Arc<str>]| v.iter().map(|s| s.to_string()).collect();
        let mut keys: Vec<String> = self.keys.iter().map(|s| s.to_string()).collect();
        keys.sort_unstable();
        PurgeSelectors {
            keys,
            tags: strings(&self.tags),
            prefixes: strings(&self.prefixes),
            hosts: strings(&self.hosts),
        }
    }

    /// Whether the marker kills `key` (indexed as `e`).
    #[inline]
    fn kills(&self, key: &str, e: &IndexEntry) -> bool {
        e.generation < self.below
            && ((!self.keys.is_empty() && self.keys.contains(key))
                || self.hosts.iter().any(|h| **h == *e.host)
                || self
                    .tags
                    .iter()
                    .any(|t| e.tags.iter().any(|et| **et == **t))
                || self.prefixes.iter().any(|p| key.starts_with(&**p)))
    }

    fn record_len(&self) -> u64 {
        let sel = |v: &mut dyn Iterator<Item = &Arc<str>>| v.map(|s| 3 + s.len()).sum::<usize>();
        let payload = 1
            + 8
            + 8
            + 2
            + sel(&mut self.keys.iter())
            + sel(&mut self.tags.iter())
            + sel(&mut self.prefixes.iter())
            + sel(&mut self.hosts.iter());
        (8 + payload) as u64
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Arc<str>, IndexEntry>,
    sorted: BTreeSet<Arc<str>>,
    by_tag: HashMap<Arc<str>, HashSet<Arc<str>>>,
    by_host: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Active purge markers (few: one per unfinished purge).
    markers: Vec<Marker>,
    /// Encoded records not yet written to the log, in mutation order.
    pending: Vec<u8>,
    /// Bytes in the log file plus `pending`.
    log_bytes: u64,
    /// Bytes a snapshot of the live set would take.
    live_bytes: u64,
    /// A write failed: the file may have a torn tail, so rewrite it at the next sync.
    needs_rewrite: bool,
    compactions: u64,
}

struct LogFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

struct Inner {
    state: RwLock<State>,
    log: Option<LogFile>,
}

/// The persistent index of stored keys, by tag (surrogate key), URL prefix and host.
///
/// Cheap to clone. Bounded memory per entry: keys up to [`super::MAX_KEY_LEN`] bytes, hosts up
/// to [`super::MAX_HOST_LEN`], at most [`super::MAX_TAGS`] tags of [`super::MAX_TAG_LEN`] bytes.
#[derive(Clone)]
pub struct PurgeIndex {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PurgeIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PurgeIndex")
            .field("len", &self.len())
            .finish()
    }
}

/// The host part of a URL-like key: `https://user@Example.com:8443/p?q` gives `example.com`.
/// A key without `://` has the empty host.
pub fn host_of_key(key: &str) -> String {
    let Some((_, rest)) = key.split_once("://") else {
        return String::new();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        // Keep the brackets of an IPv6 literal, drop the port.
        match v6.split_once(']') {
            Some((inner, _)) => &hostport[..inner.len() + 2],
            None => hostport,
        }
    } else {
        hostport.split(':').next().unwrap_or_default()
    };
    host.to_ascii_lowercase()
}

fn entry_record_len(key: &str, host: &str, tags: &[Arc<str>]) -> u64 {
    let payload = 1
        + 8
        + 4
        + 2
        + key.len()
        + 1
        + host.len()
        + 2
        + tags.iter().map(|t| 2 + t.len()).sum::<usize>();
    (8 + payload) as u64
}

fn push_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes an insert record; lengths were validated by the caller.
fn encode_insert(out: &mut Vec<u8>, key: &str, e: &IndexEntry) {
    let mut p = Vec::with_capacity(entry_record_len(key, &e.host, &e.tags) as usize);
    p.push(OP_INSERT);
    p.extend_from_slice(&e.generation.to_le_bytes());
    p.extend_from_slice(&e.chunks.to_le_bytes());
    p.extend_from_slice(&(key.len() as u16).to_le_bytes());
    p.extend_from_slice(key.as_bytes());
    p.push(e.host.len() as u8);
    p.extend_from_slice(e.host.as_bytes());
    p.extend_from_slice(&(e.tags.len() as u16).to_le_bytes());
    for t in e.tags.iter() {
        p.extend_from_slice(&(t.len() as u16).to_le_bytes());
        p.extend_from_slice(t.as_bytes());
    }
    push_record(out, &p);
}

fn encode_mark(out: &mut Vec<u8>, m: &Marker) {
    let mut p = Vec::with_capacity(m.record_len() as usize);
    p.push(OP_MARK);
    p.extend_from_slice(&m.id.to_le_bytes());
    p.extend_from_slice(&m.below.to_le_bytes());
    let count = m.keys.len() + m.tags.len() + m.prefixes.len() + m.hosts.len();
    p.extend_from_slice(&(count as u16).to_le_bytes());
    let mut sel = |kind: u8, v: &str| {
        p.push(kind);
        p.extend_from_slice(&(v.len() as u16).to_le_bytes());
        p.extend_from_slice(v.as_bytes());
    };
    let mut keys: Vec<&Arc<str>> = m.keys.iter().collect();
    keys.sort_unstable();
    for k in keys {
        sel(SEL_KEY, k);
    }
    for t in m.tags.iter() {
        sel(SEL_TAG, t);
    }
    for x in m.prefixes.iter() {
        sel(SEL_PREFIX, x);
    }
    for h in m.hosts.iter() {
        sel(SEL_HOST, h);
    }
    push_record(out, &p);
}

fn encode_retire(out: &mut Vec<u8>, id: u64) {
    let mut p = Vec::with_capacity(9);
    p.push(OP_RETIRE);
    p.extend_from_slice(&id.to_le_bytes());
    push_record(out, &p);
}

fn validate_selectors(sel: &PurgeSelectors) -> Result<(), StorageError> {
    if sel.len() > MAX_MARK_SELECTORS {
        return Err(StorageError::InvalidMeta("too many purge selectors"));
    }
    let all = sel
        .keys
        .iter()
        .chain(&sel.tags)
        .chain(&sel.prefixes)
        .chain(&sel.hosts);
    for s in all {
        if s.is_empty() || s.len() > MAX_KEY_LEN {
            return Err(StorageError::InvalidMeta(
                "purge selector empty or too long",
            ));
        }
    }
    Ok(())
}

fn encode_remove(out: &mut Vec<u8>, key: &str) {
    let mut p = Vec::with_capacity(3 + key.len());
    p.push(OP_REMOVE);
    p.extend_from_slice(&(key.len() as u16).to_le_bytes());
    p.extend_from_slice(key.as_bytes());
    push_record(out, &p);
}

pub(super) fn validate_key(key: &str) -> Result<(), StorageError> {
    if key.is_empty() {
        return Err(StorageError::InvalidKey("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StorageError::InvalidKey("key too long"));
    }
    Ok(())
}

fn validate(key: &str, host: &str, tags: &[String]) -> Result<(), StorageError> {
    validate_key(key)?;
    if host.len() > MAX_HOST_LEN {
        return Err(StorageError::InvalidMeta("host too long"));
    }
    if tags.len() > MAX_TAGS {
        return Err(StorageError::InvalidMeta("too many surrogate keys"));
    }
    if tags.iter().any(|t| t.is_empty() || t.len() > MAX_TAG_LEN) {
        return Err(StorageError::InvalidMeta("surrogate key empty or too long"));
    }
    Ok(())
}

fn intern(map: &HashMap<Arc<str>, HashSet<Arc<str>>>, s: &str) -> Arc<str> {
    map.get_key_value(s)
        .map_or_else(|| Arc::from(s), |(k, _)| k.clone())
}

impl State {
    /// Applies an insert to memory; returns the replaced entry.
    fn apply_insert(
        &mut self,
        key: &str,
        host: &str,
        tags: &[String],
        generation: u64,
        chunks: u32,
    ) -> Option<IndexEntry> {
        let old = self.apply_remove(key);
        let key: Arc<str> = Arc::from(key);
        let host = intern(&self.by_host, host);
        let mut tag_arcs: Vec<Arc<str>> = Vec::with_capacity(tags.len());
        for t in tags {
            if tag_arcs.iter().any(|x| **x == **t) {
                continue;
            }
            tag_arcs.push(intern(&self.by_tag, t));
        }
        for t in &tag_arcs {
            self.by_tag
                .entry(t.clone())
                .or_default()
                .insert(key.clone());
        }
        self.by_host
            .entry(host.clone())
            .or_default()
            .insert(key.clone());
        self.sorted.insert(key.clone());
        let entry = IndexEntry {
            host,
            tags: tag_arcs.into_boxed_slice(),
            generation,
            chunks,
        };
        self.live_bytes += entry_record_len(&key, &entry.host, &entry.tags);
        self.entries.insert(key, entry);
        old
    }

    fn apply_remove(&mut self, key: &str) -> Option<IndexEntry> {
        let (k, entry) = self.entries.remove_entry(key)?;
        self.sorted.remove(key);
        for t in entry.tags.iter() {
            if let Some(set) = self.by_tag.get_mut(t) {
                set.remove(key);
                if set.is_empty() {
                    self.by_tag.remove(t);
                }
            }
        }
        if let Some(set) = self.by_host.get_mut(&entry.host) {
            set.remove(key);
            if set.is_empty() {
                self.by_host.remove(&entry.host);
            }
        }
        self.live_bytes =
            self.live_bytes
                .saturating_sub(entry_record_len(&k, &entry.host, &entry.tags));
        Some(entry)
    }

    fn queue(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let before = self.pending.len();
        f(&mut self.pending);
        self.log_bytes += (self.pending.len() - before) as u64;
    }

    fn should_compact(&self) -> bool {
        self.needs_rewrite
            || (self.log_bytes > COMPACT_MIN_BYTES
                && self.log_bytes > COMPACT_RATIO * (self.live_bytes + 8))
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOG_MAGIC.len() + self.live_bytes as usize);
        out.extend_from_slice(LOG_MAGIC);
        for (k, e) in &self.entries {
            encode_insert(&mut out, k, e);
        }
        for m in &self.markers {
            encode_mark(&mut out, m);
        }
        out
    }

    /// Whether an active marker kills `key` (indexed as `e`).
    #[inline]
    fn killed(&self, key: &str, e: &IndexEntry) -> bool {
        !self.markers.is_empty() && self.markers.iter().any(|m| m.kills(key, e))
    }

    /// The live entry of `key`: indexed and not killed by a marker.
    #[inline]
    fn live(&self, key: &str) -> Option<&IndexEntry> {
        self.entries.get(key).filter(|e| !self.killed(key, e))
    }

    fn add_marker(&mut self, m: Marker) {
        self.live_bytes += m.record_len();
        self.markers.retain(|x| x.id != m.id);
        self.markers.push(m);
    }

    fn remove_marker(&mut self, id: u64) -> bool {
        let Some(i) = self.markers.iter().position(|m| m.id == id) else {
            return false;
        };
        let m = self.markers.swap_remove(i);
        self.live_bytes = self.live_bytes.saturating_sub(m.record_len());
        true
    }

    /// The indexed keys that marker `m` kills, by kind of selector.
    fn matches(&self, m: &Marker) -> PurgeMatch {
        let mut out = PurgeMatch::default();
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        let below = |k: &Arc<str>| self.entries.get(k).is_some_and(|e| e.generation < m.below);
        let mut take = |k: &Arc<str>, n: &mut usize| {
            *n += 1;
            if seen.insert(k.clone()) {
                out.matched.push(k.clone());
            }
        };
        let (mut nk, mut nt, mut np, mut nh) = (0, 0, 0, 0);
        for k in &m.keys {
            if let Some((k, _)) = self.entries.get_key_value(k)
                && below(k)
            {
                take(k, &mut nk);
            }
        }
        for t in m.tags.iter() {
            for k in self.by_tag.get(t).into_iter().flatten() {
                if below(k) {
                    take(k, &mut nt);
                }
            }
        }
        for p in m.prefixes.iter() {
            let range = self
                .sorted
                .range::<str, _>((Bound::Included(&**p), Bound::Unbounded))
                .take_while(|k| k.starts_with(&**p));
            for k in range {
                if below(k) {
                    take(k, &mut np);
                }
            }
        }
        for h in m.hosts.iter() {
            for k in self.by_host.get(h).into_iter().flatten() {
                if below(k) {
                    take(k, &mut nh);
                }
            }
        }
        out.keys = nk;
        out.tags = nt;
        out.prefixes = np;
        out.hosts = nh;
        out
    }

    /// Replays a log image. Returns the length of the valid prefix.
    fn replay(&mut self, buf: &[u8]) -> usize {
        let mut pos = LOG_MAGIC.len();
        loop {
            match Self::parse_record(buf, pos) {
                Some((payload, next)) => {
                    if self.apply_payload(payload).is_none() {
                        return pos;
                    }
                    pos = next;
                }
                None => return pos,
            }
        }
    }

    fn parse_record(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
        let hdr = buf.get(pos..pos.checked_add(8)?)?;
        let len = u32::from_le_bytes(hdr[..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(hdr[4..8].try_into().ok()?);
        let start = pos + 8;
        let payload = buf.get(start..start.checked_add(len)?)?;
        (crc32fast::hash(payload) == crc).then_some((payload, start + len))
    }

    fn apply_payload(&mut self, p: &[u8]) -> Option<()> {
        let mut r = Cursor { b: p, pos: 0 };
        match r.u8()? {
            OP_INSERT => {
                let generation = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
                let chunks = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
                let kl = r.u16()? as usize;
                let key = std::str::from_utf8(r.take(kl)?).ok()?;
                let hl = r.u8()? as usize;
                let host = std::str::from_utf8(r.take(hl)?).ok()?;
                let n = r.u16()? as usize;
                let mut tags = Vec::with_capacity(n.min(MAX_TAGS));
                for _ in 0..n {
                    let tl = r.u16()? as usize;
                    tags.push(std::str::from_utf8(r.take(tl)?).ok()?.to_owned());
                }
                validate(key, host, &tags).ok()?;
                // Only a whole record is applied: one with bytes past its fields is where
                // the log gets cut, and must leave memory as the cut log will be.
                (r.pos == p.len()).then_some(())?;
                self.apply_insert(key, host, &tags, generation, chunks);
            }
            OP_REMOVE => {
                let kl = r.u16()? as usize;
                let key = std::str::from_utf8(r.take(kl)?).ok()?;
                (r.pos == p.len()).then_some(())?;
                self.apply_remove(key);
            }
            OP_MARK => {
                let id = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
                let below = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
                let n = r.u16()? as usize;
                let mut sel = PurgeSelectors::default();
                for _ in 0..n {
                    let kind = r.u8()?;
                    let l = r.u16()? as usize;
                    let v = std::str::from_utf8(r.take(l)?).ok()?.to_owned();
                    match kind {
                        SEL_KEY => sel.keys.push(v),
                        SEL_TAG => sel.tags.push(v),
                        SEL_PREFIX => sel.prefixes.push(v),
                        SEL_HOST => sel.hosts.push(v),
                        _ => return None,
                    }
                }
                validate_selectors(&sel).ok()?;
                (r.pos == p.len()).then_some(())?;
                self.add_marker(Marker::new(id, below, &sel));
            }
            OP_RETIRE => {
                let id = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
                (r.pos == p.len()).then_some(())?;
                self.remove_marker(id);
            }
            _ => return None,
        }
        (r.pos == p.len()).then_some(())
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_le_bytes)
    }
}

fn sync_dir(dir: &Path) {
    // Best effort: make the rename durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

impl Inner {
    fn sync_blocking(&self, durable: bool) -> Result<(), StorageError> {
        let Some(log) = &self.log else { return Ok(()) };
        let mut file = log.file.lock();
        let (buf, compact) = {
            let mut st = self.state.write();
            (std::mem::take(&mut st.pending), st.should_compact())
        };
        if compact {
            // The snapshot includes everything that was pending.
            return self.compact_locked(log, &mut file);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let res = file
            .write_all(&buf)
            .and_then(|()| if durable { file.sync_data() } else { Ok(()) });
        if let Err(e) = res {
            self.state.write().needs_rewrite = true;
            return Err(e.into());
        }
        Ok(())
    }

    fn compact_locked(&self, log: &LogFile, file: &mut std::fs::File) -> Result<(), StorageError> {
        let image = {
            let mut st = self.state.write();
            st.pending.clear();
            let image = st.snapshot();
            st.log_bytes = image.len() as u64;
            st.needs_rewrite = false;
            st.compactions += 1;
            image
        };
        let res = (|| -> std::io::Result<std::fs::File> {
            let tmp = log.path.with_extension("log.tmp");
            {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&image)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &log.path)?;
            if let Some(dir) = log.path.parent() {
                sync_dir(dir);
            }
            open_append(&log.path)
        })();
        match res {
            Ok(f) => {
                *file = f;
                Ok(())
            }
            Err(e) => {
                self.state.write().needs_rewrite = true;
                Err(e.into())
            }
        }
    }
}

impl PurgeIndex {
    /// Replays a log image (magic included) as [`Self::open`] does, into an index that is not
    /// persisted; returns it, the length of the valid prefix, and the image a compaction would
    /// write. For the fuzz targets (`storage::fuzzing`).
    pub(super) fn replay_image(buf: &[u8]) -> Option<(Self, usize, Vec<u8>)> {
        if !buf.starts_with(LOG_MAGIC) {
            return None;
        }
        let mut state = State::default();
        let valid = state.replay(buf);
        let snapshot = state.snapshot();
        let index = Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                log: None,
            }),
        };
        Some((index, valid, snapshot))
    }

    /// An index that is not persisted (memory-only storage).
    pub fn in_memory() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                log: None,
            }),
        }
    }

    /// Opens (creating if needed) and replays the log at `path`, on a blocking thread.
    pub async fn open(path: PathBuf) -> Result<Self, StorageError> {
        tokio::task::spawn_blocking(move || Self::open_blocking(path)).await?
    }

    fn open_blocking(path: PathBuf) -> Result<Self, StorageError> {
        let mut file = open_append(&path)?;
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut buf)?;
        let mut state = State::default();
        if buf.len() < LOG_MAGIC.len() {
            if !LOG_MAGIC.starts_with(&buf) {
                return Err(StorageError::IndexLog(format!(
                    "{} is not an index log",
                    path.display()
                )));
            }
            // New or torn before the header was complete.
            file.set_len(0)?;
            file.write_all(LOG_MAGIC)?;
            file.sync_all()?;
            state.log_bytes = LOG_MAGIC.len() as u64;
        } else {
            if &buf[..LOG_MAGIC.len()] != LOG_MAGIC {
                return Err(StorageError::IndexLog(format!(
                    "{} is not an index log",
                    path.display()
                )));
            }
            let valid = state.replay(&buf);
            if valid < buf.len() {
                tracing::warn!(
                    path = %path.display(),
                    valid,
                    len = buf.len(),
                    "index log has a torn or corrupt tail; cutting it off"
                );
                file.set_len(valid as u64)?;
                file.sync_all()?;
            }
            state.log_bytes = valid as u64;
        }
        let index = Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                log: Some(LogFile {
                    path,
                    file: Mutex::new(file),
                }),
            }),
        };
        if index.inner.state.read().should_compact() {
            index.inner.sync_blocking(true)?;
        }
        Ok(index)
    }

    /// Adds or replaces `key` with its host and tags. Keeps the stored generation if the key is
    /// already indexed. The record is persisted by the next [`Self::sync`].
    pub fn insert(&self, key: &str, host: &str, tags: &[String]) -> Result<(), StorageError> {
        validate(key, host, tags)?;
        let mut st = self.inner.state.write();
        let (generation, chunks) = st
            .entries
            .get(key)
            .map_or((0, 0), |e| (e.generation, e.chunks));
        st.apply_insert(key, host, tags, generation, chunks);
        self.queue_insert(&mut st, key);
        Ok(())
    }

    fn queue_insert(&self, st: &mut State, key: &str) {
        if self.inner.log.is_none() {
            return;
        }
        if let Some(e) = st.entries.get(key).cloned() {
            st.queue(|out| encode_insert(out, key, &e));
        }
    }

    /// Indexes one object version; returns the entry it replaced. A version that an active
    /// purge marker kills (its fetch began before the purge) is not indexed: the key is removed
    /// instead, and `purged` tells the caller to drop what it wrote.
    pub(super) fn insert_object(
        &self,
        key: &str,
        host: &str,
        tags: &[String],
        generation: u64,
        chunks: u32,
    ) -> Result<Inserted, StorageError> {
        validate(key, host, tags)?;
        let mut st = self.inner.state.write();
        let old = st.apply_insert(key, host, tags, generation, chunks);
        let killed = st.entries.get(key).is_some_and(|e| st.killed(key, e));
        if killed {
            st.apply_remove(key);
            if self.inner.log.is_some() {
                st.queue(|out| encode_remove(out, key));
            }
        } else {
            self.queue_insert(&mut st, key);
        }
        Ok(Inserted {
            old,
            purged: killed,
        })
    }

    /// Writes purge marker `id` (killing every object it matches whose generation is below
    /// `below`) and returns what it matched. The marker takes effect at once in memory; it is
    /// durable after the next durable [`Self::sync`].
    pub fn mark(
        &self,
        id: u64,
        below: u64,
        sel: &PurgeSelectors,
    ) -> Result<PurgeMatch, StorageError> {
        validate_selectors(sel)?;
        let m = Marker::new(id, below, sel);
        let mut st = self.inner.state.write();
        let matched = st.matches(&m);
        if self.inner.log.is_some() {
            st.queue(|out| encode_mark(out, &m));
        }
        st.add_marker(m);
        Ok(matched)
    }

    /// What `sel` covers now, without writing a marker (soft purges).
    pub fn matching(&self, sel: &PurgeSelectors) -> PurgeMatch {
        let m = Marker::new(0, u64::MAX, sel);
        self.inner.state.read().matches(&m)
    }

    /// Drops purge marker `id` (its purge has removed what it matched); persisted by the next
    /// [`Self::sync`]. Returns whether it was active.
    pub fn retire(&self, id: u64) -> bool {
        let mut st = self.inner.state.write();
        let was = st.remove_marker(id);
        if was && self.inner.log.is_some() {
            st.queue(|out| encode_retire(out, id));
        }
        was
    }

    /// The active purge markers: `(id, below, selectors)`, oldest first.
    pub fn markers(&self) -> Vec<(u64, u64, PurgeSelectors)> {
        let st = self.inner.state.read();
        let mut v: Vec<_> = st
            .markers
            .iter()
            .map(|m| (m.id, m.below, m.selectors()))
            .collect();
        v.sort_unstable_by_key(|m| m.0);
        v
    }

    /// The indexed keys that active marker `id` still kills (`None` if it is not active).
    pub fn marker_matches(&self, id: u64) -> Option<PurgeMatch> {
        let st = self.inner.state.read();
        let m = st.markers.iter().find(|m| m.id == id)?;
        Some(st.matches(m))
    }

    /// The indexed generation of `key`, whether or not a marker kills it.
    pub(super) fn raw_generation_of(&self, key: &str) -> Option<u64> {
        self.inner
            .state
            .read()
            .entries
            .get(key)
            .map(|e| e.generation)
    }

    /// The largest `below` of the active markers (0 without any).
    pub(super) fn max_marker_bound(&self) -> u64 {
        let st = self.inner.state.read();
        st.markers.iter().map(|m| m.below).max().unwrap_or(0)
    }

    /// Removes `key`; returns whether it was indexed. Persisted by the next [`Self::sync`].
    pub fn remove(&self, key: &str) -> bool {
        self.remove_object(key).is_some()
    }

    pub(super) fn remove_object(&self, key: &str) -> Option<IndexEntry> {
        let mut st = self.inner.state.write();
        let old = st.apply_remove(key)?;
        if self.inner.log.is_some() {
            st.queue(|out| encode_remove(out, key));
        }
        Some(old)
    }

    /// The live entry of `key` (indexed and not killed by a purge marker).
    pub(super) fn lookup(&self, key: &str) -> Option<IndexEntry> {
        self.inner.state.read().live(key).cloned()
    }

    /// The live generation of `key` (indexed and not killed by a purge marker).
    pub(super) fn generation_of(&self, key: &str) -> Option<u64> {
        self.inner.state.read().live(key).map(|e| e.generation)
    }

    pub(super) fn keys_and_generations(&self) -> Vec<(String, u64)> {
        let st = self.inner.state.read();
        st.entries
            .iter()
            .map(|(k, e)| (k.to_string(), e.generation))
            .collect()
    }

    pub(super) fn max_generation(&self) -> u64 {
        self.inner
            .state
            .read()
            .entries
            .values()
            .map(|e| e.generation)
            .max()
            .unwrap_or(0)
    }

    /// Keys carrying the surrogate key `tag`.
    pub fn keys_for_tag(&self, tag: &str) -> Vec<String> {
        let st = self.inner.state.read();
        st.by_tag
            .get(tag)
            .map(|s| s.iter().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// Keys starting with `prefix` (plain string prefix), in sorted order.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let st = self.inner.state.read();
        st.sorted
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .map(|k| k.to_string())
            .collect()
    }

    /// Keys whose host (as given at insert, lowercase for storage-made entries) is `host`.
    pub fn keys_for_host(&self, host: &str) -> Vec<String> {
        let st = self.inner.state.read();
        let host = host.to_ascii_lowercase();
        st.by_host
            .get(host.as_str())
            .map(|s| s.iter().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// Whether `key` is indexed.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.state.read().entries.contains_key(key)
    }

    /// Number of indexed keys.
    pub fn len(&self) -> usize {
        self.inner.state.read().entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the log file including queued records (0 for an in-memory index).
    pub fn log_bytes(&self) -> u64 {
        if self.inner.log.is_none() {
            return 0;
        }
        self.inner.state.read().log_bytes
    }

    /// How many times the log was compacted since open.
    pub fn compactions(&self) -> u64 {
        self.inner.state.read().compactions
    }

    /// Writes queued records to the log (compacting it if due). With `durable`, also fdatasync.
    pub async fn sync(&self, durable: bool) -> Result<(), StorageError> {
        if self.inner.log.is_none() {
            return Ok(());
        }
        if !durable && self.inner.state.read().pending.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.sync_blocking(durable)).await?
    }

    /// Rewrites the log from memory now.
    pub async fn compact(&self) -> Result<(), StorageError> {
        if self.inner.log.is_none() {
            return Ok(());
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let Some(log) = &inner.log else { return Ok(()) };
            let mut file = log.file.lock();
            inner.compact_locked(log, &mut file)
        })
        .await?
    }

    /// Spawns the periodic writer of queued records; it ends when the index is dropped.
    /// Its errors (a full disk) are counted and logged at most once per interval by `health`.
    pub(super) fn spawn_flusher(
        &self,
        health: Arc<super::space::DiskHealth>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.inner.log.as_ref()?;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let index = PurgeIndex { inner };
                if let Err(e) = index.sync(false).await {
                    health.error("index log flush failed", &e);
                }
            }
        }))
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// Found writing `fuzz/fuzz_targets/index_replay.rs`: a record whose payload has bytes past its
    /// fields was applied to memory and then cut off the log, so memory and the kept log
    /// disagreed: here a removal that the next restart would undo.
    #[test]
    fn a_record_with_trailing_bytes_is_not_applied() {
        let key = "https://a.test/x";
        let mut image = LOG_MAGIC.to_vec();
        let entry = IndexEntry {
            host: Arc::from("a.test"),
            tags: Box::new([]),
            generation: 1,
            chunks: 0,
        };
        encode_insert(&mut image, key, &entry);
        let kept = image.len();
        let mut p = vec![OP_REMOVE];
        p.extend_from_slice(&(key.len() as u16).to_le_bytes());
        p.extend_from_slice(key.as_bytes());
        p.push(0);
        push_record(&mut image, &p);
        let mut st = State::default();
        assert_eq!(
            st.replay(&image),
            kept,
            "the log is cut before the bad record"
        );
        assert!(
            st.entries.contains_key(key),
            "the cut record was applied to memory"
        );
    }
}
