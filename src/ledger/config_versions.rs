//! Config history (`config_versions`: every live-config document stored, numbered by the
//! ledger's sequence) and the admin audit log (`audit_log`). The SQL here is written once for
//! both backends.
//!
//! Must not interpret documents: they are stored and returned as text (`control::live_config` parses).

use chrono::Utc;

use super::dialect::{read_error, Backend, ReadRow, Time};
use super::{AuditEntry, AuditRecord, ConfigVersion, LedgerError, SqlLedger};

const INSERT_VERSION: &str = "INSERT INTO config_versions (created_at, author, document) \
     VALUES ($1, $2, $3) RETURNING version, created_at";

const INSERT_AUDIT: &str = "INSERT INTO audit_log (at, actor, action, target, before, after) \
     VALUES ($1, $2, $3, $4, $5, $6)";

const VERSION_COLUMNS: &str = "version, created_at, author, document";

const VERSIONS: &str = "SELECT version, created_at, author, '' AS document FROM config_versions \
     WHERE $1 IS NULL OR version < $1 ORDER BY version DESC LIMIT $2";

const AUDIT_ENTRIES: &str = "SELECT id, at, actor, action, target, before, after FROM audit_log \
     WHERE $1 IS NULL OR id < $1 ORDER BY id DESC LIMIT $2";

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

