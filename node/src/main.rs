//! `griddle`: one binary for every node. This file only parses the command line and wires.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use node::{clock, Config, Overrides};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "griddle", version, about = "A real-time mesh for social sites.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(Overrides),
    /// Mint a JWT with the configured secret.
    Token {
        #[command(flatten)]
        overrides: Overrides,
        /// The token's subject (user id or service name).
        #[arg(long)]
        user: String,
        /// Lifetime: a number with s, m, h or d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// A service token (generic streams, flags, metrics).
        #[arg(long)]
        svc: bool,
    },
    /// Cluster certificates: the CA, and node certificates signed by it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show the cluster: members, states, weights, partitions and replication lag per node.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Cluster-wide feature flags (A/B buckets by user id).
    #[command(subcommand)]
    Flags(FlagsCommand),
    /// Take a consistent checkpoint of a running node's store, as NAME in its `backup_dir`
    /// (on the node's machine).
    Backup {
        #[command(flatten)]
        target: Target,
        /// The backup's name: 1-64 of A-Z a-z 0-9 _ . - (not starting with a dot).
        #[arg(long)]
        name: String,
    },
    /// Start a node from a backup: copy it into the (new, empty) data directory, then serve.
    Restore {
        /// The directory `griddle backup` wrote.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Set a running node's placement weight (0..1), live: raise it step by step to ramp a
    /// new node up; partitions move to it as its weight grows.
    Weight {
        #[command(flatten)]
        target: Target,
        weight: f64,
    },
}

/// Which node a command talks to, and the config whose secret signs its service token.
#[derive(clap::Args)]
struct Target {
    /// The node's HTTP address.
    #[arg(long = "http", default_value = "127.0.0.1:7700")]
    addr: String,
    /// The node's TOML configuration file (for its jwt_secret).
    #[arg(long, env = "GRIDDLE_CONFIG")]
    config: Option<PathBuf>,
    /// The node runs with --dev (the development secret).
    #[arg(long)]
    dev: bool,
}

impl Target {
    /// The JWT secret, when one is configured (or `--dev`).
    fn secret(&self) -> Option<String> {
        self.secret_or_fail().ok()
    }

    fn secret_or_fail(&self) -> anyhow::Result<String> {
        Config::secret_only(self.config.as_ref(), self.dev)
            .context("this command signs a service token: give --config or GRIDDLE_JWT_SECRET (or --dev)")
    }
}

