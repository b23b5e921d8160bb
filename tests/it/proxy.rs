//! The request path end to end, through a real pingora proxy, on both storage backends: every row
//! of the DESIGN §2 response table and every bad input of the core issue.

use crate::support::*;
use std::time::Duration;

/// Starts tollgate with the standard config on `b` and a fresh recording upstream.
async fn setup(b: Backend) -> (Tollgate, Upstream) {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), b).await;
    (tg, up)
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

both!(
    /// An allowed call reaches the upstream with the customer and request id, without the
    /// caller's token, answers with RateLimit headers, and is charged once in store and ledger.
    allowed_call_is_forwarded_charged_and_recorded,
    |b| {
        let (tg, up) = setup(b).await;
        let r = tg.get("/signals", Some("alice")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit").as_deref(), Some(format!("\"api_calls\";r=4;t={}", header(&r, "x-ratelimit-reset").unwrap()).as_str()));
        assert!(header(&r, "ratelimit-policy").unwrap().starts_with("\"api_calls\";q=5;w="));
        assert_eq!(header(&r, "x-ratelimit-limit").as_deref(), Some("5"));
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("4"));
        let seen = up.last().unwrap();
        assert_eq!(seen.headers.get("x-tollgate-customer").unwrap(), "alice");
        assert!(seen.headers.get("authorization").is_none(), "token must be stripped");
        assert_eq!(seen.headers.get("x-request-id").unwrap().to_str().unwrap(), header(&r, "x-request-id").unwrap());
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("alice", "api_calls").await, Some(1));
        }
        assert_eq!(tg.wait_ledger("alice", 1).await, (1, 1));
    }
);

both!(
    /// The quota is spent by cost weights; the call that does not fit is a 429 quota-exceeded
    /// with Retry-After to the period's end, it never reaches the upstream and is not a ledger row.
    quota_exceeded_is_429_with_retry_after,
    |b| {
        let (tg, up) = setup(b).await;
        assert_eq!(tg.get("/signals/history/AAPL", Some("bob")).await.status(), 200); // 2
        assert_eq!(tg.get("/signals/history/AAPL", Some("bob")).await.status(), 200); // 4
        let r = tg.get("/signals/history/AAPL", Some("bob")).await; // 6 > 5
        let retry: i64 = header(&r, "retry-after").unwrap().parse().unwrap();
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        assert!((retry - (period.end - chrono::Utc::now().timestamp())).abs() <= 5, "retry-after {retry}");
        assert_eq!(header(&r, "ratelimit").unwrap(), format!("\"api_calls\";r=1;t={retry}"));
        let (status, ty, body) = problem(r).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:quota-exceeded"));
        assert_eq!((body["meter"].as_str(), body["limit"].as_u64(), body["used"].as_u64()), (Some("api_calls"), Some(5), Some(4)));
        assert_eq!(up.hits(), 2);
        assert_eq!(tg.get("/signals", Some("bob")).await.status(), 200); // 5: a 1-unit call still fits
        assert_eq!(tg.get("/signals", Some("bob")).await.status(), 429);
        assert_eq!(tg.wait_ledger("bob", 3).await, (3, 5));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("bob", "api_calls").await, Some(5));
        }
    }
);

both!(
    /// A route whose feature the plan lacks is 403 feature-not-in-plan; the pro plan has it.
    feature_gate_is_403,
    |b| {
        let (tg, up) = setup(b).await;
        let (status, ty, _) = problem(tg.get("/export/pdf", Some("carol")).await).await;
        assert_eq!((status, ty.as_str()), (403, "urn:tollgate:problem:feature-not-in-plan"));
        assert_eq!(up.hits(), 0);
        assert_eq!(tg.put_customer("carol", serde_json::json!({"plan": "pro", "status": "active"})).await.status(), 200);
        assert_eq!(tg.get("/export/pdf", Some("carol")).await.status(), 200);
        assert_eq!(up.hits(), 1);
    }
);

