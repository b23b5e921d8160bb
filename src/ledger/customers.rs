//! Customers (`customers`: one entitlement per tollgate customer) and their Stripe links
//! (`stripe_customers`). Owns the one order-safe Stripe upsert ([`stripe_upsert`]) that the
//! webhook (`stripe_events`) and the reconciler both write through. The SQL here is written once
//! for both backends.
//!
//! Must not touch the Stripe event log or usage rows.

use chrono::Utc;

use super::dialect::{read_error, Backend, ReadRow, Stmt, Time};
use super::{LedgerError, SqlLedger};
use crate::entitle::{Entitlement, Status};

const CUSTOMER_COLUMNS: &str = "id, plan, status, status_since, period_start, period_end, \
     suspended, updated_at, cancel_at_period_end, trial_end";

/// The operator's write (admin API): every field replaced, last write wins.
const PUT_CUSTOMER: &str = "INSERT INTO customers \
       (id, plan, status, status_since, period_start, period_end, suspended, updated_at, \
        cancel_at_period_end, trial_end) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (id) DO UPDATE SET \
       plan = EXCLUDED.plan, status = EXCLUDED.status, \
       status_since = EXCLUDED.status_since, period_start = EXCLUDED.period_start, \
       period_end = EXCLUDED.period_end, suspended = EXCLUDED.suspended, \
       updated_at = EXCLUDED.updated_at, \
       cancel_at_period_end = EXCLUDED.cancel_at_period_end, \
       trial_end = EXCLUDED.trial_end";

/// The Stripe write rule ([`super::StripeEventLedger::finish_stripe_event`]), in one place for
/// the webhook and the reconciler: only over older state (`updated_at`), the operator's
/// `suspended` kept, `status_since` kept while the status does not change. Bound by
/// [`stripe_upsert`].
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

const LINK: &str =
    "INSERT INTO stripe_customers (customer, stripe_customer_id, source, linked_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (customer) DO UPDATE SET \
       stripe_customer_id = EXCLUDED.stripe_customer_id, source = EXCLUDED.source, \
       linked_at = EXCLUDED.linked_at";

const LINK_BY_EITHER_SIDE: &str = "SELECT customer, stripe_customer_id FROM stripe_customers \
     WHERE ($1 IS NOT NULL AND customer = $1) OR ($1 IS NULL AND stripe_customer_id = $2)";

/// Customers' entitlements and their links to Stripe customers.
#[async_trait::async_trait]
pub trait CustomerLedger: Send + Sync {
    /// The stored entitlement of a customer, `None` if unknown.
    async fn get_customer(&self, id: &str) -> Result<Option<Entitlement>, LedgerError>;
    /// Insert or replace a customer's entitlement (last write wins; no `updated_at` guard here).
    async fn put_customer(&self, id: &str, e: &Entitlement) -> Result<(), LedgerError>;
    /// Every customer, ordered by id: loaded into the entitlement cache at start.
    async fn all_customers(&self) -> Result<Vec<(String, Entitlement)>, LedgerError>;
    /// Writes a Stripe-derived entitlement with the same rule as
    /// [`super::StripeEventLedger::finish_stripe_event`] (only over older state; `suspended` and
    /// an unchanged status' `status_since` kept), without an event (the reconciler). Returns
    /// whether the row was written.
    async fn apply_stripe_state(
        &self,
        customer: &str,
        e: &Entitlement,
    ) -> Result<bool, LedgerError>;
    /// Links `customer` to the Stripe customer `stripe_customer` (`source` says who did it).
    /// Returns the Stripe customer it was linked to before, if any. A Stripe customer linked to
    /// another tollgate customer is an error (`LinkConflict`): an operator must unlink it first.
    async fn link_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
        source: &str,
    ) -> Result<Option<String>, LedgerError>;
    /// Every (tollgate customer, Stripe customer) link, ordered by customer.
    async fn stripe_links(&self) -> Result<Vec<(String, String)>, LedgerError>;
    /// How many customers were linked to a Stripe customer in `[from, to)` (first link or
    /// relink).
    async fn stripe_links_made(
        &self,
        from: chrono::DateTime<Utc>,
        to: chrono::DateTime<Utc>,
    ) -> Result<i64, LedgerError>;
    /// One link, looked up from either side: `(customer, stripe customer)` of the link whose
    /// tollgate customer is `customer`, or (when `customer` is `None`) whose Stripe customer is
    /// `stripe_customer`.
    async fn stripe_link(
        &self,
        customer: Option<&str>,
        stripe_customer: Option<&str>,
    ) -> Result<Option<(String, String)>, LedgerError>;
}

