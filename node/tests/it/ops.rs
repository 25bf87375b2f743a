//! Operations with real processes: `/metrics`, JSON logs, a graceful stop, `griddle status`,
//! `flags`, `weight` (ramp-up), `backup` and `restore`.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{mint, read_all, sample, ulid, Node};
use crate::replication::{alive, cluster, primary_of, wait_until, writer, Acked};

/// Runs the `griddle` binary with `args` and returns its stdout; panics if it fails.
fn griddle(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_griddle")).args(args).output().expect("run griddle");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "griddle {args:?} failed: {stdout}{stderr}");
    stdout.into_owned()
}

fn addr(node: &Node) -> &str {
    node.url.trim_start_matches("http://")
}

fn metrics(node: &Node) -> String {
    let (status, headers, text) = node.raw("GET", "/metrics", None, None, &[]);
    assert_eq!(status, 200, "{text}");
    let kind = crate::harness::header(&headers, "content-type").unwrap_or_default().to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    text
}

#[test]
fn metrics_count_requests_appends_group_commits_and_held_long_polls() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let alice = mint("alice", 600, false);
    for k in 0..20 {
        let (status, body) = node.post("/v1/chats/bob/messages", Some(&alice), &format!(r#"{{"text":"m{k}"}}"#));
        assert_eq!(status, 201, "{body}");
    }
    let bob = mint("bob", 600, false);
    let (_, fresh) = node.get("/v1/sync?timeout=0", Some(&bob));
    let cursor = fresh["cursor"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/sync?since={cursor}&timeout=5", node.url);
    let held =
        std::thread::spawn(move || ureq::get(&url).set("Authorization", &format!("Bearer {bob}")).call().is_ok());
    std::thread::sleep(Duration::from_millis(300));

    let text = metrics(&node);
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(value(r#"griddle_http_requests_total{route="messages",status="201"}"#), 20.0);
    assert_eq!(value(r#"griddle_http_request_duration_seconds_count{route="messages"}"#), 20.0);
    assert_eq!(value(r#"griddle_http_request_duration_seconds_bucket{le="+Inf",route="messages"}"#), 20.0);
    // Each message is one append of the chat event, then one of its two inbox copies.
    assert!(value("griddle_store_events_total") >= 60.0, "{text}");
    let (appends, syncs) = (value("griddle_store_appends_total"), value("griddle_store_wal_syncs_total"));
    assert!(syncs >= 1.0 && syncs <= appends, "{syncs} syncs for {appends} appends");
    assert_eq!(value("griddle_store_group_commit_appends_count"), syncs);
    assert_eq!(value("griddle_store_group_commit_appends_sum"), appends);
    assert_eq!(value(r#"griddle_store_group_commit_appends_bucket{le="+Inf"}"#), syncs);
    assert_eq!(value("griddle_long_polls_held"), 1.0);
    assert_eq!(value(r#"griddle_subscriptions{kind="user"}"#), 1.0);
    assert_eq!(value(r#"griddle_members{state="alive"}"#), 1.0);
    assert!(value("griddle_http_connections") >= 2.0, "the held long-poll and the scrape");
    assert!(held.join().unwrap(), "the held sync is answered");
    // From outside `ops_allow`, `/metrics` needs a service token; the routes' names never
    // carry their parameters (no series per user).
    assert!(!text.contains("alice") && !text.contains("bob"), "{text}");
}

#[test]
fn logs_are_json_lines_naming_the_node_and_never_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let node = Node::start_logged(&dir.path().join("data"), &["--node-id", "logged-node", "--log-json"], &log, "info");
    let token = mint("alice", 600, false);
    let (status, _) = node.post("/v1/chats/bob/messages", Some(&token), r#"{"text":"hi"}"#);
    assert_eq!(status, 201);
    let forged = format!("{token}x");
    assert_eq!(node.get("/v1/chats", Some(&forged)).0, 401);
    let dev = node.token("carol");
    assert!(node.terminate().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "serving, stopping and stopped at least: {text}");
    for line in &lines {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["timestamp"].is_string(), "{line}");
        assert!(line.contains(r#""id":"logged-node""#), "every line names the node: {line}");
    }
    for secret in [token.as_str(), forged.as_str(), dev.as_str(), node::config::DEV_SECRET] {
        assert!(!text.contains(secret), "a secret reached the log");
    }
    // Even a piece of a token (its signature) never appears.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature));
}

#[test]
fn sigterm_answers_held_long_polls_with_their_cursor_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let token = mint("alice", 600, false);
    let (_, fresh) = node.get("/v1/sync?timeout=0", Some(&token));
    let cursor = fresh["cursor"].as_str().unwrap().to_owned();
    let polls: Vec<_> = (0..3)
        .map(|_| {
            let url = format!("{}/v1/sync?since={cursor}&timeout=60", node.url);
            let token = token.clone();
            std::thread::spawn(move || {
                let answer = ureq::get(&url).set("Authorization", &format!("Bearer {token}")).call();
                (Instant::now(), answer.map(|r| r.into_json::<Value>().unwrap()))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node.metric("griddle_long_polls_held"), 3.0);
    let signalled = Instant::now();
    let exit = node.terminate();
    let stopped = signalled.elapsed();
    assert!(exit.success(), "exit 0 after SIGTERM, not {exit:?}");
    assert!(stopped < node::STOP_DEADLINE, "stopped in {stopped:?}");
    for poll in polls {
        let (answered, reply) = poll.join().unwrap();
        let reply = reply.expect("a held long-poll is answered, not cut");
        assert!(reply["cursor"].is_string(), "{reply}");
        assert!(answered.duration_since(signalled) < Duration::from_secs(2), "answered at once");
    }
    println!("SIGTERM to exit 0 with 3 long-polls held: {stopped:?}");
}

#[test]
fn operators_see_and_steer_a_three_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, nodes) = cluster(dir.path(), 3);
    let svc = mint("svc", 600, true);
    for k in 0..12 {
        let body = format!(r#"[{{"type":"t","data":{{"k":{k}}}}}]"#);
        let (status, answer) = nodes[k % 3].post(&format!("/v1/streams/jobs:{k}/events"), Some(&svc), &body);
        assert_eq!(status, 201, "{answer}");
    }

    // Metrics of a cluster: members, partitions, replication lag and QUIC links per peer.
    let text = metrics(&nodes[0]);
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(value(r#"griddle_members{state="alive"}"#), 3.0);
    assert!(value(r#"griddle_partitions{role="replica"}"#) >= 1.0);
    for peer in &ids[1..] {
        assert!(value(&format!(r#"griddle_quic_bytes_total{{peer="{peer}",direction="sent"}}"#)) > 0.0);
        assert!(value(&format!(r#"griddle_quic_bytes_total{{peer="{peer}",direction="received"}}"#)) > 0.0);
        let rtt = value(&format!(r#"griddle_quic_rtt_seconds{{peer="{peer}"}}"#));
        assert!(rtt > 0.0 && rtt < 1.0, "rtt {rtt}");
    }
    let leads: usize = nodes.iter().map(|n| n.metric(r#"griddle_partitions{role="primary"}"#) as usize).sum();
    assert!(leads >= 1, "the written partitions have primaries");
    let lag_series = nodes
        .iter()
        .map(|n| metrics(n).lines().filter(|l| l.starts_with("griddle_replication_lag_entries{")).count())
        .sum::<usize>();
    assert_eq!(lag_series, leads, "one lag series per partition led");

    // `griddle status`: every member, its state, weight and partitions.
    let status = griddle(&["status", "--http", addr(&nodes[1]), "--dev"]);
    println!("{status}");
    assert!(status.starts_with("seen from n1"), "{status}");
    for id in &ids {
        let row = status.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_else(|| panic!("{status}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], "alive", "{row}");
        assert_eq!(cells[2], "1.00", "{row}");
        assert!(cells[5].parse::<u32>().is_ok() && cells[6].parse::<u32>().unwrap() >= 1, "{row}");
    }

    // A flag set through one node reaches the others and a sync held on a third.
    let carol = mint("carol", 600, false);
    let (_, fresh) = nodes[2].get("/v1/sync?timeout=0", Some(&carol));
    let cursor = fresh["cursor"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/sync?since={cursor}&timeout=20", nodes[2].url);
    let held = std::thread::spawn(move || {
        ureq::get(&url).set("Authorization", &format!("Bearer {carol}")).call().unwrap().into_json::<Value>().unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let set_at = Instant::now();
    griddle(&["flags", "set", "--http", addr(&nodes[0]), "--dev", "video-chat", "100"]);
    let everywhere = wait_until(Duration::from_secs(5), || {
        nodes.iter().all(|n| n.get("/v1/flags", Some(&mint("dave", 60, false))).1["flags"]["video-chat"] == true)
    });
    assert!(everywhere, "the flag is on at every node within 5 s");
    let sync = held.join().unwrap();
    let flag_event = sync["events"].as_array().unwrap().iter().any(|e| e["type"] == "flags");
    assert!(flag_event, "a held sync hears of the flag: {sync}");
    println!("flag set to seen everywhere: {:?}", set_at.elapsed());
    let list = griddle(&["flags", "list", "--http", addr(&nodes[2]), "--dev"]);
    assert!(list.contains(r#""video-chat": true"#), "{list}");

    // A live weight change spreads through the mesh; the node stays a member throughout.
    let weighted = griddle(&["weight", "--http", addr(&nodes[2]), "--dev", "0.25"]);
    assert!(weighted.contains("weight 0.25"), "{weighted}");
    let spread = wait_until(Duration::from_secs(5), || {
        nodes.iter().all(|n| {
            let members = n.get("/v1/cluster", None).1["members"].clone();
            members.as_array().unwrap().iter().any(|m| m["id"] == "n2" && m["weight"] == 0.25 && m["state"] == "alive")
        })
    });
    assert!(spread, "every member sees n2 at weight 0.25");
    assert!(nodes.iter().all(|n| alive(n) == 3));
}

/// Ramp-up: a node that joins at weight 0 is given no partition; raised step by step, it
/// takes its share, under writes, losing nothing.
#[test]
fn a_node_joining_at_weight_0_ramps_up_live_and_takes_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ids, mut nodes) = cluster(dir.path(), 3);
    let svc = mint("svc", 600, true);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let streams: Vec<String> = (0..24).map(|k| format!("ramp:{k}")).collect();
    let threads: Vec<_> = (0..12)
        .map(|w| {
            let (url, stream) = (nodes[w % 3].url.clone(), streams[w % streams.len()].clone());
            let (token, stop, acked) = (svc.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(url, stream, token, stop, acked))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 200), "writes flow");
    let mesh0 = nodes[0].mesh.clone();
    nodes.push(Node::start_with(
        &dir.path().join("n3"),
        &["--node-id", "n3", "--replicas", "3", "--join", &mesh0, "--weight", "0"],
    ));
    ids.push("n3".into());
    assert!(wait_until(Duration::from_secs(10), || alive(&nodes[3]) == 4), "n3 joins");
    std::thread::sleep(Duration::from_secs(3));
    let held = |node: &Node| node.get("/v1/cluster", None).1["partitions"]["replica_here"].as_u64().unwrap();
    assert_eq!(held(&nodes[3]), 0, "at weight 0 a node holds no partition");

    for step in ["0.3", "1"] {
        griddle(&["weight", "--http", addr(&nodes[3]), "--dev", step]);
        std::thread::sleep(Duration::from_secs(2));
        println!("n3 at weight {step}: holds {} partitions", held(&nodes[3]));
    }
    let wanted: Vec<&String> = streams.iter().filter(|s| primary_of(s, &ids) == "n3").collect();
    assert!(!wanted.is_empty(), "at full weight n3 ranks first for some of the streams");
    let took_over = wait_until(Duration::from_secs(30), || {
        nodes[3].get("/v1/cluster", None).1["partitions"]["primary_here"].as_u64().unwrap_or(0) >= 1
    });
    assert!(took_over, "n3 leads partitions once at full weight");
    assert!(held(&nodes[3]) >= 1);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    let acked = acked.lock().unwrap();
    println!("{} appends acknowledged during the ramp-up", acked.len());
    for (i, stream) in streams.iter().enumerate() {
        let held: HashMap<String, u64> = read_all(&nodes[i % 4], stream, &svc)
            .iter()
            .map(|e| (e["id"].as_str().unwrap().to_owned(), e["version"].as_u64().unwrap()))
            .collect();
        for (s, id, version, ..) in acked.iter().filter(|(s, ..)| s == stream) {
            assert_eq!(held.get(id), Some(version), "{s}: {id} acknowledged at v{version}");
        }
    }
}

/// `griddle backup` of a node under writes, then `griddle restore` into a new directory:
/// every event acknowledged before the backup began is there, versions dense.
#[test]
fn a_backup_taken_under_writes_restores_every_event_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("live"));
    let svc = mint("svc", 600, true);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let threads: Vec<_> = (0..8)
        .map(|w| {
            let (url, stream) = (node.url.clone(), format!("backup:{}", w % 4));
            let (token, stop, acked) = (svc.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(url, stream, token, stop, acked))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 500), "writes flow");
    let began = Instant::now();
    let copy = dir.path().join("backup");
    let said = griddle(&["backup", "--http", addr(&node), "--dev", "--out", copy.to_str().unwrap()]);
    println!("{}", said.trim());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    node.kill();
    let before: Vec<_> =
        acked.lock().unwrap().iter().filter(|(.., answered)| *answered < began).cloned().collect::<Vec<_>>();
    assert!(before.len() >= 500);

    let restored_dir = dir.path().join("restored");
    let restored = Node::spawn_command(
        &["restore", "--from", copy.to_str().unwrap(), "--dev", "--http", "127.0.0.1:0", "--mesh", "127.0.0.1:0"],
        &restored_dir,
    );
    for w in 0..4 {
        let stream = format!("backup:{w}");
        let events = read_all(&restored, &stream, &svc);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["version"].as_u64(), Some(i as u64 + 1), "{stream} dense");
        }
        let held: HashMap<&str, u64> =
            events.iter().map(|e| (e["id"].as_str().unwrap(), e["version"].as_u64().unwrap())).collect();
        for (s, id, version, ..) in before.iter().filter(|(s, ..)| *s == stream) {
            assert_eq!(held.get(id.as_str()), Some(version), "{s}: {id} acknowledged before the backup");
        }
    }
    // The restored node takes writes, continuing the streams.
    let body = format!(r#"[{{"id":"{}","type":"t","data":{{}}}}]"#, ulid());
    assert_eq!(restored.post("/v1/streams/backup:0/events", Some(&svc), &body).0, 201);
    println!("{} events acknowledged before the backup, all restored", before.len());
}
