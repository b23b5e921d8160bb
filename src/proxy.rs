//! The request path, top to bottom (DESIGN §2). Each step is a call into its own module; this
//! file only sequences them and carries per-request state in [`Ctx`].
//!
//! 1. route        `request_filter`: header size guard, (method, path) → route
//! 2. authenticate `request_filter`: bearer JWT → customer               (auth)
//! 3. entitle      `request_filter`: customer → plan, status policy      (entitle)
//! 4. gate         `request_filter`: the route's feature must be in the plan
//! 5. rate+reserve `request_filter`: one atomic call to the quota store  (quota)
//! 6. forward      `upstream_peer` / `upstream_request_filter`: pick a peer, set identity headers
//! 7. respond      `response_filter`: RateLimit headers, exact cost from the upstream header
//! 8. settle       `logging`: refund on upstream failure, adjust to the exact cost, usage event
//!
//! Denials are written here with our own `ResponseHeader` (not `respond_error`, which turns
//! keep-alive off) and never reach the upstream. Nothing here awaits the ledger or Stripe.

use crate::config::{Charge, Quota, Route, RouteAuth, Unmatched};
use crate::entitle::{self, Refusal};
use crate::ledger::UsageEvent;
use crate::quota::{Check, Period, QuotaStore, Verdict};
use crate::respond::{self, Decision, Denial};
use crate::state::{Shared, Snapshot};
use crate::usage::Recorded;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::sync::Arc;
use std::time::Instant;

pub const CUSTOMER_HEADER: &str = "x-tollgate-customer";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The proxy service: one per process, shared by all connections.
pub struct Proxy {
    pub shared: Arc<Shared>,
}

/// A granted reservation, to settle after the upstream answered.
#[derive(Debug)]
struct Reserved {
    period: Period,
    units: u64,
    /// Period total including this charge.
    used: u64,
    /// `included` of a limited quota (for RateLimit headers), `None` when unlimited.
    included: Option<u64>,
    /// Charged in the local fallback because the quota store was down (fail-open).
    local: bool,
}

/// Per-request state.
pub struct Ctx {
    shared: Arc<Shared>,
    started: Instant,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<usize>,
    /// For unmatched requests forwarded unmetered.
    upstream: Option<String>,
    request_id: String,
    customer: Option<String>,
    reserved: Option<Reserved>,
    decision: Decision,
    upstream_status: Option<u16>,
    upstream_failed: bool,
    /// The request head went to the upstream (`upstream_request_filter` ran).
    forwarded: bool,
    /// Exact cost reported by the upstream, when the route asks for it and the value is valid.
    actual_cost: Option<u64>,
    /// Wall-clock time the charge was decided at: the quota period was chosen by it, and the
    /// ledger row carries it, so both agree on the period even for a call that ends in the next.
    arrived: Option<chrono::DateTime<chrono::Utc>>,
    /// The denial shadow mode waived (the last one, when several applied).
    shadowed: Option<Decision>,
}

impl Ctx {
    fn route<'s>(&self, snap: &'s Snapshot) -> Option<&'s Route> {
        self.route.map(|i| &snap.config.routes[i])
    }

    /// Hands the request's ledger row to the usage pipeline. The request is over: its id and
    /// customer move into the event instead of being copied.
    fn record_usage(&mut self, route: &Route, units: u64, status: u16) {
        let event = UsageEvent {
            id: uuid::Uuid::now_v7(),
            ts: self.arrived.unwrap_or_else(chrono::Utc::now),
            customer: self.customer.take().unwrap_or_default(),
            meter: route.meter.clone(),
            units: units as i64,
            route: route.name.clone(),
            status,
            latency_us: self.started.elapsed().as_micros() as i64,
            request_id: std::mem::take(&mut self.request_id),
        };
        let m = &self.shared.metrics;
        match self.shared.usage.record(event) {
            Recorded::Queued => m.usage_queued.inc(),
            Recorded::Spooled => m.usage_spooled.inc(),
            Recorded::Lost => m.usage_lost.inc(),
        }
    }
}

