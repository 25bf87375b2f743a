//! Crash safety of the disk path, with real processes and real RocksDB.
//!
//! - `kill -9` lands in the middle of group commits, memtable flushes and compactions (a
//!   64 KiB memtable makes them constant under 12 writers) and of a restarted node's
//!   catch-up; afterwards every disk holds every acknowledged event once, at its version.
//! - A damaged copy (bytes flipped in an SST file, or in the WAL before its tail) is never
//!   served: reads through the cluster always match what was acknowledged, the damaged
//!   node's own copy answers 503 or a correct prefix, and the node sets the copy aside and
//!   rebuilds it from its replicas, in-process.
//!
//! `GRIDDLE_DISK_KILLS=N` sets the kill rounds (default 3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{mint, sample, Node};
use crate::replication::{alive, assert_disks_hold, wait_until, writer, Acked};

const NODES: usize = 3;

/// Three `--replicas 3` nodes on fixed ports (a node that restarts, or starts a new life
/// after damage, comes back where the others and the test look for it).
struct Cluster {
    dir: tempfile::TempDir,
    ids: Vec<String>,
    https: Vec<String>,
    meshes: Vec<String>,
    nodes: Vec<Option<Node>>,
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("griddle.toml"), "rocksdb_write_buffer_bytes = 65536\n").unwrap();
        let ids = (0..NODES).map(|i| format!("n{i}")).collect();
        let https = (0..NODES).map(|_| free_port()).collect();
        let meshes = (0..NODES)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string())
            .collect();
        let mut cluster = Cluster { dir, ids, https, meshes, nodes: Vec::new() };
        cluster.nodes = (0..NODES).map(|i| Some(cluster.spawn(i))).collect();
        let up = wait_until(Duration::from_secs(15), || cluster.nodes.iter().flatten().all(|n| alive(n) == NODES));
        assert!(up, "mesh forms");
        cluster
    }

    fn spawn(&self, i: usize) -> Node {
        let config = self.dir.path().join("griddle.toml");
        let join = &self.meshes[if i == 0 { 1 } else { 0 }];
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--node-id",
            &self.ids[i],
            "--replicas",
            "3",
            "--bootstrap-expect",
            "3",
            "--http",
            &self.https[i],
            "--mesh",
            &self.meshes[i],
            "--join",
            join,
        ];
        Node::start_with(&self.data_dir(i), &args)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.ids[i])
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i] = Some(self.spawn(i));
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().unwrap()
    }

    fn all_alive(&self, limit: Duration) -> bool {
        wait_until(limit, || self.nodes.iter().flatten().all(|n| alive(n) == NODES))
    }

    fn stop_all(&mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            assert!(node.terminate().success());
        }
    }
}

/// 12 streams spread over partitions, written through every node.
fn streams() -> Vec<String> {
    (0..12).map(|k| format!("disk:{k}")).collect()
}

fn start_writers(
    cluster: &Cluster,
    streams: &[String],
    stop: &Arc<AtomicBool>,
    acked: &Acked,
) -> Vec<std::thread::JoinHandle<()>> {
    let token = mint("svc", 3600, true);
    streams
        .iter()
        .enumerate()
        .map(|(w, stream)| {
            let url = cluster.node(w % NODES).url.clone();
            let (stream, token, stop, acked) = (stream.clone(), token.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(url, stream, token, stop, acked))
        })
        .collect()
}

/// RocksDB's own record of its flushes and compactions in one data directory (its info
/// logs), counted by event.
fn rocksdb_events(dir: &Path) -> (usize, usize) {
    let (mut flushes, mut compactions) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "LOG" || name.starts_with("LOG.old") {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            flushes += text.matches("\"event\": \"flush_finished\"").count();
            compactions += text.matches("\"event\": \"compaction_finished\"").count();
        }
    }
    (flushes, compactions)
}

