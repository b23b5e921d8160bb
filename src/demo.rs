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

pub fn run(listen: &str, admin: &str) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

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

    let mut config =
        Config::from_toml(EXAMPLE_CONFIG).map_err(|e| anyhow::anyhow!("example config: {e}"))?;
    config.proxy.listen = listen.parse().context("--listen")?;
    config.admin.listen = admin.parse().context("--admin")?;
    config.proxy.shutdown_grace = std::time::Duration::from_secs(1);
    for u in config.upstreams.values_mut() {
        u.targets = vec![upstream_addr.to_string()];
        u.health_check = None;
    }
    config.storage.redis_url = None;
    config.storage.database_url = format!("sqlite:{}", dir.join("tollgate.db").display());
    config.storage.spool_dir = dir.join("spool");

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
    if std::env::var_os(&config.admin.token_env).is_none() {
        std::env::set_var(&config.admin.token_env, "demo-admin-token");
    }
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
        println!(
            "\ntollgate demo is running: proxy {base}, admin http://{admin_addr}, upstream http://{upstream_addr}\n\
             Customer \"demo-customer\" is on the free plan: 100 units a month, no PDF export.\n\
             Press Ctrl-C to stop.\n\n\
             export TOKEN={token}\n\n\
             # 200: an allowed call (1 unit), with RateLimit headers\n\
             curl -i -H \"Authorization: Bearer $TOKEN\" {base}/signals\n\n\
             # 403: PDF export is not in the free plan\n\
             curl -i -H \"Authorization: Bearer $TOKEN\" {base}/export/pdf\n\n\
             # 429: spend the rest of the quota at 2 units a call; the last call is refused\n\
             curl -s -o /dev/null -w '%{{http_code}}\\n' -H \"Authorization: Bearer $TOKEN\" \"{base}/signals/history/AAPL?n=[1-50]\" | sort | uniq -c\n"
        );
    });
    server::run(
        config,
        Options {
            admin_listener: None,
            stop: Stop::Signals,
            on_ready: Some(on_ready),
        },
    )
}