both!(
    /// The plan's per-minute rate is enforced before the quota: the limited call is free.
    rate_limit_is_429_and_free,
    |b| {
        let (tg, up) = setup(b).await;
        tg.put_customer("dave", serde_json::json!({"plan": "tight"})).await;
        assert_eq!(tg.get("/signals", Some("dave")).await.status(), 200);
        assert_eq!(tg.get("/signals", Some("dave")).await.status(), 200);
        let r = tg.get("/signals", Some("dave")).await;
        let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
        assert!((1..=30).contains(&retry), "retry-after {retry}");
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:rate-limited"));
        assert_eq!(up.hits(), 2);
        assert_eq!(tg.wait_ledger("dave", 2).await, (2, 2));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("dave", "api_calls").await, Some(2));
        }
    }
);

both!(
    /// Subscription status policy: canceled and past-due beyond grace are 402 (canceled told to
    /// subscribe again, past-due to fix the payment method), past-due within grace is served,
    /// an operator suspension is 403 suspended.
    status_policy_402_and_suspended_403,
    |b| {
        let (tg, up) = setup(b).await;
        tg.put_customer("erin", serde_json::json!({"plan": "pro", "status": "canceled"})).await;
        let (status, ty, body) = problem(tg.get("/signals", Some("erin")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));
        assert_eq!(body["detail"], "the subscription is canceled; subscribe again to continue");

        let two_days_ago = chrono::Utc::now() - chrono::Duration::days(2);
        tg.put_customer("erin", serde_json::json!({"plan": "pro", "status": "past_due", "status_since": two_days_ago})).await;
        assert_eq!(tg.get("/signals", Some("erin")).await.status(), 200, "within the 3-day grace");

        let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
        tg.put_customer("erin", serde_json::json!({"plan": "pro", "status": "past_due", "status_since": ten_days_ago})).await;
        let (status, ty, body) = problem(tg.get("/signals", Some("erin")).await).await;
        assert_eq!((status, ty.as_str()), (402, "urn:tollgate:problem:payment-required"));
        assert_eq!(body["detail"], "the subscription is past_due; update the payment method to continue");

        tg.put_customer("erin", serde_json::json!({"plan": "pro", "status": "active", "suspended": true})).await;
        let (status, ty, _) = problem(tg.get("/signals", Some("erin")).await).await;
        assert_eq!((status, ty.as_str()), (403, "urn:tollgate:problem:suspended"));
        assert_eq!(up.hits(), 1);
    }
);

both!(
    /// No route matched → 404 no-route, nothing forwarded; a public route needs no token, is
    /// not metered, and a caller cannot spoof the customer header.
    no_route_404_and_public_routes,
    |b| {
        let (tg, up) = setup(b).await;
        let (status, ty, _) = problem(tg.get("/nope", Some("frank")).await).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:no-route"));
        assert_eq!(up.hits(), 0);
        let r = tg.client.get(tg.url("/public")).header("x-tollgate-customer", "victim").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(header(&r, "ratelimit").is_none());
        assert!(up.last().unwrap().headers.get("x-tollgate-customer").is_none(), "spoofed identity must not reach upstream");
        let mut tg = tg;
        tg.stop().await;
    }
);

both!(
    /// Upstream 5xx with charge = "success" refunds the reservation (ledger row with 0 units);
    /// charge = "always" keeps it.
    upstream_5xx_refunds,
    |b| {
        let (tg, up) = setup(b).await;
        let r = tg.get("/fail", Some("gina")).await;
        assert_eq!(r.status(), 500);
        assert_eq!(tg.get("/fail/always", Some("gina")).await.status(), 500);
        assert_eq!(up.hits(), 2);
        assert_eq!(tg.wait_ledger("gina", 2).await, (2, 1));
        let mut units = tg.ledger_units("gina").await;
        units.sort();
        assert_eq!(units, vec![0, 1]);
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("gina", "api_calls").await, Some(1));
        }
    }
);

