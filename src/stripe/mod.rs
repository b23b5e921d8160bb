//! Stripe ↔ tollgate (DESIGN §5, §7): what webhooks mean, usage → Billing meter events, the
//! subscription reconciler, and the Stripe API client they share.
//!
//! Layout: [`events`] (signature check, the fields read from raw JSON, subscription →
//! entitlement), [`webhook`] (applying one verified delivery), [`api`] (the client), [`report`]
//! (usage → meter events), [`reconcile`] (the subscription pull); here the errors, the one
//! customer-link writer ([`link`]) and [`start`], which starts the reporter and the
//! reconciler. The HTTP side (`POST /webhooks/stripe`, `/admin/stripe/*`) is the admin
//! listener's (`admin::webhook`, `admin::stripe`).
//!
//! Stripe receives the handles it uses (ledger, the config in force, the entitlement writer,
//! the metrics registry), not the request path's shared state.
//! Must not touch: the request path, quota counters, the admin token (a webhook's only
//! credential is its signature).

use crate::ledger::{AuditRecord, Ledger, LedgerError};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod api;
pub mod events;
pub mod reconcile;
pub mod report;
pub mod webhook;

pub use webhook::StripeWebhook;

/// Largest webhook body accepted (Stripe's events are a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a delivery was refused (each is a 4xx or 503; nothing is stored).
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("missing Stripe-Signature header")]
    MissingSignature,
    #[error("no webhook secret is configured (env var {0} is unset or empty)")]
    NoSecrets(String),
    #[error("Stripe-Signature is malformed")]
    MalformedSignature,
    #[error("no v1 signature matches any configured secret")]
    BadSignature,
    #[error("signature timestamp {0} is outside the 300 s tolerance")]
    Stale(i64),
    #[error("body is not a Stripe event: {0}")]
    BadBody(String),
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What [`link`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// Already linked to that Stripe customer: nothing written.
    Unchanged,
    /// Linked (audited); the Stripe customer linked before, if any.
    Changed { previous: Option<String> },
    /// The Stripe customer belongs to another tollgate customer: nothing written.
    Conflict { owner: String },
}

/// The one writer of customer links: links `customer` to `stripe_customer` (`source` says
/// through what: `webhook`, `checkout`, `admin`, `reconcile`) and audits a change as `actor`.
pub async fn link(
    ledger: &dyn Ledger,
    customer: &str,
    stripe_customer: &str,
    source: &str,
    actor: &str,
) -> Result<Linked, LedgerError> {
    let before = match ledger
        .link_stripe_customer(customer, stripe_customer, source)
        .await
    {
        Ok(before) if before.as_deref() == Some(stripe_customer) => return Ok(Linked::Unchanged),
        Ok(before) => before,
        Err(LedgerError::LinkConflict {
            customer: owner, ..
        }) => return Ok(Linked::Conflict { owner }),
        Err(e) => return Err(e),
    };
    tracing::info!(%customer, %stripe_customer, before = before.as_deref(), %source, "Stripe customer linked");
    let json = |c: &str| serde_json::json!({ "stripe_customer": c }).to_string();
    let record = AuditRecord {
        action: "stripe.link".into(),
        target: customer.into(),
        before: before.as_deref().map(json),
        after: Some(json(stripe_customer)),
    };
    if let Err(e) = ledger.insert_audit(actor, &record).await {
        // The link is made; the audit trail misses one row (logged with what it would say).
        tracing::warn!(error = %e, %customer, %stripe_customer, "Stripe link not audited");
    }
    Ok(Linked::Changed { previous: before })
}

/// [`link`] for the background paths (webhooks, reconciler): a conflict is logged and left for
/// an operator, not an error. Says whether the link changed.
pub(crate) async fn link_or_log(
    ledger: &dyn Ledger,
    customer: &str,
    stripe_customer: &str,
    source: &str,
    actor: &str,
) -> Result<bool, LedgerError> {
    match link(ledger, customer, stripe_customer, source, actor).await? {
        Linked::Changed { .. } => Ok(true),
        Linked::Unchanged => Ok(false),
        Linked::Conflict { owner } => {
            tracing::warn!(%customer, %stripe_customer, %owner, "Stripe customer already linked to another customer; link not changed");
            Ok(false)
        }
    }
}

/// The Stripe API side, present when the secret key is set: the client (portal sessions, links)
/// and the reconciler (`POST /admin/stripe/sync`).
pub struct Control {
    pub api: api::StripeApi,
    pub reconciler: Arc<reconcile::Reconciler>,
}

/// Starts the Stripe background tasks (usage reporter, reconciler) on `tasks`, each stopping
/// at `cancel`, and makes [`Control`] available to the admin API. Without the secret key they do
/// not run (logged): webhooks still work.
pub fn start(
    stripe: &StripeWebhook,
    registry: &prometheus::Registry,
    tasks: &TaskTracker,
    runtime: &tokio::runtime::Handle,
    cancel: &CancellationToken,
) -> Result<(), prometheus::Error> {
    let settings = &stripe.settings;
    let api = match api::StripeApi::from_settings(settings) {
        Ok(api) => api,
        Err(e) => {
            tracing::warn!(error = %e, "Stripe API calls are off: no usage reporting, no reconciler, no portal");
            return Ok(());
        }
    };
    let reporter = report::Reporter::new(
        stripe.ledger.clone(),
        api.clone(),
        stripe.config.clone(),
        settings,
        registry,
    )?;
    tasks.spawn_on(reporter.run(cancel.clone()), runtime);
    let reconciler = Arc::new(reconcile::Reconciler::new(
        stripe.ledger.clone(),
        api.clone(),
        settings.clone(),
        stripe.config.clone(),
        stripe.entitlements.clone(),
    ));
    tasks.spawn_on(reconciler.clone().run(cancel.clone()), runtime);
    let _ = stripe.control.set(Control { api, reconciler });
    Ok(())
}
