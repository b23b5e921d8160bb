//! Delivering threshold alerts: claims each crossing in the ledger (one claimer per alert across
//! every instance), signs the payload (Stripe's scheme, our header) and sends it with retries
//! and backoff, recording every attempt; takes over alerts other instances left undelivered and
//! releases its own on a clean stop.
//!
//! Runs on the control runtime. Must not touch: the counters, the request path, HTTP handlers.

use super::Crossing;
use crate::config::AlertSettings;
use crate::ledger::{AlertClaim, AlertDelivery, Ledger};
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// Claims crossings in the ledger and delivers the ones it won.
pub struct AlertWorker {
    rx: mpsc::Receiver<Crossing>,
    inner: Arc<Deliverer>,
}

struct Deliverer {
    settings: AlertSettings,
    /// The signing secret, wiped on drop.
    secret: SecretSlice<u8>,
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
    pub(super) fn new(
        rx: mpsc::Receiver<Crossing>,
        settings: AlertSettings,
        secret: Vec<u8>,
        ledger: Arc<dyn Ledger>,
    ) -> Result<AlertWorker, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(TIMEOUT).build()?;
        Ok(AlertWorker {
            rx,
            inner: Arc::new(Deliverer {
                settings,
                secret: secret.into(),
                ledger,
                client,
                in_flight: std::sync::Mutex::default(),
            }),
        })
    }

    /// Runs until `cancel`: claims and delivers queued crossings, and takes over
    /// abandoned alerts at start and every minute. On stop, alerts still retrying are released
    /// in the ledger so another instance (or the next start) resumes them at once.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut resume = tokio::time::interval(RESUME_EVERY);
        resume.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let c = tokio::select! {
                _ = cancel.cancelled() => break,
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
                    let ids: Vec<String> = held.iter().map(i64::to_string).collect();
                    tracing::info!(alerts = held.len(), ids = %ids.join(","), "stopping: undelivered alerts released for resumption")
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
                .header(
                    SIGNATURE_HEADER,
                    signature(self.secret.expose_secret(), t, &body),
                )
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

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};

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
