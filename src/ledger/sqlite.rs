//! The SQLite ledger (embedded mode: one instance, one file). Owns the `SqlitePool` and the SQL
//! for `migrations/sqlite`.
//!
//! Times are INTEGER microseconds since the Unix epoch (UTC): exact to the microsecond like
//! Postgres' timestamptz, and ordered as numbers so range scans use the indexes. Usage ids are
//! 16-byte BLOBs. Must not be shared by several tollgate processes (SQLite has one writer).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{
    LedgerError, MeterReport, ReportClaim, ReportRow, ReportState, StripeEventRecord,
    StripeEventState, StripeFinish, UsageEvent, INSERT_CHUNK,
};
use crate::entitle::{Entitlement, Status};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Readers run in parallel under WAL; writes serialize on SQLite's lock whatever the pool size.
const MAX_CONNECTIONS: u32 = 4;

/// How long a writer waits for another's lock before failing with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const CUSTOMER_COLUMNS: &str = "id, plan, status, status_since, period_start, period_end, \
     suspended, updated_at, cancel_at_period_end, trial_end";

/// The Stripe write rule ([`Ledger::finish_stripe_event`](super::Ledger::finish_stripe_event)),
/// in one place for the webhook and the reconciler: only over older state (`updated_at`), the
/// operator's `suspended` kept, `status_since` kept while the status does not change. Bound by
/// [`bind_stripe_upsert`].
const STRIPE_UPSERT: &str = "INSERT INTO customers \
       (id, plan, status, status_since, period_start, period_end, suspended, updated_at, \
        cancel_at_period_end, trial_end) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9) \
     ON CONFLICT (id) DO UPDATE SET \
       plan = excluded.plan, status = excluded.status, \
       status_since = CASE WHEN customers.status = excluded.status \
         THEN customers.status_since ELSE excluded.status_since END, \
       period_start = excluded.period_start, period_end = excluded.period_end, \
       updated_at = excluded.updated_at, \
       cancel_at_period_end = excluded.cancel_at_period_end, trial_end = excluded.trial_end \
     WHERE customers.updated_at <= excluded.updated_at";

fn bind_stripe_upsert<'q>(
    customer: &'q str,
    e: &'q Entitlement,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    sqlx::query(STRIPE_UPSERT)
        .bind(customer)
        .bind(e.plan.as_deref())
        .bind(e.status.as_str())
        .bind(e.status_since.map(to_micros))
        .bind(e.period_start.map(to_micros))
        .bind(e.period_end.map(to_micros))
        .bind(to_micros(e.updated_at))
        .bind(e.cancel_at_period_end)
        .bind(e.trial_end.map(to_micros))
}

/// The SQLite [`Ledger`](super::Ledger). Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
}

// === impl SqliteLedger ===

impl SqliteLedger {
    /// Starts a write transaction with `BEGIN IMMEDIATE`, which takes SQLite's write lock at
    /// once (waiting out another writer for up to `BUSY_TIMEOUT`). A deferred `BEGIN` that reads
    /// before it writes has to upgrade its read snapshot, and if another connection committed in
    /// between SQLite refuses the upgrade at once with SQLITE_BUSY_SNAPSHOT (517), whatever the
    /// busy timeout: 10 concurrent deliveries of one webhook, each linking the same customer,
    /// got a 503 that way now and then.
    async fn write_tx(
        &self,
        op: &'static str,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, LedgerError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(LedgerError::query(op))
    }

    /// Opens `sqlite:PATH` (also `sqlite://PATH`), creating the file and its parent directories
    /// if missing. WAL journal, `synchronous = NORMAL` (durable across process crashes; the last
    /// commits may be lost on power failure, which the usage spool does not cover either).
    /// Does not run migrations (see [`SqliteLedger::migrate`]).
    pub async fn connect(url: &str) -> Result<SqliteLedger, LedgerError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(LedgerError::InvalidUrl)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        // In-memory databases have a synthetic name and no parent.
        if let Some(parent) = options.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|cause| LedgerError::Io {
                        path: parent.to_path_buf(),
                        cause,
                    })?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(LedgerError::Connect)?;
        Ok(SqliteLedger { pool })
    }

    /// Applies pending migrations from `migrations/sqlite`; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, LedgerError> {
        super::run_migrations(&self.pool, &MIGRATOR).await
    }

    /// The pool, for modules that own other tables (Stripe events, config history, audit log).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// The stored form of a time (see the module doc).
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Reads a stored time back; `None` only for values no `DateTime` can hold.
pub(crate) fn from_micros(us: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
}

