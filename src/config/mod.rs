//! Configuration: the TOML file (`raw`) turned into a validated model (this module) that the rest
//! of tollgate trusts. Every rule reports *all* its violations with the key path that is wrong, so
//! `tollgate check-config`, `serve` and (later) the admin API refuse a bad config with the same
//! messages, and a refused config never replaces the running one.
//!
//! Owns: parsing, defaults, cross-references (route → upstream/meter/feature, plan → meter).
//! Must not touch: secrets (only the *names* of env vars live here), the network, storage.

pub(crate) mod live_doc;
mod parse;
pub(crate) mod raw;
mod validate;

use crate::auth::AuthSettings;
use crate::proxy::route::{MatchSpec, Router};
use raw::RawConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A validated configuration. Constructed only by [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub storage: StorageSettings,
    pub auth: AuthSettings,
    pub upstreams: BTreeMap<String, Upstream>,
    pub meters: BTreeMap<String, Meter>,
    pub routes: Vec<Route>,
    pub plans: BTreeMap<String, Plan>,
    /// Name of the plan with `default = true`, if any.
    pub default_plan: Option<String>,
    /// `None` when the file has no `[stripe]` section: webhooks and sync are off.
    pub stripe: Option<StripeSettings>,
    /// `None` without an `[alerts]` section: threshold alerts are off.
    pub alerts: Option<AlertSettings>,
    /// The raw document, kept to serve it back (admin API) and to version it.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    /// TLS on the proxy listener (certificate reread on SIGHUP). Read at start.
    pub tls: Option<ListenerTls>,
    /// Connecting addresses whose `X-Forwarded-For/Proto/Host` are kept (and extended); from
    /// any other they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub unmatched: Unmatched,
    pub strip_authorization: bool,
    pub max_request_header_bytes: usize,
    /// Connections one client IP may hold open at once (0: no cap). Read at start.
    pub max_connections_per_ip: usize,
    /// A new connection's first request head must be complete within this (0: no deadline).
    /// Read at start.
    pub header_read_timeout: Duration,
    /// On SIGTERM, how long the proxy keeps taking new requests after `/readyz` turned 503, so
    /// load balancers see it first (ends sooner once idle).
    pub drain_delay: Duration,
    /// After `drain_delay`, how long requests still in flight get to finish.
    pub shutdown_grace: Duration,
    /// Worker threads of the proxy runtime; 0 = one per core.
    pub threads: usize,
    /// Which requests get an access-log line.
    pub access_log: AccessLog,
}

/// `proxy.access_log`: which requests get a line (target `tollgate::access`, info level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    All,
    /// Only answers that are not 2xx or 3xx: denials, upstream failures.
    Errors,
    Off,
}

impl AccessLog {
    pub fn wants(self, status: u16) -> bool {
        match self {
            AccessLog::All => true,
            AccessLog::Errors => !(200..400).contains(&status),
            AccessLog::Off => false,
        }
    }
}

/// What happens to a request no route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    Deny,
    Forward { upstream: String },
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Env var holding the admin bearer token.
    pub token_env: String,
    /// Env var holding the bearer token `/metrics` requires; `None`: `/metrics` is open.
    pub metrics_token_env: Option<String>,
    /// Env var holding a bearer token for `/v1/*` (usage events) besides the admin token.
    pub ingest_token_env: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub redis_url: Option<String>,
    /// `redis_url` lists Redis Cluster seed nodes (comma-separated).
    pub redis_cluster: bool,
    pub redis_prefix: String,
    pub redis_timeout: Duration,
    pub database_url: String,
    pub database_schema: Option<String>,
    pub usage_queue: usize,
    pub usage_flush_interval: Duration,
    pub spool_dir: PathBuf,
}

/// `[stripe]`: only env var *names* live here, never secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSettings {
    /// Env var with the webhook signing secrets, comma-separated (several during a rotation).
    pub webhook_secrets_env: String,
    /// Env var with the API secret key (not used yet: the reconciler and reporter will).
    pub secret_key_env: String,
    pub api_base: String,
    /// A listener that serves only `POST /webhooks/stripe`, so the admin listener can stay
    /// private; `None`: webhooks on the admin listener only.
    pub webhook_listen: Option<SocketAddr>,
    /// Subscription metadata key whose value is the tollgate customer id.
    pub customer_metadata_key: String,
    /// Stripe price id → plan name (every plan checked to exist).
    pub prices: BTreeMap<String, String>,
    /// Usage reporter: period between runs (and the first retry delay after a failure).
    pub report_interval: Duration,
    /// Usage reporter: one meter event per customer, meter and window of this length.
    pub report_window: Duration,
    /// Usage reporter: rows younger than this are left for a later run.
    pub report_delay: Duration,
    /// Reconciler period; zero: only at start and via `POST /admin/stripe/sync`.
    pub sync_interval: Duration,
    /// Hosts self-service checkout and portal URLs may send the caller back to (lowercase).
    pub redirect_hosts: Vec<String>,
    /// Stripe `proration_behavior` of self-service plan changes.
    pub proration_behavior: String,
    /// Self-service cancellation may end the subscription at once (`?now=true`).
    pub allow_cancel_now: bool,
}

