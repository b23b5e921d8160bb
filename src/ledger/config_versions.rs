//! The config-history concern of the ledger (`config_versions`) and the admin audit log
//! (`audit_log`). Implemented by both backends.
//!
//! Must not interpret documents: they are stored and returned as text (`liveconfig` parses).

use super::{AuditEntry, AuditRecord, ConfigVersion, LedgerError};

/// Config versions and the audit log of admin mutations.
#[async_trait::async_trait]
pub trait ConfigLedger: Send + Sync {
    /// In one transaction: stores `document` as the next config version, written by `author`,
    /// and its `audit_log` row (actor = `author`). Returns the stored version (its number is
    /// the ledger's sequence, so versions from several instances never collide).
    async fn insert_config_version(
        &self,
        author: &str,
        document: &str,
        audit: &AuditRecord,
    ) -> Result<ConfigVersion, LedgerError>;
    /// One stored config version, `None` if there is no such version.
    async fn config_version(&self, version: i64) -> Result<Option<ConfigVersion>, LedgerError>;
    /// The newest config version; with `author_prefix`, the newest whose author starts with it.
    async fn latest_config_version(
        &self,
        author_prefix: Option<&str>,
    ) -> Result<Option<ConfigVersion>, LedgerError>;
    /// Config versions, newest first, without their documents (`document` is empty): at most
    /// `limit`, only those older than `before` when given (pagination).
    async fn config_versions(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ConfigVersion>, LedgerError>;
    /// Appends one `audit_log` row (admin mutations other than config versions).
    async fn insert_audit(&self, actor: &str, record: &AuditRecord) -> Result<(), LedgerError>;
    /// `audit_log` rows, newest first: at most `limit`, only ids below `before` when given.
    async fn audit_entries(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, LedgerError>;
}
