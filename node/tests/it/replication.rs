//! Replicated partitions with real processes: three `griddle serve --replicas 3` on loopback,
//! 32 writers spread over all of them, `kill -9` of the primary of their partition; writes
//! succeed again within 3 seconds; after a restart and catch-up, every node's disk holds
//! every acknowledged event, once, at the version it was acknowledged with.
//!
//! `GRIDDLE_FAILOVER_KILLS=10` repeats the kill (default 1) and prints failover times (kill
//! to the first acknowledged write of a writer on that partition), p50 and p99.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_core::placement;
use serde_json::Value;
use store::{ReadRange, Store, StreamName, Version};

use crate::harness::{mint, ulid, Node};

const NODES: usize = 3;
const WRITERS: usize = 32;

/// Streams (generic, so any writer may use them) that all fall in one partition.
fn streams_of_one_partition(count: usize) -> (u32, Vec<String>) {
    let first = placement::partition_of("orders:0", placement::PARTITIONS_DEFAULT);
    let names = (0..)
        .map(|k| format!("orders:{k}"))
        .filter(|s| placement::partition_of(s, placement::PARTITIONS_DEFAULT) == first)
        .take(count)
        .collect();
    (first, names)
}

type Acked = Arc<Mutex<Vec<(String, String, u64, Instant)>>>;

/// A writer: appends with its own ids through `url`, retrying each id until acknowledged.
fn writer(url: String, stream: String, token: String, stop: Arc<AtomicBool>, acked: Acked) {
    while !stop.load(Ordering::Relaxed) {
        let id = ulid();
        let body = format!(r#"[{{"id":"{id}","type":"order","data":{{"w":1}}}}]"#);
        loop {
            let answer = ureq::post(&format!("{url}/v1/streams/{stream}/events"))
                .set("Authorization", &format!("Bearer {token}"))
                .set("Content-Type", "application/json")
                .timeout(Duration::from_secs(5))
                .send_string(&body);
            if let Ok(response) = answer {
                let value: Value = response.into_json().unwrap();
                let version = value["events"][0]["version"].as_u64().unwrap();
                acked.lock().unwrap().push((stream.clone(), id.clone(), version, Instant::now()));
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return; // Unacknowledged: it may or may not be stored, either is fine.
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn alive(node: &Node) -> usize {
    let (_, cluster) = node.get("/v1/cluster", None);
    cluster["members"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count())
}

#[test]
fn three_nodes_fail_over_within_3_seconds_and_lose_nothing() {
    let kills: usize = std::env::var("GRIDDLE_FAILOVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    // Fixed mesh ports, so that a restarted node comes back where the others look for it.
    let meshes: Vec<String> = (0..NODES)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string())
        .collect();
    let start = |i: usize| {
        let mut args = vec!["--node-id", ids[i].as_str(), "--replicas", "3", "--mesh", meshes[i].as_str()];
        if i != 0 {
            args.extend(["--join", meshes[0].as_str()]);
        } else {
            args.extend(["--join", meshes[1].as_str()]);
        }
        Node::start_with(&dir.path().join(&ids[i]), &args)
    };
    let mut nodes: Vec<Option<Node>> = (0..NODES).map(|i| Some(start(i))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().flatten().all(|n| alive(n) == NODES)), "mesh forms");

    let (part, streams) = streams_of_one_partition(4);
    let token = mint("svc", 3600, true);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let urls: Vec<String> = nodes.iter().flatten().map(|n| n.url.clone()).collect();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, stream) = (urls[w % NODES].clone(), streams[w % streams.len()].clone());
            let (token, stop, acked) = (token.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(url, stream, token, stop, acked))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 200), "writes flow");

    let mut failovers = Vec::new();
    for round in 0..kills {
        // The primary is the top-ranked voter; with three nodes all three are voters.
        let ranked = placement::rank(part, ids.iter().map(|id| (id.as_str(), 1000)));
        let primary = ids.iter().position(|id| id == ranked[0]).unwrap();
        let before = acked.lock().unwrap().len();
        let killed_at = Instant::now();
        nodes[primary].take().unwrap().kill();
        // Writers whose gateway died keep failing; the others must succeed again.
        let resumed = wait_until(Duration::from_secs(10), || {
            acked.lock().unwrap()[before..].iter().any(|(_, _, _, at)| *at > killed_at)
        });
        assert!(resumed, "round {round}: writes resume after the primary's kill");
        let took = acked.lock().unwrap()[before..].iter().map(|(_, _, _, at)| *at).filter(|at| *at > killed_at).min();
        let took = took.unwrap() - killed_at;
        failovers.push(took);
        assert!(took < Duration::from_secs(3), "round {round}: writes succeeded again after {took:?}");
        nodes[primary] = Some(start(primary));
        assert!(wait_until(Duration::from_secs(10), || nodes.iter().flatten().all(|n| alive(n) == NODES)));
        std::thread::sleep(Duration::from_secs(2)); // Writes continue; the restarted node catches up.
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    std::thread::sleep(Duration::from_secs(2)); // The last commits reach every replica.
    failovers.sort();
    println!(
        "failover over {} kill(s): p50 {:?}, p99 {:?}, max {:?}",
        failovers.len(),
        failovers[failovers.len() / 2],
        failovers[(failovers.len() * 99).div_ceil(100) - 1],
        failovers.last().unwrap()
    );
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }

    // Every disk: every acknowledged event once, at its acknowledged version; versions dense.
    let acked = acked.lock().unwrap();
    println!("{} appends acknowledged by {WRITERS} writers", acked.len());
    for id in &ids {
        let disk = store::rocks::RocksStore::open(&dir.path().join(id), Default::default()).unwrap();
        for stream in &streams {
            let name = StreamName::new(stream.clone()).unwrap();
            let events = disk.read(&name, ReadRange::After { after: Version(0), limit: 1 << 20 }).unwrap();
            let mut seen: HashMap<String, u64> = HashMap::new();
            for (i, event) in events.iter().enumerate() {
                assert_eq!(event.version.0, i as u64 + 1, "{id}: {stream} is dense");
                let again = seen.insert(event.id.to_string(), event.version.0);
                assert!(again.is_none(), "{id}: {} twice in {stream}", event.id);
            }
            let mut missing = BTreeMap::new();
            for (s, event_id, version, _) in acked.iter().filter(|(s, ..)| s == stream) {
                if seen.get(event_id) != Some(version) {
                    missing.insert(event_id.clone(), (s.clone(), *version, seen.get(event_id).copied()));
                }
            }
            assert!(missing.is_empty(), "{id}: acknowledged but not held as acknowledged: {missing:?}");
        }
    }
}
