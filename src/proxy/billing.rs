//! Self-service billing on the proxy listener (issue 13), next to `GET /_tollgate/usage`:
//!
//! | call | token | answer |
//! | --- | --- | --- |
//! | `GET /_tollgate/plans` | optional | the offered plans (ETag, 304 on `If-None-Match`); with a token the caller's plan is marked |
//! | `POST /_tollgate/checkout` `{plan, success_url, cancel_url?}` | required | 201 a Stripe Checkout URL |
//! | `POST /_tollgate/portal` `{return_url?}` | required | 201 a Stripe billing portal URL |
//! | `POST /_tollgate/subscription` `{plan}` | required | 200 the subscription on the new plan |
//! | `DELETE /_tollgate/subscription[?now=true]` | required | 200 the subscription, ending |
//! | `GET /_tollgate/invoices[?limit=&after=]` | required | 200 the caller's invoices, newest first |
//!
//! The customer is the token's, never a body field. Each call is free (never metered, never
//! forwarded), limited per customer with the usage read's guard, and refused as problem+json
//! (`billing::BillingError` says the status and `type`). The Stripe side is behind
//! `billing::SelfService`, set at assembly; without a `[stripe]` section the plans are still
//! listed, the invoices are an empty list, and every change is `stripe-not-configured`.
//!
//! Owns: these paths and their HTTP shapes. Must not touch: Stripe (only through the trait),
//! reservations, the usage pipeline.

use crate::billing::{BillingError, CheckoutRequest, MAX_BODY};
use crate::entitle::plan_of;
use crate::proxy::respond::Denial;
use crate::proxy::selfservice::write_json;
use crate::proxy::selfservice::Outcome;
use crate::proxy::state::{Shared, Snapshot};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, VARY};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// The route label of these calls in metrics and the access log.
pub const ROUTE: &str = "_tollgate/billing";

const PLANS: &str = "/_tollgate/plans";
const CHECKOUT: &str = "/_tollgate/checkout";
const PORTAL: &str = "/_tollgate/portal";
const SUBSCRIPTION: &str = "/_tollgate/subscription";
const INVOICES: &str = "/_tollgate/invoices";

