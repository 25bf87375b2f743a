//! `griddle-load`: the open-loop load generator of `scripts/bench`.
//!
//! Open loop, as wrk2 does it: each connection has its own schedule (request `i` of
//! connection `c` is due at `start + (i * C + c) / rate`), sends when a request is due (or at
//! once when it is late), and measures latency from the time the request was *due*, not from
//! when it went out. A server that stalls therefore shows the stall in every request that
//! waited behind it: no coordinated omission. `--rate 0` is closed loop (each connection sends
//! its next request when the answer arrives), used to find the saturation throughput.
//! Latencies go into an HdrHistogram (µs, 3 significant digits).
//!
//! Targets speak their own protocol: HTTP/1.1 keep-alive (Griddle, nginx), RESP (Redis), the
//! NATS text protocol. Every run prints one JSON object on stdout (`scripts/bench` collects
//! them) and a human line on stderr.
//!
//! ```text
//! griddle-load --scenario append --target griddle --addr 127.0.0.1:7700 --connections 250 --rate 0 --seconds 10
//! griddle-load --scenario read   --target nginx   --addr 127.0.0.1:8080 --path /feed.json --rate 20000
//! griddle-load --scenario append --target redis   --addr 127.0.0.1:6379 --connections 10
//! griddle-load --scenario fanout --target griddle --addr A --sub-addr B --rate 1000 --idle 10000
//! griddle-load --scenario fanout --target nats    --addr 127.0.0.1:4222 --rate 1000 --idle 10000
//! griddle-load --scenario hold   --target griddle --addr 127.0.0.1:7700 --count 18500 --pid PID [--keep-seconds S]
//! griddle-load --scenario mixed  --target griddle --addr A,B,C --rate 300 --users 200 --syncs 300 --seconds 600
//! ```
//!
//! `mixed` (`scripts/soak`) is a site's steady traffic: of every ten requests three chat
//! messages, two generic appends, one flirt, three feed reads and one chat-history read,
//! between `--users` users (each with 8 partners), while `--syncs` long-polls (`sync`, resumed from their cursors)
//! stay held across the nodes.
#![allow(clippy::disallowed_methods)] // A benchmark measures real time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

const PAYLOAD_BYTES: usize = 200;
/// `mixed`: how many others each user chats with and flirts with.
const PARTNERS: usize = 8;

#[derive(Clone)]
struct Args {
    scenario: String,
    target: String,
    addr: String,
    sub_addr: String,
    path: String,
    connections: usize,
    rate: f64,
    seconds: f64,
    warmup: f64,
    streams: usize,
    idle: usize,
    subscribers: usize,
    count: usize,
    users: usize,
    syncs: usize,
    pid: Option<u32>,
    keep_seconds: f64,
    secret: String,
    label: String,
}

fn args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let number = |name: &str, default: f64| -> anyhow::Result<f64> {
        value(name).map(|v| v.parse().with_context(|| format!("{name} {v}"))).transpose().map(|v| v.unwrap_or(default))
    };
    let addr = value("--addr").unwrap_or_else(|| "127.0.0.1:7700".into());
    let args = Args {
        scenario: value("--scenario").unwrap_or_else(|| "append".into()),
        target: value("--target").unwrap_or_else(|| "griddle".into()),
        sub_addr: value("--sub-addr").unwrap_or_else(|| addr.clone()),
        addr,
        path: value("--path").unwrap_or_else(|| "/v1/feed?limit=20".into()),
        connections: number("--connections", 10.0)? as usize,
        rate: number("--rate", 0.0)?,
        seconds: number("--seconds", 10.0)?,
        warmup: number("--warmup", 1.0)?,
        streams: number("--streams", 0.0)? as usize,
        idle: number("--idle", 0.0)? as usize,
        subscribers: number("--subscribers", 100.0)? as usize,
        count: number("--count", 1000.0)? as usize,
        users: number("--users", 200.0)? as usize,
        syncs: number("--syncs", 0.0)? as usize,
        pid: value("--pid").map(|v| v.parse()).transpose()?,
        keep_seconds: number("--keep-seconds", 0.0)?,
        secret: value("--secret").unwrap_or_else(|| node::config::DEV_SECRET.into()),
        label: value("--label").unwrap_or_default(),
    };
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.users < 2 {
        bail!("--users must be at least 2");
    }
    Ok(args)
}

