//! What `tollgate serve` writes to stderr: JSON lines with plain values (numbers as numbers, no
//! Rust debug strings), no colour codes in a file, and one line per failed upstream call (ours,
//! with the request id; pingora's copy is dropped).

use crate::support::serve::{admin_config, serve_config, signal, until, Serve};
use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// `serve` in front of an upstream nobody listens on, with `args` before `serve`; one call
/// (502), then SIGTERM. Returns the whole log and the call's request id.
async fn one_failed_call(tag: &str, args: &[&str]) -> (String, String) {
    // Bound then released: connections to it are refused.
    let dead = free_port();
    let dir = TempDir(std::env::temp_dir().join(unique(tag)));
    let (proxy, admin) = (free_port(), free_port());
    let toml = serve_config(&base_config(dead), &dir, proxy, admin);
    let file = dir.0.join("tollgate.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut serve = Serve::spawn_with(&file, &dir, args);
    let client = reqwest::Client::new();
    until(30, "tollgate serve to start", || {
        admin_config(&client, admin)
    })
    .await;
    let resp = client
        .get(format!("http://{proxy}/signals"))
        .bearer_auth(token("logs"))
        .send()
        .await
        .unwrap();
    let (status, ty, body) = problem(resp).await;
    assert_eq!(
        (status, ty.as_str()),
        (502, "urn:tollgate:problem:upstream-unavailable")
    );
    let request_id = body["instance"].as_str().unwrap().to_string();
    signal(&serve.child, "-TERM");
    serve.exited(Instant::now(), Duration::from_secs(20)).await;
    (std::fs::read_to_string(&serve.log).unwrap(), request_id)
}

/// The lines about the failure: ours (`upstream failed`) and pingora's (`Fail to proxy`).
fn failure_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("upstream failed") || l.contains("Fail to proxy"))
        .collect()
}

/// With `--log-format json` every line is JSON; counts are JSON numbers (the usage flusher's
/// stop line, the access line), no value is a Rust debug string, and the failed call is one
/// line carrying its request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_have_plain_values_and_one_line_per_failure() {
    let (log, request_id) = one_failed_call("tollgate-logs-json", &["--log-format", "json"]).await;
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failures = failure_lines(&log);
    assert_eq!(failures.len(), 1, "one line for the failure:\n{log}");
    let ours: Value = serde_json::from_str(failures[0]).unwrap();
    assert_eq!(ours["fields"]["message"], "upstream failed", "{log}");
    assert_eq!(ours["fields"]["request_id"], request_id.as_str(), "{log}");

    let flushed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "usage flushed")
        .unwrap_or_else(|| panic!("no `usage flushed` line:\n{log}"));
    for count in [
        "queued",
        "inserted",
        "duplicates",
        "spooled",
        "failed",
        "lost",
    ] {
        assert!(flushed["fields"][count].is_u64(), "{count}: {flushed}");
    }
    let access = lines
        .iter()
        .find(|l| l["target"] == "tollgate::access")
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    assert_eq!(access["fields"]["status"], 502, "{access}");
    assert!(access["fields"]["latency_us"].is_u64(), "{access}");

    for line in &lines {
        let Some(fields) = line["fields"].as_object() else {
            continue;
        };
        for (k, v) in fields {
            if let Some(s) = v.as_str().filter(|_| k != "message") {
                assert!(
                    !s.starts_with("Some(") && !s.contains(" { "),
                    "{k} is a debug string: {line}"
                );
            }
        }
    }
}

/// Pretty lines written to a file carry no ANSI colour codes, and the failed call is one line
/// there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_lines_in_a_file_have_no_colour_and_one_line_per_failure() {
    let (log, request_id) = one_failed_call("tollgate-logs-pretty", &[]).await;
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log}");
    let failures = failure_lines(&log);
    assert_eq!(failures.len(), 1, "one line for the failure:\n{log}");
    assert!(failures[0].contains(&request_id), "{log}");
}
