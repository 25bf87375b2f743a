//! Storage errors, split by what the caller may assume about its write.

/// What went wrong in the store. Each variant says whether state may have changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The operation definitely did not happen; nothing changed.
    #[error("storage operation failed: {0}")]
    Failed(String),
    /// A write may or may not be durable (for example the sync itself failed). A node that
    /// sees this must stop acknowledging and restart from what is on disk.
    #[error("storage write outcome unknown: {0}")]
    Uncertain(String),
    /// Stored bytes failed to decode or their checksum did not match; never served.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store is closed (the process is stopping); nothing changed.
    #[error("store is closed")]
    Closed,
}
