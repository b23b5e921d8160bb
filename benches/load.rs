//! Load benchmark: `cargo bench --bench load` (see `benches/README.md`).
//!
//! One process starts a fast upstream (axum, one worker thread), then measures with `wrk`, one
//! after the other and with the same settings:
//!
//! 1. `upstream`: the upstream directly;
//! 2. `passthrough`: a bare pingora proxy (2 threads, no filters) in front of it: the floor;
//! 3. `tollgate`: the full request path (HS256 JWT, real Redis quota call, real Postgres ledger
//!    writes through the usage flusher), 2 proxy threads.
//!
//! Then it checks the tollgate run: no non-2xx responses, and (after a graceful stop, so the
//! flusher has drained) one ledger row per request forwarded. Everything it creates (a Postgres
//! schema, Redis keys, temp files) is removed at the end.
//!
//! Env: `BENCH_DURATION` (seconds, default 10), `BENCH_CONNECTIONS` (default 32),
//! `BENCH_QUOTA_MODE` (`exact`, the default, or `lease`: the plan's `quota_mode`), `RUST_LOG`
//! (log filter; the default hides the one log line per request wrk abandons when it stops).
//!
//! tollgate is started by the integration tests' harness (`tests/it/support`), on the shared
//! backend (real Redis, real Postgres, a unique key prefix and schema of its own), with the same
//! tokens; the JWT secret and admin token are the test ones that `cargo` sets from
//! `.cargo/config.toml`. The upstream is the bench's own: one thread, counting, no recording.

// The harness of the integration tests; the bench uses its tollgate, tokens and ports only.
#[allow(dead_code, unused_imports, unused_macros, clippy::unwrap_used)]
#[path = "../tests/it/support/mod.rs"]
mod support;

// The same allocator as the tollgate binary, for both proxies in this process (like for like).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tollgate::config::Config;

use support::{PG_URL, REDIS_URL};

const PATH: &str = "/signals";
const BODY: &str =
    r#"{"symbol":"AAPL","signal":"buy","score":0.73,"as_of":"2026-01-02T15:04:05Z"}"#;
const CUSTOMERS: usize = 100;
const WARMUP_SECS: u64 = 2;
/// pingora worker threads of both proxies (tollgate's `proxy.threads`).
const PROXY_THREADS: usize = 2;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // wrk closes its connections with requests in flight when it stops: pingora logs each
        // at error level and tollgate at warn ("upstream failed"). They are counted below.
        tracing_subscriber::EnvFilter::new("warn,pingora_proxy=off,tollgate::proxy=error")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    if find_wrk().is_none() {
        eprintln!(
            "load bench: `wrk` not found on PATH.\n\
             Install it (Debian/Ubuntu): sudo apt-get install wrk"
        );
        return ExitCode::from(2);
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("load bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load bench: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cleanup = Cleanup {
        redis_prefix: None,
        files: Vec::new(),
    };
    let result = run(&settings, &rt, &mut cleanup);
    cleanup.run(&rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nload bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    duration_secs: u64,
    connections: u32,
    /// `lease`: tollgate's plan spends leases instead of asking Redis per request.
    lease: bool,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let duration_secs = match std::env::var("BENCH_DURATION") {
            Ok(v) => v
                .trim()
                .trim_end_matches('s')
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("BENCH_DURATION={v:?}: want whole seconds, e.g. 10"))?,
            Err(_) => 10,
        };
        let connections = match std::env::var("BENCH_CONNECTIONS") {
            Ok(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("BENCH_CONNECTIONS={v:?}: want a positive integer"))?,
            Err(_) => 32,
        };
        let lease = match std::env::var("BENCH_QUOTA_MODE").as_deref() {
            Err(_) | Ok("exact") => false,
            Ok("lease") => true,
            Ok(v) => bail!("BENCH_QUOTA_MODE={v:?}: want exact or lease"),
        };
        Ok(Settings {
            duration_secs,
            connections,
            lease,
        })
    }
}

