//! Threshold alerts (`alert_deliveries`: claimed once per customer/meter/period/threshold, then
//! the delivery log) and named leases (`leases`: which instance runs a job shared by all). Both
//! hand work to one instance at a time through a time-limited hold. The SQL here is written once
//! for both backends.
//!
//! Must not decide when an alert is due or what it says: that is `crate::alerts`'.

use chrono::{DateTime, Utc};

use super::dialect::{read_error, Backend, List, ReadRow, Time};
use super::{AlertClaim, AlertDelivery, LedgerError, SqlLedger};

// Postgres' `integer` columns are read as BIGINT, the one integer type both backends decode.
const ALERT_COLUMNS: &str = "id, customer, meter, period_start, period_end, \
     CAST(threshold AS BIGINT) AS threshold, plan, used, included, created_at, \
     CAST(attempts AS BIGINT) AS attempts, last_attempt_at, \
     CAST(last_status AS BIGINT) AS last_status, last_error, delivered_at";

/// The unique key makes the first claimer the only one; `created_at` is the column default.
const CLAIM: &str = "INSERT INTO alert_deliveries \
       (customer, meter, period_start, threshold, plan, used, included, period_end, lease_until) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (customer, meter, period_start, threshold) DO NOTHING RETURNING id";

const ATTEMPT: &str = "UPDATE alert_deliveries SET attempts = attempts + 1, last_attempt_at = $2, \
       last_status = $3, last_error = $4, \
       delivered_at = CASE WHEN $5 AND delivered_at IS NULL THEN $2 ELSE delivered_at END, \
       lease_until = $6 \
     WHERE id = $1";

/// Taken when free, already the holder's, or the holder's time ran out (`$3` is now).
const TRY_LEASE: &str = "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $4) \
     ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
     WHERE leases.holder = EXCLUDED.holder OR leases.until < $3";

