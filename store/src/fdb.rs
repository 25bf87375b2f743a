//! The FoundationDB backend (feature `fdb`): the same trait, with durability and ordering
//! given by a FoundationDB cluster that several Griddle nodes share.
//!
//! # Keys
//!
//! Everything lives in one tuple-encoded subspace per store prefix (`FdbOptions::prefix`), so
//! several Griddle clusters can share one FoundationDB:
//!
//! ```text
//! (prefix, "e", stream, version)  -> event, in the codec's format 1 (crate::codec)
//! (prefix, "i", stream, id)       -> version, 8 bytes big-endian   (id: 16 bytes big-endian)
//! (prefix, "h", stream)           -> head version, 8 bytes big-endian
//! (prefix, "m", key)              -> metadata value                 (key: a tuple byte string)
//! (prefix, "w", writer)           -> this writer's commit fence, 8 bytes big-endian
//! ```
//!
//! Tuple byte strings and integers keep their order, so a stream's events are one key range
//! in version order, and a metadata prefix scan is one key range in key order.
//!
//! # Writing: group commit in transactions
//!
//! As in `rocks.rs`, appenders hand batches to one writer thread through a bounded queue and
//! get their completion as a callback; the store never depends on tokio. The writer takes the
//! first waiting batch and whatever else is already queued (up to `group_events_max` events),
//! splits that group into chunks that stay well inside FoundationDB's transaction limits
//! (`transaction_bytes_max`, below its 10 MB; each chunk commits long before its 5 s), and
//! commits each chunk as one transaction, driving the crate's futures with
//! `futures::executor::block_on` on the writer thread. The crate's own network thread
//! (started once per process, [`FdbNetwork`]) does the I/O.
//!
//! One chunk's transaction, per attempt:
//!
//! ```text
//!   read (not snapshot, so each read is a conflict range):
//!     the head of every stream the chunk writes, the id key of every event, this writer's fence
//!   decide each batch in call order, against the heads as the earlier batches leave them:
//!     every id absent, versions continue the head densely  -> Write  (events, ids, head)
//!     every id present at exactly its version             -> Stored (an earlier attempt, or
//!                                                             another node, committed it: Ok)
//!     anything else (head moved by another writer, an id  -> Refused: Failed, nothing written
//!     stored at another version, a half-stored batch)        (never a gap, never an overwrite)
//!   write the fence + 1, commit
//!   commit ok           -> each batch gets its decision
//!   retryable error     -> on_error (the crate's backoff), then the whole attempt again,
//!                          reading afresh; remember if the error was "maybe committed"
//!   non-retryable, or the retry limit / timeout ran out
//!                       -> Uncertain if any attempt was "maybe committed", else Failed
//! ```
//!
//! Why a retry after `commit_unknown_result` can prove the outcome: every attempt reads the
//! head of each stream it writes and this writer's fence, and writes both. A commit that is
//! still in flight after its unknown result therefore conflicts with any later commit of this
//! writer and can never land after it. So the retry sees either every id of a batch (the
//! first attempt committed: `Stored`, Ok) or none of them (it did not, and now never will:
//! the batch is written once). Metadata writes carry no id, but the fence gives them the same
//! guarantee: an old attempt can never overwrite a later write.
//!
//! Invariants:
//! - per stream, versions in FoundationDB are dense and the head key always names the last
//!   one; a batch that does not continue the stored head is refused, not written;
//! - an event id is stored at most once per stream, with the version it was first stored at;
//! - batches are decided and committed in call order (one writer thread, chunks in order);
//! - an append completes Ok only after its transaction committed (or a committed transaction
//!   is proven to hold it); readers (each a transaction of its own) see only committed data;
//! - after an `Uncertain` outcome every later append is refused (`Failed`) until the store is
//!   opened again, as the RocksDB backend does after a failed write: the node restarts from
//!   what is stored.
//!
//! Appends still go through each partition's primary (the node's job), so one node sequences
//! each stream and transactions conflict only around a change of primary; there the check
//! against the stored head turns a stale primary's append into a clean failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use foundationdb::options::{StreamingMode, TransactionOption};
use foundationdb::tuple::Subspace;
use foundationdb::{Database, FdbError, KeySelector, RangeOption, Transaction};
use futures::executor::block_on;
use futures::future::try_join_all;
use parking_lot::{Mutex, MutexGuard};

use crate::{
    decode_event, encode_event, Completion, Event, EventId, MetaEntry, ReadRange, Store, StoreError, StoreStats,
    StreamName, Version, WriteBatch,
};

