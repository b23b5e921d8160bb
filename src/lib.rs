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
//! - [`ledger`]: the ledger (Postgres or SQLite): customers, usage events, Stripe, config
//!   history, audit, alerts; migrations.
//! - [`stripe`]: webhooks' meaning (signature, event store, subscription → entitlement), usage →
//!   meter events, the reconciler, the Stripe API client.
//! - [`alerts`]: threshold alerts: crossing detection and signed webhook delivery.
//! - [`control`]: live config and entitlement sync across instances.
//! - [`admin`]: the admin listener's HTTP handlers (health, metrics, operator API, Stripe's
//!   webhook endpoint, OpenAPI).
//! - [`config`]: the TOML file and the validated model; every error with its key.
//! - [`metrics`], [`backoff`], [`server`] (assembly and lifecycle), [`cli`], [`demo`].
pub mod admin;
pub mod alerts;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod entitle;
pub mod ledger;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod stripe;
pub mod usage;
