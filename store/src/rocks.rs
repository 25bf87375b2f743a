//! The RocksDB backend, with our own group commit.
//!
//! Appenders hand batches to one writer thread through a bounded queue. The writer takes the
//! first waiting batch, then everything else already queued (up to `group_events_max`), writes
//! them as one RocksDB `WriteBatch` with `sync = true` (one WAL fsync), and only then runs
//! their completions. While one group is syncing the next one accumulates, so under load many
//! appenders share a sync and an idle store adds no delay (the seeds flushed "every 100 records
//! or every second"; we flush as soon as the previous flush is done).
//!
//! Column families: `events` (stream, 0, version) -> encoded event; `ids` (stream, 0, id) ->
//! version; `meta` (key) -> value. Stream names never contain the zero byte. RocksDB publishes
//! a write to readers only after its WAL write (and here its sync) returned, so a reader never
//! sees an unsynced event.
//!
//! Damage: every record carries a CRC-32C of our own on top of RocksDB's block and WAL
//! checksums (events in their encoding, `codec.rs`; metadata values in an envelope
//! `[0xC5][crc of key and value: 4][value]`, in stores created with it, marked by the meta key
//! [`FORMAT_KEY`]); an id's index entry must point at an event with that id, and an event
//! must sit under its own version. Anything that fails, and RocksDB's own `Corruption`, is
//! `StoreError::Corrupt`: never served. The WAL is replayed with
//! `TolerateCorruptedTailRecords`: a record torn by a crash in the middle of a group's write
//! (never synced, so never acknowledged) is dropped; damage anywhere before the tail refuses
//! to open, rather than silently rolling the store back to before it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, MutexGuard};
use rocksdb::{
    ColumnFamilyDescriptor, DBRecoveryMode, Direction, ErrorKind, IteratorMode, Options, ReadOptions, WriteOptions, DB,
};

use crate::{
    decode_event, encode_event, Completion, Event, EventId, ReadRange, Store, StoreError, StoreStats, StreamName,
    Version, WriteBatch,
};

const CF_EVENTS: &str = "events";
/// How many appends the previous group must have held before the writer waits for more,
/// like PostgreSQL's `commit_siblings`: a store with one appender at a time never waits.
const GROUP_SIBLINGS_MIN: usize = 2;
const CF_IDS: &str = "ids";
const CF_META: &str = "meta";
/// Present (value `2`) in stores whose metadata values carry a checksum envelope.
pub const FORMAT_KEY: &[u8] = b"\0store-format";
const META_CHECKED: u8 = 0xC5;

#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// RocksDB's own file-descriptor budget; the process needs the rest for connections.
    pub max_open_files: i32,
    /// Appends waiting for the writer thread, at most.
    pub queue_len_max: usize,
    /// Events in one group commit, at most.
    pub group_events_max: usize,
    /// When the previous group held several appends (the store is busy), how long after a
    /// group's first append the writer collects more before syncing, in microseconds, like
    /// PostgreSQL's `commit_delay`. An idle store never waits. 0 turns it off.
    pub group_delay_us: u64,
    /// Bytes a column family's memtable takes before it is flushed to an SST file
    /// (RocksDB's `write_buffer_size`; its default is 64 MiB). Each family keeps at most two.
    pub write_buffer_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            max_open_files: 256,
            queue_len_max: 8192,
            group_events_max: 4096,
            group_delay_us: 200,
            write_buffer_bytes: 64 << 20,
        }
    }
}

pub struct RocksStore {
    db: Arc<DB>,
    queue: Option<SyncSender<(WriteBatch, Completion)>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<Counters>,
    gate: Arc<Mutex<()>>,
    /// Metadata values carry the checksum envelope (every store created since it exists).
    checked: bool,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    appends: AtomicU64,
    syncs: AtomicU64,
    groups: parking_lot::Mutex<[u64; crate::GROUP_BOUNDS.len()]>,
}