fn run(s: &Settings, rt: &tokio::runtime::Runtime, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tollgate load bench: wrk -t1 -c{c} -d{d}s --latency, after a {WARMUP_SECS} s warm-up \
         (same connections) per target; GET {PATH}; {cores} cores shared by wrk and the servers",
        c = s.connections,
        d = s.duration_secs,
    );

    if let Some(load) = load_average() {
        println!("load average before start: {load}");
    }

    // Every target gets the same requests, `Authorization` header included: what the ratio
    // measures is what tollgate does with them, not a difference in what wrk sends.
    let tokens = mint_tokens()?;
    let script = std::env::temp_dir().join(format!("{}.lua", support::unique("tollgate-bench")));
    cleanup.files.push(script.clone());
    std::fs::write(&script, wrk_script(&tokens)).context("writing the wrk script")?;

    let upstream = Upstream::start()?;
    println!(
        "upstream    {}  axum, 1 worker thread, 200 + {} B JSON",
        upstream.addr,
        BODY.len()
    );
    let mut rows = Vec::new();

    // (a) the upstream directly.
    expect_status(upstream.addr, None, 200).context("upstream probe")?;
    let r = measure("upstream", upstream.addr, Some(&script), s)?;
    rows.push(("upstream", r));

    // (b) bare pingora.
    let mut pass = Passthrough::start(upstream.addr)?;
    println!(
        "passthrough {}  pingora, {PROXY_THREADS} threads, upstream_peer only",
        pass.addr
    );
    expect_status(pass.addr, None, 200).context("passthrough probe")?;
    let r = measure("passthrough", pass.addr, Some(&script), s)?;
    pass.stop();
    rows.push(("passthrough", r));

    // (c) tollgate, full path.
    let mut tg = start_tollgate(rt, upstream.addr, s.lease)?;
    let (prefix, schema) = (tg.prefix.clone(), tg.schema.clone());
    cleanup.redis_prefix = Some(prefix.clone());
    println!(
        "tollgate    {}  {PROXY_THREADS} proxy threads, HS256, Redis {REDIS_URL} \
         (prefix {prefix}), Postgres ledger (schema {schema}), quota_mode = {}",
        tg.proxy,
        if s.lease { "lease" } else { "exact" }
    );
    println!(
        "            wrk rotates over {CUSTOMERS} tokens for {CUSTOMERS} customers: after the first \
         {CUSTOMERS} requests (in the warm-up) every JWT check is a verified-token cache hit, \
         so the HS256 verification itself is barely measured"
    );
    let hits_before = upstream.hits();
    expect_status(tg.proxy, Some(&tokens[0]), 200).context("tollgate probe")?;
    let probes = 1;
    let redis_before = rt.block_on(redis_commandstats()).ok();
    let (warm, r) = measure_full("tollgate", tg.proxy, Some(&script), s)?;
    let redis_after = rt.block_on(redis_commandstats()).ok();
    let completed = warm.requests + r.requests;
    // Let the requests wrk abandoned when it stopped finish, so the metrics show a settled state.
    std::thread::sleep(Duration::from_millis(500));
    let metrics = http_get(tg.admin, "/metrics", None)
        .map(|(_, body)| body)
        .unwrap_or_default();
    rt.block_on(tg.stop());
    let forwarded = upstream.hits() - hits_before;
    rows.push(("tollgate", r));

    // The table.
    println!();
    println!(
        "{:<12} {:>12} {:>11} {:>11}",
        "target", "requests/s", "p50", "p99"
    );
    for (name, r) in &rows {
        println!(
            "{:<12} {:>12.0} {:>11} {:>11}",
            name,
            r.rps,
            fmt_us(r.p50_us),
            fmt_us(r.p99_us)
        );
    }
    let rps = |n: &str| {
        rows.iter()
            .find(|(name, _)| *name == n)
            .map_or(f64::NAN, |(_, r)| r.rps)
    };
    println!();
    println!(
        "tollgate / passthrough = {:.2}",
        rps("tollgate") / rps("passthrough")
    );
    println!(
        "passthrough / upstream = {:.2}",
        rps("passthrough") / rps("upstream")
    );
    for (name, r) in &rows {
        if let Some(e) = &r.socket_errors {
            println!("note: {name}: wrk socket errors: {e}");
        }
    }
    print_cpu_table(&rows);
    if let (Some(b), Some(a)) = (&redis_before, &redis_after) {
        print_redis_commands(b, a, completed);
    }
    if let Some(load) = load_average() {
        println!("load average after the runs: {load}");
    }

    // Correctness of the tollgate run.
    let ledger = rt.block_on(ledger_counts(&schema))?;
    let redis_charged = rt.block_on(redis_charged(&prefix)).ok();
    let measured = rows[2].1.requests;
    // Each wrk stop abandons at most one request per connection (warm-up and measured run).
    let abandoned_max = 2 * u64::from(s.connections);
    println!();
    println!("tollgate correctness (after a graceful stop: the usage flusher has drained):");
    println!(
        "  non-2xx responses (wrk):          {} (warm-up {})",
        rows[2].1.non_2xx, warm.non_2xx
    );
    println!(
        "  requests completed by wrk:        {completed} (warm-up {} + measured {measured}) + {probes} probe",
        warm.requests
    );
    println!("  requests the upstream received:   {forwarded}");
    println!(
        "  ledger rows:                      {} ({} with status 200, {} units)",
        ledger.rows, ledger.ok, ledger.units
    );
    println!(
        "  ledger rows not 200:              {} (requests wrk abandoned when it stopped, \
         client gone before the response; {} of them charged: they had gone upstream; {} with \
         an error status)",
        ledger.rows - ledger.ok,
        ledger.charged_not_ok,
        ledger.errors
    );
    match redis_charged {
        Some(n) => println!("  Redis quota counters (sum):       {n}"),
        None => println!("  Redis quota counters (sum):       n/a (key layout not recognised)"),
    }
    println!(
        "  (wrk does not count requests in flight when it stops: up to {} per stop, 2 stops)",
        s.connections
    );
    print_metrics(&metrics);

    let mut failures = Vec::new();
    for (name, r) in &rows {
        if r.non_2xx > 0 {
            failures.push(format!("{name}: {} non-2xx responses", r.non_2xx));
        }
    }
    if warm.non_2xx > 0 {
        failures.push(format!(
            "tollgate warm-up: {} non-2xx responses",
            warm.non_2xx
        ));
    }
    let wanted = completed + probes;
    if ledger.ok < wanted {
        failures.push(format!(
            "ledger has {} rows with status 200, fewer than the {wanted} requests that completed",
            ledger.ok
        ));
    }
    if ledger.rows > wanted + abandoned_max {
        failures.push(format!(
            "ledger has {} rows, more than the {wanted} completed requests + {abandoned_max} \
             abandoned ones",
            ledger.rows
        ));
    }
    if forwarded < wanted || forwarded > ledger.rows {
        failures.push(format!(
            "the upstream received {forwarded} requests: not between {wanted} completed and {} \
             ledger rows",
            ledger.rows
        ));
    }
    // A client that hangs up after its request went upstream is charged (status 0, its units
    // stand); any other status than 200 or 0 is an error this run must not have.
    if ledger.errors > 0 {
        failures.push(format!(
            "{} ledger rows have an error status (neither 200 nor 0, client gone)",
            ledger.errors
        ));
    }
    if let Some(n) = redis_charged {
        if n != ledger.units {
            failures.push(format!(
                "Redis charged {n} units, the ledger holds {}",
                ledger.units
            ));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    println!(
        "  OK: every completed request is in the ledger (charged 1 unit), abandoned ones at most \
         one per connection per stop, Redis and the ledger agree, no errors"
    );

    drop(upstream);
    Ok(())
}

/// Warm-up then measured run; returns the measured one.
fn measure(
    name: &str,
    addr: SocketAddr,
    script: Option<&Path>,
    s: &Settings,
) -> anyhow::Result<WrkResult> {
    measure_full(name, addr, script, s).map(|(_, r)| r)
}

/// Warm-up then measured run; returns both.
fn measure_full(
    name: &str,
    addr: SocketAddr,
    script: Option<&Path>,
    s: &Settings,
) -> anyhow::Result<(WrkResult, WrkResult)> {
    let url = format!("http://{addr}{PATH}");
    let warm = wrk(&url, WARMUP_SECS, s.connections, script)
        .with_context(|| format!("{name}: warm-up"))?;
    let before = Cpu::now();
    let mut r = wrk(&url, s.duration_secs, s.connections, script)
        .with_context(|| format!("{name}: measured run"))?;
    r.cpu = before.zip(Cpu::now()).map(|(b, a)| a.minus(&b));
    println!("  measured {name}: {} requests, {:.0}/s", r.requests, r.rps);
    Ok((warm, r))
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Default)]
struct WrkResult {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    non_2xx: u64,
    socket_errors: Option<String>,
    /// CPU spent during the measured run (filled in by `measure_full`).
    cpu: Option<Cpu>,
}

