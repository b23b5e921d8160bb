//! Usage → Stripe: the background reporter that turns ledger usage into Billing meter events
//! (`POST /v1/billing/meter_events`, DESIGN §5, §7).
//!
//! Each run first *claims* unreported rows of customers linked to a Stripe customer (on meters
//! with a `stripe_event_name`), older than `report_delay`: in one ledger transaction they are
//! grouped per (customer, meter, `report_window`) into [`MeterReport`]s, stored, and the rows
//! marked with the report's identifier. Then it *sends* every pending report. A report's
//! identifier, value and timestamp are fixed when it is stored, so a retry after a lost answer
//! sends exactly the same event and Stripe's identifier check prevents a second count. The rows
//! are marked reported only after Stripe's 2xx — or its 400 "already exists" for the identifier,
//! which means an earlier try landed. 429, 5xx and transport errors stop the run and back off;
//! any other 4xx leaves that report pending (counted, logged) and goes on with the others.
//! Either failure also holds that one report back (`next_attempt_at`: `report_interval` doubled
//! per failed attempt, up to 5 min for transient failures and 1 h for refusals), so a report
//! Stripe keeps refusing is neither resent every run nor in the way of the reports behind it.
//! Reports older than Stripe's 35-day timestamp window are flagged (`too_old`) and never sent.
//!
//! Stripe deduplicates identifiers for "at least 24 hours" only. A try that may have landed
//! unanswered (a timeout, a 5xx, a broken connection) records when that first happened
//! (`ambiguous_since`); a report still unconfirmed [`DEDUP_WINDOW`] later is not resent, since a
//! resend could count twice, but set `uncertain` (`tollgate_stripe_meter_events_total{outcome=
//! "uncertain"}`, an error log) for an operator to check in Stripe and settle with
//! `POST /admin/stripe/reports/{identifier}/resolve`. A 429 or a 4xx means "not recorded":
//! resending those is always safe.
//!
//! Owns: `stripe_meter_reports` rows' lifecycle, `tollgate_stripe_meter_events_total`,
//! `tollgate_stripe_usage_too_old_rows_total`, `tollgate_stripe_unlinked_usage_rows`. Must not touch: the request path, quota counters.

use super::api::StripeApi;
use crate::ledger::{Ledger, LedgerError, MeterReport, ReportClaim, ReportState};
use crate::proxy::state::SnapshotCell;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Stripe accepts meter events up to 35 days old. Reports within an hour of that are flagged too:
/// a retry loop must not straddle the limit.
pub const MAX_AGE: chrono::Duration = chrono::Duration::days(35);
const AGE_MARGIN: chrono::Duration = chrono::Duration::hours(1);

/// Rows claimed per run; the rest wait for the next run.
const CLAIM_ROWS: i64 = 50_000;
/// Reports sent per run at most.
const SEND_BATCH: i64 = 1_000;
/// Meter-event calls in flight at once: at ~100 ms a call, one at a time would cap a run at
/// ~10 events/s; Stripe allows 1 000/s in live mode.
const SEND_CONCURRENCY: usize = 8;
/// How long after a try that may have landed a resend is still deduplicated by Stripe: it
/// promises "at least 24 hours"; an hour of margin.
pub const DEDUP_WINDOW: chrono::Duration = chrono::Duration::hours(23);

/// Longest wait between retries while Stripe fails.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest a report Stripe refused (a 4xx other than 429) waits before it is tried again: such a
/// refusal needs an operator (an unknown meter or customer), so trying more often only adds load.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(3600);

/// When a report that has now failed `attempts` times may be tried again: `interval` doubled per
/// attempt after the first, at most `cap`.
pub fn retry_at(
    now: DateTime<Utc>,
    interval: Duration,
    attempts: i64,
    cap: Duration,
) -> DateTime<Utc> {
    let retry = attempts.clamp(0, i64::from(u32::MAX)) as u32;
    let wait = crate::backoff::wait(interval.max(Duration::from_millis(10)), retry, cap);
    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx: Stripe recorded the event.
    Delivered,
    /// 400 "already exists": an earlier try with this identifier was recorded.
    AlreadyExists,
    /// 429 (or 409): not recorded; retry later, with backoff.
    Transient(String),
    /// 5xx, timeout, a broken connection or an unreadable answer: Stripe may or may not have
    /// recorded it; retry later with the same identifier (deduplicated within [`DEDUP_WINDOW`]).
    Unknown(String),
    /// Any other refusal (unknown meter, customer, bad key): this report waits for an operator.
    Rejected(String),
}

