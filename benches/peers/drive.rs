//! The load: tokens, wrk (saturation), the fixed-rate client, and the smoke checks.

use crate::gateways::BODY_LEN;
use crate::procs::{http_get, pinned, run_output};
use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The path of every load request (any path: every peer forwards any `GET`).
pub const PATH: &str = "/v1/items";

/// One measured load run, as the load generator saw it.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub requests: u64,
    pub secs: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl Load {
    pub fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    /// `PEERS key=value …`, the line wrk.lua and the fixed-rate client print.
    fn parse(out: &str) -> anyhow::Result<Load> {
        let line = out
            .lines()
            .find(|l| l.starts_with("PEERS "))
            .with_context(|| format!("no PEERS line in:\n{out}"))?;
        let get = |k: &str| -> anyhow::Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {k}= in {line:?}"))
        };
        Ok(Load {
            requests: get("requests")? as u64,
            secs: get("duration_us")? / 1e6,
            non_2xx: get("non2xx")? as u64,
            socket_errors: get("socket")? as u64,
            p50_us: get("p50_us")?,
            p99_us: get("p99_us")?,
            p999_us: get("p999_us")?,
        })
    }
}

/// The HS256 tokens: `n` customers (`cust-0000`…), valid for a day.
pub fn mint(secret: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let exp = now()? + 86_400;
    (0..n)
        .map(|i| {
            sign(
                secret,
                &serde_json::json!({"sub": format!("cust-{i:04}"), "exp": exp}),
            )
        })
        .collect()
}

fn now() -> anyhow::Result<u64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs())
}

fn sign(secret: &str, claims: &serde_json::Value) -> anyhow::Result<String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a token")
}

/// `wrk -t1 -cC -dDs` on the load core with wrk.lua rotating the tokens.
pub fn wrk(
    cpu: u32,
    addr: SocketAddr,
    secs: u64,
    conns: u32,
    script: &Path,
    tokens: &Path,
) -> anyhow::Result<Load> {
    let mut cmd = pinned(cpu, "wrk");
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s")]);
    cmd.arg("-s")
        .arg(script)
        .arg(format!("http://{addr}{PATH}"));
    cmd.arg("--").arg(tokens).arg(PATH);
    let out = run_output("wrk", cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Load::parse(&stdout)
}

/// The fixed-rate client, run as a child of its own (this bench's binary with `--fixed-rate`)
/// so it can be pinned to the load core like wrk.
#[allow(clippy::too_many_arguments)]
pub fn fixed_rate(
    cpu: u32,
    addr: SocketAddr,
    rate: u32,
    warmup: u64,
    secs: u64,
    conns: u32,
    tokens: &Path,
) -> anyhow::Result<Load> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    let mut cmd = pinned(cpu, exe);
    cmd.arg("--fixed-rate").arg(addr.to_string());
    cmd.args([
        rate.to_string(),
        warmup.to_string(),
        secs.to_string(),
        conns.to_string(),
    ]);
    cmd.arg(tokens);
    let out = run_output("fixed-rate client", cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "fixed-rate client: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Load::parse(&stdout)
}

/// `--fixed-rate ADDR RATE WARMUP SECS CONNS TOKENS`: the child's side. Prints a PEERS line.
///
/// Open loop, as wrk2 does it: connection k of C sends its requests at fixed times
/// `start + (k + j·C) / rate`, whatever the answers do. A request's latency counts from its
/// scheduled time when the connection was still busy with an earlier answer then (the wait
/// the server caused, so a stall is not hidden: coordinated omission corrected), and from the
/// moment it was sent otherwise (so the client's timer, 1 ms granular, adds nothing).
pub fn fixed_rate_main(args: &[String]) -> anyhow::Result<()> {
    ensure!(
        args.len() == 6,
        "--fixed-rate ADDR RATE WARMUP SECS CONNS TOKENS"
    );
    let addr: SocketAddr = args[0].parse().context("ADDR")?;
    let rate: f64 = args[1].parse().context("RATE")?;
    let warmup: u64 = args[2].parse().context("WARMUP")?;
    let secs: u64 = args[3].parse().context("SECS")?;
    let conns: usize = args[4].parse().context("CONNS")?;
    let tokens: Vec<String> = std::fs::read_to_string(&args[5])
        .context("TOKENS")?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    ensure!(
        rate > 0.0 && conns > 0 && !tokens.is_empty(),
        "nothing to send"
    );
    let reqs: std::sync::Arc<Vec<Vec<u8>>> = std::sync::Arc::new(
        tokens
            .iter()
            .map(|t| {
                format!("GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {t}\r\n\r\n")
                    .into_bytes()
            })
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(async move {
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let measure_from = start + Duration::from_secs(warmup);
        let end = measure_from + Duration::from_secs(secs);
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut tasks = Vec::new();
        for k in 0..conns {
            let reqs = reqs.clone();
            tasks.push(tokio::spawn(async move {
                connection(addr, &reqs, k, conns, start, gap, measure_from, end).await
            }));
        }
        let mut all = ConnResult::default();
        for t in tasks {
            let r = t.await?;
            all.latencies_us.extend(r.latencies_us);
            all.non_2xx += r.non_2xx;
            all.errors += r.errors;
        }
        anyhow::Ok(all)
    })?;
    let mut lat = results.latencies_us;
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1]
    };
    println!(
        "PEERS requests={} duration_us={} non2xx={} socket={} p50_us={} p99_us={} p999_us={}",
        lat.len(),
        secs * 1_000_000,
        results.non_2xx,
        results.errors,
        pct(50.0),
        pct(99.0),
        pct(99.9)
    );
    Ok(())
}

