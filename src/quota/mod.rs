//! Quota store: the real-time counters behind metered quotas and per-minute rate limits.
//!
//! Owns: billing periods, the atomic "check every limit and charge" operation, refunds and
//! adjustments. Two implementations behind [`QuotaStore`]: [`redis::RedisStore`] (production,
//! shared by many instances, one Lua call per batch of waiting requests) and [`memory::MemoryStore`]
//! (embedded default and the fail-open fallback). [`lease::Leased`] sits in front of Redis for
//! plans in lease mode: units taken from Redis in blocks and spent in process.
//! [`usage_view`] reads the counters back against a plan's quotas (operator and self-service).
//! Must not touch: plans or entitlements (callers pass plain numbers and quotas), HTTP, the
//! ledger. A store given a [`crate::journal::Journal`] writes each reservation there before it
//! can count (and says which it refused); it never reads it.

pub mod fail_open;
pub mod lease;
pub(crate) mod maintain;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod usage_view;

use crate::config::Rate;
use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeZone, Utc};

/// A billing period `[start, end)` in unix seconds. Counters are keyed by its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    pub start: i64,
    pub end: i64,
}

impl Period {
    /// The calendar month (UTC) containing `now`.
    pub fn calendar_month(now: DateTime<Utc>) -> Period {
        let (y, m) = (now.year(), now.month());
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let start = Utc
            .with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .map_or(0, |t| t.timestamp());
        let end = Utc
            .with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
            .single()
            .map_or(i64::MAX, |t| t.timestamp());
        Period { start, end }
    }

    /// The subscription's billing period when `now` falls inside it, else the calendar month.
    pub fn current(
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Period {
        match (start, end) {
            (Some(s), Some(e)) if s <= now && now < e => Period {
                start: s.timestamp(),
                end: e.timestamp(),
            },
            _ => Period::calendar_month(now),
        }
    }

    /// Whole seconds from `now` to the end of the period (at least 1).
    pub fn seconds_left(&self, now: i64) -> u64 {
        (self.end - now).max(1) as u64
    }

    pub fn length(&self) -> u64 {
        (self.end - self.start).max(1) as u64
    }
}

/// One reservation request: charge `cost` units of `meter` to `customer`, refusing if that would
/// pass `cap`, after checking the customer's per-minute `rate`.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub period: Period,
    pub cost: u64,
    /// Hard limit on units used this period; `None` counts without limit (unlimited or overage).
    pub cap: Option<u64>,
    pub rate: Option<Rate>,
    /// The request's journal line: a store that charges it journals it first (the embedded
    /// store as granted, Redis as sent with its batch), so a crash cannot lose the charge.
    pub record: Option<&'a std::sync::Arc<crate::journal::Line>>,
    /// The plan leases its quota (`quota_mode = "lease"`): a store with leases grants this from
    /// the instance's lease; any other store reserves it exactly.
    pub lease: Option<lease::LeaseTerms>,
}

/// The answer to a [`Check`]. Nothing is charged unless it is `Granted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Charged; `used` is the period's total including this charge.
    Granted { used: u64 },
    /// Charging would pass the cap; `used` is the period's total so far.
    OverQuota { used: u64 },
    /// Too many requests this minute; try again after this many milliseconds.
    RateLimited { retry_after_ms: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota store timed out")]
    Timeout,
    #[error("quota store: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("quota store answered something unexpected: {0}")]
    Protocol(String),
    /// A batched call failed; every request in the batch gets the message.
    #[error("quota store: {0}")]
    Batch(String),
    /// Not tried: a call like it failed a moment ago.
    #[error("quota store: {0}")]
    Unavailable(&'static str),
}

/// Real-time counters. Implementations must make `reserve` atomic: N concurrent reservations
/// against a cap of K never grant more than K units.
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    async fn reserve(&self, check: &Check<'_>) -> Result<Verdict, QuotaError>;
    /// Adds `delta` (negative = refund) to a period's counter; returns the new total (never < 0).
    async fn adjust(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        delta: i64,
    ) -> Result<u64, QuotaError>;
    /// Units used in a period.
    async fn used(&self, customer: &str, meter: &str, period: Period) -> Result<u64, QuotaError>;
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), QuotaError>;
    /// What each reservation batch (by its key, from a journal's sent records) granted, one
    /// `1`/`0` per request; `None` for a batch that never ran, and then it never will.
    /// Recovery after a crash. A store without batches has none.
    async fn batch_outcomes(&self, keys: &[&str]) -> Result<Vec<Option<String>>, QuotaError> {
        Ok(vec![None; keys.len()])
    }
}

