//! Counter upkeep, off the request path: folds what fail-open plans counted locally during a
//! Redis outage into Redis once it answers again (checked every second, so within seconds of
//! recovery), and drops counters of ended periods and idle rate-limit state once a minute.
//! Without Redis the in-process store is the primary and is only swept.
//!
//! Runs on the control runtime. Must not touch: reservations in flight (it only adds what the
//! fallback already granted).

use super::fail_open::FailOpen;
use super::memory::MemoryStore;
use super::QuotaStore;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs until `cancel`. `also_sweep` runs with the minute sweep (other per-customer limiters
/// that forget idle customers, e.g. the self-service read limit).
pub async fn run(
    local: Arc<MemoryStore>,
    redis: Option<Arc<dyn QuotaStore>>,
    fail_open: Arc<FailOpen>,
    also_sweep: impl Fn() + Send,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if let Some(redis) = &redis {
            if !local.is_empty() && redis.ping().await.is_ok() {
                fold(&local, redis.as_ref(), &fail_open).await;
            }
        }
        if ticks.is_multiple_of(60) {
            let now = chrono::Utc::now().timestamp();
            local.sweep(now);
            fail_open.sweep(now);
            also_sweep();
        }
    }
}

/// Moves every local count into Redis; what fails to move stays local for the next round.
async fn fold(local: &MemoryStore, redis: &dyn QuotaStore, fail_open: &FailOpen) {
    let mut failed = Vec::new();
    let mut folded = 0usize;
    for d in local.drain() {
        match redis.adjust(&d.customer, &d.meter, d.period, d.units).await {
            Ok(_) => {
                fail_open.add(&d.customer, &d.meter, d.period, d.units);
                folded += 1;
            }
            Err(_) => failed.push(d),
        }
    }
    if !failed.is_empty() {
        local.restore(failed);
    }
    if folded > 0 {
        tracing::info!(counters = folded, "folded fail-open counts into Redis");
    }
}
