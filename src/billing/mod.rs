//! Self-service billing (issue 13): which plans are offered ([`catalog`]) and what a caller does
//! about their own subscription through Stripe: a Checkout session, a billing portal session, a
//! plan change, a cancellation, and their invoices as Stripe's webhooks stored them
//! ([`service`]).
//!
//! The proxy listener's `/_tollgate/*` handlers (`proxy::billing`) call [`SelfService`], a trait
//! defined here and implemented by [`service::Billing`] over the Stripe API: the request path
//! never imports Stripe, and it is wired at assembly (`server`). The customer is always the
//! caller's token's, never a body field.
//!
//! Owns: the rules a self-service change must pass (a public plan with a Stripe price, an allowed
//! redirect host, not the current plan, an existing subscription), the Stripe calls a change
//! makes, the entitlement written from Stripe's answer (through the one entitlement writer,
//! order-safe), and [`BillingError`] with its problem `type` and status. Must not touch: HTTP
//! (either listener renders the error), quota counters, the usage pipeline.

use crate::ledger::LedgerError;
use chrono::{DateTime, Utc};
use serde::Serialize;

pub mod catalog;
pub mod service;
pub mod summary;

/// Largest self-service request body (a plan name and two URLs).
pub const MAX_BODY: usize = 16 * 1024;

/// `POST /_tollgate/checkout`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub plan: Option<String>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// A Stripe-hosted page to send the caller to (Checkout or the billing portal).
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    /// Stripe's session id (`cs_…`, `bps_…`).
    pub id: String,
    pub url: String,
    /// The plan a checkout subscribes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// What a plan change or cancellation left, as Stripe answered it and as now enforced.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    pub subscription: String,
    /// The plan in force now.
    pub plan: Option<String>,
    pub status: String,
    /// The subscription ends at `period_end` (a cancellation at the period's end).
    pub cancel_at_period_end: bool,
    pub period_end: Option<DateTime<Utc>>,
}

/// Why a self-service call was refused; nothing changed locally or in Stripe unless a Stripe
/// call answered.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// 400 `invalid-request`: `key` names the field.
    #[error("{key}: {detail}")]
    Invalid { key: &'static str, detail: String },
    /// 404 `stripe-not-configured`: no `[stripe]` section or no secret key on this instance.
    #[error(
        "Stripe is not configured on this instance: checkout, portal and plan changes are off"
    )]
    StripeNotConfigured,
    /// 409 `plan-unchanged`.
    #[error("the subscription is already on plan {0:?}")]
    PlanUnchanged(String),
    /// 409 `no-subscription`: nothing to change or cancel; a checkout starts one.
    #[error("no subscription to change: start one with POST /_tollgate/checkout")]
    NoSubscription,
    /// 409 `subscription-exists`: a checkout while a subscription is in force.
    #[error(
        "a subscription on plan {0:?} is in force: change it with POST /_tollgate/subscription"
    )]
    SubscriptionExists(String),
    /// 409 `no-stripe-customer`: the portal needs a Stripe customer, made by a first checkout.
    #[error("no Stripe customer yet: a first checkout (POST /_tollgate/checkout) makes one")]
    NoStripeCustomer,
    /// Stripe refused or failed the call: `status` is Stripe's HTTP status, `code` its error
    /// code (`card_declined`, `resource_missing`, …).
    #[error("Stripe answered {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Stripe {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// 502 `stripe-unavailable`: no answer from Stripe (network, timeout, an unreadable body).
    #[error("Stripe unavailable: {0}")]
    StripeUnavailable(String),
    /// 503 `ledger-unavailable`.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

// === impl BillingError ===