impl RocksStore {
    pub fn open(path: &Path, options: RocksOptions) -> Result<RocksStore, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_open_files(options.max_open_files);
        db_options.set_paranoid_checks(true);
        db_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_options.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        db_options.set_write_buffer_size(options.write_buffer_bytes);
        let families =
            [CF_EVENTS, CF_IDS, CF_META].into_iter().map(|name| ColumnFamilyDescriptor::new(name, db_options.clone()));
        let db = DB::open_cf_descriptors(&db_options, path, families)
            .map_err(|e| error(&format!("open {}", path.display()), e))?;
        let checked = checked_format(&db)?;
        let db = Arc::new(db);
        let stats = Arc::new(Counters::default());
        let gate = Arc::new(Mutex::new(()));
        let (queue, inbox) = sync_channel(options.queue_len_max);
        let writer = {
            let (db, stats, gate) = (db.clone(), stats.clone(), gate.clone());
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || write_groups(&db, &inbox, &stats, &gate, &options, checked))
                .map_err(|e| StoreError::Failed(format!("spawn writer: {e}")))?
        };
        Ok(RocksStore { db, queue: Some(queue), writer: Some(writer), stats, gate, checked })
    }

    /// Holds every sync until the guard drops: lets tests see that nothing unsynced is visible.
    pub fn hold_syncs(&self) -> MutexGuard<'_, ()> {
        self.gate.lock()
    }

    /// Memtables of every column family, and the block cache. The families are opened with
    /// copies of one `Options`, whose table factory (and so its default block cache) they
    /// share: its usage is counted once.
    fn cache_bytes(&self) -> u64 {
        let property = |cf: &rocksdb::ColumnFamily, name: &str| self.db.property_int_value_cf(cf, name).ok().flatten();
        let memtables: u64 = [CF_EVENTS, CF_IDS, CF_META]
            .into_iter()
            .filter_map(|name| property(self.cf(name), "rocksdb.cur-size-all-mem-tables"))
            .sum();
        memtables + property(self.cf(CF_EVENTS), "rocksdb.block-cache-usage").unwrap_or(0)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// RocksDB's own corruption (a block or WAL checksum, a missing file) is ours too.
fn error(what: &str, e: rocksdb::Error) -> StoreError {
    match e.kind() {
        ErrorKind::Corruption => StoreError::Corrupt(format!("{what}: {e}")),
        _ => StoreError::Failed(format!("{what}: {e}")),
    }
}

/// Whether metadata values carry the envelope: yes in a store created empty by this code (it
/// marks itself, synced, before any write), no in an older one.
fn checked_format(db: &DB) -> Result<bool, StoreError> {
    let meta = db.cf_handle(CF_META).expect("cf");
    match db.get_cf(meta, FORMAT_KEY).map_err(|e| error("read the store format", e))? {
        Some(value) => Ok(value == b"2"),
        None => {
            let empty = [CF_EVENTS, CF_IDS, CF_META].into_iter().all(|name| {
                let cf = db.cf_handle(name).expect("cf");
                db.iterator_cf(cf, IteratorMode::Start).next().is_none()
            });
            if empty {
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                db.put_cf_opt(meta, FORMAT_KEY, b"2", &sync).map_err(|e| error("mark the store format", e))?;
            }
            Ok(empty)
        }
    }
}

fn seal_meta(key: &[u8], value: &[u8]) -> Vec<u8> {
    let crc = crate::crc32c_extend(crate::crc32c(key), value);
    let mut sealed = Vec::with_capacity(5 + value.len());
    sealed.push(META_CHECKED);
    sealed.extend_from_slice(&crc.to_be_bytes());
    sealed.extend_from_slice(value);
    sealed
}

fn open_meta(key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("metadata {:?} fails its checksum", String::from_utf8_lossy(key)));
    if sealed.len() < 5 || sealed[0] != META_CHECKED {
        return Err(corrupt());
    }
    let stored = u32::from_be_bytes(sealed[1..5].try_into().expect("4 bytes"));
    if crate::crc32c_extend(crate::crc32c(key), &sealed[5..]) != stored {
        return Err(corrupt());
    }
    Ok(sealed[5..].to_vec())
}

fn key(stream: &StreamName, suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.as_str().len() + 1 + suffix.len());
    key.extend_from_slice(stream.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(suffix);
    key
}

fn event_key(stream: &StreamName, version: Version) -> Vec<u8> {
    key(stream, &version.0.to_be_bytes())
}

