//! What differs between the ledger's two backends, named once, so that every query above it is
//! written once: the [`Backend`] trait (SQL fragments, how a transaction that writes begins, how
//! a list is bound, and the two statements that genuinely differ), the [`Time`] column type, and
//! the thin layer ([`Stmt`], [`On`], [`ReadRow`]) through which shared code binds, runs and reads.
//!
//! Owns no SQL of its own and no table: the concern modules (`usage`, `customers`, …) own the
//! statements, `postgres` and `sqlite` implement [`Backend`].
//!
//! Why this layer: sqlx's generic API needs a where-clause for every value type and executor
//! (`i64: Encode<'q, DB>`, `&mut DB::Connection: Executor`, …), and Rust does not carry such
//! clauses along with a trait bound, so each generic function would have to repeat them. Here the
//! values a shared query may bind ([`Param`]) or read ([`Field`]) are a closed list that is
//! checked against both drivers once, and the calls into sqlx are made by each backend's
//! concrete [`Backend`] impl ([`sqlx_glue!`]). Shared code then needs only `DB: Backend`. The
//! closed list is also a guard: a bare `DateTime<Utc>` is not a [`Param`], because sqlx would
//! store it as text on SQLite; times go through [`Time`].

use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgRow, PgTypeInfo, PgValueRef};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArgumentValue, SqliteRow, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Database, Decode, Encode, Pool, Postgres, Sqlite, Transaction, Type};

use super::{LedgerError, MeterReport, UsageEvent};

/// A time column, stored with microsecond precision: Postgres' `timestamptz` as sqlx stores
/// `DateTime<Utc>`, SQLite's INTEGER microseconds since the Unix epoch (UTC), so that one query
/// text binds and reads times on both. Sub-microsecond parts are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Time(pub DateTime<Utc>);

/// A SQLite time whose microseconds no `DateTime` can hold (a hand-edited row): reported as
/// [`LedgerError::Corrupt`] by [`read_error`].
#[derive(Debug, thiserror::Error)]
#[error("time out of range: {0} µs")]
pub(crate) struct TimeOutOfRange(pub i64);

