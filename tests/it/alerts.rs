//! Threshold alerts (issue 4): crossing a plan's alert percentage sends exactly one signed
//! webhook per customer/meter/period/threshold, even under concurrent requests, across
//! instances and after a credit lets the counter cross again; a failing receiver gets it once
//! a retry succeeds; every attempt is in the delivery log.

use crate::support::*;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    alert_id: String,
    body: Value,
    signature_ok: bool,
    answered: u16,
}

/// A local alert receiver that checks `Tollgate-Signature` itself and fails the first
/// `fail_first` requests with 500.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
}

/// Stripe's scheme, computed here independently of tollgate's code.
fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(h) = headers
        .get("tollgate-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (mut t, mut v1) = (None, None);
    for part in h.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let fresh = t
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fresh && want == v1
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicUsize::new(fail_first));
        let (h, f) = (hits.clone(), failures.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (hits, failures) = (h.clone(), f.clone());
                async move {
                    let ok = signature_ok(&headers, &body);
                    let failing = failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let status = match (ok, failing) {
                        (false, _) => StatusCode::BAD_REQUEST,
                        (true, true) => StatusCode::INTERNAL_SERVER_ERROR,
                        (true, false) => StatusCode::OK,
                    };
                    hits.lock().unwrap().push(Hit {
                        alert_id: headers
                            .get("tollgate-alert-id")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default(),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        signature_ok: ok,
                        answered: status.as_u16(),
                    });
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Alerts accepted (2xx), as `(customer, threshold)`.
    fn delivered(&self) -> Vec<(String, i64)> {
        self.hits()
            .into_iter()
            .filter(|h| h.answered == 200)
            .map(|h| {
                (
                    h.body["customer"].as_str().unwrap().to_string(),
                    h.body["threshold_percent"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits (≤ 10 s) until `n` alerts were accepted.
    async fn wait_delivered(&self, n: usize) -> Vec<(String, i64)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = self.delivered();
            if d.len() >= n {
                return d;
            }
            assert!(Instant::now() < deadline, "only {d:?} delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The base config with `pro` including 10 api_calls and alerting at 80 % and 100 %.
fn alerting(upstream: SocketAddr, receiver: SocketAddr) -> String {
    let base = base_config(upstream)
        .replace(
            "quotas.api_calls = { included = 1000, overage = \"allow\"",
            "quotas.api_calls = { included = 10, overage = \"allow\"",
        )
        .replace("[plans.pro]\n", "[plans.pro]\nalerts = [80, 100]\n");
    format!(
        "{base}\n[alerts]\nwebhook_url = \"http://{receiver}/hook\"\n\
         secret_env = \"TOLLGATE_TEST_JWT_SECRET\"\nretry_backoff_ms = 50\n"
    )
}

/// `n` concurrent calls of `GET /signals` as `customer`, spread over `instances`.
async fn concurrent(instances: &[&Tollgate], customer: &str, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let tg = instances[i % instances.len()];
        let (client, url) = (tg.client.clone(), tg.url("/signals"));
        let token = token(customer);
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

async fn delivery_log(tg: &Tollgate) -> Vec<Value> {
    let r = tg
        .client
        .get(tg.admin_url("/admin/alerts"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["deliveries"].as_array().unwrap().clone()
}

both!(
    /// Concurrent calls (over two instances on the shared backend) crossing 80 % send exactly one
    /// signed alert; reaching 100 % sends one more; crossing both again after a credit sends
    /// nothing; the delivery log has one delivered row per alert.
    one_signed_alert_per_threshold,
    |b| {
        let up = Upstream::start().await;
        let rx = Receiver::start(0).await;
        let config = alerting(up.addr, rx.addr);
        let tg = Tollgate::start(&config, b).await;
        let peer = match b {
            Backend::Shared => Some(Tollgate::start_with(&config, b, Some(&tg), |_| {}).await),
            Backend::Embedded => None,
        };
        let both: Vec<&Tollgate> = std::iter::once(&tg).chain(peer.as_ref()).collect();
        let last = *both.last().unwrap();
        for c in ["ada", "bob"] {
            assert_eq!(tg.put_customer(c, json!({"plan": "pro"})).await.status(), 200);
        }

        concurrent(&both, "ada", 9).await;
        assert_eq!(rx.wait_delivered(1).await, [("ada".to_string(), 80)]);
        let first = rx.hits()[0].clone();
        assert!(first.signature_ok);
        assert_eq!(
            (&first.body["meter"], &first.body["plan"], &first.body["used"], &first.body["included"]),
            (&json!("api_calls"), &json!("pro"), &json!(8), &json!(10)),
            "{}", first.body
        );
        let month = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        let start = chrono::DateTime::parse_from_rfc3339(first.body["period_start"].as_str().unwrap()).unwrap();
        assert_eq!(start.timestamp(), month.start);

        concurrent(&both, "ada", 1).await;
        assert_eq!(rx.wait_delivered(2).await[1], ("ada".to_string(), 100));

        // A credit lets ada cross 80 % and 100 % again: already sent this period, so nothing.
        let r = tg.client.post(tg.admin_url("/admin/customers/ada/credit")).bearer_auth(ADMIN_TOKEN)
            .json(&json!({"meter": "api_calls", "units": 5, "reason": "test"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        concurrent(&[last], "ada", 6).await;
        // bob's crossing is queued behind ada's on the same instance: once it is delivered,
        // ada's repeats have been seen (and refused) by that instance's worker.
        concurrent(&[last], "bob", 8).await;
        let d = rx.wait_delivered(3).await;
        assert_eq!(d, [("ada".to_string(), 80), ("ada".to_string(), 100), ("bob".to_string(), 80)]);
        assert!(rx.hits().iter().all(|h| h.signature_ok && h.answered == 200));

        // The worker records a delivery after the receiver answered: wait for the last one.
        let deadline = Instant::now() + Duration::from_secs(5);
        let log = loop {
            let log = delivery_log(&tg).await;
            if log.len() == 3 && log.iter().all(|r| r["delivered_at"].is_string()) {
                break log;
            }
            assert!(Instant::now() < deadline, "deliveries never all logged: {log:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for row in &log {
            assert_eq!((&row["attempts"], &row["last_status"]), (&json!(1), &json!(200)), "{row}");
            assert!(row["delivered_at"].is_string(), "{row}");
        }
        let ids: Vec<String> = rx.hits().iter().map(|h| h.alert_id.clone()).collect();
        let mut logged: Vec<String> = log.iter().map(|r| r["id"].to_string()).collect();
        logged.reverse();
        assert_eq!(ids, logged);
    }
);

both!(
    /// A receiver that fails twice gets the alert on the third attempt (same alert id each
    /// time), and the delivery log records three attempts and the delivery.
    retried_until_delivered,
    |b| {
        let up = Upstream::start().await;
        let rx = Receiver::start(2).await;
        let tg = Tollgate::start(&alerting(up.addr, rx.addr), b).await;
        assert_eq!(tg.put_customer("cleo", json!({"plan": "pro"})).await.status(), 200);
        concurrent(&[&tg], "cleo", 8).await;
        assert_eq!(rx.wait_delivered(1).await, [("cleo".to_string(), 80)]);
        let hits = rx.hits();
        assert_eq!(hits.iter().map(|h| h.answered).collect::<Vec<_>>(), [500, 500, 200]);
        assert!(hits.iter().all(|h| h.signature_ok && h.alert_id == hits[0].alert_id));

        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = delivery_log(&tg).await;
            if log.len() == 1 && log[0]["delivered_at"].is_string() {
                assert_eq!((&log[0]["attempts"], &log[0]["last_status"]), (&json!(3), &json!(200)));
                assert!(log[0]["last_error"].is_null(), "{}", log[0]);
                assert_eq!(log[0]["id"].to_string(), hits[0].alert_id);
                break;
            }
            assert!(Instant::now() < deadline, "delivery never logged: {log:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
);

both!(
    /// An alert still being retried when its instance stops is not lost: the stopping instance
    /// releases it, and the next instance on the same ledger takes it over at start and
    /// delivers it with the same alert id; the delivery log counts both attempts.
    undelivered_alert_survives_a_restart,
    |b| {
        let up = Upstream::start().await;
        let rx = Receiver::start(1).await;
        // A long first backoff: the instance stops while waiting to retry.
        let config = alerting(up.addr, rx.addr).replace("retry_backoff_ms = 50", "retry_backoff_ms = 30000");
        let mut first = Tollgate::start(&config, b).await;
        assert_eq!(first.put_customer("dora", json!({"plan": "pro"})).await.status(), 200);
        concurrent(&[&first], "dora", 8).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.hits().is_empty() {
            assert!(Instant::now() < deadline, "no first attempt");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.stop().await;
        assert_eq!(rx.hits().iter().map(|h| h.answered).collect::<Vec<_>>(), [500]);

        let second = Tollgate::start_with(&config, b, Some(&first), |_| {}).await;
        assert_eq!(rx.wait_delivered(1).await, [("dora".to_string(), 80)]);
        let hits = rx.hits();
        assert_eq!(hits.iter().map(|h| h.answered).collect::<Vec<_>>(), [500, 200]);
        assert_eq!(hits[0].alert_id, hits[1].alert_id);
        assert!(hits[1].signature_ok);
        assert!(hits[1].body["period_end"].is_string(), "{}", hits[1].body);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = delivery_log(&second).await;
            if log.len() == 1 && log[0]["delivered_at"].is_string() {
                assert_eq!(log[0]["attempts"], json!(2));
                break;
            }
            assert!(Instant::now() < deadline, "delivery never logged: {log:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
);

/// Usage that is not a proxied call crosses thresholds too: an ingested event takes `pro`'s 10
/// included calls to 80 %, a reservation committed above what it held takes them to 100 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_and_reserved_usage_send_alerts() {
    let receiver = Receiver::start(0).await;
    let up = Upstream::start().await;
    let tg = Tollgate::start(&alerting(up.addr, receiver.addr), Backend::Embedded).await;
    assert_eq!(
        tg.put_customer("evt", json!({"plan": "pro"}))
            .await
            .status(),
        200
    );
    let post = |path: &str, body: Value| {
        tg.client
            .post(tg.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let event = json!([{"specversion": "1.0", "id": "job-1", "source": "//jobs", "type": "api_calls",
        "subject": "evt", "data": {"value": 8}}]);
    let out: Value = post("/v1/events", event)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(out["accepted"], 1, "{out}");
    assert_eq!(receiver.wait_delivered(1).await, [("evt".to_string(), 80)]);
    let held: Value = post(
        "/v1/check",
        json!({"customer": "evt", "meter": "api_calls", "units": 1, "reserve": true}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(held["used"], 9, "{held}");
    let id = held["reservation"]["id"].as_str().unwrap();
    let done: Value = post(
        &format!("/v1/reservations/{id}/commit"),
        json!({"units": 3}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(done["used"], 11, "{done}");
    assert_eq!(
        receiver.wait_delivered(2).await,
        [("evt".to_string(), 80), ("evt".to_string(), 100)]
    );
}
