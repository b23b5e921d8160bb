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

use crate::admin::{authorize, problem, AdminState};
use crate::config::live::{LiveDoc, Section};
use crate::ledger::ConfigVersion;
use crate::liveconfig::{LiveError, Proposal, Write};
use crate::respond::PROBLEM_TYPE_PREFIX;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;

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
    let actor = author(headers).unwrap_or_else(|_| "admin".into());
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

/// The one mapping from live-config errors to responses.
fn refused(e: LiveError) -> Response {
    match e {
        LiveError::Invalid(errors) => {
            let list: Vec<Value> = errors
                .0
                .iter()
                .map(|e| json!({"key": e.key, "message": e.message}))
                .collect();
            let body = json!({
                "type": format!("{PROBLEM_TYPE_PREFIX}invalid-config"),
                "title": "Bad Request",
                "status": 400,
                "detail": format!("the config has {} error(s); nothing was changed", list.len()),
                "errors": list,
            });
            (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "application/problem+json")],
                body.to_string(),
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
fn changed(p: &Proposal, stored: Option<&ConfigVersion>) -> Response {
    let mut body = json!({
        "dry_run": stored.is_none(),
        "base_version": p.base_version,
        "changes": p.changes,
    });
    if let Some(v) = stored {
        body["version"] = v.version.into();
        body["created_at"] = json!(v.created_at);
        body["author"] = v.author.clone().into();
    }
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

async fn get_config(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    try_resp!(authorize(&s, &headers));
    let snap = s.live.current();
    let mut body = json!({
        "version": snap.version,
        "document": snap.config.live().to_value(),
    });
    if let Ok(Some(v)) = s.live.ledger().config_version(snap.version as i64).await {
        body["created_at"] = json!(v.created_at);
        body["author"] = v.author.into();
    }
    // For `If-Match` on the next change: GET, edit, PUT without clobbering someone else's.
    let etag = format!("\"{}\"", snap.version);
    ([(header::ETAG, etag)], Json(body)).into_response()
}

async fn put_config(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    body: Bytes,
) -> Response {
    try_resp!(authorize(&s, &headers));
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
    try_resp!(authorize(&s, &headers));
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

async fn patch_route(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    patch_entry(s, headers, q, Section::Routes, name, body).await
}

async fn patch_plan(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    patch_entry(s, headers, q, Section::Plans, name, body).await
}

async fn rollback(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
    Path(version): Path<String>,
) -> Response {
    try_resp!(authorize(&s, &headers));
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

async fn list_versions(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Params,
) -> Response {
    try_resp!(authorize(&s, &headers));
    let (before, limit) = try_resp!(page(&q));
    match s.live.ledger().config_versions(before, limit).await {
        Ok(rows) => {
            let next = (rows.len() as i64 == limit)
                .then(|| rows.last().map(|r| r.version))
                .flatten();
            let versions: Vec<Value> = rows
                .into_iter()
                .map(|v| json!({"version": v.version, "created_at": v.created_at, "author": v.author}))
                .collect();
            Json(json!({
                "current": s.live.version(),
                "versions": versions,
                "next_before": next,
            }))
            .into_response()
        }
        Err(e) => refused(e.into()),
    }
}

async fn get_version(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Response {
    try_resp!(authorize(&s, &headers));
    let Ok(version) = version.parse::<i64>() else {
        return no_version(&version);
    };
    match s.live.ledger().config_version(version).await {
        Ok(Some(v)) => Json(json!({
            "version": v.version,
            "created_at": v.created_at,
            "author": v.author,
            "document": serde_json::from_str::<Value>(&v.document).unwrap_or(Value::String(v.document)),
        }))
        .into_response(),
        Ok(None) => refused(LiveError::UnknownVersion(version)),
        Err(e) => refused(e.into()),
    }
}

async fn audit(State(s): State<AdminState>, headers: HeaderMap, Query(q): Params) -> Response {
    try_resp!(authorize(&s, &headers));
    let (before, limit) = try_resp!(page(&q));
    match s.live.ledger().audit_entries(before, limit).await {
        Ok(rows) => {
            let next = (rows.len() as i64 == limit)
                .then(|| rows.last().map(|r| r.id))
                .flatten();
            let as_json = |t: Option<String>| {
                t.map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::String(t)))
            };
            let entries: Vec<Value> = rows
                .into_iter()
                .map(|e| {
                    json!({
                        "id": e.id,
                        "at": e.at,
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "before": as_json(e.before),
                        "after": as_json(e.after),
                    })
                })
                .collect();
            Json(json!({"entries": entries, "next_before": next})).into_response()
        }
        Err(e) => refused(e.into()),
    }
}
