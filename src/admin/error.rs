//! Every error the admin listener answers, and the one mapping from each to its status, problem
//! `type` suffix and detail (`impl IntoResponse for AdminError`). The body is the proxy's
//! [`Problem`] (`proxy::respond`), so a client reads one shape on both listeners; `invalid-config`
//! adds the list of every error of the refused document ([`InvalidConfig`]).
//!
//! Owns: the admin API's problem kinds, their statuses and wording, and the conversions from the
//! errors of the layers below (`?` in handlers). Must not touch: deciding whether a request is
//! refused (the handlers and the layers below do), the proxy's denials.

use crate::admin::extract::ACTOR_HEADER;
use crate::control::live_config::LiveError;
use crate::ledger::LedgerError;
use crate::quota::QuotaError;
use crate::stripe::reconcile::SyncError;
use crate::stripe::StripeError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::fmt;
use utoipa::openapi::schema::{ArrayBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

pub(crate) use crate::proxy::respond::Problem;

/// Why an admin call was refused or failed. `Display` is the problem's `detail`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// 401 `admin-unauthorized`: no admin bearer token, or a wrong one.
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    /// 400 `invalid-body`: the body is not what the call takes (what is wrong with it).
    #[error("{0}")]
    InvalidBody(String),
    /// 404 `unknown-reservation`: no reservation with that id.
    #[error("{0}")]
    UnknownReservation(String),
    /// 409 `reservation-settled`: committed or released before.
    #[error("{0}")]
    ReservationSettled(String),
    /// 409 `reservation-expired`: its TTL passed; its units were given back.
    #[error("{0}")]
    ReservationExpired(String),
    /// 409 `customer-exists`: provisioning an existing customer with other terms.
    #[error("{0}")]
    CustomerExists(String),
    /// A billing call refused (`billing::BillingError`): its own status, `type` and members,
    /// the same as on the proxy listener.
    #[error(transparent)]
    Billing(crate::billing::BillingError),
    /// 400 `invalid-query`: a query parameter is malformed (which, and how).
    #[error("{0}")]
    InvalidQuery(String),
    /// 400 `invalid-range`: a usage report's `from`/`to` are inverted, empty or too far apart.
    #[error("{0}")]
    InvalidRange(String),
    /// 400 `invalid-customer-id`: the path's customer id breaks the one id rule
    /// (`entitle::check_customer_id`).
    #[error("{0}")]
    InvalidCustomerId(&'static str),
    /// 400 `invalid-actor`: `X-Tollgate-Actor` is not 1-64 printable ASCII characters.
    #[error("{ACTOR_HEADER} must be 1-64 printable ASCII characters")]
    InvalidActor,
    /// 400 `invalid-if-match`: `If-Match` is neither `*` nor a config version.
    #[error("If-Match must be a config version, e.g. \"7\"")]
    InvalidIfMatch,
    /// 400 `invalid-config`: the resulting document breaks `check-config`'s rules (all listed).
    #[error("the config has {} error(s); nothing was changed", .0.len())]
    InvalidConfig(Vec<KeyedError>),
    /// 400 `invalid-signature`: a webhook's `Stripe-Signature` is missing, malformed, wrong or
    /// stale.
    #[error("{0}")]
    InvalidSignature(StripeError),
    /// 413 `body-too-large`: a webhook body over `stripe::MAX_BODY`.
    #[error("{}", StripeError::TooLarge)]
    BodyTooLarge,
    /// 404 `unknown-customer`.
    #[error("{}", why.detail(id))]
    UnknownCustomer { id: String, why: Unknown },
    /// 404 `unknown-report`: no uncertain usage report with that identifier.
    #[error("no uncertain usage report {0:?}")]
    UnknownReport(String),
    /// 404 `unknown-config-version`.
    #[error("no config version {0}")]
    UnknownConfigVersion(VersionRef),
    /// 404 `unknown-route`: a patch names no route of the live document.
    #[error("no entry {0:?} under routes")]
    UnknownRoute(String),
    /// 404 `unknown-plan`: a patch names no plan of the live document.
    #[error("no entry {0:?} under plans")]
    UnknownPlan(String),
    /// 412 `config-version-mismatch`: `If-Match` names a version no longer in force.
    #[error("{0}")]
    ConfigVersionMismatch(LiveError),
    /// 500 `stored-config-unreadable`: a stored version no longer applies to this instance.
    #[error("{0}")]
    StoredConfigUnreadable(LiveError),
    /// 503 `ledger-unavailable`.
    #[error(transparent)]
    LedgerUnavailable(#[from] LedgerError),
    /// 503 `quota-store-unavailable`.
    #[error(transparent)]
    QuotaStoreUnavailable(#[from] QuotaError),
    /// `stripe-not-configured`: 404, or 503 for a webhook without a signing secret (Stripe
    /// retries non-2xx for days: a retry is what that needs).
    #[error("{0}")]
    StripeNotConfigured(StripeMissing),
    /// 502 `stripe-unavailable`: the Stripe API failed.
    #[error("{0}")]
    StripeUnavailable(String),
    /// 409 `stripe-customer-linked`: the Stripe customer belongs to another customer.
    #[error("{stripe_customer} is already linked to customer {owner:?}")]
    StripeCustomerLinked {
        stripe_customer: String,
        owner: String,
    },
    /// 500 `openapi-unavailable`: the OpenAPI document did not serialize.
    #[error("{0}")]
    OpenapiUnavailable(String),
}

/// What `unknown-customer` means where it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// No entitlement row and no usage this period (customer reads, resume, credits).
    ThisPeriod,
    /// No entitlement row and no usage row, ever (usage reports).
    Ever,
    /// Not linked to a Stripe customer (portal sessions).
    NotLinked,
}

// === impl Unknown ===

impl Unknown {
    fn detail(self, id: &str) -> String {
        match self {
            Unknown::ThisPeriod => {
                format!("no customer {id:?}: no entitlement and no usage this period")
            }
            Unknown::Ever => format!("no customer {id:?}: no entitlement and no usage"),
            Unknown::NotLinked => format!("customer {id:?} is not linked to a Stripe customer"),
        }
    }
}

/// A config version named by a call: a number, or path text that is none (shown quoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VersionRef {
    Number(i64),
    Text(String),
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionRef::Number(n) => write!(f, "{n}"),
            VersionRef::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// What of Stripe's settings is missing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StripeMissing {
    /// The `[stripe]` section (404).
    #[error("this instance has no [stripe] section")]
    Section,
    /// The section or its secret key: the API side is off (404).
    #[error("no [stripe] section, or its secret key env var is unset")]
    SecretKey,
    /// The webhook signing secret, when a delivery arrives (503).
    #[error("{0}")]
    WebhookSecret(StripeError),
}

// === impl AdminError ===

impl AdminError {
    /// An `unknown-customer` for `id`.
    pub(crate) fn unknown_customer(id: &str, why: Unknown) -> AdminError {
        AdminError::UnknownCustomer {
            id: id.to_string(),
            why,
        }
    }

    /// The status and the problem `type` suffix: the one table of them.
    pub(crate) fn kind(&self) -> (StatusCode, &'static str) {
        use AdminError as E;
        match self {
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "admin-unauthorized"),
            E::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid-body"),
            E::CustomerExists(_) => (StatusCode::CONFLICT, "customer-exists"),
            E::UnknownReservation(_) => (StatusCode::NOT_FOUND, "unknown-reservation"),
            E::ReservationSettled(_) => (StatusCode::CONFLICT, "reservation-settled"),
            E::ReservationExpired(_) => (StatusCode::CONFLICT, "reservation-expired"),
            E::Billing(e) => {
                let (status, kind) = e.status_and_kind();
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    kind,
                )
            }
            E::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid-query"),
            E::InvalidRange(_) => (StatusCode::BAD_REQUEST, "invalid-range"),
            E::InvalidCustomerId(_) => (StatusCode::BAD_REQUEST, "invalid-customer-id"),
            E::InvalidActor => (StatusCode::BAD_REQUEST, "invalid-actor"),
            E::InvalidIfMatch => (StatusCode::BAD_REQUEST, "invalid-if-match"),
            E::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "invalid-config"),
            E::InvalidSignature(_) => (StatusCode::BAD_REQUEST, "invalid-signature"),
            E::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"),
            E::UnknownCustomer { .. } => (StatusCode::NOT_FOUND, "unknown-customer"),
            E::UnknownReport(_) => (StatusCode::NOT_FOUND, "unknown-report"),
            E::UnknownConfigVersion(_) => (StatusCode::NOT_FOUND, "unknown-config-version"),
            E::UnknownRoute(_) => (StatusCode::NOT_FOUND, "unknown-route"),
            E::UnknownPlan(_) => (StatusCode::NOT_FOUND, "unknown-plan"),
            E::ConfigVersionMismatch(_) => {
                (StatusCode::PRECONDITION_FAILED, "config-version-mismatch")
            }
            E::StoredConfigUnreadable(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored-config-unreadable",
            ),
            E::LedgerUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ledger-unavailable"),
            E::QuotaStoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "quota-store-unavailable")
            }
            E::StripeNotConfigured(StripeMissing::WebhookSecret(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "stripe-not-configured")
            }
            E::StripeNotConfigured(_) => (StatusCode::NOT_FOUND, "stripe-not-configured"),
            E::StripeUnavailable(_) => (StatusCode::BAD_GATEWAY, "stripe-unavailable"),
            E::StripeCustomerLinked { .. } => (StatusCode::CONFLICT, "stripe-customer-linked"),
            E::OpenapiUnavailable(_) => (StatusCode::INTERNAL_SERVER_ERROR, "openapi-unavailable"),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, suffix) = self.kind();
        let mut problem = Problem::new(
            suffix,
            status.canonical_reason().unwrap_or(""),
            status.as_u16(),
            self.to_string(),
        );
        if let AdminError::Billing(e) = &self {
            problem = problem.with_members(e.members());
        }
        // Plain strings and numbers: serializing cannot fail.
        let body = match self {
            AdminError::InvalidConfig(errors) => {
                serde_json::to_string(&InvalidConfig { problem, errors })
            }
            _ => serde_json::to_string(&problem),
        };
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.unwrap_or_default(),
        )
            .into_response()
    }
}

