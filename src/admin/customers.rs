//! The customer admin API (issue 4), on the admin listener behind the admin bearer token:
//!
//! | call | does |
//! | --- | --- |
//! | `GET /admin/customers/{id}` | plan, status, period, suspension and per-meter usage this period |
//! | `GET /admin/customers?over_limit=true&near_limit=0.8&limit=&after=` | customers near or over a limit |
//! | `POST /admin/customers/{id}/suspend`, `/resume` | operator suspension (403 `suspended` on the proxy) |
//! | `POST /admin/customers/{id}/credit` | `{meter, units, reason}`: gives units back for this period |
//!
//! Usage comes from the quota store (the real-time truth), for the customer's current period.
//! Overage money is integer micros: overage units × the plan's `unit_price_micros`.
//!
//! A customer is *known* when the ledger has their entitlement row or the quota store has usage
//! for them this period; reads and credits of anyone else answer 404 `unknown-customer`.
//!
//! Owns: these HTTP shapes and the customer view. Must not touch: the usage summary itself
//! (`quota::usage_view`, also served to customers by self-service), entitlement writes and
//! their audit rows (`control::entitlement_sync::EntitlementSync::write`: ledger, in-process
//! cache, audit, broadcast), the error mapping (`admin::error`).

use crate::admin::error::{AdminError, Problem, Unknown};
use crate::admin::extract::{json_body, CustomerId, Intent};
use crate::admin::{audit, AdminState};
use crate::control::entitlement_sync::{Audit, LedgerWrite};
use crate::entitle::{period_of, plan_of};
use crate::entitle::{Entitlement, Status};
use crate::quota::usage_view::{usage, MeterUsage};
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Default and largest page of `GET /admin/customers`.
const PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// The customer routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/customers", get(list_customers))
        .route("/admin/customers/{id}/suspend", post(suspend))
        .route("/admin/customers/{id}/resume", post(resume))
        .route("/admin/customers/{id}/credit", post(credit))
}

fn rfc3339(t: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t, 0)
}

/// `GET /admin/customers/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CustomerView {
    id: String,
    /// The stored plan; `None` means the default plan (as in `PUT /admin/customers/{id}`).
    plan: Option<String>,
    /// The plan whose quotas `usage` is measured against: the stored plan if the config knows
    /// it, else the default plan.
    quota_plan: Option<String>,
    /// The plan requests are served under now; `None` when they are refused (suspended,
    /// not in good standing).
    effective_plan: Option<String>,
    status: Status,
    status_since: Option<DateTime<Utc>>,
    suspended: bool,
    /// The ledger has an entitlement row for the customer.
    stored: bool,
    /// The current quota period `[start, end)`.
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    /// The subscription ends at the billing period's end (Stripe's `cancel_at_period_end`).
    cancel_at_period_end: bool,
    /// End of the subscription's trial, if it had one (Stripe's `trial_end`).
    trial_end: Option<DateTime<Utc>>,
    usage: Vec<MeterUsage>,
}

/// The view of one customer given their stored entitlement (if any); `unknown-customer` when
/// there is neither an entitlement nor usage this period.
async fn view_of(
    s: &AdminState,
    id: &str,
    ent: Option<&Entitlement>,
) -> Result<CustomerView, AdminError> {
    let snap = s.shared.snapshot.load_full();
    let config = &snap.config;
    let now = Utc::now();
    let period = period_of(ent, now);
    let plan = plan_of(config, ent);
    let usage = match plan {
        Some(p) => usage(s.store.as_ref(), &p.quotas, id, period).await?,
        None => Vec::new(),
    };
    if ent.is_none() && usage.iter().all(|m| m.used == 0) {
        return Err(AdminError::unknown_customer(id, Unknown::ThisPeriod));
    }
    let effective = crate::entitle::resolve(config, ent, None, now).ok();
    Ok(CustomerView {
        id: id.to_string(),
        plan: ent.and_then(|e| e.plan.clone()),
        quota_plan: plan.map(|p| p.name.clone()),
        effective_plan: effective.map(|p| p.name.clone()),
        status: ent.map_or(Status::Active, |e| e.status),
        status_since: ent.and_then(|e| e.status_since),
        cancel_at_period_end: ent.is_some_and(|e| e.cancel_at_period_end),
        trial_end: ent.and_then(|e| e.trial_end),
        suspended: ent.is_some_and(|e| e.suspended),
        stored: ent.is_some(),
        period_start: rfc3339(period.start),
        period_end: rfc3339(period.end),
        usage,
    })
}

