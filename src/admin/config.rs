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
//! Owns: these HTTP shapes, the actor header, and `record_audit` (other admin mutations, e.g.
//! `PUT /admin/customers/{id}`, audit through it). Versioning, validation and apply are
//! `liveconfig`'s.

use crate::admin::{problem, AdminState, Problem};
use crate::config::live_doc::{Change, LiveDoc, Section};
use crate::control::live_config::{LiveError, Proposal, Write};
use crate::ledger::ConfigVersion;
use crate::proxy::respond::PROBLEM_TYPE_PREFIX;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Header naming who makes a change.
pub const ACTOR_HEADER: &str = "x-tollgate-actor";

/// Default and largest page of the history listings.
const PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

/// The live-config routes, merged into the admin router.
pub fn routes() -> Router<AdminState> {
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

/// Who is calling, from `X-Tollgate-Actor` (printable ASCII, at most 64 bytes).
fn author(headers: &HeaderMap) -> Result<String, Box<Response>> {
    let Some(v) = headers.get(ACTOR_HEADER) else {
        return Ok("admin".into());
    };
    match v.to_str() {
        Ok(s)
            if !s.trim().is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| (32..127).contains(&b)) =>
        {
            Ok(format!("admin:{}", s.trim()))
        }
        _ => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "invalid-actor",
            format!("{ACTOR_HEADER} must be 1-64 printable ASCII characters"),
        ))),
    }
}

/// `If-Match: "7"` (or `7`): the version the change was based on; `*` or absent: any.
fn if_version(headers: &HeaderMap) -> Result<Option<u64>, Box<Response>> {
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
        .map_err(|_| {
            Box::new(problem(
                StatusCode::BAD_REQUEST,
                "invalid-if-match",
                "If-Match must be a config version, e.g. \"7\"",
            ))
        })
}

/// Who, dry run or not, and on which version, from a change's request.
fn write_of(
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<(String, bool, Option<u64>), Box<Response>> {
    Ok((author(headers)?, dry_run(q)?, if_version(headers)?))
}

fn dry_run(q: &HashMap<String, String>) -> Result<bool, Box<Response>> {
    match q.get("dry_run").map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(o) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            format!("dry_run must be true or false, got {o:?}"),
        ))),
    }
}

/// `(before, limit)` of a history listing.
fn page(q: &HashMap<String, String>) -> Result<(Option<i64>, i64), Box<Response>> {
    let bad = |what: &str| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            format!("{what} must be an integer ≥ 1 (limit at most {MAX_PAGE})"),
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

/// The actor of a change for its audit row: `admin:{X-Tollgate-Actor}`, or `admin` when the
/// header is absent or unusable.
pub(crate) fn actor(headers: &HeaderMap) -> String {
    author(headers).unwrap_or_else(|_| "admin".into())
}

/// Records an admin mutation that is not a config version (customers, …) in `audit_log`, by the
/// caller's actor. Best effort: the change is already made; a failure is logged, not answered.
pub(crate) async fn record_audit(
    s: &AdminState,
    headers: &HeaderMap,
    action: &str,
    target: String,
    before: Option<String>,
    after: Option<String>,
) {
    let actor = actor(headers);
    let record = crate::ledger::AuditRecord {
        action: action.into(),
        target,
        before,
        after,
    };
    if let Err(e) = s.ledger.insert_audit(&actor, &record).await {
        tracing::warn!(error = %e, action, target = %record.target, "admin change not audited");
    }
}

/// One error of a refused config document, exactly as `check-config` reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyedError {
    /// The key path, e.g. `routes[2].cost`.
    pub key: String,
    pub message: String,
}

/// The 400 `invalid-config` problem: a [`Problem`] that lists every error of the document.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvalidConfig {
    /// `urn:tollgate:problem:invalid-config`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub errors: Vec<KeyedError>,
}

