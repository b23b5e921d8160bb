//! The one place where a decision becomes HTTP: status, `application/problem+json` body (RFC 9457)
//! with a stable `type`, and the headers that go with it (`WWW-Authenticate`, `Retry-After`,
//! `RateLimit-Policy`/`RateLimit` per the IETF httpapi draft, `X-RateLimit-*`).
//!
//! Owns: the wording of every denial and writing it, and the problem body shape ([`Problem`])
//! that the admin listener's errors share. Must not decide anything: callers pass in what was
//! decided.

use super::ctx::Ctx;
use super::REQUEST_ID_HEADER;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Serialize;

/// Why a request was not forwarded (or failed upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    InvalidToken {
        description: &'static str,
        missing: bool,
    },
    PaymentRequired {
        status: &'static str,
    },
    FeatureNotInPlan {
        feature: String,
        plan: String,
    },
    Suspended,
    NoRoute,
    /// A route has the path, none with the request's method; `allow` is the `Allow` value.
    MethodNotAllowed {
        allow: String,
    },
    QuotaExceeded {
        meter: String,
        limit: u64,
        used: u64,
        /// Units this call would have cost.
        cost: u64,
        resets_at: i64,
        retry_after: u64,
        window: u64,
    },
    RateLimited {
        retry_after: u64,
    },
    QuotaStoreUnavailable,
    UpstreamUnavailable,
    HeaderTooLarge {
        limit: usize,
    },
    /// A request target no price can be right for (see `path`), or one that differs from a
    /// metered route only in case or trailing slash while unmatched requests are forwarded.
    InvalidPath {
        detail: &'static str,
    },
    /// An `Upgrade` the route does not allow (a tunnel would carry requests past metering).
    UpgradeNotAllowed,
    /// A graceful stop is past its `drain_delay`: new requests go to another instance.
    ShuttingDown,
    /// A self-service billing call refused (`billing::BillingError`, rendered with its own
    /// status, `type` and members).
    Billing {
        status: u16,
        kind: &'static str,
        detail: String,
        members: Vec<(&'static str, serde_json::Value)>,
        retry_after: Option<u64>,
    },
}

/// Decision labels for metrics and access logs: bounded, stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Unmetered,
    InvalidToken,
    PaymentRequired,
    FeatureNotInPlan,
    Suspended,
    NoRoute,
    QuotaExceeded,
    RateLimited,
    QuotaStoreUnavailable,
    UpstreamUnavailable,
    HeaderTooLarge,
    /// The client closed (its side of) the connection before the answer (nginx's 499). Not a
    /// denial. Once forwarded, the call goes on and is charged; the answer is written in case
    /// the client only half-closed and still reads.
    ClientClosed,
    InvalidPath,
    UpgradeNotAllowed,
    ShuttingDown,
    MethodNotAllowed,
    /// A self-service billing call refused (its problem `type` says why).
    BillingRefused,
}

impl Decision {
    /// Every decision, in declaration order (`index` is the position here).
    pub const ALL: [Decision; 18] = [
        Decision::Allowed,
        Decision::Unmetered,
        Decision::InvalidToken,
        Decision::PaymentRequired,
        Decision::FeatureNotInPlan,
        Decision::Suspended,
        Decision::NoRoute,
        Decision::QuotaExceeded,
        Decision::RateLimited,
        Decision::QuotaStoreUnavailable,
        Decision::UpstreamUnavailable,
        Decision::HeaderTooLarge,
        Decision::ClientClosed,
        Decision::InvalidPath,
        Decision::UpgradeNotAllowed,
        Decision::ShuttingDown,
        Decision::MethodNotAllowed,
        Decision::BillingRefused,
    ];

