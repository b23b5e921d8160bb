//! The rules: a parsed [`RawConfig`] → a [`Config`], checking every key and cross-reference and
//! collecting *every* violation with its key path (never stopping at the first).
//!
//! Owns: defaults, ranges, cross-references (route → upstream/meter/feature, plan → meter,
//! Stripe prices → plans). Must not touch: secrets' values, the network, storage.

use super::raw::{self, OneOrMany, RawConfig, RawPlan, RawQuota};
use super::*;
use crate::quota::fail_open::Allowance;
use crate::quota::lease::LeaseTerms;

mod edge;
mod offer;

const DEFAULT_METER: &str = "api_calls";
/// Default ceiling on one call's cost (`routes[].max_cost`): far above any real price, far below
/// `i64::MAX`, so that sums of many calls stay exact in the ledger's `BIGINT`.
const DEFAULT_MAX_COST: u64 = 1_000_000_000;

/// `routes[0].cots` style paths from serde_ignored's path.
pub(super) fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => {
            let p = key_path(parent);
            if p.is_empty() {
                key.to_string()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

pub(super) fn one(key: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        key: key.into(),
        message,
    }])
}

/// Every violation of `raw`, after `found` (errors met while parsing it), or the config.
pub(super) fn validate(raw: RawConfig, found: Vec<ConfigError>) -> Result<Config, ConfigErrors> {
    let mut v = Validator { errors: found };
    let config = v.config(raw);
    match config {
        Some(c) if v.errors.is_empty() => Ok(c),
        _ => Err(ConfigErrors(v.errors)),
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

// === impl Validator ===

impl Validator {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }

    fn non_negative(&mut self, key: String, v: Option<i64>, default: u64) -> u64 {
        match v {
            None => default,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                self.err(key, format!("must be ≥ 0, got {n}"));
                default
            }
        }
    }

    fn positive(&mut self, key: String, v: Option<i64>, default: u64) -> u64 {
        match v {
            None => default,
            Some(n) if n > 0 => n as u64,
            Some(n) => {
                self.err(key, format!("must be > 0, got {n}"));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(s).unwrap_or_else(|| {
                self.err(key, format!("not a duration: {s:?} (use e.g. 30s, 5m, 3d)"));
                default
            }),
        }
    }

    fn addr(&mut self, key: &str, v: Option<&str>, default: &str) -> SocketAddr {
        let s = v.unwrap_or(default);
        s.parse().unwrap_or_else(|_| {
            self.err(key, format!("not an ip:port address: {s:?}"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// Returns the model, or `None` when an error makes it impossible to build (the caller then
    /// reports `self.errors`, which is never empty in that case).
    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let upstreams = self.upstreams(&raw);
        let meters: BTreeMap<String, Meter> = raw
            .meters
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    Meter {
                        stripe_event_name: m.stripe_event_name.clone(),
                    },
                )
            })
            .collect();
        let plans = self.plans(&raw, &meters);
        let routes = self.routes(&raw, &upstreams, &meters, &plans);

        let defaults: Vec<&String> = raw
            .plans
            .iter()
            .filter(|(_, p)| p.default == Some(true))
            .map(|(k, _)| k)
            .collect();
        if defaults.len() > 1 {
            for name in &defaults[1..] {
                self.err(
                    format!("plans.{name}.default"),
                    format!(
                        "only one plan may be the default; {} is already",
                        defaults[0]
                    ),
                );
            }
        }
        let default_plan = defaults.first().map(|s| s.to_string());

        let p = &raw.proxy;
        let unmatched = match (p.unmatched.as_deref(), &p.unmatched_upstream) {
            (None | Some("deny"), None) => Unmatched::Deny,
            (None | Some("deny"), Some(_)) => {
                self.err(
                    "proxy.unmatched_upstream",
                    "only used with unmatched = \"forward\"",
                );
                Unmatched::Deny
            }
            (Some("forward"), Some(u)) => {
                if !upstreams.contains_key(u) {
                    self.err(
                        "proxy.unmatched_upstream",
                        format!("unknown upstream {u:?}"),
                    );
                }
                Unmatched::Forward {
                    upstream: u.clone(),
                }
            }
            (Some("forward"), None) => {
                self.err(
                    "proxy.unmatched_upstream",
                    "required when unmatched = \"forward\"",
                );
                Unmatched::Deny
            }
            (Some(other), _) => {
                self.err(
                    "proxy.unmatched",
                    format!("must be \"deny\" or \"forward\", got {other:?}"),
                );
                Unmatched::Deny
            }
        };
        let proxy = ProxySettings {
            listen: self.addr("proxy.listen", p.listen.as_deref(), "0.0.0.0:8080"),
            tls: self.listener_tls(p.tls.as_ref()),
            trusted_proxies: self.trusted_proxies(&p.trusted_proxies),
            unmatched,
            strip_authorization: p.strip_authorization.unwrap_or(false),
            max_request_header_bytes: self.positive(
                "proxy.max_request_header_bytes".into(),
                p.max_request_header_bytes,
                16 * 1024,
            ) as usize,
            max_connections_per_ip: self.non_negative(
                "proxy.max_connections_per_ip".into(),
                p.max_connections_per_ip,
                0,
            ) as usize,
            header_read_timeout: self.duration(
                "proxy.header_read_timeout",
                p.header_read_timeout.as_deref(),
                Duration::from_secs(10),
            ),
            drain_delay: self.duration(
                "proxy.drain_delay",
                p.drain_delay.as_deref(),
                Duration::from_secs(5),
            ),
            shutdown_grace: self.duration(
                "proxy.shutdown_grace",
                p.shutdown_grace.as_deref(),
                Duration::from_secs(10),
            ),
            threads: self.non_negative("proxy.threads".into(), p.threads, 0) as usize,
            access_log: match p.access_log.as_deref() {
                None | Some("all") => AccessLog::All,
                Some("errors") => AccessLog::Errors,
                Some("off") => AccessLog::Off,
                Some(o) => {
                    self.err(
                        "proxy.access_log",
                        format!("must be \"all\", \"errors\" or \"off\", got {o:?}"),
                    );
                    AccessLog::All
                }
            },
        };
        let admin = AdminSettings {
            listen: self.addr(
                "admin.listen",
                raw.admin.listen.as_deref(),
                "127.0.0.1:9090",
            ),
            token_env: raw
                .admin
                .token_env
                .clone()
                .unwrap_or_else(|| "TOLLGATE_ADMIN_TOKEN".into()),
            metrics_token_env: raw.admin.metrics_token_env.clone(),
            ingest_token_env: raw.admin.ingest_token_env.clone(),
        };
        let s = &raw.storage;
        let redis_cluster = s.redis_cluster.unwrap_or(false);
        if let Some(url) = &s.redis_url {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            if nodes.len() > 1 && !redis_cluster {
                self.err(
                    "storage.redis_url",
                    "several URLs need redis_cluster = true",
                );
            }
            for n in nodes {
                if !(n.starts_with("redis://") || n.starts_with("rediss://")) {
                    self.err(
                        "storage.redis_url",
                        format!("must start with redis:// or rediss://, got {n:?}"),
                    );
                }
            }
        } else if redis_cluster {
            self.err("storage.redis_cluster", "needs redis_url (the seed nodes)");
        }
        let database_url = s
            .database_url
            .clone()
            .unwrap_or_else(|| "sqlite:data/tollgate.db".into());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            self.err(
                "storage.database_url",
                "must start with sqlite:, postgres:// or postgresql://",
            );
        }
        let storage = StorageSettings {
            redis_url: s.redis_url.clone(),
            redis_cluster,
            redis_prefix: s.redis_prefix.clone().unwrap_or_else(|| "tg".into()),
            redis_timeout: Duration::from_millis(self.positive(
                "storage.redis_timeout_ms".into(),
                s.redis_timeout_ms,
                50,
            )),
            database_url,
            database_schema: s.database_schema.clone(),
            usage_queue: self.positive("storage.usage_queue".into(), s.usage_queue, 10_000)
                as usize,
            usage_flush_interval: Duration::from_millis(self.positive(
                "storage.usage_flush_ms".into(),
                s.usage_flush_ms,
                200,
            )),
            spool_dir: PathBuf::from(s.spool_dir.clone().unwrap_or_else(|| "data/spool".into())),
        };
        let auth = self.auth(&raw);
        let stripe = raw.stripe.as_ref().map(|s| self.stripe(s, &plans));
        let alerts = raw.alerts.as_ref().map(|a| self.alerts(a));
        if alerts.is_none() {
            for (name, p) in &raw.plans {
                if !p.alerts.is_empty() {
                    self.err(
                        format!("plans.{name}.alerts"),
                        "needs an [alerts] section (webhook_url, secret_env)",
                    );
                }
            }
        }

        // Nothing to build a router from is not an error in itself, but a bad route is.
        Some(Config {
            proxy,
            admin,
            storage,
            auth,
            upstreams,
            meters,
            routes,
            plans,
            default_plan,
            stripe,
            alerts,
            raw,
        })
    }

    fn upstreams(&mut self, raw: &RawConfig) -> BTreeMap<String, Upstream> {
        let mut out = BTreeMap::new();
        for (name, u) in &raw.upstreams {
            if u.targets.is_empty() {
                self.err(
                    format!("upstreams.{name}.targets"),
                    "needs at least one host:port",
                );
            }
            for (i, t) in u.targets.iter().enumerate() {
                let ok = t
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    self.err(
                        format!("upstreams.{name}.targets[{i}]"),
                        format!("not a host:port: {t:?}"),
                    );
                }
            }
            let hc = self.non_negative(
                format!("upstreams.{name}.health_check_seconds"),
                u.health_check_seconds,
                0,
            );
            out.insert(
                name.clone(),
                Upstream {
                    targets: u.targets.clone(),
                    health_check: (hc > 0).then(|| Duration::from_secs(hc)),
                    host: u.host.clone(),
                    tls: self.upstream_tls(name, u),
                },
            );
        }
        out
    }

    fn plans(
        &mut self,
        raw: &RawConfig,
        meters: &BTreeMap<String, Meter>,
    ) -> BTreeMap<String, Plan> {
        let mut out = BTreeMap::new();
        for (name, p) in &raw.plans {
            let key = format!("plans.{name}");
            let rate = match (p.rate_per_minute, p.burst) {
                (None, None) => None,
                (None, Some(_)) => {
                    self.err(format!("{key}.burst"), "needs rate_per_minute");
                    None
                }
                (Some(r), b) => {
                    let per_minute = self
                        .positive(format!("{key}.rate_per_minute"), Some(r), 1)
                        .min(u32::MAX as u64) as u32;
                    let burst = self
                        .positive(format!("{key}.burst"), b, per_minute as u64)
                        .min(u32::MAX as u64) as u32;
                    Some(Rate { per_minute, burst })
                }
            };
            let mut quotas = BTreeMap::new();
            for (meter, q) in &p.quotas {
                let qkey = format!("{key}.quotas.{meter}");
                if !meters.contains_key(meter) {
                    self.err(
                        qkey.clone(),
                        format!("unknown meter {meter:?} (declare it under [meters.{meter}])"),
                    );
                }
                quotas.insert(meter.clone(), self.quota(&qkey, q));
            }
            let fail_mode = match p.fail_mode.as_deref() {
                None | Some("open") => FailMode::Open,
                Some("closed") => FailMode::Closed,
                Some(o) => {
                    self.err(
                        format!("{key}.fail_mode"),
                        format!("must be \"open\" or \"closed\", got {o:?}"),
                    );
                    FailMode::Open
                }
            };
            let fail_open_allowance = match p.fail_open_allowance {
                None => Allowance::PerInstance,
                Some(x) if (0.0..=1.0).contains(&x) => {
                    Allowance::PerMille((x * 1000.0).round() as u32)
                }
                Some(x) => {
                    self.err(
                        format!("{key}.fail_open_allowance"),
                        format!("must be a share from 0 to 1, got {x}"),
                    );
                    Allowance::PerInstance
                }
            };
            let lease = self.lease_terms(&key, p);
            let past_due_grace = self.duration(
                &format!("{key}.past_due_grace"),
                p.past_due_grace.as_deref(),
                Duration::from_secs(3 * 86_400),
            );
            out.insert(
                name.clone(),
                Plan {
                    name: name.clone(),
                    features: p.features.iter().cloned().collect(),
                    rate,
                    quotas,
                    fail_mode,
                    fail_open_allowance,
                    lease,
                    past_due_grace,
                    rank: p.rank.unwrap_or(0),
                    shadow: p.shadow.unwrap_or(false),
                    alerts: self.alert_thresholds(&key, &p.alerts),
                    offer: self.offer(&key, p),
                },
            );
        }
        self.one_plan_per_price(raw);
        out
    }

    /// `quota_mode` and the lease keys of a plan (`key` is `plans.<name>`).
    fn lease_terms(&mut self, key: &str, p: &RawPlan) -> Option<LeaseTerms> {
        let lease = match p.quota_mode.as_deref() {
            None | Some("exact") => false,
            Some("lease") => true,
            Some(o) => {
                self.err(
                    format!("{key}.quota_mode"),
                    format!("must be \"exact\" or \"lease\", got {o:?}"),
                );
                false
            }
        };
        if !lease {
            for (k, set) in [
                ("lease_units", p.lease_units.is_some()),
                ("lease_ttl", p.lease_ttl.is_some()),
            ] {
                if set {
                    self.err(
                        format!("{key}.{k}"),
                        "only meaningful with quota_mode = \"lease\"",
                    );
                }
            }
            return None;
        }
        let max_units = self.positive(format!("{key}.lease_units"), p.lease_units, 100);
        let lifetime = self.duration(
            &format!("{key}.lease_ttl"),
            p.lease_ttl.as_deref(),
            Duration::from_secs(10),
        );
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&lifetime) {
            self.err(
                format!("{key}.lease_ttl"),
                format!("must be from 1s to 1h, got {lifetime:?}"),
            );
        }
        Some(LeaseTerms {
            max_units,
            lifetime,
        })
    }

    fn quota(&mut self, key: &str, q: &RawQuota) -> Quota {
        if q.unlimited == Some(true) {
            if q.included.is_some() || q.overage.is_some() {
                self.err(
                    key,
                    "unlimited = true cannot be combined with included/overage",
                );
            }
            return Quota::Unlimited;
        }
        let Some(included) = q.included else {
            self.err(
                format!("{key}.included"),
                "required (or set unlimited = true)",
            );
            return Quota::Unlimited;
        };
        let included = self.non_negative(format!("{key}.included"), Some(included), 0);
        let overage = match q.overage.as_deref() {
            None | Some("deny") => false,
            Some("allow") => true,
            Some(o) => {
                self.err(
                    format!("{key}.overage"),
                    format!("must be \"deny\" or \"allow\", got {o:?}"),
                );
                false
            }
        };
        let unit_price_micros =
            self.non_negative(format!("{key}.unit_price_micros"), q.unit_price_micros, 0);
        if !overage && q.unit_price_micros.is_some_and(|p| p > 0) {
            self.err(
                format!("{key}.unit_price_micros"),
                "only meaningful with overage = \"allow\"",
            );
        }
        Quota::Limited {
            included,
            overage,
            unit_price_micros,
        }
    }

    fn routes(
        &mut self,
        raw: &RawConfig,
        upstreams: &BTreeMap<String, Upstream>,
        meters: &BTreeMap<String, Meter>,
        plans: &BTreeMap<String, Plan>,
    ) -> Vec<Route> {
        let mut out: Vec<Route> = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut missing_quota: BTreeSet<(String, String)> = BTreeSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let Some(m) = &r.matches else {
                self.err(
                    format!("{key}.match"),
                    "required, e.g. \"GET /signals/{symbol}\"",
                );
                continue;
            };
            let spec = match MatchSpec::parse(m) {
                Ok(s) => s,
                Err(e) => {
                    self.err(format!("{key}.match"), e);
                    continue;
                }
            };
            let name = r.name.clone().unwrap_or_else(|| m.clone());
            if let Some(j) = names.insert(name.clone(), i) {
                self.err(
                    format!("{key}.name"),
                    format!("duplicate route name {name:?} (also routes[{j}])"),
                );
            }
            let upstream = r.upstream.clone().unwrap_or_default();
            if upstream.is_empty() {
                self.err(format!("{key}.upstream"), "required");
            } else if !upstreams.contains_key(&upstream) {
                self.err(
                    format!("{key}.upstream"),
                    format!("unknown upstream {upstream:?}"),
                );
            }
            let auth = match r.auth.as_deref() {
                None | Some("required") => RouteAuth::Required,
                Some("public") => RouteAuth::Public,
                Some(o) => {
                    self.err(
                        format!("{key}.auth"),
                        format!("must be \"required\" or \"public\", got {o:?}"),
                    );
                    RouteAuth::Required
                }
            };
            let meter = r.meter.clone().unwrap_or_else(|| DEFAULT_METER.into());
            if auth == RouteAuth::Required {
                if !meters.contains_key(&meter) {
                    self.err(
                        format!("{key}.meter"),
                        format!("unknown meter {meter:?} (declare it under [meters.{meter}])"),
                    );
                } else {
                    // Every plan must say how much of this meter it includes: a forgotten quota
                    // would otherwise be free, unlimited use.
                    for (pname, plan) in plans {
                        if !plan.quotas.contains_key(&meter)
                            && missing_quota.insert((pname.clone(), meter.clone()))
                        {
                            self.err(
                                format!("plans.{pname}.quotas"),
                                format!("no quota for meter {meter:?} (used by {key}); set included or unlimited = true"),
                            );
                        }
                    }
                }
            }
            if let Some(f) = &r.feature {
                if !plans.values().any(|p| p.features.contains(f)) {
                    self.err(
                        format!("{key}.feature"),
                        format!("no plan offers feature {f:?}"),
                    );
                }
            }
            let max_cost = self.positive(format!("{key}.max_cost"), r.max_cost, DEFAULT_MAX_COST);
            let mut cost = self.non_negative(format!("{key}.cost"), r.cost, 1);
            if cost > max_cost {
                self.err(
                    format!("{key}.cost"),
                    format!("must be ≤ max_cost ({max_cost}), got {cost}"),
                );
                cost = max_cost;
            }
            let cost_from_response_header = r.cost_from_response_header.as_ref().and_then(|h| {
                http::HeaderName::try_from(h.as_str())
                    .map_err(|_| {
                        self.err(
                            format!("{key}.cost_from_response_header"),
                            format!("not a header name: {h:?}"),
                        )
                    })
                    .ok()
            });
            let charge = match r.charge.as_deref() {
                None | Some("success") => Charge::Success,
                Some("always") => Charge::Always,
                Some(o) => {
                    self.err(
                        format!("{key}.charge"),
                        format!("must be \"success\" or \"always\", got {o:?}"),
                    );
                    Charge::Success
                }
            };
            let websocket = match r.upgrade.as_deref() {
                None => false,
                Some("websocket") => true,
                Some(o) => {
                    self.err(
                        format!("{key}.upgrade"),
                        format!("the only upgrade tollgate forwards is \"websocket\", got {o:?}"),
                    );
                    false
                }
            };
            let ignore_trailing_slash = match r.trailing_slash.as_deref() {
                None | Some("exact") => false,
                Some("ignore") => true,
                Some(o) => {
                    self.err(
                        format!("{key}.trailing_slash"),
                        format!("must be \"exact\" or \"ignore\", got {o:?}"),
                    );
                    false
                }
            };
            out.push(Route {
                name,
                spec,
                upstream,
                meter,
                cost,
                max_cost,
                feature: r.feature.clone(),
                cost_from_response_header,
                charge,
                websocket,
                case_sensitive: r.case_sensitive.unwrap_or(true),
                ignore_trailing_slash,
                auth,
                shadow: r.shadow.unwrap_or(false),
            });
        }
        // Duplicates and ambiguous patterns are found by building the router once.
        if let Err(conflicts) = Router::build(&out) {
            for (i, msg) in conflicts {
                self.err(format!("routes[{i}].match"), msg);
            }
        }
        out
    }

    /// A plan's alert percentages: each 1–1000, no repeats; sorted ascending.
    fn alert_thresholds(&mut self, key: &str, raw: &[i64]) -> Vec<u32> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, &t) in raw.iter().enumerate() {
            if !(1..=1000).contains(&t) {
                self.err(
                    format!("{key}.alerts[{i}]"),
                    format!("must be a percentage from 1 to 1000, got {t}"),
                );
            } else if out.contains(&(t as u32)) {
                self.err(format!("{key}.alerts[{i}]"), format!("{t} is listed twice"));
            } else {
                out.push(t as u32);
            }
        }
        out.sort_unstable();
        out
    }

    fn alerts(&mut self, a: &raw::RawAlerts) -> AlertSettings {
        let url = a.webhook_url.clone().unwrap_or_default();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            self.err(
                "alerts.webhook_url",
                format!("must start with https:// or http://, got {url:?}"),
            );
        }
        let secret_env = a
            .secret_env
            .clone()
            .unwrap_or_else(|| "TOLLGATE_ALERT_SECRET".into());
        if secret_env.trim().is_empty() {
            self.err("alerts.secret_env", "must not be empty");
        }
        let max_attempts = self
            .positive("alerts.max_attempts".into(), a.max_attempts, 6)
            .min(100) as u32;
        let backoff = self.positive("alerts.retry_backoff_ms".into(), a.retry_backoff_ms, 1000);
        AlertSettings {
            webhook_url: url,
            secret_env,
            max_attempts,
            retry_backoff: Duration::from_millis(backoff),
        }
    }

    fn stripe(&mut self, s: &raw::RawStripe, plans: &BTreeMap<String, Plan>) -> StripeSettings {
        for (price, plan) in &s.prices {
            if !plans.contains_key(plan) {
                self.err(
                    format!("stripe.prices.{price}"),
                    format!("unknown plan {plan:?}"),
                );
            }
            self.price_of_another_plan(price, plan, plans);
        }
        let (redirect_hosts, proration_behavior) = self.self_service_keys(s);
        let api_base = s
            .api_base
            .clone()
            .unwrap_or_else(|| "https://api.stripe.com".into());
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            self.err(
                "stripe.api_base",
                format!("must start with https:// or http://, got {api_base:?}"),
            );
        }
        let key = s
            .customer_metadata_key
            .clone()
            .unwrap_or_else(|| "tollgate_customer".into());
        if key.trim().is_empty() {
            self.err("stripe.customer_metadata_key", "must not be empty");
        }
        let report_interval = self.duration(
            "stripe.report_interval",
            s.report_interval.as_deref(),
            Duration::from_secs(60),
        );
        if report_interval.is_zero() {
            self.err("stripe.report_interval", "must be > 0");
        }
        let report_window = self.duration(
            "stripe.report_window",
            s.report_window.as_deref(),
            Duration::from_secs(60),
        );
        if report_window.as_secs() == 0 || report_window.subsec_nanos() != 0 {
            self.err(
                "stripe.report_window",
                "must be a whole number of seconds > 0",
            );
        }
        let report_delay = self.duration(
            "stripe.report_delay",
            s.report_delay.as_deref(),
            Duration::from_secs(30),
        );
        let sync_interval = self.duration(
            "stripe.sync_interval",
            s.sync_interval.as_deref(),
            Duration::from_secs(900),
        );
        StripeSettings {
            report_interval,
            report_window,
            report_delay,
            sync_interval,
            webhook_secrets_env: s
                .webhook_secrets_env
                .clone()
                .unwrap_or_else(|| "STRIPE_WEBHOOK_SECRETS".into()),
            secret_key_env: s
                .secret_key_env
                .clone()
                .unwrap_or_else(|| "STRIPE_SECRET_KEY".into()),
            api_base: api_base.trim_end_matches('/').to_string(),
            webhook_listen: s
                .webhook_listen
                .as_deref()
                .map(|v| self.addr("stripe.webhook_listen", Some(v), v)),
            customer_metadata_key: key,
            prices: s.prices.clone(),
            redirect_hosts,
            proration_behavior,
            allow_cancel_now: s.allow_cancel_now.unwrap_or(false),
        }
    }

    fn auth(&mut self, raw: &RawConfig) -> AuthSettings {
        let a = &raw.auth;
        let mut algorithms = Vec::new();
        for (i, name) in a.algorithms.iter().enumerate() {
            match name.parse::<jsonwebtoken::Algorithm>() {
                Ok(alg) => algorithms.push(alg),
                Err(_) => self.err(
                    format!("auth.algorithms[{i}]"),
                    format!("unknown algorithm {name:?}"),
                ),
            }
        }
        if a.algorithms.is_empty() {
            self.err(
                "auth.algorithms",
                "list the allowed algorithms, e.g. [\"RS256\"]",
            );
        }
        use jsonwebtoken::Algorithm::*;
        let needs_secret = algorithms
            .iter()
            .any(|a| matches!(a, HS256 | HS384 | HS512));
        let needs_public = algorithms
            .iter()
            .any(|a| !matches!(a, HS256 | HS384 | HS512));
        if needs_secret && a.secret_env.is_none() {
            self.err(
                "auth.secret_env",
                "HS algorithms need the name of the env var holding the secret",
            );
        }
        if needs_public && a.public_key_files.is_empty() && a.jwks_url.is_none() {
            self.err(
                "auth",
                "RS/PS/ES/EdDSA algorithms need public_key_files or jwks_url",
            );
        }
        if a.jwks_ca_file.is_some() && a.jwks_url.is_none() {
            self.err(
                "auth.jwks_ca_file",
                "only used for the JWKS fetch: set jwks_url too, or remove it",
            );
        }
        let audience = match &a.audience {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        AuthSettings {
            algorithms,
            secret_env: a.secret_env.clone(),
            public_key_files: a.public_key_files.iter().map(PathBuf::from).collect(),
            jwks_url: a.jwks_url.clone(),
            jwks_ca_file: a.jwks_ca_file.as_ref().map(PathBuf::from),
            issuer: a.issuer.clone(),
            audience,
            leeway_seconds: self.non_negative("auth.leeway_seconds".into(), a.leeway_seconds, 30),
            customer_claim: a.customer_claim.clone().unwrap_or_else(|| "sub".into()),
            plan_claim: a.plan_claim.clone(),
        }
    }
}
