//! The admin listener (axum, its own port): `/healthz`, `/readyz`, `/metrics`, the Stripe
//! webhook (`webhook`), and the operator API under `/admin/*`, guarded by a bearer token (env var
//! named in the config, held as a `SecretString` and compared in constant time with `subtle`).
//! Never served on the proxy listener. Handlers answer `Result<_, AdminError>` (`error`); the
//! write intent of a change is one extractor (`extract`).
//!
//! Owns: the admin HTTP surface and its JSON shapes. Must not touch: the request path's
//! internals (it reads the same shared state the proxy reads).

mod alerts;
mod audit;
mod billing;
mod config;
mod customers;
mod error;
mod extract;
mod ingest;
mod openapi;
mod stripe;
mod usage;
mod webhook;

use crate::admin::error::AdminError;
use crate::control::entitlement_sync::EntitlementSync;
use crate::ledger::Ledger;
use crate::proxy::state::Shared;
use crate::quota::QuotaStore;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};

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
    /// Who may read `/metrics`.
    pub metrics: MetricsAccess,
    /// The token of `/v1/*` besides the admin token (`admin.ingest_token_env`).
    pub ingest_token: Option<Arc<SecretString>>,
    /// The one entitlement writer (ledger → cache → audit → broadcast).
    pub entitlements: Arc<EntitlementSync>,
    /// `None` without a `[stripe]` section: `/webhooks/stripe` answers 404.
    pub stripe: Option<Arc<crate::stripe::StripeWebhook>>,
    /// Live config: versions, validation, apply and broadcast (`admin::config` serves it).
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
        .route("/webhooks/stripe", post(webhook::receive))
        .route("/admin/openapi.json", get(openapi::serve))
        .merge(config::routes())
        .merge(stripe::routes())
        .merge(customers::routes())
        .merge(billing::routes())
        .merge(usage::routes())
        .merge(alerts::routes())
        .merge(ingest::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(axum::middleware::map_response(
            error::problem_for_plain_errors,
        ))
        .with_state(state)
}

/// Who may read `/metrics` (`admin.metrics_token_env`).
#[derive(Clone)]
pub enum MetricsAccess {
    /// No token configured: anyone who reaches the listener.
    Open,
    /// The metrics token or the admin token.
    Token(Arc<SecretString>),
    /// A token is configured but its env var is empty: only the admin token.
    AdminOnly,
}

/// The webhook listener (`stripe.webhook_listen`): `POST /webhooks/stripe` and nothing else, so
/// the admin listener need not be reachable from the internet.
pub fn webhook_app(state: AdminState) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(webhook::receive))
        .layer(axum::middleware::map_response(
            error::problem_for_plain_errors,
        ))
        .with_state(state)
}

/// Every `/admin/…` route takes the admin bearer token, checked here once for all of them, so a
/// handler cannot forget it; `/metrics` takes the metrics token (or the admin token) when one is
/// configured. `/healthz`, `/readyz` and `/webhooks/stripe` (its signature is its credential)
/// are open; unknown paths are 404 either way.
async fn require_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !allowed(&s, req.uri().path(), req.headers()) {
        return AdminError::Unauthorized.into_response();
    }
    next.run(req).await
}

fn allowed(s: &AdminState, path: &str, headers: &HeaderMap) -> bool {
    let admin_ok = || matches_token(s.token.as_deref(), headers);
    if path.starts_with("/admin/") {
        admin_ok()
    } else if path.starts_with("/v1/") {
        admin_ok() || matches_token(s.ingest_token.as_deref(), headers)
    } else if path == "/metrics" {
        match &s.metrics {
            MetricsAccess::Open => true,
            MetricsAccess::Token(t) => matches_token(Some(t), headers) || admin_ok(),
            MetricsAccess::AdminOnly => admin_ok(),
        }
    } else {
        true
    }
}

/// `Authorization: Bearer {token}` matches `token` (compared in constant time).
fn matches_token(token: Option<&SecretString>, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    match (token, presented) {
        (Some(t), Some(p)) => t
            .expose_secret()
            .as_bytes()
            .ct_eq(p.trim().as_bytes())
            .into(),
        _ => false,
    }
}

