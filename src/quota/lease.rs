//! Lease mode: a plan with `quota_mode = "lease"` spends its quota in process. The instance takes
//! a block of units for a (customer, meter, period) from Redis in one atomic call (`lease.lua`),
//! grants requests from it with no round trip, and gives back what is left when the lease goes
//! idle, when the plan's terms change, when live config changes and when the instance stops.
//!
//! Exactness: the Redis counter always holds what was spent plus what is leased out, so a lease
//! never takes units past a `deny` cap. Under a cap a lease also takes at most half of one
//! instance's share of what is left (`1 / (2 × instances)`), so leases shrink as the cap comes
//! near and the first instance to ask never holds what another instance's callers need; when
//! not even the request's cost is left for a lease, this instance reserves exactly (one round
//! trip per request, as in exact mode) for a second before it tries a lease again. A customer at
//! the very limit can still be refused by one instance while another holds the last few units;
//! an unused lease comes back after half its lifetime. An instance that dies holding a lease
//! loses only its in-process counter: the units of the lease go back to the counter when it
//! expires (`lease_ttl` after it was last taken or extended), so the customer can get at most
//! one lease more than the cap per crashed holder, while every request it granted still reaches
//! the ledger through the journal.
//!
//! Rates in lease mode are local GCRA at the plan's rate divided by the number of live instances
//! (the config broadcast's census): a customer spread over every instance gets about its rate; one
//! that hits a single instance gets its share of it.
//!
//! Lease size adapts to the customer's recent rate on this instance: the first lease is
//! `lease_units`, each later one what the last was spent at over half a lifetime, between the
//! request's cost and `lease_units`.
//!
//! Owns: the held leases (one per customer, meter and period on this instance), their upkeep,
//! the local rate state of lease-mode plans. Must not touch: plans (callers pass terms and caps),
//! the ledger (spends are journaled like the embedded store's grants).

use super::fail_open::FailOpen;
use super::memory::{key, Limiters};
use super::redis::{Ask, Held, LeaseAnswer, RedisStore, Want};
use super::{Check, Period, QuotaError, QuotaStore, Verdict};
use crate::config::Rate;
use crate::journal::Journal;
use async_trait::async_trait;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// A lease-mode plan's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    /// The most units one lease holds (and so the most one crashed instance can over-grant).
    pub max_units: u64,
    /// How long a lease lives without being extended; the holder extends a lease in use at half
    /// of it and gives back one unused for half of it.
    pub lifetime: Duration,
}

/// Lease calls by kind, for `tollgate_quota_lease_calls_total`.
#[derive(Clone)]
pub struct LeaseCalls {
    pub take: prometheus::IntCounter,
    pub extend: prometheus::IntCounter,
    pub give_back: prometheus::IntCounter,
}

/// How long an instance reserves exactly after a lease was refused (too few units left).
const LOW_BACKOFF: Duration = Duration::from_secs(1);

/// How often held leases are looked after (extended, given back, forgotten).
pub const UPKEEP_EVERY: Duration = Duration::from_millis(250);

/// One (customer, meter, period) on this instance.
struct Slot {
    customer: Box<str>,
    meter: Box<str>,
    period: Period,
    /// The lease record as this instance knows it (`seq` 0: never held one).
    seq: u64,
    units: u64,
    /// Units of the lease not spent yet (refunds come back here).
    remaining: u64,
    /// A lease exists and may be spent until then (a margin before it expires in Redis).
    valid_until: Option<Instant>,
    /// The last call's answer was lost: what to send again (give-back) before anything else.
    doubt: Option<Held>,
    /// When the lease was taken or last extended.
    renewed_at: Instant,
    taken_at: Instant,
    spent: u64,
    last_spend: Instant,
    /// The counter right after the lease was taken.
    used_base: u64,
    /// The cap and terms the lease was taken under: a change gives it back.
    cap: Option<u64>,
    terms: LeaseTerms,
    /// Fewer units were left than a lease: reserve exactly until then.
    low_until: Option<Instant>,
    /// A lease call failed: until then, requests fail at once instead of queueing behind
    /// another call that would time out (the plan's fail mode applies).
    down_until: Option<Instant>,
}

