//! The tables: medians over rounds, ratios to bare pingora paired per round, and the TSV.

use crate::gateways::Kind;
use crate::{Row, Settings};
use std::fmt::Write as _;
use std::path::Path;

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn rows_of<'a>(rows: &'a [Row], phase: &str, kind: Kind) -> Vec<&'a Row> {
    rows.iter()
        .filter(|r| r.phase == phase && r.kind == kind)
        .collect()
}

fn med(rs: &[&Row], f: impl Fn(&Row) -> f64) -> Option<f64> {
    median(rs.iter().map(|r| f(r)).collect())
}

/// Median over rounds of `f(peer's run) / f(other's run of the same round)`: interleaved
/// rounds saw the same machine, so the pairs cancel most of its drift.
fn paired(rows: &[Row], phase: &str, kind: Kind, other: Kind, f: fn(&Row) -> f64) -> Option<f64> {
    let base = rows_of(rows, phase, other);
    median(
        rows_of(rows, phase, kind)
            .iter()
            .filter_map(|r| {
                let b = base.iter().find(|b| b.round == r.round)?;
                Some(f(r) / f(b))
            })
            .collect(),
    )
}

/// Like `paired`, for a difference.
fn paired_diff(
    rows: &[Row],
    phase: &str,
    kind: Kind,
    other: Kind,
    f: fn(&Row) -> f64,
) -> Option<f64> {
    let base = rows_of(rows, phase, other);
    median(
        rows_of(rows, phase, kind)
            .iter()
            .filter_map(|r| {
                let b = base.iter().find(|b| b.round == r.round)?;
                Some(f(r) - f(b))
            })
            .collect(),
    )
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.prec$}"))
}

fn kinds_in(rows: &[Row], phase: &str) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| rows.iter().any(|r| r.phase == phase && r.kind == *k))
        .collect()
}

fn rps(r: &Row) -> f64 {
    r.load.rps()
}

fn p99(r: &Row) -> f64 {
    r.load.p99_us
}

/// `RATE_FRACTION` × the slowest peer's median saturation rate, a multiple of 100.
pub fn fixed_rate_target(rows: &[Row], fraction: f64) -> Option<u32> {
    let slowest = kinds_in(rows, "sat")
        .into_iter()
        .filter_map(|k| med(&rows_of(rows, "sat", k), rps))
        .reduce(f64::min)?;
    Some(((slowest * fraction / 100.0).floor() as u32 * 100).max(100))
}

fn per_round(rs: &[&Row], f: impl Fn(&Row) -> String) -> String {
    rs.iter().map(|r| f(r)).collect::<Vec<_>>().join(" / ")
}

fn diagnostics(rows: &[Row], phase: &str) {
    println!();
    println!(
        "| peer | req/s per round | p99 ms per round | peer CPU % per round | proxy core busy % | \
         load core busy % | max steal % |"
    );
    println!("|---|---|---|---|---|---|---|");
    for k in kinds_in(rows, phase) {
        let rs = rows_of(rows, phase, k);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            k.label(),
            per_round(&rs, |r| format!("{:.0}", r.load.rps())),
            per_round(&rs, |r| format!("{:.2}", r.load.p99_us / 1e3)),
            per_round(&rs, |r| format!(
                "{:.0}",
                100.0 * r.peer_cpu / r.window_secs
            )),
            per_round(&rs, |r| format!("{:.0}", r.proxy_core_busy)),
            per_round(&rs, |r| format!("{:.0}", r.load_core_busy)),
            per_round(&rs, |r| format!("{:.1}", r.steal)),
        );
    }
}

/// Redis commands per request by name (median run), for the peers that use Redis.
fn redis_breakdown(rows: &[Row], phase: &str) {
    for k in kinds_in(rows, phase) {
        let rs = rows_of(rows, phase, k);
        let mut names: Vec<String> = rs
            .iter()
            .flat_map(|r| r.redis_cmds.iter().map(|(c, _)| c.clone()))
            .collect();
        names.sort();
        names.dedup();
        let parts: Vec<String> = names
            .iter()
            .filter_map(|c| {
                let v = med(&rs, |r| {
                    let n = r
                        .redis_cmds
                        .iter()
                        .find(|(rc, _)| rc == c)
                        .map_or(0, |(_, n)| *n);
                    n as f64 / r.load.requests.max(1) as f64
                })?;
                (v >= 0.0005).then(|| format!("{c} {v:.3}"))
            })
            .collect();
        if !parts.is_empty() {
            println!("  Redis per request, {}: {}", k.label(), parts.join(", "));
        }
    }
}

