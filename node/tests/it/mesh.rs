//! The mesh with real processes: five `griddle serve` on loopback joined through one seed,
//! `kill -9` and restart, and a node from another CA kept out.
//!
//! `GRIDDLE_MESH_KILLS=20` repeats the kill (default 2) and prints detection times.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Node;

/// Every member state `observer` reports, by node id.
fn states(observer: &Node) -> Vec<(String, String)> {
    let (status, cluster) = observer.get("/v1/cluster", None);
    assert_eq!(status, 200, "{cluster}");
    cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m: &Value| (m["id"].as_str().unwrap().to_owned(), m["state"].as_str().unwrap().to_owned()))
        .collect()
}

fn alive(observer: &Node) -> usize {
    states(observer).iter().filter(|(_, s)| s == "alive").count()
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn five_processes_detect_a_kill_within_3_seconds_and_take_the_node_back() {
    let dir = tempfile::tempdir().unwrap();
    let start = |i: usize, join: Option<&str>, mesh: Option<&str>| {
        let id = format!("n{i}");
        let mut args = vec!["--node-id", id.as_str()];
        if let Some(join) = join {
            args.extend(["--join", join]);
        }
        if let Some(mesh) = mesh {
            args.extend(["--mesh", mesh]);
        }
        Node::start_with(&dir.path().join(&id), &args)
    };
    let seed = start(0, None, None);
    let seed_mesh = seed.mesh.clone();
    let mut nodes: Vec<Option<Node>> = vec![Some(seed)];
    for i in 1..5 {
        nodes.push(Some(start(i, Some(&seed_mesh), None)));
    }
    let all_alive = |nodes: &[Option<Node>]| nodes.iter().flatten().all(|n| alive(n) == 5);
    wait_until(Duration::from_secs(10), || all_alive(&nodes)).expect("all five report five alive members");
    for node in nodes.iter().flatten() {
        assert_eq!(node.get("/readyz", None).0, 200);
    }

    let kills: usize = std::env::var("GRIDDLE_MESH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(2);
    let mut detections = Vec::new();
    for round in 0..kills {
        let victim = 1 + round % 4;
        let victim_id = format!("n{victim}");
        let victim_mesh = nodes[victim].as_ref().unwrap().mesh.clone();
        nodes[victim].take().unwrap().kill();
        let killed = Instant::now();
        let mut pending: Vec<usize> = (0..5).filter(|i| *i != victim).collect();
        while !pending.is_empty() && killed.elapsed() < Duration::from_secs(10) {
            pending.retain(|i| {
                let down = states(nodes[*i].as_ref().unwrap()).iter().any(|(id, s)| *id == victim_id && s == "down");
                if down {
                    detections.push(killed.elapsed());
                }
                !down
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(pending.is_empty(), "round {round}: nodes {pending:?} never saw {victim_id} down");
        nodes[victim] = Some(start(victim, Some(&seed_mesh), Some(&victim_mesh)));
        wait_until(Duration::from_secs(10), || all_alive(&nodes))
            .expect("the restarted node is back: five alive everywhere");
    }
    // A graceful stop says goodbye: the others see it gone at once, not after a suspicion.
    let leaver = nodes[4].take().unwrap();
    assert!(leaver.terminate().success());
    let took = wait_until(Duration::from_secs(5), || {
        (0..4).all(|i| states(nodes[i].as_ref().unwrap()).iter().any(|(id, s)| id == "n4" && s == "down"))
    });
    let took = took.expect("a node stopped with SIGTERM is seen as gone by every other");
    assert!(took < Duration::from_millis(1000), "leaving took {took:?} to be seen");
    detections.sort();
    let (p50, p99, max) = (quantile(&detections, 0.5), quantile(&detections, 0.99), *detections.last().unwrap());
    println!(
        "failure detection over {kills} kills ({} observations): p50 {p50:?}, p99 {p99:?}, max {max:?}",
        detections.len()
    );
    assert!(max <= Duration::from_secs(3), "a survivor took {max:?} to see a dead node down");
}

#[test]
fn a_node_with_another_cluster_ca_cannot_join_and_the_log_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let seed = Node::start_with(&dir.path().join("seed"), &["--node-id", "seed"]);
    let griddle = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_griddle")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let (ca, certs) = (dir.path().join("other-ca"), dir.path().join("intruder-certs"));
    griddle(&["cluster", "init", "--out", ca.to_str().unwrap()]);
    griddle(&[
        "cluster",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--node-id",
        "intruder",
        "--out",
        certs.to_str().unwrap(),
    ]);
    let log = dir.path().join("intruder.log");
    let intruder = Node::start_logged(
        &dir.path().join("intruder"),
        &["--certs", certs.to_str().unwrap(), "--join", &seed.mesh],
        &log,
        "warn",
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        states(&seed).iter().all(|(id, _)| id != "intruder"),
        "the seed admitted the intruder: {:?}",
        states(&seed)
    );
    assert_eq!(states(&intruder).len(), 1, "the intruder learned of nobody");
    assert_eq!(intruder.get("/readyz", None).0, 503, "a node that cannot join is not ready");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("mesh handshake refused") && text.contains("UnknownIssuer"), "the log says why: {text}");
}

/// Both cores kept busy by two spinning threads while five nodes run; every member state
/// any node reports is sampled every 50 ms: any state but alive is a false suspicion.
/// `GRIDDLE_MESH_SOAK_SECS` sets the length (default 5).
#[test]
fn no_false_suspicions_with_both_cores_busy() {
    let dir = tempfile::tempdir().unwrap();
    let seed = Node::start_with(&dir.path().join("n0"), &["--node-id", "n0"]);
    let mut nodes = vec![];
    for i in 1..5 {
        let id = format!("n{i}");
        nodes.push(Node::start_with(&dir.path().join(&id), &["--node-id", &id, "--join", &seed.mesh]));
    }
    nodes.push(seed);
    wait_until(Duration::from_secs(10), || nodes.iter().all(|n| alive(n) == 5)).expect("five alive");
    let secs: u64 = std::env::var("GRIDDLE_MESH_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (samples, suspicions) = std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            });
        }
        let started = Instant::now();
        let (mut samples, mut suspicions) = (0, Vec::new());
        while started.elapsed() < Duration::from_secs(secs) {
            for node in &nodes {
                for (id, state) in states(node) {
                    samples += 1;
                    if state != "alive" {
                        suspicions.push((started.elapsed(), id, state));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (samples, suspicions)
    });
    println!("false suspicions over {secs} s with both cores busy: {} in {samples} samples", suspicions.len());
    assert!(suspicions.is_empty(), "{suspicions:?}");
}