both!(
    /// Upstream down → 502 upstream-unavailable as problem+json, reservation refunded.
    upstream_down_is_502_and_refunded,
    |b| {
        let up = Upstream::start().await;
        let dead = free_port();
        let tg = Tollgate::start_with(&base_config(up.addr), b, None, |c| {
            c.upstreams.get_mut("api").unwrap().targets = vec![dead.to_string()];
        })
        .await;
        let (status, ty, _) = problem(tg.get("/signals", Some("hank")).await).await;
        assert_eq!((status, ty.as_str()), (502, "urn:tollgate:problem:upstream-unavailable"));
        assert_eq!(tg.wait_ledger("hank", 1).await, (1, 0));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("hank", "api_calls").await, Some(0));
        }
    }
);

both!(
    /// `cost_from_response_header` charges the upstream's exact figure; past a deny cap the actual
    /// is still charged and the next call is refused; a garbage value keeps the reservation.
    exact_cost_from_response_header,
    |b| {
        let (tg, _up) = setup(b).await;
        let r = tg.get("/cost?n=37", Some("ivy")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("63"));
        assert_eq!(tg.get("/cost?n=70", Some("ivy")).await.status(), 200); // 37 + 10 fits; 70 charged
        let (status, ty, _) = problem(tg.get("/cost?n=1", Some("ivy")).await).await;
        assert_eq!((status, ty.as_str()), (429, "urn:tollgate:problem:quota-exceeded"));
        assert_eq!(tg.wait_ledger("ivy", 2).await, (2, 107));
        assert_eq!(tg.get("/cost-bad", Some("jo")).await.status(), 200);
        assert_eq!(tg.wait_ledger("jo", 1).await, (1, 10));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("ivy", "tokens").await, Some(107));
        }
        let metrics = tg.metrics().await;
        assert!(metrics.contains("tollgate_cost_header_invalid_total 1"), "{metrics}");
    }
);

both!(
    /// A cost from the upstream is a plain integer up to the route's `max_cost`: overflowing,
    /// negative, signed, fractional, exponent or over-ceiling values are invalid, counted, and
    /// the reservation (10) is kept in the store and the ledger, never wrapped.
    exact_cost_out_of_range_keeps_the_reservation,
    |b| {
        let (tg, _up) = setup(b).await;
        let bad = [
            "18446744073709551615", // u64::MAX
            "18446744073709551566", // u64::MAX - 49: wrapped to -50 as i64 before
            "9223372036854775808",  // 2^63
            "-1",
            "1e3",
            "%2B7",
            "7.0",
            "7%207",
            "0x7",
            "501", // above max_cost = 500
        ];
        for n in bad {
            let r = tg.get(&format!("/cost?n={n}"), Some("lou")).await;
            assert_eq!(r.status(), 200, "n={n}");
        }
        assert_eq!(tg.wait_ledger("lou", 10).await, (10, 100));
        // At the ceiling is valid; surrounding whitespace is not part of an HTTP field value
        // (RFC 9110 §5.5), so " 7 " on the wire is the value 7.
        assert_eq!(tg.get("/cost?n=500", Some("max")).await.status(), 200);
        assert_eq!(tg.get("/cost?n=%207%20", Some("sue")).await.status(), 200);
        assert_eq!(tg.wait_ledger("max", 1).await, (1, 500));
        assert_eq!(tg.wait_ledger("sue", 1).await, (1, 7));
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("lou", "tokens").await, Some(100));
            assert_eq!(tg.redis_used("max", "tokens").await, Some(500));
        }
        let metrics = tg.metrics().await;
        assert!(metrics.contains("tollgate_cost_header_invalid_total 10"), "{metrics}");
    }
);

