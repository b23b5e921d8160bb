//! Accuracy bench: `cargo bench --bench accuracy` (see `benches/README.md`).
//!
//! How exact is a quota when many clients race for its last units through several instances?
//! For 1, 2 and 4 tollgate instances sharing Redis and Postgres, 64 and 512 concurrent clients,
//! and both quota modes (exact, lease), every client calls until it is refused, against
//! `included = 10,000` with `overage = "deny"`. It prints, per cell: requests admitted (200),
//! the overshoot past 10,000, ledger rows, the Redis counter once every instance has stopped
//! (leases given back, usage flushed), and what the upstream received.
//!
//! It fails (exit 1) unless, in every cell: exact mode admits exactly 10,000; lease mode admits
//! at most 10,000 plus one lease (`lease_units`) per instance; the ledger has one row per
//! admitted request; Redis equals the ledger; the upstream saw each admitted request once.
//!
//! Env: `BENCH_INCLUDED` (default 10,000), `BENCH_LEASE_UNITS` (default 100).
//!
//! The instances run in this process (the integration tests' harness, each on its own
//! listeners and runtimes), on a Redis key prefix and Postgres schema unique to each cell.

#[allow(dead_code, unused_imports, unused_macros, clippy::unwrap_used)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use anyhow::{ensure, Context};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use support::{Backend, Tollgate, Upstream};

fn config(upstream: std::net::SocketAddr, included: u64, lease: Option<u64>) -> String {
    let mode = match lease {
        Some(units) => format!("quota_mode = \"lease\"\nlease_units = {units}\n"),
        None => String::new(),
    };
    support::config::bench_config(
        upstream,
        "",
        "",
        &format!("{mode}quotas.api_calls = {{ included = {included}, overage = \"deny\" }}\n"),
    )
}

/// One cell's outcome.
struct Cell {
    admitted: u64,
    refused: u64,
    other: u64,
    rows: i64,
    units: i64,
    redis: Option<i64>,
    hits: u64,
    secs: f64,
}

async fn cell(
    instances: usize,
    clients: usize,
    included: u64,
    lease: Option<u64>,
) -> anyhow::Result<Cell> {
    let up = Upstream::start().await;
    let toml = config(up.addr, included, lease);
    let mut tgs = vec![Tollgate::start(&toml, Backend::Shared).await];
    for _ in 1..instances {
        let peer = Tollgate::start_with(&toml, Backend::Shared, Some(&tgs[0]), |_| {}).await;
        tgs.push(peer);
    }
    let customer = support::unique("acc");
    let token = support::token(&customer);
    let (admitted, refused, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let tg = &tgs[i % instances];
        let (client, url, token) = (tg.client.clone(), tg.url("/signals"), token.clone());
        let (admitted, refused, other) = (admitted.clone(), refused.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status() == 200 => admitted.fetch_add(1, Ordering::Relaxed),
                    Ok(r) if r.status() == 429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    for tg in tgs.iter_mut() {
        tg.stop().await;
    }
    let (rows, units) = tgs[0].ledger_usage(&customer).await;
    let redis = tgs[0].redis_used(&customer, "api_calls").await;
    Ok(Cell {
        admitted: admitted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        other: other.load(Ordering::Relaxed),
        rows,
        units,
        redis,
        hits: up.hits() as u64,
        secs,
    })
}

async fn run(included: u64, lease_units: u64) -> anyhow::Result<()> {
    println!(
        "tollgate accuracy bench: included = {included} (deny), every client calls until refused; \
         lease mode with lease_units = {lease_units}; Redis and Postgres shared by the instances"
    );
    println!();
    println!(
        "{:<6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>11} {:>11} {:>9} {:>6}",
        "mode",
        "instances",
        "clients",
        "admitted",
        "overshoot",
        "refused",
        "ledger rows",
        "Redis after",
        "upstream",
        "secs"
    );
    let mut failures = Vec::new();
    for lease in [None, Some(lease_units)] {
        for instances in [1usize, 2, 4] {
            for clients in [64usize, 512] {
                let c = cell(instances, clients, included, lease)
                    .await
                    .with_context(|| format!("{instances} instances, {clients} clients"))?;
                let mode = if lease.is_some() { "lease" } else { "exact" };
                let overshoot = c.admitted.saturating_sub(included);
                println!(
                    "{:<6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>11} {:>11} {:>9} {:>6.1}",
                    mode,
                    instances,
                    clients,
                    c.admitted,
                    overshoot,
                    c.refused,
                    c.rows,
                    c.redis.map_or("-".into(), |r| r.to_string()),
                    c.hits,
                    c.secs
                );
                let name = format!("{mode} × {instances} × {clients}");
                let bound = match lease {
                    None => included,
                    Some(u) => included + u * instances as u64,
                };
                let mut check = |ok: bool, what: String| {
                    if !ok {
                        failures.push(format!("{name}: {what}"));
                    }
                };
                if lease.is_none() {
                    check(c.admitted == included, format!("admitted {}", c.admitted));
                }
                check(
                    c.admitted <= bound,
                    format!("admitted {} > {bound}", c.admitted),
                );
                check(
                    c.rows == c.admitted as i64 && c.units == c.rows,
                    format!("{} ledger rows ({} units)", c.rows, c.units),
                );
                check(
                    c.redis == Some(c.units),
                    format!("Redis {:?}, ledger {}", c.redis, c.units),
                );
                check(c.hits == c.admitted, format!("upstream saw {}", c.hits));
                check(
                    c.other == 0,
                    format!("{} answers neither 200 nor 429", c.other),
                );
            }
        }
    }
    println!();
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    println!(
        "OK: exact mode admitted exactly {included} in every cell, lease mode at most one lease \
         per instance more; one ledger row per admitted request; Redis equals the ledger"
    );
    Ok(())
}

fn main() -> ExitCode {
    let get = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(default)
    };
    let (included, lease_units) = (get("BENCH_INCLUDED", 10_000), get("BENCH_LEASE_UNITS", 100));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("accuracy bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(included, lease_units)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\naccuracy bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
