//! Entitlement changes reach every instance within a second (Redis pub/sub), also after Redis
//! restarted under running instances.

use crate::support::*;
use std::time::{Duration, Instant};

/// Polls `path` for `customer` on `tg` until it answers `status`, for at most `within`.
async fn until_status(tg: &Tollgate, path: &str, customer: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = tg.get(path, Some(customer)).await.status().as_u16();
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{customer} on {path}: still {got}, want {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_other_instance_after_a_redis_restart() {
    let up = Upstream::start().await;
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let a = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url.clone());
    })
    .await;
    let b = Tollgate::start_with(&base_config(up.addr), Backend::Shared, Some(&a), |c| {
        c.storage.redis_url = Some(url.clone());
    })
    .await;

    // Before: an upgrade on A is seen by B (A's publisher is connected now).
    assert_eq!(
        a.put_customer("ann", serde_json::json!({"plan": "pro"}))
            .await
            .status(),
        200
    );
    until_status(&b, "/export/pdf", "ann", 200, Duration::from_secs(1)).await;

    redis.shutdown_save().await;
    redis.restart().await;
    // B's subscriber reconnects with backoff; give it time (it reloads everything on resubscribe,
    // so nothing before this point can tell whether A's publisher works again).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // After: a suspension on A must reach B within a second, not at the next full reload (60 s).
    assert_eq!(
        a.put_customer("ann", serde_json::json!({"plan": "pro", "suspended": true}))
            .await
            .status(),
        200
    );
    until_status(&b, "/export/pdf", "ann", 403, Duration::from_secs(1)).await;
}
