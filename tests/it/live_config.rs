//! Live config through the admin API (issue 4): changes are validated like `check-config`,
//! versioned in the ledger, audited, applied atomically under load and broadcast to every
//! instance; bad input changes nothing.

use crate::support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The route under test, URL-encoded for `/admin/routes/{name}`.
const SIGNALS: &str = "GET%20%2Fsignals";

/// The base config without rate limits, with a default plan large enough for load tests.
fn roomy(upstream: std::net::SocketAddr) -> String {
    base_config(upstream)
        .replace(
            "quotas.api_calls = { included = 5, overage = \"deny\" }",
            "quotas.api_calls = { included = 1000000, overage = \"deny\" }",
        )
        .replace("rate_per_minute = 600\n", "")
}

async fn admin(tg: &Tollgate, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    tg.client
        .request(method, tg.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
}

async fn get_json(tg: &Tollgate, path: &str) -> Value {
    let r = admin(tg, reqwest::Method::GET, path)
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// `GET /admin/config`.
async fn config(tg: &Tollgate) -> Value {
    get_json(tg, "/admin/config").await
}

async fn put(tg: &Tollgate, doc: &Value) -> reqwest::Response {
    admin(tg, reqwest::Method::PUT, "/admin/config")
        .await
        .json(doc)
        .send()
        .await
        .unwrap()
}

async fn patch(tg: &Tollgate, path: &str, body: Value) -> reqwest::Response {
    admin(tg, reqwest::Method::PATCH, path)
        .await
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Number of stored config versions.
async fn version_count(tg: &Tollgate) -> usize {
    get_json(tg, "/admin/config/versions?limit=500").await["versions"]
        .as_array()
        .unwrap()
        .len()
}

/// The document's route named `name` (by name or match).
fn route<'a>(doc: &'a mut Value, name: &str) -> &'a mut Value {
    doc["routes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| {
            r.get("name")
                .or_else(|| r.get("match"))
                .and_then(Value::as_str)
                == Some(name)
        })
        .unwrap()
}

