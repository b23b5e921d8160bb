//! Usage rows (`usage_events`): the batched insert the flusher calls, and the sums the admin API
//! and tests read. The SQL here is written once for both backends.
//!
//! Must not touch a row's reporting state (`report_id`, `reported_at`): that is `reports`'.

use chrono::{DateTime, Utc};

use super::dialect::{Backend, ReadRow, Time};
use super::{
    LedgerError, SqlLedger, UsageEvent, UsageGroup, UsageGroupBy, UsageQuery, INSERT_CHUNK,
};

/// The head of the usage insert: the backend adds its row source ([`Backend::insert_usage_chunk`])
/// and then [`INSERT_USAGE_TAIL`].
pub(crate) const INSERT_USAGE_HEAD: &str = "INSERT INTO usage_events \
     (id, ts, customer, meter, units, route, status, latency_us, request_id) ";

/// Duplicates (a retried batch, a spool replay) are skipped, not errors.
pub(crate) const INSERT_USAGE_TAIL: &str = " ON CONFLICT (id) DO NOTHING";

const USAGE_TOTALS: &str = "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) AS units, \
       COUNT(*) AS requests FROM usage_events \
     WHERE customer = $1 AND meter = $2 AND ts >= $3 AND ts < $4";

/// Usage rows: written by the flusher, read by the admin API.
#[async_trait::async_trait]
pub trait UsageLedger: Send + Sync {
    /// Multi-row insert (chunked to stay under bind-parameter limits), ON CONFLICT (id) DO NOTHING,
    /// in one transaction. Returns rows actually inserted (duplicates are not errors).
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64, LedgerError>;
    /// Sum of `units` and row count for a customer/meter in [from, to): for admin and tests.
    async fn usage_totals(
        &self,
        customer: &str,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(i64, i64), LedgerError>;
    /// `usage_events` summed per group and meter over `[query.from, query.to)`, with the
    /// optional customer/meter/route filters: ordered by key then meter, at most `limit` groups
    /// after skipping `offset` (`limit` ≤ 0: all). [`UsageGroupBy::Total`] gives one row per meter.
    async fn usage_report(
        &self,
        query: &UsageQuery,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<UsageGroup>, LedgerError>;
}

/// The `SELECT … GROUP BY` of a usage report, given the backend's day expression; placeholders
/// $1–$7 are from, to, customer, meter, route, limit, offset.
pub(crate) fn usage_report_sql(group_by: UsageGroupBy, day: &str) -> String {
    let (key, group) = match group_by {
        UsageGroupBy::Day => (day, "k, meter"),
        UsageGroupBy::Route => ("route", "k, meter"),
        UsageGroupBy::Customer => ("customer", "k, meter"),
        UsageGroupBy::Total => ("''", "meter"),
    };
    format!(
        "SELECT {key} AS k, meter, CAST(COALESCE(SUM(units), 0) AS BIGINT) AS units, \
           COUNT(*) AS requests \
         FROM usage_events WHERE ts >= $1 AND ts < $2 \
         AND ($3 IS NULL OR customer = $3) \
         AND ($4 IS NULL OR meter = $4) \
         AND ($5 IS NULL OR route = $5) \
         GROUP BY {group} ORDER BY {group} LIMIT $6 OFFSET $7"
    )
}

#[async_trait::async_trait]
impl<DB: Backend> UsageLedger for SqlLedger<DB> {
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64, LedgerError> {
        let op = "insert_usage";
        if events.is_empty() {
            return Ok(0);
        }
        if DB::AUTOCOMMIT_ONE_STATEMENT && events.len() <= INSERT_CHUNK {
            // One statement is atomic on its own: skip BEGIN/COMMIT round trips.
            return DB::insert_usage_chunk(self.pool().into(), events)
                .await
                .map_err(LedgerError::query(op));
        }
        // One transaction: all-or-nothing, and one fsync for the whole batch.
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let mut inserted = 0;
        for chunk in events.chunks(INSERT_CHUNK) {
            inserted += DB::insert_usage_chunk((&mut *tx).into(), chunk)
                .await
                .map_err(LedgerError::query(op))?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(inserted)
    }

    async fn usage_totals(
        &self,
        customer: &str,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(i64, i64), LedgerError> {
        let op = "usage_totals";
        let row = DB::sql(USAGE_TOTALS)
            .bind(customer)
            .bind(meter)
            .bind(Time(from))
            .bind(Time(to))
            .fetch_one(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let read =
            || -> Result<(i64, i64), sqlx::Error> { Ok((row.col("units")?, row.col("requests")?)) };
        read().map_err(LedgerError::query(op))
    }

    async fn usage_report(
        &self,
        query: &UsageQuery,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<UsageGroup>, LedgerError> {
        let op = "usage_report";
        let sql = usage_report_sql(query.group_by, DB::DAY_OF_TS);
        let rows = DB::sql(&sql)
            .bind(Time(query.from))
            .bind(Time(query.to))
            .bind(query.customer.as_deref())
            .bind(query.meter.as_deref())
            .bind(query.route.as_deref())
            // No limit: the largest one (neither backend accepts the other's "no limit").
            .bind(if limit > 0 { limit } else { i64::MAX })
            .bind(offset.max(0))
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| {
                Ok(UsageGroup {
                    key: r.col("k")?,
                    meter: r.col("meter")?,
                    units: r.col("units")?,
                    requests: r.col("requests")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
    }
}