/// Every error the admin listener answers is problem+json, also those no handler wrote: axum's
/// own 404 (no route), 405 (wrong method; `Allow` kept), 413 (a body over the limit) and the
/// extractors' 4xx. Such a plain answer is replaced by a problem with the same status, its
/// text as `detail`, and the type suffix of its status.
pub(crate) async fn problem_for_plain_errors(resp: Response) -> Response {
    let status = resp.status();
    // Plain text or no body: what axum writes. A handler's own body (problem+json, or the
    // readiness JSON of `/readyz`'s 503) is left alone.
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return resp;
    }
    let suffix = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        s if s.is_server_error() => "internal-error",
        _ => "bad-request",
    };
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let detail = String::from_utf8_lossy(&text).trim().to_string();
    let detail = if detail.is_empty() {
        status.canonical_reason().unwrap_or("").to_string()
    } else {
        detail
    };
    let problem = Problem::new(
        suffix,
        status.canonical_reason().unwrap_or(""),
        status.as_u16(),
        detail,
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    let body = serde_json::to_string(&problem).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The one mapping from live-config refusals.
impl From<LiveError> for AdminError {
    fn from(e: LiveError) -> AdminError {
        match e {
            LiveError::Invalid(errors) => AdminError::InvalidConfig(
                errors
                    .0
                    .iter()
                    .map(|e| KeyedError {
                        key: e.key.clone(),
                        message: e.message.clone(),
                    })
                    .collect(),
            ),
            LiveError::UnknownVersion(v) => AdminError::UnknownConfigVersion(VersionRef::Number(v)),
            LiveError::UnknownEntry("routes", name) => AdminError::UnknownRoute(name),
            LiveError::UnknownEntry(_, name) => AdminError::UnknownPlan(name),
            e @ LiveError::VersionMismatch { .. } => AdminError::ConfigVersionMismatch(e),
            LiveError::Ledger(e) => AdminError::LedgerUnavailable(e),
            e @ LiveError::Stored(..) => AdminError::StoredConfigUnreadable(e),
        }
    }
}

/// The webhook's refusals.
impl From<StripeError> for AdminError {
    fn from(e: StripeError) -> AdminError {
        match e {
            StripeError::MissingSignature
            | StripeError::MalformedSignature
            | StripeError::BadSignature
            | StripeError::Stale(_) => AdminError::InvalidSignature(e),
            StripeError::BadBody(_) => AdminError::InvalidBody(e.to_string()),
            StripeError::TooLarge => AdminError::BodyTooLarge,
            StripeError::NoSecrets(_) => {
                AdminError::StripeNotConfigured(StripeMissing::WebhookSecret(e))
            }
            StripeError::Ledger(e) => AdminError::LedgerUnavailable(e),
        }
    }
}

/// A reconciler run that failed.
impl From<SyncError> for AdminError {
    fn from(e: SyncError) -> AdminError {
        match e {
            SyncError::Stripe(e) => AdminError::StripeUnavailable(e),
            SyncError::Ledger(e) => AdminError::LedgerUnavailable(e),
        }
    }
}

/// A Stripe API call that failed.
impl From<crate::ingest::check::CheckError> for AdminError {
    fn from(e: crate::ingest::check::CheckError) -> AdminError {
        use crate::ingest::check::CheckError as C;
        match e {
            C::Invalid { .. } => AdminError::InvalidBody(e.to_string()),
            C::UnknownReservation(_) => AdminError::UnknownReservation(e.to_string()),
            C::Settled { .. } => AdminError::ReservationSettled(e.to_string()),
            C::Expired(_) => AdminError::ReservationExpired(e.to_string()),
            C::Store(e) => AdminError::QuotaStoreUnavailable(e),
            C::Ledger(e) => AdminError::LedgerUnavailable(e),
        }
    }
}

impl From<crate::billing::BillingError> for AdminError {
    fn from(e: crate::billing::BillingError) -> AdminError {
        match e {
            crate::billing::BillingError::Ledger(e) => AdminError::LedgerUnavailable(e),
            e => AdminError::Billing(e),
        }
    }
}

impl From<stripe_api::StripeError> for AdminError {
    fn from(e: stripe_api::StripeError) -> AdminError {
        AdminError::StripeUnavailable(e.to_string())
    }
}

/// One error of a refused config document, exactly as `check-config` reports it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyedError {
    /// The key path, e.g. `routes[2].cost`.
    pub(crate) key: String,
    pub(crate) message: String,
}

