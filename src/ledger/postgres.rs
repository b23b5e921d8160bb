//! The Postgres ledger (production). Owns the `PgPool` and the SQL for `migrations/postgres`.
//!
//! Must not touch other schemas: with a schema given, every pooled connection starts with that
//! schema alone as its `search_path` (a startup parameter, so even a reconnect after a failover
//! cannot land in `public`), and all SQL here is unqualified.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::{
    LedgerError, MeterReport, ReportClaim, ReportRow, ReportState, StripeEventRecord,
    StripeEventState, StripeFinish, UsageEvent, INSERT_CHUNK,
};
use crate::entitle::{Entitlement, Status};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Pool bound. The flusher writes from one task; the admin API, reconciler and Stripe reporter
/// add a few readers. Kept well under Postgres' default 100 connections with several instances.
const MAX_CONNECTIONS: u32 = 8;

/// How long a caller waits for a pooled connection before the ledger counts as down. Short, so
/// `/readyz` and the flusher notice an outage quickly instead of queueing for sqlx's 30 s.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const CUSTOMER_COLUMNS: &str = "id, plan, status, status_since, period_start, period_end, \
     suspended, updated_at, cancel_at_period_end, trial_end";

/// The Stripe write rule ([`Ledger::finish_stripe_event`](super::Ledger::finish_stripe_event)),
/// in one place for the webhook and the reconciler: only over older state (`updated_at`), the
/// operator's `suspended` kept, `status_since` kept while the status does not change. Bound by
/// [`bind_stripe_upsert`].
const STRIPE_UPSERT: &str = "INSERT INTO customers \
       (id, plan, status, status_since, period_start, period_end, suspended, updated_at, \
        cancel_at_period_end, trial_end) \
     VALUES ($1, $2, $3, $4, $5, $6, false, $7, $8, $9) \
     ON CONFLICT (id) DO UPDATE SET \
       plan = EXCLUDED.plan, status = EXCLUDED.status, \
       status_since = CASE WHEN customers.status = EXCLUDED.status \
         THEN customers.status_since ELSE EXCLUDED.status_since END, \
       period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end, \
       updated_at = EXCLUDED.updated_at, \
       cancel_at_period_end = EXCLUDED.cancel_at_period_end, trial_end = EXCLUDED.trial_end \
     WHERE customers.updated_at <= EXCLUDED.updated_at";

fn bind_stripe_upsert<'q>(
    customer: &'q str,
    e: &'q Entitlement,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(STRIPE_UPSERT)
        .bind(customer)
        .bind(e.plan.as_deref())
        .bind(e.status.as_str())
        .bind(e.status_since)
        .bind(e.period_start)
        .bind(e.period_end)
        .bind(e.updated_at)
        .bind(e.cancel_at_period_end)
        .bind(e.trial_end)
}

/// The Postgres [`Ledger`](super::Ledger). Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgLedger {
    pool: PgPool,
}

// === impl PgLedger ===

impl PgLedger {
    /// Connects (one connection is made eagerly, so a wrong host or database fails here).
    /// With `schema`: validates the name, creates the schema if missing and pins every pooled
    /// connection's `search_path` to it. Does not run migrations (see [`PgLedger::migrate`]).
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgLedger, LedgerError> {
        let base: PgConnectOptions = url.parse().map_err(LedgerError::InvalidUrl)?;
        let options = match schema {
            Some(name) => {
                check_schema_name(name)?;
                create_schema(&base, name).await?;
                // The name is checked to be a plain identifier, so it needs no quoting here.
                base.options([("search_path", name)])
            }
            None => base,
        };
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(LedgerError::Connect)?;
        Ok(PgLedger { pool })
    }

