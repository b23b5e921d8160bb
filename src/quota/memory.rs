//! In-process quota store: the embedded default (one instance, no Redis) and the local counter
//! fail-open plans fall back to while Redis is unreachable.
//!
//! Exactness comes from checking and charging under the counter's shard lock; per-minute rates use
//! governor's GCRA, one keyed limiter per distinct (rate, burst).

use super::{seed_of, Check, CounterSeed, Period, QuotaError, QuotaStore, Verdict};
use crate::config::Rate;
use crate::journal::Journal;
use async_trait::async_trait;
use dashmap::DashMap;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;

#[derive(Default)]
pub struct MemoryStore {
    /// `customer \0 meter \0 period_start` → counter.
    counters: DashMap<String, Counter>,
    limiters: Limiters,
    /// Where an absent counter starts from (the ledger) when this is the embedded primary; the
    /// fail-open fallback has none (it counts only what it granted, to fold it into Redis).
    seed: Option<Arc<dyn CounterSeed>>,
    /// Where each grant is written before it is answered (its counter dies with the process;
    /// the charge must not).
    journal: Option<Arc<Journal>>,
}

/// Units used in one period. Signed: as a fail-open fallback, a refund that arrives after the
/// counts were folded into Redis must travel there as a negative delta.
#[derive(Debug, Clone, Copy)]
struct Counter {
    used: i64,
    period: Period,
}

/// Counts taken out of the store by [`MemoryStore::drain`], to be folded elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    pub customer: String,
    pub meter: String,
    pub period: Period,
    pub units: i64,
}

/// Per-minute rate limits in process: governor's GCRA, one keyed limiter per distinct
/// (rate, burst), keyed by customer.
#[derive(Default)]
pub(crate) struct Limiters {
    by_rate: DashMap<Rate, Arc<DefaultKeyedRateLimiter<String>>>,
}

impl Limiters {
    /// `None` when `customer` may go ahead (and is counted); else the milliseconds to wait.
    pub(crate) fn check(&self, rate: Rate, customer: &str) -> Option<u64> {
        let limiter = self.limiter(rate);
        let not_until = limiter.check_key(&customer.to_string()).err()?;
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        Some(wait.as_millis().max(1) as u64)
    }

    fn limiter(&self, rate: Rate) -> Arc<DefaultKeyedRateLimiter<String>> {
        if let Some(l) = self.by_rate.get(&rate) {
            return l.clone();
        }
        let per_minute = NonZeroU32::new(rate.per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        self.by_rate
            .entry(rate)
            .or_insert_with(|| Arc::new(DefaultKeyedRateLimiter::keyed(quota)))
            .clone()
    }

    /// Forgets idle customers' state.
    pub(crate) fn sweep(&self) {
        for l in self.by_rate.iter() {
            l.retain_recent();
        }
    }
}

pub(crate) fn key(customer: &str, meter: &str, period: Period) -> String {
    let mut k = String::with_capacity(customer.len() + meter.len() + 24);
    k.push_str(customer);
    k.push('\0');
    k.push_str(meter);
    k.push('\0');
    k.push_str(itoa::Buffer::new().format(period.start));
    k
}

/// Counters outlive their period briefly so late refunds still find them.
const SWEEP_SLACK_SECS: i64 = 3600;

// === impl MemoryStore ===

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// The embedded primary: counters it does not hold (after a restart) start from `seed`.
    pub fn with_seed(seed: Arc<dyn CounterSeed>) -> MemoryStore {
        MemoryStore {
            seed: Some(seed),
            ..MemoryStore::default()
        }
    }

    /// Grants are journaled in `journal` (before they are answered).
    pub fn with_journal(mut self, journal: Arc<Journal>) -> MemoryStore {
        self.journal = Some(journal);
        self
    }

    /// With a seed, makes sure the counter of `k` exists, starting from the seed (a counter
    /// that appeared meanwhile is kept). A failed seed starts it from 0, as without one.
    async fn ensure_seeded(&self, k: &str, customer: &str, meter: &str, period: Period) {
        let Some(seed) = &self.seed else {
            return;
        };
        if self.counters.contains_key(k) {
            return;
        }
        let units = seed_of(seed.as_ref(), customer, meter, period)
            .await
            .unwrap_or(0);
        self.counters.entry(k.to_string()).or_insert(Counter {
            used: i64::try_from(units).unwrap_or(i64::MAX),
            period,
        });
    }

