//! The ledger: tollgate's durable record (DESIGN §3) — customers' entitlements, one
//! `usage_events` row per forwarded request, Stripe events, config history and the audit log.
//!
//! Owns the SQL schema (`migrations/postgres`, `migrations/sqlite`), the connection pools and the
//! [`Ledger`] trait the rest of tollgate is written against. Postgres serves production (many
//! instances may share one database); a SQLite file serves the embedded mode.
//!
//! It must not be touched from the request path: the proxy reads entitlements from the in-process
//! cache (`entitle`) and hands usage to `usage::UsageSink`, which never awaits. Only background
//! tasks, the admin API and start-up call into this module.
//!
//! Layout — each query is written once, for both backends:
//! - `mod.rs`: the record types, [`LedgerError`], [`Ledger`] (every concern's trait), [`open`] /
//!   [`migrate`] (URL → backend) and [`SqlLedger`], the one ledger type behind both backends.
//! - one module per concern, each with its trait, its SQL and its contract tests (run on both
//!   backends): `usage` ([`UsageLedger`]: usage rows), `customers` ([`CustomerLedger`]:
//!   entitlements, the one Stripe upsert, Stripe links), `stripe_events` ([`StripeEventLedger`]:
//!   webhook events), `reports` ([`ReportLedger`]: usage reports to Stripe), `config_versions`
//!   ([`ConfigLedger`]: config history and the audit log), `alerts` ([`AlertLedger`]: alert
//!   deliveries and leases), `invoices` ([`InvoiceLedger`]: Stripe invoices), `ingest`
//!   ([`IngestLedger`]: usage reported as events, once each), `reservations`
//!   ([`ReservationLedger`]: units held for work in progress, settled once).
//! - `dialect`: what differs between the backends (SQL fragments, time encoding, the two
//!   statements written per backend) and the thin layer shared code runs queries through.
//! - `test_support` (tests only): fixtures, and `contract!`, which runs a check on both backends.
//! - [`postgres`] / [`sqlite`]: the pools, connect and migrate, and their dialect.
//!
//! Times are stored with microsecond precision on both backends; nanoseconds are truncated.
//! Every time tollgate writes is bound from the instance's clock (SQLite has no `now()`); only
//! column defaults (`created_at` of alerts and of Postgres' meter reports, `received_at`) come
//! from the database's.

mod alerts;
mod config_versions;
mod customers;
mod dialect;
mod ingest;
mod invoices;
pub mod postgres;
mod reports;
mod reservations;
pub mod sqlite;
mod stripe_events;
mod usage;

#[cfg(test)]
pub(crate) mod test_support;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use alerts::AlertLedger;
pub use config_versions::ConfigLedger;
pub use customers::CustomerLedger;
pub use ingest::{IngestLedger, IngestRecord};
pub use invoices::{InvoiceLedger, InvoiceRecord, InvoiceTotal};
pub use postgres::PgLedger;
pub use reports::{group_reports, ReportLedger};
pub use reservations::{Reservation, ReservationLedger, Settled, ROUTE as RESERVATION_ROUTE};
pub use sqlite::SqliteLedger;
pub use stripe_events::StripeEventLedger;
pub use usage::UsageLedger;

/// One forwarded request, as charged. `id` is UUIDv7 (primary key), made on the request path so
/// that every retry or spool replay of the same event is a no-op in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// UUIDv7: unique per request, and time-ordered.
    pub id: uuid::Uuid,
    /// When the request arrived. Stored to the microsecond.
    pub ts: DateTime<Utc>,
    /// The customer charged (the token's customer claim).
    pub customer: String,
    /// The meter charged (`api_calls`, `tokens`, …).
    pub meter: String,
    /// Units finally charged (0 when refunded).
    pub units: i64,
    /// The route's name (never the raw path).
    pub route: String,
    /// HTTP status sent downstream.
    pub status: u16,
    /// Time from request to response, in microseconds.
    pub latency_us: i64,
    /// The `X-Request-Id` sent upstream.
    pub request_id: String,
}

