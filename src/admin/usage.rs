//! Usage reports (issue 4): `GET /admin/usage` on the admin listener, from the ledger.
//!
//! Query: `customer`, `meter`, `route` (exact filters, all optional), `from` / `to` (RFC 3339 or
//! `YYYY-MM-DD` = midnight UTC; the range is `[from, to)`, defaults: the 30 days up to now; at
//! most 400 days), `group_by` = `day` (UTC, the default) | `route` | `customer`, `limit`
//! (default 100, at most 1000) and `offset`. Every group is split by meter: units of different
//! meters are never added up.
//!
//! JSON (default): `{from, to, group_by, rows: [{<group_by>, meter, units, requests}], totals:
//! [{meter, units, requests}], limit, offset, next_offset}`; `totals` cover the whole filtered
//! range (every page), and equal the sum of the ledger rows it matches. With `Accept: text/csv`:
//! the page's rows as RFC 4180 CSV under a header line, and `X-Next-Offset` when more follow.
//!
//! Pagination is limit/offset over groups in key order: a report whose range is over is stable;
//! one still receiving rows may shift between pages (use a `to` in the past for exports).
//!
//! Owns: this HTTP shape and its query's syntax. Must not touch: the SQL (the ledger's,
//! `Ledger::usage_report`), the error mapping (`admin::error`).

use crate::admin::error::{AdminError, Problem, Unknown};
use crate::admin::AdminState;
use crate::ledger::{UsageGroup, UsageGroupBy, UsageQuery};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use std::collections::HashMap;
use utoipa::ToSchema;

const PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;
/// The longest range one report may cover.
const MAX_DAYS: i64 = 400;
const DEFAULT_DAYS: i64 = 30;

/// The usage-report route, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new().route("/admin/usage", get(usage))
}

/// RFC 3339, or a bare date meaning its midnight UTC.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn group_name(g: UsageGroupBy) -> &'static str {
    match g {
        UsageGroupBy::Day => "day",
        UsageGroupBy::Route => "route",
        UsageGroupBy::Customer => "customer",
        UsageGroupBy::Total => "total",
    }
}

/// The validated query, or the 400 that explains every problem with it.
fn parse(
    q: &HashMap<String, String>,
    now: DateTime<Utc>,
) -> Result<(UsageQuery, i64, i64), AdminError> {
    let mut errors = Vec::new();
    let mut time = |key: &str| match q.get(key) {
        None => None,
        Some(s) => parse_time(s).or_else(|| {
            errors.push(format!(
                "{key}: {s:?} is not an RFC 3339 time or a YYYY-MM-DD date"
            ));
            None
        }),
    };
    let (from, to) = (time("from"), time("to"));
    let group_by = match q.get("group_by").map(String::as_str) {
        None | Some("day") => UsageGroupBy::Day,
        Some("route") => UsageGroupBy::Route,
        Some("customer") => UsageGroupBy::Customer,
        Some(o) => {
            errors.push(format!(
                "group_by: must be day, route or customer, got {o:?}"
            ));
            UsageGroupBy::Day
        }
    };
    let mut int = |key: &str, default: i64, max: i64| match q.get(key) {
        None => default,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (0..=max).contains(n) && (key != "limit" || *n >= 1))
            .unwrap_or_else(|| {
                errors.push(format!(
                    "{key}: must be an integer from {} to {max}",
                    i64::from(key == "limit")
                ));
                default
            }),
    };
    let limit = int("limit", PAGE, MAX_PAGE);
    let offset = int("offset", 0, i64::MAX);
    if !errors.is_empty() {
        return Err(AdminError::InvalidQuery(errors.join("; ")));
    }
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to - Duration::days(DEFAULT_DAYS));
    if from >= to {
        return Err(AdminError::InvalidRange(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    if to - from > Duration::days(MAX_DAYS) {
        return Err(AdminError::InvalidRange(format!(
            "a report covers at most {MAX_DAYS} days; split the range"
        )));
    }
    let text = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    Ok((
        UsageQuery {
            from,
            to,
            customer: text("customer"),
            meter: text("meter"),
            route: text("route"),
            group_by,
        },
        limit,
        offset,
    ))
}

/// `customer` has an entitlement row or any usage row, ever.
async fn known(s: &AdminState, customer: &str) -> Result<bool, crate::ledger::LedgerError> {
    if s.ledger.get_customer(customer).await?.is_some() {
        return Ok(true);
    }
    let ever = UsageQuery {
        from: DateTime::<Utc>::from_timestamp(0, 0).unwrap_or_default(),
        to: DateTime::<Utc>::from_timestamp(253_402_300_799, 0).unwrap_or_default(),
        customer: Some(customer.to_string()),
        meter: None,
        route: None,
        group_by: UsageGroupBy::Total,
    };
    Ok(!s.ledger.usage_report(&ever, 1, 0).await?.is_empty())
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("text/csv")))
}

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

