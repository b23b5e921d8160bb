//! Faults of the parts tollgate stands on, seen from outside: a ledger that refuses writes, and
//! what the operator's metrics say meanwhile.

use crate::support::*;
use std::time::{Duration, Instant};

/// `tollgate_usage_events_total{outcome="spooled"}` and `tollgate_usage_spool_bytes` as scraped.
async fn spool_metrics(tg: &Tollgate) -> (u64, u64) {
    let text = tg
        .client
        .get(tg.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    (
        value("tollgate_usage_events_total{outcome=\"spooled\"} "),
        value("tollgate_usage_spool_bytes "),
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
