//! The live-changeable part of the config (DESIGN §7): upstreams, meters, routes and plans. This
//! is the document the admin API serves and accepts (JSON in the TOML's structure), that the
//! ledger versions and that an instance applies without a restart. Listeners, storage, auth,
//! admin and Stripe settings change only by restart: a document naming them is refused.
//!
//! Owns: the live document's shape, parsing it with every error's key path, merging a partial
//! entry into it (PATCH), and validating it against the running config through the same
//! validator as `check-config`. Must not touch: storage, the network, the running snapshot.

use super::raw::{RawConfig, RawMeter, RawPlan, RawRoute, RawUpstream};
use super::{parse, Config, ConfigError, ConfigErrors};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Top-level sections that exist in the file but change only by restart.
const RESTART_ONLY: [&str; 5] = ["proxy", "admin", "storage", "auth", "stripe"];

/// The live part of a config document, in the TOML's structure.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct LiveDoc {
    pub upstreams: BTreeMap<String, RawUpstream>,
    pub meters: BTreeMap<String, RawMeter>,
    pub routes: Vec<RawRoute>,
    pub plans: BTreeMap<String, RawPlan>,
}

/// Which kind of entry a PATCH addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Routes,
    Plans,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Routes => "routes",
            Section::Plans => "plans",
        }
    }
}

// === impl LiveDoc ===

impl LiveDoc {
    /// The live part of a parsed file.
    pub fn of(raw: &RawConfig) -> LiveDoc {
        LiveDoc {
            upstreams: raw.upstreams.clone(),
            meters: raw.meters.clone(),
            routes: raw.routes.clone(),
            plans: raw.plans.clone(),
        }
    }

    /// Parses a JSON document. `Err` only when it is not JSON; otherwise the document and the
    /// errors found in it, to be reported together with the validation errors: each value of
    /// the wrong type with its key path (left out of the document), and the keys that are not
    /// part of the live config. The same parser as the file's (`config::parse`).
    pub fn from_json(bytes: &[u8]) -> Result<(LiveDoc, Vec<ConfigError>), ConfigErrors> {
        parse::json(bytes).map(Self::found)
    }

    /// As [`LiveDoc::from_json`], from TOML text (the file's own syntax, live sections only).
    pub fn from_toml(text: &str) -> Result<(LiveDoc, Vec<ConfigError>), ConfigErrors> {
        parse::toml(text).map(Self::found)
    }

    /// As [`LiveDoc::from_json`], from a `serde_json::Value`.
    pub fn from_value(value: Value) -> Result<(LiveDoc, Vec<ConfigError>), ConfigErrors> {
        Ok(Self::found(parse::value(value)))
    }

    fn found(parsed: parse::Parsed<LiveDoc>) -> (LiveDoc, Vec<ConfigError>) {
        let mut errors = parsed.errors;
        errors.extend(parsed.unknown.into_iter().map(|key| {
            let top = key.split(['.', '[']).next().unwrap_or_default();
            let message = if RESTART_ONLY.contains(&top) {
                "changes only by restart (not part of the live config)"
            } else {
                "unknown key"
            };
            ConfigError {
                key,
                message: message.into(),
            }
        }));
        (parsed.value, errors)
    }

    /// The document as JSON, without absent (`null`) fields: the same keys an operator would
    /// write in the TOML file.
    pub fn to_value(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        strip_nulls(&mut v);
        v
    }

    /// The index of the route named `name` (its `name`, else its match string).
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.name.as_deref().or(r.matches.as_deref()) == Some(name))
    }

    /// The current JSON of one entry, `None` when there is none by that name.
    pub fn entry(&self, section: Section, name: &str) -> Option<Value> {
        let v = self.to_value();
        match section {
            Section::Routes => self
                .route_index(name)
                .and_then(|i| v.get("routes")?.get(i).cloned()),
            Section::Plans => v.get("plans")?.get(name).cloned(),
        }
    }

    /// The whole document with `patch` merged into one entry (RFC 7396 JSON merge patch:
    /// given fields replace, nested tables merge, `null` removes a field). `None` when there is
    /// no entry by that name. The result is parsed again, so unknown keys are reported with
    /// their path in the document (`routes[2].cots`).
    pub fn merged(&self, section: Section, name: &str, patch: &Value) -> Option<Value> {
        let mut v = self.to_value();
        let slot = match section {
            Section::Routes => {
                let i = self.route_index(name)?;
                v.get_mut("routes")?.get_mut(i)?
            }
            Section::Plans => v.get_mut("plans")?.get_mut(name)?,
        };
        merge_patch(slot, patch);
        Some(v)
    }
}

/// RFC 7396 JSON merge patch of `patch` into `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// One difference between two documents: the key path, and the value before and after (absent
/// when the entry was added or removed).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = ConfigChange)]
pub struct Change {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// What would change from `old` to `new`, leaf by leaf. Routes are compared by name (not by
/// position), so reordering alone reports only the order; keys read `routes.{name}.cost`.
pub fn diff(old: &LiveDoc, new: &LiveDoc) -> Vec<Change> {
    let mut out = Vec::new();
    let (a, b) = (keyed(old), keyed(new));
    walk("", Some(&a), Some(&b), &mut out);
    let order = |d: &LiveDoc| -> Vec<String> {
        d.routes
            .iter()
            .map(|r| r.name.clone().or(r.matches.clone()).unwrap_or_default())
            .collect()
    };
    let (oa, ob) = (order(old), order(new));
    if oa != ob {
        out.push(Change {
            key: "routes (order)".into(),
            before: Some(Value::from(oa)),
            after: Some(Value::from(ob)),
        });
    }
    out
}

/// The document with `routes` as a map by name, for diffing.
fn keyed(d: &LiveDoc) -> Value {
    let mut v = d.to_value();
    if let Some(Value::Array(routes)) = v.get_mut("routes").map(Value::take) {
        let mut by_name = serde_json::Map::new();
        for r in routes {
            let name = r
                .get("name")
                .or_else(|| r.get("match"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            by_name.insert(name, r);
        }
        v["routes"] = Value::Object(by_name);
    }
    v
}

fn walk(key: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Change>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                walk(&sub, x.get(k), y.get(k), out);
            }
        }
        (x, y) if x == y => {}
        (x, y) => out.push(Change {
            key: key.to_string(),
            before: x.cloned(),
            after: y.cloned(),
        }),
    }
}