/// `[alerts]`: the threshold-alert webhook. Only the secret's env var *name* lives here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    pub webhook_url: String,
    /// Env var holding the HMAC-SHA256 signing secret.
    pub secret_env: String,
    /// Deliveries tried at most this many times.
    pub max_attempts: u32,
    /// Delay before the first retry, doubled for each next one.
    pub retry_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub targets: Vec<String>,
    pub health_check: Option<Duration>,
    pub host: Option<String>,
    /// HTTPS to the targets (`tls = true`).
    pub tls: Option<UpstreamTls>,
}

/// `[upstreams.*]` with `tls = true`. Paths only: the files are read when the pool is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Server name sent (SNI) and verified: `sni`, else `host`, else the first target's name.
    pub sni: String,
    /// CAs trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key, for upstreams that ask for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// `proxy.tls`: the proxy listener speaks TLS (HTTP/2 and HTTP/1.1) with this certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Meter {
    pub stripe_event_name: Option<String>,
}

/// When a reservation is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Refunded when the upstream fails (5xx or no connection).
    Success,
    /// Kept whatever the upstream answers.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    Required,
    /// No token, no plan, no metering: forwarded as is.
    Public,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Stable name: metric label and ledger `route` column. Defaults to the match string.
    pub name: String,
    pub spec: MatchSpec,
    pub upstream: String,
    pub meter: String,
    pub cost: u64,
    /// Ceiling on one call's cost: `cost` is validated against it, and an exact cost from the
    /// upstream above it is invalid (the reservation is kept). Always ≤ `i64::MAX`.
    pub max_cost: u64,
    pub feature: Option<String>,
    pub cost_from_response_header: Option<http::HeaderName>,
    pub charge: Charge,
    /// `case_sensitive = false`: a path that differs only in ASCII letter case matches.
    pub case_sensitive: bool,
    /// `trailing_slash = "ignore"`: a path that differs only in a trailing `/` matches.
    pub ignore_trailing_slash: bool,
    /// `upgrade = "websocket"`: a WebSocket upgrade is forwarded (and charged as a call); any
    /// other upgrade, and every upgrade on a route without it, is refused.
    pub websocket: bool,
    pub auth: RouteAuth,
    /// Shadow mode: plan decisions on this route (feature gate, rate limit, quota) are
    /// computed, logged and counted, but the request is forwarded and charged anyway.
    pub shadow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Quota store down: serve and count locally.
    Open,
    /// Quota store down: 503 `quota-store-unavailable`.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Unlimited,
    Limited {
        included: u64,
        /// Overage allowed: calls past `included` are served and billed per unit.
        overage: bool,
        unit_price_micros: u64,
    },
}

// === impl Quota ===

impl Quota {
    /// Units included per period; `None` when unlimited.
    pub fn included(&self) -> Option<u64> {
        match *self {
            Quota::Unlimited => None,
            Quota::Limited { included, .. } => Some(included),
        }
    }

    /// The hard cap a reservation is checked against: `included` when overage is denied, `None`
    /// (count without limit) when unlimited or when overage is allowed and billed.
    pub fn cap(&self) -> Option<u64> {
        match *self {
            Quota::Limited {
                included,
                overage: false,
                ..
            } => Some(included),
            _ => None,
        }
    }

