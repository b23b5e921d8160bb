//! Exactness under concurrency: quotas never overshoot, with one instance or with two instances
//! sharing Redis and Postgres.

use crate::support::*;

/// Config with one route and a default plan of exactly 50 units, no rate limit.
fn fifty(upstream: std::net::SocketAddr) -> String {
    base_config(upstream)
        .replace(
            "quotas.api_calls = { included = 5, overage = \"deny\" }",
            "quotas.api_calls = { included = 50, overage = \"deny\" }",
        )
        .replace("rate_per_minute = 600\n", "")
}

/// Fires `n` parallel requests for one customer, spread over `instances`; returns (200s, 429s).
async fn fire(instances: &[&Tollgate], n: usize, customer: &str) -> (usize, usize) {
    let token = token(customer);
    let mut tasks = Vec::new();
    for i in 0..n {
        let tg = instances[i % instances.len()];
        let url = tg.url("/signals");
        let client = tg.client.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, limited)
}

/// 200 parallel requests through two proxy instances sharing Redis and Postgres against
/// `included = 50`: exactly 50 admitted, 50 ledger rows, Redis says 50, upstream saw 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_exact_quota() {
    let up = Upstream::start().await;
    let config = fifty(up.addr);
    let a = Tollgate::start(&config, Backend::Shared).await;
    let b = Tollgate::start_with(&config, Backend::Shared, Some(&a), |_| {}).await;
    let (ok, limited) = fire(&[&a, &b], 200, "crowd").await;
    assert_eq!((ok, limited), (50, 150));
    assert_eq!(up.hits(), 50);
    assert_eq!(a.redis_used("crowd", "api_calls").await, Some(50));
    assert_eq!(a.wait_ledger("crowd", 50).await, (50, 50));
}

/// The same on the embedded store: one instance, 200 parallel requests, exactly 50 admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_quota_is_exact() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&fifty(up.addr), Backend::Embedded).await;
    let (ok, limited) = fire(&[&tg], 200, "crowd").await;
    assert_eq!((ok, limited), (50, 150));
    assert_eq!(up.hits(), 50);
    assert_eq!(tg.wait_ledger("crowd", 50).await, (50, 50));
}

/// An entitlement change made through one instance's admin API decides the other instance's
/// next requests within a second (Redis pub/sub, ledger as the truth).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlement_change_reaches_the_other_instance_within_a_second() {
    let up = Upstream::start().await;
    let config = base_config(up.addr);
    let a = Tollgate::start(&config, Backend::Shared).await;
    let b = Tollgate::start_with(&config, Backend::Shared, Some(&a), |_| {}).await;
    assert_eq!(b.get("/export/pdf", Some("upgrader")).await.status(), 403);
    assert_eq!(
        a.put_customer("upgrader", serde_json::json!({"plan": "pro"}))
            .await
            .status(),
        200
    );
    let changed = std::time::Instant::now();
    loop {
        let status = b.get("/export/pdf", Some("upgrader")).await.status();
        if status == 200 {
            break;
        }
        assert!(
            changed.elapsed() < std::time::Duration::from_secs(1),
            "instance b still answers {status} after 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