fn csv(group_by: UsageGroupBy, rows: &[UsageGroup]) -> String {
    let mut out = format!("{},meter,units,requests\r\n", group_name(group_by));
    for r in rows {
        csv_field(&mut out, &r.key);
        out.push(',');
        csv_field(&mut out, &r.meter);
        out.push_str(&format!(",{},{}\r\n", r.units, r.requests));
    }
    out
}

/// One group of a usage report: exactly one of `day`, `route`, `customer` is present (the
/// `group_by`), then the meter and its sums.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageRow {
    /// The UTC day, `YYYY-MM-DD` (`group_by=day`).
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<String>,
    /// The route name (`group_by=route`).
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<String>,
    /// The customer id (`group_by=customer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    customer: Option<String>,
    meter: String,
    units: i64,
    requests: i64,
}

/// One meter's sums over the whole filtered range (every page).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageTotal {
    meter: String,
    units: i64,
    requests: i64,
}

/// Answer of `GET /admin/usage` as JSON.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageReport {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// `day`, `route` or `customer`.
    group_by: String,
    /// The filters applied (null: none).
    customer: Option<String>,
    meter: Option<String>,
    route: Option<String>,
    /// This page's groups, in key order.
    rows: Vec<UsageRow>,
    /// Per meter, over the whole range; equal to the sum of the matching ledger rows.
    totals: Vec<UsageTotal>,
    limit: i64,
    offset: i64,
    /// `offset` of the next page; null on the last.
    next_offset: Option<i64>,
}

