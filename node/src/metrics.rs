//! `/metrics`: one prometheus-client [`Registry`] per node. The HTTP layer's counters
//! ([`web::HttpMetrics`]) are registered into it; everything else is read at scrape time by
//! [`NodeCollector`] from where it already lives (store counters, the core's waiters, the
//! replication machine, the mesh's view and QUIC connections), so nothing is counted twice.

use std::sync::Arc;

use gossip::quic::Mesh;
use gossip::MemberState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::Driver;

/// Builds the node's registry: the HTTP layer's metrics and the node's collector.
pub fn registry(node_id: &str, http: &web::HttpMetrics, driver: Arc<Driver>, mesh: Arc<Mesh>) -> Registry {
    let mut registry = Registry::default();
    http.register(&mut registry);
    let info = prometheus_client::metrics::info::Info::new(vec![
        ("node".to_string(), node_id.to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    registry.register("griddle_build", "This node's id and version", info);
    registry.register_collector(Box::new(NodeCollector { driver, mesh }));
    registry
}

pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

struct NodeCollector {
    driver: Arc<Driver>,
    mesh: Arc<Mesh>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let stats = self.driver.store().stats();
        counter(e, "griddle_store_events", "Events appended to the store.", stats.events)?;
        counter(e, "griddle_store_appends", "Append batches handed to the store.", stats.appends)?;
        counter(e, "griddle_store_wal_syncs", "Synced WAL writes (one per group commit).", stats.syncs)?;
        gauge(
            e,
            "griddle_store_cache_bytes",
            "Memory the store holds by design within its own bounds (RocksDB memtables and block cache).",
            stats.cache_bytes as i64,
        )?;
        counter(
            e,
            "griddle_store_corrupt_reads",
            "Store reads that found damaged data (failed checksum); never served.",
            crate::damage::CORRUPT_READS.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        counter(
            e,
            "griddle_store_copies_set_aside",
            "Damaged data directories set aside and rebuilt from replicas by this process.",
            crate::damage::SET_ASIDE.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        {
            // Group sizes as a histogram (per-bucket counts: the encoder sums them up); the
            // sum is every append that went through a sync. `syncs` and `groups` are read
            // apart, so the count is kept at least the buckets' sum.
            let bounded: u64 = stats.groups.iter().sum();
            let syncs = stats.syncs.max(bounded);
            let buckets: Vec<(f64, u64)> = store::GROUP_BOUNDS
                .iter()
                .zip(stats.groups)
                .map(|(bound, count)| (*bound as f64, count))
                .chain([(f64::INFINITY, syncs - bounded)])
                .collect();
            let mut metric = e.encode_descriptor(
                "griddle_store_group_commit_appends",
                "Appends per synced WAL write (group-commit batch size).",
                None,
                MetricType::Histogram,
            )?;
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                stats.appends as f64,
                syncs,
                &buckets,
                None,
            )?;
        }
        gauge(
            e,
            "griddle_long_polls_held",
            "Long-polls (sync and stream waits) held here.",
            self.driver.long_polls_held() as i64,
        )?;
        let (users, streams) = self.driver.subscriptions();
        {
            let mut metric = e.encode_descriptor(
                "griddle_subscriptions",
                "What the held long-polls watch: users (sync) and streams.",
                None,
                MetricType::Gauge,
            )?;
            for (kind, value) in [("user", users), ("stream", streams)] {
                ConstGauge::new(value as i64).encode(metric.encode_family(&[("kind", kind)])?)?;
            }
        }
        {
            let members = self.mesh.members();
            let mut metric = e.encode_descriptor(
                "griddle_members",
                "Mesh members by state, this node included.",
                None,
                MetricType::Gauge,
            )?;
            for (state, name) in
                [(MemberState::Alive, "alive"), (MemberState::Suspect, "suspect"), (MemberState::Down, "down")]
            {
                let count = members.iter().filter(|(_, s)| *s == state).count();
                ConstGauge::new(count as i64).encode(metric.encode_family(&[("state", name)])?)?;
            }
        }
        if let Some((primary, replica, learner)) = self.driver.partition_counts() {
            let mut metric = e.encode_descriptor(
                "griddle_partitions",
                "Partitions led here, voted in here, and followed here as a learner.",
                None,
                MetricType::Gauge,
            )?;
            for (role, count) in [("primary", primary), ("replica", replica), ("learner", learner)] {
                ConstGauge::new(count as i64).encode(metric.encode_family(&[("role", role)])?)?;
            }
        }
        if let Some(short) = self.driver.under_replicated() {
            gauge(
                e,
                "griddle_partitions_under_replicated",
                "Partitions led here with fewer whole voters than R (a voter missing, catching up, or wiped).",
                short as i64,
            )?;
        }
        if let Some(lags) = self.driver.replication_lags() {
            let mut metric = e.encode_descriptor(
                "griddle_replication_lag_entries",
                "Log entries the slowest other voter lacks, per partition led here.",
                None,
                MetricType::Gauge,
            )?;
            for (part, lag) in lags {
                ConstGauge::new(lag as i64).encode(metric.encode_family(&[("partition", part.to_string())])?)?;
            }
        }
        let links = self.mesh.link_stats();
        {
            let mut metric = e.encode_descriptor(
                "griddle_quic_bytes",
                "UDP bytes over the QUIC mesh, by peer and direction.",
                None,
                MetricType::Counter,
            )?;
            for link in &links {
                for (direction, bytes) in [("sent", link.sent_bytes), ("received", link.received_bytes)] {
                    let labels = [("peer", link.peer.to_string()), ("direction", direction.to_string())];
                    ConstCounter::new(bytes).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = e.encode_descriptor(
                "griddle_quic_rtt_seconds",
                "Smallest round-trip estimate of the open QUIC connections, by peer.",
                None,
                MetricType::Gauge,
            )?;
            for link in &links {
                if let Some(rtt) = link.rtt {
                    ConstGauge::new(rtt.as_secs_f64())
                        .encode(metric.encode_family(&[("peer", link.peer.to_string())])?)?;
                }
            }
        }
        Ok(())
    }
}
