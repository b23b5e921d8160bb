//! Memory bench: `cargo bench --bench customers` (see `benches/README.md`).
//!
//! How much memory `tollgate serve` holds while requests come from a million distinct
//! customers: every per-customer structure in the process (verified tokens, last-seen counters
//! for fail-open, lease slots, local rate state) must stay bounded, or a big customer base (or
//! an attacker minting valid tokens for many subjects) grows the proxy until it is killed.
//!
//! It starts an upstream (axum, in this process) and `tollgate serve` as a child process (the
//! release binary, so its RSS is tollgate's alone), mints one HS256 token per customer, sends
//! `BENCH_REQUESTS` requests round-robin over `BENCH_CUSTOMERS` customers from
//! `BENCH_CONNECTIONS` keep-alive connections, and prints the child's RSS (`VmRSS`) at every
//! tenth of the run and its peak (`VmHWM`) at the end. Every answer must be 200.
//!
//! Env: `BENCH_CUSTOMERS` (default 1,000,000), `BENCH_REQUESTS` (default twice that),
//! `BENCH_CONNECTIONS` (default 64), `BENCH_BACKEND` (`shared`, the default: Redis and Postgres;
//! `embedded`: in-process counters and SQLite, whose counters are the quota data itself and so
//! grow with customers), `BENCH_QUOTA_MODE` (`exact` or `lease`). The plan has a rate limit, so
//! the local rate state (lease mode, embedded) is exercised too.

#[allow(dead_code, unused_imports, unused_macros, clippy::unwrap_used)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PATH: &str = "/signals";

