//! Entitlements: who a customer is to tollgate (plan, subscription status, billing period,
//! suspension) and the policy that turns that into "may call" or a denial.
//!
//! Owns: the entitlement type, the status policy ([`resolve`]), the plan a customer's counters
//! are measured against ([`plan_of`]), the billing period a customer is in ([`period_of`]), and
//! the in-process cache the request path reads ([`Entitlements`]; loaded at start, written by
//! `control::entitlement_sync`). A customer not in the cache is on the default plan. And the one
//! rule a customer id follows, wherever it comes from ([`check_customer_id`]).
//! Must not touch: the ledger, Redis, HTTP (the request path never awaits anything here).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest customer id, in bytes.
pub const MAX_CUSTOMER_ID_BYTES: usize = 256;

/// The one rule for a customer id, from a token, the admin API or Stripe metadata: 1 to
/// [`MAX_CUSTOMER_ID_BYTES`] bytes, no control characters (so no id can forge a log line or
/// break a key), and no whitespace at either end (`" acme"` would otherwise be a second
/// customer with its own free quota). `Err` says what is wrong.
pub fn check_customer_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        Err("a customer id must not be empty")
    } else if id.len() > MAX_CUSTOMER_ID_BYTES {
        Err("a customer id must be at most 256 bytes")
    } else if id.chars().any(char::is_control) {
        Err("a customer id must not contain control characters")
    } else if id.trim() != id {
        Err("a customer id must not start or end with whitespace")
    } else {
        Ok(())
    }
}

/// Stripe's subscription statuses, plus `none` for a customer with no subscription record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Active,
    Trialing,
    PastDue,
    Canceled,
    Unpaid,
    Incomplete,
    IncompleteExpired,
    Paused,
}

impl Status {
    /// The wire/ledger spelling (Stripe's).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Trialing => "trialing",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Unpaid => "unpaid",
            Status::Incomplete => "incomplete",
            Status::IncompleteExpired => "incomplete_expired",
            Status::Paused => "paused",
        }
    }

    /// Parses Stripe's spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "active" => Status::Active,
            "trialing" => Status::Trialing,
            "past_due" => Status::PastDue,
            "canceled" => Status::Canceled,
            "unpaid" => Status::Unpaid,
            "incomplete" => Status::Incomplete,
            "incomplete_expired" => Status::IncompleteExpired,
            "paused" => Status::Paused,
            _ => return None,
        })
    }
}

/// What the ledger knows of one customer. Stored in `customers`, cached in process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entitlement {
    /// Plan name from the config; `None` means "the default plan".
    pub plan: Option<String>,
    pub status: Status,
    /// When `status` last changed (past-due grace counts from here).
    pub status_since: Option<DateTime<Utc>>,
    /// Billing period; when absent (or over) quotas use the calendar month (UTC).
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    /// Operator suspension: denies with 403 `suspended` whatever the plan.
    pub suspended: bool,
    /// Last write (ordering guard for later Stripe sync).
    pub updated_at: DateTime<Utc>,
    /// The subscription ends at `period_end` (Stripe's `cancel_at_period_end`). Served as usual
    /// until then: Stripe sends `customer.subscription.deleted` when it ends.
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// End of the trial (Stripe's `trial_end`), past or future; `None` when there was none.
    /// Informational like the above: the status decides, and Stripe moves it at the trial's end.
    #[serde(default)]
    pub trial_end: Option<DateTime<Utc>>,
}

use crate::config::{Config, Plan};
use crate::quota::Period;

mod cache;
pub use cache::Entitlements;

/// Why a customer may not call at all (before features, rates and quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Subscription not in good standing (status named), or no plan and no default plan.
    PaymentRequired(&'static str),
    Suspended,
}

/// Decides the plan a request is served under (DESIGN §2.3):
/// unknown customer → default plan; suspended → refused; `active`/`trialing` → their plan;
/// `past_due` → their plan while within the plan's `past_due_grace` from `status_since`;
/// any other status → refused (402). A plan name the config does not know falls back to the
/// default plan. `token_plan` (only when the operator enabled a plan claim) overrides the plan.
pub fn resolve<'c>(
    config: &'c Config,
    ent: Option<&Entitlement>,
    token_plan: Option<&str>,
    now: DateTime<Utc>,
) -> Result<&'c Plan, Refusal> {
    let by_name = |name: Option<&str>| {
        name.and_then(|n| config.plans.get(n))
            .or_else(|| config.default_plan())
    };
    let Some(e) = ent else {
        return by_name(token_plan).ok_or(Refusal::PaymentRequired("without a plan"));
    };
    if e.suspended {
        return Err(Refusal::Suspended);
    }
    let plan = by_name(token_plan.or(e.plan.as_deref()))
        .ok_or(Refusal::PaymentRequired("without a plan"))?;
    match e.status {
        Status::Active | Status::Trialing => Ok(plan),
        Status::PastDue => {
            let since = e.status_since.unwrap_or(e.updated_at);
            let grace =
                chrono::Duration::from_std(plan.past_due_grace).unwrap_or(chrono::Duration::zero());
            if now < since + grace {
                Ok(plan)
            } else {
                Err(Refusal::PaymentRequired("past_due"))
            }
        }
        other => Err(Refusal::PaymentRequired(other.as_str())),
    }
}

