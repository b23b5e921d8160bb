//! The fixed processes (upstream, Redis) and the peers: their configs, start and readiness.

use crate::procs::{free_port, pinned, wait_accepting, Proc};
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const UPSTREAM_CONF: &str = include_str!("upstream.nginx.conf");
const NGINX_LUA_CONF: &str = include_str!("nginx-lua.conf");
const GATE_LUA: &str = include_str!("gate.lua");
const HAPROXY_CFG: &str = include_str!("haproxy.cfg");
pub const WRK_LUA: &str = include_str!("wrk.lua");

/// The limit every peer counts against: never reached in a run, but checked on every request.
pub const LIMIT: u64 = 1_000_000_000_000;
/// The upstream's body length.
pub const BODY_LEN: usize = 1024;
/// The env var holding the HS256 secret for nginx-lua and tollgate.
const SECRET_ENV: &str = "PEERS_JWT_SECRET";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Pingora,
    NginxLua,
    Haproxy,
    TollgateExact,
    TollgateLease,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pingora,
        Kind::NginxLua,
        Kind::Haproxy,
        Kind::TollgateExact,
        Kind::TollgateLease,
    ];

    /// The name in `PEERS=` and in the TSV.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Pingora => "pingora",
            Kind::NginxLua => "nginx-lua",
            Kind::Haproxy => "haproxy",
            Kind::TollgateExact => "tollgate-exact",
            Kind::TollgateLease => "tollgate-lease",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Pingora => "bare pingora",
            Kind::NginxLua => "nginx + Lua + Redis",
            Kind::Haproxy => "HAProxy 2.6 jwt",
            Kind::TollgateExact => "tollgate exact",
            Kind::TollgateLease => "tollgate lease",
        }
    }

    /// Does it check tokens (and so get the 401 smoke cases)?
    pub fn auth(self) -> bool {
        self != Kind::Pingora
    }

    pub fn is_tollgate(self) -> bool {
        matches!(self, Kind::TollgateExact | Kind::TollgateLease)
    }
}

/// What every peer shares in one bench run.
pub struct Shared {
    pub run: PathBuf,
    pub upstream: SocketAddr,
    pub redis_port: u16,
    pub secret: String,
    pub pg_url: String,
    pub schema: String,
    pub proxy_cpu: u32,
}

/// Replaces `@KEY@` placeholders; fails if one is left.
fn render(template: &str, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("@{k}@"), v);
    }
    if let Some(i) = s.find('@') {
        let rest = &s[i + 1..];
        if let Some(j) = rest.find('@') {
            let name = &rest[..j];
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                bail!("placeholder @{name}@ not rendered");
            }
        }
    }
    Ok(s)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {path:?}"))
}

/// The upstream: nginx `return 200` with the 1,024-byte body, on the load core.
pub fn start_upstream(run: &Path, cpu: u32) -> anyhow::Result<(Proc, SocketAddr)> {
    std::fs::create_dir_all(run.join("nginx-tmp"))?;
    let port = free_port()?;
    let body = "x".repeat(BODY_LEN);
    let conf = run.join("upstream.nginx.conf");
    let run_s = run.display().to_string();
    write(
        &conf,
        &render(
            UPSTREAM_CONF,
            &[
                ("RUN", &run_s),
                ("PORT", &port.to_string()),
                ("BODY", &body),
            ],
        )?,
    )?;
    let mut cmd = pinned(cpu, "nginx");
    cmd.arg("-p")
        .arg(run)
        .arg("-e")
        .arg(run.join("upstream.error.log"));
    cmd.arg("-c").arg(&conf);
    let mut p = Proc::spawn("upstream nginx", cmd, &run.join("upstream.out"), "TERM")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_accepting(&mut p, addr)?;
    Ok((p, addr))
}

