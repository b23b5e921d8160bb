//! Peer comparison: `cargo bench --bench peers` (see `benches/README.md`).
//!
//! The same job through several gateways, each pinned to one core (`PROXY_CPU`, default 1),
//! while the upstream (nginx, 200 + 1,024 bytes), a private Redis and the load generator share
//! the other (`LOAD_CPU`, default 0): bare pingora (no auth: the floor of any pingora proxy),
//! nginx + Lua + Redis, HAProxy 2.6, tollgate in exact and in lease mode. The job: an HS256
//! JWT (alg, signature, exp), customer = `sub`, check and count the customer's calls against a
//! limit (429 at it), forward over keep-alive. wrk rotates 1,000 customers' tokens.
//!
//! Rounds are interleaved (A B C … A B C …), each run on a fresh start after a smoke check
//! and a warm-up. Then a fixed-rate run at half the slowest peer's saturation rate, for
//! latency. It prints medians over rounds, the ratios to bare pingora paired per round, and a
//! TSV of every run.
//!
//! Env: `ROUNDS` (3), `BENCH_DURATION` (15 s), `BENCH_WARMUP` (5 s), `BENCH_CONNECTIONS` (64),
//! `RATE` (req/s; default `RATE_FRACTION` × the slowest median), `RATE_FRACTION` (0.5),
//! `BENCH_RATE_DURATION` (= `BENCH_DURATION`), `PEERS` (comma-separated subset and order of
//! pingora, nginx-lua, haproxy, tollgate-exact, tollgate-lease), `PHASES` (`sat,rate`),
//! `PROXY_CPU`, `LOAD_CPU`, `BENCH_PG_URL` (postgres://postgres@127.0.0.1:5432/postgres),
//! `BENCH_TSV` (also write the TSV there), `BENCH_KEEP=1` (keep the run directory),
//! `BENCH_PLAN_EXTRA` / `BENCH_STORAGE_EXTRA` (TOML lines added to tollgate's plan and
//! `[storage]`, for experiments: `lease_ttl = "1h"`, `usage_flush_ms = 20`).

#[path = "peers/drive.rs"]
mod drive;
#[path = "peers/gateways.rs"]
mod gateways;
#[path = "peers/procs.rs"]
mod procs;
#[path = "peers/report.rs"]
mod report;

// The same allocator as tollgate, for the bare pingora peer (like for like).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use drive::Load;
use gateways::{Kind, Shared};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

