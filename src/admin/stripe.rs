//! The Stripe part of the admin API (admin bearer token, like every `/admin` route):
//! `POST /admin/stripe/sync` (run the reconciler now, answer what it changed),
//! `PUT /admin/customers/{id}/stripe` (link a tollgate customer to a Stripe customer) and
//! `POST /admin/customers/{id}/portal-session` (a Stripe billing portal URL for the customer),
//! `POST /admin/stripe/reports/{identifier}/resolve` (settle a meter event left `uncertain`),
//! `GET /admin/stripe/unmatched` (events that named no known customer).
//!
//! Owns: these HTTP shapes. Must not touch: reconciling, linking and its audit row
//! (`stripe::link`), the Stripe API (`stripe::api`), the error mapping (`admin::error`).

use crate::admin::error::{AdminError, Problem, StripeMissing, Unknown};
use crate::admin::extract::{json_body, CustomerId, Intent};
use crate::admin::{audit, AdminState};
use crate::stripe::reconcile::SyncReport;
use crate::stripe::{Control, Linked, StripeWebhook};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use utoipa::ToSchema;

/// The routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/stripe/sync", post(sync))
        .route("/admin/stripe/unmatched", get(unmatched))
        .route("/admin/customers/{id}/stripe", put(link))
        .route("/admin/customers/{id}/portal-session", post(portal_session))
        .route(
            "/admin/stripe/reports/{identifier}/resolve",
            post(resolve_report),
        )
}

/// The Stripe API side, or the 404 to answer when it is off.
fn control(s: &AdminState) -> Result<&Control, AdminError> {
    s.stripe
        .as_ref()
        .and_then(|w| w.control.get())
        .ok_or(AdminError::StripeNotConfigured(StripeMissing::SecretKey))
}

/// The `[stripe]` side, or the 404 to answer without one.
fn section(s: &AdminState) -> Result<&StripeWebhook, AdminError> {
    s.stripe
        .as_deref()
        .ok_or(AdminError::StripeNotConfigured(StripeMissing::Section))
}

/// Runs the Stripe reconciler now (one run at a time) and answers what it changed.
#[utoipa::path(
    post,
    path = "/admin/stripe/sync",
    tag = "stripe",
    responses(
        (status = 200, description = "what the run found and changed", body = SyncReport),
        (status = 404, description = "`stripe-not-configured`: no `[stripe]` section or no secret key", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-unavailable`: the Stripe API failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn sync(State(s): State<AdminState>) -> Result<Json<SyncReport>, AdminError> {
    Ok(Json(control(&s)?.reconciler.sync().await?))
}

/// One event that named no known customer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UnmatchedEvent {
    /// Stripe's event id.
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    /// Stripe's `created` (RFC 3339).
    created: String,
    received_at: String,
    /// The Stripe customer the event's object belongs to, when it names one: link it with
    /// `PUT /admin/customers/{id}/stripe`, then replay with `POST /admin/stripe/sync`.
    stripe_customer: Option<String>,
}

/// Answer of `GET /admin/stripe/unmatched`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UnmatchedList {
    /// Newest first.
    events: Vec<UnmatchedEvent>,
}

/// Webhook events that named no known customer (neither by metadata nor by a stored Stripe
/// link): acknowledged to Stripe, changed nothing, kept here for the operator.
#[utoipa::path(
    get,
    path = "/admin/stripe/unmatched",
    tag = "stripe",
    params(("limit" = Option<i64>, Query, description = "events, 1-500 (default 50)")),
    responses(
        (status = 200, description = "the newest unmatched events", body = UnmatchedList),
        (status = 400, description = "a bad `limit`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn unmatched(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<UnmatchedList>, AdminError> {
    let limit = super::extract::limit(&q, 50, 500)?;
    let events = s
        .ledger
        .unmatched_stripe_events(limit)
        .await?
        .into_iter()
        .map(|e| {
            let payload: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
            let object = &payload["data"]["object"];
            let stripe_customer = match &object["customer"] {
                serde_json::Value::String(c) => Some(c.clone()),
                serde_json::Value::Object(c) => {
                    c.get("id").and_then(|v| v.as_str()).map(String::from)
                }
                _ if object["object"] == "customer" => object["id"].as_str().map(String::from),
                _ => None,
            };
            UnmatchedEvent {
                id: e.id,
                event_type: e.event_type,
                created: e.created.to_rfc3339(),
                received_at: e.received_at.to_rfc3339(),
                stripe_customer,
            }
        })
        .collect();
    Ok(Json(UnmatchedList { events }))
}

/// Body of `PUT /admin/customers/{id}/stripe`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkBody {
    /// A Stripe customer id, `cus_…`.
    #[schema(example = "cus_NffrFeUfNV2Hib")]
    stripe_customer: String,
}

/// Answer of `PUT /admin/customers/{id}/stripe`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LinkAnswer {
    customer: String,
    stripe_customer: String,
    /// The Stripe customer linked before, if any.
    previous: Option<String>,
}

/// Links a tollgate customer to a Stripe customer (audited).
#[utoipa::path(
    put,
    path = "/admin/customers/{id}/stripe",
    tag = "stripe",
    params(("id" = String, Path, description = "the tollgate customer id")),
    request_body = LinkBody,
    responses(
        (status = 200, description = "linked", body = LinkAnswer),
        (status = 400, description = "not JSON, an unknown field, or not a `cus_…` id, or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`: no `[stripe]` section", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`stripe-customer-linked`: that Stripe customer is linked to another customer", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn link(
    State(s): State<AdminState>,
    intent: Intent,
    CustomerId(id): CustomerId,
    body: axum::body::Bytes,
) -> Result<Json<LinkAnswer>, AdminError> {
    let stripe = section(&s)?;
    let b: LinkBody = json_body(&body)?;
    let cus = b.stripe_customer.trim();
    if !cus.starts_with("cus_") || cus.len() > 255 {
        return Err(AdminError::InvalidBody(
            "stripe_customer: expected a Stripe customer id (cus_…)".into(),
        ));
    }
    // By the caller's actor (X-Tollgate-Actor), like every admin mutation; audited by `link`.
    let previous =
        match crate::stripe::link(&*stripe.ledger, &id, cus, "admin", intent.actor()).await? {
            Linked::Conflict { owner } => {
                return Err(AdminError::StripeCustomerLinked {
                    stripe_customer: cus.to_string(),
                    owner,
                })
            }
            Linked::Changed { previous } => previous,
            Linked::Unchanged => Some(cus.to_string()),
        };
    tracing::info!(customer = %id, stripe_customer = %cus, previous = previous.as_deref(), "Stripe customer linked by admin");
    Ok(Json(LinkAnswer {
        customer: id,
        stripe_customer: cus.to_string(),
        previous,
    }))
}

/// Body of `POST /admin/stripe/reports/{identifier}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveBody {
    /// What Stripe shows for the event (Billing → Meters → the meter's events, by identifier):
    /// `true`, it was recorded (the rows are marked reported); `false`, it was not (the event
    /// is sent again, same identifier and value).
    landed: bool,
}

/// Answer of `POST /admin/stripe/reports/{identifier}/resolve`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ResolveAnswer {
    identifier: String,
    /// `delivered` or `pending` (sent at the reporter's next run).
    state: &'static str,
    /// Usage rows marked reported.
    rows_marked: u64,
}

