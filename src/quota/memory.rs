//! In-process quota store: the embedded default (one instance, no Redis) and the local counter
//! fail-open plans fall back to while Redis is unreachable.
//!
//! Exactness comes from checking and charging under the counter's shard lock; per-minute rates use
//! governor's GCRA, one keyed limiter per distinct (rate, burst).

use super::{Check, Period, QuotaError, QuotaStore, Verdict};
use crate::config::Rate;
use async_trait::async_trait;
use dashmap::DashMap;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;

#[derive(Default)]
pub struct MemoryStore {
    /// `customer \0 meter \0 period_start` → units used.
    counters: DashMap<String, u64>,
    limiters: DashMap<Rate, Arc<DefaultKeyedRateLimiter<String>>>,
}

fn key(customer: &str, meter: &str, period: Period) -> String {
    let mut k = String::with_capacity(customer.len() + meter.len() + 24);
    k.push_str(customer);
    k.push('\0');
    k.push_str(meter);
    k.push('\0');
    k.push_str(&period.start.to_string());
    k
}

// === impl MemoryStore ===

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn limiter(&self, rate: Rate) -> Arc<DefaultKeyedRateLimiter<String>> {
        if let Some(l) = self.limiters.get(&rate) {
            return l.clone();
        }
        let per_minute = NonZeroU32::new(rate.per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        self.limiters
            .entry(rate)
            .or_insert_with(|| Arc::new(DefaultKeyedRateLimiter::keyed(quota)))
            .clone()
    }

    /// Drops counters of periods that ended before `now` (unix seconds).
    pub fn sweep(&self, now: i64, period_end: impl Fn(&str) -> Option<i64>) {
        self.counters
            .retain(|k, _| period_end(k).is_none_or(|end| end > now));
        for l in self.limiters.iter() {
            l.retain_recent();
        }
    }
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, c: &Check<'_>) -> Result<Verdict, QuotaError> {
        if let Some(rate) = c.rate {
            let limiter = self.limiter(rate);
            if let Err(not_until) = limiter.check_key(&c.customer.to_string()) {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                return Ok(Verdict::RateLimited {
                    retry_after_ms: wait.as_millis().max(1) as u64,
                });
            }
        }
        let mut used = self
            .counters
            .entry(key(c.customer, c.meter, c.period))
            .or_insert(0);
        if let Some(cap) = c.cap {
            if used.saturating_add(c.cost) > cap {
                return Ok(Verdict::OverQuota { used: *used });
            }
        }
        *used = used.saturating_add(c.cost);
        Ok(Verdict::Granted { used: *used })
    }

    async fn adjust(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        delta: i64,
    ) -> Result<u64, QuotaError> {
        let mut used = self
            .counters
            .entry(key(customer, meter, period))
            .or_insert(0);
        *used = used.saturating_add_signed(delta);
        Ok(*used)
    }

    async fn used(&self, customer: &str, meter: &str, period: Period) -> Result<u64, QuotaError> {
        Ok(self
            .counters
            .get(&key(customer, meter, period))
            .map_or(0, |v| *v))
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

    /// A cost that does not fit is refused whole; refunds lower the counter but never below 0.
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
        assert_eq!(s.adjust("c", "m", P, -3).await.expect("a"), 0);
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
