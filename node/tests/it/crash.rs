//! Durability against a real process: `kill -9` in the middle of 64 concurrent appenders, and
//! group commit visible under that load.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{mint, ulid, Node};

const APPENDERS: usize = 64;
const STREAMS: usize = 8;

/// Appends one event per request from 64 threads until `stop`; returns the acknowledged ids
/// per stream and the ids whose outcome is unknown (sent, no answer).
fn append_until(
    url: &str,
    stop: &AtomicBool,
    per_thread_max: usize,
) -> (HashMap<String, Vec<String>>, Vec<(String, String)>) {
    let service = mint("loadgen", 600, true);
    let acked = Arc::new(Mutex::new(HashMap::<String, Vec<String>>::new()));
    let unknown = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for thread in 0..APPENDERS {
            let (acked, unknown, service) = (acked.clone(), unknown.clone(), service.clone());
            scope.spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                let stream = format!("load:{}", thread % STREAMS);
                for _ in 0..per_thread_max {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = ulid();
                    let body =
                        json!([{ "id": id, "type": "load.event", "data": { "pad": "x".repeat(150) } }]).to_string();
                    let result = agent
                        .post(&format!("{url}/v1/streams/{stream}/events"))
                        .set("Authorization", &format!("Bearer {service}"))
                        .send_string(&body);
                    match result {
                        Ok(response) if response.status() == 201 => {
                            acked.lock().unwrap().entry(stream.clone()).or_default().push(id)
                        }
                        Ok(response) => panic!("unexpected status {}", response.status()),
                        Err(_) => {
                            unknown.lock().unwrap().push((stream.clone(), id));
                            return;
                        }
                    }
                }
            });
        }
    });
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let unknown = std::mem::take(&mut *unknown.lock().unwrap());
    (acked, unknown)
}

fn read_all(node: &Node, stream: &str) -> Vec<Value> {
    let service = mint("checker", 600, true);
    let mut events = Vec::new();
    loop {
        let (status, page) =
            node.get(&format!("/v1/streams/{stream}/events?after={}&limit=100", events.len()), Some(&service));
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().unwrap().clone();
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
}

#[test]
fn kill_9_during_concurrent_appends_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let url = node.url.clone();
    let stop = AtomicBool::new(false);
    let (acked, unknown) = std::thread::scope(|scope| {
        let load = scope.spawn(|| append_until(&url, &stop, usize::MAX));
        std::thread::sleep(Duration::from_millis(1500));
        node.kill(); // SIGKILL while appends are in flight.
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    });
    let acknowledged: usize = acked.values().map(Vec::len).sum();
    assert!(acknowledged > 100, "only {acknowledged} appends before the kill");

    let node = Node::start(dir.path());
    // Retrying the appends whose outcome was unknown must not duplicate them.
    let service = mint("loadgen", 600, true);
    for (stream, id) in &unknown {
        let (status, _) = node.post(
            &format!("/v1/streams/{stream}/events"),
            Some(&service),
            &json!([{ "id": id, "type": "load.event" }]).to_string(),
        );
        assert!(status == 200 || status == 201);
    }
    let mut total = 0;
    for stream in (0..STREAMS).map(|s| format!("load:{s}")) {
        let events = read_all(&node, &stream);
        let versions: Vec<u64> = events.iter().map(|e| e["version"].as_u64().unwrap()).collect();
        assert_eq!(versions, (1..=events.len() as u64).collect::<Vec<_>>(), "{stream}: dense versions");
        let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{stream}: an id twice");
        for id in acked.get(&stream).into_iter().flatten() {
            assert!(unique.contains(id.as_str()), "{stream}: acknowledged {id} lost");
        }
        total += events.len();
    }
    println!("kill -9: {acknowledged} acknowledged, {} unknown retried, {total} stored, 0 lost", unknown.len());
}

#[test]
fn group_commit_shares_wal_syncs_between_64_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let (appends_before, syncs_before) =
        (node.metric("griddle_store_appends_total"), node.metric("griddle_store_wal_syncs_total"));
    let stop = AtomicBool::new(false);
    let (acked, unknown) = append_until(&node.url, &stop, 40);
    assert!(unknown.is_empty());
    assert_eq!(acked.values().map(Vec::len).sum::<usize>(), APPENDERS * 40);
    let appends = node.metric("griddle_store_appends_total") - appends_before;
    let syncs = node.metric("griddle_store_wal_syncs_total") - syncs_before;
    let per_sync = appends / syncs;
    println!("group commit over HTTP: {appends} appends in {syncs} WAL syncs, {per_sync:.1} per sync");
    assert!(per_sync >= 8.0, "only {per_sync:.1} appends per WAL sync");
    assert!(node.terminate().success(), "SIGTERM stops the node cleanly");
}