/// Settles a usage report the reporter set `uncertain`: a try may have landed unanswered longer
/// ago than Stripe deduplicates identifiers, so it was not resent (audited).
#[utoipa::path(
    post,
    path = "/admin/stripe/reports/{identifier}/resolve",
    tag = "stripe",
    params(("identifier" = String, Path, description = "the meter event's identifier (`tg_…`)")),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "settled", body = ResolveAnswer),
        (status = 400, description = "not JSON or an unknown field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`, or `unknown-report`: no uncertain report with that identifier", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn resolve_report(
    State(s): State<AdminState>,
    intent: Intent,
    Path(identifier): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ResolveAnswer>, AdminError> {
    let stripe = section(&s)?;
    let b: ResolveBody = json_body(&body)?;
    let Some(marked) = stripe
        .ledger
        .resolve_uncertain_report(&identifier, b.landed)
        .await?
    else {
        return Err(AdminError::UnknownReport(identifier));
    };
    let state = if b.landed { "delivered" } else { "pending" };
    audit::record(
        &s,
        intent.actor(),
        "stripe.report.resolve",
        identifier.clone(),
        serde_json::json!({ "state": "uncertain" }),
        serde_json::json!({ "state": state, "rows_marked": marked }),
    )
    .await;
    tracing::info!(%identifier, landed = b.landed, rows_marked = marked, "uncertain usage report resolved");
    Ok(Json(ResolveAnswer {
        identifier,
        state,
        rows_marked: marked,
    }))
}

/// Body of `POST /admin/customers/{id}/portal-session` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalBody {
    /// Where the portal's "return" link leads (Stripe's default when absent).
    return_url: Option<String>,
}

/// Answer of `POST /admin/customers/{id}/portal-session`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PortalAnswer {
    customer: String,
    stripe_customer: String,
    /// The billing portal session's URL (short-lived; hand it to the customer).
    url: String,
}

/// Creates a Stripe billing portal session for a linked customer.
#[utoipa::path(
    post,
    path = "/admin/customers/{id}/portal-session",
    tag = "stripe",
    params(("id" = String, Path, description = "the tollgate customer id")),
    request_body(content = Option<PortalBody>, description = "optional; an empty body is allowed", content_type = "application/json"),
    responses(
        (status = 200, description = "the portal URL", body = PortalAnswer),
        (status = 400, description = "not JSON or an unknown field, or `invalid-customer-id`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`, or `unknown-customer`: not linked to a Stripe customer", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-unavailable`: the Stripe API failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn portal_session(
    State(s): State<AdminState>,
    CustomerId(id): CustomerId,
    body: axum::body::Bytes,
) -> Result<Json<PortalAnswer>, AdminError> {
    let c = control(&s)?;
    let b: PortalBody = if body.is_empty() {
        PortalBody::default()
    } else {
        json_body(&body)?
    };
    let Some((_, cus)) = s.ledger.stripe_link(Some(&id), None).await? else {
        return Err(AdminError::unknown_customer(&id, Unknown::NotLinked));
    };
    let (_, url) = c.api.portal_session(&cus, b.return_url.as_deref()).await?;
    Ok(Json(PortalAnswer {
        customer: id,
        stripe_customer: cus,
        url,
    }))
}
