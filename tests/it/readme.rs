//! The README's commands, run against the demo. Fenced blocks whose info string is `sh test` are
//! taken in order and run as one `bash` script against one `tollgate demo` on free ports:
//! - `127.0.0.1:8080` / `localhost:8080` become the demo's proxy, `…:9090` its admin listener,
//!   and `$(pidof tollgate)` the demo's pid (never another test's process);
//! - `export NAME=…` lines show what the demo prints: its output must hold `export NAME=`, and
//!   the value it printed is the one the script uses;
//! - a comment `# NNN: …` expects that HTTP status from the last command of its paragraph (up to
//!   a blank line), as `curl -i`'s status line or a line of `-w '%{http_code}'` output;
//! - every command must exit 0, and one with no expected status must print no problem document;
//! - the working directory holds `doc.json`, the live document as `GET /admin/config` shows it.
//!
//! The first block is the demo's own output: each of its commands must be one the demo prints.

use crate::support::{free_port, serve::until, TempDir};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const README: &str = include_str!("../../README.md");
const MARK: &str = "@@readme-command";

/// One command of a block: its text (continuation lines joined by bash itself) and the status
/// the README says it answers with.
struct Step {
    block: usize,
    text: String,
    expect: Option<u16>,
}

/// The `sh test` blocks, in order, as lines.
fn blocks(readme: &str) -> Vec<Vec<&str>> {
    let mut out = Vec::new();
    let mut open: Option<Vec<&str>> = None;
    for line in readme.lines() {
        match (&mut open, line.trim_end()) {
            (None, "```sh test") => open = Some(Vec::new()),
            (Some(_), "```") => out.push(open.take().unwrap()),
            (Some(b), l) => b.push(l),
            (None, _) => {}
        }
    }
    assert!(open.is_none(), "an sh test block is not closed");
    out
}