/// FoundationDB refuses values over 100,000 bytes.
const VALUE_BYTES_MAX: usize = 100_000;
/// FoundationDB refuses transactions over 10,000,000 bytes; a single batch above this (with
/// room for keys and conflict ranges) cannot be committed at all.
const BATCH_BYTES_HARD_MAX: usize = 9_000_000;
/// Bytes a key and its bookkeeping add per event, beyond the stream name (estimate).
const EVENT_OVERHEAD_BYTES: usize = 96;

#[derive(Clone, Debug)]
pub struct FdbOptions {
    /// The cluster file; `None` uses FoundationDB's default (`FDB_CLUSTER_FILE`, then
    /// `/etc/foundationdb/fdb.cluster`).
    pub cluster_file: Option<PathBuf>,
    /// The first element of every key: Griddle clusters sharing one FoundationDB use
    /// different prefixes.
    pub prefix: String,
    /// Appends waiting for the writer thread, at most.
    pub queue_len_max: usize,
    /// Events the writer takes from the queue for one group, at most.
    pub group_events_max: usize,
    /// Estimated bytes written by one transaction, at most (FoundationDB's limit is 10 MB,
    /// and it advises staying under 1 MB); a group above it is split.
    pub transaction_bytes_max: usize,
    /// How long one transaction, with its retries, may take before it gives up, in ms.
    pub transaction_timeout_ms: u32,
    /// Retries of one transaction (after conflicts or retryable errors), at most.
    pub transaction_retries_max: u32,
}

impl Default for FdbOptions {
    fn default() -> Self {
        FdbOptions {
            cluster_file: None,
            prefix: "griddle".into(),
            queue_len_max: 8192,
            group_events_max: 4096,
            transaction_bytes_max: 1_000_000,
            transaction_timeout_ms: 10_000,
            transaction_retries_max: 50,
        }
    }
}

/// FoundationDB's client network: one per process, started by the first store opened, and
/// stopped when the last handle (every store holds one) is dropped. The C client cannot start
/// it a second time in the same process, so a process that opens stores one after another
/// (tests) keeps a handle for its whole life.
#[derive(Clone)]
pub struct FdbNetwork(Arc<NetworkThread>);

struct NetworkThread {
    stop: Option<foundationdb::api::NetworkStop>,
    thread: Option<JoinHandle<()>>,
}

enum NetworkSlot {
    Never,
    /// Starting failed; the C client allows no second try in this process.
    Failed(String),
    Running(Weak<NetworkThread>),
}

static NETWORK: Mutex<NetworkSlot> = Mutex::new(NetworkSlot::Never);

impl FdbNetwork {
    /// The running network, started now if this process never started it.
    pub fn start() -> Result<FdbNetwork, StoreError> {
        let mut slot = NETWORK.lock();
        match &*slot {
            NetworkSlot::Never => {}
            NetworkSlot::Failed(error) => return Err(StoreError::Failed(error.clone())),
            NetworkSlot::Running(weak) => {
                return weak.upgrade().map(FdbNetwork).ok_or_else(|| {
                    StoreError::Failed(
                        "FoundationDB's client network was stopped in this process and cannot start again".into(),
                    )
                })
            }
        }
        let booted = FdbNetwork::boot();
        *slot = match &booted {
            Ok(network) => NetworkSlot::Running(Arc::downgrade(&network.0)),
            Err(error) => NetworkSlot::Failed(error.to_string()),
        };
        booted
    }

    /// Selects the API version and runs the network thread: at most once per process,
    /// whatever the outcome (the crate panics on a second selection of the API version).
    fn boot() -> Result<FdbNetwork, StoreError> {
        let failed = |e: FdbError| StoreError::Failed(format!("start FoundationDB's client network: {e}"));
        let (runner, wait) =
            foundationdb::api::FdbApiBuilder::default().build().map_err(failed)?.build().map_err(failed)?;
        let thread = std::thread::Builder::new()
            .name("fdb-network".into())
            .spawn(move || {
                // SAFETY: the runner runs once, on this thread only, until `stop` below.
                if let Err(error) = unsafe { runner.run() } {
                    eprintln!("FoundationDB's network thread stopped: {error}");
                }
            })
            .map_err(|e| StoreError::Failed(format!("spawn FoundationDB's network thread: {e}")))?;
        Ok(FdbNetwork(Arc::new(NetworkThread { stop: Some(wait.wait()), thread: Some(thread) })))
    }
}