/// The 400 `invalid-config` body: a [`Problem`] that also lists every error of the document.
#[derive(Serialize)]
pub(crate) struct InvalidConfig<'a> {
    #[serde(flatten)]
    problem: Problem<'a>,
    errors: Vec<KeyedError>,
}

/// `Problem`'s schema with `errors` added: derived from the same type, so it cannot drift
/// (utoipa would document a `flatten` as `allOf`, hiding `errors` from a plain reader).
impl PartialSchema for InvalidConfig<'_> {
    fn schema() -> RefOr<Schema> {
        let mut schema = Problem::schema();
        if let RefOr::T(Schema::Object(o)) = &mut schema {
            o.description = Some(
                "The 400 `invalid-config` problem: a `Problem` that lists every error of the \
                 document."
                    .into(),
            );
            o.properties.insert(
                "errors".into(),
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(KeyedError::name()))
                    .into(),
            );
            o.required.push("errors".into());
        }
        schema
    }
}

impl ToSchema for InvalidConfig<'_> {
    fn name() -> std::borrow::Cow<'static, str> {
        "InvalidConfig".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((KeyedError::name().into(), KeyedError::schema()));
        KeyedError::schemas(schemas);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn body(e: AdminError) -> (StatusCode, String, String) {
        let r = e.into_response();
        let status = r.status();
        let ct = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, ct, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// The four members, in the order the admin listener has always sent them.
    #[tokio::test]
    async fn problem_body_bytes() {
        let (status, ct, b) = body(AdminError::UnknownReport("tg_1".into())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(ct, "application/problem+json");
        assert_eq!(
            b,
            r#"{"type":"urn:tollgate:problem:unknown-report","title":"Not Found","status":404,"detail":"no uncertain usage report \"tg_1\""}"#
        );
    }

    /// `invalid-config` is the same four members followed by every error.
    #[tokio::test]
    async fn invalid_config_lists_errors() {
        let e = AdminError::InvalidConfig(vec![KeyedError {
            key: "routes[2].cost".into(),
            message: "must be ≥ 0".into(),
        }]);
        let (status, _, b) = body(e).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            b,
            r#"{"type":"urn:tollgate:problem:invalid-config","title":"Bad Request","status":400,"detail":"the config has 1 error(s); nothing was changed","errors":[{"key":"routes[2].cost","message":"must be ≥ 0"}]}"#
        );
    }

    /// The schema of `invalid-config` is `Problem`'s plus `errors`, all at the top level.
    #[test]
    fn invalid_config_schema() {
        let v = serde_json::to_value(InvalidConfig::schema()).unwrap();
        let props: Vec<&str> = v["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(props, ["detail", "errors", "status", "title", "type"]);
        assert_eq!(
            v["properties"]["errors"]["items"]["$ref"],
            "#/components/schemas/KeyedError"
        );
        assert!(v["required"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "errors"));
    }

    /// A webhook without a signing secret is 503 (Stripe retries); every other Stripe-off is 404.
    #[test]
    fn stripe_off_statuses() {
        let no_secret = AdminError::from(StripeError::NoSecrets("WHSEC".into()));
        assert_eq!(
            no_secret.kind(),
            (StatusCode::SERVICE_UNAVAILABLE, "stripe-not-configured")
        );
        assert_eq!(
            AdminError::StripeNotConfigured(StripeMissing::Section).kind(),
            (StatusCode::NOT_FOUND, "stripe-not-configured")
        );
    }
}
