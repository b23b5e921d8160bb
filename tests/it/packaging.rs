//! What a user of the release notices first: the container image (`Dockerfile`), the compose
//! file (`deploy/compose.yaml`) and the configs they run, `tollgate --version` and `--help`.
//!
//! The compose file is read through `docker compose config` (which checks it against the compose
//! specification and prints it normalised) when the compose plugin is installed, else parsed as
//! YAML; the assertions accept both the short forms written in the file and the long forms
//! compose prints. Nothing here needs a docker daemon.

use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMPOSE: &str = "deploy/compose.yaml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// Runs `tollgate check-config FILE` and asserts it passes (exit 0, `ok: FILE`).
fn assert_passes_check_config(file: &Path) {
    let out = tollgate()
        .arg("check-config")
        .arg(file)
        .output()
        .expect("run tollgate");
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("ok: {}", file.display())),
        "{stdout}"
    );
}

fn toml_file(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn toml_str<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a str {
    t.get(section)
        .and_then(|s| s.get(key))
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{section}.{key} is not a string"))
}

// === compose ===

/// The compose document: `docker compose config`'s output when the plugin is there (a docker
/// CLI without it, as on some machines, counts as absent), else the file as written.
fn compose() -> Value {
    let has_compose = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let text = if has_compose {
        // The file requires these (`${VAR:?…}`); any value does for `config`.
        let out = Command::new("docker")
            .args(["compose", "-f", COMPOSE, "config"])
            .current_dir(root())
            .env("TOLLGATE_ADMIN_TOKEN", "packaging-test-admin-token")
            .env(
                "TOLLGATE_JWT_SECRET",
                "packaging-test-secret-0123456789abcdef",
            )
            .output()
            .expect("run docker compose config");
        assert!(
            out.status.success(),
            "docker compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    } else {
        eprintln!("docker compose is not installed: parsing {COMPOSE} as YAML");
        read(COMPOSE)
    };
    serde_yaml::from_str(&text).expect("compose YAML")
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["services"][name];
    assert!(s.is_mapping(), "{COMPOSE}: no service {name:?}");
    s
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A service's environment variable names (map or `NAME=value` list).
fn env_names(svc: &Value) -> BTreeSet<String> {
    match &svc["environment"] {
        Value::Mapping(m) => m.keys().filter_map(scalar).collect(),
        Value::Sequence(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|e| e.split('=').next().unwrap_or(e).to_string())
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// `(published, target)` of each port (`"8080:8080"`, `"127.0.0.1:9090:9090"` or compose's
/// `{target, published, host_ip}`).
fn ports(svc: &Value) -> Vec<(String, String)> {
    let list = svc["ports"].as_sequence().expect("ports is a list");
    list.iter()
        .map(|p| match p {
            Value::Mapping(_) => (
                scalar(&p["published"]).unwrap_or_default(),
                scalar(&p["target"]).expect("port target"),
            ),
            other => {
                let s = scalar(other).expect("port entry");
                let s = s.split('/').next().unwrap_or(&s).to_string();
                let parts: Vec<&str> = s.rsplitn(3, ':').collect();
                let target = parts[0].to_string();
                let published = parts.get(1).map_or(String::new(), |p| p.to_string());
                (published, target)
            }
        })
        .collect()
}

/// `(source, target)` of each volume (`"SRC:DST[:ro]"` or compose's `{source, target}`).
fn volumes(svc: &Value) -> Vec<(String, String)> {
    let Some(list) = svc["volumes"].as_sequence() else {
        return Vec::new();
    };
    list.iter()
        .map(|v| match v {
            Value::Mapping(_) => (
                scalar(&v["source"]).unwrap_or_default(),
                scalar(&v["target"]).expect("volume target"),
            ),
            other => {
                let s = scalar(other).expect("volume entry");
                let mut parts = s.split(':');
                let source = parts.next().unwrap_or_default().to_string();
                let target = parts.next().unwrap_or_default().to_string();
                (source, target)
            }
        })
        .collect()
}

/// A string or list field as one space-joined string (`command`, `healthcheck.test`).
fn joined(v: &Value) -> String {
    match v {
        Value::Sequence(list) => list.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
        other => scalar(other).unwrap_or_default(),
    }
}

/// The config file tollgate's service runs: the `--config` of its command, mounted from a file
/// of the repository. Returns the file in the repository and the path inside the container.
fn compose_config(doc: &Value) -> (PathBuf, String) {
    let svc = service(doc, "tollgate");
    let command = joined(&svc["command"]);
    let in_container = command
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .unwrap_or("/etc/tollgate/tollgate.toml")
        .to_string();
    let (source, _) = volumes(svc)
        .into_iter()
        .find(|(_, target)| *target == in_container)
        .unwrap_or_else(|| panic!("no volume mounts {in_container} into tollgate"));
    // Relative to the compose file as written; absolute in `docker compose config`'s output.
    let file = root().join("deploy").join(&source);
    let file = file
        .canonicalize()
        .unwrap_or_else(|e| panic!("mounted config {}: {e}", file.display()));
    assert!(
        file.starts_with(root().canonicalize().unwrap()),
        "{}",
        file.display()
    );
    (file, in_container)
}

/// The four services exist, with the images and database the README promises.
#[test]
fn compose_has_tollgate_redis_postgres_and_an_upstream() {
    let doc = compose();
    let names: BTreeSet<String> = doc["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(scalar)
        .collect();
    for name in ["tollgate", "redis", "postgres", "upstream"] {
        assert!(names.contains(name), "{names:?} lacks {name}");
    }
    let image = |name: &str| scalar(&service(&doc, name)["image"]).unwrap_or_default();
    assert!(image("redis").starts_with("redis:7"), "{}", image("redis"));
    assert!(
        image("postgres").starts_with("postgres:16"),
        "{}",
        image("postgres")
    );
    assert!(!image("upstream").is_empty(), "the upstream has an image");
    let pg = service(&doc, "postgres");
    assert_eq!(
        scalar(&pg["environment"]["POSTGRES_DB"]).as_deref(),
        Some("tollgate")
    );

    // tollgate is built from the repository's Dockerfile, with the commit as a build argument.
    let build = &service(&doc, "tollgate")["build"];
    let context = root()
        .join("deploy")
        .join(scalar(&build["context"]).expect("build.context"));
    let dockerfile = scalar(&build["dockerfile"]).unwrap_or_else(|| "Dockerfile".into());
    assert_eq!(
        context.join(&dockerfile).canonicalize().unwrap(),
        root().join("Dockerfile").canonicalize().unwrap()
    );
    assert!(
        build["args"]["TOLLGATE_GIT_COMMIT"].is_string(),
        "build.args names TOLLGATE_GIT_COMMIT: {:?}",
        build["args"]
    );
}

/// tollgate publishes 8080 and 9090, is health checked on /healthz, waits for healthy Redis
/// and Postgres, and gets the secrets its config names from the environment.
#[test]
fn compose_tollgate_publishes_its_ports_and_is_health_checked() {
    let doc = compose();
    let svc = service(&doc, "tollgate");
    let ports = ports(svc);
    for port in ["8080", "9090"] {
        assert!(
            ports.contains(&(port.to_string(), port.to_string())),
            "{port} not published: {ports:?}"
        );
    }
    let health = joined(&svc["healthcheck"]["test"]);
    assert!(
        health.contains("curl") && health.contains("http://127.0.0.1:9090/healthz"),
        "{health}"
    );
    for dep in ["redis", "postgres"] {
        assert_eq!(
            scalar(&svc["depends_on"][dep]["condition"]).as_deref(),
            Some("service_healthy"),
            "depends_on.{dep}"
        );
        assert!(
            service(&doc, dep)["healthcheck"]["test"].is_sequence(),
            "{dep} has a healthcheck"
        );
    }
    assert!(svc["depends_on"]["upstream"].is_mapping());

    let (config, _) = compose_config(&doc);
    let config = toml_file(&config);
    let env = env_names(svc);
    for var in [
        toml_str(&config, "admin", "token_env"),
        toml_str(&config, "auth", "secret_env"),
    ] {
        assert!(
            env.contains(var),
            "tollgate's environment lacks {var}: {env:?}"
        );
    }
    assert!(env.contains("TOLLGATE_ADMIN_TOKEN"));
}

/// The config compose mounts is a repository file that passes check-config, listens where the
/// ports are published, and uses the compose services: Redis, Postgres and the upstream.
#[test]
fn compose_config_uses_the_compose_services() {
    let doc = compose();
    let (file, _) = compose_config(&doc);
    assert_passes_check_config(&file);
    let c = toml_file(&file);
    assert_eq!(toml_str(&c, "proxy", "listen"), "0.0.0.0:8080");
    assert_eq!(toml_str(&c, "admin", "listen"), "0.0.0.0:9090");

    let redis = url::Url::parse(toml_str(&c, "storage", "redis_url")).unwrap();
    assert_eq!(redis.host_str(), Some("redis"));
    let pg = url::Url::parse(toml_str(&c, "storage", "database_url")).unwrap();
    assert_eq!(pg.scheme(), "postgres");
    assert_eq!(pg.host_str(), Some("postgres"));
    assert_eq!(pg.path(), "/tollgate");
    assert!(toml_str(&c, "storage", "spool_dir").starts_with("/data/"));

    // Every upstream target is a compose service listening on that port: never tollgate itself.
    let upstream_command = joined(&service(&doc, "upstream")["command"]);
    for (name, u) in c["upstreams"].as_table().expect("upstreams") {
        for t in u["targets"].as_array().expect("targets") {
            let t = t.as_str().unwrap();
            let (host, port) = t.rsplit_once(':').unwrap();
            assert_eq!(host, "upstream", "upstreams.{name}: {t}");
            assert!(
                upstream_command.split_whitespace().any(|w| w == port),
                "upstreams.{name}: the upstream service does not listen on {port}: {upstream_command:?}"
            );
        }
    }
}

// === Dockerfile ===

/// The Dockerfile's instructions, `(INSTRUCTION, arguments)`, continuation lines joined and
/// comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instr, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((instr.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The instructions of each stage (split at `FROM`).
fn stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for i in dockerfile() {
        if i.0 == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("FROM first").push(i);
    }
    stages
}

fn position(
    stage: &[(String, String)],
    f: impl Fn(&(String, String)) -> bool,
    what: &str,
) -> usize {
    stage
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("the build stage has no {what}"))
}

fn bench_names() -> BTreeSet<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["bench"]
        .as_array()
        .map(|benches| {
            benches
                .iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The builder compiles the dependencies from the manifest and stubs before it copies `src/`
/// (so a source edit reuses that layer), stubs every `[[bench]]` target Cargo.toml declares, and
/// takes the commit as a build argument only after that layer.
#[test]
fn dockerfile_builds_dependencies_before_the_sources() {
    let stages = stages();
    assert!(stages.len() >= 2, "a builder and a runtime stage");
    let build = &stages[0];
    let is_cargo_build =
        |i: &(String, String)| i.0 == "RUN" && i.1.contains("cargo build --release --locked");
    let first_build = position(build, is_cargo_build, "cargo build --release --locked");
    let copy_src = position(
        build,
        |i| {
            // The sources of a COPY: every word but flags and the last (the destination).
            let words: Vec<&str> =
                i.1.split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
            i.0 == "COPY"
                && words[..words.len().saturating_sub(1)]
                    .iter()
                    .any(|w| matches!(*w, "src" | "src/" | "." | "./"))
        },
        "COPY of src/",
    );
    assert!(
        first_build < copy_src,
        "dependencies are built before src/ is copied"
    );
    assert!(
        build[copy_src..].iter().any(is_cargo_build),
        "built again after src/ is copied"
    );
    let manifest_copy = build[..first_build]
        .iter()
        .filter(|i| i.0 == "COPY")
        .flat_map(|i| i.1.split_whitespace())
        .collect::<BTreeSet<_>>();
    for f in ["Cargo.toml", "Cargo.lock", "build.rs"] {
        assert!(
            manifest_copy.contains(f),
            "{f} is copied for the dependency layer"
        );
    }
    assert!(
        build[..first_build]
            .iter()
            .any(|i| i.0 == "RUN" && i.1.contains("apt-get install") && i.1.contains("cmake")),
        "the builder installs cmake"
    );

    // Cargo refuses a manifest whose declared targets are missing: every bench is stubbed.
    let stub = &build[first_build].1;
    let listed: BTreeSet<&str> = stub
        .split_once("for bench in ")
        .and_then(|(_, rest)| rest.split_once(';'))
        .map(|(names, _)| names.split_whitespace().collect())
        .unwrap_or_default();
    let benches = bench_names();
    assert!(!benches.is_empty());
    for name in &benches {
        assert!(
            listed.contains(name.as_str()) || stub.contains(&format!("benches/{name}.rs")),
            "the dependency layer does not stub bench {name:?}: {stub}"
        );
    }
    for f in ["src/main.rs", "src/lib.rs"] {
        assert!(stub.contains(f), "{f} is stubbed: {stub}");
    }

    let arg = position(
        build,
        |i| i.0 == "ARG" && i.1.starts_with("TOLLGATE_GIT_COMMIT"),
        "ARG TOLLGATE_GIT_COMMIT",
    );
    assert!(
        first_build < arg,
        "a new commit must not invalidate the dependency layer"
    );
}

/// The runtime image: slim Debian with ca-certificates and curl, the binary in
/// /usr/local/bin, a non-root user, /data as a volume, both ports, a HEALTHCHECK on /healthz,
/// and a default config that passes check-config and serves from /data to an upstream that is
/// not the container itself.
#[test]
fn dockerfile_runtime_image() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let get = |instr: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|i| i.0 == instr)
            .map(|i| i.1.as_str())
            .collect()
    };
    let from = get("FROM")[0];
    assert!(
        from.starts_with("debian:") && from.contains("slim"),
        "{from}"
    );
    assert!(
        get("RUN").iter().any(|r| r.contains("apt-get install")
            && r.contains("ca-certificates")
            && r.contains("curl")),
        "ca-certificates and curl are installed"
    );
    assert!(
        get("COPY")
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with(" /usr/local/bin/tollgate")),
        "{:?}",
        get("COPY")
    );
    let user = *get("USER").last().expect("a USER");
    assert!(
        !matches!(user.split(':').next(), Some("root" | "0")),
        "runs as {user}"
    );
    let volumes = get("VOLUME");
    assert!(
        volumes
            .iter()
            .any(|v| v.trim_matches(['[', ']', '"']) == "/data"),
        "{volumes:?}"
    );
    let exposed: BTreeSet<&str> = get("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .collect();
    assert!(
        exposed.contains("8080") && exposed.contains("9090"),
        "{exposed:?}"
    );
    let health = get("HEALTHCHECK");
    assert!(
        health
            .iter()
            .any(|h| h.contains("CMD curl -fsS http://127.0.0.1:9090/healthz")),
        "{health:?}"
    );
    assert!(get("ENTRYPOINT").iter().any(|e| e.contains("tollgate")));

    // The default config: copied from the repository to where CMD reads it.
    let (source, target) = get("COPY")
        .iter()
        .filter(|c| !c.starts_with("--from="))
        .find_map(|c| {
            let words: Vec<&str> = c.split_whitespace().collect();
            (words.len() == 2).then(|| (words[0], words[1]))
        })
        .expect("a COPY of the default config");
    assert_eq!(target, "/etc/tollgate/tollgate.toml");
    assert!(
        get("CMD").iter().any(|c| c.contains(target)),
        "CMD reads {target}"
    );
    let file = root().join(source);
    assert_passes_check_config(&file);
    let c = toml_file(&file);
    assert_eq!(toml_str(&c, "proxy", "listen"), "0.0.0.0:8080");
    assert_eq!(toml_str(&c, "admin", "listen"), "0.0.0.0:9090");
    assert!(toml_str(&c, "storage", "database_url").starts_with("sqlite:/data/"));
    assert!(toml_str(&c, "storage", "spool_dir").starts_with("/data/"));
    for (name, u) in c["upstreams"].as_table().expect("upstreams") {
        for t in u["targets"].as_array().expect("targets") {
            let host = t.as_str().unwrap().rsplit_once(':').unwrap().0;
            assert!(
                !matches!(
                    host,
                    "127.0.0.1" | "localhost" | "0.0.0.0" | "[::1]" | "::1"
                ),
                "upstreams.{name} points at the container itself: {t}"
            );
        }
    }

    let ignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        ignored.contains("target/") || ignored.contains("target"),
        "{ignore}"
    );
}

/// Every config under deploy/ passes check-config.
#[test]
fn deploy_configs_pass_check_config() {
    let dir = root().join("deploy");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 2, "{configs:?}");
    for f in configs {
        assert_passes_check_config(&f);
    }
}

// === the binary ===

/// `tollgate --version` names the version and the commit it was built from.
#[test]
fn version_names_the_commit() {
    let out = tollgate().arg("--version").output().expect("run tollgate");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("tollgate {} (", env!("CARGO_PKG_VERSION"));
    assert!(
        stdout.starts_with(&prefix) && stdout.ends_with(")\n"),
        "{stdout:?}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root())
        .output();
    match head {
        Ok(o) if o.status.success() => {
            let commit = String::from_utf8(o.stdout).unwrap();
            let commit = commit.trim();
            assert_eq!(commit.len(), 12, "{commit}");
            assert_eq!(stdout, format!("{prefix}{commit})\n"));
        }
        _ => eprintln!("git is not available here: the commit is not compared"),
    }
}

/// Every command, argument and option in `--help` has a description.
#[test]
fn help_describes_every_command_and_option() {
    let commands = [
        "",
        "serve",
        "check-config",
        "migrate",
        "token",
        "repair-counters",
        "demo",
    ];
    for command in commands {
        let out = tollgate()
            .args(command.split_whitespace())
            .arg("-h")
            .output()
            .expect("run tollgate");
        assert_eq!(out.status.code(), Some(0), "{command} -h");
        let help = String::from_utf8(out.stdout).unwrap();
        let mut entries = 0;
        let mut in_list = false;
        for line in help.lines() {
            if matches!(line, "Commands:" | "Arguments:" | "Options:") {
                in_list = true;
                continue;
            }
            if line.is_empty() || !line.starts_with("  ") {
                in_list = false;
                continue;
            }
            if !in_list {
                continue;
            }
            entries += 1;
            // `  -c, --config <FILE>   The TOML config file`: the name, 2+ spaces, the text.
            let description = line
                .trim_start()
                .split_once("  ")
                .map(|(_, d)| d.trim())
                .unwrap_or("");
            assert!(
                !description.is_empty(),
                "`tollgate {command} -h`: no description: {line:?}"
            );
        }
        assert!(entries >= 2, "`tollgate {command} -h`:\n{help}");
    }
    // The top-level list names every subcommand.
    let out = tollgate().arg("-h").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for command in &commands[1..] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "{command} is not listed:\n{help}"
        );
    }
}
