//! Shadow mode (issue 4): a route or plan marked `shadow = true` has its plan decisions (feature
//! gate, rate limit, quota) computed, counted and logged, but the request is forwarded and
//! charged anyway. Identity and account state are never shadowed.

use crate::support::*;

/// The standard config plus a shadow plan and a shadow route.
fn config(up: std::net::SocketAddr) -> String {
    let mut toml = base_config(up);
    toml.push_str(
        r#"
[plans.trial]
shadow = true
rate_per_minute = 600
quotas.api_calls = { included = 2, overage = "deny" }
quotas.tokens = { unlimited = true }

[plans.slow]
rate_per_minute = 2
burst = 2
quotas.api_calls = { included = 1000 }
quotas.tokens = { unlimited = true }
"#,
    );
    // Routes must come before the plans in TOML order only for readability; arrays of tables
    // may appear anywhere.
    toml.push_str(
        r#"
[[routes]]
name = "beta"
match = "GET /beta"
upstream = "api"
cost = 1
feature = "export_pdf"
shadow = true
"#,
    );
    toml
}

fn shadow_count(metrics: &str, decision: &str, route: &str) -> Option<u64> {
    let needle =
        format!("tollgate_shadow_denials_total{{decision=\"{decision}\",route=\"{route}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

both!(
    /// A customer on a shadow plan goes past its quota and outside its features: every call is
    /// forwarded and charged, and each waived denial is counted. A customer on an enforcing plan
    /// is still refused at the same point.
    shadow_plan_forwards_and_charges_what_it_would_deny,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        assert_eq!(tg.put_customer("sam", serde_json::json!({"plan": "trial"})).await.status(), 200);

        for i in 0..3 {
            assert_eq!(tg.get("/signals", Some("sam")).await.status(), 200, "call {i}");
        }
        // export_pdf is not in the trial plan: waived too.
        assert_eq!(tg.get("/export/pdf", Some("sam")).await.status(), 200);
        assert_eq!(up.hits(), 4);
        // Charged as the calls happened: 3 + 5 units, past `included = 2`.
        assert_eq!(tg.wait_ledger("sam", 4).await, (4, 8));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("sam", "api_calls").await, Some(8));
        }
        let m = tg.metrics().await;
        assert_eq!(shadow_count(&m, "quota-exceeded", "GET /signals"), Some(1), "{m}");
        assert_eq!(shadow_count(&m, "feature-not-in-plan", "export-pdf"), Some(1), "{m}");
        // The requests themselves were allowed.
        assert!(m.contains("tollgate_requests_total{decision=\"allowed\",route=\"GET /signals\"} 3"), "{m}");

        // The default plan enforces: the 6th unit of `free` is refused and not forwarded.
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("fred")).await.status(), 200);
        }
        let (status, ty, _) = problem(tg.get("/signals", Some("fred")).await).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:quota-exceeded"));
        assert_eq!(up.hits(), 9);
    }
);

both!(
    /// A shadow route waives the feature gate and the rate limit for every plan, but a bad token
    /// is still a 401 that never reaches the upstream, and a suspended customer is still refused.
    shadow_route_waives_plan_decisions_not_identity,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        assert_eq!(tg.put_customer("rita", serde_json::json!({"plan": "slow"})).await.status(), 200);
        // burst 2: the third call within the minute is over the rate, and forwarded anyway.
        for i in 0..3 {
            assert_eq!(tg.get("/beta", Some("rita")).await.status(), 200, "call {i}");
        }
        assert_eq!(up.hits(), 3);
        assert_eq!(tg.wait_ledger("rita", 3).await, (3, 3));
        let m = tg.metrics().await;
        assert_eq!(shadow_count(&m, "feature-not-in-plan", "beta"), Some(3), "{m}");
        assert_eq!(shadow_count(&m, "rate-limited", "beta"), Some(1), "{m}");
        // The same plan on an enforcing route is rate limited (the shadow calls spent the burst).
        let (status, ty, _) = problem(tg.get("/signals", Some("rita")).await).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:rate-limited"));

        let r = tg.get_with_token("/beta", "not.a.token").await;
        assert_eq!(r.status(), 401);
        assert_eq!(tg.put_customer("sid", serde_json::json!({"suspended": true})).await.status(), 200);
        let (status, ty, _) = problem(tg.get("/beta", Some("sid")).await).await;
        assert_eq!((status, ty.as_str()), (403, "urn:tollgate:problem:suspended"));
        assert_eq!(up.hits(), 3);
    }
);