impl Type<Postgres> for Time {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Time {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Time {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <DateTime<Utc> as Decode<Postgres>>::decode(value).map(Time)
    }
}

impl Type<Sqlite> for Time {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Time {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<Sqlite>>::encode(self.0.timestamp_micros(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Time {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let us = <i64 as Decode<Sqlite>>::decode(value)?;
        DateTime::from_timestamp_micros(us)
            .map(Time)
            .ok_or_else(|| Box::new(TimeOutOfRange(us)) as BoxDynError)
    }
}

/// A value a shared query may bind: one both drivers encode the same way.
pub(crate) trait Param<'q>:
    'q + Send + Encode<'q, Postgres> + Type<Postgres> + Encode<'q, Sqlite> + Type<Sqlite>
{
}

/// A value a shared query may read back: one both drivers decode the same way.
pub(crate) trait Field:
    for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite>
{
}

// The closed lists. Integers are read as i64 only: Postgres `integer` columns are read through
// `CAST(… AS BIGINT)`, which SQLite accepts too.
impl<'q> Param<'q> for &'q str {}
impl<'q> Param<'q> for Option<&'q str> {}
impl Param<'_> for i64 {}
impl Param<'_> for Option<i64> {}
impl Param<'_> for i32 {}
impl Param<'_> for Option<i32> {}
impl Param<'_> for bool {}
impl Param<'_> for uuid::Uuid {}
impl Param<'_> for Time {}
impl Param<'_> for Option<Time> {}
impl Field for String {}
impl Field for Option<String> {}
impl Field for i64 {}
impl Field for Option<i64> {}
impl Field for bool {}
impl Field for uuid::Uuid {}
impl Field for Time {}
impl Field for Option<Time> {}

/// A list bound as one parameter: a Postgres array, a JSON array on SQLite (see
/// [`Backend::in_list`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum List<'a> {
    Text(&'a [String]),
    Int(&'a [i64]),
}

/// Reads a column of a result row by name.
pub(crate) trait ReadRow {
    fn col<T: Field>(&self, name: &str) -> Result<T, sqlx::Error>;

    /// A time column (see [`Time`]).
    fn time(&self, name: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.col::<Time>(name).map(|t| t.0)
    }

    /// A nullable time column.
    fn opt_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        self.col::<Option<Time>>(name).map(|t| t.map(|t| t.0))
    }
}

impl ReadRow for PgRow {
    fn col<T: Field>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
}

impl ReadRow for SqliteRow {
    fn col<T: Field>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
}

/// Where a statement runs: on the pool (a connection of its own, autocommit) or on the
/// connection of an open transaction (`&mut *tx`).
pub(crate) enum On<'e, DB: Database> {
    Pool(&'e Pool<DB>),
    Conn(&'e mut DB::Connection),
}

impl<'e, DB: Database> From<&'e Pool<DB>> for On<'e, DB> {
    fn from(pool: &'e Pool<DB>) -> Self {
        On::Pool(pool)
    }
}

impl<'e, DB: Database> From<&'e mut DB::Connection> for On<'e, DB> {
    fn from(conn: &'e mut DB::Connection) -> Self {
        On::Conn(conn)
    }
}

/// A sqlx query with the backend's own argument buffer.
pub(crate) type Q<'q, DB> = Query<'q, DB, <DB as Database>::Arguments<'q>>;

/// A statement being bound, for either backend: [`Backend::sql`], then [`Stmt::bind`] in
/// placeholder order, then run it.
pub(crate) struct Stmt<'q, DB: Database>(Q<'q, DB>);

impl<'q, DB: Backend> Stmt<'q, DB> {
    /// Binds the next placeholder (`$1`, `$2`, … in order).
    pub(crate) fn bind(self, value: impl Param<'q>) -> Self {
        Stmt(DB::bind(self.0, value))
    }

    /// Binds a list (the parameter of an [`Backend::in_list`] fragment).
    pub(crate) fn bind_list(self, list: List<'q>) -> Self {
        Stmt(DB::bind_list(self.0, list))
    }

    /// Runs the statement; returns the rows it changed.
    pub(crate) fn execute<'e, E: Into<On<'e, DB>>>(
        self,
        on: E,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + use<'q, 'e, DB, E>
    where
        'q: 'e,
    {
        DB::execute(self.0, on.into())
    }

    pub(crate) fn fetch_all<'e, E: Into<On<'e, DB>>>(
        self,
        on: E,
    ) -> impl Future<Output = Result<Vec<DB::Row>, sqlx::Error>> + Send + use<'q, 'e, DB, E>
    where
        'q: 'e,
    {
        DB::fetch_all(self.0, on.into())
    }

    pub(crate) fn fetch_optional<'e, E: Into<On<'e, DB>>>(
        self,
        on: E,
    ) -> impl Future<Output = Result<Option<DB::Row>, sqlx::Error>> + Send + use<'q, 'e, DB, E>
    where
        'q: 'e,
    {
        DB::fetch_optional(self.0, on.into())
    }

    /// The one row the statement returns (`RowNotFound` if none).
    pub(crate) fn fetch_one<'e, E: Into<On<'e, DB>>>(
        self,
        on: E,
    ) -> impl Future<Output = Result<DB::Row, sqlx::Error>> + Send + use<'q, 'e, DB, E>
    where
        'q: 'e,
    {
        let row = DB::fetch_optional(self.0, on.into());
        async move { row.await?.ok_or(sqlx::Error::RowNotFound) }
    }
}

/// One of the ledger's backends (`Postgres`, `Sqlite`): the SQL that differs between them, and the
/// calls into their drivers. Implemented in `postgres.rs` and `sqlite.rs` only.
pub(crate) trait Backend: Database<Row: ReadRow> {
    /// `ORDER BY …` suffix for byte order of text (what SQLite does by default).
    const BYTE_ORDER: &'static str;
    /// Suffix of a `SELECT` inside a transaction that will write what it read: locks the rows
    /// read until commit. Empty on SQLite, whose write transactions hold the one write lock.
    const FOR_UPDATE: &'static str;
    /// The UTC calendar day (`YYYY-MM-DD`) of the column `ts`.
    const DAY_OF_TS: &'static str;
    /// Whether one statement may run without BEGIN/COMMIT. True on Postgres (saves two round
    /// trips); false on SQLite, where [`Backend::begin_write`] takes the write lock up front.
    const AUTOCOMMIT_ONE_STATEMENT: bool;