/// Classifies the answer to one meter event.
pub fn classify<T>(r: Result<T, stripe_api::StripeError>) -> Delivery {
    use stripe_api::StripeError as E;
    match r {
        Ok(_) => Delivery::Delivered,
        Err(E::Stripe(err, status)) => {
            let message = err.message.clone().unwrap_or_default();
            let exists = matches!(
                err.code,
                Some(stripe_api::ApiErrorsCode::ResourceAlreadyExists)
            ) || message.to_ascii_lowercase().contains("already exists");
            match status {
                400 if exists => Delivery::AlreadyExists,
                409 | 429 => Delivery::Transient(format!("{status}: {message}")),
                500..=599 => Delivery::Unknown(format!("{status}: {message}")),
                _ => Delivery::Rejected(format!("{status}: {message}")),
            }
        }
        // The request may or may not have landed: retrying with the same identifier is safe.
        Err(e @ (E::JSONDeserialize(_) | E::ClientError(_) | E::Timeout)) => {
            Delivery::Unknown(e.to_string())
        }
        Err(e @ E::ConfigError(_)) => Delivery::Rejected(e.to_string()),
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStats {
    pub claimed: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub too_old: usize,
    /// Reports set `uncertain` (a resend could count twice).
    pub uncertain: usize,
    /// The run stopped on a transient failure (the caller backs off).
    pub transient: Option<String>,
}

/// The reporter task.
pub struct Reporter {
    ledger: Arc<dyn Ledger>,
    api: StripeApi,
    /// The live config: which meters are reported, under which event name, is read each run
    /// (meters change through the admin API without a restart).
    config: SnapshotCell,
    interval: Duration,
    window: Duration,
    delay: Duration,
    events: prometheus::IntCounterVec,
    too_old_rows: prometheus::IntCounter,
    unlinked_rows: prometheus::IntGauge,
    /// Reporter lag, the Prometheus way: `time() - tollgate_stripe_reporter_last_success_…`.
    last_success: prometheus::IntGauge,
}

// === impl Reporter ===

impl Reporter {
    /// Registers the metrics.
    pub fn new(
        ledger: Arc<dyn Ledger>,
        api: StripeApi,
        config: SnapshotCell,
        settings: &crate::config::StripeSettings,
        registry: &prometheus::Registry,
    ) -> Result<Reporter, prometheus::Error> {
        let events = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_stripe_meter_events_total",
                "Usage reports (Stripe meter events) by outcome",
            ),
            &["outcome"],
        )?;
        let too_old_rows = prometheus::IntCounter::new(
            "tollgate_stripe_usage_too_old_rows_total",
            "Ledger usage rows older than Stripe's 35-day window: flagged, never sent",
        )?;
        let unlinked_rows = prometheus::IntGauge::new(
            "tollgate_stripe_unlinked_usage_rows",
            "Unreported usage rows of customers with no Stripe link (reported once linked)",
        )?;
        let last_success = prometheus::IntGauge::new(
            "tollgate_stripe_reporter_last_success_timestamp_seconds",
            "Unix time of the reporter's last run that met no transient Stripe or ledger failure \
             (reporter lag = time() - this)",
        )?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(too_old_rows.clone()))?;
        registry.register(Box::new(unlinked_rows.clone()))?;
        Ok(Reporter {
            ledger,
            api,
            config,
            interval: settings.report_interval,
            window: settings.report_window,
            delay: settings.report_delay,
            events,
            too_old_rows,
            unlinked_rows,
            last_success,
        })
    }

    /// Runs until `cancel`: a run every `report_interval`; after a transient failure the wait
    /// doubles (up to 5 min) until a run succeeds.
    pub async fn run(self, cancel: CancellationToken) {
        let mut wait = Duration::ZERO;
        let mut failures = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let failed = match self.run_once(Utc::now()).await {
                Ok(stats) => {
                    if stats.claimed + stats.delivered + stats.duplicates > 0 {
                        tracing::info!(
                            claimed = stats.claimed,
                            delivered = stats.delivered,
                            duplicates = stats.duplicates,
                            rejected = stats.rejected,
                            too_old = stats.too_old,
                            uncertain = stats.uncertain,
                            transient = stats.transient.as_deref(),
                            "usage reported to Stripe"
                        );
                    }
                    if stats.transient.is_none() {
                        self.last_success.set(Utc::now().timestamp());
                    }
                    stats.transient.is_some()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "usage reporting: ledger unavailable");
                    true
                }
            };
            failures = if failed { failures + 1 } else { 0 };
            // After the n-th failure in a row: interval × 2^n, at most MAX_BACKOFF.
            let cap = MAX_BACKOFF.max(self.interval);
            wait = crate::backoff::wait(self.interval, failures + 1, cap);
        }
    }

    /// One run as of `now`: claim, then send every pending report (see the module doc).
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<RunStats, LedgerError> {
        let meters = self.meters();
        if meters.is_empty() {
            // No meter has a stripe_event_name (yet): nothing to report, nothing to count.
            return Ok(RunStats::default());
        }
        let too_old_before = now - MAX_AGE + AGE_MARGIN;
        let claim = ReportClaim {
            meters: meters.clone(),
            until: now - chrono::Duration::from_std(self.delay).unwrap_or_default(),
            window_secs: self.window.as_secs().max(1) as i64,
            too_old_before,
            max_rows: CLAIM_ROWS,
        };
        let mut stats = RunStats::default();
        let claimed = self.ledger.claim_usage_reports(&claim).await?;
        stats.claimed = claimed.len();
        for r in &claimed {
            match r.state {
                ReportState::TooOld => self.flag_too_old(r, &mut stats),
                ReportState::Zero => self.events.with_label_values(&["zero"]).inc(),
                _ => {}
            }
        }
        let meters: Vec<String> = meters.into_keys().collect();
        self.unlinked_rows
            .set(self.ledger.unlinked_usage_rows(&meters).await?);
        // Up to SEND_CONCURRENCY calls in flight, started oldest first. After a transient
        // failure no new call starts; those in flight are still recorded. (Dropping the set on a
        // ledger error aborts them: their reports stay pending and are resent, same identifier.)
        let mut queue = self
            .ledger
            .pending_usage_reports(SEND_BATCH, now)
            .await?
            .into_iter();
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            while stats.transient.is_none() && inflight.len() < SEND_CONCURRENCY {
                let Some(r) = queue.next() else { break };
                if r.ts < too_old_before {
                    // Pending so long (Stripe down for weeks) that Stripe would refuse it now.
                    self.ledger
                        .finish_usage_report(&r.identifier, ReportState::TooOld)
                        .await?;
                    self.flag_too_old(&r, &mut stats);
                    continue;
                }
                if r.ambiguous_since.is_some_and(|t| now - t >= DEDUP_WINDOW) {
                    self.ledger
                        .finish_usage_report(&r.identifier, ReportState::Uncertain)
                        .await?;
                    stats.uncertain += 1;
                    self.events.with_label_values(&["uncertain"]).inc();
                    tracing::error!(identifier = %r.identifier, customer = %r.customer, meter = %r.meter,
                        units = r.value, ambiguous_since = r.ambiguous_since.as_ref().map(tracing::field::display),
                        "meter event unconfirmed for longer than Stripe deduplicates identifiers: not resent; \
                         check it in Stripe, then POST /admin/stripe/reports/{{identifier}}/resolve");
                    continue;
                }
                let api = self.api.clone();
                inflight.spawn(async move {
                    let d = classify(api.meter_event(&r).await);
                    (r, d)
                });
            }
            let Some(done) = inflight.join_next().await else {
                break;
            };
            let (r, d) = match done {
                Ok(x) => x,
                Err(e) => {
                    // A send task that panicked: nothing is known of its report; retry later.
                    stats.transient = Some(e.to_string());
                    continue;
                }
            };
            self.record(&r, d, &mut stats).await?;
        }
        Ok(stats)
    }

    /// Books one answer: delivered (rows marked), or the failure counted on the report.
    async fn record(
        &self,
        r: &MeterReport,
        d: Delivery,
        stats: &mut RunStats,
    ) -> Result<(), LedgerError> {
        let ambiguous = matches!(d, Delivery::Unknown(_));
        match d {
            Delivery::Delivered | Delivery::AlreadyExists => {
                self.ledger
                    .finish_usage_report(&r.identifier, ReportState::Delivered)
                    .await?;
                if d == Delivery::Delivered {
                    stats.delivered += 1;
                    self.events.with_label_values(&["delivered"]).inc();
                } else {
                    stats.duplicates += 1;
                    self.events.with_label_values(&["already_exists"]).inc();
                }
            }
            Delivery::Rejected(e) => {
                stats.rejected += 1;
                self.events.with_label_values(&["rejected"]).inc();
                let retry = retry_at(
                    Utc::now(),
                    self.interval,
                    r.attempts + 1,
                    MAX_REFUSED_BACKOFF,
                );
                tracing::error!(identifier = %r.identifier, customer = %r.customer, meter = %r.meter, error = %e,
                    attempts = r.attempts + 1, %retry, "Stripe refused a meter event; it stays pending");
                self.ledger
                    .usage_report_failed(&r.identifier, &e, retry, false)
                    .await?;
            }
            Delivery::Transient(e) | Delivery::Unknown(e) => {
                self.events.with_label_values(&["retry"]).inc();
                tracing::warn!(identifier = %r.identifier, error = %e, ambiguous, "Stripe unavailable; backing off");
                let retry = retry_at(Utc::now(), self.interval, r.attempts + 1, MAX_BACKOFF);
                self.ledger
                    .usage_report_failed(&r.identifier, &e, retry, ambiguous)
                    .await?;
                stats.transient = Some(e);
            }
        }
        Ok(())
    }

    /// Meter → Stripe `event_name`, from the live config (meters without one are not reported).
    fn meters(&self) -> BTreeMap<String, String> {
        let snap = self.config.load();
        snap.config
            .meters
            .iter()
            .filter_map(|(name, m)| Some((name.clone(), m.stripe_event_name.clone()?)))
            .collect()
    }

    fn flag_too_old(&self, r: &MeterReport, stats: &mut RunStats) {
        stats.too_old += 1;
        self.events.with_label_values(&["too_old"]).inc();
        self.too_old_rows.inc_by(r.rows.max(0) as u64);
        tracing::error!(identifier = %r.identifier, customer = %r.customer, meter = %r.meter, units = r.value,
            ts = %r.ts, "usage older than Stripe's 35-day window: not sent, bill it by hand");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{group_reports, ReportRow};
    use chrono::TimeZone;

    fn api_error(code: Option<&str>, message: &str, status: u16) -> stripe_api::StripeError {
        use std::str::FromStr;
        let err = stripe_api::ApiErrors {
            advice_code: None,
            charge: None,
            code: code.map(|c| stripe_api::ApiErrorsCode::from_str(c).expect("known code")),
            decline_code: None,
            doc_url: None,
            message: Some(message.into()),
            network_advice_code: None,
            network_decline_code: None,
            param: None,
            payment_intent: None,
            payment_method: None,
            payment_method_type: None,
            request_log_url: None,
            setup_intent: None,
            source: None,
            type_: stripe_api::ApiErrorsType::InvalidRequestError,
        };
        stripe_api::StripeError::Stripe(Box::new(err), status)
    }

    /// Stripe's answers map to the reporter's four outcomes.
    #[test]
    fn classifies_stripe_answers() {
        assert_eq!(classify::<()>(Ok(())), Delivery::Delivered);
        let dup = api_error(
            Some("resource_already_exists"),
            "An event with identifier tg_1 already exists.",
            400,
        );
        assert_eq!(classify::<()>(Err(dup)), Delivery::AlreadyExists);
        let dup_text = api_error(None, "An event already exists with identifier tg_1", 400);
        assert_eq!(classify::<()>(Err(dup_text)), Delivery::AlreadyExists);
        assert!(matches!(
            classify::<()>(Err(api_error(None, "busy", 429))),
            Delivery::Transient(_)
        ));
        for s in [500, 503] {
            assert!(matches!(
                classify::<()>(Err(api_error(None, "busy", s))),
                Delivery::Unknown(_)
            ));
        }
        assert!(matches!(
            classify::<()>(Err(api_error(
                Some("resource_missing"),
                "No such meter",
                400
            ))),
            Delivery::Rejected(_)
        ));
        assert!(matches!(
            classify::<()>(Err(stripe_api::StripeError::Timeout)),
            Delivery::Unknown(_)
        ));
    }

    /// The per-report wait doubles from `report_interval` and stops at its cap.
    #[test]
    fn report_backoff_doubles_to_a_cap() {
        let now = Utc.timestamp_opt(1_000_000, 0).single().expect("time");
        let at = |attempts| {
            (retry_at(now, Duration::from_secs(60), attempts, MAX_REFUSED_BACKOFF) - now)
                .num_seconds()
        };
        assert_eq!(
            [1, 2, 3, 4, 6, 7, 100, i64::MAX].map(at),
            [60, 120, 240, 480, 1920, 3600, 3600, 3600]
        );
        assert_eq!(
            (retry_at(now, Duration::from_secs(60), 4, MAX_BACKOFF) - now).num_seconds(),
            300
        );
    }

    fn row(i: u128, secs: i64, customer: &str, meter: &str, units: i64) -> ReportRow {
        ReportRow {
            id: uuid::Uuid::from_u128(i),
            ts: Utc.timestamp_opt(secs, 123_000).single().expect("time"),
            customer: customer.into(),
            meter: meter.into(),
            units,
            stripe_customer: format!("cus_{customer}"),
        }
    }

    /// Rows group per customer, meter and UTC window; the identifier is the oldest row's id;
    /// too-old and zero groups are flagged; unknown meters are dropped; units sum exactly.
    #[test]
    fn groups_rows_into_reports() {
        let meters: BTreeMap<String, String> =
            [("api_calls".to_string(), "api_calls_ev".to_string())]
                .into_iter()
                .collect();
        let rows = vec![
            row(5, 1_000_010, "acme", "api_calls", 2),
            row(3, 1_000_005, "acme", "api_calls", 1),
            row(9, 1_000_070, "acme", "api_calls", 4), // next 60 s window
            row(7, 1_000_020, "globex", "api_calls", 0),
            row(8, 1_000_020, "acme", "tokens", 100), // not a reported meter
            row(1, 10, "acme", "api_calls", 6),       // too old
        ];
        let cutoff = Utc.timestamp_opt(1_000, 0).single().expect("time");
        let out = group_reports(&rows, &meters, 60, cutoff);
        let view: Vec<_> = out
            .iter()
            .map(|r| {
                (
                    r.identifier.clone(),
                    r.customer.as_str(),
                    r.value,
                    r.rows,
                    r.state,
                    r.ts.timestamp(),
                )
            })
            .collect();
        let id = |i: u128| format!("tg_{}", uuid::Uuid::from_u128(i).simple());
        assert_eq!(
            view,
            vec![
                (id(1), "acme", 6, 1, ReportState::TooOld, 10),
                (id(3), "acme", 3, 2, ReportState::Pending, 1_000_005),
                (id(7), "globex", 0, 1, ReportState::Zero, 1_000_020),
                (id(9), "acme", 4, 1, ReportState::Pending, 1_000_070),
            ]
        );
        assert_eq!(out[1].event_name, "api_calls_ev");
        assert_eq!(out[1].stripe_customer, "cus_acme");
        // The same rows in another order make the same reports (a retry re-derives nothing new).
        let mut shuffled = rows.clone();
        shuffled.reverse();
        assert_eq!(group_reports(&shuffled, &meters, 60, cutoff), out);
    }
}