fn find_wrk() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("wrk"))
        .find(|p| p.is_file())
}

fn wrk(url: &str, secs: u64, connections: u32, script: Option<&Path>) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.arg("-t1")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency");
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(url);
    let out = cmd.output().context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk exited with {}:\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&stdout).with_context(|| format!("parsing wrk's output:\n{stdout}"))
}

fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut rps, mut p50, mut p99, mut requests) = (None, None, None, None);
    for line in out.lines() {
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx count")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.socket_errors = Some(v.trim().to_string());
        } else if words.len() >= 3 && words[1] == "requests" && words[2] == "in" {
            requests = words[0].parse::<u64>().ok();
        } else if words.len() == 2 && words[0] == "50%" {
            p50 = Some(parse_time_us(words[1])?);
        } else if words.len() == 2 && words[0] == "99%" {
            p99 = Some(parse_time_us(words[1])?);
        }
    }
    r.rps = rps.context("no Requests/sec line")?;
    r.p50_us = p50.context("no 50% latency line (was --latency given?)")?;
    r.p99_us = p99.context("no 99% latency line")?;
    r.requests = requests.context("no 'N requests in' line")?;
    Ok(r)
}

/// wrk's time format (`612.00us`, `1.90ms`, `2.00s`, `1.00m`) in microseconds.
fn parse_time_us(v: &str) -> anyhow::Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600e6)
    } else {
        bail!("unknown time unit in {v:?}")
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad time value {v:?}"))?;
    Ok(n * scale)
}

fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// A wrk script rotating over prebuilt requests, one per token (built once per wrk thread in
/// `init`, so the per-request Lua cost is an index, not a string build).
fn wrk_script(tokens: &[String]) -> String {
    let mut s = String::from("-- generated by tollgate benches/load.rs\nlocal tokens = {\n");
    for t in tokens {
        let _ = writeln!(s, "  \"{t}\",");
    }
    let _ = write!(
        s,
        r#"}}
local reqs = {{}}
local n = 0
function init(args)
  for i, t in ipairs(tokens) do
    reqs[i] = wrk.format("GET", "{PATH}", {{ ["Authorization"] = "Bearer " .. t }})
  end
end
function request()
  n = n % #reqs + 1
  return reqs[n]
end
"#
    );
    s
}

fn mint_tokens() -> anyhow::Result<Vec<String>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    Ok((0..CUSTOMERS)
        .map(|i| {
            let mut claims = support::claims(&format!("bench-customer-{i:03}"));
            // Valid for any run length (the harness's tokens live ten minutes).
            claims["exp"] = serde_json::json!(now + 6 * 3600);
            support::sign(&claims)
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Servers

/// The upstream: axum on a one-thread runtime in a thread of its own. Counts requests.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the upstream")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(Notify::new());
        let (h, st) = (hits.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("upstream runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("upstream listener");
                    let app = Router::new().route(PATH, get(signals)).with_state(h);
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { st.notified().await })
                        .await
                    {
                        eprintln!("upstream failed: {e}");
                    }
                });
            })
            .context("spawning the upstream")?;
        wait_accepting(addr)?;
        Ok(Upstream {
            addr,
            hits,
            stop,
            thread: Some(thread),
        })
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn signals(State(hits): State<Arc<AtomicU64>>) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::Relaxed);
    ([(CONTENT_TYPE, "application/json")], BODY)
}