const CUSTOMERS: usize = 1000;
/// Pasted into HAProxy's config: letters and digits only.
const SECRET: &str = "peersbenchHS256sharedsecret0123456789";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--serve-passthrough") => return serve_passthrough(&args[2..]),
        Some("--fixed-rate") => {
            return match drive::fixed_rate_main(&args[2..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fixed-rate client: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {}
    }
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("peers bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = check_prerequisites(&s) {
        eprintln!("peers bench: {msg}");
        return ExitCode::from(2);
    }
    let mut state = State::new(&s);
    install_signal_handler();
    let result = run(&s, &mut state);
    if interrupted() {
        // The signal handler cleans up and exits with 130.
        loop {
            std::thread::park();
        }
    }
    state.clean_up();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\npeers bench: some peers failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\npeers bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub struct Settings {
    rounds: usize,
    duration: u64,
    warmup: u64,
    conns: u32,
    rate: Option<u32>,
    rate_fraction: f64,
    rate_duration: u64,
    peers: Vec<Kind>,
    saturation: bool,
    fixed: bool,
    proxy_cpu: u32,
    load_cpu: u32,
    pg_url: String,
    tsv: Option<PathBuf>,
    keep: bool,
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .trim_end_matches('s')
            .parse()
            .ok()
            .with_context(|| format!("{key}={v:?}: not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let duration = env_num("BENCH_DURATION", 15u64)?;
        let peers = match std::env::var("PEERS") {
            Ok(v) => v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    Kind::ALL
                        .into_iter()
                        .find(|k| k.key() == p)
                        .with_context(|| format!("PEERS: unknown peer {p:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            Err(_) => Kind::ALL.to_vec(),
        };
        let phases = std::env::var("PHASES").unwrap_or_else(|_| "sat,rate".into());
        let rate = match std::env::var("RATE") {
            Ok(v) => Some(v.trim().parse().with_context(|| format!("RATE={v:?}"))?),
            Err(_) => None,
        };
        let s = Settings {
            rounds: env_num("ROUNDS", 3usize)?,
            duration,
            warmup: env_num("BENCH_WARMUP", 5u64)?,
            conns: env_num("BENCH_CONNECTIONS", 64u32)?,
            rate,
            rate_fraction: env_num("RATE_FRACTION", 0.5f64)?,
            rate_duration: env_num("BENCH_RATE_DURATION", duration)?,
            peers,
            saturation: phases.contains("sat"),
            fixed: phases.contains("rate"),
            proxy_cpu: env_num("PROXY_CPU", 1u32)?,
            load_cpu: env_num("LOAD_CPU", 0u32)?,
            pg_url: std::env::var("BENCH_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            tsv: std::env::var_os("BENCH_TSV").map(PathBuf::from),
            keep: std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1"),
        };
        if s.rounds == 0 || s.duration == 0 || s.conns == 0 || s.peers.is_empty() {
            bail!("ROUNDS, BENCH_DURATION, BENCH_CONNECTIONS and PEERS must not be 0 or empty");
        }
        if !s.saturation && s.fixed && s.rate.is_none() {
            bail!("PHASES=rate alone needs RATE=");
        }
        Ok(s)
    }
}

/// What is missing, as the `apt-get install` line that brings it.
fn check_prerequisites(s: &Settings) -> Result<(), String> {
    let on_path = |tool: &str| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(tool).is_file())
    };
    let mut missing: Vec<&str> = Vec::new();
    let mut need = |ok: bool, pkg: &'static str| {
        if !ok && !missing.contains(&pkg) {
            missing.push(pkg);
        }
    };
    need(on_path("wrk"), "wrk");
    need(on_path("taskset"), "util-linux");
    need(on_path("nginx"), "nginx");
    need(on_path("redis-server"), "redis-server");
    if s.peers.contains(&Kind::NginxLua) {
        let file = |p: &str| Path::new(p).is_file();
        need(
            file("/usr/lib/nginx/modules/ngx_http_lua_module.so"),
            "libnginx-mod-http-lua",
        );
        need(
            file("/usr/lib/nginx/modules/ndk_http_module.so"),
            "libnginx-mod-http-ndk",
        );
        need(file("/usr/share/lua/5.1/ngx/base64.lua"), "lua-resty-core");
        need(
            file("/usr/share/lua/5.1/nginx/redis.lua"),
            "lua-nginx-redis",
        );
        need(
            file("/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so"),
            "lua-cjson",
        );
    }
    if s.peers.contains(&Kind::Haproxy) {
        need(on_path("haproxy"), "haproxy");
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing Debian packages; install them with:\n  sudo apt-get install -y {}",
            missing.join(" ")
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if s.proxy_cpu as usize >= cores || s.load_cpu as usize >= cores || s.proxy_cpu == s.load_cpu {
        return Err(format!(
            "PROXY_CPU={} and LOAD_CPU={} must be two different cores of the {cores} here",
            s.proxy_cpu, s.load_cpu
        ));
    }
    if s.peers.iter().any(|k| k.is_tollgate()) {
        pg_reachable(&s.pg_url).map_err(|e| {
            format!(
                "tollgate's ledger needs PostgreSQL at {} (BENCH_PG_URL): {e:#}",
                s.pg_url
            )
        })?;
    }
    Ok(())
}

fn pg_reachable(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = sqlx::PgConnection::connect(url).await?;
        c.close().await?;
        anyhow::Ok(())
    })
}

/// What outlives one run: removed at the end, after a failure, and on Ctrl-C or TERM.
struct State {
    run: PathBuf,
    schema: String,
    pg_url: String,
    keep: bool,
}

static CLEANUP: Mutex<Option<(PathBuf, String, String, bool)>> = Mutex::new(None);

impl State {
    fn new(s: &Settings) -> State {
        let tag = format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64 & 0xff_ffff)
        );
        let st = State {
            run: std::env::temp_dir().join(format!("tollgate-peers-{tag}")),
            schema: format!("peers_{tag}"),
            pg_url: s.pg_url.clone(),
            keep: s.keep,
        };
        *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()) = Some((
            st.run.clone(),
            st.schema.clone(),
            st.pg_url.clone(),
            st.keep,
        ));
        st
    }

    fn clean_up(&mut self) {
        procs::kill_all_live();
        clean_storage(&self.run, &self.schema, &self.pg_url, self.keep);
        *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn clean_storage(run: &Path, schema: &str, pg_url: &str, keep: bool) {
    if run.join("schema-used").exists() {
        if let Err(e) = gateways::drop_schema(pg_url, schema) {
            eprintln!("clean-up: dropping schema {schema}: {e:#}");
        }
    }
    if keep {
        eprintln!("run directory kept: {}", run.display());
    } else {
        let _ = std::fs::remove_dir_all(run);
    }
}

/// Ctrl-C or TERM: stop every child, drop the schema, remove the files, exit 130.
fn install_signal_handler() {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            eprintln!("\npeers bench: interrupted, stopping everything it started");
            procs::kill_all_live();
            let state = CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((run, schema, pg, keep)) = state {
                clean_storage(&run, &schema, &pg, keep);
            }
            std::process::exit(130);
        });
    if let Err(e) = spawned {
        eprintln!("peers bench: no signal handler ({e}); Ctrl-C leaves processes behind");
    }
}

