//! The usage-reporting concern of the ledger (`stripe_meter_reports`, and the reporting state of
//! `usage_events`). Implemented by both backends.
//!
//! Must not insert or delete usage rows, nor write Stripe links (`customers` owns them).

use chrono::{DateTime, Utc};

use super::{LedgerError, MeterReport, ReportClaim, ReportState};

/// Usage reports to Stripe: claimed from usage rows, then delivered (or not) one by one.
#[async_trait::async_trait]
pub trait ReportLedger: Send + Sync {
    /// In one transaction: takes up to `claim.max_rows` unreported, unclaimed usage rows of
    /// linked customers on reported meters with `ts < claim.until` (oldest first), groups them
    /// with [`group_reports`](super::group_reports) and stores each group as a [`MeterReport`] whose identifier the rows
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
