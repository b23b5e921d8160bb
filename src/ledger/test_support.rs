//! Test fixtures shared by the ledger's tests and by other modules' tests that need a real
//! ledger: a Postgres schema and a SQLite file per test, cleaned up on drop, and sample events.
//! [`contract!`] runs one check on both backends.
//!
//! Test-only; must not create anything outside its own schema or temporary directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use super::{Ledger, PgLedger, SqliteLedger, UsageEvent};
use crate::entitle::{Entitlement, Status};

/// The Postgres database tests use; each test works in its own schema.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A unique schema on [`PG_URL`], dropped (CASCADE) when this is dropped, even on panic.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub fn new() -> PgSchema {
        PgSchema {
            name: format!("t_{}", Uuid::now_v7().simple()),
        }
    }

    pub async fn open(&self) -> Arc<dyn Ledger> {
        super::open(PG_URL, Some(&self.name))
            .await
            .expect("open postgres ledger")
    }

    /// The migrated Postgres ledger itself (not behind `dyn Ledger`), for checks that run the
    /// backend's own statements.
    pub async fn open_typed(&self) -> PgLedger {
        let ledger = PgLedger::connect(PG_URL, Some(&self.name))
            .await
            .expect("connect postgres ledger");
        ledger.migrate().await.expect("migrate postgres ledger");
        ledger
    }

    /// Drops the schema now (to make the ledger fail), from a plain connection.
    pub async fn drop_schema(&self) {
        drop_schema_named(&self.name).await;
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop is sync and may run inside the test's runtime: clean up from a thread with a
        // runtime of its own.
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schema_named(&name));
            }
        });
        let _ = done.join();
    }
}

async fn drop_schema_named(name: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(PG_URL)
        .await
        .expect("connect to drop schema");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
        .execute(&mut conn)
        .await
        .expect("drop schema");
    let _ = conn.close().await;
}

/// A fresh directory under the system temp dir, removed when this is dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("tollgate-test-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `sqlite:` URL for a file inside this directory (in a subdirectory that does not
    /// exist yet, so opening proves parent creation).
    pub fn sqlite_url(&self) -> String {
        format!(
            "sqlite:{}",
            self.path.join("db").join("ledger.db").display()
        )
    }

    /// The ledger on [`TempDir::sqlite_url`], opened and migrated.
    pub async fn open(&self) -> Arc<dyn Ledger> {
        super::open(&self.sqlite_url(), None)
            .await
            .expect("open sqlite ledger")
    }

    /// The migrated SQLite ledger itself (not behind `dyn Ledger`), for checks that run the
    /// backend's own statements.
    pub async fn open_typed(&self) -> SqliteLedger {
        let ledger = SqliteLedger::connect(&self.sqlite_url())
            .await
            .expect("connect sqlite ledger");
        ledger.migrate().await.expect("migrate sqlite ledger");
        ledger
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A fixed base time with a microsecond part, so precision loss would show.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 14, 15, 9, 26)
        .single()
        .expect("valid time")
        + chrono::Duration::microseconds(535_897)
}

/// `n` events for one customer/meter, 1 ms apart from [`t0`], units 1..=3 cycling.
pub fn events(n: usize, customer: &str, meter: &str) -> Vec<UsageEvent> {
    (0..n)
        .map(|i| UsageEvent {
            id: Uuid::now_v7(),
            ts: t0() + chrono::Duration::milliseconds(i as i64),
            customer: customer.to_string(),
            meter: meter.to_string(),
            units: (i % 3) as i64 + 1,
            route: "GET /signals".to_string(),
            status: 200,
            latency_us: 1234 + i as i64,
            request_id: format!("req-{i}"),
        })
        .collect()
}

/// Sum of units that [`events`] makes for `n` events.
pub fn units_of(n: usize) -> i64 {
    (0..n).map(|i| (i % 3) as i64 + 1).sum()
}

/// A Stripe-derived entitlement: `plan` in `status` since `at`, written at `at` (no period, no
/// trial, not suspended).
pub fn sub(plan: &str, status: Status, at: DateTime<Utc>) -> Entitlement {
    Entitlement {
        plan: Some(plan.into()),
        status,
        status_since: Some(at),
        period_start: None,
        period_end: None,
        suspended: false,
        updated_at: at,
        cancel_at_period_end: false,
        trial_end: None,
    }
}

/// Runs one contract check on both backends, as two tests: `$pg` on a fresh Postgres schema and
/// `$sqlite` on a fresh SQLite file. The check takes an `Arc<dyn Ledger>`; with `typed`, the
/// backend's own ledger (`PgLedger` / `SqliteLedger`, for checks generic over the backend).
/// `multi_thread` runs both on two worker threads (checks of concurrent callers).
macro_rules! contract {
    ($doc:literal, $check:ident, $pg:ident, $sqlite:ident $(, $opt:ident)*) => {
        $crate::ledger::test_support::contract!(
            @test [$($opt)*] $doc, $check, $pg, $sqlite
        );
    };
    (@test [multi_thread $($opt:ident)*] $($rest:tt)*) => {
        $crate::ledger::test_support::contract!(
            @open [$($opt)*] [tokio::test(flavor = "multi_thread", worker_threads = 2)] $($rest)*
        );
    };
    (@test [$($opt:ident)*] $($rest:tt)*) => {
        $crate::ledger::test_support::contract!(@open [$($opt)*] [tokio::test] $($rest)*);
    };
    (@open [typed] $test:tt $($rest:tt)*) => {
        $crate::ledger::test_support::contract!(@emit open_typed $test $($rest)*);
    };
    (@open [] $test:tt $($rest:tt)*) => {
        $crate::ledger::test_support::contract!(@emit open $test $($rest)*);
    };
    (@emit $open:ident [$test:meta] $doc:literal, $check:ident, $pg:ident, $sqlite:ident) => {
        #[doc = concat!("Postgres: ", $doc)]
        #[$test]
        async fn $pg() {
            let schema = $crate::ledger::test_support::PgSchema::new();
            $check(schema.$open().await).await;
        }

        #[doc = concat!("SQLite: ", $doc)]
        #[$test]
        async fn $sqlite() {
            let dir = $crate::ledger::test_support::TempDir::new();
            $check(dir.$open().await).await;
        }
    };
}
pub(crate) use contract;
