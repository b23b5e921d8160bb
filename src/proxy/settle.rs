//! Settling a charge after the upstream answered (steps 7–8): the exact cost the upstream
//! reports, the refund of a failed call on `charge = "success"` routes, the adjustment to the
//! exact cost, the route's metrics and access-log line, and the request's ledger row.
//!
//! Owns: what a forwarded request finally costs. Must not touch: admission (the reservation is
//! made in `admit`), HTTP writing.

use super::ctx::{Ctx, Reserved};
use super::respond::Decision;
use crate::config::Charge;
use crate::quota::QuotaStore;
use pingora::http::ResponseHeader;

/// Step 7: the exact cost from the route's `cost_from_response_header`, when the upstream sent a
/// valid one (see [`parse_cost`]); an invalid value keeps the reservation and is counted.
pub(super) fn exact_cost(ctx: &mut Ctx, resp: &ResponseHeader) {
    if ctx.reserved.is_none() {
        return;
    }
    let Some(snap) = &ctx.snapshot else {
        return;
    };
    let Some(route) = ctx.route(snap) else {
        return;
    };
    let Some(header) = &route.cost_from_response_header else {
        return;
    };
    if let Some(v) = resp.headers.get(header) {
        match parse_cost(v.as_bytes(), route.max_cost) {
            Some(actual) => ctx.actual_cost = Some(actual),
            None => ctx.shared.metrics.cost_header_invalid.inc(),
        }
    }
}

/// A cost that enters from outside: plain ASCII digits (no sign, exponent, fraction or space;
/// the HTTP parser has already removed the optional whitespace around a header value) and at
/// most `max`, the route's ceiling (itself ≤ `i64::MAX`). Anything else is `None`.
pub(super) fn parse_cost(v: &[u8], max: u64) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(v).ok()?.parse::<u64>().ok()?;
    (n <= max).then_some(n)
}

/// Step 8 (`logging`): refund or adjust, count, log, and hand the ledger row to the usage
/// pipeline. `status` is what was sent downstream (0: nothing).
pub(super) async fn settle(ctx: &mut Ctx, status: u16) {
    let Some(snap) = ctx.snapshot.clone() else {
        return;
    };
    let route = ctx.route(&snap);
    let latency = ctx.started.elapsed();

    // Refund on upstream failure (charge = "success"), or adjust to the exact cost.
    let mut charged = None;
    let mut differs = false;
    let reserved = ctx.reserved.take(); // settled here, so `Drop for Ctx` has nothing to do
    if let (Some(r), Some(route)) = (&reserved, route) {
        let failed = ctx.upstream_failed || ctx.upstream_status.is_some_and(|s| s >= 500);
        let units = if failed && route.charge == Charge::Success {
            0
        } else {
            ctx.actual_cost.unwrap_or(r.units)
        };
        // Both are ≤ a route's `max_cost` (≤ `i64::MAX`), so this cannot fail; if it ever did,
        // the reservation stands as charged rather than a wrapped delta.
        let (units, delta) = match (i64::try_from(units), i64::try_from(r.units)) {
            (Ok(u), Ok(held)) => (units, u.checked_sub(held).unwrap_or(0)),
            _ => (r.units, 0),
        };
        if delta != 0 {
            let customer = ctx.customer.as_deref().unwrap_or_default();
            if let Err(e) = store_for(ctx, r)
                .adjust(customer, &route.meter, r.period, delta)
                .await
            {
                // The ledger row below still records what was charged.
                ctx.shared.metrics.quota_store_errors.inc();
                tracing::warn!(error = %e, request_id = %ctx.request_id, delta, "could not settle reservation");
            }
        }
        charged = Some((r.id, units));
        differs = delta != 0;
    }

    let m = match ctx.route {
        Some(i) => &snap.route_metrics[i],
        None if ctx.self_service == Some(super::billing::ROUTE) => &snap.billing_metrics,
        None if ctx.self_service.is_some() => &snap.self_service_metrics,
        None => &snap.unmatched_metrics,
    };
    m.requests[ctx.decision.index()].inc();
    m.duration.observe(latency.as_secs_f64());
    if snap.config.proxy.access_log.wants(status) {
        access_line(ctx, route, charged, status, latency);
    }

    // One ledger row per forwarded request, with the units finally charged.
    if let (Some((id, units)), Some(route)) = (charged, route) {
        let status = ctx.upstream_status.unwrap_or(status);
        ctx.record_usage(route, id, units, status, differs);
    }
}

/// The request's access-log line (`proxy.access_log`).
fn access_line(
    ctx: &Ctx,
    route: Option<&crate::config::Route>,
    charged: Option<(uuid::Uuid, u64)>,
    status: u16,
    latency: std::time::Duration,
) {
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        client_ip = %OrDash(ctx.client_ip),
        customer = ctx.customer.as_deref().unwrap_or("-"),
        route = match route {
            Some(r) => r.name.as_str(),
            None => ctx.self_service.unwrap_or("-"),
        },
        decision = ctx.decision.as_str(),
        shadow = ctx.shadowed.map_or("-", Decision::as_str),
        cost = charged.map_or(0, |(_, units)| units),
        status,
        upstream_status = ctx.upstream_status.unwrap_or(0),
        latency_us = latency.as_micros() as u64,
    );
}

/// A value, or `-` when there is none (access-log fields).
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The store that holds the reservation: the local fallback when it took it (fail-open).
fn store_for<'c>(ctx: &'c Ctx, r: &Reserved) -> &'c dyn QuotaStore {
    if r.local {
        ctx.shared.fallback.as_ref()
    } else {
        ctx.shared.store.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cost;

    #[test]
    fn only_plain_digits_up_to_the_ceiling_are_a_cost() {
        assert_eq!(parse_cost(b"0", 500), Some(0));
        assert_eq!(parse_cost(b"007", 500), Some(7));
        assert_eq!(parse_cost(b"500", 500), Some(500));
        let max = i64::MAX as u64;
        assert_eq!(parse_cost(b"9223372036854775807", max), Some(max));
        for bad in [
            &b""[..],
            b"501",
            b"-1",
            b"+7",
            b"1e3",
            b"7.0",
            b" 7",
            b"7 7",
            b"0x7",
            b"18446744073709551615",     // u64::MAX
            b"18446744073709551616",     // u64::MAX + 1
            b"9223372036854775808",      // 2^63
            b"000000000000000000000001", // too long to be a cost
        ] {
            let ceiling = if bad == b"501" { 500 } else { max };
            assert_eq!(
                parse_cost(bad, ceiling),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
