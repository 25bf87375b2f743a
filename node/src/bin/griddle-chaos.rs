//! `griddle-chaos`: real `griddle` processes under mixed load and random faults, then a
//! checker in the spirit of Jepsen. `scripts/chaos` runs it; `scripts/test` runs it briefly.
//!
//! The cluster: N nodes (5) with `--replicas 3` on loopback. Each node's mesh port sits
//! behind a userspace UDP fault proxy that the node advertises (`--mesh-advertise`), so every
//! QUIC packet to a node passes its proxy: packets (and their answers) can be dropped,
//! delayed, duplicated, or cut off by peer (partitions). A peer is known by the source port
//! of its packets, which is its real mesh port.
//!
//! The load, all with ids chosen by the client and retried (the same id, through the next
//! node) until acknowledged:
//! - stream writers append to generic streams;
//! - chat writers send messages to readers;
//! - sync readers long-poll like a browser tab (their cursor moves with them to another node
//!   when theirs fails), and feed readers read pages.
//!
//! The faults, one every `--fault-every` (randomly chosen from `--seed`): `kill -9` and a
//! restart a little later, SIGSTOP for a while then SIGCONT, a graceful restart (SIGTERM),
//! packet loss, delay or duplication at one node, one node cut off from the others, and a
//! damaged disk (a graceful stop, bytes flipped in the middle of the WAL, a restart: the node
//! must set the copy aside and be rebuilt from its replicas; only when every copy is whole
//! and votes). At most one node is down or frozen at a time (W = 2 of R = 3 must stay
//! reachable for progress; safety must hold regardless).
//!
//! Afterwards everything heals, the cluster settles, and the checker asserts:
//! - every acknowledged append is in its stream, once, at its acknowledged version, and the
//!   stream's versions are dense (read through the cluster);
//! - every disk that its partition's conf names as a voter holds each of them too;
//! - every sync reader got every acknowledged message of its conversations, once each, in
//!   version order, with no `reset`;
//! - every damaged disk was found and set aside (the node's log says so).
//!
//! It prints a JSON report (faults by kind, operations, acknowledged, lost) and exits 1 if
//! anything was lost, duplicated, out of order or reset.
#![allow(clippy::disallowed_methods)] // A test harness lives in real time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use store::{ReadRange, Store, StreamName, Version};
use tokio::net::UdpSocket;

#[derive(Clone, Debug)]
struct Args {
    binary: PathBuf,
    nodes: usize,
    seconds: u64,
    fault_every_ms: u64,
    seed: u64,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let own = std::env::current_exe()?;
    let mut args = Args {
        binary: own.with_file_name("griddle"),
        nodes: 5,
        seconds: 60,
        fault_every_ms: 3000,
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64,
        dir: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--binary" => args.binary = value()?.into(),
            "--nodes" => args.nodes = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--fault-every-ms" => args.fault_every_ms = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            "--out" => args.out = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "griddle-chaos [--seconds 60] [--nodes 5] [--fault-every-ms 3000] [--seed S] [--binary PATH] \
                     [--dir DIR] [--out report.json]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    Ok(args)
}

// ---- the UDP fault proxy ----

/// What a node's proxy does to the packets that pass it, both ways.
#[derive(Clone, Debug, Default)]
struct Rules {
    loss: f64,
    dup: f64,
    delay_ms: u64,
    /// Real mesh ports of the peers cut off from this node.
    blocked: HashSet<u16>,
}

#[derive(Default)]
struct ProxyStats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
}

struct Proxy {
    rules: Arc<Mutex<Rules>>,
    stats: Arc<ProxyStats>,
}

