//! `tollgate demo`: the whole thing in one command, with nothing installed. Starts a small
//! market-signals upstream, runs the shipped example config against it with embedded storage (a
//! fresh SQLite file, in-process counters), and prints a token and curl lines that show an allowed
//! call, a feature-gated 403 and a quota 429.

use crate::auth::Verifier;
use crate::config::Config;
use crate::server::{self, Options, Stop};
use anyhow::Context;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};

pub const EXAMPLE_CONFIG: &str = include_str!("../config/tollgate.example.toml");

/// A stand-in for the API being sold: it echoes who tollgate says is calling.
pub fn demo_upstream() -> Router {
    fn who(h: &HeaderMap) -> String {
        h.get("x-tollgate-customer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    }
    Router::new()
        .route("/signals", get(|h: HeaderMap| async move { Json(serde_json::json!({"customer": who(&h), "signals": [{"symbol": "AAPL", "signal": "buy"}, {"symbol": "MSFT", "signal": "hold"}]})) }))
        .route("/signals/history/{symbol}", get(|Path(s): Path<String>, h: HeaderMap| async move { Json(serde_json::json!({"customer": who(&h), "symbol": s, "history": ["buy", "hold", "sell"]})) }))
        .route("/export/csv", get(|| async { "symbol,signal\nAAPL,buy\nMSFT,hold\n" }))
        .route("/export/pdf", get(|| async { "%PDF-1.4 (demo)\n" }))
        .route("/health", get(|| async { "ok\n" }))
}

/// The demo's files, removed when the demo ends (however it ends).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The example config as the demo runs it: listeners from the flags, every upstream pointed at
/// the demo upstream (no health check), embedded storage in `dir`. Edited as TOML, so the
/// document the demo stores as config version 1 (and `GET /admin/config` shows, and admin
/// `PATCH`es merge into) is the one it runs.
fn demo_config(
    listen: &str,
    admin: &str,
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<Config> {
    use toml::{Table, Value};
    let mut doc: Table = EXAMPLE_CONFIG.parse().context("example config")?;
    fn section<'a>(doc: &'a mut Table, key: &str) -> &'a mut Table {
        let v = doc.entry(key).or_insert_with(|| Value::Table(Table::new()));
        if !v.is_table() {
            *v = Value::Table(Table::new());
        }
        v.as_table_mut().expect("a table")
    }
    let proxy = section(&mut doc, "proxy");
    proxy.insert("listen".into(), listen.into());
    proxy.insert("drain_delay".into(), "0s".into());
    proxy.insert("shutdown_grace".into(), "1s".into());
    section(&mut doc, "admin").insert("listen".into(), admin.into());
    let storage = section(&mut doc, "storage");
    storage.remove("redis_url");
    let db = format!("sqlite:{}", dir.join("tollgate.db").display());
    storage.insert("database_url".into(), db.into());
    let spool = dir.join("spool").display().to_string();
    storage.insert("spool_dir".into(), spool.into());
    for (_, u) in section(&mut doc, "upstreams").iter_mut() {
        if let Some(u) = u.as_table_mut() {
            u.insert("targets".into(), vec![upstream.to_string()].into());
            u.remove("health_check_seconds");
        }
    }
    let text = toml::to_string(&doc).context("writing the demo config")?;
    let config = Config::from_toml(&text).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    Ok(config)
}

pub fn run(listen: &str, admin: &str) -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;

    // The upstream runs on its own thread and runtime for the life of the process.
    let upstream =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding the demo upstream")?;
    let upstream_addr = upstream.local_addr()?;
    upstream.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("demo-upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(l) = tokio::net::TcpListener::from_std(upstream) {
                        let _ = axum::serve(l, demo_upstream()).await;
                    }
                });
            }
        })?;

    let config = demo_config(listen, admin, upstream_addr, &dir.0)?;

    // Demo secrets, unless the caller brought their own.
    let secret_env = config
        .auth
        .secret_env
        .clone()
        .unwrap_or_else(|| "TOLLGATE_JWT_SECRET".into());
    if std::env::var_os(&secret_env).is_none() {
        std::env::set_var(
            &secret_env,
            format!("demo-secret-{}", uuid::Uuid::now_v7().simple()),
        );
    }
    let admin_env = config.admin.token_env.clone();
    let admin_token = match std::env::var(&admin_env) {
        Ok(t) if !t.is_empty() => t,
        _ => {
            let t = format!("demo-admin-{}", uuid::Uuid::now_v7().simple());
            std::env::set_var(&admin_env, &t);
            t
        }
    };
    let token = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            anyhow::Ok(
                Verifier::new(config.auth.clone())
                    .await?
                    .mint_hs("demo-customer", 3600)?,
            )
        })?;

    let proxy = config.proxy.listen;
    let admin_addr = config.admin.listen;
    let on_ready = Box::new(move |_| {
        let base = format!("http://{proxy}");
        let admin = format!("http://{admin_addr}");
        println!(
            "\ntollgate demo is running: proxy {base}, admin {admin}, upstream http://{upstream_addr}\n\
             Customer \"demo-customer\" is on the free plan: 100 units a month, no PDF export.\n\
             Press Ctrl-C to stop.\n\n\
             export TOKEN={token}\n\
             export {admin_env}={admin_token}\n\n\
             # 200: an allowed call (1 unit), with RateLimit headers\n\
             curl -i -H \"Authorization: Bearer $TOKEN\" {base}/signals\n\n\
             # 403: PDF export is not in the free plan\n\
             curl -i -H \"Authorization: Bearer $TOKEN\" {base}/export/pdf\n\n\
             # 429: spend the rest of the quota at 2 units a call; the last call is refused\n\
             curl -s -o /dev/null -w '%{{http_code}}\\n' -H \"Authorization: Bearer $TOKEN\" \"{base}/signals/history/AAPL?n=[1-50]\" | sort | uniq -c\n\n\
             # the plans on offer (no token needed), and the caller's own usage\n\
             curl -s {base}/_tollgate/plans\n\
             curl -s -H \"Authorization: Bearer $TOKEN\" {base}/_tollgate/usage\n\n\
             # the operator's view of the customer\n\
             curl -s -H \"Authorization: Bearer ${admin_env}\" {admin}/admin/customers/demo-customer\n\n\
             # raise the free plan to 500 units, live; the next call is 200 again\n\
             curl -s -H \"Authorization: Bearer ${admin_env}\" -X PATCH {admin}/admin/plans/free -d '{{\"quotas\": {{\"api_calls\": {{\"included\": 500}}}}}}'\n\
             curl -i -H \"Authorization: Bearer $TOKEN\" {base}/signals/history/AAPL\n"
        );
    });
    let result = server::run(
        config,
        Options {
            admin_listener: None,
            stop: Stop::Signals,
            on_ready: Some(on_ready),
        },
    );
    drop(dir);
    result
}
