//! Usage reports (issue 4): `GET /admin/usage` groups the ledger by day, route or customer,
//! pages, speaks CSV, and its totals equal the ledger rows; bad input is 400/404.

use crate::support::*;
use serde_json::Value;

/// The base config with a default plan roomy enough for the calls below.
fn roomy(upstream: std::net::SocketAddr) -> String {
    base_config(upstream).replace(
        "quotas.api_calls = { included = 5, overage = \"deny\" }",
        "quotas.api_calls = { included = 100, overage = \"deny\" }",
    )
}

async fn report(tg: &Tollgate, query: &str) -> reqwest::Response {
    tg.client
        .get(tg.admin_url(&format!("/admin/usage?{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

async fn json(tg: &Tollgate, query: &str) -> Value {
    let r = report(tg, query).await;
    assert_eq!(r.status(), 200, "{query}");
    r.json().await.unwrap()
}

/// `(key, meter, units, requests)` of each row, keyed by the `group_by` field.
fn rows(v: &Value, key: &str) -> Vec<(String, String, i64, i64)> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[key].as_str().unwrap().to_string(),
                r["meter"].as_str().unwrap().to_string(),
                r["units"].as_i64().unwrap(),
                r["requests"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn api_calls_total(v: &Value) -> (i64, i64) {
    let t = v["totals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["meter"] == "api_calls")
        .unwrap();
    (
        t["units"].as_i64().unwrap(),
        t["requests"].as_i64().unwrap(),
    )
}

/// Two customers' calls: u1 3 × cost 1 and 2 × cost 2, u2 4 × cost 1, all in the ledger.
async fn traffic(tg: &Tollgate) {
    for _ in 0..3 {
        assert_eq!(tg.get("/signals", Some("u1")).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(
            tg.get("/signals/history/ACME", Some("u1")).await.status(),
            200
        );
    }
    for _ in 0..4 {
        assert_eq!(tg.get("/signals", Some("u2")).await.status(), 200);
    }
    assert_eq!(tg.wait_ledger("u1", 5).await, (5, 7));
    assert_eq!(tg.wait_ledger("u2", 4).await, (4, 4));
}

both!(
    /// By route, customer and day: each group's sums, and totals equal to the ledger's rows.
    groups_and_totals_match_ledger,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        traffic(&tg).await;

        let v = json(&tg, "group_by=route&customer=u1").await;
        assert_eq!(
            rows(&v, "route"),
            [
                ("GET /signals".into(), "api_calls".into(), 3, 3),
                ("GET /signals/history/{symbol}".into(), "api_calls".into(), 4, 2),
            ]
        );
        let (n, sum) = tg.ledger_usage("u1").await;
        assert_eq!(api_calls_total(&v), (sum, n));

        let v = json(&tg, "group_by=customer").await;
        assert_eq!(
            rows(&v, "customer"),
            [("u1".into(), "api_calls".into(), 7, 5), ("u2".into(), "api_calls".into(), 4, 4)]
        );
        assert_eq!(api_calls_total(&v), (11, 9));

        let v = json(&tg, "").await;
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        assert_eq!(rows(&v, "day"), [(today, "api_calls".into(), 11, 9)]);

        // Filters: one route across customers; a meter with no rows.
        let v = json(&tg, "group_by=customer&route=GET%20%2Fsignals").await;
        assert_eq!(api_calls_total(&v), (7, 7));
        let v = json(&tg, "meter=tokens").await;
        assert!(v["rows"].as_array().unwrap().is_empty() && v["totals"].as_array().unwrap().is_empty());
        // A range that ended before the calls has none of them.
        let v = json(&tg, "from=2026-01-01&to=2026-01-02").await;
        assert!(v["rows"].as_array().unwrap().is_empty());
    }
);

both!(
    /// Pages of one group each add up to the totals; `next_offset` ends the walk.
    pages_add_up,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        traffic(&tg).await;
        let mut offset = Some(0);
        let mut seen = Vec::new();
        let mut total = None;
        while let Some(o) = offset {
            let v = json(&tg, &format!("group_by=customer&limit=1&offset={o}")).await;
            assert!(v["rows"].as_array().unwrap().len() <= 1);
            seen.extend(rows(&v, "customer"));
            total = Some(api_calls_total(&v));
            offset = v["next_offset"].as_i64();
            assert!(seen.len() <= 2, "paging never ends");
        }
        assert_eq!(seen.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["u1", "u2"]);
        let units: i64 = seen.iter().map(|r| r.2).sum();
        assert_eq!((units, 9), total.unwrap());
    }
);

both!(
    /// `Accept: text/csv` sends the page as CSV with a header line and `X-Next-Offset`.
    csv_export,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        traffic(&tg).await;
        let r = tg
            .client
            .get(tg.admin_url("/admin/usage?group_by=route&customer=u1"))
            .bearer_auth(ADMIN_TOKEN)
            .header("accept", "text/csv")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
        assert!(r.headers().get("x-next-offset").is_none());
        assert_eq!(
            r.text().await.unwrap(),
            "route,meter,units,requests\r\nGET /signals,api_calls,3,3\r\nGET /signals/history/{symbol},api_calls,4,2\r\n"
        );
        let r = tg
            .client
            .get(tg.admin_url("/admin/usage?group_by=customer&limit=1"))
            .bearer_auth(ADMIN_TOKEN)
            .header("accept", "text/csv")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-next-offset"], "1");
        assert_eq!(r.text().await.unwrap(), "customer,meter,units,requests\r\nu1,api_calls,7,5\r\n");
    }
);

both!(
    /// Unknown customer → 404; inverted or > 400-day ranges and bad values → 400; no token → 401.
    bad_input,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&roomy(up.addr), b).await;
        assert_eq!(tg.get("/signals", Some("known")).await.status(), 200);
        tg.wait_ledger("known", 1).await;
        assert_eq!(report(&tg, "customer=known").await.status(), 200);
        let cases = [
            ("customer=stranger", 404, "unknown-customer"),
            ("from=2026-03-01&to=2026-02-01", 400, "invalid-range"),
            ("from=2025-01-01&to=2026-02-06", 400, "invalid-range"),
            ("from=last-week", 400, "invalid-query"),
            ("group_by=week", 400, "invalid-query"),
            ("limit=5000", 400, "invalid-query"),
        ];
        for (q, status, suffix) in cases {
            let (got, ty, body) = problem(report(&tg, q).await).await;
            assert_eq!((got, ty.as_str()), (status, format!("urn:tollgate:problem:{suffix}").as_str()), "{q}: {body}");
        }
        assert_eq!(report(&tg, "from=2025-01-01&to=2026-02-05").await.status(), 200);
        let r = tg.client.get(tg.admin_url("/admin/usage")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
);
