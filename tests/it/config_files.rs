//! The config surface through the real binary: every shipped config passes `check-config`; each
//! validation rule has a bad-config fixture whose exact messages (with key paths) are asserted;
//! `serve` refuses a bad config with exit 64 and the same messages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

/// Every file in `config/` passes `check-config` (exit 0).
#[test]
fn shipped_configs_pass_check_config() {
    let configs = files("config", "toml");
    assert!(!configs.is_empty());
    for f in configs {
        let out = tollgate()
            .arg("check-config")
            .arg(&f)
            .output()
            .expect("run tollgate");
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Each bad config is refused with exit 64 and exactly the expected `key: message` lines.
#[test]
fn bad_configs_are_refused_with_their_keys() {
    let bad = files("tests/fixtures/bad-config", "toml");
    assert!(bad.len() >= 10, "one fixture per rule");
    for f in bad {
        let expected =
            std::fs::read_to_string(f.with_extension("expected")).expect("expected file");
        let out = tollgate()
            .arg("check-config")
            .arg(&f)
            .output()
            .expect("run tollgate");
        assert_eq!(out.status.code(), Some(64), "{}", f.display());
        let prefix = format!("error: {}: ", f.display());
        let got: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect();
        let want: Vec<&str> = expected.lines().collect();
        assert_eq!(got, want, "{}", f.display());
    }
}

/// `serve` with a bad config exits 64 with the same messages as check-config, before binding.
#[test]
fn serve_refuses_a_bad_config() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bad-config/missing_upstream.toml");
    let out = tollgate()
        .args(["serve", "--config"])
        .arg(&f)
        .output()
        .expect("run tollgate");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("routes[0].upstream: unknown upstream \"nope\""));
}

/// `tollgate token` prints only the token, and it has three JWT segments.
#[test]
fn token_prints_only_the_token() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.example.toml");
    let out = tollgate()
        .args(["token", "--customer", "acme", "--ttl", "5m", "--config"])
        .arg(&f)
        .env("TOLLGATE_JWT_SECRET", "s3cret")
        .output()
        .expect("run tollgate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(stdout.trim().split('.').count(), 3, "{stdout:?}");
    assert_eq!(stdout.lines().count(), 1);
}

/// `tollgate migrate` applies the ledger migrations once; a second run applies none.
#[test]
fn migrate_applies_once() {
    let dir = std::env::temp_dir().join(format!("tollgate-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.example.toml"),
    )
    .unwrap();
    let db = dir.join("ledger.db");
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        example.replace(
            "sqlite:data/tollgate.db",
            &format!("sqlite:{}", db.display()),
        ),
    )
    .unwrap();
    let run = || {
        let out = tollgate()
            .args(["migrate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Every shipped SQLite migration, then none (branches add migrations: count the files).
    let shipped = files("migrations/sqlite", "sql").len();
    assert!(run().starts_with(&format!("applied {shipped} migration(s)")));
    assert!(run().starts_with("applied 0 migration(s)"));
    assert!(db.exists());
    std::fs::remove_dir_all(&dir).ok();
}
