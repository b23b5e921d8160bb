//! Usage reports to Stripe (`stripe_meter_reports`, and the reporting state of `usage_events`:
//! `report_id`, `reported_at`): claiming unreported rows into Billing meter events, their
//! delivery state, backoff and the operator's verdict on uncertain ones. The SQL here is written
//! once for both backends, except storing a claim's reports ([`Backend::store_reports`]).
//!
//! Must not insert or delete usage rows, nor write Stripe links (`customers` owns them).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::dialect::{read_error, Backend, List, ReadRow, Time};
use super::{LedgerError, MeterReport, ReportClaim, ReportRow, ReportState, SqlLedger};

/// The columns a claim stores of each report (the backend's [`Backend::store_reports`] adds
/// the times it sets).
pub(crate) const STORED_REPORT_COLUMNS: &str =
    "identifier, customer, stripe_customer_id, meter, event_name, ts, value, row_count, state";

const REPORT_COLUMNS: &str = "identifier, customer, stripe_customer_id, meter, event_name, ts, \
     value, row_count, state, CAST(attempts AS BIGINT) AS attempts, ambiguous_since";

const FINISH: &str = "UPDATE stripe_meter_reports SET state = $2, finished_at = $3, \
       attempts = attempts + 1 \
     WHERE identifier = $1 AND state = 'pending'";

const FAILED: &str = "UPDATE stripe_meter_reports \
     SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3, \
       ambiguous_since = CASE WHEN $4 THEN COALESCE(ambiguous_since, $5) \
         ELSE ambiguous_since END \
     WHERE identifier = $1 AND state = 'pending'";

const RESOLVE: &str = "UPDATE stripe_meter_reports SET \
       state = CASE WHEN $2 THEN 'delivered' ELSE 'pending' END, \
       finished_at = CASE WHEN $2 THEN $3 ELSE NULL END, \
       ambiguous_since = NULL, next_attempt_at = NULL \
     WHERE identifier = $1 AND state = 'uncertain'";

const MARK_REPORTED: &str = "UPDATE usage_events SET reported_at = $2 \
     WHERE report_id = $1 AND reported_at IS NULL";