pub fn saturation(rows: &[Row], s: &Settings) {
    let kinds = kinds_in(rows, "sat");
    if kinds.is_empty() {
        return;
    }
    println!();
    println!(
        "### (a) saturation: wrk -t1 -c{}, {} s measured after {} s warm-up, 1,000 rotating \
         customers, {} interleaved rounds (medians)",
        s.conns, s.duration, s.warmup, s.rounds
    );
    println!();
    println!(
        "| peer | req/s | / bare pingora | p50 ms | p99 ms | non-2xx + errors | CPU-ms / 1k req \
         | Redis CPU-ms / 1k | Postgres CPU-ms / 1k | Redis scripts / req | Redis commands / req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for k in kinds {
        let rs = rows_of(rows, "sat", k);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            k.label(),
            opt(med(&rs, rps), 0),
            opt(paired(rows, "sat", k, Kind::Pingora, rps), 2),
            opt(med(&rs, |r| r.load.p50_us / 1e3), 2),
            opt(med(&rs, |r| r.load.p99_us / 1e3), 2),
            rs.iter()
                .map(|r| r.load.non_2xx + r.load.socket_errors)
                .sum::<u64>(),
            opt(med(&rs, |r| r.per_1k(r.peer_cpu)), 1),
            opt(med(&rs, |r| r.per_1k(r.redis_cpu)), 1),
            opt(med(&rs, |r| r.per_1k(r.pg_cpu)), 1),
            opt(med(&rs, Row::scripts_per_req), 3),
            opt(med(&rs, Row::cmds_per_req), 3),
        );
    }
    diagnostics(rows, "sat");
    redis_breakdown(rows, "sat");
    println!(
        "\nRatios are paired per round. CPU-ms / 1k req: utime+stime of the peer's processes \
         (/proc, 10 ms ticks) over the measured run per 1,000 completed requests; Redis: the \
         bench's own redis-server; Postgres: every postgres process on the machine (tollgate's \
         ledger). Redis scripts / req: EVAL + EVALSHA calls (one round trip each) from INFO \
         commandstats; commands / req also counts the commands run inside the scripts. \
         Saturation latencies are closed-loop queueing: see (b) for latency."
    );
}

pub fn fixed(rows: &[Row], s: &Settings, rate: u32) {
    let kinds = kinds_in(rows, "rate");
    if kinds.is_empty() {
        return;
    }
    println!();
    println!(
        "### (b) fixed rate {rate} req/s: open loop, {} connections, {} s measured after {} s \
         warm-up, 1,000 rotating customers, latency from the scheduled send time, {} \
         interleaved rounds (medians)",
        s.conns, s.rate_duration, s.warmup, s.rounds
    );
    println!();
    println!(
        "| peer | achieved req/s | p50 ms | p99 ms | p99.9 ms | p99 − bare pingora's, ms | \
         non-2xx + errors | CPU-ms / 1k req | Redis CPU-ms / 1k | Redis scripts / req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for k in kinds {
        let rs = rows_of(rows, "rate", k);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            k.label(),
            opt(med(&rs, rps), 0),
            opt(med(&rs, |r| r.load.p50_us / 1e3), 2),
            opt(med(&rs, |r| r.load.p99_us / 1e3), 2),
            opt(med(&rs, |r| r.load.p999_us / 1e3), 2),
            opt(
                paired_diff(rows, "rate", k, Kind::Pingora, p99).map(|d| d / 1e3),
                2
            ),
            rs.iter()
                .map(|r| r.load.non_2xx + r.load.socket_errors)
                .sum::<u64>(),
            opt(med(&rs, |r| r.per_1k(r.peer_cpu)), 1),
            opt(med(&rs, |r| r.per_1k(r.redis_cpu)), 1),
            opt(med(&rs, Row::scripts_per_req), 3),
        );
    }
    diagnostics(rows, "rate");
}

