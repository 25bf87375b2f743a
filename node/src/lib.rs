//! A Griddle node: configuration, the tokio runtime that drives the node core, and the
//! [`web::Backend`] the HTTP layer calls. `main.rs` only parses the command line and wires.

pub mod clock;
pub mod config;
pub mod damage;
mod driver;
pub mod memory;
pub mod mesh;
mod metrics;
pub mod ops;
mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use store::Store;
use tokio::net::TcpListener;

pub use config::{Config, Overrides, StoreKind};
pub use driver::{Driver, Routing};
pub use service::NodeService;

/// How long a graceful stop may take before the node exits anyway.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Stops taking requests, answers held long-polls with their cursors (browsers resume on
/// another node), lets appends in flight commit, then leaves the mesh: the members see the
/// leave at once, so the next voter of each partition led here takes it over without
/// waiting for failure detection.
async fn graceful_stop(driver: &Driver, mesh: &gossip::quic::Mesh) {
    let started = tokio::time::Instant::now();
    driver.stop();
    let unanswered = driver.drain(Duration::from_secs(3)).await;
    mesh.leave().await;
    // Let the answered long-polls reach their clients before the process goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tracing::info!(unanswered, millis = started.elapsed().as_millis() as u64, "stopped gracefully");
}

pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store {
        StoreKind::Mem => Arc::new(store::mem::MemStore::new()),
        StoreKind::Rocksdb => open_rocksdb(config)?,
        StoreKind::Fdb => open_fdb(config)?,
    })
}

#[cfg(feature = "rocksdb")]
fn open_rocksdb(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("create {}", config.data_dir.display()))?;
    let options = store::rocks::RocksOptions {
        max_open_files: config.rocksdb_max_open_files,
        write_buffer_bytes: config.rocksdb_write_buffer_bytes,
        group_delay_us: config.group_commit_delay_us,
        ..Default::default()
    };
    Ok(Arc::new(store::rocks::RocksStore::open(&config.data_dir, options).context("open store")?))
}

#[cfg(not(feature = "rocksdb"))]
fn open_rocksdb(_config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    anyhow::bail!("this griddle was built without RocksDB (cargo feature rocksdb): use --store fdb or --store mem")
}

#[cfg(feature = "fdb")]
fn open_fdb(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let options = store::fdb::FdbOptions {
        cluster_file: config.fdb_cluster_file.clone(),
        prefix: config.fdb_prefix.clone(),
        ..Default::default()
    };
    let store = store::fdb::FdbStore::open(options)
        .with_context(|| format!("open FoundationDB (cluster file {:?})", config.fdb_cluster_file))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    anyhow::bail!(
        "this griddle was built without FoundationDB: build it with `--features fdb` (and libfdb_c installed)"
    )
}

pub fn web_config(config: &Config) -> anyhow::Result<web::WebConfig> {
    let ops_allow = config
        .ops_allow
        .iter()
        .map(|net| web::AllowNet::parse(net).with_context(|| format!("ops_allow entry {net:?}")))
        .collect::<anyhow::Result<_>>()?;
    Ok(web::WebConfig {
        jwt_secret: config.jwt_secret.as_bytes().to_vec(),
        dev: config.dev,
        cors_origins: config.cors_origins.clone(),
        ops_allow,
        connections_max: config.connections_max,
        requests_in_flight_max: config.requests_in_flight_max,
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        header_bytes_max: config.header_bytes_max,
        send_timeout: Duration::from_millis(config.send_timeout_ms),
        response_bytes_max: config.response_bytes_max,
        ..Default::default()
    })
}

/// Why [`run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future completed.
    Asked,
    /// Stored data failed its checksum and replicas can repair it: the data directory is
    /// marked damaged; run again (after [`damage::set_aside_if_marked`]) to rejoin with a
    /// fresh disk.
    Damaged,
}

