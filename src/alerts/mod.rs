//! Threshold alerts (issue 4): when a charge takes a customer's meter across one of its plan's
//! `alerts` percentages of `included`, one signed webhook goes to `[alerts] webhook_url`.
//!
//! Flow: the proxy calls [`Alerts::on_charge`] after a granted reservation. It is integer
//! arithmetic on numbers the reservation already returned, and only a crossing allocates and
//! `try_send`s into a bounded channel: the request path never waits. The [`AlertWorker`] (control
//! runtime) claims each crossing in the ledger's `alert_deliveries` (unique per customer, meter,
//! period and threshold, so across every instance, and even after a credit lets the counter
//! cross again, an alert is sent at most once per period), logs it, and delivers it in a task of
//! its own with retries and exponential backoff, recording every attempt in the same row.
//!
//! Signature (Stripe's scheme, our header): `Tollgate-Signature: t=<unix seconds>,v1=<hex
//! HMAC-SHA256(secret, "<t>.<raw body>")>`. Receivers recompute it over the exact body bytes,
//! compare in constant time and refuse a `t` too far from their clock (we suggest 300 s).
//! `Tollgate-Alert-Id` is the delivery-log id: the same on every retry of one alert, so a
//! receiver that got an attempt whose answer was lost can drop the repeat.
//!
//! Restarts lose nothing: the instance delivering an alert holds it in the ledger until a lease
//! runs out (renewed at each attempt to cover the wait for the next, released on a clean stop).
//! At start and every minute each instance takes over undelivered alerts whose lease ran out or
//! was released (claimed in the last 7 days, attempts left) and goes on with their retries, same
//! alert id. A receiver may see an alert twice only if an instance lost its ledger while
//! delivering: `Tollgate-Alert-Id` tells the repeat.
//!
//! Layout: here the crossing detection and the request path's handle; [`worker`] the claim,
//! signing and delivery. `GET /admin/alerts` (the delivery log) is the admin listener's.
//!
//! Owns: crossing detection, the payload, signing and delivery. Must not touch: the counters,
//! HTTP handlers.

use crate::config::{AlertSettings, Plan, Quota};
use crate::ledger::Ledger;
use crate::quota::Period;
use std::sync::Arc;
use tokio::sync::mpsc;

mod worker;
pub use worker::AlertWorker;

/// Crossings waiting for the worker. A crossing is rare (a few per customer and period), so a
/// full queue means the ledger is stuck: the crossing is dropped with a warning.
const QUEUE: usize = 1024;

/// One threshold crossed by one charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub customer: String,
    pub meter: String,
    pub plan: String,
    pub period: Period,
    pub threshold: u32,
    pub used: u64,
    pub included: u64,
}

/// The request path's handle (and the usage API's): detects crossings and queues them.
#[derive(Clone)]
pub struct Alerts {
    tx: mpsc::Sender<Crossing>,
}

/// The thresholds (percent of `included`) that a charge moving the counter from `before` to
/// `after` crosses: `before < included × t / 100 ≤ after`, in integers.
pub fn crossed(thresholds: &[u32], included: u64, before: u64, after: u64) -> Vec<u32> {
    let (b, a, i) = (
        u128::from(before) * 100,
        u128::from(after) * 100,
        u128::from(included),
    );
    thresholds
        .iter()
        .copied()
        .filter(|&t| {
            let mark = i * u128::from(t);
            b < mark && mark <= a
        })
        .collect()
}

// === impl Alerts ===

impl Alerts {
    /// Called after a granted reservation of `cost` units that brought `meter` to `used`.
    pub fn on_charge(
        &self,
        plan: &Plan,
        customer: &str,
        meter: &str,
        period: Period,
        cost: u64,
        used: u64,
    ) {
        if plan.alerts.is_empty() {
            return;
        }
        let Some(included) = plan.quotas.get(meter).and_then(Quota::included) else {
            return;
        };
        let before = used.saturating_sub(cost);
        // The common case, allocation-free: the charge stays below the lowest mark left.
        if u128::from(used) * 100 < u128::from(included) * u128::from(plan.alerts[0]) {
            return;
        }
        for threshold in crossed(&plan.alerts, included, before, used) {
            let c = Crossing {
                customer: customer.to_string(),
                meter: meter.to_string(),
                plan: plan.name.clone(),
                period,
                threshold,
                used,
                included,
            };
            if self.tx.try_send(c).is_err() {
                tracing::warn!(
                    customer,
                    meter,
                    threshold,
                    "alert queue full: threshold alert dropped"
                );
            }
        }
    }
}

/// Builds the request path's handle and the worker that delivers what it queues.
pub fn pipeline(
    settings: AlertSettings,
    secret: Vec<u8>,
    ledger: Arc<dyn Ledger>,
) -> Result<(Alerts, AlertWorker), reqwest::Error> {
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok((
        Alerts { tx },
        AlertWorker::new(rx, settings, secret, ledger)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A charge crosses every mark between its before and after counts, each exactly once.
    #[test]
    fn crossings() {
        assert_eq!(crossed(&[80, 100], 10, 7, 8), vec![80]);
        assert_eq!(crossed(&[80, 100], 10, 8, 9), Vec::<u32>::new());
        assert_eq!(crossed(&[80, 100], 10, 7, 10), vec![80, 100]);
        assert_eq!(crossed(&[80, 100], 10, 10, 15), Vec::<u32>::new());
        // 80 % of 3 is 2.4 units: crossed by the third unit.
        assert_eq!(crossed(&[80], 3, 2, 3), vec![80]);
        assert_eq!(crossed(&[80], 3, 1, 2), Vec::<u32>::new());
        assert_eq!(crossed(&[150], 10, 14, 15), vec![150]);
        assert_eq!(crossed(&[80], 0, 0, 5), Vec::<u32>::new());
    }
}
