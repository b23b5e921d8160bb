//! One price per path: every spelling of a metered route is priced as the route the upstream
//! will serve, or refused. Requests are written as raw bytes (an HTTP client library would
//! normalise them first), and the upstream's log is checked against the ledger with a model of a
//! lenient upstream (case-insensitive, slash-tolerant, decoding every escape, as Express is).

use crate::support::*;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The standard config with unmatched requests forwarded (the setting where a variant would be
/// free), plus a route that accepts any case and a trailing slash.
fn config(up: std::net::SocketAddr) -> String {
    base_config(up).replace(
        "shutdown_grace = \"0s\"",
        "shutdown_grace = \"0s\"\nunmatched = \"forward\"\nunmatched_upstream = \"api\"",
    ) + r#"
[[routes]]
name = "reports"
match = "GET /reports/{id}"
upstream = "api"
cost = 3
case_sensitive = false
trailing_slash = "ignore"
"#
}

/// A keep-alive HTTP/1.1 connection that writes request targets verbatim.
struct Raw {
    addr: std::net::SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Raw {
    fn new(addr: std::net::SocketAddr) -> Raw {
        Raw { addr, conn: None }
    }

    /// `GET {target}` with a token and our request id; the status.
    async fn get(&mut self, target: &str, token: &str, id: &str) -> u16 {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(TcpStream::connect(self.addr).await.unwrap()));
        }
        let conn = self.conn.as_mut().unwrap();
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {token}\r\nX-Request-Id: {id}\r\n\r\n"
        );
        conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut line))
            .await
            .expect("answered")
            .unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?} for {target:?}"));
        let (mut len, mut close) = (0usize, false);
        loop {
            line.clear();
            conn.read_line(&mut line).await.unwrap();
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if l == "connection: close" {
                close = true;
            }
        }
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await.unwrap();
        if close {
            self.conn = None;
        }
        status
    }
}

/// What a lenient upstream serves for a path it receives: every escape decoded, `\` as `/`, dot
/// segments resolved, empty segments dropped, letter case and a trailing slash ignored. `None`:
/// nothing metered.
fn lenient_route(path: &str) -> Option<(&'static str, i64)> {
    let mut bytes = Vec::new();
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                bytes.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&bytes)
        .to_ascii_lowercase()
        .replace('\\', "/");
    let mut segs: Vec<&str> = Vec::new();
    for s in decoded.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    match segs.as_slice() {
        ["signals"] => Some(("GET /signals", 1)),
        ["signals", "history", _] => Some(("GET /signals/history/{symbol}", 2)),
        ["export", "pdf"] => Some(("export-pdf", 5)),
        ["reports", _] => Some(("reports", 3)),
        _ => None,
    }
}

/// A small deterministic generator (xorshift), so a failure names a reproducible variant.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One random spelling of `path`: one to three of case flips, escapes (either hex case, of any
/// character), doubled slashes, `.` and `x/..` segments, an encoded or back slash, a trailing
/// slash, a missing leading slash.
fn variant(rng: &mut Rng, path: &str) -> String {
    let mut p = path.to_string();
    for _ in 0..1 + rng.below(3) {
        let slashes: Vec<usize> = p.match_indices('/').map(|(i, _)| i).collect();
        let at = if slashes.is_empty() {
            0
        } else {
            slashes[rng.below(slashes.len())]
        };
        let chars: Vec<(usize, char)> = p.char_indices().collect();
        let (ci, c) = chars[rng.below(chars.len())];
        p = match rng.below(10) {
            0 => p
                .chars()
                .map(|c| {
                    if rng.below(2) == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
            1 if c != '%' => {
                let esc = if rng.below(2) == 0 {
                    format!("%{:02X}", c as u32)
                } else {
                    format!("%{:02x}", c as u32)
                };
                format!("{}{esc}{}", &p[..ci], &p[ci + c.len_utf8()..])
            }
            2 => format!("{}/{}", &p[..at], &p[at..]),
            3 => format!("{}/.{}", &p[..at], &p[at..]),
            4 => format!("{}/zz/..{}", &p[..at], &p[at..]),
            5 if !slashes.is_empty() => format!("{}%2F{}", &p[..at], &p[at + 1..]),
            6 if !slashes.is_empty() => format!("{}\\{}", &p[..at], &p[at + 1..]),
            7 => format!("{p}/"),
            8 => p.trim_start_matches('/').to_string(),
            _ => format!("{}/..{}", &p[..at], &p[at..]),
        };
    }
    p
}

/// Sends `targets` for `customer` (ids `{tag}-{n}`), four connections at a time; the statuses.
async fn send_all(tg: &Tollgate, customer: &str, tag: &str, targets: &[String]) -> Vec<u16> {
    let tok = token(customer);
    let mut tasks = Vec::new();
    for lane in 0..4 {
        let (addr, tok, tag) = (tg.proxy, tok.clone(), tag.to_string());
        let mine: Vec<(usize, String)> = targets
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| i % 4 == lane)
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::new(addr);
            let mut out = Vec::new();
            for (i, t) in mine {
                out.push((i, raw.get(&t, &tok, &format!("{tag}-{i}")).await));
            }
            out
        }));
    }
    let mut statuses = vec![0; targets.len()];
    for t in tasks {
        for (i, s) in t.await.unwrap() {
            statuses[i] = s;
        }
    }
    statuses
}