#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u32>,
    non_2xx: u64,
    errors: u64,
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    addr: SocketAddr,
    reqs: &[Vec<u8>],
    k: usize,
    conns: usize,
    start: tokio::time::Instant,
    gap: Duration,
    measure_from: tokio::time::Instant,
    end: tokio::time::Instant,
) -> ConnResult {
    let mut r = ConnResult::default();
    let mut conn: Option<tokio::net::TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut free_at = start;
    for j in 0u64.. {
        let slot = k as u64 + j * conns as u64;
        let scheduled = start + gap.mul_f64(slot as f64);
        if scheduled >= end {
            break;
        }
        if free_at < scheduled {
            tokio::time::sleep_until(scheduled).await;
        }
        let sent = tokio::time::Instant::now();
        let from = if free_at > scheduled { scheduled } else { sent };
        let req = &reqs[slot as usize % reqs.len()];
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(addr, &mut conn, req, &mut buf),
        )
        .await;
        let done = tokio::time::Instant::now();
        free_at = done;
        let measured = scheduled >= measure_from;
        match outcome {
            Ok(Ok(status)) => {
                if measured {
                    let us = (done - from).as_micros();
                    r.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    if !(200..300).contains(&status) {
                        r.non_2xx += 1;
                    }
                }
            }
            _ => {
                conn = None;
                if measured {
                    r.errors += 1;
                }
            }
        }
    }
    r
}

/// One request on the connection (opened if there is none): the answer's status. The
/// connection is dropped when the answer says `Connection: close`.
async fn exchange(
    addr: SocketAddr,
    conn: &mut Option<tokio::net::TcpStream>,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<u16> {
    if conn.is_none() {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        *conn = Some(s);
    }
    let Some(s) = conn.as_mut() else {
        bail!("no connection")
    };
    s.write_all(req).await?;
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status")?;
    let mut length = None;
    let (mut chunked, mut close) = (false, false);
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => length = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.contains("chunked"),
            "connection" => close = v.contains("close"),
            _ => {}
        }
    }
    if chunked {
        // Only error pages come chunked, if at all: read to the last chunk.
        while !buf[head_end..].ends_with(b"0\r\n\r\n") {
            read_more(s, buf).await?;
        }
    } else if let Some(len) = length {
        while buf.len() < head_end + len {
            read_more(s, buf).await?;
        }
    } else {
        close = true;
        while read_more(s, buf).await.is_ok() {}
    }
    if close {
        *conn = None;
    }
    Ok(status)
}

async fn read_more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await?;
    ensure!(n > 0, "connection closed");
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Before a peer is measured: a valid token gets the upstream's 200; for a peer that checks
/// tokens, each bad one gets 401 and never reaches the upstream (its smoke log, which records
/// only `/smoke/…` paths, must not show the path).
pub fn smoke(
    addr: SocketAddr,
    auth: bool,
    tag: &str,
    secret: &str,
    valid: &str,
    upstream_log: &Path,
) -> anyhow::Result<()> {
    let ok_path = format!("/smoke/{tag}/valid");
    let bearer = format!("Bearer {valid}");
    let (status, body) = http_get(addr, &ok_path, &[("Authorization", &bearer)])?;
    ensure!(
        status == 200 && body.len() == BODY_LEN,
        "valid token: {status} with {} bytes (wanted 200 with {BODY_LEN})",
        body.len()
    );
    if !auth {
        return Ok(());
    }
    let t = now()?;
    let far = t + 3600;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let (_, payload, _) = split3(valid)?;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no-header", None),
        (
            "bad-signature",
            Some(sign(
                "not-the-secret-0123456789",
                &serde_json::json!({"sub": "cust-smoke", "exp": far}),
            )?),
        ),
        (
            "alg-none",
            Some(format!(
                "{}.{payload}.",
                b64(serde_json::json!({"alg": "none", "typ": "JWT"}))
            )),
        ),
        (
            "expired",
            Some(sign(
                secret,
                &serde_json::json!({"sub": "cust-smoke", "exp": t - 3600}),
            )?),
        ),
        (
            "no-sub",
            Some(sign(secret, &serde_json::json!({"exp": far}))?),
        ),
    ];
    for (case, token) in &cases {
        let path = format!("/smoke/{tag}/{case}");
        let header = token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("Authorization", h)])
            .unwrap_or_default();
        let (status, _) = http_get(addr, &path, &headers)?;
        ensure!(status == 401, "{case}: {status} (wanted 401)");
    }
    std::thread::sleep(Duration::from_millis(100));
    let log = std::fs::read_to_string(upstream_log).unwrap_or_default();
    ensure!(
        log.contains(&format!("{ok_path} ")),
        "the valid request is not in the upstream's log {upstream_log:?}"
    );
    for (case, _) in &cases {
        let path = format!("/smoke/{tag}/{case} ");
        ensure!(
            !log.contains(&path),
            "{case}: the request reached the upstream"
        );
    }
    Ok(())
}

fn split3(token: &str) -> anyhow::Result<(&str, &str, &str)> {
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => bail!("not a JWT"),
    }
}
