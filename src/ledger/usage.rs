//! The usage-rows concern of the ledger (`usage_events`): the batched insert the flusher calls,
//! and the sums the admin API and tests read. Implemented by both backends.
//!
//! Must not touch a row's reporting state (`report_id`, `reported_at`): that is `reports`'.

use chrono::{DateTime, Utc};

use super::{LedgerError, UsageEvent, UsageGroup, UsageQuery};

/// Usage rows: written by the flusher, read by the admin API.
#[async_trait::async_trait]
pub trait UsageLedger: Send + Sync {
    /// Multi-row insert (chunked to stay under bind-parameter limits), ON CONFLICT (id) DO NOTHING,
    /// in one transaction. Returns rows actually inserted (duplicates are not errors).
    async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64, LedgerError>;
    /// Sum of `units` and row count for a customer/meter in [from, to): for admin and tests.
    async fn usage_totals(
        &self,
        customer: &str,
        meter: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(i64, i64), LedgerError>;
    /// `usage_events` summed per group and meter over `[query.from, query.to)`, with the
    /// optional customer/meter/route filters: ordered by key then meter, at most `limit` groups
    /// after skipping `offset` (`limit` ≤ 0: all). [`UsageGroupBy::Total`](super::UsageGroupBy::Total) gives one row per meter.
    async fn usage_report(
        &self,
        query: &UsageQuery,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<UsageGroup>, LedgerError>;
}
