//! The Stripe admin API and customer links through a running tollgate and a Stripe stand-in:
//! the reconciler (`POST /admin/stripe/sync`) across pages and a 500, the explicit link, the
//! billing portal session, and the link a subscription webhook records; on both backends.

use crate::support::stripe::{sign_webhook, subscription, Fault, StripeStandIn, KEY_ENV};
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::config::Config;

const SUBSCRIPTIONS: &str = "/v1/subscriptions";
const PORTAL: &str = "/v1/billing_portal/sessions";
/// `.cargo/config.toml` sets it for every test: its value is the webhook secret here.
const WHSEC_ENV: &str = "TOLLGATE_TEST_JWT_SECRET";

fn config(upstream: std::net::SocketAddr, stripe: &StripeStandIn) -> String {
    format!(
        r#"{}
[stripe]
secret_key_env = "{KEY_ENV}"
webhook_secrets_env = "{WHSEC_ENV}"
api_base = "{}"
sync_interval = "0s"

[stripe.prices]
price_free = "free"
price_pro = "pro"
price_tight = "tight"
"#,
        base_config(upstream),
        stripe.url()
    )
}

fn ranks(c: &mut Config) {
    c.plans.get_mut("pro").unwrap().rank = 10;
    c.plans.get_mut("tight").unwrap().rank = 1;
}

