//! Damaged data: what a node does when its disk gives back something that fails a checksum.
//!
//! ```text
//!  serving ──read returns Corrupt──► report: 503 for that read (never served), marker
//!     ▲                              `DAMAGED` written and synced in the data directory
//!     │                                   │ with replicas: graceful stop (refuse, answer
//!     │                                   ▼ long-polls, drain, leave the mesh)
//!     │                              set aside: the directory becomes `<dir>.damaged-<ms>`
//!     └── rejoin with a fresh disk ◄──────┘ (the previous set-aside copy is removed)
//! ```
//!
//! Every store call goes through [`Watched`], so damage found by any reader (a user's read,
//! a sync, catch-up serving another replica, recovery at start) is reported the same way.
//! The fresh disk gets a new storage id, so the partitions treat it as a wiped disk: it does
//! not vote with what it held, the primaries add it back as a learner and catch it up from
//! their logs, and a partition is never started from it while established copies exist
//! (`node_core::repl`). That is the repair: from the replicas, whole. Without replicas
//! (`--replicas 1`) there is nothing to repair from: the damaged records answer 503 (every
//! time they are read, and counted in `griddle_store_corrupt_reads_total`), the rest is
//! served, and the operator restores a backup (`griddle restore`). A directory marked
//! damaged by a replicated run is refused by an unreplicated one.
//!
//! A torn record at the WAL's tail (a crash in the middle of a group's write) is not damage:
//! it was never synced, so never acknowledged, and RocksDB drops it when it opens
//! (`store::rocks`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use store::{
    Completion, Event, EventId, MetaEntry, ReadRange, Store, StoreError, StoreStats, StreamName, Version, WriteBatch,
};
use tokio::sync::Notify;

use crate::Config;

/// The marker's name in the data directory; it holds the first damage found.
pub const MARKER: &str = "DAMAGED";

/// Reads that found damage, and copies set aside, since this process started.
pub static CORRUPT_READS: AtomicU64 = AtomicU64::new(0);
pub static SET_ASIDE: AtomicU64 = AtomicU64::new(0);

/// One node run's damage report: where its marker goes and whether replicas can repair it.
pub struct Damage {
    data_dir: PathBuf,
    repairable: bool,
    reported: AtomicBool,
    pub found: Notify,
}

impl Damage {
    /// Repairable when the node keeps its own copy (RocksDB) of replicated partitions.
    pub fn new(config: &Config) -> Damage {
        Damage {
            data_dir: config.data_dir.clone(),
            repairable: repairable(config),
            reported: AtomicBool::new(false),
            found: Notify::new(),
        }
    }

    pub fn repairable(&self) -> bool {
        self.repairable
    }

    pub fn is_reported(&self) -> bool {
        self.reported.load(Ordering::Acquire)
    }

    /// Damage was found: count it, and the first time, mark the directory and wake the node.
    pub fn report(&self, what: &str) {
        CORRUPT_READS.fetch_add(1, Ordering::Relaxed);
        if self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(
            damage = what,
            repairable = self.repairable,
            "stored data failed its checksum; it is never served"
        );
        if !self.repairable {
            // Nothing to rebuild it from: the damaged records answer 503, the rest is served.
            return;
        }
        if let Err(error) = write_marker(&self.data_dir, what) {
            tracing::error!(%error, "could not mark the data directory damaged");
        }
        self.found.notify_one();
    }
}

fn repairable(config: &Config) -> bool {
    config.replicas > 1 && config.store == crate::StoreKind::Rocksdb
}