fn token(secret: &str, user: &str, svc: bool) -> String {
    let exp = node::clock::now_ms() / 1000 + 3600;
    web::auth::mint(secret.as_bytes(), &web::auth::Claims { sub: user.into(), exp, svc })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

// ------------------------------------------------------------------ connections

/// A connection from a chosen source address (127.x spreads many sockets over many
/// address pairs, as the capacity scenario needs).
async fn connect(addr: &str, source: Option<Ipv4Addr>) -> anyhow::Result<TcpStream> {
    let to: SocketAddr = tokio::net::lookup_host(addr).await?.next().with_context(|| format!("resolve {addr}"))?;
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(to).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// HTTP/1.1 keep-alive: one request at a time, whole answers (Content-Length bodies).
struct Http {
    stream: TcpStream,
    buffer: Vec<u8>,
    body_at: usize,
}

impl Http {
    async fn open(addr: &str, source: Option<Ipv4Addr>) -> anyhow::Result<Http> {
        Ok(Http { stream: connect(addr, source).await?, buffer: Vec::with_capacity(8 * 1024), body_at: 0 })
    }

    fn body(&self) -> &[u8] {
        &self.buffer[self.body_at.min(self.buffer.len())..]
    }

    async fn send(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.stream.write_all(request).await?;
        self.answer().await
    }

    async fn answer(&mut self) -> anyhow::Result<u16> {
        self.buffer.clear();
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buffer[..end])?;
                let status: u16 = head.get(9..12).context("status line")?.parse()?;
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .map(|v| v.parse())
                    .transpose()?
                    .unwrap_or(0);
                while self.buffer.len() < end + 4 + length {
                    read_more(&mut self.stream, &mut self.buffer).await?;
                }
                self.body_at = end + 4;
                return Ok(status);
            }
            read_more(&mut self.stream, &mut self.buffer).await?;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed");
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn http_request(method: &str, addr: &str, path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let addr = addr.split(',').next().unwrap_or(addr); // Host: the first of several targets
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let kind = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// Redis: RESP commands, one reply at a time.
struct Resp {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Resp {
    async fn open(addr: &str) -> anyhow::Result<Resp> {
        Ok(Resp { stream: connect(addr, None).await?, buffer: Vec::with_capacity(1024) })
    }

    /// Sends a command; true for a success reply (`+`, `$`, `:`, `*`), false for `-ERR`.
    async fn command(&mut self, parts: &[&[u8]]) -> anyhow::Result<bool> {
        let mut out = format!("*{}\r\n", parts.len()).into_bytes();
        for part in parts {
            out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out).await?;
        self.buffer.clear();
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let kind = self.buffer[0];
                if kind == b'$' {
                    let len: i64 = std::str::from_utf8(&self.buffer[1..end])?.parse()?;
                    let need = if len < 0 { end + 2 } else { end + 2 + len as usize + 2 };
                    while self.buffer.len() < need {
                        read_more(&mut self.stream, &mut self.buffer).await?;
                    }
                }
                return Ok(kind != b'-');
            }
            read_more(&mut self.stream, &mut self.buffer).await?;
        }
    }
}

// ------------------------------------------------------------------ request-answer scenarios

/// What one connection sends next. `n` numbers the requests of the whole run.
#[derive(Clone)]
struct Work {
    args: Args,
    service: String,
    reader: String,
    pad: String,
    /// `mixed`: the users' tokens (`mix-0`, `mix-1`, ...).
    users: Vec<String>,
}

enum Client {
    Http(Http),
    Redis(Resp),
}

impl Work {
    /// Connection `c` goes to the `c`-th address of `--addr a,b,c` (round robin).
    async fn open(&self, c: usize) -> anyhow::Result<Client> {
        let addrs: Vec<&str> = self.args.addr.split(',').collect();
        let addr = addrs[c % addrs.len()];
        Ok(match self.args.target.as_str() {
            "redis" => Client::Redis(Resp::open(addr).await?),
            _ => Client::Http(Http::open(addr, None).await?),
        })
    }

    fn stream_of(&self, connection: usize, n: u64) -> usize {
        let streams = if self.args.streams == 0 { self.args.connections } else { self.args.streams };
        (connection + n as usize * self.args.connections) % streams
    }

    /// Sends request `n`; Ok(true) for a success, Ok(false) for a refusal (status, error reply).
    async fn call(&self, client: &mut Client, connection: usize, n: u64) -> anyhow::Result<(bool, u16)> {
        match (client, self.args.scenario.as_str()) {
            (Client::Redis(resp), "append") => {
                let key = format!("bench:{}", self.stream_of(connection, n));
                let ok = resp.command(&[b"XADD", key.as_bytes(), b"*", b"d", self.pad.as_bytes()]).await?;
                Ok((ok, if ok { 200 } else { 500 }))
            }
            (Client::Http(http), "append") => {
                let id = store::EventId::from_parts(node::clock::now_ms(), u128::from(n) << 16 | connection as u128);
                let body = format!(r#"[{{"id":"{id}","type":"bench.event","data":{{"pad":"{}"}}}}]"#, self.pad);
                let path = format!("/v1/streams/bench:{}/events", self.stream_of(connection, n));
                let status =
                    http.send(&http_request("POST", &self.args.addr, &path, Some(&self.service), &body)).await?;
                Ok((status < 300, status))
            }
            (Client::Http(http), "mixed") => self.mixed(http, connection, n).await,
            (Client::Http(http), _) => {
                let token = (self.args.target == "griddle").then_some(self.reader.as_str());
                let status = http.send(&http_request("GET", &self.args.addr, &self.args.path, token, "")).await?;
                Ok((status < 300, status))
            }
            (Client::Redis(_), scenario) => bail!("redis has no scenario {scenario}"),
        }
    }
}

impl Work {
    /// Request `n` of connection `c` in the `mixed` scenario.
    async fn mixed(&self, http: &mut Http, c: usize, n: u64) -> anyhow::Result<(bool, u16)> {
        let users = self.users.len();
        let k = c + n as usize * self.args.connections;
        // Each user talks to the next few users only: a working set the first minute of a
        // soak touches whole, so the node's caches settle instead of filling all run long.
        let a = k % users;
        let b = (a + 1 + (k / users) % PARTNERS.min(users - 1)) % users;
        let id = store::EventId::from_parts(node::clock::now_ms(), u128::from(n) << 16 | c as u128);
        let user = self.users[a].as_str();
        let (method, path, token, body) = match k % 10 {
            0..=2 => (
                "POST",
                format!("/v1/chats/mix-{b}/messages"),
                user,
                format!(r#"{{"id":"{id}","text":"message {k}"}}"#),
            ),
            3 | 4 => (
                "POST",
                format!("/v1/streams/mix:{}/events", k % 64),
                self.service.as_str(),
                format!(r#"[{{"id":"{id}","type":"mix","data":{{"pad":"{}"}}}}]"#, self.pad),
            ),
            5 => ("POST", format!("/v1/users/mix-{b}/flirts"), user, format!(r#"{{"id":"{id}"}}"#)),
            6..=8 => ("GET", "/v1/feed?limit=20".to_owned(), user, String::new()),
            _ => ("GET", format!("/v1/chats/mix-{b}/messages?limit=20"), user, String::new()),
        };
        let status = http.send(&http_request(method, &self.args.addr, &path, Some(token), &body)).await?;
        Ok((status < 300, status))
    }
}

/// What the held syncs of `mixed` saw.
#[derive(Default)]
struct SyncCounts {
    answers: AtomicU64,
    events: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

/// `count` syncs, one per task, spread over the addresses: each opens a cursor, then
/// long-polls from it again and again (as a browser tab does) until aborted.
fn hold_syncs(args: &Args, work: &Work, counts: &Arc<SyncCounts>) -> Vec<tokio::task::JoinHandle<()>> {
    let addrs: Vec<String> = args.addr.split(',').map(str::to_owned).collect();
    (0..args.syncs)
        .map(|i| {
            let (addr, token, counts) =
                (addrs[i % addrs.len()].clone(), work.users[i % work.users.len()].clone(), counts.clone());
            tokio::spawn(async move {
                let mut cursor: Option<String> = None;
                let mut http: Option<Http> = None;
                loop {
                    let Some(open) = http.as_mut() else {
                        match Http::open(&addr, None).await {
                            Ok(fresh) => http = Some(fresh),
                            Err(_) => {
                                counts.errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        continue;
                    };
                    let path = match &cursor {
                        Some(cursor) => format!("/v1/sync?since={cursor}&timeout=25"),
                        None => "/v1/sync?timeout=0".to_owned(),
                    };
                    match open.send(&http_request("GET", &addr, &path, Some(&token), "")).await {
                        Ok(200) => {
                            counts.answers.fetch_add(1, Ordering::Relaxed);
                            let page: serde_json::Value = serde_json::from_slice(open.body()).unwrap_or_default();
                            let events = page["events"].as_array().map_or(0, Vec::len);
                            counts.events.fetch_add(events as u64, Ordering::Relaxed);
                            cursor = page["cursor"].as_str().map(str::to_owned).or(cursor);
                        }
                        Ok(_) => {
                            counts.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_secs(1)).await; // Retry-After
                        }
                        Err(_) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            http = None;
                        }
                    }
                }
            })
        })
        .collect()
}

struct Totals {
    ok: Histogram<u64>,
    refused: Histogram<u64>,
    errors: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    sent: u64,
    /// When the last measured request finished: past the window's end when answers lag.
    last_done: Option<Instant>,
}

impl Totals {
    fn new() -> Totals {
        Totals {
            ok: histogram(),
            refused: histogram(),
            errors: 0,
            statuses: Default::default(),
            sent: 0,
            last_done: None,
        }
    }
}

/// Runs the open-loop (or, with rate 0, closed-loop) schedule on every connection.
async fn request_answer(args: &Args) -> anyhow::Result<serde_json::Value> {
    let work = Arc::new(Work {
        args: args.clone(),
        service: token(&args.secret, "bench", true),
        reader: token(&args.secret, "bench-reader", false),
        pad: "x".repeat(PAYLOAD_BYTES - 40), // with the JSON around it, about 200 bytes an event
        users: match args.scenario.as_str() {
            "mixed" => (0..args.users).map(|u| token(&args.secret, &format!("mix-{u}"), false)).collect(),
            _ => Vec::new(),
        },
    });
    let sync_counts = Arc::new(SyncCounts::default());
    let syncs = hold_syncs(args, &work, &sync_counts);
    if args.target == "griddle" && args.scenario == "read" {
        prepare_feed(args).await?;
    }
    if args.addr.contains(',') && args.scenario == "read" {
        bail!("read takes one --addr");
    }
    let mut clients = Vec::new();
    for c in 0..args.connections {
        clients.push(work.open(c).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let per_connection = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let work = work.clone();
            tokio::spawn(async move {
                let mut totals = Totals::new();
                // Spread the connections' schedules over one interval.
                let offset = per_connection.map(|p| p.mul_f64(c as f64 / work.args.connections as f64));
                let mut due = start + offset.unwrap_or_default();
                let mut n = 0u64;
                loop {
                    let now = Instant::now();
                    if per_connection.is_none() {
                        due = now;
                    }
                    if due >= end {
                        break;
                    }
                    if due > now {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let result = work.call(&mut client, c, n).await;
                    let took = due.elapsed().as_micros().max(1) as u64;
                    if due >= measure_from {
                        totals.sent += 1;
                        totals.last_done = totals.last_done.max(Some(Instant::now()));
                        match result {
                            Ok((true, _)) => totals.ok.saturating_record(took),
                            Ok((false, status)) => {
                                totals.refused.saturating_record(took);
                                *totals.statuses.entry(status).or_default() += 1;
                            }
                            Err(_) => totals.errors += 1,
                        }
                    }
                    if result.is_err() {
                        // The connection is gone: open another (its time counts against us).
                        match work.open(c).await {
                            Ok(fresh) => client = fresh,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                    n += 1;
                    if let Some(p) = per_connection {
                        due += p;
                    }
                }
                totals
            })
        })
        .collect();
    let mut all = Totals::new();
    for task in tasks {
        let t = task.await?;
        all.ok.add(&t.ok)?;
        all.refused.add(&t.refused)?;
        all.errors += t.errors;
        all.sent += t.sent;
        all.last_done = all.last_done.max(t.last_done);
        for (status, count) in t.statuses {
            *all.statuses.entry(status).or_default() += count;
        }
    }
    let done = all.ok.len() + all.refused.len();
    // Answers per second of the time they took to come: the window, or longer when the
    // target fell behind the schedule (an open loop's requests are all answered eventually).
    let took = all.last_done.map_or(args.seconds, |t| t.duration_since(measure_from).as_secs_f64().max(args.seconds));
    for sync in syncs {
        sync.abort();
    }
    let statuses: serde_json::Map<String, serde_json::Value> =
        all.statuses.iter().map(|(s, c)| (s.to_string(), json!(c))).collect();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(json!({
        "syncs": {
            "held": args.syncs,
            "answers": load(&sync_counts.answers),
            "events": load(&sync_counts.events),
            "refused": load(&sync_counts.refused),
            "errors": load(&sync_counts.errors),
        },
        "offered_rps": if args.rate > 0.0 { json!(args.rate) } else { json!(null) },
        "connections": args.connections,
        "seconds": args.seconds,
        "sent": all.sent,
        "ok": all.ok.len(),
        "ok_rps": (all.ok.len() as f64 / took).round(),
        "done_rps": (done as f64 / took).round(),
        "took_s": (took * 100.0).round() / 100.0,
        "refused": all.refused.len(),
        "refused_statuses": statuses,
        "errors": all.errors,
        "latency": summary(&all.ok),
        "refused_latency": summary(&all.refused),
    }))
}

/// A feed page of 20 events, about 4 KB of JSON, for `bench-reader`.
async fn prepare_feed(args: &Args) -> anyhow::Result<()> {
    let mut http = Http::open(&args.addr, None).await?;
    for i in 0..20 {
        let flirter = token(&args.secret, &format!("admirer-{i:02}"), false);
        let id = store::EventId::from_parts(node::clock::now_ms(), 7 << 32 | i as u128);
        let body = format!(r#"{{"id":"{id}"}}"#);
        let status = http
            .send(&http_request("POST", &args.addr, "/v1/users/bench-reader/flirts", Some(&flirter), &body))
            .await?;
        if status >= 300 {
            bail!("preparing the feed: status {status}: {}", String::from_utf8_lossy(http.body()));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ fan-out

/// Publishes at `rate` to `subscribers` streams (subjects) through `addr`, while each
/// subscriber holds a long-poll (subscription) through `sub_addr`, next to `idle` long-polls
/// that never get an event. Latency: publish call start to delivery, same process clock.
async fn fanout(args: &Args) -> anyhow::Result<serde_json::Value> {
    let origin = Instant::now();
    let latencies = Arc::new(Mutex::new(histogram()));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = format!("{:x}", node::clock::now_ms());
    let held = match args.target.as_str() {
        "nats" => nats_subscribers(args, &run, origin, latencies.clone(), delivered.clone()).await?,
        _ => griddle_subscribers(args, &run, origin, latencies.clone(), delivered.clone(), stop.clone()).await?,
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = match args.target.as_str() {
        "nats" => nats_publish(args, &run, origin).await?,
        _ => griddle_publish(args, &run, origin).await?,
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // the last deliveries
    stop.notify_waiters();
    let h = latencies.lock().await.clone();
    Ok(json!({
        "offered_rps": args.rate,
        "seconds": args.seconds,
        "subscribers": args.subscribers,
        "idle_held": held,
        "published": published,
        "delivered": delivered.load(Ordering::Relaxed),
        "latency": summary(&h),
    }))
}

fn micros_since(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// Source addresses for many sockets: 127.0.0.2, .3, ... (each gives its own port range).
fn source(i: usize) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(127, 0, (i / 5000 / 250) as u8, (i / 5000 % 250 + 2) as u8))
}

async fn griddle_subscribers(
    args: &Args,
    run: &str,
    origin: Instant,
    latencies: Arc<Mutex<Histogram<u64>>>,
    delivered: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<usize> {
    let reader = token(&args.secret, "fan-reader", true);
    let mut held = 0;
    for i in 0..args.idle {
        let path = format!("/v1/streams/idle-{run}:{i}/events?after=0&wait=60");
        let request = http_request("GET", &args.sub_addr, &path, Some(&reader), "");
        let Ok(mut http) = Http::open(&args.sub_addr, source(i)).await else { continue };
        if http.stream.write_all(&request).await.is_ok() {
            held += 1;
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = http.answer() => {}
                    _ = stop.notified() => {}
                }
            });
        }
    }
    for k in 0..args.subscribers {
        let mut http = Http::open(&args.sub_addr, None).await?;
        let (reader, addr, run) = (reader.clone(), args.sub_addr.clone(), run.to_owned());
        let (latencies, delivered) = (latencies.clone(), delivered.clone());
        tokio::spawn(async move {
            let mut after = 0u64;
            loop {
                let path = format!("/v1/streams/fan-{run}:{k}/events?after={after}&wait=30&limit=100");
                let Ok(status) = http.send(&http_request("GET", &addr, &path, Some(&reader), "")).await else { return };
                let now = micros_since(origin);
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let Ok(page) = serde_json::from_slice::<serde_json::Value>(http.body()) else { return };
                for event in page["events"].as_array().into_iter().flatten() {
                    after = after.max(event["version"].as_u64().unwrap_or(0));
                    if let Some(sent) = event["data"]["sent_us"].as_u64() {
                        latencies.lock().await.saturating_record(now.saturating_sub(sent).max(1));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    Ok(held)
}

async fn griddle_publish(args: &Args, run: &str, origin: Instant) -> anyhow::Result<u64> {
    let service = token(&args.secret, "fan-writer", true);
    let connections = args.connections.max(1);
    let per = Duration::from_secs_f64(connections as f64 / args.rate.max(1.0));
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut http = Http::open(&args.addr, None).await?;
        let (service, addr, run, published) = (service.clone(), args.addr.clone(), run.to_owned(), published.clone());
        let subscribers = args.subscribers.max(1);
        tasks.push(tokio::spawn(async move {
            let mut due = Instant::now() + per.mul_f64(c as f64 / connections as f64);
            let mut n = 0usize;
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let k = (c + n * connections) % subscribers;
                let id = store::EventId::from_parts(node::clock::now_ms(), (n as u128) << 16 | c as u128);
                let body = format!(
                    r#"[{{"id":"{id}","type":"bench.fan","data":{{"sent_us":{}}}}}]"#,
                    micros_since(origin)
                );
                let path = format!("/v1/streams/fan-{run}:{k}/events");
                if matches!(http.send(&http_request("POST", &addr, &path, Some(&service), &body)).await, Ok(s) if s < 300) {
                    published.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                due += per;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(published.load(Ordering::Relaxed))
}

async fn nats_subscribers(
    args: &Args,
    run: &str,
    origin: Instant,
    latencies: Arc<Mutex<Histogram<u64>>>,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<usize> {
    let mut held = 0;
    for i in 0..args.idle {
        let Ok(mut stream) = connect(&args.sub_addr, source(i)).await else { continue };
        let sub = format!("CONNECT {{\"verbose\":false}}\r\nSUB idle.{run}.{i} 1\r\n");
        if stream.write_all(sub.as_bytes()).await.is_ok() {
            held += 1;
            tokio::spawn(async move {
                let mut sink = [0u8; 512];
                // Answer the server's PINGs so it keeps the connection.
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 || stream.write_all(b"PONG\r\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    for k in 0..args.subscribers {
        let mut stream = connect(&args.sub_addr, None).await?;
        stream.write_all(format!("CONNECT {{\"verbose\":false}}\r\nSUB fan.{run}.{k} 1\r\n").as_bytes()).await?;
        let (latencies, delivered) = (latencies.clone(), delivered.clone());
        tokio::spawn(async move {
            let mut buffer: Vec<u8> = Vec::new();
            loop {
                if read_more(&mut stream, &mut buffer).await.is_err() {
                    return;
                }
                let now = micros_since(origin);
                // MSG <subject> <sid> <bytes>\r\n<payload>\r\n, PING\r\n
                while let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&buffer[..end]).into_owned();
                    if line.starts_with("PING") {
                        let _ = stream.write_all(b"PONG\r\n").await;
                        buffer.drain(..end + 2);
                        continue;
                    }
                    if let Some(rest) = line.strip_prefix("MSG ") {
                        let len: usize = rest.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
                        if buffer.len() < end + 2 + len + 2 {
                            break; // the payload is not all here yet
                        }
                        let payload = String::from_utf8_lossy(&buffer[end + 2..end + 2 + len]).into_owned();
                        if let Ok(sent) = payload.trim().parse::<u64>() {
                            latencies.lock().await.saturating_record(now.saturating_sub(sent).max(1));
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        buffer.drain(..end + 2 + len + 2);
                        continue;
                    }
                    buffer.drain(..end + 2);
                }
            }
        });
    }
    Ok(held)
}

async fn nats_publish(args: &Args, run: &str, origin: Instant) -> anyhow::Result<u64> {
    let mut stream = connect(&args.addr, None).await?;
    stream.write_all(b"CONNECT {\"verbose\":false}\r\n").await?;
    let per = Duration::from_secs_f64(1.0 / args.rate.max(1.0));
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut due = Instant::now();
    let mut published = 0u64;
    let subscribers = args.subscribers.max(1);
    // Drain what the server sends (PING) on the side.
    let (mut read, mut write) = stream.into_split();
    let pinged = Arc::new(AtomicU64::new(0));
    let p = pinged.clone();
    tokio::spawn(async move {
        let mut sink = [0u8; 512];
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
            p.fetch_add(1, Ordering::Relaxed);
        }
    });
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        let payload = micros_since(origin).to_string();
        let k = published as usize % subscribers;
        let message = format!("PUB fan.{run}.{k} {}\r\n{payload}\r\n", payload.len());
        write.write_all(message.as_bytes()).await?;
        if pinged.swap(0, Ordering::Relaxed) > 0 {
            write.write_all(b"PONG\r\n").await?;
        }
        published += 1;
        due += per;
    }
    Ok(published)
}

// ------------------------------------------------------------------ capacity

/// Opens `count` long-polls against one node, from many source addresses, and reports how
/// many it holds, and (with `--pid`) the node's resident memory before and after. Each
/// long-poll is asked again when the node answers it (at its 60 s wait), so with
/// `--keep-seconds` they stay held while other scenarios run.
async fn hold(args: &Args) -> anyhow::Result<serde_json::Value> {
    let reader = token(&args.secret, "hold-reader", true);
    let rss_before = args.pid.and_then(rss_kib);
    let run = format!("{:x}", node::clock::now_ms());
    let waiting = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let mut connect_failed = 0u64;
    let started = Instant::now();
    for i in 0..args.count {
        let path = format!("/v1/streams/hold-{run}:{i}/events?after=0&wait=60");
        let request = http_request("GET", &args.addr, &path, Some(&reader), "");
        let Ok(mut http) = Http::open(&args.addr, source(i)).await else {
            connect_failed += 1;
            continue;
        };
        let (waiting, answered) = (waiting.clone(), answered.clone());
        tokio::spawn(async move {
            loop {
                if http.stream.write_all(&request).await.is_err() {
                    return;
                }
                waiting.fetch_add(1, Ordering::Relaxed);
                let status = http.answer().await;
                waiting.fetch_sub(1, Ordering::Relaxed);
                match status {
                    Ok(200) => {} // the wait ran out: ask again
                    Ok(status) => {
                        *answered.lock().expect("not poisoned").entry(status).or_default() += 1;
                        return;
                    }
                    Err(_) => {
                        *answered.lock().expect("not poisoned").entry(0).or_default() += 1;
                        return;
                    }
                }
            }
        });
    }
    let opened_in = started.elapsed();
    // Give the node time to take them all in, then count those waiting for an answer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = waiting.load(Ordering::Relaxed);
    let rss_after = args.pid.and_then(rss_kib);
    let per_poll = match (rss_before, rss_after) {
        (Some(b), Some(a)) if held > 0 => json!(((a.saturating_sub(b)) as f64 * 1024.0 / held as f64).round()),
        _ => json!(null),
    };
    let answered: serde_json::Map<String, serde_json::Value> =
        answered.lock().expect("not poisoned").iter().map(|(s, c)| (s.to_string(), json!(c))).collect();
    Ok(json!({
        "asked": args.count,
        "held": held,
        "connect_failed": connect_failed,
        "answered_early": answered,
        "opened_in_s": (opened_in.as_secs_f64() * 10.0).round() / 10.0,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_bytes_per_poll": per_poll,
    }))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ------------------------------------------------------------------ main

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::env::var("LOAD_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2))
        .enable_all()
        .build()?;
    let mut figures = runtime.block_on(async {
        match args.scenario.as_str() {
            "append" | "read" | "mixed" => request_answer(&args).await,
            "fanout" => fanout(&args).await,
            "hold" => hold(&args).await,
            other => bail!("unknown scenario {other}: append, read, mixed, fanout, hold"),
        }
    })?;
    figures["scenario"] = json!(args.scenario);
    figures["target"] = json!(args.target);
    figures["label"] = json!(args.label);
    let latency = &figures["latency"];
    eprintln!(
        "{} {} {}: ok {}/s, p50 {} ms, p99 {} ms",
        args.scenario, args.target, args.label, figures["ok_rps"], latency["p50_ms"], latency["p99_ms"]
    );
    println!("{figures}");
    // `hold --keep-seconds`: the long-polls stay held (on the runtime's threads) meanwhile.
    std::thread::sleep(Duration::from_secs_f64(args.keep_seconds));
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