impl Proxy {
    /// Listens on `listen` for the node whose mesh endpoint is `target`.
    async fn start(listen: u16, target: SocketAddr, seed: u64) -> anyhow::Result<Proxy> {
        let socket = Arc::new(UdpSocket::bind(("127.0.0.1", listen)).await?);
        let rules = Arc::new(Mutex::new(Rules::default()));
        let stats = Arc::new(ProxyStats::default());
        let rng = Arc::new(Mutex::new(SmallRng::seed_from_u64(seed)));
        let (r, s) = (rules.clone(), stats.clone());
        tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
                let upstream = match upstreams.get(&from) {
                    Some(upstream) => upstream.clone(),
                    None => {
                        let Ok(upstream) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        if upstream.connect(target).await.is_err() {
                            continue;
                        }
                        let upstream = Arc::new(upstream);
                        upstreams.insert(from, upstream.clone());
                        // Answers from the node go back to the peer, through the same rules.
                        let (socket, upstream2, r, s, rng) =
                            (socket.clone(), upstream.clone(), r.clone(), s.clone(), rng.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            loop {
                                // A connected UDP socket reports an ICMP "port unreachable"
                                // (the node not up yet, or restarting) on its next recv: skip it.
                                let Ok(n) = upstream2.recv(&mut buf).await else { continue };
                                let Some((copies, delay)) = decide(&r, &s, &rng, from.port()) else { continue };
                                for _ in 0..copies {
                                    let (socket, packet) = (socket.clone(), buf[..n].to_vec());
                                    if delay == 0 {
                                        let _ = socket.send_to(&packet, from).await;
                                    } else {
                                        tokio::spawn(async move {
                                            tokio::time::sleep(Duration::from_millis(delay)).await;
                                            let _ = socket.send_to(&packet, from).await;
                                        });
                                    }
                                }
                            }
                        });
                        upstream
                    }
                };
                let Some((copies, delay)) = decide(&r, &s, &rng, from.port()) else { continue };
                for _ in 0..copies {
                    let (upstream, packet) = (upstream.clone(), buf[..n].to_vec());
                    if delay == 0 {
                        let _ = upstream.send(&packet).await;
                    } else {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            let _ = upstream.send(&packet).await;
                        });
                    }
                }
            }
        });
        Ok(Proxy { rules, stats })
    }

    fn set(&self, change: impl FnOnce(&mut Rules)) {
        change(&mut self.rules.lock().unwrap());
    }
}

