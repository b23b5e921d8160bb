//! A lifecycle that tells the truth: a listener that cannot be bound ends `serve` and `demo` at
//! once with the address and the reason (no process that looks healthy and serves nothing); a
//! graceful stop turns `/readyz` 503 first, keeps taking requests for `drain_delay` (answers
//! close their connections), then refuses new ones with 503 `shutting-down` while those in
//! flight finish; under load, a client that stops when `/readyz` turns 503 sees no refusal and
//! every answer it got is in the ledger.

use crate::support::serve::{serve_config, signal, until, Serve};
use crate::support::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits up to `secs` for the child to exit and returns its status and how long it took.
fn exit_within(child: &mut std::process::Child, secs: u64) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "still running {secs} s later"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `serve` with its proxy port held by another socket exits 1 within 5 s, naming the key and
/// the address; the same for the admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_when_a_listener_cannot_be_bound() {
    let up = Upstream::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    for (key, proxy, admin) in [
        ("proxy.listen", busy, free_port()),
        ("admin.listen", free_port(), busy),
    ] {
        let dir = TempDir(std::env::temp_dir().join(unique("tollgate-bind")));
        let file = dir.0.join("tollgate.toml");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(
            &file,
            serve_config(&base_config(up.addr), &dir, proxy, admin),
        )
        .unwrap();
        let mut serve = Serve::spawn(&file, &dir);
        let (status, took) = exit_within(&mut serve.child, 5);
        let log = std::fs::read_to_string(&serve.log).unwrap();
        assert_eq!(status.code(), Some(1), "{key}: {status}\n{log}");
        assert!(
            log.contains(&format!("{key}: cannot bind {busy}")) && log.contains("in use"),
            "{key}: the error names the key, the address and the reason:\n{log}"
        );
        assert!(!log.contains("tollgate running"), "{log}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    drop(taken);
}

/// `demo` on a taken port prints no curl lines (they would reach whatever holds the port) and
/// exits 1 within 5 s naming the address.
#[test]
fn demo_exits_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["demo", "--listen", &busy.to_string()])
        .args(["--admin", &free_port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, took) = exit_within(&mut demo, 5);
    let out = demo.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        stderr.contains(&format!("cannot bind {busy}")),
        "the error names the address:\n{stderr}"
    );
    assert!(!stdout.contains("curl"), "nothing printed:\n{stdout}");
}

/// A usage error (no arguments, an unknown flag, a missing argument) exits 64 (EX_USAGE) with
/// clap's usage text, as the README says; `--help` and `--version` exit 0.
#[test]
fn usage_errors_exit_64() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [&[][..], &["--bogus"], &["serve"], &["nonsense"]] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("Usage:"), "{args:?}: {stderr}");
    }
    for args in [&["--help"][..], &["--version"]] {
        assert_eq!(run(args).status.code(), Some(0), "{args:?}");
    }
}

/// The demo keeps its ledger in a directory of its own under the temp dir and removes it when
/// it stops.
#[test]
fn demo_removes_its_directory_when_it_stops() {
    let tmp = TempDir(std::env::temp_dir().join(unique("tollgate-demo-tmp")));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["demo", "--listen", &free_port().to_string()])
        .args(["--admin", &free_port().to_string()])
        .env("TMPDIR", &tmp.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let own = tmp.0.join(format!("tollgate-demo-{}", demo.id()));
    // The token line is printed once everything is bound and the ledger is open.
    let mut out = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("TOKEN=") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the demo ended before printing its token");
    }
    assert!(own.is_dir(), "{} while it runs", own.display());
    signal(&demo, "-TERM");
    let (status, _) = exit_within(&mut demo, 20);
    assert!(status.success(), "{status}");
    assert!(!own.exists(), "{} is left behind", own.display());
    let left: Vec<_> = std::fs::read_dir(&tmp.0).unwrap().collect();
    assert!(left.is_empty(), "left in the temp dir: {left:?}");
}

