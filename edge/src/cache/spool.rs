//! A fill in progress, decoupled from the client that started it.
//!
//! The fill task appends the origin's body here at the origin's pace and
//! never waits for a client; the client reads at its own pace, from memory
//! while the bytes are recent, and from the chunks already written to storage
//! once memory has let them go. So a client that reads slowly, or not at
//! all, stalls only itself: the fill commits at the origin's speed, and the
//! requests coalesced behind it are released by the commit, not by another
//! client's socket (Varnish streams from the object being fetched in the
//! same way).
//!
//! Memory is bounded: frames are kept only while the reader still needs
//! them and storage does not hold them. When storage cannot back them (the
//! write failed, or the object is too large to store), the fill waits for
//! the reader instead, which then slows nobody else: the flight is released
//! as soon as the object will not be stored.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};

use super::storage::Storage;
use crate::error::BoxError;

/// Where a spool's stored chunks are read from.
#[derive(Clone, Debug)]
pub(crate) struct Backing {
    pub storage: Storage,
    pub key: String,
    pub generation: u64,
    pub chunk_size: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Received frames not yet let go; `frames[0]` starts at `base`.
    frames: VecDeque<Bytes>,
    base: u64,
    buffered: usize,
    received: u64,
    /// Bytes `[0, backed)` are in storage chunks.
    backed: u64,
    /// The reader's position; `None` once it has gone.
    reader: Option<u64>,
    /// `Some(Ok)`: the origin's body ended complete; `Some(Err)`: it failed.
    end: Option<Result<(), Arc<str>>>,
}

/// The shared state of one fill (see the module docs).
#[derive(Debug)]
pub(crate) struct Spool {
    state: Mutex<State>,
    /// Ticks whenever bytes arrive or the body ends (the reader waits on it).
    data: watch::Sender<()>,
    /// Woken when the reader advances or leaves (the fill waits on it only
    /// when memory is full and storage cannot back the bytes).
    progress: Notify,
    backing: Backing,
    memory: usize,
}

/// What the reader does next.
enum Step {
    Data(Bytes),
    Stored(u64),
    Wait,
    Done,
    Failed(Arc<str>),
}

impl Spool {
    /// A spool whose reader starts at byte 0. `memory` bounds the frames kept.
    pub(crate) fn new(backing: Backing, memory: usize) -> Arc<Spool> {
        Arc::new(Spool {
            state: Mutex::new(State {
                reader: Some(0),
                ..State::default()
            }),
            data: watch::Sender::new(()),
            progress: Notify::new(),
            backing,
            memory,
        })
    }

    /// Appends a frame; `backed` is how much of the body storage now holds.
    pub(crate) fn push(&self, data: Bytes, backed: u64) {
        {
            let mut st = self.state.lock();
            st.received += data.len() as u64;
            st.backed = st.backed.max(backed);
            if st.reader.is_some() {
                st.buffered += data.len();
                st.frames.push_back(data);
            } else {
                st.base = st.received;
            }
            self.trim(&mut st);
        }
        self.data.send_replace(());
    }

    /// Ends the body: complete, or failed with `why`.
    pub(crate) fn end(&self, result: Result<(), Arc<str>>) {
        self.state.lock().end = Some(result);
        self.data.send_replace(());
    }

    /// Whether the reader has gone (the client left, or read to the end).
    pub(crate) fn reader_gone(&self) -> bool {
        self.state.lock().reader.is_none()
    }

    /// Lets go of frames the reader has passed, and, over the memory bound,
    /// of those storage holds.
    fn trim(&self, st: &mut State) {
        let passed = st.reader.unwrap_or(u64::MAX);
        while let Some(f) = st.frames.front() {
            let end = st.base + f.len() as u64;
            if end <= passed || (st.buffered > self.memory && end <= st.backed) {
                st.buffered -= f.len();
                st.base = end;
                st.frames.pop_front();
            } else {
                break;
            }
        }
    }