/// Starts tollgate and waits for its start-up reconciliation (an empty listing) to finish.
async fn start(b: Backend, stripe: &StripeStandIn) -> (Upstream, Tollgate) {
    let up = Upstream::start().await;
    let tg = Tollgate::start_with(&config(up.addr, stripe), b, None, ranks).await;
    for _ in 0..100 {
        if stripe.calls(SUBSCRIPTIONS).iter().any(|c| c.status == 200) {
            return (up, tg);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no start-up reconciliation");
}

async fn admin_post(tg: &Tollgate, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = tg.client.post(tg.admin_url(path)).bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn link(tg: &Tollgate, customer: &str, body: Value) -> reqwest::Response {
    tg.client
        .put(tg.admin_url(&format!("/admin/customers/{customer}/stripe")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

both!(
    /// The reconciler follows `has_more`/`starting_after` over 2 pages, retries a 500, repairs
    /// the customers that differ (best subscription per customer; metadata or link), audits
    /// each change, and the next proxied call is decided on the repaired plan. A second run
    /// changes nothing.
    sync_repairs_drift_across_pages_and_a_500,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        // initech's Stripe customer is known only through an explicit link.
        assert_eq!(link(&tg, "initech", json!({"stripe_customer": "cus_init"})).await.status(), 200);
        let now = chrono::Utc::now().timestamp();
        {
            let mut g = stripe.inner.lock().unwrap();
            g.page_size = Some(2);
            g.subscriptions = vec![
                subscription("sub_a", "cus_acme", Some("acme"), &["price_pro"], "active", now - 50),
                subscription("sub_g_old", "cus_glob", Some("globex"), &["price_pro"], "canceled", now - 900),
                subscription("sub_g", "cus_glob", Some("globex"), &["price_tight"], "active", now - 40),
                subscription("sub_i", "cus_init", None, &["price_pro"], "past_due", now - 30),
            ];
        }
        // Page 1 answers, page 2 fails once with a 500 and is retried.
        stripe.fail_next(SUBSCRIPTIONS, &[Fault::Pass, Fault::Status(500)]);
        let before_calls = stripe.calls(SUBSCRIPTIONS).len();
        // Before the sync acme is on the default plan: the pro-only route is refused.
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 403);

        let resp = admin_post(&tg, "/admin/stripe/sync", None).await;
        assert_eq!(resp.status(), 200);
        let report: Value = resp.json().await.unwrap();
        assert_eq!(report["pages"], 2, "{report}");
        assert_eq!(report["retries"], 1, "{report}");
        assert_eq!(report["subscriptions"], 4, "{report}");
        let changed: Vec<(String, String, String)> = report["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["customer"].as_str().unwrap().to_string(),
                    c["after"]["plan"].as_str().unwrap().to_string(),
                    c["after"]["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            changed,
            vec![
                ("acme".into(), "pro".into(), "active".into()),
                ("globex".into(), "tight".into(), "active".into()),
                ("initech".into(), "pro".into(), "past_due".into()),
            ]
        );
        assert_eq!(report["linked"], json!(["acme", "globex"]));

        // The listing as Stripe saw it: status=all, the cursor after page 1's last id.
        let calls: Vec<_> = stripe.calls(SUBSCRIPTIONS).split_off(before_calls);
        let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
        assert_eq!(statuses, vec![200, 500, 200]);
        assert_eq!(calls[0].param("status"), Some("all"));
        assert_eq!(calls[0].param("starting_after"), None);
        assert_eq!(calls[1].param("starting_after"), Some("sub_g_old"));
        assert_eq!(calls[2].param("starting_after"), Some("sub_g_old"));

        // Ledger, audit log, and the very next proxied call.
        assert_eq!(tg.admin_customer("acme").await["plan"], "pro");
        assert_eq!(tg.admin_customer("initech").await["status"], "past_due");
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM audit_log WHERE actor = 'stripe-sync' AND action = 'stripe.sync'").await,
            3
        );
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_customers").await,
            3
        );
        assert_eq!(tg.get("/export/pdf", Some("acme")).await.status(), 200);

        // Nothing has drifted since: a second run changes nothing and writes no audit row.
        let again: Value = admin_post(&tg, "/admin/stripe/sync", None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(again["changed"], json!([]), "{again}");
        assert_eq!(again["linked"], json!([]), "{again}");
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM audit_log WHERE actor = 'stripe-sync' AND action = 'stripe.sync'").await,
            3
        );

        // acme schedules the end of its subscription and the webhook is lost: only
        // cancel_at_period_end differs, and the next run repairs it.
        stripe.inner.lock().unwrap().subscriptions[0]["cancel_at_period_end"] = json!(true);
        assert_eq!(tg.admin_customer("acme").await["cancel_at_period_end"], false);
        let third: Value = admin_post(&tg, "/admin/stripe/sync", None).await.json().await.unwrap();
        let changed = third["changed"].as_array().unwrap();
        assert_eq!(changed.len(), 1, "{third}");
        assert_eq!(changed[0]["customer"], "acme");
        assert_eq!(tg.admin_customer("acme").await["cancel_at_period_end"], true);
        assert_eq!(tg.admin_customer("acme").await["effective_plan"], "pro");

        // Stripe down for good: the run fails as a whole (502) and writes nothing.
        stripe.fail_next(SUBSCRIPTIONS, &[Fault::Status(500); 5]);
        let (status, ty, _) = problem(admin_post(&tg, "/admin/stripe/sync", None).await).await;
        assert_eq!((status, ty.as_str()), (502, "urn:tollgate:problem:stripe-unavailable"));
        // Without the admin token: 401.
        let resp = tg.client.post(tg.admin_url("/admin/stripe/sync")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
);

both!(
    /// The explicit link (and its conflicts and bad bodies), and a billing portal session for a
    /// linked customer: Stripe receives the customer and return URL; the URL comes back.
    link_and_portal_session,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let r = link(&tg, "acme", json!({"stripe_customer": "cus_A"})).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"customer": "acme", "stripe_customer": "cus_A", "previous": null}));
        // The same Stripe customer for another tollgate customer: 409, nothing changed.
        let (status, ty, _) = problem(link(&tg, "globex", json!({"stripe_customer": "cus_A"})).await).await;
        assert_eq!((status, ty.as_str()), (409, "urn:tollgate:problem:stripe-customer-linked"));
        let (status, _, _) = problem(link(&tg, "acme", json!({"stripe_customer": "acme"})).await).await;
        assert_eq!(status, 400);
        let (status, _, _) = problem(link(&tg, "acme", json!({"customer": "cus_B"})).await).await;
        assert_eq!(status, 400);
        // Relinking acme to a new Stripe customer says what it replaced.
        let body: Value = link(&tg, "acme", json!({"stripe_customer": "cus_B"})).await.json().await.unwrap();
        assert_eq!(body["previous"], "cus_A");
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM audit_log WHERE actor = 'admin' AND action = 'stripe.link' AND target = 'acme'").await,
            2
        );

        let r = admin_post(
            &tg,
            "/admin/customers/acme/portal-session",
            Some(json!({"return_url": "https://app.example/billing"})),
        )
        .await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["stripe_customer"], "cus_B");
        assert!(
            body["url"].as_str().unwrap().starts_with("https://billing.stripe.com/p/session/"),
            "{body}"
        );
        let calls = stripe.calls(PORTAL);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, "POST");
        assert_eq!(calls[0].param("customer"), Some("cus_B"));
        assert_eq!(calls[0].param("return_url"), Some("https://app.example/billing"));
        // No body is fine too.
        assert_eq!(admin_post(&tg, "/admin/customers/acme/portal-session", None).await.status(), 200);
        // Not linked: 404, Stripe not called.
        let (status, _, _) = problem(admin_post(&tg, "/admin/customers/globex/portal-session", None).await).await;
        assert_eq!(status, 404);
        assert_eq!(stripe.calls(PORTAL).len(), 2);
        // Stripe failing: 502.
        stripe.fail_next(PORTAL, &[Fault::Status(500)]);
        let (status, _, _) = problem(admin_post(&tg, "/admin/customers/acme/portal-session", None).await).await;
        assert_eq!(status, 502);
        // Without the admin token: 401.
        let r = tg.client.post(tg.admin_url("/admin/customers/acme/portal-session")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
);

