//! The Stripe part of the admin API (admin bearer token, like every `/admin` route):
//! `POST /admin/stripe/sync` (run the reconciler now, answer what it changed),
//! `PUT /admin/customers/{id}/stripe` (link a tollgate customer to a Stripe customer) and
//! `POST /admin/customers/{id}/portal-session` (a Stripe billing portal URL for the customer),
//! `POST /admin/stripe/reports/{identifier}/resolve` (settle a meter event left `uncertain`).

use crate::admin::{json_body, problem, AdminState, Problem};
use crate::ledger::LedgerError;
use crate::stripe::reconcile::{SyncError, SyncReport};
use crate::stripe::Control;
use crate::stripe::Linked;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The routes, merged into the admin router.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/stripe/sync", post(sync))
        .route("/admin/customers/{id}/stripe", put(link))
        .route("/admin/customers/{id}/portal-session", post(portal_session))
        .route(
            "/admin/stripe/reports/{identifier}/resolve",
            post(resolve_report),
        )
}

/// The Stripe API side, or the problem to answer when it is off.
fn control(s: &AdminState) -> Result<&Control, Box<Response>> {
    s.stripe
        .as_ref()
        .and_then(|w| w.control.get())
        .ok_or_else(|| {
            Box::new(problem(
                StatusCode::NOT_FOUND,
                "stripe-not-configured",
                "no [stripe] section, or its secret key env var is unset",
            ))
        })
}

/// The `[stripe]` side, or the 404 to answer without one.
fn section(s: &AdminState) -> Result<&std::sync::Arc<crate::stripe::StripeWebhook>, Box<Response>> {
    s.stripe.as_ref().ok_or_else(|| {
        Box::new(problem(
            StatusCode::NOT_FOUND,
            "stripe-not-configured",
            "this instance has no [stripe] section",
        ))
    })
}

fn ledger_problem(e: &LedgerError) -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "ledger-unavailable",
        e.to_string(),
    )
}

fn stripe_problem(detail: String) -> Response {
    problem(StatusCode::BAD_GATEWAY, "stripe-unavailable", detail)
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
async fn sync(State(s): State<AdminState>) -> Response {
    let c = match control(&s) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match c.reconciler.sync().await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(SyncError::Stripe(e)) => stripe_problem(e),
        Err(SyncError::Ledger(e)) => ledger_problem(&e),
    }
}

/// Body of `PUT /admin/customers/{id}/stripe`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// A Stripe customer id, `cus_…`.
    #[schema(example = "cus_NffrFeUfNV2Hib")]
    stripe_customer: String,
}

/// Answer of `PUT /admin/customers/{id}/stripe`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkAnswer {
    pub customer: String,
    pub stripe_customer: String,
    /// The Stripe customer linked before, if any.
    pub previous: Option<String>,
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
        (status = 400, description = "not JSON, an unknown field, or not a `cus_…` id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`: no `[stripe]` section", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`stripe-customer-linked`: that Stripe customer is linked to another customer", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn link(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let stripe = match section(&s) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let b: LinkBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let cus = b.stripe_customer.trim();
    if !cus.starts_with("cus_") || cus.len() > 255 {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "stripe_customer: expected a Stripe customer id (cus_…)",
        );
    }
    // By the caller's actor (X-Tollgate-Actor), like every admin mutation.
    let actor = crate::admin::config::actor(&headers);
    match crate::stripe::link(&*stripe.ledger, &id, cus, "admin", &actor).await {
        Ok(Linked::Conflict { owner }) => problem(
            StatusCode::CONFLICT,
            "stripe-customer-linked",
            format!("{cus} is already linked to customer {owner:?}"),
        ),
        Ok(linked) => {
            let previous = match linked {
                Linked::Changed { previous } => previous,
                _ => Some(cus.to_string()),
            };
            tracing::info!(customer = %id, stripe_customer = %cus, ?previous, "Stripe customer linked by admin");
            Json(LinkAnswer {
                customer: id,
                stripe_customer: cus.to_string(),
                previous,
            })
            .into_response()
        }
        Err(e) => ledger_problem(&e),
    }
}

/// Body of `POST /admin/stripe/reports/{identifier}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What Stripe shows for the event (Billing → Meters → the meter's events, by identifier):
    /// `true`, it was recorded (the rows are marked reported); `false`, it was not (the event
    /// is sent again, same identifier and value).
    landed: bool,
}

/// Answer of `POST /admin/stripe/reports/{identifier}/resolve`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolveAnswer {
    pub identifier: String,
    /// `delivered` or `pending` (sent at the reporter's next run).
    pub state: &'static str,
    /// Usage rows marked reported.
    pub rows_marked: u64,
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
async fn resolve_report(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let stripe = match section(&s) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let b: ResolveBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let marked = match stripe
        .ledger
        .resolve_uncertain_report(&identifier, b.landed)
        .await
    {
        Ok(Some(n)) => n,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "unknown-report",
                format!("no uncertain usage report {identifier:?}"),
            )
        }
        Err(e) => return ledger_problem(&e),
    };
    let state = if b.landed { "delivered" } else { "pending" };
    crate::admin::config::record_audit(
        &s,
        &headers,
        "stripe.report.resolve",
        identifier.clone(),
        Some(serde_json::json!({ "state": "uncertain" }).to_string()),
        Some(serde_json::json!({ "state": state, "rows_marked": marked }).to_string()),
    )
    .await;
    tracing::info!(%identifier, landed = b.landed, rows_marked = marked, "uncertain usage report resolved");
    Json(ResolveAnswer {
        identifier,
        state,
        rows_marked: marked,
    })
    .into_response()
}

/// Body of `POST /admin/customers/{id}/portal-session` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalBody {
    /// Where the portal's "return" link leads (Stripe's default when absent).
    return_url: Option<String>,
}

/// Answer of `POST /admin/customers/{id}/portal-session`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PortalAnswer {
    pub customer: String,
    pub stripe_customer: String,
    /// The billing portal session's URL (short-lived; hand it to the customer).
    pub url: String,
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
        (status = 400, description = "not JSON or an unknown field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`, or `unknown-customer`: not linked to a Stripe customer", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`stripe-unavailable`: the Stripe API failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn portal_session(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let c = match control(&s) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let b: PortalBody = if body.is_empty() {
        PortalBody::default()
    } else {
        match json_body(&body) {
            Ok(b) => b,
            Err(r) => return *r,
        }
    };
    let link = match s.ledger.stripe_link(Some(&id), None).await {
        Ok(l) => l,
        Err(e) => return ledger_problem(&e),
    };
    let Some((_, cus)) = link else {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown-customer",
            format!("customer {id:?} is not linked to a Stripe customer"),
        );
    };
    match c.api.portal_session(&cus, b.return_url.as_deref()).await {
        Ok(url) => Json(PortalAnswer {
            customer: id,
            stripe_customer: cus,
            url,
        })
        .into_response(),
        Err(e) => stripe_problem(e.to_string()),
    }
}
