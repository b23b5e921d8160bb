//! Usage reported as events (issue 14): `POST /v1/events` counts each CloudEvent once by
//! (source, id) toward the customer's counter and the ledger, answers each event's outcome, and
//! reaches Stripe like proxied usage.

use crate::support::stripe::{StripeStandIn, KEY_ENV};
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

/// The standard config with an `sms` meter: 10 included on free (deny), 100 on pro then 5,000
/// micros each; `/v1/events` also takes the metrics token of the test env.
fn config(upstream: std::net::SocketAddr) -> String {
    base_config(upstream)
        .replace("[meters.tokens]\n", "[meters.tokens]\n[meters.sms]\n")
        .replace(
            "quotas.tokens = { included = 100, overage = \"deny\" }\n",
            "quotas.tokens = { included = 100, overage = \"deny\" }\nquotas.sms = { included = 10, overage = \"deny\" }\n",
        )
        .replace(
            "[plans.pro]\n",
            "[plans.pro]\nquotas.sms = { included = 100, overage = \"allow\", unit_price_micros = 5000 }\n",
        )
        .replace(
            "[admin]\n",
            "[admin]\ningest_token_env = \"TOLLGATE_TEST_METRICS_TOKEN\"\n",
        )
}

fn sms(id: &str, customer: &str, value: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "//messaging/sms",
        "type": "sms",
        "subject": customer,
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"value": value, "country": "FR"},
    })
}

