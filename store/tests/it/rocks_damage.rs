//! Damage on a real RocksDB disk: a record changed under the store (its checksum fails), a
//! record under the wrong key, a torn WAL tail (a crash in the middle of a group's write) and
//! a damaged WAL before its tail. Damage is `Corrupt`, never served; a torn tail only drops
//! what was never synced.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use store::rocks::{RocksOptions, RocksStore};
use store::{EventId, ReadRange, Store, StoreError, Version, WriteBatch};

use crate::{append, event, stream, versions};

fn raw(path: &Path) -> DB {
    let families = ["events", "ids", "meta"].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    DB::open_cf_descriptors(&Options::default(), path, families).unwrap()
}

fn event_key(name: &str, version: u64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn filled(dir: &Path) {
    let store = RocksStore::open(dir, RocksOptions::default()).unwrap();
    for version in 1..=5 {
        append(&store, vec![event("chat:a:b", version, 100 + u128::from(version))]).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let meta = vec![(b"r/0001/promised".to_vec(), Some(b"epoch".to_vec()))];
    store.append(WriteBatch { events: vec![], meta }, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().unwrap();
}

fn is_corrupt<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Corrupt(_)))
}

#[test]
fn a_changed_record_is_corrupt_never_served() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path());
    {
        // One bit of the event's text, and one of a metadata value, changed under the store:
        // RocksDB's own checksums are fine (it wrote these bytes), ours are not.
        let db = raw(dir.path());
        let events = db.cf_handle("events").unwrap();
        let mut value = db.get_cf(events, event_key("chat:a:b", 3)).unwrap().unwrap();
        let last = value.len() - 2;
        value[last] ^= 0x01;
        db.put_cf(events, event_key("chat:a:b", 3), value).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        let mut value = db.get_cf(meta, b"r/0001/promised").unwrap().unwrap();
        value[6] ^= 0x20;
        db.put_cf(meta, b"r/0001/promised", value).unwrap();
    }
    let store = RocksStore::open(dir.path(), RocksOptions::default()).unwrap();
    let name = stream("chat:a:b");
    assert!(is_corrupt(store.read(&name, ReadRange::After { after: Version(0), limit: 10 })));
    assert!(is_corrupt(store.read(&name, ReadRange::Before { before: None, limit: 3 })));
    assert!(is_corrupt(store.find(&name, EventId(103))));
    // The records around it are intact and still served.
    assert_eq!(versions(&store.read(&name, ReadRange::After { after: Version(3), limit: 10 }).unwrap()), [4, 5]);
    assert_eq!(store.find(&name, EventId(104)).unwrap().unwrap().version, Version(4));
    assert!(is_corrupt(store.meta(b"r/0001/promised")));
    assert!(is_corrupt(store.meta_scan(b"r/", 10)));
}

#[test]
fn a_record_under_another_key_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path());
    {
        let db = raw(dir.path());
        let (events, ids) = (db.cf_handle("events").unwrap(), db.cf_handle("ids").unwrap());
        // Version 2's bytes copied over version 4 (a misdirected write), and id 101's index
        // pointing at version 5.
        let two = db.get_cf(events, event_key("chat:a:b", 2)).unwrap().unwrap();
        db.put_cf(events, event_key("chat:a:b", 4), two).unwrap();
        let mut id_key = b"chat:a:b\0".to_vec();
        id_key.extend_from_slice(&101u128.to_be_bytes());
        db.put_cf(ids, id_key, 5u64.to_be_bytes()).unwrap();
    }
    let store = RocksStore::open(dir.path(), RocksOptions::default()).unwrap();
    let name = stream("chat:a:b");
    assert!(is_corrupt(store.read(&name, ReadRange::After { after: Version(3), limit: 1 })));
    assert!(is_corrupt(store.find(&name, EventId(101))));
}

fn wal(dir: &Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log") && path.metadata().unwrap().len() > 0)
        .collect();
    logs.sort();
    logs.pop().expect("a WAL with the writes")
}

/// Writes 5 events, each synced, and leaves them in the WAL only (RocksDB does not flush the
/// memtable when it closes with the WAL on), as after a crash.
fn unflushed(dir: &Path) -> std::path::PathBuf {
    filled(dir);
    wal(dir)
}

#[test]
fn a_torn_wal_tail_drops_only_the_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = unflushed(dir.path());
    // A crash in the middle of the last group's write: its record is cut short.
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 7).unwrap();
    let store = RocksStore::open(dir.path(), RocksOptions::default()).unwrap();
    let name = stream("chat:a:b");
    // The last write was the metadata group; every event before it is intact.
    assert_eq!(
        versions(&store.read(&name, ReadRange::After { after: Version(0), limit: 10 }).unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(store.meta(b"r/0001/promised").unwrap(), None);
}

#[test]
fn a_damaged_wal_before_its_tail_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = unflushed(dir.path());
    let mut bytes = std::fs::read(&log).unwrap();
    // Inside the first records: later, synced records follow it.
    bytes[40] ^= 0xff;
    std::fs::write(&log, bytes).unwrap();
    let opened = RocksStore::open(dir.path(), RocksOptions::default());
    assert!(matches!(opened, Err(StoreError::Corrupt(_))), "{:?}", opened.err());
}
