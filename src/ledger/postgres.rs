//! The Postgres backend (production; many instances may share one database): the pool,
//! connect and migrate for `migrations/postgres`, and its [`Backend`] dialect, including its two
//! statements of its own: usage inserted and claimed reports stored with columns bound as arrays
//! (`UNNEST`), so a batch is one statement whatever its size.
//!
//! Must not touch other schemas: with a schema given, every pooled connection starts with that
//! schema alone as its `search_path` (a startup parameter, so even a reconnect after a failover
//! cannot land in `public`), and all SQL of the ledger is unqualified.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Transaction};

use super::dialect::{sqlx_glue, Backend, List, On, Q};
use super::reports::STORED_REPORT_COLUMNS;
use super::usage::{INSERT_USAGE_HEAD, INSERT_USAGE_TAIL};
use super::{LedgerError, MeterReport, ReportState, SqlLedger, UsageEvent};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Pool bound. The flusher writes from one task; the admin API, reconciler and Stripe reporter
/// add a few readers. Kept well under Postgres' default 100 connections with several instances.
const MAX_CONNECTIONS: u32 = 8;

/// How long a caller waits for a pooled connection before the ledger counts as down. Short, so
/// `/readyz` and the flusher notice an outage quickly instead of queueing for sqlx's 30 s.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Columns as arrays through UNNEST: one statement text for every chunk size (prepared once per
/// connection) and 9 bind parameters whatever the row count.
static INSERT_USAGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{INSERT_USAGE_HEAD}SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], \
           $4::text[], $5::int8[], $6::text[], $7::int4[], $8::int8[], $9::text[]){INSERT_USAGE_TAIL}"
    )
});

/// A claim's reports, all in one statement; those not left to send are finished at `$10`.
static STORE_REPORTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO stripe_meter_reports ({STORED_REPORT_COLUMNS}, finished_at) \
         SELECT i, c, sc, m, e, t, v, n, st, CASE WHEN st = 'pending' THEN NULL ELSE $10 END \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
           $6::timestamptz[], $7::int8[], $8::int8[], $9::text[]) \
           AS x(i, c, sc, m, e, t, v, n, st)"
    )
});

/// A claim's usage rows pointed at their reports, all in one statement.
const CLAIM_ROWS: &str = "UPDATE usage_events u SET report_id = x.r, \
       reported_at = CASE WHEN x.done THEN $4 ELSE NULL END \
     FROM UNNEST($1::uuid[], $2::text[], $3::bool[]) AS x(id, r, done) WHERE u.id = x.id";

/// The Postgres [`Ledger`](super::Ledger). Cheap to clone (the pool is shared).
pub type PgLedger = SqlLedger<Postgres>;

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
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(LedgerError::Connect)?;
        Ok(SqlLedger::from_pool(pool))
    }

    /// Applies pending migrations from `migrations/postgres`; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, LedgerError> {
        super::run_migrations(self.pool(), &MIGRATOR).await
    }
}

impl Backend for Postgres {
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const DAY_OF_TS: &'static str = "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
    const AUTOCOMMIT_ONE_STATEMENT: bool = true;

    fn skip_locked(table: &str) -> String {
        format!(" FOR UPDATE OF {table} SKIP LOCKED")
    }

    fn in_list(expr: &str, param: &str) -> String {
        format!("{expr} = ANY({param})")
    }

    fn bind_list<'q>(q: Q<'q, Self>, list: List<'q>) -> Q<'q, Self> {
        match list {
            List::Text(items) => q.bind(items),
            List::Int(items) => q.bind(items),
        }
    }

    fn begin_write(
        pool: &PgPool,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send + '_ {
        pool.begin()
    }

    fn insert_usage_chunk<'e>(
        on: On<'e, Self>,
        chunk: &'e [UsageEvent],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'e {
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
        let q = sqlx::query(INSERT_USAGE.as_str())
            .bind(ids)
            .bind(ts)
            .bind(customers)
            .bind(meters)
            .bind(units)
            .bind(routes)
            .bind(statuses)
            .bind(latencies)
            .bind(request_ids);
        Self::execute(q, on)
    }

    async fn store_reports<'e>(
        conn: &'e mut PgConnection,
        reports: &'e [MeterReport],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // Two statements whatever the number of reports: a claim of many small reports must
        // not hold its row locks for thousands of round trips.
        let mut cols = ReportColumns::default();
        for r in reports {
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
        sqlx::query(STORE_REPORTS.as_str())
            .bind(&cols.identifier)
            .bind(&cols.customer)
            .bind(&cols.stripe_customer)
            .bind(&cols.meter)
            .bind(&cols.event_name)
            .bind(&cols.ts)
            .bind(&cols.value)
            .bind(&cols.rows)
            .bind(&cols.state)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        sqlx::query(CLAIM_ROWS)
            .bind(&cols.row_id)
            .bind(&cols.row_report)
            .bind(&cols.row_reported)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    sqlx_glue!();
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
    use crate::ledger::open;
    use crate::ledger::test_support::{events, PgSchema, PG_URL};

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

    /// A bound time is a `timestamptz` parameter (not text, not an integer).
    #[tokio::test]
    async fn time_binds_as_timestamptz() {
        let s = PgSchema::new();
        let ledger = s.open_typed().await;
        let kind: String = sqlx::query_scalar("SELECT pg_typeof($1)::text")
            .bind(crate::ledger::dialect::Time(chrono::Utc::now()))
            .fetch_one(ledger.pool())
            .await
            .expect("select");
        assert_eq!(kind, "timestamp with time zone");
    }
}