/// One measured run of one peer.
pub struct Row {
    pub phase: &'static str,
    pub round: usize,
    pub kind: Kind,
    pub load: Load,
    pub target_rate: u32,
    pub peer_cpu: f64,
    pub redis_cpu: f64,
    pub pg_cpu: f64,
    /// Wall time between the CPU snapshots (the measured run plus the client's start and stop).
    pub window_secs: f64,
    /// Redis commands over the run (the bench's own `INFO` left out), by name.
    pub redis_cmds: Vec<(String, u64)>,
    /// `/proc/stat` over the run: busy % of the proxy core and the load core, steal %.
    pub proxy_core_busy: f64,
    pub load_core_busy: f64,
    pub steal: f64,
}

impl Row {
    pub fn per_1k(&self, cpu_secs: f64) -> f64 {
        cpu_secs * 1e3 / (self.load.requests.max(1) as f64 / 1e3)
    }

    /// Script calls (`EVAL`, `EVALSHA`, `FCALL`, read-only forms) per request: each is one
    /// round trip.
    pub fn scripts_per_req(&self) -> f64 {
        let n: u64 = self
            .redis_cmds
            .iter()
            .filter(|(c, _)| {
                matches!(
                    c.as_str(),
                    "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
                )
            })
            .map(|(_, n)| n)
            .sum();
        n as f64 / self.load.requests.max(1) as f64
    }

    /// Every command Redis ran per request, those inside scripts included.
    pub fn cmds_per_req(&self) -> f64 {
        let n: u64 = self.redis_cmds.iter().map(|(_, n)| n).sum();
        n as f64 / self.load.requests.max(1) as f64
    }
}

struct Bench<'a> {
    s: &'a Settings,
    sh: Shared,
    redis: procs::Proc,
    tokens: PathBuf,
    script: PathBuf,
    valid: String,
    upstream_log: PathBuf,
    starts: usize,
}