/// Usage reports to Stripe: claimed from usage rows, then delivered (or not) one by one.
#[async_trait::async_trait]
pub trait ReportLedger: Send + Sync {
    /// In one transaction: takes up to `claim.max_rows` unreported, unclaimed usage rows of
    /// linked customers on reported meters with `ts < claim.until` (oldest first), groups them
    /// with [`group_reports`] and stores each group as a [`MeterReport`] whose identifier the rows
    /// then carry (`report_id`). Safe against concurrent claimers (a row is claimed once).
    async fn claim_usage_reports(
        &self,
        claim: &ReportClaim,
    ) -> Result<Vec<MeterReport>, LedgerError>;
    /// Reports still to send (state `pending`) that are due at `now` (no backoff running: see
    /// [`ReportLedger::usage_report_failed`]), oldest first.
    async fn pending_usage_reports(
        &self,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<MeterReport>, LedgerError>;
    /// Ends a pending report: `Delivered` marks its rows reported (`reported_at`); `TooOld`
    /// leaves them unreported. Returns the rows marked. A report no longer pending is left alone.
    async fn finish_usage_report(
        &self,
        identifier: &str,
        state: ReportState,
    ) -> Result<u64, LedgerError>;
    /// Counts a failed delivery attempt of a pending report, keeps the error for operators, and
    /// holds the report back until `retry_at`. `ambiguous`: the try may have landed (timeout,
    /// 5xx); the first such failure's time is kept in `ambiguous_since`.
    async fn usage_report_failed(
        &self,
        identifier: &str,
        error: &str,
        retry_at: DateTime<Utc>,
        ambiguous: bool,
    ) -> Result<(), LedgerError>;
    /// An operator's verdict on an `uncertain` report: `landed` (Stripe has it) marks it
    /// delivered and its rows reported; otherwise it is pending again with no ambiguity, to be
    /// resent. `None` when there is no uncertain report `identifier`; else the rows marked.
    async fn resolve_uncertain_report(
        &self,
        identifier: &str,
        landed: bool,
    ) -> Result<Option<u64>, LedgerError>;
    /// Unreported usage rows on `meters` of customers with no Stripe link (they wait for one).
    async fn unlinked_usage_rows(&self, meters: &[String]) -> Result<i64, LedgerError>;
}

/// Groups claimed rows into reports: one per (customer, meter, UTC window of `window_secs`,
/// too old or not). Rows of meters missing from `meters` are dropped. Pure: both backends use it.
pub fn group_reports(
    rows: &[ReportRow],
    meters: &BTreeMap<String, String>,
    window_secs: i64,
    too_old_before: DateTime<Utc>,
) -> Vec<MeterReport> {
    let window = window_secs.max(1);
    let mut groups: BTreeMap<(&str, &str, i64, bool), Vec<&ReportRow>> = BTreeMap::new();
    for r in rows {
        if !meters.contains_key(&r.meter) {
            continue;
        }
        let w = r.ts.timestamp().div_euclid(window);
        let old = r.ts < too_old_before;
        groups
            .entry((r.customer.as_str(), r.meter.as_str(), w, old))
            .or_default()
            .push(r);
    }
    let mut out: Vec<MeterReport> = groups
        .into_iter()
        .filter_map(|((customer, meter, _, old), mut rows)| {
            rows.sort_by_key(|r| (r.ts, r.id));
            let first = rows.first()?;
            let value: i64 = rows.iter().map(|r| r.units).sum();
            let state = if old {
                ReportState::TooOld
            } else if value == 0 {
                ReportState::Zero
            } else {
                ReportState::Pending
            };
            Some(MeterReport {
                identifier: format!("tg_{}", first.id.simple()),
                customer: customer.to_string(),
                stripe_customer: first.stripe_customer.clone(),
                meter: meter.to_string(),
                event_name: meters.get(meter)?.clone(),
                ts: DateTime::from_timestamp(first.ts.timestamp(), 0)?,
                value,
                rows: rows.len() as i64,
                state,
                row_ids: rows.iter().map(|r| r.id).collect(),
                attempts: 0,
                ambiguous_since: None,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.ts, &a.identifier).cmp(&(b.ts, &b.identifier)));
    out
}

#[async_trait::async_trait]
impl<DB: Backend> ReportLedger for SqlLedger<DB> {
    async fn claim_usage_reports(
        &self,
        claim: &ReportClaim,
    ) -> Result<Vec<MeterReport>, LedgerError> {
        let op = "claim_usage_reports";
        let meters: Vec<String> = claim.meters.keys().cloned().collect();
        // The row lock (Postgres): another instance claiming at the same moment takes other rows.
        let sql = format!(
            "SELECT u.id, u.ts, u.customer, u.meter, u.units, l.stripe_customer_id \
             FROM usage_events u JOIN stripe_customers l ON l.customer = u.customer \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL AND u.ts < $1 AND {} \
             ORDER BY u.ts LIMIT $3{}",
            DB::in_list("u.meter", "$2"),
            DB::skip_locked("u"),
        );
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let rows = DB::sql(&sql)
            .bind(Time(claim.until))
            .bind_list(List::Text(&meters))
            .bind(claim.max_rows)
            .fetch_all(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(ReportRow {
                    id: r.col("id")?,
                    ts: r.time("ts")?,
                    customer: r.col("customer")?,
                    meter: r.col("meter")?,
                    units: r.col("units")?,
                    stripe_customer: r.col("stripe_customer_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(read_error(op, "usage_events"))?;
        let reports = group_reports(
            &rows,
            &claim.meters,
            claim.window_secs,
            claim.too_old_before,
        );
        DB::store_reports(&mut *tx, &reports, Utc::now())
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
        let op = "pending_usage_reports";
        let sql = format!(
            "SELECT {REPORT_COLUMNS} FROM stripe_meter_reports \
             WHERE state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= $2) \
             ORDER BY ts, identifier LIMIT $1"
        );
        let rows = DB::sql(&sql)
            .bind(limit)
            .bind(Time(now))
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter().map(|r| report_from_row(r, op)).collect()
    }

    async fn finish_usage_report(
        &self,
        identifier: &str,
        state: ReportState,
    ) -> Result<u64, LedgerError> {
        let op = "finish_usage_report";
        let now = Utc::now();
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let done = DB::sql(FINISH)
            .bind(identifier)
            .bind(state.as_str())
            .bind(Time(now))
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        let mut marked = 0;
        if done == 1 && state == ReportState::Delivered {
            marked = mark_reported::<DB>(&mut tx, identifier, now, op).await?;
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
        DB::sql(FAILED)
            .bind(identifier)
            .bind(error)
            .bind(Time(retry_at))
            .bind(ambiguous)
            .bind(Time(Utc::now()))
            .execute(self.pool())
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
        let now = Utc::now();
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let done = DB::sql(RESOLVE)
            .bind(identifier)
            .bind(landed)
            .bind(Time(now))
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        if done == 0 {
            return Ok(None);
        }
        let mut marked = 0;
        if landed {
            marked = mark_reported::<DB>(&mut tx, identifier, now, op).await?;
        }
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(Some(marked))
    }

    async fn unlinked_usage_rows(&self, meters: &[String]) -> Result<i64, LedgerError> {
        let op = "unlinked_usage_rows";
        let sql = format!(
            "SELECT COUNT(*) AS n FROM usage_events u \
             WHERE u.reported_at IS NULL AND u.report_id IS NULL AND {} \
               AND NOT EXISTS (SELECT 1 FROM stripe_customers l WHERE l.customer = u.customer)",
            DB::in_list("u.meter", "$1"),
        );
        let row = DB::sql(&sql)
            .bind_list(List::Text(meters))
            .fetch_one(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.col("n").map_err(LedgerError::query(op))
    }
}

/// Marks the rows of report `identifier` reported (Stripe has their event) as of `now`;
/// returns how many.
async fn mark_reported<DB: Backend>(
    tx: &mut sqlx::Transaction<'static, DB>,
    identifier: &str,
    now: DateTime<Utc>,
    op: &'static str,
) -> Result<u64, LedgerError> {
    DB::sql(MARK_REPORTED)
        .bind(identifier)
        .bind(Time(now))
        .execute(&mut **tx)
        .await
        .map_err(LedgerError::query(op))
}

fn report_from_row(r: &impl ReadRow, op: &'static str) -> Result<MeterReport, LedgerError> {
    let table = "stripe_meter_reports";
    let state: String = r.col("state").map_err(LedgerError::query(op))?;
    let state = ReportState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
        table,
        detail: format!("unknown state {state:?}"),
    })?;
    let read = || -> Result<MeterReport, sqlx::Error> {
        Ok(MeterReport {
            identifier: r.col("identifier")?,
            customer: r.col("customer")?,
            stripe_customer: r.col("stripe_customer_id")?,
            meter: r.col("meter")?,
            event_name: r.col("event_name")?,
            ts: r.time("ts")?,
            value: r.col("value")?,
            rows: r.col("row_count")?,
            state,
            row_ids: Vec::new(),
            attempts: r.col("attempts")?,
            ambiguous_since: r.opt_time("ambiguous_since")?,
        })
    };
    read().map_err(read_error(op, table))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::test_support::{contract, events, t0, units_of};
    use crate::ledger::Ledger;

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

    contract!(
        "usage is claimed into reports once, bounded per claim, finished once.",
        check_usage_reports,
        pg_usage_reports,
        sqlite_usage_reports
    );
}
