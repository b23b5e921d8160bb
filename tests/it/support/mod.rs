//! Support for the integration tests (one binary, `tests/it/main.rs`): a real tollgate in front of
//! a recording upstream on either storage backend, tokens, private Redis servers and a Stripe
//! stand-in. Each module owns one kind of thing a test starts or checks:
//!
//! - `instance`: a running tollgate (pingora proxy on a free port, admin listener on port 0) on
//!   embedded storage (in-process counters, a private SQLite file) or real Redis + Postgres (a
//!   unique key prefix and a unique schema per test), so tests run in parallel;
//! - `config`: the standard test config (and the benches' one);
//! - `upstream`: the recording upstream;
//! - `tokens`: HS256 test tokens;
//! - `redis`: private redis-server processes (single and Cluster) for outage tests;
//! - `relay`: a TCP relay a test can freeze (a dependency that stops answering);
//! - `serve`: `tollgate serve` as a child process (signals, exit status, its log);
//! - `stripe`: the Stripe stand-in.

pub mod config;
pub mod instance;
pub mod redis;
pub mod relay;
pub mod serve;
pub mod stripe;
pub mod tls;
pub mod tokens;
pub mod upstream;

pub use config::base_config;
pub use instance::{Backend, Tollgate};
pub use redis::{redis_get, PrivateCluster, PrivateRedis};
pub use relay::Relay;
pub use tokens::{claims, sign, token};
pub use upstream::Upstream;

use std::net::SocketAddr;

pub const SECRET: &str = "tollgate-test-secret-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "tollgate-test-admin-token";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

pub fn unique(tag: &str) -> String {
    format!("{tag}_{}", uuid::Uuid::now_v7().simple())
}

/// Reserves a free port (bound then released; pingora binds it again).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Problem `type` and status of a response, asserting the content type.
pub async fn problem(resp: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        ct.as_deref(),
        Some("application/problem+json"),
        "status {status}"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    let ty = body["type"].as_str().unwrap_or_default().to_string();
    (status, ty, body)
}

/// Defines the same async test on both backends: `mod name { embedded(), shared() }`.
macro_rules! both {
    ($(#[$meta:meta])* $name:ident, |$b:ident| $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($b: Backend) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() { run(Backend::Embedded).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared() { run(Backend::Shared).await }
        }
    };
}