#[async_trait::async_trait]
impl<DB: Backend> ConfigLedger for SqlLedger<DB> {
    async fn insert_config_version(
        &self,
        author: &str,
        document: &str,
        audit: &AuditRecord,
    ) -> Result<ConfigVersion, LedgerError> {
        let op = "insert_config_version";
        let now = Utc::now();
        let mut tx = DB::begin_write(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        let row = DB::sql(INSERT_VERSION)
            .bind(Time(now))
            .bind(author)
            .bind(document)
            .fetch_one(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        let read =
            || -> Result<_, sqlx::Error> { Ok((row.col("version")?, row.time("created_at")?)) };
        let (version, created_at) = read().map_err(read_error(op, "config_versions"))?;
        DB::sql(INSERT_AUDIT)
            .bind(Time(now))
            .bind(author)
            .bind(audit.action.as_str())
            .bind(audit.target.as_str())
            .bind(audit.before.as_deref())
            .bind(audit.after.as_deref())
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
        tx.commit().await.map_err(LedgerError::query(op))?;
        Ok(ConfigVersion {
            version,
            created_at,
            author: author.to_string(),
            document: document.to_string(),
        })
    }

    async fn config_version(&self, version: i64) -> Result<Option<ConfigVersion>, LedgerError> {
        let op = "config_version";
        let sql = format!("SELECT {VERSION_COLUMNS} FROM config_versions WHERE version = $1");
        let row = DB::sql(&sql)
            .bind(version)
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.map(|r| version_from_row(&r, op)).transpose()
    }

    async fn latest_config_version(
        &self,
        author_prefix: Option<&str>,
    ) -> Result<Option<ConfigVersion>, LedgerError> {
        let op = "latest_config_version";
        // `substr`, not `LIKE`: a prefix holding `%` or `_` matches only itself.
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM config_versions \
             WHERE $1 IS NULL OR substr(author, 1, length($1)) = $1 \
             ORDER BY version DESC LIMIT 1"
        );
        let row = DB::sql(&sql)
            .bind(author_prefix)
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.map(|r| version_from_row(&r, op)).transpose()
    }

    async fn config_versions(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ConfigVersion>, LedgerError> {
        let op = "config_versions";
        let rows = DB::sql(VERSIONS)
            .bind(before)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter().map(|r| version_from_row(r, op)).collect()
    }

    async fn insert_audit(&self, actor: &str, record: &AuditRecord) -> Result<(), LedgerError> {
        DB::sql(INSERT_AUDIT)
            .bind(Time(Utc::now()))
            .bind(actor)
            .bind(record.action.as_str())
            .bind(record.target.as_str())
            .bind(record.before.as_deref())
            .bind(record.after.as_deref())
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("insert_audit"))?;
        Ok(())
    }

    async fn audit_entries(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, LedgerError> {
        let op = "audit_entries";
        let rows = DB::sql(AUDIT_ENTRIES)
            .bind(before)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.col("id")?,
                    at: r.time("at")?,
                    actor: r.col("actor")?,
                    action: r.col("action")?,
                    target: r.col("target")?,
                    before: r.col("before")?,
                    after: r.col("after")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(read_error(op, "audit_log"))
    }
}

fn version_from_row(r: &impl ReadRow, op: &'static str) -> Result<ConfigVersion, LedgerError> {
    let read = || -> Result<ConfigVersion, sqlx::Error> {
        Ok(ConfigVersion {
            version: r.col("version")?,
            created_at: r.time("created_at")?,
            author: r.col("author")?,
            document: r.col("document")?,
        })
    };
    read().map_err(read_error(op, "config_versions"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ledger::test_support::contract;
    use crate::ledger::Ledger;

    /// Config versions: numbered in order, read back whole, listed newest first in pages, the
    /// newest by author prefix (no LIKE wildcards), each with its audit row.
    async fn check_config_versions(ledger: Arc<dyn Ledger>) {
        assert_eq!(
            ledger.latest_config_version(None).await.expect("latest"),
            None
        );
        let audit = |n: usize| AuditRecord {
            action: format!("config.test.{n}"),
            target: "config".into(),
            before: None,
            after: Some(format!("{{\"n\":{n}}}")),
        };
        let mut stored = Vec::new();
        for (n, author) in ["file:/etc/t.toml", "admin:alice", "file_x", "admin"]
            .iter()
            .enumerate()
        {
            let v = ledger
                .insert_config_version(author, &format!("{{\"n\":{n}}}"), &audit(n))
                .await
                .expect("insert");
            assert_eq!(v.author, *author);
            stored.push(v);
        }
        assert!(stored.windows(2).all(|w| w[0].version < w[1].version));
        let back = ledger
            .config_version(stored[1].version)
            .await
            .expect("get")
            .expect("present");
        assert_eq!(back, stored[1]);
        assert_eq!(ledger.config_version(-5).await.expect("get"), None);
        let newest = |p| ledger.latest_config_version(p);
        assert_eq!(newest(None).await.expect("latest"), Some(stored[3].clone()));
        assert_eq!(
            newest(Some("file:")).await.expect("file"),
            Some(stored[0].clone())
        );
        assert_eq!(
            newest(Some("file")).await.expect("file"),
            Some(stored[2].clone())
        );
        assert_eq!(newest(Some("%")).await.expect("wildcard"), None);

        let page = ledger.config_versions(None, 3).await.expect("page");
        let numbers: Vec<i64> = page.iter().map(|v| v.version).collect();
        let want: Vec<i64> = stored.iter().rev().take(3).map(|v| v.version).collect();
        assert_eq!(numbers, want);
        assert!(
            page.iter().all(|v| v.document.is_empty()),
            "listings leave documents out"
        );
        let rest = ledger
            .config_versions(Some(numbers[2]), 3)
            .await
            .expect("next page");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].version, stored[0].version);

        ledger
            .insert_audit("admin:bob", &audit(9))
            .await
            .expect("audit");
        let entries = ledger.audit_entries(None, 10).await.expect("audit log");
        assert_eq!(entries.len(), 5);
        assert_eq!(
            (entries[0].actor.as_str(), entries[0].action.as_str()),
            ("admin:bob", "config.test.9")
        );
        assert_eq!(entries[4].actor, "file:/etc/t.toml");
        assert_eq!(entries[4].after.as_deref(), Some("{\"n\":0}"));
        let older = ledger
            .audit_entries(Some(entries[1].id), 10)
            .await
            .expect("older");
        assert_eq!(older.len(), 3);
    }

    contract!(
        "config versions and the audit log.",
        check_config_versions,
        pg_config_versions,
        sqlite_config_versions
    );
}
