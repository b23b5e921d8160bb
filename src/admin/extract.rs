//! What admin handlers read from a request besides their state: the *write intent* of a change
//! ([`Intent`]: `?dry_run`, `X-Tollgate-Actor`, `If-Match`), the customer id of the path
//! ([`CustomerId`]) and JSON bodies ([`json_body`]), each refused as the matching [`AdminError`].
//!
//! Owns: the syntax of those three inputs. Must not touch: what a change does with them
//! (`control::live_config` for config versions, the handlers for the rest).

use crate::admin::error::AdminError;
use crate::control::live_config::Write;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use std::collections::HashMap;
use std::convert::Infallible;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{RefOr, Required};
use utoipa::PartialSchema;

/// The `{id}` of a `/admin/customers/{id}/…` path, checked against the one customer id rule:
/// 400 `invalid-customer-id` otherwise (a CR/LF or NUL in an id would forge log lines or break
/// storage keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CustomerId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for CustomerId {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<CustomerId, AdminError> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| AdminError::InvalidCustomerId("the customer id is not valid UTF-8"))?;
        crate::entitle::check_customer_id(&id).map_err(AdminError::InvalidCustomerId)?;
        Ok(CustomerId(id))
    }
}

/// Header naming who makes a change.
pub(crate) const ACTOR_HEADER: &str = "x-tollgate-actor";

/// The write intent of a change, read once for every mutating handler. Reading it never fails:
/// config changes are refused on a malformed part ([`Intent::write`]); the other mutations have
/// always taken any header and audit a malformed actor as plain `admin` ([`Intent::actor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Intent {
    /// `admin:{X-Tollgate-Actor}`, or `admin` without the header; `None` when it is malformed.
    actor: Option<String>,
    /// `?dry_run=`, or the value that is not a boolean.
    dry_run: Result<bool, String>,
    /// `If-Match`: the version the change is based on (`None` for `*` or absent); `Err` when it is
    /// neither.
    if_match: Result<Option<u64>, ()>,
}

impl<S: Send + Sync> FromRequestParts<S> for Intent {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Intent, Infallible> {
        // A query decodes into a string map whatever it holds (decoding is lossy, never fails).
        let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .map(|Query(q)| q)
            .unwrap_or_default();
        Ok(Intent::read(&parts.headers, &query))
    }
}

/// The three inputs in the OpenAPI document of every config change (`params(Intent, …)`), here
/// beside the code that reads them.
impl utoipa::IntoParams for Intent {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let optional = |name: &str, at: ParameterIn, description: &str, schema| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(at)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(schema))
                .build()
        };
        vec![
            optional(
                "dry_run",
                ParameterIn::Query,
                "answer what would change; store nothing",
                bool::schema(),
            ),
            optional(
                "X-Tollgate-Actor",
                ParameterIn::Header,
                "who makes the change (1-64 printable ASCII), recorded as `admin:{actor}`",
                nullable_string(),
            ),
            optional(
                "If-Match",
                ParameterIn::Header,
                "the version the change is based on, e.g. `\"7\"`: refused with 412 unless it is \
                 still in force",
                nullable_string(),
            ),
        ]
    }
}

/// `Option<String>` as the `params` tuples document it (`type: [string, null]`).
fn nullable_string() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .into()
}

// === impl Intent ===

impl Intent {
    fn read(headers: &HeaderMap, query: &HashMap<String, String>) -> Intent {
        Intent {
            actor: actor(headers),
            dry_run: match query.get("dry_run").map(String::as_str) {
                None | Some("false") | Some("0") => Ok(false),
                Some("true") | Some("1") | Some("") => Ok(true),
                Some(o) => Err(o.to_string()),
            },
            if_match: if_match(headers),
        }
    }

    /// A config change's [`Write`]: 400 `invalid-actor`, `invalid-query` (`dry_run`) or
    /// `invalid-if-match`, checked in that order, when a part is malformed.
    pub(crate) fn write(&self) -> Result<Write<'_>, AdminError> {
        let author = self.actor.as_deref().ok_or(AdminError::InvalidActor)?;
        let dry_run = self.dry_run.clone().map_err(|o| {
            AdminError::InvalidQuery(format!("dry_run must be true or false, got {o:?}"))
        })?;
        let if_version = self.if_match.map_err(|()| AdminError::InvalidIfMatch)?;
        Ok(Write {
            author,
            dry_run,
            if_version,
        })
    }

    /// The audit actor of a change that is not a config version: `admin:{X-Tollgate-Actor}`, or
    /// `admin` when the header is absent or malformed (those changes never refused it).
    pub(crate) fn actor(&self) -> &str {
        self.actor.as_deref().unwrap_or("admin")
    }
}

