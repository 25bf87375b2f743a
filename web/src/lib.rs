//! Griddle's HTTP API (`shared/API.md`) on hyper 1.x, and the browser app it serves at `/`.
//!
//! `web` parses and checks requests (routes, tokens, parameters, bodies, limits, CORS), turns
//! them into the node core's [`node_core::api::Request`]s, hands them to a [`Backend`] and
//! renders the [`node_core::api::Reply`] as JSON. It knows nothing of gossip or RocksDB: the
//! node implements [`Backend`]. Every error goes through one [`ApiError`] → status mapping.
//!
//! Promises: no input makes it panic; bodies over 64 KiB are refused before they are read
//! whole; parameters out of range are 400, never clamped; connections are capped below the
//! process's file-descriptor limit.

mod assets;
pub mod auth;
mod error;
pub mod metrics;
mod render;
mod routes;
mod server;

/// Entry points for the fuzz targets (`node/fuzz`), not for use elsewhere: the request
/// handling of a connection, minus the socket.
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response};
    use tokio::sync::Semaphore;

    use crate::{Backend, WebConfig};

    /// Answers `request` exactly as a connection's service does (CORS, routing, limits,
    /// auth, parameters, the backend call, rendering, metrics).
    pub async fn handle<B: Backend>(
        backend: &B,
        config: &WebConfig,
        calls: &Semaphore,
        peer: SocketAddr,
        request: Request<Full<Bytes>>,
    ) -> Response<Full<Bytes>> {
        // No socket to watch for the client going; the answer budget as a node sizes it.
        let kib = config.response_bytes_max.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        let budget = std::sync::Arc::new(Semaphore::new(kib));
        let response = crate::server::handle(backend, config, calls, &budget, None, peer, request).await;
        response.map(|body| Full::new(body.rest))
    }
}

use std::future::Future;

pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use server::{run, AllowNet, WebConfig};

use node_core::api::{Reply, Request};

/// What the HTTP layer needs from a node.
pub trait Backend: Send + Sync + 'static {
    /// Runs one request. Dropping the future abandons it (a long-poll stops waiting).
    fn call(&self, request: Request) -> impl Future<Output = Reply> + Send;
    /// Milliseconds since the Unix epoch: the node owns the clock.
    fn now_ms(&self) -> u64;
    /// Whether `/readyz` should answer 200.
    fn ready(&self) -> bool;
    fn cluster(&self) -> ClusterView;
    /// The node's whole registry (this layer's [`HttpMetrics`] included), OpenMetrics text.
    fn metrics(&self) -> String;
    /// Runs an operation on this node (`/v1/admin/*`; the caller holds a service token).
    fn admin(&self, call: AdminCall) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
}

/// Operations a service token may run on one node.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminCall {
    /// Write a consistent checkpoint of the store as `name` in the node's backup directory
    /// (a checked plain name: no path).
    Backup { name: String },
    /// Set this node's placement weight (0..1), live.
    Weight { weight: f64 },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterView {
    pub node: String,
    pub members: Vec<MemberView>,
    pub partitions: PartitionView,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberView {
    pub id: String,
    pub mesh_addr: String,
    pub http_addr: String,
    /// `alive`, `suspect` or `down`.
    pub state: &'static str,
    pub weight: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionView {
    pub count: u32,
    pub replicas: u32,
    pub primary_here: u32,
    /// Partitions this node votes in (their primary included).
    pub replica_here: u32,
    /// Partitions this node follows as a learner: a ghost's (weight 0), or a newcomer's
    /// before it caught up.
    pub learner_here: u32,
    /// Partitions led here whose slowest other voter lacks log entries, and the most any lacks.
    pub lagging: u32,
    pub lag_max: u64,
    /// Partitions led here with fewer whole voters than `replicas`: a voter missing, a
    /// learner catching up, or a voter whose disk was found wiped or damaged.
    pub under_replicated: u32,
}