    /// Drops counters of periods that ended (plus slack) before `now` (unix seconds), and idle
    /// rate-limiter state.
    pub fn sweep(&self, now: i64) {
        self.counters
            .retain(|_, c| c.period.end + SWEEP_SLACK_SECS > now);
        self.limiters.sweep();
    }

    /// Takes every non-zero counter out (fail-open fallback → Redis on recovery). A reservation
    /// racing with the drain lands in a fresh counter and is taken by the next drain.
    pub fn drain(&self) -> Vec<Drained> {
        let keys: Vec<String> = self.counters.iter().map(|e| e.key().clone()).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some((k, c)) = self.counters.remove(&k) {
                let mut parts = k.splitn(3, '\0');
                let (Some(customer), Some(meter)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if c.used != 0 {
                    out.push(Drained {
                        customer: customer.to_string(),
                        meter: meter.to_string(),
                        period: c.period,
                        units: c.used,
                    });
                }
            }
        }
        out
    }

    /// Puts drained counts back (their fold failed).
    pub fn restore(&self, items: Vec<Drained>) {
        for d in items {
            let mut c = self
                .counters
                .entry(key(&d.customer, &d.meter, d.period))
                .or_insert(Counter {
                    used: 0,
                    period: d.period,
                });
            c.used = c.used.saturating_add(d.units);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// Takes one counter out (its units, when it held any).
    pub fn take(&self, customer: &str, meter: &str, period: Period) -> Option<i64> {
        self.counters
            .remove(&key(customer, meter, period))
            .map(|(_, c)| c.used)
            .filter(|u| *u != 0)
    }
}

fn clamp(v: i64) -> u64 {
    v.max(0) as u64
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, c: &Check<'_>) -> Result<Verdict, QuotaError> {
        if let Some(rate) = c.rate {
            if let Some(retry_after_ms) = self.limiters.check(rate, c.customer) {
                return Ok(Verdict::RateLimited { retry_after_ms });
            }
        }
        let k = key(c.customer, c.meter, c.period);
        // One lookup when the counter exists (every call but a period's first).
        let mut counter = match self.counters.get_mut(&k) {
            Some(counter) => counter,
            None => {
                self.ensure_seeded(&k, c.customer, c.meter, c.period).await;
                self.counters.entry(k).or_insert(Counter {
                    used: 0,
                    period: c.period,
                })
            }
        };
        let used = clamp(counter.used);
        if let Some(cap) = c.cap {
            if used.saturating_add(c.cost) > cap {
                return Ok(Verdict::OverQuota { used });
            }
        }
        counter.used = counter
            .used
            .saturating_add(c.cost.min(i64::MAX as u64) as i64);
        let used = clamp(counter.used);
        drop(counter); // the journal write happens outside the shard lock
        if let (Some(journal), Some(line)) = (&self.journal, c.record) {
            journal.granted(line);
        }
        Ok(Verdict::Granted { used })
    }

    async fn adjust(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        delta: i64,
    ) -> Result<u64, QuotaError> {
        let k = key(customer, meter, period);
        if self.seed.is_some() && !self.counters.contains_key(&k) {
            // Left for the seed (see `CounterSeed`): the ledger has what this adjusts.
            return Ok(0);
        }
        let mut counter = self
            .counters
            .entry(k)
            .or_insert(Counter { used: 0, period });
        counter.used = counter.used.saturating_add(delta);
        Ok(clamp(counter.used))
    }

    /// With a seed, an absent counter is seeded first: after a restart, the operator's and the
    /// customer's views show the ledger's units, not 0.
    async fn used(&self, customer: &str, meter: &str, period: Period) -> Result<u64, QuotaError> {
        let k = key(customer, meter, period);
        self.ensure_seeded(&k, customer, meter, period).await;
        Ok(self.counters.get(&k).map_or(0, |c| clamp(c.used)))
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Period = Period { start: 0, end: 100 };

    fn check(cost: u64, cap: Option<u64>, rate: Option<Rate>) -> Check<'static> {
        Check {
            customer: "c",
            meter: "m",
            period: P,
            cost,
            cap,
            rate,
            record: None,
            lease: None,
        }
    }

    /// 1,000 concurrent single-unit reservations against a cap of 50 grant exactly 50.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_overshoot() {
        let store = Arc::new(MemoryStore::new());
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.reserve(&check(1, Some(50), None)).await
            }));
        }
        let mut granted = 0;
        for t in tasks {
            if matches!(
                t.await.expect("join").expect("reserve"),
                Verdict::Granted { .. }
            ) {
                granted += 1;
            }
        }
        assert_eq!(granted, 50);
        assert_eq!(store.used("c", "m", P).await.expect("used"), 50);
    }

    /// A cost that does not fit is refused whole; a refund lowers the counter.
    #[tokio::test]
    async fn cost_weights_and_refunds() {
        let s = MemoryStore::new();
        assert_eq!(
            s.reserve(&check(3, Some(5), None)).await.expect("r"),
            Verdict::Granted { used: 3 }
        );
        assert_eq!(
            s.reserve(&check(3, Some(5), None)).await.expect("r"),
            Verdict::OverQuota { used: 3 }
        );
        assert_eq!(s.adjust("c", "m", P, -3).await.expect("a"), 0);
        assert_eq!(s.used("c", "m", P).await.expect("u"), 0);
    }

    /// After a restart the ledger says 4 units were used: the first reservation starts the
    /// counter there (asked once), and an adjustment before it leaves the counter to the seed.
    #[tokio::test]
    async fn absent_counter_starts_from_the_seed() {
        let seed = Arc::new(super::super::tests::FixedSeed::new(4));
        let s = MemoryStore::with_seed(seed.clone());
        assert_eq!(s.adjust("c", "m", P, 2).await.expect("a"), 0);
        assert_eq!(
            s.reserve(&check(1, Some(5), None)).await.expect("r"),
            Verdict::Granted { used: 5 }
        );
        assert_eq!(
            s.reserve(&check(1, Some(5), None)).await.expect("r"),
            Verdict::OverQuota { used: 5 }
        );
        assert_eq!(seed.calls(), 1);
    }

    /// After a restart, a read (the operator's or the customer's view) shows the ledger's units,
    /// and the reservation after it counts on top without asking the ledger again.
    #[tokio::test]
    async fn a_read_seeds_an_absent_counter() {
        let seed = Arc::new(super::super::tests::FixedSeed::new(4));
        let s = MemoryStore::with_seed(seed.clone());
        assert_eq!(s.used("c", "m", P).await.expect("u"), 4);
        assert_eq!(
            s.reserve(&check(1, Some(5), None)).await.expect("r"),
            Verdict::Granted { used: 5 }
        );
        assert_eq!(seed.calls(), 1);
    }

    /// The burst passes at once, the next call is rate limited with a retry hint, quota untouched.
    #[tokio::test]
    async fn rate_limit_before_quota() {
        let s = MemoryStore::new();
        let rate = Some(Rate {
            per_minute: 60,
            burst: 2,
        });
        assert!(matches!(
            s.reserve(&check(1, None, rate)).await.expect("r"),
            Verdict::Granted { .. }
        ));
        assert!(matches!(
            s.reserve(&check(1, None, rate)).await.expect("r"),
            Verdict::Granted { .. }
        ));
        match s.reserve(&check(1, None, rate)).await.expect("r") {
            Verdict::RateLimited { retry_after_ms } => {
                assert!((1..=1000).contains(&retry_after_ms))
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        assert_eq!(s.used("c", "m", P).await.expect("u"), 2);
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    /// Draining takes every count out once (refunds after a drain travel as negative deltas),
    /// and restoring puts them back.
    #[tokio::test]
    async fn drain_and_restore() {
        let s = MemoryStore::new();
        let p = Period { start: 0, end: 100 };
        let c = Check {
            customer: "a",
            meter: "m",
            period: p,
            cost: 3,
            cap: None,
            rate: None,
            record: None,
            lease: None,
        };
        s.reserve(&c).await.expect("reserve");
        let d = s.drain();
        assert_eq!(
            d,
            vec![Drained {
                customer: "a".into(),
                meter: "m".into(),
                period: p,
                units: 3
            }]
        );
        assert!(s.drain().is_empty());
        s.adjust("a", "m", p, -3).await.expect("refund after drain");
        assert_eq!(s.drain()[0].units, -3);
        s.restore(d);
        assert_eq!(s.used("a", "m", p).await.expect("used"), 3);
        s.sweep(100 + SWEEP_SLACK_SECS);
        assert!(s.is_empty());
    }
}