/// What went wrong talking to the ledger. `Display` says what failed and includes the
/// underlying cause, so log it with `%err`; the URL is never echoed (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The URL's scheme names no backend we have.
    #[error(
        "unsupported ledger URL scheme {scheme:?}: expected postgres://, postgresql:// or sqlite:"
    )]
    UnsupportedUrl { scheme: String },
    /// The URL could not be parsed by the backend's driver.
    #[error("invalid ledger URL: {0}")]
    InvalidUrl(sqlx::Error),
    /// A Postgres schema name we refuse to interpolate into SQL.
    #[error("invalid ledger schema name {0:?}: use 1-63 ASCII letters, digits or '_', not starting with a digit")]
    InvalidSchema(String),
    /// A schema was given for a backend that has none.
    #[error("a ledger schema ({0:?}) is only supported on Postgres")]
    SchemaNotSupported(String),
    /// Creating the SQLite file's directory failed.
    #[error("cannot create the ledger directory {path}: {cause}")]
    Io {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    /// The first connection (or creating the schema) failed: wrong host, database, credentials.
    #[error("cannot connect to the ledger: {0}")]
    Connect(sqlx::Error),
    /// The schema could not be created (permissions, a clash with another object).
    #[error("cannot create ledger schema {schema:?}: {cause}")]
    CreateSchema { schema: String, cause: sqlx::Error },
    /// Applying the migrations failed.
    #[error("ledger migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A query failed; `op` names the ledger operation.
    #[error("ledger {op} failed: {cause}")]
    Query {
        op: &'static str,
        cause: sqlx::Error,
    },
    /// A ledger call did not finish in time (a hung connection counts as an outage).
    #[error("ledger {op} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        after: std::time::Duration,
    },
    /// The Stripe customer is already linked to another tollgate customer.
    #[error("Stripe customer {stripe_customer:?} is already linked to {customer:?}")]
    LinkConflict {
        stripe_customer: String,
        customer: String,
    },
    /// A stored row holds something tollgate cannot read back (hand-edited or from a newer
    /// version).
    #[error("ledger row in {table} is unreadable: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

impl LedgerError {
    /// Wraps a query error with the operation that ran it.
    pub(crate) fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
        move |cause| LedgerError::Query { op, cause }
    }
}

/// A verified Stripe webhook event, as stored in `stripe_events` before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeEventRecord {
    /// Stripe's event id (`evt_…`): the primary key, so a redelivery finds the first copy.
    pub id: String,
    /// The event type (`customer.subscription.updated`, …).
    pub event_type: String,
    /// Stripe's `created` (seconds).
    pub created: DateTime<Utc>,
    /// The body exactly as received (audit, and reprocessing).
    pub payload: String,
}

/// What [`StripeEventLedger::record_stripe_event`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeEventState {
    /// First delivery: stored now, not applied yet.
    New,
    /// Stored by an earlier delivery whose processing did not finish (crash, or a concurrent
    /// delivery still working): process it now.
    Pending,
    /// Already applied: acknowledge and do nothing.
    Processed,
}

/// What [`StripeEventLedger::finish_stripe_event`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeFinish {
    /// Another delivery finished first: nothing written.
    AlreadyProcessed,
    /// Marked processed; `changed` says whether the customer row was written (false when there
    /// was nothing to apply or the stored state is newer than the event).
    Processed { changed: bool },
}

/// Tollgate's durable store: every concern's trait, plus a health check. Object-safe so that
/// start-up picks the backend from the URL; an `Arc<dyn Ledger>` answers every concern's methods.
#[async_trait::async_trait]
pub trait Ledger:
    UsageLedger
    + CustomerLedger
    + StripeEventLedger
    + ReportLedger
    + ConfigLedger
    + AlertLedger
    + InvoiceLedger
    + IngestLedger
    + ReservationLedger
    + Send
    + Sync
    + 'static
{
    /// One round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), LedgerError>;
}

/// A threshold crossing to claim in `alert_deliveries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AlertClaim {
    pub customer: String,
    pub meter: String,
    pub period_start: DateTime<Utc>,
    /// `None` for alerts claimed before it was kept.
    pub period_end: Option<DateTime<Utc>>,
    /// Percent of `included`.
    pub threshold: u32,
    pub plan: String,
    /// The counter when it crossed.
    pub used: i64,
    pub included: i64,
}