/// The Stripe upsert of `customer`'s entitlement `e`, bound and ready to run (on the pool or in
/// a transaction); it changed one row if and only if it was applied.
pub(crate) fn stripe_upsert<'q, DB: Backend>(
    customer: &'q str,
    e: &'q Entitlement,
) -> Stmt<'q, DB> {
    DB::sql(STRIPE_UPSERT)
        .bind(customer)
        .bind(e.plan.as_deref())
        .bind(e.status.as_str())
        .bind(e.status_since.map(Time))
        .bind(e.period_start.map(Time))
        .bind(e.period_end.map(Time))
        .bind(Time(e.updated_at))
        .bind(e.cancel_at_period_end)
        .bind(e.trial_end.map(Time))
}

/// Placeholder owner of a link conflict from a concurrent insert (retried once).
const CONCURRENT: &str = "another customer";

/// One attempt of [`CustomerLedger::link_stripe_customer`].
async fn link_once<DB: Backend>(
    ledger: &SqlLedger<DB>,
    customer: &str,
    stripe_customer: &str,
    source: &str,
) -> Result<Option<String>, LedgerError> {
    let op = "link_stripe_customer";
    let owner_sql = format!(
        "SELECT customer FROM stripe_customers WHERE stripe_customer_id = $1{}",
        DB::FOR_UPDATE
    );
    let before_sql = format!(
        "SELECT stripe_customer_id FROM stripe_customers WHERE customer = $1{}",
        DB::FOR_UPDATE
    );
    let read = |row: Option<DB::Row>, column: &str| {
        row.map(|r| r.col::<String>(column))
            .transpose()
            .map_err(LedgerError::query(op))
    };
    // A write transaction from the start: on SQLite it holds the write lock, so the checks
    // below stay true until commit (see `sqlite::begin_write`); on Postgres FOR UPDATE locks
    // the rows read.
    let mut tx = DB::begin_write(ledger.pool())
        .await
        .map_err(LedgerError::query(op))?;
    let owner = DB::sql(&owner_sql)
        .bind(stripe_customer)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
    if let Some(owner) = read(owner, "customer")?.filter(|o| o != customer) {
        return Err(LedgerError::LinkConflict {
            stripe_customer: stripe_customer.to_string(),
            customer: owner,
        });
    }
    let before = DB::sql(&before_sql)
        .bind(customer)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
    let before = read(before, "stripe_customer_id")?;
    if before.as_deref() != Some(stripe_customer) {
        DB::sql(LINK)
            .bind(customer)
            .bind(stripe_customer)
            .bind(source)
            .bind(Time(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(|cause| match &cause {
                // Linked elsewhere by a concurrent writer between our check and the insert
                // (Postgres; SQLite's write lock rules it out).
                sqlx::Error::Database(e) if e.is_unique_violation() => LedgerError::LinkConflict {
                    stripe_customer: stripe_customer.to_string(),
                    customer: CONCURRENT.into(),
                },
                _ => LedgerError::Query { op, cause },
            })?;
    }
    tx.commit().await.map_err(LedgerError::query(op))?;
    Ok(before)
}

#[async_trait::async_trait]
impl<DB: Backend> CustomerLedger for SqlLedger<DB> {
    async fn get_customer(&self, id: &str) -> Result<Option<Entitlement>, LedgerError> {
        let sql = format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1");
        let row = DB::sql(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query("get_customer"))?;
        row.map(|r| customer_from_row(&r).map(|(_, e)| e))
            .transpose()
    }

    async fn put_customer(&self, id: &str, e: &Entitlement) -> Result<(), LedgerError> {
        DB::sql(PUT_CUSTOMER)
            .bind(id)
            .bind(e.plan.as_deref())
            .bind(e.status.as_str())
            .bind(e.status_since.map(Time))
            .bind(e.period_start.map(Time))
            .bind(e.period_end.map(Time))
            .bind(e.suspended)
            .bind(Time(e.updated_at))
            .bind(e.cancel_at_period_end)
            .bind(e.trial_end.map(Time))
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("put_customer"))?;
        Ok(())
    }

    async fn all_customers(&self) -> Result<Vec<(String, Entitlement)>, LedgerError> {
        let sql = format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id{}",
            DB::BYTE_ORDER
        );
        let rows = DB::sql(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query("all_customers"))?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn apply_stripe_state(
        &self,
        customer: &str,
        e: &Entitlement,
    ) -> Result<bool, LedgerError> {
        let changed = stripe_upsert::<DB>(customer, e)
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("apply_stripe_state"))?;
        Ok(changed == 1)
    }

    async fn link_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
        source: &str,
    ) -> Result<Option<String>, LedgerError> {
        // Two concurrent links of the same pair (concurrent deliveries of one webhook) can both
        // see no row and both insert; the loser's unique violation is no conflict. Once more,
        // it reads the committed row: the same pair is a no-op, another owner a real conflict
        // (named this time).
        match link_once(self, customer, stripe_customer, source).await {
            Err(LedgerError::LinkConflict {
                customer: owner, ..
            }) if owner == CONCURRENT => link_once(self, customer, stripe_customer, source).await,
            r => r,
        }
    }

    async fn stripe_links_made(
        &self,
        from: chrono::DateTime<Utc>,
        to: chrono::DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let op = "stripe_links_made";
        let row = DB::sql(
            "SELECT COUNT(*) AS n FROM stripe_customers WHERE linked_at >= $1 AND linked_at < $2",
        )
        .bind(Time(from))
        .bind(Time(to))
        .fetch_one(self.pool())
        .await
        .map_err(LedgerError::query(op))?;
        row.col("n").map_err(LedgerError::query(op))
    }

    async fn stripe_links(&self) -> Result<Vec<(String, String)>, LedgerError> {
        let op = "stripe_links";
        let sql = format!(
            "SELECT customer, stripe_customer_id FROM stripe_customers ORDER BY customer{}",
            DB::BYTE_ORDER
        );
        let rows = DB::sql(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(link_from_row)
            .collect::<Result<_, _>>()
            .map_err(LedgerError::query(op))
    }

    async fn stripe_link(
        &self,
        customer: Option<&str>,
        stripe_customer: Option<&str>,
    ) -> Result<Option<(String, String)>, LedgerError> {
        let op = "stripe_link";
        let row = DB::sql(LINK_BY_EITHER_SIDE)
            .bind(customer)
            .bind(stripe_customer)
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.as_ref()
            .map(link_from_row)
            .transpose()
            .map_err(LedgerError::query(op))
    }
}

