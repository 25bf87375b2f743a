//! Replicated partitions with real processes. Three `griddle serve --replicas 3` on loopback,
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

/// (stream, event id, version, when the acknowledged attempt was sent, when its answer came).
/// Failover is timed to the first answer to a write *sent* after the kill: one the old primary
/// answered just before dying must not count, however late its answer arrives.
pub type Acked = Arc<Mutex<Vec<(String, String, u64, Instant, Instant)>>>;

/// A writer: appends with its own ids through `url`, retrying each id until acknowledged.
pub fn writer(url: String, stream: String, token: String, stop: Arc<AtomicBool>, acked: Acked) {
    while !stop.load(Ordering::Relaxed) {
        let id = ulid();
        let body = format!(r#"[{{"id":"{id}","type":"order","data":{{"w":1}}}}]"#);
        loop {
            let sent = Instant::now();
            let answer = ureq::post(&format!("{url}/v1/streams/{stream}/events"))
                .set("Authorization", &format!("Bearer {token}"))
                .set("Content-Type", "application/json")
                .timeout(Duration::from_secs(5))
                .send_string(&body);
            if let Ok(response) = answer {
                let value: Value = response.into_json().unwrap();
                let version = value["events"][0]["version"].as_u64().unwrap();
                acked.lock().unwrap().push((stream.clone(), id.clone(), version, sent, Instant::now()));
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return; // Unacknowledged: it may or may not be stored, either is fine.
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn alive(node: &Node) -> usize {
    let (_, cluster) = node.get("/v1/cluster", None);
    cluster["members"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count())
}

#[test]
fn three_nodes_fail_over_within_3_seconds_and_lose_nothing() {
    let kills: usize = std::env::var("GRIDDLE_FAILOVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    fail_over(Stop::Kill, kills, Duration::from_secs(3));
}

/// SIGTERM hands the partitions over: the node finishes its appends in flight and leaves the
/// mesh, and the next voter takes over at once instead of after failure detection (about 2 s
/// for a `kill -9`). `GRIDDLE_HANDOVER_STOPS=N` repeats it (default 2).
#[test]
fn a_graceful_stop_hands_partitions_over_within_a_second_and_loses_nothing() {
    let stops: usize = std::env::var("GRIDDLE_HANDOVER_STOPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    fail_over(Stop::Terminate, stops, Duration::from_secs(1));
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Kill,
    Terminate,
}

/// Stops the primary of the writers' partition `rounds` times (restarting it each time),
/// asserts that writes resume within `limit` and that every disk holds every acknowledged
/// event afterwards.
fn fail_over(how: Stop, rounds: usize, limit: Duration) {
    let kills = rounds;
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
        let node = nodes[primary].take().unwrap();
        match how {
            Stop::Kill => node.kill(),
            Stop::Terminate => {
                let exited = node.terminate();
                assert!(exited.success(), "round {round}: a graceful stop exits 0, not {exited:?}");
            }
        }
        // Writers whose gateway died keep failing; the others must succeed again.
        let resumed = wait_until(Duration::from_secs(10), || {
            acked.lock().unwrap()[before..].iter().any(|(_, _, _, sent, _)| *sent > killed_at)
        });
        assert!(resumed, "round {round}: writes resume after the primary's kill");
        let took = acked.lock().unwrap()[before..]
            .iter()
            .filter(|(_, _, _, sent, _)| *sent > killed_at)
            .map(|(.., answered)| *answered)
            .min();
        let took = took.unwrap() - killed_at;
        failovers.push(took);
        assert!(took < limit, "round {round}: writes succeeded again after {took:?} ({how:?})");
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
        "failover over {} stop(s) ({how:?}): p50 {:?}, p99 {:?}, max {:?}",
        failovers.len(),
        failovers[failovers.len() / 2],
        failovers[(failovers.len() * 99).div_ceil(100) - 1],
        failovers.last().unwrap()
    );
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }

    println!("{} appends acknowledged by {WRITERS} writers", acked.lock().unwrap().len());
    assert_disks_hold(dir.path(), &ids, &streams, &acked.lock().unwrap());
}

/// Every disk (`dir/ID`, the nodes stopped): every acknowledged event of `streams` once, at
/// its acknowledged version; versions dense.
pub fn assert_disks_hold(
    dir: &std::path::Path,
    ids: &[String],
    streams: &[String],
    acked: &[(String, String, u64, Instant, Instant)],
) {
    for id in ids {
        let disk = store::rocks::RocksStore::open(&dir.join(id), Default::default()).unwrap();
        for stream in streams {
            let name = StreamName::new(stream.clone()).unwrap();
            let events = disk.read(&name, ReadRange::After { after: Version(0), limit: 1 << 20 }).unwrap();
            let mut seen: HashMap<String, u64> = HashMap::new();
            for (i, event) in events.iter().enumerate() {
                assert_eq!(event.version.0, i as u64 + 1, "{id}: {stream} is dense");
                let again = seen.insert(event.id.to_string(), event.version.0);
                assert!(again.is_none(), "{id}: {} twice in {stream}", event.id);
            }
            let mut missing = BTreeMap::new();
            for (s, event_id, version, ..) in acked.iter().filter(|(s, ..)| s == stream) {
                if seen.get(event_id) != Some(version) {
                    missing.insert(event_id.clone(), (s.clone(), *version, seen.get(event_id).copied()));
                }
            }
            assert!(missing.is_empty(), "{id}: acknowledged but not held as acknowledged: {missing:?}");
        }
    }
}

/// The primary of `stream`'s partition among `ids` (all voters, all up).
pub fn primary_of(stream: &str, ids: &[String]) -> String {
    let part = placement::partition_of(stream, placement::PARTITIONS_DEFAULT);
    placement::rank(part, ids.iter().map(|id| (id.as_str(), 1000)))[0].to_owned()
}

/// Starts `count` nodes with `--replicas 3` joined through the first two; `extra` per node.
pub fn cluster(dir: &std::path::Path, count: usize) -> (Vec<String>, Vec<Node>) {
    let ids: Vec<String> = (0..count).map(|i| format!("n{i}")).collect();
    let meshes: Vec<String> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string())
        .collect();
    let nodes: Vec<Node> = (0..count)
        .map(|i| {
            let join = if i == 0 { &meshes[1] } else { &meshes[0] };
            let expect = count.to_string();
            let args = [
                "--node-id",
                ids[i].as_str(),
                "--replicas",
                "3",
                "--bootstrap-expect",
                expect.as_str(),
                "--mesh",
                meshes[i].as_str(),
                "--join",
                join,
            ];
            Node::start_with(&dir.join(&ids[i]), &args)
        })
        .collect();
    assert!(wait_until(Duration::from_secs(15), || nodes.iter().all(|n| alive(n) == count)), "mesh forms");
    (ids, nodes)
}

#[test]
fn a_long_poll_on_one_node_gets_a_message_posted_on_another_within_100_ms() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, nodes) = cluster(dir.path(), 3);
    // Alice waits on `gateway`, Bob posts on `poster`; neither is the primary of what it
    // touches: the long-poll is forwarded to Alice's inbox primary, the post to the chat's.
    let (gateway, poster) = (1, 2);
    let (alice, bob) = (0..)
        .map(|k| (format!("alice{k}"), format!("bob{k}")))
        .find(|(a, b)| {
            let chat = if a < b { format!("chat:{a}:{b}") } else { format!("chat:{b}:{a}") };
            primary_of(&format!("inbox:{a}"), &ids) != ids[gateway] && primary_of(&chat, &ids) != ids[poster]
        })
        .unwrap();
    let (alice_token, bob_token) = (mint(&alice, 3600, false), mint(&bob, 3600, false));
    let (status, fresh) = nodes[gateway].get("/v1/sync?timeout=0", Some(&alice_token));
    assert_eq!(status, 200, "{fresh}");
    let mut cursor = fresh["cursor"].as_str().unwrap().to_owned();
    let mut delays = Vec::new();
    for round in 0..10 {
        let url = format!("{}/v1/sync?since={cursor}&timeout=10", nodes[gateway].url);
        let token = alice_token.clone();
        let poll = std::thread::spawn(move || {
            let response = ureq::get(&url).set("Authorization", &format!("Bearer {token}")).call().unwrap();
            (Instant::now(), response.into_json::<Value>().unwrap())
        });
        std::thread::sleep(Duration::from_millis(300)); // The long-poll is held by now.
        let text = format!("hello {round}");
        let posted = Instant::now();
        let (status, body) = nodes[poster].post(
            &format!("/v1/chats/{alice}/messages"),
            Some(&bob_token),
            &format!(r#"{{"text":"{text}"}}"#),
        );
        assert_eq!(status, 201, "{body}");
        let (answered, sync) = poll.join().unwrap();
        let events = sync["events"].as_array().unwrap();
        assert!(events.iter().any(|e| e["data"]["text"] == text.as_str()), "round {round}: {sync}");
        cursor = sync["cursor"].as_str().unwrap().to_owned();
        delays.push(answered.saturating_duration_since(posted));
    }
    delays.sort();
    println!(
        "cross-node delivery (post on {}, long-poll on {}): p50 {:?}, max {:?}",
        ids[poster], ids[gateway], delays[5], delays[9]
    );
    assert!(delays[5] < Duration::from_millis(100), "median delivery {:?}", delays[5]);
    // Presence is cluster-wide: every node lists Alice, whose syncs ran at her inbox's primary.
    for node in &nodes {
        let (status, online) = node.get("/v1/online", Some(&bob_token));
        assert_eq!(status, 200, "{online}");
        assert!(online["users"].as_array().unwrap().iter().any(|u| u == alice.as_str()), "{online}");
    }
}

#[test]
fn a_sixth_node_joins_under_load_and_takes_over_partitions_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ids, mut nodes) = cluster(dir.path(), 5);
    let token = mint("svc", 3600, true);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let streams: Vec<String> = (0..24).map(|k| format!("jobs:{k}")).collect();
    let threads: Vec<_> = (0..16)
        .map(|w| {
            let (url, stream) = (nodes[w % nodes.len()].url.clone(), streams[w % streams.len()].clone());
            let (token, stop, acked) = (token.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(url, stream, token, stop, acked))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 200), "writes flow");
    let mesh0 = nodes[0].mesh.clone();
    ids.push("n5".into());
    nodes.push(Node::start_with(&dir.path().join("n5"), &["--node-id", "n5", "--replicas", "3", "--join", &mesh0]));
    // The newcomer becomes primary of the partitions it ranks first for, once caught up.
    let wanted: Vec<&String> = streams.iter().filter(|s| primary_of(s, &ids) == "n5").collect();
    assert!(!wanted.is_empty(), "n5 ranks first for some of the streams");
    let took_over = wait_until(Duration::from_secs(30), || {
        let (_, cluster) = nodes[5].get("/v1/cluster", None);
        cluster["partitions"]["primary_here"].as_u64().unwrap_or(0) >= 1
    });
    assert!(took_over, "n5 serves partitions as primary");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    let acked = acked.lock().unwrap();
    println!("{} appends acknowledged while n5 joined", acked.len());
    // Every acknowledged event, once, at its version, read through any node.
    for (i, stream) in streams.iter().enumerate() {
        let via = &nodes[i % nodes.len()];
        let (status, page) = via.get(&format!("/v1/streams/{stream}/events?after=0&limit=100"), Some(&token));
        assert_eq!(status, 200, "{page}");
        let mut held: HashMap<String, u64> = HashMap::new();
        let mut after = 0;
        let mut page = page;
        loop {
            let events = page["events"].as_array().unwrap().clone();
            for event in &events {
                let again = held.insert(event["id"].as_str().unwrap().to_owned(), event["version"].as_u64().unwrap());
                assert!(again.is_none(), "{stream}: {} twice", event["id"]);
                after = event["version"].as_u64().unwrap();
            }
            if events.len() < 100 {
                break;
            }
            page = via.get(&format!("/v1/streams/{stream}/events?after={after}&limit=100"), Some(&token)).1;
        }
        for (s, id, version, ..) in acked.iter().filter(|(s, ..)| s == stream) {
            assert_eq!(held.get(id), Some(version), "{s}: {id} acknowledged at v{version}");
        }
    }
}
