//! Redis quota store: counters shared by every tollgate instance.
//!
//! `reserve.lua` checks a customer's rate (GCRA on Redis's clock, so instances agree) and the
//! meter's cap, and charges only if both pass. On a single server, reservations are batched: one
//! task per store sends whatever requests are waiting as one `EVALSHA`, and while that batch is
//! on its way the next one gathers and is sent too (a few in flight, pipelined on the one
//! connection, in order). The script decides the requests one after the other, each as
//! if alone, so batching changes nothing about exactness; it divides Redis's per-script cost and
//! the syscalls by the batch size (the latency a request can wait is one batch's round trip). On
//! a cluster a batch would span slots, so each request is its own call. Keys look like
//! `{prefix}:{customer}:q:{meter}:{period_start}` and `{prefix}:{customer}:r`: the `{customer}`
//! hash tag keeps a customer's keys in one slot (Redis Cluster). Counters expire a day after
//! their period ends. Every call has a deadline (`redis_timeout`): a hang is an outage, and the
//! caller applies the plan's fail mode.
//!
//! A reservation whose caller stopped waiting must not count later: a job still queued when its
//! caller gave up is never sent; a batch that answers after a caller gave up has that caller's
//! charge refunded; a batch that did not answer in time (Redis paused, the connection lost) is
//! cancelled by `cancel.lua` with its own key, which refunds what it granted if it ran, or stops
//! it from running when it arrives later. So a request answered from the fail-open fallback, or
//! refused 503 on a fail-closed plan, is never also charged in Redis.
//!
//! `batch`: the single-server batcher (forming, journaling, sending, cancelling batches).
//! `lease`: the lease call of lease-mode plans (`quota::lease` spends what it takes).
//!
//! The connection is created lazily on first use: redis-rs's `ConnectionManager` spawns its
//! driver task on the runtime it is created on, which must be the runtime that uses it.

mod batch;
mod lease;

use super::{seed_of, Check, CounterSeed, Period, QuotaError, QuotaStore, Verdict};
use crate::journal::Journal;
use async_trait::async_trait;
use batch::{batch_reservations, may_run_late, spawn_cancel, Job};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisResult, Script, ScriptInvocation};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OnceCell};

pub(crate) use lease::{Ask, Held, LeaseAnswer, Want};

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../reserve.lua")));
static ADJUST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../adjust.lua")));
static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../cancel.lua")));

/// How long a batch's key lives (milliseconds): the window in which a late batch is still
/// recognised and cancelled. A cancel is retried for most of it. A cancel normally runs right
/// after the batch (the same connection keeps their order), so the key only has to outlive a
/// cancel's retries; short, because every batch writes one.
const BATCH_KEY_TTL_MS: i64 = 30_000;

/// Counters outlive their period by a day so late refunds and reports still find them.
const EXPIRY_SLACK_SECS: i64 = 86_400;

pub struct RedisStore {
    target: Target,
    conn: OnceCell<Conn>,
    /// Single server only: the batcher's queue, started on first use.
    batcher: OnceCell<mpsc::Sender<Job>>,
    prefix: String,
    timeout: Duration,
    /// Where a counter Redis does not hold starts from (the ledger); `None`: from 0.
    seed: Option<std::sync::Arc<dyn CounterSeed>>,
    /// Where each batch is written before it is sent (see `journal`).
    journal: Option<Arc<Journal>>,
}

