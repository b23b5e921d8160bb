//! `POST /webhooks/stripe` through a running tollgate: Stripe-shaped events (from the real
//! fixtures in `tests/fixtures/stripe/`) signed with Stripe's scheme, checked against ledger rows,
//! the in-process cache and the next proxied request's decision, on both backends.

use crate::support::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::config::Config;

/// The test configs name an env var `.cargo/config.toml` already sets for every test, so no test
/// mutates the environment: its value is the webhook secret here.
const SECRET_ENV: &str = "TOLLGATE_TEST_JWT_SECRET";
const WHSEC: &str = SECRET;

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"{}
[stripe]
webhook_secrets_env = "{SECRET_ENV}"
customer_metadata_key = "tollgate_customer"

[stripe.prices]
price_free = "free"
price_pro = "pro"
price_tight = "tight"
"#,
        base_config(upstream)
    )
}

/// `pro` outranks `tight` when a subscription carries both.
fn ranks(c: &mut Config) {
    c.plans.get_mut("pro").unwrap().rank = 10;
    c.plans.get_mut("tight").unwrap().rank = 1;
}

async fn start(b: Backend) -> (Upstream, Tollgate) {
    let up = Upstream::start().await;
    let tg = Tollgate::start_with(&config(up.addr), b, None, ranks).await;
    (up, tg)
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/stripe/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A `customer.subscription.*` event: the envelope of the real test-mode event, the subscription
/// object of Stripe's OpenAPI fixture (current API shape: periods on the items), varied.
fn sub_event(
    id: &str,
    kind: &str,
    created: i64,
    customer: &str,
    prices: &[&str],
    status: &str,
) -> String {
    let mut ev = fixture("event_customer.subscription.updated_trialing_to_active.json");
    let mut sub = fixture("openapi_fixtures3_subscription.json");
    let item = sub["items"]["data"][0].clone();
    let start = now() - 86_400;
    sub["items"]["data"] = Value::Array(
        prices
            .iter()
            .map(|p| {
                let mut i = item.clone();
                i["price"]["id"] = json!(p);
                i["current_period_start"] = json!(start);
                i["current_period_end"] = json!(start + 30 * 86_400);
                i
            })
            .collect(),
    );
    sub["metadata"] = json!({ "tollgate_customer": customer });
    sub["status"] = json!(status);
    // The fixture's placeholders say "ends at period end, trial in 2009": a plain subscription.
    sub["cancel_at_period_end"] = json!(false);
    sub["trial_end"] = Value::Null;
    ev["id"] = json!(id);
    ev["type"] = json!(format!("customer.subscription.{kind}"));
    ev["created"] = json!(created);
    ev["api_version"] = json!("2025-03-31.basil");
    ev["data"] = json!({ "object": sub });
    serde_json::to_string_pretty(&ev).unwrap()
}

/// `t=<t>,v1=<hex HMAC-SHA256 of "t.body" keyed with the whole secret>`.
fn signature(body: &str, secret: &str, t: i64) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

async fn post(
    tg: &Tollgate,
    body: impl Into<reqwest::Body>,
    sig: Option<&str>,
) -> reqwest::Response {
    let mut req = tg
        .client
        .post(tg.admin_url("/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(s) = sig {
        req = req.header("stripe-signature", s);
    }
    req.send().await.unwrap()
}

async fn deliver(tg: &Tollgate, body: &str) -> reqwest::Response {
    post(tg, body.to_string(), Some(&signature(body, WHSEC, now()))).await
}

async fn rows(tg: &Tollgate) -> (i64, i64) {
    (
        tg.scalar("SELECT COUNT(*) FROM stripe_events").await,
        tg.scalar("SELECT COUNT(*) FROM customers").await,
    )
}

/// A refused delivery: status, problem type, and nothing written.
async fn refused(tg: &Tollgate, resp: reqwest::Response, status: u16, suffix: &str) {
    let (got, ty, body) = problem(resp).await;
    assert_eq!(
        (got, ty.as_str()),
        (status, format!("urn:tollgate:problem:{suffix}").as_str()),
        "{body}"
    );
    assert_eq!(rows(tg).await, (0, 0));
}

both!(
    /// Must-show: free → pro by webhook, and the very next proxied call on the pro-only route is
    /// allowed (on Shared, a second instance sees it within 1 s).
    upgrade_by_webhook_allows_next_pro_call,
    |b| {
        let (up, tg) = start(b).await;
        let peer = match b {
            Backend::Shared => Some(Tollgate::start_with(&config(up.addr), b, Some(&tg), ranks).await),
            Backend::Embedded => None,
        };
        let t = now();
        let r = deliver(&tg, &sub_event("evt_up_1", "created", t - 60, "acme", &["price_free"], "active")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 403);
        let r = deliver(&tg, &sub_event("evt_up_2", "updated", t, "acme", &["price_pro"], "active")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "applied");
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 200);
        let c = tg.admin_customer("acme").await;
        assert_eq!(c["plan"], "pro");
        assert_eq!(c["status"], "active");
        assert!(c["period_end"].is_string(), "{c}");
        if let Some(peer) = &peer {
            let started = std::time::Instant::now();
            loop {
                if peer.get("/export/pdf", Some("acme")).await.status() == 200 {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(1), "peer did not see the upgrade within 1 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
);

both!(
    /// Several prices: the highest-ranked known plan wins, unknown prices are ignored.
    highest_ranked_price_wins,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_rank", "created", now(), "acme", &["price_tight", "price_unknown", "price_pro"], "active");
        assert_eq!(deliver(&tg, &body).await.status(), 200);
        assert_eq!(tg.admin_customer("acme").await["plan"], "pro");
    }
);

both!(
    /// The same event delivered 10 times concurrently: one event row, applied once.
    concurrent_redeliveries_apply_once,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_dup", "created", now(), "acme", &["price_pro"], "active");
        let sig = signature(&body, WHSEC, now());
        let sends = (0..10).map(|_| post(&tg, body.clone(), Some(&sig)));
        let mut outcomes = Vec::new();
        for r in futures_util::future::join_all(sends).await {
            let status = r.status();
            let answer: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{answer}");
            outcomes.push(answer["outcome"].as_str().unwrap().to_string());
        }
        assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
        assert_eq!(outcomes.iter().filter(|o| *o == "duplicate").count(), 9, "{outcomes:?}");
        assert_eq!(rows(&tg).await, (1, 1));
        assert_eq!(tg.scalar("SELECT COUNT(*) FROM stripe_events WHERE processed_at IS NOT NULL").await, 1);
    }
);

both!(
    /// Events delivered shuffled (a late `updated` after `deleted` included) end where in-order
    /// delivery ends: canceled.
    out_of_order_equals_in_order,
    |b| {
        let (_up, tg) = start(b).await;
        let t = now() - 1000;
        let evs = [
            sub_event("evt_o1", "created", t, "acme", &["price_free"], "trialing"),
            sub_event("evt_o2", "updated", t + 10, "acme", &["price_pro"], "active"),
            sub_event("evt_o3", "updated", t + 20, "acme", &["price_pro"], "past_due"),
            sub_event("evt_o4", "deleted", t + 30, "acme", &["price_pro"], "canceled"),
        ];
        let (_up2, in_order) = start(b).await;
        for e in &evs {
            assert_eq!(deliver(&in_order, e).await.status(), 200);
        }
        for i in [3, 1, 0, 2] {
            assert_eq!(deliver(&tg, &evs[i]).await.status(), 200);
        }
        let (a, z) = (in_order.admin_customer("acme").await, tg.admin_customer("acme").await);
        for k in ["plan", "status", "period_start", "period_end", "updated_at"] {
            assert_eq!(a[k], z[k], "{k}");
        }
        assert_eq!(z["status"], "canceled");
        assert_eq!(tg.get("/signals", Some("acme")).await.status(), 402);
    }
);

both!(
    /// A genuine event of a type tollgate does not handle: 200, stored, processed, nothing applied.
    unknown_event_type_is_acknowledged,
    |b| {
        let (_up, tg) = start(b).await;
        let mut ev: Value = serde_json::from_str(&sub_event("evt_unk", "created", now(), "acme", &["price_pro"], "active")).unwrap();
        ev["type"] = json!("tollgate.test.never_heard_of_it");
        ev["data"] = json!({"object": {"id": "x_1", "object": "mystery"}});
        let r = deliver(&tg, &ev.to_string()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "ignored");
        assert_eq!(rows(&tg).await, (1, 0));
    }
);

both!(
    /// An older API version's shape (pay-rails' real subscription, `plan`/`billing` fields) is read
    /// from the raw JSON and applied, not refused.
    older_api_version_is_applied,
    |b| {
        let (_up, tg) = start(b).await;
        let data = fixture("pay_event_data_customer.subscription.updated.json");
        let mut obj = data["object"].clone();
        obj["metadata"] = json!({"tollgate_customer": "legacy"});
        obj["status"] = json!("active");
        obj["items"]["data"][0]["price"] = json!({"id": "price_pro", "object": "price"});
        let ev = json!({
            "id": "evt_legacy", "object": "event", "api_version": "2018-02-28", "created": now(),
            "type": "customer.subscription.updated", "livemode": false, "pending_webhooks": 1,
            "data": {"object": obj, "previous_attributes": data["previous_attributes"]}
        });
        let r = deliver(&tg, &ev.to_string()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(tg.admin_customer("legacy").await["plan"], "pro");
    }
);

both!(
    /// `cancel_at_period_end` and `trial_end` are kept with the entitlement and shown by the
    /// admin API, while the customer is served on the plan as before (Stripe ends the
    /// subscription with a `deleted` event). A later event that clears them clears them, and an
    /// older one arriving late does not bring them back.
    subscription_terms_are_kept,
    |b| {
        let (_up, tg) = start(b).await;
        let t = now();
        let trial_end = t + 7 * 86_400;
        let event = |id: &str, created: i64, status: &str, cancel: bool, trial: Value| {
            let mut ev: Value = serde_json::from_str(&sub_event(id, "updated", created, "acme", &["price_pro"], status)).unwrap();
            ev["data"]["object"]["cancel_at_period_end"] = json!(cancel);
            ev["data"]["object"]["trial_end"] = trial;
            ev.to_string()
        };
        let ending = event("evt_terms_1", t - 10, "trialing", true, json!(trial_end));
        assert_eq!(deliver(&tg, &ending).await.status(), 200);
        let c = tg.admin_customer("acme").await;
        let expected_trial_end = chrono::DateTime::from_timestamp(trial_end, 0).unwrap();
        assert_eq!(c["cancel_at_period_end"], true, "{c}");
        let got: chrono::DateTime<chrono::Utc> = serde_json::from_value(c["trial_end"].clone()).unwrap();
        assert_eq!(got, expected_trial_end);
        assert_eq!(c["effective_plan"], "pro");
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 200);

        let kept = event("evt_terms_2", t, "active", false, Value::Null);
        assert_eq!(deliver(&tg, &kept).await.status(), 200);
        let late = event("evt_terms_0", t - 20, "trialing", true, json!(trial_end));
        assert_eq!(deliver(&tg, &late).await.status(), 200);
        let c = tg.admin_customer("acme").await;
        assert_eq!((c["cancel_at_period_end"].clone(), c["trial_end"].clone()), (json!(false), Value::Null), "{c}");
        assert_eq!(c["status"], "active");
    }
);

both!(
    /// Signature vectors re-timed to now (t and now shifted together, re-signed) through the
    /// endpoint: single v1, v0 decoy, two v1 (rotation) accepted; v0 only refused.
    retimed_vectors_through_endpoint,
    |b| {
        let (_up, tg) = start(b).await;
        let t = now();
        let body = sub_event("evt_vec", "created", t, "acme", &["price_pro"], "active");
        let good = signature(&body, WHSEC, t);
        let hex = good.split_once(",v1=").unwrap().1;
        let other = signature(&body, "whsec_test_secret_rolled_key", t);
        let other_hex = other.split_once(",v1=").unwrap().1;
        let only_v0 = format!("t={t},v0={hex}");
        refused(&tg, post(&tg, body.clone(), Some(&only_v0)).await, 400, "invalid-signature").await;
        for header in [
            format!("t={t},v1={hex},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"),
            format!("t={t},v1={other_hex},v1={hex}"),
            format!("t={t},v1={hex},v1=bad_signature"),
        ] {
            assert_eq!(post(&tg, body.clone(), Some(&header)).await.status(), 200, "{header}");
        }
        assert_eq!(rows(&tg).await, (1, 1));
    }
);

both!(
    /// No Stripe-Signature header → 400, nothing written.
    missing_header_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_b1", "created", now(), "acme", &["price_pro"], "active");
        refused(&tg, post(&tg, body, None).await, 400, "invalid-signature").await;
    }
);

both!(
    /// Signed with a secret tollgate does not have → 400, nothing written.
    wrong_secret_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_b2", "created", now(), "acme", &["price_pro"], "active");
        let sig = signature(&body, "whsec_wrong_secret", now());
        refused(&tg, post(&tg, body, Some(&sig)).await, 400, "invalid-signature").await;
    }
);

both!(
    /// A correctly signed but 301 s old delivery → 400, nothing written.
    stale_timestamp_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_b3", "created", now(), "acme", &["price_pro"], "active");
        let sig = signature(&body, WHSEC, now() - 301);
        refused(&tg, post(&tg, body, Some(&sig)).await, 400, "invalid-signature").await;
    }
);