struct Settings {
    customers: usize,
    requests: usize,
    connections: usize,
    shared: bool,
    lease: bool,
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{name}={v:?}: want a positive integer")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let customers = env_usize("BENCH_CUSTOMERS", 1_000_000)?;
        let shared = match std::env::var("BENCH_BACKEND").as_deref() {
            Err(_) | Ok("shared") => true,
            Ok("embedded") => false,
            Ok(v) => bail!("BENCH_BACKEND={v:?}: want shared or embedded"),
        };
        let lease = match std::env::var("BENCH_QUOTA_MODE").as_deref() {
            Err(_) | Ok("exact") => false,
            Ok("lease") => true,
            Ok(v) => bail!("BENCH_QUOTA_MODE={v:?}: want exact or lease"),
        };
        Ok(Settings {
            customers,
            requests: env_usize("BENCH_REQUESTS", 2 * customers)?,
            connections: env_usize("BENCH_CONNECTIONS", 64)?,
            shared,
            lease,
        })
    }
}

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("customers bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("customers bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = support::TempDir(std::env::temp_dir().join(support::unique("tollgate-customers")));
    let prefix = support::unique("tgmem");
    let schema = support::unique("m");
    let result = rt.block_on(run(&settings, &dir.0, &prefix, &schema));
    if settings.shared {
        rt.block_on(cleanup(&prefix, &schema));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ncustomers bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate serve`, stopped (SIGTERM, then SIGKILL) on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn config(s: &Settings, upstream: SocketAddr, dir: &Path, prefix: &str, schema: &str) -> String {
    let (proxy, admin) = (support::free_port(), support::free_port());
    let mode = if s.lease { "lease" } else { "exact" };
    let storage = if s.shared {
        format!(
            "database_url = \"{}\"\ndatabase_schema = \"{schema}\"\nredis_url = \"{}\"\nredis_prefix = \"{prefix}\"\n",
            support::PG_URL,
            support::REDIS_URL
        )
    } else {
        format!(
            "database_url = \"sqlite:{}\"\n",
            dir.join("ledger.db").display()
        )
    };
    let plan = format!(
        "quota_mode = \"{mode}\"\nrate_per_minute = 600\nquotas.api_calls = {{ included = 1_000_000_000, overage = \"deny\" }}\n"
    );
    support::config::bench_config(
        upstream,
        &format!("listen = \"{proxy}\"\nthreads = 1\n"),
        &format!("listen = \"{admin}\"\n"),
        &plan,
    ) + &format!(
        "\n[storage]\nspool_dir = \"{}\"\n{storage}",
        dir.join("spool").display()
    )
}

fn addr_of(toml: &str, table: &str) -> anyhow::Result<SocketAddr> {
    let at = toml.find(table).context("table")?;
    let line = toml[at..]
        .lines()
        .find(|l| l.starts_with("listen = "))
        .context("listen")?;
    Ok(line
        .trim_start_matches("listen = ")
        .trim_matches('"')
        .parse()?)
}

async fn run(s: &Settings, dir: &Path, prefix: &str, schema: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(async move {
        let app = Router::new().route(PATH, get(|| async { "{\"signal\":\"buy\"}" }));
        let _ = axum::serve(upstream, app).await;
    });
    let toml = config(s, upstream_addr, dir, prefix, schema);
    let file = dir.join("tollgate.toml");
    std::fs::write(&file, &toml)?;
    let (proxy, admin) = (addr_of(&toml, "[proxy]")?, addr_of(&toml, "[admin]")?);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let serve = Serve(
        Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let pid = serve.0.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let started = Instant::now();
    loop {
        let ready = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "tollgate did not start (see {})",
            dir.join("serve.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "tollgate customers bench: {} requests round-robin over {} customers, {} connections, \
         {} backend, quota_mode = {}, 1 proxy thread",
        s.requests,
        s.customers,
        s.connections,
        if s.shared {
            "shared (Redis + Postgres)"
        } else {
            "embedded (in-process counters + SQLite)"
        },
        if s.lease { "lease" } else { "exact" },
    );
    let minted = Instant::now();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..s.customers)
            .map(|i| {
                let mut claims = support::claims(&format!("c{i:07}"));
                claims["exp"] = serde_json::json!(now + 6 * 3600);
                support::sign(&claims)
            })
            .collect(),
    );
    println!(
        "minted {} tokens in {:.1} s",
        tokens.len(),
        minted.elapsed().as_secs_f64()
    );
    let (rss0, _) = memory(pid).context("reading the child's memory")?;
    println!();
    println!(
        "{:>10} {:>10} {:>10} {:>9}",
        "requests", "customers", "RSS MiB", "req/s"
    );
    println!(
        "{:>10} {:>10} {:>10.1} {:>9}",
        0,
        0,
        rss0 as f64 / 1024.0,
        "-"
    );

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let url = format!("http://{proxy}{PATH}");
    let mut workers = Vec::new();
    for _ in 0..s.connections {
        let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
        let (next, done, failed) = (next.clone(), done.clone(), failed.clone());
        let total = s.requests;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let token = &tokens[i % tokens.len()];
                let ok = client
                    .get(&url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let run_started = Instant::now();
    let mut mark = 1;
    let (mut last_n, mut last_t) = (0usize, run_started);
    while mark <= 10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = done.load(Ordering::Relaxed);
        if n * 10 >= s.requests * mark {
            let (rss, _) = memory(pid).context("tollgate exited")?;
            let rate = (n - last_n) as f64 / last_t.elapsed().as_secs_f64();
            (last_n, last_t) = (n, Instant::now());
            println!(
                "{:>10} {:>10} {:>10.1} {:>9.0}",
                n,
                n.min(s.customers),
                rss as f64 / 1024.0,
                rate
            );
            mark += 1;
        }
    }
    for w in workers {
        w.await?;
    }
    let (rss, hwm) = memory(pid).context("tollgate exited")?;
    let failed = failed.load(Ordering::Relaxed);
    println!();
    println!(
        "after {} requests in {:.0} s: RSS {:.1} MiB, peak {:.1} MiB, at start {:.1} MiB; non-200 answers: {failed}",
        s.requests,
        run_started.elapsed().as_secs_f64(),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss0 as f64 / 1024.0
    );
    ensure!(failed == 0, "{failed} requests were not answered 200");
    drop(serve);
    Ok(())
}

async fn cleanup(prefix: &str, schema: &str) {
    if let Ok(mut pg) = sqlx::Connection::connect(support::PG_URL).await {
        let _: Result<_, _> = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&mut pg as &mut sqlx::PgConnection)
            .await;
    }
    // SCAN, not KEYS: a million customers' keys; one KEYS answer outlasts the client's deadline.
    let Ok(client) = redis::Client::open(support::REDIS_URL) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor: u64 = 0;
    loop {
        let page: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await;
        let Ok((next, keys)) = page else {
            eprintln!("could not remove the bench's Redis keys ({prefix}:*)");
            return;
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
