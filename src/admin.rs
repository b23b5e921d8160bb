//! The admin listener (axum, its own port): `/healthz`, `/readyz`, `/metrics`, and the operator
//! API under `/admin/*`, guarded by a bearer token (env var named in the config, compared in
//! constant time). Never served on the proxy listener.
//!
//! Owns: the admin HTTP surface and its JSON shapes. Must not touch: the request path's
//! internals (it reads the same shared state the proxy reads).

use crate::entitle::{Entitlement, Status};
use crate::ledger::Ledger;
use crate::quota::QuotaStore;
use crate::respond::PROBLEM_TYPE_PREFIX;
use crate::state::Shared;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ledger: Arc<dyn Ledger>,
    /// A quota store handle living on the admin runtime (reads only).
    pub store: Arc<dyn QuotaStore>,
    /// `None` when the token env var is unset: every `/admin` call is then refused.
    pub token: Option<Arc<str>>,
    /// Broadcasts entitlement changes to other instances (with Redis).
    pub sync: Option<Arc<crate::sync::EntitlementSync>>,
    /// `None` without a `[stripe]` section: `/webhooks/stripe` answers 404.
    pub stripe: Option<Arc<crate::stripe::StripeWebhook>>,
    /// Live config: versions, validation, apply and broadcast (`admin_config` serves it).
    pub live: Arc<crate::liveconfig::LiveConfig>,
}

/// The admin router (separate from `serve` so tests can call it directly).
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/admin/customers/{id}",
            get(crate::admin_customers::get_customer).put(put_customer),
        )
        .route("/webhooks/stripe", post(crate::stripe::webhook::receive))
        .route("/admin/openapi.json", get(crate::openapi::serve))
        .merge(crate::admin_config::routes())
        .merge(crate::stripe::admin::routes())
        .merge(crate::admin_customers::routes())
        .merge(crate::admin_usage::routes())
        .merge(crate::alerts::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// Every `/admin/…` route takes the admin bearer token, checked here once for all of them, so a
/// handler cannot forget it. `/healthz`, `/readyz`, `/metrics` and `/webhooks/stripe` (its
/// signature is its credential) are open; unknown paths are 404 either way.
async fn require_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path().starts_with("/admin/") {
        if let Err(r) = authorize(&s, req.headers()) {
            return *r;
        }
    }
    next.run(req).await
}

/// An admin-listener error body: RFC 9457 problem details, sent as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:tollgate:problem:{kind}`, e.g. `urn:tollgate:problem:unknown-customer`.
    #[serde(rename = "type")]
    #[schema(example = "urn:tollgate:problem:invalid-body")]
    pub kind: String,
    /// The status code's reason phrase.
    #[schema(example = "Bad Request")]
    pub title: String,
    pub status: u16,
    /// What was wrong, for a human.
    pub detail: String,
}

/// An admin-listener error as problem+json (also used by the Stripe webhook).
pub(crate) fn problem(status: StatusCode, suffix: &str, detail: impl Into<String>) -> Response {
    let body = Problem {
        kind: format!("{PROBLEM_TYPE_PREFIX}{suffix}"),
        title: status.canonical_reason().unwrap_or("").to_string(),
        status: status.as_u16(),
        detail: detail.into(),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        // Serializing four plain fields cannot fail.
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON request body, or the 400 `invalid-body` naming what is wrong with it.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            e.to_string(),
        ))
    })
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    match (&state.token, presented) {
        (Some(t), Some(p)) if constant_time_eq(t.as_bytes(), p.trim().as_bytes()) => Ok(()),
        _ => Err(Box::new(problem(
            StatusCode::UNAUTHORIZED,
            "admin-unauthorized",
            "a valid admin bearer token is required",
        ))),
    }
}

/// Process up (no dependency is checked).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "always `ok`", body = String, content_type = "text/plain")),
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Answer of `GET /readyz`: each dependency's state (`ok` or the error) and the config version.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, or why the quota store (Redis or embedded) did not answer.
    pub quota_store: String,
    /// `ok`, or why the ledger (Postgres or SQLite) did not answer.
    pub ledger: String,
    /// The live config version in force.
    pub config_version: u64,
}

/// Ready to serve: the quota store and the ledger answer (config is loaded before this listens).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "ready", body = Readiness),
        (status = 503, description = "the quota store or the ledger is unreachable, or the config is not loaded yet", body = Readiness),
    ),
)]
async fn readyz(State(s): State<AdminState>) -> Response {
    let store = s.store.ping().await;
    let ledger = s.ledger.ping().await;
    // Version 0 is the file as parsed, before the ledger numbered it (liveconfig): not loaded yet.
    let version = s.shared.snapshot.load().version;
    let body = Readiness {
        quota_store: store
            .as_ref()
            .map_or_else(|e| e.to_string(), |_| "ok".into()),
        ledger: ledger
            .as_ref()
            .map_or_else(|e| e.to_string(), |_| "ok".into()),
        config_version: version,
    };
    let status = if store.is_ok() && ledger.is_ok() && version > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics (text exposition format 0.0.4); the families are listed in the README.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "every metric family", body = String, content_type = "text/plain; version=0.0.4")),
)]
async fn metrics(State(s): State<AdminState>) -> Response {
    s.shared
        .metrics
        .usage_queue_depth
        .set(s.shared.usage.queue_depth() as i64);
    let lag_ms = s
        .shared
        .usage
        .counters()
        .ledger_lag_ms(chrono::Utc::now().timestamp_millis());
    s.shared.metrics.ledger_lag.set(lag_ms as f64 / 1000.0);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.shared.metrics.render(),
    )
        .into_response()
}

/// Body of `PUT /admin/customers/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerPut {
    /// A plan of the config; absent or null: the default plan.
    pub plan: Option<String>,
    /// Subscription status (Stripe's spelling); absent: `active`.
    #[serde(default)]
    #[schema(value_type = Option<Status>)]
    pub status: Option<String>,
    /// Billing period start; give both ends or neither (then the calendar month, UTC).
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    /// Operator suspension: the proxy answers 403 `suspended`.
    #[serde(default)]
    pub suspended: bool,
    /// When the status began (defaults to now when the status changes).
    pub status_since: Option<DateTime<Utc>>,
    /// The subscription ends at `period_end` (informational, as from Stripe).
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// End of the trial (informational, as from Stripe).
    pub trial_end: Option<DateTime<Utc>>,
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
        (status = 400, description = "not JSON, an unknown field, an unknown plan or status, or a bad period", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn put_customer(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let put: CustomerPut = match json_body(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
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
        return problem(StatusCode::BAD_REQUEST, "invalid-body", errors.join("; "));
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
    if let Err(e) = s.ledger.put_customer(&id, &ent).await {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger-unavailable",
            e.to_string(),
        );
    }
    s.shared.entitlements.put(&id, ent.clone());
    let json = |e: &Entitlement| serde_json::to_string(e).ok();
    let (before, after) = (previous.as_ref().and_then(json), json(&ent));
    crate::admin_config::record_audit(
        &s,
        &headers,
        "customer.put",
        format!("customers/{id}"),
        before,
        after,
    )
    .await;
    if let Some(sync) = &s.sync {
        if let Err(e) = sync.publish(&id).await {
            // The other instances still converge at their next full reload.
            tracing::warn!(error = %e, customer = %id, "could not broadcast entitlement change");
        }
    }
    tracing::info!(customer = %id, plan = ?ent.plan, status = ent.status.as_str(), suspended = ent.suspended, "entitlement set");
    (StatusCode::OK, Json(ent)).into_response()
}
