//! Keeping the disk tier alive when its filesystem fills.
//!
//! foyer 0.22.6's block engine did not survive a failed write: its flusher task panicked (a
//! buffer was left taken when a write future was dropped on the error), and the disk tier never
//! wrote again until a restart. The vendored foyer-storage fixes that (the `io` module's docs),
//! but writes that fail lose their entries, so foyer should still not meet a full filesystem:
//!
//! 1. **Preallocation.** At open, every file of foyer's device (blocks and tombstone log) is
//!    allocated with `fallocate(2)`: foyer then only writes into blocks the filesystem already
//!    gave it, and another writer filling the filesystem cannot make those writes fail
//!    (tmpfs, ext4 and XFS; a copy-on-write filesystem gives no such promise). It is attempted
//!    only while the free space covers the files plus [`PREALLOC_HEADROOM`], since a failed
//!    `fallocate` may keep what it allocated.
//! 2. **Admission guard**, while the files are not allocated (the filesystem was too full at
//!    open, or has no `fallocate`): every [`CHECK_INTERVAL`] the preallocation is retried, and
//!    entries go to the disk only while the filesystem's free space covers what foyer may still
//!    allocate (the unallocated part of its files, at most [`SpaceGuard::margin`]); otherwise
//!    they are kept in memory only ([`super::StorageStats::disk_writes_skipped`]).
//! 3. **Errors** of the storage's own disk writes (the index log, the preallocation) are counted
//!    ([`super::StorageStats::disk_errors`]) and logged at most once per [`LOG_INTERVAL`], with
//!    the number of errors not logged since.

