//! Griddle's storage: the data model, one narrow storage trait, and its backends.
//!
//! The trait is shaped like our log: append a batch of already-sequenced events (durably, as a
//! group commit), read a version range of a stream in either direction, a stream's head, find
//! an event by id, and small metadata (point reads and prefix scans). Sequencing (which version an event gets) and the rules
//! around it belong to the node core, not here.
//!
//! Promises every backend keeps (checked by the one conformance suite in `tests/it`):
//! - an append's completion runs only after the batch is durable (synced), or with an error;
//! - a reader never sees an event before it is durable;
//! - batches become visible atomically and in the order they were appended;
//! - what was acknowledged survives closing and reopening the store.
//!
//! `mem` is the reference backend and the simulator's disk; `rocksdb` (default feature) is
//! the production one; `fdb` (opt-in feature) keeps the data in a FoundationDB cluster that
//! the nodes share. None depends on tokio: completions are plain callbacks.

mod codec;
mod crc;
pub mod cursor;
mod error;
#[cfg(feature = "fdb")]
pub mod fdb;
#[cfg(any(feature = "rocksdb", feature = "fdb"))]
mod group;
pub mod mem;
mod model;
#[cfg(feature = "rocksdb")]
pub mod rocks;

pub use codec::{decode_event, encode_event};
pub use crc::{crc32c, crc32c_extend};
pub use error::StoreError;
pub use model::*;

/// A metadata key and its value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// Runs once when an append is durable (`Ok`) or has failed.
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Counters that show how well group commit works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Events appended.
    pub events: u64,
    /// Append calls (batches handed in by callers).
    pub appends: u64,
    /// Synced writes: one per group of appends.
    pub syncs: u64,
    /// Synced writes by how many appends they carried: `groups[i]` counts groups of at most
    /// [`GROUP_BOUNDS`]`[i]` appends (and more than the bound before it); larger groups
    /// count only in `syncs`.
    pub groups: [u64; GROUP_BOUNDS.len()],
    /// Memory the backend holds by design and bounds by its own settings (RocksDB: the
    /// memtables of every column family and the block cache), so a soak can tell it apart
    /// from growth that is not bounded. 0 where the backend keeps none.
    pub cache_bytes: u64,
}

/// The upper bounds of [`StoreStats::groups`].
pub const GROUP_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

impl StoreStats {
    /// Counts one synced group of `appends` appends.
    pub fn add_group(groups: &mut [u64; GROUP_BOUNDS.len()], appends: u64) {
        if let Some(i) = GROUP_BOUNDS.iter().position(|bound| appends <= *bound) {
            groups[i] += 1;
        }
    }
}

pub trait Store: Send + Sync + 'static {
    /// Queues `batch`; `done` runs after it is durable and visible, or with the error. Batches
    /// are applied in call order. Events must continue their stream's head without a gap.
    fn append(&self, batch: WriteBatch, done: Completion);

    /// Events of `stream` in `range`, oldest first.
    fn read(&self, stream: &StreamName, range: ReadRange) -> Result<Vec<Event>, StoreError>;

    /// The stream's latest durable version (0 for an empty stream).
    fn head(&self, stream: &StreamName) -> Result<Version, StoreError>;

    /// The durable event of `stream` with this id, if any.
    fn find(&self, stream: &StreamName, id: EventId) -> Result<Option<Event>, StoreError>;

    /// A durable metadata value.
    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Durable metadata whose keys start with `prefix`, in key order, at most `limit` of them.
    fn meta_scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<MetaEntry>, StoreError>;

    fn stats(&self) -> StoreStats;

    /// Writes a consistent, openable copy of everything durable into `dir`, which must not
    /// exist yet, while the store keeps serving.
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        let _ = dir;
        Err(StoreError::Failed("this store cannot take checkpoints".into()))
    }
}