both!(
    /// A client that sends a complete request and half-closes its side (`shutdown(SHUT_WR)`,
    /// `nc -N`) still gets the answer, and the ledger row says 200, not 0.
    half_closed_request_is_answered,
    |b| {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tg, up) = setup(b).await;
        let mut conn = tokio::net::TcpStream::connect(tg.proxy).await.unwrap();
        let req = format!(
            "GET /signals HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token("hal")
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        conn.shutdown().await.unwrap(); // FIN: nothing more to send
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
            .await
            .expect("answered within 5 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(up.hits(), 1);
        assert_eq!(tg.wait_ledger("hal", 1).await, (1, 1));
        assert_eq!(
            tg.scalar("SELECT CAST(status AS BIGINT) FROM usage_events WHERE customer = 'hal'").await,
            200
        );
    }
);

both!(
    /// A token's customer follows the one id rule: `" acme"` is not a second `acme` with its own
    /// free quota, and a 257-byte id is refused; both are 401 `invalid-token`, never forwarded.
    token_customer_ids_are_validated,
    |b| {
        let (tg, up) = setup(b).await;
        for sub in [" acme", "acme ", "x".repeat(257).as_str()] {
            let r = tg.get_with_token("/signals", &sign(&claims(sub))).await;
            let (status, ty, _) = problem(r).await;
            assert_eq!((status, ty.as_str()), (401, "urn:tollgate:problem:invalid-token"), "{sub:?}");
        }
        assert_eq!(up.hits(), 0);
        assert_eq!(tg.get_with_token("/signals", &sign(&claims("acme"))).await.status(), 200);
    }
);

both!(
    /// Every bad token is a 401 invalid-token with `WWW-Authenticate`, and the upstream sees nothing.
    bad_tokens_are_401_and_never_forwarded,
    |b| {
        let (tg, up) = setup(b).await;
        let now = chrono::Utc::now().timestamp();
        let mut expired = claims("kim");
        expired["exp"] = (now - 3600).into();
        let mut not_yet = claims("kim");
        not_yet["nbf"] = (now + 3600).into();
        let mut wrong_iss = claims("kim");
        wrong_iss["iss"] = "https://evil.test/".into();
        let mut wrong_aud = claims("kim");
        wrong_aud["aud"] = "other".into();
        let mut no_sub = claims("kim");
        no_sub.as_object_mut().unwrap().remove("sub");
        let valid = token("kim");
        let parts: Vec<&str> = valid.split('.').collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tampered_payload = b64.encode(serde_json::to_vec(&claims("mallory")).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], tampered_payload, parts[2]);
        let none_header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let alg_none = format!("{none_header}.{}.", parts[1]);
        let crit = {
            let h = jsonwebtoken::Header { crit: Some(vec!["exp-ext".into()]), ..Default::default() };
            jsonwebtoken::encode(&h, &claims("kim"), &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
        };
        let wrong_secret = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims("kim"), &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret")).unwrap();
        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing", None),
            ("empty bearer", Some("Bearer ".into())),
            ("garbled", Some("Bearer not.a.jwt".into())),
            ("wrong scheme", Some(format!("Basic {valid}"))),
            ("expired", Some(format!("Bearer {}", sign(&expired)))),
            ("not yet valid", Some(format!("Bearer {}", sign(&not_yet)))),
            ("wrong issuer", Some(format!("Bearer {}", sign(&wrong_iss)))),
            ("wrong audience", Some(format!("Bearer {}", sign(&wrong_aud)))),
            ("no customer claim", Some(format!("Bearer {}", sign(&no_sub)))),
            ("tampered payload", Some(format!("Bearer {tampered}"))),
            ("alg none", Some(format!("Bearer {alg_none}"))),
            ("crit header", Some(format!("Bearer {crit}"))),
            ("wrong secret", Some(format!("Bearer {wrong_secret}"))),
        ];
        for (name, auth) in cases {
            let mut req = tg.client.get(tg.url("/signals"));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let www = header(&r, "www-authenticate").unwrap_or_default();
            assert!(header(&r, "connection").as_deref() != Some("close"), "{name}: denials keep the connection alive");
            let (status, ty, _) = problem(r).await;
            assert_eq!((status, ty.as_str()), (401, "urn:tollgate:problem:invalid-token"), "{name}");
            assert!(www.starts_with("Bearer realm=\"tollgate\""), "{name}: {www}");
            // RFC 6750 §3.1: no error code when no (bearer) credentials were presented.
            let presented = auth.is_some() && name != "wrong scheme";
            assert_eq!(www.contains("invalid_token"), presented, "{name}: {www}");
        }
        assert_eq!(up.hits(), 0, "no bad token may reach the upstream");
    }
);

