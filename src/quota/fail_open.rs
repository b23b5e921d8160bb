//! Fail-open that cannot hand out a new quota. While Redis is unreachable, a fail-open plan
//! counts in the local fallback; for a capped (`deny`) quota this module decides how much the
//! fallback may grant: a share of what was left when this instance last heard from Redis.
//!
//! - [`LastSeen`]: the counter value Redis last answered for each (customer, meter, period) of a
//!   capped, fail-open quota, recorded on every reservation. A customer this instance never saw
//!   this period starts from the ledger's units (bounded wait), else from 0.
//! - the allowance: `floor(left × share)` where `left = cap − last seen` and the share is the
//!   plan's `fail_open_allowance`, by default `1 / instances` (instances subscribed to the config
//!   broadcast, counted while Redis answered). Nothing left: nothing granted.
//!
//! What the fallback grants is folded into Redis on recovery as before (`maintain`), and added
//! to the last-seen value then, so a flapping Redis cannot reset the allowance.
//!
//! Owns: the last-seen map (bounded: the coldest customers are dropped past 200,000), the
//! instance count, the allowance arithmetic. Must not touch:
//! reservations themselves (the caller passes the capped check to the fallback).

use super::{seed_of, Check, CounterSeed, Period};
use quick_cache::sync::Cache;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a fallback reservation waits for the ledger for a customer it never saw.
const SEED_WAIT: Duration = Duration::from_millis(250);

/// A plan's share of the remaining units that one instance may grant while Redis is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// `1 / instances` (the default).
    PerInstance,
    /// A fixed share, in thousandths (0–1000).
    PerMille(u32),
}

/// One counter value as last answered by Redis.
#[derive(Debug, Clone)]
struct Seen {
    meter: Box<str>,
    period: Period,
    used: u64,
}

/// Customers whose last-seen counters are kept: bounded, so a million distinct callers do not
/// grow the process. One evicted (the coldest) starts from the ledger in an outage, as a
/// customer never seen does.
const SEEN_MAX_CUSTOMERS: usize = 200_000;

pub struct FailOpen {
    /// customer → the counters seen for it (a handful of meters; searched linearly).
    seen: Cache<Box<str>, Arc<Mutex<Vec<Seen>>>>,
    /// Instances sharing Redis, as last counted (0: not counted yet, taken as 1).
    instances: AtomicU32,
    seed: Option<Arc<dyn CounterSeed>>,
}

fn lock(list: &Mutex<Vec<Seen>>) -> std::sync::MutexGuard<'_, Vec<Seen>> {
    list.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl FailOpen ===

impl FailOpen {
    pub fn new(seed: Option<Arc<dyn CounterSeed>>) -> FailOpen {
        FailOpen {
            seen: Cache::new(SEEN_MAX_CUSTOMERS),
            instances: AtomicU32::new(0),
            seed,
        }
    }

    /// Records what Redis answered for a capped counter. Allocates only for a new customer or
    /// meter.
    pub fn record(&self, customer: &str, meter: &str, period: Period, used: u64) {
        let seen = Seen {
            meter: meter.into(),
            period,
            used,
        };
        let Some(list) = self.seen.get(customer) else {
            self.seen
                .insert(customer.into(), Arc::new(Mutex::new(vec![seen])));
            return;
        };
        let mut list = lock(&list);
        match list.iter_mut().find(|s| &*s.meter == meter) {
            Some(s) if s.period == period => s.used = used,
            Some(s) if period.start >= s.period.start => *s = seen,
            Some(_) => {}
            None => list.push(seen),
        }
    }

    /// Adds units folded into Redis from the fallback to what was last seen.
    pub fn add(&self, customer: &str, meter: &str, period: Period, units: i64) {
        if let Some(list) = self.seen.get(customer) {
            if let Some(s) = lock(&list)
                .iter_mut()
                .find(|s| &*s.meter == meter && s.period == period)
            {
                s.used = s.used.saturating_add_signed(units);
            }
        }
    }

    fn last_seen(&self, customer: &str, meter: &str, period: Period) -> Option<u64> {
        let list = self.seen.get(customer)?;
        let found = lock(&list)
            .iter()
            .find(|s| &*s.meter == meter && s.period == period)
            .map(|s| s.used);
        found
    }

    /// Sets the instance count (from the broadcast census).
    pub fn set_instances(&self, n: u32) {
        self.instances.store(n, Ordering::Relaxed);
    }

    pub fn instances(&self) -> u32 {
        self.instances.load(Ordering::Relaxed).max(1)
    }