/// Where to connect: one server, or a cluster through its seed nodes.
enum Target {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// A live connection of either kind; both are cheap to clone (multiplexed).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke<T: FromRedisValue>(&mut self, inv: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(c).await,
            Conn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

// === impl RedisStore ===

impl RedisStore {
    /// Parses the URL now; connects on first use. With `cluster`, `url` is a comma-separated
    /// list of seed nodes.
    pub fn new(
        url: &str,
        cluster: bool,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, QuotaError> {
        let target = if cluster {
            let nodes: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            Target::Cluster(Box::new(
                ClusterClient::builder(nodes)
                    .connection_timeout(timeout.max(Duration::from_millis(200)))
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?,
            ))
        } else {
            Target::Single(redis::Client::open(url)?)
        };
        Ok(RedisStore {
            target,
            conn: OnceCell::new(),
            batcher: OnceCell::new(),
            prefix: prefix.to_string(),
            timeout,
            seed: None,
            journal: None,
        })
    }

    /// Batches are journaled in `journal` before they are sent.
    pub fn with_journal(mut self, journal: Arc<Journal>) -> RedisStore {
        self.journal = Some(journal);
        self
    }

    /// Counters Redis does not hold are seeded from `seed` before their first reservation.
    pub fn with_seed(mut self, seed: std::sync::Arc<dyn CounterSeed>) -> RedisStore {
        self.seed = Some(seed);
        self
    }

    /// Sets an absent counter to its seed (`SET … NX`: a counter another request or instance
    /// seeded or charged meanwhile is kept), expiring with the counter.
    async fn seed_counter(
        &self,
        seed: &dyn CounterSeed,
        customer: &str,
        meter: &str,
        period: Period,
    ) -> Result<(), QuotaError> {
        let Some(units) = seed_of(seed, customer, meter, period).await else {
            return Ok(());
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.quota_key(customer, meter, period))
            .arg(i64::try_from(units).unwrap_or(i64::MAX))
            .arg("NX")
            .arg("EXAT")
            .arg(period.end + EXPIRY_SLACK_SECS);
        let mut conn = self.conn().await?;
        let _: Option<String> = self.with_deadline(conn.query(&cmd)).await?;
        Ok(())
    }

    async fn conn(&self) -> Result<Conn, QuotaError> {
        let c = self
            .conn
            .get_or_try_init(|| async {
                match &self.target {
                    Target::Single(client) => {
                        let cfg = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(
                                self.timeout.max(Duration::from_millis(200)),
                            ))
                            .set_response_timeout(Some(self.timeout))
                            .set_number_of_retries(1)
                            .set_pipeline_buffer_size(4096);
                        let mut conn =
                            ConnectionManager::new_with_config(client.clone(), cfg).await?;
                        // A cancel is sent while Redis hangs and must run as soon as it is
                        // back: with its script unknown it would only get NOSCRIPT then.
                        for script in [&*RESERVE, &*ADJUST, &*CANCEL, &*lease::LEASE] {
                            script.load_async(&mut conn).await?;
                        }
                        Ok(Conn::Single(conn))
                    }
                    Target::Cluster(client) => {
                        client.get_async_connection().await.map(Conn::Cluster)
                    }
                }
            })
            .await?;
        Ok(c.clone())
    }

    /// Sets a counter to `units` (unless `dry_run`) and returns what it held: `repair-counters`.
    /// A counter that already holds `units` is left alone.
    pub async fn set_counter(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        units: i64,
        dry_run: bool,
    ) -> Result<Option<i64>, QuotaError> {
        let key = self.quota_key(customer, meter, period);
        let held: Option<i64> = self.read(redis::cmd("GET").arg(&key)).await?;
        if !dry_run && held != Some(units) && !(held.is_none() && units == 0) {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key)
                .arg(units)
                .arg("EXAT")
                .arg(period.end + EXPIRY_SLACK_SECS);
            let mut conn = self.conn().await?;
            let _: String = self.with_deadline(conn.query(&cmd)).await?;
        }
        Ok(held)
    }

    /// The key of a quota counter (public for tests and the admin API).
    pub fn quota_key(&self, customer: &str, meter: &str, period: Period) -> String {
        let mut k = self.tag(customer);
        k.push_str(":q:");
        k.push_str(meter);
        k.push(':');
        k.push_str(&period.start.to_string());
        k
    }

    fn rate_key(&self, customer: &str) -> String {
        let mut k = self.tag(customer);
        k.push_str(":r");
        k
    }