    /// Suffix of a work-queue `SELECT` whose rows (of `table`, an alias or name in the `FROM`)
    /// the transaction will claim: concurrent claimers skip each other's rows. Empty on SQLite
    /// (one writer at a time).
    fn skip_locked(table: &str) -> String;

    /// `expr` is one of the list bound (with [`Stmt::bind_list`]) at placeholder `param`.
    fn in_list(expr: &str, param: &str) -> String;

    /// Binds a list as the backend's [`Backend::in_list`] reads it.
    fn bind_list<'q>(q: Q<'q, Self>, list: List<'q>) -> Q<'q, Self>;

    /// Starts a transaction that will write.
    fn begin_write(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send + '_;

    /// Inserts one chunk (≤ [`super::INSERT_CHUNK`] rows) of usage events, ignoring ids already
    /// stored; returns the rows inserted. Per backend: Postgres binds columns as arrays, SQLite
    /// binds a multi-row VALUES list.
    fn insert_usage_chunk<'e>(
        on: On<'e, Self>,
        chunk: &'e [UsageEvent],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'e;

    /// Stores freshly claimed reports and points their usage rows at them (`report_id`; a
    /// `Zero` report's rows are reported at once), inside the claim's transaction. Per backend:
    /// Postgres writes them in two statements whatever their number, SQLite row by row.
    fn store_reports<'e>(
        conn: &'e mut Self::Connection,
        reports: &'e [MeterReport],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'e;

    /// A statement to bind and run.
    fn sql(text: &str) -> Stmt<'_, Self> {
        Stmt(sqlx::query(text))
    }

    // The driver calls, made in the concrete impls by `sqlx_glue!`.
    fn bind<'q>(q: Q<'q, Self>, value: impl Param<'q>) -> Q<'q, Self>;
    fn execute<'e, 'q: 'e>(
        q: Q<'q, Self>,
        on: On<'e, Self>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'e;
    fn fetch_all<'e, 'q: 'e>(
        q: Q<'q, Self>,
        on: On<'e, Self>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send + 'e;
    fn fetch_optional<'e, 'q: 'e>(
        q: Q<'q, Self>,
        on: On<'e, Self>,
    ) -> impl Future<Output = Result<Option<Self::Row>, sqlx::Error>> + Send + 'e;
}

/// The driver calls of a [`Backend`] impl. Their text is the same for both backends, but each
/// resolves against its own driver's concrete types (where sqlx's bounds hold without being
/// named), so they are stamped into each impl rather than written generically.
macro_rules! sqlx_glue {
    () => {
        fn bind<'q>(
            q: $crate::ledger::dialect::Q<'q, Self>,
            value: impl $crate::ledger::dialect::Param<'q>,
        ) -> $crate::ledger::dialect::Q<'q, Self> {
            q.bind(value)
        }

        async fn execute<'e, 'q: 'e>(
            q: $crate::ledger::dialect::Q<'q, Self>,
            on: $crate::ledger::dialect::On<'e, Self>,
        ) -> Result<u64, sqlx::Error> {
            let done = match on {
                $crate::ledger::dialect::On::Pool(pool) => q.execute(pool).await?,
                $crate::ledger::dialect::On::Conn(conn) => q.execute(conn).await?,
            };
            Ok(done.rows_affected())
        }

