//! Prometheus metrics (DESIGN §6). Handles are resolved once (per route and decision when a
//! config snapshot is built), so the request path only increments. Labels are bounded: route
//! *names* and decision names, never raw paths or customer ids.

use crate::proxy::respond::Decision;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    shadow: IntCounterVec,
    duration: HistogramVec,
    pub quota_store_duration: Histogram,
    pub quota_store_errors: IntCounter,
    /// Connections closed at once: their IP held `proxy.max_connections_per_ip` already.
    pub connections_refused: IntCounter,
    pub header_timeouts: IntCounter,
    /// `tollgate_quota_lease_calls_total` by call (take, extend, give_back): lease mode's Redis
    /// calls, so its round trips per request can be read off.
    pub lease_calls: crate::quota::lease::LeaseCalls,
    /// `tollgate_usage_events_total` by outcome (queued, spooled, lost), brought up to the usage
    /// pipeline's own counts at scrape time ([`Metrics::sync_usage`]): the pipeline counts both
    /// the request path's overflow and the flusher's spooled batches.
    usage_events: [IntCounter; 3],
    /// The counts `usage_events` was last brought up to (one scrape at a time).
    usage_synced: std::sync::Mutex<[u64; 3]>,
    pub usage_queue_depth: IntGauge,
    /// Set at scrape time: bytes of usage events waiting in the disk spool.
    pub usage_spool_bytes: IntGauge,
    /// Set at scrape time from the usage pipeline.
    pub ledger_lag: Gauge,
    pub cost_header_invalid: IntCounter,
    pub config_version: IntGauge,
}

/// Per-route handles, indexed by [`Decision::index`].
pub struct RouteMetrics {
    pub requests: Vec<IntCounter>,
    /// `tollgate_shadow_denials_total`, indexed by [`Decision::index`]; only the decisions
    /// shadow mode can waive have a handle.
    pub shadow: Vec<Option<IntCounter>>,
    pub duration: Histogram,
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests by decision and route name",
            ),
            &["decision", "route"],
        )?;
        let shadow = IntCounterVec::new(
            Opts::new(
                "tollgate_shadow_denials_total",
                "Requests a shadow-mode route or plan would have denied but forwarded, by the \
                 decision it waived and route name",
            ),
            &["decision", "route"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request head to last byte, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )?;
        let quota_store_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_quota_store_duration_seconds",
                "Time of one quota reservation",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )?;
        let quota_store_errors = IntCounter::new(
            "tollgate_quota_store_errors_total",
            "Quota store calls that failed or timed out",
        )?;
        let connections_refused = IntCounter::new(
            "tollgate_connections_refused_total",
            "Proxy connections closed at once because their IP held proxy.max_connections_per_ip",
        )?;
        let header_timeouts = IntCounter::new(
            "tollgate_header_timeouts_total",
            "Proxy connections closed because their first request head was not complete within proxy.header_read_timeout",
        )?;
        let lease_calls = IntCounterVec::new(
            Opts::new(
                "tollgate_quota_lease_calls_total",
                "Lease-mode calls to Redis by kind (take: a new lease, extend, give_back)",
            ),
            &["call"],
        )?;
        let usage_events = IntCounterVec::new(
            Opts::new(
                "tollgate_usage_events_total",
                "Usage events by outcome (queued, spooled, lost)",
            ),
            &["outcome"],
        )?;
        let usage_queue_depth = IntGauge::new(
            "tollgate_usage_queue_depth",
            "Usage events waiting for the ledger",
        )?;
        let usage_spool_bytes = IntGauge::new(
            "tollgate_usage_spool_bytes",
            "Bytes of usage events waiting on disk in the spool for the ledger",
        )?;
        let ledger_lag = Gauge::new(
            "tollgate_ledger_lag_seconds",
            "Time since the usage flusher last had every event it had taken in the ledger \
             (grows while the ledger is down)",
        )?;
        let cost_header_invalid = IntCounter::new(
            "tollgate_cost_header_invalid_total",
            "Upstream cost headers that were not a non-negative integer (the reservation was kept)",
        )?;
        let config_version =
            IntGauge::new("tollgate_config_version", "Version of the config in force")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(shadow.clone()))?;
        registry.register(Box::new(ledger_lag.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(quota_store_duration.clone()))?;
        registry.register(Box::new(quota_store_errors.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(header_timeouts.clone()))?;
        registry.register(Box::new(lease_calls.clone()))?;
        registry.register(Box::new(usage_events.clone()))?;
        registry.register(Box::new(usage_queue_depth.clone()))?;
        registry.register(Box::new(usage_spool_bytes.clone()))?;
        registry.register(Box::new(cost_header_invalid.clone()))?;
        registry.register(Box::new(config_version.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            shadow,
            duration,
            quota_store_duration,
            quota_store_errors,
            connections_refused,
            header_timeouts,
            lease_calls: crate::quota::lease::LeaseCalls {
                take: lease_calls.with_label_values(&["take"]),
                extend: lease_calls.with_label_values(&["extend"]),
                give_back: lease_calls.with_label_values(&["give_back"]),
            },
            usage_events: ["queued", "spooled", "lost"]
                .map(|o| usage_events.with_label_values(&[o])),
            usage_synced: std::sync::Mutex::new([0; 3]),
            usage_queue_depth,
            usage_spool_bytes,
            ledger_lag,
            cost_header_invalid,
            config_version,
        })
    }

    /// Brings `tollgate_usage_events_total` up to the pipeline's counts of events queued,
    /// spooled and lost (monotonic, so only the growth since the last scrape is added).
    pub fn sync_usage(&self, counts: [u64; 3]) {
        let mut synced = self
            .usage_synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((metric, seen), now) in self.usage_events.iter().zip(synced.iter_mut()).zip(counts) {
            metric.inc_by(now.saturating_sub(*seen));
            *seen = (*seen).max(now);
        }
    }

    /// Handles for one route name.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            requests: Decision::ALL
                .iter()
                .map(|d| self.requests.with_label_values(&[d.as_str(), name]))
                .collect(),
            shadow: Decision::ALL
                .iter()
                .map(|d| {
                    d.shadowable()
                        .then(|| self.shadow.with_label_values(&[d.as_str(), name]))
                })
                .collect(),
            duration: self.duration.with_label_values(&[name]),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
