//! The in-memory backend: the reference every other backend is tested against, and the
//! simulator's disk.
//!
//! It keeps what was written apart from what was synced. In the default mode every append is
//! synced at once. [`MemStore::hold_syncs`] keeps appends unsynced until its guard drops, and
//! a store made with [`MemStore::manual`] syncs only when [`MemStore::sync`] is called, so a
//! simulated [`MemStore::crash`] loses every unsynced batch, and [`MemStore::wipe`] loses
//! everything. Readers only ever see synced state.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use crate::{Completion, Event, EventId, ReadRange, Store, StoreError, StoreStats, StreamName, Version, WriteBatch};

#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    synced: Tables,
    unsynced: Vec<(WriteBatch, Completion)>,
    manual: bool,
    holds: usize,
    stats: StoreStats,
    /// A sync failed: like the RocksDB backend, refuse every later write until the process
    /// restarts (a crash).
    failed: bool,
}

#[derive(Default)]
struct Tables {
    streams: HashMap<StreamName, Vec<Event>>,
    ids: HashMap<(StreamName, EventId), Version>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Tables {
    fn head(&self, stream: &StreamName) -> Version {
        Version(self.streams.get(stream).map_or(0, |events| events.len() as u64))
    }

    fn apply(&mut self, batch: WriteBatch) {
        for event in batch.events {
            let head = self.head(&event.stream);
            assert_eq!(event.version, head.next(), "append to {} must continue its head", event.stream);
            let previous = self.ids.insert((event.stream.clone(), event.id), event.version);
            assert!(previous.is_none(), "event id {} appended twice to {}", event.id, event.stream);
            self.streams.entry(event.stream.clone()).or_default().push(event);
        }
        for (key, value) in batch.meta {
            match value {
                Some(value) => self.meta.insert(key, value),
                None => self.meta.remove(&key),
            };
        }
    }
}

/// Keeps a [`MemStore`]'s appends unsynced while it lives; dropping it syncs them.
pub struct SyncHold<'a> {
    store: &'a MemStore,
}

impl Drop for SyncHold<'_> {
    fn drop(&mut self) {
        let done = {
            let mut inner = self.store.inner.lock();
            inner.holds -= 1;
            if inner.holds == 0 && !inner.manual {
                inner.sync()
            } else {
                Vec::new()
            }
        };
        run(done);
    }
}

impl Inner {
    /// Makes every unsynced batch durable; returns their completions to run outside the lock.
    fn sync(&mut self) -> Vec<Completion> {
        if self.unsynced.is_empty() {
            return Vec::new();
        }
        self.stats.syncs += 1;
        StoreStats::add_group(&mut self.stats.groups, self.unsynced.len() as u64);
        let mut done = Vec::with_capacity(self.unsynced.len());
        for (batch, completion) in std::mem::take(&mut self.unsynced) {
            self.synced.apply(batch);
            done.push(completion);
        }
        done
    }
}

fn run(done: Vec<Completion>) {
    for completion in done {
        completion(Ok(()));
    }
}

impl MemStore {
    /// A store that syncs every append at once.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// A store that syncs only when [`MemStore::sync`] is called (the simulator's disk).
    pub fn manual() -> MemStore {
        let store = MemStore::default();
        store.inner.lock().manual = true;
        store
    }

    pub fn hold_syncs(&self) -> SyncHold<'_> {
        self.inner.lock().holds += 1;
        SyncHold { store: self }
    }

    /// Syncs everything written so far and runs those appends' completions.
    pub fn sync(&self) {
        let done = self.inner.lock().sync();
        run(done);
    }

    /// Number of appends written but not yet synced.
    pub fn unsynced(&self) -> usize {
        self.inner.lock().unsynced.len()
    }

    /// A sync that fails with EIO: the unsynced appends are made durable (`applied`) or lost,
    /// and every one of them completes with `Uncertain`, as a real failed fsync leaves them.
    pub fn fail_sync(&self, applied: bool) {
        let pending = {
            let mut inner = self.inner.lock();
            inner.failed = true;
            let pending = std::mem::take(&mut inner.unsynced);
            if applied {
                for (batch, _) in &pending {
                    inner.synced.apply(batch.clone());
                }
            }
            pending
        };
        for (_, completion) in pending {
            completion(Err(StoreError::Uncertain("EIO from the simulated disk".into())));
        }
    }

    /// A process crash: unsynced appends are lost and their completions never run.
    pub fn crash(&self) {
        self.crash_keeping(0);
    }

    /// A process crash in which the first `kept` unsynced appends happened to reach the disk
    /// (durable, but never acknowledged) and the rest are lost: a random suffix of what was
    /// not synced, as a real crash loses it.
    pub fn crash_keeping(&self, kept: usize) {
        let mut inner = self.inner.lock();
        inner.failed = false;
        let unsynced = std::mem::take(&mut inner.unsynced);
        for (batch, _) in unsynced.into_iter().take(kept) {
            inner.synced.apply(batch);
        }
    }

    /// A disk wipe: everything is lost.
    pub fn wipe(&self) {
        let mut inner = self.inner.lock();
        inner.unsynced.clear();
        inner.synced = Tables::default();
    }
}

impl Store for MemStore {
    fn append(&self, batch: WriteBatch, done: Completion) {
        if self.inner.lock().failed {
            done(Err(StoreError::Failed("an earlier sync failed; restart from the disk".into())));
            return;
        }
        let completions = {
            let mut inner = self.inner.lock();
            inner.stats.appends += 1;
            inner.stats.events += batch.events.len() as u64;
            inner.unsynced.push((batch, done));
            if inner.manual || inner.holds > 0 {
                Vec::new()
            } else {
                inner.sync()
            }
        };
        run(completions);
    }

    fn read(&self, stream: &StreamName, range: ReadRange) -> Result<Vec<Event>, StoreError> {
        let inner = self.inner.lock();
        let events = inner.synced.streams.get(stream).map_or(&[][..], Vec::as_slice);
        // Version v lives at index v - 1.
        let slice = match range {
            ReadRange::After { after, limit } => {
                let start = (after.0 as usize).min(events.len());
                // Any limit is valid, `usize::MAX` too (found by the store property test).
                &events[start..start.saturating_add(limit).min(events.len())]
            }
            ReadRange::Before { before, limit } => {
                let end = before.map_or(events.len(), |b| (b.0.saturating_sub(1) as usize).min(events.len()));
                &events[end.saturating_sub(limit)..end]
            }
        };
        Ok(slice.to_vec())
    }

    fn head(&self, stream: &StreamName) -> Result<Version, StoreError> {
        Ok(self.inner.lock().synced.head(stream))
    }

    fn find(&self, stream: &StreamName, id: EventId) -> Result<Option<Event>, StoreError> {
        let inner = self.inner.lock();
        let Some(version) = inner.synced.ids.get(&(stream.clone(), id)) else { return Ok(None) };
        Ok(Some(inner.synced.streams[stream][version.0 as usize - 1].clone()))
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.lock().synced.meta.get(key).cloned())
    }

    fn meta_scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<crate::MetaEntry>, StoreError> {
        let inner = self.inner.lock();
        let found = inner.synced.meta.range(prefix.to_vec()..).take_while(|(key, _)| key.starts_with(prefix));
        Ok(found.take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn stats(&self) -> StoreStats {
        self.inner.lock().stats
    }
}
