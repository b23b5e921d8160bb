//! The Stripe event log concern of the ledger (`stripe_events`): a verified webhook event is
//! stored once, then claimed and applied once. Implemented by both backends.
//!
//! Must not write `customers` except with the order-safe Stripe upsert.

use super::{LedgerError, StripeEventRecord, StripeEventState, StripeFinish};
use crate::entitle::Entitlement;

/// Stripe webhook events: stored, then applied once.
#[async_trait::async_trait]
pub trait StripeEventLedger: Send + Sync {
    /// Stores a verified Stripe event unless its id is already stored (ON CONFLICT DO NOTHING),
    /// and says whether it is new, stored but unprocessed, or processed.
    async fn record_stripe_event(
        &self,
        event: &StripeEventRecord,
    ) -> Result<StripeEventState, LedgerError>;
    /// In one transaction: claims the stored event `id` (sets `processed_at` only if it is still
    /// NULL, so of several concurrent deliveries exactly one gets here), then applies `apply`
    /// with the ledger's Stripe upsert rule: the customer row is written only if its
    /// `updated_at` ≤ the entitlement's (`updated_at` = the event's `created`), so an older event
    /// never overwrites newer state; `suspended` (the operator's) is kept; `status_since` is kept
    /// when the status does not change. A failure rolls the claim back (the event stays pending).
    async fn finish_stripe_event(
        &self,
        id: &str,
        apply: Option<(&str, &Entitlement)>,
    ) -> Result<StripeFinish, LedgerError>;
}