/// Units the quota store holds for `customer`'s api_calls this period, as the admin API reads
/// them from the store in force (Redis on the shared backend, the in-process store embedded).
async fn store_used(tg: &Tollgate, customer: &str) -> i64 {
    let v = get_json(tg, &format!("/admin/customers/{customer}")).await;
    v["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "api_calls")
        .unwrap()["used"]
        .as_i64()
        .unwrap()
}

both!(
    /// Must-show 1: a route's cost goes from 1 to 5 through the API while requests run; every
    /// ledger row is charged exactly 1 or 5, and the ledger's total equals the quota counter.
    cost_change_under_load,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        assert_eq!(tg.put_customer("lena", json!({"plan": "free"})).await.status(), 200);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (client, url, token) = (tg.client.clone(), tg.url("/signals"), token("lena"));
            let (stop, sent) = (stop.clone(), sent.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = client.get(&url).bearer_auth(&token).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let wait_sent = |n: usize| {
            let sent = sent.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while sent.load(Ordering::Relaxed) < n {
                    assert!(Instant::now() < deadline, "load did not reach {n} requests");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wait_sent(60).await;
        let r = patch(&tg, &format!("/admin/routes/{SIGNALS}"), json!({"cost": 5})).await;
        assert_eq!(r.status(), 200);
        let at_patch = sent.load(Ordering::Relaxed);
        wait_sent(at_patch + 60).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
        let total = sent.load(Ordering::Relaxed) as i64;
        let (rows, units) = tg.wait_ledger("lena", total).await;
        assert_eq!(rows, total, "one ledger row per request");
        let charged = tg.ledger_units("lena").await;
        assert!(charged.iter().all(|u| *u == 1 || *u == 5), "{charged:?}");
        assert!(charged.contains(&1) && charged.contains(&5), "both costs were charged");
        assert_eq!(store_used(&tg, "lena").await, units, "ledger agrees with the counter");
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("lena", "api_calls").await, Some(units));
        }
        // Once the PATCH has answered, every new request costs 5.
        let before = store_used(&tg, "lena").await;
        assert_eq!(tg.get("/signals", Some("lena")).await.status(), 200);
        assert_eq!(store_used(&tg, "lena").await, before + 5);
    }
);

/// Must-show 2: two instances share Redis and Postgres; a PUT on one changes the other's
/// decisions within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_on_one_instance_reaches_the_other_within_a_second() {
    let up = Upstream::start().await;
    let a = Tollgate::start(&base_config(up.addr), Backend::Shared).await;
    let b = Tollgate::start_with(&base_config(up.addr), Backend::Shared, Some(&a), |_| {}).await;
    assert_eq!(config(&a).await["version"], config(&b).await["version"]);
    let (status, ty, _) = problem(b.get("/export/pdf", Some("mona")).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (403, "urn:tollgate:problem:feature-not-in-plan")
    );

    let mut doc = config(&a).await["document"].clone();
    doc["plans"]["free"]["features"] = json!(["export_pdf"]);
    let r = put(&a, &doc).await;
    assert_eq!(r.status(), 200);
    let put_at = Instant::now();
    let version = r.json::<Value>().await.unwrap()["version"].clone();
    loop {
        if b.get("/export/pdf", Some("mona")).await.status() == 200 {
            break;
        }
        assert!(
            put_at.elapsed() < Duration::from_secs(1),
            "the other instance still refuses after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(config(&b).await["version"], version);
}

both!(
    /// No or a wrong admin token is 401 on every live-config call, and changes nothing.
    admin_calls_need_the_token,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let before = config(&tg).await;
        let doc = before["document"].clone();
        let calls = [
            (reqwest::Method::GET, "/admin/config".to_string()),
            (reqwest::Method::PUT, "/admin/config".into()),
            (reqwest::Method::PATCH, format!("/admin/routes/{SIGNALS}")),
            (reqwest::Method::PATCH, "/admin/plans/free".into()),
            (reqwest::Method::POST, "/admin/config/rollback/1".into()),
            (reqwest::Method::GET, "/admin/config/versions".into()),
            (reqwest::Method::GET, "/admin/audit".into()),
        ];
        for (method, path) in calls {
            for auth in [None, Some("wrong-token"), Some("tollgate-test-admin-tokeN")] {
                let mut req = tg.client.request(method.clone(), tg.admin_url(&path)).json(&doc);
                if let Some(t) = auth {
                    req = req.bearer_auth(t);
                }
                let (status, ty, _) = problem(req.send().await.unwrap()).await;
                assert_eq!(
                    (status, ty.as_str()),
                    (401, "urn:tollgate:problem:admin-unauthorized"),
                    "{method} {path} with {auth:?}"
                );
            }
        }
        assert_eq!(config(&tg).await, before);
        assert_eq!(version_count(&tg).await, 1);
    }
);

/// The proxy listener never serves `/admin/...`: it is an unmatched path there (404 no-route),
/// even with the admin token, and a PUT through it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_listener_never_serves_admin() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    let before = config(&tg).await;
    let mut doc = before["document"].clone();
    route(&mut doc, "GET /signals")["cost"] = json!(5);
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        let r = tg
            .client
            .request(method.clone(), tg.url("/admin/config"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&doc)
            .send()
            .await
            .unwrap();
        let (status, ty, _) = problem(r).await;
        assert_eq!(
            (status, ty.as_str()),
            (404, "urn:tollgate:problem:no-route"),
            "{method}"
        );
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(config(&tg).await, before);
}

both!(
    /// An invalid PUT is 400 listing every error with its key path; the running config stays
    /// and no version is stored.
    invalid_put_lists_every_error,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let before = config(&tg).await;
        let mut doc = before["document"].clone();
        route(&mut doc, "GET /signals")["cots"] = json!(3);
        route(&mut doc, "GET /signals")["cost"] = json!(-1);
        route(&mut doc, "export-pdf")["upstream"] = json!("missing");
        doc["routes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"match": "GET /signals", "upstream": "api"}));
        doc["plans"]["pro"]["quotas"]["credits"] = json!({"included": 10});
        doc["proxy"] = json!({"listen": "0.0.0.0:1"});
        let (status, ty, body) = problem(put(&tg, &doc).await).await;
        assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-config"));
        let errors: Vec<(String, String)> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["key"].as_str().unwrap().into(), e["message"].as_str().unwrap().into()))
            .collect();
        let n = doc["routes"].as_array().unwrap().len() - 1;
        for (key, message) in [
            ("routes[0].cots", "unknown key"),
            ("proxy", "changes only by restart (not part of the live config)"),
            ("routes[0].cost", "must be ≥ 0, got -1"),
            ("routes[2].upstream", "unknown upstream \"missing\""),
            (&format!("routes[{n}].name"), "duplicate route name \"GET /signals\" (also routes[0])"),
            ("plans.pro.quotas.credits", "unknown meter \"credits\" (declare it under [meters.credits])"),
        ] {
            assert!(
                errors.iter().any(|(k, m)| k == key && m == message),
                "{key}: {message} not in {errors:#?}"
            );
        }
        // A value of the wrong type is reported with its path, too.
        let mut doc = before["document"].clone();
        route(&mut doc, "GET /signals")["cost"] = json!("five");
        let (status, _, body) = problem(put(&tg, &doc).await).await;
        assert_eq!(status, 400);
        assert_eq!(body["errors"][0]["key"], "routes[0].cost");

        assert_eq!(config(&tg).await, before, "the running config is untouched");
        assert_eq!(version_count(&tg).await, 1, "no version stored");
        assert_eq!(tg.get("/signals", Some("olga")).await.status(), 200);
        assert_eq!(tg.wait_ledger("olga", 1).await, (1, 1), "still charged the old cost");
    }
);