fn run(s: &Settings, state: &mut State) -> anyhow::Result<bool> {
    let run = state.run.clone();
    std::fs::create_dir_all(&run).with_context(|| format!("creating {run:?}"))?;
    let tokens = drive::mint(SECRET, CUSTOMERS)?;
    let tokens_file = run.join("tokens.txt");
    std::fs::write(&tokens_file, tokens.join("\n") + "\n")?;
    let script = run.join("wrk.lua");
    std::fs::write(&script, gateways::WRK_LUA)?;

    let (_upstream, upstream_addr) = gateways::start_upstream(&run, s.load_cpu)?;
    let (redis, redis_port) = gateways::start_redis(&run, s.load_cpu)?;
    if s.peers.iter().any(|k| k.is_tollgate()) {
        // tollgate creates the schema; the marker tells the clean-up to drop it.
        std::fs::write(run.join("schema-used"), &state.schema)?;
    }
    let mut b = Bench {
        s,
        sh: Shared {
            run: run.clone(),
            upstream: upstream_addr,
            redis_port,
            secret: SECRET.to_string(),
            pg_url: s.pg_url.clone(),
            schema: state.schema.clone(),
            proxy_cpu: s.proxy_cpu,
        },
        redis,
        tokens: tokens_file,
        script,
        valid: tokens[0].clone(),
        upstream_log: run.join("upstream.smoke.log"),
        starts: 0,
    };

    println!(
        "tollgate peer bench: peers on CPU {}, upstream (nginx, 200 + {} B), Redis {} and the load \
         generator on CPU {}; {} customers' HS256 tokens rotating; {} rounds",
        s.proxy_cpu,
        gateways::BODY_LEN,
        redis_port,
        s.load_cpu,
        CUSTOMERS,
        s.rounds
    );
    println!("run directory: {}", run.display());
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average before: {}", l.trim());
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<(Kind, String)> = Vec::new();
    if s.saturation {
        println!(
            "\n(a) saturation: wrk -t1 -c{} -d{}s after a {} s warm-up, per peer and round",
            s.conns, s.duration, s.warmup
        );
        for round in 1..=s.rounds {
            for &kind in &s.peers {
                if failed.iter().any(|(k, _)| *k == kind) {
                    continue;
                }
                match b.measure(kind, "sat", round, 0) {
                    Ok(row) => rows.push(row),
                    Err(_) if interrupted() => bail!("interrupted"),
                    Err(e) => {
                        eprintln!("  {}: FAILED: {e:#}", kind.label());
                        failed.push((kind, format!("{e:#}")));
                    }
                }
            }
        }
        report::saturation(&rows, s);
    }
    if s.fixed {
        let rate = match s.rate {
            Some(r) => r,
            None => report::fixed_rate_target(&rows, s.rate_fraction)
                .context("no saturation result to derive the fixed rate from (set RATE=)")?,
        };
        println!(
            "\n(b) fixed rate {rate} req/s, open loop, {} connections, {} s after a {} s warm-up \
             at the same rate",
            s.conns, s.rate_duration, s.warmup
        );
        for round in 1..=s.rounds {
            for &kind in &s.peers {
                if failed.iter().any(|(k, _)| *k == kind) {
                    continue;
                }
                match b.measure(kind, "rate", round, rate) {
                    Ok(row) => rows.push(row),
                    Err(_) if interrupted() => bail!("interrupted"),
                    Err(e) => {
                        eprintln!("  {}: FAILED: {e:#}", kind.label());
                        failed.push((kind, format!("{e:#}")));
                    }
                }
            }
        }
        report::fixed(&rows, s, rate);
    }
    report::targets(&rows);
    report::tsv(&rows, s.tsv.as_deref())?;
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average after: {}", l.trim());
    }
    for (k, e) in &failed {
        println!("FAILED {}: {}", k.label(), e.lines().next().unwrap_or(""));
    }
    Ok(failed.is_empty())
}

/// A signal arrived: the handler is cleaning up and will exit.
fn interrupted() -> bool {
    procs::STOPPING.load(std::sync::atomic::Ordering::SeqCst)
}

