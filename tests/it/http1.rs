//! HTTP/1.1 as clients expect it of a gateway: a known path asked with a method it does not have
//! is 405 with `Allow` (only a path no route has is 404), whatever `proxy.unmatched` says; and
//! requests pipelined on one connection are all answered, in order. Requests are written as raw
//! bytes where a client library would hide what is checked (pipelining, the exact answers).

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The standard config plus `DELETE /signals`, so `/signals` has two methods.
fn config(up: std::net::SocketAddr) -> String {
    base_config(up)
        + r#"
[[routes]]
name = "signals-delete"
match = "DELETE /signals"
upstream = "api"
cost = 1
"#
}

/// One answer read off a connection: status, headers (names lower case), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one answer (`Content-Length` or chunked body), leaving what follows unread.
async fn read_answer(conn: &mut BufReader<TcpStream>) -> Answer {
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut line))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert!(n > 0, "connection closed before the answer");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).await.unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            conn.read_line(&mut size).await.unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2]; // and its CRLF
            conn.read_exact(&mut chunk).await.unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let len: usize = find("content-length").map_or(0, |v| v.parse().unwrap());
        body.resize(len, 0);
        conn.read_exact(&mut body).await.unwrap();
    }
    Answer {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

both!(
    /// `POST /signals` (a path with GET and DELETE routes) is 405 `method-not-allowed` as
    /// problem+json with `Allow: GET, DELETE`, with or without a token; it never reaches the
    /// upstream and costs nothing (the next GET sees all 5 units left); the metric counts it.
    /// A path no route has is still 404 `no-route`.
    wrong_method_on_a_known_path_is_405,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        for customer in [Some("mo"), None] {
            let mut req = tg.client.post(tg.url("/signals")).body("{}");
            if let Some(c) = customer {
                req = req.bearer_auth(token(c));
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.headers()["allow"], "GET, DELETE", "{customer:?}");
            let (status, ty, body) = problem(r).await;
            assert_eq!((status, ty.as_str()), (405, "urn:tollgate:problem:method-not-allowed"), "{body}");
            assert!(body["detail"].as_str().unwrap().contains("GET, DELETE"), "{body}");
        }
        let r = tg.client.put(tg.url("/signals/history/AAPL")).bearer_auth(token("mo")).send().await.unwrap();
        assert_eq!(r.headers()["allow"], "GET");
        assert_eq!(problem(r).await.0, 405);
        let (status, ty, _) = problem(tg.client.post(tg.url("/nope")).bearer_auth(token("mo")).send().await.unwrap()).await;
        assert_eq!((status, ty.as_str()), (404, "urn:tollgate:problem:no-route"));
        assert_eq!(up.hits(), 0, "a refused method reached the upstream");

        let r = tg.get("/signals", Some("mo")).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["ratelimit"].to_str().unwrap().starts_with("\"api_calls\";r=4;"), "{:?}", r.headers());
        assert_eq!(tg.wait_ledger("mo", 1).await, (1, 1));
        assert_eq!(tg.metric("tollgate_requests_total{decision=\"method-not-allowed\",route=\"(unmatched)\"}").await, 3);
    }
);

/// With `proxy.unmatched = "forward"`, a path no route has is still forwarded unmetered
/// (any method), but a known path with a wrong method is 405, never forwarded: a method-blind
/// upstream would otherwise serve the metered route for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405_even_when_unmatched_paths_are_forwarded() {
    let up = Upstream::start().await;
    let toml = config(up.addr).replace(
        "shutdown_grace = \"0s\"",
        "shutdown_grace = \"0s\"\nunmatched = \"forward\"\nunmatched_upstream = \"api\"",
    );
    let tg = Tollgate::start(&toml, Backend::Embedded).await;
    let r = tg.client.post(tg.url("/signals")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, DELETE");
    let (status, ty, _) = problem(r).await;
    assert_eq!(
        (status, ty.as_str()),
        (405, "urn:tollgate:problem:method-not-allowed")
    );
    assert_eq!(up.hits(), 0);
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let r = tg
            .client
            .request(method.clone(), tg.url("/docs/page"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method} /docs/page is forwarded");
    }
    assert_eq!(up.hits(), 2);
    assert_eq!(up.last().unwrap().path, "/docs/page");
}

both!(
    /// Three requests written at once on one connection (a metered call, an unknown path, a
    /// metered call) get three complete answers in order (200, 404, 200, each with its own
    /// request id), and the connection stays open for a fourth; the two metered calls and the
    /// fourth are forwarded and charged once each.
    pipelined_requests_are_all_answered_in_order,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        let tok = token("pia");
        let get = |path: &str, id: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {tok}\r\nX-Request-Id: {id}\r\n\r\n")
        };
        let mut conn = BufReader::new(TcpStream::connect(tg.proxy).await.unwrap());
        let burst = get("/signals", "p1") + &get("/nope", "p2") + &get("/signals/history/AAPL", "p3");
        conn.get_mut().write_all(burst.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let a = read_answer(&mut conn).await;
            assert_ne!(a.header("connection"), Some("close"), "{a:?}");
            seen.push((a.status, a.header("x-request-id").unwrap().to_string()));
            if a.status == 200 {
                assert_eq!(a.body, "ok");
            }
        }
        assert_eq!(seen, [(200, "p1".into()), (404, "p2".into()), (200, "p3".into())]);

        conn.get_mut().write_all(get("/signals", "p4").as_bytes()).await.unwrap();
        let a = read_answer(&mut conn).await;
        assert_eq!((a.status, a.header("x-request-id")), (200, Some("p4")), "{a:?}");
        assert_eq!(up.hits(), 3);
        // 1 + 2 + 1 units, one ledger row per forwarded call.
        assert_eq!(tg.wait_ledger("pia", 3).await, (3, 4));
    }
);
