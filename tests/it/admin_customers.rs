//! The customer admin API (issue 4): usage and overage from the quota store, the near/over-limit
//! listing, suspension and credits — each checked against what the proxy decides next.

use crate::support::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The base config with `pro` including only 3 api_calls (overage 20 000 micros a unit).
fn small_pro(upstream: std::net::SocketAddr) -> String {
    base_config(upstream).replace(
        "quotas.api_calls = { included = 1000, overage = \"allow\"",
        "quotas.api_calls = { included = 3, overage = \"allow\"",
    )
}

async fn start(b: Backend) -> (Upstream, Tollgate) {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&small_pro(up.addr), b).await;
    (up, tg)
}

async fn admin(tg: &Tollgate, method: Method, path: &str) -> reqwest::RequestBuilder {
    tg.client
        .request(method, tg.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
}

async fn get_json(tg: &Tollgate, path: &str) -> Value {
    let r = admin(tg, Method::GET, path).await.send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

async fn post(tg: &Tollgate, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = admin(tg, Method::POST, path)
        .await
        .header("x-tollgate-actor", "ops-test");
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

/// `n` calls of `GET /signals` as `customer`, each asserted to get `status`.
async fn calls(tg: &Tollgate, customer: &str, n: usize, status: u16) {
    for i in 0..n {
        let r = tg.get("/signals", Some(customer)).await;
        assert_eq!(r.status(), status, "call {i} of {customer}");
    }
}

fn meter<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == name)
        .unwrap_or_else(|| panic!("no meter {name} in {view}"))
}

fn ids(list: &Value) -> Vec<String> {
    list["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// The newest audit row.
async fn last_audit(tg: &Tollgate) -> Value {
    get_json(tg, "/admin/audit?limit=1").await["entries"][0].clone()
}

both!(
    /// A pro customer 2 units past `included` shows used/remaining/overage units and the
    /// overage amount in integer micros, matching the quota counter; a customer with usage but
    /// no entitlement row is on the default plan; anyone else is 404.
    customer_usage_and_overage,
    |b| {
        let (_up, tg) = start(b).await;
        assert_eq!(tg.put_customer("ada", json!({"plan": "pro"})).await.status(), 200);
        calls(&tg, "ada", 5, 200).await;
        let v = get_json(&tg, "/admin/customers/ada").await;
        assert_eq!((v["plan"].as_str(), v["status"].as_str()), (Some("pro"), Some("active")));
        assert_eq!(v["suspended"], false);
        let m = meter(&v, "api_calls");
        assert_eq!(
            (&m["used"], &m["included"], &m["remaining"], &m["overage_units"], &m["overage_amount_micros"]),
            (&json!(5), &json!(3), &json!(0), &json!(2), &json!(40_000)),
            "{v}"
        );
        let tokens = meter(&v, "tokens");
        assert!(tokens["included"].is_null() && tokens["remaining"].is_null(), "{v}");
        // The period is the calendar month, in RFC 3339.
        let start = chrono::DateTime::parse_from_rfc3339(v["period_start"].as_str().unwrap()).unwrap();
        let month = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        assert_eq!(start.timestamp(), month.start);
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("ada", "api_calls").await, Some(5));
        }

        // Usage without an entitlement row: the default plan.
        calls(&tg, "bob", 2, 200).await;
        let v = get_json(&tg, "/admin/customers/bob").await;
        assert_eq!((v["quota_plan"].as_str(), v["stored"].as_bool()), (Some("free"), Some(false)));
        assert!(v["plan"].is_null(), "{v}");
        assert_eq!(meter(&v, "api_calls")["remaining"], 3);

        // Neither a row nor usage: 404 problem+json; no token: 401.
        let r = admin(&tg, Method::GET, "/admin/customers/nobody").await.send().await.unwrap();
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-customer"));
        let r = tg.client.get(tg.admin_url("/admin/customers/ada")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
);

both!(
    /// `over_limit` lists customers with nothing left; `near_limit=0.8` those at ≥ 80 % of a
    /// limited meter (over included); pages follow `next`; a bad fraction is 400.
    list_near_and_over_limit,
    |b| {
        let (_up, tg) = start(b).await;
        for c in ["c1-over", "c2-near", "c3-low", "c4-idle"] {
            assert_eq!(tg.put_customer(c, json!({"plan": "free"})).await.status(), 200);
        }
        calls(&tg, "c1-over", 5, 200).await;
        calls(&tg, "c2-near", 4, 200).await;
        calls(&tg, "c3-low", 3, 200).await;

        let over = get_json(&tg, "/admin/customers?over_limit=true").await;
        assert_eq!(ids(&over), ["c1-over"]);
        let near = get_json(&tg, "/admin/customers?near_limit=0.8").await;
        assert_eq!(ids(&near), ["c1-over", "c2-near"]);
        assert!(near["next"].is_null());
        let both = get_json(&tg, "/admin/customers?over_limit=true&near_limit=0.8").await;
        assert_eq!(ids(&both), ["c1-over", "c2-near"]);
        let all = get_json(&tg, "/admin/customers").await;
        assert_eq!(ids(&all), ["c1-over", "c2-near", "c3-low", "c4-idle"]);

        let p1 = get_json(&tg, "/admin/customers?near_limit=0.6&limit=2").await;
        assert_eq!(ids(&p1), ["c1-over", "c2-near"]);
        let next = p1["next"].as_str().unwrap();
        let p2 = get_json(&tg, &format!("/admin/customers?near_limit=0.6&limit=2&after={next}")).await;
        assert_eq!(ids(&p2), ["c3-low"]);
        assert!(p2["next"].is_null());

        for bad in ["near_limit=1.5", "near_limit=80%25", "over_limit=yes", "limit=0"] {
            let r = admin(&tg, Method::GET, &format!("/admin/customers?{bad}")).await.send().await.unwrap();
            let (status, ty, _) = problem(r).await;
            assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-query"), "{bad}");
        }
    }
);

both!(
    /// Customers with usage this month but no entitlement row (on the default plan) are listed
    /// too, with `plan: null` and `quota_plan` the default plan, in id order with the stored
    /// ones, by `near_limit`, `over_limit` and pages alike; one whose counter was credited back
    /// to 0 is not (it is unknown, as `GET /admin/customers/{id}` says).
    list_includes_customers_without_an_entitlement_row,
    |b| {
        let (_up, tg) = start(b).await;
        assert_eq!(tg.put_customer("c1-over", json!({"plan": "free"})).await.status(), 200);
        calls(&tg, "c1-over", 5, 200).await;
        calls(&tg, "u-near", 4, 200).await;
        calls(&tg, "u-over", 5, 200).await;
        calls(&tg, "u-low", 1, 200).await;
        // Listed once their rows are in the ledger (within a flush interval).
        for (c, rows) in [("u-near", 4), ("u-over", 5), ("u-low", 1)] {
            assert_eq!(tg.wait_ledger(c, rows).await.0, rows, "{c}");
        }

        let near = get_json(&tg, "/admin/customers?near_limit=0.8").await;
        assert_eq!(ids(&near), ["c1-over", "u-near", "u-over"], "{near}");
        let u = &near["customers"][1];
        assert!(u["plan"].is_null(), "{u}");
        assert_eq!((u["quota_plan"].as_str(), u["stored"].as_bool()), (Some("free"), Some(false)), "{u}");
        assert_eq!(meter(u, "api_calls")["used"], 4);
        let over = get_json(&tg, "/admin/customers?over_limit=true").await;
        assert_eq!(ids(&over), ["c1-over", "u-over"]);
        let all = get_json(&tg, "/admin/customers").await;
        assert_eq!(ids(&all), ["c1-over", "u-low", "u-near", "u-over"]);

        let p1 = get_json(&tg, "/admin/customers?near_limit=0.8&limit=2").await;
        assert_eq!(ids(&p1), ["c1-over", "u-near"]);
        assert_eq!(p1["next"], "u-near");
        let p2 = get_json(&tg, "/admin/customers?near_limit=0.8&limit=2&after=u-near").await;
        assert_eq!(ids(&p2), ["u-over"]);
        assert!(p2["next"].is_null());
        let p = get_json(&tg, "/admin/customers?over_limit=true&limit=1&after=c1-over").await;
        assert_eq!(ids(&p), ["u-over"]);

        let r = post(&tg, "/admin/customers/u-low/credit", Some(json!({"meter": "api_calls", "units": 1, "reason": "test"}))).await;
        assert_eq!(r.status(), 200);
        let all = get_json(&tg, "/admin/customers").await;
        assert_eq!(ids(&all), ["c1-over", "u-near", "u-over"]);
    }
);

both!(
    /// Suspend: the next proxied call is 403 `suspended` (on a second instance too, within 1 s);
    /// resume: allowed again. Both are audited with before/after.
    suspend_and_resume,
    |b| {
        let (_up, tg) = start(b).await;
        let peer = match b {
            Backend::Shared => Some(Tollgate::start_with(&small_pro(_up.addr), b, Some(&tg), |_| {}).await),
            Backend::Embedded => None,
        };
        assert_eq!(tg.put_customer("sam", json!({"plan": "pro"})).await.status(), 200);
        calls(&tg, "sam", 1, 200).await;

        let r = post(&tg, "/admin/customers/sam/suspend", None).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["suspended"], true);
        let r = tg.get("/signals", Some("sam")).await;
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (403, "urn:tollgate:problem:suspended"));
        let a = last_audit(&tg).await;
        assert_eq!((a["action"].as_str(), a["actor"].as_str()), (Some("customer.suspend"), Some("admin:ops-test")));
        assert_eq!((&a["before"]["suspended"], &a["after"]["suspended"]), (&json!(false), &json!(true)));
        assert_eq!(a["after"]["plan"], "pro");

        if let Some(peer) = &peer {
            let deadline = Instant::now() + Duration::from_secs(1);
            while peer.get("/signals", Some("sam")).await.status() != 403 {
                assert!(Instant::now() < deadline, "peer never saw the suspension");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        assert_eq!(post(&tg, "/admin/customers/sam/resume", None).await.status(), 200);
        calls(&tg, "sam", 1, 200).await;
        assert_eq!(last_audit(&tg).await["action"], "customer.resume");
        if let Some(peer) = &peer {
            let deadline = Instant::now() + Duration::from_secs(1);
            while peer.get("/signals", Some("sam")).await.status() != 200 {
                assert!(Instant::now() < deadline, "peer never saw the resume");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        // Resuming someone never seen is 404; suspending them blocks them before their first call.
        let r = post(&tg, "/admin/customers/ghost/resume", None).await;
        assert_eq!(problem(r).await.0, 404);
        assert_eq!(post(&tg, "/admin/customers/ghost/suspend", None).await.status(), 200);
        assert_eq!(tg.get("/signals", Some("ghost")).await.status(), 403);
        let r = tg.client.post(tg.admin_url("/admin/customers/sam/suspend")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        calls(&tg, "sam", 1, 200).await;
    }
);

both!(
    /// A customer refused at quota gets a credit of 2: the counter drops by 2 (in Redis on the
    /// shared backend), exactly 2 more calls pass, and the credit is audited with the reason.
    credit_reopens_quota,
    |b| {
        let (_up, tg) = start(b).await;
        calls(&tg, "cleo", 5, 200).await;
        calls(&tg, "cleo", 1, 429).await;

        let r = post(&tg, "/admin/customers/cleo/credit", Some(json!({"meter": "api_calls", "units": 2, "reason": "outage 2026-11-21"}))).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!((&v["used_before"], &v["used_after"]), (&json!(5), &json!(3)), "{v}");
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("cleo", "api_calls").await, Some(3));
        }
        assert_eq!(meter(&get_json(&tg, "/admin/customers/cleo").await, "api_calls")["used"], 3);
        calls(&tg, "cleo", 2, 200).await;
        calls(&tg, "cleo", 1, 429).await;

        let a = last_audit(&tg).await;
        assert_eq!((a["action"].as_str(), a["target"].as_str()), (Some("customer.credit"), Some("customers/cleo")));
        assert_eq!((&a["before"]["used"], &a["after"]["used"]), (&json!(5), &json!(3)), "{a}");
        assert_eq!(a["after"]["reason"], "outage 2026-11-21");

        // Bad credits change nothing.
        for body in [
            json!({"meter": "api_calls", "units": 0, "reason": "x"}),
            json!({"meter": "nope", "units": 1, "reason": "x"}),
            json!({"meter": "api_calls", "units": 1, "reason": ""}),
            json!({"meter": "api_calls", "units": -1, "reason": "x"}),
            json!({"meter": "api_calls", "units": 1}),
        ] {
            let r = post(&tg, "/admin/customers/cleo/credit", Some(body.clone())).await;
            let (status, ty, _) = problem(r).await;
            assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-body"), "{body}");
        }
        let r = post(&tg, "/admin/customers/nobody/credit", Some(json!({"meter": "api_calls", "units": 1, "reason": "x"}))).await;
        assert_eq!(problem(r).await.0, 404);
        assert_eq!(meter(&get_json(&tg, "/admin/customers/cleo").await, "api_calls")["used"], 5);
        assert_eq!(last_audit(&tg).await["action"], "customer.credit");
    }
);

both!(
    /// A customer id in the path follows the one id rule: CR/LF (a forged log line), NUL,
    /// surrounding spaces and more than 256 bytes are 400 `invalid-customer-id` on every
    /// customer route, and nothing is stored; a 256-byte id is fine.
    customer_ids_are_validated,
    |b| {
        let (_up, tg) = start(b).await;
        let long = "x".repeat(257);
        for id in ["a%0d%0aX-Injected:%201", "a%00b", "%20acme", "acme%20", "tab%09", long.as_str()] {
            let r = tg.put_customer(id, json!({"plan": "pro"})).await;
            let (status, ty, body) = problem(r).await;
            assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-customer-id"), "{id}: {body}");
            for (method, path) in [
                (Method::GET, format!("/admin/customers/{id}")),
                (Method::POST, format!("/admin/customers/{id}/suspend")),
                (Method::POST, format!("/admin/customers/{id}/credit")),
            ] {
                let r = admin(&tg, method.clone(), &path).await.send().await.unwrap();
                let (status, ty, _) = problem(r).await;
                assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-customer-id"), "{method} {path}");
            }
        }
        assert_eq!(tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM customers").await, 0);
        let ok = "y".repeat(256);
        assert_eq!(tg.put_customer(&ok, json!({"plan": "pro"})).await.status(), 200);
    }
);

/// With `admin.metrics_token_env`, `/metrics` takes that token (or the admin token), and the
/// metrics token opens nothing else; health stays open for load balancers. Named but unset, the
/// env var leaves `/metrics` to the admin token only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_behind_their_own_token() {
    let up = Upstream::start().await;
    let get = |tg: &Tollgate, path: &str, token: Option<&str>| {
        let mut r = tg.client.get(tg.admin_url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.admin.metrics_token_env = Some("TOLLGATE_TEST_METRICS_TOKEN".into());
    })
    .await;
    let metrics_token = "tollgate-test-metrics-token";
    let (status, ty, _) = problem(get(&tg, "/metrics", None).await.unwrap()).await;
    assert_eq!(
        (status, ty.as_str()),
        (401, "urn:tollgate:problem:admin-unauthorized")
    );
    assert_eq!(
        get(&tg, "/metrics", Some("wrong")).await.unwrap().status(),
        401
    );
    let r = get(&tg, "/metrics", Some(metrics_token)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("tollgate_requests_total"));
    assert_eq!(
        get(&tg, "/metrics", Some(ADMIN_TOKEN))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(&tg, "/admin/customers/x", Some(metrics_token))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(get(&tg, "/readyz", None).await.unwrap().status(), 200);
    assert_eq!(get(&tg, "/healthz", None).await.unwrap().status(), 200);

    let unset = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.admin.metrics_token_env = Some("TOLLGATE_TEST_METRICS_TOKEN_UNSET".into());
    })
    .await;
    assert_eq!(get(&unset, "/metrics", None).await.unwrap().status(), 401);
    assert_eq!(
        get(&unset, "/metrics", Some(metrics_token))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get(&unset, "/metrics", Some(ADMIN_TOKEN))
            .await
            .unwrap()
            .status(),
        200
    );
}