both!(
    /// A subscription webhook links its Stripe customer to the tollgate customer in its metadata
    /// (what usage reporting needs), audited once.
    subscription_webhook_links_customer,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let now = chrono::Utc::now().timestamp();
        let sub = subscription("sub_w", "cus_web", Some("acme"), &["price_pro"], "active", now);
        for (i, kind) in ["created", "updated"].iter().enumerate() {
            let (id, kind) = (format!("evt_link_{i}"), format!("customer.subscription.{kind}"));
            assert_eq!(deliver(&tg, &id, &kind, now + i as i64, sub.clone()).await, 200);
        }
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_customers WHERE customer = 'acme' AND stripe_customer_id = 'cus_web'").await,
            1
        );
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM audit_log WHERE action = 'stripe.link'").await,
            1
        );
        assert_eq!(tg.admin_customer("acme").await["plan"], "pro");
    }
);

/// Delivers one signed event with `object` as `data.object`.
async fn deliver(tg: &Tollgate, id: &str, kind: &str, created: i64, object: Value) -> u16 {
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
    let now = chrono::Utc::now().timestamp();
    tg.client
        .post(tg.admin_url("/webhooks/stripe"))
        .header("stripe-signature", sign_webhook(&body, SECRET, now))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

both!(
    /// `checkout.session.completed` links the customer (`client_reference_id`, else metadata);
    /// `customer.deleted` cancels the linked customer (402 on the next call), and a late,
    /// older subscription event does not revive it.
    checkout_links_and_customer_deleted_cancels,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let now = chrono::Utc::now().timestamp();
        let session = json!({
            "id": "cs_test_1", "object": "checkout.session", "mode": "subscription",
            "client_reference_id": "globex", "customer": "cus_chk",
            "metadata": {"tollgate_customer": "ignored-when-client-reference-id-is-set"},
            "status": "complete", "subscription": "sub_chk",
        });
        assert_eq!(deliver(&tg, "evt_chk", "checkout.session.completed", now - 20, session).await, 200);
        // Metadata when there is no client_reference_id.
        let session2 = json!({
            "id": "cs_test_2", "object": "checkout.session", "mode": "subscription",
            "client_reference_id": null, "customer": "cus_meta",
            "metadata": {"tollgate_customer": "hooli"}, "status": "complete",
        });
        assert_eq!(deliver(&tg, "evt_chk2", "checkout.session.completed", now - 20, session2).await, 200);
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_customers WHERE (customer = 'globex' AND stripe_customer_id = 'cus_chk') OR (customer = 'hooli' AND stripe_customer_id = 'cus_meta')").await,
            2
        );
        let sub = subscription("sub_chk", "cus_chk", Some("globex"), &["price_pro"], "active", now - 20);
        assert_eq!(deliver(&tg, "evt_sub", "customer.subscription.created", now - 10, sub.clone()).await, 200);
        assert_eq!(tg.get("/export/pdf", Some("globex")).await.status(), 200);

        let deleted = json!({"id": "cus_chk", "object": "customer", "deleted": true});
        assert_eq!(deliver(&tg, "evt_del", "customer.deleted", now, deleted).await, 200);
        let c = tg.admin_customer("globex").await;
        assert_eq!((c["status"].as_str(), c["plan"].as_str()), (Some("canceled"), None), "{c}");
        let (status, ty, _) = problem(tg.get("/signals", Some("globex")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));
        // A late subscription.updated created before the deletion changes nothing.
        assert_eq!(deliver(&tg, "evt_late", "customer.subscription.updated", now - 5, sub).await, 200);
        assert_eq!(tg.admin_customer("globex").await["status"], "canceled");
        // A deleted Stripe customer nobody is linked to: acknowledged, nothing changes.
        let other = json!({"id": "cus_nobody", "object": "customer", "deleted": true});
        assert_eq!(deliver(&tg, "evt_del2", "customer.deleted", now, other).await, 200);
        assert_eq!(tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM customers").await, 1);
    }
);