/// The one mapping from live-config errors to responses.
fn refused(e: LiveError) -> Response {
    match e {
        LiveError::Invalid(errors) => {
            let errors: Vec<KeyedError> = errors
                .0
                .iter()
                .map(|e| KeyedError {
                    key: e.key.clone(),
                    message: e.message.clone(),
                })
                .collect();
            let body = InvalidConfig {
                kind: format!("{PROBLEM_TYPE_PREFIX}invalid-config"),
                title: "Bad Request".into(),
                status: 400,
                detail: format!(
                    "the config has {} error(s); nothing was changed",
                    errors.len()
                ),
                errors,
            };
            (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "application/problem+json")],
                // Plain strings and numbers: serializing cannot fail.
                serde_json::to_string(&body).unwrap_or_default(),
            )
                .into_response()
        }
        LiveError::UnknownVersion(v) => problem(
            StatusCode::NOT_FOUND,
            "unknown-config-version",
            format!("no config version {v}"),
        ),
        LiveError::UnknownEntry(section, name) => problem(
            StatusCode::NOT_FOUND,
            if section == "routes" {
                "unknown-route"
            } else {
                "unknown-plan"
            },
            format!("no entry {name:?} under {section}"),
        ),
        e @ LiveError::VersionMismatch { .. } => problem(
            StatusCode::PRECONDITION_FAILED,
            "config-version-mismatch",
            e.to_string(),
        ),
        LiveError::Ledger(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger-unavailable",
            e.to_string(),
        ),
        e @ LiveError::Stored(..) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored-config-unreadable",
            e.to_string(),
        ),
    }
}

fn no_version(v: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "unknown-config-version",
        format!("no config version {v:?}"),
    )
}

/// The answer to a change (or a dry run of one).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeAnswer {
    /// True when nothing was stored (`?dry_run=true`); then the last three fields are absent.
    pub dry_run: bool,
    /// The version the change was computed against.
    pub base_version: u64,
    /// What changes, leaf by leaf (`routes.{name}.cost`, …).
    pub changes: Vec<Change>,
    /// The new version (absent on a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// `admin` or `admin:{X-Tollgate-Actor}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
}

fn changed(p: &Proposal, stored: Option<&ConfigVersion>) -> Response {
    let body = ChangeAnswer {
        dry_run: stored.is_none(),
        base_version: p.base_version,
        changes: p.changes.clone(),
        version: stored.map(|v| v.version),
        created_at: stored.map(|v| v.created_at),
        author: stored.map(|v| v.author.clone()),
    };
    (StatusCode::OK, Json(body)).into_response()
}

macro_rules! try_resp {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return *r,
        }
    };
}

/// Answer of `GET /admin/config`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigView {
    /// The version in force (also sent as `ETag`).
    pub version: u64,
    /// The live document: the config file's routes, plans, meters and upstreams, as JSON in the
    /// TOML's structure (what `PUT /admin/config` takes).
    pub document: Value,
    /// When and by whom the version was stored (absent when the ledger has no row for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
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
async fn get_config(State(s): State<AdminState>) -> Response {
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
        ("dry_run" = Option<bool>, Query, description = "answer what would change; store nothing"),
        ("X-Tollgate-Actor" = Option<String>, Header, description = "who makes the change (1-64 printable ASCII), recorded as `admin:{actor}`"),
        ("If-Match" = Option<String>, Header, description = "the version the change is based on, e.g. `\"7\"`: refused with 412 unless it is still in force"),
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
async fn put_config(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    body: Bytes,
) -> Response {
    let (author, dry_run, if_version) = try_resp!(write_of(&headers, &q));
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/toml"));
    let parsed = if toml {
        match std::str::from_utf8(&body) {
            Ok(text) => LiveDoc::from_toml(text),
            Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()),
        }
    } else {
        LiveDoc::from_json(&body)
    };
    let (doc, found) = match parsed {
        Ok(d) => d,
        Err(e) => return refused(LiveError::Invalid(e)),
    };
    let w = Write {
        author: &author,
        dry_run,
        if_version,
    };
    match s.live.put(&w, doc, found).await {
        Ok((p, v)) => changed(&p, v.as_ref()),
        Err(e) => refused(e),
    }
}

async fn patch_entry(
    s: AdminState,
    headers: HeaderMap,
    q: HashMap<String, String>,
    section: Section,
    name: String,
    body: Bytes,
) -> Response {
    let (author, dry_run, if_version) = try_resp!(write_of(&headers, &q));
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-body",
                "a JSON object of the fields to change is expected",
            )
        }
        Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()),
    };
    let w = Write {
        author: &author,
        dry_run,
        if_version,
    };
    match s.live.patch(&w, section, &name, &patch).await {
        Ok((p, v)) => changed(&p, v.as_ref()),
        Err(e) => refused(e),
    }
}

