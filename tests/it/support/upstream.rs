//! The recording upstream every test proxies to.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

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
        Self::start_with(None).await
    }

    /// The same over HTTPS with the fixture certificate `cert` (tests/fixtures/tls).
    pub async fn start_tls(cert: &str) -> Upstream {
        Self::start_with(Some(cert)).await
    }

    async fn start_with(tls: Option<&str>) -> Upstream {
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
        match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { s.notified().await })
                    .await
                    .ok();
            }),
            Some(cert) => {
                let listener = super::tls::TlsListener {
                    tcp: listener,
                    acceptor: super::tls::acceptor(cert),
                };
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { s.notified().await })
                        .await
                        .ok();
                })
            }
        };
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
