//! A running tollgate on either storage backend, and what tests read from its ledger and Redis.

use super::{free_port, redis_get, token, unique, TempDir, ADMIN_TOKEN, PG_URL, REDIS_URL};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tollgate::config::Config;
use tollgate::server::{self, Options, Stop};

/// Which storage a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No Redis, no Postgres: in-process counters and SQLite.
    Embedded,
    /// Real Redis and real Postgres.
    Shared,
}

/// A running tollgate. Stops (gracefully, flushing usage) on drop.
pub struct Tollgate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The webhook listener (`stripe.webhook_listen`), when set.
    pub webhooks: Option<SocketAddr>,
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
            on_ready: Some(Box::new(move |ready| {
                ready_tx.send(ready.webhooks).ok();
            })),
        };
        let thread = std::thread::spawn(move || server::run(config, opts));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut t = Tollgate {
            proxy,
            admin,
            webhooks: None,
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
        match started {
            Ok(webhooks) => t.webhooks = webhooks,
            Err(_) => {
                // Stop it first: joining a server that never started and was never told to
                // stop would hang the test instead of failing it.
                t.stop.notify_one();
                let r = t.thread.take().map(|h| h.join());
                panic!("tollgate did not start: {r:?}");
            }
        }
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(proxy).await.is_ok() {
                // The instance's own probe of its listener turns `/readyz` 200 a moment later
                // (it polls): wait for it, so a test's first `/readyz` does not race it. An
                // instance a test starts unready stays so; it is handed over after a second.
                for _ in 0..50 {
                    let ready = t.client.get(t.admin_url("/readyz")).send().await;
                    if ready.is_ok_and(|r| r.status() == 200) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
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

    /// `GET` an admin path with the admin token: its JSON, asserting 200.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let r = self
            .client
            .get(self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
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

    /// A customer's ledger rows by request id: (route, units). Waits (up to 10 s) until there
    /// are at least `rows`.
    pub async fn ledger_rows(
        &self,
        customer: &str,
        rows: usize,
    ) -> std::collections::HashMap<String, (String, i64)> {
        let sql = "SELECT request_id, route, units FROM usage_events WHERE customer = $1";
        let mut out = Vec::new();
        for _ in 0..200 {
            out = match self.backend {
                Backend::Embedded => {
                    let pool = sqlx::SqlitePool::connect(&self.database_url).await.unwrap();
                    let r: Vec<(String, String, i64)> = sqlx::query_as(sql)
                        .bind(customer)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                    pool.close().await;
                    r
                }
                Backend::Shared => {
                    let pool = self.pg().await;
                    let r: Vec<(String, String, i64)> = sqlx::query_as(sql)
                        .bind(customer)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                    pool.close().await;
                    r
                }
            };
            if out.len() >= rows {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        out.into_iter().map(|(id, r, u)| (id, (r, u))).collect()
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

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample of `/metrics` (its name with labels, e.g.
    /// `tollgate_webhooks_total{outcome="applied",type="invoice.paid"}`); 0 when absent.
    pub async fn metric(&self, sample: &str) -> i64 {
        let prefix = format!("{sample} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
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