/// Answers the billing paths; anything else is [`Outcome::NotMine`].
pub async fn handle(
    shared: &Shared,
    snap: &Snapshot,
    session: &mut Session,
    normalised_path: Option<&str>,
    request_id: &str,
) -> pingora::Result<Outcome> {
    let req = session.req_header();
    // Each path and the methods it takes (its `Allow`).
    let (path, allow): (&'static str, &'static str) =
        match normalised_path.unwrap_or(req.uri.path()) {
            PLANS => (PLANS, "GET, HEAD"),
            INVOICES => (INVOICES, "GET"),
            CHECKOUT => (CHECKOUT, "POST"),
            PORTAL => (PORTAL, "POST"),
            SUBSCRIPTION => (SUBSCRIPTION, "POST, DELETE"),
            _ => return Ok(Outcome::NotMine),
        };
    let method = req.method.clone();
    if !allow.split(", ").any(|m| m == method.as_str()) {
        return Ok(Outcome::Denied(Denial::MethodNotAllowed {
            allow: allow.into(),
        }));
    }
    let has_token = req.headers.contains_key(AUTHORIZATION);
    if path == PLANS && !has_token {
        let (body, etag) = snap.catalog.body(None);
        return plans(session, body, etag, "public, max-age=60", request_id).await;
    }
    let identity = match crate::proxy::selfservice::caller(shared, session).await {
        Ok(id) => id,
        Err(d) => return Ok(Outcome::Denied(d)),
    };
    let customer = identity.customer.as_str();
    if path == PLANS {
        let ent = shared.entitlements.get(customer);
        let current = identity
            .plan
            .as_deref()
            .and_then(|p| snap.config.plans.get(p))
            .or_else(|| plan_of(&snap.config, ent.as_deref()))
            .map(|p| p.name.as_str());
        let (body, etag) = snap.catalog.body(current);
        return plans(session, body, etag, "private, no-cache", request_id).await;
    }

    let body = match read_body(session).await? {
        Ok(b) => b,
        Err(e) => return Ok(Outcome::Denied(denial(e))),
    };
    let Some(billing) = shared.billing.get() else {
        return Ok(Outcome::Denied(denial(BillingError::StripeNotConfigured)));
    };
    let query = session
        .req_header()
        .uri
        .query()
        .unwrap_or_default()
        .to_string();
    let answer = match (path, method) {
        (INVOICES, _) => match page_params(&query) {
            Ok((after, limit)) => billing
                .invoices(customer, after, limit)
                .await
                .map(|p| (200, json(&p))),
            Err(e) => Err(e),
        },
        (CHECKOUT, _) => match parse::<CheckoutRequest>(&body) {
            Ok(r) => billing.checkout(customer, r).await.map(|s| (201, json(&s))),
            Err(e) => Err(e),
        },
        (PORTAL, _) => match parse::<PortalRequest>(&body) {
            Ok(r) => billing
                .portal(customer, r.return_url)
                .await
                .map(|s| (201, json(&s))),
            Err(e) => Err(e),
        },
        (_, Method::DELETE) => match now_param(&query) {
            Ok(now) => billing.cancel(customer, now).await.map(|c| (200, json(&c))),
            Err(e) => Err(e),
        },
        _ => match parse::<ChangeRequest>(&body) {
            Ok(r) => billing
                .change_plan(customer, r.plan)
                .await
                .map(|c| (200, json(&c))),
            Err(e) => Err(e),
        },
    };
    match answer {
        Ok((status, body)) => {
            write_json(session, status, body, request_id).await?;
            Ok(Outcome::Served)
        }
        Err(e) => {
            if e.status_and_kind().0 >= 500 {
                tracing::warn!(error = %e, %customer, request_id, "self-service billing call failed");
            }
            Ok(Outcome::Denied(denial(e)))
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalRequest {
    return_url: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeRequest {
    plan: Option<String>,
}

/// The refusal of a billing call as the problem to write.
fn denial(e: BillingError) -> Denial {
    let (status, kind) = e.status_and_kind();
    Denial::Billing {
        status,
        kind,
        detail: e.to_string(),
        members: e.members(),
        retry_after: (status == 503).then_some(1),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// An empty body is an empty object (every field optional; the handler says which it needs).
fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, BillingError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| BillingError::Invalid {
        key: "body",
        detail: format!("not the expected JSON object: {e}"),
    })
}

/// `?after=<invoice id>&limit=<1-100, default 20>`.
fn page_params(query: &str) -> Result<(Option<String>, i64), BillingError> {
    let (mut after, mut limit) = (None, 20);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "after" => after = Some(v.into_owned()),
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|l| (1..=100).contains(l))
                    .ok_or_else(|| BillingError::Invalid {
                        key: "limit",
                        detail: format!("must be from 1 to 100, got {v:?}"),
                    })?
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

/// `?now=true` (or `false`); anything else is refused with its key.
fn now_param(query: &str) -> Result<bool, BillingError> {
    let mut now = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "now" {
            now = match v.as_ref() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(BillingError::Invalid {
                        key: "now",
                        detail: format!("must be true or false, got {other:?}"),
                    })
                }
            };
        }
    }
    Ok(now)
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn read_body(session: &mut Session) -> pingora::Result<Result<Vec<u8>, BillingError>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_BODY {
            session.set_keepalive(None);
            return Ok(Err(BillingError::Invalid {
                key: "body",
                detail: format!("larger than {MAX_BODY} bytes"),
            }));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

/// The catalog, or 304 when the caller's `If-None-Match` already holds it.
async fn plans(
    session: &mut Session,
    body: Bytes,
    etag: String,
    cache: &'static str,
    request_id: &str,
) -> pingora::Result<Outcome> {
    let fresh = session
        .req_header()
        .headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*");
    let head_only = session.req_header().method == Method::HEAD;
    let status = if fresh { 304 } else { 200 };
    let mut head = ResponseHeader::build(status, Some(6))?;
    head.insert_header(ETAG, &etag)?;
    head.insert_header(CACHE_CONTROL, cache)?;
    head.insert_header(VARY, "Authorization")?;
    head.insert_header(crate::proxy::REQUEST_ID_HEADER, request_id)?;
    if fresh {
        session.write_response_header(Box::new(head), true).await?;
        return Ok(Outcome::Served);
    }
    head.insert_header(CONTENT_TYPE, "application/json")?;
    head.insert_header(CONTENT_LENGTH, body.len())?;
    session
        .write_response_header(Box::new(head), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(Outcome::Served)
}
