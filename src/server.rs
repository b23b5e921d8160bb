//! Process assembly and lifecycle, nothing else: build the parts from a validated config, spawn
//! the background units, run pingora (proxy + upstream health checks), then cancel and drain.
//!
//! Lifecycle: every background unit (usage flusher, admin listener, entitlement and config
//! followers, SIGHUP reload, counter upkeep, Stripe reporter and reconciler, alert worker) is
//! spawned on one [`TaskTracker`] and stops at one [`CancellationToken`]. A token stays
//! cancelled, so a unit that was busy (not waiting) at that moment still stops at its next wait.
//! Shutdown ([`DrainWatch`]): `/readyz` turns 503, requests are still taken for `drain_delay`
//! (unless idle), then refused while those in flight finish (up to `shutdown_grace`); then
//! pingora stops, the token is cancelled, the flusher drains the usage channel into the ledger,
//! and the other units get [`DRAIN`] to finish (the alert worker releases what it still holds).
//!
//! Why two runtimes: sqlx pools and redis-rs connection managers spawn tasks on the runtime they
//! are created on; pingora creates its runtimes only inside `Server::run`. The control plane gets
//! its own runtime created here; the proxy's Redis connection is created lazily on pingora's.

use crate::admin::{self, AdminState};
use crate::auth::Verifier;
use crate::config::Config;
use crate::control::broadcast::Channel;
use crate::control::entitlement_sync::EntitlementSync;
use crate::control::live_config::LiveConfig;
use crate::entitle::Entitlements;
use crate::journal::{Journal, Leftover};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::conn_cap::{self, PerIpCap};
use crate::proxy::state::{Lifecycle, Shared, Snapshot};
use crate::proxy::{upstream, Proxy};
use crate::quota::fail_open::FailOpen;
use crate::quota::{
    lease::Leases, memory::MemoryStore, redis::RedisStore, CounterSeed, Period, QuotaStore,
    SeedAfterLoss,
};
use crate::tls::ListenerCert;
use crate::{alerts, ledger, quota, stripe, usage};
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the background units other than the flusher get to stop after the proxy drained.
const DRAIN: Duration = Duration::from_secs(2);

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
    /// The webhook listener, when `stripe.webhook_listen` is set.
    pub webhooks: Option<SocketAddr>,
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

/// How long nothing must have been in flight for the proxy to count as idle.
const QUIET: Duration = Duration::from_millis(250);

/// How often a drain logs its progress.
const PROGRESS: Duration = Duration::from_secs(1);

/// SIGQUIT (graceful upgrade), SIGTERM (graceful) and SIGINT (fast), read as pingora's own
/// watch reads them, but registered at start: pingora registers its handlers only when its main
/// loop begins, and a signal before that ended the process with the default action (the demo
/// printed its commands first; CI caught a SIGTERM in between).
struct EarlySignals {
    quit: tokio::sync::Mutex<tokio::signal::unix::Signal>,
    term: tokio::sync::Mutex<tokio::signal::unix::Signal>,
    int: tokio::sync::Mutex<tokio::signal::unix::Signal>,
}

impl EarlySignals {
    /// Needs a runtime context (the control runtime, whose driver delivers them).
    fn register() -> std::io::Result<EarlySignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(EarlySignals {
            quit: signal(SignalKind::quit())?.into(),
            term: signal(SignalKind::terminate())?.into(),
            int: signal(SignalKind::interrupt())?.into(),
        })
    }
}

#[async_trait]
impl ShutdownSignalWatch for EarlySignals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut quit, mut term, mut int) = (
            self.quit.lock().await,
            self.term.lock().await,
            self.int.lock().await,
        );
        tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// The drain of a graceful stop, done before pingora is told (pingora's own grace period is a