/// What the rules do to one packet exchanged with the peer at `peer_port`: `None` to drop
/// it, else how many copies to send and after how long.
fn decide(rules: &Mutex<Rules>, stats: &ProxyStats, rng: &Mutex<SmallRng>, peer_port: u16) -> Option<(usize, u64)> {
    let rules = rules.lock().unwrap().clone();
    let mut rng = rng.lock().unwrap();
    if rules.blocked.contains(&peer_port) || rng.gen_bool(rules.loss.clamp(0.0, 1.0)) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let copies = if rng.gen_bool(rules.dup.clamp(0.0, 1.0)) { 2 } else { 1 };
    if copies > 1 {
        stats.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    Some((copies, rules.delay_ms))
}

// ---- the nodes ----

struct NodeProc {
    id: String,
    http: u16,
    mesh: u16,
    proxy: u16,
    data: PathBuf,
    log: PathBuf,
    /// The nodes' config: a disk damaged again soon after its rebuild is rebuilt again (the
    /// default stops the node, waiting for an operator).
    config: PathBuf,
    child: Option<Child>,
    /// Down (killed or stopping) until this, then restarted; frozen until this, then SIGCONT.
    down_until: Option<Instant>,
    frozen_until: Option<Instant>,
    /// When the process was started: a SIGTERM before it installed its handler would kill
    /// it outright, which says nothing about the graceful stop.
    started_at: Instant,
}

impl NodeProc {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    fn start(&mut self, binary: &Path, join: &str, nodes: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(binary)
            .args(["serve", "--dev", "--node-id", &self.id, "--replicas", "3"])
            .args(["--bootstrap-expect", &nodes.to_string()])
            .args(["--http", &format!("127.0.0.1:{}", self.http)])
            .args(["--mesh", &format!("127.0.0.1:{}", self.mesh)])
            .args(["--mesh-advertise", &format!("127.0.0.1:{}", self.proxy)])
            .args(["--join", join])
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data)
            .env("GRIDDLE_LOG", std::env::var("CHAOS_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        self.child = Some(child);
        self.started_at = Instant::now();
        Ok(())
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status (SIGKILL after 15 s).
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn token(user: &str, svc: bool) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 24 * 3600;
    web::auth::mint(node::config::DEV_SECRET.as_bytes(), &web::auth::Claims { sub: user.into(), exp, svc })
}

// ---- the load ----

#[derive(Default)]
struct Ledger {
    /// (stream, id, version) of every acknowledged stream append.
    appends: Vec<(String, String, u64)>,
    /// (reader, message id) of every acknowledged chat message.
    messages: Vec<(usize, String)>,
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    failures: AtomicU64,
    feed_reads: AtomicU64,
}

/// A client that goes to the next node when one fails, as a browser tab or a service would.
struct Client<'a> {
    agent: ureq::Agent,
    urls: &'a [String],
    at: usize,
}

impl<'a> Client<'a> {
    fn new(urls: &'a [String], first: usize) -> Client<'a> {
        Client { agent: agent(), urls, at: first % urls.len() }
    }

    /// Posts `body` to `path`, the same body node after node, until a 200/201 or `stop`.
    fn until_acked(&mut self, path: &str, token: &str, body: &str, stop: &AtomicBool, c: &Counters) -> Option<Value> {
        loop {
            c.attempts.fetch_add(1, Ordering::Relaxed);
            let answer = self
                .agent
                .post(&format!("{}{path}", self.urls[self.at]))
                .set("Authorization", &format!("Bearer {token}"))
                .set("Content-Type", "application/json")
                .send_string(body);
            if let Ok(answer) = answer {
                return answer.into_json().ok();
            }
            c.failures.fetch_add(1, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                return None; // Unacknowledged: stored or not, either is allowed.
            }
            self.at = (self.at + 1) % self.urls.len();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

fn stream_writer(w: usize, urls: Vec<String>, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>, c: Arc<Counters>) {
    let token = token("chaos-writer", true);
    let mut client = Client::new(&urls, w);
    let stream = format!("chaos:{}", w % 6);
    while !stop.load(Ordering::Relaxed) {
        let id = ulid::Ulid::new().to_string();
        let body = format!(r#"[{{"id":"{id}","type":"op","data":{{"w":{w}}}}}]"#);
        let path = format!("/v1/streams/{stream}/events");
        let Some(answer) = client.until_acked(&path, &token, &body, &stop, &c) else { return };
        let version = answer["events"][0]["version"].as_u64().unwrap_or(0);
        ledger.lock().unwrap().appends.push((stream.clone(), id, version));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn chat_writer(
    w: usize,
    readers: usize,
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    c: Arc<Counters>,
) {
    let token = token(&format!("sender{w}"), false);
    let mut client = Client::new(&urls, w);
    let to = w % readers;
    while !stop.load(Ordering::Relaxed) {
        let id = ulid::Ulid::new().to_string();
        let body = format!(r#"{{"id":"{id}","text":"chaos {w}"}}"#);
        let path = format!("/v1/chats/reader{to}/messages");
        if client.until_acked(&path, &token, &body, &stop, &c).is_none() {
            return;
        }
        ledger.lock().unwrap().messages.push((to, id));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn feed_reader(r: usize, urls: Vec<String>, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    let (token, agent) = (token(&format!("reader{r}"), false), agent());
    let mut gateway = r % urls.len();
    while !stop.load(Ordering::Relaxed) {
        let answer = agent
            .get(&format!("{}/v1/feed?limit=20", urls[gateway]))
            .set("Authorization", &format!("Bearer {token}"))
            .call();
        if answer.is_ok() {
            c.feed_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            gateway = (gateway + 1) % urls.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Default)]
struct Received {
    /// (stream, version, id) in the order syncs handed them out.
    events: Vec<(String, u64, String)>,
    resets: usize,
    switches: usize,
    polls: usize,
}

/// A tab's sync loop; after `done` it goes on until it has every message acknowledged for it,
/// for at most 30 s.
fn sync_reader(
    r: usize,
    urls: Vec<String>,
    done: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    ready: Arc<AtomicU64>,
) -> Received {
    let token = token(&format!("reader{r}"), false);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(8)).build();
    let mut gateway = r % urls.len();
    let mut received = Received::default();
    let mut cursor: Option<String> = None;
    let mut done_at: Option<Instant> = None;
    loop {
        if done.load(Ordering::Relaxed) {
            let since = *done_at.get_or_insert_with(Instant::now);
            let have: HashSet<&str> = received.events.iter().map(|(_, _, id)| id.as_str()).collect();
            let complete = ledger
                .lock()
                .unwrap()
                .messages
                .iter()
                .filter(|(to, _)| *to == r)
                .all(|(_, id)| have.contains(id.as_str()));
            if complete || since.elapsed() > Duration::from_secs(30) {
                return received;
            }
        }
        let since = cursor.as_ref().map_or(String::new(), |c| format!("&since={c}"));
        received.polls += 1;
        let answer = agent
            .get(&format!("{}/v1/sync?timeout=2{since}", urls[gateway]))
            .set("Authorization", &format!("Bearer {token}"))
            .call();
        let Ok(answer) = answer else {
            gateway = (gateway + 1) % urls.len();
            received.switches += 1;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let Ok(body) = answer.into_json::<Value>() else { continue };
        if body["reset"] == true {
            received.resets += 1;
        }
        for event in body["events"].as_array().into_iter().flatten().filter(|e| e["type"] == "chat.message") {
            let stream = event["stream"].as_str().unwrap_or_default().to_owned();
            let id = event["id"].as_str().unwrap_or_default().to_owned();
            received.events.push((stream, event["version"].as_u64().unwrap_or(0), id));
        }
        if cursor.is_none() && body["cursor"].is_string() {
            ready.fetch_add(1, Ordering::Relaxed); // From here on every message comes as an event.
        }
        cursor = body["cursor"].as_str().map(String::from).or(cursor);
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(6)).build()
}

// ---- faults ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Kill,
    Freeze,
    GracefulRestart,
    Loss,
    Delay,
    Duplicate,
    Partition,
    /// A graceful stop, bytes flipped in the middle of the node's WAL (records follow, so
    /// RocksDB refuses it rather than taking it for a torn tail), a restart: the node must
    /// set its copy aside and be rebuilt from its replicas (`node::damage`).
    Damage,
}

const FAULTS: [Fault; 8] = [
    Fault::Kill,
    Fault::Freeze,
    Fault::GracefulRestart,
    Fault::Loss,
    Fault::Delay,
    Fault::Duplicate,
    Fault::Partition,
    Fault::Damage,
];

/// No partition is under-replicated anywhere (each has R whole voters) and followers trail
/// by little (they always do a bit under load). A disk is damaged only then, since two
/// rebuilt at once is more than R = 3, W = 2 allows.
fn settled(urls: &[String]) -> bool {
    urls.iter().all(|u| {
        let Ok(answer) = agent().get(&format!("{u}/v1/cluster")).call() else { return false };
        let cluster: Value = answer.into_json().unwrap_or_default();
        let parts = &cluster["partitions"];
        parts["under_replicated"] == 0 && parts["lag_max"].as_u64().is_some_and(|lag| lag <= 500)
    })
}

/// Flips 16 bytes between a quarter and a half of the largest WAL file in `data`; `None`
/// when the WAL is too short for records to surely follow the damage.
fn damage_wal(data: &Path, rng: &mut SmallRng) -> anyhow::Result<Option<String>> {
    let mut logs: Vec<(u64, PathBuf)> = std::fs::read_dir(data)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .filter_map(|p| Some((p.metadata().ok()?.len(), p)))
        .collect();
    logs.sort();
    let Some((len, wal)) = logs.pop().filter(|(len, _)| *len > 64 * 1024) else { return Ok(None) };
    let mut bytes = std::fs::read(&wal)?;
    let at = rng.gen_range(len / 4..len / 2) as usize;
    for byte in &mut bytes[at..at + 16] {
        *byte ^= 0xa5;
    }
    std::fs::write(&wal, bytes)?;
    Ok(Some(format!("{} at {at} of {len}", wal.file_name().unwrap_or_default().to_string_lossy())))
}

/// A change to undo later: the network rules of a node, back to normal.
struct Undo {
    at: Instant,
    node: usize,
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let _guard = runtime.enter();
    let temp = tempfile_dir(&args)?;
    let dir = temp.path().to_path_buf();
    let mut rng = SmallRng::seed_from_u64(args.seed);
    eprintln!("chaos: seed {}, {} nodes, {} s, in {}", args.seed, args.nodes, args.seconds, dir.display());

    std::fs::write(dir.join("chaos.toml"), "damage_rebuild_interval_s = 0\n")?;
    let mut nodes: Vec<NodeProc> = (0..args.nodes)
        .map(|i| NodeProc {
            id: format!("n{i}"),
            http: free_port(),
            mesh: free_udp_port(),
            proxy: free_udp_port(),
            data: dir.join(format!("n{i}")),
            log: dir.join(format!("n{i}.log")),
            config: dir.join("chaos.toml"),
            child: None,
            down_until: None,
            frozen_until: None,
            started_at: Instant::now(),
        })
        .collect();
    let proxies: Vec<Proxy> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let target: SocketAddr = format!("127.0.0.1:{}", n.mesh).parse().unwrap();
            runtime.block_on(Proxy::start(n.proxy, target, args.seed ^ (i as u64 + 1)))
        })
        .collect::<anyhow::Result<_>>()?;
    let join = format!("127.0.0.1:{},127.0.0.1:{}", nodes[0].proxy, nodes[1].proxy);
    for node in &mut nodes {
        node.start(&args.binary, &join, args.nodes)?;
    }
    let urls: Vec<String> = nodes.iter().map(NodeProc::url).collect();
    let result = run(&args, &mut rng, &mut nodes, &proxies, &join, &urls);
    for node in &mut nodes {
        node.kill();
    }
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("chaos: {error:#} (logs in {})", dir.display());
            std::mem::forget(temp); // Keep the logs and disks for a look.
            std::process::exit(2);
        }
    };
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text)?;
    }
    if report["ok"] != true {
        eprintln!("chaos: FAILED (logs in {})", dir.display());
        std::mem::forget(temp); // Keep the logs and disks for a look.
        std::process::exit(1);
    }
    Ok(())
}

fn tempfile_dir(args: &Args) -> anyhow::Result<tempfile::TempDir> {
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Ok(tempfile::Builder::new().prefix("chaos-").tempdir_in(dir)?)
        }
        None => Ok(tempfile::Builder::new().prefix("griddle-chaos-").tempdir()?),
    }
}

fn alive_seen(url: &str) -> usize {
    let Ok(answer) = agent().get(&format!("{url}/v1/cluster")).call() else { return 0 };
    let cluster: Value = answer.into_json().unwrap_or_default();
    cluster["members"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count())
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn run(
    args: &Args,
    rng: &mut SmallRng,
    nodes: &mut [NodeProc],
    proxies: &[Proxy],
    join: &str,
    urls: &[String],
) -> anyhow::Result<Value> {
    let n = nodes.len();
    if !wait_until(Duration::from_secs(30), || urls.iter().all(|u| alive_seen(u) == n)) {
        bail!("the mesh did not form");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers_done = Arc::new(AtomicBool::new(false));
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let counters: Arc<Counters> = Arc::default();
    const READERS: usize = 4;
    let with_cursor = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (urls, done, ledger, ready) =
                (urls.to_vec(), writers_done.clone(), ledger.clone(), with_cursor.clone());
            std::thread::spawn(move || sync_reader(r, urls, done, ledger, ready))
        })
        .collect();
    // Messages sent before a reader's first cursor arrive in its snapshot, not as events.
    if !wait_until(Duration::from_secs(30), || with_cursor.load(Ordering::Relaxed) == READERS as u64) {
        bail!("the sync readers got no cursor within 30 s");
    }
    let mut load = Vec::new();
    for w in 0..8 {
        let (urls, stop, ledger, c) = (urls.to_vec(), stop.clone(), ledger.clone(), counters.clone());
        load.push(std::thread::spawn(move || stream_writer(w, urls, stop, ledger, c)));
    }
    for w in 0..8 {
        let (urls, stop, ledger, c) = (urls.to_vec(), stop.clone(), ledger.clone(), counters.clone());
        load.push(std::thread::spawn(move || chat_writer(w, READERS, urls, stop, ledger, c)));
    }
    for r in 0..2 {
        let (urls, stop, c) = (urls.to_vec(), stop.clone(), counters.clone());
        load.push(std::thread::spawn(move || feed_reader(r, urls, stop, c)));
    }

    // Faults until the time is up.
    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut undos: Vec<Undo> = Vec::new();
    let mut next_fault = started + Duration::from_millis(args.fault_every_ms);
    let mut graceful_exits_not_zero: Vec<String> = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        for node in nodes.iter_mut() {
            if node.frozen_until.is_some_and(|t| t <= now) {
                node.signal("-CONT");
                node.frozen_until = None;
            }
            if node.down_until.is_some_and(|t| t <= now) {
                node.start(&args.binary, join, n)?;
                node.down_until = None;
            }
        }
        undos.retain(|undo| {
            if undo.at > now {
                return true;
            }
            heal(proxies, nodes, undo.node);
            false
        });
        if now < next_fault {
            continue;
        }
        next_fault = now + Duration::from_millis(args.fault_every_ms / 2 + rng.gen_range(0..args.fault_every_ms));
        let i = rng.gen_range(0..n);
        let fault = FAULTS[rng.gen_range(0..FAULTS.len())];
        let someone_out = nodes.iter().any(|n| n.down_until.is_some() || n.frozen_until.is_some());
        let network_busy = undos.iter().any(|u| u.node == i);
        match fault {
            Fault::Kill | Fault::Freeze | Fault::GracefulRestart if someone_out => continue,
            Fault::GracefulRestart | Fault::Damage if nodes[i].started_at.elapsed() < Duration::from_secs(3) => {
                continue
            }
            Fault::Loss | Fault::Delay | Fault::Duplicate | Fault::Partition if network_busy => continue,
            Fault::Damage if someone_out || !settled(urls) => continue,
            Fault::Damage => {
                if nodes[i].terminate().is_some_and(|status| !status.success()) {
                    graceful_exits_not_zero.push(format!("{} (before damage)", nodes[i].id));
                }
                let damaged = damage_wal(&nodes[i].data, rng)?;
                nodes[i].start(&args.binary, join, n)?;
                let Some(damaged) = damaged else { continue };
                eprintln!("chaos: damaged {}: {damaged}", nodes[i].id);
            }
            Fault::Kill => {
                nodes[i].kill();
                nodes[i].down_until = Some(now + Duration::from_millis(rng.gen_range(500..4000)));
            }
            Fault::Freeze => {
                nodes[i].signal("-STOP");
                nodes[i].frozen_until = Some(now + Duration::from_millis(rng.gen_range(1000..5000)));
            }
            Fault::GracefulRestart => {
                let stopping = Instant::now();
                match nodes[i].terminate() {
                    Some(status) if !status.success() => graceful_exits_not_zero.push(format!(
                        "{} at {:.1}s: {status} after {:?}",
                        nodes[i].id,
                        started.elapsed().as_secs_f64(),
                        stopping.elapsed()
                    )),
                    _ => {}
                }
                nodes[i].start(&args.binary, join, n)?;
            }
            Fault::Loss => proxies[i].set(|r| r.loss = rng.gen_range(0.1..0.4)),
            Fault::Delay => proxies[i].set(|r| r.delay_ms = rng.gen_range(20..150)),
            Fault::Duplicate => proxies[i].set(|r| r.dup = rng.gen_range(0.1..0.3)),
            Fault::Partition => {
                // One node cut off from all the others, both ways.
                let others: HashSet<u16> = (0..n).filter(|j| *j != i).map(|j| nodes[j].mesh).collect();
                proxies[i].set(|r| r.blocked = others);
                for j in (0..n).filter(|j| *j != i) {
                    let port = nodes[i].mesh;
                    proxies[j].set(|r| {
                        r.blocked.insert(port);
                    });
                }
            }
        }
        if matches!(fault, Fault::Loss | Fault::Delay | Fault::Duplicate | Fault::Partition) {
            undos.push(Undo { at: now + Duration::from_millis(rng.gen_range(3000..9000)), node: i });
        }
        *faults.entry(format!("{fault:?}")).or_default() += 1;
        eprintln!("chaos: {:>5.1}s {fault:?} on {}", started.elapsed().as_secs_f64(), nodes[i].id);
    }

    // Heal everything, bring every node back, and let the cluster settle under load.
    for i in 0..n {
        heal(proxies, nodes, i);
        if nodes[i].frozen_until.take().is_some() {
            nodes[i].signal("-CONT");
        }
        if nodes[i].down_until.take().is_some() || nodes[i].child.is_none() {
            nodes[i].start(&args.binary, join, n)?;
        }
    }
    let healed = Instant::now();
    let converged = wait_until(Duration::from_secs(60), || urls.iter().all(|u| alive_seen(u) == n));
    let convergence_ms = healed.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    load.into_iter().for_each(|t| t.join().unwrap());
    writers_done.store(true, Ordering::Relaxed);
    let received: Vec<Received> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    let ledger = Arc::try_unwrap(ledger).map_err(|_| anyhow::anyhow!("ledger still shared"))?.into_inner().unwrap();

    // Let replication finish: no partition lagging anywhere.
    let settled = wait_until(Duration::from_secs(30), || {
        urls.iter().all(|u| {
            let Ok(answer) = agent().get(&format!("{u}/v1/cluster")).call() else { return false };
            let cluster: Value = answer.into_json().unwrap_or_default();
            cluster["partitions"]["lagging"] == 0
        })
    });

    let mut problems: Vec<String> = Vec::new();
    if ledger.appends.is_empty() || ledger.messages.is_empty() {
        problems.push("nothing was acknowledged: the cluster never served the load".into());
    }
    if !converged {
        problems.push("the mesh did not converge within 60 s of the heal".into());
    }
    if !settled {
        problems.push("replication still lagged 30 s after the load stopped".into());
    }
    for exit in &graceful_exits_not_zero {
        problems.push(format!("a graceful stop did not exit 0: {exit}"));
    }

    // 1. Through the cluster: every acknowledged append, once, at its version; dense.
    let svc = token("chaos-checker", true);
    let by_stream: BTreeMap<&str, Vec<&(String, String, u64)>> =
        ledger.appends.iter().fold(BTreeMap::new(), |mut map, a| {
            map.entry(a.0.as_str()).or_default().push(a);
            map
        });
    let mut lost = 0usize;
    for (stream, acked) in &by_stream {
        let events = read_stream(urls, stream, &svc);
        let mut held: HashMap<String, u64> = HashMap::new();
        for (k, event) in events.iter().enumerate() {
            let version = event["version"].as_u64().unwrap_or(0);
            if version != k as u64 + 1 {
                problems.push(format!("{stream}: version {version} at position {} (a gap)", k + 1));
                break;
            }
            if held.insert(event["id"].as_str().unwrap_or_default().to_owned(), version).is_some() {
                problems.push(format!("{stream}: {} stored twice", event["id"]));
            }
        }
        for (_, id, version) in acked {
            if held.get(id) != Some(version) {
                lost += 1;
                problems.push(format!("{stream}: {id} acknowledged at v{version}, held {:?}", held.get(id)));
            }
        }
    }

    // 2. Sync readers: every acknowledged message, once, in order, no reset.
    let mut missed = 0usize;
    for (r, got) in received.iter().enumerate() {
        if got.resets > 0 {
            problems.push(format!("reader{r}: {} resets", got.resets));
        }
        let mut ids = HashSet::new();
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (stream, version, id) in &got.events {
            if !ids.insert(id.as_str()) {
                problems.push(format!("reader{r}: {id} delivered twice"));
            }
            let previous = last.insert(stream.as_str(), *version).unwrap_or(0);
            if *version != previous + 1 {
                problems.push(format!("reader{r}: {stream} went from v{previous} to v{version}"));
            }
        }
        for (_, id) in ledger.messages.iter().filter(|(to, _)| *to == r) {
            if !ids.contains(id.as_str()) {
                missed += 1;
                problems.push(format!("reader{r}: acknowledged message {id} never synced"));
            }
        }
    }

    // 3. Every disk its partition's conf names as a voter holds every acknowledged append.
    // A follower applies an entry once it hears the commit index, which rides on the next
    // message from its primary: one more append per stream tells every voter that all the
    // acknowledged ones before it are committed.
    let sentinel_stop = Arc::new(AtomicBool::new(false));
    let timer = sentinel_stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        timer.store(true, Ordering::Relaxed);
    });
    for stream in by_stream.keys() {
        let body = format!(r#"[{{"id":"{}","type":"sentinel","data":{{}}}}]"#, ulid::Ulid::new());
        let path = format!("/v1/streams/{stream}/events");
        if Client::new(urls, 0).until_acked(&path, &svc, &body, &sentinel_stop, &counters).is_none() {
            problems.push(format!("{stream}: the closing append was not acknowledged"));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    for node in nodes.iter_mut() {
        if node.terminate().is_some_and(|status| !status.success()) {
            problems.push(format!("{}: the final graceful stop did not exit 0", node.id));
        }
    }
    // A member removed from a partition never hears of it: its own conf goes stale. The
    // partition's conf is the one recorded with the latest log position on any disk.
    let mut disks = Vec::new();
    for node in nodes.iter() {
        let disk: Arc<dyn Store> = Arc::new(store::rocks::RocksStore::open(&node.data, Default::default())?);
        let config = node_core::repl::Config {
            partitions: node_core::placement::PARTITIONS_DEFAULT,
            ..node_core::repl::Config::new(node.id.clone())
        };
        let machine = node_core::repl::Replicas::new(config, disk.clone(), 0)?;
        disks.push((node.id.clone(), disk, machine));
    }
    let mut replica_checks = 0usize;
    let mut lost_on_replicas = 0usize;
    for (stream, acked) in &by_stream {
        let part = node_core::placement::partition_of(stream, node_core::placement::PARTITIONS_DEFAULT);
        let latest = disks
            .iter()
            .filter_map(|(_, _, m)| Some((m.position(part)?.0, m.conf(part)?)))
            .max_by(|a, b| a.0.cmp(&b.0));
        let Some((_, conf)) = latest else {
            problems.push(format!("{stream}: no disk holds its partition"));
            continue;
        };
        let voters: Vec<String> = conf.voters().map(|m| m.node.clone()).collect();
        for (id, disk, _) in disks.iter().filter(|(id, ..)| voters.contains(id)) {
            replica_checks += 1;
            let name = StreamName::new(stream.to_string())?;
            let events = disk.read(&name, ReadRange::After { after: Version(0), limit: 1 << 20 })?;
            let held: HashMap<String, u64> = events.iter().map(|e| (e.id.to_string(), e.version.0)).collect();
            let missing = acked.iter().filter(|(_, event, v)| held.get(event) != Some(v)).count();
            if missing > 0 {
                lost_on_replicas += missing;
                problems.push(format!("{id}: {missing} acknowledged appends of {stream} missing on this voter"));
            }
        }
    }

    // 4. Every damaged disk was found and set aside (each node's log says so once per copy).
    let set_aside: u64 = nodes
        .iter()
        .map(|node| {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            log.matches("set the damaged copy aside").count() as u64
        })
        .sum();
    let damaged = faults.get("Damage").copied().unwrap_or(0);
    if set_aside != damaged {
        problems.push(format!("{damaged} disks damaged, {set_aside} set aside and rebuilt"));
    }

    let proxy_stats: Vec<Value> = proxies
        .iter()
        .map(|p| {
            json!({
                "forwarded": p.stats.forwarded.load(Ordering::Relaxed),
                "dropped": p.stats.dropped.load(Ordering::Relaxed),
                "duplicated": p.stats.duplicated.load(Ordering::Relaxed),
            })
        })
        .collect();
    problems.truncate(50);
    Ok(json!({
        "ok": problems.is_empty(),
        "seed": args.seed,
        "nodes": n,
        "seconds": args.seconds,
        "faults": faults,
        "faults_total": faults.values().sum::<u64>(),
        "operations": {
            "attempts": counters.attempts.load(Ordering::Relaxed),
            "failed_attempts": counters.failures.load(Ordering::Relaxed),
            "feed_reads": counters.feed_reads.load(Ordering::Relaxed),
            "sync_polls": received.iter().map(|r| r.polls).sum::<usize>(),
            "sync_gateway_switches": received.iter().map(|r| r.switches).sum::<usize>(),
        },
        "acknowledged": { "appends": ledger.appends.len(), "messages": ledger.messages.len() },
        "lost": lost,
        "lost_on_replicas": lost_on_replicas,
        "replica_checks": replica_checks,
        "damaged_copies_set_aside": set_aside,
        "messages_never_synced": missed,
        "convergence_after_heal_ms": convergence_ms,
        "proxies": proxy_stats,
        "problems": problems,
    }))
}

/// Undoes the network faults at node `i`: its own rules, and others' blocks of it.
fn heal(proxies: &[Proxy], nodes: &[NodeProc], i: usize) {
    proxies[i].set(|r| *r = Rules::default());
    let port = nodes[i].mesh;
    for proxy in proxies {
        proxy.set(|r| {
            r.blocked.remove(&port);
        });
    }
}

/// Every event of `stream`, through whichever node answers.
fn read_stream(urls: &[String], stream: &str, token: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    let mut gateway = 0;
    let mut failures = 0;
    loop {
        let after = all.last().map_or(0, |e| e["version"].as_u64().unwrap_or(0));
        let url = format!("{}/v1/streams/{stream}/events?after={after}&limit=100", urls[gateway]);
        match agent().get(&url).set("Authorization", &format!("Bearer {token}")).call() {
            Ok(answer) => {
                let page: Value = answer.into_json().unwrap_or_default();
                let events = page["events"].as_array().cloned().unwrap_or_default();
                let full = events.len() == 100;
                all.extend(events);
                if !full {
                    return all;
                }
            }
            Err(_) if failures < 20 => {
                failures += 1;
                gateway = (gateway + 1) % urls.len();
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(_) => return all,
        }
    }
}
