//! [`NodeService`]: the node as the HTTP layer sees it ([`web::Backend`]).

use std::sync::Arc;

use gossip::quic::Mesh;
use gossip::MemberState;
use node_core::api::{Reply, Request};
use web::{ClusterView, MemberView, PartitionView};

use crate::{clock, Config, Driver};

pub struct NodeService {
    driver: Arc<Driver>,
    mesh: Arc<Mesh>,
    node_id: String,
    /// Whether this node was told to join others (then it is ready once it has).
    joins: bool,
    partitions: u32,
    replicas: u32,
}

impl NodeService {
    pub fn new(config: &Config, driver: Arc<Driver>, mesh: Arc<Mesh>) -> NodeService {
        NodeService {
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
        // The store is open (the node would not run otherwise); it must have joined the mesh
        // if it was told to. (Replication adds: its partitions are caught up.)
        !self.joins || self.mesh.is_active()
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
                let (primary_here, replica_here) = self.driver.partition_counts().unwrap_or((all, all));
                PartitionView {
                    count: self.partitions,
                    replicas: self.replicas,
                    primary_here: primary_here as u32,
                    replica_here: replica_here as u32,
                }
            },
        }
    }

    fn metrics(&self) -> String {
        let stats = self.driver.store().stats();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        metric("griddle_store_events_total", "counter", "Events appended to the store.", stats.events);
        metric("griddle_store_appends_total", "counter", "Append batches handed to the store.", stats.appends);
        metric("griddle_store_wal_syncs_total", "counter", "Synced WAL writes (group commits).", stats.syncs);
        metric(
            "griddle_long_polls_held",
            "gauge",
            "Long-polls waiting on this node.",
            self.driver.long_polls_held() as u64,
        );
        out
    }
}