impl BillingError {
    /// HTTP status and problem `type` suffix, the same on both listeners.
    pub fn status_and_kind(&self) -> (u16, &'static str) {
        match self {
            BillingError::Invalid { .. } => (400, "invalid-request"),
            BillingError::StripeNotConfigured => (404, "stripe-not-configured"),
            BillingError::PlanUnchanged(_) => (409, "plan-unchanged"),
            BillingError::NoSubscription => (409, "no-subscription"),
            BillingError::SubscriptionExists(_) => (409, "subscription-exists"),
            BillingError::NoStripeCustomer => (409, "no-stripe-customer"),
            // A declined card is the caller's to fix; a 429 is Stripe's load (retry); anything
            // else Stripe refused is this deployment's (a price that does not exist): a gateway
            // error, with Stripe's code for the operator.
            BillingError::Stripe { status: 402, .. } => (402, "stripe-refused"),
            BillingError::Stripe { status: 429, .. } => (503, "stripe-unavailable"),
            BillingError::Stripe { status, .. } if *status >= 500 => (502, "stripe-unavailable"),
            BillingError::Stripe { .. } => (502, "stripe-refused"),
            BillingError::StripeUnavailable(_) => (502, "stripe-unavailable"),
            BillingError::Ledger(_) => (503, "ledger-unavailable"),
        }
    }

    /// Members a program reads besides the problem's four: `key`, `stripe_status`,
    /// `stripe_code`, `checkout`.
    pub fn members(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            BillingError::Invalid { key, .. } => vec![("key", (*key).into())],
            BillingError::NoSubscription => vec![("checkout", "/_tollgate/checkout".into())],
            BillingError::SubscriptionExists(_) => {
                vec![("change", "/_tollgate/subscription".into())]
            }
            BillingError::Stripe { status, code, .. } => {
                let mut m = vec![("stripe_status", (*status).into())];
                if let Some(c) = code {
                    m.push(("stripe_code", c.clone().into()));
                }
                m
            }
            _ => Vec::new(),
        }
    }
}

/// What the proxy listener's self-service billing calls (implemented by [`service::Billing`]).
#[async_trait::async_trait]
pub trait SelfService: Send + Sync {
    /// A Stripe Checkout session subscribing `customer` to a public plan.
    async fn checkout(&self, customer: &str, req: CheckoutRequest)
        -> Result<Session, BillingError>;
    /// A billing portal session for `customer`'s Stripe customer.
    async fn portal(
        &self,
        customer: &str,
        return_url: Option<String>,
    ) -> Result<Session, BillingError>;
    /// Moves `customer`'s subscription to `plan` (Stripe subscription update, proration as
    /// configured); the entitlement follows at once.
    async fn change_plan(
        &self,
        customer: &str,
        plan: Option<String>,
    ) -> Result<Change, BillingError>;
    /// Cancels `customer`'s subscription at the period's end, or `now` where allowed.
    async fn cancel(&self, customer: &str, now: bool) -> Result<Change, BillingError>;
    /// A page of `customer`'s invoices, newest first, after the invoice `after`.
    async fn invoices(
        &self,
        customer: &str,
        after: Option<String>,
        limit: i64,
    ) -> Result<InvoicePage, BillingError>;
}

/// One invoice as callers and operators see it. Amounts are integer minor units of
/// `currency` (cents for `usd`), as Stripe states them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Invoice {
    /// Stripe's id (`in_…`).
    pub id: String,
    pub number: Option<String>,
    /// `draft`, `open`, `paid`, `uncollectible` or `void`.
    pub status: String,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    /// Stripe's page where the customer sees and pays it.
    pub hosted_invoice_url: Option<String>,
    pub created: DateTime<Utc>,
}

impl From<crate::ledger::InvoiceRecord> for Invoice {
    fn from(r: crate::ledger::InvoiceRecord) -> Invoice {
        Invoice {
            id: r.id,
            number: r.number,
            status: r.status,
            currency: r.currency,
            amount_due: r.amount_due,
            amount_paid: r.amount_paid,
            amount_remaining: r.amount_remaining,
            total: r.total,
            period_start: r.period_start,
            period_end: r.period_end,
            hosted_invoice_url: r.hosted_invoice_url,
            created: r.created,
        }
    }
}

/// A page of invoices, newest first; `next` is the `after` of the next page.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InvoicePage {
    pub invoices: Vec<Invoice>,
    pub next: Option<String>,
}
