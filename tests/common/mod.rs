//! Shared integration-test harness: starts a real tollgate (pingora proxy on an ephemeral port,
//! admin listener on port 0) in front of a recording upstream, on either storage backend:
//! embedded (in-process counters, a private SQLite file) or real Redis + Postgres (a unique key
//! prefix and a unique schema per test), so tests run in parallel without stepping on each other.
#![allow(dead_code, clippy::unwrap_used)]

pub mod stripe;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use jsonwebtoken::{EncodingKey, Header};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tollgate::config::Config;
use tollgate::server::{self, Options, Stop};

pub const SECRET: &str = "tollgate-test-secret-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "tollgate-test-admin-token";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Which storage a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No Redis, no Postgres: in-process counters and SQLite.
    Embedded,
    /// Real Redis and real Postgres.
    Shared,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
}

/// A recording upstream. `/fail` and `/fail/always` answer 500, `/cost?n=N` reports cost N in `X-Usage-Tokens`,
/// `/cost-bad` reports a garbage cost; everything else answers 200 "ok".
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<Notify>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let app = Router::new()
            .route(
                "/fail",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/fail/always",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route(
                "/cost",
                get(|Query(q): Query<HashMap<String, String>>| async move {
                    let n = q.get("n").cloned().unwrap_or_else(|| "0".into());
                    ([("x-usage-tokens", n)], "ok")
                }),
            )
            .route(
                "/cost-bad",
                get(|| async { ([("x-usage-tokens", "12.5 tokens")], "ok") }),
            )
            .fallback(|| async { "ok" })
            .layer(axum::middleware::from_fn_with_state(seen.clone(), record))
            .with_state(());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(Notify::new());
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.notified().await })
                .await
                .ok();
        });
        Upstream { addr, seen, stop }
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

async fn record(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    uri: Uri,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> impl IntoResponse {
    seen.lock().unwrap().push(Seen {
        path: uri.path().to_string(),
        headers,
    });
    next.run(req).await
}

/// The standard test config: plans free (default, 5 units, deny), pro (1000, overage, export_pdf),
/// tight (rate 2/min), closed (fail mode closed), routes covering every behaviour.
pub fn base_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
shutdown_grace = "0s"
strip_authorization = true

[admin]
token_env = "TOLLGATE_TEST_ADMIN_TOKEN"

[auth]
algorithms = ["HS256"]
secret_env = "TOLLGATE_TEST_JWT_SECRET"
issuer = "https://issuer.test/"
audience = "api"
leeway_seconds = 5
customer_claim = "sub"

[upstreams.api]
targets = ["{upstream}"]

[meters.api_calls]
[meters.tokens]

[[routes]]
match = "GET /signals"
upstream = "api"
cost = 1

[[routes]]
match = "GET /signals/history/{{symbol}}"
upstream = "api"
cost = 2

[[routes]]
name = "export-pdf"
match = "GET /export/pdf"
upstream = "api"
cost = 5
feature = "export_pdf"

[[routes]]
match = "GET /fail"
upstream = "api"
cost = 1

[[routes]]
name = "fail-always-charged"
match = "GET /fail/always"
upstream = "api"
cost = 1
charge = "always"

[[routes]]
match = "GET /cost"
upstream = "api"
meter = "tokens"
cost = 10
cost_from_response_header = "X-Usage-Tokens"

[[routes]]
match = "GET /cost-bad"
upstream = "api"
meter = "tokens"
cost = 10
cost_from_response_header = "X-Usage-Tokens"

[[routes]]
match = "GET /slow"
upstream = "api"
cost = 1

[[routes]]
match = "GET /public"
upstream = "api"
auth = "public"

[plans.free]
default = true
rate_per_minute = 600
quotas.api_calls = {{ included = 5, overage = "deny" }}
quotas.tokens = {{ included = 100, overage = "deny" }}

[plans.pro]
features = ["export_pdf"]
quotas.api_calls = {{ included = 1000, overage = "allow", unit_price_micros = 20000 }}
quotas.tokens = {{ unlimited = true }}

[plans.tight]
rate_per_minute = 2
burst = 2
quotas.api_calls = {{ included = 1000 }}
quotas.tokens = {{ unlimited = true }}

[plans.closed]
fail_mode = "closed"
quotas.api_calls = {{ included = 1000 }}
quotas.tokens = {{ unlimited = true }}
"#
    )
}

/// A running tollgate. Stops (gracefully, flushing usage) on drop.
pub struct Tollgate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub backend: Backend,
    /// Redis key prefix (Shared backend).
    pub prefix: String,
    /// Postgres schema (Shared) or SQLite file URL (Embedded).
    pub schema: String,
    pub database_url: String,
    pub client: reqwest::Client,
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<TempDir>,
    _spool: TempDir,
    /// This instance created its Postgres schema (not a peer) and drops it on drop.
    owns_schema: bool,
}

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