    /// Waits, if memory is over its bound with frames storage cannot back,
    /// until the reader takes them or leaves.
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock();
                self.trim(&mut st);
                if st.buffered <= self.memory || st.reader.is_none() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// The reader: a task that feeds the client's body channel.
    pub(crate) fn reader(self: &Arc<Self>, len: Option<u64>) -> crate::http::body::ResponseBody {
        let (tx, rx) = mpsc::channel(2);
        let spool = self.clone();
        tokio::spawn(async move {
            spool.read_into(tx).await;
            spool.state.lock().reader = None;
            spool.progress.notify_one();
        });
        crate::http::body::ResponseBody::channel(rx, len)
    }

    async fn read_into(&self, tx: mpsc::Sender<Result<Bytes, BoxError>>) {
        let mut changes = self.data.subscribe();
        let mut pos: u64 = 0;
        loop {
            changes.borrow_and_update();
            let step = {
                let mut st = self.state.lock();
                st.reader = Some(pos);
                self.trim(&mut st);
                if pos < st.base {
                    Step::Stored(pos)
                } else if pos < st.received {
                    let mut off = st.base;
                    let mut found = None;
                    for f in &st.frames {
                        let end = off + f.len() as u64;
                        if pos < end {
                            found = Some(f.slice((pos - off) as usize..));
                            break;
                        }
                        off = end;
                    }
                    found.map_or(Step::Wait, Step::Data)
                } else {
                    match &st.end {
                        Some(Ok(())) => Step::Done,
                        Some(Err(e)) => Step::Failed(e.clone()),
                        None => Step::Wait,
                    }
                }
            };
            self.progress.notify_one();
            let data = match step {
                Step::Data(b) => b,
                Step::Stored(at) => match self.stored(at).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
                Step::Wait => {
                    if changes.changed().await.is_err() {
                        // The spool is gone with its fill: whatever ended it is recorded.
                        if self.state.lock().end.is_none() {
                            let _ = tx.send(Err("fill ended".into())).await;
                            return;
                        }
                    }
                    continue;
                }
                Step::Done => return,
                Step::Failed(e) => {
                    let _ = tx.send(Err(e.to_string().into())).await;
                    return;
                }
            };
            pos += data.len() as u64;
            if tx.send(Ok(data)).await.is_err() {
                return; // the client went away
            }
        }
    }

    /// The rest of the stored chunk that holds byte `at`.
    async fn stored(&self, at: u64) -> Result<Bytes, BoxError> {
        let b = &self.backing;
        if b.chunk_size == 0 {
            return Err("no stored chunk".into());
        }
        let index = u32::try_from(at / b.chunk_size).map_err(|_| "chunk index")?;
        match b.storage.get_chunk(&b.key, b.generation, index).await {
            Ok(Some(chunk)) => {
                let off = (at - u64::from(index) * b.chunk_size) as usize;
                if off >= chunk.len() {
                    return Err("stored chunk is short".into());
                }
                Ok(chunk.slice(off..))
            }
            Ok(None) => Err("cached chunk is gone (evicted or corrupt)".into()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::storage::StorageConfig;
    use http_body_util::BodyExt;

    async fn storage() -> Storage {
        Storage::open(StorageConfig {
            memory_capacity: 8 << 20,
            chunk_size: 4096,
            ..StorageConfig::default()
        })
        .await
        .expect("storage")
    }

    #[tokio::test]
    async fn a_reader_that_never_reads_does_not_hold_the_fill() {
        let st = storage().await;
        let mut w = st.writer("http://a/x");
        let backing = Backing {
            storage: st.clone(),
            key: "http://a/x".into(),
            generation: w.generation(),
            chunk_size: 4096,
        };
        let spool = Spool::new(backing, 8192);
        let body = spool.reader(None);
        // 64 frames of 1 KiB: 8x the memory bound, and nobody reads.
        for i in 0..64u8 {
            let frame = Bytes::from(vec![i; 1024]);
            w.write(frame.clone()).await.expect("write");
            spool.push(frame, u64::from(w.chunks_written()) * 4096);
            tokio::time::timeout(std::time::Duration::from_secs(1), spool.room())
                .await
                .expect("the fill never waits while storage backs the bytes");
        }
        assert!(
            spool.state.lock().buffered <= 8192 + 4096,
            "memory stays bounded"
        );
        spool.end(Ok(()));
        // Now the slow reader reads everything, from storage and memory.
        let got = body.collect().await.expect("body").to_bytes();
        assert_eq!(got.len(), 64 * 1024);
        for (i, c) in got.chunks(1024).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8), "frame {i} intact");
        }
    }

