//! The live-config admin API (issue 4), on the admin listener behind the admin bearer token:
//!
//! | call | does |
//! | --- | --- |
//! | `GET /admin/config` | version in force + its live document (JSON in the TOML's structure) |
//! | `PUT /admin/config` | replaces the live document (JSON, or TOML with `Content-Type: application/toml`) |
//! | `PATCH /admin/routes/{name}`, `/admin/plans/{name}` | merges fields into one entry (RFC 7396) |
//! | `POST /admin/config/rollback/{version}` | makes a stored version's document current, as a new version |
//! | `GET /admin/config/versions[/{version}]` | version history (newest first, `?limit=&before=`) / one document |
//! | `GET /admin/audit` | the audit log (newest first, `?limit=&before=`) |
//!
//! Every change takes `?dry_run=true` (answers what would change, stores nothing) and is made by
//! the *actor* named in `X-Tollgate-Actor` (recorded as `admin:{actor}`; plain `admin` without
//! it): the admin token is one shared secret, so the header is how operators tell each other
//! apart in the history. A refused document is 400 `invalid-config` listing every error with
//! its key, exactly as `check-config` reports them. `GET /admin/config` sends the version as
//! `ETag`; a change with `If-Match: "N"` is refused with 412 unless version N is still in force,
//! so "GET, edit, PUT" cannot silently undo someone else's change.
//!
//! Owns: these HTTP shapes. Must not touch: versioning, validation, apply and their audit rows
//! (`control::live_config`'s), the header syntax (`admin::extract`), the error mapping
//! (`admin::error`).

use crate::admin::error::{AdminError, InvalidConfig, Problem, VersionRef};
use crate::admin::extract::{json_body, Intent};
use crate::admin::AdminState;
use crate::config::live_doc::{Change, LiveDoc, Section};
use crate::control::live_config::{LiveError, Proposal};
use crate::ledger::ConfigVersion;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Default and largest page of the history listings.
const PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

/// The live-config routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/config", get(get_config).put(put_config))
        .route("/admin/config/versions", get(list_versions))
        .route("/admin/config/versions/{version}", get(get_version))
        .route("/admin/config/rollback/{version}", post(rollback))
        .route("/admin/routes/{name}", patch(patch_route))
        .route("/admin/plans/{name}", patch(patch_plan))
        .route("/admin/audit", get(audit))
}

type Params = Query<HashMap<String, String>>;

/// `(before, limit)` of a history listing.
fn page(q: &HashMap<String, String>) -> Result<(Option<i64>, i64), AdminError> {
    let bad = |what: &str| {
        AdminError::InvalidQuery(format!(
            "{what} must be an integer ≥ 1 (limit at most {MAX_PAGE})"
        ))
    };
    let before = match q.get("before") {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad("before"))?,
        ),
    };
    let limit = match q.get("limit") {
        None => PAGE,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| bad("limit"))?,
    };
    Ok((before, limit))
}

/// A stored version named in a path: text that is no number is no version (404, not 400).
fn version_of(path: String) -> Result<i64, AdminError> {
    path.parse::<i64>()
        .map_err(|_| AdminError::UnknownConfigVersion(VersionRef::Text(path)))
}

/// The answer to a change (or a dry run of one).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChangeAnswer {
    /// True when nothing was stored (`?dry_run=true`); then the last three fields are absent.
    dry_run: bool,
    /// The version the change was computed against.
    base_version: u64,
    /// What changes, leaf by leaf (`routes.{name}.cost`, …).
    changes: Vec<Change>,
    /// The new version (absent on a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<DateTime<Utc>>,
    /// `admin` or `admin:{X-Tollgate-Actor}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    author: Option<String>,
}

fn changed(p: &Proposal, stored: Option<&ConfigVersion>) -> Json<ChangeAnswer> {
    Json(ChangeAnswer {
        dry_run: stored.is_none(),
        base_version: p.base_version,
        changes: p.changes.clone(),
        version: stored.map(|v| v.version),
        created_at: stored.map(|v| v.created_at),
        author: stored.map(|v| v.author.clone()),
    })
}

/// Answer of `GET /admin/config`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConfigView {
    /// The version in force (also sent as `ETag`).
    version: u64,
    /// The live document: the config file's routes, plans, meters and upstreams, as JSON in the
    /// TOML's structure (what `PUT /admin/config` takes).
    document: Value,
    /// When and by whom the version was stored (absent when the ledger has no row for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    author: Option<String>,
}

