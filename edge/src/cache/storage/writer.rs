//! Streaming write path.

use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};

use super::{
    MAX_HOST_LEN, ObjectMeta, Storage, StorageError,
    codec::{self, HeadBodyRef, StoreKey},
    host_of_key,
    index::validate_key,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Aborted,
    Finished,
}

/// Writes one version of an object.
///
/// Bodies up to `chunk_size` are buffered and stored inline in the head; longer bodies are
/// emitted as `chunk_size` chunk entries as the buffer fills, so at most one chunk is buffered.
/// [`Self::finish`] inserts the head last and then indexes the object. Dropping the writer
/// without `finish` aborts it: chunks already written are removed and were never reachable.
pub struct ObjectWriter {
    storage: Storage,
    key: String,
    generation: u64,
    buf: BytesMut,
    chunks: u32,
    total: u64,
    state: State,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .field("chunks", &self.chunks)
            .field("total", &self.total)
            .field("state", &self.state)
            .finish()
    }
}

impl ObjectWriter {
    pub(super) fn new(storage: Storage, key: String, generation: u64) -> Self {
        let state = if validate_key(&key).is_ok() {
            State::Open
        } else {
            State::Aborted
        };
        Self {
            storage,
            key,
            generation,
            buf: BytesMut::new(),
            chunks: 0,
            total: 0,
            state,
        }
    }

    /// The version this writer creates.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Chunks already in storage: bytes `[0, chunks * chunk_size)` can be
    /// read back with `get_chunk` before the object is committed.
    pub fn chunks_written(&self) -> u32 {
        self.chunks
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.total
    }

    fn check(&self) -> Result<(), StorageError> {
        match self.state {
            State::Open => self.storage.check_open(),
            _ => Err(validate_key(&self.key)
                .err()
                .unwrap_or(StorageError::Aborted)),
        }
    }

    fn abort(&mut self) {
        if self.state == State::Open {
            self.state = State::Aborted;
            self.storage
                .inner
                .counters
                .writes_aborted
                .fetch_add(1, Ordering::Relaxed);
            self.storage
                .remove_chunks(&self.key, self.generation, self.chunks);
            self.buf = BytesMut::new();
        }
    }

    async fn emit_chunk(&mut self) -> Result<(), StorageError> {
        let index = self.chunks;
        let Some(next) = index.checked_add(1) else {
            self.abort();
            return Err(StorageError::TooLarge {
                limit: self.storage.inner.max_object_size,
            });
        };
        let data = self.buf.split();
        let frame = codec::encode_chunk(&self.key, self.generation, index, &data);
        // Reuse the allocation for the next chunk.
        self.buf = data;
        self.buf.clear();
        self.chunks = next;
        let skey = StoreKey::Chunk {
            key: self.key.clone(),
            generation: self.generation,
            index,
        };
        self.storage.put_entry(skey, frame).await;
        Ok(())
    }

    /// Appends body bytes. Emits full chunks as they fill. Fails with `TooLarge` (and aborts the
    /// writer) once the body exceeds `max_object_size`.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), StorageError> {
        self.check()?;
        let limit = self.storage.inner.max_object_size;
        let new_total = self.total.saturating_add(data.len() as u64);
        if new_total > limit {
            self.storage
                .inner
                .counters
                .too_large
                .fetch_add(1, Ordering::Relaxed);
            self.abort();
            return Err(StorageError::TooLarge { limit });
        }
        self.total = new_total;
        let chunk_size = self.storage.inner.chunk_size as usize;
        while !data.is_empty() {
            // Emit a full buffer only once more data follows: a body of exactly `chunk_size`
            // bytes stays inline.
            if self.buf.len() == chunk_size {
                self.emit_chunk().await?;
            }
            let n = (chunk_size - self.buf.len()).min(data.len());
            if self.buf.capacity() == 0 {
                self.buf.reserve(chunk_size.min(data.len().max(4096)));
            }
            self.buf.extend_from_slice(&data[..n]);
            data.advance(n);
        }
        Ok(())
    }

    /// Commits the object: the last chunk, then the head, then the index entry. `meta.body_len`
    /// is set to the number of bytes written.
    pub async fn finish(mut self, mut meta: ObjectMeta) -> Result<(), StorageError> {
        self.check()?;
        let meta_len = match codec::validate_meta(&meta) {
            Ok(n) => n,
            Err(e) => {
                self.abort();
                return Err(StorageError::InvalidMeta(e));
            }
        };
        let host = host_of_key(&self.key);
        if host.len() > MAX_HOST_LEN {
            self.abort();
            return Err(StorageError::InvalidMeta("host too long"));
        }
        meta.body_len = self.total;
        let frame = if self.chunks == 0 {
            codec::encode_head(
                &self.key,
                &meta,
                self.generation,
                &HeadBodyRef::Whole(&self.buf),
                meta_len,
            )
        } else {
            if !self.buf.is_empty() {
                self.emit_chunk().await?;
            }
            codec::encode_head(
                &self.key,
                &meta,
                self.generation,
                &HeadBodyRef::Chunked {
                    chunk_size: self.storage.inner.chunk_size,
                    chunks: self.chunks,
                },
                meta_len,
            )
        };
        self.buf = BytesMut::new();
        let storage = self.storage.clone();
        let skey = StoreKey::Head(self.key.clone());
        let (inserted, queued) = {
            let _guard = storage.lock_key(&self.key).await;
            storage.check_open()?;
            let queued = storage.insert_entry(skey.clone(), frame);
            let inserted = storage.inner.index.insert_object(
                &self.key,
                &host,
                &meta.tags,
                self.generation,
                self.chunks,
            )?;
            if inserted.purged {
                // Fetched from before a purge that covers it: committed, then purged at once.
                storage.remove_entry(&skey);
                storage.remove_chunks(&self.key, self.generation, self.chunks);
            }
            (inserted, queued)
        };
        let old = inserted.old;
        self.state = State::Finished;
        storage
            .inner
            .counters
            .objects_written
            .fetch_add(1, Ordering::Relaxed);
        if let Some(old) = old
            && old.generation != self.generation
        {
            storage.remove_chunks(&self.key, old.generation, old.chunks);
        }
        // The head counts towards the back-pressure bound like the chunks.
        storage.backpressure(queued).await;
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        self.abort();
    }
}