// === impl Config ===

impl Config {
    /// The live part of this config.
    pub fn live(&self) -> LiveDoc {
        LiveDoc::of(&self.raw)
    }

    /// This config with its live part replaced by `doc`, validated exactly as `check-config`
    /// validates a file (the restart-only sections are this config's, so cross-references such
    /// as `proxy.unmatched_upstream` and `stripe.prices` are checked too). `found`: errors
    /// already found while parsing `doc`; every error is reported, and on any error nothing is
    /// returned. Restart-only settings are kept as they run (even where they differ from the
    /// file, e.g. a listener bound to an ephemeral port).
    pub fn with_live(&self, doc: LiveDoc, found: Vec<ConfigError>) -> Result<Config, ConfigErrors> {
        let mut raw = self.raw.clone();
        raw.upstreams = doc.upstreams;
        raw.meters = doc.meters;
        raw.routes = doc.routes;
        raw.plans = doc.plans;
        let new = Config::from_raw(raw, found)?;
        Ok(Config {
            upstreams: new.upstreams,
            meters: new.meters,
            routes: new.routes,
            plans: new.plans,
            default_plan: new.default_plan,
            raw: new.raw,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = r#"
[admin]
token_env = "T"
[auth]
algorithms = ["HS256"]
secret_env = "S"
[upstreams.api]
targets = ["127.0.0.1:9000"]
[meters.api_calls]
[[routes]]
match = "GET /a"
upstream = "api"
cost = 1
[plans.free]
default = true
quotas.api_calls = { included = 5 }
"#;

    fn base() -> Config {
        Config::from_toml(BASE).unwrap()
    }

    fn apply(json: Value) -> Result<Config, ConfigErrors> {
        let (doc, found) = LiveDoc::from_value(json)?;
        base().with_live(doc, found)
    }

    fn keys(e: ConfigErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.key).collect()
    }

    /// The served document parses back to the same config.
    #[test]
    fn document_round_trips() {
        let c = base();
        let v = c.live().to_value();
        assert_eq!(v["routes"][0]["cost"], 1);
        assert!(
            v["routes"][0].get("feature").is_none(),
            "nulls are left out"
        );
        let back = apply(v).unwrap();
        assert_eq!(back.routes[0].cost, 1);
        assert_eq!(back.default_plan.as_deref(), Some("free"));
    }

    /// Every error of a bad document is reported with its key, including unknown and
    /// restart-only keys.
    #[test]
    fn every_error_is_listed() {
        let mut v = base().live().to_value();
        v["routes"][0]["cots"] = 5.into();
        v["routes"][0]["cost"] = (-1).into();
        v["routes"][0]["upstream"] = "nope".into();
        v["routes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"match": "GET /a", "upstream": "api"}));
        v["plans"]["free"]["quotas"]["bogus"] = serde_json::json!({"included": 1});
        v["proxy"] = serde_json::json!({"listen": "0.0.0.0:1"});
        let k = keys(apply(v).unwrap_err());
        for want in [
            "routes[0].cots",
            "proxy",
            "routes[0].cost",
            "routes[0].upstream",
            "routes[1].name",
            "plans.free.quotas.bogus",
        ] {
            assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
        }
    }

    /// A value of the wrong type is reported with its path, and the rest of its entry is
    /// still checked (this route names no upstream).
    #[test]
    fn wrong_type_has_its_path() {
        let e = apply(serde_json::json!({"routes": [{"match": "GET /a", "cost": "five"}]}));
        let e = e.unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "routes[0].cost: expected an integer, got string \"five\""
        );
        assert_eq!(keys(e)[1], "routes[0].upstream");
    }

    /// A merge patch replaces given fields, merges tables and removes `null`s.
    #[test]
    fn patch_merges_into_one_entry() {
        let d = base().live();
        let v = d
            .merged(
                Section::Plans,
                "free",
                &serde_json::json!({"quotas": {"api_calls": {"included": 9}}, "rate_per_minute": 60}),
            )
            .unwrap();
        let c = apply(v).unwrap();
        let free = &c.plans["free"];
        assert_eq!(
            free.quotas["api_calls"],
            crate::config::Quota::Limited {
                included: 9,
                overage: false,
                unit_price_micros: 0
            }
        );
        assert!(free.rate.is_some());
        assert!(d
            .merged(Section::Routes, "GET /nope", &serde_json::json!({}))
            .is_none());
    }

    /// The diff names each changed leaf, routes by name.
    #[test]
    fn diff_names_changed_leaves() {
        let a = base().live();
        let mut b = a.clone();
        b.routes[0].cost = Some(5);
        b.meters.insert("tokens".into(), RawMeter::default());
        let d = diff(&a, &b);
        assert_eq!(
            d,
            vec![
                Change {
                    key: "meters.tokens".into(),
                    before: None,
                    after: Some(serde_json::json!({}))
                },
                Change {
                    key: "routes.GET /a.cost".into(),
                    before: Some(1.into()),
                    after: Some(5.into())
                },
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }
}