/// fixed sleep, so it is set to 0, and its runtimes drop whatever still runs when they stop):
/// 1. `/readyz` turns 503 and the proxy keeps taking requests for `drain_delay`, so load
///    balancers see the 503 before anything is refused; each answer closes its connection.
///    An idle proxy (nothing in flight for [`QUIET`]) skips the rest of the delay.
/// 2. New requests are answered 503 `shutting-down` while those in flight finish, for up to
///    `grace`; then pingora stops at once.
///
/// An idle instance thus exits within a fraction of a second, a busy one after at most
/// `drain_delay + grace`. Progress is logged every second.
struct DrainWatch {
    inner: Box<dyn ShutdownSignalWatch + Send + Sync>,
    shared: Arc<Shared>,
    delay: Duration,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainWatch {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.inner.recv().await;
        if matches!(signal, ShutdownSignal::FastShutdown) {
            return signal;
        }
        let life = &self.shared.lifecycle;
        life.start_draining();
        tracing::info!(
            in_flight = life.in_flight(),
            drain_delay_ms = ms(self.delay),
            grace_ms = ms(self.grace),
            "draining: /readyz answers 503, requests still taken"
        );
        drain_stage(life, self.delay, "delay", |l| l.idle_for(QUIET)).await;
        life.start_closing();
        tracing::info!(
            in_flight = life.in_flight(),
            "draining: new requests refused (503 shutting-down), waiting for those in flight"
        );
        drain_stage(life, self.grace, "in-flight", |l| l.in_flight() == 0).await;
        match life.in_flight() {
            0 => tracing::info!("drained: no request in flight"),
            n => tracing::warn!(
                in_flight = n,
                "shutdown grace over with requests in flight; they are cut off"
            ),
        }
        signal
    }
}