/// A private Redis on the load core, no persistence, so `INFO commandstats` is the peers' only.
pub fn start_redis(run: &Path, cpu: u32) -> anyhow::Result<(Proc, u16)> {
    let port = free_port()?;
    let mut cmd = pinned(cpu, "redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
    cmd.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
    cmd.arg("--dir").arg(run);
    let mut p = Proc::spawn("redis-server", cmd, &run.join("redis.out"), "TERM")?;
    wait_accepting(&mut p, SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok((p, port))
}

/// A started peer.
pub struct Peer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// Starts `kind` on the proxy core and waits until it is ready. `n` makes file names unique.
pub fn start(kind: Kind, sh: &Shared, n: usize) -> anyhow::Result<Peer> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let run = &sh.run;
    let run_s = run.display().to_string();
    let log = run.join(format!("{}-{n}.out", kind.key()));
    let upstream = sh.upstream.to_string();
    let mut admin = None;
    let mut proc = match kind {
        Kind::Pingora => {
            let exe = std::env::current_exe().context("the bench's own path")?;
            let mut cmd = pinned(sh.proxy_cpu, exe);
            cmd.args(["--serve-passthrough", &addr.to_string(), &upstream]);
            // pingora's TERM is a graceful drain; INT stops at once.
            Proc::spawn(kind.label(), cmd, &log, "INT")?
        }
        Kind::NginxLua => {
            let conf = run.join("nginx-lua.conf");
            write(&run.join("gate.lua"), GATE_LUA)?;
            let vars = [
                ("RUN", run_s.as_str()),
                ("PORT", &port.to_string()),
                ("UPSTREAM", &upstream),
            ];
            write(&conf, &render(NGINX_LUA_CONF, &vars)?)?;
            let mut cmd = pinned(sh.proxy_cpu, "nginx");
            cmd.arg("-p")
                .arg(run)
                .arg("-e")
                .arg(run.join("nginx-lua.error.log"));
            cmd.arg("-c").arg(&conf);
            cmd.env(SECRET_ENV, &sh.secret)
                .env("PEERS_REDIS_PORT", sh.redis_port.to_string())
                .env("PEERS_LIMIT", LIMIT.to_string());
            Proc::spawn(kind.label(), cmd, &log, "TERM")?
        }
        Kind::Haproxy => {
            let conf = run.join("haproxy.cfg");
            let vars = [
                ("PORT", port.to_string()),
                ("UPSTREAM", upstream.clone()),
                ("SECRET", sh.secret.clone()),
                ("LIMIT", LIMIT.to_string()),
            ];
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            write(&conf, &render(HAPROXY_CFG, &vars)?)?;
            let mut cmd = pinned(sh.proxy_cpu, "haproxy");
            cmd.arg("-db").arg("-f").arg(&conf);
            Proc::spawn(kind.label(), cmd, &log, "TERM")?
        }
        Kind::TollgateExact | Kind::TollgateLease => {
            let admin_port = free_port()?;
            admin = Some(SocketAddr::from(([127, 0, 0, 1], admin_port)));
            let conf = run.join(format!("{}-{n}.toml", kind.key()));
            write(&conf, &tollgate_config(kind, sh, port, admin_port, n))?;
            let mut cmd = pinned(sh.proxy_cpu, env!("CARGO_BIN_EXE_tollgate"));
            cmd.arg("serve").arg("--config").arg(&conf);
            cmd.env(SECRET_ENV, &sh.secret)
                // wrk drops the requests in flight when it stops; tollgate logs each one.
                .env("RUST_LOG", "warn,pingora_proxy=off,tollgate::proxy=error")
                .env_remove("TOLLGATE_ADMIN_TOKEN");
            // TERM: graceful (leases go back, the ledger is flushed) within shutdown_grace.
            Proc::spawn(kind.label(), cmd, &log, "TERM")?
        }
    };
    wait_accepting(&mut proc, addr)?;
    if let Some(a) = admin {
        wait_ready(&mut proc, a)?;
    }
    Ok(Peer { proc, addr })
}

fn wait_ready(p: &mut Proc, admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if crate::procs::http_get(admin, "/readyz", &[]).is_ok_and(|(s, _)| s == 200) {
            return Ok(());
        }
        if !p.alive() {
            bail!("{} exited at start:\n{}", p.name, p.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} not ready after 30 s:\n{}", p.name, p.log_tail())
}

/// tollgate doing the peers' job: one catch-all route of cost 1, a default plan with a
/// `deny` cap, HS256 with the shared secret, Redis quota, the Postgres ledger.
fn tollgate_config(kind: Kind, sh: &Shared, port: u16, admin: u16, n: usize) -> String {
    let mode = if kind == Kind::TollgateLease {
        "lease"
    } else {
        "exact"
    };
    let spool = sh.run.join(format!("spool-{}-{n}", kind.key()));
    format!(
        r#"# Written by benches/peers.rs.
[proxy]
listen = "127.0.0.1:{port}"
threads = 1                    # pinned to one core, like every peer
unmatched = "deny"
strip_authorization = false    # the upstream gets what the client sent, as from the other peers
shutdown_grace = "1s"
access_log = "off"             # no peer writes an access log

[admin]
listen = "127.0.0.1:{admin}"
token_env = "PEERS_ADMIN_TOKEN_UNSET"

[storage]
redis_url = "redis://127.0.0.1:{redis}/"
redis_prefix = "peers"
database_url = "{pg}"
database_schema = "{schema}"
spool_dir = "{spool}"
{storage_extra}

[auth]
algorithms = ["HS256"]
secret_env = "{SECRET_ENV}"
customer_claim = "sub"

[upstreams.app]
targets = ["{upstream}"]

[meters.api_calls]

[[routes]]
name = "all"
match = "GET /{{*rest}}"
upstream = "app"
cost = 1

# fail_mode = "closed": a Redis failure is a 503 (counted), never a silent local count.
[plans.bench]
default = true
fail_mode = "closed"
quota_mode = "{mode}"
{plan_extra}
quotas.api_calls = {{ included = {LIMIT}, overage = "deny" }}
"#,
        redis = sh.redis_port,
        pg = sh.pg_url,
        schema = sh.schema,
        spool = spool.display(),
        upstream = sh.upstream,
        plan_extra = std::env::var("BENCH_PLAN_EXTRA").unwrap_or_default(),
        storage_extra = std::env::var("BENCH_STORAGE_EXTRA").unwrap_or_default(),
    )
}

/// Drops the bench's Postgres schema (tollgate's ledger).
pub fn drop_schema(pg_url: &str, schema: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    // The name is the bench's own (`peers_<hex>`): safe to put in the statement.
    if !schema
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        bail!("unexpected schema name {schema:?}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(pg_url)
            .await
            .with_context(|| format!("connecting to {pg_url}"))?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut c)
            .await
            .context("dropping the schema")?;
        anyhow::Ok(())
    })
}

/// `INFO commandstats` of the bench's Redis: command → calls.
pub fn redis_commandstats(port: u16) -> anyhow::Result<Vec<(String, u64)>> {
    let (status, body) = redis_info(port)?;
    if !status {
        bail!("INFO failed: {body}");
    }
    let mut out = Vec::new();
    for line in body.lines() {
        let Some((name, fields)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let calls = fields
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok());
        if let Some(c) = calls {
            out.push((name.to_string(), c));
        }
    }
    Ok(out)
}

/// `INFO commandstats` over RESP by hand: one command, no client library needed.
fn redis_info(port: u16) -> anyhow::Result<(bool, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // `$<len>\r\n<payload>\r\n`: done once the payload is in.
        if let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            if buf.first() != Some(&b'$') {
                return Ok((false, String::from_utf8_lossy(&buf).into_owned()));
            }
            let len: usize = std::str::from_utf8(&buf[1..eol])?.parse()?;
            if buf.len() >= eol + 2 + len {
                let body = String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]).into_owned();
                return Ok((true, body));
            }
        }
    }
    bail!("Redis closed the connection mid-answer")
}
