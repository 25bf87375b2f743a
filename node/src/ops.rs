//! The operator's commands that talk to a running node over HTTP (`griddle status`,
//! `flags`, `backup`, `weight`) and `griddle restore`'s copy of a backup. They mint a
//! short-lived service token with the configured secret, so they need the same config (or
//! `--dev`) as the node; `/v1/cluster` itself is open to loopback.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{clock, Config};

/// An HTTP client for one node, carrying a service token when a secret is configured.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// `secret`: the cluster's JWT secret, to sign a short-lived service token with.
    pub fn new(addr: &str, secret: Option<&str>) -> Client {
        let base =
            if addr.starts_with("http://") { addr.trim_end_matches('/').to_string() } else { format!("http://{addr}") };
        let token = secret.map(|secret| {
            let claims = web::auth::Claims { sub: "griddle-cli".into(), exp: clock::now_ms() / 1000 + 300, svc: true };
            web::auth::mint(secret.as_bytes(), &claims)
        });
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
        Client { base, token, agent }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match response {
            Ok(response) if response.status() == 204 => Ok(Value::Null),
            Ok(response) => response.into_json().with_context(|| format!("{method} {path}: not JSON")),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                bail!("{method} {}{path}: {status} {text}", self.base)
            }
            Err(error) => bail!("{method} {}{path}: {error}", self.base),
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None)
    }
}

/// `griddle status`: the mesh as one node sees it, and each live member's partitions.
pub fn status(addr: &str, secret: Option<&str>) -> anyhow::Result<String> {
    let cluster = Client::new(addr, secret).get("/v1/cluster")?;
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    let parts = &cluster["partitions"];
    let mut out = String::new();
    writeln!(
        out,
        "seen from {} ({addr}): {} members, {} partitions × {} replicas",
        cluster["node"].as_str().unwrap_or("?"),
        members.len(),
        parts["count"],
        parts["replicas"],
    )?;
    writeln!(out)?;
    let header = ["NODE", "STATE", "WEIGHT", "HTTP", "MESH", "PRIMARY", "REPLICA", "LEARNER", "LAGGING", "MAX LAG"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for member in &members {
        let state = member["state"].as_str().unwrap_or("?");
        let http = member["http_addr"].as_str().unwrap_or("?");
        // Each member counts its own partitions: ask the live ones.
        let own = if state == "down" { None } else { Client::new(http, secret).get("/v1/cluster").ok() };
        let field = |name: &str| own.as_ref().map_or("-".to_string(), |c| c["partitions"][name].to_string());
        rows.push(vec![
            member["id"].as_str().unwrap_or("?").to_string(),
            state.to_string(),
            format!("{:.2}", member["weight"].as_f64().unwrap_or(0.0)),
            http.to_string(),
            member["mesh_addr"].as_str().unwrap_or("?").to_string(),
            field("primary_here"),
            field("replica_here"),
            field("learner_here"),
            field("lagging"),
            field("lag_max"),
        ]);
    }
    let widths: Vec<usize> = (0..header.len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    writeln!(out)?;
    writeln!(out, "PRIMARY: partitions led there; REPLICA: partitions it votes in; LEARNER: partitions it")?;
    writeln!(out, "follows without a vote (a ghost at weight 0, or a newcomer catching up);")?;
    writeln!(out, "LAGGING / MAX LAG: partitions led there whose slowest voter lacks entries, and how many.")?;
    Ok(out)
}

pub fn set_flag(addr: &str, secret: &str, name: &str, percent: u8) -> anyhow::Result<Value> {
    Client::new(addr, Some(secret)).call("PUT", &format!("/v1/flags/{name}"), Some(json!({ "percent": percent })))
}

/// Asks the node for a checkpoint named `name` in its `backup_dir`.
pub fn backup(addr: &str, secret: &str, name: &str) -> anyhow::Result<Value> {
    Client::new(addr, Some(secret)).call("POST", "/v1/admin/backup", Some(json!({ "name": name })))
}

pub fn set_weight(addr: &str, secret: &str, weight: f64) -> anyhow::Result<Value> {
    Client::new(addr, Some(secret)).call("PUT", "/v1/admin/weight", Some(json!({ "weight": weight })))
}

/// `griddle restore`: copies a backup into the node's (empty) data directory. With
/// replication the copy gives up the backed-up disk's storage id: what that disk promised
/// or acknowledged after the backup is not in the copy, so it must not count as that disk.
/// The node rejoins as a new disk; its partitions re-add it and catch it up.
pub fn restore(from: &Path, config: &Config) -> anyhow::Result<()> {
    if !from.join("CURRENT").is_file() {
        bail!("{} is not a backup (no RocksDB CURRENT file)", from.display());
    }
    let to = &config.data_dir;
    if to.exists() && std::fs::read_dir(to)?.next().is_some() {
        bail!("{} is not empty: restore only into a new data directory", to.display());
    }
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    if config.replicas > 1 {
        let store = crate::open_store(config)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let forget =
            store::WriteBatch { events: Vec::new(), meta: vec![(node_core::repl::keys::STORAGE.to_vec(), None)] };
        store.append(forget, Box::new(move |result| drop(tx.send(result))));
        rx.recv().context("store closed")?.context("forget the storage id")?;
    }
    Ok(())
}