fn write_marker(data_dir: &Path, what: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = data_dir.join(MARKER);
    let mut file = std::fs::File::create(&path)?;
    file.write_all(format!("{what}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Before a store is opened: a directory marked damaged is set aside (with replicas; the
/// next open starts a fresh one) or refused (without). Returns where it went.
///
/// Also refused: damage again within `damage_rebuild_interval_s` of the last rebuild. One bad
/// block is a disk's; damage over and over says the disk, the memory or our own code is at
/// fault, and rebuilding in a loop (or on every node in turn, after an upgrade that misreads
/// its data) would only throw copies away. The copy set aside last time is kept then.
pub fn set_aside_if_marked(config: &Config, now_ms: u64) -> anyhow::Result<Option<PathBuf>> {
    let dir = &config.data_dir;
    let marker = dir.join(MARKER);
    let Ok(what) = std::fs::read_to_string(&marker) else { return Ok(None) };
    if !repairable(config) {
        anyhow::bail!(
            "the data directory {} is marked damaged ({}); without replicas there is nothing to repair it \
             from: restore a backup (griddle restore) or move the directory aside",
            dir.display(),
            what.trim()
        );
    }
    let name = dir.file_name().context("the data directory has a name")?.to_string_lossy().into_owned();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // One set-aside copy is kept for a post-mortem; older ones would only fill the disk.
    let prefix = format!("{name}.damaged-");
    let mut earlier = Vec::new();
    for entry in std::fs::read_dir(parent).with_context(|| format!("list {}", parent.display()))? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(ms) = file_name.strip_prefix(&prefix) {
            earlier.push((ms.parse::<u64>().unwrap_or(u64::MAX), entry.path()));
        }
    }
    let interval_ms = config.damage_rebuild_interval_s.saturating_mul(1000);
    if let Some((_, recent)) = earlier.iter().find(|(ms, _)| now_ms.saturating_sub(*ms) < interval_ms) {
        anyhow::bail!(
            "the data directory {} is damaged ({}) again, within {} s of the last rebuild ({} kept): \
             more than a bad block may be wrong (the disk, memory, or a bug); check, then move the \
             directory aside by hand to rebuild it from the replicas",
            dir.display(),
            what.trim(),
            config.damage_rebuild_interval_s,
            recent.display()
        );
    }
    for (_, path) in earlier {
        std::fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    let aside = parent.join(format!("{prefix}{now_ms}"));
    std::fs::rename(dir, &aside).with_context(|| format!("move {} to {}", dir.display(), aside.display()))?;
    std::fs::File::open(parent)?.sync_all()?;
    SET_ASIDE.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        damage = what.trim(),
        aside = %aside.display(),
        "set the damaged copy aside; starting with a fresh disk, rebuilt from the replicas"
    );
    Ok(Some(aside))
}

/// Whether an error (with its context) is damage.
pub fn is_corrupt(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| matches!(cause.downcast_ref::<StoreError>(), Some(StoreError::Corrupt(_))))
}

/// The store, with every `Corrupt` answer reported.
pub struct Watched {
    pub inner: Arc<dyn Store>,
    pub damage: Arc<Damage>,
}

impl Watched {
    fn seen<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Corrupt(what)) = &result {
            self.damage.report(what);
        }
        result
    }
}

impl Store for Watched {
    fn append(&self, batch: WriteBatch, done: Completion) {
        let damage = self.damage.clone();
        self.inner.append(
            batch,
            Box::new(move |result| {
                if let Err(StoreError::Corrupt(what)) = &result {
                    damage.report(what);
                }
                done(result)
            }),
        )
    }
    fn read(&self, stream: &StreamName, range: ReadRange) -> Result<Vec<Event>, StoreError> {
        self.seen(self.inner.read(stream, range))
    }
    fn head(&self, stream: &StreamName) -> Result<Version, StoreError> {
        self.seen(self.inner.head(stream))
    }
    fn find(&self, stream: &StreamName, id: EventId) -> Result<Option<Event>, StoreError> {
        self.seen(self.inner.find(stream, id))
    }
    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.seen(self.inner.meta(key))
    }
    fn meta_scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<MetaEntry>, StoreError> {
        self.seen(self.inner.meta_scan(prefix, limit))
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        self.seen(self.inner.checkpoint(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Overrides;

    fn config(data_dir: &Path, replicas: usize, interval_s: Option<u64>) -> Config {
        let flags =
            Overrides { data_dir: Some(data_dir.into()), replicas: Some(replicas), dev: true, ..Default::default() };
        let mut config = Config::resolve(&flags).unwrap();
        if let Some(interval_s) = interval_s {
            config.damage_rebuild_interval_s = interval_s;
        }
        config
    }

    fn damaged(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("000004.log"), b"records").unwrap();
        write_marker(dir, "a block checksum").unwrap();
    }

    fn set_aside(parent: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("n1.damaged-"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_damaged_copy_is_set_aside_once_and_not_again_soon_after() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("n1");
        let hour = 3_600_000;
        assert_eq!(set_aside_if_marked(&config(&dir, 3, None), 10 * hour).unwrap(), None, "not marked");
        damaged(&dir);
        let aside = set_aside_if_marked(&config(&dir, 3, None), 10 * hour).unwrap().unwrap();
        assert!(!dir.exists() && aside.join("000004.log").exists() && aside.join(MARKER).exists());
        // Damaged again 10 minutes later: refused, and the first copy is kept.
        damaged(&dir);
        let again = set_aside_if_marked(&config(&dir, 3, None), 10 * hour + hour / 6);
        assert!(again.unwrap_err().to_string().contains("again"));
        assert!(dir.join(MARKER).exists());
        assert_eq!(set_aside(parent.path()), [format!("n1.damaged-{}", 10 * hour)]);
        // Two hours later (or with the interval set to 0) it is rebuilt again; one copy kept.
        set_aside_if_marked(&config(&dir, 3, None), 12 * hour).unwrap().unwrap();
        assert_eq!(set_aside(parent.path()), [format!("n1.damaged-{}", 12 * hour)]);
        damaged(&dir);
        set_aside_if_marked(&config(&dir, 3, Some(0)), 12 * hour + 1).unwrap().unwrap();
        assert_eq!(set_aside(parent.path()), [format!("n1.damaged-{}", 12 * hour + 1)]);
    }

    #[test]
    fn without_replicas_a_marked_copy_is_refused_and_kept() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("n1");
        damaged(&dir);
        let refused = set_aside_if_marked(&config(&dir, 1, None), 1).unwrap_err();
        assert!(refused.to_string().contains("restore a backup"), "{refused}");
        assert!(dir.join("000004.log").exists() && set_aside(parent.path()).is_empty());
    }
}
