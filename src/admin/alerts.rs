//! `GET /admin/alerts`: the threshold-alert delivery log (admin listener, admin token).
//!
//! Owns: this route's HTTP shape. Must not touch: delivery (`alerts`'), the error mapping
//! (`admin::error`).

use crate::admin::error::{AdminError, Problem};
use crate::admin::AdminState;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;

/// `GET /admin/alerts?limit=`: the delivery log, newest first (admin listener).
pub(crate) fn routes() -> Router<AdminState> {
    Router::new().route("/admin/alerts", get(delivery_log))
}

/// Answer of `GET /admin/alerts`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct DeliveryLog {
    /// Newest first.
    deliveries: Vec<crate::ledger::AlertDelivery>,
}

/// The threshold-alert delivery log, newest first.
#[utoipa::path(
    get,
    path = "/admin/alerts",
    tag = "alerts",
    params(("limit" = Option<i64>, Query, description = "rows, 1-500 (default 50)")),
    responses(
        (status = 200, description = "the newest deliveries", body = DeliveryLog),
        (status = 400, description = "a bad `limit`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn delivery_log(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<DeliveryLog>, AdminError> {
    let limit = super::extract::limit(&q, 50, 500)?;
    let deliveries = s.ledger.alert_deliveries(limit).await?;
    Ok(Json(DeliveryLog { deliveries }))
}