impl Slot {
    fn new(c: &Check<'_>, terms: LeaseTerms, now: Instant) -> Slot {
        Slot {
            customer: c.customer.into(),
            meter: c.meter.into(),
            period: c.period,
            seq: 0,
            units: 0,
            remaining: 0,
            valid_until: None,
            doubt: None,
            renewed_at: now,
            taken_at: now,
            spent: 0,
            last_spend: now,
            used_base: 0,
            cap: c.cap,
            terms,
            low_until: None,
            down_until: None,
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.doubt.is_none() && self.valid_until.is_some_and(|v| now < v)
    }

    /// What the next call sends as held: the lost call's, or the lease with what is left of it.
    fn held(&self) -> Held {
        self.doubt.unwrap_or(Held {
            seq: self.seq,
            units: self.units,
            give_back: self.remaining,
        })
    }

    /// The next lease's size: what the last one was spent at over half a lifetime.
    fn want(&self, cost: u64, now: Instant) -> u64 {
        let max = self.terms.max_units.max(cost);
        if self.seq == 0 || self.valid_until.is_none() {
            return max;
        }
        let secs = now.duration_since(self.taken_at).as_secs_f64().max(0.001);
        let half = self.terms.lifetime.as_secs_f64() / 2.0;
        let want = (self.spent as f64 / secs * half).ceil();
        (want as u64).clamp(cost.max(1), max)
    }

    /// The call answered: the instance holds `units` of lease `seq` (0: none).
    fn took(&mut self, seq: u64, units: u64, used: u64, sent: Instant) {
        self.seq = seq;
        self.units = units;
        self.remaining = units;
        self.doubt = None;
        self.used_base = used;
        self.spent = 0;
        self.taken_at = sent;
        self.renewed_at = sent;
        self.valid_until = (units > 0).then(|| sent + valid_for(self.terms.lifetime));
    }

    /// The call's answer was lost: nothing more is spent from the lease until a later call
    /// settles it.
    fn lost(&mut self, held: Held) {
        self.doubt = Some(held);
        self.remaining = 0;
        self.valid_until = None;
    }

    fn spend(&mut self, cost: u64, now: Instant) -> u64 {
        self.remaining -= cost;
        self.spent = self.spent.saturating_add(cost);
        self.last_spend = now;
        self.used_base.saturating_sub(self.remaining)
    }

    /// Holds nothing and owes nothing: the slot can be forgotten.
    fn empty(&self) -> bool {
        self.doubt.is_none() && self.valid_until.is_none()
    }
}

/// Rounds of [`Leases::give_back_all`] before what is still owed is left to expire.
const GIVE_BACK_ROUNDS: u32 = 5;

/// How long a lease is spent after it was taken: its lifetime less a tenth (at least 100 ms), so
/// it stops here before it expires in Redis.
fn valid_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub((lifetime / 10).max(Duration::from_millis(100)))
}

/// This instance's leases, shared by the request path's store and the admin's.
pub struct Leases {
    /// This process, as holder of its leases.
    instance: String,
    /// Upkeep and the give-backs at stop and on config changes run on the control runtime, with
    /// its own connection.
    control: Arc<RedisStore>,
    journal: Option<Arc<Journal>>,
    fail_open: Arc<FailOpen>,
    rates: Limiters,
    slots: DashMap<String, Arc<Mutex<Slot>>>,
    calls: Option<LeaseCalls>,
}

impl Leases {
    pub fn new(
        control: Arc<RedisStore>,
        journal: Option<Arc<Journal>>,
        fail_open: Arc<FailOpen>,
    ) -> Leases {
        Leases {
            instance: uuid::Uuid::now_v7().simple().to_string(),
            control,
            journal,
            fail_open,
            rates: Limiters::default(),
            slots: DashMap::new(),
            calls: None,
        }
    }

    /// Counts each Redis call in `calls`.
    pub fn with_calls(mut self, calls: LeaseCalls) -> Leases {
        self.calls = Some(calls);
        self
    }

    fn count(&self, want: Want) {
        if let Some(c) = &self.calls {
            match want {
                Want::Units(_) => c.take.inc(),
                Want::Extend => c.extend.inc(),
                Want::Nothing => c.give_back.inc(),
            }
        }
    }

