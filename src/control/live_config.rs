//! Live config: changing upstream targets, routes, meters and plans without a restart (issue 4).
//!
//! Every change — admin PUT/PATCH/rollback, SIGHUP, a changed file at start — goes the same way:
//! 1. **validate** the new live document against the running config with `check-config`'s
//!    validator (`Config::with_live`); any error refuses it whole, nothing is stored;
//! 2. **store** it as the next row of `config_versions`, with its `audit_log` row, in one
//!    transaction (the ledger's sequence numbers versions, so several instances never collide);
//! 3. **apply** it: a new [`Snapshot`] is built and swapped in with one pointer store, so a request
//!    (which loads the snapshot once) sees the old config or the new, never a mix. A version is
//!    applied only if it is newer than the one in force, so every instance ends on the newest
//!    whatever order writes and broadcasts arrive in;
//! 4. **broadcast** its number on `{prefix}:config` (Redis pub/sub). Every instance loads that
//!    version from the ledger and applies it. A missed message is repaired on every
//!    (re)subscribe and every [`CATCH_UP`] by applying the ledger's newest version.
//!
//! At start the ledger's newest version wins over the file, unless the file's live part changed
//! since it was last loaded (then the file is stored as a new version): an admin change survives
//! a restart, and editing the file and restarting still works.
//!
//! Runs on the control runtime. Must not touch: requests in flight, quota counters, the usage path.

use super::broadcast::{self, Channel, Follower};
use crate::config::live_doc::{diff, Change, LiveDoc, Section};
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::ledger::{AuditRecord, ConfigVersion, Ledger, LedgerError};
use crate::proxy::state::{Shared, Snapshot};
use crate::proxy::upstream::{self, Pool};
use async_trait::async_trait;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How often an instance also polls the ledger for a newer version (missed broadcasts).
const CATCH_UP: Duration = Duration::from_secs(30);

/// Author prefix of versions read from the config file (at start or on SIGHUP).
pub const FILE_AUTHOR: &str = "file";

/// Why a change was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The document breaks `check-config`'s rules (every error listed).
    #[error("invalid config:\n{0}")]
    Invalid(ConfigErrors),
    #[error("no config version {0}")]
    UnknownVersion(i64),
    #[error("no entry {1:?} under {0}")]
    UnknownEntry(&'static str, String),
    /// The caller based its change on another version than the one in force (`If-Match`).
    #[error("the change was based on version {expected}, but version {current} is in force")]
    VersionMismatch { expected: u64, current: u64 },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A stored document no longer applies to this instance (e.g. its restart-only settings
    /// differ from the instance that stored it).
    #[error("stored config version {0} is unreadable: {1}")]
    Stored(i64, String),
}

/// Who makes a change, and how.
pub struct Write<'a> {
    /// Recorded in `config_versions.author` and as the audit actor.
    pub author: &'a str,
    /// Only answer what would change.
    pub dry_run: bool,
    /// Refuse the change unless this version is in force (optimistic concurrency).
    pub if_version: Option<u64>,
}

/// What a validated change would do, before (or instead of, for a dry run) storing it.
pub struct Proposal {
    pub config: Config,
    pub pools: Arc<BTreeMap<String, Pool>>,
    pub doc: LiveDoc,
    /// The version the change was computed against.
    pub base_version: u64,
    pub changes: Vec<Change>,
}

/// The live-config controller of one instance.
pub struct LiveConfig {
    shared: Arc<Shared>,
    ledger: Arc<dyn Ledger>,
    broadcast: Option<Channel>,
    /// This instance's writers one at a time: read the base, store, apply.
    write: Mutex<()>,
    /// Version compare and swap of the snapshot.
    install: std::sync::Mutex<()>,
}

// === impl LiveConfig ===