impl Drop for NetworkThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            if let Err(error) = stop.stop() {
                eprintln!("stop FoundationDB's network: {error}");
                return; // Joining a network that did not stop would hang.
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The store's key layout (see the module doc).
struct Keys {
    all: Subspace,
    events: Subspace,
    ids: Subspace,
    heads: Subspace,
    meta: Subspace,
    fence: Vec<u8>,
}

impl Keys {
    fn new(prefix: &str, writer: &str) -> Keys {
        let all = Subspace::from(prefix);
        Keys {
            events: all.subspace(&"e"),
            ids: all.subspace(&"i"),
            heads: all.subspace(&"h"),
            meta: all.subspace(&"m"),
            fence: all.pack(&("w", writer)),
            all,
        }
    }

    fn event(&self, stream: &StreamName, version: Version) -> Vec<u8> {
        self.events.pack(&(stream.as_str(), version.0))
    }

    fn stream_events(&self, stream: &StreamName) -> Subspace {
        self.events.subspace(&stream.as_str())
    }

    fn id(&self, stream: &StreamName, id: EventId) -> Vec<u8> {
        self.ids.pack(&(stream.as_str(), &id.0.to_be_bytes()[..]))
    }

    fn head(&self, stream: &StreamName) -> Vec<u8> {
        self.heads.pack(&stream.as_str())
    }

    fn meta(&self, key: &[u8]) -> Vec<u8> {
        self.meta.pack(&key)
    }

    /// The key range holding every metadata key that starts with `prefix`: a tuple byte
    /// string is `0x01`, the bytes with `0x00` escaped, `0x00`; without its terminator the
    /// encoding of `prefix` starts the encoding of every key it is a prefix of.
    fn meta_prefix_range(&self, prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut begin = self.meta.pack(&prefix);
        assert_eq!(begin.pop(), Some(0), "a tuple byte string ends in its terminator");
        let end = strinc(&begin);
        (begin, end)
    }
}

/// The first key after every key that starts with `key`.
fn strinc(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while end.last() == Some(&0xff) {
        end.pop();
    }
    let last = end.last_mut().expect("tuple keys never consist of 0xff bytes only");
    *last += 1;
    end
}

fn version_bytes(value: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt("a stored version is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

pub struct FdbStore {
    db: Arc<Database>,
    keys: Arc<Keys>,
    options: FdbOptions,
    queue: Option<SyncSender<(WriteBatch, Completion)>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<Counters>,
    gate: Arc<Mutex<()>>,
    // Dropped last: the database and its transactions must go before the network stops.
    _network: FdbNetwork,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    appends: AtomicU64,
    syncs: AtomicU64,
    groups: Mutex<[u64; crate::GROUP_BOUNDS.len()]>,
}

/// Names this store's writer (its fence key): unique per open, so a reopened store never
/// conflicts with what an earlier one left in flight.
#[allow(clippy::disallowed_methods)] // The store's I/O code may read time; it only names a key.
fn writer_name() -> String {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}-{}", std::process::id(), OPENED.fetch_add(1, Ordering::Relaxed))
}

impl FdbStore {
    pub fn open(options: FdbOptions) -> Result<FdbStore, StoreError> {
        if options.prefix.is_empty() {
            return Err(StoreError::Failed("the FoundationDB key prefix must not be empty".into()));
        }
        let network = FdbNetwork::start()?;
        let path = match &options.cluster_file {
            Some(path) => Some(
                path.to_str()
                    .ok_or_else(|| StoreError::Failed(format!("cluster file {} is not UTF-8", path.display())))?
                    .to_owned(),
            ),
            None => None,
        };
        let db = Database::new(path.as_deref())
            .map_err(|e| StoreError::Failed(format!("open FoundationDB ({:?}): {e}", options.cluster_file)))?;
        let db = Arc::new(db);
        let keys = Arc::new(Keys::new(&options.prefix, &writer_name()));
        let stats = Arc::new(Counters::default());
        let gate = Arc::new(Mutex::new(()));
        let (queue, inbox) = sync_channel(options.queue_len_max);
        let writer = {
            let writer = Writer { db: db.clone(), keys: keys.clone(), stats: stats.clone(), gate: gate.clone() };
            let options = options.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer.run(&inbox, &options))
                .map_err(|e| StoreError::Failed(format!("spawn writer: {e}")))?
        };
        Ok(FdbStore { db, keys, options, queue: Some(queue), writer: Some(writer), stats, gate, _network: network })
    }

    /// Holds every commit until the guard drops: lets tests see that nothing uncommitted is
    /// visible.
    pub fn hold_syncs(&self) -> MutexGuard<'_, ()> {
        self.gate.lock()
    }