fn link_from_row(r: &impl ReadRow) -> Result<(String, String), sqlx::Error> {
    Ok((r.col("customer")?, r.col("stripe_customer_id")?))
}

fn customer_from_row(row: &impl ReadRow) -> Result<(String, Entitlement), LedgerError> {
    let get = read_error("read customers", "customers");
    let id: String = row.col("id").map_err(&get)?;
    let status: String = row.col("status").map_err(&get)?;
    let status = Status::parse(&status).ok_or_else(|| LedgerError::Corrupt {
        table: "customers",
        detail: format!("customer {id:?} has unknown status {status:?}"),
    })?;
    let read = || -> Result<Entitlement, sqlx::Error> {
        Ok(Entitlement {
            plan: row.col("plan")?,
            status,
            status_since: row.opt_time("status_since")?,
            period_start: row.opt_time("period_start")?,
            period_end: row.opt_time("period_end")?,
            suspended: row.col("suspended")?,
            updated_at: row.time("updated_at")?,
            cancel_at_period_end: row.col("cancel_at_period_end")?,
            trial_end: row.opt_time("trial_end")?,
        })
    };
    Ok((id, read().map_err(get)?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::test_support::{contract, sub, t0};
    use crate::ledger::Ledger;

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

    /// A row with a status tollgate does not know is reported as corrupt, not silently mapped.
    async fn check_unknown_status_is_corrupt<DB: Backend>(ledger: SqlLedger<DB>) {
        DB::sql("INSERT INTO customers (id, status, updated_at) VALUES ('c', 'weird', $1)")
            .bind(Time(t0()))
            .execute(ledger.pool())
            .await
            .expect("insert");
        let err = ledger.get_customer("c").await.expect_err("corrupt");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err}");
    }

    contract!(
        "customers upsert, get and list back identically, timestamps to the microsecond.",
        check_customers_round_trip,
        pg_customers_round_trip,
        sqlite_customers_round_trip
    );

    contract!(
        "the reconciler's write never replaces newer state and keeps the operator's.",
        check_apply_stripe_state,
        pg_apply_stripe_state,
        sqlite_apply_stripe_state
    );

    contract!(
        "concurrent links of the same customers all succeed.",
        check_concurrent_links,
        pg_concurrent_links,
        sqlite_concurrent_links,
        multi_thread
    );

    contract!(
        "a customer row with an unknown status is corrupt.",
        check_unknown_status_is_corrupt,
        pg_unknown_status_is_corrupt,
        sqlite_unknown_status_is_corrupt,
        typed
    );
}
