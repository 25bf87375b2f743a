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
    let node = Node::start_logged(
        &dir.path().join("data"),
        &["--node-id", "logged-node", "--log-json", "--join", "127.0.0.1:9"],
        &log,
        "debug",
    );
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
        assert_eq!(entry["node"], "logged-node", "every line names the node: {line}");
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

/// Ghost mode and ramp-up: a node that joins at weight 0 leads and votes in nothing, but
/// follows as a learner the partitions it would hold at full weight, and answers local reads
/// from its copy; raised step by step, it is promoted and takes its share, under writes,
/// losing nothing.
#[test]
fn a_ghost_at_weight_0_follows_its_partitions_then_ramps_up_live() {
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
    let parts = |node: &Node| node.get("/v1/cluster", None).1["partitions"].clone();
    let following = wait_until(Duration::from_secs(20), || parts(&nodes[3])["learner_here"].as_u64().unwrap() >= 1);
    assert!(following, "the ghost follows partitions as a learner: {}", parts(&nodes[3]));
    let ghost = parts(&nodes[3]);
    assert_eq!(ghost["primary_here"].as_u64(), Some(0), "a ghost leads nothing: {ghost}");
    // A partition started after it joined may count it among its first voters if too few
    // others answered; rebalancing then turns it into a learner.
    let votes_in_none = wait_until(Duration::from_secs(20), || parts(&nodes[3])["replica_here"] == 0);
    assert!(votes_in_none, "a ghost votes in nothing: {}", parts(&nodes[3]));
    // Its copy, read locally, is a prefix of the primary's, for the streams it would hold.
    let written = &streams[..12];
    let would_hold: Vec<&String> = written.iter().filter(|s| primary_of(s, &ids) == "n3").collect();
    assert!(!would_hold.is_empty());
    let compared = wait_until(Duration::from_secs(20), || {
        would_hold.iter().all(|stream| {
            let (status, local) =
                nodes[3].get(&format!("/v1/streams/{stream}/events?after=0&limit=100&local=true"), Some(&svc));
            assert_eq!(status, 200, "{local}");
            let local = local["events"].as_array().unwrap().clone();
            let primary = read_all(&nodes[0], stream, &svc);
            !local.is_empty()
                && local.iter().zip(&primary).all(|(a, b)| a["id"] == b["id"] && a["version"] == b["version"])
        })
    });
    if !compared {
        for stream in &would_hold {
            let local = nodes[3].get(&format!("/v1/streams/{stream}/events?after=0&limit=3&local=true"), Some(&svc)).1;
            let primary = nodes[0].get(&format!("/v1/streams/{stream}/events?after=0&limit=3"), Some(&svc)).1;
            println!("{stream}: local {local}\n  primary {primary}");
        }
        println!("{}", parts(&nodes[3]));
    }
    assert!(compared, "the ghost's local reads match the primary's");
    println!("ghost n3 at weight 0: {ghost}");

    for step in ["0.3", "1"] {
        griddle(&["weight", "--http", addr(&nodes[3]), "--dev", step]);
        std::thread::sleep(Duration::from_secs(2));
        println!("n3 at weight {step}: {}", parts(&nodes[3]));
    }
    let wanted: Vec<&String> = streams.iter().filter(|s| primary_of(s, &ids) == "n3").collect();
    assert!(!wanted.is_empty(), "at full weight n3 ranks first for some of the streams");
    let took_over = wait_until(Duration::from_secs(30), || {
        nodes[3].get("/v1/cluster", None).1["partitions"]["primary_here"].as_u64().unwrap_or(0) >= 1
    });
    assert!(took_over, "n3 leads partitions once at full weight");
    assert!(parts(&nodes[3])["replica_here"].as_u64().unwrap() >= 1, "and votes");
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
    let said = griddle(&["backup", "--http", addr(&node), "--dev", "--name", "b1"]);
    let copy = dir.path().join("live-backups").join("b1");
    assert!(copy.join("CURRENT").is_file(), "{said}");
    // A name, never a path; and the same name twice is refused.
    let svc_call = |body: &str| node.call("POST", "/v1/admin/backup", Some(&svc), Some(body)).0;
    assert_eq!(svc_call(r#"{"name":"../escape"}"#), 400);
    assert_eq!(svc_call(r#"{"name":"/tmp/x"}"#), 400);
    assert_eq!(svc_call(r#"{"name":"b1"}"#), 400);
    // A user's token is refused.
    let user = mint("alice", 600, false);
    assert_eq!(node.call("POST", "/v1/admin/backup", Some(&user), Some(r#"{"name":"b2"}"#)).0, 403);
    assert_eq!(node.call("PUT", "/v1/admin/weight", Some(&user), Some(r#"{"weight":0}"#)).0, 403);
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

/// `scripts/rolling-restart` on a new binary under chat load: 8 writers send messages to 4
/// readers, whose syncs (like a browser tab) move to another node when theirs goes away and
/// resume with the same cursor. Afterwards every acknowledged message reached its reader,
/// in order, once, with no reset; and every node runs the new binary.
#[test]
fn a_rolling_restart_under_chat_load_loses_nothing_and_no_sync_skips_an_event() {
    const NODES: usize = 3;
    const READERS: usize = 4;
    const WRITERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (https, meshes): (Vec<u16>, Vec<u16>) = (0..NODES).map(|_| (port(), port())).unzip();
    let urls: Vec<String> = https.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    for i in 0..NODES {
        let join: Vec<String> =
            (0..NODES).filter(|j| *j != i).map(|j| format!("\"127.0.0.1:{}\"", meshes[j])).collect();
        let config = format!(
            "node_id = \"n{i}\"\ndata_dir = \"{}\"\nhttp = \"127.0.0.1:{}\"\nmesh = \"127.0.0.1:{}\"\n\
             join = [{}]\ndev = true\nreplicas = 3\nbootstrap_expect = 3\n",
            run.join(format!("n{i}")).display(),
            https[i],
            meshes[i],
            join.join(", ")
        );
        std::fs::write(run.join(format!("n{i}.toml")), config).unwrap();
    }
    // Started detached, as an operator's nodes are: the script, not this test, restarts them.
    let binary = env!("CARGO_BIN_EXE_griddle");
    for i in 0..NODES {
        let started = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "setsid nohup {binary} serve --config {}/n{i}.toml >>n{i}.log 2>&1 </dev/null & echo $! >n{i}.pid",
                run.display()
            ))
            .current_dir(run)
            .env("GRIDDLE_LOG", "warn")
            .status()
            .unwrap();
        assert!(started.success());
    }
    let _cleanup = KillPids(run.to_path_buf());
    let alive_at = |url: &String| {
        let cluster: Value = match ureq::get(&format!("{url}/v1/cluster")).call() {
            Ok(answer) => answer.into_json().unwrap(),
            Err(_) => return 0,
        };
        cluster["members"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count())
    };
    assert!(wait_until(Duration::from_secs(20), || urls.iter().all(|u| alive_at(u) == NODES)), "mesh forms");

    let stop = Arc::new(AtomicBool::new(false));
    let writers_done = Arc::new(AtomicBool::new(false));
    let acked: Arc<std::sync::Mutex<Vec<(usize, String)>>> = Arc::default();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (urls, done, acked) = (urls.clone(), writers_done.clone(), acked.clone());
            std::thread::spawn(move || sync_reader(r, &urls, &done, &acked))
        })
        .collect();
    // Every reader holds a cursor before the first message is sent.
    std::thread::sleep(Duration::from_secs(1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (urls, stop, acked) = (urls.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || chat_writer(w, w % READERS, &urls, &stop, &acked))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() >= 100), "messages flow");

    // The "new binary": another file, so each process can be checked to run it.
    let new_binary = run.join("griddle-new");
    std::fs::copy(binary, &new_binary).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/rolling-restart");
    let began = Instant::now();
    let output = Command::new(script)
        .args(["--run-dir", run.to_str().unwrap(), "--binary", new_binary.to_str().unwrap()])
        .env("GRIDDLE_LOG", "warn")
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "rolling restart failed:\n{said}");
    println!("{said}(took {:?} under load)", began.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|t| t.join().unwrap());
    writers_done.store(true, Ordering::Relaxed);
    let acked = acked.lock().unwrap().clone();

    // Readers keep syncing until they have every acknowledged message (or 20 s pass).
    let got: Vec<Received> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    for (r, received) in got.iter().enumerate() {
        assert_eq!(received.resets, 0, "reader {r}: a sync was reset");
        let ids: std::collections::HashSet<&str> = received.events.iter().map(|(_, _, id)| id.as_str()).collect();
        assert_eq!(ids.len(), received.events.len(), "reader {r}: an event came twice");
        let mut by_chat: HashMap<&str, Vec<u64>> = HashMap::new();
        for (chat, version, _) in &received.events {
            by_chat.entry(chat.as_str()).or_default().push(*version);
        }
        for (chat, versions) in by_chat {
            let dense: Vec<u64> = (1..=versions.len() as u64).collect();
            assert_eq!(versions, dense, "reader {r}: {chat} in order, without gaps");
        }
        let missing: Vec<&String> =
            acked.iter().filter(|(to, id)| *to == r && !ids.contains(id.as_str())).map(|(_, id)| id).collect();
        assert!(missing.is_empty(), "reader {r}: acknowledged but never synced: {missing:?}");
        println!("reader {r}: {} messages, {} gateway switches", received.events.len(), received.switches);
    }
    println!("{} messages acknowledged during the rolling restart", acked.len());
    for i in 0..NODES {
        let pid = std::fs::read_to_string(run.join(format!("n{i}.pid"))).unwrap();
        let exe = std::fs::read_link(format!("/proc/{}/exe", pid.trim())).unwrap();
        assert_eq!(exe, new_binary, "n{i} runs the new binary");
    }
}

/// Kills (SIGTERM, then SIGKILL) the processes of every `*.pid` in a directory when dropped.
struct KillPids(std::path::PathBuf);

impl Drop for KillPids {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else { return };
        for entry in entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pid")) {
            if let Ok(pid) = std::fs::read_to_string(entry.path()) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
}

/// Sends messages from `s{w}` to `r{to}`, each with its own id, retried through the next node
/// until acknowledged.
fn chat_writer(
    w: usize,
    to: usize,
    urls: &[String],
    stop: &AtomicBool,
    acked: &std::sync::Mutex<Vec<(usize, String)>>,
) {
    let token = mint(&format!("s{w}"), 600, false);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let mut gateway = w % urls.len();
    while !stop.load(Ordering::Relaxed) {
        let id = ulid();
        let body = format!(r#"{{"id":"{id}","text":"from s{w}"}}"#);
        loop {
            let url = format!("{}/v1/chats/r{to}/messages", urls[gateway]);
            let answer = agent
                .post(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .set("Content-Type", "application/json")
                .send_string(&body);
            if answer.is_ok() {
                acked.lock().unwrap().push((to, id));
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return; // Unacknowledged: stored or not, either is fine.
            }
            gateway = (gateway + 1) % urls.len();
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[derive(Default)]
struct Received {
    /// (chat stream, version, message id), in the order syncs handed them out.
    events: Vec<(String, u64, String)>,
    resets: usize,
    switches: usize,
}

/// A browser tab's sync loop for `r{r}`: long-polls with its cursor, and on a failed call moves
/// to the next node with the same cursor. Once the writers are done it goes on until it has
/// every message acknowledged for it, for at most 20 s.
fn sync_reader(
    r: usize,
    urls: &[String],
    done: &AtomicBool,
    acked: &std::sync::Mutex<Vec<(usize, String)>>,
) -> Received {
    let token = mint(&format!("r{r}"), 600, false);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let mut gateway = r % urls.len();
    let mut received = Received::default();
    let mut cursor: Option<String> = None;
    let mut done_at: Option<Instant> = None;
    loop {
        if done.load(Ordering::Relaxed) {
            let since = *done_at.get_or_insert_with(Instant::now);
            let has = |id: &String| received.events.iter().any(|(_, _, got)| got == id);
            let complete = acked.lock().unwrap().iter().filter(|(to, _)| *to == r).all(|(_, id)| has(id));
            if complete || since.elapsed() > Duration::from_secs(20) {
                return received;
            }
        }
        let since = cursor.as_ref().map_or(String::new(), |c| format!("&since={c}"));
        let url = format!("{}/v1/sync?timeout=1{since}", urls[gateway]);
        let Ok(answer) = agent.get(&url).set("Authorization", &format!("Bearer {token}")).call() else {
            gateway = (gateway + 1) % urls.len();
            received.switches += 1;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let body: Value = answer.into_json().unwrap();
        if body["reset"] == true {
            received.resets += 1;
        }
        for event in body["events"].as_array().into_iter().flatten().filter(|e| e["type"] == "chat.message") {
            let chat = event["stream"].as_str().unwrap().to_owned();
            received.events.push((chat, event["version"].as_u64().unwrap(), event["id"].as_str().unwrap().to_owned()));
        }
        cursor = body["cursor"].as_str().map(String::from);
    }
}
