//! Errors of the storage layer.

/// Errors returned by [`super::Storage`], [`super::ObjectWriter`] and [`super::PurgeIndex`].
///
/// A corrupt or torn entry is *not* an error: it is reported as a miss and counted in
/// [`super::StorageStats::corrupt_entries`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The object is larger than `StorageConfig::max_object_size`; the writer was aborted.
    #[error("object exceeds max_object_size ({limit} bytes)")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The configuration cannot work (for example a chunk that does not fit a disk block).
    #[error("invalid storage configuration: {0}")]
    InvalidConfig(String),
    /// The key is empty or longer than [`super::MAX_KEY_LEN`].
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// The metadata exceeds one of the per-object bounds (headers, tags, host).
    #[error("invalid metadata: {0}")]
    InvalidMeta(&'static str),
    /// The writer was aborted by an earlier error and cannot be used any more.
    #[error("writer was aborted")]
    Aborted,
    /// The storage was closed.
    #[error("storage is closed")]
    Closed,
    /// An error of the foyer hybrid cache (disk tier).
    #[error("cache backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// An I/O error of the purge index log.
    #[error("index log I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The purge index log is not ours or is damaged beyond its torn tail.
    #[error("index log is invalid: {0}")]
    IndexLog(String),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<foyer::Error> for StorageError {
    fn from(e: foyer::Error) -> Self {
        StorageError::Backend(Box::new(e))
    }
}

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Task(e.to_string())
    }
}
