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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One config version, compiled for the request path.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub pools: Arc<BTreeMap<String, Pool>>,
    /// Parallel to `config.routes`.
    pub route_metrics: Vec<RouteMetrics>,
    /// For requests no route matched.
    pub unmatched_metrics: RouteMetrics,
    /// For self-service reads (`GET /_tollgate/usage`).
    pub self_service_metrics: RouteMetrics,
    /// For self-service billing calls (`/_tollgate/plans`, `checkout`, …).
    pub billing_metrics: RouteMetrics,
    /// The offered plans (`GET /_tollgate/plans`), rendered once per version.
    pub catalog: crate::billing::catalog::Catalog,
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
            catalog: crate::billing::catalog::Catalog::new(&config),
            billing_metrics: metrics.route(super::billing::ROUTE),
            config,
            router,
            pools,
            route_metrics,
            unmatched_metrics: metrics.route("(unmatched)"),
            self_service_metrics: metrics.route(super::selfservice::ROUTE),
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
    /// No Redis: `store` is the in-process store itself and never fails over.
    pub embedded: bool,
    /// What a capped quota's fail-open fallback may grant (last seen counters, instances).
    pub fail_open: Arc<crate::quota::fail_open::FailOpen>,
    pub usage: UsageSink,
    /// Where reservations are written before they are forwarded (`None`: not protected against
    /// a crash; tests of other parts).
    pub journal: Option<Arc<crate::journal::Journal>>,
    /// This instance's leases of lease-mode plans (with Redis only); `store` grants from them.
    pub leases: Option<Arc<crate::quota::lease::Leases>>,
    pub metrics: Arc<Metrics>,
    /// Threshold-alert queue; `None` without `[alerts]` (or without its secret).
    pub alerts: Option<crate::alerts::Alerts>,
    /// The per-customer limit of self-service calls (usage reads and billing).
    pub self_service: super::selfservice::Guard,
    /// Self-service billing (invoices from the ledger; the rest through Stripe when `[stripe]`
    /// is configured), set at assembly once the Stripe side exists.
    pub billing: std::sync::OnceLock<Arc<dyn crate::billing::SelfService>>,
    /// Requests in flight and the drain at shutdown.
    pub lifecycle: Lifecycle,
    /// Connections still owing their first request head (`proxy.header_read_timeout`).
    pub heads: Arc<super::conn_cap::Heads>,
}

/// Requests in flight (a `Ctx` exists), when the last one ended, and how far a graceful stop
/// got: `draining` (`/readyz` answers 503 so load balancers move traffic away; requests are
/// still served, each answer closing its connection) and then `closing` (new requests are
/// answered 503 `shutting-down` while those in flight finish). The shutdown watch drives both.
#[derive(Debug)]
pub struct Lifecycle {
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` when the last request ended.
    last_done_ms: AtomicU64,
    epoch: Instant,
    draining: AtomicBool,
    closing: AtomicBool,
    /// The proxy listener has accepted a connection (`server` probes it at start).
    listening: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            listening: AtomicBool::new(false),
        }
    }
}

// === impl Lifecycle ===

impl Lifecycle {
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_done_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Nothing in flight, and nothing ended during the last `quiet` either (a client between
    /// two requests of a burst is not idle).
    pub fn idle_for(&self, quiet: Duration) -> bool {
        if self.in_flight() > 0 {
            return false;
        }
        let last = Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) >= quiet
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// From now on new requests are refused (503 `shutting-down`).
    pub fn start_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The proxy listener takes connections: `/readyz` may say 200.
    pub fn now_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }
}