/// Alert deliveries (claimed once, retried, resumed after a crash) and leases.
#[async_trait::async_trait]
pub trait AlertLedger: Send + Sync {
    /// Inserts the alert's row unless one exists for its customer/meter/period/threshold
    /// (ON CONFLICT DO NOTHING): `Some(id)` when this call inserted it and so owns the delivery,
    /// `None` when the alert was claimed before (by this or another instance). The claimer holds
    /// the delivery until `lease_until`.
    async fn claim_alert(
        &self,
        alert: &AlertClaim,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<i64>, LedgerError>;
    /// Records one delivery attempt of alert `id`: the HTTP status (`None`: no answer), the
    /// error if any, and whether it was delivered (sets `delivered_at` once). The deliverer's
    /// hold is renewed to `lease_until`, or released with `None` (no retry to come).
    async fn record_alert_attempt(
        &self,
        id: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<(), LedgerError>;
    /// Takes over (for this caller, until `lease_until`) up to `limit` alerts that are not
    /// delivered, have had fewer than `max_attempts` attempts, were claimed after `since`, and
    /// whose holder's lease ran out (a crashed instance) or was released (a clean stop).
    /// Safe across instances: each alert goes to one caller.
    async fn resume_alerts(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_attempts: i64,
        limit: i64,
    ) -> Result<Vec<AlertDelivery>, LedgerError>;
    /// Releases the hold on alerts `ids` (a stopping instance), so another can resume them now.
    async fn release_alerts(&self, ids: &[i64]) -> Result<(), LedgerError>;
    /// Takes the lease `name` for `holder` until `until` if it is free, already `holder`'s, or
    /// its holder's time ran out (as of `now`); says whether `holder` has it now.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, LedgerError>;
    /// The alert delivery log, newest first, at most `limit` rows.
    async fn alert_deliveries(&self, limit: i64) -> Result<Vec<AlertDelivery>, LedgerError>;
}

#[async_trait::async_trait]
impl<DB: Backend> AlertLedger for SqlLedger<DB> {
    async fn claim_alert(
        &self,
        a: &AlertClaim,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<i64>, LedgerError> {
        let op = "claim_alert";
        let row = DB::sql(CLAIM)
            .bind(a.customer.as_str())
            .bind(a.meter.as_str())
            .bind(Time(a.period_start))
            // The column is a Postgres `integer`; thresholds are 1–1000 (config).
            .bind(a.threshold as i32)
            .bind(a.plan.as_str())
            .bind(a.used)
            .bind(a.included)
            .bind(a.period_end.map(Time))
            .bind(Time(lease_until))
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.map(|r| r.col("id"))
            .transpose()
            .map_err(LedgerError::query(op))
    }

    async fn record_alert_attempt(
        &self,
        id: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<(), LedgerError> {
        DB::sql(ATTEMPT)
            .bind(id)
            .bind(Time(Utc::now()))
            .bind(status.map(i32::from))
            .bind(error)
            .bind(delivered)
            .bind(lease_until.map(Time))
            .execute(self.pool())
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
    ) -> Result<Vec<AlertDelivery>, LedgerError> {
        let op = "resume_alerts";
        // One statement: on Postgres, SKIP LOCKED makes instances resuming at once take
        // different alerts; on SQLite, writers run one at a time.
        let sql = format!(
            "UPDATE alert_deliveries SET lease_until = $3 WHERE id IN ( \
               SELECT id FROM alert_deliveries \
               WHERE delivered_at IS NULL AND attempts < $4 AND created_at > $2 \
                 AND (lease_until IS NULL OR lease_until < $1) \
               ORDER BY id LIMIT $5{}) \
             RETURNING {ALERT_COLUMNS}",
            DB::skip_locked("alert_deliveries"),
        );
        let rows = DB::sql(&sql)
            .bind(Time(now))
            .bind(Time(since))
            .bind(Time(lease_until))
            .bind(max_attempts)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let mut out = rows
            .iter()
            .map(|r| alert_from_row(r, op))
            .collect::<Result<Vec<_>, _>>()?;
        // RETURNING gives no order.
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    async fn release_alerts(&self, ids: &[i64]) -> Result<(), LedgerError> {
        let sql = format!(
            "UPDATE alert_deliveries SET lease_until = NULL WHERE {} AND delivered_at IS NULL",
            DB::in_list("id", "$1"),
        );
        DB::sql(&sql)
            .bind_list(List::Int(ids))
            .execute(self.pool())
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
        let taken = DB::sql(TRY_LEASE)
            .bind(name)
            .bind(holder)
            .bind(Time(now))
            .bind(Time(until))
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("try_lease"))?;
        Ok(taken == 1)
    }

    async fn alert_deliveries(&self, limit: i64) -> Result<Vec<AlertDelivery>, LedgerError> {
        let op = "alert_deliveries";
        let sql = format!("SELECT {ALERT_COLUMNS} FROM alert_deliveries ORDER BY id DESC LIMIT $1");
        let rows = DB::sql(&sql)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter().map(|r| alert_from_row(r, op)).collect()
    }
}

fn alert_from_row(r: &impl ReadRow, op: &'static str) -> Result<AlertDelivery, LedgerError> {
    let read = || -> Result<AlertDelivery, sqlx::Error> {
        Ok(AlertDelivery {
            id: r.col("id")?,
            alert: AlertClaim {
                customer: r.col("customer")?,
                meter: r.col("meter")?,
                period_start: r.time("period_start")?,
                period_end: r.opt_time("period_end")?,
                threshold: r.col::<i64>("threshold")?.clamp(0, i64::from(u32::MAX)) as u32,
                plan: r.col("plan")?,
                used: r.col("used")?,
                included: r.col("included")?,
            },
            created_at: r.time("created_at")?,
            attempts: r.col("attempts")?,
            last_attempt_at: r.opt_time("last_attempt_at")?,
            last_status: r.col("last_status")?,
            last_error: r.col("last_error")?,
            delivered_at: r.opt_time("delivered_at")?,
        })
    };
    read().map_err(read_error(op, "alert_deliveries"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::test_support::{contract, t0};
    use crate::ledger::Ledger;

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
}
