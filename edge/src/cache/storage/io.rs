//! foyer's IO engine, wrapped so that the disk tier's IO errors are counted and logged.
//!
//! foyer (patched, `vendor/foyer-storage`) survives a failed read or write: the entries of a
//! failed write are not indexed (a later lookup misses and goes to the origin) and its flusher
//! keeps writing. It logs the errors at debug level only; this wrapper counts each one in
//! [`DiskHealth`] (`meridian_cache_disk_errors_total`) and warns at most once per
//! [`super::space::LOG_INTERVAL`].

use std::sync::Arc;

use foyer_storage::{
    IoBuf, IoBufMut, IoEngine, IoEngineBuildContext, IoEngineConfig, IoHandle, Partition,
    PsyncIoEngineConfig,
};
use futures_util::{FutureExt, future::BoxFuture};

use super::space::DiskHealth;

/// Builds a [`CountingIoEngine`] around foyer's psync engine.
#[derive(Debug)]
pub(super) struct CountingIoEngineConfig {
    health: Arc<DiskHealth>,
    #[cfg(test)]
    faults: Option<Arc<faults::WriteFaults>>,
}

impl CountingIoEngineConfig {
    pub(super) fn new(health: Arc<DiskHealth>) -> Self {
        Self {
            health,
            #[cfg(test)]
            faults: None,
        }
    }

    #[cfg(test)]
    pub(super) fn with_faults(mut self, faults: Option<Arc<faults::WriteFaults>>) -> Self {
        self.faults = faults;
        self
    }
}

impl IoEngineConfig for CountingIoEngineConfig {
    fn build(
        self: Box<Self>,
        ctx: IoEngineBuildContext,
    ) -> BoxFuture<'static, foyer::Result<Arc<dyn IoEngine>>> {
        async move {
            let inner = Box::new(PsyncIoEngineConfig::new()).build(ctx).await?;
            let engine: Arc<dyn IoEngine> = Arc::new(CountingIoEngine {
                inner,
                health: self.health,
                #[cfg(test)]
                faults: self.faults,
            });
            Ok(engine)
        }
        .boxed()
    }
}

/// Delegates to foyer's engine; counts and logs the errors it returns.
#[derive(Debug)]
pub(super) struct CountingIoEngine {
    inner: Arc<dyn IoEngine>,
    health: Arc<DiskHealth>,
    #[cfg(test)]
    faults: Option<Arc<faults::WriteFaults>>,
}

impl CountingIoEngine {
    fn counted(&self, handle: IoHandle, what: &'static str) -> IoHandle {
        let health = self.health.clone();
        let fut: BoxFuture<'static, _> = async move {
            let (buf, res) = handle.await;
            if let Err(e) = &res {
                health.error(what, e);
            }
            (buf, res)
        }
        .boxed();
        fut.into()
    }
}

impl IoEngine for CountingIoEngine {
    fn read(&self, buf: Box<dyn IoBufMut>, partition: &dyn Partition, offset: u64) -> IoHandle {
        self.counted(
            self.inner.read(buf, partition, offset),
            "disk tier: a read failed; the entry is fetched again",
        )
    }

    fn write(&self, buf: Box<dyn IoBuf>, partition: &dyn Partition, offset: u64) -> IoHandle {
        #[cfg(test)]
        if self.faults.as_ref().is_some_and(|f| f.next_fails()) {
            return self.counted(faults::failed_write(buf), WRITE_FAILED);
        }
        self.counted(self.inner.write(buf, partition, offset), WRITE_FAILED)
    }
}

const WRITE_FAILED: &str =
    "disk tier: a write failed; its entries are served from memory and the origin";

#[cfg(test)]
pub(super) mod faults {
    //! Write faults for tests: while on, every other write fails with `EIO` at once, while the
    //! writes around it are still running on foyer's blocking threads (what a failing disk does
    //! to a batch of concurrent writes).

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use foyer_storage::{IoBuf, IoHandle};
    use futures_util::{FutureExt, future::BoxFuture};

    #[derive(Debug, Default)]
    pub(in crate::cache::storage) struct WriteFaults {
        on: AtomicBool,
        writes: AtomicU64,
        failed: AtomicU64,
    }

    impl WriteFaults {
        pub(in crate::cache::storage) fn set(&self, on: bool) {
            self.on.store(on, Ordering::SeqCst);
        }

        pub(in crate::cache::storage) fn failed(&self) -> u64 {
            self.failed.load(Ordering::SeqCst)
        }

        /// Whether the next write fails: every other one while on.
        pub(super) fn next_fails(&self) -> bool {
            let fails = self.on.load(Ordering::SeqCst)
                && self.writes.fetch_add(1, Ordering::SeqCst) % 2 == 1;
            if fails {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
            fails
        }
    }

    /// A write that fails with `EIO` without touching the disk.
    pub(super) fn failed_write(buf: Box<dyn IoBuf>) -> IoHandle {
        let fut: BoxFuture<'static, _> = async move {
            tokio::task::yield_now().await;
            let err = foyer::Error::io_error(std::io::Error::from_raw_os_error(libc::EIO));
            (buf.into_iob(), Err(err))
        }
        .boxed();
        fut.into()
    }
}
