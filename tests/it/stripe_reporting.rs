//! Usage → Stripe through a running tollgate: ledger usage (made by real proxied requests, and
//! rows written to the real ledger) reaches a Stripe stand-in as Billing meter events whose values
//! sum exactly to the ledger's units, across 500s, 429s and a lost answer, on both backends.

use crate::support::stripe::{Fault, StripeStandIn, KEY_ENV};
use crate::support::*;
use chrono::{Duration as Days, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate::config::Config;
use tollgate::ledger::{Ledger, UsageEvent};

const METER_EVENTS: &str = "/v1/billing/meter_events";

fn config(upstream: std::net::SocketAddr, stripe: &StripeStandIn) -> String {
    format!(
        r#"{}
[stripe]
secret_key_env = "{KEY_ENV}"
api_base = "{}"
report_interval = "100ms"
report_window = "60s"
report_delay = "0s"
sync_interval = "0s"
"#,
        base_config(upstream),
        stripe.url()
    )
}

/// Both meters are reported, under their own Stripe meter event names.
fn meters(c: &mut Config) {
    c.meters.get_mut("api_calls").unwrap().stripe_event_name = Some("tg_api_calls".into());
    c.meters.get_mut("tokens").unwrap().stripe_event_name = Some("tg_tokens".into());
}

/// The test's own handle on the instance's ledger (the same database, its own pool).
async fn ledger(tg: &Tollgate) -> std::sync::Arc<dyn Ledger> {
    let schema = (tg.backend == Backend::Shared).then_some(tg.schema.as_str());
    tollgate::ledger::open(&tg.database_url, schema)
        .await
        .unwrap()
}

fn row(customer: &str, meter: &str, units: i64, ago: Days) -> UsageEvent {
    UsageEvent {
        id: uuid::Uuid::now_v7(),
        ts: Utc::now() - ago,
        customer: customer.into(),
        meter: meter.into(),
        units,
        route: "GET /signals".into(),
        status: 200,
        latency_us: 1000,
        request_id: format!("req-{}", uuid::Uuid::now_v7().simple()),
    }
}

/// Units of `customer` still unreported in the ledger.
async fn unreported(tg: &Tollgate, customer: &str) -> i64 {
    tg.scalar(&format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_events \
             WHERE customer = '{customer}' AND reported_at IS NULL"
    ))
    .await
}

/// Sum of applied meter-event values per (Stripe customer, event name).
fn sums(stripe: &StripeStandIn) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for a in stripe.applied().values() {
        *out.entry((a.customer.clone(), a.event_name.clone()))
            .or_default() += a.value;
    }
    out
}

