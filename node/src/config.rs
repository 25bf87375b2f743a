//! Configuration: command-line flags over `GRIDDLE_*` environment variables over the TOML
//! file over defaults. Every key is documented in `docs/config.md`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The development secret `--dev` uses. Public on purpose: never use `--dev` in production.
pub const DEV_SECRET: &str = "griddle-development-secret-not-for-production";

/// The TOML file. Every field is optional; unknown keys are an error, so typos surface.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub http: Option<SocketAddr>,
    pub mesh: Option<SocketAddr>,
    pub join: Option<Vec<String>>,
    pub dev: Option<bool>,
    pub jwt_secret: Option<String>,
    pub cursor_secret: Option<String>,
    pub store: Option<String>,
    pub fdb_cluster_file: Option<PathBuf>,
    pub fdb_prefix: Option<String>,
    pub cors_origins: Option<Vec<String>>,
    pub ops_allow: Option<Vec<String>>,
    pub long_polls_max: Option<usize>,
    pub connections_max: Option<usize>,
    pub requests_in_flight_max: Option<usize>,
    pub header_read_timeout_ms: Option<u64>,
    pub header_bytes_max: Option<usize>,
    pub send_timeout_ms: Option<u64>,
    pub response_bytes_max: Option<usize>,
    pub rocksdb_max_open_files: Option<i32>,
    pub rocksdb_write_buffer_bytes: Option<usize>,
    pub group_commit_delay_us: Option<u64>,
    pub log_format: Option<String>,
    pub certs: Option<PathBuf>,
    pub mesh_advertise: Option<SocketAddr>,
    pub mesh_probe_period_ms: Option<u64>,
    pub mesh_probe_rtt_ms: Option<u64>,
    pub mesh_suspect_to_down_ms: Option<u64>,
    pub mesh_gossip_period_ms: Option<u64>,
    pub mesh_announce_interval_ms: Option<u64>,
    pub replicas: Option<usize>,
    pub write_quorum: Option<usize>,
    pub partitions: Option<u32>,
    pub bootstrap_expect: Option<usize>,
    pub weight: Option<f64>,
    pub backup_dir: Option<PathBuf>,
    pub damage_rebuild_interval_s: Option<u64>,
}

