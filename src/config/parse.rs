//! Reading a config document (the TOML file, or the admin API's JSON or TOML) into its raw shape
//! with *every* value of the wrong type reported by its key path, not only the first.
//!
//! The text is parsed into a tree first (`toml::Value` or `serde_json::Value`): a syntax error
//! is the only error that stops everything, and the only one that names a line. The tree is then
//! read into the raw type through `serde_path_to_error`; a value of the wrong type is reported
//! with its path and neutralised (replaced by an empty table, so an entry keeps its name and
//! references to it still resolve; an array element by a stand-in, so the others keep their
//! indices; a plain value removed) and the tree read again, until it reads. What is left is validated as usual, and a rule error on a key that
//! already has a type error is left out ([`with_rules`]): the operator sees the cause once.
//!
//! Owns: the one parsing path behind `Config::from_toml` (`check-config`, `serve`, SIGHUP) and
//! `LiveDoc` (admin API, stored versions). Must not touch: the rules (`validate`).

use super::validate::{key_path, one};
use super::{ConfigError, ConfigErrors};
use serde::de::DeserializeOwned;

/// A document read into `T`.
pub(super) struct Parsed<T> {
    /// The document with every value of the wrong type left out.
    pub value: T,
    /// One error per value of the wrong type, in the order they were met.
    pub errors: Vec<ConfigError>,
    /// Key paths that are not part of `T` (`routes[0].cots`).
    pub unknown: Vec<String>,
}

/// Reads TOML text; `Err` only for a TOML syntax error (key `toml`, with its line).
pub(super) fn toml<T: DeserializeOwned + Default>(text: &str) -> Result<Parsed<T>, ConfigErrors> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| one("toml", e.to_string().trim().to_string()))?;
    Ok(read(toml::Value::Table(table)))
}

/// Reads JSON bytes; `Err` only when they are not JSON (key `document`).
pub(super) fn json<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<Parsed<T>, ConfigErrors> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| one("document", e.to_string()))?;
    Ok(read(value))
}

/// Reads a JSON value.
pub(super) fn value<T: DeserializeOwned + Default>(value: serde_json::Value) -> Parsed<T> {
    read(value)
}

