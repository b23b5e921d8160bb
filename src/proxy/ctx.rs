//! Per-request state ([`Ctx`]): what one request's phases hand each other, from the config
//! snapshot it started with to the reservation it must settle.
//!
//! Owns: the request id, handing the ledger row to the usage pipeline, and the last-chance
//! record of a request cut off before it settled ([`Drop`]). Must not touch: the quota store
//! (settling is `settle`'s), HTTP writing.

use super::respond::Decision;
use super::state::{Shared, Snapshot};
use super::REQUEST_ID_HEADER;
use crate::config::Route;
use crate::ledger::UsageEvent;
use crate::quota::Period;
use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Instant;

/// A granted reservation, to settle after the upstream answered.
#[derive(Debug)]
pub(super) struct Reserved {
    /// The id of the request's ledger row (and of its journal line).
    pub id: uuid::Uuid,
    pub period: Period,
    pub units: u64,
    /// Period total including this charge.
    pub used: u64,
    /// `included` of a limited quota (for RateLimit headers), `None` when unlimited.
    pub included: Option<u64>,
    /// Charged in the local fallback because the quota store was down (fail-open).
    pub local: bool,
}

/// Per-request state.
pub struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) started: Instant,
    pub(super) snapshot: Option<Arc<Snapshot>>,
    pub(super) route: Option<usize>,
    /// For unmatched requests forwarded unmetered.
    pub(super) upstream: Option<String>,
    /// Answered (or refused) by self-service (`/_tollgate/*`): the route label it is counted and
    /// logged under (`_tollgate/usage`, `_tollgate/billing`), not as unmatched.
    pub(super) self_service: Option<&'static str>,
    pub(super) request_id: String,
    /// The client's address (behind `proxy.trusted_proxies`, from `X-Forwarded-For`).
    pub(super) client_ip: Option<std::net::IpAddr>,
    /// The normalised path, when it differs from the one sent (the upstream gets this one).
    pub(super) path: Option<String>,
    pub(super) customer: Option<String>,
    pub(super) reserved: Option<Reserved>,
    pub(super) decision: Decision,
    pub(super) upstream_status: Option<u16>,
    pub(super) upstream_failed: bool,
    /// The request head went to the upstream (`upstream_request_filter` ran).
    pub(super) forwarded: bool,
    /// Exact cost reported by the upstream, when the route asks for it and the value is valid.
    pub(super) actual_cost: Option<u64>,
    /// Wall-clock time the charge was decided at: the quota period was chosen by it, and the
    /// ledger row carries it, so both agree on the period even for a call that ends in the next.
    pub(super) arrived: Option<chrono::DateTime<chrono::Utc>>,
    /// The denial shadow mode waived (the last one, when several applied).
    pub(super) shadowed: Option<Decision>,
}

// === impl Ctx ===

impl Ctx {
    pub(super) fn new(shared: Arc<Shared>) -> Ctx {
        shared.lifecycle.started(); // ended in `Drop`
        Ctx {
            shared,
            started: Instant::now(),
            snapshot: None,
            route: None,
            upstream: None,
            self_service: None,
            client_ip: None,
            request_id: String::new(),
            path: None,
            customer: None,
            reserved: None,
            decision: Decision::Allowed,
            upstream_status: None,
            upstream_failed: false,
            forwarded: false,
            actual_cost: None,
            arrived: None,
            shadowed: None,
        }
    }

    pub(super) fn route<'s>(&self, snap: &'s Snapshot) -> Option<&'s Route> {
        self.route.map(|i| &snap.config.routes[i])
    }

    /// The upstream this request goes to: its route's, or the unmatched-forward one.
    pub(super) fn upstream<'s>(&'s self, snap: &'s Snapshot) -> Option<&'s str> {
        self.route(snap)
            .map(|r| r.upstream.as_str())
            .or(self.upstream.as_deref())
    }

    /// Hands the request's ledger row `id` to the usage pipeline. The request is over: its
    /// id and customer move into the event instead of being copied. `settled_differently`:
    /// the charge is not the reservation's (journaled, so a crash now recovers this row).
    pub(super) fn record_usage(
        &mut self,
        route: &Route,
        id: uuid::Uuid,
        units: u64,
        status: u16,
        settled_differently: bool,
    ) {
        let event = UsageEvent {
            id,
            ts: self.arrived.unwrap_or_else(chrono::Utc::now),
            customer: self.customer.take().unwrap_or_default(),
            meter: route.meter.clone(),
            // Costs are capped by the route's `max_cost` (≤ `i64::MAX`).
            units: i64::try_from(units).unwrap_or(i64::MAX),
            route: route.name.clone(),
            status,
            latency_us: self.started.elapsed().as_micros() as i64,
            request_id: std::mem::take(&mut self.request_id),
        };
        if settled_differently {
            if let Some(journal) = &self.shared.journal {
                journal.settled_differently(&event);
            }
        }
        // Counted by the pipeline itself (`tollgate_usage_events_total`, synced at scrape).
        self.shared.usage.record(event);
    }
}

/// A request that holds a reservation but never reaches `logging` (pingora drops in-flight
/// requests when the shutdown grace runs out) would leave a charge in the quota store with no
/// ledger row. Record it here: the upstream may have served it, so the charge is kept, and the
/// ledger agrees with the quota store. Status 0: no response was sent.
impl Drop for Ctx {
    fn drop(&mut self) {
        self.shared.lifecycle.ended();
        let Some(r) = self.reserved.take() else {
            return;
        };
        let Some(snap) = self.snapshot.clone() else {
            return;
        };
        let Some(route) = self.route(&snap) else {
            return;
        };
        tracing::warn!(request_id = %self.request_id, units = r.units, "request cut off before settling; charge recorded");
        self.record_usage(route, r.id, r.units, 0, false);
    }
}

/// The caller's `X-Request-Id` when it is sane (visible ASCII, ≤ 128 bytes), else a UUIDv7.
pub(super) fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get(REQUEST_ID_HEADER) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            if let Ok(s) = v.to_str() {
                return s.to_string();
            }
        }
    }
    let mut buf = uuid::Uuid::encode_buffer();
    (*uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf)).to_owned()
}