/// The floor: pingora's proxy with nothing but `upstream_peer` (built as tollgate builds its peer).
struct PassthroughProxy {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for PassthroughProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

struct Passthrough {
    addr: SocketAddr,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Passthrough {
    fn start(upstream: SocketAddr) -> anyhow::Result<Passthrough> {
        let addr = support::free_port();
        let stop = Arc::new(Notify::new());
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-passthrough".into())
            .spawn(move || {
                // As tollgate's server.rs, with the bench's `shutdown_grace = "1s"`.
                let conf = ServerConf {
                    threads: PROXY_THREADS,
                    grace_period_seconds: Some(1),
                    graceful_shutdown_timeout_seconds: Some(1),
                    ..ServerConf::default()
                };
                let mut server = Server::new_with_opt_and_conf(None, conf);
                server.bootstrap();
                let mut proxy = pingora::proxy::http_proxy_service(
                    &server.configuration,
                    PassthroughProxy { upstream },
                );
                proxy.add_tcp(&addr.to_string());
                server.add_service(proxy);
                server.run(RunArgs {
                    shutdown_signal: Box::new(tollgate::server::NotifyWatch(st)),
                });
            })
            .context("spawning the passthrough")?;
        let p = Passthrough {
            addr,
            stop,
            thread: Some(thread),
        };
        wait_accepting(addr)?;
        Ok(p)
    }

    fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.stop();
    }
}

/// tollgate on the shared backend through the tests' harness: 2 proxy threads, HS256, the
/// Redis timeout of the config's default (the harness shortens it for outage tests).
fn start_tollgate(
    rt: &tokio::runtime::Runtime,
    upstream: SocketAddr,
    lease: bool,
) -> anyhow::Result<support::Tollgate> {
    let mode = if lease { "lease" } else { "exact" };
    let toml = support::config::bench_config(
        upstream,
        &format!("threads = {PROXY_THREADS}\n"),
        "",
        &format!(
            "quota_mode = \"{mode}\"\nquotas.api_calls = {{ included = 1_000_000_000_000, overage = \"deny\" }}\n"
        ),
    );
    let defaults =
        Config::from_toml(&toml).map_err(|e| anyhow::anyhow!("bench config invalid:\n{e}"))?;
    let redis_timeout = defaults.storage.redis_timeout;
    let tg = rt.block_on(support::Tollgate::start_with(
        &toml,
        support::Backend::Shared,
        None,
        |c| c.storage.redis_timeout = redis_timeout,
    ));
    // The harness returns once the proxy port accepts.
    Ok(tg)
}

fn wait_accepting(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..400 {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing accepts on {addr}")
}

/// One `Connection: close` HTTP/1.1 GET: (status, body).
fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status line in {buf:?}"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn expect_status(addr: SocketAddr, bearer: Option<&str>, want: u16) -> anyhow::Result<()> {
    let (status, body) = http_get(addr, PATH, bearer)?;
    ensure!(
        status == want,
        "GET {PATH} on {addr}: {status} (wanted {want}): {body}"
    );
    ensure!(
        body == BODY,
        "GET {PATH} on {addr}: unexpected body {body:?}"
    );
    Ok(())
}

/// The tollgate metrics that say whether the run took the full path.
fn print_metrics(text: &str) {
    if text.is_empty() {
        println!("  tollgate metrics: not available");
        return;
    }
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let lines = |prefix: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.trim().to_string())
            .collect()
    };
    println!("  tollgate metrics (before the stop):");
    for l in lines("tollgate_requests_total")
        .into_iter()
        .filter(|l| !l.ends_with(" 0"))
    {
        println!("    {l}");
    }
    for l in lines("tollgate_usage_events_total") {
        println!("    {l}");
    }
    for l in lines("tollgate_quota_lease_calls_total") {
        println!("    {l}");
    }
    if let Some(v) = value("tollgate_quota_store_errors_total") {
        println!(
            "    tollgate_quota_store_errors_total {v} (timeouts fall back to local counters)"
        );
    }
    if let (Some(sum), Some(n)) = (
        value("tollgate_quota_store_duration_seconds_sum"),
        value("tollgate_quota_store_duration_seconds_count"),
    ) {
        if n > 0.0 {
            println!(
                "    quota store (Redis) call: mean {:.0} µs over {n} calls",
                sum / n * 1e6
            );
        }
    }
    if let (Some(sum), Some(n)) = (
        value("tollgate_request_duration_seconds_sum"),
        value("tollgate_request_duration_seconds_count"),
    ) {
        if n > 0.0 {
            println!(
                "    request duration (tollgate's own view): mean {:.0} µs over {n} requests",
                sum / n * 1e6
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Storage checks and clean-up

async fn pg() -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection;
    sqlx::PgConnection::connect(PG_URL)
        .await
        .with_context(|| format!("connecting to {PG_URL}"))
}

struct LedgerCounts {
    rows: u64,
    /// Rows with status 200.
    ok: u64,
    units: i64,
    /// Rows with status 0 (nothing sent: the client hung up) that were charged: the request had
    /// gone upstream, so the charge stands.
    charged_not_ok: u64,
    /// Rows with a status other than 200 or 0: an error was sent, which this run must not have.
    errors: u64,
}

async fn ledger_counts(schema: &str) -> anyhow::Result<LedgerCounts> {
    let mut conn = pg().await?;
    // `schema` is the harness's (t_<hex>), safe to interpolate.
    let sql = format!(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 200), \
         CAST(COALESCE(SUM(units), 0) AS BIGINT), \
         COUNT(*) FILTER (WHERE status = 0 AND units <> 0), \
         COUNT(*) FILTER (WHERE status NOT IN (0, 200)) FROM {schema}.usage_events"
    );
    let (rows, ok, units, charged_not_ok, errors): (i64, i64, i64, i64, i64) = sqlx::query_as(&sql)
        .fetch_one(&mut conn)
        .await
        .context("counting ledger rows")?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(LedgerCounts {
        rows: n(rows),
        ok: n(ok),
        units,
        charged_not_ok: n(charged_not_ok),
        errors: n(errors),
    })
}

async fn redis_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

async fn redis_conn() -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(REDIS_URL)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Sum of the `api_calls` quota counters under `prefix` (tollgate's key layout
/// `{prefix}:{customer}:q:{meter}:{period}`).
async fn redis_charged(prefix: &str) -> anyhow::Result<i64> {
    let mut conn = redis_conn().await?;
    let keys = redis_keys(&mut conn, &format!("{prefix}:*:q:api_calls:*")).await?;
    ensure!(!keys.is_empty(), "no quota keys");
    let mut total = 0;
    for k in keys {
        let v: Option<i64> = redis::cmd("GET").arg(&k).query_async(&mut conn).await?;
        total += v.unwrap_or(0);
    }
    Ok(total)
}

/// Redis's `INFO commandstats`: command → (calls, µs inside Redis).
async fn redis_commandstats() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut conn = redis_conn().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            stats.insert(name.to_string(), (calls, usec));
        }
    }
    Ok(stats)
}

