//! Steps 2–5 of the request path for a metered route: **authenticate** (bearer JWT → customer),
//! **entitle** (customer → plan, status policy), **gate** (the route's feature must be in the
//! plan), **rate + reserve** (one atomic call to the quota store, or the local fallback when it
//! is down and the plan fails open). Shadow mode computes and counts the plan's decisions
//! (gate, rate, quota) without enforcing them; identity and account state are never shadowed.
//!
//! Owns: the order of these steps and what each denial carries. Must not touch: HTTP writing
//! (the caller writes the denial), the ledger, settling.

use super::ctx::{Ctx, Reserved};
use super::respond::{Decision, Denial};
use super::state::{Shared, Snapshot};
use crate::auth::Identity;
use crate::config::{FailMode, Plan, Quota, Route};
use crate::entitle::{self, Entitlement, Refusal};
use crate::journal::Line;
use crate::quota::{Check, QuotaStore, Verdict};
use chrono::{DateTime, Utc};
use http::header::AUTHORIZATION;
use pingora::proxy::Session;
use std::time::Instant;

/// Steps 2–5. `None`: admitted (the reservation is in `ctx`), go on and forward.
pub(super) async fn admit(
    shared: &Shared,
    session: &Session,
    ctx: &mut Ctx,
    snap: &Snapshot,
    route: &Route,
) -> Option<Denial> {
    // 2. authenticate
    let identity = match authenticate(shared, session).await {
        Ok(id) => id,
        Err(denial) => return Some(denial),
    };

    // 3. entitle
    let ent = shared.entitlements.get(&identity.customer);
    let now = Utc::now();
    ctx.arrived = Some(now);
    let plan = match entitle(snap, ent.as_deref(), &identity, now) {
        Ok(p) => p,
        Err(denial) => return Some(denial),
    };
    ctx.customer = Some(identity.customer);

    // Shadow mode: plan decisions are computed and counted, not enforced.
    let shadow = route.shadow || plan.shadow;

    // 4. gate
    if let Some(denial) = gate(route, plan) {
        if !shadow {
            return Some(denial);
        }
        ctx.shadowed = Some(waive(ctx, snap, route, &denial));
    }

    // 5. rate + reserve
    match reserve(shared, ctx, snap, route, plan, ent.as_deref(), now, shadow).await {
        Ok((reserved, waived)) => {
            ctx.reserved = Some(reserved);
            if waived.is_some() {
                ctx.shadowed = waived;
            }
            None
        }
        Err(denial) => {
            ctx.shadowed = None;
            Some(denial)
        }
    }
}

/// Step 2: the bearer token's identity, or the 401.
pub(super) async fn authenticate(shared: &Shared, session: &Session) -> Result<Identity, Denial> {
    let authorization = session
        .req_header()
        .headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes());
    shared
        .verifier
        .verify(authorization)
        .await
        .map_err(|e| Denial::InvalidToken {
            description: e.description(),
            missing: e.is_missing(),
        })
}

/// Step 3: the plan the request is served under, or the 402/403 of the status policy.
fn entitle<'s>(
    snap: &'s Snapshot,
    ent: Option<&Entitlement>,
    identity: &Identity,
    now: DateTime<Utc>,
) -> Result<&'s Plan, Denial> {
    entitle::resolve(&snap.config, ent, identity.plan.as_deref(), now).map_err(|r| match r {
        Refusal::Suspended => Denial::Suspended,
        Refusal::PaymentRequired(status) => Denial::PaymentRequired { status },
    })
}

/// Step 4: the route's feature must be in the plan.
fn gate(route: &Route, plan: &Plan) -> Option<Denial> {
    let feature = route.feature.as_ref()?;
    (!plan.features.contains(feature)).then(|| Denial::FeatureNotInPlan {
        feature: feature.clone(),
        plan: plan.name.clone(),
    })
}

/// Step 5: rate and quota in one call to the quota store. Under shadow mode a denied call is
/// charged anyway (past the cap and the rate, in the same store): it goes ahead, and the
/// decision it was spared comes back with the reservation.
#[allow(clippy::too_many_arguments)] // the step's inputs, each used once; a struct would only rename them
async fn reserve(
    shared: &Shared,
    ctx: &Ctx,
    snap: &Snapshot,
    route: &Route,
    plan: &Plan,
    ent: Option<&Entitlement>,
    now: DateTime<Utc>,
    shadow: bool,
) -> Result<(Reserved, Option<Decision>), Denial> {
    let quota = plan
        .quotas
        .get(&route.meter)
        .copied()
        .unwrap_or(Quota::Unlimited);
    let included = quota.included();
    let period = entitle::period_of(ent, now);
    let customer = ctx.customer.as_deref().unwrap_or_default();
    // The request's ledger row has this id from here on: the journal line written before the
    // charge can count, and the row settled later, are the same row.
    let id = uuid::Uuid::now_v7();
    let line = shared.journal.as_ref().map(|_| {
        std::sync::Arc::new(Line::new(
            id,
            now,
            customer,
            &route.meter,
            route.cost,
            &route.name,
            &ctx.request_id,
        ))
    });
    let check = Check {
        customer,
        meter: &route.meter,
        period,
        cost: route.cost,
        cap: quota.cap(),
        rate: plan.rate,
        record: line.as_ref(),
        lease: plan.lease,
    };
    let (mut verdict, local) = reserve_or_fall_back(shared, &check, plan).await?;
    let mut waived = None;
    let denial = match verdict {
        Verdict::Granted { .. } => None,
        Verdict::OverQuota { used } => Some(Denial::QuotaExceeded {
            meter: route.meter.clone(),
            limit: included.unwrap_or(0),
            used,
            cost: route.cost,
            resets_at: period.end,
            retry_after: period.seconds_left(now.timestamp()),
            window: period.length(),
        }),
        Verdict::RateLimited { retry_after_ms } => Some(Denial::RateLimited {
            retry_after: retry_after_ms.div_ceil(1000).max(1),
        }),
    };
    if let Some(denial) = denial {
        if !shadow {
            return Err(denial);
        }
        waived = Some(waive(ctx, snap, route, &denial));
        let anyway = Check {
            cap: None,
            rate: None,
            lease: None,
            ..check
        };
        let store = if local {
            shared.fallback.as_ref() as &dyn QuotaStore
        } else {
            shared.store.as_ref()
        };
        verdict = match store.reserve(&anyway).await {
            Ok(v) => v,
            Err(e) => {
                shared.metrics.quota_store_errors.inc();
                tracing::warn!(error = %e, "quota store unavailable");
                return Err(Denial::QuotaStoreUnavailable);
            }
        };
    }
    let Verdict::Granted { used } = verdict else {
        // An uncapped, unrated reservation is always granted.
        return Err(Denial::QuotaStoreUnavailable);
    };
    if let Some(alerts) = &shared.alerts {
        alerts.on_charge(plan, customer, &route.meter, period, route.cost, used);
    }
    let reserved = Reserved {
        id,
        period,
        units: route.cost,
        used,
        included,
        local,
    };
    Ok((reserved, waived))
}

