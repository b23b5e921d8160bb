//! Verified-token cache benchmark: `cargo bench --bench token_cache` (no services needed).
//!
//! Compares, on the request path's two operations (a hit, and a miss followed by an insert):
//!
//! - `quick_cache (today)`: `tollgate::auth::cache::TokenCache`, the cache `Verifier::verify`
//!   uses: `quick_cache::sync::Cache` from the full token text to an `Identity`, bounded at
//!   100,000 entries, `exp` checked on read, cloned out on a hit;
//! - `dashmap (before)`: the cache it replaced, a `DashMap` swept at its bound;
//! - `dashmap, Arc<Identity>`: that map holding `Arc<Identity>`, so a hit is a reference-count
//!   increment instead of two `String` copies.
//!
//! (`moka::sync::Cache` was measured too, on 2026-12-02: 384 ns per hit and 2,661 per miss +
//! insert on one thread, about three times the others; it is not kept as a dependency.)
//!
//! Each figure is wall time per operation in plain `Instant` loops (many iterations, the best of
//! several runs), single-threaded and with 2 threads on one shared cache. Tokens are real HS256 JWTs
//! of about 250 bytes, one per customer for 1,000 customers (hits), and 100,000 distinct ones for
//! the miss + insert runs (the production bound, so no eviction happens during a run).
//!
//! Env: `BENCH_RUNS` (runs per figure, default 7).

// The same allocator as the tollgate binary: a hit of today's cache allocates.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use jsonwebtoken::{encode, EncodingKey, Header};
use tollgate::auth::cache::TokenCache;
use tollgate::auth::Identity;

/// Distinct customers, one cached token each, for the hit runs.
const CUSTOMERS: usize = 1_000;
/// Hits per thread per run: every customer's token this many times over.
const HIT_ROUNDS: usize = 1_000;
/// Distinct tokens per miss + insert run: the production cache bound (`auth` CACHE_MAX_ENTRIES).
const INSERT_TOKENS: usize = 100_000;
const CAPACITY: usize = 100_000;

/// One candidate cache, used as `Verifier::verify` uses its cache.
trait Candidate: Sync {
    /// What a hit hands out.
    type Hit;
    const NAME: &'static str;
    fn with_capacity(capacity: usize) -> Self;
    fn get(&self, token: &str, now: u64) -> Option<Self::Hit>;
    fn insert(&self, token: &str, identity: &Identity, now: u64);
}

impl Candidate for TokenCache {
    type Hit = Identity;
    const NAME: &'static str = "quick_cache (today)";
    fn with_capacity(capacity: usize) -> Self {
        TokenCache::new(capacity)
    }
    fn get(&self, token: &str, now: u64) -> Option<Identity> {
        TokenCache::get(self, token, now)
    }
    fn insert(&self, token: &str, identity: &Identity, now: u64) {
        TokenCache::insert(self, token, identity, now);
    }
}

/// The cache before it moved to quick_cache: a `DashMap` swept at the bound, cleared when the
/// sweep is not enough.
struct PlainDashMap {
    map: DashMap<Box<str>, Identity>,
    max_entries: usize,
}

impl Candidate for PlainDashMap {
    type Hit = Identity;
    const NAME: &'static str = "dashmap (before)";
    fn with_capacity(max_entries: usize) -> Self {
        PlainDashMap {
            map: DashMap::new(),
            max_entries,
        }
    }
    fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let expired = match self.map.get(token) {
            None => return None,
            Some(entry) if now < entry.expires_at => return Some(entry.value().clone()),
            Some(_) => true,
        };
        if expired {
            self.map
                .remove_if(token, |_, identity| identity.expires_at <= now);
        }
        None
    }
    fn insert(&self, token: &str, identity: &Identity, now: u64) {
        if identity.expires_at <= now {
            return;
        }
        if self.map.len() >= self.max_entries {
            self.map.retain(|_, cached| cached.expires_at > now);
            if self.map.len() >= self.max_entries / 10 * 9 {
                self.map.clear();
            }
        }
        self.map.insert(Box::from(token), identity.clone());
    }
}

/// The `DashMap` cache with `Arc<Identity>` values.
struct ArcDashMap {
    map: DashMap<Box<str>, Arc<Identity>>,
    max_entries: usize,
}