both!(
    /// The body changed after signing (pro → team) → 400, nothing written.
    tampered_body_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = sub_event("evt_b4", "created", now(), "acme", &["price_free"], "active");
        let sig = signature(&body, WHSEC, now());
        let tampered = body.replace("price_free", "price_pro");
        refused(&tg, post(&tg, tampered, Some(&sig)).await, 400, "invalid-signature").await;
    }
);

both!(
    /// A correctly signed body that is not JSON → 400, nothing written.
    non_json_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = "this is not json";
        let sig = signature(body, WHSEC, now());
        refused(&tg, post(&tg, body, Some(&sig)).await, 400, "invalid-body").await;
    }
);

both!(
    /// A 5 MiB body (correctly signed) → 413, nothing written.
    five_mib_body_is_refused,
    |b| {
        let (_up, tg) = start(b).await;
        let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(5 * 1024 * 1024));
        let sig = signature(&body, WHSEC, now());
        refused(&tg, post(&tg, body, Some(&sig)).await, 413, "body-too-large").await;
    }
);

/// An invoice event (the real `invoice.payment_failed` envelope, API 2025-03-31 shape) for the
/// subscription of `customer`, varied in id, type and `created`.
fn invoice_event(id: &str, kind: &str, created: i64, customer: &str) -> String {
    let mut ev = fixture("DERIVED_event_invoice.payment_failed_envelope.json");
    ev["id"] = json!(id);
    ev["type"] = json!(format!("invoice.{kind}"));
    ev["created"] = json!(created);
    ev["data"]["object"]["parent"]["subscription_details"]["metadata"] =
        json!({ "tollgate_customer": customer });
    serde_json::to_string_pretty(&ev).unwrap()
}