/// Redis commands per request over the tollgate runs (commands a script runs are counted too).
fn print_redis_commands(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    requests: u64,
) {
    let mut parts = Vec::new();
    for (name, (calls, usec)) in after {
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
        let (calls, usec) = (calls.saturating_sub(c0), usec.saturating_sub(u0));
        let per_request = calls as f64 / requests.max(1) as f64;
        if per_request >= 0.01 {
            parts.push(format!(
                "{name} {per_request:.2}/request {:.1} µs/call",
                usec as f64 / calls.max(1) as f64
            ));
        }
    }
    println!(
        "Redis INFO commandstats over the tollgate runs (warm-up + measured; commands inside the \
         script included): {}",
        parts.join(", ")
    );
}

/// What the bench created outside the process; removed at the end, even after a failure.
struct Cleanup {
    redis_prefix: Option<String>,
    files: Vec<PathBuf>,
}

impl Cleanup {
    fn run(&mut self, rt: &tokio::runtime::Runtime) {
        if let Some(prefix) = self.redis_prefix.take() {
            let r = rt.block_on(async {
                let mut conn = redis_conn().await?;
                let keys = redis_keys(&mut conn, &format!("{prefix}:*")).await?;
                for chunk in keys.chunks(500) {
                    redis::cmd("DEL")
                        .arg(chunk)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                anyhow::Ok(())
            });
            if let Err(e) = r {
                eprintln!("clean-up: deleting Redis keys {prefix}:*: {e:#}");
            }
        }
        for f in self.files.drain(..) {
            let _ = if f.is_dir() {
                std::fs::remove_dir_all(&f)
            } else {
                std::fs::remove_file(&f)
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where the CPU goes (Linux /proc; USER_HZ = 100, so 10 ms resolution: fine over seconds)

const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds, cumulative.
#[derive(Debug, Clone, Default)]
struct Cpu {
    /// This process, all threads (the proxy under test, the upstream thread, tollgate's control
    /// runtime).
    process: f64,
    /// The upstream's thread alone.
    upstream: f64,
    /// Reaped children: wrk.
    wrk: f64,
    /// Every `redis-server` process.
    redis: f64,
    /// Every `postgres` process (the ledger's backends, walwriter, ...).
    postgres: f64,
    /// This process's live threads by name (`comm`, 15 bytes at most).
    threads: BTreeMap<String, f64>,
}

impl Cpu {
    fn now() -> Option<Cpu> {
        let own = proc_stat_ticks(Path::new("/proc/self/stat"))?;
        let mut threads = BTreeMap::new();
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let ticks = proc_stat_ticks(&task.path().join("stat")).map_or(0.0, |t| t.0);
            *threads.entry(comm.trim().to_string()).or_insert(0.0) += ticks / TICKS_PER_SEC;
        }
        let upstream = threads.get("bench-upstream").copied().unwrap_or(0.0);
        let (mut redis, mut postgres) = (0.0, 0.0);
        for p in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = p.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let slot = match comm.trim() {
                "redis-server" => &mut redis,
                "postgres" => &mut postgres,
                _ => continue,
            };
            *slot += proc_stat_ticks(&p.path().join("stat")).map_or(0.0, |t| t.0);
        }
        Some(Cpu {
            process: own.0 / TICKS_PER_SEC,
            upstream,
            wrk: own.1 / TICKS_PER_SEC,
            redis: redis / TICKS_PER_SEC,
            postgres: postgres / TICKS_PER_SEC,
            threads,
        })
    }

    fn minus(&self, b: &Cpu) -> Cpu {
        Cpu {
            process: self.process - b.process,
            upstream: self.upstream - b.upstream,
            wrk: self.wrk - b.wrk,
            redis: self.redis - b.redis,
            postgres: self.postgres - b.postgres,
            threads: self
                .threads
                .iter()
                .map(|(k, v)| (k.clone(), v - b.threads.get(k).copied().unwrap_or(0.0)))
                .collect(),
        }
    }
}

/// (utime + stime, cutime + cstime) in ticks from a `/proc/.../stat` file.
fn proc_stat_ticks(path: &Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    (f.len() == 4).then(|| (f[0] + f[1], f[2] + f[3]))
}

fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn print_cpu_table(rows: &[(&str, WrkResult)]) {
    if rows.iter().any(|(_, r)| r.cpu.is_none()) {
        return;
    }
    println!();
    println!("CPU per request in the measured runs, µs (/proc, 10 ms resolution):");
    println!(
        "{:<12} {:>8} {:>9} {:>7} {:>9} {:>7} {:>7}",
        "target", "proxy", "upstream", "redis", "postgres", "wrk", "total"
    );
    for (name, r) in rows {
        let Some(c) = &r.cpu else { continue };
        let per = |secs: f64| secs * 1e6 / r.requests.max(1) as f64;
        let proxy = (c.process - c.upstream).max(0.0);
        println!(
            "{:<12} {:>8.1} {:>9.1} {:>7.1} {:>9.1} {:>7.1} {:>7.1}",
            name,
            per(proxy),
            per(c.upstream),
            per(c.redis),
            per(c.postgres),
            per(c.wrk),
            per(c.process + c.wrk + c.redis + c.postgres)
        );
    }
    println!(
        "(proxy = this process minus the upstream thread: pingora, and for tollgate also its \
         control runtime)"
    );
    for (name, r) in rows.iter().filter(|(n, _)| *n != "upstream") {
        let Some(c) = &r.cpu else { continue };
        let per = |secs: f64| secs * 1e6 / r.requests.max(1) as f64;
        let mut threads: Vec<_> = c
            .threads
            .iter()
            .filter(|(n, v)| n.as_str() != "bench-upstream" && per(**v) >= 0.5)
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(a.1));
        let list: Vec<String> = threads
            .iter()
            .map(|(n, v)| format!("{n:?} {:.1}", per(**v)))
            .collect();
        let named: f64 = threads.iter().map(|(_, v)| per(**v)).sum();
        println!(
            "  {name} by thread name: {} (other/exited threads {:.1})",
            list.join(", "),
            (per(c.process - c.upstream) - named).max(0.0)
        );
    }
}
