//! One `lease.lua` call: take, extend or give back this instance's lease on a counter (see the
//! script for the record it keeps and what a lost answer does). Never batched: a lease call is
//! rare by design (one per lease, not per request), so it goes straight to Redis.
//!
//! Owns: the script's arguments and answer. Must not touch: what a lease is spent on
//! (`quota::lease`).

use super::{RedisStore, EXPIRY_SLACK_SECS};
use crate::quota::{Period, QuotaError};
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

pub(super) static LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lease.lua")));

/// What a call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A new lease of this many units (after giving back what is held).
    Units(u64),
    /// Give back what is held, take nothing.
    Nothing,
    /// Keep the held lease alive for another lifetime, nothing else.
    Extend,
}

/// The lease the caller holds (as far as it knows), and what it gives back of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub seq: u64,
    pub units: u64,
    pub give_back: u64,
}

/// One call: the lease held, what is wanted, and the limits it is taken under.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub held: Held,
    pub want: Want,
    /// The deny cap (`None`: no cap).
    pub cap: Option<u64>,
    pub lifetime: Duration,
    /// Under a cap, a lease takes at most `1 / share` of the units left (at least 1), so one
    /// instance never holds what the others need.
    pub share: u32,
    /// The smallest lease worth taking (the request's cost); less left: none.
    pub min: u64,
}

/// The script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// The caller now holds lease `seq` of `units` (0: none, after a give-back); the counter is
    /// at `used`.
    Held { seq: u64, units: u64, used: u64 },
    /// Fewer units are left under the cap than wanted: nothing is leased (whatever was held
    /// has been given back; the new record is `seq`).
    TooFewLeft { seq: u64, used: u64 },
    /// The lease to extend is gone (expired and given back, or superseded).
    Gone,
}

fn units(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl RedisStore {
    /// The key of a counter's lease table: next to the counter, in the customer's slot.
    pub(crate) fn lease_key(&self, customer: &str, meter: &str, period: Period) -> String {
        let mut k = self.tag(customer);
        k.push_str(":l:");
        k.push_str(meter);
        k.push(':');
        k.push_str(&period.start.to_string());
        k
    }

    /// One lease call for `instance` on (customer, meter, period). An absent counter is seeded
    /// first when the store has a seed (as a reservation would).
    pub(crate) async fn lease(
        &self,
        instance: &str,
        customer: &str,
        meter: &str,
        period: Period,
        ask: Ask,
    ) -> Result<LeaseAnswer, QuotaError> {
        let key = (customer, meter, period);
        let v = self
            .lease_once(instance, key, ask, self.seed.is_some())
            .await?;
        let v = match (v.as_slice(), &self.seed) {
            ([3], Some(seed)) => {
                self.seed_counter(seed.as_ref(), customer, meter, period)
                    .await?;
                self.lease_once(instance, key, ask, false).await?
            }
            _ => v,
        };
        let n = |x: i64| u64::try_from(x).unwrap_or(0);
        match v.as_slice() {
            [0, seq, granted, used] => Ok(LeaseAnswer::Held {
                seq: n(*seq),
                units: n(*granted),
                used: n(*used),
            }),
            [1, seq, _, used] => Ok(LeaseAnswer::TooFewLeft {
                seq: n(*seq),
                used: n(*used),
            }),
            [2] => Ok(LeaseAnswer::Gone),
            other => Err(QuotaError::Protocol(format!("lease returned {other:?}"))),
        }
    }

    async fn lease_once(
        &self,
        instance: &str,
        (customer, meter, period): (&str, &str, Period),
        ask: Ask,
        report_absent: bool,
    ) -> Result<Vec<i64>, QuotaError> {
        let mut conn = self.conn().await?;
        let want = match ask.want {
            Want::Units(u) => units(u.max(1)),
            Want::Nothing => 0,
            Want::Extend => -1,
        };
        let mut inv = LEASE.prepare_invoke();
        inv.key(self.quota_key(customer, meter, period))
            .key(self.lease_key(customer, meter, period))
            .arg(instance)
            .arg(units(ask.held.seq))
            .arg(units(ask.held.units))
            .arg(units(ask.held.give_back))
            .arg(want)
            .arg(ask.cap.map_or(-1, units))
            .arg(
                i64::try_from(ask.lifetime.as_millis())
                    .unwrap_or(i64::MAX)
                    .max(1),
            )
            .arg(period.end + EXPIRY_SLACK_SECS)
            .arg(i64::from(report_absent))
            .arg(i64::from(ask.share.max(1)))
            .arg(units(ask.min.max(1)));
        self.with_deadline(conn.invoke(&inv)).await
    }
}