fn write_groups(
    db: &DB,
    inbox: &Receiver<(WriteBatch, Completion)>,
    stats: &Counters,
    gate: &Mutex<()>,
    options: &RocksOptions,
    checked: bool,
) {
    let (events_cf, ids_cf, meta_cf) =
        (db.cf_handle(CF_EVENTS).expect("cf"), db.cf_handle(CF_IDS).expect("cf"), db.cf_handle(CF_META).expect("cf"));
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let mut previous_group_len = 0;
    let mut failure: Option<String> = None;
    while let Ok(first) = inbox.recv() {
        let (mut group, mut events) = crate::group::take_queued(inbox, first, options.group_events_max);
        if previous_group_len >= GROUP_SIBLINGS_MIN && options.group_delay_us > 0 {
            wait_for_more(inbox, &mut group, &mut events, options);
        }
        previous_group_len = group.len();
        let mut batch = rocksdb::WriteBatch::default();
        for (writes, _) in &group {
            for event in &writes.events {
                batch.put_cf(events_cf, event_key(&event.stream, event.version), encode_event(event));
                batch.put_cf(ids_cf, key(&event.stream, &event.id.0.to_be_bytes()), event.version.0.to_be_bytes());
            }
            for (meta_key, value) in &writes.meta {
                match value {
                    Some(value) if checked => batch.put_cf(meta_cf, meta_key, seal_meta(meta_key, value)),
                    Some(value) => batch.put_cf(meta_cf, meta_key, value),
                    None => batch.delete_cf(meta_cf, meta_key),
                }
            }
        }
        let result = match &failure {
            // Later batches may continue versions of the failed one: refuse them all.
            Some(error) => Err(StoreError::Failed(format!("an earlier write failed: {error}"))),
            None => {
                let _held = gate.lock();
                db.write_opt(batch, &sync).map_err(|e| match e.kind() {
                    // RocksDB stopped writing on damage it found (a compaction read a bad
                    // block): this write did not happen, and the disk needs repair.
                    ErrorKind::Corruption => StoreError::Corrupt(format!("synced write refused: {e}")),
                    _ => StoreError::Uncertain(format!("synced write: {e}")),
                })
            }
        };
        if let (Err(error), None) = (&result, &failure) {
            failure = Some(error.to_string());
        }
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.appends.fetch_add(group.len() as u64, Ordering::Relaxed);
        StoreStats::add_group(&mut stats.groups.lock(), group.len() as u64);
        stats.events.fetch_add(events as u64, Ordering::Relaxed);
        for (_, done) in group {
            done(result.clone());
        }
    }
}

/// Under load, lets the appenders that are on their way join this group: collects what
/// arrives within `group_delay_us` of the group's first append (or until the group is full).
/// Waiting only until the group matched the previous one's size let group sizes stall low
/// (7.3 to 10.2 appends per sync with 64 appenders over HTTP, against 10.2 to 12.3 now).
#[allow(clippy::disallowed_methods)] // The store's writer thread is I/O code: it may read time.
fn wait_for_more(
    inbox: &Receiver<(WriteBatch, Completion)>,
    group: &mut Vec<(WriteBatch, Completion)>,
    events: &mut usize,
    options: &RocksOptions,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(options.group_delay_us);
    while *events < options.group_events_max {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match inbox.recv_timeout(left) {
            Ok(next) => {
                *events += next.0.events.len();
                group.push(next);
            }
            Err(_) => return,
        }
    }
}

impl Store for RocksStore {
    fn append(&self, batch: WriteBatch, done: Completion) {
        let queue = self.queue.as_ref().expect("queue lives until drop");
        if let Err(error) = queue.send((batch, done)) {
            let (_, done) = error.0;
            done(Err(StoreError::Closed));
        }
    }