/// A request that holds a reservation but never reaches `logging` (pingora drops in-flight
/// requests when the shutdown grace runs out) would leave a charge in the quota store with no
/// ledger row. Record it here: the upstream may have served it, so the charge is kept, and the
/// ledger agrees with the quota store. Status 0: no response was sent.
impl Drop for Ctx {
    fn drop(&mut self) {
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
        self.record_usage(route, r.units, 0);
    }
}

// === impl Proxy ===

impl Proxy {
    /// Writes a denial (problem+json) and ends the request without contacting the upstream.
    async fn deny(&self, session: &mut Session, ctx: &mut Ctx, denial: Denial) -> Result<bool> {
        ctx.decision = denial.decision();
        write_problem(session, &denial, &ctx.request_id).await?;
        Ok(true)
    }

    /// Steps 2–5 for a metered route. `Ok(None)` = go on and forward.
    async fn admit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        snap: &Snapshot,
        route: &Route,
    ) -> Option<Denial> {
        // 2. authenticate
        let authorization = session
            .req_header()
            .headers
            .get(AUTHORIZATION)
            .map(|v| v.as_bytes());
        let identity = match self.shared.verifier.verify(authorization).await {
            Ok(id) => id,
            Err(e) => {
                return Some(Denial::InvalidToken {
                    description: e.description(),
                    missing: e.is_missing(),
                })
            }
        };

        // 3. entitle
        let ent = self.shared.entitlements.get(&identity.customer);
        let now = chrono::Utc::now();
        ctx.arrived = Some(now);
        let plan =
            match entitle::resolve(&snap.config, ent.as_deref(), identity.plan.as_deref(), now) {
                Ok(p) => p,
                Err(Refusal::Suspended) => return Some(Denial::Suspended),
                Err(Refusal::PaymentRequired(status)) => {
                    return Some(Denial::PaymentRequired { status })
                }
            };
        ctx.customer = Some(identity.customer);
        let customer = ctx.customer.as_deref().unwrap_or_default();

        // Shadow mode: plan decisions are computed and counted, not enforced.
        let shadow = route.shadow || plan.shadow;
        let mut shadowed = None;

        // 4. gate
        if let Some(feature) = &route.feature {
            if !plan.features.contains(feature) {
                let denial = Denial::FeatureNotInPlan {
                    feature: feature.clone(),
                    plan: plan.name.clone(),
                };
                if !shadow {
                    return Some(denial);
                }
                shadowed = Some(waive(ctx, snap, route, &denial));
            }
        }

        // 5. rate + reserve, in one call to the quota store
        let quota = plan
            .quotas
            .get(&route.meter)
            .copied()
            .unwrap_or(Quota::Unlimited);
        let (cap, included) = match quota {
            Quota::Unlimited => (None, None),
            Quota::Limited {
                included,
                overage: false,
                ..
            } => (Some(included), Some(included)),
            Quota::Limited {
                included,
                overage: true,
                ..
            } => (None, Some(included)),
        };
        let period = ent.as_deref().map_or_else(
            || Period::calendar_month(now),
            |e| Period::current(e.period_start, e.period_end, now),
        );
        let check = Check {
            customer,
            meter: &route.meter,
            period,
            cost: route.cost,
            cap,
            rate: plan.rate,
        };
        let (mut verdict, local) = match self.reserve(&check, plan.fail_mode).await {
            Ok(v) => v,
            Err(denial) => return Some(denial),
        };
        let now_s = now.timestamp();
        let denial = match verdict {
            Verdict::Granted { .. } => None,
            Verdict::OverQuota { used } => Some(Denial::QuotaExceeded {
                meter: route.meter.clone(),
                limit: included.unwrap_or(0),
                used,
                cost: route.cost,
                resets_at: period.end,
                retry_after: period.seconds_left(now_s),
                window: period.length(),
            }),
            Verdict::RateLimited { retry_after_ms } => Some(Denial::RateLimited {
                retry_after: retry_after_ms.div_ceil(1000).max(1),
            }),
        };
        if let Some(denial) = denial {
            if !shadow {
                return Some(denial);
            }
            // The call goes ahead, so it is charged: past the cap and the rate, in the same store.
            shadowed = Some(waive(ctx, snap, route, &denial));
            let anyway = Check {
                cap: None,
                rate: None,
                ..check
            };
            let store = if local {
                self.shared.fallback.as_ref() as &dyn QuotaStore
            } else {
                self.shared.store.as_ref()
            };
            verdict = match store.reserve(&anyway).await {
                Ok(v) => v,
                Err(e) => {
                    self.shared.metrics.quota_store_errors.inc();
                    tracing::warn!(error = %e, "quota store unavailable");
                    return Some(Denial::QuotaStoreUnavailable);
                }
            };
        }
        let Verdict::Granted { used } = verdict else {
            // An uncapped, unrated reservation is always granted.
            return Some(Denial::QuotaStoreUnavailable);
        };
        if let Some(alerts) = &self.shared.alerts {
            alerts.on_charge(plan, customer, &route.meter, period, route.cost, used);
        }
        ctx.reserved = Some(Reserved {
            period,
            units: route.cost,
            used,
            included,
            local,
        });
        ctx.shadowed = shadowed;
        None
    }

    /// One reservation in the quota store, or in the local fallback when the store is down and
    /// the plan fails open. The bool is true when the fallback took it.
    async fn reserve(
        &self,
        check: &Check<'_>,
        fail_mode: crate::config::FailMode,
    ) -> Result<(Verdict, bool), Denial> {
        let started = Instant::now();
        let result = match self.shared.store.reserve(check).await {
            Ok(v) => Ok((v, false)),
            Err(e) => {
                self.shared.metrics.quota_store_errors.inc();
                tracing::warn!(error = %e, "quota store unavailable");
                match fail_mode {
                    crate::config::FailMode::Closed => Err(Denial::QuotaStoreUnavailable),
                    crate::config::FailMode::Open => {
                        match self.shared.fallback.reserve(check).await {
                            Ok(v) => Ok((v, true)),
                            Err(_) => Err(Denial::QuotaStoreUnavailable),
                        }
                    }
                }
            }
        };
        self.shared
            .metrics
            .quota_store_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn store_for(&self, r: &Reserved) -> &dyn QuotaStore {
        if r.local {
            self.shared.fallback.as_ref()
        } else {
            self.shared.store.as_ref()
        }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            shared: self.shared.clone(),
            started: Instant::now(),
            snapshot: None,
            route: None,
            upstream: None,
            request_id: String::new(),
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

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snap = self.shared.snapshot.load_full();
        ctx.snapshot = Some(snap.clone());
        ctx.request_id = request_id(session.req_header());

        // An oversized head is refused before anything parses it (the upstream never sees it).
        let limit = snap.config.proxy.max_request_header_bytes;
        let head_bytes: usize = session
            .req_header()
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if head_bytes > limit {
            session.set_keepalive(None);
            return self
                .deny(session, ctx, Denial::HeaderTooLarge { limit })
                .await;
        }

        // Self-service usage (`GET /_tollgate/usage`): free, answered here, never forwarded.
        match crate::selfservice::handle(&self.shared, &snap, session, &ctx.request_id).await? {
            crate::selfservice::Outcome::NotMine => {}
            crate::selfservice::Outcome::Served => {
                ctx.decision = Decision::Unmetered;
                return Ok(true);
            }
            crate::selfservice::Outcome::Denied(d) => return self.deny(session, ctx, d).await,
        }

        // 1. route
        let req = session.req_header();
        ctx.route = snap.router.find(&req.method, req.uri.path());
        let Some(route) = ctx.route(&snap) else {
            return match &snap.config.proxy.unmatched {
                Unmatched::Deny => self.deny(session, ctx, Denial::NoRoute).await,
                Unmatched::Forward { upstream } => {
                    ctx.upstream = Some(upstream.clone());
                    ctx.decision = Decision::Unmetered;
                    Ok(false)
                }
            };
        };
        if route.auth == RouteAuth::Public {
            ctx.decision = Decision::Unmetered;
            return Ok(false);
        }

        // 2–5
        if let Some(denial) = self.admit(session, ctx, &snap, route).await {
            // Unread request bodies would corrupt the next request on this connection.
            if !session.is_body_empty() {
                session.set_keepalive(None);
            }
            return self.deny(session, ctx, denial).await;
        }
        Ok(false)
    }

    // 6. forward
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let snap = ctx
            .snapshot
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no config snapshot"))?;
        let name = match (ctx.route(&snap), &ctx.upstream) {
            (Some(r), _) => r.upstream.as_str(),
            (None, Some(u)) => u.as_str(),
            (None, None) => {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "no upstream chosen",
                ))
            }
        };
        let pool = snap
            .pools
            .get(name)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "unknown upstream"))?;
        let backend = pool
            .lb
            .select(ctx.request_id.as_bytes(), 256)
            .ok_or_else(|| {
                Error::explain(ErrorType::ConnectNoRoute, "no healthy upstream target")
            })?;
        Ok(Box::new(HttpPeer::new(backend.addr, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Never let a caller assert its own identity to the upstream.
        up.remove_header(CUSTOMER_HEADER);
        if let Some(c) = &ctx.customer {
            up.insert_header(CUSTOMER_HEADER, c.as_str())?;
        }
        up.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        ctx.forwarded = true;
        if let Some(snap) = &ctx.snapshot {
            if snap.config.proxy.strip_authorization && ctx.customer.is_some() {
                up.remove_header(&AUTHORIZATION);
            }
            let upstream = ctx
                .route(snap)
                .map(|r| r.upstream.as_str())
                .or(ctx.upstream.as_deref());
            if let Some(host) = upstream
                .and_then(|u| snap.pools.get(u))
                .and_then(|p| p.host.as_deref())
            {
                up.insert_header(HOST, host)?;
            }
        }
        let _ = session;
        Ok(())
    }

    // 7. respond
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        let Some(snap) = ctx.snapshot.clone() else {
            return Ok(());
        };
        let Some(route) = ctx.route(&snap) else {
            return Ok(());
        };
        let Some(r) = &ctx.reserved else {
            return Ok(());
        };
        if let Some(h) = &route.cost_from_response_header {
            if let Some(v) = resp.headers.get(h) {
                match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                    Some(actual) => ctx.actual_cost = Some(actual),
                    None => self.shared.metrics.cost_header_invalid.inc(),
                }
            }
        }
        if let Some(included) = r.included {
            let used = match ctx.actual_cost {
                Some(actual) => (r.used + actual).saturating_sub(r.units),
                None => r.used,
            };
            let now = chrono::Utc::now().timestamp();
            for (k, v) in respond::rate_limit_headers(
                &route.meter,
                included,
                included.saturating_sub(used),
                r.period.length(),
                r.period.seconds_left(now),
            ) {
                resp.insert_header(k, v)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if *e.esource() == ErrorSource::Downstream {
            // The client hung up. Not an upstream failure: once the request went upstream, the
            // upstream did (or began) the work and the charge stands, or hanging up would make
            // calls free. Before that nothing happened: settled like an upstream failure.
            ctx.decision = Decision::ClientClosed;
            ctx.upstream_failed = !ctx.forwarded;
            tracing::info!(request_id = %ctx.request_id, error = %e, forwarded = ctx.forwarded, "client closed the connection");
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if ctx.upstream_status.is_none() {
            ctx.upstream_failed = true;
        }
        ctx.decision = Decision::UpstreamUnavailable;
        tracing::warn!(request_id = %ctx.request_id, error = %e, "upstream failed");
        let mut code = 0;
        if session.response_written().is_none() {
            code = 502;
            if let Err(e) =
                write_problem(session, &Denial::UpstreamUnavailable, &ctx.request_id).await
            {
                tracing::debug!(error = %e, "could not write 502");
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    // 8. settle
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let Some(snap) = ctx.snapshot.clone() else {
            return;
        };
        let route = ctx.route(&snap);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let latency = ctx.started.elapsed();

        // Refund on upstream failure (charge = "success"), or adjust to the exact cost.
        let mut charged = None;
        let reserved = ctx.reserved.take(); // settled here, so `Drop for Ctx` has nothing to do
        if let (Some(r), Some(route)) = (&reserved, route) {
            let failed = ctx.upstream_failed || ctx.upstream_status.is_some_and(|s| s >= 500);
            let units = if failed && route.charge == Charge::Success {
                0
            } else {
                ctx.actual_cost.unwrap_or(r.units)
            };
            let delta = units as i64 - r.units as i64;
            if delta != 0 {
                let customer = ctx.customer.as_deref().unwrap_or_default();
                if let Err(e) = self
                    .store_for(r)
                    .adjust(customer, &route.meter, r.period, delta)
                    .await
                {
                    // The ledger row below still records what was charged.
                    self.shared.metrics.quota_store_errors.inc();
                    tracing::warn!(error = %e, request_id = %ctx.request_id, delta, "could not settle reservation");
                }
            }
            charged = Some(units);
        }

        let m = match ctx.route {
            Some(i) => &snap.route_metrics[i],
            None => &snap.unmatched_metrics,
        };
        m.requests[ctx.decision.index()].inc();
        m.duration.observe(latency.as_secs_f64());
        tracing::info!(
            target: "tollgate::access",
            request_id = %ctx.request_id,
            customer = ctx.customer.as_deref().unwrap_or("-"),
            route = route.map_or("-", |r| r.name.as_str()),
            decision = ctx.decision.as_str(),
            shadow = ctx.shadowed.map_or("-", Decision::as_str),
            cost = charged.unwrap_or(0),
            status,
            upstream_status = ctx.upstream_status.unwrap_or(0),
            latency_us = latency.as_micros() as u64,
        );

        // One ledger row per forwarded request, with the units finally charged.
        if let (Some(units), Some(route)) = (charged, route) {
            ctx.record_usage(route, units, ctx.upstream_status.unwrap_or(status));
        }
    }
}

/// Shadow mode: counts and logs the denial that was not enforced; returns its decision (for the
/// access log).
fn waive(ctx: &Ctx, snap: &Snapshot, route: &Route, denial: &Denial) -> Decision {
    let decision = denial.decision();
    if let Some(Some(c)) = ctx
        .route
        .and_then(|i| snap.route_metrics.get(i))
        .map(|m| &m.shadow[decision.index()])
    {
        c.inc();
    }
    tracing::info!(
        target: "tollgate::shadow",
        request_id = %ctx.request_id,
        customer = ctx.customer.as_deref().unwrap_or("-"),
        route = route.name.as_str(),
        decision = decision.as_str(),
        "shadow mode: forwarded a request the plan would deny"
    );
    decision
}

/// The caller's `X-Request-Id` when it is sane (visible ASCII, ≤ 128 bytes), else a UUIDv7.
fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get(REQUEST_ID_HEADER) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            if let Ok(s) = v.to_str() {
                return s.to_string();
            }
        }
    }
    uuid::Uuid::now_v7().to_string()
}

async fn write_problem(session: &mut Session, denial: &Denial, request_id: &str) -> Result<()> {
    let r = denial.render(Some(request_id));
    let mut head = ResponseHeader::build(r.status, Some(r.headers.len() + 1))?;
    for (k, v) in r.headers {
        head.insert_header(k, v)?;
    }
    head.insert_header(REQUEST_ID_HEADER, request_id)?;
    session.write_response_header(Box::new(head), false).await?;
    session
        .write_response_body(Some(Bytes::from(r.body)), true)
        .await?;
    Ok(())
}