/// The stages of a graceful stop, with a 5 s call in flight: during `drain_delay` `/readyz` is
/// 503 and a new call is still served (its answer closes the connection); after it, a new call
/// is refused 503 `shutting-down` with `Retry-After`, uncharged; the call in flight is answered
/// and charged, and the stop ends when it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_serves_for_the_delay_then_refuses_new_calls() {
    let up = Upstream::start().await;
    let mut tg = Tollgate::start_with(&base_config(up.addr), Backend::Embedded, None, |c| {
        c.proxy.drain_delay = Duration::from_secs(1);
        c.proxy.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    let slow = tokio::spawn(
        tg.client
            .get(tg.url("/slow"))
            .bearer_auth(token("stages-slow"))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client, readyz, url) = (
        tg.client.clone(),
        tg.admin_url("/readyz"),
        tg.url("/signals"),
    );
    let asked = Instant::now();
    let ((), (ready, during, after)) = tokio::join!(tg.stop(), async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ready = client.get(readyz).send().await.unwrap().status();
        let call = || client.get(&url).bearer_auth(token("stages-new")).send();
        let during = call().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let after = call().await.unwrap();
        (ready, during, after)
    });
    let took = asked.elapsed();
    assert_eq!(ready, 503, "draining: not ready");
    assert_eq!(during.status(), 200, "still taken during drain_delay");
    assert_eq!(
        during.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{:?}",
        during.headers()
    );
    assert_eq!(after.headers()["retry-after"], "1");
    let (status, kind, _) = problem(after).await;
    assert_eq!(
        (status, kind.as_str()),
        (503, "urn:tollgate:problem:shutting-down")
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert!(
        took < Duration::from_secs(8),
        "the stop waited for the grace: {took:?}"
    );
    assert_eq!(tg.ledger_usage("stages-slow").await, (1, 1));
    assert_eq!(
        tg.ledger_usage("stages-new").await,
        (1, 1),
        "only the call during the delay"
    );
}

/// SIGTERM to `tollgate serve` under load from 8 clients that stop sending once `/readyz` turns
/// 503 (polled every 200 ms, as a load balancer would): no request fails to connect or goes
/// unanswered, calls are still served after the signal, every 200 is one ledger row, and the
/// process exits 0 with its drain logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_refuses_nothing_and_loses_nothing() {
    let up = Upstream::start().await;
    let dir = TempDir(std::env::temp_dir().join(unique("tollgate-drain")));
    let (proxy, admin) = (free_port(), free_port());
    let base = base_config(up.addr)
        .replace("drain_delay = \"0s\"", "drain_delay = \"3s\"")
        .replace("shutdown_grace = \"0s\"", "shutdown_grace = \"5s\"");
    let file = dir.0.join("tollgate.toml");
    let toml = serve_config(&base, &dir, proxy, admin);
    assert!(toml.contains("drain_delay = \"3s\""));
    std::fs::write(&file, toml).unwrap();
    let mut serve = Serve::spawn(&file, &dir);
    let client = reqwest::Client::new();
    until(30, "tollgate serve to be ready", || {
        let client = client.clone();
        async move {
            let r = client.get(format!("http://{admin}/readyz")).send().await;
            r.is_ok_and(|r| r.status() == 200).then_some(())
        }
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let served_after_signal = Arc::new(AtomicU64::new(0));
    let signalled = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, stop, served) = (client.clone(), stop.clone(), served.clone());
        let (after, signalled) = (served_after_signal.clone(), signalled.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let sent_after = signalled.load(Ordering::SeqCst);
                let r = client
                    .get(format!("http://{proxy}/signals"))
                    .bearer_auth(token(&format!("drain-{w}-{n}")))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        served.fetch_add(1, Ordering::SeqCst);
                        if sent_after {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("{e:?}")),
                }
            }
            failures
        }));
    }
    let poller = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let r = client.get(format!("http://{admin}/readyz")).send().await;
                if !r.is_ok_and(|r| r.status() == 200) {
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signalled.store(true, Ordering::SeqCst);
    signal(&serve.child, "-TERM");
    poller.await.unwrap();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    let (status, took) = exit_within(&mut serve.child, 15);
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(status.success(), "{status}\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "idle once the clients stopped: {took:?}"
    );
    let served = served.load(Ordering::SeqCst);
    assert!(served > 50, "load: {served}");
    assert!(
        served_after_signal.load(Ordering::SeqCst) > 0,
        "calls sent after SIGTERM were served"
    );
    assert!(log.contains("draining: /readyz answers 503"), "{log}");
    assert!(log.contains("drained: no request in flight"), "{log}");

    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", dir.0.join("ledger.db").display()))
        .await
        .unwrap();
    let (rows,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM usage_events WHERE customer LIKE 'drain-%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows as u64, served, "ledger == answers");
}