    /// The store the request path (or the admin API) uses: reservations with lease terms are
    /// granted from this instance's leases, everything else goes to `redis`.
    pub fn store(self: &Arc<Self>, redis: Arc<RedisStore>) -> Leased {
        Leased {
            leases: self.clone(),
            redis,
        }
    }

    /// Leases held (for tests and metrics).
    pub fn held(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.value().try_lock().is_ok_and(|s| s.valid_until.is_some()))
            .count()
    }

    fn slot(&self, c: &Check<'_>, terms: LeaseTerms) -> Arc<Mutex<Slot>> {
        let k = key(c.customer, c.meter, c.period);
        if let Some(s) = self.slots.get(&k) {
            return s.clone();
        }
        self.slots
            .entry(k)
            .or_insert_with(|| Arc::new(Mutex::new(Slot::new(c, terms, Instant::now()))))
            .clone()
    }

    /// Under a cap, a lease takes at most this share of what is left: half of one instance's
    /// part, so instances leave each other room and leases shrink as the cap comes near.
    fn share(&self) -> u32 {
        self.fail_open.instances().max(1).saturating_mul(2)
    }

    /// The plan's rate divided among the live instances.
    fn local_rate(&self, rate: Rate) -> Rate {
        let n = self.fail_open.instances().max(1);
        Rate {
            per_minute: (rate.per_minute / n).max(1),
            burst: (rate.burst / n).max(1),
        }
    }

    async fn reserve(
        &self,
        redis: &RedisStore,
        c: &Check<'_>,
        terms: LeaseTerms,
    ) -> Result<Verdict, QuotaError> {
        if let Some(rate) = c.rate {
            if let Some(retry_after_ms) = self.rates.check(self.local_rate(rate), c.customer) {
                return Ok(Verdict::RateLimited { retry_after_ms });
            }
        }
        let exactly = Check {
            rate: None,
            lease: None,
            ..*c
        };
        let slot = self.slot(c, terms);
        let mut s = slot.lock().await;
        let now = Instant::now();
        let changed = s.cap != c.cap || s.terms != terms;
        if changed {
            // The plan changed: what is held goes back with the next call, taken under the
            // new terms.
            s.cap = c.cap;
            s.terms = terms;
            s.low_until = None;
        }
        if !changed && s.live(now) && s.remaining >= c.cost {
            let used = s.spend(c.cost, now);
            drop(s);
            self.journal_grant(c);
            return Ok(Verdict::Granted { used });
        }
        if s.doubt.is_some() && s.down_until.is_some_and(|t| now < t) {
            return Err(QuotaError::Unavailable(
                "a lease call on this counter failed a moment ago",
            ));
        }
        if !changed && s.doubt.is_none() && s.low_until.is_some_and(|t| now < t) {
            drop(s);
            return redis.reserve(&exactly).await;
        }
        let held = s.held();
        let want = s.want(c.cost, now);
        self.count(Want::Units(want));
        let answer = redis
            .lease(
                &self.instance,
                c.customer,
                c.meter,
                c.period,
                Ask {
                    held,
                    want: Want::Units(want),
                    cap: c.cap,
                    lifetime: terms.lifetime,
                    share: self.share(),
                    min: c.cost,
                },
            )
            .await;
        match answer {
            Ok(LeaseAnswer::Held { seq, units, used }) => {
                s.took(seq, units, used, now);
                s.low_until = None;
                if s.remaining < c.cost {
                    return Err(QuotaError::Protocol(format!(
                        "lease of {units} units for a cost of {}",
                        c.cost
                    )));
                }
                let used = s.spend(c.cost, now);
                drop(s);
                self.journal_grant(c);
                Ok(Verdict::Granted { used })
            }
            Ok(LeaseAnswer::TooFewLeft { seq, used }) => {
                s.took(seq, 0, used, now);
                s.low_until = Some(now + LOW_BACKOFF);
                drop(s);
                redis.reserve(&exactly).await
            }
            Ok(LeaseAnswer::Gone) => Err(QuotaError::Protocol(
                "lease answered gone to a request for units".into(),
            )),
            Err(e) => {
                s.lost(held);
                s.down_until = Some(now + LOW_BACKOFF);
                Err(e)
            }
        }
    }

    fn journal_grant(&self, c: &Check<'_>) {
        if let (Some(journal), Some(line)) = (&self.journal, c.record) {
            journal.granted(line);
        }
    }

    /// A refund or an exact-cost settlement on a counter this instance holds a lease on goes to
    /// the lease (`None`: no live lease, the caller adjusts Redis).
    async fn adjust(&self, customer: &str, meter: &str, period: Period, delta: i64) -> Option<u64> {
        let slot = self.slots.get(&key(customer, meter, period))?.clone();
        let mut s = slot.lock().await;
        if !s.live(Instant::now()) {
            return None;
        }
        let d = delta.unsigned_abs();
        if delta < 0 {
            s.remaining = s.remaining.saturating_add(d);
            s.spent = s.spent.saturating_sub(d);
        } else if s.remaining >= d {
            s.remaining -= d;
            s.spent = s.spent.saturating_add(d);
        } else {
            return None;
        }
        Some(s.used_base.saturating_sub(s.remaining))
    }

    /// What this instance holds unspent on a counter (a read subtracts it: leased is not used).
    fn unspent(&self, customer: &str, meter: &str, period: Period) -> u64 {
        self.slots
            .get(&key(customer, meter, period))
            .and_then(|s| {
                s.value()
                    .try_lock()
                    .ok()
                    .filter(|s| s.live(Instant::now()))
                    .map(|s| s.remaining)
            })
            .unwrap_or(0)
    }

    /// One call for a slot from upkeep or a give-back (on the control connection).
    async fn call(&self, s: &mut Slot, want: Want) {
        let held = s.held();
        let sent = Instant::now();
        self.count(want);
        let answer = self
            .control
            .lease(
                &self.instance,
                &s.customer,
                &s.meter,
                s.period,
                Ask {
                    held,
                    want,
                    cap: s.cap,
                    lifetime: s.terms.lifetime,
                    share: self.share(),
                    min: 1,
                },
            )
            .await;
        match (want, answer) {
            (Want::Extend, Ok(LeaseAnswer::Held { .. })) => {
                s.renewed_at = sent;
                s.valid_until = Some(sent + valid_for(s.terms.lifetime));
            }
            // Expired and given back meanwhile: stop spending it; the next call gives back
            // what is left, and the script restores what was spent.
            (Want::Extend, Ok(_)) => s.lost(held),
            // An extension that failed changes nothing in Redis: the lease stays valid as it was.
            (Want::Extend, Err(e)) => {
                tracing::debug!(error = %e, customer = %s.customer, "could not extend a lease");
            }
            (_, Ok(LeaseAnswer::Held { seq, units, used })) => s.took(seq, units, used, sent),
            (_, Ok(LeaseAnswer::TooFewLeft { seq, used })) => s.took(seq, 0, used, sent),
            (_, Ok(LeaseAnswer::Gone)) => s.lost(held),
            (_, Err(e)) => {
                tracing::warn!(error = %e, customer = %s.customer, meter = %s.meter,
                    "could not give back a lease; it is given back by the next call or when it expires");
                s.lost(held);
                s.down_until = Some(sent + LOW_BACKOFF);
            }
        }
    }

    /// Looks after every slot: gives back leases unused for half their lifetime, extends leases
    /// in use at half their lifetime, retries give-backs whose answer was lost, and forgets
    /// empty slots. A slot busy with a request is left for the next round.
    pub async fn upkeep(&self) {
        let now = Instant::now();
        let slots: Vec<Arc<Mutex<Slot>>> = self.slots.iter().map(|s| s.value().clone()).collect();
        for slot in slots {
            let Ok(mut s) = slot.try_lock() else {
                continue;
            };
            let half = s.terms.lifetime / 2;
            if s.doubt.is_some() {
                if s.down_until.is_none_or(|t| now >= t) {
                    self.call(&mut s, Want::Nothing).await;
                }
            } else if s.valid_until.is_some() {
                if now.duration_since(s.last_spend) >= half
                    || s.valid_until.is_some_and(|v| now >= v)
                {
                    self.call(&mut s, Want::Nothing).await;
                } else if now.duration_since(s.renewed_at) >= half {
                    self.call(&mut s, Want::Extend).await;
                }
            }
        }
        self.slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || !slot
                    .try_lock()
                    .is_ok_and(|s| s.empty() && s.low_until.is_none_or(|t| now >= t))
        });
    }

    /// Gives back every lease (stop, live config change). Waits for requests using them. A
    /// give-back that fails is tried again a few times, 100 ms apart (the retry settles a lost
    /// answer without giving back twice): the first command on a connection that Redis closed
    /// (a restart since the last call) fails while the client reconnects.
    pub async fn give_back_all(&self) {
        for round in 0..GIVE_BACK_ROUNDS {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let slots: Vec<Arc<Mutex<Slot>>> =
                self.slots.iter().map(|s| s.value().clone()).collect();
            let mut owed = false;
            for slot in slots {
                let mut s = slot.lock().await;
                s.low_until = None;
                if !s.empty() {
                    self.call(&mut s, Want::Nothing).await;
                    owed |= !s.empty();
                }
            }
            if !owed {
                return;
            }
        }
    }

    /// Upkeep every [`UPKEEP_EVERY`] until `cancel`; idle rate state is forgotten once a minute.
    pub async fn run(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.upkeep().await;
            ticks += 1;
            if ticks.is_multiple_of(240) {
                self.rates.sweep();
            }
        }
    }
}