    /// Deletes every key under this store's prefix: for tests, and for retiring a cluster.
    pub fn destroy(self) -> Result<(), StoreError> {
        let (begin, end) = self.keys.all.range();
        self.transact("destroy", |trx| {
            trx.clear_range(&begin, &end);
            Box::pin(async { Ok(()) })
        })
    }

    /// Runs `body` in a transaction with FoundationDB's retry loop, and commits it (a
    /// read-only transaction commits at no cost). Used by the readers, each in a transaction
    /// of its own, so a read sees everything committed before it started.
    fn transact<T>(
        &self,
        what: &str,
        body: impl for<'t> Fn(&'t Transaction) -> Pin<Box<dyn Future<Output = Result<T, ReadError>> + 't>>,
    ) -> Result<T, StoreError> {
        let failed = |e: FdbError| StoreError::Failed(format!("{what}: {e}"));
        let mut trx = self.db.create_trx().map_err(failed)?;
        set_limits(&trx, &self.options).map_err(failed)?;
        block_on(async {
            loop {
                let error = match body(&trx).await {
                    Err(ReadError::Store(error)) => return Err(error),
                    Err(ReadError::Fdb(error)) => error,
                    Ok(value) => match trx.commit().await {
                        Ok(_) => return Ok(value),
                        Err(error) => {
                            trx = error.on_error().await.map_err(failed)?;
                            continue;
                        }
                    },
                };
                trx = trx.on_error(error).await.map_err(failed)?;
            }
        })
    }
}

impl Drop for FdbStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn set_limits(trx: &Transaction, options: &FdbOptions) -> Result<(), FdbError> {
    trx.set_option(TransactionOption::Timeout(i32::try_from(options.transaction_timeout_ms).unwrap_or(i32::MAX)))?;
    trx.set_option(TransactionOption::RetryLimit(i32::try_from(options.transaction_retries_max).unwrap_or(i32::MAX)))
}

/// A read that failed in FoundationDB (retried) or found bad data (not retried).
enum ReadError {
    Fdb(FdbError),
    Store(StoreError),
}

impl From<FdbError> for ReadError {
    fn from(error: FdbError) -> ReadError {
        ReadError::Fdb(error)
    }
}

impl From<StoreError> for ReadError {
    fn from(error: StoreError) -> ReadError {
        ReadError::Store(error)
    }
}

/// Key-value pairs of `range`, following FoundationDB's pages until `limit` or the end.
async fn read_range(trx: &Transaction, range: RangeOption<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, FdbError> {
    let mut found = Vec::new();
    let mut next = Some(RangeOption { mode: StreamingMode::WantAll, ..range });
    while let Some(range) = next {
        let page = trx.get_range(&range, 1, false).await?;
        found.extend(page.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())));
        next = range.next_range(&page);
    }
    Ok(found)
}

fn limited(begin: Vec<u8>, end: Vec<u8>, limit: usize, reverse: bool) -> RangeOption<'static> {
    RangeOption {
        begin: KeySelector::first_greater_or_equal(begin),
        end: KeySelector::first_greater_or_equal(end),
        limit: Some(limit),
        reverse,
        ..RangeOption::default()
    }
}

impl Store for FdbStore {
    fn append(&self, batch: WriteBatch, done: Completion) {
        let queue = self.queue.as_ref().expect("queue lives until drop");
        if let Err(error) = queue.send((batch, done)) {
            let (_, done) = error.0;
            done(Err(StoreError::Closed));
        }
    }

    fn read(&self, stream: &StreamName, range: ReadRange) -> Result<Vec<Event>, StoreError> {
        // FoundationDB reads a limit of 0 as "no limit".
        let (ReadRange::After { limit, .. } | ReadRange::Before { limit, .. }) = range;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (first, past) = self.keys.stream_events(stream).range();
        let (begin, end, reverse) = match range {
            ReadRange::After { after, .. } => match after.0.checked_add(1) {
                Some(next) => (self.keys.event(stream, Version(next)), past, false),
                None => return Ok(Vec::new()),
            },
            ReadRange::Before { before, .. } => {
                (first, before.map_or(past, |before| self.keys.event(stream, before)), true)
            }
        };
        let mut events = self.transact("read", |trx| {
            let range = limited(begin.clone(), end.clone(), limit, reverse);
            let stream = stream.clone();
            Box::pin(async move {
                let pairs = read_range(trx, range).await?;
                let events: Result<Vec<Event>, StoreError> =
                    pairs.iter().map(|(_, value)| decode_event(&stream, value)).collect();
                Ok(events?)
            })
        })?;
        if reverse {
            events.reverse();
        }
        Ok(events)
    }