/// Waits until `done` or `limit` is over, logging the requests in flight every [`PROGRESS`].
async fn drain_stage(
    life: &Lifecycle,
    limit: Duration,
    stage: &'static str,
    done: impl Fn(&Lifecycle) -> bool,
) {
    let start = tokio::time::Instant::now();
    let mut report = start + PROGRESS;
    while !done(life) && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio::time::Instant::now() >= report {
            report += PROGRESS;
            tracing::info!(in_flight = life.in_flight(), stage, "draining");
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Recovers what a crashed (or stopped) process left in the journal: asks the quota store what
/// each of its batches granted, records the rows owed, and deletes the leftovers once every row
/// is safe. A store that cannot say (Redis down at start) keeps them for the next start.
async fn recover(
    leftover: &Leftover,
    journal: &Journal,
    flusher: &usage::Flusher,
    store: &dyn QuotaStore,
) {
    if leftover.is_empty() {
        journal.recovered();
        return;
    }
    let mut outcomes = std::collections::HashMap::new();
    let keys: Vec<&str> = leftover.batch_keys().collect();
    let mut unknown = 0;
    for chunk in keys.chunks(500) {
        if unknown > 0 {
            unknown += chunk.len(); // the store is down: asking again would only time out
            continue;
        }
        match store.batch_outcomes(chunk).await {
            Ok(bits) => outcomes.extend(chunk.iter().map(|k| k.to_string()).zip(bits)),
            Err(e) => {
                unknown += chunk.len();
                tracing::warn!(error = %e, "cannot read what journaled reservation batches granted");
            }
        }
    }
    let safe = flusher.recover(leftover.owed(&outcomes)).await;
    if leftover.unreadable > 0 {
        tracing::warn!(
            lines = leftover.unreadable,
            "unreadable journal lines skipped (a line torn by the crash)"
        );
    }
    if unknown > 0 {
        tracing::error!(batches = unknown, dir = %journal.dir().display(), "the quota store could not say what some journaled reservations charged; they are kept for the next start");
    } else if safe {
        journal.recovered();
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
    let rt = control.handle().clone();
    // pingora binds the proxy listener on a thread of its own, retries an address in use for
    // 30 s and then panics in that thread while the process lives on; try the address first.
    probe_bind(config.proxy.listen)
        .with_context(|| format!("proxy.listen: cannot bind {}", config.proxy.listen))?;
    crate::tls::install_provider();
    let listener_cert = match &config.proxy.tls {
        Some(files) => Some(ListenerCert::load(files).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let (pools, health_checks) =
        upstream::build(&config.upstreams).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Version 0 until `LiveConfig::start` numbers it from the ledger (before anything serves).
    let snapshot =
        Snapshot::new(config.clone(), Arc::new(pools), &metrics, 0).map_err(anyhow::Error::msg)?;

    let storage = config.storage.clone();
    let ledger = control
        .block_on(ledger::open(
            &storage.database_url,
            storage.database_schema.as_deref(),
        ))
        .with_context(|| format!("opening the ledger at {}", redact(&storage.database_url)))?;
    // Counters the quota store does not hold start from the ledger's units.
    let seed: Arc<dyn CounterSeed> = Arc::new(LedgerSeed {
        ledger: ledger.clone(),
        rt: rt.clone(),
    });
    let fail_open = Arc::new(FailOpen::new(Some(seed.clone())));
    // Every charge is on disk before its request is forwarded; a previous process's leftovers
    // are recovered below, before anything is served.
    let journal_dir = storage.spool_dir.join("journal");
    let (journal, leftover) = Journal::open(&journal_dir).with_context(|| {
        format!(
            "opening the reservation journal in {}",
            journal_dir.display()
        )
    })?;
    let journal = Arc::new(journal);
    let fallback = Arc::new(
        match &storage.redis_url {
            Some(_) => MemoryStore::new(),
            None => MemoryStore::with_seed(seed.clone()),
        }
        .with_journal(journal.clone()),
    );
    let redis_store = |timeout: Duration| -> anyhow::Result<Option<Arc<RedisStore>>> {
        Ok(match &storage.redis_url {
            Some(url) => Some(Arc::new(
                RedisStore::new(url, storage.redis_cluster, &storage.redis_prefix, timeout)
                    .context("storage.redis_url")?
                    .with_seed(Arc::new(SeedAfterLoss {
                        ledger: seed.clone(),
                        fallback: fallback.clone(),
                    }))
                    .with_journal(journal.clone()),
            )),
            None => None,
        })
    };
    // The proxy's handle connects lazily on pingora's runtime; the admin's on the control
    // runtime, which also looks after lease-mode plans' leases (and gives them back at stop).
    let proxy_redis = redis_store(storage.redis_timeout)?;
    let admin_redis = redis_store(storage.redis_timeout.max(Duration::from_millis(500)))?;
    let leases = admin_redis.as_ref().map(|r| {
        Arc::new(
            Leases::new(r.clone(), Some(journal.clone()), fail_open.clone())
                .with_calls(metrics.lease_calls.clone()),
        )
    });
    let (store, admin_store): (Arc<dyn QuotaStore>, Arc<dyn QuotaStore>) =
        match (&leases, proxy_redis, &admin_redis) {
            (Some(l), Some(p), Some(a)) => (Arc::new(l.store(p)), Arc::new(l.store(a.clone()))),
            _ => (fallback.clone(), fallback.clone()),
        };
    let channel = |topic: &str| -> anyhow::Result<Option<Channel>> {
        match &storage.redis_url {
            Some(url) => Ok(Some(
                Channel::new(url, &storage.redis_prefix, topic).context("storage.redis_url")?,
            )),
            None => Ok(None),
        }
    };

    let (shared, flusher, admin_listener, alert_worker) = control.block_on(async {
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
            Some(journal.clone()),
        );
        recover(&leftover, &journal, &flusher, admin_store.as_ref()).await;
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
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            verifier: Arc::new(verifier),
            entitlements: Arc::new(entitlements),
            store,
            fallback,
            embedded: storage.redis_url.is_none(),
            fail_open: fail_open.clone(),
            usage: sink,
            journal: Some(journal.clone()),
            leases: leases.clone(),
            metrics,
            alerts,
            self_service: Default::default(),
            billing: Default::default(),
            lifecycle: Default::default(),
            heads: Default::default(),
        });
        anyhow::Ok((shared, flusher, listener, alert_worker))
    })?;
    if let Some(worker) = alert_worker {
        tasks.spawn_on(worker.run(cancel.clone()), &rt);
    }

    let entitlements = Arc::new(EntitlementSync::new(
        ledger.clone(),
        shared.entitlements.clone(),
        channel("entitlements")?,
    ));
    tasks.spawn_on(entitlements.clone().run(cancel.clone()), &rt);
    let stripe = match &config.stripe {
        Some(settings) => Some(Arc::new(
            stripe::StripeWebhook::new(
                settings.clone(),
                ledger.clone(),
                shared.snapshot.clone(),
                entitlements.clone(),
                &shared.metrics.registry,
            )
            .context("registering Stripe metrics")?,
        )),
        None => None,
    };
    let live = Arc::new(LiveConfig::new(
        shared.clone(),
        ledger.clone(),
        channel("config")?,
    ));
    control
        .block_on(live.start(source.as_deref()))
        .context("storing the config version")?;
    tasks.spawn_on(live.clone().run(cancel.clone()), &rt);
    {
        // Registered here, before the proxy serves: SIGHUP's default action ends the process,
        // and a `kill -HUP` must not stop an instance that has no file to reload (the demo).
        let _rt = control.enter();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        if let Some(cert) = listener_cert.clone() {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("listening for SIGHUP")?;
            let cancel = cancel.clone();
            tasks.spawn_on(
                async move {
                    while cancel.run_until_cancelled(hup.recv()).await.flatten().is_some() {
                        match cert.reload() {
                            Ok(()) => tracing::info!("SIGHUP: proxy.tls certificate reloaded"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: proxy.tls certificate not reloaded; the one in use stays"),
                        }
                    }
                },
                &rt,
            );
        }
        match source {
            Some(path) => tasks.spawn_on(
                live.clone().reload_on_sighup(path, hup, cancel.clone()),
                &rt,
            ),
            None => {
                let cancel = cancel.clone();
                tasks.spawn_on(
                    async move {
                        while cancel.run_until_cancelled(hup.recv()).await.flatten().is_some() {
                            tracing::warn!("SIGHUP: no config file to reload; the admin API changes this instance's config");
                        }
                    },
                    &rt,
                )
            }
        };
    }
    if let Some(stripe) = &stripe {
        stripe::start(stripe, &shared.metrics.registry, &tasks, &rt, &cancel)
            .context("starting the Stripe reporter and reconciler")?;
    }
    let billing = crate::billing::service::Billing::new(ledger.clone(), stripe.clone());
    let _ = shared.billing.set(Arc::new(billing));
    if let Some(census) = channel("config")? {
        // How many instances share Redis: a fail-open plan's default share of what is left.
        let fail_open = fail_open.clone();
        tasks.spawn_on(
            crate::control::broadcast::census(
                census,
                Duration::from_secs(10),
                move |n| fail_open.set_instances(n),
                cancel.clone(),
            ),
            &rt,
        );
    }
    if let Some(leases) = &shared.leases {
        tasks.spawn_on(leases.clone().run(cancel.clone()), &rt);
    }
    let sweep = shared.clone();
    tasks.spawn_on(
        quota::maintain::run(
            shared.fallback.clone(),
            admin_redis.map(|r| r as Arc<dyn QuotaStore>),
            fail_open.clone(),
            move || sweep.self_service.sweep(),
            cancel.clone(),
        ),
        &rt,
    );

    let admin_addr = admin_listener.local_addr()?;
    let webhook_listener = match config.stripe.as_ref().and_then(|s| s.webhook_listen) {
        Some(addr) => Some(
            control
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("stripe.webhook_listen: cannot bind {addr}"))?,
        ),
        None => None,
    };
    let webhooks_addr = match &webhook_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let admin_state = AdminState {
        shared: shared.clone(),
        ledger,
        store: admin_store,
        token: admin_token(&config),
        metrics: metrics_access(&config),
        ingest_token: config.admin.ingest_token_env.as_deref().and_then(|env| {
            let token = token_from_env(env);
            if token.is_none() {
                tracing::warn!(%env, "ingest token not set: /v1/* takes the admin token only");
            }
            token
        }),
        entitlements,
        stripe,
        live,
    };
    tasks.spawn_on(
        crate::ingest::check::sweep(
            crate::ingest::Ingester {
                ledger: admin_state.ledger.clone(),
                store: admin_state.store.clone(),
                config: shared.snapshot.clone(),
                entitlements: shared.entitlements.clone(),
                alerts: None,
            },
            cancel.clone(),
        ),
        &rt,
    );
    if let Some(listener) = webhook_listener {
        let (app, stop) = (admin::webhook_app(admin_state.clone()), cancel.clone());
        tasks.spawn_on(
            async move {
                let serve =
                    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "webhook listener failed");
                }
            },
            &rt,
        );
    }
    let stop_admin = cancel.clone();
    tasks.spawn_on(
        async move {
            let serve = axum::serve(admin_listener, admin::app(admin_state))
                .with_graceful_shutdown(stop_admin.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin listener failed");
            }
        },
        &rt,
    );
    let flush = tasks.spawn_on(flusher.run(cancel.clone().cancelled_owned()), &rt);
    tasks.spawn_on(
        announce_listening(config.proxy.listen, shared.clone(), cancel.clone()),
        &rt,
    );
    tasks.close();

    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));
    server.bootstrap();
    let app = pingora::proxy::http_proxy(
        &server.configuration,
        Proxy {
            shared: shared.clone(),
        },
    );
    let app = PerIpCap::new(
        app,
        config.proxy.max_connections_per_ip,
        config.proxy.header_read_timeout,
        shared.heads.clone(),
        conn_cap::Counters {
            refused: shared.metrics.connections_refused.clone(),
            timed_out: shared.metrics.header_timeouts.clone(),
        },
    );
    let mut proxy = pingora::services::listening::Service::new("tollgate proxy".into(), app);
    match &listener_cert {
        Some(cert) => {
            let settings = cert
                .settings()
                .map_err(|e| anyhow::anyhow!("proxy.tls: {e}"))?;
            proxy.add_tls_with_settings(&config.proxy.listen.to_string(), None, settings);
        }
        None => proxy.add_tcp(&config.proxy.listen.to_string()),
    }
    server.add_service(proxy);
    for hc in health_checks {
        server.add_service(hc);
    }
    tracing::info!(
        proxy = %config.proxy.listen,
        proxy_tls = listener_cert.is_some(),
        admin = %admin_addr,
        webhooks = webhooks_addr.map(|a| a.to_string()),
        quota_store = match (&storage.redis_url, storage.redis_cluster) {
            (None, _) => "in-process",
            (Some(_), false) => "redis",
            (Some(_), true) => "redis-cluster",
        },
        ledger = %redact(&storage.database_url),
        config_version = shared.snapshot.load().version,
        "tollgate running"
    );
    // The stop signals are registered before anything says "ready": a SIGTERM sent the moment
    // the demo prints (or `/readyz` turns 200) is a graceful stop, not the default action.
    let signal: Box<dyn ShutdownSignalWatch + Send + Sync> = match opts.stop {
        Stop::Signals => {
            let _rt = control.enter();
            Box::new(EarlySignals::register().context("listening for SIGTERM, SIGINT, SIGQUIT")?)
        }
        Stop::Notify(n) => Box::new(NotifyWatch(n)),
    };
    if let Some(f) = opts.on_ready {
        f(Ready {
            proxy: config.proxy.listen,
            admin: admin_addr,
            webhooks: webhooks_addr,
        });
    }
    let shutdown_signal = Box::new(DrainWatch {
        inner: signal,
        shared: shared.clone(),
        delay: config.proxy.drain_delay,
        grace: config.proxy.shutdown_grace,
    });
    server.run(RunArgs { shutdown_signal });

    // The proxy has drained: nothing records usage any more. Give back what leases hold and
    // flush what is queued.
    tracing::info!("proxy stopped; flushing usage");
    cancel.cancel();
    if let Some(leases) = &shared.leases {
        if control
            .block_on(async { tokio::time::timeout(DRAIN, leases.give_back_all()).await })
            .is_err()
        {
            tracing::warn!("leases not all given back in time; they come back when they expire");
        }
    }
    let stats = control.block_on(async {
        let stats = flush.await;
        if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks still running after the drain; stopping anyway");
        }
        stats
    });
    match stats {
        Ok(stats) => tracing::info!(
            queued = stats.queued,
            inserted = stats.inserted,
            duplicates = stats.duplicates,
            spooled = stats.spooled,
            failed = stats.failed,
            lost = stats.lost,
            "usage flushed"
        ),
        Err(e) => tracing::error!(error = %e, "usage flusher did not finish"),
    }
    // Every row is safe now (unless the ledger and the spool both failed): a clean stop leaves
    // no journal to recover.
    journal.close();
    drop(shared);
    control.shutdown_timeout(DRAIN);
    tracing::info!("stopped");
    Ok(())
}

