//! The FoundationDB backend in the suite, and what only it promises: idempotent appends of
//! the same event from several machines, refusal of a stale writer, groups split to fit
//! FoundationDB's transaction limits, and prefixes that keep clusters apart.
//!
//! Runs against the cluster that `FDB_CLUSTER_FILE` names, each test under a prefix of its
//! own that it deletes afterwards; without it every test here says that it was skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use store::fdb::{FdbNetwork, FdbOptions, FdbStore};
use store::{EventId, ReadRange, Store, StoreError, Version, WriteBatch};

use super::{append, event, skipped, stream, versions, Backend};

/// The client network, kept for the whole test process: FoundationDB's C client starts it
/// once per process, and the tests open and close many stores one after another. (It is not
/// stopped at exit; a test process has nothing left to lose then.)
static NETWORK: OnceLock<FdbNetwork> = OnceLock::new();

/// Options for a fresh prefix on the cluster named by `FDB_CLUSTER_FILE`, or why not.
fn cluster() -> Result<FdbOptions, String> {
    let Some(file) = std::env::var_os("FDB_CLUSTER_FILE") else {
        return Err("set FDB_CLUSTER_FILE to a FoundationDB cluster file to run it".into());
    };
    if NETWORK.get().is_none() {
        let network = FdbNetwork::start().map_err(|e| e.to_string())?;
        let _ = NETWORK.set(network);
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("griddle-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    Ok(FdbOptions { cluster_file: Some(file.into()), prefix, ..FdbOptions::default() })
}

pub(crate) struct Fdb {
    options: FdbOptions,
    store: Option<Arc<FdbStore>>,
}

impl Fdb {
    pub(crate) fn from_env() -> Result<Fdb, String> {
        let options = cluster()?;
        let store = FdbStore::open(options.clone()).map_err(|e| format!("open: {e}"))?;
        Ok(Fdb { options, store: Some(Arc::new(store)) })
    }
}

impl Backend for Fdb {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().unwrap()
    }
    fn reopen(&mut self) {
        let store = self.store.take().unwrap();
        assert_eq!(Arc::strong_count(&store), 1, "tests drop their handles before reopening");
        drop(store);
        self.store = Some(Arc::new(FdbStore::open(self.options.clone()).unwrap()));
    }
    fn with_syncs_held(&self, f: &mut dyn FnMut()) {
        let _held = self.store.as_ref().unwrap().hold_syncs();
        f();
    }
}

impl Drop for Fdb {
    fn drop(&mut self) {
        if let Some(store) = self.store.take().and_then(|store| Arc::try_unwrap(store).ok()) {
            let destroyed = store.destroy();
            // A test that failed already says why; a second panic would only abort the run.
            if !std::thread::panicking() {
                destroyed.expect("delete the test's prefix");
            }
        }
    }
}

/// Runs `test` with fresh options, or says it was skipped.
fn with_cluster(name: &str, test: impl FnOnce(FdbOptions)) {
    match cluster() {
        Ok(options) => test(options),
        Err(why) => skipped(name, &why),
    }
}

fn open(options: &FdbOptions) -> Arc<FdbStore> {
    Arc::new(FdbStore::open(options.clone()).unwrap())
}

fn destroy(store: Arc<FdbStore>) {
    Arc::try_unwrap(store).ok().expect("the test holds the last handle").destroy().unwrap();
}

/// The seeds' unsolved case: the same event appended from several machines (a retry that
/// reached another node) is stored once, and both appends succeed.
#[test]
fn the_same_event_from_two_machines_is_stored_once() {
    with_cluster("fdb_only::the_same_event_from_two_machines_is_stored_once", |options| {
        let (a, b) = (open(&options), open(&options));
        append(&*a, vec![event("s:a", 1, 7), event("s:a", 2, 8)]).unwrap();
        append(&*b, vec![event("s:a", 1, 7), event("s:a", 2, 8)]).unwrap();
        let all = b.read(&stream("s:a"), ReadRange::After { after: Version(0), limit: 10 }).unwrap();
        assert_eq!(all, vec![event("s:a", 1, 7), event("s:a", 2, 8)]);
        assert_eq!(a.head(&stream("s:a")).unwrap(), Version(2));
        drop(b);
        destroy(a);
    });
}

/// A writer whose idea of the head is stale (a primary that has not yet seen that it lost
/// its partition) is refused, definitely: it writes no gap and overwrites nothing.
#[test]
fn a_stale_writer_is_refused() {
    with_cluster("fdb_only::a_stale_writer_is_refused", |options| {
        let (a, b) = (open(&options), open(&options));
        append(&*a, vec![event("s:a", 1, 1), event("s:a", 2, 2)]).unwrap();
        let check = |events, what| match append(&*b, events) {
            Err(StoreError::Failed(_)) => {}
            other => panic!("{what}: expected a definite failure, got {other:?}"),
        };
        check(vec![event("s:a", 2, 9)], "overwrite");
        check(vec![event("s:a", 4, 10)], "gap");
        check(vec![event("s:a", 3, 1)], "an id stored at another version");
        let all = a.read(&stream("s:a"), ReadRange::After { after: Version(0), limit: 10 }).unwrap();
        assert_eq!(all, vec![event("s:a", 1, 1), event("s:a", 2, 2)]);
        assert_eq!(a.find(&stream("s:a"), EventId(9)).unwrap(), None);
        // The writer goes on for streams it does sequence, and for this one from the real head.
        append(&*b, vec![event("s:a", 3, 3), event("s:b", 1, 4)]).unwrap();
        drop(b);
        destroy(a);
    });
}

/// A group larger than one transaction may hold is committed as several, in order.
#[test]
fn big_groups_are_split_into_transactions() {
    with_cluster("fdb_only::big_groups_are_split_into_transactions", |options| {
        let store = open(&FdbOptions { transaction_bytes_max: 20_000, ..options });
        let (tx, rx) = mpsc::channel();
        let before = store.stats();
        for v in 1..=100u64 {
            let mut e = event("s:big", v, u128::from(v));
            e.data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000));
            let tx = tx.clone();
            store.append(WriteBatch { events: vec![e], meta: vec![] }, Box::new(move |r| tx.send(r).unwrap()));
        }
        for _ in 0..100 {
            rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
        }
        let after = store.stats();
        assert!(after.syncs - before.syncs >= 5, "{} transactions for 100 KB", after.syncs - before.syncs);
        let all = store.read(&stream("s:big"), ReadRange::After { after: Version(0), limit: 200 }).unwrap();
        assert_eq!(versions(&all), (1..=100).collect::<Vec<_>>());
        destroy(store);
    });
}

/// Two prefixes on one cluster are two stores that never see each other.
#[test]
fn prefixes_keep_clusters_apart() {
    with_cluster("fdb_only::prefixes_keep_clusters_apart", |options| {
        let one = open(&options);
        let other = open(&FdbOptions { prefix: format!("{}-other", options.prefix), ..options });
        append(&*one, vec![event("s:a", 1, 1)]).unwrap();
        append(&*other, vec![event("s:a", 1, 2), event("s:a", 2, 3)]).unwrap();
        assert_eq!(one.head(&stream("s:a")).unwrap(), Version(1));
        assert_eq!(other.head(&stream("s:a")).unwrap(), Version(2));
        assert_eq!(one.find(&stream("s:a"), EventId(2)).unwrap(), None);
        destroy(one);
        destroy(other);
    });
}