#[async_trait::async_trait]
impl super::UsageLedger for SqliteLedger {
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64, LedgerError> {
        if events.is_empty() {
            return Ok(0);
        }
        // One transaction: one fsync for the whole batch, and all-or-nothing.
        let mut tx = self.write_tx("insert_usage").await?;
        let mut inserted = 0;
        for chunk in events.chunks(INSERT_CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO usage_events \
                 (id, ts, customer, meter, units, route, status, latency_us, request_id) ",
            );
            q.push_values(chunk, |mut row, e| {
                row.push_bind(e.id)
                    .push_bind(to_micros(e.ts))
                    .push_bind(e.customer.as_str())
                    .push_bind(e.meter.as_str())
                    .push_bind(e.units)
                    .push_bind(e.route.as_str())
                    .push_bind(i32::from(e.status))
                    .push_bind(e.latency_us)
                    .push_bind(e.request_id.as_str());
            });
            q.push(" ON CONFLICT (id) DO NOTHING");
            // Only full chunks share a statement text; caching the odd-sized tails would evict
            // useful statements.
            let done = q
                .build()
                .persistent(chunk.len() == INSERT_CHUNK)
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::query("insert_usage"))?;
            inserted += done.rows_affected();
        }
        tx.commit()
            .await
            .map_err(LedgerError::query("insert_usage"))?;
        Ok(inserted)
    }

    async fn usage_totals(
        &self,
        customer: &str,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(i64, i64), LedgerError> {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT COALESCE(SUM(units), 0), COUNT(*) FROM usage_events \
             WHERE customer = ?1 AND meter = ?2 AND ts >= ?3 AND ts < ?4",
        )
        .bind(customer)
        .bind(meter)
        .bind(to_micros(from))
        .bind(to_micros(to))
        .fetch_one(&self.pool)
        .await
        .map_err(LedgerError::query("usage_totals"))
    }

    async fn usage_report(
        &self,
        query: &super::UsageQuery,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<super::UsageGroup>, LedgerError> {
        let sql = super::usage_report_sql(
            query.group_by,
            "strftime('%Y-%m-%d', ts / 1000000, 'unixepoch')",
            ["?1", "?2", "?3", "?4", "?5", "?6", "?7"],
        );
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(&sql)
            .bind(to_micros(query.from))
            .bind(to_micros(query.to))
            .bind(&query.customer)
            .bind(&query.meter)
            .bind(&query.route)
            // LIMIT -1 is "no limit" on SQLite.
            .bind(if limit > 0 { limit } else { -1 })
            .bind(offset.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(LedgerError::query("usage_report"))?;
        Ok(rows
            .into_iter()
            .map(|(key, meter, units, requests)| super::UsageGroup {
                key,
                meter,
                units,
                requests,
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl super::CustomerLedger for SqliteLedger {
    async fn get_customer(&self, id: &str) -> Result<Option<Entitlement>, LedgerError> {
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("get_customer"))?;
        row.map(|r| customer_from_row(&r).map(|(_, e)| e))
            .transpose()
    }

    async fn put_customer(&self, id: &str, e: &Entitlement) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO customers \
               (id, plan, status, status_since, period_start, period_end, suspended, updated_at, \
                cancel_at_period_end, trial_end) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (id) DO UPDATE SET \
               plan = excluded.plan, status = excluded.status, \
               status_since = excluded.status_since, period_start = excluded.period_start, \
               period_end = excluded.period_end, suspended = excluded.suspended, \
               updated_at = excluded.updated_at, \
               cancel_at_period_end = excluded.cancel_at_period_end, \
               trial_end = excluded.trial_end",
        )
        .bind(id)
        .bind(e.plan.as_deref())
        .bind(e.status.as_str())
        .bind(e.status_since.map(to_micros))
        .bind(e.period_start.map(to_micros))
        .bind(e.period_end.map(to_micros))
        .bind(e.suspended)
        .bind(to_micros(e.updated_at))
        .bind(e.cancel_at_period_end)
        .bind(e.trial_end.map(to_micros))
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("put_customer"))?;
        Ok(())
    }

    async fn all_customers(&self) -> Result<Vec<(String, Entitlement)>, LedgerError> {
        let rows = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("all_customers"))?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn apply_stripe_state(
        &self,
        customer: &str,
        e: &Entitlement,
    ) -> Result<bool, LedgerError> {
        let done = bind_stripe_upsert(customer, e)
            .execute(&self.pool)
            .await
            .map_err(LedgerError::query("apply_stripe_state"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn link_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
        source: &str,
    ) -> Result<Option<String>, LedgerError> {
        let op = "link_stripe_customer";
        let mut tx = self.write_tx(op).await?;
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT customer FROM stripe_customers WHERE stripe_customer_id = ?",
        )
        .bind(stripe_customer)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if let Some(owner) = owner.filter(|o| o != customer) {
            return Err(LedgerError::LinkConflict {
                stripe_customer: stripe_customer.to_string(),
                customer: owner,
            });
        }
        let before: Option<String> = sqlx::query_scalar(
            "SELECT stripe_customer_id FROM stripe_customers WHERE customer = ?",
        )
        .bind(customer)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if before.as_deref() != Some(stripe_customer) {
            sqlx::query(
                "INSERT INTO stripe_customers (customer, stripe_customer_id, source, linked_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (customer) DO UPDATE SET \
                   stripe_customer_id = excluded.stripe_customer_id, source = excluded.source, \
                   linked_at = excluded.linked_at",
            )
            .bind(customer)
            .bind(stripe_customer)
            .bind(source)
            .bind(to_micros(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(before)
    }

    async fn stripe_links(&self) -> Result<Vec<(String, String)>, LedgerError> {
        sqlx::query_as::<_, (String, String)>(
            "SELECT customer, stripe_customer_id FROM stripe_customers ORDER BY customer",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("stripe_links"))
    }

    async fn stripe_link(
        &self,
        customer: Option<&str>,
        stripe_customer: Option<&str>,
    ) -> Result<Option<(String, String)>, LedgerError> {
        sqlx::query_as::<_, (String, String)>(
            "SELECT customer, stripe_customer_id FROM stripe_customers \
             WHERE (?1 IS NOT NULL AND customer = ?1) OR (?1 IS NULL AND stripe_customer_id = ?2)",
        )
        .bind(customer)
        .bind(stripe_customer)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("stripe_link"))
    }
}

#[async_trait::async_trait]
impl super::StripeEventLedger for SqliteLedger {
    async fn record_stripe_event(
        &self,
        event: &StripeEventRecord,
    ) -> Result<StripeEventState, LedgerError> {
        let inserted = sqlx::query(
            "INSERT INTO stripe_events (id, type, created, payload) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(to_micros(event.created))
        .bind(&event.payload)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("record_stripe_event"))?;
        if inserted.rows_affected() == 1 {
            return Ok(StripeEventState::New);
        }
        let processed: Option<i64> =
            sqlx::query_scalar("SELECT processed_at FROM stripe_events WHERE id = ?1")
                .bind(&event.id)
                .fetch_one(&self.pool)
                .await
                .map_err(LedgerError::query("record_stripe_event"))?;
        Ok(match processed {
            Some(_) => StripeEventState::Processed,
            None => StripeEventState::Pending,
        })
    }

    async fn finish_stripe_event(
        &self,
        id: &str,
        apply: Option<(&str, &Entitlement)>,
    ) -> Result<StripeFinish, LedgerError> {
        let op = "finish_stripe_event";
        let mut tx = self.write_tx(op).await?;
        // The claim comes first so this transaction takes SQLite's write lock at once (waiting
        // out a concurrent writer under busy_timeout) instead of upgrading a read snapshot,
        // which could fail with SQLITE_BUSY; the next delivery then sees processed_at set.
        let claimed = sqlx::query(
            "UPDATE stripe_events SET processed_at = ?2 \
             WHERE id = ?1 AND processed_at IS NULL",
        )
        .bind(id)
        .bind(to_micros(Utc::now()))
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if claimed.rows_affected() == 0 {
            return Ok(StripeFinish::AlreadyProcessed);
        }
        let mut changed = false;
        if let Some((customer, e)) = apply {
            let done = bind_stripe_upsert(customer, e)
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::query(op))?;
            changed = done.rows_affected() == 1;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(StripeFinish::Processed { changed })
    }
}

#[async_trait::async_trait]
impl super::ReportLedger for SqliteLedger {
    async fn claim_usage_reports(
        &self,
        claim: &ReportClaim,
    ) -> Result<Vec<MeterReport>, LedgerError> {
        let op = "claim_usage_reports";
        let meters =
            serde_json::to_string(&claim.meters.keys().collect::<Vec<_>>()).map_err(|e| {
                LedgerError::Corrupt {
                    table: "usage_events",
                    detail: e.to_string(),
                }
            })?;
        let mut tx = self.write_tx(op).await?;
        let rows = sqlx::query(
            "SELECT u.id, u.ts, u.customer, u.meter, u.units, l.stripe_customer_id \
             FROM usage_events u JOIN stripe_customers l ON l.customer = u.customer \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL AND u.ts < ?1 \
               AND u.meter IN (SELECT value FROM json_each(?2)) \
             ORDER BY u.ts LIMIT ?3",
        )
        .bind(to_micros(claim.until))
        .bind(meters)
        .bind(claim.max_rows)
        .fetch_all(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in &rows {
            let read = || -> Result<(uuid::Uuid, i64, String, String, i64, String), sqlx::Error> {
                Ok((
                    r.try_get("id")?,
                    r.try_get("ts")?,
                    r.try_get("customer")?,
                    r.try_get("meter")?,
                    r.try_get("units")?,
                    r.try_get("stripe_customer_id")?,
                ))
            };
            let (id, ts, customer, meter, units, stripe_customer) =
                read().map_err(LedgerError::query(op))?;
            let ts = from_micros(ts).ok_or_else(|| LedgerError::Corrupt {
                table: "usage_events",
                detail: format!("time {ts} out of range"),
            })?;
            claimed.push(ReportRow {
                id,
                ts,
                customer,
                meter,
                units,
                stripe_customer,
            });
        }
        let reports = super::group_reports(
            &claimed,
            &claim.meters,
            claim.window_secs,
            claim.too_old_before,
        );
        let now = to_micros(Utc::now());
        for r in &reports {
            let finished = (r.state != ReportState::Pending).then_some(now);
            sqlx::query(
                "INSERT INTO stripe_meter_reports (identifier, customer, stripe_customer_id, \
                   meter, event_name, ts, value, row_count, state, created_at, finished_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.identifier)
            .bind(&r.customer)
            .bind(&r.stripe_customer)
            .bind(&r.meter)
            .bind(&r.event_name)
            .bind(to_micros(r.ts))
            .bind(r.value)
            .bind(r.rows)
            .bind(r.state.as_str())
            .bind(now)
            .bind(finished)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
            // A zero report is done as claimed: its rows count as reported.
            let reported = (r.state == ReportState::Zero).then_some(now);
            // One writer (SQLite): per-row updates inside the transaction are cheap.
            for id in &r.row_ids {
                sqlx::query("UPDATE usage_events SET report_id = ?, reported_at = ? WHERE id = ?")
                    .bind(&r.identifier)
                    .bind(reported)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(LedgerError::query(op))?;
            }
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(reports)
    }

    async fn pending_usage_reports(
        &self,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<MeterReport>, LedgerError> {
        let op = "pending_usage_reports";
        let rows = sqlx::query(
            "SELECT identifier, customer, stripe_customer_id, meter, event_name, ts, value, \
               row_count, state, attempts, ambiguous_since \
             FROM stripe_meter_reports \
             WHERE state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= ?2) \
             ORDER BY ts, identifier LIMIT ?1",
        )
        .bind(limit)
        .bind(to_micros(now))
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| {
                let read = || -> Result<(MeterReport, i64, String, Option<i64>), sqlx::Error> {
                    Ok((
                        MeterReport {
                            identifier: r.try_get("identifier")?,
                            customer: r.try_get("customer")?,
                            stripe_customer: r.try_get("stripe_customer_id")?,
                            meter: r.try_get("meter")?,
                            event_name: r.try_get("event_name")?,
                            ts: DateTime::<Utc>::UNIX_EPOCH,
                            value: r.try_get("value")?,
                            rows: r.try_get("row_count")?,
                            state: ReportState::Pending,
                            row_ids: Vec::new(),
                            attempts: r.try_get("attempts")?,
                            ambiguous_since: None,
                        },
                        r.try_get("ts")?,
                        r.try_get("state")?,
                        r.try_get::<Option<i64>, _>("ambiguous_since")?,
                    ))
                };
                let (mut report, ts, state, ambiguous) = read().map_err(LedgerError::query(op))?;
                report.ambiguous_since = ambiguous.and_then(from_micros);
                report.ts = from_micros(ts).ok_or_else(|| LedgerError::Corrupt {
                    table: "stripe_meter_reports",
                    detail: format!("time {ts} out of range"),
                })?;
                report.state = ReportState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
                    table: "stripe_meter_reports",
                    detail: format!("unknown state {state:?}"),
                })?;
                Ok(report)
            })
            .collect()
    }

    async fn finish_usage_report(
        &self,
        identifier: &str,
        state: ReportState,
    ) -> Result<u64, LedgerError> {
        let op = "finish_usage_report";
        let now = to_micros(Utc::now());
        let mut tx = self.write_tx(op).await?;
        let done = sqlx::query(
            "UPDATE stripe_meter_reports SET state = ?2, finished_at = ?3, \
               attempts = attempts + 1 \
             WHERE identifier = ?1 AND state = 'pending'",
        )
        .bind(identifier)
        .bind(state.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        let mut marked = 0;
        if done.rows_affected() == 1 && state == ReportState::Delivered {
            marked = mark_reported(&mut tx, identifier, now, op).await?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(marked)
    }

    async fn usage_report_failed(
        &self,
        identifier: &str,
        error: &str,
        retry_at: DateTime<Utc>,
        ambiguous: bool,
    ) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE stripe_meter_reports \
             SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, \
               ambiguous_since = CASE WHEN ?4 THEN COALESCE(ambiguous_since, ?5) \
                 ELSE ambiguous_since END \
             WHERE identifier = ?1 AND state = 'pending'",
        )
        .bind(identifier)
        .bind(error)
        .bind(to_micros(retry_at))
        .bind(ambiguous)
        .bind(to_micros(Utc::now()))
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("usage_report_failed"))?;
        Ok(())
    }

    async fn resolve_uncertain_report(
        &self,
        identifier: &str,
        landed: bool,
    ) -> Result<Option<u64>, LedgerError> {
        let op = "resolve_uncertain_report";
        let mut tx = self.write_tx(op).await?;
        let now = to_micros(Utc::now());
        let done = sqlx::query(
            "UPDATE stripe_meter_reports SET \
               state = CASE WHEN ?2 THEN 'delivered' ELSE 'pending' END, \
               finished_at = CASE WHEN ?2 THEN ?3 ELSE NULL END, \
               ambiguous_since = NULL, next_attempt_at = NULL \
             WHERE identifier = ?1 AND state = 'uncertain'",
        )
        .bind(identifier)
        .bind(landed)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let mut marked = 0;
        if landed {
            marked = mark_reported(&mut tx, identifier, now, op).await?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(Some(marked))
    }

    async fn unlinked_usage_rows(&self, meters: &[String]) -> Result<i64, LedgerError> {
        let meters = serde_json::to_string(meters).map_err(|e| LedgerError::Corrupt {
            table: "usage_events",
            detail: e.to_string(),
        })?;
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage_events u \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL \
               AND u.meter IN (SELECT value FROM json_each(?)) \
               AND NOT EXISTS (SELECT 1 FROM stripe_customers l WHERE l.customer = u.customer)",
        )
        .bind(meters)
        .fetch_one(&self.pool)
        .await
        .map_err(LedgerError::query("unlinked_usage_rows"))
    }
}

#[async_trait::async_trait]
impl super::ConfigLedger for SqliteLedger {
    async fn insert_config_version(
        &self,
        author: &str,
        document: &str,
        audit: &super::AuditRecord,
    ) -> Result<super::ConfigVersion, LedgerError> {
        let op = "insert_config_version";
        let now = to_micros(Utc::now());
        let mut tx = self.write_tx(op).await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO config_versions (created_at, author, document) VALUES (?1, ?2, ?3) \
             RETURNING version",
        )
        .bind(now)
        .bind(author)
        .bind(document)
        .fetch_one(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, before, after) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(now)
        .bind(author)
        .bind(&audit.action)
        .bind(&audit.target)
        .bind(&audit.before)
        .bind(&audit.after)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        tx.commit().await.map_err(LedgerError::query(op))?;
        sqlite_config_version((version, now, author.to_string(), document.to_string()))
    }

    async fn config_version(
        &self,
        version: i64,
    ) -> Result<Option<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, i64, String, String)>(
            "SELECT version, created_at, author, document FROM config_versions WHERE version = ?1",
        )
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("config_version"))?
        .map(sqlite_config_version)
        .transpose()
    }

    async fn latest_config_version(
        &self,
        author_prefix: Option<&str>,
    ) -> Result<Option<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, i64, String, String)>(
            "SELECT version, created_at, author, document FROM config_versions \
             WHERE ?1 IS NULL OR substr(author, 1, length(?1)) = ?1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(author_prefix)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("latest_config_version"))?
        .map(sqlite_config_version)
        .transpose()
    }

    async fn config_versions(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, i64, String, String)>(
            "SELECT version, created_at, author, '' FROM config_versions \
             WHERE ?1 IS NULL OR version < ?1 ORDER BY version DESC LIMIT ?2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("config_versions"))?
        .into_iter()
        .map(sqlite_config_version)
        .collect()
    }

    async fn insert_audit(
        &self,
        actor: &str,
        record: &super::AuditRecord,
    ) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, before, after) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(to_micros(Utc::now()))
        .bind(actor)
        .bind(&record.action)
        .bind(&record.target)
        .bind(&record.before)
        .bind(&record.after)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("insert_audit"))?;
        Ok(())
    }

    async fn audit_entries(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<super::AuditEntry>, LedgerError> {
        type Row = (
            i64,
            i64,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at, actor, action, target, before, after FROM audit_log \
             WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("audit_entries"))?;
        rows.into_iter()
            .map(|(id, at, actor, action, target, before, after)| {
                Ok(super::AuditEntry {
                    id,
                    at: from_micros(at).ok_or_else(|| LedgerError::Corrupt {
                        table: "audit_log",
                        detail: format!("entry {id} has at out of range: {at}"),
                    })?,
                    actor,
                    action,
                    target,
                    before,
                    after,
                })
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl super::AlertLedger for SqliteLedger {
    async fn claim_alert(
        &self,
        a: &super::AlertClaim,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<i64>, LedgerError> {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO alert_deliveries \
             (customer, meter, period_start, threshold, plan, used, included, period_end, \
              lease_until) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (customer, meter, period_start, threshold) DO NOTHING RETURNING id",
        )
        .bind(&a.customer)
        .bind(&a.meter)
        .bind(to_micros(a.period_start))
        .bind(i64::from(a.threshold))
        .bind(&a.plan)
        .bind(a.used)
        .bind(a.included)
        .bind(a.period_end.map(to_micros))
        .bind(to_micros(lease_until))
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("claim_alert"))
    }

    async fn record_alert_attempt(
        &self,
        id: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<(), LedgerError> {
        let now = to_micros(Utc::now());
        sqlx::query(
            "UPDATE alert_deliveries SET attempts = attempts + 1, last_attempt_at = ?2, \
             last_status = ?3, last_error = ?4, \
             delivered_at = CASE WHEN ?5 AND delivered_at IS NULL THEN ?2 ELSE delivered_at END, \
             lease_until = ?6 \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(now)
        .bind(status.map(i64::from))
        .bind(error)
        .bind(delivered)
        .bind(lease_until.map(to_micros))
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("record_alert_attempt"))?;
        Ok(())
    }

    async fn resume_alerts(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_attempts: i64,
        limit: i64,
    ) -> Result<Vec<super::AlertDelivery>, LedgerError> {
        // One statement, one writer at a time: each alert goes to one caller.
        let rows = sqlx::query(&format!(
            "UPDATE alert_deliveries SET lease_until = ?3 WHERE id IN ( \
               SELECT id FROM alert_deliveries \
               WHERE delivered_at IS NULL AND attempts < ?4 AND created_at > ?2 \
                 AND (lease_until IS NULL OR lease_until < ?1) \
               ORDER BY id LIMIT ?5) \
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(to_micros(now))
        .bind(to_micros(since))
        .bind(to_micros(lease_until))
        .bind(max_attempts)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("resume_alerts"))?;
        let mut out = rows
            .iter()
            .map(alert_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    async fn release_alerts(&self, ids: &[i64]) -> Result<(), LedgerError> {
        let ids = serde_json::to_string(ids).map_err(|e| LedgerError::Corrupt {
            table: "alert_deliveries",
            detail: e.to_string(),
        })?;
        sqlx::query(
            "UPDATE alert_deliveries SET lease_until = NULL \
             WHERE id IN (SELECT value FROM json_each(?1)) AND delivered_at IS NULL",
        )
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("release_alerts"))?;
        Ok(())
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, until) VALUES (?1, ?2, ?4) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE leases.holder = excluded.holder OR leases.until < ?3",
        )
        .bind(name)
        .bind(holder)
        .bind(to_micros(now))
        .bind(to_micros(until))
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("try_lease"))?;
        Ok(taken.rows_affected() == 1)
    }

    async fn alert_deliveries(&self, limit: i64) -> Result<Vec<super::AlertDelivery>, LedgerError> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alert_deliveries ORDER BY id DESC LIMIT ?1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("alert_deliveries"))?;
        rows.iter().map(alert_from_row).collect()
    }
}

#[async_trait::async_trait]
impl super::Ledger for SqliteLedger {
    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(LedgerError::query("ping"))?;
        Ok(())
    }
}

