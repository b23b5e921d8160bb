//! The SQLite backend (embedded mode: one instance, one file): the pool, connect and migrate
//! for `migrations/sqlite`, and its [`Backend`] dialect, including its two statements of its own
//! (a multi-row VALUES insert of usage, and claimed reports stored row by row: with one writer,
//! per-row statements inside the transaction are cheap).
//!
//! Times are INTEGER microseconds since the Unix epoch (UTC): exact to the microsecond like
//! Postgres' timestamptz, and ordered as numbers so range scans use the indexes (see
//! `dialect::Time`). Usage ids are 16-byte BLOBs. Must not be shared by several tollgate
//! processes (SQLite has one writer).

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::dialect::{sqlx_glue, Backend, List, On, Time, Q};
use super::reports::STORED_REPORT_COLUMNS;
use super::usage::{INSERT_USAGE_HEAD, INSERT_USAGE_TAIL};
use super::{LedgerError, MeterReport, ReportState, SqlLedger, UsageEvent, INSERT_CHUNK};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Readers run in parallel under WAL; writes serialize on SQLite's lock whatever the pool size.
const MAX_CONNECTIONS: u32 = 4;

/// How long a writer waits for another's lock before failing with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A claim's usage row pointed at its report.
const CLAIM_ROW: &str = "UPDATE usage_events SET report_id = $1, reported_at = $2 WHERE id = $3";

/// The SQLite [`Ledger`](super::Ledger). Cheap to clone (the pool is shared).
pub type SqliteLedger = SqlLedger<Sqlite>;

// === impl SqliteLedger ===

impl SqliteLedger {
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
        let pool: SqlitePool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(LedgerError::Connect)?;
        Ok(SqlLedger::from_pool(pool))
    }

    /// Applies pending migrations from `migrations/sqlite`; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, LedgerError> {
        super::run_migrations(self.pool(), &MIGRATOR).await
    }
}

impl Backend for Sqlite {
    // SQLite compares text bytewise unless told otherwise.
    const BYTE_ORDER: &'static str = "";
    const FOR_UPDATE: &'static str = "";
    const DAY_OF_TS: &'static str = "strftime('%Y-%m-%d', ts / 1000000, 'unixepoch')";
    const AUTOCOMMIT_ONE_STATEMENT: bool = false;

    fn skip_locked(_table: &str) -> String {
        String::new()
    }

    fn in_list(expr: &str, param: &str) -> String {
        format!("{expr} IN (SELECT value FROM json_each({param}))")
    }

    fn bind_list<'q>(q: Q<'q, Self>, list: List<'q>) -> Q<'q, Self> {
        let json = match list {
            List::Text(items) => serde_json::Value::from(items),
            List::Int(items) => serde_json::Value::from(items),
        };
        q.bind(json.to_string())
    }

    /// Starts a write transaction with `BEGIN IMMEDIATE`, which takes SQLite's write lock at
    /// once (waiting out another writer for up to `BUSY_TIMEOUT`). A deferred `BEGIN` that reads
    /// before it writes has to upgrade its read snapshot, and if another connection committed in
    /// between SQLite refuses the upgrade at once with SQLITE_BUSY_SNAPSHOT (517), whatever the
    /// busy timeout: 10 concurrent deliveries of one webhook, each linking the same customer,
    /// got a 503 that way now and then.
    fn begin_write(
        pool: &SqlitePool,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send + '_ {
        pool.begin_with("BEGIN IMMEDIATE")
    }

    async fn insert_usage_chunk<'e>(
        on: On<'e, Self>,
        chunk: &'e [UsageEvent],
    ) -> Result<u64, sqlx::Error> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(INSERT_USAGE_HEAD);
        q.push_values(chunk, |mut row, e| {
            row.push_bind(e.id)
                .push_bind(Time(e.ts))
                .push_bind(e.customer.as_str())
                .push_bind(e.meter.as_str())
                .push_bind(e.units)
                .push_bind(e.route.as_str())
                .push_bind(i32::from(e.status))
                .push_bind(e.latency_us)
                .push_bind(e.request_id.as_str());
        });
        q.push(INSERT_USAGE_TAIL);
        // Only full chunks share a statement text; caching the odd-sized tails would evict
        // useful statements.
        let q = q.build().persistent(chunk.len() == INSERT_CHUNK);
        Self::execute(q, on).await
    }

    async fn store_reports<'e>(
        conn: &'e mut SqliteConnection,
        reports: &'e [MeterReport],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let insert = format!(
            "INSERT INTO stripe_meter_reports ({STORED_REPORT_COLUMNS}, created_at, \
               finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        for r in reports {
            let finished = (r.state != ReportState::Pending).then_some(Time(now));
            sqlx::query(&insert)
                .bind(&r.identifier)
                .bind(&r.customer)
                .bind(&r.stripe_customer)
                .bind(&r.meter)
                .bind(&r.event_name)
                .bind(Time(r.ts))
                .bind(r.value)
                .bind(r.rows)
                .bind(r.state.as_str())
                .bind(Time(now))
                .bind(finished)
                .execute(&mut *conn)
                .await?;
            // A zero report is done as claimed: its rows count as reported.
            let reported = (r.state == ReportState::Zero).then_some(Time(now));
            for id in &r.row_ids {
                sqlx::query(CLAIM_ROW)
                    .bind(&r.identifier)
                    .bind(reported)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    sqlx_glue!();
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

    /// Times are stored as INTEGER microseconds since the epoch (what existing files hold).
    #[tokio::test]
    async fn times_are_stored_as_integer_microseconds() {
        let dir = TempDir::new();
        let ledger = dir.open_typed().await;
        let ev = events(1, "acme", "tokens").remove(0);
        ledger
            .insert_usage(std::slice::from_ref(&ev))
            .await
            .expect("insert");
        let (ts, kind): (i64, String) = sqlx::query_as("SELECT ts, typeof(ts) FROM usage_events")
            .fetch_one(ledger.pool())
            .await
            .expect("select");
        assert_eq!(ts, t0().timestamp_micros());
        assert_eq!(kind, "integer");
    }

    /// A stored time no `DateTime` can hold (a hand-edited row) makes the row corrupt.
    #[tokio::test]
    async fn out_of_range_time_is_corrupt() {
        let dir = TempDir::new();
        let ledger = dir.open_typed().await;
        sqlx::query("INSERT INTO customers (id, status, updated_at) VALUES ('c', 'active', ?1)")
            .bind(i64::MAX)
            .execute(ledger.pool())
            .await
            .expect("insert");
        let err = ledger.get_customer("c").await.expect_err("corrupt");
        assert!(
            matches!(
                err,
                LedgerError::Corrupt {
                    table: "customers",
                    ..
                }
            ),
            "{err}"
        );
    }
}
