//! The `/v1` API (issue 14), behind the admin token or the ingest token
//! (`admin.ingest_token_env`): `POST /v1/events` (usage an app reports itself, a batch of
//! CloudEvents 1.0 JSON events, at most `ingest::MAX_BATCH`; the answer lists each event's
//! outcome), `POST /v1/check` (allow or deny, optionally holding the units) and
//! `POST /v1/reservations/{id}/commit` / `release`.
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
    Router::new()
        .route("/v1/events", post(events))
        .route("/v1/check", post(check))
        .route("/v1/reservations/{id}/commit", post(commit))
        .route("/v1/reservations/{id}/release", post(release))
}

fn ingester(s: &AdminState) -> Ingester {
    Ingester {
        ledger: s.ledger.clone(),
        store: s.store.clone(),
        config: s.shared.snapshot.clone(),
        entitlements: s.shared.entitlements.clone(),
        alerts: s.shared.alerts.clone(),
    }
}

/// Allow or deny `units` of `meter` for `customer` with the proxy's status policy, feature gate
/// and quota, in one store call; with `reserve`, the units are held (`reservation.id`) until
/// committed, released, or `ttl` seconds pass. A denial is an answer (`allowed: false` with
/// the proxy's problem type as `reason`), not an error.
#[utoipa::path(
    post,
    path = "/v1/check",
    tag = "usage",
    request_body = crate::ingest::check::CheckRequest,
    responses(
        (status = 200, description = "the decision (and the reservation when one was made)", body = crate::ingest::check::CheckAnswer),
        (status = 400, description = "`invalid-body`: an unknown meter, a bad customer, units or ttl", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the quota store or the ledger is unavailable (nothing held)", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn check(
    State(s): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Json<crate::ingest::check::CheckAnswer>, AdminError> {
    let req = crate::admin::extract::json_body(&body)?;
    Ok(Json(ingester(&s).check(req, chrono::Utc::now()).await?))
}

/// `POST /v1/reservations/{id}/commit`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommitBody {
    /// The units used (more or less than held).
    units: i64,
}

/// Settles a held reservation to what was used: its usage row is written (once, whatever the
/// retries) and the counter moves by the difference.
#[utoipa::path(
    post,
    path = "/v1/reservations/{id}/commit",
    tag = "usage",
    params(("id" = String, Path, description = "the reservation id from /v1/check")),
    request_body = CommitBody,
    responses(
        (status = 200, description = "committed", body = crate::ingest::check::SettledView),
        (status = 400, description = "`invalid-body`: units missing or out of range", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-reservation`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`reservation-settled` (committed or released before) or `reservation-expired` (its units were given back; nothing charged)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn commit(
    State(s): State<AdminState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<crate::ingest::check::SettledView>, AdminError> {
    let b: CommitBody = crate::admin::extract::json_body(&body)?;
    Ok(Json(
        ingester(&s)
            .commit(&id, b.units, chrono::Utc::now())
            .await?,
    ))
}

/// Releases a held reservation: its units go back, nothing is charged.
#[utoipa::path(
    post,
    path = "/v1/reservations/{id}/release",
    tag = "usage",
    params(("id" = String, Path, description = "the reservation id from /v1/check")),
    responses(
        (status = 200, description = "released", body = crate::ingest::check::SettledView),
        (status = 404, description = "`unknown-reservation`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`reservation-settled` or `reservation-expired`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn release(
    State(s): State<AdminState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::ingest::check::SettledView>, AdminError> {
    Ok(Json(ingester(&s).release(&id, chrono::Utc::now()).await?))
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
    let out = ingester(&s).ingest(&batch, chrono::Utc::now()).await;
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
