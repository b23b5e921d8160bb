//! Self-service billing on the proxy listener (issue 13): the offered plans, a Checkout that
//! lifts a free customer's 429, a plan change and a cancellation through the Stripe stand-in,
//! and every refusal (bad input, Stripe's errors) with nothing changed.

use crate::support::stripe::{sign_webhook, Fault, StripeStandIn, KEY_ENV};
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const SUBSCRIPTIONS: &str = "/v1/subscriptions";
const CHECKOUT: &str = "/v1/checkout/sessions";
/// `.cargo/config.toml` sets it for every test: its value is the webhook secret here.
const WHSEC_ENV: &str = "TOLLGATE_TEST_JWT_SECRET";

/// The standard plans, offered: free (public, no price), pro (public, price_pro), starter (a
/// new public plan, price_starter), tight (not offered).
fn plans(upstream: std::net::SocketAddr) -> String {
    base_config(upstream)
        .replace(
            "[plans.free]\n",
            "[plans.free]\npublic = true\ntitle = \"Free\"\nprice_micros = 0\n",
        )
        .replace(
            "[plans.pro]\n",
            "[plans.pro]\npublic = true\ntitle = \"Pro\"\ndescription = \"For production\"\n\
             price_micros = 49000000\nstripe_price = \"price_pro\"\nrank = 10\n",
        )
        .replace(
            "[plans.tight]\n",
            "[plans.tight]\nstripe_price = \"price_tight\"\n",
        )
        + r#"
[plans.starter]
public = true
title = "Starter"
price_micros = 9000000
currency = "usd"
stripe_price = "price_starter"
rank = 5
quotas.api_calls = { included = 100, overage = "deny" }
quotas.tokens = { included = 100, overage = "deny" }
"#
}

fn config(upstream: std::net::SocketAddr, stripe: &StripeStandIn) -> String {
    format!(
        r#"{}
[stripe]
secret_key_env = "{KEY_ENV}"
webhook_secrets_env = "{WHSEC_ENV}"
api_base = "{}"
sync_interval = "0s"
redirect_hosts = ["app.example.com"]
"#,
        plans(upstream),
        stripe.url()
    )
}