    /// Price of one unit past `included`, in micros (0 when unlimited).
    pub fn unit_price_micros(&self) -> u64 {
        match *self {
            Quota::Unlimited => 0,
            Quota::Limited {
                unit_price_micros, ..
            } => unit_price_micros,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub features: BTreeSet<String>,
    pub rate: Option<Rate>,
    pub quotas: BTreeMap<String, Quota>,
    pub fail_mode: FailMode,
    /// How much of a capped quota's remaining units one instance may grant in fail-open.
    pub fail_open_allowance: crate::quota::fail_open::Allowance,
    /// `quota_mode = "lease"`: the plan's quotas are spent from in-process leases (Redis only;
    /// the embedded store is in process already and ignores it). `None`: exact.
    pub lease: Option<crate::quota::lease::LeaseTerms>,
    pub past_due_grace: Duration,
    pub rank: i64,
    /// Shadow mode for every route this plan is used on (see [`Route::shadow`]).
    pub shadow: bool,
    /// Percentages of `included` that send a threshold alert when crossed (ascending).
    pub alerts: Vec<u32>,
    /// What the plan shows callers and sells through Stripe.
    pub offer: Offer,
}

/// A plan as it is offered (issue 13): display data for `GET /_tollgate/plans` and the Stripe
/// price a self-service checkout or plan change subscribes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    pub title: Option<String>,
    pub description: Option<String>,
    /// Recurring monthly price, integer micros of `currency`.
    pub price_micros: Option<u64>,
    /// Lowercase ISO 4217 code.
    pub currency: String,
    pub trial_days: u32,
    /// Listed and open to self-service.
    pub public: bool,
    pub stripe_price: Option<String>,
}

/// One violated rule: the key path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every error found in a config document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses durations like `250ms`, `30s`, `5m`, `12h`, `3d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

impl Config {
    /// The plan a Stripe price subscribes to: `[stripe.prices]` first, else the plan whose
    /// `stripe_price` it is.
    pub fn plan_for_price(&self, prices: &BTreeMap<String, String>, price: &str) -> Option<&Plan> {
        match prices.get(price) {
            Some(name) => self.plans.get(name),
            None => self
                .plans
                .values()
                .find(|p| p.offer.stripe_price.as_deref() == Some(price)),
        }
    }

    /// Reads and validates a file. The error list names the file when it cannot be read.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates a TOML document, reporting every error with its key: values of
    /// the wrong type, unknown keys and broken rules, all at once (only a TOML syntax error
    /// stops at the first, with its line).
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let parsed = parse::toml::<RawConfig>(text)?;
        let mut found = parsed.errors;
        found.extend(parsed.unknown.into_iter().map(|key| ConfigError {
            key,
            message: "unknown key".into(),
        }));
        Config::from_raw(parsed.value, found)
    }

    /// Validates a parsed document; `found` are errors already found while parsing it (values
    /// of the wrong type, unknown keys), reported first; a rule error on a key in `found` is
    /// left out (it would repeat it). The one validation behind the file, `check-config` and
    /// the admin API.
    pub(crate) fn from_raw(
        raw: RawConfig,
        found: Vec<ConfigError>,
    ) -> Result<Config, ConfigErrors> {
        match validate::validate(raw, Vec::new()) {
            Ok(config) if found.is_empty() => Ok(config),
            Ok(_) => Err(ConfigErrors(found)),
            Err(ConfigErrors(rules)) => Err(ConfigErrors(parse::with_rules(found, rules))),
        }
    }

    /// Env vars the config names that are not set, each with what `serve` does without it
    /// (check-config warns with these words).
    pub fn missing_env(&self) -> Vec<(String, &'static str)> {
        let mut names: Vec<(&String, &'static str)> =
            vec![(&self.admin.token_env, "the admin API (/admin/*) is closed")];
        if let Some(m) = &self.admin.metrics_token_env {
            names.push((m, "only the admin token opens /metrics"));
        }
        if let Some(m) = &self.admin.ingest_token_env {
            names.push((m, "only the admin token opens /v1/events"));
        }
        if let Some(a) = &self.auth.secret_env {
            names.push((a, "serve refuses to start: HS tokens are verified with it"));
        }
        if let Some(s) = &self.stripe {
            names.push((&s.webhook_secrets_env, "every Stripe webhook is refused"));
            names.push((
                &s.secret_key_env,
                "usage reporting, the reconciler and the billing portal are off",
            ));
        }
        if let Some(a) = &self.alerts {
            names.push((&a.secret_env, "threshold alerts are off"));
        }
        names
            .into_iter()
            .filter(|(n, _)| std::env::var_os(n).is_none())
            .map(|(n, what)| (n.clone(), what))
            .collect()
    }

    /// The plan a customer is on when it has none (or its own is unknown).
    pub fn default_plan(&self) -> Option<&Plan> {
        self.default_plan.as_ref().and_then(|n| self.plans.get(n))
    }
}
