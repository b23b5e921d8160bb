//! The billing part of the admin API (issue 13), behind the admin bearer token:
//!
//! | call | does |
//! | --- | --- |
//! | `POST /admin/customers` `{id, email?, name?, plan?}` | provisions a customer: the entitlement row and, with Stripe, a linked Stripe customer (idempotent on `id`) |
//! | `POST /admin/customers/{id}/subscription` `{plan}` | moves the customer's Stripe subscription to any plan with a Stripe price |
//! | `DELETE /admin/customers/{id}/subscription[?at_period_end=true]` | ends it now (or at the period's end) |
//! | `GET /admin/customers/{id}/invoices?limit=&after=` | the customer's invoices, newest first (the pages `GET /_tollgate/invoices` serves the customer) |
//! | `GET /admin/billing/summary?period=YYYY-MM&days=7&near=0.8&format=csv` | the month's customers, MRR, overage, invoices, churn, renewals, limits (`billing::summary`) |
//!
//! Owns: these HTTP shapes. Must not touch: the Stripe calls and the entitlement they leave
//! (`billing::service`), how invoices are stored (`stripe::webhook`, `ledger`), entitlement
//! writes (`control::entitlement_sync`), the error mapping (`admin::error`).

use crate::admin::error::{AdminError, Problem, Unknown};
use crate::admin::extract::{json_body, CustomerId, Intent};
use crate::admin::AdminState;
use crate::billing::service::{invoice_page, Billing, NewCustomer};
use crate::billing::{BillingError, Change, InvoicePage};
use crate::control::entitlement_sync::{Audit, LedgerWrite};
use crate::entitle::{Entitlement, Status};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use utoipa::ToSchema;

/// The routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/customers", post(create_customer))
        .route(
            "/admin/customers/{id}/subscription",
            post(change_subscription).delete(end_subscription),
        )
        .route("/admin/customers/{id}/invoices", get(invoices))
        .route("/admin/billing/summary", get(summary))
}