/// Issue 11's bars, against this run.
pub fn targets(rows: &[Row]) {
    let mut lines = Vec::new();
    let mut check = |what: &str, v: Option<f64>, ok: fn(f64) -> bool, prec: usize| {
        let verdict = match v {
            Some(x) if ok(x) => "met",
            Some(_) => "NOT met",
            None => "not measured",
        };
        lines.push(format!("  {what}: {} ({verdict})", opt(v, prec)));
    };
    use Kind::*;
    check(
        "tollgate exact / bare pingora, req/s (≥ 0.90)",
        paired(rows, "sat", TollgateExact, Pingora, rps),
        |x| x >= 0.9,
        2,
    );
    check(
        "tollgate exact / nginx + Lua + Redis, req/s (≥ 1.10)",
        paired(rows, "sat", TollgateExact, NginxLua, rps),
        |x| x >= 1.1,
        2,
    );
    check(
        "tollgate lease / bare pingora, req/s (≥ 0.97)",
        paired(rows, "sat", TollgateLease, Pingora, rps),
        |x| x >= 0.97,
        2,
    );
    for k in [TollgateExact, TollgateLease] {
        check(
            &format!(
                "{} p99 − bare pingora's at the fixed rate, ms (≤ 0.5)",
                k.label()
            ),
            paired_diff(rows, "rate", k, Pingora, p99).map(|d| d / 1e3),
            |x| x <= 0.5,
            2,
        );
    }
    check(
        "tollgate lease Redis scripts / req at saturation (≤ 0.05)",
        med(&rows_of(rows, "sat", TollgateLease), Row::scripts_per_req),
        |x| x <= 0.05,
        3,
    );
    let exact = med(&rows_of(rows, "sat", TollgateExact), Row::scripts_per_req);
    println!();
    println!("Targets (issue 11):");
    for l in lines {
        println!("{l}");
    }
    println!(
        "  tollgate exact Redis scripts / req at saturation: {} (one reservation per request, \
         several per EVALSHA when batched)",
        opt(exact, 3)
    );
}

/// One row per run: printed, and written to `BENCH_TSV` when set.
pub fn tsv(rows: &[Row], path: Option<&Path>) -> anyhow::Result<()> {
    let mut out = String::from(
        "phase\tround\tpeer\ttarget_rps\trequests\tsecs\trps\tp50_us\tp99_us\tp999_us\tnon2xx\t\
         errors\tcpu_ms_per_1k\tredis_cpu_ms_per_1k\tpg_cpu_ms_per_1k\tredis_scripts_per_req\t\
         redis_cmds_per_req\tpeer_cpu_pct\tproxy_core_busy_pct\tload_core_busy_pct\tsteal_pct\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{:.3}\t{:.0}\t{:.0}\t{:.0}\t{:.0}\t{}\t{}\t{:.2}\t{:.2}\t{:.2}\t\
             {:.4}\t{:.4}\t{:.0}\t{:.0}\t{:.0}\t{:.1}",
            r.phase,
            r.round,
            r.kind.key(),
            r.target_rate,
            r.load.requests,
            r.load.secs,
            r.load.rps(),
            r.load.p50_us,
            r.load.p99_us,
            r.load.p999_us,
            r.load.non_2xx,
            r.load.socket_errors,
            r.per_1k(r.peer_cpu),
            r.per_1k(r.redis_cpu),
            r.per_1k(r.pg_cpu),
            r.scripts_per_req(),
            r.cmds_per_req(),
            100.0 * r.peer_cpu / r.window_secs.max(1e-9),
            r.proxy_core_busy,
            r.load_core_busy,
            r.steal,
        );
    }
    println!("\nTSV (one row per run):");
    print!("{out}");
    if let Some(p) = path {
        std::fs::write(p, &out).map_err(|e| anyhow::anyhow!("writing {p:?}: {e}"))?;
        println!("(also written to {})", p.display());
    }
    Ok(())
}
