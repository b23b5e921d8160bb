//! The audit row of an admin mutation that audits nothing itself (credits, resolved Stripe
//! reports): best effort, after the change is made.
//!
//! Owns: that one helper. Must not touch: config versions (`control::live_config` audits them),
//! entitlement writes (`control::entitlement_sync::EntitlementSync::write` audits them) and
//! customer links (`stripe::link` audits them): calling this for those would audit them twice.

use crate::admin::AdminState;
use crate::ledger::AuditRecord;
use serde_json::Value;

/// Records `action` on `target` by `actor` in `audit_log`, with the state before and after.
/// Best effort: the change is already made; a failure is logged, not answered.
pub(crate) async fn record(
    s: &AdminState,
    actor: &str,
    action: &str,
    target: String,
    before: Value,
    after: Value,
) {
    let record = AuditRecord {
        action: action.into(),
        target,
        before: Some(before.to_string()),
        after: Some(after.to_string()),
    };
    if let Err(e) = s.ledger.insert_audit(actor, &record).await {
        tracing::warn!(error = %e, action, target = %record.target, "admin change not audited");
    }
}