both!(
    /// A 16 KiB header is refused (431) before anything else; the upstream sees nothing.
    oversized_header_is_refused,
    |b| {
        let (tg, up) = setup(b).await;
        let big = "x".repeat(16 * 1024);
        let r = tg.client.get(tg.url("/signals")).bearer_auth(token("lee")).header("x-junk", big).send().await.unwrap();
        let status = r.status().as_u16();
        assert!(status == 431 || status == 401, "got {status}");
        assert_eq!(up.hits(), 0);
    }
);

both!(
    /// The head limit counts the request line too: a 16 KiB path with small headers is 431
    /// `request-header-too-large`, and the upstream sees nothing.
    oversized_request_line_is_refused,
    |b| {
        let (tg, up) = setup(b).await;
        let path = format!("/signals?q={}", "x".repeat(16 * 1024));
        let r = tg.get(&path, Some("lena")).await;
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (431, "urn:tollgate:problem:request-header-too-large"));
        assert_eq!(up.hits(), 0);
    }
);

/// Redis unreachable: a fail-closed plan answers 503 quota-store-unavailable; a fail-open plan is
/// served from local counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_store_down_follows_fail_mode() {
    let up = Upstream::start().await;
    let dead = free_port();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(format!("redis://{dead}/"));
        c.storage.redis_timeout = Duration::from_millis(100);
    })
    .await;
    tg.put_customer("closed-co", serde_json::json!({"plan": "closed"}))
        .await;
    let (status, ty, _) = problem(tg.get("/signals", Some("closed-co")).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (503, "urn:tollgate:problem:quota-store-unavailable")
    );
    assert_eq!(up.hits(), 0);
    // free is fail-open (the default): served, and still exact against its local counter.
    for _ in 0..5 {
        assert_eq!(tg.get("/signals", Some("open-co")).await.status(), 200);
    }
    assert_eq!(tg.get("/signals", Some("open-co")).await.status(), 429);
    assert_eq!(up.hits(), 5);
    // Ready: a fail-open plan is served, so a load balancer must keep this instance; the body
    // says the quota store is down, and so does `/healthz?verbose`.
    let ready = tg.client.get(tg.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_ne!(
        body["quota_store"], "ok",
        "readyz must report the quota store down: {body}"
    );
    assert_eq!(body["ledger"], "ok", "{body}");
    let health = tg
        .client
        .get(tg.admin_url("/healthz?verbose"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["quota_store"], body["quota_store"], "{health}");
}

/// Redis unreachable and every plan fails closed: every metered call would be a 503, so the
/// instance is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_store_down_with_every_plan_closed_is_not_ready() {
    let up = Upstream::start().await;
    let dead = free_port();
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Shared, None, |c| {
        c.storage.redis_url = Some(format!("redis://{dead}/"));
        c.storage.redis_timeout = Duration::from_millis(100);
        for plan in c.plans.values_mut() {
            plan.fail_mode = tollgate::config::FailMode::Closed;
        }
    })
    .await;
    let ready = tg.client.get(tg.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_ne!(body["quota_store"], "ok", "{body}");
}

