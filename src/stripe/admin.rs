//! The Stripe part of the admin API (admin bearer token, like every `/admin` route):
//! `POST /admin/stripe/sync` (run the reconciler now, answer what it changed),
//! `PUT /admin/customers/{id}/stripe` (link a tollgate customer to a Stripe customer) and
//! `POST /admin/customers/{id}/portal-session` (a Stripe billing portal URL for the customer).

use super::reconcile::SyncError;
use super::Control;
use crate::admin::{authorize, problem, AdminState};
use crate::ledger::LedgerError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::Deserialize;

/// The routes, merged into the admin router.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/stripe/sync", post(sync))
        .route("/admin/customers/{id}/stripe", put(link))
        .route("/admin/customers/{id}/portal-session", post(portal_session))
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

async fn sync(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    stripe_customer: String,
}

async fn link(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let Some(stripe) = s.stripe.as_ref() else {
        return problem(
            StatusCode::NOT_FOUND,
            "stripe-not-configured",
            "this instance has no [stripe] section",
        );
    };
    let b: LinkBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()),
    };
    let cus = b.stripe_customer.trim();
    if !cus.starts_with("cus_") || cus.len() > 255 {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "stripe_customer: expected a Stripe customer id (cus_…)",
        );
    }
    match stripe.ledger.link_stripe_customer(&id, cus, "admin").await {
        Ok(before) => {
            if before.as_deref() != Some(cus) {
                // By the caller's actor (X-Tollgate-Actor), like every admin mutation.
                crate::admin_config::record_audit(
                    &s,
                    &headers,
                    "stripe.link",
                    id.clone(),
                    before
                        .as_ref()
                        .map(|b| serde_json::json!({ "stripe_customer": b }).to_string()),
                    Some(serde_json::json!({ "stripe_customer": cus }).to_string()),
                )
                .await;
            }
            tracing::info!(customer = %id, stripe_customer = %cus, ?before, "Stripe customer linked by admin");
            Json(serde_json::json!({ "customer": id, "stripe_customer": cus, "previous": before }))
                .into_response()
        }
        Err(LedgerError::LinkConflict { customer, .. }) => problem(
            StatusCode::CONFLICT,
            "stripe-customer-linked",
            format!("{cus} is already linked to customer {customer:?}"),
        ),
        Err(e) => ledger_problem(&e),
    }
}

/// Body of `POST /admin/customers/{id}/portal-session` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalBody {
    return_url: Option<String>,
}

async fn portal_session(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let c = match control(&s) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let b: PortalBody = if body.is_empty() {
        PortalBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()),
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
        Ok(url) => Json(serde_json::json!({ "customer": id, "stripe_customer": cus, "url": url }))
            .into_response(),
        Err(e) => stripe_problem(e.to_string()),
    }
}
