//! The request path, top to bottom (DESIGN §2). Each step is a call into its own module; this
//! file only sequences them; per-request state is [`Ctx`].
//!
//! 1. route        `request_filter`: header size guard, (method, path) → route
//! 2. authenticate `request_filter`: bearer JWT → customer               (auth)
//! 3. entitle      `request_filter`: customer → plan, status policy      (entitle)
//! 4. gate         `request_filter`: the route's feature must be in the plan
//! 5. rate+reserve `request_filter`: one atomic call to the quota store  (quota)
//! 6. forward      `upstream_peer` / `upstream_request_filter`: pick a peer, set identity headers
//! 7. respond      `response_filter`: RateLimit headers, exact cost from the upstream header
//! 8. settle       `logging`: refund on upstream failure, adjust to the exact cost, usage event
//!
//! Layout: [`admit`] steps 2–5 (and shadow mode), [`ctx`] per-request state, [`route`] the
//! router, [`upstream`] pools and health checks, [`respond`] denials as problem+json and the
//! RateLimit fields, [`settle`] step 8, [`selfservice`] `GET /_tollgate/usage`, [`billing`] the
//! self-service billing calls, [`state`] what every request shares (the config snapshot in force
//! and the long-lived parts).
//!
//! Denials are written with our own `ResponseHeader` (not `respond_error`, which turns
//! keep-alive off) and never reach the upstream. No metered request awaits the ledger or Stripe;
//! only the self-service billing calls do, through `billing::SelfService`.

mod admit;
pub mod billing;
pub mod conn_cap;
mod ctx;
mod forwarded;
pub mod path;
pub mod respond;
pub mod route;
pub mod selfservice;
mod settle;
pub mod state;
pub mod upstream;

pub use ctx::Ctx;

