//! Checks and reservations for work that is not a proxied request (issue 14): `POST /v1/check`
//! answers allow or deny with the same status policy, feature gate and quota as the proxy, in
//! one store call; with `reserve` the units are held (a voice call holds 10 minutes when it
//! starts) and later committed to what was used (7, or 12), released, or given back when the
//! reservation's TTL passes (the sweep, [`Ingester::expire`]).
//!
//! The reservation is stored after the store granted it (a crash in between holds the units
//! until the period ends: over-counted, never under-billed); committing writes the usage row in
//! the same transaction as the state change, so a commit counts once whatever the retries.

use super::{Ingester, MAX_VALUE};
use crate::entitle::{period_of, resolve, Refusal};
use crate::ledger::{LedgerError, Reservation, Settled};
use crate::quota::{Check, Period, QuotaError, Verdict};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Default and longest reservation TTL, in seconds.
pub const DEFAULT_TTL: u64 = 600;
pub const MAX_TTL: u64 = 86_400;

/// `POST /v1/check`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub customer: String,
    pub meter: String,
    /// Units the work will cost (or, reserving, the units to hold).
    pub units: i64,
    /// Hold the units until committed, released or expired.
    #[serde(default)]
    pub reserve: bool,
    /// Seconds a reservation is held (1-86400, default 600).
    pub ttl: Option<u64>,
    /// A feature the work needs (checked like a route's `feature`).
    pub feature: Option<String>,
}

/// The decision.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CheckAnswer {
    pub allowed: bool,
    /// Why not: `payment-required`, `suspended`, `feature-not-in-plan`, `quota-exceeded` (the
    /// proxy's problem types).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub customer: String,
    pub meter: String,
    pub plan: Option<String>,
    pub units: i64,
    /// The period's units, with this reservation when one was made.
    pub used: Option<u64>,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub resets_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Held>,
}

/// A reservation made by a check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Held {
    #[schema(value_type = String)]
    pub id: uuid::Uuid,
    pub units: i64,
    pub expires_at: DateTime<Utc>,
}

/// A settled reservation.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SettledView {
    #[schema(value_type = String)]
    pub id: uuid::Uuid,
    /// `committed` or `released`.
    pub state: &'static str,
    pub reserved: i64,
    /// The units charged (0 when released).
    pub charged: i64,
    /// The period's units after settling.
    pub used: Option<u64>,
}