/// `found` (errors met while parsing) followed by the rule errors `rules`, less those on a key
/// that has an error in `found` or lies under one: a value of the wrong type was left out, so
/// a rule saying it is missing or empty would only repeat it.
pub(super) fn with_rules(found: Vec<ConfigError>, rules: Vec<ConfigError>) -> Vec<ConfigError> {
    let covered = |key: &str| {
        found.iter().any(|f| {
            key.strip_prefix(f.key.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    };
    let rules: Vec<ConfigError> = rules.into_iter().filter(|e| !covered(&e.key)).collect();
    found.into_iter().chain(rules).collect()
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A parsed document tree: what reading it into `T` needs to report a bad value and take it
/// out.
trait Tree: Clone + Sized {
    /// How this syntax names a table (`a table`, `an object`).
    const TABLE: &'static str;

    /// One read: the value and the ignored keys' paths, or the first error's path and message.
    fn attempt<T: DeserializeOwned>(self) -> Result<(T, Vec<String>), (Vec<Step>, String)>;
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self>;
    fn remove_child(&mut self, step: &Step);
    fn is_table(&self) -> bool;
    /// The `n`th value tried in place of a bad one: an empty table, `""`, `0`.
    fn stand_in(n: usize) -> Option<Self>;
    /// What the value is, for "got …" (`string "two"`, `integer 5`, `an array`).
    fn describe(&self) -> String;
}

/// Reads `tree` into `T`, neutralising each value of the wrong type in turn (see the module
/// doc). A value under a key is replaced by an empty table (an entry keeps its name), else
/// removed (the key's default); an array element by an empty table, `""` or `0`, whichever
/// reads, so the elements after it keep their indices (and a rule error about the stand-in is
/// left out by [`with_rules`], being on the same key); only an element none of them fits is
/// removed. Ends: each value takes at most three stand-ins, then is removed.
fn read<T: DeserializeOwned + Default, N: Tree>(mut tree: N) -> Parsed<T> {
    let mut errors = Vec::new();
    if !tree.is_table() {
        errors.push(ConfigError {
            key: "document".into(),
            message: format!("expected {}, got {}", N::TABLE, tree.describe()),
        });
        return Parsed {
            value: T::default(),
            errors,
            unknown: Vec::new(),
        };
    }
    // The value last given a stand-in, and how many it had: an error there again means the
    // stand-in does not fit either (no second message).
    let mut tried: Option<(Vec<Step>, usize)> = None;
    loop {
        let (mut path, message) = match tree.clone().attempt::<T>() {
            Ok((value, unknown)) => {
                return Parsed {
                    value,
                    errors,
                    unknown,
                }
            }
            Err(e) => e,
        };
        // The deepest part of the path that is in the tree (a path past a value names the
        // value itself).
        while !path.is_empty() && node_mut(&mut tree, &path).is_none() {
            path.pop();
        }
        let Some(node) = node_mut(&mut tree, &path).filter(|_| !path.is_empty()) else {
            // Not a value's fault: nothing to take out.
            errors.push(ConfigError {
                key: "document".into(),
                message: friendly::<N>(&message, None),
            });
            return Parsed {
                value: T::default(),
                errors,
                unknown: Vec::new(),
            };
        };
        let next = match tried.take() {
            Some((p, n)) if p == path => n,
            _ => {
                errors.push(ConfigError {
                    key: display(&path),
                    message: friendly::<N>(&message, Some(node.describe())),
                });
                // A table needs no empty table in its place.
                usize::from(node.is_table())
            }
        };
        let in_array = matches!(path.last(), Some(Step::Index(_)));
        let stand_in = if in_array || next == 0 {
            N::stand_in(next)
        } else {
            None
        };
        match stand_in {
            Some(v) => {
                *node = v;
                tried = Some((path, next + 1));
            }
            None => {
                if let Some((last, parent)) = path.split_last() {
                    if let Some(p) = node_mut(&mut tree, parent) {
                        p.remove_child(last);
                    }
                }
            }
        }
    }
}

fn node_mut<'t, N: Tree>(tree: &'t mut N, path: &[Step]) -> Option<&'t mut N> {
    path.iter().try_fold(tree, |n, s| n.child_mut(s))
}

/// `routes[1].cost`.
fn display(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    let mut out = Vec::new();
    for s in path.iter() {
        match s {
            Segment::Seq { index } => out.push(Step::Index(*index)),
            Segment::Map { key } => out.push(Step::Key(key.clone())),
            Segment::Enum { variant } => out.push(Step::Key(variant.clone())),
            Segment::Unknown => break,
        }
    }
    out
}

/// serde's `invalid type: string "two", expected i64` as `expected an integer, got string
/// "two"`; other messages as they are.
fn friendly<N: Tree>(message: &str, got: Option<String>) -> String {
    if message.starts_with("data did not match any variant of untagged enum OneOrMany") {
        return match got {
            Some(got) => format!("expected a string or an array of strings, got {got}"),
            None => "expected a string or an array of strings".into(),
        };
    }
    if message.starts_with("invalid length ") && message.contains(", expected struct ") {
        let got = got.unwrap_or_else(|| "an array".into());
        return format!("expected {}, got {got}", N::TABLE);
    }
    let (rest, range) = match (
        message.strip_prefix("invalid type: "),
        message.strip_prefix("invalid value: "),
    ) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => return message.to_string(),
    };
    let Some((serde_got, want)) = rest.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let want = match want {
        "i64" | "u64" | "u32" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "a sequence" => "an array",
        "a map" => N::TABLE,
        w if w.starts_with("struct ") => N::TABLE,
        w => w,
    };
    let got = got.unwrap_or_else(|| serde_got.replace('`', ""));
    if range {
        format!("expected {want} in range, got {got}")
    } else {
        format!("expected {want}, got {got}")
    }
}

/// One read through `serde_ignored` (unknown keys) and `serde_path_to_error` (the error's path).
fn attempt_with<'de, D, T>(
    de: D,
    message: impl Fn(&D::Error) -> String,
) -> Result<(T, Vec<String>), (Vec<Step>, String)>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(key_path(&path));
    let ignoring = serde_ignored::Deserializer::new(de, &mut note);
    match serde_path_to_error::deserialize(ignoring) {
        Ok(v) => Ok((v, unknown)),
        Err(e) => Err((steps(e.path()), message(e.inner()))),
    }
}

