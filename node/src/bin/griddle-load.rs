//! `griddle-load`: a small HTTP/1.1 load generator for single-node figures.
//!
//! Each client holds one keep-alive connection and sends its next request as soon as the
//! previous answer is read (closed loop), so the figure is throughput at that concurrency with
//! the latency each request saw. The benchmark issue replaces this with an open-loop generator.
//!
//! ```text
//! griddle-load --url http://127.0.0.1:7700 --scenario append --clients 250 --seconds 10
//! griddle-load --url http://127.0.0.1:7700 --scenario feed --clients 32 --seconds 10
//! ```
#![allow(clippy::disallowed_methods)] // A benchmark measures real time.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    scenario: String,
    clients: usize,
    seconds: u64,
    secret: String,
}

fn args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let url = value("--url").unwrap_or_else(|| "http://127.0.0.1:7700".into());
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    Ok(Args {
        addr,
        scenario: value("--scenario").unwrap_or_else(|| "append".into()),
        clients: value("--clients").map(|v| v.parse()).transpose()?.unwrap_or(10),
        seconds: value("--seconds").map(|v| v.parse()).transpose()?.unwrap_or(10),
        secret: value("--secret").unwrap_or_else(|| node::config::DEV_SECRET.into()),
    })
}

fn token(secret: &str, user: &str, svc: bool) -> String {
    let exp = node::clock::now_ms() / 1000 + 3600;
    web::auth::mint(secret.as_bytes(), &web::auth::Claims { sub: user.into(), exp, svc })
}

/// One keep-alive connection that sends requests and reads whole responses.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
    body_at: usize,
}

impl Connection {
    async fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buffer: Vec::with_capacity(16 * 1024), body_at: 0 })
    }

    /// The body of the last answer.
    fn body(&self) -> &[u8] {
        &self.buffer[self.body_at.min(self.buffer.len())..]
    }

    /// Sends one request and returns the status.
    async fn send(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.stream.write_all(request).await?;
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
                    self.read_more().await?;
                }
                self.body_at = end + 4;
                return Ok(status);
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn request(method: &str, addr: &str, path: &str, token: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The request a client sends next; `n` counts its requests.
fn next_request(args: &Args, client: usize, n: u64, tokens: &Tokens) -> Vec<u8> {
    match args.scenario.as_str() {
        "append" => {
            let id = store::EventId::from_parts(node::clock::now_ms(), ((client as u128) << 64) | u128::from(n));
            let body = format!(r#"[{{"id":"{id}","type":"bench.event","data":{{"pad":"{}"}}}}]"#, "x".repeat(150));
            request("POST", &args.addr, &format!("/v1/streams/bench:{}/events", client % 64), &tokens.service, &body)
        }
        _ => request("GET", &args.addr, "/v1/feed?limit=20", &tokens.reader, ""),
    }
}

struct Tokens {
    service: String,
    reader: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let tokens =
        Tokens { service: token(&args.secret, "bench", true), reader: token(&args.secret, "bench-reader", false) };
    if args.scenario == "feed" {
        // A feed page of 20 events, read from the store on every request.
        let mut connection = Connection::open(&args.addr).await?;
        for i in 0..20 {
            let flirter = token(&args.secret, &format!("fan{i}"), false);
            let status =
                connection.send(&request("POST", &args.addr, "/v1/users/bench-reader/flirts", &flirter, "{}")).await?;
            if status >= 300 {
                bail!("preparing the feed: status {status}");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let args = std::sync::Arc::new(args);
    let tokens = std::sync::Arc::new(tokens);
    let tasks: Vec<_> = (0..args.clients)
        .map(|client| {
            let (args, tokens) = (args.clone(), tokens.clone());
            tokio::spawn(async move {
                let mut latencies_us: Vec<u32> = Vec::new();
                let mut errors = 0u64;
                let mut connection = Connection::open(&args.addr).await?;
                let mut n = 0;
                while Instant::now() < deadline {
                    let request = next_request(&args, client, n, &tokens);
                    let started = Instant::now();
                    let status = connection.send(&request).await?;
                    latencies_us.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    if status >= 300 {
                        if errors == 0 {
                            // The first refusal of each client, so a run says why it had any.
                            eprintln!("{status}: {}", String::from_utf8_lossy(connection.body()));
                        }
                        errors += 1;
                    }
                    n += 1;
                }
                anyhow::Ok((latencies_us, errors))
            })
        })
        .collect();
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await??;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} x{}: {:.0} req/s over {}s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} non-2xx",
        args.scenario,
        args.clients,
        latencies.len() as f64 / args.seconds as f64,
        args.seconds,
        f64::from(at(0.50)) / 1000.0,
        f64::from(at(0.99)) / 1000.0,
        f64::from(at(1.0)) / 1000.0,
        errors
    );
    Ok(())
}