both!(
    /// Usage still queued at shutdown is flushed to the ledger before the process exits.
    shutdown_flushes_usage,
    |b| {
        let up = Upstream::start().await;
        let mut tg = Tollgate::start_with(&base_config(up.addr), b, None, |c| {
            c.storage.usage_flush_interval = Duration::from_secs(600);
        })
        .await;
        for _ in 0..5 {
            assert_eq!(tg.get("/signals", Some("max")).await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(tg.ledger_usage("max").await, (0, 0), "nothing flushed before shutdown");
        tg.stop().await;
        assert_eq!(tg.ledger_usage("max").await, (5, 5));
    }
);

/// A graceful stop drains: `/readyz` turns 503 at once, a 5 s call in flight is answered 200 and
/// recorded, and the stop ends as soon as it is done, not after the 10 s grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_drains_in_flight_calls_then_exits() {
    let up = Upstream::start().await;
    let mut tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.proxy.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    let slow = tokio::spawn(
        tg.client
            .get(tg.url("/slow"))
            .bearer_auth(token("drain"))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client, readyz) = (tg.client.clone(), tg.admin_url("/readyz"));
    let asked = std::time::Instant::now();
    let ((), ready) = tokio::join!(tg.stop(), async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.get(readyz).send().await.unwrap().status()
    });
    let took = asked.elapsed();
    assert_eq!(ready, 503, "draining: not ready");
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        took < Duration::from_secs(8),
        "the stop waited for the grace: {took:?}"
    );
    assert_eq!(tg.ledger_usage("drain").await, (1, 1));
}

/// Round robin over an upstream's targets; with a health check, a dead target stops getting
/// traffic and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_health_checks() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let toml = base_config(a.addr).replace(
        &format!("targets = [\"{}\"]", a.addr),
        &format!("targets = [\"{}\", \"{}\"]", a.addr, b.addr),
    );
    let tg = Tollgate::start(&toml, Backend::Embedded).await;
    tg.put_customer("rr", serde_json::json!({"plan": "pro"}))
        .await;
    for _ in 0..10 {
        assert_eq!(tg.get("/signals", Some("rr")).await.status(), 200);
    }
    assert_eq!((a.hits(), b.hits()), (5, 5));

    let dead = free_port();
    let toml = base_config(a.addr).replace(
        &format!("targets = [\"{}\"]", a.addr),
        &format!(
            "targets = [\"{}\", \"{dead}\"]\nhealth_check_seconds = 1",
            a.addr
        ),
    );
    let tg = Tollgate::start(&toml, Backend::Embedded).await;
    tg.put_customer("hc", serde_json::json!({"plan": "pro"}))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // two health-check rounds
    let before = a.hits();
    for _ in 0..10 {
        assert_eq!(tg.get("/signals", Some("hc")).await.status(), 200);
    }
    assert_eq!(a.hits() - before, 10);
}

/// With `unmatched = "forward"`, requests no route matches go to the named upstream, unmetered
/// and without a token; they are not ledger rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_can_be_forwarded_unmetered() {
    let up = Upstream::start().await;
    let toml = base_config(up.addr).replace(
        "shutdown_grace = \"0s\"",
        "shutdown_grace = \"0s\"\nunmatched = \"forward\"\nunmatched_upstream = \"api\"",
    );
    let tg = Tollgate::start(&toml, Backend::Embedded).await;
    let r = tg.get("/docs/index.html", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("ratelimit").is_none());
    assert_eq!(up.last().unwrap().path, "/docs/index.html");
    assert_eq!(
        tg.get("/signals", None).await.status(),
        401,
        "matched routes still need a token"
    );
    assert_eq!(tg.ledger_usage("").await, (0, 0));
}

both!(
    /// A request cut off by shutdown after it was charged (pingora drops in-flight requests when
    /// the grace runs out) still gets its ledger row, so the ledger agrees with the quota store.
    request_cut_off_by_shutdown_is_still_recorded,
    |b| {
        let (mut tg, up) = setup(b).await;
        let client = tg.client.clone();
        let url = tg.url("/slow");
        let pending = tokio::spawn(async move { client.get(url).bearer_auth(token("late")).send().await });
        for _ in 0..100 {
            if up.hits() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(up.hits(), 1, "the slow request reached the upstream");
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("late", "api_calls").await, Some(1));
        }
        tg.stop().await;
        assert!(pending.await.unwrap().is_err(), "the client got no response");
        assert_eq!(tg.ledger_usage("late").await, (1, 1));
    }
);

