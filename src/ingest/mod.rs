//! Usage that does not arrive as a request (issue 14): events an app reports itself (SMS sent,
//! minutes of a call, jobs run), in CloudEvents 1.0 JSON, through `POST /v1/events` on the admin
//! listener. Each event counts once by (`source`, `id`), toward the same counters and ledger as
//! proxied calls: `/admin/customers/{id}`, `/admin/usage`, the billing summary and the Stripe
//! reporter see it like any other usage.
//!
//! An event is checked field by field (each refusal has its own `code`; the valid events of a
//! batch are applied all the same), then recorded in the ledger with its usage row in one
//! transaction (a retry or a concurrent duplicate is answered `duplicate` and counts nothing),
//! then added to the customer's counter for the period its `time` falls in. An event past a
//! `deny` plan's limit is recorded all the same (it happened) as `over_limit`, and the counter
//! then denies the next proxied call. A crash between the commit and the counter leaves the
//! counter short by that event until `repair-counters` (embedded mode rebuilds its counters
//! from the ledger at start). The counter is read (seeded if absent) before the row is written,
//! so a seed from the ledger never holds an event whose units are added after it.
//!
//! Threshold alerts follow these charges as they follow proxied ones.
//!
//! Owns: the event format, its validation and outcome codes, the order ledger → counter. Must
//! not touch: HTTP (`admin::ingest`), the request path.

pub mod check;

use crate::entitle::{period_of, plan_of, Entitlements};
use crate::ledger::{IngestRecord, Ledger, UsageEvent};
use crate::proxy::state::SnapshotCell;
use crate::quota::QuotaStore;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;

/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;

/// The route label of ingested usage in the ledger and usage reports.
pub const ROUTE: &str = "_tollgate/events";

/// Ceiling on one event's `data.value` (the same as a route's default `max_cost`).
pub const MAX_VALUE: i64 = 1_000_000_000;

/// Longest `source` or `id`.
const MAX_ID: usize = 255;

/// How old an event may be (Stripe takes meter events up to 35 days old) and how far ahead of
/// this instance's clock.
fn max_age() -> Duration {
    Duration::days(35)
}
fn max_ahead() -> Duration {
    Duration::minutes(5)
}

/// What became of one event of a batch.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventOutcome {
    /// Its position in the batch.
    pub index: usize,
    pub id: Option<String>,
    /// `accepted`, `over_limit` (recorded, past a deny limit), `duplicate` (counted before),
    /// `rejected` (see `code`) or `error` (not recorded: retry it).
    pub outcome: &'static str,
    /// Why it was rejected: `invalid-event`, `invalid-specversion`, `invalid-id`,
    /// `invalid-source`, `unknown-meter`, `invalid-customer`, `invalid-time`, `too-old`,
    /// `in-the-future`, `invalid-value`, `negative-value`, `value-too-large`; or
    /// `duplicate-in-batch`, `ledger-unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The customer's counter for the meter and period after this event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
}

/// A batch's outcomes and their counts.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct BatchOutcome {
    pub accepted: usize,
    pub over_limit: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub errors: usize,
    pub events: Vec<EventOutcome>,
}

/// A valid event, ready to record.
struct Valid {
    source: String,
    id: String,
    meter: String,
    customer: String,
    time: DateTime<Utc>,
    value: i64,
    dimensions: Option<String>,
}

/// Applies batches of events.
pub struct Ingester {
    pub ledger: Arc<dyn Ledger>,
    pub store: Arc<dyn QuotaStore>,
    pub config: SnapshotCell,
    pub entitlements: Arc<Entitlements>,
    /// Threshold alerts, as for proxied charges (`None` without `[alerts]`).
    pub alerts: Option<crate::alerts::Alerts>,
}