impl FileConfig {
    pub fn load(path: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
        let Some(path) = path else { return Ok(FileConfig::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Rocksdb,
    Mem,
    /// FoundationDB, shared by every node (needs the `fdb` feature to open).
    Fdb,
}

/// Longest FoundationDB key prefix we accept, in bytes.
pub const FDB_PREFIX_LEN_MAX: usize = 64;

/// Everything a node needs, resolved.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub mesh: SocketAddr,
    pub join: Vec<String>,
    pub dev: bool,
    pub jwt_secret: String,
    pub cursor_secret: String,
    pub store: StoreKind,
    /// With `--store fdb`: the cluster file (`None`: FoundationDB's default).
    pub fdb_cluster_file: Option<PathBuf>,
    /// With `--store fdb`: the first element of every key; every node of one Griddle cluster
    /// uses the same, and clusters sharing a FoundationDB use different ones.
    pub fdb_prefix: String,
    pub cors_origins: Vec<String>,
    pub ops_allow: Vec<String>,
    pub long_polls_max: usize,
    pub connections_max: usize,
    pub requests_in_flight_max: usize,
    /// How long a client has to send a request's headers (and, per request, its body).
    pub header_read_timeout_ms: u64,
    pub header_bytes_max: usize,
    /// A connection whose answer makes no progress this long (a client that stopped reading)
    /// is closed.
    pub send_timeout_ms: u64,
    /// Bytes of answers to reads waiting to be sent, over all connections; past it, 429.
    pub response_bytes_max: usize,
    pub rocksdb_max_open_files: i32,
    /// A column family's memtable size before it is flushed (RocksDB's `write_buffer_size`).
    pub rocksdb_write_buffer_bytes: usize,
    pub group_commit_delay_us: u64,
    pub log_json: bool,
    /// Directory with `ca.pem`, `node.pem` and `node.key`; `None` with `--dev` uses the
    /// built-in development CA.
    pub certs: Option<PathBuf>,
    /// The mesh address other nodes dial (defaults to `mesh`).
    pub mesh_advertise: Option<SocketAddr>,
    pub mesh_profile: gossip::Profile,
    /// R: replicas per partition; 1 keeps each node's data on that node alone (no replication).
    pub replicas: usize,
    /// W: replicas that must sync an entry before it commits.
    pub write_quorum: usize,
    pub partitions: u32,
    /// Nodes a cluster starts with: partitions are first started only once this many know
    /// each other.
    pub bootstrap_expect: usize,
    /// Placement weight in thousandths (1000: a full share of partitions; 0: none). Raised
    /// live with `griddle weight`, so a new node can ramp up.
    pub weight_milli: u16,
    /// Where `griddle backup` checkpoints go (each as a named directory).
    pub backup_dir: PathBuf,
    /// A copy found damaged again within this long of the last rebuild is not set aside
    /// automatically (`node::damage`): the node stops and waits for an operator.
    pub damage_rebuild_interval_s: u64,
}

/// Values given on the command line or in the environment (clap reads both).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, env = "GRIDDLE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id (default: `node-` and the HTTP port).
    #[arg(long, env = "GRIDDLE_NODE_ID")]
    pub node_id: Option<String>,
    /// Where the store lives (default: ./griddle-data/<node id>).
    #[arg(long, env = "GRIDDLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address (default 127.0.0.1:7700).
    #[arg(long, env = "GRIDDLE_HTTP")]
    pub http: Option<SocketAddr>,
    /// Mesh (QUIC) listen address (default 127.0.0.1:7800).
    #[arg(long, env = "GRIDDLE_MESH")]
    pub mesh: Option<SocketAddr>,
    /// Mesh addresses of nodes to join, comma-separated.
    #[arg(long, env = "GRIDDLE_JOIN", value_delimiter = ',')]
    pub join: Option<Vec<String>>,
    /// Development mode: built-in secret, /v1/dev/token, loopback only.
    #[arg(long, env = "GRIDDLE_DEV")]
    pub dev: bool,
    /// Storage backend: rocksdb (default), mem (nothing survives a restart) or fdb
    /// (FoundationDB, shared by every node; needs a griddle built with the fdb feature).
    #[arg(long, env = "GRIDDLE_STORE")]
    pub store: Option<String>,
    /// With --store fdb: the FoundationDB cluster file (default: FoundationDB's own default).
    #[arg(long, env = "GRIDDLE_FDB_CLUSTER_FILE")]
    pub fdb_cluster_file: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "GRIDDLE_LOG_JSON")]
    pub log_json: bool,
    /// Directory with this node's certificates (ca.pem, node.pem, node.key).
    #[arg(long, env = "GRIDDLE_CERTS")]
    pub certs: Option<PathBuf>,
    /// Mesh address to advertise, when others reach this node through a proxy or NAT.
    #[arg(long, env = "GRIDDLE_MESH_ADVERTISE")]
    pub mesh_advertise: Option<SocketAddr>,
    /// Replicas per partition (R); with more than 1, partitions are replicated.
    #[arg(long, env = "GRIDDLE_REPLICAS")]
    pub replicas: Option<usize>,
    /// Nodes the cluster is created with (default: replicas); partitions start once that many
    /// know each other.
    #[arg(long, env = "GRIDDLE_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<usize>,
    /// Placement weight 0..1 to start with (default 1); raise it live with `griddle weight`.
    #[arg(long, env = "GRIDDLE_WEIGHT")]
    pub weight: Option<f64>,
}

/// The JWT secret: `GRIDDLE_JWT_SECRET`, else the file's, else the development one with `dev`.
fn jwt_secret(from_file: Option<String>, dev: bool) -> anyhow::Result<String> {
    Ok(match std::env::var("GRIDDLE_JWT_SECRET").ok().or(from_file) {
        Some(secret) if secret.len() >= 16 => secret,
        Some(_) => bail!("jwt_secret must be at least 16 bytes"),
        None if dev => DEV_SECRET.to_owned(),
        None => bail!("set jwt_secret in the config file or GRIDDLE_JWT_SECRET (or use --dev)"),
    })
}

impl Config {
    /// Only the JWT secret of a config (what the operator commands sign their service token
    /// with), without reading certificates or checking anything else a node needs.
    pub fn secret_only(config: Option<&PathBuf>, dev: bool) -> anyhow::Result<String> {
        let file = FileConfig::load(config)?;
        jwt_secret(file.jwt_secret, dev || file.dev.unwrap_or(false))
    }

