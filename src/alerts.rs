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
//! `GET /admin/alerts` serves the delivery log.
//!
//! Owns: crossing detection, the payload, signing and delivery. Must not touch: the counters.

use crate::config::{AlertSettings, Plan, Quota};
use crate::ledger::{AlertClaim, AlertDelivery, Ledger};
use crate::quota::Period;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

pub const SIGNATURE_HEADER: &str = "tollgate-signature";
pub const ALERT_ID_HEADER: &str = "tollgate-alert-id";

/// Per-attempt timeout of a delivery.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A holder's lease covers its next attempt (its wait and [`TIMEOUT`]) plus this margin.
const LEASE_MARGIN: Duration = Duration::from_secs(60);
/// How often each instance looks for alerts to take over.
const RESUME_EVERY: Duration = Duration::from_secs(60);
/// Alerts claimed longer ago than this are not taken over (news too old to be useful).
const RESUME_WITHIN: chrono::Duration = chrono::Duration::days(7);

/// The lease for a holder whose next attempt starts after `wait`.
fn lease(wait: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(wait + TIMEOUT + LEASE_MARGIN).unwrap_or_default()
}

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

/// The request path's handle: detects crossings and queues them.
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
        let Some(Quota::Limited { included, .. }) = plan.quotas.get(meter) else {
            return;
        };
        let before = used.saturating_sub(cost);
        // The common case, allocation-free: the charge stays below the lowest mark left.
        if u128::from(used) * 100 < u128::from(*included) * u128::from(plan.alerts[0]) {
            return;
        }
        for threshold in crossed(&plan.alerts, *included, before, used) {
            let c = Crossing {
                customer: customer.to_string(),
                meter: meter.to_string(),
                plan: plan.name.clone(),
                period,
                threshold,
                used,
                included: *included,
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
    let client = reqwest::Client::builder().timeout(TIMEOUT).build()?;
    Ok((
        Alerts { tx },
        AlertWorker {
            rx,
            inner: Arc::new(Deliverer {
                settings,
                secret,
                ledger,
                client,
                in_flight: std::sync::Mutex::default(),
            }),
        },
    ))
}

/// Claims crossings in the ledger and delivers the ones it won.
pub struct AlertWorker {
    rx: mpsc::Receiver<Crossing>,
    inner: Arc<Deliverer>,
}

struct Deliverer {
    settings: AlertSettings,
    secret: Vec<u8>,
    ledger: Arc<dyn Ledger>,
    client: reqwest::Client,
    /// Alerts this instance is delivering (released to the others when it stops).
    in_flight: std::sync::Mutex<std::collections::HashSet<i64>>,
}

fn time(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).unwrap_or_default()
}

// === impl AlertWorker ===