/// The quota store in front of Redis when a plan may lease: see the module docs.
pub struct Leased {
    leases: Arc<Leases>,
    redis: Arc<RedisStore>,
}

#[async_trait]
impl QuotaStore for Leased {
    async fn reserve(&self, c: &Check<'_>) -> Result<Verdict, QuotaError> {
        match c.lease {
            Some(terms) => self.leases.reserve(&self.redis, c, terms).await,
            None => self.redis.reserve(c).await,
        }
    }

    async fn adjust(
        &self,
        customer: &str,
        meter: &str,
        period: Period,
        delta: i64,
    ) -> Result<u64, QuotaError> {
        match self.leases.adjust(customer, meter, period, delta).await {
            Some(used) => Ok(used),
            None => self.redis.adjust(customer, meter, period, delta).await,
        }
    }

    /// Leased units this instance has not spent are not used (other instances' leases are).
    async fn used(&self, customer: &str, meter: &str, period: Period) -> Result<u64, QuotaError> {
        let used = self.redis.used(customer, meter, period).await?;
        Ok(used.saturating_sub(self.leases.unspent(customer, meter, period)))
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        self.redis.ping().await
    }

    async fn batch_outcomes(&self, keys: &[&str]) -> Result<Vec<Option<String>>, QuotaError> {
        self.redis.batch_outcomes(keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const P: Period = Period {
        start: 1_000,
        end: 4_000_000_000,
    };

    fn terms(max_units: u64, secs: u64) -> LeaseTerms {
        LeaseTerms {
            max_units,
            lifetime: Duration::from_secs(secs),
        }
    }

    fn redis(prefix: &str) -> Arc<RedisStore> {
        Arc::new(
            RedisStore::new(
                "redis://127.0.0.1:6379/",
                false,
                prefix,
                Duration::from_millis(500),
            )
            .expect("url"),
        )
    }

    /// One instance: its leases and the store its requests use.
    fn instance(prefix: &str) -> (Arc<Leases>, Leased) {
        let leases = Arc::new(Leases::new(
            redis(prefix),
            None,
            Arc::new(FailOpen::new(None)),
        ));
        let store = leases.store(redis(prefix));
        (leases, store)
    }

    fn check(customer: &str, cap: Option<u64>, t: LeaseTerms) -> Check<'_> {
        Check {
            customer,
            meter: "m",
            period: P,
            cost: 1,
            cap,
            rate: None,
            record: None,
            lease: Some(t),
        }
    }

    async fn counter(prefix: &str, customer: &str) -> u64 {
        redis(prefix).used(customer, "m", P).await.expect("used")
    }

    fn prefix() -> String {
        format!("tgtest:{}", uuid::Uuid::now_v7().simple())
    }

    /// A lease is one Redis call for many grants: the counter holds the whole lease while it is
    /// out, reads say what was spent, and giving it back leaves exactly what was spent.
    #[tokio::test]
    async fn a_lease_is_spent_in_process_and_given_back() {
        let p = prefix();
        let (leases, store) = instance(&p);
        let t = terms(10, 10);
        for i in 1..=3 {
            assert_eq!(
                store.reserve(&check("c", None, t)).await.expect("r"),
                Verdict::Granted { used: i }
            );
        }
        assert_eq!(counter(&p, "c").await, 10, "the whole lease is counted");
        assert_eq!(store.used("c", "m", P).await.expect("used"), 3);
        // A refund goes back into the lease, not to Redis.
        assert_eq!(store.adjust("c", "m", P, -1).await.expect("adjust"), 2);
        assert_eq!(counter(&p, "c").await, 10);
        leases.give_back_all().await;
        assert_eq!(counter(&p, "c").await, 2);
        assert_eq!(leases.held(), 0);
    }

    /// Two instances, 400 concurrent reservations each against a deny cap of 300: never more
    /// than 300 granted, and once the leases are back the counter equals what was granted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn leases_never_pass_a_deny_cap() {
        let p = prefix();
        let t = terms(25, 10);
        let granted = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let mut instances = Vec::new();
        for _ in 0..2 {
            let (leases, store) = instance(&p);
            let store = Arc::new(store);
            instances.push(leases);
            for _ in 0..400 {
                let (store, granted) = (store.clone(), granted.clone());
                tasks.push(tokio::spawn(async move {
                    if let Verdict::Granted { .. } =
                        store.reserve(&check("c", Some(300), t)).await.expect("r")
                    {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("join");
        }
        let granted = granted.load(Ordering::Relaxed);
        assert!(counter(&p, "c").await <= 300);
        for l in &instances {
            l.give_back_all().await;
        }
        assert!(
            (250..=300).contains(&granted),
            "granted {granted}: at most the cap, and short of it by less than one lease per instance"
        );
        assert_eq!(counter(&p, "c").await, granted);
    }

    /// Under a cap a lease takes at most half of what is left (a share per instance), so the
    /// first instance to ask cannot hold everything another instance's callers need.
    #[tokio::test]
    async fn a_lease_leaves_room_for_other_instances() {
        let p = prefix();
        let t = terms(100, 10);
        let (_a, first) = instance(&p);
        let (_b, second) = instance(&p);
        first.reserve(&check("c", Some(100), t)).await.expect("r");
        assert_eq!(counter(&p, "c").await, 50);
        second.reserve(&check("c", Some(100), t)).await.expect("r");
        assert_eq!(counter(&p, "c").await, 75);
        // Without a cap there is nothing to leave room for: a whole lease.
        first.reserve(&check("u", None, t)).await.expect("r");
        assert_eq!(counter(&p, "u").await, 100);
    }

    /// Fewer units left than a lease: leases shrink, then the instance reserves exactly, to the
    /// last unit.
    #[tokio::test]
    async fn near_the_cap_reservations_are_exact() {
        let p = prefix();
        let (leases, store) = instance(&p);
        let t = terms(10, 10);
        redis(&p)
            .set_counter("c", "m", P, 95, false)
            .await
            .expect("set");
        let mut granted = 0;
        for _ in 0..8 {
            if let Verdict::Granted { .. } =
                store.reserve(&check("c", Some(100), t)).await.expect("r")
            {
                granted += 1;
            }
        }
        assert_eq!(granted, 5);
        assert_eq!(counter(&p, "c").await, 100);
        assert_eq!(leases.held(), 0);
    }

    /// A holder that dies keeps its lease only until it expires: the next call on the counter
    /// gives the lease back, so the customer gets at most one lease more than the cap.
    #[tokio::test]
    async fn a_dead_holders_lease_comes_back_when_it_expires() {
        let p = prefix();
        let t = terms(10, 1);
        let (dead, store) = instance(&p);
        for _ in 0..4 {
            store.reserve(&check("c", Some(20), t)).await.expect("r");
        }
        assert_eq!(counter(&p, "c").await, 10);
        drop((dead, store)); // no give-back: the process died
        let (_b, other) = instance(&p);
        // While the dead lease is out, the other instance can take only what is left (a lease
        // of half of it).
        assert_eq!(
            other.reserve(&check("c", Some(20), t)).await.expect("r"),
            Verdict::Granted { used: 11 }
        );
        assert_eq!(counter(&p, "c").await, 15);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The lease expired: the other instance's next lease call gives it back whole (the 4
        // units the dead holder granted are not counted again: one lease of overshoot at most).
        let mut granted = 1;
        while let Verdict::Granted { .. } =
            other.reserve(&check("c", Some(20), t)).await.expect("r")
        {
            granted += 1;
            assert!(granted <= 20, "the cap holds");
        }
        assert_eq!(granted, 20, "the dead lease's 10 units came back");
    }

    /// A holder that was only late (its lease expired and was given back while it still spent
    /// it) gets back what it spent when it gives the lease back.
    #[tokio::test]
    async fn a_late_holder_gets_its_spending_back() {
        let p = prefix();
        let t = terms(10, 1);
        let (late, store) = instance(&p);
        for _ in 0..3 {
            store.reserve(&check("c", None, t)).await.expect("r");
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (other_leases, other) = instance(&p);
        other.reserve(&check("c", None, t)).await.expect("r");
        other_leases.give_back_all().await;
        assert_eq!(counter(&p, "c").await, 1, "the late lease went back whole");
        late.give_back_all().await;
        assert_eq!(
            counter(&p, "c").await,
            4,
            "what the late holder spent came back"
        );
    }

    /// A lease call whose answer was lost is sent again: the lease it took is given back whole
    /// and the caller's own give-back is not applied twice.
    #[tokio::test]
    async fn a_lost_answer_is_settled_by_the_retry() {
        let p = prefix();
        let r = redis(&p);
        let call = |held: Held, want: Want| {
            let r = r.clone();
            async move {
                let ask = Ask {
                    held,
                    want,
                    cap: None,
                    lifetime: Duration::from_secs(10),
                    share: 1,
                    min: 1,
                };
                r.lease("i", "c", "m", P, ask).await.expect("lease")
            }
        };
        let LeaseAnswer::Held { seq, units: 10, .. } = call(Held::default(), Want::Units(10)).await
        else {
            panic!("no lease");
        };
        // Spent 4, gives back 6 and asks for 10 more; the answer is lost.
        let held = Held {
            seq,
            units: 10,
            give_back: 6,
        };
        call(held, Want::Units(10)).await;
        assert_eq!(counter(&p, "c").await, 14);
        // The retry of the same call: the unheard lease goes back, a new one is taken.
        let LeaseAnswer::Held { seq, units, used } = call(held, Want::Units(10)).await else {
            panic!("no lease");
        };
        assert_eq!((units, used), (10, 14));
        let held = Held {
            seq,
            units,
            give_back: units,
        };
        call(held, Want::Nothing).await;
        assert_eq!(counter(&p, "c").await, 4);
    }

    /// An unused lease goes back after half its lifetime; one in use is extended instead.
    #[tokio::test]
    async fn upkeep_gives_back_idle_leases_and_extends_busy_ones() {
        let p = prefix();
        let t = terms(100, 2);
        let (leases, store) = instance(&p);
        store.reserve(&check("idle", None, t)).await.expect("r");
        store.reserve(&check("busy", None, t)).await.expect("r");
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            store.reserve(&check("busy", None, t)).await.expect("r");
            leases.upkeep().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(counter(&p, "idle").await, 1);
        assert_eq!(leases.held(), 1);
        assert_eq!(
            counter(&p, "busy").await,
            100,
            "still the first lease, extended"
        );
    }

    /// Lease-mode rates are local, at the plan's rate divided by the live instances.
    #[tokio::test]
    async fn lease_rates_are_a_share_per_instance() {
        let p = prefix();
        let fail_open = Arc::new(FailOpen::new(None));
        fail_open.set_instances(2);
        let leases = Arc::new(Leases::new(redis(&p), None, fail_open));
        let store = leases.store(redis(&p));
        let c = Check {
            rate: Some(Rate {
                per_minute: 60,
                burst: 10,
            }),
            ..check("c", None, terms(100, 10))
        };
        let mut ok = 0;
        for _ in 0..10 {
            if let Verdict::Granted { .. } = store.reserve(&c).await.expect("r") {
                ok += 1;
            }
        }
        assert_eq!(ok, 5, "a burst of 10 shared by 2 instances");
    }
}