    /// Applies pending migrations from `migrations/postgres`; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, LedgerError> {
        super::run_migrations(&self.pool, &MIGRATOR).await
    }

    /// The pool, for modules that own other tables (Stripe events, config history, audit log).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn insert_chunk<'e, E>(executor: E, chunk: &[UsageEvent]) -> Result<u64, LedgerError>
    where
        E: sqlx::PgExecutor<'e>,
    {
        // Columns as arrays through UNNEST: one statement text for every chunk size (prepared
        // once per connection) and 9 bind parameters whatever the row count.
        let mut ids = Vec::with_capacity(chunk.len());
        let mut ts = Vec::with_capacity(chunk.len());
        let mut customers = Vec::with_capacity(chunk.len());
        let mut meters = Vec::with_capacity(chunk.len());
        let mut units = Vec::with_capacity(chunk.len());
        let mut routes = Vec::with_capacity(chunk.len());
        let mut statuses = Vec::with_capacity(chunk.len());
        let mut latencies = Vec::with_capacity(chunk.len());
        let mut request_ids = Vec::with_capacity(chunk.len());
        for e in chunk {
            ids.push(e.id);
            ts.push(e.ts);
            customers.push(e.customer.as_str());
            meters.push(e.meter.as_str());
            units.push(e.units);
            routes.push(e.route.as_str());
            statuses.push(i32::from(e.status));
            latencies.push(e.latency_us);
            request_ids.push(e.request_id.as_str());
        }
        let done = sqlx::query(
            "INSERT INTO usage_events \
               (id, ts, customer, meter, units, route, status, latency_us, request_id) \
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
               $5::int8[], $6::text[], $7::int4[], $8::int8[], $9::text[]) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(ids)
        .bind(ts)
        .bind(customers)
        .bind(meters)
        .bind(units)
        .bind(routes)
        .bind(statuses)
        .bind(latencies)
        .bind(request_ids)
        .execute(executor)
        .await
        .map_err(LedgerError::query("insert_usage"))?;
        Ok(done.rows_affected())
    }
}

#[async_trait::async_trait]
impl super::UsageLedger for PgLedger {
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64, LedgerError> {
        if events.len() <= INSERT_CHUNK {
            // One statement is atomic on its own: skip BEGIN/COMMIT round trips.
            return if events.is_empty() {
                Ok(0)
            } else {
                Self::insert_chunk(&self.pool, events).await
            };
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(LedgerError::query("insert_usage"))?;
        let mut inserted = 0;
        for chunk in events.chunks(INSERT_CHUNK) {
            inserted += Self::insert_chunk(&mut *tx, chunk).await?;
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
            "SELECT COALESCE(SUM(units), 0)::int8, COUNT(*) FROM usage_events \
             WHERE customer = $1 AND meter = $2 AND ts >= $3 AND ts < $4",
        )
        .bind(customer)
        .bind(meter)
        .bind(from)
        .bind(to)
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
            "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            ["$1", "$2", "$3::text", "$4::text", "$5::text", "$6", "$7"],
        );
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(&sql)
            .bind(query.from)
            .bind(query.to)
            .bind(&query.customer)
            .bind(&query.meter)
            .bind(&query.route)
            // LIMIT NULL is "no limit" on Postgres.
            .bind((limit > 0).then_some(limit))
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
impl super::CustomerLedger for PgLedger {
    async fn get_customer(&self, id: &str) -> Result<Option<Entitlement>, LedgerError> {
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (id) DO UPDATE SET \
               plan = EXCLUDED.plan, status = EXCLUDED.status, \
               status_since = EXCLUDED.status_since, period_start = EXCLUDED.period_start, \
               period_end = EXCLUDED.period_end, suspended = EXCLUDED.suspended, \
               updated_at = EXCLUDED.updated_at, \
               cancel_at_period_end = EXCLUDED.cancel_at_period_end, \
               trial_end = EXCLUDED.trial_end",
        )
        .bind(id)
        .bind(e.plan.as_deref())
        .bind(e.status.as_str())
        .bind(e.status_since)
        .bind(e.period_start)
        .bind(e.period_end)
        .bind(e.suspended)
        .bind(e.updated_at)
        .bind(e.cancel_at_period_end)
        .bind(e.trial_end)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("put_customer"))?;
        Ok(())
    }