use crate::config::{RouteAuth, Unmatched};
use async_trait::async_trait;
use http::header::{AUTHORIZATION, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use respond::{write_problem, Decision, Denial};
use route::Found;
use selfservice::Outcome;
use state::Shared;
use std::sync::Arc;

pub const CUSTOMER_HEADER: &str = "x-tollgate-customer";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The proxy service: one per process, shared by all connections.
pub struct Proxy {
    pub shared: Arc<Shared>,
}

// === impl Proxy ===

impl Proxy {
    /// Writes a denial (problem+json) and ends the request without contacting the upstream.
    async fn deny(&self, session: &mut Session, ctx: &mut Ctx, denial: Denial) -> Result<bool> {
        ctx.decision = denial.decision();
        write_problem(session, &denial, &ctx.request_id).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(self.shared.clone())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // A client that sends a whole request and then half-closes (`shutdown(SHUT_WR)`,
        // `nc -N`) is still waiting for the answer: pingora's default aborts the request at that
        // FIN (after the reservation, so the call was charged and never answered).
        session.downstream_session.set_abort_on_close(false);
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): pingora serves a request written before the
        // previous answer was read only when asked to (else it answers the first and closes,
        // dropping the rest). Answered in order, one at a time; it carries over to later
        // requests on the connection.
        session.downstream_session.set_pipelining_enabled(true);
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        self.shared.heads.arrived(peer); // its first head came in time (`conn_cap`)
        let snap = self.shared.snapshot.load_full();
        ctx.snapshot = Some(snap.clone());
        ctx.request_id = ctx::request_id(session.req_header());
        ctx.client_ip = forwarded::client_ip(
            peer.map(|p| p.ip()),
            session.req_header(),
            &snap.config.proxy.trusted_proxies,
        );

        // A graceful stop (`server`'s drain): while draining every answer closes its connection,
        // so clients reconnect where the balancer now sends them; past `drain_delay` new
        // requests are refused with a 503 that says to retry.
        let life = &self.shared.lifecycle;
        if life.draining() {
            session.set_keepalive(None);
            if life.closing() {
                return self.deny(session, ctx, Denial::ShuttingDown).await;
            }
        }

        // An oversized head (request line and headers) is refused before anything parses it
        // (the upstream never sees it).
        let limit = snap.config.proxy.max_request_header_bytes;
        let req = session.req_header();
        let line = req.method.as_str().len() + req.raw_path().len() + 11; // " ", " HTTP/1.1\r\n"
        let head_bytes: usize = line
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_bytes > limit {
            session.set_keepalive(None);
            return self
                .deny(session, ctx, Denial::HeaderTooLarge { limit })
                .await;
        }

        // One price per path: route on the normalised target, and send the upstream exactly it.
        match path::normalize(session.req_header().raw_path()) {
            Ok(t) if t.changed() => ctx.path = Some(t.path.into_owned()),
            Ok(_) => {}
            Err(e) => {
                if !session.is_body_empty() {
                    session.set_keepalive(None);
                }
                let detail = e.detail();
                return self
                    .deny(session, ctx, Denial::InvalidPath { detail })
                    .await;
            }
        }

        // Self-service (`/_tollgate/usage`, and billing: `plans`, `checkout`, `portal`,
        // `subscription`, `invoices`): free, answered here, never forwarded.
        // One prefix check keeps them off every other request's path.
        let path = ctx.path.as_deref();
        let reserved = path
            .unwrap_or(session.req_header().uri.path())
            .starts_with("/_tollgate/");
        let (label, outcome) = if !reserved {
            (selfservice::ROUTE, Outcome::NotMine)
        } else {
            match selfservice::handle(&self.shared, &snap, session, path, &ctx.request_id).await? {
                Outcome::NotMine => (
                    billing::ROUTE,
                    billing::handle(&self.shared, &snap, session, path, &ctx.request_id).await?,
                ),
                mine => (selfservice::ROUTE, mine),
            }
        };
        match outcome {
            Outcome::NotMine => {}
            Outcome::Served => {
                ctx.self_service = Some(label);
                ctx.decision = Decision::Unmetered;
                return Ok(true);
            }
            Outcome::Denied(d) => {
                ctx.self_service = Some(label);
                return self.deny(session, ctx, d).await;
            }
        }

        // 1. route
        let req = session.req_header();
        let path = ctx.path.as_deref().unwrap_or(req.uri.path());
        let mut allow = None;
        let near_miss = match snap.router.find(&snap.config.routes, &req.method, path) {
            Found::Route(i) => {
                ctx.route = Some(i);
                None
            }
            Found::NearMiss(i) => Some(&snap.config.routes[i]),
            Found::MethodNotAllowed => {
                allow = Some(snap.router.allow(&snap.config.routes, path));
                None
            }
            Found::None => None,
        };
        // A protocol switch turns the connection into a tunnel the proxy no longer sees
        // requests in (`Upgrade: h2c` smuggles HTTP/2 requests to any path): only a WebSocket
        // upgrade, only on a route that asks for it.
        if let Some(upgrade) = req.headers.get(http::header::UPGRADE) {
            let allowed = ctx.route(&snap).is_some_and(|r| {
                r.websocket && upgrade.as_bytes().eq_ignore_ascii_case(b"websocket")
            });
            if !allowed {
                session.set_keepalive(None);
                return self.deny(session, ctx, Denial::UpgradeNotAllowed).await;
            }
        }
        let Some(route) = ctx.route(&snap) else {
            // A route has this path, not this method: 405 whatever `unmatched` says (forwarded
            // unmetered, a method-blind upstream would serve the metered route for free).
            if let Some(allow) = allow {
                if !session.is_body_empty() {
                    session.set_keepalive(None);
                }
                return self
                    .deny(session, ctx, Denial::MethodNotAllowed { allow })
                    .await;
            }
            return match &snap.config.proxy.unmatched {
                Unmatched::Deny => self.deny(session, ctx, Denial::NoRoute).await,
                // A lenient upstream (case-insensitive or slash-tolerant routing, as Express
                // is by default) would serve this as the metered route: never free.
                Unmatched::Forward { .. }
                    if near_miss.is_some_and(|r| r.auth == RouteAuth::Required) =>
                {
                    let detail = "the path differs from a metered route only in letter case or a trailing slash";
                    self.deny(session, ctx, Denial::InvalidPath { detail })
                        .await
                }
                Unmatched::Forward { upstream } => {
                    ctx.upstream = Some(upstream.clone());
                    ctx.decision = Decision::Unmetered;
                    Ok(false)
                }
            };
        };
        if route.auth == RouteAuth::Public {
            ctx.decision = Decision::Unmetered;
            return Ok(false);
        }

        // 2–5. authenticate, entitle, gate, rate + reserve
        if let Some(denial) = admit::admit(&self.shared, session, ctx, &snap, route).await {
            // Unread request bodies would corrupt the next request on this connection.
            if !session.is_body_empty() {
                session.set_keepalive(None);
            }
            return self.deny(session, ctx, denial).await;
        }
        Ok(false)
    }

    // 6. forward
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let snap = ctx
            .snapshot
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no config snapshot"))?;
        let name = ctx
            .upstream(&snap)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        let pool = snap
            .pools
            .get(name)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "unknown upstream"))?;
        let backend = pool
            .lb
            .select(ctx.request_id.as_bytes(), 256)
            .ok_or_else(|| {
                Error::explain(ErrorType::ConnectNoRoute, "no healthy upstream target")
            })?;
        Ok(Box::new(pool.peer(backend.addr)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Never let a caller assert its own identity to the upstream.
        up.remove_header(CUSTOMER_HEADER);
        if let Some(c) = &ctx.customer {
            up.insert_header(CUSTOMER_HEADER, c.as_str())?;
        }
        up.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        if let Some(path) = &ctx.path {
            let target = match up.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            up.set_raw_path(target.as_bytes())?;
        }
        ctx.forwarded = true;
        if let Some(snap) = &ctx.snapshot {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let proxy = &snap.config.proxy;
            forwarded::apply(up, peer, &proxy.trusted_proxies, proxy.tls.is_some())?;
            if snap.config.proxy.strip_authorization && ctx.customer.is_some() {
                up.remove_header(&AUTHORIZATION);
            }
            if let Some(host) = ctx
                .upstream(snap)
                .and_then(|u| snap.pools.get(u))
                .and_then(|p| p.host.as_deref())
            {
                up.insert_header(HOST, host)?;
            }
        }
        Ok(())
    }

    // 7. respond
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        resp.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        settle::exact_cost(ctx, resp);
        respond::insert_rate_limit(ctx, resp)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if *e.esource() == ErrorSource::Downstream {
            // The client hung up. Not an upstream failure: once the request went upstream, the
            // upstream did (or began) the work and the charge stands, or hanging up would make
            // calls free. Before that nothing happened: settled like an upstream failure.
            ctx.decision = Decision::ClientClosed;
            ctx.upstream_failed = !ctx.forwarded;
            tracing::info!(request_id = %ctx.request_id, error = %e, forwarded = ctx.forwarded, "client closed the connection");
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if ctx.upstream_status.is_none() {
            ctx.upstream_failed = true;
        }
        ctx.decision = Decision::UpstreamUnavailable;
        tracing::warn!(request_id = %ctx.request_id, error = %e, "upstream failed");
        let mut code = 0;
        if session.response_written().is_none() {
            code = 502;
            if let Err(e) =
                write_problem(session, &Denial::UpstreamUnavailable, &ctx.request_id).await
            {
                tracing::debug!(error = %e, "could not write 502");
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    // 8. settle
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // The client's FIN came before the answer: it hung up, or it half-closed and still reads
        // (the two look the same until the answer is written, so both are served and charged).
        if ctx.decision == Decision::Allowed
            && session
                .downstream_session
                .as_http1()
                .is_some_and(|h1| h1.is_half_closed())
        {
            ctx.decision = Decision::ClientClosed;
        }
        settle::settle(ctx, status).await;
    }
}