/// The plan whose quotas apply to a customer's counters: their stored plan, else the default
/// plan. Unlike [`resolve`] it ignores status and suspension (a suspended customer's usage is
/// still worth reading).
pub fn plan_of<'c>(config: &'c Config, ent: Option<&Entitlement>) -> Option<&'c Plan> {
    ent.and_then(|e| e.plan.as_deref())
        .and_then(|p| config.plans.get(p))
        .or_else(|| config.default_plan())
}

/// The quota period a customer is in at `now`: their subscription's billing period while `now`
/// falls inside it, else the calendar month (UTC). The one place this choice is made: the
/// request path, the admin API and self-service all count in the same period.
pub fn period_of(ent: Option<&Entitlement>, now: DateTime<Utc>) -> Period {
    Period::current(
        ent.and_then(|e| e.period_start),
        ent.and_then(|e| e.period_end),
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn config() -> Config {
        Config::from_toml(
            r#"
            [auth]
            algorithms = ["HS256"]
            secret_env = "X"
            [meters.api_calls]
            [plans.free]
            default = true
            quotas.api_calls = { included = 10 }
            [plans.pro]
            past_due_grace = "3d"
            quotas.api_calls = { included = 100 }
            "#,
        )
        .expect("valid config")
    }

    fn ent(plan: &str, status: Status, since_days_ago: i64, now: DateTime<Utc>) -> Entitlement {
        Entitlement {
            plan: Some(plan.into()),
            status,
            status_since: Some(now - chrono::Duration::days(since_days_ago)),
            period_start: None,
            period_end: None,
            suspended: false,
            updated_at: now,
            cancel_at_period_end: false,
            trial_end: None,
        }
    }

    /// The status policy table: good standing, grace, refusal, suspension, unknown customers.
    #[test]
    fn status_policy() {
        let c = config();
        let now = Utc
            .with_ymd_and_hms(2026, 11, 22, 0, 0, 0)
            .single()
            .expect("date");
        assert_eq!(
            resolve(&c, None, None, now).map(|p| p.name.as_str()),
            Ok("free")
        );
        for s in [Status::Active, Status::Trialing] {
            assert_eq!(
                resolve(&c, Some(&ent("pro", s, 0, now)), None, now).map(|p| p.name.as_str()),
                Ok("pro")
            );
        }
        assert_eq!(
            resolve(&c, Some(&ent("pro", Status::PastDue, 2, now)), None, now)
                .map(|p| p.name.as_str()),
            Ok("pro")
        );
        assert_eq!(
            resolve(&c, Some(&ent("pro", Status::PastDue, 4, now)), None, now).err(),
            Some(Refusal::PaymentRequired("past_due"))
        );
        for s in [Status::Canceled, Status::Unpaid, Status::IncompleteExpired] {
            assert_eq!(
                resolve(&c, Some(&ent("pro", s, 0, now)), None, now).err(),
                Some(Refusal::PaymentRequired(s.as_str()))
            );
        }
        let mut suspended = ent("pro", Status::Active, 0, now);
        suspended.suspended = true;
        assert_eq!(
            resolve(&c, Some(&suspended), None, now).err(),
            Some(Refusal::Suspended)
        );
        // A plan name the config lost falls back to the default.
        assert_eq!(
            resolve(&c, Some(&ent("gone", Status::Active, 0, now)), None, now)
                .map(|p| p.name.as_str()),
            Ok("free")
        );
    }

    /// An older write never replaces a newer cached entitlement.
    #[test]
    fn cache_keeps_newest() {
        let now = Utc
            .with_ymd_and_hms(2026, 11, 22, 0, 0, 0)
            .single()
            .expect("date");
        let cache = Entitlements::default();
        cache.put("a", ent("pro", Status::Active, 0, now));
        let mut old = ent("free", Status::Canceled, 0, now);
        old.updated_at = now - chrono::Duration::seconds(5);
        cache.put("a", old);
        assert_eq!(
            cache.get("a").and_then(|e| e.plan.clone()).as_deref(),
            Some("pro")
        );
    }
}
