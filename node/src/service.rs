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
    node_id: String,
    /// Whether this node was told to join others (then it is ready once it has).
    joins: bool,
    partitions: u32,
    replicas: u32,
    write_quorum: usize,
}

impl NodeService {
    pub fn new(config: &Config, driver: Arc<Driver>, mesh: Arc<Mesh>, http: &web::HttpMetrics) -> NodeService {
        NodeService {
            registry: crate::metrics::registry(&config.node_id, http, driver.clone(), mesh.clone()),
            driver,
            mesh,
            node_id: config.node_id.clone(),
            joins: !config.join.is_empty(),
            partitions: config.partitions,
            replicas: config.replicas as u32,
            write_quorum: config.write_quorum,
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
        // The store is open (the node would not run otherwise). It is not stopping, it has
        // joined the mesh if it was told to, and with replication it sees enough live
        // members to commit a write (W of them, itself included); a partition this node
        // leads is served only once its log is caught up (its Start record applied).
        if self.driver.is_stopped() || (self.joins && !self.mesh.is_active()) {
            return false;
        }
        self.replicas <= 1
            || self.mesh.members().iter().filter(|(_, state)| *state != MemberState::Down).count() >= self.write_quorum
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
                }
            },
        }
    }

    fn metrics(&self) -> String {
        crate::metrics::encode(&self.registry)
    }

    async fn admin(&self, call: AdminCall) -> Result<serde_json::Value, ApiError> {
        match call {
            AdminCall::Backup { dir } => {
                let dir = std::path::PathBuf::from(dir);
                if !dir.is_absolute() || dir.exists() {
                    return Err(ApiError::bad_request("dir must be an absolute path that does not exist yet"));
                }
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

/// Bytes of the files directly in `dir` (a checkpoint is flat).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}