/// One row of the alert delivery log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AlertDelivery {
    pub id: i64,
    #[serde(flatten)]
    pub alert: AlertClaim,
    pub created_at: DateTime<Utc>,
    pub attempts: i64,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// How [`UsageLedger::usage_report`] groups rows (each group is further split by meter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroupBy {
    /// UTC calendar day, key `YYYY-MM-DD`.
    Day,
    /// Route name.
    Route,
    /// Customer id.
    Customer,
    /// No grouping: one row per meter, key empty.
    Total,
}

/// The rows a usage report covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub customer: Option<String>,
    pub meter: Option<String>,
    pub route: Option<String>,
    pub group_by: UsageGroupBy,
}

/// One group of a usage report: units summed and rows counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageGroup {
    pub key: String,
    pub meter: String,
    pub units: i64,
    pub requests: i64,
}

/// What [`ReportLedger::claim_usage_reports`] takes.
#[derive(Debug, Clone)]
pub struct ReportClaim {
    /// Meter name → Stripe meter `event_name`; rows of other meters are not reported.
    pub meters: std::collections::BTreeMap<String, String>,
    /// Only rows older than this (the newest ones may still be joined by late rows).
    pub until: DateTime<Utc>,
    /// Aggregation window in seconds (UTC-aligned).
    pub window_secs: i64,
    /// Rows older than this are outside Stripe's timestamp window: claimed as `TooOld`.
    pub too_old_before: DateTime<Utc>,
    pub max_rows: i64,
}

/// A usage row as the reporter claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub id: uuid::Uuid,
    pub ts: DateTime<Utc>,
    pub customer: String,
    pub meter: String,
    pub units: i64,
    pub stripe_customer: String,
}

/// Where a [`MeterReport`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportState {
    /// Not yet acknowledged by Stripe.
    Pending,
    /// Stripe answered 2xx, or "already exists" for its identifier (an earlier try landed).
    Delivered,
    /// Its units sum to 0 (every row refunded): nothing to send, rows marked reported.
    Zero,
    /// Older than Stripe accepts (35 days): flagged, never sent.
    TooOld,
    /// A try may have landed unanswered (timeout, 5xx) more than Stripe's identifier
    /// deduplication window ago: resending could count twice, so an operator decides.
    Uncertain,
}

impl ReportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Pending => "pending",
            ReportState::Delivered => "delivered",
            ReportState::Zero => "zero",
            ReportState::TooOld => "too_old",
            ReportState::Uncertain => "uncertain",
        }
    }

    pub fn parse(s: &str) -> Option<ReportState> {
        Some(match s {
            "pending" => ReportState::Pending,
            "delivered" => ReportState::Delivered,
            "zero" => ReportState::Zero,
            "too_old" => ReportState::TooOld,
            "uncertain" => ReportState::Uncertain,
            _ => return None,
        })
    }
}

/// One Billing meter event: a customer's usage of one meter in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterReport {
    /// The meter event's `identifier`: `tg_` + the simple form of the oldest row's UUIDv7. Each
    /// row belongs to one report, so it is unique, and the same on every retry.
    pub identifier: String,
    pub customer: String,
    pub stripe_customer: String,
    pub meter: String,
    pub event_name: String,
    /// The meter event's `timestamp`: the oldest row's time, whole seconds.
    pub ts: DateTime<Utc>,
    /// Sum of the rows' units (integers only).
    pub value: i64,
    pub rows: i64,
    pub state: ReportState,
    /// The rows' ids (filled by the claim only; empty when read back).
    pub row_ids: Vec<uuid::Uuid>,
    /// Failed delivery attempts so far (0 when claimed).
    pub attempts: i64,
    /// When a try first failed in a way that may have landed (timeout, 5xx), if one did.
    pub ambiguous_since: Option<DateTime<Utc>>,
}

/// One row of `config_versions`: a live-config document (JSON) and who stored it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub author: String,
    pub document: String,
}

