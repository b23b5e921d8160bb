//! Entitlements across instances sharing one ledger (and one Redis): the one entitlement writer
//! and the follower that applies everyone else's writes.
//!
//! The ledger is the truth; every instance keeps all entitlements in process (the request path
//! never waits for them). Every change — the admin API, a Stripe webhook, the reconciler — goes
//! through [`EntitlementSync::write`]: **ledger → this instance's cache → audit → broadcast** of
//! the customer id on `{prefix}:entitlements`. Every other instance reloads that customer from
//! the ledger; missed messages are repaired by a full reload on every (re)subscribe and every
//! [`FULL_RELOAD`] (see [`super::broadcast`]).
//!
//! Runs on the control runtime. Must not touch: the request path, quota counters.

use super::broadcast::{self, Channel, Follower};
use crate::entitle::{Entitlement, Entitlements};
use crate::ledger::{AuditRecord, Ledger, LedgerError};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const FULL_RELOAD: Duration = Duration::from_secs(60);

/// How a change reaches the ledger.
#[derive(Debug, Clone, Copy)]
pub enum LedgerWrite<'a> {
    /// An operator's change: replaces the stored row (last write wins).
    Replace(&'a Entitlement),
    /// Stripe's order rule ([`Ledger::apply_stripe_state`]): written only over older state,
    /// keeping the operator's `suspended` and an unchanged status' `status_since`.
    StripeOrdered(&'a Entitlement),
    /// Already written by the caller's own transaction (a Stripe event and its claim).
    Written,
}

/// The audit row of a change: who, what, and the state before.
pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: String,
    pub before: Option<&'a Entitlement>,
}

/// The entitlement writer and follower of one instance.
pub struct EntitlementSync {
    ledger: Arc<dyn Ledger>,
    cache: Arc<Entitlements>,
    /// `None` without Redis (one instance: nothing to tell).
    channel: Option<Channel>,
}

// === impl EntitlementSync ===

impl EntitlementSync {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        cache: Arc<Entitlements>,
        channel: Option<Channel>,
    ) -> EntitlementSync {
        EntitlementSync {
            ledger,
            cache,
            channel,
        }
    }

    /// The one entitlement write: ledger → cache → audit → broadcast. Returns the entitlement
    /// now stored, or `None` when the ledger kept newer state (nothing else happens then).
    /// Only the ledger write can fail the call: once it is made, an audit or broadcast failure is
    /// logged (the change stands; other instances converge at their next full reload).
    pub async fn write(
        &self,
        customer: &str,
        write: LedgerWrite<'_>,
        audit: Option<Audit<'_>>,
    ) -> Result<Option<Entitlement>, LedgerError> {
        let stored = match write {
            LedgerWrite::Replace(e) => {
                self.ledger.put_customer(customer, e).await?;
                e.clone()
            }
            LedgerWrite::StripeOrdered(e) => {
                if !self.ledger.apply_stripe_state(customer, e).await? {
                    return Ok(None);
                }
                // The row kept fields of its own (`suspended`, `status_since`): read it back.
                self.ledger
                    .get_customer(customer)
                    .await?
                    .unwrap_or_else(|| e.clone())
            }
            LedgerWrite::Written => match self.ledger.get_customer(customer).await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(None),
                Err(e) => {
                    // The change is committed: the others can still load it, and this
                    // instance's cache catches up at its next full reload.
                    tracing::warn!(error = %e, %customer, "could not reload entitlement");
                    self.publish(customer).await;
                    return Ok(None);
                }
            },
        };
        self.cache.put(customer, stored.clone());
        if let Some(a) = audit {
            let json = |e: &Entitlement| serde_json::to_string(e).ok();
            let record = AuditRecord {
                action: a.action.into(),
                target: a.target,
                before: a.before.and_then(json),
                after: json(&stored),
            };
            if let Err(e) = self.ledger.insert_audit(a.actor, &record).await {
                tracing::warn!(error = %e, action = a.action, target = %record.target, "entitlement change not audited");
            }
        }
        self.publish(customer).await;
        Ok(Some(stored))
    }

    async fn publish(&self, customer: &str) {
        if let Some(channel) = &self.channel {
            if let Err(e) = channel.publish(customer).await {
                // The other instances still converge at their next full reload.
                tracing::warn!(error = %e, %customer, "could not broadcast entitlement change");
            }
        }
    }

    /// Follows the other instances' writes until `cancel` (returns at once without Redis).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.channel.is_none() {
            return;
        }
        broadcast::follow(self.channel.as_ref(), &*self, FULL_RELOAD, cancel).await;
    }
}

#[async_trait]
impl Follower for EntitlementSync {
    async fn resync(&self) {
        match self.ledger.all_customers().await {
            Ok(all) => {
                for (id, e) in all {
                    self.cache.put(&id, e);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not reload entitlements"),
        }
    }

    async fn message(&self, msg: &redis::Msg) {
        let customer: String = match msg.get_payload() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an entitlement broadcast that is not a customer id");
                return;
            }
        };
        match self.ledger.get_customer(&customer).await {
            Ok(Some(e)) => self.cache.put(&customer, e),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %customer, "could not reload entitlement"),
        }
    }
}
