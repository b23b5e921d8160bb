//! Signals and logs through the real binary: SIGHUP makes `tollgate serve` reload its config
//! file's live part as a new version (a bad file is logged with its keys and the running config
//! stays); SIGTERM on an idle instance exits at once, whatever the grace; `proxy.access_log`
//! decides which requests get a line, and every queued line is written before the exit.

use crate::support::serve::{admin_config, serve_config, signal, until, Serve};
use crate::support::*;
use std::time::{Duration, Instant};

/// The `shutdown_grace` of the idle-stop test: an exit that waited for it is plain to see.
const GRACE: Duration = Duration::from_secs(30);

/// Edit the file and SIGHUP: a new version by `file:PATH` with the new cost; a bad file: every
/// error logged with its key, version and behaviour unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_refuses_a_bad_one() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-sighup")));
    let (proxy, admin) = (free_port(), free_port());
    let toml = serve_config(&base_config(up.addr), &dir, proxy, admin);
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let serve = Serve::spawn(&file, &dir);
    let client = reqwest::Client::new();
    let first = until(30, "tollgate serve to start", || {
        admin_config(&client, admin)
    })
    .await;
    let author = format!("file:{}", file.display());
    assert_eq!(first["author"], author.as_str());

    std::fs::write(
        &file,
        toml.replace(
            "match = \"GET /signals\"\nupstream = \"api\"\ncost = 1",
            "match = \"GET /signals\"\nupstream = \"api\"\ncost = 4",
        ),
    )
    .unwrap();
    signal(&serve.child, "-HUP");
    let second = until(5, "the reloaded version", || async {
        admin_config(&client, admin)
            .await
            .filter(|c| c["version"] != first["version"])
    })
    .await;
    assert_eq!(second["author"], author.as_str());
    assert_eq!(second["document"]["routes"][0]["cost"], 4);

    std::fs::write(
        &file,
        toml.replace("cost = 1", "cost = -2")
            .replace("[upstreams.api]", "[upstreams.api]\nweight = 3"),
    )
    .unwrap();
    signal(&serve.child, "-HUP");
    let logged = until(5, "the refusal in the log", || async {
        let text = std::fs::read_to_string(&serve.log).unwrap_or_default();
        text.contains("config file refused").then_some(text)
    })
    .await;
    assert!(logged.contains("upstreams.api.weight"), "{logged}");
    assert!(logged.contains("routes[0].cost"), "{logged}");
    let third = admin_config(&client, admin).await.unwrap();
    assert_eq!(third["version"], second["version"]);
    assert_eq!(third["document"], second["document"]);

    signal(&serve.child, "-TERM");
}

/// An idle instance with a 30 s `shutdown_grace` exits long before it (the drain ends as soon
/// as no request is in flight), with status 0 and its usage in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sigterm_exits_at_once() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-sigterm")));
    let (proxy, admin) = (free_port(), free_port());
    let base = base_config(up.addr).replace("shutdown_grace = \"0s\"", "shutdown_grace = \"30s\"");
    let toml = serve_config(&base, &dir, proxy, admin);
    assert!(toml.contains("shutdown_grace = \"30s\""));
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut serve = Serve::spawn(&file, &dir);
    let client = reqwest::Client::new();
    until(30, "tollgate serve to start", || {
        admin_config(&client, admin)
    })
    .await;
    let r = client
        .get(format!("http://{proxy}/signals"))
        .bearer_auth(token("term"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;

    signal(&serve.child, "-TERM");
    let (status, took) = serve.exited(Instant::now(), GRACE).await;
    let logged = std::fs::read_to_string(&serve.log).unwrap_or_default();
    // It exits in milliseconds here; the bound only has to tell "did not wait for the grace"
    // apart from "waited", with room for a loaded CI machine.
    assert!(took < GRACE / 3, "exited {took:?} after SIGTERM\n{logged}");
    assert!(status.success(), "{status}\n{logged}");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", dir.0.join("ledger.db").display()))
        .await
        .unwrap();
    let (rows,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM usage_events WHERE customer = 'term'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

/// `proxy.access_log = "errors"`: a refused call gets its access line, a served one does not;
/// the lines queued for the log writer are all written by the time the process has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_can_keep_errors_only() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-access")));
    let (proxy, admin) = (free_port(), free_port());
    let base = base_config(up.addr).replace("[proxy]\n", "[proxy]\naccess_log = \"errors\"\n");
    let toml = serve_config(&base, &dir, proxy, admin);
    assert!(toml.contains("access_log = \"errors\""));
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut serve = Serve::spawn_with(&file, &dir, &["--log-format", "json"]);
    let client = reqwest::Client::new();
    until(30, "tollgate serve to start", || {
        admin_config(&client, admin)
    })
    .await;
    let url = format!("http://{proxy}/signals");
    let served = client
        .get(&url)
        .bearer_auth(token("logged"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    signal(&serve.child, "-TERM");
    serve.exited(Instant::now(), Duration::from_secs(20)).await;
    let logged = std::fs::read_to_string(&serve.log).unwrap();
    let access = crate::support::serve::access_lines(&logged);
    assert_eq!(access.len(), 1, "{logged}");
    assert_eq!(access[0]["fields"]["status"], 401, "{logged}");
}