    async fn all_customers(&self) -> Result<Vec<(String, Entitlement)>, LedgerError> {
        // COLLATE "C": byte order, the same order SQLite gives.
        let rows = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id COLLATE \"C\""
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
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT customer FROM stripe_customers WHERE stripe_customer_id = $1 FOR UPDATE",
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
            "SELECT stripe_customer_id FROM stripe_customers WHERE customer = $1 FOR UPDATE",
        )
        .bind(customer)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if before.as_deref() != Some(stripe_customer) {
            sqlx::query(
                "INSERT INTO stripe_customers (customer, stripe_customer_id, source) \
                 VALUES ($1, $2, $3) ON CONFLICT (customer) DO UPDATE SET \
                   stripe_customer_id = EXCLUDED.stripe_customer_id, source = EXCLUDED.source, \
                   linked_at = now()",
            )
            .bind(customer)
            .bind(stripe_customer)
            .bind(source)
            .execute(&mut *tx)
            .await
            .map_err(|cause| match &cause {
                // Linked elsewhere by a concurrent writer between our check and the insert.
                sqlx::Error::Database(e) if e.code().as_deref() == Some("23505") => {
                    LedgerError::LinkConflict {
                        stripe_customer: stripe_customer.to_string(),
                        customer: "another customer".into(),
                    }
                }
                _ => LedgerError::Query { op, cause },
            })?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(before)
    }

    async fn stripe_links(&self) -> Result<Vec<(String, String)>, LedgerError> {
        sqlx::query_as::<_, (String, String)>(
            "SELECT customer, stripe_customer_id FROM stripe_customers ORDER BY customer COLLATE \"C\"",
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
             WHERE ($1::text IS NOT NULL AND customer = $1) \
                OR ($1::text IS NULL AND stripe_customer_id = $2)",
        )
        .bind(customer)
        .bind(stripe_customer)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("stripe_link"))
    }
}