both!(
    /// `invoice.payment_failed` marks a pro customer past_due: served during the plan's grace
    /// (3 days), 402 payment-required after it; `invoice.paid` brings it back to active.
    payment_failed_is_past_due_then_402_after_grace,
    |b| {
        let (_up, tg) = start(b).await;
        let day = 86_400;
        let t = now();
        deliver(&tg, &sub_event("evt_pf_sub", "created", t - 10 * day, "acme", &["price_pro"], "active")).await;
        let r = deliver(&tg, &invoice_event("evt_pf_1", "payment_failed", t - day, "acme")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "applied");
        assert_eq!(tg.admin_customer("acme").await["status"], "past_due");
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 200, "within the grace");

        // The same failure, seen as having happened five days ago: grace is over.
        deliver(&tg, &sub_event("evt_pf_sub2", "updated", t - 6 * day, "globex", &["price_pro"], "active")).await;
        deliver(&tg, &invoice_event("evt_pf_2", "payment_failed", t - 5 * day, "globex")).await;
        let (status, ty, _) = problem(tg.get("/export/pdf", Some("globex")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));

        deliver(&tg, &invoice_event("evt_pf_3", "paid", t, "globex")).await;
        assert_eq!(tg.admin_customer("globex").await["status"], "active");
        assert_eq!(tg.get("/export/pdf", Some("globex")).await.status(), 200);
    }
);

