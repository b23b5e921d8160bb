//! `tollgate repair-counters`: sets each Redis quota counter of the current period to what the
//! ledger holds, for counters that drifted (a Redis restored from an old snapshot, a manual
//! edit, an incident) rather than vanished (an absent counter is rebuilt by its next
//! reservation anyway).
//!
//! Which counters: every (customer, meter) with ledger rows in the last [`LOOKBACK_DAYS`] days,
//! each in the customer's own current period (the subscription's, else the calendar month).
//! Calls in flight whose rows are not in the ledger yet are not counted: run it while traffic is
//! low, or stopped, when exactness matters.
//!
//! Owns: the command's procedure and its report. Must not touch: the key layout or the SET
//! (`quota::redis`), the SQL (`ledger`).

use crate::config::Config;
use crate::ledger::{self, UsageGroupBy, UsageQuery};
use crate::quota::redis::RedisStore;
use chrono::{Duration, Utc};

/// How far back the ledger is searched for customers with usage (longer than any period).
const LOOKBACK_DAYS: i64 = 40;

/// One counter that differed from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub customer: String,
    pub meter: String,
    pub period_start: i64,
    /// What Redis held (`None`: absent).
    pub redis: Option<i64>,
    pub ledger: i64,
}

/// Compares (and unless `dry_run`, sets) every counter; returns those that differed.
pub async fn repair_counters(config: &Config, dry_run: bool) -> anyhow::Result<Vec<Repair>> {
    let storage = &config.storage;
    let Some(url) = &storage.redis_url else {
        anyhow::bail!(
            "no storage.redis_url: embedded counters are rebuilt from the ledger at start"
        );
    };
    let ledger = ledger::open(&storage.database_url, storage.database_schema.as_deref()).await?;
    let store = RedisStore::new(
        url,
        storage.redis_cluster,
        &storage.redis_prefix,
        storage.redis_timeout.max(std::time::Duration::from_secs(2)),
    )?;
    let now = Utc::now();
    let with_usage = ledger
        .usage_report(
            &UsageQuery {
                from: now - Duration::days(LOOKBACK_DAYS),
                to: now + Duration::seconds(1),
                customer: None,
                meter: None,
                route: None,
                group_by: UsageGroupBy::Customer,
            },
            0,
            0,
        )
        .await?;
    let customers: std::collections::HashMap<String, crate::entitle::Entitlement> =
        ledger.all_customers().await?.into_iter().collect();
    let mut repairs = Vec::new();
    for group in with_usage {
        let period = crate::entitle::period_of(customers.get(&group.key), now);
        let at = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap_or(now);
        let (units, _) = ledger
            .usage_totals(&group.key, &group.meter, at(period.start), at(period.end))
            .await?;
        let redis = store
            .set_counter(&group.key, &group.meter, period, units, dry_run)
            .await?;
        if redis != Some(units) && !(redis.is_none() && units == 0) {
            repairs.push(Repair {
                customer: group.key,
                meter: group.meter,
                period_start: period.start,
                redis,
                ledger: units,
            });
        }
    }
    Ok(repairs)
}