    fn head(&self, stream: &StreamName) -> Result<Version, StoreError> {
        let key = self.keys.head(stream);
        self.transact("head", |trx| {
            let get = trx.get(&key, false);
            Box::pin(async move {
                match get.await? {
                    None => Ok(Version::ZERO),
                    Some(value) => Ok(Version(version_bytes(&value)?)),
                }
            })
        })
    }

    fn find(&self, stream: &StreamName, id: EventId) -> Result<Option<Event>, StoreError> {
        let key = self.keys.id(stream, id);
        self.transact("find", |trx| {
            let get = trx.get(&key, false);
            let (keys, stream) = (self.keys.clone(), stream.clone());
            Box::pin(async move {
                let Some(version) = get.await? else { return Ok(None) };
                let version = Version(version_bytes(&version)?);
                let value = trx.get(&keys.event(&stream, version), false).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("the id index of {stream} points at missing version {version}"))
                })?;
                Ok(Some(decode_event(&stream, &value)?))
            })
        })
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.keys.meta(key);
        self.transact("meta", |trx| {
            let get = trx.get(&key, false);
            Box::pin(async move { Ok(get.await?.map(|value| value.to_vec())) })
        })
    }

    fn meta_scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<MetaEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (begin, end) = self.keys.meta_prefix_range(prefix);
        let pairs = self.transact("meta scan", |trx| {
            let range = limited(begin.clone(), end.clone(), limit, false);
            Box::pin(async move { Ok(read_range(trx, range).await?) })
        })?;
        pairs
            .into_iter()
            .map(|(key, value)| {
                let key: foundationdb::tuple::Bytes = self
                    .keys
                    .meta
                    .unpack(&key)
                    .map_err(|e| StoreError::Corrupt(format!("a metadata key does not decode: {e:?}")))?;
                Ok((key.0.into_owned(), value))
            })
            .collect()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            events: self.stats.events.load(Ordering::Relaxed),
            appends: self.stats.appends.load(Ordering::Relaxed),
            syncs: self.stats.syncs.load(Ordering::Relaxed),
            groups: *self.stats.groups.lock(),
            cache_bytes: 0,
        }
    }
}

/// The writer thread's state: it alone writes, one transaction at a time.
struct Writer {
    db: Arc<Database>,
    keys: Arc<Keys>,
    stats: Arc<Counters>,
    gate: Arc<Mutex<()>>,
}

type Queued = (WriteBatch, Completion);

impl Writer {
    fn run(self, inbox: &Receiver<Queued>, options: &FdbOptions) {
        let mut failure: Option<String> = None;
        while let Ok(first) = inbox.recv() {
            let (group, _) = crate::group::take_queued(inbox, first, options.group_events_max);
            for chunk in chunks(group, options.transaction_bytes_max) {
                let results = match &failure {
                    // A later batch may continue the versions of the uncertain one: refuse.
                    Some(error) => {
                        vec![Err(StoreError::Failed(format!("an earlier write failed: {error}"))); chunk.len()]
                    }
                    None => {
                        let _held = self.gate.lock();
                        let batches: Vec<&WriteBatch> = chunk.iter().map(|(batch, _)| batch).collect();
                        block_on(self.commit(&batches, options))
                    }
                };
                assert_eq!(results.len(), chunk.len(), "one result per batch");
                if let Some(Err(error)) = results.iter().find(|r| matches!(r, Err(StoreError::Uncertain(_)))) {
                    failure.get_or_insert_with(|| error.to_string());
                }
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.stats.appends.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                StoreStats::add_group(&mut self.stats.groups.lock(), chunk.len() as u64);
                let events: usize = chunk.iter().map(|(batch, _)| batch.events.len()).sum();
                self.stats.events.fetch_add(events as u64, Ordering::Relaxed);
                for ((_, done), result) in chunk.into_iter().zip(results) {
                    done(result);
                }
            }
        }
        // Best effort: the fence only matters while this writer could still commit.
        let fence = self.keys.fence.clone();
        if let Ok(trx) = self.db.create_trx() {
            trx.clear(&fence);
            let _ = trx.set_option(TransactionOption::Timeout(2_000));
            let _ = block_on(trx.commit());
        }
    }

