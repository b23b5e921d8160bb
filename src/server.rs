//! Process assembly and lifecycle: builds the shared state from a validated config, runs the
//! pingora server (proxy + upstream health checks) and, on a runtime of our own, the control plane
//! (ledger, usage flusher, admin listener). Shutdown: pingora stops accepting and drains for
//! `shutdown_grace`, then the flusher drains the usage channel into the ledger before we return.
//!
//! Why two runtimes: sqlx pools and redis-rs connection managers spawn tasks on the runtime they
//! are created on; pingora creates its runtimes only inside `Server::run`. The control plane gets
//! its own runtime created here; the proxy's Redis connection is created lazily on pingora's.

use crate::admin::{self, AdminState};
use crate::auth::Verifier;
use crate::config::Config;
use crate::entitle::Entitlements;
use crate::liveconfig::LiveConfig;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::quota::{memory::MemoryStore, redis::RedisStore, QuotaStore};
use crate::state::{Shared, Snapshot};
use crate::{ledger, upstream, usage};
use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How the server is told to stop.
pub enum Stop {
    /// SIGTERM: graceful; SIGINT: fast; SIGQUIT: graceful upgrade (pingora's handling).
    Signals,
    /// Graceful stop when notified (tests, embedding).
    Notify(Arc<Notify>),
}

/// Addresses the running server listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

pub struct Options {
    /// A bound admin listener (tests bind port 0); otherwise `admin.listen` is bound.
    pub admin_listener: Option<std::net::TcpListener>,
    pub stop: Stop,
    /// Called once the admin listener is bound and the proxy service is about to start.
    pub on_ready: Option<Box<dyn FnOnce(Ready) + Send>>,
}

/// A pingora shutdown watch that asks for a graceful stop when notified (tests, benches).
pub struct NotifyWatch(pub Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for NotifyWatch {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::GracefulTerminate
    }
}

/// Runs tollgate until stopped. Returns after the usage channel has been flushed to the ledger.
pub fn run(config: Config, opts: Options) -> anyhow::Result<()> {
    run_from(config, None, opts)
}