both!(
    /// DESIGN §7: events of the same second cannot be ordered by `created`, so when one would
    /// change state stored as of that very second, the subscription is re-fetched and what
    /// Stripe says now is applied. A `deleted` then an `updated` of the same second (a late
    /// retry of the update) leave the customer canceled: 402 on the next call. Events seconds
    /// apart are ordered by `created` alone (no call). If the re-fetch fails, the last received
    /// wins and the failure is counted.
    same_second_events_follow_stripe,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (_up, tg) = start(b, &stripe).await;
        let t = chrono::Utc::now().timestamp() - 30;
        let active = subscription("sub_ss", "cus_ss", Some("acme"), &["price_pro"], "active", t - 100);
        let mut canceled = active.clone();
        canceled["status"] = json!("canceled");
        stripe.inner.lock().unwrap().subscriptions = vec![canceled.clone()];
        const FETCH: &str = "/v1/subscriptions/sub_ss";

        assert_eq!(deliver(&tg, "evt_ss_0", "customer.subscription.created", t - 1, active.clone()).await, 200);
        assert_eq!(deliver(&tg, "evt_ss_1", "customer.subscription.deleted", t, canceled.clone()).await, 200);
        assert_eq!(tg.admin_customer("acme").await["status"], "canceled");
        assert!(stripe.calls(FETCH).is_empty(), "a second apart: no re-fetch");

        assert_eq!(deliver(&tg, "evt_ss_2", "customer.subscription.updated", t, active.clone()).await, 200);
        let calls = stripe.calls(FETCH);
        assert_eq!(calls.iter().map(|c| c.status).collect::<Vec<_>>(), vec![200]);
        // A re-fetch reads the subscription; it never writes to Stripe.
        assert_eq!(calls[0].method, "GET");
        let c = tg.admin_customer("acme").await;
        assert_eq!(c["status"], "canceled", "{c}");
        let (status, ty, _) = problem(tg.get("/signals", Some("acme")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));
        assert_eq!(tg.metric("tollgate_stripe_refetches_total{outcome=\"applied\"}").await, 1);

        // Stripe answers 500: the last received (active) wins, counted as failed.
        let g_active = subscription("sub_g", "cus_g", Some("globex"), &["price_pro"], "active", t - 100);
        let mut g_canceled = g_active.clone();
        g_canceled["status"] = json!("canceled");
        stripe.inner.lock().unwrap().subscriptions.push(g_canceled.clone());
        stripe.fail_next("/v1/subscriptions/sub_g", &[Fault::Status(500)]);
        assert_eq!(deliver(&tg, "evt_g_1", "customer.subscription.deleted", t, g_canceled).await, 200);
        assert_eq!(deliver(&tg, "evt_g_2", "customer.subscription.updated", t, g_active).await, 200);
        assert_eq!(stripe.calls("/v1/subscriptions/sub_g").len(), 1);
        assert_eq!(tg.admin_customer("globex").await["status"], "active");
        assert_eq!(tg.get("/signals", Some("globex")).await.status(), 200);
        assert_eq!(tg.metric("tollgate_stripe_refetches_total{outcome=\"failed\"}").await, 1);
    }
);

both!(
    /// Scheduled reconciliation is one instance's job: a second instance on the same ledger
    /// skips its start-up run while the first holds the lease (Stripe is listed once, not
    /// twice), yet `POST /admin/stripe/sync` on it runs at once.
    scheduled_sync_runs_on_one_instance,
    |b| {
        let stripe = StripeStandIn::start().await;
        let (up, first) = start(b, &stripe).await;
        let listed = || stripe.calls(SUBSCRIPTIONS).len();
        assert_eq!(listed(), 1);
        let second = Tollgate::start_with(&config(up.addr, &stripe), b, Some(&first), ranks).await;
        // Its start-up run would come right away: give it ample time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(listed(), 1, "the second instance did not list Stripe again");
        assert_eq!(admin_post(&second, "/admin/stripe/sync", None).await.status(), 200);
        assert_eq!(listed(), 2);
    }
);