#[async_trait::async_trait]
impl super::StripeEventLedger for PgLedger {
    async fn record_stripe_event(
        &self,
        event: &StripeEventRecord,
    ) -> Result<StripeEventState, LedgerError> {
        let inserted = sqlx::query(
            "INSERT INTO stripe_events (id, type, created, payload) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(event.created)
        .bind(&event.payload)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("record_stripe_event"))?;
        if inserted.rows_affected() == 1 {
            return Ok(StripeEventState::New);
        }
        let processed: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT processed_at FROM stripe_events WHERE id = $1")
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
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        // The claim: a concurrent delivery blocks on this row until we commit, then finds
        // processed_at set and claims nothing.
        let claimed = sqlx::query(
            "UPDATE stripe_events SET processed_at = now() \
             WHERE id = $1 AND processed_at IS NULL",
        )
        .bind(id)
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
impl super::ReportLedger for PgLedger {
    async fn claim_usage_reports(
        &self,
        claim: &ReportClaim,
    ) -> Result<Vec<MeterReport>, LedgerError> {
        let op = "claim_usage_reports";
        let meters: Vec<&str> = claim.meters.keys().map(String::as_str).collect();
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        // SKIP LOCKED: another instance claiming at the same moment takes other rows.
        let rows = sqlx::query(
            "SELECT u.id, u.ts, u.customer, u.meter, u.units, l.stripe_customer_id \
             FROM usage_events u JOIN stripe_customers l ON l.customer = u.customer \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL AND u.ts < $1 \
               AND u.meter = ANY($2) \
             ORDER BY u.ts LIMIT $3 FOR UPDATE OF u SKIP LOCKED",
        )
        .bind(claim.until)
        .bind(&meters)
        .bind(claim.max_rows)
        .fetch_all(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(ReportRow {
                    id: r.try_get("id")?,
                    ts: r.try_get("ts")?,
                    customer: r.try_get("customer")?,
                    meter: r.try_get("meter")?,
                    units: r.try_get("units")?,
                    stripe_customer: r.try_get("stripe_customer_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(LedgerError::query(op))?;
        let reports = super::group_reports(
            &rows,
            &claim.meters,
            claim.window_secs,
            claim.too_old_before,
        );
        // Two statements whatever the number of reports (columns as arrays through UNNEST):
        // a claim of many small reports must not hold its row locks for thousands of round trips.
        let mut cols = ReportColumns::default();
        for r in &reports {
            cols.identifier.push(r.identifier.as_str());
            cols.customer.push(r.customer.as_str());
            cols.stripe_customer.push(r.stripe_customer.as_str());
            cols.meter.push(r.meter.as_str());
            cols.event_name.push(r.event_name.as_str());
            cols.ts.push(r.ts);
            cols.value.push(r.value);
            cols.rows.push(r.rows);
            cols.state.push(r.state.as_str());
            // A zero report is done as claimed: its rows count as reported.
            let reported = r.state == ReportState::Zero;
            for id in &r.row_ids {
                cols.row_id.push(*id);
                cols.row_report.push(r.identifier.as_str());
                cols.row_reported.push(reported);
            }
        }
        sqlx::query(
            "INSERT INTO stripe_meter_reports (identifier, customer, stripe_customer_id, \
               meter, event_name, ts, value, row_count, state, finished_at) \
             SELECT i, c, sc, m, e, t, v, n, st, CASE WHEN st = 'pending' THEN NULL ELSE now() END \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
               $6::timestamptz[], $7::int8[], $8::int8[], $9::text[]) AS x(i, c, sc, m, e, t, v, n, st)",
        )
        .bind(&cols.identifier)
        .bind(&cols.customer)
        .bind(&cols.stripe_customer)
        .bind(&cols.meter)
        .bind(&cols.event_name)
        .bind(&cols.ts)
        .bind(&cols.value)
        .bind(&cols.rows)
        .bind(&cols.state)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        sqlx::query(
            "UPDATE usage_events u SET report_id = x.r, \
               reported_at = CASE WHEN x.done THEN now() ELSE NULL END \
             FROM UNNEST($1::uuid[], $2::text[], $3::bool[]) AS x(id, r, done) WHERE u.id = x.id",
        )
        .bind(&cols.row_id)
        .bind(&cols.row_report)
        .bind(&cols.row_reported)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(reports)
    }

    async fn pending_usage_reports(
        &self,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<MeterReport>, LedgerError> {
        let rows = sqlx::query(
            "SELECT identifier, customer, stripe_customer_id, meter, event_name, ts, value, \
               row_count, state, CAST(attempts AS BIGINT) AS attempts, ambiguous_since \
             FROM stripe_meter_reports \
             WHERE state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= $2) \
             ORDER BY ts, identifier LIMIT $1",
        )
        .bind(limit)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("pending_usage_reports"))?;
        rows.iter()
            .map(|r| {
                let state: String = r
                    .try_get("state")
                    .map_err(LedgerError::query("pending_usage_reports"))?;
                let read = || -> Result<MeterReport, sqlx::Error> {
                    Ok(MeterReport {
                        identifier: r.try_get("identifier")?,
                        customer: r.try_get("customer")?,
                        stripe_customer: r.try_get("stripe_customer_id")?,
                        meter: r.try_get("meter")?,
                        event_name: r.try_get("event_name")?,
                        ts: r.try_get("ts")?,
                        value: r.try_get("value")?,
                        rows: r.try_get("row_count")?,
                        state: ReportState::Pending,
                        row_ids: Vec::new(),
                        attempts: r.try_get("attempts")?,
                        ambiguous_since: r.try_get("ambiguous_since")?,
                    })
                };
                let mut report = read().map_err(LedgerError::query("pending_usage_reports"))?;
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
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        let done = sqlx::query(
            "UPDATE stripe_meter_reports SET state = $2, finished_at = now(), \
               attempts = attempts + 1 \
             WHERE identifier = $1 AND state = 'pending'",
        )
        .bind(identifier)
        .bind(state.as_str())
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        let mut marked = 0;
        if done.rows_affected() == 1 && state == ReportState::Delivered {
            marked = mark_reported(&mut tx, identifier, op).await?;
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
             SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3, \
               ambiguous_since = CASE WHEN $4 THEN COALESCE(ambiguous_since, now()) \
                 ELSE ambiguous_since END \
             WHERE identifier = $1 AND state = 'pending'",
        )
        .bind(identifier)
        .bind(error)
        .bind(retry_at)
        .bind(ambiguous)
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
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        let done = sqlx::query(
            "UPDATE stripe_meter_reports SET \
               state = CASE WHEN $2 THEN 'delivered' ELSE 'pending' END, \
               finished_at = CASE WHEN $2 THEN now() ELSE NULL END, \
               ambiguous_since = NULL, next_attempt_at = NULL \
             WHERE identifier = $1 AND state = 'uncertain'",
        )
        .bind(identifier)
        .bind(landed)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let mut marked = 0;
        if landed {
            marked = mark_reported(&mut tx, identifier, op).await?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(Some(marked))
    }

    async fn unlinked_usage_rows(&self, meters: &[String]) -> Result<i64, LedgerError> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage_events u \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL AND u.meter = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM stripe_customers l WHERE l.customer = u.customer)",
        )
        .bind(meters)
        .fetch_one(&self.pool)
        .await
        .map_err(LedgerError::query("unlinked_usage_rows"))
    }
}

#[async_trait::async_trait]
impl super::ConfigLedger for PgLedger {
    async fn insert_config_version(
        &self,
        author: &str,
        document: &str,
        audit: &super::AuditRecord,
    ) -> Result<super::ConfigVersion, LedgerError> {
        let op = "insert_config_version";
        let mut tx = self.pool.begin().await.map_err(LedgerError::query(op))?;
        let (version, created_at): (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO config_versions (author, document) VALUES ($1, $2) \
             RETURNING version, created_at",
        )
        .bind(author)
        .bind(document)
        .fetch_one(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        sqlx::query(
            "INSERT INTO audit_log (actor, action, target, before, after) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(author)
        .bind(&audit.action)
        .bind(&audit.target)
        .bind(&audit.before)
        .bind(&audit.after)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(super::ConfigVersion {
            version,
            created_at,
            author: author.to_string(),
            document: document.to_string(),
        })
    }

    async fn config_version(
        &self,
        version: i64,
    ) -> Result<Option<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, DateTime<Utc>, String, String)>(
            "SELECT version, created_at, author, document FROM config_versions WHERE version = $1",
        )
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("config_version"))
        .map(|r| r.map(pg_config_version))
    }

    async fn latest_config_version(
        &self,
        author_prefix: Option<&str>,
    ) -> Result<Option<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, DateTime<Utc>, String, String)>(
            "SELECT version, created_at, author, document FROM config_versions \
             WHERE $1::text IS NULL OR left(author, length($1)) = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(author_prefix)
        .fetch_optional(&self.pool)
        .await
        .map_err(LedgerError::query("latest_config_version"))
        .map(|r| r.map(pg_config_version))
    }

    async fn config_versions(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<super::ConfigVersion>, LedgerError> {
        sqlx::query_as::<_, (i64, DateTime<Utc>, String, String)>(
            "SELECT version, created_at, author, '' FROM config_versions \
             WHERE $1::int8 IS NULL OR version < $1 ORDER BY version DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("config_versions"))
        .map(|rows| rows.into_iter().map(pg_config_version).collect())
    }

    async fn insert_audit(
        &self,
        actor: &str,
        record: &super::AuditRecord,
    ) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO audit_log (actor, action, target, before, after) \
             VALUES ($1, $2, $3, $4, $5)",
        )
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
            DateTime<Utc>,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at, actor, action, target, before, after FROM audit_log \
             WHERE $1::int8 IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("audit_entries"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, at, actor, action, target, before, after)| super::AuditEntry {
                    id,
                    at,
                    actor,
                    action,
                    target,
                    before,
                    after,
                },
            )
            .collect())
    }
}

#[async_trait::async_trait]
impl super::AlertLedger for PgLedger {
    async fn claim_alert(
        &self,
        a: &super::AlertClaim,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<i64>, LedgerError> {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO alert_deliveries \
             (customer, meter, period_start, threshold, plan, used, included, period_end, \
              lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (customer, meter, period_start, threshold) DO NOTHING RETURNING id",
        )
        .bind(&a.customer)
        .bind(&a.meter)
        .bind(a.period_start)
        .bind(a.threshold as i32)
        .bind(&a.plan)
        .bind(a.used)
        .bind(a.included)
        .bind(a.period_end)
        .bind(lease_until)
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
        sqlx::query(
            "UPDATE alert_deliveries SET attempts = attempts + 1, last_attempt_at = now(), \
             last_status = $2, last_error = $3, \
             delivered_at = CASE WHEN $4 AND delivered_at IS NULL THEN now() ELSE delivered_at END, \
             lease_until = $5 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(delivered)
        .bind(lease_until)
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
        // SKIP LOCKED: instances resuming at once each take different alerts.
        let rows = sqlx::query(&format!(
            "UPDATE alert_deliveries SET lease_until = $3 WHERE id IN ( \
               SELECT id FROM alert_deliveries \
               WHERE delivered_at IS NULL AND attempts < $4 AND created_at > $2 \
                 AND (lease_until IS NULL OR lease_until < $1) \
               ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED) \
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(now)
        .bind(since)
        .bind(lease_until)
        .bind(max_attempts)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("resume_alerts"))?;
        let mut out: Vec<_> = rows.iter().map(alert_from_row).collect();
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    async fn release_alerts(&self, ids: &[i64]) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE alert_deliveries SET lease_until = NULL \
             WHERE id = ANY($1) AND delivered_at IS NULL",
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
            "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $4) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
             WHERE leases.holder = EXCLUDED.holder OR leases.until < $3",
        )
        .bind(name)
        .bind(holder)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(LedgerError::query("try_lease"))?;
        Ok(taken.rows_affected() == 1)
    }

    async fn alert_deliveries(&self, limit: i64) -> Result<Vec<super::AlertDelivery>, LedgerError> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alert_deliveries ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(LedgerError::query("alert_deliveries"))?;
        Ok(rows.iter().map(alert_from_row).collect())
    }
}

#[async_trait::async_trait]
impl super::Ledger for PgLedger {
    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(LedgerError::query("ping"))?;
        Ok(())
    }
}

/// Marks the rows of report `identifier` reported (Stripe has their event); returns how many.
async fn mark_reported(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    identifier: &str,
    op: &'static str,
) -> Result<u64, LedgerError> {
    Ok(sqlx::query(
        "UPDATE usage_events SET reported_at = now() \
         WHERE report_id = $1 AND reported_at IS NULL",
    )
    .bind(identifier)
    .execute(&mut **tx)
    .await
    .map_err(LedgerError::query(op))?
    .rows_affected())
}

const ALERT_COLUMNS: &str = "id, customer, meter, period_start, period_end, threshold, plan, \
     used, included, created_at, attempts, last_attempt_at, last_status, last_error, delivered_at";

fn alert_from_row(r: &PgRow) -> super::AlertDelivery {
    super::AlertDelivery {
        id: r.get("id"),
        alert: super::AlertClaim {
            customer: r.get("customer"),
            meter: r.get("meter"),
            period_start: r.get("period_start"),
            period_end: r.get("period_end"),
            threshold: r.get::<i32, _>("threshold").max(0) as u32,
            plan: r.get("plan"),
            used: r.get("used"),
            included: r.get("included"),
        },
        created_at: r.get("created_at"),
        attempts: i64::from(r.get::<i32, _>("attempts")),
        last_attempt_at: r.get("last_attempt_at"),
        last_status: r.get::<Option<i32>, _>("last_status").map(i64::from),
        last_error: r.get("last_error"),
        delivered_at: r.get("delivered_at"),
    }
}

fn pg_config_version(
    (version, created_at, author, document): (i64, DateTime<Utc>, String, String),
) -> super::ConfigVersion {
    super::ConfigVersion {
        version,
        created_at,
        author,
        document,
    }
}

/// [`MeterReport`]s as columns, for one UNNEST insert (and their rows, for one UPDATE).
#[derive(Default)]
struct ReportColumns<'a> {
    identifier: Vec<&'a str>,
    customer: Vec<&'a str>,
    stripe_customer: Vec<&'a str>,
    meter: Vec<&'a str>,
    event_name: Vec<&'a str>,
    ts: Vec<DateTime<Utc>>,
    value: Vec<i64>,
    rows: Vec<i64>,
    state: Vec<&'a str>,
    row_id: Vec<uuid::Uuid>,
    row_report: Vec<&'a str>,
    row_reported: Vec<bool>,
}