/// `GET /admin/customers/{id}`.
#[utoipa::path(
    get,
    path = "/admin/customers/{id}",
    tag = "customers",
    params(("id" = String, Path, description = "the customer id")),
    responses(
        (status = 400, description = "`invalid-customer-id`: the id breaks the customer id rule", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "plan, status, period and per-meter usage this period", body = CustomerView),
        (status = 404, description = "`unknown-customer`: no entitlement and no usage this period", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger or the quota store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn get_customer(
    State(s): State<AdminState>,
    CustomerId(id): CustomerId,
) -> Result<Json<CustomerView>, AdminError> {
    let ent = s.ledger.get_customer(&id).await?;
    Ok(Json(view_of(&s, &id, ent.as_ref()).await?))
}

/// The filter of `GET /admin/customers`: a customer matches when any limited meter matches
/// any given condition (no condition: everyone).
#[derive(Debug, Default, PartialEq, Eq)]
struct Filter {
    over_limit: bool,
    /// `near_limit` in basis points of `included` (0.8 → 8000).
    near_limit: Option<u64>,
}

// === impl Filter ===

impl Filter {
    fn matches(&self, usage: &[MeterUsage]) -> bool {
        if !self.over_limit && self.near_limit.is_none() {
            return true;
        }
        usage
            .iter()
            .any(|m| (self.over_limit && m.over()) || self.near_limit.is_some_and(|bp| m.near(bp)))
    }
}

/// A decimal fraction `0 ≤ x ≤ 1` with at most 4 decimals, in basis points, without floats.
fn basis_points(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if frac.len() > 4 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..4 {
        f *= 10;
    }
    let bp = int.checked_mul(10_000)?.checked_add(f)?;
    (bp <= 10_000).then_some(bp)
}

/// Answer of `GET /admin/customers`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CustomerPage {
    customers: Vec<CustomerView>,
    /// `after` of the next page; null on the last.
    next: Option<String>,
}

/// `GET /admin/customers`: known customers (as [`get_customer`] knows them), by id, paged with
/// `after` (the last id of the previous page) and `limit`; `next` is the `after` of the next
/// page.
///
/// Known customers are those with an entitlement row, plus those without one who have usage
/// this period: on the default plan (`plan: null`), in the calendar month. Who the latter are
/// comes from the ledger ([`crate::ledger::UsageLedger::customers_with_usage`], one query per
/// meter of the default plan, index seeks per customer, no scan of the rows), and how much they
/// used from the quota store, as for everyone listed. The quota stores cannot say who holds a
/// counter as cheaply: Redis only by `SCAN`ning its whole keyspace (on every node of a
/// Cluster), and the ledger serves both backends alike. The price: a customer whose only calls
/// are still on their way to the ledger (at most a flush interval, `storage.usage_flush_ms`, or
/// while it is down and rows wait in the spool) is listed once they arrive.
#[utoipa::path(
    get,
    path = "/admin/customers",
    tag = "customers",
    params(
        ("over_limit" = Option<bool>, Query, description = "only customers with a limited meter used up"),
        ("near_limit" = Option<String>, Query, description = "only customers with a limited meter at or past this fraction of `included` (0-1, at most 4 decimals, e.g. `0.8`)"),
        ("limit" = Option<usize>, Query, description = "page size, 1-500 (default 50)"),
        ("after" = Option<String>, Query, description = "the `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "one page of customers, by id", body = CustomerPage),
        (status = 400, description = "a bad `over_limit`, `near_limit` or `limit`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger or the quota store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list_customers(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CustomerPage>, AdminError> {
    let mut filter = Filter::default();
    match q.get("over_limit").map(String::as_str) {
        None | Some("false") => {}
        Some("true") => filter.over_limit = true,
        Some(o) => {
            return Err(AdminError::InvalidQuery(format!(
                "over_limit must be true or false, got {o:?}"
            )))
        }
    }
    if let Some(n) = q.get("near_limit") {
        let bp = basis_points(n).ok_or_else(|| {
            AdminError::InvalidQuery(format!(
                "near_limit must be a fraction from 0 to 1 with at most 4 decimals, got {n:?}"
            ))
        })?;
        filter.near_limit = Some(bp);
    }
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => PAGE,
        Some(Ok(l)) if (1..=MAX_PAGE).contains(&l) => l,
        Some(_) => {
            return Err(AdminError::InvalidQuery(format!(
                "limit must be an integer from 1 to {MAX_PAGE}"
            )))
        }
    };
    let after = q.get("after").cloned().unwrap_or_default();
    let mut all: Vec<(String, Option<Entitlement>)> = s
        .ledger
        .all_customers()
        .await?
        .into_iter()
        .map(|(id, ent)| (id, Some(ent)))
        .collect();
    all.extend(
        unstored_with_usage(&s, &all)
            .await?
            .into_iter()
            .map(|id| (id, None)),
    );
    // Byte order, the order `after` compares in (a database collation may order differently).
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut page = Vec::new();
    let mut next = None;
    for (id, ent) in all.iter().filter(|(id, _)| id.as_str() > after.as_str()) {
        let v = match view_of(&s, id, ent.as_ref()).await {
            Ok(v) => v,
            // Ledger rows but nothing left on the counters (refunded, credited back).
            Err(AdminError::UnknownCustomer { .. }) if ent.is_none() => continue,
            Err(e) => return Err(e),
        };
        if !filter.matches(&v.usage) {
            continue;
        }
        if page.len() == limit {
            next = page.last().map(|v: &CustomerView| v.id.clone());
            break;
        }
        page.push(v);
    }
    Ok(Json(CustomerPage {
        customers: page,
        next,
    }))
}

/// Customers with ledger rows this calendar month in a meter of the default plan and no
/// entitlement row (`stored` holds those with one): the ones that plan measures.
async fn unstored_with_usage(
    s: &AdminState,
    stored: &[(String, Option<Entitlement>)],
) -> Result<Vec<String>, AdminError> {
    let snap = s.shared.snapshot.load_full();
    let Some(plan) = snap.config.default_plan() else {
        return Ok(Vec::new());
    };
    let month = period_of(None, Utc::now());
    let (Some(from), Some(to)) = (rfc3339(month.start), rfc3339(month.end)) else {
        return Ok(Vec::new());
    };
    let stored: std::collections::HashSet<&str> =
        stored.iter().map(|(id, _)| id.as_str()).collect();
    let mut found = std::collections::BTreeSet::new();
    for meter in plan.quotas.keys() {
        for id in s.ledger.customers_with_usage(meter, from, to).await? {
            if !stored.contains(id.as_str()) {
                found.insert(id);
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// Body of `PUT /admin/customers/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomerPut {
    /// A plan of the config; absent or null: the default plan.
    plan: Option<String>,
    /// Subscription status (Stripe's spelling); absent: `active`.
    #[serde(default)]
    #[schema(value_type = Option<Status>)]
    status: Option<String>,
    /// Billing period start; give both ends or neither (then the calendar month, UTC).
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    /// Operator suspension: the proxy answers 403 `suspended`.
    #[serde(default)]
    suspended: bool,
    /// When the status began (defaults to now when the status changes).
    status_since: Option<DateTime<Utc>>,
    /// The subscription ends at `period_end` (informational, as from Stripe).
    #[serde(default)]
    cancel_at_period_end: bool,
    /// End of the trial (informational, as from Stripe).
    trial_end: Option<DateTime<Utc>>,
}

/// Sets a customer's entitlement (plan, status, period, suspension); audited and broadcast to
/// every instance.
#[utoipa::path(
    put,
    path = "/admin/customers/{id}",
    tag = "customers",
    params(("id" = String, Path, description = "the customer id (the JWT's customer claim)")),
    request_body = CustomerPut,
    responses(
        (status = 200, description = "the stored entitlement", body = Entitlement),
        (status = 400, description = "not JSON, an unknown field, an unknown plan or status, or a bad period, or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn put_customer(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
    body: axum::body::Bytes,
) -> Result<Json<Entitlement>, AdminError> {
    let put: CustomerPut = json_body(&body)?;
    let snap = s.shared.snapshot.load_full();
    let mut errors = Vec::new();
    if let Some(p) = &put.plan {
        if !snap.config.plans.contains_key(p) {
            errors.push(format!("plan: unknown plan {p:?}"));
        }
    }
    let status = match put.status.as_deref() {
        None => Status::Active,
        Some(st) => Status::parse(st).unwrap_or_else(|| {
            errors.push(format!("status: unknown status {st:?}"));
            Status::Active
        }),
    };
    match (put.period_start, put.period_end) {
        (Some(a), Some(b)) if a >= b => {
            errors.push("period_end: must be after period_start".into())
        }
        (Some(_), None) | (None, Some(_)) => {
            errors.push("period_start/period_end: give both or neither".into())
        }
        _ => {}
    }
    if !errors.is_empty() {
        return Err(AdminError::InvalidBody(errors.join("; ")));
    }
    let now = Utc::now();
    let previous = s.ledger.get_customer(&id).await.ok().flatten();
    let status_since = put.status_since.or_else(|| match &previous {
        Some(p) if p.status == status => p.status_since,
        _ => Some(now),
    });
    let ent = Entitlement {
        plan: put.plan,
        status,
        status_since,
        period_start: put.period_start,
        period_end: put.period_end,
        suspended: put.suspended,
        updated_at: now,
        cancel_at_period_end: put.cancel_at_period_end,
        trial_end: put.trial_end,
    };
    store_entitlement(&s, &intent, &id, "customer.put", previous.as_ref(), &ent).await?;
    tracing::info!(customer = %id, plan = ent.plan.as_deref(), status = ent.status.as_str(), suspended = ent.suspended, "entitlement set");
    Ok(Json(ent))
}

/// Writes a changed entitlement through the one entitlement writer (ledger, local cache, audit
/// by the caller's actor, broadcast to the other instances).
async fn store_entitlement(
    s: &AdminState,
    intent: &Intent,
    id: &str,
    action: &str,
    previous: Option<&Entitlement>,
    ent: &Entitlement,
) -> Result<(), AdminError> {
    let audit = Audit {
        actor: intent.actor(),
        action,
        target: format!("customers/{id}"),
        before: previous,
    };
    s.entitlements
        .write(id, LedgerWrite::Replace(ent), Some(audit))
        .await?;
    Ok(())
}

/// `POST /admin/customers/{id}/suspend`: creates the entitlement row when there is none (an
/// operator may block an id before it ever calls, e.g. a leaked token).
#[utoipa::path(
    post,
    path = "/admin/customers/{id}/suspend",
    tag = "customers",
    params(("id" = String, Path, description = "the customer id")),
    responses(
        (status = 400, description = "`invalid-customer-id`: the id breaks the customer id rule", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "suspended: the proxy answers 403 `suspended`", body = CustomerView),
        (status = 503, description = "the ledger or the quota store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn suspend(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
) -> Result<Json<CustomerView>, AdminError> {
    set_suspended(s, intent, id, true).await
}

/// `POST /admin/customers/{id}/resume`: 404 for a customer without an entitlement row.
#[utoipa::path(
    post,
    path = "/admin/customers/{id}/resume",
    tag = "customers",
    params(("id" = String, Path, description = "the customer id")),
    responses(
        (status = 400, description = "`invalid-customer-id`: the id breaks the customer id rule", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "no longer suspended", body = CustomerView),
        (status = 404, description = "`unknown-customer`: no entitlement row", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger or the quota store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn resume(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
) -> Result<Json<CustomerView>, AdminError> {
    set_suspended(s, intent, id, false).await
}

async fn set_suspended(
    s: AdminState,
    intent: Intent,
    id: String,
    suspended: bool,
) -> Result<Json<CustomerView>, AdminError> {
    let previous = s.ledger.get_customer(&id).await?;
    let now = Utc::now();
    let mut ent = match (&previous, suspended) {
        (Some(p), _) => p.clone(),
        (None, true) => Entitlement {
            plan: None,
            status: Status::Active,
            status_since: Some(now),
            period_start: None,
            period_end: None,
            suspended: false,
            updated_at: now,
            cancel_at_period_end: false,
            trial_end: None,
        },
        (None, false) => return Err(AdminError::unknown_customer(&id, Unknown::ThisPeriod)),
    };
    ent.suspended = suspended;
    // Strictly newer than what the caches hold, so the change wins everywhere.
    ent.updated_at = now.max(ent.updated_at + chrono::Duration::microseconds(1));
    let action = if suspended {
        "customer.suspend"
    } else {
        "customer.resume"
    };
    store_entitlement(&s, &intent, &id, action, previous.as_ref(), &ent).await?;
    tracing::info!(customer = %id, suspended, "customer suspension set");
    Ok(Json(view_of(&s, &id, Some(&ent)).await?))
}

/// Body of `POST /admin/customers/{id}/credit`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credit {
    /// A meter of the customer's plan.
    meter: String,
    /// Units to give back this period (≥ 1; the counter never goes below 0).
    #[schema(minimum = 1)]
    units: u64,
    /// Why (1-500 characters), kept in the audit log.
    reason: String,
}

/// Answer of `POST /admin/customers/{id}/credit`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreditAnswer {
    customer: String,
    meter: String,
    units: u64,
    /// The meter's counter this period, before and after the credit.
    used_before: u64,
    used_after: u64,
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
}

/// `POST /admin/customers/{id}/credit`: lowers the customer's counter for `meter` this period by
/// `units` (never below 0, so a credit cannot bank units for later), audited with the counter
/// before and after. The ledger keeps what was charged; the audit row explains the difference.
#[utoipa::path(
    post,
    path = "/admin/customers/{id}/credit",
    tag = "customers",
    params(("id" = String, Path, description = "the customer id")),
    request_body = Credit,
    responses(
        (status = 200, description = "the counter before and after", body = CreditAnswer),
        (status = 400, description = "not JSON, an unknown field, a meter not in the plan, zero units or a bad reason, or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-customer`: no entitlement and no usage this period", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger or the quota store is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn credit(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
    body: axum::body::Bytes,
) -> Result<Json<CreditAnswer>, AdminError> {
    let c: Credit = json_body(&body)?;
    let mut errors = Vec::new();
    if c.units == 0 || c.units > i64::MAX as u64 {
        errors.push("units: must be an integer ≥ 1".to_string());
    }
    if c.reason.trim().is_empty() || c.reason.len() > 500 {
        errors.push("reason: must be 1-500 characters".to_string());
    }
    let ent = s.ledger.get_customer(&id).await?;
    let before = view_of(&s, &id, ent.as_ref()).await?;
    let meter = before.usage.iter().find(|m| m.meter == c.meter);
    if meter.is_none() {
        errors.push(format!(
            "meter: {:?} is not a meter of the customer's plan",
            c.meter
        ));
    }
    let (Some(meter), true) = (meter, errors.is_empty()) else {
        return Err(AdminError::InvalidBody(errors.join("; ")));
    };
    let period = period_of(ent.as_ref(), Utc::now());
    let used_before = meter.used;
    let used_after = s
        .store
        .adjust(&id, &c.meter, period, -(c.units as i64))
        .await?;
    audit::record(
        &s,
        intent.actor(),
        "customer.credit",
        format!("customers/{id}"),
        json!({"meter": c.meter, "period_start": rfc3339(period.start), "used": used_before}),
        json!({"meter": c.meter, "period_start": rfc3339(period.start), "used": used_after, "units": c.units, "reason": c.reason}),
    )
    .await;
    tracing::info!(customer = %id, meter = %c.meter, units = c.units, used_before, used_after, reason = %c.reason, "credit granted");
    Ok(Json(CreditAnswer {
        customer: id,
        meter: c.meter,
        units: c.units,
        used_before,
        used_after,
        period_start: rfc3339(period.start),
        period_end: rfc3339(period.end),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fractions become basis points exactly; anything else is refused.
    #[test]
    fn near_limit_parses_without_floats() {
        assert_eq!(basis_points("0.8"), Some(8000));
        assert_eq!(basis_points(".95"), Some(9500));
        assert_eq!(basis_points("1"), Some(10_000));
        assert_eq!(basis_points("0.1234"), Some(1234));
        assert_eq!(basis_points("0"), Some(0));
        for bad in ["", ".", "1.5", "0.12345", "-0.5", "abc", "0.8e1", "2"] {
            assert_eq!(basis_points(bad), None, "{bad:?}");
        }
    }
}