/// Merges fields into one route (JSON merge patch, RFC 7396); validated, versioned and applied
/// like `PUT /admin/config`.
#[utoipa::path(
    patch,
    path = "/admin/routes/{name}",
    tag = "config",
    params(
        ("name" = String, Path, description = "the route's name, or its `match` (URL-encoded, e.g. `GET%20%2Fsignals`)"),
        ("dry_run" = Option<bool>, Query, description = "answer what would change; store nothing"),
        ("X-Tollgate-Actor" = Option<String>, Header, description = "who makes the change (1-64 printable ASCII), recorded as `admin:{actor}`"),
        ("If-Match" = Option<String>, Header, description = "the version the change is based on, e.g. `\"7\"`: refused with 412 unless it is still in force"),
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
async fn patch_route(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    patch_entry(s, headers, q, Section::Routes, name, body).await
}

/// Merges fields into one plan (JSON merge patch, RFC 7396); validated, versioned and applied
/// like `PUT /admin/config`.
#[utoipa::path(
    patch,
    path = "/admin/plans/{name}",
    tag = "config",
    params(
        ("name" = String, Path, description = "the plan's name"),
        ("dry_run" = Option<bool>, Query, description = "answer what would change; store nothing"),
        ("X-Tollgate-Actor" = Option<String>, Header, description = "who makes the change (1-64 printable ASCII), recorded as `admin:{actor}`"),
        ("If-Match" = Option<String>, Header, description = "the version the change is based on, e.g. `\"7\"`: refused with 412 unless it is still in force"),
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
async fn patch_plan(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    patch_entry(s, headers, q, Section::Plans, name, body).await
}

/// Makes a stored version's document current again, as a new version.
#[utoipa::path(
    post,
    path = "/admin/config/rollback/{version}",
    tag = "config",
    params(
        ("version" = i64, Path, description = "the stored version to bring back"),
        ("dry_run" = Option<bool>, Query, description = "answer what would change; store nothing"),
        ("X-Tollgate-Actor" = Option<String>, Header, description = "who makes the change (1-64 printable ASCII), recorded as `admin:{actor}`"),
        ("If-Match" = Option<String>, Header, description = "the version the change is based on, e.g. `\"7\"`: refused with 412 unless it is still in force"),
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
async fn rollback(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(version): Path<String>,
) -> Response {
    let (author, dry_run, if_version) = try_resp!(write_of(&headers, &q));
    let Ok(version) = version.parse::<i64>() else {
        return no_version(&version);
    };
    let w = Write {
        author: &author,
        dry_run,
        if_version,
    };
    match s.live.rollback(&w, version).await {
        Ok((p, v)) => changed(&p, v.as_ref()),
        Err(e) => refused(e),
    }
}

/// One stored config version, without its document.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionSummary {
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub author: String,
}

/// Answer of `GET /admin/config/versions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionList {
    /// The version in force on this instance.
    pub current: u64,
    /// Newest first.
    pub versions: Vec<VersionSummary>,
    /// `before` of the next page; null on the last.
    pub next_before: Option<i64>,
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
async fn list_versions(State(s): State<AdminState>, Query(q): Params) -> Response {
    let (before, limit) = try_resp!(page(&q));
    match s.live.ledger().config_versions(before, limit).await {
        Ok(rows) => {
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
            Json(VersionList {
                current: s.live.version(),
                versions,
                next_before: next,
            })
            .into_response()
        }
        Err(e) => refused(e.into()),
    }
}

/// Answer of `GET /admin/config/versions/{version}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionDoc {
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub author: String,
    /// The live document of that version (as in `GET /admin/config`).
    pub document: Value,
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
async fn get_version(State(s): State<AdminState>, Path(version): Path<String>) -> Response {
    let Ok(version) = version.parse::<i64>() else {
        return no_version(&version);
    };
    match s.live.ledger().config_version(version).await {
        Ok(Some(v)) => Json(VersionDoc {
            version: v.version,
            created_at: v.created_at,
            author: v.author,
            document: serde_json::from_str::<Value>(&v.document)
                .unwrap_or(Value::String(v.document)),
        })
        .into_response(),
        Ok(None) => refused(LiveError::UnknownVersion(version)),
        Err(e) => refused(e.into()),
    }
}

/// One admin mutation in `audit_log`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditItem {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `admin` or `admin:{X-Tollgate-Actor}` (or `stripe`, `sighup`, … for non-API changes).
    pub actor: String,
    /// `config.put`, `config.patch`, `customer.suspend`, `customer.credit`, …
    pub action: String,
    /// What changed: `config`, `routes/{name}`, `customers/{id}`, …
    pub target: String,
    /// The state before and after (JSON when stored as JSON, else the stored text).
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Answer of `GET /admin/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditItem>,
    /// `before` of the next page; null on the last.
    pub next_before: Option<i64>,
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
async fn audit(State(s): State<AdminState>, Query(q): Params) -> Response {
    let (before, limit) = try_resp!(page(&q));
    match s.live.ledger().audit_entries(before, limit).await {
        Ok(rows) => {
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
            Json(AuditPage {
                entries,
                next_before: next,
            })
            .into_response()
        }
        Err(e) => refused(e.into()),
    }
}