fn customer_from_row(row: &PgRow) -> Result<(String, Entitlement), LedgerError> {
    let get = LedgerError::query("read customers");
    let read = || -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>("id")?,
            row.try_get::<Option<String>, _>("plan")?,
            row.try_get::<String, _>("status")?,
            row.try_get::<Option<DateTime<Utc>>, _>("status_since")?,
            row.try_get::<Option<DateTime<Utc>>, _>("period_start")?,
            row.try_get::<Option<DateTime<Utc>>, _>("period_end")?,
            row.try_get::<bool, _>("suspended")?,
            row.try_get::<DateTime<Utc>, _>("updated_at")?,
            row.try_get::<bool, _>("cancel_at_period_end")?,
            row.try_get::<Option<DateTime<Utc>>, _>("trial_end")?,
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
    ) = read().map_err(get)?;
    let status = Status::parse(&status).ok_or_else(|| LedgerError::Corrupt {
        table: "customers",
        detail: format!("customer {id:?} has unknown status {status:?}"),
    })?;
    Ok((
        id,
        Entitlement {
            plan,
            status,
            status_since,
            period_start,
            period_end,
            suspended,
            updated_at,
            cancel_at_period_end,
            trial_end,
        },
    ))
}

/// Accepts only plain identifiers (what `search_path` and `"…"` quoting take without escaping).
fn check_schema_name(name: &str) -> Result<(), LedgerError> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LedgerError::InvalidSchema(name.to_string()))
    }
}