/// Serves `listener` until `shutdown` completes, storage fails, or damaged data is found;
/// then answers held long-polls with their cursors and returns. The store is closed when the
/// last handle drops.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<Stopped> {
    let damage = Arc::new(damage::Damage::new(&config));
    match serve(&config, listener, shutdown, &damage).await {
        Err(error) if damage::is_corrupt(&error) || damage.is_reported() => {
            // Found while opening or recovering: nothing was served yet.
            damage.report(&format!("{error:#}"));
            if damage.repairable() {
                Ok(Stopped::Damaged)
            } else {
                Err(error)
            }
        }
        other => other,
    }
}

async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    damage: &Arc<damage::Damage>,
) -> anyhow::Result<Stopped> {
    let config = config.clone();
    let store: Arc<dyn Store> = Arc::new(damage::Watched { inner: open_store(&config)?, damage: damage.clone() });
    // A shared store (FoundationDB) keeps the copies itself, but each stream still needs one
    // sequencer: its partition's primary.
    let shared = config.store == StoreKind::Fdb;
    let core_config = node_core::Config {
        cursor_key: config.cursor_secret.as_bytes().to_vec(),
        waiters_max: config.long_polls_max,
        seed: clock::seed(),
        partitions: (config.replicas > 1 || shared).then_some(config.partitions),
        ..Default::default()
    };
    let core =
        node_core::NodeCore::new(core_config, store.clone(), clock::now_ms()).context("recover the node core")?;
    let routing = if shared {
        Routing::Shared { joins: !config.join.is_empty() }
    } else if config.replicas > 1 {
        let repl_config = node_core::repl::Config {
            partitions: config.partitions,
            replicas: config.replicas,
            write_quorum: config.write_quorum,
            bootstrap_expect: config.bootstrap_expect,
            seed: clock::seed(),
            ..node_core::repl::Config::new(config.node_id.clone())
        };
        let machine = node_core::repl::Replicas::new(repl_config, store.clone(), clock::now_ms())
            .context("recover the replicated partitions")?;
        Routing::Replicated(Box::new(machine))
    } else {
        Routing::Local
    };
    let driver = Driver::start(core, store, routing, config.node_id.clone(), config.partitions);
    let http_addr = listener.local_addr()?;
    let weak = Arc::downgrade(&driver);
    let handler: gossip::quic::Handler = Arc::new(move |from, body| {
        let driver = weak.upgrade();
        Box::pin(async move {
            match driver {
                Some(driver) => driver.answer(from, body).await,
                None => Vec::new(),
            }
        })
    });
    let mesh = Arc::new(mesh::start(&config, http_addr, Some(handler)).await?);
    driver.attach_mesh(mesh.clone());
    if config.replicas > 1 {
        driver.follow_flags();
    }
    // Tests and scripts read this line to learn the bound ports.
    println!("griddle {} listening on http://{http_addr}/ mesh {}", config.node_id, mesh.local_addr());
    let web_config = web_config(&config)?;
    let service = Arc::new(NodeService::new(&config, driver.clone(), mesh.clone(), &web_config.metrics));
    let fatal = async { driver.fatal.notified().await };
    let damaged = async { damage.found.notified().await };
    let (failed, stopped) = tokio::select! {
        _ = web::run(listener, service, web_config, shutdown) => (false, Stopped::Asked),
        _ = fatal => (true, Stopped::Asked),
        _ = damaged => (false, Stopped::Damaged),
    };
    // The whole stop is bounded, so an orchestrator's kill timeout is never reached.
    let stopping = graceful_stop(&driver, &mesh);
    if tokio::time::timeout(STOP_DEADLINE, stopping).await.is_err() {
        tracing::warn!(deadline = ?STOP_DEADLINE, "graceful stop took too long; exiting anyway");
    }
    if damage.is_reported() && damage.repairable() {
        // Damage can also surface as a failed write (RocksDB stops writing on damage a
        // compaction found): the repair, not a plain restart, is what the node needs.
        return Ok(Stopped::Damaged);
    }
    if failed {
        anyhow::bail!("storage failed");
    }
    Ok(stopped)
}
