//! Lease mode (`quota_mode = "lease"`) on real Redis and Postgres: instances spend blocks of
//! units in process, and still never pass a `deny` cap by more than one lease per instance
//! (here: not at all), with one ledger row per admitted request and Redis equal to the ledger
//! once the leases are back.

use crate::support::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The standard config with the default plan (`free`) in lease mode: `included` units, denied
/// past them, leases of at most `lease_units`; `extra` adds plan keys.
fn leased(upstream: std::net::SocketAddr, included: u64, lease_units: u64, extra: &str) -> String {
    let from = "[plans.free]\ndefault = true\nrate_per_minute = 600\nquotas.api_calls = { included = 5, overage = \"deny\" }";
    let config = base_config(upstream);
    assert!(config.contains(from), "the standard free plan changed");
    config.replace(
        from,
        &format!(
            "[plans.free]\ndefault = true\nquota_mode = \"lease\"\nlease_units = {lease_units}\n{extra}quotas.api_calls = {{ included = {included}, overage = \"deny\" }}"
        ),
    )
}

/// 400 concurrent clients over two instances, each calling until it is refused, against
/// `included = 1000` with leases of 50: at most 1000 + one lease per instance admitted (the
/// cap holds exactly: a lease never takes units past it), one ledger row per admitted request,
/// and Redis equal to the ledger after both instances stopped (their leases given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_lease_mode_instances_stay_within_one_lease_each() {
    let up = Upstream::start().await;
    let config = leased(up.addr, 1000, 50, "");
    let mut a = Tollgate::start(&config, Backend::Shared).await;
    let mut b = Tollgate::start_with(&config, Backend::Shared, Some(&a), |_| {}).await;
    let admitted = Arc::new(AtomicUsize::new(0));
    let token = token("crowd");
    let mut tasks = Vec::new();
    for i in 0..400 {
        let tg = if i % 2 == 0 { &a } else { &b };
        let (client, url) = (tg.client.clone(), tg.url("/signals"));
        let (token, admitted) = (token.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let status = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                match status {
                    200 => admitted.fetch_add(1, Ordering::Relaxed),
                    429 => return,
                    other => panic!("unexpected status {other}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed) as i64;
    assert!(
        (900..=1000 + 2 * 50).contains(&admitted),
        "admitted {admitted}: at most the cap plus one lease per instance"
    );
    assert_eq!(up.hits() as i64, admitted);
    a.stop().await;
    b.stop().await;
    assert_eq!(a.ledger_usage("crowd").await, (admitted, admitted));
    assert_eq!(a.redis_used("crowd", "api_calls").await, Some(admitted));
}

/// A lease spends in process: while it is out, Redis holds the whole lease, the customer's own
/// view says what was spent, and a refund (upstream failure) goes back into the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_one_redis_call_for_many_requests() {
    let up = Upstream::start().await;
    let mut tg = Tollgate::start(&leased(up.addr, 1000, 100, ""), Backend::Shared).await;
    for _ in 0..5 {
        assert_eq!(tg.get("/signals", Some("solo")).await.status(), 200);
    }
    assert_eq!(tg.get("/fail", Some("solo")).await.status(), 500);
    assert_eq!(tg.redis_used("solo", "api_calls").await, Some(100));
    assert_eq!(
        tg.metric("tollgate_quota_lease_calls_total{call=\"take\"}")
            .await,
        1,
        "one Redis call for all six"
    );
    let usage: serde_json::Value = tg
        .get("/_tollgate/usage", Some("solo"))
        .await
        .json()
        .await
        .unwrap();
    let api_calls = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "api_calls")
        .unwrap();
    assert_eq!(api_calls["used"], 5, "{usage}");
    tg.stop().await;
    assert_eq!(tg.redis_used("solo", "api_calls").await, Some(5));
    assert_eq!(tg.ledger_usage("solo").await, (6, 5));
}

/// A live config change that lowers `included` below what is leased takes the lease back
/// within a second, and the next call is refused under the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_takes_leases_back_within_a_second() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&leased(up.addr, 1000, 100, ""), Backend::Shared).await;
    for _ in 0..5 {
        assert_eq!(tg.get("/signals", Some("idle")).await.status(), 200);
    }
    assert_eq!(tg.redis_used("idle", "api_calls").await, Some(100));
    let r = tg
        .client
        .patch(tg.admin_url("/admin/plans/free"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"quotas": {"api_calls": {"included": 3}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let changed = Instant::now();
    while tg.redis_used("idle", "api_calls").await != Some(5) {
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "lease still out after 1 s: {:?}",
            tg.redis_used("idle", "api_calls").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tg.get("/signals", Some("idle")).await.status(), 429);
}

/// Redis goes away: the open lease keeps serving until it is spent, then the plan's fail mode
/// applies (closed here: 503). Once Redis is back, a new lease serves, and after the stop Redis
/// equals the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_lease_serves_through_a_redis_outage_until_spent() {
    let up = Upstream::start().await;
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let config = leased(up.addr, 1000, 10, "fail_mode = \"closed\"\n");
    let mut tg = Tollgate::start_with(&config, Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
        c.storage.redis_timeout = Duration::from_millis(200);
    })
    .await;
    let key = {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        format!("{}:{{out}}:q:api_calls:{}", tg.prefix, period.start)
    };
    assert_eq!(tg.get("/signals", Some("out")).await.status(), 200);
    assert_eq!(redis.get(&key).await, Some(10));
    redis.shutdown_save().await;
    for i in 0..9 {
        assert_eq!(
            tg.get("/signals", Some("out")).await.status(),
            200,
            "call {i} of the open lease"
        );
    }
    let (status, ty, _) = problem(tg.get("/signals", Some("out")).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (503, "urn:tollgate:problem:quota-store-unavailable")
    );
    assert_eq!(up.hits(), 10);
    redis.restart().await;
    let back = Instant::now();
    while tg.get("/signals", Some("out")).await.status() != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "no lease after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tg.stop().await;
    assert_eq!(tg.ledger_usage("out").await, (11, 11));
    assert_eq!(redis.get(&key).await, Some(11));
}
