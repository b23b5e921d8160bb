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
    // Each reservation also leaves its batch key (for cancelling it if it ran late): short-lived.
    let ttl = cluster.longest_batch_key_ttl().await;
    assert!(
        (0..=30_000).contains(&ttl),
        "batch keys expire within 30 s: {ttl} ms"
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

/// A private Redis, and tollgate on it with a 200 ms deadline and the free plan (5 units,
/// `deny`, fail-open) allowed half of what is left while Redis is down.
async fn outage_setup() -> (PrivateRedis, Upstream, Tollgate) {
    let redis = PrivateRedis::start().await;
    let up = Upstream::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(url);
        c.storage.redis_timeout = Duration::from_millis(200);
        c.plans.get_mut("free").unwrap().fail_open_allowance =
            tollgate::quota::fail_open::Allowance::PerMille(500);
    })
    .await;
    (redis, up, tg)
}

/// Calls `/signals` for `customer` from two clients for `during`; how many were served.
async fn hammer(tg: &Tollgate, customer: &str, during: Duration) -> usize {
    let until = Instant::now() + during;
    let lanes = (0..2).map(|_| async {
        let mut served = 0;
        while Instant::now() < until {
            if tg.get("/signals", Some(customer)).await.status() == 200 {
                served += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        served
    });
    futures_util::future::join_all(lanes)
        .await
        .into_iter()
        .sum()
}

/// How Redis goes away under load.
enum Outage {
    /// `CLIENT PAUSE 3000 ALL`: Redis hangs for 3 s, then runs what waited.
    Pause,
    /// SIGKILL, 16 s down, restarted empty.
    Kill,
}

/// "ex" used its 5 calls, "part" 1 of 5 (4 left, so half is 2); both are called under load
/// through the outage. Then: ex got nothing, part at most 2, and once Redis answers again each
/// counter equals the ledger.
async fn outage_gives_nothing_away(outage: Outage) {
    let (mut redis, _up, tg) = outage_setup().await;
    for _ in 0..5 {
        assert_eq!(tg.get("/signals", Some("ex")).await.status(), 200);
    }
    assert_eq!(tg.get("/signals", Some("ex")).await.status(), 429);
    assert_eq!(tg.get("/signals", Some("part")).await.status(), 200);

    let (ex, part) = match outage {
        Outage::Pause => {
            redis.pause(3000).await;
            // Redis answered the pause: it ends at most 3 s from here.
            let paused = Instant::now();
            // Ends before the pause does: what is served after it is not an outage call.
            let during = Duration::from_millis(2800);
            let served = tokio::join!(hammer(&tg, "ex", during), hammer(&tg, "part", during));
            // What follows must be answered by Redis, not by the fallback in the pause's last
            // moments (whose allowance is spent, so it rightly says 429).
            tokio::time::sleep_until((paused + Duration::from_millis(3200)).into()).await;
            served
        }
        Outage::Kill => {
            redis.kill();
            let during = Duration::from_secs(16);
            let served = tokio::join!(hammer(&tg, "ex", during), hammer(&tg, "part", during));
            redis.restart().await;
            served
        }
    };
    assert_eq!(
        ex, 0,
        "an exhausted customer gets no call while Redis is out"
    );
    assert!(
        part <= 2,
        "part got {part} calls, more than half of its 4 left"
    );

    // Redis answers again: the fallback's counts are folded, late reservations cancelled, a
    // lost counter rebuilt from the ledger (by the next reservation, once the ledger has every
    // row).
    assert_eq!(tg.wait_ledger("ex", 5).await, (5, 5));
    let part_rows = 1 + part as i64;
    assert_eq!(
        tg.wait_ledger("part", part_rows).await,
        (part_rows, part_rows)
    );
    let key = |customer: &str| {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        format!("{}:{{{customer}}}:q:api_calls:{}", tg.prefix, period.start)
    };
    // part spends what is left: exactly up to the cap, so nothing was counted twice or lost.
    let mut extra = 0;
    let back = Instant::now();
    loop {
        match tg.get("/signals", Some("part")).await.status().as_u16() {
            200 => extra += 1,
            429 => break,
            s => assert!(
                back.elapsed() < Duration::from_secs(15),
                "part: {s} for 15 s"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        1 + part + extra,
        5,
        "part: {part} calls in the outage, {extra} after"
    );
    assert_eq!(tg.get("/signals", Some("ex")).await.status(), 429);
    assert_eq!(tg.wait_ledger("part", 5).await, (5, 5));
    let back = Instant::now();
    loop {
        let (ex_redis, part_redis) = (redis.get(&key("ex")).await, redis.get(&key("part")).await);
        if ex_redis == Some(5) && part_redis == Some(5) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "counters never matched the ledger's 5: ex {ex_redis:?}, part {part_redis:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still equal a moment later (no late charge arrives).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(redis.get(&key("part")).await, Some(5));
    assert_eq!(redis.get(&key("ex")).await, Some(5));
    assert_eq!(tg.ledger_usage("ex").await, (5, 5));
    assert_eq!(tg.ledger_usage("part").await, (5, 5));
}

/// Redis hangs for 3 s under load: every reservation times out and falls back; those Redis runs
/// late, after the pause, are cancelled (nothing counts twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_under_load_gives_nothing_away() {
    outage_gives_nothing_away(Outage::Pause).await;
}

/// Redis is killed for 16 s under load and comes back empty: the fallback grants nothing to the
/// exhausted customer, and the counters are rebuilt from the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_gives_nothing_away() {
    outage_gives_nothing_away(Outage::Kill).await;
}

/// A fail-closed plan while Redis hangs: each call is refused 503, and the reservations Redis
/// runs after the pause are cancelled, so the refused calls consume no quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_during_a_pause_consumes_nothing() {
    let (redis, _up, tg) = outage_setup().await;
    tg.put_customer("shut", serde_json::json!({"plan": "closed"}))
        .await;
    assert_eq!(tg.get("/signals", Some("shut")).await.status(), 200);
    redis.pause(1500).await;
    for _ in 0..4 {
        let (status, ty, _) = problem(tg.get("/signals", Some("shut")).await).await;
        assert_eq!(
            (status, ty.as_str()),
            (503, "urn:tollgate:problem:quota-store-unavailable")
        );
    }
    let key = {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        format!("{}:{{shut}}:q:api_calls:{}", tg.prefix, period.start)
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        redis.get(&key).await,
        Some(1),
        "the four refused calls were not charged"
    );
    assert_eq!(tg.wait_ledger("shut", 1).await, (1, 1));
}

/// `tollgate repair-counters`: a counter that drifted below the ledger (a Redis restored from an
/// old snapshot) would hand out calls again; the command reports it (`--dry-run` changes
/// nothing), then sets it to the ledger's units, and the cap holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_counters_sets_drifted_counters_to_the_ledger() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Shared).await;
    for _ in 0..3 {
        assert_eq!(tg.get("/signals", Some("drift")).await.status(), 200);
    }
    assert_eq!(tg.get("/signals", Some("steady")).await.status(), 200);
    assert_eq!(tg.wait_ledger("drift", 3).await, (3, 3));
    assert_eq!(tg.wait_ledger("steady", 1).await, (1, 1));
    let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
    let key = format!("{}:{{drift}}:q:api_calls:{}", tg.prefix, period.start);
    let c = ::redis::Client::open(REDIS_URL).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-repair")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tollgate.toml");
    std::fs::write(
        &file,
        format!(
            "{}\n[storage]\nredis_url = \"{REDIS_URL}\"\nredis_prefix = \"{}\"\ndatabase_url = \"{}\"\ndatabase_schema = \"{}\"\n",
            base_config(up.addr),
            tg.prefix,
            tg.database_url,
            tg.schema
        ),
    )
    .unwrap();
    let run = |dry: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["repair-counters", "--config"]).arg(&file);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let line = format!(
        "customer=drift meter=api_calls period_start={} from 1 to 3",
        period.start
    );
    let dry = run(true);
    assert!(dry.contains(&format!("would set {line}")), "{dry}");
    assert!(dry.contains("1 counter(s) differed"), "{dry}");
    assert_eq!(
        tg.redis_used("drift", "api_calls").await,
        Some(1),
        "a dry run changes nothing"
    );

    let done = run(false);
    assert!(done.contains(&format!("set {line}")), "{done}");
    assert_eq!(tg.redis_used("drift", "api_calls").await, Some(3));
    assert_eq!(tg.redis_used("steady", "api_calls").await, Some(1));
    assert!(run(true).contains("0 counter(s) differed"));
    // The free plan's 5: exactly 2 more.
    assert_eq!(tg.get("/signals", Some("drift")).await.status(), 200);
    assert_eq!(tg.get("/signals", Some("drift")).await.status(), 200);
    assert_eq!(tg.get("/signals", Some("drift")).await.status(), 429);
}
