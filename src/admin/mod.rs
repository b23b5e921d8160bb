//! The admin listener (axum, its own port): `/healthz`, `/readyz`, `/metrics`, and the operator
//! API under `/admin/*`, guarded by a bearer token (env var named in the config, held as a
//! `SecretString` and compared in constant time with `subtle`). Never served on the proxy
//! listener.
//!
//! Owns: the admin HTTP surface and its JSON shapes. Must not touch: the request path's
//! internals (it reads the same shared state the proxy reads).

pub mod alerts;
pub mod config;
pub mod customers;
pub mod openapi;
pub mod stripe;
pub mod usage;
pub mod webhook;

use crate::control::entitlement_sync::EntitlementSync;
use crate::ledger::Ledger;
use crate::proxy::respond::PROBLEM_TYPE_PREFIX;
use crate::proxy::state::Shared;
use crate::quota::QuotaStore;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ledger: Arc<dyn Ledger>,
    /// A quota store handle living on the admin runtime (reads only).
    pub store: Arc<dyn QuotaStore>,
    /// `None` when the token env var is unset: every `/admin` call is then refused. Shared, so
    /// cloning the state per request does not copy the secret.
    pub token: Option<Arc<SecretString>>,
    /// The one entitlement writer (ledger → cache → audit → broadcast).
    pub entitlements: Arc<EntitlementSync>,
    /// `None` without a `[stripe]` section: `/webhooks/stripe` answers 404.
    pub stripe: Option<Arc<crate::stripe::StripeWebhook>>,
    /// Live config: versions, validation, apply and broadcast (`admin_config` serves it).
    pub live: Arc<crate::control::live_config::LiveConfig>,
}

/// The admin router (separate from `serve` so tests can call it directly).
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/admin/customers/{id}",
            get(customers::get_customer).put(customers::put_customer),
        )
        .route("/webhooks/stripe", post(crate::admin::webhook::receive))
        .route("/admin/openapi.json", get(crate::admin::openapi::serve))
        .merge(crate::admin::config::routes())
        .merge(crate::admin::stripe::routes())
        .merge(crate::admin::customers::routes())
        .merge(crate::admin::usage::routes())
        .merge(alerts::routes())
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
        (Some(t), Some(p))
            if bool::from(t.expose_secret().as_bytes().ct_eq(p.trim().as_bytes())) =>
        {
            Ok(())
        }
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