/// The config version in force and its live document.
#[utoipa::path(
    get,
    path = "/admin/config",
    tag = "config",
    responses(
        (status = 200, description = "the version in force", body = ConfigView,
            headers(("ETag" = String, description = "the version, quoted: send it back as `If-Match`"))),
    ),
)]
pub(crate) async fn get_config(State(s): State<AdminState>) -> Response {
    let snap = s.live.current();
    let stored = s
        .live
        .ledger()
        .config_version(snap.version as i64)
        .await
        .ok()
        .flatten();
    let body = ConfigView {
        version: snap.version,
        document: snap.config.live().to_value(),
        created_at: stored.as_ref().map(|v| v.created_at),
        author: stored.map(|v| v.author),
    };
    // For `If-Match` on the next change: GET, edit, PUT without clobbering someone else's.
    let etag = format!("\"{}\"", snap.version);
    ([(header::ETAG, etag)], Json(body)).into_response()
}

/// Replaces the live document (validated like `check-config`, stored as a new version, applied
/// atomically and broadcast to every instance).
#[utoipa::path(
    put,
    path = "/admin/config",
    tag = "config",
    params(
        Intent,
    ),
    request_body(
        description = "the whole live document, as `GET /admin/config` shows it, or the TOML file's text",
        content((Value = "application/json"), (String = "application/toml")),
    ),
    responses(
        (status = 200, description = "what changed, and the new version unless a dry run", body = ChangeAnswer),
        (status = 400, description = "a bad query, actor or If-Match header", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "`invalid-config`: the resulting document breaks a `check-config` rule; every error is listed and nothing is changed", body = InvalidConfig, content_type = "application/problem+json"),
        (status = 412, description = "If-Match names a version no longer in force", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn put_config(
    State(s): State<AdminState>,
    intent: Intent,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ChangeAnswer>, AdminError> {
    let w = intent.write()?;
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/toml"));
    let parsed = if toml {
        let text =
            std::str::from_utf8(&body).map_err(|e| AdminError::InvalidBody(e.to_string()))?;
        LiveDoc::from_toml(text)
    } else {
        LiveDoc::from_json(&body)
    };
    let (doc, found) = parsed.map_err(LiveError::Invalid)?;
    let (p, v) = s.live.put(&w, doc, found).await?;
    Ok(changed(&p, v.as_ref()))
}

async fn patch_entry(
    s: AdminState,
    intent: Intent,
    section: Section,
    name: String,
    body: Bytes,
) -> Result<Json<ChangeAnswer>, AdminError> {
    let w = intent.write()?;
    let patch: Value = json_body(&body)?;
    if !patch.is_object() {
        return Err(AdminError::InvalidBody(
            "a JSON object of the fields to change is expected".into(),
        ));
    }
    let (p, v) = s.live.patch(&w, section, &name, &patch).await?;
    Ok(changed(&p, v.as_ref()))
}

/// Merges fields into one route (JSON merge patch, RFC 7396); validated, versioned and applied
/// like `PUT /admin/config`.
#[utoipa::path(
    patch,
    path = "/admin/routes/{name}",
    tag = "config",
    params(
        ("name" = String, Path, description = "the route's name, or its `match` (URL-encoded, e.g. `GET%20%2Fsignals`)"),
        Intent,
    ),
    request_body(content = Value, description = "a JSON object of the fields to change (null removes one)", content_type = "application/json"),
    responses(
        (status = 200, description = "what changed, and the new version unless a dry run", body = ChangeAnswer),
        (status = 400, description = "a bad query, actor or If-Match header", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "`invalid-config`: the resulting document breaks a `check-config` rule; every error is listed and nothing is changed", body = InvalidConfig, content_type = "application/problem+json"),
        (status = 404, description = "no such route", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match names a version no longer in force", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn patch_route(
    State(s): State<AdminState>,
    intent: Intent,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ChangeAnswer>, AdminError> {
    patch_entry(s, intent, Section::Routes, name, body).await
}

/// Merges fields into one plan (JSON merge patch, RFC 7396); validated, versioned and applied
/// like `PUT /admin/config`.
#[utoipa::path(
    patch,
    path = "/admin/plans/{name}",
    tag = "config",
    params(
        ("name" = String, Path, description = "the plan's name"),
        Intent,
    ),
    request_body(content = Value, description = "a JSON object of the fields to change (null removes one)", content_type = "application/json"),
    responses(
        (status = 200, description = "what changed, and the new version unless a dry run", body = ChangeAnswer),
        (status = 400, description = "a bad query, actor or If-Match header", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "`invalid-config`: the resulting document breaks a `check-config` rule; every error is listed and nothing is changed", body = InvalidConfig, content_type = "application/problem+json"),
        (status = 404, description = "no such plan", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match names a version no longer in force", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn patch_plan(
    State(s): State<AdminState>,
    intent: Intent,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ChangeAnswer>, AdminError> {
    patch_entry(s, intent, Section::Plans, name, body).await
}

/// Makes a stored version's document current again, as a new version.
#[utoipa::path(
    post,
    path = "/admin/config/rollback/{version}",
    tag = "config",
    params(
        ("version" = i64, Path, description = "the stored version to bring back"),
        Intent,
    ),
    responses(
        (status = 200, description = "what changed, and the new version unless a dry run", body = ChangeAnswer),
        (status = 400, description = "a bad query, actor or If-Match header", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "`invalid-config`: the resulting document breaks a `check-config` rule; every error is listed and nothing is changed", body = InvalidConfig, content_type = "application/problem+json"),
        (status = 404, description = "no such config version", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match names a version no longer in force", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn rollback(
    State(s): State<AdminState>,
    intent: Intent,
    Path(version): Path<String>,
) -> Result<Json<ChangeAnswer>, AdminError> {
    let w = intent.write()?;
    let (p, v) = s.live.rollback(&w, version_of(version)?).await?;
    Ok(changed(&p, v.as_ref()))
}

/// One stored config version, without its document.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionSummary {
    version: i64,
    created_at: DateTime<Utc>,
    author: String,
}

/// Answer of `GET /admin/config/versions`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionList {
    /// The version in force on this instance.
    current: u64,
    /// Newest first.
    versions: Vec<VersionSummary>,
    /// `before` of the next page; null on the last.
    next_before: Option<i64>,
}

/// The config version history, newest first.
#[utoipa::path(
    get,
    path = "/admin/config/versions",
    tag = "config",
    params(
        ("limit" = Option<i64>, Query, description = "page size, 1-500 (default 50)"),
        ("before" = Option<i64>, Query, description = "the `next_before` of the previous page"),
    ),
    responses(
        (status = 200, description = "one page of versions", body = VersionList),
        (status = 400, description = "a bad `limit` or `before`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list_versions(
    State(s): State<AdminState>,
    Query(q): Params,
) -> Result<Json<VersionList>, AdminError> {
    let (before, limit) = page(&q)?;
    let rows = s.live.ledger().config_versions(before, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.version))
        .flatten();
    let versions = rows
        .into_iter()
        .map(|v| VersionSummary {
            version: v.version,
            created_at: v.created_at,
            author: v.author,
        })
        .collect();
    Ok(Json(VersionList {
        current: s.live.version(),
        versions,
        next_before: next,
    }))
}

/// Answer of `GET /admin/config/versions/{version}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionDoc {
    version: i64,
    created_at: DateTime<Utc>,
    author: String,
    /// The live document of that version (as in `GET /admin/config`).
    document: Value,
}

/// One stored config version with its document.
#[utoipa::path(
    get,
    path = "/admin/config/versions/{version}",
    tag = "config",
    params(("version" = i64, Path, description = "a stored version")),
    responses(
        (status = 200, description = "the version and its document", body = VersionDoc),
        (status = 404, description = "no such config version", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn get_version(
    State(s): State<AdminState>,
    Path(version): Path<String>,
) -> Result<Json<VersionDoc>, AdminError> {
    let version = version_of(version)?;
    let v =
        s.live
            .ledger()
            .config_version(version)
            .await?
            .ok_or(AdminError::UnknownConfigVersion(VersionRef::Number(
                version,
            )))?;
    Ok(Json(VersionDoc {
        version: v.version,
        created_at: v.created_at,
        author: v.author,
        document: serde_json::from_str::<Value>(&v.document).unwrap_or(Value::String(v.document)),
    }))
}

/// One admin mutation in `audit_log`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditItem {
    id: i64,
    at: DateTime<Utc>,
    /// `admin` or `admin:{X-Tollgate-Actor}` (or `stripe`, `sighup`, … for non-API changes).
    actor: String,
    /// `config.put`, `config.patch`, `customer.suspend`, `customer.credit`, …
    action: String,
    /// What changed: `config`, `routes/{name}`, `customers/{id}`, …
    target: String,
    /// The state before and after (JSON when stored as JSON, else the stored text).
    before: Option<Value>,
    after: Option<Value>,
}

/// Answer of `GET /admin/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditPage {
    /// Newest first.
    entries: Vec<AuditItem>,
    /// `before` of the next page; null on the last.
    next_before: Option<i64>,
}

/// The audit log of admin mutations, newest first.
#[utoipa::path(
    get,
    path = "/admin/audit",
    tag = "config",
    params(
        ("limit" = Option<i64>, Query, description = "page size, 1-500 (default 50)"),
        ("before" = Option<i64>, Query, description = "the `next_before` of the previous page"),
    ),
    responses(
        (status = 200, description = "one page of entries", body = AuditPage),
        (status = 400, description = "a bad `limit` or `before`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn audit(
    State(s): State<AdminState>,
    Query(q): Params,
) -> Result<Json<AuditPage>, AdminError> {
    let (before, limit) = page(&q)?;
    let rows = s.live.ledger().audit_entries(before, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let as_json = |t: Option<String>| {
        t.map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::String(t)))
    };
    let entries = rows
        .into_iter()
        .map(|e| AuditItem {
            id: e.id,
            at: e.at,
            actor: e.actor,
            action: e.action,
            target: e.target,
            before: as_json(e.before),
            after: as_json(e.after),
        })
        .collect();
    Ok(Json(AuditPage {
        entries,
        next_before: next,
    }))
}
