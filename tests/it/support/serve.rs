//! `tollgate serve` as a child process: its config file on free ports with a SQLite ledger in a
//! test directory, its log in a file, signals, and waiting for a condition.

use super::{TempDir, ADMIN_TOKEN};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Serve {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Serve {
    /// `tollgate serve --config file`, its log in `dir/serve.log`.
    pub fn spawn(file: &std::path::Path, dir: &TempDir) -> Serve {
        Self::spawn_with(file, dir, &[])
    }

    /// The same with more arguments before `serve`.
    pub fn spawn_with(file: &std::path::Path, dir: &TempDir, args: &[&str]) -> Serve {
        let log = dir.0.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .args(["serve", "--config"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Serve { child, log }
    }
}

/// `base` listening on `proxy` and `admin`, with its SQLite ledger and spool in `dir` (created).
pub fn serve_config(
    base: &str,
    dir: &TempDir,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> String {
    std::fs::create_dir_all(&dir.0).unwrap();
    base.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{proxy}\""))
        .replace("[admin]\n", &format!("[admin]\nlisten = \"{admin}\"\n"))
        + &format!(
            "\n[storage]\ndatabase_url = \"sqlite:{}\"\nspool_dir = \"{}\"\n",
            dir.0.join("ledger.db").display(),
            dir.0.join("spool").display()
        )
}

impl Serve {
    /// Waits up to `limit` for the process to exit (after a signal sent at `sent`): its status
    /// and how long after `sent` it exited. Past `limit` the test fails with the log, which says
    /// where the stop spent its time (each drain step is logged).
    pub async fn exited(
        &mut self,
        sent: Instant,
        limit: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, sent.elapsed());
            }
            if sent.elapsed() >= limit {
                let logged = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("still running {limit:?} after the signal; its log:\n{logged}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The access-log lines (target `tollgate::access`) of a `--log-format json` log.
pub fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "tollgate::access")
        .collect()
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The live config document, once the instance is ready: `/readyz` 200 (its proxy listener
/// takes connections; the admin listener answers before it does) and `/admin/config` 200.
pub async fn admin_config(client: &reqwest::Client, admin: std::net::SocketAddr) -> Option<Value> {
    let ready = client
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .ok()?;
    (ready.status() == 200).then_some(())?;
    let r = client
        .get(format!("http://{admin}/admin/config"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?;
    (r.status() == 200).then_some(())?;
    r.json().await.ok()
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `secs` seconds with `what`.
pub async fn until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
