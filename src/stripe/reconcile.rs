//! The reconciler: pulls every subscription from Stripe (`GET /v1/subscriptions?status=all`,
//! following `has_more` / `starting_after`) and repairs what webhooks missed: entitlements that
//! differ from what Stripe says, and missing customer links. Runs at start, every
//! `stripe.sync_interval` (0: never periodically) and on `POST /admin/stripe/sync`; one run at a
//! time. Every change is written with the webhook's order rule (never over newer state), audited
//! (`audit_log`, actor `stripe-sync`), put in this instance's cache and broadcast.
//!
//! The scheduled runs (at start and every `sync_interval`) are one instance's job at a time:
//! each takes the ledger lease `stripe-reconcile` for 90 % of the interval (at least a minute)
//! and an instance that finds it held skips that round, so N instances do not list every
//! subscription N times and audit each repair N times. `POST /admin/stripe/sync` always runs.
//!
//! Decisions: a customer with several subscriptions takes the one in the best standing (active or
//! trialing, then past_due, then the rest), the newest among equals; a customer none of whose
//! subscriptions Stripe lists is left alone (an operator may have set it through the admin API).
//! A page that fails with 429/5xx/transport errors is retried (5 tries, backing off); the run
//! fails as a whole only if a page still fails, before anything is written.

use super::api::StripeApi;
use super::events::{entitlement_for, same_terms, stripe_customer_of, subscription_facts};
use super::report::{classify, Delivery};
use super::{link_or_log, StripeError};
use crate::control::entitlement_sync::{Audit, EntitlementSync, LedgerWrite};
use crate::entitle::{Entitlement, Status};
use crate::ledger::Ledger;
use crate::proxy::state::SnapshotCell;
use chrono::Utc;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Subscriptions per page asked of Stripe (its maximum).
const PAGE: &str = "100";
/// Tries per page.
const TRIES: u32 = 5;
/// Wait before a page's second try; doubles per try up to [`PAGE_RETRY_MAX`].
const PAGE_RETRY_FIRST: Duration = Duration::from_millis(200);
const PAGE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Most pages one run follows (100 000 subscriptions): a guard against a looping cursor.
const MAX_PAGES: usize = 1_000;

/// Why a run failed (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("Stripe: {0}")]
    Stripe(String),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

impl From<StripeError> for SyncError {
    fn from(e: StripeError) -> SyncError {
        match e {
            StripeError::Ledger(e) => SyncError::Ledger(e),
            other => SyncError::Stripe(other.to_string()),
        }
    }
}

/// One repaired customer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = SyncChange)]
pub struct Change {
    pub customer: String,
    pub subscription: String,
    pub before: Option<Entitlement>,
    pub after: Entitlement,
}

/// What a run found and did (the answer of `POST /admin/stripe/sync`).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct SyncReport {
    pub pages: usize,
    /// Failed page requests that were retried.
    pub retries: usize,
    pub subscriptions: usize,
    /// Subscriptions naming no tollgate customer (no metadata, no link).
    pub unmatched: usize,
    pub changed: Vec<Change>,
    /// Customers newly linked to their Stripe customer.
    pub linked: Vec<String>,
}

/// The reconciler. One per process; `sync` runs one at a time.
pub struct Reconciler {
    ledger: Arc<dyn Ledger>,
    api: StripeApi,
    settings: crate::config::StripeSettings,
    config: SnapshotCell,
    entitlements: Arc<EntitlementSync>,
    running: tokio::sync::Mutex<()>,
    /// This process, as the holder of the scheduled-run lease.
    instance: String,
}

/// The ledger lease naming the instance whose turn the scheduled runs are.
const LEASE: &str = "stripe-reconcile";

// === impl Reconciler ===