both!(
    /// A failed invoice older than the subscription's latest state changes nothing, and an
    /// invoice never revives a canceled customer.
    late_or_irrelevant_invoices_change_nothing,
    |b| {
        let (_up, tg) = start(b).await;
        let t = now();
        deliver(&tg, &sub_event("evt_li_sub", "updated", t, "acme", &["price_pro"], "active")).await;
        let r = deliver(&tg, &invoice_event("evt_li_1", "payment_failed", t - 60, "acme")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "stale");
        assert_eq!(tg.admin_customer("acme").await["status"], "active");

        deliver(&tg, &sub_event("evt_li_del", "deleted", t, "gone", &["price_pro"], "canceled")).await;
        let r = deliver(&tg, &invoice_event("evt_li_2", "payment_failed", t + 1, "gone")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "ignored");
        assert_eq!(tg.admin_customer("gone").await["status"], "canceled");
    }
);

/// Any event around `object`, in the real test-mode envelope.
fn event_of(id: &str, event_type: &str, created: i64, object: Value) -> String {
    let mut ev = fixture("event_customer.subscription.updated_trialing_to_active.json");
    ev["id"] = json!(id);
    ev["type"] = json!(event_type);
    ev["created"] = json!(created);
    ev["data"] = json!({ "object": object });
    serde_json::to_string_pretty(&ev).unwrap()
}

