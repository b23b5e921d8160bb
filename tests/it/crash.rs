//! A crash loses no charge: `tollgate serve` killed with SIGKILL under load, then restarted on
//! the same storage, has a ledger row for every 2xx its clients counted (plus at most the
//! requests in flight at the kill, recorded as charged), and the quota counter equals the
//! ledger. The usage channel is memory only: without the reservation journal, what it held at
//! the kill would be missing.

use crate::support::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clients sending at once: each has at most one request in flight at the kill.
const CLIENTS: u64 = 8;

/// `tollgate serve` as a child process; killed (SIGKILL) on drop if still running.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Where the first process keeps its state, for the restart to find it.
struct Storage {
    dir: TempDir,
    prefix: String,
    schema: String,
    database_url: String,
}

impl Storage {
    fn new(backend: Backend) -> Storage {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-crash")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let database_url = match backend {
            Backend::Embedded => format!("sqlite:{}", dir.0.join("ledger.db").display()),
            Backend::Shared => PG_URL.to_string(),
        };
        Storage {
            dir,
            prefix: unique("tgcrash"),
            schema: unique("c"),
            database_url,
        }
    }

    fn spool(&self) -> std::path::PathBuf {
        self.dir.0.join("spool")
    }

    /// The `[storage]` table for `backend`.
    fn toml(&self, backend: Backend) -> String {
        let mut t = format!(
            "\n[storage]\ndatabase_url = \"{}\"\nspool_dir = \"{}\"\n",
            self.database_url,
            self.spool().display()
        );
        if backend == Backend::Shared {
            t += &format!(
                "database_schema = \"{}\"\nredis_url = \"{REDIS_URL}\"\nredis_prefix = \"{}\"\nredis_timeout_ms = 500\n",
                self.schema, self.prefix
            );
        }
        t
    }
}