// === impl Tree for toml::Value ===

impl Tree for toml::Value {
    const TABLE: &'static str = "a table";

    fn attempt<T: DeserializeOwned>(self) -> Result<(T, Vec<String>), (Vec<Step>, String)> {
        attempt_with(self, |e: &toml::de::Error| e.message().to_string())
    }

    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get_mut(k),
            (toml::Value::Array(a), Step::Index(i)) => a.get_mut(*i),
            _ => None,
        }
    }

    fn remove_child(&mut self, step: &Step) {
        match (self, step) {
            (toml::Value::Table(t), Step::Key(k)) => {
                t.remove(k);
            }
            (toml::Value::Array(a), Step::Index(i)) if *i < a.len() => {
                a.remove(*i);
            }
            _ => {}
        }
    }

    fn is_table(&self) -> bool {
        self.is_table()
    }

    fn stand_in(n: usize) -> Option<Self> {
        match n {
            0 => Some(toml::Value::Table(toml::Table::new())),
            1 => Some(toml::Value::String(String::new())),
            2 => Some(toml::Value::Integer(0)),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            toml::Value::String(s) => format!("string {s:?}"),
            toml::Value::Integer(n) => format!("integer {n}"),
            toml::Value::Float(x) => format!("float {x}"),
            toml::Value::Boolean(b) => format!("boolean {b}"),
            toml::Value::Datetime(d) => format!("datetime {d}"),
            toml::Value::Array(_) => "an array".into(),
            toml::Value::Table(_) => "a table".into(),
        }
    }
}

// === impl Tree for serde_json::Value ===

impl Tree for serde_json::Value {
    const TABLE: &'static str = "an object";