async fn send(tg: &Tollgate, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = tg.client.post(tg.admin_url("/v1/events")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn sms_used(customer: &Value) -> i64 {
    customer["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "sms")
        .map(|m| m["used"].as_i64().unwrap())
        .unwrap()
}

both!(
    /// A batch: valid events are counted once each, in order, toward the plan's limit (the one
    /// that passes a deny limit is recorded as `over_limit`, and the next call is refused); each
    /// invalid one is rejected with its code while the others apply; the same batch again is
    /// all duplicates and changes nothing.
    events_count_once_with_a_code_for_each_refusal,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        let now = chrono::Utc::now();
        let mut old = sms("e-old", "ada", json!(1));
        old["time"] = json!((now - chrono::Duration::days(36)).to_rfc3339());
        let mut ahead = sms("e-ahead", "ada", json!(1));
        ahead["time"] = json!((now + chrono::Duration::minutes(10)).to_rfc3339());
        let mut unknown = sms("e-meter", "ada", json!(1));
        unknown["type"] = json!("fax");
        let mut no_value = sms("e-novalue", "ada", json!(1));
        no_value["data"] = json!({"country": "FR"});
        let batch = json!([
            sms("e1", "ada", json!(3)),
            sms("e2", "ada", json!(4)),
            sms("e1", "ada", json!(3)),
            sms("e3", "ada", json!(3)),
            sms("e4", "ada", json!(2)),
            sms("e-str", "ada", json!("two")),
            sms("e-frac", "ada", json!(1.5)),
            sms("e-neg", "ada", json!(-1)),
            sms("e-big", "ada", json!(10_000_000_000i64)),
            sms("e-nobody", "", json!(1)),
            old,
            ahead,
            unknown,
            no_value,
            "not an event",
        ]);
        let r = send(&tg, Some(ADMIN_TOKEN), &batch).await;
        assert_eq!(r.status(), 200);
        let out: Value = r.json().await.unwrap();
        let outcome = |i: usize| {
            let e = &out["events"][i];
            (e["outcome"].as_str().unwrap().to_string(), e["code"].as_str().map(String::from))
        };
        let want: [(&str, Option<&str>); 15] = [
            ("accepted", None),
            ("accepted", None),
            ("duplicate", Some("duplicate-in-batch")),
            ("accepted", None),
            ("over_limit", None),
            ("rejected", Some("invalid-value")),
            ("rejected", Some("invalid-value")),
            ("rejected", Some("negative-value")),
            ("rejected", Some("value-too-large")),
            ("rejected", Some("invalid-customer")),
            ("rejected", Some("too-old")),
            ("rejected", Some("in-the-future")),
            ("rejected", Some("unknown-meter")),
            ("rejected", Some("invalid-value")),
            ("rejected", Some("invalid-event")),
        ];
        for (i, (o, c)) in want.iter().enumerate() {
            assert_eq!(outcome(i), (o.to_string(), c.map(String::from)), "event {i}: {out}");
        }
        assert_eq!(out["events"][3]["used"], 10, "at the limit, not past it");
        assert_eq!(out["events"][4]["used"], 12, "past it: recorded all the same");
        assert_eq!(
            (out["accepted"].as_u64(), out["over_limit"].as_u64(), out["duplicates"].as_u64(), out["rejected"].as_u64()),
            (Some(3), Some(1), Some(1), Some(10))
        );
        assert_eq!(tg.wait_ledger("ada", 4).await, (4, 12));
        assert_eq!(sms_used(&tg.admin_json("/admin/customers/ada").await), 12);
        // The customer sees the limit spent.
        let own: Value = tg.get("/_tollgate/usage", Some("ada")).await.json().await.unwrap();
        let sms_own = own["usage"].as_array().unwrap().iter().find(|m| m["meter"] == "sms").unwrap().clone();
        assert_eq!((sms_own["used"].as_i64(), sms_own["remaining"].as_i64()), (Some(12), Some(0)), "{own}");
        let usage = tg.admin_json("/admin/usage?customer=ada&group_by=route").await;
        assert!(usage.to_string().contains("_tollgate/events"), "{usage}");

        // Again: every valid event is a duplicate; nothing changes.
        let again: Value = send(&tg, Some(ADMIN_TOKEN), &batch).await.json().await.unwrap();
        assert_eq!((again["accepted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(5)), "{again}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(tg.ledger_usage("ada").await, (4, 12));
        assert_eq!(sms_used(&tg.admin_json("/admin/customers/ada").await), 12);

        // Its own token opens /v1/events and nothing else; no token opens nothing.
        let metrics_token = "tollgate-test-metrics-token";
        let r = send(&tg, Some(metrics_token), &json!([sms("b1", "bob", json!(1))])).await;
        assert_eq!(r.status(), 200);
        let (status, ty, _) = problem(send(&tg, None, &json!([])).await).await;
        assert_eq!((status, ty.as_str()), (401, "urn:tollgate:problem:admin-unauthorized"));
        let r = tg.client.get(tg.admin_url("/admin/customers/bob")).bearer_auth(metrics_token).send().await.unwrap();
        assert_eq!(r.status(), 401);

        // Whole-batch refusals.
        let r = tg.client.post(tg.admin_url("/v1/events")).bearer_auth(ADMIN_TOKEN).body("{oops").send().await.unwrap();
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-body"));
        let big: Vec<Value> = (0..1001).map(|i| sms(&format!("x{i}"), "bob", json!(1))).collect();
        let (status, _, p) = problem(send(&tg, Some(ADMIN_TOKEN), &json!(big)).await).await;
        assert_eq!(status, 400, "{p}");
        assert_eq!(tg.ledger_usage("bob").await, (1, 1), "nothing of a refused batch applied");
    }
);

/// Must-show 2 of issue 14: 10,000 events from 4 concurrent clients, 10 % of them
/// duplicates of another client's: the ledger, the counters and Stripe's meter events all
/// hold exactly the distinct events' units.
/// (Redis and Postgres only: the embedded store is exact by construction, and the test is the
/// heaviest of the suite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_with_duplicates_reach_ledger_counters_and_stripe_once() {
    let b = Backend::Shared;
    let stripe = StripeStandIn::start().await;
    let up = Upstream::start().await;
    let toml = format!(
        "{}\n[stripe]\nsecret_key_env = \"{KEY_ENV}\"\napi_base = \"{}\"\nreport_interval = \"200ms\"\nreport_window = \"60s\"\nreport_delay = \"0s\"\nsync_interval = \"0s\"\n",
        config(up.addr),
        stripe.url()
    );
    let tg = Tollgate::start_with(&toml, b, None, |c| {
        c.meters.get_mut("sms").unwrap().stripe_event_name = Some("tg_sms".into());
    })
    .await;
    let customers: Vec<String> = (0..10).map(|i| format!("tenant{i}")).collect();
    for c in &customers {
        assert_eq!(
            tg.put_customer(c, json!({"plan": "pro"})).await.status(),
            200
        );
        let r = tg
            .client
            .put(tg.admin_url(&format!("/admin/customers/{c}/stripe")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"stripe_customer": format!("cus_{c}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // 9,000 distinct events; each client sends its 2,250 and 250 of the next client's.
    let event = |n: usize| {
        sms(
            &format!("m{n}"),
            &customers[n % 10],
            json!(1 + (n % 5) as i64),
        )
    };
    let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
    for n in 0..9000 {
        *expected.entry(customers[n % 10].clone()).or_default() += 1 + (n % 5) as i64;
    }
    let mut clients = Vec::new();
    for k in 0..4usize {
        let mut mine: Vec<Value> = (k * 2250..(k + 1) * 2250).map(event).collect();
        let next = (k + 1) % 4;
        mine.extend((next * 2250..next * 2250 + 250).map(event));
        let (client, url) = (tg.client.clone(), tg.admin_url("/v1/events"));
        clients.push(tokio::spawn(async move {
            let mut counts = (0u64, 0u64);
            for chunk in mine.chunks(250) {
                let out: Value = client
                    .post(&url)
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&chunk)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                counts.0 += out["accepted"].as_u64().unwrap();
                counts.1 += out["duplicates"].as_u64().unwrap();
            }
            counts
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for c in clients {
        let (a, d) = c.await.unwrap();
        accepted += a;
        duplicates += d;
    }
    assert_eq!((accepted, duplicates), (9000, 1000));
    for c in &customers {
        let want = expected[c];
        assert_eq!(tg.ledger_usage(c).await, (900, want), "{c} in the ledger");
        assert_eq!(
            sms_used(&tg.admin_json(&format!("/admin/customers/{c}")).await),
            want,
            "{c}'s counter"
        );
        if b == Backend::Shared {
            assert_eq!(tg.redis_used(c, "sms").await, Some(want), "{c} in Redis");
        }
    }
    // Stripe gets exactly those units, per customer.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut sent: std::collections::BTreeMap<String, i64> = Default::default();
        for a in stripe.applied().values() {
            assert_eq!(a.event_name, "tg_sms");
            *sent
                .entry(a.customer.trim_start_matches("cus_").to_string())
                .or_default() += a.value;
        }
        if sent == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reported {sent:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An event the ledger refuses is not counted and the batch is a 503 problem listing every
/// event's outcome; sent again once the ledger takes it, it counts, and the rest are
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_ledger_refuses_is_retried_by_the_client() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&config(up.addr), Backend::Shared).await;
    let pg = tg.pg().await;
    sqlx::query(
        "ALTER TABLE ingested_events ADD CONSTRAINT test_refuses CHECK (id NOT LIKE 'refused-%')",
    )
    .execute(&pg)
    .await
    .unwrap();
    let batch = json!([
        sms("ok-1", "cy", json!(2)),
        sms("refused-1", "cy", json!(3))
    ]);
    let r = send(&tg, Some(ADMIN_TOKEN), &batch).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, ty, p) = problem(r).await;
    assert_eq!(
        (status, ty.as_str()),
        (503, "urn:tollgate:problem:ledger-unavailable")
    );
    let outcomes: Vec<&str> = p["batch"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["accepted", "error"], "{p}");
    assert_eq!(tg.ledger_usage("cy").await, (1, 2));
    assert_eq!(sms_used(&tg.admin_json("/admin/customers/cy").await), 2);

    sqlx::query("ALTER TABLE ingested_events DROP CONSTRAINT test_refuses")
        .execute(&pg)
        .await
        .unwrap();
    let again: Value = send(&tg, Some(ADMIN_TOKEN), &batch)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "{again}"
    );
    assert_eq!(tg.ledger_usage("cy").await, (2, 5));
    assert_eq!(sms_used(&tg.admin_json("/admin/customers/cy").await), 5);
}

/// The messaging plan of the scenario: voice minutes (20 included, then 10,000 micros a
/// minute), SMS (5, then 2,000 each) and 2FA attempts as the proxied `GET /signals` (3, then
/// 500 each).
fn messaging(upstream: std::net::SocketAddr) -> String {
    config(upstream).replace("[meters.sms]\n", "[meters.sms]\n[meters.voice_minutes]\n")
        + r#"
[plans.messaging]
quotas.voice_minutes = { included = 20, overage = "allow", unit_price_micros = 10000 }
quotas.sms = { included = 5, overage = "allow", unit_price_micros = 2000 }
quotas.api_calls = { included = 3, overage = "allow", unit_price_micros = 500 }
quotas.tokens = { unlimited = true }
"#
}

async fn v1(tg: &Tollgate, path: &str, body: Value) -> reqwest::Response {
    tg.client
        .post(tg.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn meter<'a>(customer: &'a Value, name: &str) -> &'a Value {
    customer["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == name)
        .unwrap()
}

both!(
    /// Must-show 1 of issue 14 (the messaging API): voice minutes reserved at call start and
    /// committed at hang-up (more, less, released, expired), SMS counted in batches through
    /// `/v1/events`, 2FA attempts as a proxied route; `GET /admin/customers/{id}` shows exactly
    /// the used, remaining and overage micros the test computes.
    messaging_api_minutes_sms_and_2fa_on_one_plan,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&messaging(up.addr), b).await;
        assert_eq!(tg.put_customer("telco", json!({"plan": "messaging"})).await.status(), 200);
        let reserve = |units: i64, ttl: u64| {
            json!({"customer": "telco", "meter": "voice_minutes", "units": units, "reserve": true, "ttl": ttl})
        };
        let hold = |r: Value| r["reservation"]["id"].as_str().unwrap().to_string();
        // Call 1: 10 held, 7 used.
        let r: Value = v1(&tg, "/v1/check", reserve(10, 600)).await.json().await.unwrap();
        assert_eq!((r["allowed"].as_bool(), r["used"].as_u64(), r["remaining"].as_u64()), (Some(true), Some(10), Some(10)), "{r}");
        let call1 = hold(r);
        let c: Value = v1(&tg, &format!("/v1/reservations/{call1}/commit"), json!({"units": 7})).await.json().await.unwrap();
        assert_eq!((c["charged"].as_i64(), c["used"].as_u64()), (Some(7), Some(7)), "{c}");
        // Twice is refused; nothing charged twice.
        let (s, ty, _) = problem(v1(&tg, &format!("/v1/reservations/{call1}/commit"), json!({"units": 7})).await).await;
        assert_eq!((s, ty.as_str()), (409, "urn:tollgate:problem:reservation-settled"));
        // Call 2: 10 held, 15 used (past included: overage).
        let call2 = hold(v1(&tg, "/v1/check", reserve(10, 600)).await.json().await.unwrap());
        let c: Value = v1(&tg, &format!("/v1/reservations/{call2}/commit"), json!({"units": 15})).await.json().await.unwrap();
        assert_eq!(c["used"], 22, "{c}");
        // Call 3: never connected, released.
        let call3 = hold(v1(&tg, "/v1/check", reserve(5, 600)).await.json().await.unwrap());
        let rel: Value = v1(&tg, &format!("/v1/reservations/{call3}/release"), json!({})).await.json().await.unwrap();
        assert_eq!((rel["charged"].as_i64(), rel["used"].as_u64()), (Some(0), Some(22)), "{rel}");
        // Call 4: the app dies; the TTL gives the units back, and a late commit charges nothing.
        let call4 = hold(v1(&tg, "/v1/check", reserve(5, 1)).await.json().await.unwrap());
        assert_eq!(meter(&tg.admin_json("/admin/customers/telco").await, "voice_minutes")["used"], 27);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while meter(&tg.admin_json("/admin/customers/telco").await, "voice_minutes")["used"] != 22 {
            assert!(std::time::Instant::now() < deadline, "the expired reservation is still held");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, ty, _) = problem(v1(&tg, &format!("/v1/reservations/{call4}/commit"), json!({"units": 5})).await).await;
        assert_eq!((s, ty.as_str()), (409, "urn:tollgate:problem:reservation-expired"));
        let (s, ty, _) = problem(v1(&tg, &format!("/v1/reservations/{}/commit", uuid::Uuid::now_v7()), json!({"units": 1})).await).await;
        assert_eq!((s, ty.as_str()), (404, "urn:tollgate:problem:unknown-reservation"));
        let (s, ty, _) = problem(v1(&tg, "/v1/reservations/not-an-id/release", json!({})).await).await;
        assert_eq!((s, ty.as_str()), (404, "urn:tollgate:problem:unknown-reservation"));

        // SMS in two batches: 8 in all.
        for (batch, ids) in [(0, 0..5), (1, 5..8)] {
            let events: Vec<Value> = ids.map(|i| sms(&format!("sms-{batch}-{i}"), "telco", json!(1))).collect();
            let out: Value = v1(&tg, "/v1/events", json!(events)).await.json().await.unwrap();
            assert_eq!(out["rejected"], 0, "{out}");
        }
        // 2FA attempts: 5 proxied calls.
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("telco")).await.status(), 200);
        }

        let c = tg.admin_json("/admin/customers/telco").await;
        for (name, used, remaining, over_units, over_micros) in [
            ("voice_minutes", 22, 0, 2, 20_000),
            ("sms", 8, 0, 3, 6_000),
            ("api_calls", 5, 0, 2, 1_000),
        ] {
            let m = meter(&c, name);
            assert_eq!(
                (m["used"].as_i64(), m["remaining"].as_i64(), m["overage_units"].as_i64(), m["overage_amount_micros"].as_i64()),
                (Some(used), Some(remaining), Some(over_units), Some(over_micros)),
                "{name}: {m}"
            );
        }
        // The ledger holds what was charged: 7 + 15 minutes, 8 SMS, 5 calls.
        assert_eq!(tg.wait_ledger("telco", 2 + 8 + 5).await, (2 + 8 + 5, 22 + 8 + 5));

        // Checks without holding, and refusals.
        let peek: Value = v1(&tg, "/v1/check", json!({"customer": "telco", "meter": "voice_minutes", "units": 3})).await.json().await.unwrap();
        assert_eq!((peek["allowed"].as_bool(), peek["used"].as_u64()), (Some(true), Some(22)), "overage allowed: {peek}");
        let free: Value = v1(&tg, "/v1/check", json!({"customer": "newbie", "meter": "sms", "units": 11})).await.json().await.unwrap();
        assert_eq!((free["allowed"].as_bool(), free["reason"].as_str(), free["plan"].as_str()), (Some(false), Some("quota-exceeded"), Some("free")), "{free}");
        let gated: Value = v1(&tg, "/v1/check", json!({"customer": "newbie", "meter": "sms", "units": 1, "feature": "export_pdf"})).await.json().await.unwrap();
        assert_eq!(gated["reason"], "feature-not-in-plan");
        assert_eq!(tg.put_customer("gone", json!({"plan": "messaging", "status": "canceled"})).await.status(), 200);
        let gone: Value = v1(&tg, "/v1/check", json!({"customer": "gone", "meter": "sms", "units": 1, "reserve": true})).await.json().await.unwrap();
        assert_eq!((gone["allowed"].as_bool(), gone["reason"].as_str()), (Some(false), Some("payment-required")), "{gone}");
        for bad in [
            json!({"customer": "telco", "meter": "fax", "units": 1}),
            json!({"customer": "telco", "meter": "sms", "units": -1}),
            json!({"customer": "telco", "meter": "sms", "units": 1, "ttl": 0}),
            json!({"customer": "", "meter": "sms", "units": 1}),
            json!({"customer": "telco", "meter": "sms"}),
        ] {
            let (s, ty, _) = problem(v1(&tg, "/v1/check", bad.clone()).await).await;
            assert_eq!((s, ty.as_str()), (400, "urn:tollgate:problem:invalid-body"), "{bad}");
        }
    }
);
