//! What a customer's counters mean against their plan's quotas: used, included, remaining,
//! overage units and overage money (integer micros), per meter. One view for the operator
//! (`GET /admin/customers/{id}`) and the customer (`GET /_tollgate/usage`), so both see the same
//! numbers.
//!
//! Must not touch: entitlements (the caller picks the plan and the period), HTTP.

use super::{Period, QuotaError, QuotaStore};
use crate::config::Quota;
use serde::Serialize;
use std::collections::BTreeMap;

/// One meter's usage in the current period.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct MeterUsage {
    pub meter: String,
    pub used: u64,
    /// `None` for an unlimited meter (and then `remaining` too).
    pub included: Option<u64>,
    pub remaining: Option<u64>,
    /// Units past `included` (billed when the plan allows overage).
    pub overage_units: u64,
    /// `overage_units × unit_price_micros`, saturating (integer micros, never floats).
    pub overage_amount_micros: u64,
    pub unit_price_micros: u64,
}

// === impl MeterUsage ===

impl MeterUsage {
    pub fn of(meter: &str, quota: &Quota, used: u64) -> MeterUsage {
        let (included, price) = (quota.included(), quota.unit_price_micros());
        let overage_units = included.map_or(0, |i| used.saturating_sub(i));
        MeterUsage {
            meter: meter.to_string(),
            used,
            included,
            remaining: included.map(|i| i.saturating_sub(used)),
            overage_units,
            overage_amount_micros: overage_units.saturating_mul(price),
            unit_price_micros: price,
        }
    }

    /// Nothing left of a limited meter: `used ≥ included`.
    pub fn over(&self) -> bool {
        self.included.is_some_and(|i| self.used >= i)
    }

    /// `used ≥ included × bp / 10000`, in integers: `used × 10000 ≥ included × bp`.
    pub fn near(&self, basis_points: u64) -> bool {
        self.included.is_some_and(|i| {
            u128::from(self.used) * 10_000 >= u128::from(i) * u128::from(basis_points)
        })
    }
}

/// Per-meter usage of `customer` against `quotas` (a plan's) in `period`, read from `store`.
pub async fn usage(
    store: &dyn QuotaStore,
    quotas: &BTreeMap<String, Quota>,
    customer: &str,
    period: Period,
) -> Result<Vec<MeterUsage>, QuotaError> {
    let mut out = Vec::with_capacity(quotas.len());
    for (meter, q) in quotas {
        let used = store.used(customer, meter, period).await?;
        out.push(MeterUsage::of(meter, q, used));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overage is units past `included` times the unit price, in integer micros.
    #[test]
    fn overage_in_micros() {
        let q = Quota::Limited {
            included: 1000,
            overage: true,
            unit_price_micros: 20_000,
        };
        let m = MeterUsage::of("api_calls", &q, 1003);
        assert_eq!(
            (m.remaining, m.overage_units, m.overage_amount_micros),
            (Some(0), 3, 60_000)
        );
        assert!(m.over());
        let m = MeterUsage::of("api_calls", &q, 800);
        assert_eq!((m.remaining, m.overage_units), (Some(200), 0));
        assert!(m.near(8000) && !m.near(8001) && !m.over());
        let m = MeterUsage::of("tokens", &Quota::Unlimited, 5);
        assert_eq!((m.included, m.remaining), (None, None));
        assert!(!m.over() && !m.near(0));
    }
}