    pub fn resolve(flags: &Overrides) -> anyhow::Result<Config> {
        let file = FileConfig::load(flags.config.as_ref())?;
        let dev = flags.dev || file.dev.unwrap_or(false);
        let http = flags.http.or(file.http).unwrap_or_else(|| "127.0.0.1:7700".parse().expect("valid"));
        let mesh = flags.mesh.or(file.mesh).unwrap_or_else(|| "127.0.0.1:7800".parse().expect("valid"));
        let certs = flags.certs.clone().or(file.certs.clone());
        let cert_id = match &certs {
            Some(dir) => Some(crate::mesh::credentials_from(dir)?.node_id().context("read node.pem")?.to_string()),
            None => None,
        };
        let node_id = flags
            .node_id
            .clone()
            .or(file.node_id)
            .or(cert_id.clone())
            .unwrap_or_else(|| format!("node-{}", http.port()));
        if cert_id.as_ref().is_some_and(|cert| *cert != node_id) {
            bail!("node_id {node_id:?} differs from the node id {cert_id:?} that node.pem names");
        }
        if !node_core::social::valid_user(&node_id) {
            bail!("node_id must be 1-64 of A-Z a-z 0-9 _ -, got {node_id:?}");
        }
        let jwt_secret = jwt_secret(file.jwt_secret.clone(), dev)?;
        let cursor_secret = std::env::var("GRIDDLE_CURSOR_SECRET")
            .ok()
            .or(file.cursor_secret)
            .unwrap_or_else(|| format!("cursor:{jwt_secret}"));
        if dev && !(http.ip().is_loopback() && mesh.ip().is_loopback()) {
            bail!("--dev binds loopback addresses only (http {http}, mesh {mesh})");
        }
        let store = match flags.store.clone().or(file.store).as_deref().unwrap_or("rocksdb") {
            "rocksdb" => StoreKind::Rocksdb,
            "mem" => StoreKind::Mem,
            "fdb" => StoreKind::Fdb,
            other => bail!("store must be rocksdb, mem or fdb, got {other:?}"),
        };
        let fdb_cluster_file = flags.fdb_cluster_file.clone().or(file.fdb_cluster_file);
        if fdb_cluster_file.is_some() && store != StoreKind::Fdb {
            bail!("fdb_cluster_file is set but the store is not fdb: add --store fdb, or drop the cluster file");
        }
        let fdb_prefix = file.fdb_prefix.unwrap_or_else(|| "griddle".to_owned());
        if fdb_prefix.is_empty() || fdb_prefix.len() > FDB_PREFIX_LEN_MAX {
            bail!("fdb_prefix must be 1-{FDB_PREFIX_LEN_MAX} bytes, got {fdb_prefix:?}");
        }
        let log_json = flags.log_json || file.log_format.as_deref() == Some("json");
        if certs.is_none() && !dev {
            bail!("give --certs DIR (made by `griddle cluster init` and `griddle cluster issue`), or use --dev");
        }
        let defaults = gossip::Profile::default();
        let mesh_profile = gossip::Profile {
            probe_period_ms: file.mesh_probe_period_ms.unwrap_or(defaults.probe_period_ms),
            probe_rtt_ms: file.mesh_probe_rtt_ms.unwrap_or(defaults.probe_rtt_ms),
            suspect_to_down_ms: file.mesh_suspect_to_down_ms.unwrap_or(defaults.suspect_to_down_ms),
            gossip_period_ms: file.mesh_gossip_period_ms.unwrap_or(defaults.gossip_period_ms),
            announce_interval_ms: file.mesh_announce_interval_ms.unwrap_or(defaults.announce_interval_ms),
            ..defaults
        };
        if mesh_profile.probe_rtt_ms == 0 || mesh_profile.probe_rtt_ms >= mesh_profile.probe_period_ms {
            bail!("mesh_probe_rtt_ms must be above 0 and below mesh_probe_period_ms");
        }
        let replicas = flags.replicas.or(file.replicas).unwrap_or(1);
        if store == StoreKind::Fdb && replicas != 1 {
            // FoundationDB keeps the copies; a second layer of replicas would only slow writes.
            bail!("with the fdb store, FoundationDB keeps the copies: leave replicas at 1 (got {replicas})");
        }
        let write_quorum = file.write_quorum.unwrap_or(replicas.min(2));
        if replicas == 0 || write_quorum == 0 || write_quorum > replicas {
            bail!("replicas must be at least 1 and write_quorum 1..=replicas (got {replicas} and {write_quorum})");
        }
        let partitions = file.partitions.unwrap_or(node_core::placement::PARTITIONS_DEFAULT);
        if !(1..=65_536).contains(&partitions) {
            bail!("partitions must be 1..=65536");
        }
        let weight = flags.weight.or(file.weight).unwrap_or(1.0);
        if !(0.0..=1.0).contains(&weight) {
            bail!("weight must be 0..1 (got {weight})");
        }
        let header_read_timeout_ms = file.header_read_timeout_ms.unwrap_or(10_000);
        if header_read_timeout_ms == 0 {
            bail!("header_read_timeout_ms must be above 0");
        }
        // hyper needs room for at least one read buffer (8 KiB) of headers.
        let header_bytes_max = file.header_bytes_max.unwrap_or(16 * 1024);
        if header_bytes_max < 8192 {
            bail!("header_bytes_max must be at least 8192 (got {header_bytes_max})");
        }
        let send_timeout_ms = file.send_timeout_ms.unwrap_or(30_000);
        if send_timeout_ms == 0 {
            bail!("send_timeout_ms must be above 0");
        }
        // The largest answer (a page of 100 events of up to 64 KiB) must fit, or it could
        // never be sent.
        let response_bytes_max = file.response_bytes_max.unwrap_or(256 << 20);
        if response_bytes_max < 8 << 20 {
            bail!("response_bytes_max must be at least 8 MiB (8388608), got {response_bytes_max}");
        }
        let data_dir =
            flags.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("griddle-data").join(&node_id));
        Ok(Config {
            weight_milli: (weight * 1000.0).round() as u16,
            damage_rebuild_interval_s: file.damage_rebuild_interval_s.unwrap_or(3600),
            backup_dir: file.backup_dir.unwrap_or_else(|| {
                let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
                name.push("-backups");
                data_dir.with_file_name(name)
            }),
            data_dir,
            node_id,
            http,
            mesh,
            join: flags.join.clone().or(file.join).unwrap_or_default(),
            dev,
            jwt_secret,
            cursor_secret,
            store,
            fdb_cluster_file,
            fdb_prefix,
            cors_origins: file.cors_origins.unwrap_or_default(),
            ops_allow: file.ops_allow.unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]),
            long_polls_max: file.long_polls_max.unwrap_or(19_000),
            connections_max: file.connections_max.unwrap_or(19_500),
            requests_in_flight_max: file.requests_in_flight_max.unwrap_or(256),
            header_read_timeout_ms,
            header_bytes_max,
            send_timeout_ms,
            response_bytes_max,
            rocksdb_max_open_files: file.rocksdb_max_open_files.unwrap_or(256),
            rocksdb_write_buffer_bytes: file.rocksdb_write_buffer_bytes.unwrap_or(64 << 20).max(64 << 10),
            group_commit_delay_us: file.group_commit_delay_us.unwrap_or(200),
            log_json,
            certs,
            mesh_advertise: flags.mesh_advertise.or(file.mesh_advertise),
            mesh_profile,
            replicas,
            write_quorum,
            partitions,
            bootstrap_expect: flags.bootstrap_expect.or(file.bootstrap_expect).unwrap_or(replicas).max(replicas),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves a `--dev` node with `flags` and the TOML `file`; the store settings, or the
    /// start of the error.
    fn check(flags: Overrides, file: &str, expected: Result<(StoreKind, Option<&str>, &str), &str>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("griddle.toml");
        std::fs::write(&path, file).unwrap();
        let flags = Overrides { config: Some(path), dev: true, ..flags };
        let got = Config::resolve(&flags)
            .map(|c| (c.store, c.fdb_cluster_file.map(|p| p.display().to_string()), c.fdb_prefix))
            .map_err(|e| e.to_string());
        match (got, expected) {
            (Ok((store, file, prefix)), Ok(want)) => assert_eq!((store, file.as_deref(), prefix.as_str()), want),
            (Err(error), Err(want)) => assert!(error.starts_with(want), "{error:?} should start with {want:?}"),
            (got, want) => panic!("got {got:?}, expected {want:?}"),
        }
    }

