//! [`NodeService`]: the node as the HTTP layer sees it ([`web::Backend`]).

use std::sync::Arc;

use gossip::quic::Mesh;
use gossip::MemberState;
use node_core::api::{Reply, Request};
use web::{AdminCall, ApiError, ClusterView, MemberView, PartitionView};

use crate::{clock, Config, Driver};

pub struct NodeService {
    driver: Arc<Driver>,
    mesh: Arc<Mesh>,
    registry: prometheus_client::registry::Registry,
    backup_dir: std::path::PathBuf,
    backing_up: std::sync::atomic::AtomicBool,
    node_id: String,
    /// Whether this node was told to join others (then it is ready once it has).
    joins: bool,
    partitions: u32,
    replicas: u32,
}

impl NodeService {
    pub fn new(config: &Config, driver: Arc<Driver>, mesh: Arc<Mesh>, http: &web::HttpMetrics) -> NodeService {
        NodeService {
            registry: crate::metrics::registry(&config.node_id, http, driver.clone(), mesh.clone()),
            backup_dir: config.backup_dir.clone(),
            backing_up: Default::default(),
            driver,
            mesh,
            node_id: config.node_id.clone(),
            joins: !config.join.is_empty(),
            partitions: config.partitions,
            replicas: config.replicas as u32,
        }
    }
}

impl web::Backend for NodeService {
    async fn call(&self, request: Request) -> Reply {
        self.driver.call(request).await
    }

    fn now_ms(&self) -> u64 {
        clock::now_ms()
    }

    fn ready(&self) -> bool {
        // The store is open (the node would not run otherwise), it is not stopping, and it
        // has joined the mesh if it was told to. A partition this node leads is served only
        // once its log is caught up (its Start record applied), so what it serves is caught
        // up; a lone seed is ready, or the nodes joining it could never be deployed after it.
        !self.driver.is_stopped() && (!self.joins || self.mesh.is_active())
    }

    fn cluster(&self) -> ClusterView {
        let members = self
            .mesh
            .members()
            .into_iter()
            .map(|(member, state)| MemberView {
                id: member.id.to_string(),
                mesh_addr: member.mesh_addr.to_string(),
                http_addr: member.http_addr.to_string(),
                state: match state {
                    MemberState::Alive => "alive",
                    MemberState::Suspect => "suspect",
                    MemberState::Down => "down",
                },
                weight: f64::from(member.weight_milli) / 1000.0,
            })
            .collect();
        ClusterView {
            node: self.node_id.clone(),
            members,
            partitions: {
                // Without replication this node holds every partition itself.
                let all = self.partitions as usize;
                let (primary_here, replica_here, learner_here) =
                    self.driver.partition_counts().unwrap_or((all, all, 0));
                let lags = self.driver.replication_lags().unwrap_or_default();
                PartitionView {
                    count: self.partitions,
                    replicas: self.replicas,
                    primary_here: primary_here as u32,
                    replica_here: replica_here as u32,
                    learner_here: learner_here as u32,
                    lagging: lags.iter().filter(|(_, lag)| *lag > 0).count() as u32,
                    lag_max: lags.iter().map(|(_, lag)| *lag).max().unwrap_or(0),
                    under_replicated: self.driver.under_replicated().unwrap_or(0) as u32,
                }
            },
        }
    }

    fn metrics(&self) -> String {
        crate::metrics::encode(&self.registry)
    }

    async fn admin(&self, call: AdminCall) -> Result<serde_json::Value, ApiError> {
        match call {
            AdminCall::Backup { name } => {
                // One checkpoint at a time: each flushes the memtables.
                if self.backing_up.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    return Err(ApiError::overloaded("a backup is already being taken on this node"));
                }
                let _done = ClearOnDrop(&self.backing_up);
                let dir = self.backup_dir.join(&name);
                if dir.exists() {
                    return Err(ApiError::bad_request(format!("a backup named {name} exists already")));
                }
                private_dir(&self.backup_dir).map_err(|e| ApiError::unavailable(format!("backup directory: {e}")))?;
                let store = self.driver.store().clone();
                let target = dir.clone();
                let started = tokio::time::Instant::now();
                tokio::task::spawn_blocking(move || store.checkpoint(&target))
                    .await
                    .map_err(|e| ApiError::unavailable(format!("backup: {e}")))?
                    .map_err(|e| ApiError::unavailable(format!("backup: {e}")))?;
                let bytes = dir_bytes(&dir);
                tracing::info!(dir = %dir.display(), bytes, "took a backup checkpoint");
                Ok(serde_json::json!({
                    "dir": dir.display().to_string(),
                    "bytes": bytes,
                    "millis": started.elapsed().as_millis() as u64,
                }))
            }
            AdminCall::Weight { weight } => {
                let weight_milli = (weight * 1000.0).round() as u16;
                self.mesh.set_weight(weight_milli).await;
                tracing::info!(weight, "placement weight set");
                Ok(serde_json::json!({ "node": self.node_id, "weight": f64::from(weight_milli) / 1000.0 }))
            }
        }
    }
}

/// Creates `dir` (and its parents) readable by this user only: backups hold every message.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

struct ClearOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Bytes of the files directly in `dir` (a checkpoint is flat).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}
