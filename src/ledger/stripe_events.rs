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
/// `unmatched`: the event named no known customer (listed for the operator).
const CLAIM: &str = "UPDATE stripe_events SET processed_at = $2, unmatched = $3 \
     WHERE id = $1 AND processed_at IS NULL";

/// Unmatched events, newest first.
const UNMATCHED: &str = "SELECT id, type, created, received_at, payload FROM stripe_events \
     WHERE unmatched ORDER BY received_at DESC, id LIMIT $1";

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
        unmatched: bool,
    ) -> Result<StripeFinish, LedgerError>;
    /// The newest `limit` processed events that named no known customer.
    async fn unmatched_stripe_events(
        &self,
        limit: i64,
    ) -> Result<Vec<UnmatchedStripeEvent>, LedgerError>;
}

/// A stored event that named no known customer.
#[derive(Debug, Clone)]
pub struct UnmatchedStripeEvent {
    pub id: String,
    pub event_type: String,
    pub created: chrono::DateTime<Utc>,
    pub received_at: chrono::DateTime<Utc>,
    pub payload: String,
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
        unmatched: bool,
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
            .bind(unmatched)
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

    async fn unmatched_stripe_events(
        &self,
        limit: i64,
    ) -> Result<Vec<UnmatchedStripeEvent>, LedgerError> {
        let op = "unmatched_stripe_events";
        let rows = DB::sql(UNMATCHED)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| {
                Ok(UnmatchedStripeEvent {
                    id: r.col("id")?,
                    event_type: r.col("type")?,
                    created: r.time("created")?,
                    received_at: r.time("received_at")?,
                    payload: r.col("payload")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{DateTime, Duration};

    use super::*;
    use crate::entitle::Status;
    use crate::ledger::test_support::{contract, sub, t0};
    use crate::ledger::Ledger;

    fn stripe_event(id: &str, created: DateTime<Utc>) -> StripeEventRecord {
        StripeEventRecord {
            id: id.into(),
            event_type: "customer.subscription.updated".into(),
            created,
            payload: format!("{{\"id\":\"{id}\"}}"),
        }
    }

    async fn check_stripe_events(ledger: Arc<dyn Ledger>) {
        let t = t0();
        let e1 = stripe_event("evt_1", t);
        assert_eq!(
            ledger.record_stripe_event(&e1).await.expect("record"),
            StripeEventState::New
        );
        // Stored, not finished (a crash between the two steps): the redelivery processes it.
        assert_eq!(
            ledger.record_stripe_event(&e1).await.expect("again"),
            StripeEventState::Pending
        );
        let pro = sub("pro", Status::Active, t);
        assert_eq!(
            ledger
                .finish_stripe_event("evt_1", Some(("acme", &pro)), false)
                .await
                .expect("finish"),
            StripeFinish::Processed { changed: true }
        );
        assert_eq!(
            ledger.record_stripe_event(&e1).await.expect("third"),
            StripeEventState::Processed
        );
        // A second finish (a concurrent delivery that lost) writes nothing.
        let free = sub("free", Status::Active, t + Duration::seconds(9));
        assert_eq!(
            ledger
                .finish_stripe_event("evt_1", Some(("acme", &free)), false)
                .await
                .expect("finish again"),
            StripeFinish::AlreadyProcessed
        );
        assert_eq!(ledger.get_customer("acme").await.expect("get"), Some(pro));

        // Newer event: applied; the operator's suspension and the status' start are kept.
        let mut suspended = sub("pro", Status::Active, t + Duration::microseconds(1));
        suspended.suspended = true;
        ledger
            .put_customer("acme", &suspended)
            .await
            .expect("suspend");
        ledger
            .record_stripe_event(&stripe_event("evt_2", t + Duration::seconds(10)))
            .await
            .expect("record 2");
        let mut newer = sub("team", Status::Active, t + Duration::seconds(10));
        newer.cancel_at_period_end = true;
        newer.trial_end = Some(t - Duration::days(14));
        assert_eq!(
            ledger
                .finish_stripe_event("evt_2", Some(("acme", &newer)), false)
                .await
                .expect("finish 2"),
            StripeFinish::Processed { changed: true }
        );
        let got = ledger
            .get_customer("acme")
            .await
            .expect("get")
            .expect("row");
        assert_eq!(got.plan.as_deref(), Some("team"));
        assert!(got.suspended, "suspension is the operator's, not Stripe's");
        assert_eq!(got.status_since, Some(t + Duration::microseconds(1)));
        assert_eq!(got.updated_at, t + Duration::seconds(10));
        assert!(got.cancel_at_period_end);
        assert_eq!(got.trial_end, Some(t - Duration::days(14)));

        // Older event, arriving late: marked processed, customer unchanged.
        ledger
            .record_stripe_event(&stripe_event("evt_0", t + Duration::seconds(5)))
            .await
            .expect("record 0");
        let older = sub("free", Status::Canceled, t + Duration::seconds(5));
        assert_eq!(
            ledger
                .finish_stripe_event("evt_0", Some(("acme", &older)), false)
                .await
                .expect("finish 0"),
            StripeFinish::Processed { changed: false }
        );
        assert_eq!(
            ledger
                .get_customer("acme")
                .await
                .expect("get")
                .expect("row"),
            got
        );
        // Nothing to apply (an ignored event type): only marked processed.
        ledger
            .record_stripe_event(&stripe_event("evt_x", t))
            .await
            .expect("record x");
        assert_eq!(
            ledger
                .finish_stripe_event("evt_x", None, false)
                .await
                .expect("x"),
            StripeFinish::Processed { changed: false }
        );
    }

    async fn check_stripe_finish_is_exclusive(ledger: Arc<dyn Ledger>) {
        ledger
            .record_stripe_event(&stripe_event("evt_c", t0()))
            .await
            .expect("record");
        let e = sub("pro", Status::Active, t0());
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (l, e) = (ledger.clone(), e.clone());
                tokio::spawn(async move {
                    l.finish_stripe_event("evt_c", Some(("acme", &e)), false)
                        .await
                })
            })
            .collect();
        let mut processed = 0;
        for t in tasks {
            match t.await.expect("join").expect("finish") {
                StripeFinish::Processed { .. } => processed += 1,
                StripeFinish::AlreadyProcessed => {}
            }
        }
        assert_eq!(processed, 1);
    }

    contract!(
        "Stripe events are stored once, claimed once, and never apply older state.",
        check_stripe_events,
        pg_stripe_events,
        sqlite_stripe_events
    );

    contract!(
        "of 10 concurrent finishes of one event exactly one processes it.",
        check_stripe_finish_is_exclusive,
        pg_stripe_finish_is_exclusive,
        sqlite_stripe_finish_is_exclusive,
        multi_thread
    );
}