both!(
    /// A client that hangs up after its request reached the upstream is charged: the upstream
    /// got the call (hanging up is not an upstream failure, and must not make calls free). The
    /// access log and metrics say `client-closed`, not `upstream-unavailable`.
    client_hang_up_after_forwarding_is_charged,
    |b| {
        let (tg, up) = setup(b).await;
        let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
        let r = client.get(tg.url("/slow")).bearer_auth(token("quitter")).send().await;
        assert!(r.is_err(), "the client gave up before the 5 s upstream answered");
        assert_eq!(up.hits(), 1, "the request reached the upstream");
        assert_eq!(tg.wait_ledger("quitter", 1).await, (1, 1), "one row, charged 1 unit");
        if b == Backend::Shared {
            assert_eq!(tg.redis_used("quitter", "api_calls").await, Some(1));
        }
        let metrics = tg.metrics().await;
        let line = |decision: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with("tollgate_requests_total") && l.contains("route=\"GET /slow\"") && l.contains(&format!("decision=\"{decision}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(line("client-closed").as_deref(), Some("1"), "{metrics}");
        assert_eq!(line("upstream-unavailable").as_deref(), Some("0"));
    }
);

both!(
    /// A running instance is ready: quota store and ledger answer and the config is loaded
    /// (numbered by the ledger: version ≥ 1). `/healthz` needs no token.
    readyz_reports_store_ledger_and_config,
    |b| {
        let (tg, _up) = setup(b).await;
        assert_eq!(tg.client.get(tg.admin_url("/healthz")).send().await.unwrap().status(), 200);
        let ready = tg.client.get(tg.admin_url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!((body["quota_store"].as_str(), body["ledger"].as_str()), (Some("ok"), Some("ok")));
        assert!(body["config_version"].as_u64().unwrap() >= 1, "{body}");
    }
);

/// A ledger row carries the time the call was charged (its quota period's clock), not the time
/// it finished: a slow call must not land in the next period's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_row_is_stamped_when_the_call_was_charged() {
    let (tg, _up) = setup(Backend::Shared).await;
    let sent = chrono::Utc::now();
    assert_eq!(tg.get("/slow", Some("stamp")).await.status(), 200); // the upstream takes 5 s
    tg.wait_ledger("stamp", 1).await;
    let pool = tg.pg().await;
    let (ts,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT ts FROM usage_events WHERE customer = 'stamp'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    let after_send = (ts - sent).num_milliseconds();
    assert!(
        (0..1000).contains(&after_send),
        "row stamped {after_send} ms after the call was sent"
    );
}

/// Sends one raw request (`Connection: close`), returns the whole answer as text.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

both!(
    /// A protocol upgrade would turn the connection into a tunnel the proxy sees no requests in
    /// (`Upgrade: h2c` smuggles HTTP/2 requests to any path, unmetered): refused 400
    /// `upgrade-not-allowed` on every route, public ones too, and the connection closed; only a
    /// route with `upgrade = "websocket"` forwards a WebSocket upgrade, charged as a call.
    upgrades_are_refused_unless_the_route_allows_websocket,
    |b| {
        let up = Upstream::start().await;
        let toml = base_config(up.addr)
            + r#"
[[routes]]
name = "ws"
match = "GET /ws"
upstream = "api"
upgrade = "websocket"
"#;
        let tg = Tollgate::start(&toml, b).await;
        let tok = token("up");
        let ask = |path: &str, upgrade: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {tok}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET /export/pdf HTTP/1.1\r\nHost: api.test\r\n\r\n"
            )
        };
        for (path, upgrade) in [("/signals", "h2c"), ("/public", "websocket"), ("/nowhere", "websocket"), ("/ws", "h2c")] {
            let answer = raw_exchange(tg.proxy, &ask(path, upgrade)).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{path} {upgrade}: {answer}");
            assert!(answer.contains("urn:tollgate:problem:upgrade-not-allowed"), "{answer}");
            assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "one answer, then closed: {answer}");
        }
        assert_eq!(up.hits(), 0, "nothing refused reached the upstream");
        let answer = raw_exchange(tg.proxy, &ask("/ws", "websocket").replace("Connection: Upgrade", "Connection: Upgrade, close")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let seen = up.last().unwrap();
        assert_eq!(seen.path, "/ws");
        assert_eq!(seen.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(tg.wait_ledger("up", 1).await, (1, 1));
    }
);

/// `proxy.max_connections_per_ip = 2`: of three idle connections from one address (heads never
/// sent), one is closed at once and counted, whichever the proxy took last; the other two still
/// serve, and a slot frees when one closes. (From 127.0.0.2, so the harness's own connections
/// from 127.0.0.1 do not count.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.proxy.max_connections_per_ip = 2;
    })
    .await;
    let connect = || async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        s.connect(tg.proxy).await.unwrap()
    };
    let mut conns = vec![connect().await, connect().await, connect().await];
    // The refused one reads EOF; the held ones read nothing (they wait for a head).
    let start = std::time::Instant::now();
    let closed = loop {
        let mut found = None;
        for (i, c) in conns.iter_mut().enumerate() {
            let mut buf = [0u8; 64];
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await {
                assert_eq!(r.unwrap_or(0), 0, "closed without an answer");
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no connection was refused"
        );
    };
    conns.remove(closed);
    assert_eq!(tg.metric("tollgate_connections_refused_total").await, 1);

    let req = format!(
        "GET /signals HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token("capped")
    );
    let mut first = conns.remove(0);
    first.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect().await;
    again.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    again.read_to_end(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "a slot freed"
    );
    assert_eq!(tg.metric("tollgate_connections_refused_total").await, 1);
}

