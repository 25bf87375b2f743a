//! Starts real `griddle` processes and talks HTTP to them.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const SECRET: &[u8] = node::config::DEV_SECRET.as_bytes();

/// A running node; killed when dropped.
pub struct Node {
    child: Child,
    pub url: String,
    /// The mesh address, as `127.0.0.1:port`.
    pub mesh: String,
}

impl Node {
    pub fn start(data_dir: &Path) -> Node {
        Node::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Node {
        Node::spawn(data_dir, extra, Stdio::inherit(), "warn")
    }

    /// Starts a node whose log (stderr) goes to `log`, at `level` (`GRIDDLE_LOG`).
    pub fn start_logged(data_dir: &Path, extra: &[&str], log: &Path, level: &str) -> Node {
        Node::spawn(data_dir, extra, Stdio::from(std::fs::File::create(log).unwrap()), level)
    }

    fn spawn(data_dir: &Path, extra: &[&str], stderr: Stdio, level: &str) -> Node {
        let mut args = vec!["serve", "--dev"];
        if !extra.contains(&"--http") {
            args.extend(["--http", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--mesh") {
            args.extend(["--mesh", "127.0.0.1:0"]);
        }
        args.extend(extra);
        Node::run(&args, data_dir, stderr, level)
    }

    /// Runs `griddle ARGS --data-dir DIR` (any command that ends up serving).
    pub fn spawn_command(args: &[&str], data_dir: &Path) -> Node {
        Node::run(args, data_dir, Stdio::inherit(), "warn")
    }

    fn run(args: &[&str], data_dir: &Path, stderr: Stdio, level: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_griddle"))
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("GRIDDLE_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start griddle");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read griddle's first line");
        let url =
            line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("no URL in {line:?}"));
        let url = url.trim_end_matches('/').to_owned();
        let mesh = line
            .split_whitespace()
            .skip_while(|w| *w != "mesh")
            .nth(1)
            .unwrap_or_else(|| panic!("no mesh in {line:?}"))
            .to_owned();
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = stdout.read_to_end(&mut Vec::new());
        });
        Node { child, url, mesh }
    }

    /// The process id (for `/proc/PID/status` and `/proc/PID/fd`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// One series of `/metrics` (name and labels exactly as exposed), read from loopback.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, _, text) = self.raw("GET", "/metrics", None, None, &[]);
        sample(&text, series).unwrap_or_else(|| panic!("no {series} in {text}"))
    }

    pub fn token(&self, user: &str) -> String {
        let (status, body) = self.post("/v1/dev/token", None, &serde_json::json!({ "user": user }).to_string());
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call("GET", path, token, None)
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        self.call("POST", path, token, Some(body))
    }

    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let (status, _, text) = self.raw(method, path, token, body, &[]);
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    /// Status, headers and body text, whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, String) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(70)).build();
        let mut request = agent.request(method, &format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(body) => request.set("Content-Type", "application/json").send_string(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => panic!("{method} {path}: {error}"),
        };
        let status = response.status();
        let headers = response
            .headers_names()
            .into_iter()
            .map(|n| (n.clone(), response.header(&n).unwrap_or("").to_owned()))
            .collect();
        (status, headers, response.into_string().unwrap_or_default())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mint(user: &str, exp_from_now_secs: i64, svc: bool) -> String {
    let now = node::clock::now_ms() as i64 / 1000;
    let claims = web::auth::Claims { sub: user.into(), exp: (now + exp_from_now_secs) as u64, svc };
    web::auth::mint(SECRET, &claims)
}

/// Every event of `stream`, oldest first, read through `node` a page at a time.
pub fn read_all(node: &Node, stream: &str, token: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |e| e["version"].as_u64().unwrap());
        let (status, page) = node.get(&format!("/v1/streams/{stream}/events?after={after}&limit=100"), Some(token));
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        all.extend(events.iter().cloned());
        if events.len() < 100 {
            return all;
        }
    }
}

/// The value of one series (`name{labels}` as written) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// A fresh ULID text for client-chosen ids.
pub fn ulid() -> String {
    ulid::Ulid::new().to_string()
}
