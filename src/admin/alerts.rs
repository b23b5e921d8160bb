//! `GET /admin/alerts`: the threshold-alert delivery log (admin listener, admin token).
//!
//! Owns: this route's HTTP shape. Delivery is `alerts`'.

use super::{problem, AdminState, Problem};

/// `GET /admin/alerts?limit=`: the delivery log, newest first (admin listener).
pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new().route("/admin/alerts", axum::routing::get(delivery_log))
}

/// Answer of `GET /admin/alerts`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryLog {
    /// Newest first.
    pub deliveries: Vec<crate::ledger::AlertDelivery>,
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
    axum::extract::State(s): axum::extract::State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 50,
        Some(Ok(l)) if (1..=500).contains(&l) => l,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                "limit must be an integer from 1 to 500",
            )
        }
    };
    match s.ledger.alert_deliveries(limit).await {
        Ok(rows) => axum::Json(DeliveryLog { deliveries: rows }).into_response(),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger-unavailable",
            e.to_string(),
        ),
    }
}