    /// `{prefix}:{customer}` with braces in the customer id escaped, so that an id cannot end the
    /// hash tag early and two customers can never share a key.
    fn tag(&self, customer: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + customer.len() + 40);
        k.push_str(&self.prefix);
        k.push_str(":{");
        for ch in customer.chars() {
            match ch {
                '{' => k.push_str("%7B"),
                '}' => k.push_str("%7D"),
                '%' => k.push_str("%25"),
                c => k.push(c),
            }
        }
        k.push('}');
        k
    }

    /// An idempotent read. The connection manager learns that its connection broke (Redis
    /// restarted, a proxy in between dropped it) only from the call that fails, and starts a new
    /// one then; such a read is sent once more on it, so the first read after a restart answers
    /// instead of failing. Writes are never retried here (a retry could count twice).
    async fn read<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, QuotaError> {
        let mut conn = self.conn().await?;
        match self.with_deadline(conn.query(cmd)).await {
            Err(QuotaError::Redis(e)) if e.is_unrecoverable_error() => {
                tracing::debug!(error = %e, "Redis connection broke; reading once more");
                self.with_deadline(conn.query(cmd)).await
            }
            r => r,
        }
    }

    /// One `reserve.lua` decision for `c` (batched on a single server): `(code, value)`.
    /// `report_absent` asks for code 3 instead of starting an absent counter from 0.
    async fn reserve_once(
        &self,
        c: &Check<'_>,
        report_absent: bool,
    ) -> Result<(i64, i64), QuotaError> {
        let mut conn = self.conn().await?;
        let (interval_us, tolerance_us) = match c.rate {
            Some(r) if r.per_minute > 0 => {
                let interval = 60_000_000 / u64::from(r.per_minute);
                (interval, interval.saturating_mul(u64::from(r.burst.max(1))))
            }
            _ => (0, 0),
        };
        let cap: i64 = c.cap.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
        let keys = [
            self.quota_key(c.customer, c.meter, c.period),
            self.rate_key(c.customer),
        ];
        let args = [
            c.cost.min(i64::MAX as u64) as i64,
            cap,
            c.period.end + EXPIRY_SLACK_SECS,
            interval_us as i64,
            tolerance_us.min(i64::MAX as u64) as i64,
            i64::from(report_absent),
        ];
        let (code, value) = match &conn {
            Conn::Single(_) => {
                let queue = self
                    .batcher
                    .get_or_init(|| async {
                        let (tx, rx) = mpsc::channel(4096);
                        tokio::spawn(batch_reservations(
                            conn.clone(),
                            rx,
                            self.timeout,
                            self.prefix.clone(),
                            self.journal.clone(),
                        ));
                        tx
                    })
                    .await;
                let (reply, answer) = oneshot::channel();
                // The request's own deadline covers the wait for the batch before it, too.
                let queued = async {
                    queue
                        .send(Job {
                            keys,
                            args,
                            line: c.record.cloned(),
                            reply,
                        })
                        .await
                        .map_err(|_| QuotaError::Batch("the batcher stopped".into()))?;
                    answer.await.map_err(|_| {
                        QuotaError::Batch("the batcher dropped a reservation".into())
                    })?
                };
                match tokio::time::timeout(self.timeout, queued).await {
                    Ok(r) => r?,
                    Err(_) => return Err(QuotaError::Timeout),
                }
            }
            Conn::Cluster(_) => {
                // One request per call; its batch key shares the customer's slot.
                let mut bk = self.tag(c.customer);
                bk.push_str(":b:");
                bk.push_str(&uuid::Uuid::now_v7().simple().to_string());
                let mut inv = RESERVE.prepare_invoke();
                inv.key(&keys[0]).key(&keys[1]).key(&bk);
                for a in args {
                    inv.arg(a);
                }
                inv.arg(BATCH_KEY_TTL_MS);
                let journaled = self.journal.as_ref().zip(c.record);
                if let Some((journal, line)) = journaled {
                    journal.sent(&bk, std::iter::once(Some(&**line)));
                }
                let v: Vec<i64> = match self.with_deadline(conn.invoke(&inv)).await {
                    Ok(v) => v,
                    Err(e) => {
                        if may_run_late(&e) {
                            spawn_cancel(conn.clone(), bk, vec![keys[0].clone()], vec![args[0]]);
                        }
                        return Err(e);
                    }
                };
                match v.as_slice() {
                    [code, value] => {
                        if let (Some((journal, line)), true) = (journaled, *code != 0) {
                            journal.resolve([line.id()]);
                        }
                        (*code, *value)
                    }
                    other => {
                        return Err(QuotaError::Protocol(format!(
                            "reserve returned {} values for one request",
                            other.len()
                        )))
                    }
                }
            }
        };
        Ok((code, value))
    }

    async fn with_deadline<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, QuotaError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(QuotaError::Timeout),
        }
    }
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, c: &Check<'_>) -> Result<Verdict, QuotaError> {
        let (mut code, mut value) = self.reserve_once(c, self.seed.is_some()).await?;
        if code == 3 {
            if let Some(seed) = &self.seed {
                self.seed_counter(seed.as_ref(), c.customer, c.meter, c.period)
                    .await?;
            }
            (code, value) = self.reserve_once(c, false).await?;
        }
        let value = value.max(0) as u64;
        match code {
            0 => Ok(Verdict::Granted { used: value }),
            1 => Ok(Verdict::OverQuota { used: value }),
            2 => Ok(Verdict::RateLimited {
                retry_after_ms: value.div_ceil(1000).max(1),
            }),
            other => Err(QuotaError::Protocol(format!(
                "reserve returned code {other}"
            ))),
        }
    }

    async fn adjust(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        delta: i64,
    ) -> Result<u64, QuotaError> {
        let mut conn = self.conn().await?;
        let mut inv = ADJUST.prepare_invoke();
        inv.key(self.quota_key(customer, meter, period))
            .arg(delta)
            .arg(period.end + EXPIRY_SLACK_SECS)
            .arg(i64::from(self.seed.is_some()));
        let v: i64 = self.with_deadline(conn.invoke(&inv)).await?;
        Ok(v.max(0) as u64)
    }

    /// With a seed, a counter Redis lost is seeded first (as a reservation would), so the
    /// operator's and the customer's views show the ledger's units, not 0.
    async fn used(&self, customer: &str, meter: &str, period: Period) -> Result<u64, QuotaError> {
        let key = self.quota_key(customer, meter, period);
        let mut v: Option<i64> = self.read(redis::cmd("GET").arg(&key)).await?;
        if let (None, Some(seed)) = (v, &self.seed) {
            self.seed_counter(seed.as_ref(), customer, meter, period)
                .await?;
            v = self.read(redis::cmd("GET").arg(&key)).await?;
        }
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        let _: String = self.read(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// Per key, `SET key x NX PX ttl GET`: the batch's record of what it granted, or, when it
    /// has none, a tombstone that makes the batch do nothing if it still arrives (as
    /// `cancel.lua` leaves). Pipelined on a single server; one call per key on a cluster.
    async fn batch_outcomes(&self, keys: &[&str]) -> Result<Vec<Option<String>>, QuotaError> {
        let claim = |key: &str| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key)
                .arg("x")
                .arg("NX")
                .arg("PX")
                .arg(BATCH_KEY_TTL_MS)
                .arg("GET");
            cmd
        };
        let mut conn = self.conn().await?;
        let held: Vec<Option<String>> = match &mut conn {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.add_command(claim(key));
                }
                self.with_deadline(pipe.query_async(c)).await?
            }
            Conn::Cluster(_) => {
                let mut held = Vec::with_capacity(keys.len());
                for key in keys {
                    held.push(self.with_deadline(conn.query(&claim(key))).await?);
                }
                held
            }
        };
        Ok(held
            .into_iter()
            .map(|bits| bits.filter(|bits| bits != "x"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::sync::Arc;

    fn store() -> RedisStore {
        let prefix = format!("tgtest:{}", uuid::Uuid::now_v7().simple());
        RedisStore::new(
            "redis://127.0.0.1:6379/",
            false,
            &prefix,
            Duration::from_millis(500),
        )
        .expect("url")
    }

    const P: Period = Period {
        start: 1_000,
        end: 4_000_000_000,
    };

    /// 400 concurrent reservations of 1 unit against a cap of 50 on real Redis grant exactly 50,
    /// and the counter in Redis says 50.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_reservations_never_overshoot() {
        let s = Arc::new(store());
        let mut tasks = Vec::new();
        for _ in 0..400 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.reserve(&Check {
                    customer: "acme",
                    meter: "api",
                    period: P,
                    cost: 1,
                    cap: Some(50),
                    rate: None,
                    record: None,
                    lease: None,
                })
                .await
            }));
        }
        let mut granted = 0;
        for t in tasks {
            if matches!(
                t.await.expect("join").expect("reserve"),
                Verdict::Granted { .. }
            ) {
                granted += 1;
            }
        }
        assert_eq!(granted, 50);
        assert_eq!(s.used("acme", "api", P).await.expect("used"), 50);
        let mut conn = s.conn().await.expect("conn");
        let ttl: i64 = conn
            .query(redis::cmd("TTL").arg(s.quota_key("acme", "api", P)))
            .await
            .expect("ttl");
        assert!(ttl > 0, "counter must expire, ttl={ttl}");
    }

    /// Each batch is journaled before it is sent; what it refused is resolved at once, what it
    /// granted stays outstanding. After a "crash" (the journal reopened), Redis says what each
    /// journaled batch granted, so exactly the granted requests are owed a row; a batch key
    /// Redis never saw is claimed, so that batch can never run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaled_batches_are_recovered_from_what_redis_granted() {
        use crate::journal::{Journal, Line};
        let dir = crate::ledger::test_support::TempDir::new();
        let (journal, _) = Journal::open(dir.path()).expect("open");
        let s = store().with_journal(Arc::new(journal));
        let lines: Vec<Arc<Line>> = (0..3)
            .map(|_| {
                Arc::new(Line::new(
                    uuid::Uuid::now_v7(),
                    chrono::Utc::now(),
                    "j",
                    "api",
                    1,
                    "signals",
                    "req",
                ))
            })
            .collect();
        let mut granted = Vec::new();
        for line in &lines {
            let v = s
                .reserve(&Check {
                    customer: "j",
                    meter: "api",
                    period: P,
                    cost: 1,
                    cap: Some(2),
                    rate: None,
                    record: Some(line),
                    lease: None,
                })
                .await
                .expect("reserve");
            if matches!(v, Verdict::Granted { .. }) {
                granted.push(line.id());
            }
        }
        assert_eq!(granted.len(), 2);
        assert_eq!(s.journal.as_ref().expect("journal").outstanding(), 2);

        let (_, leftover) = Journal::open(dir.path()).expect("reopen");
        let keys: Vec<&str> = leftover.batch_keys().collect();
        assert_eq!(keys.len(), 3, "one batch per sequential reservation");
        let bits = s.batch_outcomes(&keys).await.expect("outcomes");
        let outcomes = keys.iter().map(|k| k.to_string()).zip(bits).collect();
        let owed: Vec<uuid::Uuid> = leftover.owed(&outcomes).iter().map(|e| e.id).collect();
        assert_eq!(owed, granted);

        let never = format!("{}:b:never", s.prefix);
        assert_eq!(
            s.batch_outcomes(&[never.as_str()]).await.expect("outcome"),
            [None]
        );
        let mut conn = s.conn().await.expect("conn");
        let tombstone: Option<String> = conn
            .query(redis::cmd("GET").arg(&never))
            .await
            .expect("get");
        assert_eq!(
            tombstone.as_deref(),
            Some("x"),
            "a late batch will do nothing"
        );
    }

    /// The GCRA burst passes, the next is limited with a retry hint, and a limited call is free.
    #[tokio::test]
    async fn redis_rate_limit_is_free() {
        let s = store();
        let rate = Some(Rate {
            per_minute: 60,
            burst: 3,
        });
        let c = Check {
            customer: "r",
            meter: "api",
            period: P,
            cost: 2,
            cap: None,
            rate,
            record: None,
            lease: None,
        };
        for _ in 0..3 {
            assert!(matches!(
                s.reserve(&c).await.expect("r"),
                Verdict::Granted { .. }
            ));
        }
        match s.reserve(&c).await.expect("r") {
            Verdict::RateLimited { retry_after_ms } => {
                assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        assert_eq!(s.used("r", "api", P).await.expect("u"), 6);
    }

    /// One batch decides its requests in order, each as if alone: with 1 unit left, the first
    /// of three same-customer requests is granted and the others are over quota; a rate-limited
    /// request in the batch is free; other customers in the batch are unaffected.
    #[tokio::test]
    async fn redis_batch_decides_in_order() {
        let s = store();
        s.adjust("b", "api", P, 4).await.expect("seed");
        let exp = P.end + EXPIRY_SLACK_SECS;
        let mut inv = RESERVE.prepare_invoke();
        let reqs: [(&str, i64, i64, i64, i64); 4] = [
            ("b", 1, 5, 0, 0),                    // 4 + 1 = 5: granted
            ("b", 1, 5, 0, 0),                    // 6 > 5: over quota
            ("c", 2, -1, 60_000_000, 60_000_000), // first call: burst 1 admits it
            ("c", 2, -1, 60_000_000, 60_000_000), // one a minute: limited, free
        ];
        for (customer, ..) in reqs {
            inv.key(s.quota_key(customer, "api", P))
                .key(s.rate_key(customer));
        }
        for (_, cost, cap, interval, tolerance) in reqs {
            inv.arg(cost)
                .arg(cap)
                .arg(exp)
                .arg(interval)
                .arg(tolerance)
                .arg(0);
        }
        inv.key(format!("{}:b:order", s.prefix))
            .arg(BATCH_KEY_TTL_MS);
        let mut conn = s.conn().await.expect("conn");
        let v: Vec<i64> = conn.invoke(&inv).await.expect("batch");
        assert_eq!(&v[..6], &[0, 5, 1, 5, 0, 2]);
        assert_eq!(v[6], 2, "rate limited");
        assert!(
            v[7] > 59_000_000,
            "retry after about a minute, got {} us",
            v[7]
        );
        assert_eq!(s.used("b", "api", P).await.expect("u"), 5);
        assert_eq!(s.used("c", "api", P).await.expect("u"), 2);
    }

    /// A batch its callers gave up on: cancelled after it ran, what it granted is refunded
    /// (and a second cancel refunds nothing); cancelled before it ran, it does nothing when it
    /// arrives.
    #[tokio::test]
    async fn redis_cancel_refunds_a_late_batch_or_stops_it() {
        let s = store();
        let exp = P.end + EXPIRY_SLACK_SECS;
        let batch = |bk: &str| {
            let mut inv = RESERVE.prepare_invoke();
            for customer in ["x", "y"] {
                inv.key(s.quota_key(customer, "api", P))
                    .key(s.rate_key(customer));
            }
            inv.key(format!("{}:b:{bk}", s.prefix));
            for cap in [-1, 0] {
                inv.arg(3).arg(cap).arg(exp).arg(0).arg(0).arg(0);
            }
            inv.arg(BATCH_KEY_TTL_MS);
            inv
        };
        let cancel = |bk: &str| {
            let mut inv = CANCEL.prepare_invoke();
            inv.key(format!("{}:b:{bk}", s.prefix))
                .key(s.quota_key("x", "api", P))
                .key(s.quota_key("y", "api", P))
                .arg(BATCH_KEY_TTL_MS)
                .arg(3)
                .arg(3);
            inv
        };
        let mut conn = s.conn().await.expect("conn");
        let v: Vec<i64> = conn.invoke(&batch("ran")).await.expect("batch");
        assert_eq!(v, vec![0, 3, 1, 0], "x granted, y over its cap of 0");
        assert_eq!(s.used("x", "api", P).await.expect("u"), 3);
        let refunded: i64 = conn.invoke(&cancel("ran")).await.expect("cancel");
        assert_eq!(refunded, 1);
        assert_eq!(s.used("x", "api", P).await.expect("u"), 0);
        let again: i64 = conn.invoke(&cancel("ran")).await.expect("cancel");
        assert_eq!(again, 0);

        let none: i64 = conn.invoke(&cancel("late")).await.expect("cancel");
        assert_eq!(none, 0);
        let v: Vec<i64> = conn.invoke(&batch("late")).await.expect("batch");
        assert_eq!(v, vec![4], "a cancelled batch does nothing");
        assert_eq!(s.used("x", "api", P).await.expect("u"), 0);
    }

    /// The ledger says 7 units were used: a counter Redis does not hold starts from there
    /// (once: the second reservation does not seed again), and an adjustment of an absent
    /// counter leaves it absent for the seed instead of starting it from the delta.
    #[tokio::test]
    async fn redis_absent_counter_is_seeded_before_the_first_reservation() {
        let seed = std::sync::Arc::new(super::super::tests::FixedSeed::new(7));
        let s = store().with_seed(seed.clone());
        assert_eq!(s.adjust("sd", "api", P, -3).await.expect("a"), 0);
        let mut conn = s.conn().await.expect("conn");
        let raw: Option<i64> = conn
            .query(redis::cmd("GET").arg(s.quota_key("sd", "api", P)))
            .await
            .expect("get");
        assert_eq!(raw, None, "still absent");
        // A read seeds it too: the operator's view shows the ledger's units, not 0.
        assert_eq!(s.used("sd", "api", P).await.expect("u"), 7);
        let c = Check {
            customer: "sd",
            meter: "api",
            period: P,
            cost: 2,
            cap: Some(10),
            rate: None,
            record: None,
            lease: None,
        };
        assert_eq!(
            s.reserve(&c).await.expect("r"),
            Verdict::Granted { used: 9 }
        );
        assert_eq!(
            s.reserve(&c).await.expect("r"),
            Verdict::OverQuota { used: 9 }
        );
        assert_eq!(seed.calls(), 1);
        let ttl: i64 = conn
            .query(redis::cmd("TTL").arg(s.quota_key("sd", "api", P)))
            .await
            .expect("ttl");
        assert!(ttl > 0, "a seeded counter expires with its period: {ttl}");
    }

    /// Refunds never take a counter below zero; braces in ids cannot escape the hash tag.
    #[tokio::test]
    async fn redis_adjust_and_key_escaping() {
        let s = store();
        assert_eq!(s.adjust("x", "api", P, 5).await.expect("a"), 5);
        assert_eq!(s.adjust("x", "api", P, -9).await.expect("a"), 0);
        let k = s.quota_key("a}b{", "m", P);
        assert!(k.contains(":{a%7Db%7B}:q:m:"), "{k}");
    }

    /// An unreachable Redis is reported as an error within the deadline, not a hang.
    #[tokio::test]
    async fn redis_down_is_an_error() {
        let s = RedisStore::new(
            "redis://127.0.0.1:1/",
            false,
            "x",
            Duration::from_millis(100),
        )
        .expect("url");
        let started = std::time::Instant::now();
        assert!(s.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
