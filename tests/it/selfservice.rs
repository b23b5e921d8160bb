//! Self-service usage on the proxy listener (issue 4): `GET /_tollgate/usage` shows the caller
//! their own plan, period and usage, costs nothing, and never shows another customer.

use crate::support::*;
use serde_json::{json, Value};

async fn own_usage(tg: &Tollgate, customer: &str, query: &str) -> Value {
    let r = tg
        .get(&format!("/_tollgate/usage{query}"), Some(customer))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    r.json().await.unwrap()
}

fn api_calls(v: &Value) -> &Value {
    v["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "api_calls")
        .unwrap()
}

both!(
    /// Two customers each see only their own numbers (whatever the query asks); reading is free:
    /// no quota unit, no upstream call and no ledger row, even at the quota's end.
    own_usage_only_and_free,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        assert_eq!(tg.put_customer("ada", json!({"plan": "pro"})).await.status(), 200);
        for _ in 0..2 {
            assert_eq!(tg.get("/signals", Some("ada")).await.status(), 200);
        }
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("bob")).await.status(), 200);
        }
        assert_eq!(tg.get("/signals", Some("bob")).await.status(), 429);
        let hits = up.hits();

        let a = own_usage(&tg, "ada", "?customer=bob").await;
        assert_eq!((a["customer"].as_str(), a["plan"].as_str()), (Some("ada"), Some("pro")));
        assert_eq!((&api_calls(&a)["used"], &api_calls(&a)["included"]), (&json!(2), &json!(1000)));
        let month = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        let end = chrono::DateTime::parse_from_rfc3339(a["period_end"].as_str().unwrap()).unwrap();
        assert_eq!(end.timestamp(), month.end);

        for _ in 0..3 {
            let v = own_usage(&tg, "bob", "").await;
            assert_eq!((v["customer"].as_str(), v["plan"].as_str()), (Some("bob"), Some("free")));
            assert_eq!((&api_calls(&v)["used"], &api_calls(&v)["remaining"]), (&json!(5), &json!(0)));
        }
        assert_eq!(up.hits(), hits, "self-service reached the upstream");
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("bob", "api_calls").await, Some(5));
            assert_eq!(tg.redis_used("ada", "api_calls").await, Some(2));
        }
        // One more real call of ada's: once its row is in, the ledger holds exactly the real calls.
        assert_eq!(tg.get("/signals", Some("ada")).await.status(), 200);
        assert_eq!(tg.wait_ledger("ada", 3).await, (3, 3));
        assert_eq!(tg.wait_ledger("bob", 5).await, (5, 5));
        assert_eq!(api_calls(&own_usage(&tg, "ada", "").await)["used"], 3);
    }
);

both!(
    /// Without a valid token it is 401 `invalid-token`, as on any route.
    needs_a_valid_token,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let (status, ty, _) = problem(tg.get("/_tollgate/usage", None).await).await;
        assert_eq!((status, ty.as_str()), (401, "urn:tollgate:problem:invalid-token"));
        let mut forged = claims("ada");
        forged["aud"] = json!("other");
        let r = tg.get_with_token("/_tollgate/usage", &sign(&forged)).await;
        assert!(r.headers().contains_key("www-authenticate"));
        assert_eq!(problem(r).await.0, 401);
        assert_eq!(up.hits(), 0);
    }
);

both!(
    /// Reading usage has a limit of its own (each read costs quota-store reads): a burst of 40
    /// concurrent reads gets the first 20 or so, the rest 429 `rate-limited` with `Retry-After`;
    /// another customer is not affected.
    reads_are_rate_limited_per_customer,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let reads = (0..40).map(|_| tg.get("/_tollgate/usage", Some("poller")));
        let mut ok = 0;
        let mut limited = 0;
        for r in futures_util::future::join_all(reads).await {
            match r.status().as_u16() {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
                    let (_, ty, _) = problem(r).await;
                    assert_eq!(ty, "urn:tollgate:problem:rate-limited");
                }
                s => panic!("unexpected {s}"),
            }
        }
        assert!(ok >= 20, "{ok} served");
        assert!(limited >= 5, "{limited} limited of 40");
        assert_eq!(own_usage(&tg, "quiet", "").await["customer"], "quiet");
    }
);

both!(
    /// Self-service reads are counted under their own route label, `_tollgate/usage`, served
    /// and refused alike, never as `(unmatched)`.
    reads_have_their_own_route_label,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        own_usage(&tg, "lou", "").await;
        own_usage(&tg, "lou", "").await;
        assert_eq!(tg.get("/_tollgate/usage", None).await.status(), 401);
        let sample = |decision: &str, route: &str| {
            format!("tollgate_requests_total{{decision=\"{decision}\",route=\"{route}\"}}")
        };
        assert_eq!(tg.metric(&sample("unmetered", "_tollgate/usage")).await, 2);
        assert_eq!(tg.metric(&sample("invalid-token", "_tollgate/usage")).await, 1);
        assert_eq!(tg.metric(&sample("unmetered", "(unmatched)")).await, 0);
        assert_eq!(tg.metric(&sample("invalid-token", "(unmatched)")).await, 0);
    }
);

/// The access-log line of a self-service read names its route `_tollgate/usage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_logged_under_their_route() {
    use crate::support::serve::{admin_config, serve_config, signal, until, Serve};
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-selfservice-log")));
    let (proxy, admin) = (free_port(), free_port());
    let file = dir.0.join("tollgate.toml");
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(
        &file,
        serve_config(&base_config(up.addr), &dir, proxy, admin),
    )
    .unwrap();
    let mut serve = Serve::spawn_with(&file, &dir, &["--log-format", "json"]);
    let client = reqwest::Client::new();
    until(30, "tollgate serve to start", || {
        admin_config(&client, admin)
    })
    .await;
    let r = client
        .get(format!("http://{proxy}/_tollgate/usage"))
        .bearer_auth(token("lou"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    signal(&serve.child, "-TERM");
    serve
        .exited(
            std::time::Instant::now(),
            std::time::Duration::from_secs(20),
        )
        .await;
    let logged = std::fs::read_to_string(&serve.log).unwrap();
    let access = crate::support::serve::access_lines(&logged);
    assert_eq!(access.len(), 1, "{logged}");
    let fields = &access[0]["fields"];
    assert_eq!(
        (fields["route"].as_str(), fields["decision"].as_str()),
        (Some("_tollgate/usage"), Some("unmetered")),
        "{logged}"
    );
}