impl Candidate for ArcDashMap {
    type Hit = Arc<Identity>;
    const NAME: &'static str = "dashmap, Arc<Identity>";
    fn with_capacity(max_entries: usize) -> Self {
        ArcDashMap {
            map: DashMap::new(),
            max_entries,
        }
    }
    fn get(&self, token: &str, now: u64) -> Option<Arc<Identity>> {
        let expired = match self.map.get(token) {
            None => return None,
            Some(entry) if now < entry.expires_at => return Some(Arc::clone(entry.value())),
            Some(_) => true,
        };
        if expired {
            self.map
                .remove_if(token, |_, identity| identity.expires_at <= now);
        }
        None
    }
    fn insert(&self, token: &str, identity: &Identity, now: u64) {
        if identity.expires_at <= now {
            return;
        }
        if self.map.len() >= self.max_entries {
            self.map.retain(|_, cached| cached.expires_at > now);
            if self.map.len() >= self.max_entries / 10 * 9 {
                self.map.clear();
            }
        }
        self.map
            .insert(Box::from(token), Arc::new(identity.clone()));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A realistic bearer token and its identity: HS256, a Stripe-like customer id, issuer, audience,
/// plan, `iat`/`exp` and a `jti`.
fn token(customer: usize, serial: usize, now: u64) -> (String, Identity) {
    let identity = Identity {
        customer: format!("cus_{customer:014}"),
        plan: Some("pro".to_owned()),
        expires_at: now + 3600,
    };
    let claims = serde_json::json!({
        "sub": identity.customer,
        "iss": "https://auth.example.com/",
        "aud": "tollgate-api",
        "plan": "pro",
        "iat": now,
        "exp": identity.expires_at,
        "jti": format!("{serial:016x}"),
    });
    let key = EncodingKey::from_secret(b"token-cache-bench-secret-0123456789");
    let jwt = encode(&Header::default(), &claims, &key).expect("HS256 signing");
    (jwt, identity)
}

/// Best and median of `runs` measurements, in ns per operation.
fn summarize(mut ns: Vec<f64>) -> (f64, f64) {
    ns.sort_by(f64::total_cmp);
    (ns[0], ns[ns.len() / 2])
}

/// ns per hit, each of `threads` threads reading every customer's token `HIT_ROUNDS` times (in a
/// scrambled order, each thread from its own offset).
fn hits<C: Candidate>(cache: &C, tokens: &[(String, Identity)], threads: usize, now: u64) -> f64 {
    let order: Vec<usize> = (0..tokens.len())
        .map(|i| (i * 617) % tokens.len())
        .collect();
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (order, barrier) = (&order, &barrier);
            scope.spawn(move || {
                barrier.wait();
                for round in 0..HIT_ROUNDS {
                    for step in 0..order.len() {
                        let (token, _) =
                            &tokens[order[(step + round + thread * 500) % order.len()]];
                        let hit = cache.get(black_box(token), now);
                        assert!(hit.is_some(), "{}: a cached token missed", C::NAME);
                        black_box(hit);
                    }
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed().as_nanos() as f64 / (HIT_ROUNDS * tokens.len()) as f64
    })
}

/// ns per miss + insert into a fresh cache, the tokens split between `threads` threads.
fn miss_inserts<C: Candidate>(tokens: &[(String, Identity)], threads: usize, now: u64) -> f64 {
    let cache = C::with_capacity(CAPACITY);
    let per_thread = tokens.len() / threads;
    let barrier = Barrier::new(threads + 1);
    let ns = std::thread::scope(|scope| {
        for chunk in tokens.chunks(per_thread) {
            let (cache, barrier) = (&cache, &barrier);
            scope.spawn(move || {
                barrier.wait();
                for (token, identity) in chunk {
                    if cache.get(black_box(token), now).is_none() {
                        cache.insert(token, identity, now);
                    }
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed().as_nanos() as f64 / per_thread as f64
    });
    drop(cache);
    ns
}

fn bench<C: Candidate>(
    hit_tokens: &[(String, Identity)],
    insert_tokens: &[(String, Identity)],
    runs: usize,
    now: u64,
) {
    let cache = C::with_capacity(CAPACITY);
    for (token, identity) in hit_tokens {
        cache.insert(token, identity, now);
    }
    // Warm-up.
    hits(&cache, hit_tokens, 1, now);
    let mut row = Vec::new();
    for threads in [1, 2] {
        row.push(summarize(
            (0..runs)
                .map(|_| hits(&cache, hit_tokens, threads, now))
                .collect(),
        ));
    }
    for threads in [1, 2] {
        row.push(summarize(
            (0..runs)
                .map(|_| miss_inserts::<C>(insert_tokens, threads, now))
                .collect(),
        ));
    }
    let cells: Vec<String> = row
        .iter()
        .map(|(best, median)| format!("{best:>7.1} ({median:>6.1})"))
        .collect();
    println!("{:<24} {}", C::NAME, cells.join("  "));
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(7);
    let now = unix_now();
    let hit_tokens: Vec<_> = (0..CUSTOMERS).map(|c| token(c, c, now)).collect();
    let insert_tokens: Vec<_> = (0..INSERT_TOKENS)
        .map(|serial| token(serial % CUSTOMERS, CUSTOMERS + serial, now))
        .collect();
    let mean_len = hit_tokens.iter().map(|(t, _)| t.len()).sum::<usize>() / hit_tokens.len();
    println!(
        "token cache: {CUSTOMERS} customers, tokens of {mean_len} bytes, {} hits per thread and \
         {INSERT_TOKENS} miss+inserts (split between the threads) per run; best of {runs} runs \
         (median); load average {}",
        HIT_ROUNDS * CUSTOMERS,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<24} {:>16}  {:>16}  {:>16}  {:>16}",
        "ns per op", "hit, 1 thread", "hit, 2 threads", "miss+ins, 1 thr", "miss+ins, 2 thr"
    );
    bench::<TokenCache>(&hit_tokens, &insert_tokens, runs, now);
    bench::<PlainDashMap>(&hit_tokens, &insert_tokens, runs, now);
    bench::<ArcDashMap>(&hit_tokens, &insert_tokens, runs, now);
}
