//! Faults of the parts tollgate stands on, seen from outside: a ledger that refuses writes, and
//! what the operator's metrics say meanwhile.

use crate::support::*;
use std::time::{Duration, Instant};

/// `tollgate_usage_events_total{outcome="spooled"}` and `tollgate_usage_spool_bytes` as scraped.
async fn spool_metrics(tg: &Tollgate) -> (i64, i64) {
    (
        tg.metric("tollgate_usage_events_total{outcome=\"spooled\"}")
            .await,
        tg.metric("tollgate_usage_spool_bytes").await,
    )
}

/// While Postgres refuses every usage insert, the calls are still served and their events wait
/// on disk: the spooled count and the spool's bytes say so. Once inserts work again the spool
/// is replayed into the ledger (every call once) and its bytes drop to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_refusing_inserts_spools_and_the_metrics_say_so() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Shared).await;
    assert_eq!(tg.get("/signals", Some("sp")).await.status(), 200);
    assert_eq!(tg.wait_ledger("sp", 1).await, (1, 1));
    assert_eq!(spool_metrics(&tg).await, (0, 0));

    let pg = tg.pg().await;
    sqlx::query(
        "ALTER TABLE usage_events ADD CONSTRAINT test_refuses_inserts CHECK (units < 0) NOT VALID",
    )
    .execute(&pg)
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(tg.get("/signals", Some("sp")).await.status(), 200);
    }
    let start = Instant::now();
    let (spooled, bytes) = loop {
        let m = spool_metrics(&tg).await;
        if m.0 >= 3 || start.elapsed() > Duration::from_secs(10) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(spooled, 3, "the three events of the outage are on disk");
    assert!(bytes > 0, "the spool holds them: {bytes} bytes");
    assert_eq!(tg.ledger_usage("sp").await, (1, 1));

    sqlx::query("ALTER TABLE usage_events DROP CONSTRAINT test_refuses_inserts")
        .execute(&pg)
        .await
        .unwrap();
    let start = Instant::now();
    while tg.ledger_usage("sp").await != (4, 4) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "spool not replayed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(spool_metrics(&tg).await, (3, 0));
    pg.close().await;
}

/// The embedded store keeps its counters in memory: after a restart on the same SQLite ledger
/// the counter starts from the ledger's rows, so a customer who used up the free plan's 5
/// calls is still refused and one with 1 call left gets exactly 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_restart_rebuilds_counters_from_the_ledger() {
    let up = Upstream::start().await;
    let mut first = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    for _ in 0..5 {
        assert_eq!(first.get("/signals", Some("full")).await.status(), 200);
    }
    for _ in 0..4 {
        assert_eq!(first.get("/signals", Some("part")).await.status(), 200);
    }
    first.stop().await;

    let tg = Tollgate::start_with(
        &base_config(up.addr),
        Backend::Embedded,
        Some(&first),
        |_| {},
    )
    .await;
    assert_eq!(
        tg.ledger_usage("full").await,
        (5, 5),
        "the stop flushed every call"
    );
    let (status, ty, _) = problem(tg.get("/signals", Some("full")).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (429, "urn:tollgate:problem:quota-exceeded")
    );
    assert_eq!(tg.get("/signals", Some("part")).await.status(), 200);
    assert_eq!(tg.get("/signals", Some("part")).await.status(), 429);
    assert_eq!(tg.wait_ledger("part", 5).await, (5, 5));
    assert_eq!(up.hits(), 10);
}

/// Postgres stops answering (connections open, no byte passes): `/readyz` still answers within
/// a second, 200 with the ledger reported down (usage waits in the spool, the proxy serves),
/// and a call is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_fast_and_ready_while_the_ledger_hangs() {
    let up = Upstream::start().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = PG_URL.replace("127.0.0.1:5432", &relay.addr.to_string());
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.database_url = url;
    })
    .await;
    let ready = tg.client.get(tg.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    relay.freeze(true);
    let asked = Instant::now();
    let ready = tg.client.get(tg.admin_url("/readyz")).send().await.unwrap();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "readyz took {took:?}");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_ne!(body["ledger"], "ok", "{body}");
    assert_eq!(body["quota_store"], "ok", "{body}");
    assert_eq!(tg.get("/signals", Some("hang")).await.status(), 200);

    relay.freeze(false);
    assert_eq!(tg.wait_ledger("hang", 1).await, (1, 1));
}
