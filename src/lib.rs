//! tollgate: a reverse proxy that meters and entitles HTTP API calls.
//!
//! # Layout
//! Each folder is one box of the design; dependencies point down (the request path never
//! imports the admin listener, Stripe or alerts' delivery).
//! - [`proxy`]: the request path, top to bottom, as pingora phases. Start reading here. Also
//!   routing, upstream pools, denials as problem+json, self-service usage, the shared state.
//! - [`auth`]: JWT verification → customer (keys, JWKS, claims, verified-token cache, minting).
//! - [`entitle`]: customer → plan and status policy; the in-process entitlement cache.
//! - [`quota`]: billing periods and the atomic check-and-charge (Redis or in-process).
//! - [`usage`]: the asynchronous usage pipeline (bounded channel, disk spool, batched flushes).
//! - [`ingest`]: usage reported as events (CloudEvents through `POST /v1/events`), once each.
//! - [`journal`]: each reservation on disk before its request is forwarded, until its ledger
//!   row is safe; what a crashed process left is recovered at the next start.
//! - [`ledger`]: the ledger (Postgres or SQLite): customers, usage events, Stripe, config
//!   history, audit, alerts; migrations.
//! - [`stripe`]: webhooks' meaning (signature, event store, subscription → entitlement), usage →
//!   meter events, the reconciler, the Stripe API client.
//! - [`billing`]: self-service billing: the offered plans, Checkout, the billing portal, plan
//!   changes and cancellation through Stripe (behind a trait the proxy listener calls).
//! - [`alerts`]: threshold alerts: crossing detection and signed webhook delivery.
//! - [`control`]: live config and entitlement sync across instances.
//! - [`tls`]: TLS material for HTTPS upstreams and the TLS listener (one rustls provider).
//! - [`admin`]: the admin listener's HTTP handlers (health, metrics, operator API, Stripe's
//!   webhook endpoint, OpenAPI).
//! - [`config`]: the TOML file and the validated model; every error with its key.
//! - [`logs`]: the log subscriber (colour, the default filter, one line per failure).
//! - [`metrics`], [`backoff`], [`server`] (assembly and lifecycle), [`cli`], [`demo`],
//!   [`repair`] (`repair-counters`: Redis counters set to the ledger's units).
//!
//! Public (for the binary, the integration tests and the benches): [`cli`], [`config`],
//! [`server`], [`quota`] (periods), [`ledger`] (reading what was recorded) with [`entitle`]
//! (its customer type), [`auth`]; the rest is
//! crate-private, so the compiler reports what nothing uses.
pub(crate) mod admin;
pub(crate) mod alerts;
pub mod auth;
pub(crate) mod backoff;
pub(crate) mod billing;
pub mod cli;
pub mod config;
pub(crate) mod control;
pub(crate) mod demo;
pub mod entitle;
pub(crate) mod ingest;
pub mod journal;
pub mod ledger;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub mod quota;
pub(crate) mod repair;
pub mod server;
pub(crate) mod stripe;
pub(crate) mod tls;
pub(crate) mod usage;
