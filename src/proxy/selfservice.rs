//! Self-service usage on the proxy listener (issue 4): `GET /_tollgate/usage` with the caller's
//! own JWT answers their plan, status, current period and per-meter usage as JSON.
//!
//! The customer is the token's, never a parameter, so nobody can read another customer's usage.
//! The call is free: answered in `request_filter` before routing, it reserves nothing, charges
//! nothing and writes no ledger row (`logging` sees no route). A bad token is 401 exactly as on
//! any route. A suspended or lapsed customer still sees their usage (with `suspended` /
//! `effective_plan: null`): reading what was used helps them more than a bare 403 would.
//!
//! Each read costs a quota-store read per meter, so it has a limit of its own, per customer and
//! instance: [`Guard`] (10 a second, bursts of 20; a dashboard polls far less). Over it: 429
//! `rate-limited` with `Retry-After`.
//!
//! Owns: this path, its JSON shape and its read limit (the usage summary is `quota::usage_view`'s,
//! so operator and customer see the same numbers). Must not touch: reservations, the usage
//! pipeline, the admin listener.

use crate::entitle::Status;
use crate::entitle::{period_of, plan_of};
use crate::proxy::respond::Denial;
use crate::proxy::state::{Shared, Snapshot};
use crate::quota::usage_view::{usage, MeterUsage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Serialize;

/// The self-service path (reserved: a route with this path is never reached with GET).
pub const PATH: &str = "/_tollgate/usage";

/// Its route label in metrics and the access log (unlike a route's default name, its `match`
/// string, it has no method).
pub const ROUTE: &str = "_tollgate/usage";

/// Reads per second and burst per customer and instance.
const READS_PER_SECOND: u32 = 10;
const READ_BURST: u32 = 20;

/// The self-service read limit (governor's GCRA, keyed by customer).
pub struct Guard(governor::DefaultKeyedRateLimiter<String>);

impl Default for Guard {
    fn default() -> Guard {
        use std::num::NonZeroU32;
        let quota = governor::Quota::per_second(
            NonZeroU32::new(READS_PER_SECOND).unwrap_or(NonZeroU32::MIN),
        )
        .allow_burst(NonZeroU32::new(READ_BURST).unwrap_or(NonZeroU32::MIN));
        Guard(governor::RateLimiter::keyed(quota))
    }
}

impl Guard {
    /// `Err(seconds to wait)` when `customer` is over the limit.
    fn check(&self, customer: &str) -> Result<(), u64> {
        use governor::clock::Clock;
        self.0
            .check_key(&customer.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                wait.as_secs_f64().ceil().max(1.0) as u64
            })
    }
}

impl Guard {
    /// Forgets customers whose bucket is full again (off the request path: the counter
    /// maintenance task calls it with the plans' limiters).
    pub fn sweep(&self) {
        self.0.retain_recent();
    }
}

/// The caller of a self-service call: its verified token (401 as on any route), within the
/// per-customer limit (429 `rate-limited`).
pub(super) async fn caller(
    shared: &Shared,
    session: &Session,
) -> Result<crate::auth::Identity, Denial> {
    let identity = super::admit::authenticate(shared, session).await?;
    shared
        .self_service
        .check(&identity.customer)
        .map_err(|retry_after| Denial::RateLimited { retry_after })?;
    Ok(identity)
}

/// What [`handle`] did with a request.
pub enum Outcome {
    /// Not a self-service request: go on routing.
    NotMine,
    /// Answered (200 written).
    Served,
    /// Refused: the caller writes the denial as on any route.
    Denied(Denial),
}

#[derive(Serialize)]
struct Body<'a> {
    customer: &'a str,
    plan: Option<&'a str>,
    effective_plan: Option<&'a str>,
    status: Status,
    suspended: bool,
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    /// The subscription ends at `period_end`.
    cancel_at_period_end: bool,
    trial_end: Option<DateTime<Utc>>,
    usage: Vec<MeterUsage>,
}

/// Answers `GET /_tollgate/usage`; anything else is [`Outcome::NotMine`].
pub async fn handle(
    shared: &Shared,
    snap: &Snapshot,
    session: &mut Session,
    normalised_path: Option<&str>,
    request_id: &str,
) -> pingora::Result<Outcome> {
    let req = session.req_header();
    if req.method != Method::GET || normalised_path.unwrap_or(req.uri.path()) != PATH {
        return Ok(Outcome::NotMine);
    }
    let identity = match caller(shared, session).await {
        Ok(id) => id,
        Err(d) => return Ok(Outcome::Denied(d)),
    };
    let config = &snap.config;
    let ent = shared.entitlements.get(&identity.customer);
    let now = Utc::now();
    let period = period_of(ent.as_deref(), now);
    let plan = identity
        .plan
        .as_deref()
        .and_then(|p| config.plans.get(p))
        .or_else(|| plan_of(config, ent.as_deref()));
    let meters = match plan {
        Some(p) => {
            match usage(shared.store.as_ref(), &p.quotas, &identity.customer, period).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "self-service usage: quota store unavailable");
                    return Ok(Outcome::Denied(Denial::QuotaStoreUnavailable));
                }
            }
        }
        None => Vec::new(),
    };
    let effective = crate::entitle::resolve(config, ent.as_deref(), identity.plan.as_deref(), now)
        .ok()
        .map(|p| p.name.as_str());
    let body = Body {
        customer: &identity.customer,
        plan: plan.map(|p| p.name.as_str()),
        effective_plan: effective,
        status: ent.as_deref().map_or(Status::Active, |e| e.status),
        suspended: ent.as_deref().is_some_and(|e| e.suspended),
        period_start: DateTime::from_timestamp(period.start, 0),
        period_end: DateTime::from_timestamp(period.end, 0),
        cancel_at_period_end: ent.as_deref().is_some_and(|e| e.cancel_at_period_end),
        trial_end: ent.as_deref().and_then(|e| e.trial_end),
        usage: meters,
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    write_json(session, 200, Bytes::from(json), request_id).await?;
    Ok(Outcome::Served)
}

/// Writes a self-service answer: JSON, never cached (usage and billing state change with every
/// call), with the request id.
pub(super) async fn write_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    let mut head = ResponseHeader::build(status, Some(4))?;
    head.insert_header(CONTENT_TYPE, "application/json")?;
    head.insert_header(CONTENT_LENGTH, body.len())?;
    head.insert_header(CACHE_CONTROL, "no-store")?;
    head.insert_header(crate::proxy::REQUEST_ID_HEADER, request_id)?;
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(body), true).await
}