impl AlertWorker {
    /// Runs until `stop` is notified: claims and delivers queued crossings, and takes over
    /// abandoned alerts at start and every minute. On stop, alerts still retrying are released
    /// in the ledger so another instance (or the next start) resumes them at once.
    pub async fn run(mut self, stop: Arc<Notify>) {
        let mut resume = tokio::time::interval(RESUME_EVERY);
        resume.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let c = tokio::select! {
                _ = stop.notified() => break,
                _ = resume.tick() => {
                    self.resume().await;
                    continue;
                }
                c = self.rx.recv() => match c { Some(c) => c, None => break },
            };
            let claim = AlertClaim {
                customer: c.customer.clone(),
                meter: c.meter.clone(),
                period_start: time(c.period.start),
                period_end: Some(time(c.period.end)),
                threshold: c.threshold,
                plan: c.plan.clone(),
                used: c.used as i64,
                included: c.included as i64,
            };
            match self
                .inner
                .ledger
                .claim_alert(&claim, lease(Duration::ZERO))
                .await
            {
                Ok(Some(id)) => {
                    tracing::info!(
                        alert_id = id,
                        customer = %c.customer,
                        meter = %c.meter,
                        threshold = c.threshold,
                        used = c.used,
                        included = c.included,
                        "quota threshold crossed; sending alert"
                    );
                    self.inner.clone().start(id, claim, 0);
                }
                Ok(None) => {
                    tracing::debug!(customer = %c.customer, meter = %c.meter, threshold = c.threshold, "alert already sent this period");
                }
                Err(e) => {
                    tracing::warn!(error = %e, customer = %c.customer, threshold = c.threshold, "could not claim threshold alert; not sent");
                }
            }
        }
        let held: Vec<i64> = self
            .inner
            .in_flight
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        if !held.is_empty() {
            match self.inner.ledger.release_alerts(&held).await {
                Ok(()) => {
                    tracing::info!(alerts = ?held, "stopping: undelivered alerts released for resumption")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stopping: could not release alerts; they resume when their lease runs out")
                }
            }
        }
    }

    /// Takes over the alerts whose holder went away and goes on delivering them.
    async fn resume(&self) {
        let now = Utc::now();
        let taken = self
            .inner
            .ledger
            .resume_alerts(
                now,
                now - RESUME_WITHIN,
                lease(Duration::ZERO),
                i64::from(self.inner.settings.max_attempts),
                100,
            )
            .await;
        match taken {
            Ok(alerts) => {
                for AlertDelivery {
                    id,
                    alert,
                    attempts,
                    ..
                } in alerts
                {
                    tracing::info!(alert_id = id, customer = %alert.customer, threshold = alert.threshold, attempts,
                        "resuming an alert another instance (or an earlier run) did not deliver");
                    self.inner.clone().start(id, alert, attempts.max(0) as u32);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for alerts to resume"),
        }
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length; unreachable, but never panic on the delivery path.
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

// === impl Deliverer ===

impl Deliverer {
    fn body(&self, id: i64, c: &AlertClaim) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": id,
            "type": "quota.threshold_crossed",
            "customer": c.customer,
            "plan": c.plan,
            "meter": c.meter,
            "threshold_percent": c.threshold,
            "used": c.used,
            "included": c.included,
            "period_start": c.period_start,
            "period_end": c.period_end,
            "created": Utc::now(),
        }))
        .unwrap_or_default()
    }

    /// Delivers alert `id` in a task of its own, `done` attempts having been made before.
    fn start(self: Arc<Self>, id: i64, c: AlertClaim, done: u32) {
        if let Ok(mut held) = self.in_flight.lock() {
            if !held.insert(id) {
                return; // already delivering it
            }
        }
        tokio::spawn(async move {
            self.deliver(id, &c, done).await;
            if let Ok(mut held) = self.in_flight.lock() {
                held.remove(&id);
            }
        });
    }

    async fn deliver(&self, id: i64, c: &AlertClaim, done: u32) {
        let body = self.body(id, c);
        for attempt in done + 1..=self.settings.max_attempts {
            // The wait after this attempt, before the next.
            let backoff = crate::backoff::wait(
                self.settings.retry_backoff,
                attempt,
                Duration::from_secs(300),
            );
            let t = Utc::now().timestamp();
            let sent = self
                .client
                .post(&self.settings.webhook_url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, signature(&self.secret, t, &body))
                .header(ALERT_ID_HEADER, id.to_string())
                .body(body.clone())
                .send()
                .await;
            let (status, error) = match &sent {
                Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                Ok(r) => (
                    Some(r.status().as_u16()),
                    Some(format!("receiver answered {}", r.status())),
                ),
                Err(e) => (None, Some(e.to_string())),
            };
            let delivered = error.is_none();
            let retry = !delivered && attempt < self.settings.max_attempts;
            if let Err(e) = self
                .ledger
                .record_alert_attempt(
                    id,
                    status,
                    error.as_deref(),
                    delivered,
                    retry.then(|| lease(backoff)),
                )
                .await
            {
                tracing::warn!(error = %e, alert_id = id, "could not record alert attempt");
            }
            if delivered {
                tracing::info!(alert_id = id, attempt, customer = %c.customer, threshold = c.threshold, "alert delivered");
                return;
            }
            tracing::warn!(
                alert_id = id,
                attempt,
                error = error.as_deref().unwrap_or(""),
                "alert delivery failed"
            );
            if retry {
                tokio::time::sleep(backoff).await;
            }
        }
        tracing::error!(alert_id = id, customer = %c.customer, threshold = c.threshold, "alert not delivered; attempts exhausted");
    }
}

/// `GET /admin/alerts?limit=`: the delivery log, newest first (admin listener).
pub fn routes() -> axum::Router<crate::admin::AdminState> {
    axum::Router::new().route("/admin/alerts", axum::routing::get(delivery_log))
}

/// Answer of `GET /admin/alerts`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryLog {
    /// Newest first.
    pub deliveries: Vec<crate::ledger::AlertDelivery>,
}

/// The threshold-alert delivery log, newest first.
#[utoipa::path(
    get,
    path = "/admin/alerts",
    tag = "alerts",
    params(("limit" = Option<i64>, Query, description = "rows, 1-500 (default 50)")),
    responses(
        (status = 200, description = "the newest deliveries", body = DeliveryLog),
        (status = 400, description = "a bad `limit`", body = crate::admin::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = crate::admin::Problem, content_type = "application/problem+json"),
    ),
)]
async fn delivery_log(
    axum::extract::State(s): axum::extract::State<crate::admin::AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 50,
        Some(Ok(l)) if (1..=500).contains(&l) => l,
        Some(_) => {
            return crate::admin::problem(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                "limit must be an integer from 1 to 500",
            )
        }
    };
    match s.ledger.alert_deliveries(limit).await {
        Ok(rows) => axum::Json(DeliveryLog { deliveries: rows }).into_response(),
        Err(e) => crate::admin::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger-unavailable",
            e.to_string(),
        ),
    }
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

    /// The signature is Stripe's scheme: HMAC-SHA256 over "t.body", lower-case hex.
    #[test]
    fn signature_scheme() {
        let s = signature(b"secret", 1_700_000_000, b"{}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"secret").expect("key");
        mac.update(b"1700000000.{}");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("t=1700000000,v1={want}"));
        assert_eq!(want.len(), 64);
    }
}