    /// The check the fallback may grant for a capped quota: its cap becomes the allowance (the
    /// fallback counts only what it granted). Also returns the base the fallback's totals sit
    /// on (for `used` in answers). An uncapped check passes unchanged (base 0).
    pub async fn limit<'a>(&self, check: &Check<'a>, allowance: Allowance) -> (Check<'a>, u64) {
        let Some(cap) = check.cap else {
            return (*check, 0);
        };
        let base = match self.last_seen(check.customer, check.meter, check.period) {
            Some(u) => u,
            None => {
                let units = match &self.seed {
                    Some(seed) => tokio::time::timeout(
                        SEED_WAIT,
                        seed_of(seed.as_ref(), check.customer, check.meter, check.period),
                    )
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0),
                    None => 0,
                };
                // Fixed for the outage: the ledger grows by what the fallback itself grants,
                // which its own counter already holds.
                self.record(check.customer, check.meter, check.period, units);
                units
            }
        };
        let left = cap.saturating_sub(base);
        let allowed = match allowance {
            Allowance::PerInstance => left / u64::from(self.instances()),
            Allowance::PerMille(m) => {
                // left × m / 1000 without overflow: split left into quotient and remainder.
                let m = u64::from(m.min(1000));
                (left / 1000) * m + (left % 1000) * m / 1000
            }
        };
        (
            Check {
                cap: Some(allowed),
                ..*check
            },
            base,
        )
    }

    /// Forgets counters of periods that ended before `now` (unix seconds).
    pub fn sweep(&self, now: i64) {
        self.seen.retain(|_, list| {
            let mut list = lock(list);
            list.retain(|s| s.period.end > now);
            !list.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Period = Period {
        start: 1_000,
        end: 2_000,
    };

    fn check(cap: Option<u64>) -> Check<'static> {
        Check {
            customer: "c",
            meter: "m",
            period: P,
            cost: 1,
            cap,
            rate: None,
            record: None,
            lease: None,
        }
    }

    /// An exhausted customer gets nothing; one with units left gets its share of them.
    #[tokio::test]
    async fn allowance_is_a_share_of_what_was_left() {
        let f = FailOpen::new(None);
        f.record("c", "m", P, 100);
        let (c, base) = f.limit(&check(Some(100)), Allowance::PerInstance).await;
        assert_eq!((c.cap, base), (Some(0), 100));
        f.record("c", "m", P, 40);
        f.set_instances(3);
        let (c, _) = f.limit(&check(Some(100)), Allowance::PerInstance).await;
        assert_eq!(c.cap, Some(20));
        let (c, _) = f.limit(&check(Some(100)), Allowance::PerMille(500)).await;
        assert_eq!(c.cap, Some(30));
        // No cap: unchanged.
        let (c, base) = f.limit(&check(None), Allowance::PerInstance).await;
        assert_eq!((c.cap, base), (None, 0));
    }

    /// Units folded from the fallback count as seen: a second outage cannot grant them again.
    #[tokio::test]
    async fn folded_units_count_as_seen() {
        let f = FailOpen::new(None);
        f.record("c", "m", P, 90);
        f.add("c", "m", P, 10);
        let (c, _) = f.limit(&check(Some(100)), Allowance::PerMille(1000)).await;
        assert_eq!(c.cap, Some(0));
    }

    /// A customer never seen starts from the ledger's units.
    #[tokio::test]
    async fn unseen_customer_starts_from_the_ledger() {
        let f = FailOpen::new(Some(Arc::new(crate::quota::tests::FixedSeed::new(95))));
        let (c, base) = f.limit(&check(Some(100)), Allowance::PerMille(1000)).await;
        assert_eq!((c.cap, base), (Some(5), 95));
    }

    /// A million distinct customers do not grow the map past its bound; recent ones stay.
    #[test]
    fn the_last_seen_map_is_bounded() {
        let f = FailOpen::new(None);
        for i in 0..(SEEN_MAX_CUSTOMERS + 100_000) {
            f.record(&format!("c{i}"), "m", P, 1);
        }
        assert!(f.seen.len() <= SEEN_MAX_CUSTOMERS, "{}", f.seen.len());
        let last = format!("c{}", SEEN_MAX_CUSTOMERS + 99_999);
        assert_eq!(f.last_seen(&last, "m", P), Some(1));
    }

    /// A later period replaces an older one; ended periods are swept.
    #[test]
    fn periods_roll_and_sweep() {
        let f = FailOpen::new(None);
        f.record("c", "m", P, 90);
        let next = Period {
            start: 2_000,
            end: 3_000,
        };
        f.record("c", "m", next, 3);
        assert_eq!(f.last_seen("c", "m", next), Some(3));
        assert_eq!(f.last_seen("c", "m", P), None);
        f.sweep(3_000);
        assert_eq!(f.last_seen("c", "m", next), None);
    }
}