/// Where a counter the store does not hold starts from: the units the ledger already has for
/// the customer, meter and period. A store with a seed never starts a period's counter from 0
/// while the ledger says otherwise: not after Redis lost its data (a restart without
/// persistence, `FLUSHALL`, eviction), not after an embedded restart.
///
/// With a seed, a store also leaves a counter it does not hold alone when asked to adjust it (a
/// refund, an exact-cost settlement, folded fail-open counts): the ledger rows behind those
/// calls are what the next reservation seeds from, so adding them as well would count twice.
#[async_trait]
pub trait CounterSeed: Send + Sync + 'static {
    /// Units recorded for `customer` and `meter` in `period`.
    async fn units(&self, customer: &str, meter: &str, period: Period) -> Result<u64, String>;
}

/// The seed of a Redis that lost a counter: the ledger's units, which already hold (as rows) what
/// the fail-open fallback granted meanwhile, so those local counts are dropped instead of being
/// folded on top.
pub struct SeedAfterLoss {
    pub ledger: std::sync::Arc<dyn CounterSeed>,
    pub fallback: std::sync::Arc<memory::MemoryStore>,
}

#[async_trait]
impl CounterSeed for SeedAfterLoss {
    async fn units(&self, customer: &str, meter: &str, period: Period) -> Result<u64, String> {
        let units = self.ledger.units(customer, meter, period).await?;
        if let Some(local) = self.fallback.take(customer, meter, period) {
            tracing::info!(%customer, %meter, local, "counter rebuilt from the ledger; dropped the fail-open count it already holds");
        }
        Ok(units)
    }
}

/// How long a reservation waits for its seed before it goes ahead without one (logged).
pub(crate) const SEED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The seed for one counter, bounded by [`SEED_TIMEOUT`]; `None` (logged) when it failed: the
/// counter then starts from what the store has, as without a seed.
pub(crate) async fn seed_of(
    seed: &dyn CounterSeed,
    customer: &str,
    meter: &str,
    period: Period,
) -> Option<u64> {
    match tokio::time::timeout(SEED_TIMEOUT, seed.units(customer, meter, period)).await {
        Ok(Ok(units)) => {
            if units > 0 {
                tracing::info!(%customer, %meter, period_start = period.start, units,
                    "quota counter rebuilt from the ledger");
            }
            Some(units)
        }
        Ok(Err(e)) => {
            tracing::warn!(%customer, %meter, error = %e, "could not read the ledger to rebuild a quota counter; it starts from the store's value");
            None
        }
        Err(_) => {
            tracing::warn!(%customer, %meter, "the ledger did not answer in time to rebuild a quota counter; it starts from the store's value");
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A ledger that always says `units`, and counts how often it was asked.
    pub(crate) struct FixedSeed {
        units: u64,
        calls: AtomicUsize,
    }

    impl FixedSeed {
        pub(crate) fn new(units: u64) -> FixedSeed {
            FixedSeed {
                units,
                calls: AtomicUsize::new(0),
            }
        }

        pub(crate) fn calls(&self) -> usize {
            self.calls.load(Ordering::Relaxed)
        }
    }

    #[async_trait]
    impl CounterSeed for FixedSeed {
        async fn units(&self, _: &str, _: &str, _: Period) -> Result<u64, String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(self.units)
        }
    }

    /// Calendar months roll over the year and have the right length.
    #[test]
    fn calendar_month_bounds() {
        let now = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 59, 59)
            .single()
            .expect("date");
        let p = Period::calendar_month(now);
        assert_eq!(
            p.start,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .single()
                .expect("d")
                .timestamp()
        );
        assert_eq!(
            p.end,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .single()
                .expect("d")
                .timestamp()
        );
        assert_eq!(p.seconds_left(now.timestamp()), 1);
        assert_eq!(p.length(), 31 * 86_400);
    }

    /// A billing period is used only while `now` is inside it.
    #[test]
    fn subscription_period_or_calendar() {
        let s = Utc
            .with_ymd_and_hms(2026, 11, 15, 0, 0, 0)
            .single()
            .expect("d");
        let e = Utc
            .with_ymd_and_hms(2026, 12, 15, 0, 0, 0)
            .single()
            .expect("d");
        let inside = Utc
            .with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
            .single()
            .expect("d");
        let after = Utc
            .with_ymd_and_hms(2026, 12, 20, 0, 0, 0)
            .single()
            .expect("d");
        assert_eq!(
            Period::current(Some(s), Some(e), inside).start,
            s.timestamp()
        );
        assert_eq!(
            Period::current(Some(s), Some(e), after),
            Period::calendar_month(after)
        );
        assert_eq!(
            Period::current(None, None, inside),
            Period::calendar_month(inside)
        );
    }
}
