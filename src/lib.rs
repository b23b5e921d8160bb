//! tollgate: a reverse proxy that meters and entitles HTTP API calls.
//!
//! # Layout
//! - [`proxy`]: the request path, top to bottom, as pingora phases. Start reading here.
//! - [`route`]: `(method, path)` → route (matchit).
//! - [`auth`]: JWT verification → customer.
//! - [`entitle`]: customer → plan and status policy; the in-process entitlement cache.
//! - [`quota`]: billing periods and the atomic check-and-charge (Redis or in-process).
//! - [`respond`]: every client-facing error as problem+json, RateLimit headers.
//! - [`usage`]: the asynchronous usage pipeline (bounded channel, disk spool, batched flushes).
//! - [`ledger`]: the ledger (Postgres or SQLite): customers, usage events, migrations.
//! - [`admin`]: the admin listener (health, readiness, metrics, operator API).
//! - [`admin_customers`]: customers' usage, suspension and credits (admin API);
//!   [`admin_usage`]: usage reports from the ledger (JSON or CSV).
//! - [`admin_config`]: the live-config admin API; [`liveconfig`]: versioning, apply, broadcast.
//! - [`openapi`]: the admin API's OpenAPI document (`/admin/openapi.json`), from the handlers.
//! - [`selfservice`]: `GET /_tollgate/usage` on the proxy listener (the caller's own usage).
//! - [`alerts`]: threshold alerts: crossing detection, signed webhook delivery, delivery log.
//! - [`config`]: the TOML file and the validated model; every error with its key.
//! - [`upstream`]: upstream pools, round robin, health checks.
//! - [`stripe`]: Stripe: webhooks (signature, idempotent event store, subscription → entitlement),
//!   usage → meter events reporter, reconciler, portal and link admin routes.
//! - [`sync`]: entitlement changes broadcast to every instance (Redis pub/sub).
//! - [`state`], [`metrics`], [`server`] (assembly and lifecycle), [`cli`], [`demo`].
pub mod admin;
pub mod admin_config;
pub mod admin_customers;
pub mod admin_usage;
pub mod alerts;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod demo;
pub mod entitle;
pub mod ledger;
pub mod liveconfig;
pub mod metrics;
pub mod openapi;
pub mod proxy;
pub mod quota;
pub mod respond;
pub mod route;
pub mod selfservice;
pub mod server;
pub mod state;
pub mod stripe;
pub mod sync;
pub mod upstream;
pub mod usage;