/// Starts tollgate and waits for its start-up reconciliation (an empty listing) to finish.
async fn start(b: Backend, stripe: &StripeStandIn) -> (Upstream, Tollgate) {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&config(up.addr, stripe), b).await;
    for _ in 0..100 {
        if stripe.calls(SUBSCRIPTIONS).iter().any(|c| c.status == 200) {
            return (up, tg);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no start-up reconciliation");
}

/// A self-service call as `customer`.
async fn call(
    tg: &Tollgate,
    method: reqwest::Method,
    path: &str,
    customer: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = tg
        .client
        .request(method, tg.url(path))
        .bearer_auth(token(customer));
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn post(tg: &Tollgate, path: &str, customer: &str, body: Value) -> reqwest::Response {
    call(tg, reqwest::Method::POST, path, customer, Some(body)).await
}

async fn usage(tg: &Tollgate, customer: &str) -> Value {
    let r = tg.get("/_tollgate/usage", Some(customer)).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Delivers one signed event with `object` as `data.object`; the status.
async fn deliver(tg: &Tollgate, id: &str, kind: &str, object: &Value) -> u16 {
    let now = chrono::Utc::now().timestamp();
    deliver_at(tg, id, kind, object, now).await.0
}

/// The same with the event's `created`; the status and the answer (its `outcome`).
async fn deliver_at(
    tg: &Tollgate,
    id: &str,
    kind: &str,
    object: &Value,
    created: i64,
) -> (u16, Value) {
    let now = chrono::Utc::now().timestamp();
    let body = json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": created,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind,
        "data": {"object": object},
    })
    .to_string();
    let r = tg
        .client
        .post(tg.admin_url("/webhooks/stripe"))
        .header("stripe-signature", sign_webhook(&body, SECRET, now))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Stripe's invoice fixture as `id` of `stripe_customer`, `status`, `due` cents, `created`.
fn invoice(id: &str, stripe_customer: &str, status: &str, due: i64, created: i64) -> Value {
    let path = format!(
        "{}/tests/fixtures/stripe/openapi_fixtures3_invoice.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut inv: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let paid = if status == "paid" { due } else { 0 };
    for (k, v) in [
        ("id", json!(id)),
        ("customer", json!(stripe_customer)),
        ("status", json!(status)),
        ("number", json!(format!("TG-{id}"))),
        ("amount_due", json!(due)),
        ("amount_paid", json!(paid)),
        ("amount_remaining", json!(due - paid)),
        ("total", json!(due)),
        ("created", json!(created)),
        ("period_start", json!(created - 30 * 86_400)),
        ("period_end", json!(created)),
        (
            "hosted_invoice_url",
            json!(format!("https://invoice.stripe.com/i/{id}")),
        ),
    ] {
        inv[k] = v;
    }
    inv["parent"] = json!({"type": "subscription_details", "quote_details": null,
        "subscription_details": {"metadata": {}, "subscription": "sub_standin1"}});
    inv
}

fn param<'a>(call: &'a crate::support::stripe::Call, k: &str) -> Option<&'a str> {
    call.param(k)
}

/// Opens a checkout of `plan` for `customer`, completes it in the stand-in and delivers the
/// two webhooks Stripe sends; the subscription id.
async fn subscribe(tg: &Tollgate, stripe: &StripeStandIn, customer: &str, plan: &str) -> String {
    let r = post(
        tg,
        "/_tollgate/checkout",
        customer,
        json!({"plan": plan, "success_url": "https://app.example.com/thanks"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let session: Value = r.json().await.unwrap();
    let (completed, sub) = stripe.complete_checkout(session["id"].as_str().unwrap());
    let n = uuid::Uuid::now_v7().simple();
    assert_eq!(
        deliver(
            tg,
            &format!("evt_cs_{n}"),
            "checkout.session.completed",
            &completed
        )
        .await,
        200
    );
    assert_eq!(
        deliver(
            tg,
            &format!("evt_sc_{n}"),
            "customer.subscription.created",
            &sub
        )
        .await,
        200
    );
    sub["id"].as_str().unwrap().to_string()
}

/// The offered plans need no token, revalidate by ETag, and mark the caller's plan when a
/// token is sent; a bad token is 401. Without `[stripe]` every change is
/// `stripe-not-configured`, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_are_offered_without_stripe() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&plans(up.addr), Backend::Embedded).await;
    let r = tg.get("/_tollgate/plans", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "public, max-age=60");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    let names: Vec<&str> = body["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["free", "starter", "pro"],
        "by rank; tight is not offered: {body}"
    );
    assert!(body.get("current_plan").is_none(), "{body}");
    let pro = &body["plans"][2];
    assert_eq!(pro["title"], "Pro");
    assert_eq!(pro["description"], "For production");
    assert_eq!(
        pro["price"],
        json!({"amount_micros": 49_000_000u64, "currency": "usd", "interval": "month"})
    );
    assert_eq!(
        pro["purchasable"], false,
        "no [stripe]: nothing can be bought here"
    );
    assert_eq!(pro["features"], json!(["export_pdf"]));
    let api_calls = pro["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["meter"] == "api_calls")
        .unwrap();
    assert_eq!(
        *api_calls,
        json!({"meter": "api_calls", "included": 1000, "unlimited": false, "overage": "allow", "unit_price_micros": 20000})
    );
    let free = &body["plans"][0];
    assert_eq!(
        (free["default"].as_bool(), free["purchasable"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(free["rate"], json!({"per_minute": 600, "burst": 600}));

    let again = tg
        .client
        .get(tg.url("/_tollgate/plans"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], etag.as_str());

    let mine = tg.get("/_tollgate/plans", Some("ada")).await;
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.headers()["cache-control"], "private, no-cache");
    let mine: Value = mine.json().await.unwrap();
    assert_eq!(mine["current_plan"], "free");
    assert_eq!(mine["plans"][0]["current"], true);
    assert!(mine["plans"][1].get("current").is_none());
    let (status, ty, _) = problem(tg.get_with_token("/_tollgate/plans", "not.a.jwt").await).await;
    assert_eq!(
        (status, ty.as_str()),
        (401, "urn:tollgate:problem:invalid-token")
    );

    let (status, ty, p) = problem(
        post(
            &tg,
            "/_tollgate/checkout",
            "ada",
            json!({"plan": "pro", "success_url": "https://app.example.com/"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, ty.as_str()),
        (404, "urn:tollgate:problem:stripe-not-configured"),
        "{p}"
    );
    let (status, ty, _) = problem(
        call(
            &tg,
            reqwest::Method::DELETE,
            "/_tollgate/subscription",
            "ada",
            None,
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, ty.as_str()),
        (404, "urn:tollgate:problem:stripe-not-configured")
    );
    let r = tg.get("/_tollgate/invoices", Some("ada")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"invoices": [], "next": null})
    );
    let r = call(
        &tg,
        reqwest::Method::PUT,
        "/_tollgate/checkout",
        "ada",
        None,
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["allow"].to_str().unwrap()),
        (405, "POST")
    );
    assert_eq!(
        up.hits(),
        0,
        "self-service billing never reaches the upstream"
    );
    // Provisioning without Stripe: the customer only.
    let r = tg
        .client
        .post(tg.admin_url("/admin/customers"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"id": "zoe", "email": "zoe@example.test", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": "zoe", "plan": "pro", "stripe_customer": null, "created": true})
    );
    assert_eq!(usage(&tg, "zoe").await["plan"], "pro");
    // The summary works without Stripe: no invoices, zoe's plan priced.
    let s: Value = tg.admin_json("/admin/billing/summary").await;
    assert_eq!(s["invoices"], json!([]), "{s}");
    assert_eq!(
        s["mrr"],
        json!([{"currency": "usd", "amount_micros": 49_000_000, "subscriptions": 1}])
    );
    assert_eq!(tg.ledger_usage("ada").await.0, 0);
}

both!(
    /// Must-show 1 of issue 13: a free customer at its quota opens a checkout, pays, and the
    /// next call is served on pro; then a downgrade to starter and a cancellation at the
    /// period's end, each in `/_tollgate/usage` at once and in the calls Stripe received.
    checkout_then_downgrade_then_cancel,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let offered: Value = tg.get("/_tollgate/plans", None).await.json().await.unwrap();
        assert_eq!(offered["plans"][2]["name"], "pro");
        assert_eq!(offered["plans"][2]["purchasable"], true, "{offered}");
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("ada")).await.status(), 200);
        }
        assert_eq!(tg.get("/signals", Some("ada")).await.status(), 429);

        let r = post(
            &tg,
            "/_tollgate/checkout",
            "ada",
            json!({"plan": "pro", "success_url": "https://app.example.com/thanks?s={CHECKOUT_SESSION_ID}", "cancel_url": "https://app.example.com/pricing"}),
        )
        .await;
        assert_eq!(r.status(), 201);
        let session: Value = r.json().await.unwrap();
        assert_eq!(session["plan"], "pro");
        let id = session["id"].as_str().unwrap();
        assert_eq!(session["url"], format!("https://checkout.stripe.com/c/pay/{id}"));
        let calls = stripe.calls(CHECKOUT);
        assert_eq!(calls.len(), 1);
        let c = &calls[0];
        for (k, v) in [
            ("mode", "subscription"),
            ("line_items[0][price]", "price_pro"),
            ("line_items[0][quantity]", "1"),
            ("client_reference_id", "ada"),
            ("metadata[tollgate_customer]", "ada"),
            ("subscription_data[metadata][tollgate_customer]", "ada"),
            ("success_url", "https://app.example.com/thanks?s={CHECKOUT_SESSION_ID}"),
            ("cancel_url", "https://app.example.com/pricing"),
        ] {
            assert_eq!(param(c, k), Some(v), "{k} in {c:?}");
        }
        assert_eq!(param(c, "customer"), None, "a first checkout has no Stripe customer yet");

        let (completed, sub) = stripe.complete_checkout(id);
        assert_eq!(deliver(&tg, "evt_cs_1", "checkout.session.completed", &completed).await, 200);
        assert_eq!(deliver(&tg, "evt_sc_1", "customer.subscription.created", &sub).await, 200);
        assert_eq!(tg.get("/signals", Some("ada")).await.status(), 200, "served on pro at once");
        let u = usage(&tg, "ada").await;
        assert_eq!((u["plan"].as_str(), u["status"].as_str()), (Some("pro"), Some("active")), "{u}");
        let sub_id = sub["id"].as_str().unwrap();

        // A second checkout while subscribed is refused, pointing at the plan change.
        let (status, ty, p) = problem(
            post(&tg, "/_tollgate/checkout", "ada", json!({"plan": "starter", "success_url": "https://app.example.com/"})).await,
        )
        .await;
        assert_eq!((status, ty.as_str()), (409, "urn:tollgate:problem:subscription-exists"), "{p}");
        assert_eq!(p["change"], "/_tollgate/subscription");
        assert_eq!(stripe.calls(CHECKOUT).len(), 1);

        // Downgrade: Stripe's item swapped to starter's price, in force before any webhook.
        let r = post(&tg, "/_tollgate/subscription", "ada", json!({"plan": "starter"})).await;
        assert_eq!(r.status(), 200);
        let change: Value = r.json().await.unwrap();
        assert_eq!((change["plan"].as_str(), change["subscription"].as_str()), (Some("starter"), Some(sub_id)), "{change}");
        let update_path = format!("/v1/subscriptions/{sub_id}");
        let updates: Vec<_> = stripe.calls(&update_path).into_iter().filter(|c| c.method == "POST").collect();
        assert_eq!(updates.len(), 1);
        let item = sub["items"]["data"][0]["id"].as_str().unwrap();
        assert_eq!(param(&updates[0], "items[0][id]"), Some(item));
        assert_eq!(param(&updates[0], "items[0][price]"), Some("price_starter"));
        assert_eq!(param(&updates[0], "proration_behavior"), Some("create_prorations"));
        let u = usage(&tg, "ada").await;
        assert_eq!(u["plan"], "starter", "{u}");
        let calls_meter = u["usage"].as_array().unwrap().iter().find(|m| m["meter"] == "api_calls").unwrap().clone();
        assert_eq!(calls_meter["included"], 100, "{u}");
        // The webhook of that change, when it comes, agrees.
        let now_sub = stripe.subscription(sub_id).unwrap();
        assert_eq!(deliver(&tg, "evt_su_1", "customer.subscription.updated", &now_sub).await, 200);
        assert_eq!(usage(&tg, "ada").await["plan"], "starter");

        // The same plan again is a conflict, and Stripe is not called.
        let (status, ty, _) = problem(post(&tg, "/_tollgate/subscription", "ada", json!({"plan": "starter"})).await).await;
        assert_eq!((status, ty.as_str()), (409, "urn:tollgate:problem:plan-unchanged"));
        assert_eq!(stripe.calls(&update_path).len(), 1);

        // Cancel at the period's end: still served, the end announced.
        let r = call(&tg, reqwest::Method::DELETE, "/_tollgate/subscription", "ada", None).await;
        assert_eq!(r.status(), 200);
        let change: Value = r.json().await.unwrap();
        assert_eq!(change["cancel_at_period_end"], true, "{change}");
        assert_eq!(change["plan"], "starter");
        let updates: Vec<_> = stripe.calls(&update_path).into_iter().filter(|c| c.method == "POST").collect();
        assert_eq!(updates.len(), 2);
        assert_eq!(param(&updates[1], "cancel_at_period_end"), Some("true"));
        let u = usage(&tg, "ada").await;
        assert_eq!((u["plan"].as_str(), u["cancel_at_period_end"].as_bool()), (Some("starter"), Some(true)), "{u}");
        assert_eq!(tg.get("/signals", Some("ada")).await.status(), 200);
        // Ending now is not offered by this config.
        let (status, ty, p) = problem(
            call(&tg, reqwest::Method::DELETE, "/_tollgate/subscription?now=true", "ada", None).await,
        )
        .await;
        assert_eq!((status, ty.as_str(), p["key"].as_str()), (400, "urn:tollgate:problem:invalid-request", Some("now")));
        assert_eq!(stripe.calls(&update_path).len(), 2);
    }
);

both!(
    /// Each refusal says which field is wrong or what Stripe said, and changes nothing: no
    /// Stripe call for what is refused locally, no entitlement change when Stripe refuses.
    /// (One customer per part: self-service calls are limited to bursts of 20 per customer.)
    refusals_change_nothing,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let checkout = |plan: &str, url: &str| json!({"plan": plan, "success_url": url});
        let ok_url = "https://app.example.com/ok";
        for (body, key) in [
            (checkout("gold", ok_url), "plan"),
            (checkout("tight", ok_url), "plan"),
            (checkout("free", ok_url), "plan"),
            (json!({"plan": "pro"}), "success_url"),
            (checkout("pro", "https://evil.example.net/steal"), "success_url"),
            (checkout("pro", "javascript:alert(1)"), "success_url"),
            (checkout("pro", "/relative"), "success_url"),
            (json!({"plan": "pro", "success_url": ok_url, "cancel_url": "https://app.example.com.evil.net/"}), "cancel_url"),
            (json!({"plan": "pro", "success_url": ok_url, "customer": "bob"}), "body"),
        ] {
            let (status, ty, p) = problem(post(&tg, "/_tollgate/checkout", "ada", body.clone()).await).await;
            assert_eq!((status, ty.as_str(), p["key"].as_str()), (400, "urn:tollgate:problem:invalid-request", Some(key)), "{body} → {p}");
        }
        let r = tg
            .client
            .post(tg.url("/_tollgate/checkout"))
            .bearer_auth(token("ada"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        let (status, _, p) = problem(r).await;
        assert_eq!((status, p["key"].as_str()), (400, Some("body")));
        assert!(stripe.calls(CHECKOUT).is_empty(), "nothing refused locally reaches Stripe");

        // No subscription yet: a change or cancellation points at checkout.
        let (status, ty, p) = problem(post(&tg, "/_tollgate/subscription", "bob", json!({"plan": "starter"})).await).await;
        assert_eq!((status, ty.as_str(), p["checkout"].as_str()), (409, "urn:tollgate:problem:no-subscription", Some("/_tollgate/checkout")));
        let (status, ty, _) = problem(call(&tg, reqwest::Method::DELETE, "/_tollgate/subscription", "bob", None).await).await;
        assert_eq!((status, ty.as_str()), (409, "urn:tollgate:problem:no-subscription"));
        let (status, ty, _) = problem(post(&tg, "/_tollgate/portal", "bob", json!({})).await).await;
        assert_eq!((status, ty.as_str()), (409, "urn:tollgate:problem:no-stripe-customer"));

        // Stripe refusing a checkout: its status and code, nothing created.
        for (fault, status, kind, code) in [
            (402, 402, "stripe-refused", Some("card_declined")),
            (400, 502, "stripe-refused", Some("resource_missing")),
            (429, 503, "stripe-unavailable", Some("rate_limit")),
            (500, 502, "stripe-unavailable", None),
        ] {
            stripe.fail_next(CHECKOUT, &[Fault::Status(fault)]);
            let r = post(&tg, "/_tollgate/checkout", "cy", checkout("pro", ok_url)).await;
            let retry = r.headers().get("retry-after").is_some();
            let (s, ty, p) = problem(r).await;
            assert_eq!((s, ty.as_str()), (status, format!("urn:tollgate:problem:{kind}").as_str()), "{fault}: {p}");
            assert_eq!(p["stripe_status"], fault, "{p}");
            assert_eq!(p["stripe_code"].as_str(), code, "{p}");
            assert_eq!(retry, status == 503);
        }
        assert!(stripe.inner.lock().unwrap().checkout_sessions.is_empty());

        // Subscribed to pro; Stripe refusing the plan change leaves pro in force.
        subscribe(&tg, &stripe, "dee", "pro").await;
        assert_eq!(usage(&tg, "dee").await["plan"], "pro");
        let sub_path = {
            let g = stripe.inner.lock().unwrap();
            format!("/v1/subscriptions/{}", g.subscriptions[0]["id"].as_str().unwrap())
        };
        for (fault, status) in [(402u16, 402u16), (400, 502), (429, 503), (500, 502)] {
            stripe.fail_next(&sub_path, &[Fault::Status(fault)]);
            let (s, _, p) = problem(post(&tg, "/_tollgate/subscription", "dee", json!({"plan": "starter"})).await).await;
            assert_eq!((s, p["stripe_status"].as_u64()), (status, Some(u64::from(fault))), "{p}");
            assert_eq!(usage(&tg, "dee").await["plan"], "pro", "nothing changed locally");
        }
        stripe.fail_next(&sub_path, &[Fault::Status(500)]);
        let (s, _, _) = problem(call(&tg, reqwest::Method::DELETE, "/_tollgate/subscription", "dee", None).await).await;
        assert_eq!(s, 502);
        assert_eq!(usage(&tg, "dee").await["cancel_at_period_end"], false);
        // The portal for a subscribed caller is its own Stripe customer's.
        let r = post(&tg, "/_tollgate/portal", "dee", json!({"return_url": "https://app.example.com/account"})).await;
        assert_eq!(r.status(), 201);
        let portal: Value = r.json().await.unwrap();
        assert!(portal["url"].as_str().unwrap().starts_with("https://billing.stripe.com/"), "{portal}");
        let g = stripe.inner.lock().unwrap();
        let cus = g.subscriptions[0]["customer"].as_str().unwrap().to_string();
        assert_eq!(g.portal_sessions.last().unwrap(), &(cus, Some("https://app.example.com/account".into())));
    }
);

both!(
    /// Invoice webhooks are stored per customer, order-safe, and read back by the customer
    /// (`/_tollgate/invoices`) and the operator (`/admin/customers/{id}/invoices`) in pages; an
    /// invoice of an unknown Stripe customer is acknowledged and kept unlinked until its
    /// customer is linked; one whose amount is not an integer is refused and not stored.
    invoices_from_webhooks,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        subscribe(&tg, &stripe, "ada", "pro").await;
        let cus = stripe.inner.lock().unwrap().subscriptions[0]["customer"]
            .as_str()
            .unwrap()
            .to_string();
        let t = chrono::Utc::now().timestamp() - 3_600;
        let draft = invoice("in_a1", &cus, "draft", 4900, t);
        let open = invoice("in_a1", &cus, "open", 4900, t);
        let paid = invoice("in_a1", &cus, "paid", 4900, t);
        assert_eq!(deliver_at(&tg, "evt_i1", "invoice.created", &draft, t).await.0, 200);
        assert_eq!(deliver_at(&tg, "evt_i3", "invoice.paid", &paid, t + 20).await.0, 200);
        // Finalized arrives last but is older: the invoice stays paid.
        assert_eq!(deliver_at(&tg, "evt_i2", "invoice.finalized", &open, t + 10).await.0, 200);
        let later = invoice("in_a2", &cus, "open", 9900, t + 600);
        assert_eq!(deliver_at(&tg, "evt_i4", "invoice.finalized", &later, t + 600).await.0, 200);

        let r = tg.get("/_tollgate/invoices", Some("ada")).await;
        assert_eq!((r.status().as_u16(), r.headers()["cache-control"].to_str().unwrap()), (200, "no-store"));
        let page: Value = r.json().await.unwrap();
        let ids: Vec<&str> = page["invoices"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["in_a2", "in_a1"], "newest first: {page}");
        let first = &page["invoices"][1];
        for (k, v) in [
            ("status", json!("paid")),
            ("currency", json!("usd")),
            ("amount_due", json!(4900)),
            ("amount_paid", json!(4900)),
            ("amount_remaining", json!(0)),
            ("total", json!(4900)),
            ("number", json!("TG-in_a1")),
            ("hosted_invoice_url", json!("https://invoice.stripe.com/i/in_a1")),
        ] {
            assert_eq!(first[k], v, "{k}: {first}");
        }
        assert!(page["next"].is_null());
        let p1: Value = tg.get("/_tollgate/invoices?limit=1", Some("ada")).await.json().await.unwrap();
        assert_eq!((p1["invoices"][0]["id"].as_str(), p1["next"].as_str()), (Some("in_a2"), Some("in_a2")));
        let p2: Value = tg.get("/_tollgate/invoices?limit=1&after=in_a2", Some("ada")).await.json().await.unwrap();
        assert_eq!((p2["invoices"][0]["id"].as_str(), p2["next"].as_str()), (Some("in_a1"), None));
        let (status, _, p) = problem(tg.get("/_tollgate/invoices?limit=0", Some("ada")).await).await;
        assert_eq!((status, p["key"].as_str()), (400, Some("limit")));
        // Nobody else sees them.
        let other: Value = tg.get("/_tollgate/invoices", Some("bob")).await.json().await.unwrap();
        assert_eq!(other["invoices"], json!([]));
        // The operator reads the same page.
        let admin: Value = tg.admin_json("/admin/customers/ada/invoices").await;
        assert_eq!(admin, page);

        // An amount Stripe cannot mean: 400, nothing stored (the fixed redelivery is new).
        let mut bad = invoice("in_a3", &cus, "open", 100, t + 700);
        bad["amount_due"] = json!(100.5);
        assert_eq!(deliver_at(&tg, "evt_i5", "invoice.finalized", &bad, t + 700).await.0, 400);
        let listed: Value = tg.get("/_tollgate/invoices", Some("ada")).await.json().await.unwrap();
        assert_eq!(listed["invoices"].as_array().unwrap().len(), 2);
        let fixed = invoice("in_a3", &cus, "open", 100, t + 700);
        let (status, answer) = deliver_at(&tg, "evt_i5", "invoice.finalized", &fixed, t + 700).await;
        assert_eq!((status, answer["outcome"].as_str()), (200, Some("ignored")), "{answer}");
        let listed: Value = tg.get("/_tollgate/invoices", Some("ada")).await.json().await.unwrap();
        assert_eq!(listed["invoices"][0]["id"], "in_a3");

        // An unknown Stripe customer's invoice: acknowledged, unmatched, kept until linked.
        let stray = invoice("in_z1", "cus_unknown9", "open", 2500, t);
        let (status, answer) = deliver_at(&tg, "evt_z1", "invoice.finalized", &stray, t).await;
        assert_eq!((status, answer["outcome"].as_str()), (200, Some("unmatched")), "{answer}");
        let zed = |tg: &Tollgate| {
            tg.client
                .get(tg.admin_url("/admin/customers/zed/invoices"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
        };
        assert_eq!(zed(&tg).await.unwrap().status(), 404);
        let r = tg
            .client
            .put(tg.admin_url("/admin/customers/zed/stripe"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"stripe_customer": "cus_unknown9"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let linked: Value = zed(&tg).await.unwrap().json().await.unwrap();
        assert_eq!(linked["invoices"][0]["id"], "in_z1", "{linked}");
        assert_eq!(linked["invoices"][0]["amount_due"], 2500);
    }
);

async fn provision(tg: &Tollgate, body: Value) -> reqwest::Response {
    tg.client
        .post(tg.admin_url("/admin/customers"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

both!(
    /// `POST /admin/customers` makes the customer and its Stripe customer once, whatever the
    /// retries (an answer lost after Stripe made it included); the operator then moves the
    /// subscription to a plan callers cannot pick, and ends it now.
    provisioning_and_operator_changes,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let body = json!({"id": "acme", "email": "ops@acme.test", "name": "Acme Corp", "plan": "starter"});
        let r = provision(&tg, body.clone()).await;
        assert_eq!(r.status(), 201);
        let made: Value = r.json().await.unwrap();
        assert_eq!(made, json!({"id": "acme", "plan": "starter", "stripe_customer": "cus_standin1", "created": true}));
        let creates = stripe.calls("/v1/customers");
        assert_eq!(creates.len(), 1);
        assert_eq!(creates[0].idempotency_key.as_deref(), Some("tollgate-customer-acme"));
        for (k, v) in [("email", "ops@acme.test"), ("name", "Acme Corp"), ("metadata[tollgate_customer]", "acme")] {
            assert_eq!(param(&creates[0], k), Some(v), "{k}");
        }
        // A retry: the same customer, no second Stripe call.
        let r = provision(&tg, body.clone()).await;
        assert_eq!(r.status(), 200);
        let again: Value = r.json().await.unwrap();
        assert_eq!((again["stripe_customer"].as_str(), again["created"].as_bool()), (Some("cus_standin1"), Some(false)));
        assert_eq!(stripe.calls("/v1/customers").len(), 1);
        assert_eq!(usage(&tg, "acme").await["plan"], "starter");

        // Stripe makes the customer but the answer is lost: nothing stored; the retry's key
        // gets the same Stripe customer back.
        stripe.fail_next("/v1/customers", &[Fault::ApplyThenStatus(500)]);
        let (status, ty, _) = problem(provision(&tg, json!({"id": "beta"})).await).await;
        assert_eq!((status, ty.as_str()), (502, "urn:tollgate:problem:stripe-unavailable"));
        let unknown = tg.client.get(tg.admin_url("/admin/customers/beta")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(unknown.status(), 404, "nothing stored when Stripe failed");
        let r = provision(&tg, json!({"id": "beta"})).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.json::<Value>().await.unwrap()["stripe_customer"], "cus_standin2");
        assert_eq!(stripe.inner.lock().unwrap().customers_created, 2, "one Stripe customer each");

        // Refused: each names what is wrong; nothing reaches Stripe.
        for (body, status, kind) in [
            (json!({"id": "c1", "email": "not-an-email"}), 400, "invalid-body"),
            (json!({"id": "c1", "plan": "gold"}), 400, "invalid-body"),
            (json!({"id": " c1"}), 400, "invalid-customer-id"),
            (json!({"id": "c1", "tier": "x"}), 400, "invalid-body"),
            (json!({"id": "acme", "plan": "pro"}), 409, "customer-exists"),
        ] {
            let (s, ty, p) = problem(provision(&tg, body.clone()).await).await;
            assert_eq!((s, ty.as_str()), (status, format!("urn:tollgate:problem:{kind}").as_str()), "{body}: {p}");
        }
        assert_eq!(stripe.calls("/v1/customers").len(), 3);

        // A checkout of a provisioned customer reuses its Stripe customer.
        subscribe(&tg, &stripe, "acme", "pro").await;
        let checkout = stripe.calls(CHECKOUT);
        assert_eq!(param(&checkout[0], "customer"), Some("cus_standin1"));
        assert_eq!(usage(&tg, "acme").await["plan"], "pro");

        // tight is not offered: callers cannot pick it; the operator can.
        let (s, _, p) = problem(post(&tg, "/_tollgate/subscription", "acme", json!({"plan": "tight"})).await).await;
        assert_eq!((s, p["key"].as_str()), (400, Some("plan")));
        let admin_sub = |method: reqwest::Method, query: &str| {
            tg.client
                .request(method, tg.admin_url(&format!("/admin/customers/acme/subscription{query}")))
                .bearer_auth(ADMIN_TOKEN)
                .header("x-tollgate-actor", "ops-jane")
        };
        let r = admin_sub(reqwest::Method::POST, "").json(&json!({"plan": "tight"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["plan"], "tight");
        assert_eq!(usage(&tg, "acme").await["plan"], "tight");
        let audit = tg.admin_json("/admin/audit?limit=5").await;
        assert!(audit.to_string().contains("admin:ops-jane"), "{audit}");
        // Ended now by the operator: canceled at once, and the next call is refused.
        let r = admin_sub(reqwest::Method::DELETE, "").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ended: Value = r.json().await.unwrap();
        assert_eq!(ended["status"], "canceled", "{ended}");
        let sub_id = ended["subscription"].as_str().unwrap();
        let deletes: Vec<_> = stripe.calls(&format!("/v1/subscriptions/{sub_id}")).into_iter().filter(|c| c.method == "DELETE").collect();
        assert_eq!(deletes.len(), 1);
        assert_eq!(usage(&tg, "acme").await["status"], "canceled");
        let (s, ty, _) = problem(tg.get("/signals", Some("acme")).await).await;
        assert_eq!((s, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));
        let (s, ty, _) = problem(admin_sub(reqwest::Method::DELETE, "").send().await.unwrap()).await;
        assert_eq!((s, ty.as_str()), (409, "urn:tollgate:problem:no-subscription"));
    }
);

/// The summary fixture's plans: the billing plans plus `metered` (2 included, then 1,500 micros
/// a call, 10 EUR a month).
fn summary_config(upstream: std::net::SocketAddr, stripe: &StripeStandIn) -> String {
    config(upstream, stripe)
        + r#"
[plans.metered]
price_micros = 10000000
currency = "eur"
quotas.api_calls = { included = 2, overage = "allow", unit_price_micros = 1500 }
quotas.tokens = { unlimited = true }
"#
}

both!(
    /// Must-show 2 of issue 13: 50 customers over 4 plans with known statuses, periods, usage
    /// and invoices; `GET /admin/billing/summary` equals what the test computes from the
    /// fixture itself, in integers per currency, as JSON and as CSV.
    billing_summary_of_fifty_customers,
    |b| {
        let stripe = StripeStandIn::start().await;
        let up = Upstream::start().await;
        let tg = Tollgate::start(&summary_config(up.addr, &stripe), b).await;
        let plans = ["free", "starter", "pro", "metered"];
        let statuses = ["active", "active", "past_due", "trialing", "canceled"];
        let now = chrono::Utc::now();
        let day = chrono::Duration::days(1);
        struct Fixture {
            id: String,
            plan: &'static str,
            status: &'static str,
            served: u64,
            period_days: i64,
            cancels: bool,
            trial_days: i64,
        }
        let mut fixture = Vec::new();
        for i in 0..50usize {
            let plan = plans[i % 4];
            let status = statuses[i % 5];
            let calls = (i % 7) as u64;
            let served = match (status, plan) {
                ("canceled", _) => 0,
                (_, "free") => calls.min(5),
                _ => calls,
            };
            let f = Fixture {
                id: format!("sum{i:02}"),
                plan,
                status,
                served,
                period_days: (i % 10) as i64 + 1,
                cancels: i % 6 == 0,
                trial_days: (i % 9) as i64 + 1,
            };
            let mut body = json!({
                "plan": plan,
                "status": status,
                "period_start": (now - day * 20).to_rfc3339(),
                "period_end": (now + day * f.period_days as i32).to_rfc3339(),
                "cancel_at_period_end": f.cancels,
            });
            if status == "trialing" {
                body["trial_end"] = json!((now + day * f.trial_days as i32).to_rfc3339());
            }
            assert_eq!(tg.put_customer(&f.id, body).await.status(), 200);
            for _ in 0..calls {
                tg.get("/signals", Some(&f.id)).await;
            }
            fixture.push(f);
        }
        for f in fixture.iter().filter(|f| f.served > 0) {
            assert_eq!(tg.wait_ledger(&f.id, f.served as i64).await.0, f.served as i64, "{}", f.id);
        }
        // Three customers linked to Stripe this month.
        for f in &fixture[..3] {
            let r = tg
                .client
                .put(tg.admin_url(&format!("/admin/customers/{}/stripe", f.id)))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"stripe_customer": format!("cus_{}", f.id)}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        // Invoices: every fourth customer's kind by index; one created last month.
        let created = now.timestamp() - 60;
        let mut expected_invoices: std::collections::BTreeMap<&str, [i64; 6]> = Default::default();
        for (i, f) in fixture.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            let (currency, status, attempts, due) = match i % 4 {
                0 => ("usd", "paid", 1, 1000 + i as i64),
                1 => ("eur", "open", 0, 500 + i as i64),
                2 => ("usd", "open", 1, 700 + i as i64),
                _ => ("usd", "void", 0, 300 + i as i64),
            };
            let mut inv = invoice(&format!("in_sum{i}"), &format!("cus_{}", f.id), status, due, created);
            inv["currency"] = json!(currency);
            inv["attempt_count"] = json!(attempts);
            inv["parent"]["subscription_details"]["metadata"] = json!({"tollgate_customer": f.id});
            let (code, _) = deliver_at(&tg, &format!("evt_sum{i}"), "invoice.updated", &inv, created).await;
            assert_eq!(code, 200);
            let e = expected_invoices.entry(currency).or_default();
            match (status, attempts) {
                ("paid", _) => { e[0] += 1; e[1] += due; }
                ("open", 0) => { e[2] += 1; e[3] += due; }
                ("open", _) => { e[4] += 1; e[5] += due; }
                _ => {}
            }
        }
        let old = now.timestamp() - 40 * 86_400;
        let mut stale = invoice("in_last_month", "cus_sum00", "paid", 99_999, old);
        stale["parent"]["subscription_details"]["metadata"] = json!({"tollgate_customer": "sum00"});
        assert_eq!(deliver_at(&tg, "evt_old", "invoice.paid", &stale, old).await.0, 200);

        // What the fixture says, computed here.
        let price = |p: &str| match p {
            "starter" => Some(("usd", 9_000_000i64)),
            "pro" => Some(("usd", 49_000_000)),
            "metered" => Some(("eur", 10_000_000)),
            _ => None,
        };
        let mut customers: std::collections::BTreeMap<(String, String), i64> = Default::default();
        let mut mrr: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
        let (mut over_units, mut over_customers) = (0i64, 0i64);
        let (mut churned, mut renewals, mut trials, mut over, mut near) = (0, 0, 0, 0, 0);
        for f in &fixture {
            *customers.entry((f.plan.into(), f.status.into())).or_default() += 1;
            if matches!(f.status, "active" | "past_due") {
                if let Some((currency, p)) = price(f.plan) {
                    let m = mrr.entry(currency).or_default();
                    m.0 += p;
                    m.1 += 1;
                }
            }
            if f.plan == "metered" && f.served > 2 {
                over_units += f.served as i64 - 2;
                over_customers += 1;
            }
            churned += i64::from(f.status == "canceled");
            renewals += i64::from(f.status != "canceled" && !f.cancels && f.period_days <= 7);
            trials += i64::from(f.status == "trialing" && f.trial_days <= 7);
            let included = match f.plan { "free" => 5, "starter" => 100, "pro" => 1000, _ => 2 };
            if f.served > 0 && f.served >= included {
                over += 1;
            } else if f.served > 0 && f.served as f64 >= 0.8 * included as f64 {
                near += 1;
            }
        }

        // The fixture exercises every figure (none of them is trivially 0).
        assert!(over_units > 0 && near > 0 && over > 0 && churned > 0 && renewals > 0 && trials > 0);
        assert!(expected_invoices["usd"][4] > 0 && expected_invoices["eur"][2] > 0);
        let month = now.format("%Y-%m").to_string();
        let get = |query: String| {
            tg.client
                .get(tg.admin_url(&format!("/admin/billing/summary{query}")))
                .bearer_auth(ADMIN_TOKEN)
                .send()
        };
        let r = get(format!("?period={month}")).await.unwrap();
        assert_eq!(r.status(), 200);
        let s: Value = r.json().await.unwrap();
        assert_eq!(s["period"], month.as_str());
        let got_customers: std::collections::BTreeMap<(String, String), i64> = s["customers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ((c["plan"].as_str().unwrap().into(), c["status"].as_str().unwrap().into()), c["customers"].as_i64().unwrap()))
            .collect();
        assert_eq!(got_customers, customers, "{s}");
        let got_mrr: std::collections::BTreeMap<&str, (i64, i64)> = s["mrr"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["currency"].as_str().unwrap(), (m["amount_micros"].as_i64().unwrap(), m["subscriptions"].as_i64().unwrap())))
            .collect();
        assert_eq!(got_mrr, mrr, "{s}");
        assert_eq!(
            s["overage"],
            json!([{"plan": "metered", "meter": "api_calls", "currency": "eur", "units": over_units,
                    "amount_micros": over_units * 1500, "customers": over_customers}]),
            "{s}"
        );
        let got_invoices: std::collections::BTreeMap<&str, [i64; 6]> = s["invoices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let n = |k: &str| i[k].as_i64().unwrap();
                (i["currency"].as_str().unwrap(), [n("paid"), n("paid_amount"), n("open"), n("open_amount"), n("failed"), n("failed_amount")])
            })
            .collect();
        assert_eq!(got_invoices, expected_invoices, "last month's invoice is not in it: {s}");
        assert_eq!(s["new_customers"], 3);
        assert_eq!(s["churned_customers"], churned);
        assert_eq!(s["renewals"], json!({"days": 7, "customers": renewals}));
        assert_eq!(s["trials_ending"], json!({"days": 7, "customers": trials}));
        assert_eq!((s["limits"]["over"].as_i64(), s["limits"]["near"].as_i64()), (Some(over), Some(near)), "{s}");
        assert_eq!(s["sources"]["stripe"], json!(["invoices"]));

        // CSV: the same figures, a line each.
        let r = get(format!("?period={month}&format=csv")).await.unwrap();
        assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
        let text = r.text().await.unwrap();
        assert!(text.starts_with("section,plan,status,meter,currency,figure,value\n"), "{text}");
        assert!(text.contains(&format!("mrr,,,,usd,amount_micros,{}\n", mrr["usd"].0)), "{text}");
        assert!(text.contains(&format!("overage,metered,,api_calls,eur,amount_micros,{}\n", over_units * 1500)), "{text}");
        assert!(text.contains(&format!("invoices,,,,usd,paid_amount,{}\n", expected_invoices["usd"][1])), "{text}");
        // Last month holds only the stale invoice; a bad query names what is wrong.
        let last = (now - chrono::Duration::days(40)).format("%Y-%m").to_string();
        let s: Value = get(format!("?period={last}")).await.unwrap().json().await.unwrap();
        assert_eq!(s["invoices"][0]["paid_amount"], 99_999, "{s}");
        for bad in ["?period=2026-13", "?days=0", "?near=2", "?format=xml"] {
            let (status, ty, _) = problem(get(bad.to_string()).await.unwrap()).await;
            assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-query"), "{bad}");
        }
    }
);