async fn create_schema(base: &PgConnectOptions, name: &str) -> Result<(), LedgerError> {
    let mut conn = sqlx::PgConnection::connect_with(base)
        .await
        .map_err(LedgerError::Connect)?;
    let created = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{name}\""))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    match created {
        Ok(_) => Ok(()),
        // Two instances creating it at once: IF NOT EXISTS is not atomic in Postgres, the loser
        // gets a unique violation on the catalog. The schema exists either way.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(()),
        Err(cause) => Err(LedgerError::CreateSchema {
            schema: name.to_string(),
            cause,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::{events, PgSchema, PG_URL};
    use crate::ledger::{open, UsageLedger};

    /// Every pooled connection (not just the first) has the test schema as its search_path.
    #[tokio::test]
    async fn search_path_is_set_on_every_pooled_connection() {
        let s = PgSchema::new();
        let ledger = PgLedger::connect(PG_URL, Some(&s.name))
            .await
            .expect("connect");
        // Hold several at once so the pool must open new ones.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(ledger.pool().acquire().await.expect("acquire"));
        }
        for conn in &mut held {
            let current: String = sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&mut **conn)
                .await
                .expect("current_schema");
            assert_eq!(current, s.name);
        }
    }

    /// Two schemas on one database are fully isolated ledgers.
    #[tokio::test]
    async fn schemas_isolate_ledgers() {
        let (a, b) = (PgSchema::new(), PgSchema::new());
        let (la, lb) = (a.open().await, b.open().await);
        let evs = events(10, "acme", "api_calls");
        assert_eq!(la.insert_usage(&evs).await.expect("insert a"), 10);
        // The same ids are new to the other schema.
        assert_eq!(lb.insert_usage(&evs[..3]).await.expect("insert b"), 3);
        let to = evs[9].ts + chrono::Duration::seconds(1);
        let ta = la
            .usage_totals("acme", "api_calls", evs[0].ts, to)
            .await
            .expect("a");
        let tb = lb
            .usage_totals("acme", "api_calls", evs[0].ts, to)
            .await
            .expect("b");
        assert_eq!((ta.1, tb.1), (10, 3));
    }

    /// Schema names that would need quoting are refused before any SQL runs.
    #[tokio::test]
    async fn bad_schema_names_are_refused() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "x\"; DROP SCHEMA public; --",
            &"a".repeat(64),
        ] {
            let err = open(PG_URL, Some(bad)).await.err().expect("refused");
            assert!(
                matches!(err, LedgerError::InvalidSchema(_)),
                "{bad:?}: {err}"
            );
        }
    }

    /// Every field of a usage event is stored as given (u16 status, microsecond ts, uuid id).
    #[tokio::test]
    async fn usage_event_fields_round_trip() {
        let s = PgSchema::new();
        let ledger = PgLedger::connect(PG_URL, Some(&s.name))
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
            ts: row.get("ts"),
            customer: row.get("customer"),
            meter: row.get("meter"),
            units: row.get("units"),
            route: row.get("route"),
            status: u16::try_from(row.get::<i32, _>("status")).expect("u16"),
            latency_us: row.get("latency_us"),
            request_id: row.get("request_id"),
        };
        assert_eq!(back, ev);
        assert_eq!(row.get::<Option<DateTime<Utc>>, _>("reported_at"), None);
    }
}