impl Ingester {
    /// Checks and applies each event of `batch` in order.
    pub async fn ingest(&self, batch: &[Value], now: DateTime<Utc>) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for (index, event) in batch.iter().enumerate() {
            let id = event.get("id").and_then(|v| v.as_str()).map(String::from);
            let mut o = EventOutcome {
                index,
                id,
                outcome: "rejected",
                code: None,
                detail: None,
                used: None,
            };
            match self.validate(event, now) {
                Err((code, detail)) => {
                    o.code = Some(code);
                    o.detail = Some(detail);
                }
                Ok(v) if !seen.insert((v.source.clone(), v.id.clone())) => {
                    o.outcome = "duplicate";
                    o.code = Some("duplicate-in-batch");
                    o.detail = Some("an earlier event of this batch has this source and id".into());
                }
                Ok(v) => self.apply(v, now, &mut o).await,
            }
            match o.outcome {
                "accepted" => out.accepted += 1,
                "over_limit" => out.over_limit += 1,
                "duplicate" => out.duplicates += 1,
                "error" => out.errors += 1,
                _ => out.rejected += 1,
            }
            out.events.push(o);
        }
        out
    }

    /// The event's fields, or the first thing wrong with it.
    fn validate(&self, e: &Value, now: DateTime<Utc>) -> Result<Valid, (&'static str, String)> {
        let obj = e
            .as_object()
            .ok_or(("invalid-event", "an event is a JSON object".to_string()))?;
        let text = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::trim);
        if let Some(v) = obj.get("specversion") {
            if v.as_str() != Some("1.0") {
                return Err((
                    "invalid-specversion",
                    format!("specversion must be \"1.0\", got {v}"),
                ));
            }
        }
        let ident = |k: &str, code: &'static str| {
            text(k)
                .filter(|v| !v.is_empty() && v.len() <= MAX_ID && !v.chars().any(char::is_control))
                .map(String::from)
                .ok_or((
                    code,
                    format!("{k} must be a string of 1-{MAX_ID} printable characters"),
                ))
        };
        let id = ident("id", "invalid-id")?;
        let source = ident("source", "invalid-source")?;
        let meter = text("type").unwrap_or_default().to_string();
        let snap = self.config.load();
        if !snap.config.meters.contains_key(&meter) {
            return Err((
                "unknown-meter",
                format!("type must name a meter, got {meter:?}"),
            ));
        }
        let customer = text("subject").unwrap_or_default().to_string();
        crate::entitle::check_customer_id(&customer)
            .map_err(|m| ("invalid-customer", format!("subject (the customer): {m}")))?;
        let time = match obj.get("time") {
            None => now,
            Some(t) => t
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .ok_or((
                    "invalid-time",
                    format!("time must be an RFC 3339 time, got {t}"),
                ))?,
        };
        if time < now - max_age() {
            return Err(("too-old", format!("time {time} is more than 35 days ago")));
        }
        if time > now + max_ahead() {
            return Err((
                "in-the-future",
                format!("time {time} is more than 5 minutes ahead"),
            ));
        }
        let data = obj.get("data").and_then(|d| d.as_object());
        let raw = data.and_then(|d| d.get("value"));
        let value = match raw {
            None => return Err(("invalid-value", "data.value is missing".into())),
            Some(v) if v.is_i64() => v.as_i64().unwrap_or_default(),
            Some(v) if v.is_u64() => {
                return Err((
                    "value-too-large",
                    format!("data.value {v} is above {MAX_VALUE}"),
                ))
            }
            Some(v) => {
                return Err((
                    "invalid-value",
                    format!("data.value must be an integer, got {v}"),
                ))
            }
        };
        if value < 0 {
            return Err((
                "negative-value",
                format!("data.value must not be negative on a sum meter, got {value}"),
            ));
        }
        if value > MAX_VALUE {
            return Err((
                "value-too-large",
                format!("data.value {value} is above {MAX_VALUE}"),
            ));
        }
        let dimensions = data
            .map(|d| {
                d.iter()
                    .filter(|(k, _)| k.as_str() != "value")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<serde_json::Map<_, _>>()
            })
            .filter(|d| !d.is_empty())
            .map(|d| Value::Object(d).to_string());
        Ok(Valid {
            source,
            id,
            meter,
            customer,
            time,
            value,
            dimensions,
        })
    }

    /// Records a valid event, then counts it.
    async fn apply(&self, v: Valid, now: DateTime<Utc>, o: &mut EventOutcome) {
        let ent = self.entitlements.get(&v.customer);
        let snap = self.config.load_full();
        let record = IngestRecord {
            usage: UsageEvent {
                id: uuid::Uuid::now_v7(),
                ts: v.time,
                customer: v.customer.clone(),
                meter: v.meter.clone(),
                units: v.value,
                route: ROUTE.into(),
                status: 200,
                latency_us: 0,
                request_id: v.id.clone(),
            },
            source: v.source,
            id: v.id,
            dimensions: v.dimensions,
            received_at: now,
        };
        // The counter is made present (seeded from the ledger if absent) before this event's
        // row is written, so a seed never holds a row whose units are added afterwards: the
        // order ledger → counter then counts each event once.
        let period = period_of(ent.as_deref(), v.time);
        if let Err(e) = self.store.used(&v.customer, &v.meter, period).await {
            tracing::debug!(error = %e, "counter not read before an ingested event");
        }
        match self.ledger.ingest_event(&record).await {
            Ok(true) => {}
            Ok(false) => {
                o.outcome = "duplicate";
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, event = %record.id, "event not recorded: ledger unavailable");
                o.outcome = "error";
                o.code = Some("ledger-unavailable");
                o.detail = Some("not recorded; send it again".into());
                return;
            }
        }
        let counted = match self
            .store
            .adjust(&v.customer, &v.meter, period, v.value)
            .await
        {
            // 0: the counter went away since it was read (a Redis restart) and is left for the
            // seed, which reads the ledger (this event included): read it now.
            Ok(0) if v.value > 0 => self.store.used(&v.customer, &v.meter, period).await,
            r => r,
        };
        let used = match counted {
            Ok(u) => u,
            Err(e) => {
                // Recorded in the ledger: the counter catches up at repair (or restart).
                tracing::warn!(error = %e, customer = %v.customer, meter = %v.meter,
                    "ingested event recorded; its counter could not be updated");
                o.outcome = "accepted";
                return;
            }
        };
        o.used = Some(used);
        let plan = plan_of(&snap.config, ent.as_deref());
        if let (Some(alerts), Some(plan)) = (&self.alerts, plan) {
            alerts.on_charge(plan, &v.customer, &v.meter, period, v.value as u64, used);
        }
        let cap = plan
            .and_then(|p| p.quotas.get(&v.meter))
            .and_then(|q| q.cap());
        o.outcome = if cap.is_some_and(|c| used > c) {
            "over_limit"
        } else {
            "accepted"
        };
    }
}