impl LiveConfig {
    /// With `broadcast`: the Redis channel that carries version numbers between instances.
    pub fn new(
        shared: Arc<Shared>,
        ledger: Arc<dyn Ledger>,
        broadcast: Option<Channel>,
    ) -> LiveConfig {
        LiveConfig {
            shared,
            ledger,
            broadcast,
            write: Mutex::new(()),
            install: std::sync::Mutex::new(()),
        }
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// Start-up: decides the version in force (see the module doc) before the proxy serves.
    /// `source`: the file the running config was read from, for the author.
    pub async fn start(&self, source: Option<&Path>) -> Result<(), LiveError> {
        let author = file_author(source);
        let running = self.current();
        let file_doc = running.config.live();
        let latest = self.ledger.latest_config_version(None).await?;
        let from_file = self.ledger.latest_config_version(Some(FILE_AUTHOR)).await?;
        let file_changed = match &from_file {
            None => true,
            Some(v) => parse_stored(v)
                .map(|(d, _)| d.to_value() != file_doc.to_value())
                .unwrap_or(true),
        };
        match latest {
            Some(latest) if !file_changed => {
                if parse_stored(&latest).is_ok_and(|(d, _)| d.to_value() == file_doc.to_value()) {
                    // The file is what is stored: keep the snapshot built from it (and the
                    // pools whose health checks pingora runs), numbered as stored.
                    self.renumber(latest.version as u64);
                } else {
                    self.renumber(0);
                    if let Err(e) = self.follow(latest.version).await {
                        // Serve the file's config rather than nothing; the next valid version
                        // (or a catch-up) replaces it.
                        tracing::error!(error = %e, "newest stored config not applied; serving the file's (version 0)");
                    }
                }
            }
            _ => {
                let audit = AuditRecord {
                    action: "config.load".into(),
                    target: "config".into(),
                    before: None,
                    after: Some(file_doc.to_value().to_string()),
                };
                let stored = self
                    .ledger
                    .insert_config_version(&author, &file_doc.to_value().to_string(), &audit)
                    .await?;
                self.renumber(stored.version as u64);
                self.publish(stored.version).await;
            }
        }
        tracing::info!(version = self.version(), "config version in force");
        Ok(())
    }

    /// Swaps in the running config under another version number (start-up only).
    fn renumber(&self, version: u64) {
        let _g = self.install.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current();
        match Snapshot::new(
            cur.config.clone(),
            cur.pools.clone(),
            &self.shared.metrics,
            version,
        ) {
            Ok(snap) => {
                self.shared.snapshot.store(Arc::new(snap));
                self.shared.metrics.config_version.set(version as i64);
            }
            Err(e) => tracing::error!(error = %e, "config in force could not be renumbered"),
        }
    }

    /// Validates `doc` (with `found`, errors from parsing it) against the config in force and
    /// says what would change. Stores nothing.
    pub fn propose(&self, doc: LiveDoc, found: Vec<ConfigError>) -> Result<Proposal, LiveError> {
        let cur = self.current();
        let config = cur
            .config
            .with_live(doc.clone(), found)
            .map_err(LiveError::Invalid)?;
        let pools = pools_for(&cur, &config).map_err(LiveError::Invalid)?;
        let changes = diff(&cur.config.live(), &doc);
        Ok(Proposal {
            config,
            pools,
            doc,
            base_version: cur.version,
            changes,
        })
    }

    /// Takes this instance's write turn, brought up to the ledger's newest version (so a change
    /// is based on, and checked against, the newest stored config, not a stale local one).
    async fn begin(&self, w: &Write<'_>) -> Result<tokio::sync::MutexGuard<'_, ()>, LiveError> {
        let guard = self.write.lock().await;
        self.catch_up().await;
        let current = self.version();
        match w.if_version {
            Some(expected) if expected != current => {
                Err(LiveError::VersionMismatch { expected, current })
            }
            _ => Ok(guard),
        }
    }

    /// Replaces the whole live document (PUT).
    pub async fn put(
        &self,
        w: &Write<'_>,
        doc: LiveDoc,
        found: Vec<ConfigError>,
    ) -> Result<(Proposal, Option<ConfigVersion>), LiveError> {
        let _turn = self.begin(w).await?;
        let (author, dry_run) = (w.author, w.dry_run);
        let p = self.propose(doc, found)?;
        if dry_run {
            return Ok((p, None));
        }
        let before = Some(self.current().config.live().to_value().to_string());
        let v = self
            .commit(
                author,
                "config.put",
                "config",
                before,
                p.doc.to_value().to_string(),
                &p,
            )
            .await?;
        Ok((p, Some(v)))
    }

    /// Merges `patch` into one route or plan (PATCH).
    pub async fn patch(
        &self,
        w: &Write<'_>,
        section: Section,
        name: &str,
        patch: &Value,
    ) -> Result<(Proposal, Option<ConfigVersion>), LiveError> {
        let _turn = self.begin(w).await?;
        let (author, dry_run) = (w.author, w.dry_run);
        let cur = self.current().config.live();
        let unknown = || LiveError::UnknownEntry(section.as_str(), name.to_string());
        let before = cur.entry(section, name).ok_or_else(unknown)?;
        let merged = cur.merged(section, name, patch).ok_or_else(unknown)?;
        let (doc, found) = LiveDoc::from_value(merged).map_err(LiveError::Invalid)?;
        let p = self.propose(doc, found)?;
        if dry_run {
            return Ok((p, None));
        }
        // A rename moves the entry: audit it under its new name too.
        let new_name = match section {
            Section::Routes => patch.get("name").and_then(Value::as_str).unwrap_or(name),
            Section::Plans => name,
        };
        let after = p
            .doc
            .entry(section, new_name)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let target = format!("{}/{name}", section.as_str());
        let v = self
            .commit_audit(
                author,
                AuditRecord {
                    action: format!("config.patch.{}", section.as_str()),
                    target,
                    before: Some(before.to_string()),
                    after: Some(after),
                },
                &p,
            )
            .await?;
        Ok((p, Some(v)))
    }

    /// Makes stored version `version`'s document current, as a new version.
    pub async fn rollback(
        &self,
        w: &Write<'_>,
        version: i64,
    ) -> Result<(Proposal, Option<ConfigVersion>), LiveError> {
        let _turn = self.begin(w).await?;
        let (author, dry_run) = (w.author, w.dry_run);
        let stored = self
            .ledger
            .config_version(version)
            .await?
            .ok_or(LiveError::UnknownVersion(version))?;
        let (doc, found) = parse_stored(&stored)?;
        let p = self.propose(doc, found)?;
        if dry_run {
            return Ok((p, None));
        }
        let before = Some(self.current().config.live().to_value().to_string());
        let v = self
            .commit(
                author,
                &format!("config.rollback.{version}"),
                "config",
                before,
                p.doc.to_value().to_string(),
                &p,
            )
            .await?;
        Ok((p, Some(v)))
    }

    /// Reloads the live part of the config file (SIGHUP). A bad file is logged with every
    /// error's key and changes nothing; restart-only changes are logged and not applied.
    pub async fn reload_file(&self, path: &Path) -> Result<Option<ConfigVersion>, LiveError> {
        let file = Config::load(path).map_err(LiveError::Invalid)?;
        let _w = self.write.lock().await;
        let cur = self.current();
        for section in restart_only_changes(&cur.config, &file) {
            tracing::warn!(
                key = section,
                "changed in the file; applies only after a restart"
            );
        }
        let doc = file.live();
        if doc.to_value() == cur.config.live().to_value() {
            tracing::info!(
                version = cur.version,
                "config file reloaded: live part unchanged"
            );
            return Ok(None);
        }
        let p = self.propose(doc, Vec::new())?;
        let before = Some(cur.config.live().to_value().to_string());
        let v = self
            .commit(
                &file_author(Some(path)),
                "config.reload",
                "config",
                before,
                p.doc.to_value().to_string(),
                &p,
            )
            .await?;
        Ok(Some(v))
    }

    async fn commit(
        &self,
        author: &str,
        action: &str,
        target: &str,
        before: Option<String>,
        after: String,
        p: &Proposal,
    ) -> Result<ConfigVersion, LiveError> {
        let audit = AuditRecord {
            action: action.into(),
            target: target.into(),
            before,
            after: Some(after),
        };
        self.commit_audit(author, audit, p).await
    }

    /// Stores, applies, broadcasts.
    async fn commit_audit(
        &self,
        author: &str,
        audit: AuditRecord,
        p: &Proposal,
    ) -> Result<ConfigVersion, LiveError> {
        let document = p.doc.to_value().to_string();
        let stored = self
            .ledger
            .insert_config_version(author, &document, &audit)
            .await?;
        self.install(p.config.clone(), p.pools.clone(), stored.version as u64);
        tracing::info!(version = stored.version, author, action = %audit.action, changes = p.changes.len(), "config version stored and applied");
        self.publish(stored.version).await;
        Ok(stored)
    }

    /// Leases were taken under the old plans: they go back now (a lowered `included` must not
    /// stay leased out), and the next requests take new ones under the new terms.
    fn give_back_leases(&self) {
        let (Some(leases), Ok(rt)) = (
            self.shared.leases.clone(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        rt.spawn(async move { leases.give_back_all().await });
    }

    /// Swaps in `config` as `version` if that is newer than the version in force.
    fn install(&self, config: Config, pools: Arc<BTreeMap<String, Pool>>, version: u64) -> bool {
        let _g = self.install.lock().unwrap_or_else(|e| e.into_inner());
        if version <= self.version() {
            return false;
        }
        match Snapshot::new(config, pools, &self.shared.metrics, version) {
            Ok(snap) => {
                self.shared.snapshot.store(Arc::new(snap));
                self.shared.metrics.config_version.set(version as i64);
                self.give_back_leases();
                true
            }
            Err(e) => {
                // Validation builds the same router, so this means a bug, not bad input.
                tracing::error!(version, error = %e, "config version not applied");
                false
            }
        }
    }

    /// Applies stored version `version` if it is newer than the one in force.
    pub async fn follow(&self, version: i64) -> Result<bool, LiveError> {
        if version as u64 <= self.version() {
            return Ok(false);
        }
        let stored = self
            .ledger
            .config_version(version)
            .await?
            .ok_or(LiveError::UnknownVersion(version))?;
        let (doc, found) = parse_stored(&stored)?;
        let p = self
            .propose(doc, found)
            .map_err(|e| LiveError::Stored(version, e.to_string()))?;
        let applied = self.install(p.config, p.pools, version as u64);
        if applied {
            tracing::info!(version, author = %stored.author, "config version applied from the ledger");
        }
        Ok(applied)
    }

    /// Applies the ledger's newest version if it is newer than the one in force.
    pub async fn catch_up(&self) {
        let r = match self.ledger.latest_config_version(None).await {
            Ok(Some(v)) => self.follow(v.version).await.map(|_| ()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not catch up with the newest config version");
        }
    }

    async fn publish(&self, version: i64) {
        if let Some(b) = &self.broadcast {
            if let Err(e) = b.publish(version).await {
                // The others still converge at their next catch-up.
                tracing::warn!(error = %e, version, "could not broadcast the config version");
            }
        }
    }

    /// Follows other instances' changes until `cancel`: the broadcast when there is Redis, and
    /// a periodic catch-up with the ledger in any case.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        broadcast::follow(self.broadcast.as_ref(), &*self, CATCH_UP, cancel).await;
    }

    /// Reloads `path` on every SIGHUP until `cancel`.
    pub async fn reload_on_sighup(
        self: Arc<Self>,
        path: PathBuf,
        mut hup: tokio::signal::unix::Signal,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = hup.recv() => {}
            }
            tracing::info!(file = %path.display(), "SIGHUP: reloading the config file");
            match self.reload_file(&path).await {
                Ok(Some(v)) => tracing::info!(version = v.version, "config file applied"),
                Ok(None) => {}
                Err(LiveError::Invalid(errors)) => {
                    for e in &errors.0 {
                        tracing::error!(key = %e.key, "{}", e.message);
                    }
                    tracing::error!(
                        errors = errors.0.len(),
                        version = self.version(),
                        "config file refused; the running config stays"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "config file not applied; the running config stays")
                }
            }
        }
    }
}

fn file_author(source: Option<&Path>) -> String {
    match source {
        Some(p) => format!("{FILE_AUTHOR}:{}", p.display()),
        None => FILE_AUTHOR.into(),
    }
}

/// A stored version's document.
fn parse_stored(v: &ConfigVersion) -> Result<(LiveDoc, Vec<ConfigError>), LiveError> {
    LiveDoc::from_json(v.document.as_bytes())
        .map_err(|e| LiveError::Stored(v.version, e.to_string()))
}

/// Restart-only sections that differ between two configs.
fn restart_only_changes(running: &Config, file: &Config) -> Vec<&'static str> {
    fn json<T: serde::Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap_or_default()
    }
    let (a, b) = (&running.raw, &file.raw);
    [
        ("proxy", json(&a.proxy) != json(&b.proxy)),
        ("admin", json(&a.admin) != json(&b.admin)),
        ("storage", json(&a.storage) != json(&b.storage)),
        ("auth", json(&a.auth) != json(&b.auth)),
        ("stripe", json(&a.stripe) != json(&b.stripe)),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Upstream pools for `new`: an upstream whose settings did not change keeps its pool (and the
/// health state pingora's checks keep in it); a new or changed one gets a fresh pool.
fn pools_for(cur: &Snapshot, new: &Config) -> Result<Arc<BTreeMap<String, Pool>>, ConfigErrors> {
    let mut pools = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, u) in &new.upstreams {
        let same = cur.config.upstreams.get(name).is_some_and(|o| {
            o.targets == u.targets
                && o.host == u.host
                && o.health_check == u.health_check
                && o.tls == u.tls
        });
        match (same, cur.pools.get(name)) {
            (true, Some(p)) => {
                pools.insert(name.clone(), p.clone());
            }
            _ => match upstream::build_live(name, u) {
                Ok(p) => {
                    pools.insert(name.clone(), p);
                }
                Err(e) => errors.push(e),
            },
        }
    }
    if errors.is_empty() {
        Ok(Arc::new(pools))
    } else {
        Err(ConfigErrors(errors))
    }
}

#[async_trait]
impl Follower for LiveConfig {
    async fn resync(&self) {
        self.catch_up().await;
    }

    async fn message(&self, msg: &redis::Msg) {
        let version: i64 = match msg.get_payload() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a config broadcast that is not a version");
                return;
            }
        };
        if let Err(e) = self.follow(version).await {
            tracing::error!(error = %e, version, "config version not applied");
        }
    }
}