both!(
    /// Must-show 3: usage rows → meter events summing exactly to the ledger's units, through a
    /// 500, a 429 and an applied-but-lost answer (retried, answered "already exists", counted
    /// once); rows marked reported only then; unlinked usage stays; >35-day usage is flagged.
    reports_usage_exactly_once_across_failures,
    |b| {
        let stripe = StripeStandIn::start().await;
        // The first three meter-event calls fail: a 500 (not applied), a 429, then one that
        // Stripe applies but whose answer is lost (500).
        stripe.fail_next(
            METER_EVENTS,
            &[
                Fault::Status(500),
                Fault::Status(429),
                Fault::ApplyThenStatus(500),
            ],
        );
        let up = Upstream::start().await;
        let tg = Tollgate::start_with(&config(up.addr, &stripe), b, None, meters).await;
        let l = ledger(&tg).await;
        l.link_stripe_customer("acme", "cus_acme", "test").await.unwrap();
        l.link_stripe_customer("globex", "cus_globex", "test").await.unwrap();

        // Usage through the real proxy: one refunded call (0 units), 5 calls of 1 unit (the free
        // plan's whole quota), one of 7 tokens.
        assert_eq!(tg.get("/fail", Some("acme")).await.status(), 500);
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("acme")).await.status(), 200);
        }
        assert_eq!(tg.get("/cost?n=7", Some("acme")).await.status(), 200);
        assert_eq!(tg.wait_ledger("acme", 7).await, (7, 12));

        // Older usage written to the ledger: several windows over the last days, a customer
        // with no Stripe link, and one row older than Stripe's 35 days.
        let mut rows = Vec::new();
        for i in 0..30 {
            rows.push(row("acme", "api_calls", 1 + i % 4, Days::minutes(7 * i + 10)));
            rows.push(row("globex", "tokens", 100 * (i + 1), Days::hours(i + 1)));
        }
        rows.push(row("initech", "api_calls", 9, Days::hours(1)));
        rows.push(row("globex", "api_calls", 11, Days::days(40)));
        assert_eq!(l.insert_usage(&rows).await.unwrap(), rows.len() as u64);
        let acme_units: i64 = 12 + (0..30).map(|i| 1 + i % 4).sum::<i64>();
        let globex_tokens: i64 = (0..30).map(|i| 100 * (i + 1)).sum();

        // Wait until every linked, reportable row is marked reported.
        let mut done = false;
        for _ in 0..200 {
            if unreported(&tg, "acme").await == 0 && unreported(&tg, "globex").await == 1 {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(done, "rows still unreported; calls: {:?}", stripe.calls(METER_EVENTS));

        // Exactly the ledger's units, per customer and meter, each identifier applied once.
        let expected: BTreeMap<(String, String), i64> = [
            (("cus_acme".to_string(), "tg_api_calls".to_string()), acme_units - 7),
            (("cus_acme".to_string(), "tg_tokens".to_string()), 7),
            (("cus_globex".to_string(), "tg_tokens".to_string()), globex_tokens),
        ]
        .into_iter()
        .collect();
        assert_eq!(sums(&stripe), expected);

        let calls = stripe.calls(METER_EVENTS);
        let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
        assert_eq!(&statuses[..3], &[500, 429, 500], "{statuses:?}");
        // The lost answer's event was retried with the same identifier and the same value, and
        // Stripe said "already exists": delivered, not applied twice.
        let lost = &calls[2];
        let retry = calls[3..]
            .iter()
            .find(|c| c.param("identifier") == lost.param("identifier"))
            .expect("the lost event is retried");
        assert_eq!(retry.status, 400);
        assert_eq!(retry.param("payload[value]"), lost.param("payload[value]"));
        assert_eq!(retry.param("timestamp"), lost.param("timestamp"));
        // The 500 and 429 events were retried with their identifiers too (nothing lost).
        for failed in &calls[..2] {
            let id = failed.param("identifier").unwrap();
            assert!(stripe.applied().contains_key(id), "{id} never applied");
        }
        // Every value sent is a whole number; no zero-unit event is sent.
        for c in &calls {
            assert!(c.param("payload[value]").unwrap().parse::<i64>().unwrap() > 0);
        }

        // Unlinked usage is kept, unreported; the 40-day-old row is flagged, never sent.
        assert_eq!(unreported(&tg, "initech").await, 1);
        assert_eq!(
            tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_meter_reports WHERE state = 'too_old'").await,
            1
        );
        let metrics = tg
            .client
            .get(tg.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("tollgate_stripe_usage_too_old_rows_total 1"),
            "{metrics}"
        );
        // initech's row waits for a link, and is counted.
        assert!(
            metrics.contains("tollgate_stripe_unlinked_usage_rows 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tollgate_stripe_meter_events_total{outcome=\"already_exists\"} 1"),
            "{metrics}"
        );

        // New usage later is reported by a later run, as new events (nothing re-sent); a
        // denied call is no usage.
        let before = stripe.applied().len();
        assert_eq!(tg.get("/signals/history/X", Some("acme")).await.status(), 429);
        l.insert_usage(&[row("acme", "api_calls", 5, Days::seconds(1))])
            .await
            .unwrap();
        for _ in 0..100 {
            if unreported(&tg, "acme").await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(unreported(&tg, "acme").await, 0);
        assert_eq!(stripe.applied().len(), before + 1);
        assert_eq!(
            sums(&stripe)[&("cus_acme".to_string(), "tg_api_calls".to_string())],
            acme_units - 7 + 5
        );
    }
);

both!(
    /// Stripe deduplicates identifiers for about a day only. A meter event recorded by Stripe
    /// whose answer was lost (a 500), and still unconfirmed 23 h later, is not resent (a resend
    /// could count twice): it is set `uncertain`, counted, and left for an operator, whose
    /// `resolve` marks the rows reported (audited). Stripe counted the units once.
    unconfirmed_report_is_not_resent_after_a_day,
    |b| {
        let stripe = StripeStandIn::start().await;
        // The first try is recorded but answered 500; every later try fails before recording.
        let mut faults = vec![Fault::ApplyThenStatus(500)];
        faults.extend([Fault::Status(500); 60]);
        stripe.fail_next(METER_EVENTS, &faults);
        let up = Upstream::start().await;
        let tg = Tollgate::start_with(&config(up.addr, &stripe), b, None, meters).await;
        let l = ledger(&tg).await;
        l.link_stripe_customer("acme", "cus_acme", "test").await.unwrap();
        l.insert_usage(&[
            row("acme", "api_calls", 3, Days::minutes(10)),
            row("acme", "api_calls", 4, Days::minutes(10)),
        ])
        .await
        .unwrap();
        let ambiguous = "SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_meter_reports WHERE ambiguous_since IS NOT NULL";
        for _ in 0..100 {
            if tg.scalar(ambiguous).await == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tg.scalar(ambiguous).await, 1, "the lost answer is remembered");
        // A day passes (the ledger's clock is moved back rather than the test waiting).
        let day_ago = Utc::now() - Days::hours(25);
        let shift = match b {
            Backend::Embedded => format!(
                "UPDATE stripe_meter_reports SET ambiguous_since = {}, next_attempt_at = NULL RETURNING CAST(1 AS BIGINT)",
                day_ago.timestamp_micros()
            ),
            Backend::Shared => format!(
                "UPDATE stripe_meter_reports SET ambiguous_since = to_timestamp({}), next_attempt_at = NULL RETURNING CAST(1 AS BIGINT)",
                day_ago.timestamp()
            ),
        };
        assert_eq!(tg.scalar(&shift).await, 1);
        let uncertain = "SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_meter_reports WHERE state = 'uncertain'";
        for _ in 0..100 {
            if tg.scalar(uncertain).await == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tg.scalar(uncertain).await, 1);
        let tries = stripe.calls(METER_EVENTS).len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(stripe.calls(METER_EVENTS).len(), tries, "not resent");
        assert_eq!(unreported(&tg, "acme").await, 2);
        assert_eq!(sums(&stripe)[&("cus_acme".to_string(), "tg_api_calls".to_string())], 7);
        let metrics = tg.client.get(tg.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("tollgate_stripe_meter_events_total{outcome=\"uncertain\"} 1"), "{metrics}");

        // The operator finds the event in Stripe and says so.
        let identifier = stripe.applied().into_keys().next().unwrap();
        let resolve = |landed: bool| {
            tg.client
                .post(tg.admin_url(&format!("/admin/stripe/reports/{identifier}/resolve")))
                .bearer_auth(ADMIN_TOKEN)
                .json(&serde_json::json!({ "landed": landed }))
                .send()
        };
        let r = resolve(true).await.unwrap();
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!((answer["state"].as_str(), answer["rows_marked"].as_u64()), (Some("delivered"), Some(2)));
        assert_eq!(unreported(&tg, "acme").await, 0);
        assert_eq!(tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM audit_log WHERE action = 'stripe.report.resolve'").await, 1);
        let (status, ty, _) = problem(resolve(false).await.unwrap()).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:unknown-report"));
        assert_eq!(sums(&stripe)[&("cus_acme".to_string(), "tg_api_calls".to_string())], 7);
    }
);

both!(
    /// A report Stripe keeps refusing is held back, its wait doubling from `report_interval`
    /// (100 ms here): over 2 s it is tried a handful of times instead of at every run (about
    /// 20), the ledger keeps its attempts and next try, and other customers' usage that arrives
    /// meanwhile is reported at the next run.
    refused_report_backs_off,
    |b| {
        let stripe = StripeStandIn::start().await;
        let up = Upstream::start().await;
        let tg = Tollgate::start_with(&config(up.addr, &stripe), b, None, meters).await;
        let l = ledger(&tg).await;
        l.link_stripe_customer("acme", "cus_acme", "test").await.unwrap();
        l.link_stripe_customer("globex", "cus_globex", "test").await.unwrap();
        stripe
            .inner
            .lock()
            .unwrap()
            .reject_customer
            .insert("cus_acme".into(), usize::MAX);
        l.insert_usage(&[row("acme", "api_calls", 3, Days::minutes(10))]).await.unwrap();
        let started = std::time::Instant::now();
        let acme_calls = || {
            stripe
                .calls(METER_EVENTS)
                .iter()
                .filter(|c| c.param("payload[stripe_customer_id]") == Some("cus_acme"))
                .count() as i64
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Newer usage of another customer goes out while acme's report waits.
        l.insert_usage(&[row("globex", "api_calls", 4, Days::zero())]).await.unwrap();
        for _ in 0..50 {
            if unreported(&tg, "globex").await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(unreported(&tg, "globex").await, 0);
        tokio::time::sleep(Duration::from_millis(2000).saturating_sub(started.elapsed())).await;
        let tries = acme_calls();
        assert!((2..=7).contains(&tries), "{tries} tries of a refused report in 2 s");
        assert_eq!(unreported(&tg, "acme").await, 1);
        let attempts = tg.scalar("SELECT CAST(attempts AS BIGINT) FROM stripe_meter_reports WHERE customer = 'acme'").await;
        assert!(attempts == tries || attempts + 1 == tries, "{attempts} attempts recorded, {tries} tries");
        let held_back = tg.scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_meter_reports WHERE customer = 'acme' AND next_attempt_at IS NOT NULL").await;
        assert_eq!(held_back, 1);
        assert_eq!(sums(&stripe).get(&("cus_acme".to_string(), "tg_api_calls".to_string())), None);
    }
);

both!(
    /// A rejected event (a 400 other than "already exists") stays pending and does not block
    /// other customers' usage; it is sent once Stripe accepts it.
    rejected_event_stays_pending,
    |b| {
        let stripe = StripeStandIn::start().await;
        let up = Upstream::start().await;
        let tg = Tollgate::start_with(&config(up.addr, &stripe), b, None, meters).await;
        let l = ledger(&tg).await;
        l.link_stripe_customer("acme", "cus_acme", "test").await.unwrap();
        l.link_stripe_customer("globex", "cus_globex", "test").await.unwrap();
        // Stripe refuses acme's event once (as for a customer it does not know); globex's, in
        // the same run, is accepted.
        stripe
            .inner
            .lock()
            .unwrap()
            .reject_customer
            .insert("cus_acme".into(), 1);
        l.insert_usage(&[
            row("acme", "api_calls", 3, Days::minutes(10)),
            row("globex", "api_calls", 4, Days::minutes(1)),
        ])
        .await
        .unwrap();
        for _ in 0..100 {
            if unreported(&tg, "acme").await == 0 && unreported(&tg, "globex").await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!((unreported(&tg, "acme").await, unreported(&tg, "globex").await), (0, 0));
        let calls = stripe.calls(METER_EVENTS);
        let of = |cus: &str| -> Vec<(usize, u16, String)> {
            calls
                .iter()
                .enumerate()
                .filter(|(_, c)| c.param("payload[stripe_customer_id]") == Some(cus))
                .map(|(i, c)| (i, c.status, c.param("identifier").unwrap().to_string()))
                .collect()
        };
        let (acme, globex) = (of("cus_acme"), of("cus_globex"));
        assert_eq!(acme.iter().map(|c| c.1).collect::<Vec<_>>(), vec![400, 200]);
        assert_eq!(acme[0].2, acme[1].2, "the refused event is resent as it was");
        assert_eq!(globex.iter().map(|c| c.1).collect::<Vec<_>>(), vec![200]);
        // globex did not wait for acme's refusal to be resolved.
        assert!(globex[0].0 < acme[1].0, "{calls:?}");
        let sums = sums(&stripe);
        assert_eq!(sums[&("cus_acme".to_string(), "tg_api_calls".to_string())], 3);
        assert_eq!(sums[&("cus_globex".to_string(), "tg_api_calls".to_string())], 4);
    }
);

both!(
    /// Meters are live config: giving a meter a `stripe_event_name` through the admin API starts
    /// reporting its usage without a restart (and nothing is sent before).
    live_meter_change_starts_reporting,
    |b| {
        let stripe = StripeStandIn::start().await;
        let up = Upstream::start().await;
        let tg = Tollgate::start_with(&config(up.addr, &stripe), b, None, |_| {}).await;
        let l = ledger(&tg).await;
        l.link_stripe_customer("acme", "cus_acme", "test").await.unwrap();
        l.insert_usage(&[row("acme", "api_calls", 5, Days::minutes(2))])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(stripe.calls(METER_EVENTS).is_empty());
        assert_eq!(unreported(&tg, "acme").await, 1);

        let current: serde_json::Value = tg
            .client
            .get(tg.admin_url("/admin/config"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut doc = current["document"].clone();
        doc["meters"]["api_calls"]["stripe_event_name"] = serde_json::json!("ev_live");
        let r = tg
            .client
            .put(tg.admin_url("/admin/config"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&doc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        for _ in 0..100 {
            if unreported(&tg, "acme").await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(unreported(&tg, "acme").await, 0);
        let want: BTreeMap<(String, String), i64> =
            [(("cus_acme".to_string(), "ev_live".to_string()), 5)]
                .into_iter()
                .collect();
        assert_eq!(sums(&stripe), want);
    }
);
