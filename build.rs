//! Stamps the binary with the commit it was built from, for `tollgate --version`.
//!
//! `TOLLGATE_GIT_COMMIT` (a `rustc-env`) is, in order: `git rev-parse --short=12 HEAD` of the
//! checkout; else the `TOLLGATE_GIT_COMMIT` environment variable (builds without `.git`, such as
//! the Dockerfile's, which takes it as a build argument); else `unknown`. No `-dirty` suffix: it
//! would have to rerun this script on every edit of every file.
//!
//! Reruns only when the commit can change: `HEAD`, the branch ref it names (or `packed-refs`
//! when the ref is packed), and the environment variable.

use std::path::Path;
use std::process::Command;

const VAR: &str = "TOLLGATE_GIT_COMMIT";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    let commit = from_git()
        .or_else(|| {
            std::env::var(VAR)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env={VAR}={commit}");
}

/// The short commit of `HEAD`, having told cargo which files to watch; `None` outside a git
/// checkout or without git.
fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // `--git-path` resolves a name inside the git directory, also for a linked worktree (whose
    // HEAD is its own but whose refs are shared).
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    // On a branch, a commit moves the branch's ref, not HEAD. A detached HEAD holds the commit.
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A path that does not exist would make cargo rerun this script on every build, so a
        // packed ref (no file of its own) is watched through `packed-refs`.
        let watched = [branch.as_str(), "packed-refs"]
            .into_iter()
            .filter_map(|name| git(&["rev-parse", "--git-path", name]))
            .find(|path| Path::new(path).exists());
        if let Some(path) = watched {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}

/// One git command's trimmed output, if it succeeded and printed something.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}
