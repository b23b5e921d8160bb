//! The integration tests: one binary, one module per area. Each test starts what it needs (a
//! tollgate on free ports, a unique Redis prefix and Postgres schema, private servers), so they run
//! in parallel; `support` holds the harness they share.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

mod admin_customers;
mod admin_usage;
mod alerts;
mod asymmetric;
mod billing;
mod concurrency;
mod config_files;
mod crash;
mod entitlement_sync;
mod faults;
mod forwarded;
mod http1;
mod ingest;
mod lease;
mod lifecycle;
mod live_config;
mod live_config_sighup;
mod logs;
mod openapi;
mod packaging;
mod paths;
mod proxy;
mod readme;
mod redis_topologies;
mod selfservice;
mod shadow;
mod stripe_admin;
mod stripe_reporting;
mod stripe_webhooks;
mod tls;