/// Marks the rows of report `identifier` reported (Stripe has their event) as of `now`
/// (microseconds); returns how many.
async fn mark_reported(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    identifier: &str,
    now: i64,
    op: &'static str,
) -> Result<u64, LedgerError> {
    Ok(sqlx::query(
        "UPDATE usage_events SET reported_at = ?2 \
         WHERE report_id = ?1 AND reported_at IS NULL",
    )
    .bind(identifier)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(LedgerError::query(op))?
    .rows_affected())
}

const ALERT_COLUMNS: &str = "id, customer, meter, period_start, period_end, threshold, plan, \
     used, included, created_at, attempts, last_attempt_at, last_status, last_error, delivered_at";

fn alert_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<super::AlertDelivery, LedgerError> {
    let time = |us: Option<i64>| us.and_then(from_micros);
    let id: i64 = r.get("id");
    let corrupt = |what: &str| LedgerError::Corrupt {
        table: "alert_deliveries",
        detail: format!("row {id} has {what} out of range"),
    };
    Ok(super::AlertDelivery {
        id,
        alert: super::AlertClaim {
            customer: r.get("customer"),
            meter: r.get("meter"),
            period_start: time(r.get("period_start")).ok_or_else(|| corrupt("period_start"))?,
            period_end: time(r.get("period_end")),
            threshold: r.get::<i64, _>("threshold").clamp(0, i64::from(u32::MAX)) as u32,
            plan: r.get("plan"),
            used: r.get("used"),
            included: r.get("included"),
        },
        created_at: time(r.get("created_at")).ok_or_else(|| corrupt("created_at"))?,
        attempts: r.get("attempts"),
        last_attempt_at: time(r.get("last_attempt_at")),
        last_status: r.get("last_status"),
        last_error: r.get("last_error"),
        delivered_at: time(r.get("delivered_at")),
    })
}