/// What an admin mutation writes to `audit_log` (the actor is the caller's author).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// `config.put`, `config.patch`, `config.rollback`, `config.reload`, …
    pub action: String,
    /// What changed: `config`, `routes/{name}`, `plans/{name}`.
    pub target: String,
    /// JSON before and after (absent for creations and deletions).
    pub before: Option<String>,
    pub after: Option<String>,
}

/// One row of `audit_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A ledger on one SQL backend: [`PgLedger`] (`SqlLedger<Postgres>`) or [`SqliteLedger`]
/// (`SqlLedger<Sqlite>`). Every concern's trait is implemented once, for both. Cheap to clone
/// (the pool is shared).
pub struct SqlLedger<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
}

impl<DB: sqlx::Database> SqlLedger<DB> {
    pub(crate) fn from_pool(pool: sqlx::Pool<DB>) -> Self {
        SqlLedger { pool }
    }

    /// The pool, for modules that own other tables (Stripe events, config history, audit log).
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
}

// Not derived: a derive would ask `DB: Clone`, which the driver markers are not.
impl<DB: sqlx::Database> Clone for SqlLedger<DB> {
    fn clone(&self) -> Self {
        SqlLedger {
            pool: self.pool.clone(),
        }
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for SqlLedger<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlLedger")
            .field("pool", &self.pool)
            .finish()
    }
}

#[async_trait::async_trait]
impl<DB: dialect::Backend> Ledger for SqlLedger<DB> {
    async fn ping(&self) -> Result<(), LedgerError> {
        DB::sql("SELECT 1")
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("ping"))?;
        Ok(())
    }
}

/// Rows per INSERT statement. 9 columns × 1000 = 9000 parameters: under SQLite's 32766 and far
/// under Postgres' 65535 (Postgres binds columns as arrays anyway), and small enough that one
/// statement never holds a lock for long.
pub(crate) const INSERT_CHUNK: usize = 1000;

/// The backend a URL names.
enum Scheme {
    Postgres,
    Sqlite,
}

fn scheme(url: &str) -> Result<Scheme, LedgerError> {
    let lower = url.get(..14).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        Ok(Scheme::Postgres)
    } else if lower.starts_with("sqlite:") {
        Ok(Scheme::Sqlite)
    } else {
        // Only the scheme: the rest may hold credentials.
        let scheme = url.split_once(':').map_or("", |(s, _)| s).to_string();
        Err(LedgerError::UnsupportedUrl { scheme })
    }
}

/// Opens the ledger for a URL: `postgres://…` / `postgresql://…` → Postgres, `sqlite:PATH`
/// (the file and its parent directories are created if missing) → SQLite.
///
/// `schema`: Postgres only — created if missing and set as the `search_path` of every pooled
/// connection (tests isolate by schema); an error on SQLite. Runs the migrations before returning.
pub async fn open(url: &str, schema: Option<&str>) -> Result<Arc<dyn Ledger>, LedgerError> {
    match scheme(url)? {
        Scheme::Postgres => {
            let ledger = PgLedger::connect(url, schema).await?;
            ledger.migrate().await?;
            Ok(Arc::new(ledger))
        }
        Scheme::Sqlite => {
            refuse_schema(schema)?;
            let ledger = SqliteLedger::connect(url).await?;
            ledger.migrate().await?;
            Ok(Arc::new(ledger))
        }
    }
}

/// Same as [`open`], but only runs the migrations and reports how many were applied now
/// (for `tollgate migrate`). The pool is closed before returning.
pub async fn migrate(url: &str, schema: Option<&str>) -> Result<usize, LedgerError> {
    match scheme(url)? {
        Scheme::Postgres => {
            let ledger = PgLedger::connect(url, schema).await?;
            let applied = ledger.migrate().await;
            ledger.pool().close().await;
            applied
        }
        Scheme::Sqlite => {
            refuse_schema(schema)?;
            let ledger = SqliteLedger::connect(url).await?;
            let applied = ledger.migrate().await;
            ledger.pool().close().await;
            applied
        }
    }
}

fn refuse_schema(schema: Option<&str>) -> Result<(), LedgerError> {
    match schema {
        Some(s) => Err(LedgerError::SchemaNotSupported(s.to_string())),
        None => Ok(()),
    }
}

