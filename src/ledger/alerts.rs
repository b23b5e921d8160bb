//! The alerts concern of the ledger: threshold-alert deliveries (`alert_deliveries`) and named
//! leases (`leases`). Implemented by both backends.
//!
//! Must not decide when an alert is due or what it says: that is `crate::alerts`'.

use chrono::{DateTime, Utc};

use super::{AlertClaim, AlertDelivery, LedgerError};

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