    /// Commits one chunk in one transaction with FoundationDB's retry loop; one result per
    /// batch, in order (see the module doc for the decision and for what a retry proves).
    async fn commit(&self, batches: &[&WriteBatch], options: &FdbOptions) -> Vec<Result<(), StoreError>> {
        let all = |error: StoreError| vec![Err(error); batches.len()];
        let mut maybe_committed = false;
        let give_up = |maybe_committed: bool, error: FdbError| {
            if maybe_committed {
                StoreError::Uncertain(format!("FoundationDB commit outcome unknown, and its retries ended: {error}"))
            } else {
                StoreError::Failed(format!("FoundationDB transaction: {error}"))
            }
        };
        let mut trx = match self.db.create_trx() {
            Ok(trx) => trx,
            Err(error) => return all(give_up(false, error)),
        };
        if let Err(error) = set_limits(&trx, options) {
            return all(give_up(false, error));
        }
        loop {
            let decided = match self.plan(&trx, batches).await {
                Ok(decided) => decided,
                Err(error) => match trx.on_error(error).await {
                    Ok(next) => {
                        trx = next;
                        continue;
                    }
                    Err(error) => return all(give_up(maybe_committed, error)),
                },
            };
            match trx.commit().await {
                Ok(_) => return decided,
                Err(error) => {
                    maybe_committed |= error.is_maybe_committed();
                    match error.on_error().await {
                        Ok(next) => trx = next,
                        Err(error) => return all(give_up(maybe_committed, error)),
                    }
                }
            }
        }
    }

    /// One attempt's reads, decisions and writes on `trx` (not yet committed).
    async fn plan(&self, trx: &Transaction, batches: &[&WriteBatch]) -> Result<Vec<Result<(), StoreError>>, FdbError> {
        let keys = &self.keys;
        let streams: BTreeSet<&StreamName> = batches.iter().flat_map(|b| b.events.iter().map(|e| &e.stream)).collect();
        let events: Vec<&Event> = batches.iter().flat_map(|b| b.events.iter()).collect();
        let fence = trx.get(&keys.fence, false);
        let heads = try_join_all(streams.iter().map(|stream| trx.get(&keys.head(stream), false)));
        let ids = try_join_all(events.iter().map(|event| trx.get(&keys.id(&event.stream, event.id), false)));
        let (fence, heads, ids) = futures::try_join!(fence, heads, ids)?;
        let mut state = Decider { heads: BTreeMap::new(), ids: HashMap::new(), moved: BTreeSet::new() };
        for (stream, head) in streams.into_iter().zip(heads) {
            let head = head.map_or(Ok(0), |value| version_bytes(&value));
            state.heads.insert(stream.clone(), head);
        }
        for (event, stored) in events.iter().zip(ids) {
            let stored = stored.map(|value| version_bytes(&value)).transpose();
            state.ids.insert((event.stream.clone(), event.id), stored);
        }
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let decision = state.decide(batch);
            if let Ok(Decision::Write) = decision {
                write(trx, keys, batch);
            }
            results.push(decision.map(|_| ()));
        }
        for stream in &state.moved {
            let head = *state.heads[stream].as_ref().expect("a moved head was read well");
            trx.set(&keys.head(stream), &head.to_be_bytes());
        }
        let fence = fence.map_or(Ok(0), |value| version_bytes(&value)).unwrap_or(0);
        trx.set(&keys.fence, &fence.wrapping_add(1).to_be_bytes());
        Ok(results)
    }
}