    fn store(name: &str) -> Overrides {
        Overrides { store: Some(name.into()), ..Overrides::default() }
    }

    #[test]
    fn store_settings() {
        check(Overrides::default(), "", Ok((StoreKind::Rocksdb, None, "griddle")));
        check(store("mem"), "", Ok((StoreKind::Mem, None, "griddle")));
        check(store("fdb"), "", Ok((StoreKind::Fdb, None, "griddle")));
        let with_file = Overrides { fdb_cluster_file: Some("/etc/fdb.cluster".into()), ..store("fdb") };
        check(with_file, "", Ok((StoreKind::Fdb, Some("/etc/fdb.cluster"), "griddle")));
        check(
            Overrides::default(),
            "store = \"fdb\"\nfdb_cluster_file = \"/x/fdb.cluster\"\nfdb_prefix = \"eu\"\n",
            Ok((StoreKind::Fdb, Some("/x/fdb.cluster"), "eu")),
        );
        check(store("sqlite"), "", Err("store must be rocksdb, mem or fdb"));
        let misplaced = Overrides { fdb_cluster_file: Some("/etc/fdb.cluster".into()), ..Overrides::default() };
        check(misplaced, "", Err("fdb_cluster_file is set but the store is not fdb"));
        check(Overrides { replicas: Some(3), ..store("fdb") }, "", Err("with the fdb store, FoundationDB keeps"));
        check(store("fdb"), "fdb_prefix = \"\"\n", Err("fdb_prefix must be 1-64 bytes"));
    }
}