/// Why a check or settlement was refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{key}: {detail}")]
    Invalid { key: &'static str, detail: String },
    #[error("no reservation {0}")]
    UnknownReservation(String),
    #[error("reservation {id} is already {state}")]
    Settled { id: uuid::Uuid, state: String },
    #[error("reservation {0} expired; its units were given back")]
    Expired(uuid::Uuid),
    #[error(transparent)]
    Store(#[from] QuotaError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

fn invalid(key: &'static str, detail: impl Into<String>) -> CheckError {
    CheckError::Invalid {
        key,
        detail: detail.into(),
    }
}

fn period(r: &Reservation) -> Period {
    Period {
        start: r.period_start,
        end: r.period_end,
    }
}

/// Gives back expired reservations every second until `cancel` (every instance runs it; each
/// reservation expires once).
pub async fn sweep(ingester: Ingester, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while cancel.run_until_cancelled(tick.tick()).await.is_some() {
        match ingester.expire(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "reservations expired; their units given back"),
            Err(e) => tracing::warn!(error = %e, "expired reservations not swept"),
        }
    }
}

impl Ingester {
    /// `POST /v1/check`.
    pub async fn check(
        &self,
        req: CheckRequest,
        now: DateTime<Utc>,
    ) -> Result<CheckAnswer, CheckError> {
        crate::entitle::check_customer_id(&req.customer).map_err(|m| invalid("customer", m))?;
        let snap = self.config.load_full();
        let config = &snap.config;
        if !config.meters.contains_key(&req.meter) {
            return Err(invalid("meter", format!("unknown meter {:?}", req.meter)));
        }
        if !(0..=MAX_VALUE).contains(&req.units) {
            return Err(invalid("units", format!("must be from 0 to {MAX_VALUE}")));
        }
        let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
        if !(1..=MAX_TTL).contains(&ttl) {
            return Err(invalid(
                "ttl",
                format!("must be from 1 to {MAX_TTL} seconds"),
            ));
        }
        let ent = self.entitlements.get(&req.customer);
        let mut answer = CheckAnswer {
            allowed: false,
            reason: None,
            customer: req.customer.clone(),
            meter: req.meter.clone(),
            plan: None,
            units: req.units,
            used: None,
            limit: None,
            remaining: None,
            resets_at: None,
            reservation: None,
        };
        let plan = match resolve(config, ent.as_deref(), None, now) {
            Ok(p) => p,
            Err(Refusal::Suspended) => {
                answer.reason = Some("suspended");
                return Ok(answer);
            }
            Err(Refusal::PaymentRequired(_)) => {
                answer.reason = Some("payment-required");
                return Ok(answer);
            }
        };
        answer.plan = Some(plan.name.clone());
        if let Some(f) = &req.feature {
            if !plan.features.contains(f) {
                answer.reason = Some("feature-not-in-plan");
                return Ok(answer);
            }
        }
        let quota = plan.quotas.get(&req.meter);
        let cap = quota.and_then(|q| q.cap());
        let included = quota.and_then(|q| q.included());
        let period = period_of(ent.as_deref(), now);
        answer.limit = included;
        answer.resets_at = DateTime::from_timestamp(period.end, 0);
        let units = req.units as u64;
        let used = if req.reserve {
            let check = Check {
                customer: &req.customer,
                meter: &req.meter,
                period,
                cost: units,
                cap,
                rate: None,
                record: None,
                lease: None,
            };
            match self.store.reserve(&check).await? {
                Verdict::Granted { used } => {
                    let r = Reservation {
                        id: uuid::Uuid::now_v7(),
                        customer: req.customer.clone(),
                        meter: req.meter.clone(),
                        period_start: period.start,
                        period_end: period.end,
                        units: req.units,
                        state: "held".into(),
                        expires_at: now + Duration::seconds(ttl as i64),
                        created_at: now,
                        settled_units: None,
                        settled_at: None,
                    };
                    if let Err(e) = self.ledger.hold_reservation(&r).await {
                        // Not held: give the units back before answering.
                        let _ = self
                            .store
                            .adjust(&req.customer, &req.meter, period, -req.units)
                            .await;
                        return Err(e.into());
                    }
                    answer.allowed = true;
                    if let Some(alerts) = &self.alerts {
                        alerts.on_charge(plan, &req.customer, &req.meter, period, units, used);
                    }
                    answer.reservation = Some(Held {
                        id: r.id,
                        units: r.units,
                        expires_at: r.expires_at,
                    });
                    used
                }
                Verdict::OverQuota { used } => {
                    answer.reason = Some("quota-exceeded");
                    used
                }
                Verdict::RateLimited { .. } => {
                    answer.reason = Some("rate-limited");
                    return Ok(answer);
                }
            }
        } else {
            let used = self.store.used(&req.customer, &req.meter, period).await?;
            if cap.is_some_and(|c| used.saturating_add(units) > c) {
                answer.reason = Some("quota-exceeded");
            } else {
                answer.allowed = true;
            }
            used
        };
        answer.used = Some(used);
        answer.remaining = included.map(|i| i.saturating_sub(used));
        Ok(answer)
    }

    /// Commits reservation `id` to `units` (more or less than held): its usage row, then the
    /// counter moved by the difference.
    pub async fn commit(
        &self,
        id: &str,
        units: i64,
        now: DateTime<Utc>,
    ) -> Result<SettledView, CheckError> {
        if !(0..=MAX_VALUE).contains(&units) {
            return Err(invalid("units", format!("must be from 0 to {MAX_VALUE}")));
        }
        let uuid = self.reservation_id(id)?;
        let r = self
            .settled(id, self.ledger.commit_reservation(uuid, units, now).await?)
            .await?;
        let used = self
            .store
            .adjust(&r.customer, &r.meter, period(&r), units - r.units)
            .await
            .ok();
        if let (Some(alerts), Some(used), true) = (&self.alerts, used, units > r.units) {
            let snap = self.config.load_full();
            let ent = self.entitlements.get(&r.customer);
            if let Some(plan) = crate::entitle::plan_of(&snap.config, ent.as_deref()) {
                let more = (units - r.units) as u64;
                alerts.on_charge(plan, &r.customer, &r.meter, period(&r), more, used);
            }
        }
        Ok(SettledView {
            id: r.id,
            state: "committed",
            reserved: r.units,
            charged: units,
            used,
        })
    }

    /// Releases reservation `id`: its units go back to the counter.
    pub async fn release(&self, id: &str, now: DateTime<Utc>) -> Result<SettledView, CheckError> {
        let uuid = self.reservation_id(id)?;
        let r = self
            .settled(id, self.ledger.release_reservation(uuid, now).await?)
            .await?;
        let used = self
            .store
            .adjust(&r.customer, &r.meter, period(&r), -r.units)
            .await
            .ok();
        Ok(SettledView {
            id: r.id,
            state: "released",
            reserved: r.units,
            charged: 0,
            used,
        })
    }

    /// Gives back the units of reservations past their TTL (each once, across instances); how
    /// many it expired.
    pub async fn expire(&self, now: DateTime<Utc>) -> Result<usize, LedgerError> {
        let expired = self.ledger.expire_reservations(now, 500).await?;
        for r in &expired {
            if let Err(e) = self
                .store
                .adjust(&r.customer, &r.meter, period(r), -r.units)
                .await
            {
                tracing::warn!(error = %e, reservation = %r.id, "expired reservation's units not given back");
            }
        }
        Ok(expired.len())
    }

    fn reservation_id(&self, id: &str) -> Result<uuid::Uuid, CheckError> {
        uuid::Uuid::parse_str(id).map_err(|_| CheckError::UnknownReservation(id.to_string()))
    }

    /// The reservation a settlement did, or why it did none (an expiry it made gives the
    /// units back first).
    async fn settled(&self, id: &str, s: Settled) -> Result<Reservation, CheckError> {
        match s {
            Settled::Done(r) => Ok(r),
            Settled::Unknown => Err(CheckError::UnknownReservation(id.to_string())),
            Settled::AlreadySettled(r) => Err(CheckError::Settled {
                id: r.id,
                state: r.state,
            }),
            Settled::Expired(r, gave_back) => {
                if gave_back {
                    let _ = self
                        .store
                        .adjust(&r.customer, &r.meter, period(&r), -r.units)
                        .await;
                }
                Err(CheckError::Expired(r.id))
            }
        }
    }
}