/// `admin:{actor}` from `X-Tollgate-Actor` (1-64 printable ASCII once trimmed), `admin` without
/// it, `None` when it is malformed.
fn actor(headers: &HeaderMap) -> Option<String> {
    let Some(v) = headers.get(ACTOR_HEADER) else {
        return Some("admin".into());
    };
    match v.to_str() {
        Ok(s)
            if !s.trim().is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| (32..127).contains(&b)) =>
        {
            Some(format!("admin:{}", s.trim()))
        }
        _ => None,
    }
}

/// `If-Match: "7"` (or `7`, `W/"7"`): that version; `*` or absent: any (`None`).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or_default().trim();
    if s == "*" {
        return Ok(None);
    }
    s.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| ())
}

/// The `limit` query parameter: `default` when absent, else an integer from 1 to `max`
/// (400 `invalid-query` otherwise).
pub(crate) fn limit(
    q: &std::collections::HashMap<String, String>,
    default: i64,
    max: i64,
) -> Result<i64, AdminError> {
    match q.get("limit").map(|l| l.parse::<i64>()) {
        None => Ok(default),
        Some(Ok(l)) if (1..=max).contains(&l) => Ok(l),
        Some(_) => Err(AdminError::InvalidQuery(format!(
            "limit must be an integer from 1 to {max}"
        ))),
    }
}

/// A JSON request body, or the 400 `invalid-body` naming what is wrong with it.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| AdminError::InvalidBody(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn intent(headers: &[(&str, &str)], query: &[(&str, &str)]) -> Intent {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let q = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Intent::read(&h, &q)
    }

    /// The actor is `admin` without the header, `admin:{trimmed}` with a good one; a bad one
    /// refuses a config write but audits any other change as `admin`.
    #[test]
    fn actor() {
        assert_eq!(intent(&[], &[]).write().unwrap().author, "admin");
        let i = intent(&[(ACTOR_HEADER, " alice ")], &[]);
        assert_eq!(
            (i.write().unwrap().author, i.actor()),
            ("admin:alice", "admin:alice")
        );
        let long = "a".repeat(65);
        for bad in ["", "   ", long.as_str()] {
            let i = intent(&[(ACTOR_HEADER, bad)], &[]);
            assert!(
                matches!(i.write(), Err(AdminError::InvalidActor)),
                "{bad:?}"
            );
            assert_eq!(i.actor(), "admin");
        }
    }

    /// `dry_run` takes true/1/empty and false/0; `If-Match` a version (quoted, weak) or `*`.
    #[test]
    fn dry_run_and_if_match() {
        for (v, want) in [
            ("true", true),
            ("1", true),
            ("", true),
            ("false", false),
            ("0", false),
        ] {
            assert_eq!(
                intent(&[], &[("dry_run", v)]).write().unwrap().dry_run,
                want
            );
        }
        assert!(matches!(
            intent(&[], &[("dry_run", "yes")]).write(),
            Err(AdminError::InvalidQuery(_))
        ));
        for (v, want) in [
            ("\"7\"", Some(7)),
            ("7", Some(7)),
            ("W/\"7\"", Some(7)),
            ("*", None),
        ] {
            let i = intent(&[("if-match", v)], &[]);
            assert_eq!(i.write().unwrap().if_version, want, "{v}");
        }
        assert!(matches!(
            intent(&[("if-match", "\"abc\"")], &[]).write(),
            Err(AdminError::InvalidIfMatch)
        ));
        // The actor is checked first, then dry_run, then If-Match.
        let all_bad = intent(
            &[(ACTOR_HEADER, ""), ("if-match", "x")],
            &[("dry_run", "maybe")],
        );
        assert!(matches!(all_bad.write(), Err(AdminError::InvalidActor)));
    }
}