use std::{
    fmt::Display,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

/// How often the admission guard looks at the filesystem.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// At most one warning per this interval for the disk tier's errors.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Free space that preallocation leaves to the filesystem's other users: it is attempted only
/// if the free space covers foyer's unallocated bytes plus this.
pub const PREALLOC_HEADROOM: u64 = 8 * 1024 * 1024;

/// Counters and a rate limit for the disk tier's errors.
#[derive(Debug)]
pub(super) struct DiskHealth {
    errors: AtomicU64,
    skipped: AtomicU64,
    log: crate::util::LogThrottle,
}

impl Default for DiskHealth {
    fn default() -> Self {
        DiskHealth {
            errors: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            log: crate::util::LogThrottle::new(LOG_INTERVAL),
        }
    }
}

impl DiskHealth {
    /// Counts a disk error and logs it unless one was logged less than [`LOG_INTERVAL`] ago.
    pub(super) fn error(&self, what: &str, e: &dyn Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.log.may_log() {
            tracing::warn!(error = %e, suppressed, "{what} (at most one such warning per {}s; `suppressed` = errors since the last one)", LOG_INTERVAL.as_secs());
        }
    }

    /// Counts an entry kept in memory only for want of disk space.
    pub(super) fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs a warning about the disk tier unless one was logged less than [`LOG_INTERVAL`] ago.
    pub(super) fn warn(&self, msg: &str) {
        if let Some(suppressed) = self.log.may_log() {
            tracing::warn!(suppressed, "{msg}");
        }
    }

    pub(super) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub(super) fn skipped_count(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Space {
    /// foyer's files are allocated: writes cannot fail for want of space.
    Allocated,
    /// Not allocated, but the free space covers what foyer may allocate before the next check.
    Enough,
    /// Not enough free space: keep entries in memory only.
    Short {
        /// Free bytes for an unprivileged writer.
        free: u64,
        /// Bytes wanted.
        need: u64,
    },
}

impl Space {
    pub(super) fn admits(self) -> bool {
        !matches!(self, Space::Short { .. })
    }
}

/// The admission guard of one disk tier (foyer's device directory).
#[derive(Debug)]
pub(super) struct SpaceGuard {
    dir: PathBuf,
    /// The most foyer can write between two checks: what we let wait for it (the back-pressure
    /// bound) plus its two IO buffers.
    margin: u64,
    allocated: AtomicBool,
    /// `fallocate` is not supported here: do not retry it.
    unsupported: AtomicBool,
    admit: AtomicBool,
}

impl SpaceGuard {
    pub(super) fn new(dir: PathBuf, margin: u64) -> Self {
        Self {
            dir,
            margin,
            allocated: AtomicBool::new(false),
            unsupported: AtomicBool::new(false),
            admit: AtomicBool::new(true),
        }
    }

    /// Whether entries may go to the disk now (as of the last check).
    pub(super) fn admits(&self) -> bool {
        self.admit.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(super) fn force_admission(&self, admit: bool) {
        self.admit.store(admit, Ordering::Relaxed);
    }

    /// Whether foyer's files are allocated.
    pub(super) fn is_allocated(&self) -> bool {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Preallocates foyer's files if not done yet, else measures the free space; sets the
    /// admission flag. Blocking (file system calls): run it off the async workers.
    pub(super) fn check(&self, health: &DiskHealth) -> Space {
        let space = self.measure(health);
        let admit = space.admits();
        let was = self.admit.swap(admit, Ordering::Relaxed);
        match (was, space) {
            (true, Space::Short { free, need }) => health.warn(&format!(
                "disk tier: {free} bytes free in {}, {need} wanted; new entries are kept in memory only until space returns",
                self.dir.display()
            )),
            (false, _) if admit => tracing::info!(
                dir = %self.dir.display(),
                "disk tier: space is back; entries are written to disk again"
            ),
            _ => {}
        }
        space
    }

    fn measure(&self, health: &DiskHealth) -> Space {
        if self.allocated.load(Ordering::Relaxed) {
            return Space::Allocated;
        }
        let (mut unallocated, mut free) = match self.holes_and_free() {
            Ok(m) => m,
            Err(e) => {
                health.error("disk tier: measuring free space failed", &e);
                return Space::Short { free: 0, need: 0 };
            }
        };
        if unallocated == 0 {
            self.allocated.store(true, Ordering::Relaxed);
            return Space::Allocated;
        }
        // Only when it fits with room to spare: a failing fallocate may keep what it got (ext4
        // does), and must not take the last free bytes of a shared filesystem.
        if !self.unsupported.load(Ordering::Relaxed)
            && free >= unallocated.saturating_add(PREALLOC_HEADROOM)
        {
            match preallocate_dir(&self.dir) {
                Ok(()) => {
                    self.allocated.store(true, Ordering::Relaxed);
                    return Space::Allocated;
                }
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.unsupported.store(true, Ordering::Relaxed);
                    tracing::info!(dir = %self.dir.display(), "disk tier: the filesystem cannot preallocate; guarding writes by its free space instead");
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
                Err(e) => health.error("disk tier: preallocating its files failed", &e),
            }
            match self.holes_and_free() {
                Ok(m) => (unallocated, free) = m,
                Err(e) => {
                    health.error("disk tier: measuring free space failed", &e);
                    return Space::Short { free: 0, need: 0 };
                }
            }
        }
        let need = unallocated.min(self.margin);
        if free >= need {
            Space::Enough
        } else {
            Space::Short { free, need }
        }
    }

    fn holes_and_free(&self) -> std::io::Result<(u64, u64)> {
        Ok((unallocated(&self.dir)?, free_bytes(&self.dir)?))
    }
}

/// Allocates every regular file of `dir` over its whole length (`fallocate(2)`, size kept).
pub(super) fn preallocate_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(entry.path())?;
        let len = file.metadata()?.len();
        if len > 0 {
            fallocate(&file, len)?;
        }
    }
    Ok(())
}

/// Bytes of the regular files of `dir` that have no blocks yet (sparse holes).
pub(super) fn unallocated(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut holes = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let md = entry?.metadata()?;
        if md.is_file() {
            holes = holes.saturating_add(md.len().saturating_sub(md.blocks().saturating_mul(512)));
        }
    }
    Ok(holes)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn fallocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(|_| std::io::Error::other("file too large"))?;
    let mut last = std::io::Error::from(std::io::ErrorKind::Interrupted);
    // EINTR is retried a few times.
    for _ in 0..8 {
        // SAFETY: a valid open descriptor for the call's duration; no pointers are passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if r == 0 {
            return Ok(());
        }
        last = std::io::Error::last_os_error();
        if last.kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    Err(last)
}

#[cfg(not(target_os = "linux"))]
fn fallocate(_file: &std::fs::File, _len: u64) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Free bytes for an unprivileged writer on the filesystem of `dir` (`statvfs(3)`).
#[allow(unsafe_code)]
pub(super) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid out-pointer, both live for the call.
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn preallocation_fills_the_holes_of_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [("a", 1 << 20), ("b", 3 << 20)] {
            std::fs::File::create(dir.path().join(name))
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(unallocated(dir.path()).unwrap(), 4 << 20);
        match preallocate_dir(dir.path()) {
            Ok(()) => assert_eq!(unallocated(dir.path()).unwrap(), 0),
            // A filesystem without fallocate: the guard measures free space instead.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP)),
        }
        // Sizes are kept.
        assert_eq!(
            std::fs::metadata(dir.path().join("b")).unwrap().len(),
            3 << 20
        );
        assert!(free_bytes(dir.path()).unwrap() > 0);
    }

    #[test]
    fn guard_refuses_when_free_space_cannot_cover_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        // A hole larger than any test machine's free space (sparse: costs nothing).
        std::fs::File::create(dir.path().join("huge"))
            .unwrap()
            .set_len(1 << 42)
            .unwrap();
        let health = DiskHealth::default();
        let guard = SpaceGuard::new(dir.path().to_path_buf(), u64::MAX);
        // Never let a test machine with 4 TiB free actually allocate them.
        if free_bytes(dir.path()).unwrap() > 1 << 41 {
            guard.unsupported.store(true, Ordering::Relaxed);
        }
        // 4 TiB do not fit: no preallocation is attempted, and admission depends on the free
        // space, which is short.
        let found = guard.check(&health);
        assert!(
            matches!(found, Space::Short { free, need } if need == 1 << 42 && free < need),
            "{found:?}"
        );
        assert!(!guard.admits());
        assert!(!guard.is_allocated());
        // With a margin below the free space, the same holes are admitted.
        let small = SpaceGuard::new(dir.path().to_path_buf(), 4096);
        small.unsupported.store(true, Ordering::Relaxed);
        assert_eq!(small.check(&health), Space::Enough);
        assert!(small.admits());
        // A truncated file: nothing left to allocate.
        std::fs::File::create(dir.path().join("huge")).unwrap();
        assert_eq!(guard.check(&health), Space::Allocated);
        assert!(guard.admits() && guard.is_allocated());
    }

    #[test]
    fn errors_are_all_counted_and_logged_once_per_interval() {
        let health = DiskHealth::default();
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(health.log.may_log(), Some(0));
        for _ in 0..100 {
            health.error("test", &e);
        }
        assert_eq!(health.errors(), 100);
        // All 100 fell in the interval of the first message.
        assert_eq!(health.log.may_log(), None);
        let later = std::time::Instant::now() + LOG_INTERVAL;
        assert_eq!(health.log.may_log_at(later), Some(101));
        assert_eq!(health.log.may_log_at(later), None);
    }
}