    /// The metric label, equal to the problem `type` suffix for denials.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Unmetered => "unmetered",
            Decision::InvalidToken => "invalid-token",
            Decision::PaymentRequired => "payment-required",
            Decision::FeatureNotInPlan => "feature-not-in-plan",
            Decision::Suspended => "suspended",
            Decision::NoRoute => "no-route",
            Decision::QuotaExceeded => "quota-exceeded",
            Decision::RateLimited => "rate-limited",
            Decision::QuotaStoreUnavailable => "quota-store-unavailable",
            Decision::UpstreamUnavailable => "upstream-unavailable",
            Decision::HeaderTooLarge => "request-header-too-large",
            Decision::ClientClosed => "client-closed",
            Decision::InvalidPath => "invalid-path",
            Decision::UpgradeNotAllowed => "upgrade-not-allowed",
            Decision::ShuttingDown => "shutting-down",
            Decision::MethodNotAllowed => "method-not-allowed",
            Decision::BillingRefused => "billing-refused",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// A plan decision that shadow mode computes and counts but does not enforce. Identity
    /// (`invalid-token`) and account state (`suspended`, `payment-required`) are always enforced.
    pub fn shadowable(self) -> bool {
        matches!(
            self,
            Decision::FeatureNotInPlan | Decision::QuotaExceeded | Decision::RateLimited
        )
    }
}

/// An error body: RFC 9457 problem details, sent as `application/problem+json` in one shape by
/// both listeners (the proxy's denials, the admin API's errors). The proxy adds `instance`, and
/// on quota and rate denials `meter`, `limit`, `used`, `resets_at` and `retry_after`; the admin
/// API sends only the four members documented here.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Problem<'a> {
    /// `urn:tollgate:problem:{kind}`, e.g. `urn:tollgate:problem:unknown-customer`.
    #[serde(rename = "type")]
    #[schema(example = "urn:tollgate:problem:invalid-body")]
    kind: String,
    /// The status code's reason phrase (on the proxy's denials, a short summary of the kind).
    #[schema(example = "Bad Request")]
    title: &'a str,
    status: u16,
    /// What was wrong, for a human.
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    instance: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    meter: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    resets_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    retry_after: Option<u64>,
    /// Members of one kind of problem (a self-service billing refusal's `key`,
    /// `stripe_code`, …).
    #[serde(flatten)]
    #[schema(ignore)]
    extra: serde_json::Map<String, serde_json::Value>,
}

// === impl Problem ===

