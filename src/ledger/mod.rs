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
//! - one module per concern, each with its trait and its SQL: `usage` ([`UsageLedger`]: usage
//!   rows), `customers` ([`CustomerLedger`]: entitlements, the one Stripe upsert, Stripe links),
//!   `stripe_events` ([`StripeEventLedger`]: webhook events), `reports` ([`ReportLedger`]: usage
//!   reports to Stripe), `config_versions` ([`ConfigLedger`]: config history and the audit log),
//!   `alerts` ([`AlertLedger`]: alert deliveries and leases).
//! - `dialect`: what differs between the backends (SQL fragments, time encoding, the two
//!   statements written per backend) and the thin layer shared code runs queries through.
//! - `test_support` (tests only): fixtures, and `contract!`, which runs a check on both backends
//!   (the contract checks are in this file's tests).
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
pub mod postgres;
mod reports;
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
pub use postgres::PgLedger;
pub use reports::{group_reports, ReportLedger};
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
    use std::sync::Arc;

    use chrono::Duration;

    use super::test_support::{contract, events, sub, t0, units_of, PgSchema, TempDir, PG_URL};
    use super::*;
    use crate::entitle::{Entitlement, Status};

    // Each behaviour is one generic check, run once per backend below.

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

    async fn check_customers_round_trip(ledger: Arc<dyn Ledger>) {
        assert_eq!(ledger.get_customer("nobody").await.expect("get"), None);
        let full = Entitlement {
            plan: Some("pro".into()),
            status: Status::PastDue,
            status_since: Some(t0()),
            period_start: Some(t0() - Duration::days(3) + Duration::microseconds(1)),
            period_end: Some(t0() + Duration::days(27) - Duration::microseconds(1)),
            suspended: true,
            updated_at: t0() + Duration::microseconds(999_999),
            cancel_at_period_end: true,
            trial_end: Some(t0() - Duration::days(1) + Duration::microseconds(7)),
        };
        let empty = Entitlement {
            plan: None,
            status: Status::Active,
            status_since: None,
            period_start: None,
            period_end: None,
            suspended: false,
            updated_at: t0(),
            cancel_at_period_end: false,
            trial_end: None,
        };
        ledger.put_customer("cus_b", &full).await.expect("put b");
        ledger.put_customer("cus_a", &empty).await.expect("put a");
        assert_eq!(
            ledger.get_customer("cus_b").await.expect("get b"),
            Some(full.clone())
        );
        assert_eq!(
            ledger.get_customer("cus_a").await.expect("get a"),
            Some(empty.clone())
        );

        // Upsert replaces every field, including back to NULL.
        let changed = Entitlement {
            plan: None,
            status: Status::Canceled,
            suspended: false,
            period_end: None,
            cancel_at_period_end: false,
            trial_end: None,
            ..full.clone()
        };
        ledger
            .put_customer("cus_b", &changed)
            .await
            .expect("update b");
        assert_eq!(
            ledger.get_customer("cus_b").await.expect("get b"),
            Some(changed.clone())
        );

        let all = ledger.all_customers().await.expect("all");
        assert_eq!(
            all,
            vec![("cus_a".to_string(), empty), ("cus_b".to_string(), changed)]
        );
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
                .finish_stripe_event("evt_1", Some(("acme", &pro)))
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
                .finish_stripe_event("evt_1", Some(("acme", &free)))
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
                .finish_stripe_event("evt_2", Some(("acme", &newer)))
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
                .finish_stripe_event("evt_0", Some(("acme", &older)))
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
            ledger.finish_stripe_event("evt_x", None).await.expect("x"),
            StripeFinish::Processed { changed: false }
        );
    }

    /// The reconciler's write follows the webhook's rule: only over older (or same-time) state,
    /// the operator's suspension and an unchanged status' start kept, the terms written.
    async fn check_apply_stripe_state(ledger: Arc<dyn Ledger>) {
        let t = t0();
        let mut operator = sub("pro", Status::Active, t);
        operator.suspended = true;
        ledger.put_customer("acme", &operator).await.expect("put");
        let older = sub("free", Status::Canceled, t - Duration::seconds(1));
        assert!(!ledger
            .apply_stripe_state("acme", &older)
            .await
            .expect("older"));
        let mut same_status = sub("team", Status::Active, t + Duration::seconds(3));
        same_status.cancel_at_period_end = true;
        same_status.trial_end = Some(t + Duration::days(7));
        assert!(ledger
            .apply_stripe_state("acme", &same_status)
            .await
            .expect("newer"));
        let got = ledger
            .get_customer("acme")
            .await
            .expect("get")
            .expect("row");
        assert_eq!(
            got,
            Entitlement {
                suspended: true,
                status_since: Some(t),
                ..same_status.clone()
            }
        );
        // Same time again: written (the caller settled which state is right), status start kept.
        let canceled = sub("team", Status::Canceled, t + Duration::seconds(3));
        assert!(ledger
            .apply_stripe_state("acme", &canceled)
            .await
            .expect("same time"));
        let got = ledger
            .get_customer("acme")
            .await
            .expect("get")
            .expect("row");
        assert_eq!(
            (got.status, got.cancel_at_period_end),
            (Status::Canceled, false)
        );
        // A new customer gets a row, not suspended.
        assert!(ledger
            .apply_stripe_state("globex", &same_status)
            .await
            .expect("new"));
        assert_eq!(
            ledger.get_customer("globex").await.expect("get"),
            Some(same_status)
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
                tokio::spawn(
                    async move { l.finish_stripe_event("evt_c", Some(("acme", &e))).await },
                )
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

    async fn check_usage_reports(ledger: Arc<dyn Ledger>) {
        // Links: new, same again (no change), a conflicting Stripe customer refused.
        assert_eq!(
            ledger
                .link_stripe_customer("acme", "cus_a", "test")
                .await
                .expect("link"),
            None
        );
        assert_eq!(
            ledger
                .link_stripe_customer("acme", "cus_a", "test")
                .await
                .expect("relink"),
            Some("cus_a".into())
        );
        let err = ledger
            .link_stripe_customer("globex", "cus_a", "test")
            .await
            .expect_err("conflict");
        assert!(matches!(err, LedgerError::LinkConflict { .. }), "{err}");
        assert_eq!(
            ledger.stripe_links().await.expect("links"),
            vec![("acme".to_string(), "cus_a".to_string())]
        );
        let link = Some(("acme".to_string(), "cus_a".to_string()));
        assert_eq!(
            ledger
                .stripe_link(Some("acme"), None)
                .await
                .expect("by customer"),
            link
        );
        assert_eq!(
            ledger
                .stripe_link(None, Some("cus_a"))
                .await
                .expect("by cus"),
            link
        );
        assert_eq!(
            ledger
                .stripe_link(Some("globex"), None)
                .await
                .expect("none"),
            None
        );
        assert_eq!(
            ledger.stripe_link(None, Some("cus_x")).await.expect("none"),
            None
        );

        // 100 rows of acme (linked) and 9 of globex (not linked), in one 60 s window from t0.
        let evs = events(100, "acme", "api_calls");
        ledger.insert_usage(&evs).await.expect("insert");
        ledger
            .insert_usage(&events(9, "globex", "api_calls"))
            .await
            .expect("insert globex");
        let claim = ReportClaim {
            meters: [("api_calls".to_string(), "ev_api".to_string())]
                .into_iter()
                .collect(),
            until: t0() + Duration::days(1),
            window_secs: 3600,
            too_old_before: t0() - Duration::days(1),
            max_rows: 60,
        };
        // max_rows bounds a claim; the rest is claimed by the next one, as its own report.
        let first = ledger.claim_usage_reports(&claim).await.expect("claim");
        let second = ledger.claim_usage_reports(&claim).await.expect("claim 2");
        assert!(ledger
            .claim_usage_reports(&claim)
            .await
            .expect("claim 3")
            .is_empty());
        assert_eq!((first.len(), second.len()), (1, 1));
        assert_eq!(first[0].rows + second[0].rows, 100);
        assert_eq!(first[0].value + second[0].value, units_of(100));
        assert_eq!(first[0].identifier, format!("tg_{}", evs[0].id.simple()));
        assert_eq!(first[0].stripe_customer, "cus_a");
        assert_eq!(first[0].event_name, "ev_api");
        // globex's 9 rows wait for a link; other meters do not count.
        let meters = vec!["api_calls".to_string()];
        assert_eq!(
            ledger.unlinked_usage_rows(&meters).await.expect("unlinked"),
            9
        );
        assert_eq!(
            ledger
                .unlinked_usage_rows(&["tokens".to_string()])
                .await
                .expect("unlinked tokens"),
            0
        );

        let now = Utc::now();
        let pending = ledger
            .pending_usage_reports(10, now)
            .await
            .expect("pending");
        assert_eq!(
            pending
                .iter()
                .map(|r| r.identifier.clone())
                .collect::<Vec<_>>(),
            vec![first[0].identifier.clone(), second[0].identifier.clone()]
        );
        assert_eq!(pending[0].value, first[0].value);
        assert_eq!(pending[0].ts, first[0].ts);
        assert_eq!(pending[0].attempts, 0);
        // A failed report is held back until its retry time, then due again with its count.
        ledger
            .usage_report_failed(
                &first[0].identifier,
                "429: slow down",
                now + Duration::seconds(60),
                false,
            )
            .await
            .expect("failed");
        let due = |at| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .pending_usage_reports(10, at)
                    .await
                    .expect("pending")
                    .into_iter()
                    .map(|r| (r.identifier, r.attempts))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(due(now).await, vec![(second[0].identifier.clone(), 0)]);
        assert_eq!(
            due(now + Duration::seconds(60)).await,
            vec![
                (first[0].identifier.clone(), 1),
                (second[0].identifier.clone(), 0)
            ]
        );
        // A try that may have landed (a 500) is remembered from its first occurrence on; a later
        // definite failure does not clear it.
        ledger
            .usage_report_failed(&second[0].identifier, "500: boom", now, true)
            .await
            .expect("ambiguous");
        let since = |at| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .pending_usage_reports(10, at)
                    .await
                    .expect("pending")
                    .into_iter()
                    .map(|r| r.ambiguous_since.is_some())
                    .collect::<Vec<_>>()
            }
        };
        let later = now + Duration::seconds(60);
        assert_eq!(since(later).await, vec![false, true]);
        ledger
            .usage_report_failed(&second[0].identifier, "429", now, false)
            .await
            .expect("definite");
        assert_eq!(since(later).await, vec![false, true]);
        assert_eq!(
            ledger
                .finish_usage_report(&first[0].identifier, ReportState::Delivered)
                .await
                .expect("finish"),
            first[0].rows as u64
        );
        // Finishing again (a concurrent reporter) marks nothing.
        assert_eq!(
            ledger
                .finish_usage_report(&first[0].identifier, ReportState::Delivered)
                .await
                .expect("again"),
            0
        );
        // Uncertain: not sent; an operator says it did not land (pending again, ambiguity
        // cleared), then it is flagged again and the operator says it landed (rows reported).
        assert_eq!(
            ledger
                .finish_usage_report(&second[0].identifier, ReportState::Uncertain)
                .await
                .expect("uncertain"),
            0
        );
        assert_eq!(
            ledger
                .resolve_uncertain_report(&first[0].identifier, true)
                .await
                .expect("not uncertain"),
            None
        );
        assert_eq!(
            ledger
                .resolve_uncertain_report(&second[0].identifier, false)
                .await
                .expect("resend"),
            Some(0)
        );
        assert_eq!(since(later).await, vec![false]);
        ledger
            .finish_usage_report(&second[0].identifier, ReportState::Uncertain)
            .await
            .expect("uncertain again");
        assert_eq!(
            ledger
                .resolve_uncertain_report(&second[0].identifier, true)
                .await
                .expect("landed"),
            Some(second[0].rows as u64)
        );
        assert!(ledger
            .pending_usage_reports(10, now + Duration::days(1))
            .await
            .expect("none")
            .is_empty());
    }

    /// Alerts: claimed once; an undelivered alert is taken over only when its holder's lease
    /// ran out or was released, by one caller at a time, while attempts are left.
    async fn check_alert_resumption(ledger: Arc<dyn Ledger>) {
        let t = Utc::now();
        let claim = |threshold: u32| AlertClaim {
            customer: "acme".into(),
            meter: "api_calls".into(),
            period_start: t0(),
            period_end: Some(t0() + Duration::days(30)),
            threshold,
            plan: "pro".into(),
            used: 8,
            included: 10,
        };
        let lease = t + Duration::seconds(70);
        let a = ledger
            .claim_alert(&claim(80), lease)
            .await
            .expect("claim")
            .expect("new");
        assert_eq!(
            ledger.claim_alert(&claim(80), lease).await.expect("again"),
            None
        );
        let b = ledger
            .claim_alert(&claim(100), lease)
            .await
            .expect("claim")
            .expect("new");
        let resume = |now: DateTime<Utc>, max: i64| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .resume_alerts(
                        now,
                        t - Duration::days(7),
                        now + Duration::seconds(70),
                        max,
                        10,
                    )
                    .await
                    .expect("resume")
                    .into_iter()
                    .map(|d| (d.id, d.attempts, d.alert.period_end.is_some()))
                    .collect::<Vec<_>>()
            }
        };
        // Held: nobody takes them over.
        assert_eq!(resume(t, 6).await, vec![]);
        // a fails once (retry to come, lease renewed); b is delivered.
        ledger
            .record_alert_attempt(
                a,
                Some(500),
                Some("boom"),
                false,
                Some(t + Duration::seconds(90)),
            )
            .await
            .expect("attempt a");
        ledger
            .record_alert_attempt(b, Some(200), None, true, None)
            .await
            .expect("attempt b");
        assert_eq!(resume(t + Duration::seconds(80), 6).await, vec![]);
        // The holder is gone: a is taken over once, with its attempt count.
        let later = t + Duration::seconds(100);
        assert_eq!(resume(later, 6).await, vec![(a, 1, true)]);
        assert_eq!(resume(later, 6).await, vec![]);
        // Released by a stopping instance: available at once.
        ledger.release_alerts(&[a, b]).await.expect("release");
        assert_eq!(resume(later, 6).await, vec![(a, 1, true)]);
        ledger.release_alerts(&[a]).await.expect("release");
        // No attempts left, or claimed too long ago: left alone.
        assert_eq!(resume(later, 1).await, vec![]);
        assert_eq!(
            ledger
                .resume_alerts(later, t + Duration::days(1), later, 6, 10)
                .await
                .expect("resume")
                .len(),
            0
        );
    }

    /// A lease goes to one holder until its time runs out; its holder may renew it.
    async fn check_leases(ledger: Arc<dyn Ledger>) {
        let t = t0();
        let until = t + Duration::seconds(60);
        assert!(ledger.try_lease("job", "a", t, until).await.expect("a"));
        assert!(!ledger.try_lease("job", "b", t, until).await.expect("b"));
        assert!(ledger
            .try_lease("other", "b", t, until)
            .await
            .expect("other job"));
        assert!(ledger
            .try_lease(
                "job",
                "a",
                t + Duration::seconds(30),
                until + Duration::seconds(30)
            )
            .await
            .expect("renew"));
        assert!(!ledger
            .try_lease("job", "b", t + Duration::seconds(70), until)
            .await
            .expect("b, a renewed"));
        assert!(ledger
            .try_lease(
                "job",
                "b",
                t + Duration::seconds(91),
                t + Duration::seconds(150)
            )
            .await
            .expect("b, a gone"));
        assert!(!ledger
            .try_lease(
                "job",
                "a",
                t + Duration::seconds(92),
                t + Duration::seconds(150)
            )
            .await
            .expect("a back"));
    }

    /// Many concurrent links of one customer (concurrent deliveries of a webhook) all succeed:
    /// each read-then-write transaction takes the write lock up front, so none is refused for
    /// a stale read snapshot (SQLite's BUSY_SNAPSHOT).
    async fn check_concurrent_links(ledger: Arc<dyn Ledger>) {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let l = ledger.clone();
                tokio::spawn(async move {
                    let customer = format!("c{}", i % 4);
                    let cus = format!("cus_{customer}");
                    l.link_stripe_customer(&customer, &cus, "webhook").await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("link");
        }
        assert_eq!(ledger.stripe_links().await.expect("links").len(), 4);
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

    /// Config versions: numbered in order, read back whole, listed newest first in pages, the
    /// newest by author prefix (no LIKE wildcards), each with its audit row.
    async fn check_config_versions(ledger: Arc<dyn Ledger>) {
        assert_eq!(
            ledger.latest_config_version(None).await.expect("latest"),
            None
        );
        let audit = |n: usize| AuditRecord {
            action: format!("config.test.{n}"),
            target: "config".into(),
            before: None,
            after: Some(format!("{{\"n\":{n}}}")),
        };
        let mut stored = Vec::new();
        for (n, author) in ["file:/etc/t.toml", "admin:alice", "file_x", "admin"]
            .iter()
            .enumerate()
        {
            let v = ledger
                .insert_config_version(author, &format!("{{\"n\":{n}}}"), &audit(n))
                .await
                .expect("insert");
            assert_eq!(v.author, *author);
            stored.push(v);
        }
        assert!(stored.windows(2).all(|w| w[0].version < w[1].version));
        let back = ledger
            .config_version(stored[1].version)
            .await
            .expect("get")
            .expect("present");
        assert_eq!(back, stored[1]);
        assert_eq!(ledger.config_version(-5).await.expect("get"), None);
        let newest = |p| ledger.latest_config_version(p);
        assert_eq!(newest(None).await.expect("latest"), Some(stored[3].clone()));
        assert_eq!(
            newest(Some("file:")).await.expect("file"),
            Some(stored[0].clone())
        );
        assert_eq!(
            newest(Some("file")).await.expect("file"),
            Some(stored[2].clone())
        );
        assert_eq!(newest(Some("%")).await.expect("wildcard"), None);

        let page = ledger.config_versions(None, 3).await.expect("page");
        let numbers: Vec<i64> = page.iter().map(|v| v.version).collect();
        let want: Vec<i64> = stored.iter().rev().take(3).map(|v| v.version).collect();
        assert_eq!(numbers, want);
        assert!(
            page.iter().all(|v| v.document.is_empty()),
            "listings leave documents out"
        );
        let rest = ledger
            .config_versions(Some(numbers[2]), 3)
            .await
            .expect("next page");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].version, stored[0].version);

        ledger
            .insert_audit("admin:bob", &audit(9))
            .await
            .expect("audit");
        let entries = ledger.audit_entries(None, 10).await.expect("audit log");
        assert_eq!(entries.len(), 5);
        assert_eq!(
            (entries[0].actor.as_str(), entries[0].action.as_str()),
            ("admin:bob", "config.test.9")
        );
        assert_eq!(entries[4].actor, "file:/etc/t.toml");
        assert_eq!(entries[4].after.as_deref(), Some("{\"n\":0}"));
        let older = ledger
            .audit_entries(Some(entries[1].id), 10)
            .await
            .expect("older");
        assert_eq!(older.len(), 3);
    }

    contract!(
        "usage is claimed into reports once, bounded per claim, finished once.",
        check_usage_reports,
        pg_usage_reports,
        sqlite_usage_reports
    );

    contract!(
        "Stripe events are stored once, claimed once, and never apply older state.",
        check_stripe_events,
        pg_stripe_events,
        sqlite_stripe_events
    );

    contract!(
        "a lease has one holder at a time.",
        check_leases,
        pg_leases,
        sqlite_leases
    );

    contract!(
        "abandoned alerts are taken over once.",
        check_alert_resumption,
        pg_alert_resumption,
        sqlite_alert_resumption
    );

    contract!(
        "concurrent links of the same customers all succeed.",
        check_concurrent_links,
        pg_concurrent_links,
        sqlite_concurrent_links,
        multi_thread
    );

    contract!(
        "the reconciler's write never replaces newer state and keeps the operator's.",
        check_apply_stripe_state,
        pg_apply_stripe_state,
        sqlite_apply_stripe_state
    );

    contract!(
        "of 10 concurrent finishes of one event exactly one processes it.",
        check_stripe_finish_is_exclusive,
        pg_stripe_finish_is_exclusive,
        sqlite_stripe_finish_is_exclusive,
        multi_thread
    );

    contract!(
        "1000 events insert 1000 rows, again 0; multi-chunk batches count exactly.",
        check_insert_idempotent,
        pg_insert_usage_is_idempotent,
        sqlite_insert_usage_is_idempotent
    );

    contract!(
        "customers upsert, get and list back identically, timestamps to the microsecond.",
        check_customers_round_trip,
        pg_customers_round_trip,
        sqlite_customers_round_trip
    );

    contract!(
        "usage_totals sums units and counts rows per customer/meter over [from, to).",
        check_usage_totals,
        pg_usage_totals,
        sqlite_usage_totals
    );

    contract!(
        "config versions and the audit log.",
        check_config_versions,
        pg_config_versions,
        sqlite_config_versions
    );
}