    #[tokio::test]
    async fn without_storage_the_fill_waits_for_the_reader() {
        let st = storage().await;
        let backing = Backing {
            storage: st,
            key: "http://a/y".into(),
            generation: 0,
            chunk_size: 4096,
        };
        let spool = Spool::new(backing, 2048);
        let mut body = spool.reader(Some(8192));
        for _ in 0..8 {
            spool.push(Bytes::from(vec![7u8; 1024]), 0);
        }
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), spool.room()).await;
        assert!(
            waited.is_err(),
            "over the bound with nothing in storage: wait"
        );
        // Reading lets the fill go on.
        let mut n = 0;
        while n < 8192 {
            let f = body.frame().await.expect("frame").expect("ok");
            n += f.into_data().map(|d| d.len()).unwrap_or(0);
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), spool.room())
            .await
            .expect("room once read");
    }

    #[tokio::test]
    async fn a_failed_fill_fails_the_reader() {
        let st = storage().await;
        let backing = Backing {
            storage: st,
            key: "http://a/z".into(),
            generation: 0,
            chunk_size: 4096,
        };
        let spool = Spool::new(backing, 1 << 20);
        let body = spool.reader(None);
        spool.push(Bytes::from_static(b"abc"), 0);
        spool.end(Err(Arc::from("origin reset")));
        assert!(
            body.collect().await.is_err(),
            "a cut body is an error, never a short 200"
        );
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;
    use crate::cache::storage::{ObjectMeta, StorageConfig};
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_reader_that_stalls_midway_gets_every_byte_after_the_commit() {
        let st = Storage::open(StorageConfig {
            memory_capacity: 256 << 20,
            chunk_size: 1 << 20,
            ..StorageConfig::default()
        })
        .await
        .expect("storage");
        let mut w = st.writer("http://a/big");
        let spool = Spool::new(
            Backing {
                storage: st.clone(),
                key: "http://a/big".into(),
                generation: w.generation(),
                chunk_size: 1 << 20,
            },
            4 << 20,
        );
        let mut body = spool.reader(None);
        let frame = |i: u32| Bytes::from(vec![(i % 251) as u8; 16 << 10]);
        let mut got = 0usize;
        for i in 0..2048u32 {
            w.write(frame(i)).await.expect("write");
            spool.push(frame(i), u64::from(w.chunks_written()) << 20);
            spool.room().await;
            if i < 70 {
                let f = body.frame().await.expect("frame").expect("ok");
                got += f.into_data().map(|d| d.len()).unwrap_or(0);
            }
        }
        spool.end(Ok(()));
        w.finish(ObjectMeta {
            status: 200,
            headers: Vec::new(),
            request_time: std::time::SystemTime::now(),
            response_time: std::time::SystemTime::now(),
            tags: Vec::new(),
            body_len: 0,
        })
        .await
        .expect("finish");
        let rest = tokio::time::timeout(std::time::Duration::from_secs(10), body.collect())
            .await
            .expect("the rest comes")
            .expect("ok")
            .to_bytes();
        assert_eq!(got + rest.len(), 32 << 20);
    }
}
