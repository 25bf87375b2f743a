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
    init_logs(config.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(config.http).await.with_context(|| format!("bind {}", config.http))?;
        let addr = listener.local_addr()?;
        let span = tracing::info_span!("node", id = %config.node_id);
        let _entered = span.enter();
        tracing::info!(%addr, data_dir = %config.data_dir.display(), dev = config.dev, "serving");
        node::run(config, listener, shutdown_signal()).await
    })?;
    tracing::info!("stopped");
    Ok(())
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

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRIDDLE_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
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
