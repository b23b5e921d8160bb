//! Reservation journal benchmark: `cargo bench --bench journal` (no services needed).
//!
//! What the journal adds to one metered request, on the request path and in the flusher:
//!
//! - `line`: building the request's journal line (`Line::new`: the row it would leave, as JSON);
//! - `embedded`: `line` + `Journal::granted` (one `write` of that line) + `Journal::resolve` (the
//!   flusher's report that the row is safe), per request;
//! - `redis, batch of N`: `line` per request + one `Journal::sent` per batch of N (one `write`)
//!   + `resolve` per request: the batcher's share of the cost, per request.
//!
//! Each figure is wall time per request in plain `Instant` loops (the best of several runs), one
//! thread, writing to a temporary directory on the machine's disk (page cache: no `fsync`, as in
//! tollgate). Rows look like tollgate's: a UUIDv7, a 36-character customer id, route `signals`.
//!
//! Env: `BENCH_RUNS` (runs per figure, default 7), `BENCH_REQUESTS` (per run, default 200,000).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use tollgate::journal::{Journal, Line};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn line(customer: &str) -> Line {
    Line::new(
        uuid::Uuid::now_v7(),
        chrono::Utc::now(),
        customer,
        "api_calls",
        1,
        "signals",
        "01a23bc9-7028-726d-a951-64ead69b3096",
    )
}

/// The best of `runs` runs of `f(requests)`, in nanoseconds per request.
fn best(runs: usize, requests: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f(requests);
            t.elapsed().as_nanos() as f64 / requests as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let runs = env("BENCH_RUNS", 7);
    let requests = env("BENCH_REQUESTS", 200_000);
    let dir = std::env::temp_dir().join(format!("tollgate-bench-journal-{}", std::process::id()));
    let (journal, _) = Journal::open(&dir).expect("journal");
    let customers: Vec<String> = (0..1000)
        .map(|i| format!("customer-{i:08}-0000-0000-0000-000000"))
        .collect();

    println!("journal: ns per request (best of {runs} runs of {requests})");
    let ns = best(runs, requests, |n| {
        for i in 0..n {
            black_box(line(&customers[i % customers.len()]));
        }
    });
    println!("  {:<22} {ns:>8.0}", "line");

    let ns = best(runs, requests, |n| {
        for i in 0..n {
            let l = line(&customers[i % customers.len()]);
            journal.granted(&l);
            journal.resolve([l.id()]);
        }
    });
    println!("  {:<22} {ns:>8.0}", "embedded");

    for batch in [1usize, 4, 16, 64] {
        let ns = best(runs, requests, |n| {
            let mut lines: Vec<Arc<Line>> = Vec::with_capacity(batch);
            for i in 0..n {
                lines.push(Arc::new(line(&customers[i % customers.len()])));
                if lines.len() == batch || i + 1 == n {
                    journal.sent(
                        "tg:b:0190000000007000800000000000000",
                        lines.iter().map(|l| Some(&**l)),
                    );
                    journal.resolve(lines.iter().map(|l| l.id()));
                    lines.clear();
                }
            }
        });
        println!("  {:<22} {ns:>8.0}", format!("redis, batch of {batch}"));
    }
    assert_eq!(journal.outstanding(), 0);
    journal.close();
    std::fs::remove_dir_all(&dir).ok();
}
