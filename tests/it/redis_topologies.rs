//! Redis topologies beyond the single shared server: outages (a fail-open plan keeps serving
//! from local counters, and what it counted is folded into Redis within seconds of recovery, so
//! the outage gives nothing away for free) and Redis Cluster.

use crate::support::*;
use std::time::{Duration, Instant};

/// Redis stops (saving its data), three calls are served and counted locally, Redis comes back:
/// within 5 s its counter holds the call before the outage plus the three during it, and the
/// ledger has all four rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_counts_are_folded_into_redis_after_recovery() {
    let mut redis = PrivateRedis::start().await;
    let up = Upstream::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
        c.storage.redis_timeout = Duration::from_millis(200);
    })
    .await;
    let key = {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        format!("{}:{{fo}}:q:api_calls:{}", tg.prefix, period.start)
    };
    assert_eq!(tg.get("/signals", Some("fo")).await.status(), 200);
    assert_eq!(redis.get(&key).await, Some(1));

    redis.shutdown_save().await;
    for _ in 0..3 {
        assert_eq!(
            tg.get("/signals", Some("fo")).await.status(),
            200,
            "fail-open plan serves during the outage"
        );
    }
    redis.restart().await;
    let back = Instant::now();
    loop {
        if redis.get(&key).await == Some(4) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not folded within 5 s: {:?}",
            redis.get(&key).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tg.wait_ledger("fo", 4).await, (4, 4));
    assert_eq!(up.hits(), 4);
}

/// On a real three-node Redis Cluster, quotas are exact per customer (each customer's keys share
/// a hash slot, so the Lua reservation runs on one node) and customers spread over the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_are_exact_on_redis_cluster() {
    let cluster = PrivateCluster::start().await;
    let up = Upstream::start().await;
    let url = cluster.url();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
        c.storage.redis_cluster = true;
    })
    .await;
    for i in 0..12 {
        let customer = format!("cust-{i}");
        for call in 0..6 {
            let want = if call < 5 { 200 } else { 429 };
            assert_eq!(
                tg.get("/signals", Some(&customer)).await.status(),
                want,
                "{customer} call {call}"
            );
        }
    }
    let per_node = cluster.keys_per_node().await;
    assert_eq!(
        per_node.iter().sum::<i64>(),
        12 * 2,
        "a quota counter and a rate key per customer: {per_node:?}"
    );
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "customers spread over nodes: {per_node:?}"
    );
    assert_eq!(up.hits(), 60);
}

/// Redis restarts (its data saved): the admin listener's first read of a customer after it is
/// back answers 200 with the counter, not 503 from the connection that broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_admin_read_after_a_redis_restart_answers() {
    let mut redis = PrivateRedis::start().await;
    let up = Upstream::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
    })
    .await;
    assert_eq!(tg.get("/signals", Some("rr")).await.status(), 200);
    let read = || async {
        tg.client
            .get(tg.admin_url("/admin/customers/rr"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(
        read().await.status(),
        200,
        "connects the admin side's handle"
    );

    redis.shutdown_save().await;
    redis.restart().await;
    let r = read().await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let used = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "api_calls")
        .map(|m| m["used"].clone());
    assert_eq!(used, Some(serde_json::json!(1)), "{body}");
}

/// Redis loses every key (`FLUSHALL`: a restart without persistence, eviction): the next call of
/// a customer who used up the free plan's 5 calls is still refused, because the counter is
/// rebuilt from the ledger's 5 rows before the reservation; one with 2 calls left gets exactly 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_lost_by_redis_are_rebuilt_from_the_ledger() {
    let redis = PrivateRedis::start().await;
    let up = Upstream::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
    })
    .await;
    let key = |customer: &str| {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        format!("{}:{{{customer}}}:q:api_calls:{}", tg.prefix, period.start)
    };
    for _ in 0..5 {
        assert_eq!(tg.get("/signals", Some("full")).await.status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(tg.get("/signals", Some("part")).await.status(), 200);
    }
    assert_eq!(tg.wait_ledger("full", 5).await, (5, 5));
    assert_eq!(tg.wait_ledger("part", 3).await, (3, 3));

    let c = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(redis.get(&key("full")).await, None);

    let (status, ty, _) = problem(tg.get("/signals", Some("full")).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (429, "urn:tollgate:problem:quota-exceeded")
    );
    assert_eq!(redis.get(&key("full")).await, Some(5));
    for _ in 0..2 {
        assert_eq!(tg.get("/signals", Some("part")).await.status(), 200);
    }
    assert_eq!(tg.get("/signals", Some("part")).await.status(), 429);
    assert_eq!(redis.get(&key("part")).await, Some(5));
    assert_eq!(tg.wait_ledger("part", 5).await, (5, 5));
    assert_eq!(up.hits(), 10);
}