    fn attempt<T: DeserializeOwned>(self) -> Result<(T, Vec<String>), (Vec<Step>, String)> {
        attempt_with(self, |e: &serde_json::Error| e.to_string())
    }

    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (serde_json::Value::Object(m), Step::Key(k)) => m.get_mut(k),
            (serde_json::Value::Array(a), Step::Index(i)) => a.get_mut(*i),
            _ => None,
        }
    }

    fn remove_child(&mut self, step: &Step) {
        match (self, step) {
            (serde_json::Value::Object(m), Step::Key(k)) => {
                m.remove(k);
            }
            (serde_json::Value::Array(a), Step::Index(i)) if *i < a.len() => {
                a.remove(*i);
            }
            _ => {}
        }
    }

    fn is_table(&self) -> bool {
        self.is_object()
    }

    fn stand_in(n: usize) -> Option<Self> {
        match n {
            0 => Some(serde_json::Value::Object(serde_json::Map::new())),
            1 => Some(serde_json::Value::String(String::new())),
            2 => Some(serde_json::Value::from(0)),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            serde_json::Value::Null => "null".into(),
            serde_json::Value::Bool(b) => format!("boolean {b}"),
            serde_json::Value::Number(n) if n.is_f64() => format!("number {n}"),
            serde_json::Value::Number(n) => format!("integer {n}"),
            serde_json::Value::String(s) => format!("string {s:?}"),
            serde_json::Value::Array(_) => "an array".into(),
            serde_json::Value::Object(_) => "an object".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::live_doc::LiveDoc;
    use crate::config::Config;

    fn errors(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    const BASE: &str = r#"
[auth]
algorithms = ["HS256"]
secret_env = "S"
[upstreams.api]
targets = ["127.0.0.1:9000"]
[meters.api_calls]
[plans.free]
default = true
quotas.api_calls = { included = 100 }
[[routes]]
match = "GET /a"
upstream = "api"
"#;

    /// Two type errors in different places and a rule error are all reported, each with its
    /// key path; the first type error does not hide the rest.
    #[test]
    fn every_type_error_is_listed_with_the_rule_errors() {
        let e = errors(&format!(
            "{BASE}[[routes]]\nmatch = \"GET /b\"\nupstream = \"api\"\ncost = \"two\"\n\
             [proxy]\nthreads = true\n\
             [[routes]]\nmatch = \"GET /c\"\nupstream = \"nope\"\n"
        ));
        assert_eq!(
            e,
            vec![
                "proxy.threads: expected an integer, got boolean true",
                "routes[1].cost: expected an integer, got string \"two\"",
                "routes[2].upstream: unknown upstream \"nope\"",
            ],
        );
    }

    /// Elements of an array keep their indices after a bad one (a rule error on a later element
    /// names it as written); a table where a value belongs, and the untagged `audience`, read
    /// well too.
    #[test]
    fn array_elements_tables_and_either_shapes_have_their_paths() {
        let e = errors(
            &BASE
                .replace(
                    "targets = [\"127.0.0.1:9000\"]",
                    "targets = [\"127.0.0.1:9000\", 5, \"bad\", { a = 1 }]",
                )
                .replace("default = true", "default = true\nrank = { x = 1 }")
                .replace("secret_env = \"S\"", "secret_env = \"S\"\naudience = 5"),
        );
        assert_eq!(
            e,
            vec![
                "auth.audience: expected a string or an array of strings, got integer 5",
                "plans.free.rank: expected an integer, got a table",
                "upstreams.api.targets[1]: expected a string, got integer 5",
                "upstreams.api.targets[3]: expected a string, got a table",
                "upstreams.api.targets[2]: not a host:port: \"bad\"",
            ],
        );
    }

    /// A value left out for its type gets no second message from a rule (`targets` would
    /// otherwise also be "needs at least one host:port"), and the rest of its entry is still
    /// checked; unknown keys are reported with the type errors.
    #[test]
    fn a_bad_value_is_reported_once_and_its_entry_still_checked() {
        let e = errors(&format!(
            "{BASE}[upstreams.b]\ntargets = \"10.0.0.1:80\"\nhealth_check_seconds = -1\nhots = 1\n"
        ));
        assert_eq!(
            e,
            vec![
                "upstreams.b.targets: expected an array, got string \"10.0.0.1:80\"",
                "upstreams.b.hots: unknown key",
                "upstreams.b.health_check_seconds: must be ≥ 0, got -1",
            ],
        );
    }

    /// A whole entry of the wrong type keeps its name, so what refers to it still resolves.
    #[test]
    fn an_entry_of_the_wrong_type_keeps_its_name() {
        let e = errors(&BASE.replace(
            "[upstreams.api]\ntargets = [\"127.0.0.1:9000\"]",
            "[upstreams]\napi = \"127.0.0.1:9000\"",
        ));
        assert_eq!(
            e,
            vec!["upstreams.api: expected a table, got string \"127.0.0.1:9000\""]
        );
    }

    /// A TOML syntax error still names its line (and stops there: nothing else can be read).
    #[test]
    fn a_syntax_error_names_the_line() {
        let e = Config::from_toml(&format!("{BASE}cost = = 2\n")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].key, "toml");
        assert!(e.0[0].message.contains("line 14"), "{}", e.0[0].message);
    }

    /// The admin API's JSON goes through the same path: every type error in the found list.
    #[test]
    fn json_documents_list_every_type_error() {
        let (doc, found) = LiveDoc::from_value(serde_json::json!({
            "routes": [{"match": "GET /a", "cost": 1.5}, {"match": "GET /b", "shadow": "yes"}],
            "plans": {"free": {"default": true, "burst": null}},
        }))
        .unwrap();
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            vec![
                "routes[0].cost: expected an integer, got number 1.5",
                "routes[1].shadow: expected a boolean, got string \"yes\"",
            ]
        );
        assert_eq!(
            doc.routes.len(),
            2,
            "the entries stay, less their bad values"
        );
        assert_eq!(doc.routes[0].cost, None);
        let e = LiveDoc::from_json(b"[1]").unwrap().1;
        assert_eq!(
            e[0].to_string(),
            "document: expected an object, got an array"
        );
        assert_eq!(LiveDoc::from_json(b"{").unwrap_err().0[0].key, "document");
    }
}
