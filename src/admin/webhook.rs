//! The HTTP side of `POST /webhooks/stripe`: body cap, header extraction, the answer.
//!
//! Owns: reading the delivery. Must not touch: what it means (`stripe::StripeWebhook`), the
//! mapping of its refusals to statuses and problems (`From<StripeError> for AdminError`).

use crate::admin::error::{AdminError, Problem, StripeMissing};
use crate::admin::AdminState;
use crate::stripe::{StripeError, MAX_BODY};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Answer to a webhook Stripe may stop retrying.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookAnswer {
    /// Always true.
    received: bool,
    /// `applied`, `stale` (stored state was newer), `ignored`, `unmatched` (no tollgate customer
    /// named or linked) or `duplicate`.
    #[schema(example = "applied")]
    outcome: &'static str,
}

/// `POST /webhooks/stripe` (admin listener; no admin token: the signature is the credential).
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "stripe",
    params(("Stripe-Signature" = String, Header, description = "Stripe's `t=…,v1=…` signature of the raw body")),
    request_body(content = serde_json::Value, description = "a Stripe event, exactly as Stripe sent it", content_type = "application/json"),
    responses(
        (status = 200, description = "processed (or a duplicate, or an event tollgate ignores)", body = WebhookAnswer),
        (status = 400, description = "`invalid-signature` (missing, malformed, wrong or stale) or `invalid-body`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe-not-configured`: no `[stripe]` section", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`body-too-large`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "not processed (no webhook secret, or the ledger is unavailable): Stripe retries", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn receive(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WebhookAnswer>, AdminError> {
    let stripe = s
        .stripe
        .clone()
        .ok_or(AdminError::StripeNotConfigured(StripeMissing::Section))?;
    let bytes = read_capped(body).await.ok_or(StripeError::TooLarge)?;
    let payload =
        std::str::from_utf8(&bytes).map_err(|_| StripeError::BadBody("not UTF-8".into()))?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let outcome = stripe
        .handle(payload, signature)
        .await
        .map_err(AdminError::from)
        .inspect_err(|e| {
            // Stripe retries these (no secret, the ledger down): worth a warning here.
            if e.kind().0 == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(error = %e, "stripe webhook not processed");
            }
        })?;
    Ok(Json(WebhookAnswer {
        received: true,
        outcome: outcome.as_str(),
    }))
}

/// Past the cap we keep reading (and discarding) up to this much before answering, so that a
/// client still sending gets its 413 instead of a reset connection; beyond it, we stop.
const DRAIN_LIMIT: usize = 8 * MAX_BODY;

/// The body if it is at most [`MAX_BODY`]; `None` (after draining a bounded amount) otherwise,
/// or when the body cannot be read.
async fn read_capped(body: Body) -> Option<Vec<u8>> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        seen += chunk.len();
        if seen <= MAX_BODY {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            return None;
        }
    }
    (seen <= MAX_BODY).then_some(buf)
}