#[test]
fn kill_9_in_group_commits_flushes_compactions_and_catch_up_loses_nothing() {
    let rounds: usize = std::env::var("GRIDDLE_DISK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut cluster = Cluster::start();
    let streams = streams();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers = start_writers(&cluster, &streams, &stop, &acked);
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 500), "writes flow");

    let mut behind = Vec::new();
    for round in 0..rounds {
        let victim = round % NODES;
        // A kill at an arbitrary point of the writes: group commits run back to back, and
        // with 64 KiB memtables a flush or a compaction is usually running too.
        std::thread::sleep(Duration::from_millis(150 + 211 * round as u64 % 500));
        cluster.nodes[victim].take().unwrap().kill();
        std::thread::sleep(Duration::from_millis(1500)); // The others go on without it.
        cluster.restart(victim);
        // Killed again while it catches up on what it missed: how far behind it still was
        // is read from the others' view of their partitions' followers.
        std::thread::sleep(Duration::from_millis(250));
        let lag: u64 = (0..NODES)
            .filter(|i| *i != victim)
            .map(|i| {
                let (_, cluster_view) = cluster.node(i).get("/v1/cluster", None);
                cluster_view["partitions"]["lag_max"].as_u64().unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        behind.push(lag);
        cluster.nodes[victim].take().unwrap().kill();
        cluster.restart(victim);
        assert!(cluster.all_alive(Duration::from_secs(15)), "round {round}: the mesh is whole again");
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|t| t.join().unwrap());
    // Every follower catches up: no partition lags anywhere.
    let caught_up = wait_until(Duration::from_secs(20), || {
        cluster
            .nodes
            .iter()
            .flatten()
            .all(|n| n.get("/v1/cluster", None).1["partitions"]["lagging"].as_u64() == Some(0))
    });
    assert!(caught_up, "every replica catches up");
    cluster.stop_all();

    let (mut flushes, mut compactions) = (0, 0);
    for i in 0..NODES {
        let (f, c) = rocksdb_events(&cluster.data_dir(i));
        flushes += f;
        compactions += c;
    }
    let acked = acked.lock().unwrap();
    println!(
        "{rounds} rounds of two kill -9 (the second while catching up; entries behind then: {behind:?}); \
         {} appends acknowledged; RocksDB flushes {flushes}, compactions {compactions}",
        acked.len()
    );
    assert!(flushes > 0 && compactions > 0, "the kills landed among flushes and compactions");
    assert_disks_hold(cluster.dir.path(), &cluster.ids, &streams, &acked);
}

/// `(status, events)`: every event of `stream`, a page at a time, or the first page's
/// refusal; `None` when the node does not answer (it is between two lives).
fn try_read(url: &str, stream: &str, token: &str, local: bool) -> Option<(u16, Vec<Value>)> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |e| e["version"].as_u64().unwrap());
        let path = format!("{url}/v1/streams/{stream}/events?after={after}&limit=100&local={local}");
        let response = match agent.get(&path).set("Authorization", &format!("Bearer {token}")).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(_) => return None,
        };
        let status = response.status();
        let body: Value = response.into_json().unwrap_or(Value::Null);
        if status != 200 {
            return Some((status, Vec::new()));
        }
        let page = body["events"].as_array().cloned().unwrap_or_default();
        let more = page.len() == 100;
        all.extend(page);
        if !more {
            return Some((200, all));
        }
    }
}

fn try_get(url: &str, path: &str) -> Option<Value> {
    ureq::get(&format!("{url}{path}")).timeout(Duration::from_secs(5)).call().ok()?.into_json().ok()
}

/// What was acknowledged, per stream: (id, version) in version order.
fn expected(acked: &Acked) -> HashMap<String, Vec<(String, u64)>> {
    let mut by_stream: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for (stream, id, version, ..) in acked.lock().unwrap().iter() {
        by_stream.entry(stream.clone()).or_default().push((id.clone(), *version));
    }
    by_stream.values_mut().for_each(|events| events.sort_by_key(|(_, v)| *v));
    by_stream
}

fn ids_of(events: &[Value]) -> Vec<(String, u64)> {
    events.iter().map(|e| (e["id"].as_str().unwrap().to_owned(), e["version"].as_u64().unwrap())).collect()
}