/// As [`run`], for a config read from `source`: SIGHUP reloads that file's live part (routes,
/// plans, meters, upstreams) the way an admin PUT does, and versions record it as the author.
pub fn run_from(config: Config, source: Option<PathBuf>, opts: Options) -> anyhow::Result<()> {
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;

    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let (pools, health_checks) =
        upstream::build(&config.upstreams).context("resolving upstream targets")?;
    let pools = Arc::new(pools);
    // Version 0 until `LiveConfig::start` numbers it from the ledger (before anything serves).
    let snapshot = Snapshot::new(config.clone(), pools, &metrics, 0).map_err(anyhow::Error::msg)?;

    let fallback = Arc::new(MemoryStore::new());
    let storage = config.storage.clone();
    let redis_store = |timeout: Duration| -> anyhow::Result<Option<Arc<dyn QuotaStore>>> {
        Ok(match &storage.redis_url {
            Some(url) => Some(Arc::new(
                RedisStore::new(url, storage.redis_cluster, &storage.redis_prefix, timeout)
                    .context("storage.redis_url")?,
            )),
            None => None,
        })
    };
    // The proxy's handle connects lazily on pingora's runtime; the admin's on the control runtime.
    let store: Arc<dyn QuotaStore> =
        redis_store(storage.redis_timeout)?.unwrap_or_else(|| fallback.clone());
    let admin_store: Arc<dyn QuotaStore> =
        redis_store(storage.redis_timeout.max(Duration::from_millis(500)))?
            .unwrap_or_else(|| fallback.clone());

    let (shared, ledger, flusher, admin_listener, alert_worker) = control.block_on(async {
        let ledger = ledger::open(&storage.database_url, storage.database_schema.as_deref())
            .await
            .with_context(|| format!("opening the ledger at {}", redact(&storage.database_url)))?;
        let verifier = Verifier::new(config.auth.clone()).await.context("auth")?;
        let entitlements = Entitlements::default();
        for (id, e) in ledger.all_customers().await.context("loading customers")? {
            entitlements.put(&id, e);
        }
        tracing::info!(customers = entitlements.len(), "entitlements loaded");
        let (sink, flusher) = usage::pipeline(
            ledger.clone(),
            storage.usage_queue,
            storage.spool_dir.clone(),
            1000,
            storage.usage_flush_interval,
        );
        let listener = match opts.admin_listener {
            Some(l) => {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            None => tokio::net::TcpListener::bind(config.admin.listen)
                .await
                .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?,
        };
        let (alerts, alert_worker) = match alert_pipeline(&config, ledger.clone())? {
            Some((a, w)) => (Some(a), Some(w)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            verifier: Arc::new(verifier),
            entitlements: Arc::new(entitlements),
            store,
            fallback,
            usage: sink,
            metrics,
            alerts,
            self_service: Default::default(),
        });
        anyhow::Ok((shared, ledger, flusher, listener, alert_worker))
    })?;
    let alerts_stop = Arc::new(Notify::new());
    let alerts_task = alert_worker.map(|worker| control.spawn(worker.run(alerts_stop.clone())));

    let admin_addr = admin_listener.local_addr()?;
    let token = std::env::var(&config.admin.token_env)
        .ok()
        .filter(|t| !t.is_empty())
        .map(Arc::from);
    if token.is_none() {
        tracing::warn!(env = %config.admin.token_env, "admin token not set: /admin is closed");
    }
    let sync = match &config.storage.redis_url {
        Some(url) => Some(Arc::new(
            // Any one node will do: in a cluster, PUBLISH reaches every node's subscribers.
            crate::sync::EntitlementSync::new(
                url.split(',').next().unwrap_or(url).trim(),
                &config.storage.redis_prefix,
            )
            .context("storage.redis_url")?,
        )),
        None => None,
    };
    let sync_stop = Arc::new(Notify::new());
    if let Some(sync) = &sync {
        control.spawn(sync.clone().run(
            ledger.clone(),
            shared.entitlements.clone(),
            sync_stop.clone(),
        ));
    }
    let stripe = match &config.stripe {
        Some(settings) => Some(Arc::new(
            crate::stripe::StripeWebhook::new(
                settings.clone(),
                ledger.clone(),
                shared.clone(),
                sync.clone(),
            )
            .context("registering Stripe metrics")?,
        )),
        None => None,
    };
    let live = Arc::new(
        LiveConfig::new(
            shared.clone(),
            ledger.clone(),
            config.storage.redis_url.as_deref().map(|url| {
                (
                    url.split(',').next().unwrap_or(url).trim(),
                    config.storage.redis_prefix.as_str(),
                )
            }),
        )
        .context("storage.redis_url")?,
    );
    control
        .block_on(live.start(source.as_deref()))
        .context("storing the config version")?;
    let live_stop = Arc::new(Notify::new());
    control.spawn(live.clone().run(live_stop.clone()));
    let hup_stop = Arc::new(Notify::new());
    if let Some(path) = source {
        // Registered here, before the proxy serves: SIGHUP's default action ends the process.
        let _rt = control.enter();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        control.spawn(live.clone().reload_on_sighup(path, hup, hup_stop.clone()));
    }
    let stripe_stop = Arc::new(Notify::new());
    if let Some(stripe) = &stripe {
        crate::stripe::spawn_background(&control, stripe, stripe_stop.clone())
            .context("starting the Stripe reporter and reconciler")?;
    }
    let admin_state_store = admin_store.clone();
    let admin_state = AdminState {
        shared: shared.clone(),
        ledger: ledger.clone(),
        store: admin_store,
        token,
        sync,
        stripe,
        live,
    };
    let admin_stop = Arc::new(Notify::new());
    let admin_task = {
        let stop = admin_stop.clone();
        control.spawn(async move {
            let app = admin::app(admin_state);
            let serve = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move { stop.notified().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin listener failed");
            }
        })
    };
    let counters_stop = Arc::new(Notify::new());
    let redis_for_fold = config
        .storage
        .redis_url
        .is_some()
        .then(|| admin_state_store.clone());
    control.spawn(maintain_counters(
        shared.clone(),
        redis_for_fold,
        counters_stop.clone(),
    ));
    let flush_stop = Arc::new(Notify::new());
    let flush_task = {
        let stop = flush_stop.clone();
        control.spawn(async move { flusher.run(async move { stop.notified().await }).await })
    };

    let conf = ServerConf {
        threads: match config.proxy.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        },
        grace_period_seconds: Some(config.proxy.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Proxy {
            shared: shared.clone(),
        },
    );
    proxy.add_tcp(&config.proxy.listen.to_string());
    server.add_service(proxy);
    for hc in health_checks {
        server.add_service(hc);
    }
    tracing::info!(proxy = %config.proxy.listen, admin = %admin_addr, "tollgate running");
    if let Some(f) = opts.on_ready {
        f(Ready {
            proxy: config.proxy.listen,
            admin: admin_addr,
        });
    }
    let shutdown_signal: Box<dyn ShutdownSignalWatch> = match opts.stop {
        Stop::Signals => Box::new(pingora::server::UnixShutdownSignalWatch),
        Stop::Notify(n) => Box::new(NotifyWatch(n)),
    };
    server.run(RunArgs { shutdown_signal });

    // The proxy has drained: nothing records usage any more. Flush what is queued.
    tracing::info!("proxy stopped; flushing usage");
    flush_stop.notify_one();
    admin_stop.notify_one();
    sync_stop.notify_one();
    live_stop.notify_one();
    hup_stop.notify_one();
    counters_stop.notify_one();
    stripe_stop.notify_waiters();
    alerts_stop.notify_one();
    let stats = control.block_on(async {
        let stats = flush_task.await;
        let _ = admin_task.await;
        if let Some(t) = alerts_task {
            // It releases the alerts it was still delivering (one ledger write).
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        stats
    });
    tracing::info!(?stats, "usage flushed");
    drop(shared);
    control.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Folds what fail-open plans counted locally during a Redis outage into Redis once it answers
/// again (checked every second, so within seconds of recovery), and drops counters of ended
/// periods. Without Redis the in-process store is the primary and is only swept. Idle
/// customers leave the rate limiters (the plans' and self-service's) at the same sweep.
async fn maintain_counters(
    shared: Arc<Shared>,
    redis: Option<Arc<dyn QuotaStore>>,
    stop: Arc<Notify>,
) {
    let local = &shared.fallback;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if let Some(redis) = &redis {
            if !local.is_empty() && redis.ping().await.is_ok() {
                let mut failed = Vec::new();
                let mut folded = 0usize;
                for d in local.drain() {
                    match redis.adjust(&d.customer, &d.meter, d.period, d.units).await {
                        Ok(_) => folded += 1,
                        Err(_) => failed.push(d),
                    }
                }
                if !failed.is_empty() {
                    local.restore(failed);
                }
                if folded > 0 {
                    tracing::info!(counters = folded, "folded fail-open counts into Redis");
                }
            }
        }
        if ticks.is_multiple_of(60) {
            local.sweep(chrono::Utc::now().timestamp());
            shared.self_service.sweep();
        }
    }
}

/// The threshold-alert queue and worker, when `[alerts]` is configured and its secret is set
/// (without the secret nothing could be signed: alerts are off, loudly).
fn alert_pipeline(
    config: &crate::config::Config,
    ledger: Arc<dyn crate::ledger::Ledger>,
) -> anyhow::Result<Option<(crate::alerts::Alerts, crate::alerts::AlertWorker)>> {
    let Some(settings) = &config.alerts else {
        return Ok(None);
    };
    let secret = std::env::var(&settings.secret_env).unwrap_or_default();
    if secret.is_empty() {
        tracing::error!(env = %settings.secret_env, "alert secret not set: threshold alerts are off");
        return Ok(None);
    }
    let pipeline = crate::alerts::pipeline(settings.clone(), secret.into_bytes(), ledger)
        .context("building the alert webhook client")?;
    Ok(Some(pipeline))
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
