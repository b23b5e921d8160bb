//! The customers concern of the ledger: entitlements (`customers`) and their Stripe links
//! (`stripe_customers`). Implemented by both backends.
//!
//! Must not touch the Stripe event log or usage rows.

use super::LedgerError;
use crate::entitle::Entitlement;

/// Customers' entitlements and their links to Stripe customers.
#[async_trait::async_trait]
pub trait CustomerLedger: Send + Sync {
    /// The stored entitlement of a customer, `None` if unknown.
    async fn get_customer(&self, id: &str) -> Result<Option<Entitlement>, LedgerError>;
    /// Insert or replace a customer's entitlement (last write wins; no `updated_at` guard here).
    async fn put_customer(&self, id: &str, e: &Entitlement) -> Result<(), LedgerError>;
    /// Every customer, ordered by id: loaded into the entitlement cache at start.
    async fn all_customers(&self) -> Result<Vec<(String, Entitlement)>, LedgerError>;
    /// Writes a Stripe-derived entitlement with the same rule as
    /// [`super::StripeEventLedger::finish_stripe_event`] (only over older state; `suspended` and
    /// an unchanged status' `status_since` kept), without an event (the reconciler). Returns
    /// whether the row was written.
    async fn apply_stripe_state(
        &self,
        customer: &str,
        e: &Entitlement,
    ) -> Result<bool, LedgerError>;
    /// Links `customer` to the Stripe customer `stripe_customer` (`source` says who did it).
    /// Returns the Stripe customer it was linked to before, if any. A Stripe customer linked to
    /// another tollgate customer is an error (`LinkConflict`): an operator must unlink it first.
    async fn link_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
        source: &str,
    ) -> Result<Option<String>, LedgerError>;
    /// Every (tollgate customer, Stripe customer) link, ordered by customer.
    async fn stripe_links(&self) -> Result<Vec<(String, String)>, LedgerError>;
    /// One link, looked up from either side: `(customer, stripe customer)` of the link whose
    /// tollgate customer is `customer`, or (when `customer` is `None`) whose Stripe customer is
    /// `stripe_customer`.
    async fn stripe_link(
        &self,
        customer: Option<&str>,
        stripe_customer: Option<&str>,
    ) -> Result<Option<(String, String)>, LedgerError>;
}
