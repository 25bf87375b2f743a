//! One conformance suite, run against every backend built: `mem` (the reference, always),
//! `rocksdb` (feature `rocksdb`, default) and `fdb` (feature `fdb`).
//!
//! Each test is written once against [`Backend`], which knows how to open, reopen and hold
//! the syncs of its store. `conformance!` stamps the whole list out per backend. The
//! FoundationDB run needs a cluster: it runs when `FDB_CLUSTER_FILE` names one, and otherwise
//! each of its tests says on the terminal that it was skipped.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use store::mem::MemStore;
#[cfg(feature = "rocksdb")]
use store::rocks::{RocksOptions, RocksStore};
use store::{Event, EventId, ReadRange, Store, StoreError, StreamName, Version, WriteBatch};

#[cfg(feature = "fdb")]
mod fdb_only;
mod props;
#[cfg(feature = "rocksdb")]
mod rocks_damage;

pub(crate) trait Backend {
    fn store(&self) -> Arc<dyn Store>;
    /// Closes the store and opens it again from what is durable.
    fn reopen(&mut self);
    /// Runs `f` while syncs are held back.
    fn with_syncs_held(&self, f: &mut dyn FnMut());
}

struct Mem(Arc<MemStore>);

impl Backend for Mem {
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
    fn reopen(&mut self) {
        // A crash loses what is unsynced and keeps the rest: what a reopen sees.
        self.0.crash();
    }
    fn with_syncs_held(&self, f: &mut dyn FnMut()) {
        let _held = self.0.hold_syncs();
        f();
    }
}

#[cfg(feature = "rocksdb")]
struct Rocks {
    dir: tempfile::TempDir,
    store: Option<Arc<RocksStore>>,
}

#[cfg(feature = "rocksdb")]
impl Rocks {
    fn new() -> Rocks {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(dir.path(), RocksOptions::default()).unwrap());
        Rocks { dir, store: Some(store) }
    }
}

#[cfg(feature = "rocksdb")]
impl Backend for Rocks {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().unwrap()
    }
    fn reopen(&mut self) {
        let store = self.store.take().unwrap();
        assert_eq!(Arc::strong_count(&store), 1, "tests drop their handles before reopening");
        drop(store);
        self.store = Some(Arc::new(RocksStore::open(self.dir.path(), RocksOptions::default()).unwrap()));
    }
    fn with_syncs_held(&self, f: &mut dyn FnMut()) {
        let _held = self.store.as_ref().unwrap().hold_syncs();
        f();
    }
}

/// Runs `test` on the backend, or says plainly that it was skipped (`Err`: why; the backend
/// needs something this machine lacks).
fn run<B: Backend>(backend: Result<B, String>, name: &str, test: fn(&mut dyn Backend)) {
    match backend {
        Ok(mut backend) => test(&mut backend),
        Err(why) => skipped(name, &why),
    }
}

/// Written to the terminal itself, which libtest does not capture, so a skip shows in a
/// plain `cargo test` run instead of passing silently.
pub(crate) fn skipped(name: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("SKIPPED {name}: {why}\n").as_bytes());
}

pub(crate) fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