/// Checks every request of `targets` against the upstream's log and the ledger: each one the
/// upstream saw is priced as the route a lenient upstream would serve (or unpriced when it
/// would serve nothing metered); each refused one (400) never reached the upstream.
async fn check(
    tg: &Tollgate,
    up: &Upstream,
    customer: &str,
    tag: &str,
    targets: &[String],
    statuses: &[u16],
) -> (usize, usize) {
    let seen: HashMap<String, String> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let id = s.headers.get("x-request-id")?.to_str().ok()?;
            id.starts_with(&format!("{tag}-"))
                .then(|| (id.to_string(), s.path.clone()))
        })
        .collect();
    let expected_rows = seen.values().filter(|p| lenient_route(p).is_some()).count();
    let rows = tg.ledger_rows(customer, expected_rows).await;
    assert_eq!(
        rows.len(),
        expected_rows,
        "ledger rows vs metered requests the upstream served"
    );
    let (mut forwarded, mut refused) = (0, 0);
    for (i, (target, status)) in targets.iter().zip(statuses).enumerate() {
        let id = format!("{tag}-{i}");
        match (seen.get(&id), *status) {
            (Some(path), 200) => {
                forwarded += 1;
                let priced = rows.get(&id).map(|(r, u)| (r.as_str(), *u));
                assert_eq!(
                    priced,
                    lenient_route(path),
                    "{target:?} reached the upstream as {path:?}"
                );
            }
            (None, 400) => refused += 1,
            (path, s) => panic!("{target:?}: status {s}, upstream saw {path:?}"),
        }
    }
    (forwarded, refused)
}

both!(
    /// The reported variants: each is priced as the route it reaches, the upstream receives the
    /// normalised path, or it is refused 400 `invalid-path` and never forwarded.
    reported_path_variants_are_priced_or_refused,
    |b| {
        let up = Upstream::start().await;
        let tg = Tollgate::start(&config(up.addr), b).await;
        assert_eq!(tg.put_customer("vera", serde_json::json!({"plan": "pro"})).await.status(), 200);
        let cases: &[(&str, u16, Option<&str>)] = &[
            ("/export/pdf", 200, Some("/export/pdf")),
            ("/EXPORT/PDF", 400, None),
            ("/export/pdf/", 400, None),
            ("/export/%70df", 200, Some("/export/pdf")),
            ("//export/pdf", 200, Some("/export/pdf")),
            ("/./export/pdf", 200, Some("/export/pdf")),
            ("/signals/../export/pdf", 200, Some("/export/pdf")),
            ("export/pdf", 400, None),
            ("x:/export/pdf", 400, None),
            ("/signals/history/..%2F..%2Fexport%2Fpdf", 400, None),
            ("/signals/history/%41APL", 200, Some("/signals/history/AAPL")),
            ("/../export/pdf", 400, None),
            ("/REPORTS/q3/", 200, Some("/REPORTS/q3/")),
            ("/unmetered//x?a=%2F", 200, Some("/unmetered/x")),
        ];
        let targets: Vec<String> = cases.iter().map(|c| c.0.to_string()).collect();
        let statuses = send_all(&tg, "vera", "rep", &targets).await;
        for ((target, want, upstream_path), got) in cases.iter().zip(&statuses) {
            assert_eq!(got, want, "{target:?}");
            if let Some(p) = upstream_path {
                let seen = up.seen.lock().unwrap().clone();
                assert!(seen.iter().any(|s| s.path == *p), "{target:?}: upstream never saw {p:?}");
            }
        }
        let (forwarded, refused) = check(&tg, &up, "vera", "rep", &targets, &statuses).await;
        assert_eq!((forwarded, refused), (8, 6));
        // Five PDFs, one history, one report: 5 × 5 + 2 + 3.
        assert_eq!(tg.ledger_usage("vera").await, (7, 30));
        // A refusal is problem+json with a stable type.
        let r = tg.get("/export/pdf/", Some("vera")).await;
        let (status, ty, _) = problem(r).await;
        assert_eq!((status, ty.as_str()), (400, "urn:tollgate:problem:invalid-path"));
    }
);

/// 10,000 random spellings of each metered route (`TOLLGATE_PATH_FUZZ` to change the count):
/// none is forwarded at a price other than the one a lenient upstream serves it as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_path_variants_are_priced_or_refused() {
    let n: usize = std::env::var("TOLLGATE_PATH_FUZZ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let up = Upstream::start().await;
    let tg = Tollgate::start(&config(up.addr), Backend::Embedded).await;
    assert_eq!(
        tg.put_customer("fuzz", serde_json::json!({"plan": "pro"}))
            .await
            .status(),
        200
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut targets = Vec::new();
    for route in [
        "/signals",
        "/signals/history/AAPL",
        "/export/pdf",
        "/reports/q3",
    ] {
        for _ in 0..n {
            targets.push(variant(&mut rng, route));
        }
    }
    let statuses = send_all(&tg, "fuzz", "fz", &targets).await;
    let (forwarded, refused) = check(&tg, &up, "fuzz", "fz", &targets, &statuses).await;
    eprintln!(
        "fuzz: {} requests, forwarded {forwarded}, refused {refused}",
        targets.len()
    );
    assert_eq!(forwarded + refused, targets.len());
    // Both outcomes are common: a generator that only produced refusals would prove nothing.
    assert!(
        forwarded > targets.len() / 5 && refused > targets.len() / 5,
        "forwarded {forwarded}, refused {refused}"
    );
}
