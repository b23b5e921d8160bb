//! What the request path shares: the config snapshot in force (swapped atomically, so a request
//! sees one version from start to end) and the long-lived parts (verifier, entitlement cache,
//! quota stores, usage sink, metrics).

use crate::auth::Verifier;
use crate::config::Config;
use crate::entitle::Entitlements;
use crate::metrics::{Metrics, RouteMetrics};
use crate::proxy::route::Router;
use crate::proxy::upstream::Pool;
use crate::quota::{memory::MemoryStore, QuotaStore};
use crate::usage::UsageSink;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One config version, compiled for the request path.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub pools: Arc<BTreeMap<String, Pool>>,
    /// Parallel to `config.routes`.
    pub route_metrics: Vec<RouteMetrics>,
    /// For requests no route matched.
    pub unmatched_metrics: RouteMetrics,
    pub version: u64,
}

impl Snapshot {
    pub fn new(
        config: Config,
        pools: Arc<BTreeMap<String, Pool>>,
        metrics: &Metrics,
        version: u64,
    ) -> Result<Snapshot, String> {
        let router = Router::build(&config.routes).map_err(|e| {
            e.into_iter()
                .map(|(i, m)| format!("routes[{i}].match: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let route_metrics = config
            .routes
            .iter()
            .map(|r| metrics.route(&r.name))
            .collect();
        Ok(Snapshot {
            config,
            router,
            pools,
            route_metrics,
            unmatched_metrics: metrics.route("(unmatched)"),
            version,
        })
    }
}

/// The config in force, swapped whole by live config; cloned as a handle by the parts that only
/// read it (Stripe).
pub type SnapshotCell = Arc<ArcSwap<Snapshot>>;

pub struct Shared {
    pub snapshot: SnapshotCell,
    pub verifier: Arc<Verifier>,
    pub entitlements: Arc<Entitlements>,
    /// Redis when configured, else the in-process store.
    pub store: Arc<dyn QuotaStore>,
    /// Where fail-open plans count while `store` is unreachable (the same store when embedded).
    pub fallback: Arc<MemoryStore>,
    pub usage: UsageSink,
    pub metrics: Arc<Metrics>,
    /// Threshold-alert queue; `None` without `[alerts]` (or without its secret).
    pub alerts: Option<crate::alerts::Alerts>,
    /// The read limit of `GET /_tollgate/usage`.
    pub self_service: super::selfservice::Guard,
}
