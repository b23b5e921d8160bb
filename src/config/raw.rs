//! The TOML file format, exactly as operators write it. Nothing here is trusted: every value is
//! checked and turned into the model in `config::validate`. Numbers that must not be negative are
//! read as `i64` so that `cost = -1` is reported as a rule, with its key, not as a parse error.
//!
//! Unknown keys are not rejected here (`deny_unknown_fields` would stop at the first one): the
//! loader collects every ignored key path with `serde_ignored` and reports them all.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawConfig {
    pub proxy: RawProxy,
    pub admin: RawAdmin,
    pub storage: RawStorage,
    pub auth: RawAuth,
    pub upstreams: BTreeMap<String, RawUpstream>,
    pub meters: BTreeMap<String, RawMeter>,
    pub routes: Vec<RawRoute>,
    pub plans: BTreeMap<String, RawPlan>,
    /// Absent: everything Stripe is off.
    pub stripe: Option<RawStripe>,
    /// Threshold alert webhook (restart-only); absent: no alerts are sent.
    pub alerts: Option<RawAlerts>,
}

/// `[alerts]`: where threshold alerts go and how they are signed (the secret's env var name).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawAlerts {
    pub webhook_url: Option<String>,
    pub secret_env: Option<String>,
    pub max_attempts: Option<i64>,
    /// Delay before the first retry, doubled for each next one.
    pub retry_backoff_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawProxy {
    pub listen: Option<String>,
    /// TLS on the proxy listener: `{ cert_file, key_file }`.
    pub tls: Option<RawListenerTls>,
    /// Addresses or CIDR blocks whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<String>,
    /// `deny` (404 `no-route`, the default) or `forward` (to `unmatched_upstream`, unmetered).
    pub unmatched: Option<String>,
    pub unmatched_upstream: Option<String>,
    pub strip_authorization: Option<bool>,
    pub max_request_header_bytes: Option<i64>,
    pub max_connections_per_ip: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub drain_delay: Option<String>,
    pub shutdown_grace: Option<String>,
    pub threads: Option<i64>,
    /// `all` (default), `errors` (only answers that are not 2xx/3xx) or `off`.
    pub access_log: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_env: Option<String>,
    pub metrics_token_env: Option<String>,
    /// Env var holding a token that opens `POST /v1/events` (and nothing else).
    pub ingest_token_env: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawStorage {
    pub redis_url: Option<String>,
    /// `redis_url` is a comma-separated list of Redis Cluster seed nodes.
    pub redis_cluster: Option<bool>,
    pub redis_prefix: Option<String>,
    pub redis_timeout_ms: Option<i64>,
    pub database_url: Option<String>,
    pub database_schema: Option<String>,
    pub usage_queue: Option<i64>,
    /// Longest time a usage event waits before it is written to the ledger.
    pub usage_flush_ms: Option<i64>,
    pub spool_dir: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawAuth {
    pub algorithms: Vec<String>,
    pub secret_env: Option<String>,
    pub public_key_files: Vec<String>,
    pub jwks_url: Option<String>,
    /// PEM CA certificates trusted for the JWKS fetch besides the public roots (private CAs).
    pub jwks_ca_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<OneOrMany>,
    pub leeway_seconds: Option<i64>,
    pub customer_claim: Option<String>,
    pub plan_claim: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawStripe {
    /// Env var holding the webhook signing secrets (`whsec_…`, comma-separated for rotation).
    pub webhook_secrets_env: Option<String>,
    /// Env var holding the Stripe API secret key.
    pub secret_key_env: Option<String>,
    pub api_base: Option<String>,
    /// A listener of its own for `POST /webhooks/stripe` (ip:port).
    pub webhook_listen: Option<String>,
    /// Subscription metadata key naming the tollgate customer.
    pub customer_metadata_key: Option<String>,
    /// Stripe price id → plan name.
    pub prices: BTreeMap<String, String>,
    /// How often usage is sent to Stripe (a duration: `60s`).
    pub report_interval: Option<String>,
    /// Usage of one customer and meter within this window is one meter event.
    pub report_window: Option<String>,
    /// Usage younger than this waits (rows still arriving from other instances' flushers).
    pub report_delay: Option<String>,
    /// How often the reconciler lists subscriptions from Stripe; `0s`: only at start and on demand.
    pub sync_interval: Option<String>,
    /// Hosts a self-service checkout or portal may send the caller back to
    /// (`success_url`, `cancel_url`, `return_url`); anything else is refused (no open redirect).
    pub redirect_hosts: Vec<String>,
    /// Stripe's `proration_behavior` on a self-service plan change: `create_prorations`
    /// (default), `always_invoice` or `none`.
    pub proration_behavior: Option<String>,
    /// `DELETE /_tollgate/subscription?now=true` ends the subscription at once (default: only at
    /// the period's end).
    pub allow_cancel_now: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawUpstream {
    pub targets: Vec<String>,
    /// Seconds between TCP health checks; 0 or absent disables them.
    pub health_check_seconds: Option<i64>,
    /// `Host` header to send upstream; absent keeps the caller's.
    pub host: Option<String>,
    /// HTTPS to the targets.
    pub tls: Option<bool>,
    /// Server name for SNI and certificate verification (default: `host`, else the target's).
    pub sni: Option<String>,
    /// PEM file of CAs trusted besides the system's roots.
    pub ca_file: Option<String>,
    /// PEM client certificate chain and key, for upstreams that require one.
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawListenerTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawMeter {
    pub description: Option<String>,
    /// Stripe Billing meter `event_name` usage of this meter is reported under.
    pub stripe_event_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<String>,
    pub upstream: Option<String>,
    pub meter: Option<String>,
    pub cost: Option<i64>,
    /// Ceiling on what one call may cost, from config or from the upstream's exact cost.
    pub max_cost: Option<i64>,
    pub feature: Option<String>,
    pub cost_from_response_header: Option<String>,
    pub charge: Option<String>,
    pub case_sensitive: Option<bool>,
    pub trailing_slash: Option<String>,
    pub upgrade: Option<String>,
    pub auth: Option<String>,
    pub shadow: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawPlan {
    pub default: Option<bool>,
    pub shadow: Option<bool>,
    pub features: Vec<String>,
    pub rate_per_minute: Option<i64>,
    pub burst: Option<i64>,
    pub fail_mode: Option<String>,
    /// Share (0–1) of the units left that one instance may grant while Redis is down.
    pub fail_open_allowance: Option<f64>,
    /// `"exact"` (default: every request asks Redis) or `"lease"` (blocks of units spent in
    /// process).
    pub quota_mode: Option<String>,
    /// Lease mode: the most units one lease holds.
    pub lease_units: Option<i64>,
    /// Lease mode: how long a lease lives without being extended (a duration: `10s`).
    pub lease_ttl: Option<String>,
    pub past_due_grace: Option<String>,
    /// Higher wins when several plans apply (Stripe subscriptions with several prices).
    pub rank: Option<i64>,
    pub quotas: BTreeMap<String, RawQuota>,
    /// Percentages of each limited meter's `included` that send one alert when crossed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<i64>,
    /// What callers see in `GET /_tollgate/plans`: a name for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The recurring monthly price, integer micros of `currency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_micros: Option<i64>,
    /// ISO 4217, lowercase as Stripe writes it (default `usd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Free days a checkout starts with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial_days: Option<i64>,
    /// Listed in `GET /_tollgate/plans` and open to self-service checkout and plan changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// The Stripe price (`price_…`) a checkout or plan change subscribes to; it also maps
    /// that price back to this plan, like `[stripe.prices]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe_price: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RawQuota {
    pub included: Option<i64>,
    pub overage: Option<String>,
    pub unit_price_micros: Option<i64>,
    pub unlimited: Option<bool>,
}