/// `proxy.header_read_timeout = 1s`: a client trickling its first head a byte every 100 ms is
/// cut off after about a second (pingora alone bounds each read, so it would wait forever),
/// never reaches the upstream, and is counted; a client that sent its head in time keeps its
/// keep-alive connection past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_not_complete_in_time_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.proxy.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let head = format!(
        "GET /signals HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {}\r\n\r\n",
        token("slow-head")
    );

    let mut slow = tokio::net::TcpStream::connect(tg.proxy).await.unwrap();
    let start = std::time::Instant::now();
    let mut cut_off = None;
    for b in head.as_bytes() {
        if slow.write_all(&[*b]).await.is_err() {
            cut_off = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                cut_off = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => {} // still open: the next byte
        }
    }
    let cut_off = cut_off.expect("the trickled head was read to its end");
    assert!(
        cut_off >= Duration::from_millis(900) && cut_off < Duration::from_secs(3),
        "cut off after {cut_off:?}"
    );
    assert_eq!(tg.metric("tollgate_header_timeouts_total").await, 1);
    assert_eq!(up.hits(), 0, "nothing reached the upstream");

    let mut prompt = tokio::net::TcpStream::connect(tg.proxy).await.unwrap();
    prompt.write_all(head.as_bytes()).await.unwrap();
    assert!(one_answer(&mut prompt).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    prompt.write_all(head.as_bytes()).await.unwrap();
    assert!(
        one_answer(&mut prompt).await.starts_with("HTTP/1.1 200"),
        "a keep-alive connection is not cut off by the first head's deadline"
    );
    assert_eq!(tg.metric("tollgate_header_timeouts_total").await, 1);
}

/// The first read of an answer on a keep-alive connection (the test upstream's answers are
/// small enough to arrive in one).
async fn one_answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}
