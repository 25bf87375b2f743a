//! [`NodeService`]: the node as the HTTP layer sees it ([`web::Backend`]).

use std::net::SocketAddr;
use std::sync::Arc;

use node_core::api::{Reply, Request};
use web::{ClusterView, MemberView, PartitionView};

use crate::{clock, Config, Driver};

/// Partitions and replicas the cluster is created with (the replication issue makes them live).
const PARTITIONS: u32 = 1024;
const REPLICAS: u32 = 3;

pub struct NodeService {
    driver: Arc<Driver>,
    node_id: String,
    http_addr: SocketAddr,
    mesh_addr: SocketAddr,
}

impl NodeService {
    pub fn new(config: &Config, http_addr: SocketAddr, driver: Arc<Driver>) -> NodeService {
        NodeService { driver, node_id: config.node_id.clone(), http_addr, mesh_addr: config.mesh }
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
        true // One node: the store is open and there is nothing to catch up with.
    }

    fn cluster(&self) -> ClusterView {
        ClusterView {
            node: self.node_id.clone(),
            members: vec![MemberView {
                id: self.node_id.clone(),
                mesh_addr: self.mesh_addr.to_string(),
                http_addr: self.http_addr.to_string(),
                state: "alive",
                weight: 1.0,
            }],
            partitions: PartitionView {
                count: PARTITIONS,
                replicas: REPLICAS,
                primary_here: PARTITIONS,
                replica_here: PARTITIONS,
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