/// `event` with its object's tollgate metadata removed and its Stripe customer set to `cus`:
/// what Stripe sends for a subscription made by a Checkout session that set only
/// `client_reference_id`.
fn without_metadata(event: &str, cus: &str) -> String {
    let mut ev: Value = serde_json::from_str(event).unwrap();
    let obj = &mut ev["data"]["object"];
    obj["customer"] = json!(cus);
    if obj["object"] == "invoice" {
        // The real fixture's own subscription metadata, which names no tollgate customer.
        obj["parent"]["subscription_details"]["metadata"] = json!({ "license_id": "0" });
    } else {
        obj["metadata"] = json!({});
    }
    ev.to_string()
}

both!(
    /// A customer linked only through Checkout (`client_reference_id`; no metadata on the
    /// subscription or its invoices) follows its subscription and payments through the stored
    /// link: pro, `invoice.payment_failed` → past_due → 402 after the grace, `invoice.paid` →
    /// active. An event whose Stripe customer nobody links is `unmatched`, counted, and changes
    /// nothing.
    checkout_linked_customer_follows_its_subscription_and_invoices,
    |b| {
        let (_up, tg) = start(b).await;
        let (day, t) = (86_400, now());
        let session = json!({
            "id": "cs_test_only", "object": "checkout.session", "mode": "subscription",
            "client_reference_id": "initech", "customer": "cus_only_checkout",
            "status": "complete", "subscription": "sub_only_checkout",
        });
        let r = deliver(&tg, &event_of("evt_co_chk", "checkout.session.completed", t - 10 * day, session)).await;
        assert_eq!(r.status(), 200);

        let sub = sub_event("evt_co_sub", "created", t - 10 * day + 1, "-", &["price_pro"], "active");
        let r = deliver(&tg, &without_metadata(&sub, "cus_only_checkout")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "applied");
        let c = tg.admin_customer("initech").await;
        assert_eq!((c["plan"].as_str(), c["status"].as_str()), (Some("pro"), Some("active")), "{c}");
        assert_eq!(tg.get("/export/pdf", Some("initech")).await.status(), 200);

        let failed = invoice_event("evt_co_pf", "payment_failed", t - 5 * day, "-");
        let r = deliver(&tg, &without_metadata(&failed, "cus_only_checkout")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "applied");
        assert_eq!(tg.admin_customer("initech").await["status"], "past_due");
        let (status, ty, _) = problem(tg.get("/export/pdf", Some("initech")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));

        let paid = invoice_event("evt_co_paid", "paid", t, "-");
        let r = deliver(&tg, &without_metadata(&paid, "cus_only_checkout")).await;
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "applied");
        assert_eq!(tg.admin_customer("initech").await["status"], "active");
        assert_eq!(tg.get("/export/pdf", Some("initech")).await.status(), 200);

        let stray = invoice_event("evt_co_stray", "payment_failed", t, "-");
        let r = deliver(&tg, &without_metadata(&stray, "cus_nobody_links")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "unmatched");
        let metrics = tg.metrics().await;
        assert!(
            metrics.contains(r#"tollgate_webhooks_total{outcome="unmatched",type="invoice.payment_failed"} 1"#),
            "{metrics}"
        );
        assert_eq!(tg.admin_customer("initech").await["status"], "active");
        // Listed for the operator, with the Stripe customer to link; the applied events are not.
        let list: Value = tg
            .client
            .get(tg.admin_url("/admin/stripe/unmatched"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = list["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{list}");
        assert_eq!(events[0]["id"], "evt_co_stray");
        assert_eq!(events[0]["type"], "invoice.payment_failed");
        assert_eq!(events[0]["stripe_customer"], "cus_nobody_links");
        let r = tg
            .client
            .get(tg.admin_url("/admin/stripe/unmatched?limit=0"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(problem(r).await.1, "urn:tollgate:problem:invalid-query");
    }
);

both!(
    /// A subscription whose metadata names an invalid customer id (a NUL, surrounding control
    /// characters) is acknowledged as `unmatched` and changes nothing; it is not a 503 that
    /// Stripe would retry for days.
    invalid_customer_in_metadata_is_unmatched,
    |b| {
        let (_up, tg) = start(b).await;
        let r = deliver(&tg, &sub_event("evt_bad_id", "created", now(), "bad\u{0}id", &["price_pro"], "active")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "unmatched");
        assert_eq!(rows(&tg).await, (1, 0));
    }
);

/// `stripe.webhook_listen`: a listener of its own that takes signed webhooks (the event is
/// applied: the customer's plan follows) and serves nothing else, so the admin listener can stay
/// private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_their_own_listener() {
    let up = Upstream::start().await;
    let toml =
        config(up.addr).replace("[stripe]\n", "[stripe]\nwebhook_listen = \"127.0.0.1:0\"\n");
    let tg = Tollgate::start_with(&toml, Backend::Embedded, None, ranks).await;
    let hooks = tg.webhooks.expect("webhook listener bound");
    assert_ne!(hooks, tg.admin);
    let url = |path: &str| format!("http://{hooks}{path}");
    let body = sub_event(
        "evt_own_listener",
        "created",
        now(),
        "hook-co",
        &["price_pro"],
        "active",
    );
    let r = tg
        .client
        .post(url("/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", signature(&body, WHSEC, now()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(tg.admin_customer("hook-co").await["plan"], "pro");
    // Unsigned: refused, as on the admin listener.
    let r = tg
        .client
        .post(url("/webhooks/stripe"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r).await.0, 400);
    // Nothing else lives there.
    for path in ["/metrics", "/readyz", "/admin/customers/hook-co"] {
        let r = tg
            .client
            .get(url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}