    fn read(&self, stream: &StreamName, range: ReadRange) -> Result<Vec<Event>, StoreError> {
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(event_key(stream, Version(0)));
        options.set_iterate_upper_bound(event_key(stream, Version(u64::MAX)));
        let (start, direction, limit) = match range {
            // Nothing follows the last version; `next` would overflow (found by the store
            // property test; the fdb backend already checked).
            ReadRange::After { after, .. } if after.0 == u64::MAX => return Ok(Vec::new()),
            ReadRange::After { after, limit } => (event_key(stream, after.next()), Direction::Forward, limit),
            ReadRange::Before { before, limit } => {
                let start = before.map_or(u64::MAX, |b| b.0.saturating_sub(1));
                (event_key(stream, Version(start)), Direction::Reverse, limit)
            }
        };
        let mut events = Vec::with_capacity(limit.min(128));
        if limit == 0 {
            return Ok(events);
        }
        let iter = self.db.iterator_cf_opt(self.cf(CF_EVENTS), options, IteratorMode::From(&start, direction));
        for item in iter {
            let (key, value) = item.map_err(|e| error(&format!("read {stream}"), e))?;
            let event = decode_event(stream, &value)?;
            if key[key.len() - 8..] != event.version.0.to_be_bytes() {
                return Err(StoreError::Corrupt(format!("an event of {stream} under another version's key")));
            }
            events.push(event);
            if events.len() == limit {
                break;
            }
        }
        if matches!(direction, Direction::Reverse) {
            events.reverse();
        }
        Ok(events)
    }

    fn head(&self, stream: &StreamName) -> Result<Version, StoreError> {
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(event_key(stream, Version(0)));
        let upper = event_key(stream, Version(u64::MAX));
        let mut iter =
            self.db.iterator_cf_opt(self.cf(CF_EVENTS), options, IteratorMode::From(&upper, Direction::Reverse));
        match iter.next() {
            None => Ok(Version::ZERO),
            Some(Err(e)) => Err(error(&format!("head of {stream}"), e)),
            Some(Ok((key, _))) => {
                let suffix: [u8; 8] = key[key.len() - 8..].try_into().expect("event keys end in a version");
                Ok(Version(u64::from_be_bytes(suffix)))
            }
        }
    }

    fn find(&self, stream: &StreamName, id: EventId) -> Result<Option<Event>, StoreError> {
        let found = self
            .db
            .get_cf(self.cf(CF_IDS), key(stream, &id.0.to_be_bytes()))
            .map_err(|e| error(&format!("find in {stream}"), e))?;
        let Some(version) = found else { return Ok(None) };
        let version: [u8; 8] =
            version.as_slice().try_into().map_err(|_| StoreError::Corrupt("id index value".into()))?;
        let value = self
            .db
            .get_cf(self.cf(CF_EVENTS), event_key(stream, Version(u64::from_be_bytes(version))))
            .map_err(|e| error(&format!("find in {stream}"), e))?
            .ok_or_else(|| StoreError::Corrupt(format!("id index of {stream} points at a missing event")))?;
        let event = decode_event(stream, &value)?;
        if event.id != id {
            return Err(StoreError::Corrupt(format!("id index of {stream} points at another event")));
        }
        Ok(Some(event))
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.db.get_cf(self.cf(CF_META), key).map_err(|e| error("meta", e))?;
        match value {
            Some(sealed) if self.checked => open_meta(key, &sealed).map(Some),
            value => Ok(value),
        }
    }

    fn meta_scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<crate::MetaEntry>, StoreError> {
        let iter = self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(prefix, Direction::Forward));
        let mut found = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(|e| error("meta scan", e))?;
            if !key.starts_with(prefix) || found.len() == limit {
                break;
            }
            if &*key == FORMAT_KEY {
                continue;
            }
            let value = if self.checked { open_meta(&key, &value)? } else { value.to_vec() };
            found.push((key.to_vec(), value));
        }
        Ok(found)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            events: self.stats.events.load(Ordering::Relaxed),
            appends: self.stats.appends.load(Ordering::Relaxed),
            syncs: self.stats.syncs.load(Ordering::Relaxed),
            groups: *self.stats.groups.lock(),
            cache_bytes: self.cache_bytes(),
        }
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        // RocksDB flushes the memtables and links the live files (copying the WAL's tail),
        // so the copy holds every synced write at one point, across all column families.
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.db)
            .map_err(|e| StoreError::Failed(format!("checkpoint: {e}")))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(|e| StoreError::Failed(format!("checkpoint into {}: {e}", dir.display())))
    }
}