/// Usage report from the ledger, grouped by day, route or customer and split by meter; JSON, or
/// CSV with `Accept: text/csv`.
#[utoipa::path(
    get,
    path = "/admin/usage",
    tag = "usage",
    params(
        ("customer" = Option<String>, Query, description = "only this customer (404 when unknown)"),
        ("meter" = Option<String>, Query, description = "only this meter"),
        ("route" = Option<String>, Query, description = "only this route"),
        ("from" = Option<String>, Query, description = "start, inclusive: RFC 3339 or `YYYY-MM-DD` (midnight UTC); default `to` minus 30 days"),
        ("to" = Option<String>, Query, description = "end, exclusive: RFC 3339 or `YYYY-MM-DD`; default now; at most 400 days after `from`"),
        ("group_by" = Option<String>, Query, description = "`day` (default), `route` or `customer`"),
        ("limit" = Option<i64>, Query, description = "groups per page, 1-1000 (default 100)"),
        ("offset" = Option<i64>, Query, description = "groups to skip (the `next_offset` of the previous page)"),
        ("Accept" = Option<String>, Header, description = "`text/csv` for CSV"),
    ),
    responses(
        (status = 200, description = "the report: JSON, or the page's rows as RFC 4180 CSV (`X-Next-Offset` when more follow)",
            content((UsageReport = "application/json"), (String = "text/csv")),
            headers(("X-Next-Offset" = Option<i64>, description = "CSV only: the `offset` of the next page"))),
        (status = 400, description = "`invalid-query` (bad parameter) or `invalid-range` (inverted, empty or over 400 days)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-customer`: no entitlement and no usage, ever", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn usage(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AdminError> {
    let (query, limit, offset) = parse(&q, Utc::now())?;
    if let Some(c) = &query.customer {
        if !known(&s, c).await? {
            return Err(AdminError::unknown_customer(c, Unknown::Ever));
        }
    }
    // One extra group says whether another page follows.
    let mut rows = s.ledger.usage_report(&query, limit + 1, offset).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_offset = more.then_some(offset + limit);
    if wants_csv(&headers) {
        let mut resp = (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            csv(query.group_by, &rows),
        )
            .into_response();
        if let Some(n) = next_offset {
            resp.headers_mut().insert("x-next-offset", n.into());
        }
        return Ok(resp);
    }
    let totals_query = UsageQuery {
        group_by: UsageGroupBy::Total,
        ..query.clone()
    };
    let totals = s.ledger.usage_report(&totals_query, 0, 0).await?;
    let group_by = query.group_by;
    let rows = rows
        .into_iter()
        .map(|r| {
            let key = |g: UsageGroupBy| (group_by == g).then(|| r.key.clone());
            UsageRow {
                day: key(UsageGroupBy::Day),
                route: key(UsageGroupBy::Route),
                customer: key(UsageGroupBy::Customer),
                meter: r.meter,
                units: r.units,
                requests: r.requests,
            }
        })
        .collect();
    let totals = totals
        .into_iter()
        .map(|t| UsageTotal {
            meter: t.meter,
            units: t.units,
            requests: t.requests,
        })
        .collect();
    Ok(Json(UsageReport {
        from: query.from,
        to: query.to,
        group_by: group_name(group_by).to_string(),
        customer: query.customer,
        meter: query.meter,
        route: query.route,
        rows,
        totals,
        limit,
        offset,
        next_offset,
    })
    .into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Ranges: inverted, empty and over 400 days are refused; dates are midnight UTC.
    #[test]
    fn ranges() {
        let now = parse_time("2026-11-22T08:00:00Z").unwrap();
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let (u, limit, offset) = parse(&q(&[]), now).ok().unwrap();
        assert_eq!(
            (u.to, u.to - u.from, limit, offset),
            (now, Duration::days(30), 100, 0)
        );
        let (u, ..) = parse(&q(&[("from", "2026-01-01"), ("to", "2026-02-01")]), now)
            .ok()
            .unwrap();
        assert_eq!(u.from, parse_time("2026-01-01T00:00:00Z").unwrap());
        for bad in [
            vec![("from", "2026-02-01"), ("to", "2026-01-01")],
            vec![("from", "2026-01-01"), ("to", "2026-01-01")],
            vec![("from", "2025-01-01"), ("to", "2026-02-06")],
            vec![("from", "yesterday")],
            vec![("group_by", "week")],
            vec![("limit", "0")],
            vec![("offset", "-1")],
        ] {
            assert!(parse(&q(&bad), now).is_err(), "{bad:?}");
        }
        // Exactly 400 days is allowed.
        assert!(parse(&q(&[("from", "2025-01-01"), ("to", "2026-02-05")]), now).is_ok());
    }

    /// Fields with commas or quotes are quoted; numbers are plain.
    #[test]
    fn csv_quoting() {
        let rows = [UsageGroup {
            key: "GET /a,\"b\"".into(),
            meter: "api_calls".into(),
            units: 7,
            requests: 5,
        }];
        assert_eq!(
            csv(UsageGroupBy::Route, &rows),
            "route,meter,units,requests\r\n\"GET /a,\"\"b\"\"\",api_calls,7,5\r\n"
        );
    }
}