both!(
    /// Concurrent PUTs are all versioned and the last version wins whole: its cost and its
    /// quota together, never one PUT's cost with another's quota.
    concurrent_puts_are_all_versioned_and_the_last_wins,
    |b| {
        let up = Upstream::start().await;
        let tg = Arc::new(Tollgate::start(&roomy(up.addr), b).await);
        let doc = config(&tg).await["document"].clone();
        let mut tasks = Vec::new();
        for i in 1..=8i64 {
            let (tg, mut doc) = (tg.clone(), doc.clone());
            tasks.push(tokio::spawn(async move {
                route(&mut doc, "GET /signals")["cost"] = json!(i);
                doc["plans"]["free"]["quotas"]["api_calls"]["included"] = json!(1000 + i);
                let r = put(&tg, &doc).await;
                assert_eq!(r.status(), 200);
                let v = r.json::<Value>().await.unwrap()["version"].as_i64().unwrap();
                (v, i)
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        let mut versions: Vec<i64> = done.iter().map(|d| d.0).collect();
        versions.sort();
        versions.dedup();
        assert_eq!(versions.len(), 8, "each PUT got its own version");
        assert_eq!(version_count(&tg).await, 9);
        let (last, i) = *done.iter().max().unwrap();
        let now = config(&tg).await;
        assert_eq!(now["version"], last);
        let mut doc = now["document"].clone();
        assert_eq!(route(&mut doc, "GET /signals")["cost"], i);
        assert_eq!(doc["plans"]["free"]["quotas"]["api_calls"]["included"], 1000 + i);
        assert_eq!(tg.get("/signals", Some("pia")).await.status(), 200);
        assert_eq!(tg.wait_ledger("pia", 1).await, (1, i), "charged the last version's cost");
    }
);

both!(
    /// Rollback makes an old version current as a new version; an unknown version is 404.
    /// Every change is in the history and the audit log with its author.
    rollback_history_and_audit,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        let v1 = config(&tg).await["version"].as_i64().unwrap();
        let r = admin(&tg, reqwest::Method::PATCH, &format!("/admin/routes/{SIGNALS}"))
            .await
            .header("x-tollgate-actor", "alice")
            .json(&json!({"cost": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v2: Value = r.json().await.unwrap();
        assert_eq!(v2["author"], "admin:alice");
        assert_eq!(v2["changes"], json!([{"key": "routes.GET /signals.cost", "before": 1, "after": 5}]));

        let (status, ty, _) = problem(
            admin(&tg, reqwest::Method::POST, "/admin/config/rollback/999999")
                .await
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-config-version"));

        let r = admin(&tg, reqwest::Method::POST, &format!("/admin/config/rollback/{v1}"))
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v3: Value = r.json().await.unwrap();
        assert!(v3["version"].as_i64().unwrap() > v2["version"].as_i64().unwrap());
        let mut doc = config(&tg).await["document"].clone();
        assert_eq!(route(&mut doc, "GET /signals")["cost"], 1);
        assert_eq!(tg.get("/signals", Some("quinn")).await.status(), 200);
        assert_eq!(tg.wait_ledger("quinn", 1).await, (1, 1));

        let history = get_json(&tg, "/admin/config/versions").await;
        let listed: Vec<(i64, String)> = history["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["version"].as_i64().unwrap(), v["author"].as_str().unwrap().into()))
            .collect();
        assert_eq!(
            listed,
            vec![
                (v3["version"].as_i64().unwrap(), "admin".to_string()),
                (v2["version"].as_i64().unwrap(), "admin:alice".into()),
                (v1, "file".into()),
            ]
        );
        let mut old = get_json(&tg, &format!("/admin/config/versions/{}", v2["version"])).await;
        assert_eq!(old["author"], "admin:alice");
        assert_eq!(route(&mut old["document"], "GET /signals")["cost"], 5);
        let (status, ty, _) = problem(
            admin(&tg, reqwest::Method::GET, "/admin/config/versions/999999")
                .await
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-config-version"));
        let page = get_json(&tg, "/admin/config/versions?limit=1").await;
        assert_eq!(page["versions"].as_array().unwrap().len(), 1);
        assert_eq!(page["next_before"], v3["version"]);

        let audit = get_json(&tg, "/admin/audit").await;
        let entries = audit["entries"].as_array().unwrap();
        assert_eq!(entries[0]["action"], format!("config.rollback.{v1}"));
        assert_eq!(entries[1]["actor"], "admin:alice");
        assert_eq!(entries[1]["target"], "routes/GET /signals");
        assert_eq!(entries[1]["before"]["cost"], 1);
        assert_eq!(entries[1]["after"]["cost"], 5);
    }
);

both!(
    /// `dry_run=true` answers what would change and changes nothing.
    dry_run_changes_nothing,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let before = config(&tg).await;
        let mut doc = before["document"].clone();
        route(&mut doc, "GET /signals")["cost"] = json!(5);
        doc["plans"]["free"]["features"] = json!(["export_pdf"]);
        let r = admin(&tg, reqwest::Method::PUT, "/admin/config?dry_run=true")
            .await
            .json(&doc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["dry_run"], true);
        assert_eq!(
            body["changes"],
            json!([
                {"key": "plans.free.features", "before": [], "after": ["export_pdf"]},
                {"key": "routes.GET /signals.cost", "before": 1, "after": 5},
            ])
        );
        let r = patch(&tg, "/admin/plans/free?dry_run=true", json!({"rate_per_minute": 1})).await;
        assert_eq!(r.status(), 200);
        assert_eq!(config(&tg).await, before);
        assert_eq!(version_count(&tg).await, 1);
        assert_eq!(tg.get("/signals", Some("rosa")).await.status(), 200);
        assert_eq!(tg.wait_ledger("rosa", 1).await, (1, 1));
    }
);

both!(
    /// PATCH on a plan merges into it (quota tables merge); unknown entries are 404 and a bad
    /// field is 400 with its key.
    patch_plan_merges_and_refuses_bad_input,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let r = patch(&tg, "/admin/plans/free", json!({"quotas": {"api_calls": {"included": 2}}})).await;
        assert_eq!(r.status(), 200);
        for _ in 0..2 {
            assert_eq!(tg.get("/signals", Some("sara")).await.status(), 200);
        }
        let (status, ty, _) = problem(tg.get("/signals", Some("sara")).await).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:quota-exceeded"));
        let mut doc = config(&tg).await["document"].clone();
        assert_eq!(doc["plans"]["free"]["quotas"]["api_calls"], json!({"included": 2, "overage": "deny"}));
        assert_eq!(doc["plans"]["free"]["quotas"]["tokens"]["included"], 100, "other quotas kept");
        assert_eq!(route(&mut doc, "GET /signals")["cost"], 1);

        let (status, ty, _) = problem(patch(&tg, "/admin/plans/nope", json!({"rank": 1})).await).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-plan"));
        let (status, ty, _) = problem(patch(&tg, "/admin/routes/nope", json!({"cost": 1})).await).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-route"));
        let (status, _, body) =
            problem(patch(&tg, "/admin/plans/free", json!({"quotas": {"gold": {"included": 1}}})).await).await;
        assert_eq!(status, 400);
        assert_eq!(body["errors"][0]["key"], "plans.free.quotas.gold");
        assert_eq!(version_count(&tg).await, 2);
    }
);

both!(
    /// The newest stored version is picked up at start (an admin change survives a restart);
    /// a config file changed since it was last loaded is stored as a new version instead.
    restart_keeps_the_newest_version_unless_the_file_changed,
    |b| {
        let up = Upstream::start().await;
        let toml = roomy(up.addr);
        let mut first = Tollgate::start(&toml, b).await;
        let r = patch(&first, &format!("/admin/routes/{SIGNALS}"), json!({"cost": 5})).await;
        assert_eq!(r.status(), 200);
        let v2 = r.json::<Value>().await.unwrap()["version"].clone();
        first.stop().await;

        let mut second = Tollgate::start_with(&toml, b, Some(&first), |_| {}).await;
        let now = config(&second).await;
        assert_eq!(now["version"], v2);
        assert_eq!(second.get("/signals", Some("tina")).await.status(), 200);
        assert_eq!(second.wait_ledger("tina", 1).await, (1, 5));
        second.stop().await;

        let edited = toml.replace("match = \"GET /signals\"\nupstream = \"api\"\ncost = 1", "match = \"GET /signals\"\nupstream = \"api\"\ncost = 3");
        assert_ne!(edited, toml);
        let third = Tollgate::start_with(&edited, b, Some(&first), |_| {}).await;
        let now = config(&third).await;
        assert!(now["version"].as_i64() > v2.as_i64());
        assert_eq!(now["author"], "file");
        assert_eq!(third.get("/signals", Some("ute")).await.status(), 200);
        assert_eq!(third.wait_ledger("ute", 1).await, (1, 3));
    }
);

both!(
    /// `If-Match` with a version no longer in force is 412 and changes nothing; the version in
    /// force (from `ETag`) is accepted. `tollgate_config_version` follows the version in force.
    if_match_refuses_a_stale_change,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        let r = admin(&tg, reqwest::Method::GET, "/admin/config").await.send().await.unwrap();
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let first: Value = r.json().await.unwrap();
        assert_eq!(etag, format!("\"{}\"", first["version"]));
        let r = patch(&tg, &format!("/admin/routes/{SIGNALS}"), json!({"cost": 2})).await;
        assert_eq!(r.status(), 200);
        let second = config(&tg).await;

        let mut doc = first["document"].clone();
        route(&mut doc, "GET /signals")["cost"] = json!(7);
        let stale = admin(&tg, reqwest::Method::PUT, "/admin/config")
            .await
            .header("if-match", &etag)
            .json(&doc)
            .send()
            .await
            .unwrap();
        let (status, ty, _) = problem(stale).await;
        assert_eq!((status, ty.as_str()), (412, "urn:tollgate:problem:config-version-mismatch"));
        assert_eq!(config(&tg).await, second);

        let fresh = admin(&tg, reqwest::Method::PUT, "/admin/config")
            .await
            .header("if-match", format!("\"{}\"", second["version"]))
            .json(&doc)
            .send()
            .await
            .unwrap();
        assert_eq!(fresh.status(), 200);
        let third: Value = fresh.json().await.unwrap();
        let metrics = tg.client.get(tg.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(
            metrics.contains(&format!("\ntollgate_config_version {}\n", third["version"])),
            "{metrics}"
        );
    }
);

both!(
    /// Upstream targets change live: after the PUT, requests go to the new target only. The
    /// document may also be sent as TOML, in the file's own syntax.
    upstream_targets_change_live,
    |b| {
        let (old, new) = (Upstream::start().await, Upstream::start().await);
        let tg = Tollgate::start(&base_config(old.addr), b).await;
        assert_eq!(tg.get("/signals", Some("vera")).await.status(), 200);
        assert_eq!((old.hits(), new.hits()), (1, 0));

        // Only the live sections of the base file, pointed at the new upstream.
        let file = base_config(new.addr);
        let live = &file[file.find("[upstreams.api]").unwrap()..];
        let r = admin(&tg, reqwest::Method::PUT, "/admin/config")
            .await
            .header("content-type", "application/toml")
            .body(live.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["changes"],
            json!([{"key": "upstreams.api.targets", "before": [old.addr.to_string()], "after": [new.addr.to_string()]}])
        );
        for _ in 0..3 {
            assert_eq!(tg.get("/signals", Some("vera")).await.status(), 200);
        }
        assert_eq!((old.hits(), new.hits()), (1, 3));

        // TOML errors carry their keys as well.
        let (status, _, body) = problem(
            admin(&tg, reqwest::Method::PUT, "/admin/config")
                .await
                .header("content-type", "application/toml")
                .body(live.replace("[upstreams.api]", "[upstreams.api]\nweight = 2"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["errors"], json!([{"key": "upstreams.api.weight", "message": "unknown key"}]));
    }
);

/// A change made while Redis is down (its broadcast lost) reaches the other instance once Redis
/// is back: every resubscribe catches up with the ledger's newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_broadcast_is_caught_up_on_resubscribe() {
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
    // B is subscribed: a change reaches it.
    let r = patch(&a, &format!("/admin/routes/{SIGNALS}"), json!({"cost": 2})).await;
    assert_eq!(r.status(), 200);
    let v2 = r.json::<Value>().await.unwrap()["version"].clone();
    let deadline = Instant::now() + Duration::from_secs(2);
    while config(&b).await["version"] != v2 {
        assert!(Instant::now() < deadline, "B never got version {v2}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    redis.shutdown_save().await;
    let r = patch(&a, &format!("/admin/routes/{SIGNALS}"), json!({"cost": 3})).await;
    assert_eq!(r.status(), 200, "a change does not need Redis");
    let v3 = r.json::<Value>().await.unwrap()["version"].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        config(&b).await["version"],
        v2,
        "nothing can reach B while Redis is down"
    );

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while config(&b).await["version"] != v3 {
        assert!(
            Instant::now() < deadline,
            "B did not catch up after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut doc = config(&b).await["document"].clone();
    assert_eq!(route(&mut doc, "GET /signals")["cost"], 3);
}

/// Concurrent PUTs spread over two instances: all versioned, and within a second both
/// instances run the newest version whole (its cost with its quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_on_two_instances_converge_on_the_newest() {
    let up = Upstream::start().await;
    let a = Arc::new(Tollgate::start(&roomy(up.addr), Backend::Shared).await);
    let b =
        Arc::new(Tollgate::start_with(&roomy(up.addr), Backend::Shared, Some(&a), |_| {}).await);
    let doc = config(&a).await["document"].clone();
    let mut tasks = Vec::new();
    for i in 1..=8i64 {
        let tg = if i % 2 == 0 { b.clone() } else { a.clone() };
        let mut doc = doc.clone();
        tasks.push(tokio::spawn(async move {
            route(&mut doc, "GET /signals")["cost"] = json!(i);
            doc["plans"]["free"]["quotas"]["api_calls"]["included"] = json!(1000 + i);
            let r = put(&tg, &doc).await;
            assert_eq!(r.status(), 200);
            (
                r.json::<Value>().await.unwrap()["version"]
                    .as_i64()
                    .unwrap(),
                i,
            )
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let (last, i) = *done.iter().max().unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    for tg in [&a, &b] {
        loop {
            let now = config(tg).await;
            if now["version"] == last {
                let mut doc = now["document"].clone();
                assert_eq!(route(&mut doc, "GET /signals")["cost"], i);
                assert_eq!(
                    doc["plans"]["free"]["quotas"]["api_calls"]["included"],
                    1000 + i
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not on version {last} within 1 s: {now}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(version_count(&a).await, 9);
}

both!(
    /// Admin changes to customers are audited too, with the actor and before/after.
    customer_changes_are_audited,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&base_config(up.addr), b).await;
        assert_eq!(tg.put_customer("wren", json!({"plan": "free"})).await.status(), 200);
        let r = admin(&tg, reqwest::Method::PUT, "/admin/customers/wren")
            .await
            .header("x-tollgate-actor", "bob")
            .json(&json!({"plan": "pro"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let audit = get_json(&tg, "/admin/audit?limit=2").await;
        let e = &audit["entries"];
        assert_eq!(e[0]["action"], "customer.put");
        assert_eq!(e[0]["target"], "customers/wren");
        assert_eq!(e[0]["actor"], "admin:bob");
        assert_eq!((e[0]["before"]["plan"].clone(), e[0]["after"]["plan"].clone()), (json!("free"), json!("pro")));
        assert_eq!((e[1]["actor"].clone(), e[1]["before"].clone()), (json!("admin"), Value::Null));
        let older = get_json(&tg, &format!("/admin/audit?before={}", e[1]["id"])).await;
        assert_eq!(older["entries"][0]["action"], "config.load", "the page continues below");
    }
);

/// An upstream changed live keeps its health check: a dead target added with
/// `health_check_seconds` stops receiving traffic, as it would with the file at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_changed_live_is_health_checked() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    let mut doc = config(&tg).await["document"].clone();
    let dead = free_port();
    doc["upstreams"]["api"] =
        json!({"targets": [dead.to_string(), up.addr.to_string()], "health_check_seconds": 1});
    assert_eq!(put(&tg, &doc).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    'settled: loop {
        for _ in 0..6 {
            if tg.get("/public", None).await.status() != 200 {
                assert!(
                    Instant::now() < deadline,
                    "the dead target still gets traffic"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'settled;
            }
        }
        break;
    }
}
