//! The command line: `serve`, `check-config`, `migrate`, `token`, `repair-counters`, `demo`.
//! Exit codes: 0 ok, 64 bad config or usage (EX_USAGE), 1 runtime failure.

use crate::auth::Verifier;
use crate::config::{parse_duration, Config};
use crate::server::{self, Options, Stop};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tollgate",
    // `tollgate 0.1.0 (3f2a9c1d0b7e)`: the commit comes from build.rs.
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TOLLGATE_GIT_COMMIT"), ")"),
    about = "Metering and entitlement proxy for HTTP APIs"
)]
struct Cli {
    /// Format of the log lines on stderr (RUST_LOG filters them).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and the admin listener.
    Serve {
        /// The TOML config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate config files; prints every error with its key. Needs no secrets.
    CheckConfig {
        /// One or more TOML config files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Apply ledger migrations and exit.
    Migrate {
        /// The TOML config file; its storage.database_url is migrated.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Mint an HS token with the config's secret (for trying things). Prints only the token.
    Token {
        /// The TOML config file; its auth section names the secret's env var.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The customer id the token carries (in auth.customer_claim).
        #[arg(long, value_name = "ID")]
        customer: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Set drifted Redis quota counters of the current period to the ledger's units.
    ///
    /// For counters that drifted (a Redis restored from an old snapshot, a manual edit); absent
    /// ones are rebuilt by their next call anyway. Prints every change. Calls not yet in the
    /// ledger are not counted: run it while traffic is low or stopped.
    RepairCounters {
        /// The TOML config file (its Redis and ledger are compared).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Start a self-contained demo: its own upstream, embedded storage, a printed token.
    Demo {
        /// Address of the demo's proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        /// Address of the demo's admin listener.
        #[arg(long, default_value = "127.0.0.1:9090", value_name = "ADDR")]
        admin: String,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print and exit 0; a usage error is EX_USAGE, as a bad config.
        Err(e) => {
            let _ = e.print();
            return match e.use_stderr() {
                true => ExitCode::from(EXIT_CONFIG),
                false => ExitCode::SUCCESS,
            };
        }
    };
    // Flushes the log lines still queued when `main` returns.
    let _logs = init_tracing(cli.log_format);
    exit_when_the_listener_fails();
    match cli.command {
        Command::CheckConfig { files } => check_config(&files),
        Command::Serve { config } => match load(&config) {
            Ok(c) => finish(server::run_from(
                c,
                Some(config),
                Options {
                    admin_listener: None,
                    stop: Stop::Signals,
                    on_ready: None,
                },
            )),
            Err(code) => code,
        },
        Command::Migrate { config } => match load(&config) {
            Ok(c) => finish(migrate(&c)),
            Err(code) => code,
        },
        Command::Token {
            config,
            customer,
            ttl,
        } => match load(&config) {
            Ok(c) => token(c, &customer, &ttl),
            Err(code) => code,
        },
        Command::RepairCounters { config, dry_run } => match load(&config) {
            Ok(c) => finish(repair(&c, dry_run)),
            Err(code) => code,
        },
        Command::Demo { listen, admin } => finish(crate::demo::run(&listen, &admin)),
    }
}

/// The log subscriber (`crate::logs`): stderr through a writer thread, colour only on a
/// terminal. The guard flushes the queued lines when dropped.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    crate::logs::init(matches!(format, LogFormat::Json))
}

/// `serve` tries the proxy address before pingora binds it; should another process take it in
/// between, pingora's listener thread panics and the process would live on serving nothing.
/// That panic ends the process (status 1) instead.
fn exit_when_the_listener_fails() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("Failed to build listeners") {
            eprintln!("error: the proxy listener could not be bound; exiting");
            std::process::exit(1);
        }
    }));
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a config or prints every error (as check-config does) and returns exit code 64.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("error: {}: {e}", path.display());
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check_config(files: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    for f in files {
        match load(f) {
            Ok(c) => {
                let tls_errors = crate::tls::check(&c);
                for e in &tls_errors {
                    eprintln!("error: {}: {e}", f.display());
                }
                if !tls_errors.is_empty() {
                    bad = true;
                    continue;
                }
                for (var, without) in c.missing_env() {
                    eprintln!(
                        "warning: {}: env var {var} is not set: {without}",
                        f.display()
                    );
                }
                println!("ok: {}", f.display());
            }
            Err(_) => bad = true,
        }
    }
    if bad {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

fn migrate(c: &Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let applied = rt.block_on(crate::ledger::migrate(
        &c.storage.database_url,
        c.storage.database_schema.as_deref(),
    ))?;
    println!(
        "applied {applied} migration(s) to {}",
        server::redact(&c.storage.database_url)
    );
    Ok(())
}

fn repair(c: &Config, dry_run: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let repairs = rt.block_on(crate::repair::repair_counters(c, dry_run))?;
    let verb = if dry_run { "would set" } else { "set" };
    for r in &repairs {
        let held = r.redis.map_or("absent".to_string(), |v| v.to_string());
        println!(
            "{verb} customer={} meter={} period_start={} from {held} to {}",
            r.customer, r.meter, r.period_start, r.ledger
        );
    }
    println!("{} counter(s) differed from the ledger", repairs.len());
    Ok(())
}

fn token(c: Config, customer: &str, ttl: &str) -> ExitCode {
    let Some(ttl) = parse_duration(ttl) else {
        eprintln!("error: --ttl: not a duration: {ttl:?} (use e.g. 30m, 1h, 7d)");
        return ExitCode::from(EXIT_CONFIG);
    };
    let minted = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let v = Verifier::new(c.auth).await?;
                Ok(v.mint_hs(customer, ttl.as_secs())?)
            })
        });
    match minted {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