impl<'a> Problem<'a> {
    /// A problem of kind `suffix` (its `type` is [`PROBLEM_TYPE_PREFIX`] + `suffix`) with only
    /// the four members every problem has.
    pub(crate) fn new(suffix: &str, title: &'a str, status: u16, detail: String) -> Problem<'a> {
        Problem {
            kind: format!("{PROBLEM_TYPE_PREFIX}{suffix}"),
            title,
            status,
            detail,
            instance: None,
            meter: None,
            limit: None,
            used: None,
            resets_at: None,
            retry_after: None,
            extra: Default::default(),
        }
    }
}

impl Problem<'_> {
    /// The problem with members of its kind added (a billing refusal's `key`, `stripe_code`, …).
    pub(crate) fn with_members(mut self, members: Vec<(&'static str, serde_json::Value)>) -> Self {
        self.extra = members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        self
    }
}

/// A rendered response: status, headers, body.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

pub const PROBLEM_TYPE_PREFIX: &str = "urn:tollgate:problem:";

// === impl Denial ===

impl Denial {
    pub fn decision(&self) -> Decision {
        match self {
            Denial::InvalidToken { .. } => Decision::InvalidToken,
            Denial::PaymentRequired { .. } => Decision::PaymentRequired,
            Denial::FeatureNotInPlan { .. } => Decision::FeatureNotInPlan,
            Denial::Suspended => Decision::Suspended,
            Denial::NoRoute => Decision::NoRoute,
            Denial::MethodNotAllowed { .. } => Decision::MethodNotAllowed,
            Denial::QuotaExceeded { .. } => Decision::QuotaExceeded,
            Denial::RateLimited { .. } => Decision::RateLimited,
            Denial::QuotaStoreUnavailable => Decision::QuotaStoreUnavailable,
            Denial::UpstreamUnavailable => Decision::UpstreamUnavailable,
            Denial::HeaderTooLarge { .. } => Decision::HeaderTooLarge,
            Denial::InvalidPath { .. } => Decision::InvalidPath,
            Denial::UpgradeNotAllowed => Decision::UpgradeNotAllowed,
            Denial::ShuttingDown => Decision::ShuttingDown,
            Denial::Billing { .. } => Decision::BillingRefused,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Denial::InvalidPath { .. } | Denial::UpgradeNotAllowed => 400,
            Denial::InvalidToken { .. } => 401,
            Denial::PaymentRequired { .. } => 402,
            Denial::FeatureNotInPlan { .. } | Denial::Suspended => 403,
            Denial::NoRoute => 404,
            Denial::MethodNotAllowed { .. } => 405,
            Denial::QuotaExceeded { .. } | Denial::RateLimited { .. } => 429,
            Denial::HeaderTooLarge { .. } => 431,
            Denial::UpstreamUnavailable => 502,
            Denial::QuotaStoreUnavailable | Denial::ShuttingDown => 503,
            Denial::Billing { status, .. } => *status,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Denial::InvalidToken { .. } => "Invalid or missing token",
            Denial::PaymentRequired { .. } => "Payment required",
            Denial::FeatureNotInPlan { .. } => "Feature not in plan",
            Denial::Suspended => "Customer suspended",
            Denial::NoRoute => "No such route",
            Denial::MethodNotAllowed { .. } => "Method not allowed",
            Denial::QuotaExceeded { .. } => "Quota exceeded",
            Denial::RateLimited { .. } => "Rate limited",
            Denial::QuotaStoreUnavailable => "Quota store unavailable",
            Denial::UpstreamUnavailable => "Upstream unavailable",
            Denial::HeaderTooLarge { .. } => "Request header fields too large",
            Denial::InvalidPath { .. } => "Invalid request path",
            Denial::UpgradeNotAllowed => "Upgrade not allowed",
            Denial::ShuttingDown => "Shutting down",
            Denial::Billing { status, .. } => http::StatusCode::from_u16(*status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Refused"),
        }
    }

    /// Renders the response. `request_id` becomes the problem's `instance`.
    pub fn render(&self, request_id: Option<&str>) -> Rendered {
        let status = self.status();
        let mut headers: Vec<(&'static str, String)> = vec![
            ("content-type", "application/problem+json".into()),
            ("cache-control", "no-store".into()),
        ];
        let kind = match self {
            Denial::Billing { kind, .. } => kind,
            d => d.decision().as_str(),
        };
        let mut p = Problem::new(kind, self.title(), status, String::new());
        p.instance = request_id;
        match self {
            Denial::InvalidToken {
                description,
                missing,
            } => {
                p.detail = (*description).to_string();
                // RFC 6750 §3: no error code when the request carried no credentials.
                let www = if *missing {
                    "Bearer realm=\"tollgate\"".to_string()
                } else {
                    format!("Bearer realm=\"tollgate\", error=\"invalid_token\", error_description=\"{description}\"")
                };
                headers.push(("www-authenticate", www));
            }
            Denial::PaymentRequired { status } => p.detail = payment_detail(status),
            Denial::FeatureNotInPlan { feature, plan } => {
                p.detail = format!(
                    "this route needs feature {feature:?}, which plan {plan:?} does not include"
                );
            }
            Denial::Suspended => p.detail = "this customer is suspended; contact support".into(),
            Denial::NoRoute => p.detail = "no route matches this method and path".into(),
            Denial::MethodNotAllowed { allow } => {
                p.detail = format!("this path does not accept this method; it accepts {allow}");
                headers.push(("allow", allow.clone()));
            }
            Denial::QuotaExceeded {
                meter,
                limit,
                used,
                cost,
                resets_at,
                retry_after,
                window,
            } => {
                p.detail = format!(
                    "this call costs {cost} {meter} units and {} of the {limit} included this period are left",
                    limit.saturating_sub(*used)
                );
                p.meter = Some(meter);
                p.limit = Some(*limit);
                p.used = Some(*used);
                p.resets_at =
                    chrono::DateTime::from_timestamp(*resets_at, 0).map(|t| t.to_rfc3339());
                p.retry_after = Some(*retry_after);
                headers.push(("retry-after", retry_after.to_string()));
                let remaining = limit.saturating_sub(*used);
                headers.extend(rate_limit_headers(
                    meter,
                    *limit,
                    remaining,
                    *window,
                    *retry_after,
                ));
            }
            Denial::RateLimited { retry_after } => {
                p.detail = "too many requests this minute for your plan".into();
                p.retry_after = Some(*retry_after);
                headers.push(("retry-after", retry_after.to_string()));
            }
            Denial::QuotaStoreUnavailable => {
                p.detail = "usage limits cannot be checked right now; retry shortly".into();
                headers.push(("retry-after", "1".into()));
            }
            Denial::ShuttingDown => {
                p.detail = "this instance is shutting down; retry (another instance answers)".into();
                headers.push(("retry-after", "1".into()));
            }
            Denial::UpstreamUnavailable => {
                p.detail = "the upstream service could not be reached or failed".into()
            }
            Denial::HeaderTooLarge { limit } => {
                p.detail = format!("request header fields exceed {limit} bytes");
            }
            Denial::InvalidPath { detail } => p.detail = (*detail).to_string(),
            Denial::UpgradeNotAllowed => {
                p.detail = "this route does not accept a protocol upgrade (only routes with upgrade = \"websocket\" accept a WebSocket upgrade)".into()
            }
            Denial::Billing {
                detail,
                members,
                retry_after,
                ..
            } => {
                p.detail = detail.clone();
                p.extra = members.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
                if let Some(r) = retry_after {
                    p.retry_after = Some(*r);
                    headers.push(("retry-after", r.to_string()));
                }
            }
        }
        let body = serde_json::to_vec(&p).unwrap_or_default();
        headers.push(("content-length", body.len().to_string()));
        Rendered {
            status,
            headers,
            body,
        }
    }
}

/// What a 402 tells the customer to do, by why the account is refused (a subscription status,
/// or "without a plan"): a subscription that ended is subscribed to again, a paused one is
/// resumed, one whose payment failed (`past_due`, `unpaid`, `incomplete`) gets a working
/// payment method.
fn payment_detail(status: &str) -> String {
    match status {
        "canceled" => "the subscription is canceled; subscribe again to continue".into(),
        "incomplete_expired" => {
            "the subscription expired before its first payment; subscribe again to continue".into()
        }
        "paused" => "the subscription is paused; resume it to continue".into(),
        "without a plan" => {
            "this customer has no plan and there is no default plan; subscribe to continue".into()
        }
        status => format!("the subscription is {status}; update the payment method to continue"),
    }
}

/// Writes `denial` (problem+json, with the request id) and ends the response.
pub(super) async fn write_problem(
    session: &mut Session,
    denial: &Denial,
    request_id: &str,
) -> pingora::Result<()> {
    let r = denial.render(Some(request_id));
    let mut head = ResponseHeader::build(r.status, Some(r.headers.len() + 1))?;
    for (k, v) in r.headers {
        head.insert_header(k, v)?;
    }
    head.insert_header(REQUEST_ID_HEADER, request_id)?;
    session.write_response_header(Box::new(head), false).await?;
    session
        .write_response_body(Some(Bytes::from(r.body)), true)
        .await?;
    Ok(())
}

/// Step 7: the RateLimit fields of the route's meter on an upstream's answer, counting the
/// exact cost the upstream reported. Unlimited meters and unmetered routes get none.
pub(super) fn insert_rate_limit(ctx: &Ctx, resp: &mut ResponseHeader) -> pingora::Result<()> {
    let (Some(snap), Some(r)) = (&ctx.snapshot, &ctx.reserved) else {
        return Ok(());
    };
    let (Some(route), Some(included)) = (ctx.route(snap), r.included) else {
        return Ok(());
    };
    let used = match ctx.actual_cost {
        Some(actual) => (r.used + actual).saturating_sub(r.units),
        None => r.used,
    };
    let now = chrono::Utc::now().timestamp();
    for (k, v) in rate_limit_headers(
        &route.meter,
        included,
        included.saturating_sub(used),
        r.period.length(),
        r.period.seconds_left(now),
    ) {
        resp.insert_header(k, v)?;
    }
    Ok(())
}

/// `RateLimit-Policy`, `RateLimit` and `X-RateLimit-*` for one metered quota (DESIGN §7: item
/// name = meter, `q` = included units, `w` = seconds in the period, `r` = remaining, `t` =
/// seconds to reset; `X-RateLimit-Reset` is delta seconds too).
pub fn rate_limit_headers(
    meter: &str,
    limit: u64,
    remaining: u64,
    window: u64,
    reset: u64,
) -> [(&'static str, String); 5] {
    [
        (
            "ratelimit-policy",
            format!("\"{meter}\";q={limit};w={window}"),
        ),
        ("ratelimit", format!("\"{meter}\";r={remaining};t={reset}")),
        ("x-ratelimit-limit", limit.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every single-item example in the IETF draft with exactly our parameters (`q`,`w` for the
    /// policy; `r`,`t` for the state) is reproduced byte for byte by our formatter.
    #[test]
    fn header_syntax_matches_draft_examples() {
        let tsv = include_str!("../../tests/fixtures/ratelimit_headers_draft_examples.tsv");
        let mut checked = 0;
        for line in tsv.lines().filter(|l| !l.starts_with('#')) {
            let Some(field) = line.split('\t').nth(2) else {
                continue;
            };
            let Some((name, value)) = field.split_once(": ") else {
                continue;
            };
            // Only plain single items: `"name";k=v;k=v`.
            let mut parts = value.split(';');
            let Some(item) = parts
                .next()
                .and_then(|i| i.strip_prefix('"')?.strip_suffix('"'))
            else {
                continue;
            };
            let raw: Vec<&str> = parts.collect();
            let params: Vec<(&str, u64)> = raw
                .iter()
                .filter_map(|p| p.split_once('='))
                .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                .collect();
            if params.len() != raw.len() {
                continue; // a parameter we do not send (pk, qu, burst, …)
            }
            let keys: Vec<&str> = params.iter().map(|(k, _)| *k).collect();
            let [policy, state, ..] = rate_limit_headers(
                item,
                params.first().map_or(0, |p| p.1),
                params.first().map_or(0, |p| p.1),
                params.get(1).map_or(0, |p| p.1),
                params.get(1).map_or(0, |p| p.1),
            );
            if name == "RateLimit-Policy" && keys == ["q", "w"] && !value.contains(',') {
                assert_eq!(policy.1, value, "draft line: {line}");
                checked += 1;
            } else if name == "RateLimit" && keys == ["r", "t"] && !value.contains(',') {
                assert_eq!(state.1, value, "draft line: {line}");
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} draft examples checked");
    }

    /// `Decision::ALL` is in declaration order: metric handles are looked up by `index`.
    #[test]
    fn all_decisions_in_index_order() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{d:?}");
        }
    }

    /// A wrong method is a 405 with `Allow`, its own type, and says which methods the path has.
    #[test]
    fn method_not_allowed_shape() {
        let r = Denial::MethodNotAllowed {
            allow: "GET, POST".into(),
        }
        .render(Some("req-2"));
        assert_eq!(r.status, 405);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["type"], "urn:tollgate:problem:method-not-allowed");
        assert_eq!(v["status"], 405);
        assert!(v["detail"]
            .as_str()
            .is_some_and(|d| d.ends_with("GET, POST")));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "allow" && v == "GET, POST"));
    }

    /// A canceled subscription is told to subscribe again; a failed payment to fix it.
    #[test]
    fn payment_required_says_what_to_do() {
        let detail = |status| {
            let r = Denial::PaymentRequired { status }.render(None);
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
            v["detail"].as_str().unwrap_or_default().to_string()
        };
        assert_eq!(
            detail("canceled"),
            "the subscription is canceled; subscribe again to continue"
        );
        for s in ["past_due", "unpaid"] {
            assert_eq!(
                detail(s),
                format!("the subscription is {s}; update the payment method to continue")
            );
        }
        assert!(!detail("paused").contains("payment method"));
    }

    /// A quota denial carries the stable type, the extra members and Retry-After.
    #[test]
    fn quota_problem_shape() {
        let d = Denial::QuotaExceeded {
            meter: "api_calls".into(),
            limit: 100,
            used: 100,
            cost: 1,
            resets_at: 1_800_000_000,
            retry_after: 42,
            window: 2_592_000,
        };
        let r = d.render(Some("req-1"));
        assert_eq!(r.status, 429);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["type"], "urn:tollgate:problem:quota-exceeded");
        assert_eq!(v["meter"], "api_calls");
        assert_eq!(v["limit"], 100);
        assert_eq!(v["instance"], "req-1");
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "retry-after" && v == "42"));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "ratelimit" && v == "\"api_calls\";r=0;t=42"));
    }
}