        async fn fetch_all<'e, 'q: 'e>(
            q: $crate::ledger::dialect::Q<'q, Self>,
            on: $crate::ledger::dialect::On<'e, Self>,
        ) -> Result<Vec<Self::Row>, sqlx::Error> {
            match on {
                $crate::ledger::dialect::On::Pool(pool) => q.fetch_all(pool).await,
                $crate::ledger::dialect::On::Conn(conn) => q.fetch_all(conn).await,
            }
        }

        async fn fetch_optional<'e, 'q: 'e>(
            q: $crate::ledger::dialect::Q<'q, Self>,
            on: $crate::ledger::dialect::On<'e, Self>,
        ) -> Result<Option<Self::Row>, sqlx::Error> {
            match on {
                $crate::ledger::dialect::On::Pool(pool) => q.fetch_optional(pool).await,
                $crate::ledger::dialect::On::Conn(conn) => q.fetch_optional(conn).await,
            }
        }
    };
}
pub(crate) use sqlx_glue;

/// Maps an error reading a row: a stored time no `DateTime` can hold makes the row
/// [`LedgerError::Corrupt`] (in `table`); anything else is the failed query of `op`.
pub(crate) fn read_error(
    op: &'static str,
    table: &'static str,
) -> impl Fn(sqlx::Error) -> LedgerError {
    move |cause| match &cause {
        sqlx::Error::ColumnDecode { index, source } => {
            match source.downcast_ref::<TimeOutOfRange>() {
                Some(TimeOutOfRange(us)) => LedgerError::Corrupt {
                    table,
                    detail: format!("column {index} has a time out of range: {us}"),
                },
                None => LedgerError::Query { op, cause },
            }
        }
        _ => LedgerError::Query { op, cause },
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, TimeZone, Utc};

    use super::*;
    use crate::ledger::test_support::{contract, t0};
    use crate::ledger::SqlLedger;

    /// Returns its parameter as column `t`.
    const ECHO: &str = "SELECT $1 AS t";

    /// Times that must come back exactly as bound, on both backends.
    fn exact_times() -> Vec<DateTime<Utc>> {
        let moon = Utc
            .with_ymd_and_hms(1969, 7, 20, 20, 17, 40)
            .single()
            .expect("valid");
        let last = Utc
            .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
            .single()
            .expect("valid");
        vec![
            t0(),
            DateTime::UNIX_EPOCH,
            moon + Duration::microseconds(1),
            last + Duration::microseconds(999_999),
        ]
    }

    /// [`Time`] binds and reads back the same instant, as a parameter and through a stored
    /// column, NULL included; nanoseconds are dropped.
    async fn check_time_round_trip<DB: Backend>(ledger: SqlLedger<DB>) {
        for t in exact_times() {
            let row = DB::sql(ECHO)
                .bind(Time(t))
                .fetch_one(ledger.pool())
                .await
                .expect("select");
            assert_eq!(row.time("t").expect("t"), t);
        }
        let row = DB::sql(ECHO)
            .bind(Time(t0() + Duration::nanoseconds(999)))
            .fetch_one(ledger.pool())
            .await
            .expect("select nanos");
        assert_eq!(row.time("t").expect("t"), t0(), "nanoseconds are truncated");
        let row = DB::sql(ECHO)
            .bind(None::<Time>)
            .fetch_one(ledger.pool())
            .await
            .expect("select null");
        assert_eq!(row.opt_time("t").expect("t"), None);

        for (i, t) in exact_times().into_iter().enumerate() {
            DB::sql("INSERT INTO leases (name, holder, until) VALUES ($1, 'test', $2)")
                .bind(format!("l{i}").as_str())
                .bind(Time(t))
                .execute(ledger.pool())
                .await
                .expect("insert");
            let row = DB::sql("SELECT until FROM leases WHERE name = $1")
                .bind(format!("l{i}").as_str())
                .fetch_one(ledger.pool())
                .await
                .expect("select stored");
            assert_eq!(row.time("until").expect("until"), t);
        }
    }

    contract!(
        "times bind and read back exactly, to the microsecond.",
        check_time_round_trip,
        pg_time_round_trip,
        sqlite_time_round_trip,
        typed
    );
}