pub(crate) fn event(name: &str, version: u64, id: u128) -> Event {
    Event {
        id: EventId(id),
        stream: stream(name),
        version: Version(version),
        kind: "test.event".into(),
        from: "tester".into(),
        time_ms: 1_763_776_800_000 + version,
        data: format!(r#"{{"n":{version}}}"#),
    }
}

/// Appends and waits for the completion.
pub(crate) fn append(store: &dyn Store, events: Vec<Event>) -> Result<(), StoreError> {
    let (tx, rx) = mpsc::channel();
    store.append(WriteBatch { events, meta: vec![] }, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).expect("completion runs")
}

pub(crate) fn versions(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

fn read_both_directions(backend: &mut dyn Backend) {
    let store = backend.store();
    append(&*store, (1..=10).map(|v| event("s:a", v, v as u128)).collect()).unwrap();
    append(&*store, vec![event("s:b", 1, 100)]).unwrap();
    let check = |range: ReadRange, expected: Vec<u64>| {
        assert_eq!(versions(&store.read(&stream("s:a"), range).unwrap()), expected, "{range:?}");
    };
    check(ReadRange::After { after: Version(0), limit: 3 }, vec![1, 2, 3]);
    check(ReadRange::After { after: Version(8), limit: 5 }, vec![9, 10]);
    check(ReadRange::After { after: Version(10), limit: 5 }, vec![]);
    check(ReadRange::After { after: Version(99), limit: 5 }, vec![]);
    check(ReadRange::After { after: Version(0), limit: 0 }, vec![]);
    check(ReadRange::Before { before: None, limit: 3 }, vec![8, 9, 10]);
    check(ReadRange::Before { before: Some(Version(4)), limit: 5 }, vec![1, 2, 3]);
    check(ReadRange::Before { before: Some(Version(1)), limit: 5 }, vec![]);
    check(ReadRange::Before { before: Some(Version(99)), limit: 2 }, vec![9, 10]);
    // The extremes are valid ranges (the property test found `mem` overflowing on the limit
    // and `rocksdb` on the version after the last).
    check(ReadRange::After { after: Version(u64::MAX), limit: 5 }, vec![]);
    check(ReadRange::After { after: Version(u64::MAX - 1), limit: usize::MAX }, vec![]);
    check(ReadRange::After { after: Version(7), limit: usize::MAX }, vec![8, 9, 10]);
    check(ReadRange::Before { before: Some(Version(u64::MAX)), limit: usize::MAX }, (1..=10).collect());
    check(ReadRange::Before { before: None, limit: usize::MAX }, (1..=10).collect());
    assert_eq!(store.head(&stream("s:a")).unwrap(), Version(10));
    assert_eq!(store.head(&stream("s:b")).unwrap(), Version(1));
    assert_eq!(store.head(&stream("s:c")).unwrap(), Version(0));
    // A stream whose name is a prefix of another's does not see the other's events.
    assert_eq!(store.head(&stream("s")).unwrap(), Version(0));
    let read = store.read(&stream("s:a"), ReadRange::After { after: Version(4), limit: 1 }).unwrap();
    assert_eq!(read, vec![event("s:a", 5, 5)]);
}

fn find_by_id(backend: &mut dyn Backend) {
    let store = backend.store();
    append(&*store, vec![event("s:a", 1, 7), event("s:a", 2, 8)]).unwrap();
    assert_eq!(store.find(&stream("s:a"), EventId(8)).unwrap(), Some(event("s:a", 2, 8)));
    assert_eq!(store.find(&stream("s:a"), EventId(9)).unwrap(), None);
    assert_eq!(store.find(&stream("s:b"), EventId(8)).unwrap(), None, "ids are per stream");
}

fn meta_prefix_scans(backend: &mut dyn Backend) {
    let store = backend.store();
    let put = |key: &str, value: Option<&str>| {
        let (tx, rx) = mpsc::channel();
        let meta = vec![(key.as_bytes().to_vec(), value.map(|v| v.as_bytes().to_vec()))];
        store.append(WriteBatch { events: vec![], meta }, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().unwrap();
    };
    for key in ["a:1", "b:1", "b:2", "b:3", "c:1"] {
        put(key, Some(key));
    }
    put("b:2", None);
    let keys = |prefix: &str, limit: usize| -> Vec<String> {
        store
            .meta_scan(prefix.as_bytes(), limit)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    };
    assert_eq!(keys("b:", 10), ["b:1", "b:3"]);
    assert_eq!(keys("b:", 1), ["b:1"]);
    assert_eq!(keys("", 10), ["a:1", "b:1", "b:3", "c:1"]);
    assert_eq!(keys("d", 10), Vec::<String>::new());
    assert_eq!(store.meta(b"b:3").unwrap(), Some(b"b:3".to_vec()));
}

fn acknowledged_appends_survive_reopen(backend: &mut dyn Backend) {
    {
        let store = backend.store();
        for v in 1..=50 {
            append(&*store, vec![event("s:a", v, v as u128)]).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        store.append(
            WriteBatch { events: vec![], meta: vec![(b"k".to_vec(), Some(b"v".to_vec()))] },
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv().unwrap().unwrap();
    }
    backend.reopen();
    let store = backend.store();
    assert_eq!(store.head(&stream("s:a")).unwrap(), Version(50));
    let all = store.read(&stream("s:a"), ReadRange::After { after: Version(0), limit: 100 }).unwrap();
    assert_eq!(versions(&all), (1..=50).collect::<Vec<_>>());
    assert_eq!(store.meta(b"k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(store.find(&stream("s:a"), EventId(50)).unwrap().map(|e| e.version), Some(Version(50)));
}

fn readers_never_see_unsynced_events(backend: &mut dyn Backend) {
    let store = backend.store();
    append(&*store, vec![event("s:a", 1, 1)]).unwrap();
    let (tx, rx) = mpsc::channel();
    backend.with_syncs_held(&mut || {
        let tx = tx.clone();
        store.append(
            WriteBatch { events: vec![event("s:a", 2, 2)], meta: vec![] },
            Box::new(move |r| tx.send(r).unwrap()),
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "acknowledged before the sync");
        assert_eq!(store.head(&stream("s:a")).unwrap(), Version(1));
        assert_eq!(store.find(&stream("s:a"), EventId(2)).unwrap(), None);
        let read = store.read(&stream("s:a"), ReadRange::After { after: Version(0), limit: 10 }).unwrap();
        assert_eq!(versions(&read), vec![1]);
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(store.head(&stream("s:a")).unwrap(), Version(2));
}

fn batches_are_applied_in_order(backend: &mut dyn Backend) {
    let store = backend.store();
    let (tx, rx) = mpsc::channel();
    // Many appends in flight at once: each continues the head left by the one before.
    for v in 1..=200u64 {
        let tx = tx.clone();
        store.append(
            WriteBatch { events: vec![event("s:a", v, v as u128)], meta: vec![] },
            Box::new(move |r| tx.send((v, r)).unwrap()),
        );
    }
    let mut acked: Vec<u64> = (0..200)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
        .map(|(v, r)| {
            r.unwrap();
            v
        })
        .collect();
    acked.sort_unstable();
    assert_eq!(acked, (1..=200).collect::<Vec<_>>());
    let all = store.read(&stream("s:a"), ReadRange::After { after: Version(0), limit: 500 }).unwrap();
    assert_eq!(versions(&all), (1..=200).collect::<Vec<_>>());
}

fn concurrent_appenders_share_syncs(backend: &mut dyn Backend) {
    let store = backend.store();
    let before = store.stats();
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for v in 1..=20u64 {
                    append(&*store, vec![event(&format!("s:{t}"), v, (t * 1000 + v) as u128)]).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let after = store.stats();
    assert_eq!(after.events - before.events, 640);
    assert_eq!(after.appends - before.appends, 640);
    assert!(after.syncs > before.syncs && after.syncs - before.syncs <= 640);
}

/// Stamps the suite out for one backend; `$make` is a `Result` of it (`Err`: skipped, and why).
macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn read_both_directions() {
                super::run($make, concat!(stringify!($backend), "::read_both_directions"), super::read_both_directions)
            }
            #[test]
            fn find_by_id() {
                super::run($make, concat!(stringify!($backend), "::find_by_id"), super::find_by_id)
            }
            #[test]
            fn meta_prefix_scans() {
                super::run($make, concat!(stringify!($backend), "::meta_prefix_scans"), super::meta_prefix_scans)
            }
            #[test]
            fn acknowledged_appends_survive_reopen() {
                super::run(
                    $make,
                    concat!(stringify!($backend), "::acknowledged_appends_survive_reopen"),
                    super::acknowledged_appends_survive_reopen,
                )
            }
            #[test]
            fn readers_never_see_unsynced_events() {
                super::run(
                    $make,
                    concat!(stringify!($backend), "::readers_never_see_unsynced_events"),
                    super::readers_never_see_unsynced_events,
                )
            }
            #[test]
            fn batches_are_applied_in_order() {
                super::run(
                    $make,
                    concat!(stringify!($backend), "::batches_are_applied_in_order"),
                    super::batches_are_applied_in_order,
                )
            }
            #[test]
            fn random_operations_match_a_model() {
                super::run(
                    $make,
                    concat!(stringify!($backend), "::random_operations_match_a_model"),
                    super::props::random_operations_match_a_model,
                )
            }
            #[test]
            fn concurrent_appenders_share_syncs() {
                super::run(
                    $make,
                    concat!(stringify!($backend), "::concurrent_appenders_share_syncs"),
                    super::concurrent_appenders_share_syncs,
                )
            }
        }
    };
}

conformance!(mem, Ok::<_, String>(Mem(Arc::new(MemStore::new()))));
#[cfg(feature = "rocksdb")]
conformance!(rocksdb, Ok::<_, String>(Rocks::new()));
#[cfg(feature = "fdb")]
conformance!(fdb, fdb_only::Fdb::from_env());

#[test]
fn mem_crash_loses_only_unsynced_batches() {
    let store = MemStore::manual();
    append_nowait(&store, event("s:a", 1, 1));
    store.sync();
    append_nowait(&store, event("s:a", 2, 2));
    assert_eq!(store.unsynced(), 1);
    store.crash();
    assert_eq!(store.head(&stream("s:a")).unwrap(), Version(1));
    store.wipe();
    assert_eq!(store.head(&stream("s:a")).unwrap(), Version(0));
}

fn append_nowait(store: &MemStore, event: Event) {
    store.append(WriteBatch { events: vec![event], meta: vec![] }, Box::new(|_| {}));
}

#[cfg(feature = "rocksdb")]
#[test]
fn rocksdb_group_commit_batches_under_load() {
    let backend = Rocks::new();
    let store = backend.store();
    // 64 appenders each waiting for their acknowledgement, as HTTP clients do.
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for v in 1..=50u64 {
                    append(&*store, vec![event(&format!("g:{t}"), v, (t * 1000 + v) as u128)]).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let stats = store.stats();
    let per_sync = stats.appends as f64 / stats.syncs as f64;
    println!("group commit: {} appends in {} syncs, {per_sync:.1} appends per sync", stats.appends, stats.syncs);
    assert_eq!(stats.appends, 64 * 50);
    assert!(per_sync >= 8.0, "only {per_sync:.1} appends per WAL sync");
}