/// `# 200: …` → 200.
fn expected_status(comment: &str) -> Option<u16> {
    let rest = comment.strip_prefix("# ")?;
    let (code, _) = rest.split_once(':')?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

fn steps(blocks: &[Vec<&str>]) -> Vec<Step> {
    let mut steps = Vec::new();
    for (n, lines) in blocks.iter().enumerate() {
        let mut pending: Option<u16> = None;
        let mut paragraph_start = steps.len();
        let mut cont = false;
        for line in lines {
            if cont {
                let s: &mut Step = steps.last_mut().unwrap();
                s.text.push('\n');
                s.text.push_str(line);
                cont = line.ends_with('\\');
                continue;
            }
            if line.trim().is_empty() {
                if let Some(code) = pending.take() {
                    assert!(
                        steps.len() > paragraph_start,
                        "`# {code}:` names no command"
                    );
                    steps.last_mut().unwrap().expect = Some(code);
                }
                paragraph_start = steps.len();
                continue;
            }
            if line.starts_with('#') {
                if let Some(code) = expected_status(line) {
                    pending = Some(code);
                }
                continue;
            }
            cont = line.ends_with('\\');
            steps.push(Step {
                block: n,
                text: line.to_string(),
                expect: None,
            });
        }
        if let Some(code) = pending {
            assert!(
                steps.len() > paragraph_start,
                "`# {code}:` names no command"
            );
            steps.last_mut().unwrap().expect = Some(code);
        }
    }
    steps
}

/// The README's addresses and process lookups, pointed at this demo.
fn localize(text: &str, proxy: &str, admin: &str, pid: u32) -> String {
    text.replace("127.0.0.1:8080", proxy)
        .replace("localhost:8080", proxy)
        .replace("127.0.0.1:9090", admin)
        .replace("localhost:9090", admin)
        .replace("$(pidof tollgate)", &pid.to_string())
}

/// Whether `out` shows HTTP status `code`: a `curl -i` status line or a `-w '%{http_code}'` line
/// (alone, or counted by `uniq -c`).
fn shows_status(out: &str, code: u16) -> bool {
    let code = code.to_string();
    out.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.as_slice() {
            [v, c, ..] if v.starts_with("HTTP/") => *c == code,
            [c] => *c == code,
            [n, c] => n.parse::<u64>().is_ok() && *c == code,
            _ => false,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_commands_run_against_the_demo() {
    let blocks = blocks(README);
    assert!(
        blocks.len() >= 3,
        "the README marks its demo, live-config and customer blocks"
    );
    let steps = steps(&blocks);
    assert!(steps.iter().any(|s| s.expect.is_some()));

    let dir = TempDir(std::env::temp_dir().join(crate::support::unique("readme")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (proxy, admin) = (free_port().to_string(), free_port().to_string());
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["demo", "--listen", &proxy, "--admin", &admin])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.0.join("demo.log")).unwrap())
        .spawn()
        .unwrap();
    let printed = Arc::new(Mutex::new(String::new()));
    {
        let out = demo.stdout.take().unwrap();
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut p = printed.lock().unwrap();
                p.push_str(&line);
                p.push('\n');
            }
        });
    }
    let pid = demo.id();
    let guard = scopeguard(demo);

    // The demo block, as the demo prints it: every command of it is in the output.
    let first: Vec<String> = steps
        .iter()
        .filter(|s| s.block == 0)
        .map(|s| localize(&s.text, &proxy, &admin, pid))
        .filter(|t| !t.starts_with("export "))
        .collect();
    let text = until(60, "the demo to print its commands", || {
        let p = printed.lock().unwrap().clone();
        let done = first.iter().all(|c| p.lines().any(|l| l == c));
        async move { done.then_some(p) }
    })
    .await;
    let exports: Vec<(String, String)> = blocks[0]
        .iter()
        .filter_map(|l| l.strip_prefix("export "))
        .map(|l| {
            let name = l.split_once('=').unwrap().0;
            let value = text
                .lines()
                .find_map(|p| p.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("the demo prints export {name}=…:\n{text}"));
            (name.to_string(), value.to_string())
        })
        .collect();
    let token = |name: &str| {
        exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };

    // doc.json: the live document as GET shows it.
    let client = reqwest::Client::new();
    let view: serde_json::Value = client
        .get(format!("http://{admin}/admin/config"))
        .bearer_auth(token("TOLLGATE_ADMIN_TOKEN"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    std::fs::write(dir.0.join("doc.json"), view["document"].to_string()).unwrap();

    let mut script = String::from("set -uo pipefail\n");
    for (name, value) in &exports {
        script.push_str(&format!("export {name}='{value}'\n"));
    }
    let run: Vec<&Step> = steps
        .iter()
        .filter(|s| !s.text.starts_with("export "))
        .collect();
    for (i, s) in run.iter().enumerate() {
        let text = localize(&s.text, &proxy, &admin, pid);
        script.push_str(&format!("{{ {text}\n}} 2>&1; echo \"{MARK} {i} $?\"\n"));
    }
    let out = tokio::task::spawn_blocking({
        let dir = dir.0.clone();
        move || {
            Command::new("timeout")
                .args(["120", "bash", "-c", &script])
                .current_dir(dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();

    let mut rest = stdout.as_str();
    for (i, s) in run.iter().enumerate() {
        let mark = format!("{MARK} {i} ");
        let at = rest
            .find(&mark)
            .unwrap_or_else(|| panic!("command {i} never finished:\n{}\n{stdout}", s.text));
        let output = &rest[..at];
        let tail = &rest[at + mark.len()..];
        let (code, after) = tail.split_once('\n').unwrap_or((tail, ""));
        rest = after;
        assert_eq!(code.trim(), "0", "`{}` failed:\n{output}", s.text);
        match s.expect {
            Some(want) => assert!(
                shows_status(output, want),
                "`{}` should answer {want}:\n{output}",
                s.text
            ),
            None => assert!(
                !output.contains("urn:tollgate:problem:"),
                "`{}` answered a problem:\n{output}",
                s.text
            ),
        }
    }

    // The SIGHUP line did not stop the demo, and the demo still serves.
    let ready = client
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    drop(guard);
}

/// Kills the demo when the test ends, however it ends.
fn scopeguard(child: std::process::Child) -> impl Drop {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
    Kill(child)
}

#[test]
fn the_harness_reads_statuses_and_paragraphs() {
    let readme = "x\n```sh test\n# 429: spend\ncurl a \\\n  b\ncurl c\n\ncurl d\n```\n";
    let s = steps(&blocks(readme));
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].text, "curl a \\\n  b");
    assert_eq!(
        (s[0].expect, s[1].expect, s[2].expect),
        (None, Some(429), None)
    );
    assert!(shows_status("HTTP/1.1 429 Too Many Requests\n", 429));
    assert!(shows_status("     49 200\n      1 429\n", 429));
    assert!(!shows_status("     50 200\n", 429));
    assert!(!shows_status("{\"used\": 429}\n", 429));
}