impl Bench<'_> {
    /// Fresh start, smoke check, warm-up, measured run, stop.
    fn measure(
        &mut self,
        kind: Kind,
        phase: &'static str,
        round: usize,
        rate: u32,
    ) -> anyhow::Result<Row> {
        let s = self.s;
        self.starts += 1;
        let mut peer = gateways::start(kind, &self.sh, self.starts)?;
        let tag = format!("{}-{phase}-{round}", kind.key());
        drive::smoke(
            peer.addr,
            kind.auth(),
            &tag,
            SECRET,
            &self.valid,
            &self.upstream_log,
        )
        .context("smoke check")?;
        let load_cpu = s.load_cpu;
        let run = |secs: u64| -> anyhow::Result<Load> {
            if phase == "sat" {
                drive::wrk(
                    load_cpu,
                    peer.addr,
                    secs,
                    s.conns,
                    &self.script,
                    &self.tokens,
                )
            } else {
                drive::fixed_rate(load_cpu, peer.addr, rate, 0, secs, s.conns, &self.tokens)
            }
        };
        if s.warmup > 0 {
            run(s.warmup).context("warm-up")?;
        }
        let pids = [peer.proc.pid, self.redis.pid];
        let redis_before = gateways::redis_commandstats(self.sh.redis_port)?;
        let before = procs::cpu_snapshot(&pids, "postgres");
        let started = std::time::Instant::now();
        let secs = if phase == "sat" {
            s.duration
        } else {
            s.rate_duration
        };
        let load = run(secs).context("measured run")?;
        let after = procs::cpu_snapshot(&pids, "postgres");
        let window_secs = started.elapsed().as_secs_f64();
        let redis_after = gateways::redis_commandstats(self.sh.redis_port)?;
        if !peer.proc.alive() {
            bail!(
                "{} died during the run:\n{}",
                kind.label(),
                peer.proc.log_tail()
            );
        }
        // Let the requests wrk abandoned at its stop finish before the stop.
        std::thread::sleep(Duration::from_millis(200));
        peer.proc.stop();

        let redis_cmds = redis_after
            .iter()
            .filter(|(c, _)| c != "info")
            .map(|(c, n)| {
                let b = redis_before
                    .iter()
                    .find(|(bc, _)| bc == c)
                    .map_or(0, |(_, v)| *v);
                (c.clone(), n.saturating_sub(b))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let core = |i: u32| -> (f64, f64) {
            let (Some(a), Some(b)) = (after.cores.get(i as usize), before.cores.get(i as usize))
            else {
                return (0.0, 0.0);
            };
            let total = (a.2 - b.2).max(1) as f64;
            (
                100.0 * (a.0 - b.0) as f64 / total,
                100.0 * (a.1 - b.1) as f64 / total,
            )
        };
        let (proxy_busy, proxy_steal) = core(s.proxy_cpu);
        let (load_busy, load_steal) = core(s.load_cpu);
        let row = Row {
            phase,
            round,
            kind,
            target_rate: rate,
            peer_cpu: after.trees[0] - before.trees[0],
            redis_cpu: after.trees[1] - before.trees[1],
            // A postgres process that exits in the window takes its ticks with it.
            pg_cpu: (after.by_name - before.by_name).max(0.0),
            window_secs,
            redis_cmds,
            proxy_core_busy: proxy_busy,
            load_core_busy: load_busy,
            steal: proxy_steal.max(load_steal),
            load,
        };
        println!(
            "  round {round} {:<20} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  non-2xx {}  \
             errors {}  CPU {:.1} ms/1k (Redis {:.1})  Redis scripts/req {:.3}",
            kind.label(),
            row.load.rps(),
            row.load.p50_us / 1e3,
            row.load.p99_us / 1e3,
            row.load.non_2xx,
            row.load.socket_errors,
            row.per_1k(row.peer_cpu),
            row.per_1k(row.redis_cpu),
            row.scripts_per_req()
        );
        Ok(row)
    }
}

// ---------------------------------------------------------------------------------------------
// Bare pingora: `--serve-passthrough LISTEN UPSTREAM`, run by the bench as a peer of its own.

/// pingora's proxy with nothing but `upstream_peer`: no auth, no counting.
struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn serve_passthrough(args: &[String]) -> ExitCode {
    let (Some(listen), Some(Ok(upstream))) = (args.first(), args.get(1).map(|u| u.parse())) else {
        eprintln!("usage: --serve-passthrough LISTEN UPSTREAM");
        return ExitCode::from(2);
    };
    // One worker thread, as every peer; pingora's defaults otherwise (keep-alive pool of 128).
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Passthrough { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