/// Splits a group, in order, into chunks of at most `bytes_max` estimated bytes (a batch
/// larger than that alone makes a chunk; `decide` refuses it if FoundationDB could not take it).
fn chunks(group: Vec<Queued>, bytes_max: usize) -> Vec<Vec<Queued>> {
    let mut chunks: Vec<Vec<Queued>> = Vec::new();
    let mut bytes = 0;
    for queued in group {
        let size = batch_bytes(&queued.0);
        match chunks.last_mut() {
            Some(chunk) if bytes + size <= bytes_max => chunk.push(queued),
            _ => {
                chunks.push(vec![queued]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    chunks
}

fn batch_bytes(batch: &WriteBatch) -> usize {
    let events: usize = batch
        .events
        .iter()
        .map(|e| 2 * e.stream.as_str().len() + e.kind.len() + e.from.len() + e.data.len() + EVENT_OVERHEAD_BYTES)
        .sum();
    let meta: usize = batch.meta.iter().map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len) + 16).sum();
    events + meta
}

enum Decision {
    /// New: write it.
    Write,
    /// Already stored, exactly (an earlier attempt committed it): nothing to write.
    Stored,
}

/// What one attempt knows while it decides its batches in order.
struct Decider {
    /// Stream heads: as read, then as the batches decided so far leave them.
    heads: BTreeMap<StreamName, Result<u64, StoreError>>,
    /// Where each event id of the chunk is stored: as read, then as written so far.
    ids: HashMap<(StreamName, EventId), Result<Option<u64>, StoreError>>,
    /// Streams whose head this attempt writes.
    moved: BTreeSet<StreamName>,
}

impl Decider {
    fn decide(&mut self, batch: &WriteBatch) -> Result<Decision, StoreError> {
        if batch_bytes(batch) > BATCH_BYTES_HARD_MAX {
            return Err(StoreError::Failed("batch is over FoundationDB's transaction size limit".into()));
        }
        let mut heads: BTreeMap<&StreamName, u64> = BTreeMap::new();
        let (mut new, mut stored) = (0, 0);
        for event in &batch.events {
            let head = match heads.get(&event.stream) {
                Some(head) => *head,
                None => self.heads[&event.stream].clone()?,
            };
            let found = self.ids[&(event.stream.clone(), event.id)].clone()?;
            match found {
                Some(version) if version == event.version.0 => stored += 1,
                Some(version) => {
                    return Err(StoreError::Failed(format!(
                        "event {} is already stored at version {version} of {}, not {}",
                        event.id, event.stream, event.version
                    )))
                }
                None if event.version.0 != head + 1 => {
                    return Err(StoreError::Failed(format!(
                        "{} is at version {head} in FoundationDB, and this batch writes {} next: another \
                         node moved it (a change of primary?)",
                        event.stream, event.version
                    )))
                }
                None => {
                    if encode_len(event) > VALUE_BYTES_MAX {
                        return Err(StoreError::Failed(format!("event {} is over 100,000 bytes", event.id)));
                    }
                    new += 1;
                    heads.insert(&event.stream, event.version.0);
                }
            }
        }
        if new > 0 && stored > 0 {
            return Err(StoreError::Failed(format!(
                "{stored} of this batch's {} events are already stored: another writer holds part of it",
                batch.events.len()
            )));
        }
        if new == 0 && !batch.events.is_empty() {
            return Ok(Decision::Stored);
        }
        for (stream, head) in heads {
            self.heads.insert(stream.clone(), Ok(head));
            self.moved.insert(stream.clone());
        }
        for event in &batch.events {
            self.ids.insert((event.stream.clone(), event.id), Ok(Some(event.version.0)));
        }
        Ok(Decision::Write)
    }
}

fn encode_len(event: &Event) -> usize {
    45 + event.kind.len() + event.from.len() + event.data.len()
}

fn write(trx: &Transaction, keys: &Keys, batch: &WriteBatch) {
    for event in &batch.events {
        trx.set(&keys.event(&event.stream, event.version), &encode_event(event));
        trx.set(&keys.id(&event.stream, event.id), &event.version.0.to_be_bytes());
    }
    for (key, value) in &batch.meta {
        match value {
            Some(value) => trx.set(&keys.meta(key), value),
            None => trx.clear(&keys.meta(key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, version: u64, id: u128) -> Event {
        Event {
            id: EventId(id),
            stream: StreamName::new(stream).unwrap(),
            version: Version(version),
            kind: "k".into(),
            from: "f".into(),
            time_ms: 0,
            data: "{}".into(),
        }
    }

    fn batch(events: Vec<Event>) -> WriteBatch {
        WriteBatch { events, meta: vec![] }
    }

    /// A decider that read `heads` and found `ids` stored.
    fn decider(heads: &[(&str, u64)], ids: &[(&str, u128, u64)]) -> Decider {
        let mut decider = Decider { heads: BTreeMap::new(), ids: HashMap::new(), moved: BTreeSet::new() };
        for (stream, head) in heads {
            decider.heads.insert(StreamName::new(*stream).unwrap(), Ok(*head));
        }
        for (stream, id, version) in ids {
            decider.ids.insert((StreamName::new(*stream).unwrap(), EventId(*id)), Ok(Some(*version)));
        }
        decider
    }

    /// Decides `batches` in order; every id not listed as stored is read as absent.
    fn check(mut decider: Decider, batches: Vec<WriteBatch>, expected: &[&str]) {
        for b in &batches {
            for e in &b.events {
                decider.ids.entry((e.stream.clone(), e.id)).or_insert(Ok(None));
            }
        }
        let got: Vec<&str> = batches
            .iter()
            .map(|b| match decider.decide(b) {
                Ok(Decision::Write) => "write",
                Ok(Decision::Stored) => "stored",
                Err(_) => "refused",
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn decisions() {
        // Dense continuation, across batches of one chunk.
        check(
            decider(&[("s", 0)], &[]),
            vec![batch(vec![event("s", 1, 1), event("s", 2, 2)]), batch(vec![event("s", 3, 3)])],
            &["write", "write"],
        );
        // A gap is refused, and what depends on it too.
        check(
            decider(&[("s", 0)], &[]),
            vec![batch(vec![event("s", 2, 2)]), batch(vec![event("s", 3, 3)])],
            &["refused", "refused"],
        );
        // Another writer moved the head: refused, never an overwrite.
        check(decider(&[("s", 5)], &[]), vec![batch(vec![event("s", 5, 9)])], &["refused"]);
        // The retry after an unknown result finds its own batch: stored, and the next one goes on.
        check(
            decider(&[("s", 2)], &[("s", 1, 1), ("s", 2, 2)]),
            vec![batch(vec![event("s", 1, 1), event("s", 2, 2)]), batch(vec![event("s", 3, 3)])],
            &["stored", "write"],
        );
        // An id stored at another version (sequenced twice by two nodes): refused.
        check(decider(&[("s", 4)], &[("s", 7, 2)]), vec![batch(vec![event("s", 5, 7)])], &["refused"]);
        // Half of a batch stored: refused.
        check(
            decider(&[("s", 1)], &[("s", 1, 1)]),
            vec![batch(vec![event("s", 1, 1), event("s", 2, 2)])],
            &["refused"],
        );
        // An id repeated inside one chunk: the second is refused.
        check(
            decider(&[("s", 0)], &[]),
            vec![batch(vec![event("s", 1, 1)]), batch(vec![event("s", 2, 1)])],
            &["write", "refused"],
        );
        // Metadata alone is always written.
        check(decider(&[], &[]), vec![WriteBatch { events: vec![], meta: vec![(b"k".to_vec(), None)] }], &["write"]);
    }

    #[test]
    fn chunks_stay_under_the_byte_limit_and_keep_order() {
        let queued = |n: usize| -> Queued {
            let mut e = event("s", n as u64, n as u128);
            e.data = "x".repeat(1000);
            (batch(vec![e]), Box::new(|_| {}))
        };
        let per = batch_bytes(&queued(1).0);
        let chunks = chunks((1..=10).map(queued).collect(), per * 3);
        let shape: Vec<Vec<u64>> =
            chunks.iter().map(|c| c.iter().map(|(b, _)| b.events[0].version.0).collect()).collect();
        assert_eq!(shape, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]);
    }

    #[test]
    fn keys_keep_order_and_meta_prefixes() {
        let keys = Keys::new("g", "w");
        let s = StreamName::new("s").unwrap();
        assert!(keys.event(&s, Version(9)) < keys.event(&s, Version(10)));
        assert!(keys.event(&s, Version(255)) < keys.event(&s, Version(256)));
        let (first, past) = keys.stream_events(&s).range();
        assert!(first < keys.event(&s, Version(0)) && keys.event(&s, Version(u64::MAX)) < past);
        // A stream whose name extends another's is outside the other's range.
        assert!(keys.event(&StreamName::new("s2").unwrap(), Version(1)) > past);
        for (prefix, key, inside) in [
            (&b"b:"[..], &b"b:1"[..], true),
            (b"b:", b"b:", true),
            (b"b:", b"b", false),
            (b"b:", b"c:1", false),
            (b"", b"a", true),
            (b"a\0", b"a\0x", true),
            (b"a\0", b"a", false),
            (b"a\0", b"a\x01", false),
        ] {
            let (begin, end) = keys.meta_prefix_range(prefix);
            let k = keys.meta(key);
            assert_eq!(begin <= k && k < end, inside, "{prefix:?} {key:?}");
        }
    }
}
