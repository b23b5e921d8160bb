//! `POST /v1/events` (issue 14): usage an app reports itself, a batch of CloudEvents 1.0 JSON
//! events (an array, at most `ingest::MAX_BATCH`), behind the admin token or the ingest token
//! (`admin.ingest_token_env`). The answer lists each event's outcome.
//!
//! Owns: this HTTP shape. Must not touch: what an event means and how it is counted
//! (`ingest`), the error mapping (`admin::error`).

use crate::admin::error::{AdminError, Problem};
use crate::admin::AdminState;
use crate::ingest::{BatchOutcome, Ingester, MAX_BATCH};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

/// The routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new().route("/v1/events", post(events))
}

/// Records a batch of usage events, each once by (`source`, `id`): `type` is the meter,
/// `subject` the customer, `time` when it happened (default now; at most 35 days ago, 5 minutes
/// ahead), `data.value` the units (an integer, 0 to 10^9); the other `data` members are kept
/// as dimensions. Invalid events are `rejected` with a `code` while the valid ones are applied;
/// a 503 problem when some event could not be recorded (send the batch again: what was
/// recorded is answered `duplicate`).
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "usage",
    request_body(content = Vec<serde_json::Value>, description = "CloudEvents 1.0 JSON events, at most 1,000", content_type = "application/json"),
    responses(
        (status = 200, description = "every event's outcome", body = BatchOutcome),
        (status = 400, description = "`invalid-body`: not a JSON array, or more than 1,000 events", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`ledger-unavailable`: some events could not be recorded; `batch` holds every event's outcome (the others are recorded); send the batch again", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn events(
    State(s): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, AdminError> {
    let batch: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(serde_json::Value::Array(a)) => a,
        Ok(serde_json::Value::Object(o)) => vec![serde_json::Value::Object(o)],
        Ok(_) => {
            return Err(AdminError::InvalidBody(
                "a batch is a JSON array of CloudEvents".into(),
            ))
        }
        Err(e) => return Err(AdminError::InvalidBody(format!("not JSON: {e}"))),
    };
    if batch.len() > MAX_BATCH {
        return Err(AdminError::InvalidBody(format!(
            "a batch holds at most {MAX_BATCH} events, this one {}",
            batch.len()
        )));
    }
    let ingester = Ingester {
        ledger: s.ledger.clone(),
        store: s.store.clone(),
        config: s.shared.snapshot.clone(),
        entitlements: s.shared.entitlements.clone(),
    };
    let out = ingester.ingest(&batch, chrono::Utc::now()).await;
    if out.errors == 0 {
        return Ok(Json(out).into_response());
    }
    // Some events are not recorded: a problem, with every event's outcome as `batch`.
    let detail = format!(
        "{} of {} events could not be recorded (the ledger is unavailable); send the batch again: \
         what was recorded is answered as a duplicate",
        out.errors,
        out.events.len()
    );
    let problem =
        Problem::new("ledger-unavailable", "Service Unavailable", 503, detail).with_members(vec![
            ("batch", serde_json::to_value(&out).unwrap_or_default()),
        ]);
    Ok((
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (axum::http::header::CONTENT_TYPE, "application/problem+json"),
            (axum::http::header::RETRY_AFTER, "1"),
        ],
        serde_json::to_string(&problem).unwrap_or_default(),
    )
        .into_response())
}
