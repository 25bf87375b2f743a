//! What the HTTP layer counts: requests by route and status, their latency, connections
//! open, calls in flight and calls refused. The node owns the [`Registry`] and registers
//! these next to its own (`HttpMetrics::register`); `/metrics` encodes the whole registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::routes::Route;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's name, never its parameters (a user id would make a series per user).
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `connections` (over `connections_max`) or `in_flight` (over `requests_in_flight_max`).
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    pub(crate) connections: Gauge,
    pub(crate) in_flight: Gauge,
    refused: Family<RefusalLabels, Counter>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            // 100 µs to about 52 s: long-polls land in the top buckets.
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 20))),
            connections: Gauge::default(),
            in_flight: Gauge::default(),
            refused: Family::default(),
        }
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "griddle_http_requests",
            "HTTP requests answered, by route and status",
            self.requests.clone(),
        );
        registry.register(
            "griddle_http_request_duration_seconds",
            "Time from a request's headers to its answer, by route (long-polls included)",
            self.duration.clone(),
        );
        registry.register("griddle_http_connections", "HTTP connections open", self.connections.clone());
        registry.register(
            "griddle_http_requests_in_flight",
            "API calls being answered (long-polls aside)",
            self.in_flight.clone(),
        );
        registry.register("griddle_http_refused", "Connections and calls refused for load", self.refused.clone());
    }

    pub(crate) fn answered(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
        self.duration.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

impl Route {
    /// A name for metrics and logs: the path's shape, without its parameters.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Asset(..) => "asset",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Cluster => "cluster",
            Route::Admin(_) => "admin",
            Route::DevToken => "dev_token",
            Route::Messages(_) => "messages",
            Route::Typing(_) => "typing",
            Route::Read(_) => "read",
            Route::Chats => "chats",
            Route::Flirts(_) => "flirts",
            Route::Visits(_) => "visits",
            Route::Feed => "feed",
            Route::Sync => "sync",
            Route::Online => "online",
            Route::Flags => "flags",
            Route::Flag(_) => "flag",
            Route::Stream(_) => "stream",
        }
    }
}