impl Reconciler {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        api: StripeApi,
        settings: crate::config::StripeSettings,
        config: SnapshotCell,
        entitlements: Arc<EntitlementSync>,
    ) -> Reconciler {
        Reconciler {
            ledger,
            api,
            settings,
            config,
            entitlements,
            running: tokio::sync::Mutex::new(()),
            instance: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// Whether this instance does the scheduled run now (it holds, or just took, the lease).
    /// A ledger error says yes: the run then fails on the ledger and says so.
    async fn my_turn(&self) -> bool {
        let hold = (self.settings.sync_interval * 9 / 10).max(Duration::from_secs(60));
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX);
        match self
            .ledger
            .try_lease(LEASE, &self.instance, now, until)
            .await
        {
            Ok(mine) => mine,
            Err(e) => {
                tracing::warn!(error = %e, "reconciler lease unavailable; running anyway");
                true
            }
        }
    }

    /// Runs at start, then every `sync_interval` (if not zero), until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if !self.my_turn().await {
                tracing::debug!("another instance reconciles with Stripe this round");
            } else {
                match self.sync().await {
                    Ok(r) => tracing::info!(
                        pages = r.pages,
                        subscriptions = r.subscriptions,
                        changed = r.changed.len(),
                        linked = r.linked.len(),
                        "Stripe reconciliation done"
                    ),
                    Err(e) => tracing::warn!(error = %e, "Stripe reconciliation failed"),
                }
            }
            if self.settings.sync_interval.is_zero() {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.sync_interval) => {}
            }
        }
    }

    /// One run (waits for a run in progress to end first).
    pub async fn sync(&self) -> Result<SyncReport, SyncError> {
        let _one = self.running.lock().await;
        let mut report = SyncReport::default();
        // As of the start of the listing: a webhook created later wins over what we read.
        let as_of = Utc::now();
        let subs = self.list_all(&mut report).await?;
        report.subscriptions = subs.len();
        let mut links: BTreeMap<String, String> = self
            .ledger
            .stripe_links()
            .await?
            .into_iter()
            .map(|(customer, stripe)| (stripe, customer))
            .collect();
        // Customer → the subscription in the best standing.
        let mut best: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for sub in subs {
            let facts = subscription_facts(&sub, &self.settings.customer_metadata_key);
            let stripe_customer = stripe_customer_of(&sub);
            let customer = facts
                .customer
                .clone()
                .or_else(|| stripe_customer.as_ref().and_then(|s| links.get(s).cloned()));
            let Some(customer) = customer else {
                report.unmatched += 1;
                continue;
            };
            if let (Some(_), Some(s)) = (&facts.customer, &stripe_customer) {
                if links.get(s) != Some(&customer)
                    && link_or_log(&*self.ledger, &customer, s, "sync", "stripe-sync").await?
                {
                    links.insert(s.clone(), customer.clone());
                    report.linked.push(customer.clone());
                }
            }
            let better = match best.get(&customer) {
                None => true,
                Some(current) => standing(&sub) > standing(current),
            };
            if better {
                best.insert(customer, sub);
            }
        }
        let snap = self.config.load_full();
        for (customer, sub) in best {
            let facts = subscription_facts(&sub, &self.settings.customer_metadata_key);
            let Some(mut want) =
                entitlement_for(&snap.config, &self.settings.prices, &facts, false, as_of)
            else {
                continue;
            };
            let before = self.ledger.get_customer(&customer).await?;
            if let Some(b) = &before {
                if same_terms(b, &want) {
                    continue;
                }
                if b.status == want.status {
                    want.status_since = b.status_since;
                }
                want.suspended = b.suspended;
            }
            let audit = Audit {
                actor: "stripe-sync",
                action: "stripe.sync",
                target: customer.clone(),
                before: before.as_ref(),
            };
            let written = self
                .entitlements
                .write(&customer, LedgerWrite::StripeOrdered(&want), Some(audit))
                .await?;
            let Some(after) = written else {
                continue; // a newer webhook got there first
            };
            tracing::info!(%customer, plan = after.plan.as_deref(), status = after.status.as_str(), "entitlement repaired from Stripe");
            report.changed.push(Change {
                customer,
                subscription: facts.id,
                before,
                after,
            });
        }
        Ok(report)
    }

    /// Every subscription, following the cursor; each page retried on transient failures.
    async fn list_all(&self, report: &mut SyncReport) -> Result<Vec<serde_json::Value>, SyncError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.page(after.as_deref(), report).await?;
            report.pages += 1;
            let data = page
                .get("data")
                .and_then(|d| d.as_array())
                .cloned()
                .unwrap_or_default();
            let has_more = page.get("has_more").and_then(|h| h.as_bool()) == Some(true);
            let last = data
                .last()
                .and_then(|s| s.get("id"))
                .and_then(|i| i.as_str())
                .map(String::from);
            all.extend(data);
            match (has_more, last) {
                (true, Some(last)) => after = Some(last),
                _ => return Ok(all),
            }
        }
        Err(SyncError::Stripe(format!(
            "more than {MAX_PAGES} pages of subscriptions"
        )))
    }

    async fn page(
        &self,
        after: Option<&str>,
        report: &mut SyncReport,
    ) -> Result<serde_json::Value, SyncError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self.api.list_subscriptions(PAGE, after).await;
            let err = match r {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match classify::<()>(Err(err)) {
                Delivery::Transient(e) | Delivery::Unknown(e) if tries < TRIES => {
                    report.retries += 1;
                    tracing::warn!(error = %e, tries, "listing subscriptions failed; retrying");
                    let delay = crate::backoff::wait(PAGE_RETRY_FIRST, tries, PAGE_RETRY_MAX);
                    tokio::time::sleep(delay).await;
                }
                Delivery::Transient(e) | Delivery::Unknown(e) | Delivery::Rejected(e) => {
                    return Err(SyncError::Stripe(e))
                }
                Delivery::Delivered | Delivery::AlreadyExists => {
                    return Err(SyncError::Stripe("unexpected answer".into()))
                }
            }
        }
    }
}

/// Orders a customer's subscriptions: good standing first, then the newest.
fn standing(sub: &serde_json::Value) -> (u8, i64) {
    let status = sub
        .get("status")
        .and_then(|s| s.as_str())
        .and_then(Status::parse);
    let rank = match status {
        Some(Status::Active | Status::Trialing) => 3,
        Some(Status::PastDue) => 2,
        Some(Status::Unpaid | Status::Paused | Status::Incomplete) => 1,
        _ => 0,
    };
    let created = sub.get("created").and_then(|c| c.as_i64()).unwrap_or(0);
    (rank, created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Active beats past_due beats canceled; among equals the newest wins.
    #[test]
    fn standing_orders_subscriptions() {
        let s = |status: &str, created: i64| json!({"status": status, "created": created});
        assert!(standing(&s("active", 1)) > standing(&s("past_due", 9)));
        assert!(standing(&s("past_due", 1)) > standing(&s("canceled", 9)));
        assert!(standing(&s("trialing", 5)) > standing(&s("active", 4)));
        assert!(standing(&s("canceled", 5)) > standing(&s("bogus", 4)));
    }
}