/// Connects to the proxy listener until it accepts (pingora binds it on its own runtime, after
/// the admin listener is up), then marks the lifecycle listening, so `/readyz` turns 200 only
/// once a request can reach the proxy. The connection is closed before it sends anything.
async fn announce_listening(addr: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    while !stop.is_cancelled() {
        if addr.port() == 0 || tokio::net::TcpStream::connect(target).await.is_ok() {
            shared.lifecycle.now_listening();
            tracing::debug!(proxy = %addr, "proxy listener takes connections");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Binds `addr` and lets it go again: an address in use (or not ours) is an error now, with the
/// OS's reason, rather than a listener pingora never gets. pingora binds with `SO_REUSEADDR`,
/// as `std` does, so what binds here binds there.
fn probe_bind(addr: SocketAddr) -> std::io::Result<()> {
    std::net::TcpListener::bind(addr).map(drop)
}

/// The quota stores' [`CounterSeed`]: the ledger's units for a counter, read on the control
/// runtime (where the ledger's pool lives) whichever runtime asks.
struct LedgerSeed {
    ledger: Arc<dyn Ledger>,
    rt: tokio::runtime::Handle,
}

#[async_trait]
impl CounterSeed for LedgerSeed {
    async fn units(&self, customer: &str, meter: &str, period: Period) -> Result<u64, String> {
        let (ledger, customer, meter) =
            (self.ledger.clone(), customer.to_string(), meter.to_string());
        let at = |t: i64| chrono::DateTime::from_timestamp(t, 0).ok_or("period out of range");
        let (from, to) = (at(period.start)?, at(period.end)?);
        let read = self
            .rt
            .spawn(async move { ledger.usage_totals(&customer, &meter, from, to).await });
        match read.await {
            Ok(Ok((units, _))) => Ok(u64::try_from(units).unwrap_or(0)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// pingora's settings: worker threads (0 = one per core) and the drain.
fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: match config.proxy.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        },
        // The drain is `DrainWatch`'s: it ends as soon as the proxy is idle.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    }
}

/// The admin token from the env var the config names; `None` (logged) closes `/admin`.
/// A bearer token from the env var `env`; `None` when it is unset or empty.
fn token_from_env(env: &str) -> Option<Arc<secrecy::SecretString>> {
    std::env::var(env)
        .ok()
        .filter(|t| !t.is_empty())
        .map(|t| Arc::new(t.into()))
}

fn admin_token(config: &Config) -> Option<Arc<secrecy::SecretString>> {
    let token = token_from_env(&config.admin.token_env);
    if token.is_none() {
        tracing::warn!(env = %config.admin.token_env, "admin token not set: /admin is closed");
    }
    token
}

/// Who may read `/metrics`: anyone without `admin.metrics_token_env`; with it, its token (or the
/// admin token), and only the admin token while that env var is empty (logged).
fn metrics_access(config: &Config) -> admin::MetricsAccess {
    let Some(env) = &config.admin.metrics_token_env else {
        return admin::MetricsAccess::Open;
    };
    match token_from_env(env) {
        Some(t) => admin::MetricsAccess::Token(t),
        None => {
            tracing::warn!(%env, "metrics token not set: /metrics takes the admin token only");
            admin::MetricsAccess::AdminOnly
        }
    }
}

/// The threshold-alert queue and worker, when `[alerts]` is configured and its secret is set
/// (without the secret nothing could be signed: alerts are off, loudly).
fn alert_pipeline(
    config: &Config,
    ledger: Arc<dyn ledger::Ledger>,
) -> anyhow::Result<Option<(alerts::Alerts, alerts::AlertWorker)>> {
    let Some(settings) = &config.alerts else {
        return Ok(None);
    };
    let secret = std::env::var(&settings.secret_env).unwrap_or_default();
    if secret.is_empty() {
        tracing::error!(env = %settings.secret_env, "alert secret not set: threshold alerts are off");
        return Ok(None);
    }
    let pipeline = alerts::pipeline(settings.clone(), secret.into_bytes(), ledger)
        .context("building the alert webhook client")?;
    Ok(Some(pipeline))
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            // Only fails for URLs that cannot carry a password, which this one does.
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords are masked; user, host, database and URLs without a password are kept.
    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://app:s3cr%40t@db.internal:5432/tollgate"),
            "postgres://app:***@db.internal:5432/tollgate"
        );
        assert_eq!(
            redact("postgres://app@db/tollgate"),
            "postgres://app@db/tollgate"
        );
        assert_eq!(redact("sqlite:data/tollgate.db"), "sqlite:data/tollgate.db");
    }

    /// A background unit that is busy when shutdown begins still stops at its next wait: the
    /// token stays cancelled (a `Notify::notify_waiters` sent while nobody waits is lost).
    #[tokio::test]
    async fn a_unit_busy_at_cancel_still_stops() {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let started = Arc::new(Notify::new());
        let (go, busy) = (started.clone(), cancel.clone());
        tasks.spawn(async move {
            go.notify_one();
            // Busy (not waiting on the token) when it is cancelled.
            std::thread::sleep(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = busy.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                }
            }
        });
        tasks.close();
        started.notified().await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("the unit stopped");
    }
}