/// The billing summary of a calendar month: JSON, or CSV with `format=csv`. Figures from
/// Stripe (invoices) and tollgate's estimates (the rest) are named in `sources`.
#[utoipa::path(
    get,
    path = "/admin/billing/summary",
    tag = "customers",
    params(
        ("period" = Option<String>, Query, description = "the month, `YYYY-MM` (UTC); default the current one"),
        ("days" = Option<u32>, Query, description = "renewals and trials ending within this many days of now, 1-366 (default 7)"),
        ("near" = Option<f64>, Query, description = "share of a limit that counts as near it, 0-1 (default 0.8)"),
        ("format" = Option<String>, Query, description = "`json` (default) or `csv`"),
    ),
    responses(
        (status = 200, description = "the summary", body = crate::billing::summary::Summary),
        (status = 400, description = "`invalid-query`: a bad period, days, near or format", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn summary(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::response::Response, AdminError> {
    use crate::billing::summary::{csv, summary, Ask, Month, SummaryError};
    use axum::response::IntoResponse;
    let now = Utc::now();
    let month = match q.get("period") {
        None => Month::of(now),
        Some(p) => Month::parse(p).ok_or_else(|| {
            AdminError::InvalidQuery(format!("period must be a month, YYYY-MM, got {p:?}"))
        })?,
    };
    let days = match q.get("days") {
        None => 7,
        Some(d) => d
            .parse::<u32>()
            .ok()
            .filter(|d| (1..=366).contains(d))
            .ok_or_else(|| {
                AdminError::InvalidQuery(format!("days must be from 1 to 366, got {d:?}"))
            })?,
    };
    let near = match q.get("near") {
        None => 0.8,
        Some(n) => n
            .parse::<f64>()
            .ok()
            .filter(|n| (0.0..=1.0).contains(n))
            .ok_or_else(|| {
                AdminError::InvalidQuery(format!("near must be a share from 0 to 1, got {n:?}"))
            })?,
    };
    let as_csv = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(f) => {
            return Err(AdminError::InvalidQuery(format!(
                "format must be json or csv, got {f:?}"
            )))
        }
    };
    let snap = s.shared.snapshot.load_full();
    let ask = Ask {
        month,
        now,
        days,
        near,
    };
    let sum = summary(&*s.ledger, &snap.config, ask)
        .await
        .map_err(|e| match e {
            SummaryError::Ledger(e) => AdminError::LedgerUnavailable(e),
            e @ SummaryError::Overflow(_) => AdminError::InvalidQuery(e.to_string()),
        })?;
    Ok(if as_csv {
        (
            [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            csv(&sum),
        )
            .into_response()
    } else {
        Json(sum).into_response()
    })
}

fn billing(s: &AdminState) -> Billing {
    Billing::new(s.ledger.clone(), s.stripe.clone())
}

/// `POST /admin/customers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCustomerBody {
    /// The customer id (the JWT's customer claim).
    id: String,
    email: Option<String>,
    name: Option<String>,
    /// The plan to start on (default: the default plan).
    plan: Option<String>,
}

/// What `POST /admin/customers` did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Provisioned {
    id: String,
    /// The stored plan; `None` means the default plan.
    plan: Option<String>,
    /// The linked Stripe customer (`None` with Stripe off).
    stripe_customer: Option<String>,
    /// The entitlement row was created by this call (`false`: it existed; a retry).
    created: bool,
}

/// Provisions a customer: with the Stripe API on, first the Stripe customer (the linked one,
/// or one created with the email, name and metadata under an `Idempotency-Key` derived from
/// the id, then linked), then the entitlement row (active, on `plan`). A retry answers the same
/// customer and makes no second Stripe customer; the same id with another plan is 409.
#[utoipa::path(
    post,
    path = "/admin/customers",
    tag = "customers",
    request_body = NewCustomerBody,
    responses(
        (status = 201, description = "created", body = Provisioned),
        (status = 200, description = "it existed with these terms: nothing changed", body = Provisioned),
        (status = 400, description = "`invalid-body` (an unknown plan, a malformed email or name) or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`customer-exists`: the customer exists on another plan (change it with PUT /admin/customers/{id})", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-refused` / `stripe-unavailable`: Stripe failed; nothing stored", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn create_customer(
    State(s): State<AdminState>,
    intent: Intent,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Provisioned>), AdminError> {
    let b: NewCustomerBody = json_body(&body)?;
    crate::entitle::check_customer_id(&b.id).map_err(AdminError::InvalidCustomerId)?;
    let mut errors = Vec::new();
    let email = b.email.as_deref().map(str::trim).filter(|e| !e.is_empty());
    if let Some(e) = email {
        let ok = e.len() <= 254
            && e.split_once('@')
                .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'))
            && !e.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            errors.push(format!("email: not an email address: {e:?}"));
        }
    }
    let name = b.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
    if name.is_some_and(|n| n.chars().count() > 200 || n.chars().any(char::is_control)) {
        errors.push("name: at most 200 characters, no control characters".into());
    }
    let snap = s.shared.snapshot.load_full();
    if let Some(p) = &b.plan {
        if !snap.config.plans.contains_key(p) {
            errors.push(format!("plan: unknown plan {p:?}"));
        }
    }
    if !errors.is_empty() {
        return Err(AdminError::InvalidBody(errors.join("; ")));
    }
    let previous = s.ledger.get_customer(&b.id).await?;
    if let (Some(p), Some(want)) = (&previous, &b.plan) {
        if p.plan.as_ref() != Some(want) {
            return Err(AdminError::CustomerExists(format!(
                "customer {:?} exists on plan {:?}; change it with PUT /admin/customers/{}",
                b.id, p.plan, b.id
            )));
        }
    }
    // Stripe first: when it fails, nothing is stored here either.
    let new = NewCustomer {
        id: b.id.clone(),
        email: email.map(String::from),
        name: name.map(String::from),
    };
    let stripe_customer = billing(&s)
        .provision_stripe_customer(&new, intent.actor())
        .await?;
    let plan = match &previous {
        Some(p) => p.plan.clone(),
        None => {
            // Whole seconds: this is a starting state, not an operator's override, so a
            // Stripe event of the same second (a checkout right after) is newer (DESIGN §7:
            // events carry whole seconds).
            let now = Utc::now();
            let now = chrono::DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
            let ent = Entitlement {
                plan: b.plan.clone(),
                status: Status::Active,
                status_since: Some(now),
                period_start: None,
                period_end: None,
                suspended: false,
                updated_at: now,
                cancel_at_period_end: false,
                trial_end: None,
            };
            let audit = Audit {
                actor: intent.actor(),
                action: "customer.create",
                target: format!("customers/{}", b.id),
                before: None,
            };
            s.entitlements
                .write(&b.id, LedgerWrite::Replace(&ent), Some(audit))
                .await?;
            tracing::info!(customer = %b.id, plan = ent.plan.as_deref(), stripe_customer = stripe_customer.as_deref(), "customer provisioned");
            ent.plan
        }
    };
    let status = if previous.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Provisioned {
            id: b.id,
            plan,
            stripe_customer,
            created: previous.is_none(),
        }),
    ))
}

/// `POST /admin/customers/{id}/subscription`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanBody {
    plan: Option<String>,
}

/// Moves the customer's live Stripe subscription to `plan` (any plan with a `stripe_price`,
/// offered or not; proration as `stripe.proration_behavior` says); the entitlement follows at
/// once, audited under the admin actor.
#[utoipa::path(
    post,
    path = "/admin/customers/{id}/subscription",
    tag = "stripe",
    params(("id" = String, Path, description = "the customer id")),
    request_body = PlanBody,
    responses(
        (status = 200, description = "the subscription on its new plan", body = Change),
        (status = 400, description = "`invalid-request` (`key`: an unknown or unpriced plan), `invalid-body`, `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`plan-unchanged`, or `no-subscription`", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-refused` / `stripe-unavailable` (with `stripe_status`, `stripe_code`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn change_subscription(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
    body: axum::body::Bytes,
) -> Result<Json<Change>, AdminError> {
    let b: PlanBody = json_body(&body)?;
    Ok(Json(
        billing(&s)
            .operator_change_plan(&id, b.plan, intent.actor())
            .await?,
    ))
}

/// Ends the customer's live Stripe subscription now (`?at_period_end=true`: at the period's
/// end); the entitlement follows at once.
#[utoipa::path(
    delete,
    path = "/admin/customers/{id}/subscription",
    tag = "stripe",
    params(
        ("id" = String, Path, description = "the customer id"),
        ("at_period_end" = Option<bool>, Query, description = "cancel at the period's end instead of now"),
    ),
    responses(
        (status = 200, description = "the subscription, ended or ending", body = Change),
        (status = 400, description = "`invalid-query` or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`no-subscription`", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-refused` / `stripe-unavailable`", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn end_subscription(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Change>, AdminError> {
    let at_period_end = match q.get("at_period_end").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(o) => {
            return Err(AdminError::InvalidQuery(format!(
                "at_period_end must be true or false, got {o:?}"
            )))
        }
    };
    Ok(Json(
        billing(&s)
            .operator_cancel(&id, !at_period_end, intent.actor())
            .await?,
    ))
}

/// A customer's invoices, newest first. 404 only for a customer tollgate knows nothing of (no
/// entitlement, no Stripe link, no invoice).
#[utoipa::path(
    get,
    path = "/admin/customers/{id}/invoices",
    tag = "customers",
    params(
        ("id" = String, Path, description = "the customer id"),
        ("limit" = Option<i64>, Query, description = "invoices per page, 1-100 (default 20)"),
        ("after" = Option<String>, Query, description = "the `next` of the page before"),
    ),
    responses(
        (status = 200, description = "one page of invoices; amounts in Stripe's integer minor units", body = InvoicePage),
        (status = 400, description = "`invalid-customer-id`, or `invalid-query`: a bad `limit` or `after`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-customer`: no entitlement, no Stripe link, no invoice", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn invoices(
    State(s): State<AdminState>,
    CustomerId(id): CustomerId,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<InvoicePage>, AdminError> {
    let limit = super::extract::limit(&q, 20, 100)?;
    let page = invoice_page(&*s.ledger, &id, q.get("after").cloned(), limit)
        .await
        .map_err(|e| match e {
            BillingError::Ledger(e) => AdminError::LedgerUnavailable(e),
            other => AdminError::InvalidQuery(other.to_string()),
        })?;
    if page.invoices.is_empty()
        && s.ledger.get_customer(&id).await?.is_none()
        && s.ledger.stripe_link(Some(&id), None).await?.is_none()
    {
        return Err(AdminError::unknown_customer(&id, Unknown::Ever));
    }
    Ok(Json(page))
}
