//! Usage reported as events (`ingested_events`, issue 14): each (source, id) once. The marker
//! row and the usage row it makes are written in one transaction, so an event is either counted
//! with its usage row or not at all, whatever the retries and concurrent deliveries.
//!
//! Must not touch: quota counters (the caller adjusts them after the commit).

use chrono::{DateTime, Utc};

use super::dialect::{Backend, Time};
use super::{LedgerError, SqlLedger, UsageEvent};

/// One event to record: its identity, the usage row it makes, and its dimensions (JSON).
#[derive(Debug, Clone)]
pub struct IngestRecord {
    pub source: String,
    pub id: String,
    pub usage: UsageEvent,
    pub dimensions: Option<String>,
    pub received_at: DateTime<Utc>,
}

const MARK: &str = "INSERT INTO ingested_events \
       (source, id, usage_id, customer, meter, value, time, dimensions, received_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (source, id) DO NOTHING";

const USAGE_ROW: &str = "INSERT INTO usage_events \
       (id, ts, customer, meter, units, route, status, latency_us, request_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Usage events reported outside the request path.
#[async_trait::async_trait]
pub trait IngestLedger: Send + Sync {
    /// Records `e` and its usage row unless its (source, id) is recorded: `true` when new.
    async fn ingest_event(&self, e: &IngestRecord) -> Result<bool, LedgerError>;
}

#[async_trait::async_trait]
impl<DB: Backend> IngestLedger for SqlLedger<DB> {
    async fn ingest_event(&self, e: &IngestRecord) -> Result<bool, LedgerError> {
        let op = "ingest_event";
        let u = &e.usage;
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let marked = DB::sql(MARK)
            .bind(e.source.as_str())
            .bind(e.id.as_str())
            .bind(u.id)
            .bind(u.customer.as_str())
            .bind(u.meter.as_str())
            .bind(u.units)
            .bind(Time(u.ts))
            .bind(e.dimensions.as_deref())
            .bind(Time(e.received_at))
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        if marked == 0 {
            return Ok(false);
        }
        DB::sql(USAGE_ROW)
            .bind(u.id)
            .bind(Time(u.ts))
            .bind(u.customer.as_str())
            .bind(u.meter.as_str())
            .bind(u.units)
            .bind(u.route.as_str())
            .bind(i32::from(u.status))
            .bind(u.latency_us)
            .bind(u.request_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ledger::test_support::{contract, t0};
    use crate::ledger::Ledger;

    fn record(source: &str, id: &str, units: i64) -> IngestRecord {
        IngestRecord {
            source: source.into(),
            id: id.into(),
            usage: UsageEvent {
                id: uuid::Uuid::now_v7(),
                ts: t0(),
                customer: "acme".into(),
                meter: "sms".into(),
                units,
                route: "_tollgate/events".into(),
                status: 200,
                latency_us: 0,
                request_id: id.into(),
            },
            dimensions: Some(r#"{"country":"FR"}"#.into()),
            received_at: t0(),
        }
    }

    async fn check_ingest(ledger: Arc<dyn Ledger>) {
        assert!(ledger
            .ingest_event(&record("app", "e1", 5))
            .await
            .expect("new"));
        // A retry (a new usage id, the same event) is a duplicate and adds no row.
        assert!(!ledger
            .ingest_event(&record("app", "e1", 5))
            .await
            .expect("again"));
        // The same id from another source is another event.
        assert!(ledger
            .ingest_event(&record("other", "e1", 7))
            .await
            .expect("other"));
        let day = chrono::Duration::days(1);
        let totals = ledger
            .usage_totals("acme", "sms", t0() - day, t0() + day)
            .await
            .expect("totals");
        assert_eq!(totals, (12, 2));
    }

    contract!(
        "an ingested event is recorded once by (source, id), with its usage row.",
        check_ingest,
        pg_ingest,
        sqlite_ingest
    );
}