impl Tollgate {
    /// Starts tollgate with `toml` on `backend`. Storage and listen settings are filled in here.
    pub async fn start(toml: &str, backend: Backend) -> Tollgate {
        Self::start_with(toml, backend, None, |_| {}).await
    }

    /// As `start`, sharing Redis prefix and Postgres schema with `peer` (a second instance) when
    /// given, and letting `tweak` change the final config (dead Redis, dead upstream, …).
    pub async fn start_with(
        toml: &str,
        backend: Backend,
        peer: Option<&Tollgate>,
        tweak: impl FnOnce(&mut Config),
    ) -> Tollgate {
        let mut config =
            Config::from_toml(toml).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        config.proxy.listen = free_port();
        let (prefix, schema, database_url, dir) = match (backend, peer) {
            (_, Some(p)) => (
                p.prefix.clone(),
                p.schema.clone(),
                p.database_url.clone(),
                None,
            ),
            (Backend::Embedded, None) => {
                let dir = std::env::temp_dir().join(unique("tollgate-test"));
                std::fs::create_dir_all(&dir).unwrap();
                let url = format!("sqlite:{}", dir.join("ledger.db").display());
                (String::new(), String::new(), url, Some(TempDir(dir)))
            }
            (Backend::Shared, None) => (unique("tgtest"), unique("t"), PG_URL.to_string(), None),
        };
        match backend {
            Backend::Embedded => {
                config.storage.redis_url = None;
                config.storage.database_url = database_url.clone();
                config.storage.database_schema = None;
            }
            Backend::Shared => {
                config.storage.redis_url = Some(REDIS_URL.into());
                config.storage.redis_prefix = prefix.clone();
                config.storage.redis_timeout = Duration::from_millis(500);
                config.storage.database_url = database_url.clone();
                config.storage.database_schema = Some(schema.clone());
            }
        }
        let spool = TempDir(std::env::temp_dir().join(unique("tollgate-spool")));
        config.storage.spool_dir = spool.0.clone();
        let owns_schema = backend == Backend::Shared && peer.is_none();
        tweak(&mut config);
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let proxy = config.proxy.listen;
        let stop = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let opts = Options {
            admin_listener: Some(admin_listener),
            stop: Stop::Notify(stop.clone()),
            on_ready: Some(Box::new(move |_| {
                ready_tx.send(()).ok();
            })),
        };
        let thread = std::thread::spawn(move || server::run(config, opts));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let t = Tollgate {
            proxy,
            admin,
            backend,
            prefix,
            schema,
            database_url,
            client,
            stop,
            thread: Some(thread),
            _dir: dir,
            _spool: spool,
            owns_schema,
        };
        // Wait for start-up (migrations, bind), then for the proxy port to accept.
        let started =
            tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap();
        if started.is_err() {
            let mut t = t;
            let r = t.thread.take().map(|h| h.join());
            panic!("tollgate did not start: {r:?}");
        }
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(proxy).await.is_ok() {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("proxy never accepted on {proxy}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// GET through the proxy as `customer` (a valid token), or with no token for `None`.
    pub async fn get(&self, path: &str, customer: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(c) = customer {
            req = req.bearer_auth(token(c));
        }
        req.send().await.unwrap()
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap()
    }

    /// Sets a customer's entitlement through the admin API.
    pub async fn put_customer(&self, id: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.admin_url(&format!("/admin/customers/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Stops gracefully (drain, flush usage) and waits.
    pub async fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(h) = self.thread.take() {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// Ledger rows for a customer: (count, sum of units).
    pub async fn ledger_usage(&self, customer: &str) -> (i64, i64) {
        let units = self.ledger_units(customer).await;
        (units.len() as i64, units.iter().sum())
    }

    /// Units per ledger row for a customer, oldest first.
    pub async fn ledger_units(&self, customer: &str) -> Vec<i64> {
        let sql = "SELECT units FROM usage_events WHERE customer = $1 ORDER BY id";
        match self.backend {
            Backend::Embedded => {
                let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
                let r: Vec<(i64,)> = sqlx::query_as(sql)
                    .bind(customer)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                r.into_iter().map(|x| x.0).collect()
            }
            Backend::Shared => {
                let pool = self.pg().await;
                let r: Vec<(i64,)> = sqlx::query_as(sql)
                    .bind(customer)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                r.into_iter().map(|x| x.0).collect()
            }
        }
    }

    /// One number from this instance's ledger (`SELECT CAST(COUNT(*) AS BIGINT) …` and the
    /// like: the column must decode as i64 on both backends).
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Embedded => {
                let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
                let r: (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                r.0
            }
            Backend::Shared => {
                let pool = self.pg().await;
                let r: (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                r.0
            }
        }
    }

    /// `GET /admin/customers/{id}` as JSON (the problem body when it is not 200).
    pub async fn admin_customer(&self, id: &str) -> serde_json::Value {
        self.client
            .get(self.admin_url(&format!("/admin/customers/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn pg(&self) -> sqlx::PgPool {
        use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
        use std::str::FromStr;
        let opts = PgConnectOptions::from_str(&self.database_url)
            .unwrap()
            .options([("search_path", self.schema.as_str())]);
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap()
    }

    /// Waits until the ledger holds `rows` rows for `customer` (the flusher is asynchronous).
    pub async fn wait_ledger(&self, customer: &str, rows: i64) -> (i64, i64) {
        let mut last = (0, 0);
        for _ in 0..100 {
            last = self.ledger_usage(customer).await;
            if last.0 >= rows {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }

    /// The Redis quota counter of the current calendar month (Shared backend).
    pub async fn redis_used(&self, customer: &str, meter: &str) -> Option<i64> {
        let period = tollgate::quota::Period::calendar_month(chrono::Utc::now());
        redis_get(
            REDIS_URL,
            &format!("{}:{{{customer}}}:q:{meter}:{}", self.prefix, period.start),
        )
        .await
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
        // Tests share one Postgres database across runs: leave no schema behind. (Redis keys
        // expire with their period.) A runtime of its own, on its own thread: drop may run inside
        // the test's runtime, which cannot block.
        if self.owns_schema {
            let (url, schema) = (self.database_url.clone(), self.schema.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                            .execute(&mut c)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Claims for test tokens.
pub fn claims(customer: &str) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    serde_json::json!({"sub": customer, "iss": "https://issuer.test/", "aud": "api", "iat": now, "exp": now + 600})
}

/// A valid HS256 token for `customer`.
pub fn token(customer: &str) -> String {
    sign(&claims(customer))
}

pub fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
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
#[macro_export]
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

/// A private redis-server (its own port and data dir) that a test may stop and restart, for
/// outage tests that must not disturb the shared Redis.
pub struct PrivateRedis {
    pub addr: SocketAddr,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-redis")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut r = PrivateRedis {
            addr: free_port(),
            dir,
            child: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Starts redis-server (loading the data saved at the last `shutdown_save`).
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        wait_ping(&self.url()).await;
    }

    /// Saves to disk and stops (an outage that loses nothing).
    pub async fn shutdown_save(&mut self) {
        let c = redis::Client::open(self.url()).unwrap();
        let mut conn = c.get_multiplexed_async_connection().await.unwrap();
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async(&mut conn)
            .await;
        if let Some(mut child) = self.child.take() {
            child.wait().ok();
        }
    }

    pub async fn get(&self, key: &str) -> Option<i64> {
        redis_get(&self.url(), key).await
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// A private three-node Redis Cluster (no replicas), torn down on drop.
pub struct PrivateCluster {
    pub ports: Vec<u16>,
    _dir: TempDir,
    children: Vec<std::process::Child>,
}

/// A port `p` such that `p` and its cluster bus port `p + 10000` are both free.
fn cluster_port() -> u16 {
    loop {
        let p = 20_000 + (uuid::Uuid::now_v7().as_u128() % 10_000) as u16;
        let ok = std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok();
        if ok {
            return p;
        }
    }
}

impl PrivateCluster {
    pub async fn start() -> PrivateCluster {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-cluster")));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let p = cluster_port();
            let d = dir.0.join(p.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &p.to_string(),
                    "--cluster-enabled",
                    "yes",
                ])
                .args([
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&d)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            ports.push(p);
            children.push(child);
        }
        let c = PrivateCluster {
            ports,
            _dir: dir,
            children,
        };
        for p in &c.ports {
            wait_ping(&format!("redis://127.0.0.1:{p}/")).await;
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &c.ports {
            for _ in 0..200 {
                let info: String = node_cmd(*p, redis::cmd("CLUSTER").arg("INFO")).await;
                if info.contains("cluster_state:ok") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        c
    }

    /// Seed-node list for `storage.redis_url`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Keys held by each node.
    pub async fn keys_per_node(&self) -> Vec<i64> {
        let mut v = Vec::new();
        for p in &self.ports {
            v.push(node_cmd(*p, &redis::cmd("DBSIZE")).await);
        }
        v
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

async fn wait_ping(url: &str) {
    for _ in 0..200 {
        if let Ok(c) = redis::Client::open(url) {
            if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis at {url} did not start");
}

async fn node_cmd<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// `GET key` as an integer on the Redis at `url`.
pub async fn redis_get(url: &str, key: &str) -> Option<i64> {
    let c = redis::Client::open(url).unwrap();
    let mut conn = c.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}