/// Runs `migrator` on one connection under the backend's migration lock and counts what it
/// applied. Counting inside the lock makes the number exact even when several instances start at
/// once (the others wait, then apply nothing).
pub(crate) async fn run_migrations<DB>(
    pool: &sqlx::Pool<DB>,
    migrator: &sqlx::migrate::Migrator,
) -> Result<usize, LedgerError>
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
    for<'c> &'c mut DB::Connection: sqlx::Acquire<'c, Database = DB>,
    for<'c> <&'c mut DB::Connection as sqlx::Acquire<'c>>::Connection:
        std::ops::Deref<Target = DB::Connection>,
{
    use sqlx::migrate::Migrate;
    let mut conn = pool.acquire().await.map_err(LedgerError::Connect)?;
    let counted = async {
        conn.lock().await?;
        conn.ensure_migrations_table().await?;
        let before = conn.list_applied_migrations().await?.len();
        // `run` takes the (re-entrant) lock again and releases its own level.
        migrator.run(&mut *conn).await?;
        let after = conn.list_applied_migrations().await?.len();
        conn.unlock().await?;
        Ok::<usize, sqlx::migrate::MigrateError>(after.saturating_sub(before))
    }
    .await;
    match counted {
        Ok(n) => {
            if n > 0 {
                tracing::info!(applied = n, "ledger migrations applied");
            }
            Ok(n)
        }
        Err(e) => {
            // A failed run may leave the advisory lock held by this session: close it rather than
            // hand a locked connection back to the pool.
            let _ = sqlx::Connection::close(conn.detach()).await;
            Err(LedgerError::Migrate(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::PgSchema;
    use super::test_support::{TempDir, PG_URL};
    use super::*;

    /// Migration files shipped for the backend `url` names (each branch may add some).
    fn shipped_migrations(url: &str) -> usize {
        let dir = if url.starts_with("sqlite:") {
            "sqlite"
        } else {
            "postgres"
        };
        std::fs::read_dir(format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR")))
            .expect("migrations dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
            })
            .count()
    }

    async fn check_migrations_idempotent(url: &str, schema: Option<&str>) {
        assert_eq!(
            migrate(url, schema).await.expect("first migrate"),
            shipped_migrations(url)
        );
        assert_eq!(migrate(url, schema).await.expect("second migrate"), 0);
        let a = open(url, schema).await.expect("first open");
        let b = open(url, schema).await.expect("second open");
        a.ping().await.expect("ping a");
        b.ping().await.expect("ping b");
    }

    /// Postgres: migrations apply once (count 1, then 0) and opening twice is harmless.
    #[tokio::test]
    async fn pg_migrations_apply_and_are_idempotent() {
        let s = PgSchema::new();
        check_migrations_idempotent(PG_URL, Some(&s.name)).await;
    }

    /// SQLite: migrations apply once (count 1, then 0) and opening twice is harmless.
    #[tokio::test]
    async fn sqlite_migrations_apply_and_are_idempotent() {
        let dir = TempDir::new();
        check_migrations_idempotent(&dir.sqlite_url(), None).await;
    }

    /// URLs: unknown schemes are refused without echoing credentials; a schema on SQLite is refused.
    #[tokio::test]
    async fn open_refuses_bad_urls() {
        let err = open("mysql://root:hunter2@db/x", None)
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("\"mysql\""), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let dir = TempDir::new();
        let err = open(&dir.sqlite_url(), Some("s"))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, LedgerError::SchemaNotSupported(_)), "{err}");
    }

    /// A Postgres URL naming a database that does not exist fails at open with a connect error.
    #[tokio::test]
    async fn pg_open_wrong_database_fails() {
        let url = format!(
            "postgres://postgres@127.0.0.1:5432/no_such_db_{}",
            uuid::Uuid::now_v7().simple()
        );
        let err = open(&url, None).await.err().expect("must fail");
        assert!(matches!(err, LedgerError::Connect(_)), "{err}");
        assert!(
            err.to_string().starts_with("cannot connect to the ledger"),
            "{err}"
        );
    }
}
