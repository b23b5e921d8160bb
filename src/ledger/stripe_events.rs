//! The Stripe event log (`stripe_events`): a verified webhook event is stored once, then claimed
//! and applied once, whatever the redeliveries. The SQL here is written once for both backends.
//!
//! Must not write `customers` except through [`super::customers::stripe_upsert`], the one
//! order-safe Stripe write.

use chrono::Utc;

use super::customers::stripe_upsert;
use super::dialect::{Backend, ReadRow, Time};
use super::{LedgerError, SqlLedger, StripeEventRecord, StripeEventState, StripeFinish};
use crate::entitle::Entitlement;

const RECORD: &str = "INSERT INTO stripe_events (id, type, created, payload) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";

const PROCESSED: &str =
    "SELECT processed_at IS NOT NULL AS processed FROM stripe_events WHERE id = $1";

/// Of several concurrent deliveries exactly one sets `processed_at`: the claim.
const CLAIM: &str =
    "UPDATE stripe_events SET processed_at = $2 WHERE id = $1 AND processed_at IS NULL";

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

#[async_trait::async_trait]
impl<DB: Backend> StripeEventLedger for SqlLedger<DB> {
    async fn record_stripe_event(
        &self,
        event: &StripeEventRecord,
    ) -> Result<StripeEventState, LedgerError> {
        let op = "record_stripe_event";
        let inserted = DB::sql(RECORD)
            .bind(event.id.as_str())
            .bind(event.event_type.as_str())
            .bind(Time(event.created))
            .bind(event.payload.as_str())
            .execute(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        if inserted == 1 {
            return Ok(StripeEventState::New);
        }
        let row = DB::sql(PROCESSED)
            .bind(event.id.as_str())
            .fetch_one(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let processed: bool = row.col("processed").map_err(LedgerError::query(op))?;
        Ok(if processed {
            StripeEventState::Processed
        } else {
            StripeEventState::Pending
        })
    }

    async fn finish_stripe_event(
        &self,
        id: &str,
        apply: Option<(&str, &Entitlement)>,
    ) -> Result<StripeFinish, LedgerError> {
        let op = "finish_stripe_event";
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        // The claim comes first: a concurrent delivery waits for this transaction (Postgres: on
        // the row; SQLite: on the write lock), then finds processed_at set and claims nothing.
        let claimed = DB::sql(CLAIM)
            .bind(id)
            .bind(Time(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        if claimed == 0 {
            return Ok(StripeFinish::AlreadyProcessed);
        }
        let mut changed = false;
        if let Some((customer, e)) = apply {
            let done = stripe_upsert::<DB>(customer, e)
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::query(op))?;
            changed = done == 1;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(StripeFinish::Processed { changed })
    }
}