fn sqlite_config_version(
    (version, created_at, author, document): (i64, i64, String, String),
) -> Result<super::ConfigVersion, LedgerError> {
    Ok(super::ConfigVersion {
        version,
        created_at: from_micros(created_at).ok_or_else(|| LedgerError::Corrupt {
            table: "config_versions",
            detail: format!("version {version} has created_at out of range: {created_at}"),
        })?,
        author,
        document,
    })
}

fn customer_from_row(row: &SqliteRow) -> Result<(String, Entitlement), LedgerError> {
    let read = || -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>("id")?,
            row.try_get::<Option<String>, _>("plan")?,
            row.try_get::<String, _>("status")?,
            row.try_get::<Option<i64>, _>("status_since")?,
            row.try_get::<Option<i64>, _>("period_start")?,
            row.try_get::<Option<i64>, _>("period_end")?,
            row.try_get::<bool, _>("suspended")?,
            row.try_get::<i64, _>("updated_at")?,
            row.try_get::<bool, _>("cancel_at_period_end")?,
            row.try_get::<Option<i64>, _>("trial_end")?,
        ))
    };
    let (
        id,
        plan,
        status,
        status_since,
        period_start,
        period_end,
        suspended,
        updated_at,
        cancel_at_period_end,
        trial_end,
    ) = read().map_err(LedgerError::query("read customers"))?;
    let corrupt = |detail: String| LedgerError::Corrupt {
        table: "customers",
        detail,
    };
    let time = |column: &str, us: i64| {
        from_micros(us)
            .ok_or_else(|| corrupt(format!("customer {id:?} has {column} out of range: {us}")))
    };
    let opt_time = |column: &str, us: Option<i64>| us.map(|us| time(column, us)).transpose();
    let status = Status::parse(&status)
        .ok_or_else(|| corrupt(format!("customer {id:?} has unknown status {status:?}")))?;
    let entitlement = Entitlement {
        plan,
        status,
        status_since: opt_time("status_since", status_since)?,
        period_start: opt_time("period_start", period_start)?,
        period_end: opt_time("period_end", period_end)?,
        suspended,
        updated_at: time("updated_at", updated_at)?,
        cancel_at_period_end,
        trial_end: opt_time("trial_end", trial_end)?,
    };
    Ok((id, entitlement))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::{events, t0, TempDir};
    use crate::ledger::{open, CustomerLedger, UsageLedger};

    /// `sqlite:PATH` creates the missing parent directories and the file itself.
    #[tokio::test]
    async fn open_creates_file_and_parent_dirs() {
        let dir = TempDir::new();
        let file = dir.path().join("a").join("b").join("ledger.db");
        let url = format!("sqlite:{}", file.display());
        let ledger = open(&url, None).await.expect("open");
        ledger.ping().await.expect("ping");
        assert!(file.is_file());
    }

    /// Every field of a usage event is stored as given (u16 status, microsecond ts, blob id).
    #[tokio::test]
    async fn usage_event_fields_round_trip() {
        let dir = TempDir::new();
        let ledger = SqliteLedger::connect(&dir.sqlite_url())
            .await
            .expect("connect");
        ledger.migrate().await.expect("migrate");
        let mut ev = events(1, "acme", "tokens").remove(0);
        ev.status = 65535;
        ev.units = i64::MAX;
        ledger
            .insert_usage(std::slice::from_ref(&ev))
            .await
            .expect("insert");
        let row = sqlx::query(
            "SELECT id, ts, customer, meter, units, route, status, latency_us, request_id, \
             reported_at FROM usage_events",
        )
        .fetch_one(ledger.pool())
        .await
        .expect("select");
        let back = UsageEvent {
            id: row.get("id"),
            ts: from_micros(row.get("ts")).expect("ts"),
            customer: row.get("customer"),
            meter: row.get("meter"),
            units: row.get("units"),
            route: row.get("route"),
            status: u16::try_from(row.get::<i32, _>("status")).expect("u16"),
            latency_us: row.get("latency_us"),
            request_id: row.get("request_id"),
        };
        assert_eq!(back, ev);
        assert_eq!(row.get::<Option<i64>, _>("reported_at"), None);
        assert_eq!(row.get::<i64, _>("ts"), t0().timestamp_micros());
    }

    /// A row with a status tollgate does not know is reported as corrupt, not silently mapped.
    #[tokio::test]
    async fn unknown_status_is_corrupt() {
        let dir = TempDir::new();
        let ledger = SqliteLedger::connect(&dir.sqlite_url())
            .await
            .expect("connect");
        ledger.migrate().await.expect("migrate");
        sqlx::query("INSERT INTO customers (id, status, updated_at) VALUES ('c', 'weird', 0)")
            .execute(ledger.pool())
            .await
            .expect("insert");
        let err = ledger.get_customer("c").await.expect_err("corrupt");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err}");
    }
}