async fn until_up(client: &reqwest::Client, admin: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "tollgate serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL under load, restart: rows == 2xx counted (+ ≤ one in flight per client, status 0),
/// and the counter (Redis, or the embedded one rebuilt from the ledger) == the ledger.
async fn sigkill_under_load_loses_no_charge(backend: Backend) {
    let up = Upstream::start().await;
    let storage = Storage::new(backend);
    let (proxy, admin) = (free_port(), free_port());
    let config = base_config(up.addr);
    let toml = config
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{proxy}\""))
        .replace("[admin]\n", &format!("[admin]\nlisten = \"{admin}\"\n"))
        + &storage.toml(backend);
    let file = storage.dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let log = storage.dir.0.join("serve.log");
    let mut serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    until_up(&client, admin).await;
    let customer = unique("crash");
    let put = client
        .put(format!("http://{admin}/admin/customers/{customer}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);

    let ok = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (ok, killed, client) = (ok.clone(), killed.clone(), client.clone());
        let (url, bearer) = (format!("http://{proxy}/signals"), token(&customer));
        clients.push(tokio::spawn(async move {
            while !killed.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&bearer).send().await {
                    Ok(r) if r.status().is_success() => {
                        // A 2xx counts once its body is read: the client has the answer.
                        if r.bytes().await.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(r) => panic!("unexpected {} under load", r.status()),
                    Err(_) => break, // the process is gone
                }
            }
        }));
    }
    // Let the load run long enough to fill the pipeline and rotate nothing in particular.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok.load(Ordering::Relaxed) < 300 {
        assert!(
            Instant::now() < deadline && clients.iter().any(|c| !c.is_finished()),
            "{} calls answered before the load stopped; log:\n{}",
            ok.load(Ordering::Relaxed),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = Command::new("kill")
        .args(["-KILL", &serve.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    killed.store(true, Ordering::Relaxed);
    serve.0.wait().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let answered = ok.load(Ordering::Relaxed) as i64;

    // The restart, on the same storage: recovery runs before it serves.
    let mut t = Tollgate::start_with(&config, backend, None, |c| {
        c.storage.spool_dir = storage.spool();
        c.storage.database_url = storage.database_url.clone();
        if backend == Backend::Shared {
            c.storage.redis_prefix = storage.prefix.clone();
            c.storage.database_schema = Some(storage.schema.clone());
        }
    })
    .await;
    t.database_url = storage.database_url.clone();
    t.prefix = storage.prefix.clone();
    if backend == Backend::Shared {
        t.schema = storage.schema.clone(); // dropped with `t`
    }
    let (rows, units) = t.ledger_usage(&customer).await;
    let in_flight = t
        .scalar(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_events WHERE customer = '{customer}' AND status = 0"
        ))
        .await;
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        rows >= answered && rows <= answered + CLIENTS as i64,
        "{answered} answered 2xx, {rows} ledger rows ({in_flight} recovered); log:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    // Answered calls whose rows were still in the channel, and the calls in flight, are
    // recovered from the journal: charged, status 0 (their answer was not recorded).
    assert!(
        in_flight > 0,
        "the kill left nothing to recover; the test proves nothing"
    );
    assert_eq!(units, rows, "cost 1 per call");
    let counter = match backend {
        Backend::Shared => t.redis_used(&customer, "api_calls").await.unwrap_or(0),
        Backend::Embedded => {
            let view = t.admin_customer(&customer).await;
            view["usage"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["meter"] == "api_calls"))
                .and_then(|m| m["used"].as_i64())
                .unwrap_or(-1)
        }
    };
    assert_eq!(counter, units, "the quota counter equals the ledger");
    // Nothing is left to recover: the next call is counted on top, exactly.
    assert_eq!(t.get("/signals", Some(&customer)).await.status(), 200);
    let (after, _) = t.wait_ledger(&customer, rows + 1).await;
    assert_eq!(after, rows + 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sigkill_under_load_loses_no_charge() {
    sigkill_under_load_loses_no_charge(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_sigkill_under_load_loses_no_charge() {
    sigkill_under_load_loses_no_charge(Backend::Shared).await;
}

/// Calls `path` as `customer` until refused; returns how many were served.
async fn until_refused(t: &Tollgate, customer: &str) -> i64 {
    let mut served = 0;
    loop {
        match t.get("/signals", Some(customer)).await.status().as_u16() {
            200 => served += 1,
            429 => return served,
            other => panic!("unexpected {other}"),
        }
    }
}

/// A lease holder killed with SIGKILL: its lease stays counted until it expires (`lease_ttl`),
/// then the next call on the counter gives it back, so the customer can get at most one lease
/// more than `included`. The requests it served still reach the ledger (its journal, at its
/// restart); Redis then says less than the ledger by what the dead lease had spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_overshoots_by_at_most_one_lease() {
    let up = Upstream::start().await;
    let storage = Storage::new(Backend::Shared);
    let (proxy, admin) = (free_port(), free_port());
    let free = "[plans.free]\ndefault = true\nrate_per_minute = 600\nquotas.api_calls = { included = 5, overage = \"deny\" }";
    let base = base_config(up.addr);
    assert!(base.contains(free));
    let config = base.replace(
        free,
        "[plans.free]\ndefault = true\nquota_mode = \"lease\"\nlease_units = 20\nlease_ttl = \"6s\"\nquotas.api_calls = { included = 50, overage = \"deny\" }",
    );
    let toml = config
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{proxy}\""))
        .replace("[admin]\n", &format!("[admin]\nlisten = \"{admin}\"\n"))
        + &storage.toml(Backend::Shared);
    let file = storage.dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    until_up(&client, admin).await;
    for _ in 0..5 {
        let r = client
            .get(format!("http://{proxy}/signals"))
            .bearer_auth(token("holder"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &serve.0.id().to_string()])
        .status()
        .unwrap();
    serve.0.wait().unwrap();

    let same_storage = |spool: Option<std::path::PathBuf>| {
        let (prefix, schema) = (storage.prefix.clone(), storage.schema.clone());
        move |c: &mut tollgate::config::Config| {
            c.storage.redis_prefix = prefix;
            c.storage.database_schema = Some(schema);
            if let Some(spool) = spool {
                c.storage.spool_dir = spool;
            }
        }
    };
    let mut other = Tollgate::start_with(&config, Backend::Shared, None, same_storage(None)).await;
    other.prefix = storage.prefix.clone();
    // The dead lease (20 units) is still counted: the other instance gets what is left.
    let before_expiry = until_refused(&other, "holder").await;
    assert_eq!(before_expiry, 30);
    // 6 s of `lease_ttl` leave room for a second instance to start on a loaded machine.
    let ttl = Duration::from_secs(6);
    assert!(killed.elapsed() < ttl, "too slow to test");
    tokio::time::sleep(ttl - killed.elapsed() + Duration::from_millis(200)).await;
    let after_expiry = until_refused(&other, "holder").await;
    assert_eq!(
        after_expiry, 20,
        "the dead lease came back whole when it expired"
    );
    let admitted = 5 + before_expiry + after_expiry;
    assert!(admitted <= 50 + 20, "one lease past included at most");
    other.stop().await;

    // The killed instance's restart recovers the rows of what it served.
    let mut restarted = Tollgate::start_with(
        &config,
        Backend::Shared,
        None,
        same_storage(Some(storage.spool())),
    )
    .await;
    restarted.prefix = storage.prefix.clone();
    restarted.schema = storage.schema.clone(); // dropped with it
    restarted.stop().await;
    assert_eq!(restarted.ledger_usage("holder").await, (admitted, admitted));
    assert_eq!(
        restarted.redis_used("holder", "api_calls").await,
        Some(admitted - 5)
    );
}