/// How long `/readyz` and `/healthz?verbose` wait for each dependency (checked concurrently).
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// `GET /healthz` query: `?verbose` adds each dependency's state.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct HealthQuery {
    /// Present (any value): answer JSON with each dependency's state.
    verbose: Option<String>,
}

/// Process up: always 200. Plain `ok` by default; with `?verbose`, each dependency's state as
/// JSON (the same body as `/readyz`).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    params(HealthQuery),
    responses(
        (status = 200, description = "`ok`; with `?verbose`, the dependencies' state", body = Readiness),
    ),
)]
pub(crate) async fn healthz(State(s): State<AdminState>, Query(q): Query<HealthQuery>) -> Response {
    if q.verbose.is_none() {
        return "ok\n".into_response();
    }
    Json(dependencies(&s).await.0).into_response()
}

/// Answer of `GET /readyz` and `GET /healthz?verbose`: each dependency's state (`ok` or the
/// error) and the config version.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ok`, or why the quota store (Redis or embedded) did not answer.
    quota_store: String,
    /// `ok`, or why the ledger (Postgres or SQLite) did not answer.
    ledger: String,
    /// The live config version in force.
    config_version: u64,
}

/// Pings the quota store and the ledger at once, each bounded by [`CHECK_TIMEOUT`]; says
/// whether the quota store answered.
async fn dependencies(s: &AdminState) -> (Readiness, bool) {
    let store = bounded(async { s.store.ping().await.map_err(|e| e.to_string()) });
    let ledger = bounded(async { s.ledger.ping().await.map_err(|e| e.to_string()) });
    let (store, ledger) = tokio::join!(store, ledger);
    let state = |r: &Result<(), String>| r.as_ref().map_or_else(Clone::clone, |_| "ok".into());
    let body = Readiness {
        quota_store: state(&store),
        ledger: state(&ledger),
        config_version: s.shared.snapshot.load().version,
    };
    (body, store.is_ok())
}

/// `check`, or an error when it takes longer than [`CHECK_TIMEOUT`].
async fn bounded(
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())))
}

/// Ready to serve: 503 only when this instance cannot serve. That is while the config is not
/// loaded yet, while a graceful stop drains it, or when the quota store is down and every plan fails closed (each call would be
/// a 503). A ledger outage never makes it unready (usage waits in the spool), nor does a quota
/// store outage while some plan fails open (it serves from local counters): a load balancer
/// must not pull every instance at once for a dependency they all share.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "ready; the body still says which dependency is down", body = Readiness),
        (status = 503, description = "the config is not loaded yet, a graceful stop is draining, or the quota store is down and every plan fails closed", body = Readiness),
    ),
)]
pub(crate) async fn readyz(State(s): State<AdminState>) -> Response {
    let (body, store_ok) = dependencies(&s).await;
    let snap = s.shared.snapshot.load();
    // Version 0 is the file as parsed, before the ledger numbered it (control::live_config).
    let loaded = snap.version > 0;
    let all_closed = snap
        .config
        .plans
        .values()
        .all(|p| p.fail_mode == crate::config::FailMode::Closed);
    let draining = s.shared.lifecycle.draining();
    // The admin listener is up before pingora's: ready only once the proxy takes connections.
    let listening = s.shared.lifecycle.listening();
    let status = if loaded && listening && !draining && (store_ok || !all_closed) {
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
pub(crate) async fn metrics(State(s): State<AdminState>) -> Response {
    s.shared
        .metrics
        .usage_queue_depth
        .set(s.shared.usage.queue_depth() as i64);
    let counters = s.shared.usage.counters();
    let lag_ms = counters.ledger_lag_ms(chrono::Utc::now().timestamp_millis());
    s.shared.metrics.ledger_lag.set(lag_ms as f64 / 1000.0);
    let c = counters.snapshot();
    s.shared.metrics.sync_usage([c.queued, c.spooled, c.lost]);
    let spool_bytes = s.shared.usage.spool_bytes().await;
    s.shared
        .metrics
        .usage_spool_bytes
        .set(i64::try_from(spool_bytes).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.shared.metrics.render(),
    )
        .into_response()
}
