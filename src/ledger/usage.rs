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

/// Customers with rows of meter $1 in [$2, $3): the distinct customers are walked through the
/// `(customer, meter, ts)` index one seek each (a skip scan both backends run the same way), and
/// each is kept when one seek finds a row of the meter in range. Cost: index seeks per customer
/// ever seen, never a scan of the rows themselves.
const CUSTOMERS_WITH_USAGE: &str = "WITH RECURSIVE seen(customer) AS ( \
       SELECT (SELECT customer FROM usage_events ORDER BY customer LIMIT 1) \
       UNION ALL \
       SELECT (SELECT u.customer FROM usage_events u WHERE u.customer > seen.customer \
               ORDER BY u.customer LIMIT 1) \
       FROM seen WHERE seen.customer IS NOT NULL) \
     SELECT customer FROM seen WHERE customer IS NOT NULL AND EXISTS ( \
       SELECT 1 FROM usage_events u \
       WHERE u.customer = seen.customer AND u.meter = $1 AND u.ts >= $2 AND u.ts < $3)";

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
    /// Every customer with a row of `meter` in [from, to), once each, in no particular order.
    async fn customers_with_usage(
        &self,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<String>, LedgerError>;
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

    async fn customers_with_usage(
        &self,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<String>, LedgerError> {
        let op = "customers_with_usage";
        let rows = DB::sql(CUSTOMERS_WITH_USAGE)
            .bind(meter)
            .bind(Time(from))
            .bind(Time(to))
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| r.col("customer"))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::dialect::ReadRow;
    use crate::ledger::test_support::{contract, events, t0, units_of};
    use crate::ledger::Ledger;

    async fn check_insert_idempotent(ledger: Arc<dyn Ledger>) {
        let evs = events(1000, "acme", "api_calls");
        assert_eq!(ledger.insert_usage(&evs).await.expect("insert"), 1000);
        assert_eq!(ledger.insert_usage(&evs).await.expect("reinsert"), 0);
        // A batch mixing old and new rows inserts only the new ones.
        let mut mixed = evs[..10].to_vec();
        mixed.extend(events(5, "acme", "api_calls"));
        assert_eq!(ledger.insert_usage(&mixed).await.expect("mixed"), 5);
        assert_eq!(ledger.insert_usage(&[]).await.expect("empty"), 0);
        let (_, rows) = ledger
            .usage_totals("acme", "api_calls", t0(), t0() + Duration::days(1))
            .await
            .expect("totals");
        assert_eq!(rows, 1005);

        // Larger than one INSERT chunk: goes in whole (one transaction) and counts exactly.
        let big = events(INSERT_CHUNK * 2 + 7, "acme", "big");
        assert_eq!(
            ledger.insert_usage(&big).await.expect("big"),
            big.len() as u64
        );
        assert_eq!(ledger.insert_usage(&big).await.expect("big again"), 0);
    }

    /// Every field of a usage event is stored as given (u16 status, microsecond ts, uuid id) and
    /// read back by shared SQL; nothing is reported yet.
    async fn check_usage_event_fields_round_trip<DB: Backend>(ledger: SqlLedger<DB>) {
        let mut ev = events(1, "acme", "tokens").remove(0);
        ev.status = 65535;
        ev.units = i64::MAX;
        ledger
            .insert_usage(std::slice::from_ref(&ev))
            .await
            .expect("insert");
        let row = DB::sql(
            "SELECT id, ts, customer, meter, units, route, CAST(status AS BIGINT) AS status, \
             latency_us, request_id, reported_at FROM usage_events",
        )
        .fetch_one(ledger.pool())
        .await
        .expect("select");
        let back = UsageEvent {
            id: row.col("id").expect("id"),
            ts: row.time("ts").expect("ts"),
            customer: row.col("customer").expect("customer"),
            meter: row.col("meter").expect("meter"),
            units: row.col("units").expect("units"),
            route: row.col("route").expect("route"),
            status: u16::try_from(row.col::<i64>("status").expect("status")).expect("u16"),
            latency_us: row.col("latency_us").expect("latency_us"),
            request_id: row.col("request_id").expect("request_id"),
        };
        assert_eq!(back, ev);
        assert_eq!(row.opt_time("reported_at").expect("reported_at"), None);
    }

    async fn check_usage_totals(ledger: Arc<dyn Ledger>) {
        let evs = events(100, "acme", "api_calls"); // t0 .. t0+99ms
        let mut other = events(7, "acme", "tokens");
        other.extend(events(9, "globex", "api_calls"));
        ledger.insert_usage(&evs).await.expect("insert");
        ledger.insert_usage(&other).await.expect("insert other");

        let all = ledger
            .usage_totals("acme", "api_calls", t0(), t0() + Duration::seconds(1))
            .await
            .expect("totals");
        assert_eq!(all, (units_of(100), 100));
        // [from, to): the event at exactly `to` is excluded, the one at `from` included.
        let half = ledger
            .usage_totals("acme", "api_calls", t0(), evs[50].ts)
            .await
            .expect("half");
        assert_eq!(half, (units_of(50), 50));
        let one = ledger
            .usage_totals(
                "acme",
                "api_calls",
                evs[99].ts,
                evs[99].ts + Duration::microseconds(1),
            )
            .await
            .expect("last");
        assert_eq!(one, (evs[99].units, 1));
        let none = ledger
            .usage_totals("initech", "api_calls", t0(), t0() + Duration::days(1))
            .await
            .expect("none");
        assert_eq!(none, (0, 0));
        let tokens = ledger
            .usage_totals("acme", "tokens", t0(), t0() + Duration::days(1))
            .await
            .expect("tokens");
        assert_eq!(tokens, (units_of(7), 7));
    }

    async fn check_customers_with_usage(ledger: Arc<dyn Ledger>) {
        let mut evs = events(3, "acme", "api_calls"); // t0 .. t0+2ms
        evs.extend(events(2, "globex", "tokens"));
        evs.extend(events(1, "initech", "api_calls"));
        evs.extend(events(4, "b", "api_calls"));
        ledger.insert_usage(&evs).await.expect("insert");
        // A row before the window and one at its end (excluded) count for nothing.
        let mut early = events(1, "umbrella", "api_calls");
        early[0].ts = t0() - Duration::seconds(1);
        let mut late = events(1, "wayne", "api_calls");
        late[0].ts = t0() + Duration::days(1);
        ledger.insert_usage(&early).await.expect("early");
        ledger.insert_usage(&late).await.expect("late");
        let window = |meter: &'static str| {
            let ledger = ledger.clone();
            async move {
                let mut c = ledger
                    .customers_with_usage(meter, t0(), t0() + Duration::days(1))
                    .await
                    .expect("customers");
                c.sort();
                c
            }
        };
        assert_eq!(window("api_calls").await, ["acme", "b", "initech"]);
        assert_eq!(window("tokens").await, ["globex"]);
        assert!(window("nothing").await.is_empty());
    }

    contract!(
        "customers_with_usage lists each customer with rows of the meter in [from, to) once.",
        check_customers_with_usage,
        pg_customers_with_usage,
        sqlite_customers_with_usage
    );

    contract!(
        "1000 events insert 1000 rows, again 0; multi-chunk batches count exactly.",
        check_insert_idempotent,
        pg_insert_usage_is_idempotent,
        sqlite_insert_usage_is_idempotent
    );

    contract!(
        "every field of a usage event is stored and read back as given.",
        check_usage_event_fields_round_trip,
        pg_usage_event_fields_round_trip,
        sqlite_usage_event_fields_round_trip,
        typed
    );

    contract!(
        "usage_totals sums units and counts rows per customer/meter over [from, to).",
        check_usage_totals,
        pg_usage_totals,
        sqlite_usage_totals
    );
}