/// One reservation in the quota store, or in the local fallback when the store is down and the
/// plan fails open. The bool is true when the fallback took it. A capped quota's fallback may
/// grant only the plan's share of what was left when Redis last answered (`fail_open`), and its
/// answers count from there.
async fn reserve_or_fall_back(
    shared: &Shared,
    check: &Check<'_>,
    plan: &Plan,
) -> Result<(Verdict, bool), Denial> {
    let started = Instant::now();
    let remember = check.cap.is_some() && plan.fail_mode == FailMode::Open && !shared.embedded;
    let result = match shared.store.reserve(check).await {
        Ok(mut v) => {
            if !shared.embedded && !shared.fallback.is_empty() {
                v = fold_local(shared, check, v).await;
            }
            if remember {
                if let Verdict::Granted { used } | Verdict::OverQuota { used } = v {
                    shared
                        .fail_open
                        .record(check.customer, check.meter, check.period, used);
                }
            }
            Ok((v, false))
        }
        Err(e) => {
            shared.metrics.quota_store_errors.inc();
            tracing::warn!(error = %e, "quota store unavailable");
            match plan.fail_mode {
                FailMode::Closed => Err(Denial::QuotaStoreUnavailable),
                FailMode::Open => {
                    let (limited, base) = shared
                        .fail_open
                        .limit(check, plan.fail_open_allowance)
                        .await;
                    match shared.fallback.reserve(&limited).await {
                        Ok(Verdict::Granted { used }) => Ok((
                            Verdict::Granted {
                                used: base.saturating_add(used),
                            },
                            true,
                        )),
                        Ok(Verdict::OverQuota { used }) => Ok((
                            Verdict::OverQuota {
                                used: base.saturating_add(used),
                            },
                            true,
                        )),
                        Ok(v) => Ok((v, true)),
                        Err(_) => Err(Denial::QuotaStoreUnavailable),
                    }
                }
            }
        }
    };
    shared
        .metrics
        .quota_store_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Redis answers again and the fallback still holds what it granted for this counter during the
/// outage (the periodic fold has not run yet): fold it now, and decide this call against the
/// total, so the cap holds from the first call after recovery.
async fn fold_local(shared: &Shared, check: &Check<'_>, verdict: Verdict) -> Verdict {
    let Some(local) = shared
        .fallback
        .take(check.customer, check.meter, check.period)
    else {
        return verdict;
    };
    let store = shared.store.as_ref();
    let total = match store
        .adjust(check.customer, check.meter, check.period, local)
        .await
    {
        Ok(total) => total,
        Err(_) => {
            shared.fallback.restore(vec![crate::quota::memory::Drained {
                customer: check.customer.to_string(),
                meter: check.meter.to_string(),
                period: check.period,
                units: local,
            }]);
            return verdict;
        }
    };
    shared
        .fail_open
        .add(check.customer, check.meter, check.period, local);
    match verdict {
        Verdict::Granted { .. } => match check.cap {
            Some(cap) if total > cap => {
                // Taken back: this grant owes no row (journaled first: a crash after the
                // refund must not recover it as charged).
                if let (Some(journal), Some(line)) = (&shared.journal, check.record) {
                    journal.cancelled(line.id());
                }
                let cost = i64::try_from(check.cost).unwrap_or(i64::MAX);
                let used = store
                    .adjust(check.customer, check.meter, check.period, -cost)
                    .await
                    .unwrap_or(total);
                Verdict::OverQuota { used }
            }
            _ => Verdict::Granted { used: total },
        },
        Verdict::OverQuota { .. } => Verdict::OverQuota { used: total },
        v => v,
    }
}

/// Shadow mode: counts and logs the denial that was not enforced; returns its decision (for the
/// access log).
fn waive(ctx: &Ctx, snap: &Snapshot, route: &Route, denial: &Denial) -> Decision {
    let decision = denial.decision();
    if let Some(Some(c)) = ctx
        .route
        .and_then(|i| snap.route_metrics.get(i))
        .map(|m| &m.shadow[decision.index()])
    {
        c.inc();
    }
    tracing::info!(
        target: "tollgate::shadow",
        request_id = %ctx.request_id,
        customer = ctx.customer.as_deref().unwrap_or("-"),
        route = route.name.as_str(),
        decision = decision.as_str(),
        "shadow mode: forwarded a request the plan would deny"
    );
    decision
}