#[derive(Subcommand)]
enum FlagsCommand {
    /// Set a flag for PERCENT of users (0 turns it off for all, 100 on for all).
    Set {
        #[command(flatten)]
        target: Target,
        name: String,
        percent: u8,
    },
    /// The flags as the service sees them.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a new cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node certificate (ca.pem, node.pem, node.key) for ID into DIR.
    Issue {
        /// Directory with the CA's ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        node_id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(overrides) => serve(&overrides),
        Command::Cluster(ClusterCommand::Init { out }) => {
            node::mesh::init_ca(&out)?;
            println!("created the cluster CA in {}; keep ca.key secret", out.display());
            Ok(())
        }
        Command::Cluster(ClusterCommand::Issue { ca, node_id, out }) => {
            node::mesh::issue(&ca, &node_id, &out)?;
            println!(
                "issued a certificate for {node_id} in {}; start it with --certs {}",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::Status { target } => {
            print!("{}", node::ops::status(&target.addr, target.secret().as_deref())?);
            Ok(())
        }
        Command::Flags(FlagsCommand::Set { target, name, percent }) => {
            if percent > 100 {
                bail!("PERCENT is 0..100");
            }
            node::ops::set_flag(&target.addr, &target.secret_or_fail()?, &name, percent)?;
            println!("flag {name} set to {percent} %; it reaches every node and open tab within seconds");
            Ok(())
        }
        Command::Flags(FlagsCommand::List { target }) => {
            let client = node::ops::Client::new(&target.addr, Some(&target.secret_or_fail()?));
            println!("{}", serde_json::to_string_pretty(&client.get("/v1/flags")?)?);
            Ok(())
        }
        Command::Backup { target, name } => {
            let done = node::ops::backup(&target.addr, &target.secret_or_fail()?, &name)?;
            println!("backup of {} in {} ({} bytes, {} ms)", target.addr, done["dir"], done["bytes"], done["millis"]);
            Ok(())
        }
        Command::Restore { from, overrides } => {
            let config = Config::resolve(&overrides)?;
            node::ops::restore(&from, &config)?;
            eprintln!("restored {} into {}", from.display(), config.data_dir.display());
            serve(&overrides)
        }
        Command::Weight { target, weight } => {
            if !(0.0..=1.0).contains(&weight) {
                bail!("WEIGHT is 0..1");
            }
            let done = node::ops::set_weight(&target.addr, &target.secret_or_fail()?, weight)?;
            println!("{} now has weight {}", done["node"], done["weight"]);
            Ok(())
        }
        Command::Token { overrides, user, ttl, svc } => {
            let config = Config::resolve(&overrides)?;
            if !node_core::social::valid_user(&user) {
                bail!("--user must be 1-64 of A-Z a-z 0-9 _ -");
            }
            let exp = clock::now_ms() / 1000 + parse_ttl(&ttl)?.as_secs();
            println!("{}", web::auth::mint(config.jwt_secret.as_bytes(), &web::auth::Claims { sub: user, exp, svc }));
            Ok(())
        }
    }
}

fn serve(overrides: &Overrides) -> anyhow::Result<()> {
    let config = Config::resolve(overrides)?;
    init_logs(config.log_json, &config.node_id);
    node::memory::return_large_blocks();
    // Each turn is one life of the node. Damaged data ends a life (`node::damage`): the
    // runtime goes with everything it held (store, sockets, tasks), the copy is set aside,
    // and the next life starts with a fresh disk that the replicas rebuild.
    loop {
        node::damage::set_aside_if_marked(&config, node::clock::now_ms())?;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
        let config = config.clone();
        let result = runtime.block_on(async {
            let listener = TcpListener::bind(config.http).await.with_context(|| format!("bind {}", config.http))?;
            let addr = listener.local_addr()?;
            tracing::info!(%addr, data_dir = %config.data_dir.display(), dev = config.dev, "serving");
            node::run(config, listener, shutdown_signal()).await
        });
        // Tasks still running (connections being answered) get a moment, not forever.
        runtime.shutdown_timeout(Duration::from_secs(2));
        if result? == node::Stopped::Asked {
            tracing::info!("stopped");
            return Ok(());
        }
        tracing::warn!("stopped on damaged data; starting again with a fresh disk");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping on signal");
}

fn init_logs(json: bool, node_id: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRIDDLE_LOG").unwrap_or_else(|_| "info".into());
    let writer = NodeLines { node: node_id.into(), json };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Writes log lines to stderr with the node's id in each: `node=ID ` before a text line, a
/// `"node":"ID"` field first in a JSON one. Done at the writer, not with a span, because
/// tasks instrumented with their own root spans (quinn's) would lose a span's fields.
#[derive(Clone)]
struct NodeLines {
    node: std::sync::Arc<str>,
    json: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NodeLines {
    type Writer = NodeLines;
    fn make_writer(&'a self) -> NodeLines {
        self.clone()
    }
}

impl std::io::Write for NodeLines {
    /// The fmt layer hands over each event whole, in one call.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(line.len() + self.node.len() + 16);
        match line.strip_prefix(b"{") {
            // Node ids are `[A-Za-z0-9_-]`: nothing to escape.
            Some(rest) if self.json => {
                out.extend_from_slice(format!("{{\"node\":\"{}\",", self.node).as_bytes());
                out.extend_from_slice(rest);
            }
            _ => {
                out.extend_from_slice(format!("node={} ", self.node).as_bytes());
                out.extend_from_slice(line);
            }
        }
        std::io::stderr().lock().write_all(&out)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: u64 = number.parse().with_context(|| format!("ttl {text:?}: a number with s, m, h or d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("ttl {text:?}: a number with s, m, h or d"),
    };
    Ok(Duration::from_secs(number * seconds))
}