/// Reads every stream through every node (the cluster's answer) and from `victim`'s own
/// copy, until the copy is whole again or `limit` passes. A 200 through the cluster must be
/// exactly what was acknowledged; one from the copy a prefix of it (a learner catching up);
/// 503 and a node between lives are allowed. Returns 503s seen from the copy.
fn read_until_whole(
    cluster: &Cluster,
    victim: usize,
    want: &HashMap<String, Vec<(String, u64)>>,
    limit: Duration,
) -> usize {
    let token = mint("svc", 3600, true);
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let mut whole = true;
        for (stream, events) in want {
            for i in 0..NODES {
                let Some((status, got)) = try_read(&cluster.node(i).url, stream, &token, false) else { continue };
                if status == 200 {
                    assert_eq!(&ids_of(&got), events, "n{i} answered {stream} wrong");
                } else {
                    assert_eq!(status, 503, "n{i} on {stream}");
                }
            }
            match try_read(&cluster.node(victim).url, stream, &token, true) {
                Some((200, got)) => {
                    let got = ids_of(&got);
                    assert!(events.starts_with(&got), "n{victim}'s copy of {stream} served wrong data: {got:?}");
                    whole &= got.len() == events.len();
                }
                Some((503, _)) => {
                    refused += 1;
                    whole = false;
                }
                Some((status, _)) => panic!("n{victim}'s copy of {stream}: {status}"),
                None => whole = false,
            }
        }
        if whole {
            return refused;
        }
        if started.elapsed() > limit {
            for (stream, events) in want {
                let got = try_read(&cluster.node(victim).url, stream, &token, true);
                let got = got.map(|(status, got)| (status, got.len()));
                println!("{stream}: want {} events, n{victim}'s copy {got:?}", events.len());
            }
            for i in 0..NODES {
                let cluster_view = try_get(&cluster.node(i).url, "/v1/cluster");
                println!("n{i}: {cluster_view:?}");
            }
            panic!("n{victim}'s copy is not whole again within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_aside(cluster: &Cluster, victim: usize) -> Vec<PathBuf> {
    let prefix = format!("{}.damaged-", cluster.ids[victim]);
    std::fs::read_dir(cluster.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .collect()
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix) && p.metadata().unwrap().len() > 0)
        .collect();
    files.sort_by_key(|p| p.metadata().unwrap().len());
    files
}

fn flip(path: &Path, at: usize, len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    for byte in &mut bytes[at..at + len] {
        *byte ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_copies_are_never_served_and_are_rebuilt_from_replicas() {
    let mut cluster = Cluster::start();
    let streams = streams();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers = start_writers(&cluster, &streams, &stop, &acked);
    assert!(wait_until(Duration::from_secs(30), || acked.lock().unwrap().len() >= 4000), "writes flow");
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|t| t.join().unwrap());
    let want = expected(&acked);

    // Bit rot in a table file of the events (read only when a stream is read): n1's largest
    // one gets 16 bytes flipped a third of the way in, among its data blocks.
    let victim = 1;
    assert!(cluster.nodes[victim].take().unwrap().terminate().success());
    let tables = files_ending(&cluster.data_dir(victim), ".sst");
    let of_events = |path: &&PathBuf| std::fs::read(path).unwrap().windows(6).any(|w| w == b"events");
    let table = tables.iter().rev().find(of_events).expect("flushed tables of events (64 KiB memtables)");
    let len = table.metadata().unwrap().len() as usize;
    flip(table, len / 3, 16);
    cluster.restart(victim);
    let started = Instant::now();
    let refused = read_until_whole(&cluster, victim, &want, Duration::from_secs(60));
    let took = started.elapsed();
    let aside = set_aside(&cluster, victim);
    assert_eq!(aside.len(), 1, "the damaged copy was set aside: {aside:?}");
    let node = cluster.node(victim);
    assert!(node.metric("griddle_store_corrupt_reads_total") >= 1.0);
    assert_eq!(node.metric("griddle_store_copies_set_aside_total"), 1.0);
    println!(
        "SST damage on n{victim}: {refused} local reads refused (503), copy set aside and whole again after {took:?}"
    );
    // Whole is not yet a voter again: the next damage must wait for that, or two of three
    // copies would be gone at once (more than R = 3, W = 2 tolerates).
    let voter_again = wait_until(Duration::from_secs(60), || {
        cluster.nodes.iter().flatten().all(|n| n.get("/v1/cluster", None).1["partitions"]["under_replicated"] == 0)
    });
    assert!(voter_again, "n{victim} votes in its partitions again");

    // A damaged WAL before its tail: n2 refuses to open it, sets it aside, is rebuilt.
    let victim = 2;
    let token = mint("svc", 3600, true);
    // Writes until n2's WAL holds several KiB of records: the damage will sit before its tail.
    for k in 0.. {
        let wal = files_ending(&cluster.data_dir(victim), ".log").pop().map_or(0, |p| p.metadata().unwrap().len());
        if wal > 16 * 1024 {
            break;
        }
        assert!(k < 5000, "n{victim}'s WAL grows");
        let body = format!(r#"[{{"id":"{}","type":"order","data":{{"k":{k}}}}}]"#, crate::harness::ulid());
        let (status, _) = cluster.node(0).post(&format!("/v1/streams/{}/events", streams[k % 12]), Some(&token), &body);
        assert_eq!(status, 201);
    }
    let (_, _, text) = cluster.node(0).raw("GET", "/metrics", None, None, &[]);
    assert!(sample(&text, "griddle_store_corrupt_reads_total").is_some());
    // Re-read what is acknowledged now (the 300 above were acknowledged through n0).
    let mut want = want;
    for stream in &streams {
        let events = crate::harness::read_all(cluster.node(0), stream, &token);
        let all = ids_of(&events);
        assert!(all.starts_with(&want[stream]), "nothing acknowledged is gone from {stream}");
        want.insert(stream.clone(), all);
    }
    assert!(cluster.nodes[victim].take().unwrap().terminate().success());
    let logs = files_ending(&cluster.data_dir(victim), ".log");
    let wal = logs.last().expect("a WAL with the latest writes");
    let len = wal.metadata().unwrap().len() as usize;
    flip(wal, len / 3, 8);
    cluster.restart(victim);
    let started = Instant::now();
    let refused = read_until_whole(&cluster, victim, &want, Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(set_aside(&cluster, victim).len(), 1, "n{victim}'s damaged copy was set aside");
    println!("WAL damage on n{victim}: {refused} local reads refused (503), rebuilt and whole after {took:?}");

    assert!(cluster.all_alive(Duration::from_secs(10)));
    cluster.stop_all();
    let acked: Vec<_> = want
        .iter()
        .flat_map(|(stream, events)| {
            events.iter().map(|(id, version)| (stream.clone(), id.clone(), *version, Instant::now(), Instant::now()))
        })
        .collect();
    assert_disks_hold(cluster.dir.path(), &cluster.ids, &streams, &acked);
}
