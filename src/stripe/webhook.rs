//! Applying one verified Stripe delivery (DESIGN §5, §7): store the event id first
//! (`stripe_events`, so a redelivery is a no-op), then apply `customer.subscription.*`,
//! `invoice.*` (stored in `invoices`; payments also move the status), `customer.deleted` and
//! `checkout.session.completed` to the customer's entitlement and links. Applied changes are written order-safe (a write carries the event's
//! `created` as `updated_at` and never replaces newer state) in the same transaction that marks
//! the event processed, then reach this instance's cache and every other instance through the
//! one entitlement writer.
//!
//! Ordering: a write carries the event's `created`, whole seconds. Two events of the same second
//! cannot be ordered that way, so when the stored state is as of the very second of an event and
//! the event would change it, the subscription is re-fetched from the API and what Stripe says
//! now is applied instead ([`StripeWebhook::settle_same_second`]). Without the API key (or when
//! the call fails) the last received wins, and the reconciler repairs it.
//!
//! Owns: the Stripe → entitlement mapping of events, `tollgate_webhooks_total`,
//! `tollgate_stripe_refetches_total`. Must not touch: HTTP (the admin listener's
//! `admin::webhook` reads the body and maps errors), the request path, quota counters.

use super::events::{
    entitlement_for, envelope, invoice_record, parse_secrets, same_terms, stripe_customer_of,
    subscription_facts, verify, Envelope, Secret, Verified,
};
use super::{link_or_log, Control, StripeError};
use crate::control::entitlement_sync::{EntitlementSync, LedgerWrite};
use crate::entitle::{Entitlement, Status};
use crate::ledger::{Ledger, StripeEventRecord, StripeEventState, StripeFinish};
use crate::proxy::state::SnapshotCell;
use chrono::Utc;
use std::sync::Arc;

/// What the webhook endpoint needs, built once at start when `[stripe]` is configured.
pub struct StripeWebhook {
    pub settings: crate::config::StripeSettings,
    pub secrets: Vec<Secret>,
    pub ledger: Arc<dyn Ledger>,
    /// The config in force (prices → plans, plan ranks).
    pub config: SnapshotCell,
    pub entitlements: Arc<EntitlementSync>,
    /// Set by [`super::start`] when the API key is configured.
    pub control: std::sync::OnceLock<Control>,
    webhooks: prometheus::IntCounterVec,
    /// Same-second events settled by re-fetching the subscription, by outcome.
    refetches: prometheus::IntCounterVec,
}

/// Event types the metric names individually; everything else is `other` (bounded labels).
const NAMED_TYPES: &[&str] = &[
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
    "invoice.created",
    "invoice.finalized",
    "invoice.updated",
    "invoice.payment_failed",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "customer.deleted",
    "checkout.session.completed",
];

/// Outcome of one delivery (the metric's `outcome` label and the 2xx body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and the customer changed.
    Applied,
    /// Processed, but the stored state was newer (a late, older event).
    Stale,
    /// Stored and acknowledged; nothing to apply (type not handled, unknown status, a state the
    /// event does not change).
    Ignored,
    /// Stored and acknowledged, but neither the metadata nor a stored Stripe customer link names
    /// a tollgate customer: counted and logged, so an operator can link the customer.
    Unmatched,
    /// Already processed by an earlier (or concurrent) delivery.
    Duplicate,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
            Outcome::Unmatched => "unmatched",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// What an event asks of the entitlements.
enum Apply {
    /// Nothing to write (not a handled type or shape, or no change).
    Nothing,
    /// It would apply, but no tollgate customer is named or linked.
    Unmatched,
    /// Write this entitlement for this customer (order-safe).
    Write(String, Entitlement),
}

// === impl StripeWebhook ===

impl StripeWebhook {
    /// Reads the secrets from the env var named in the config and registers the metric.
    pub fn new(
        settings: crate::config::StripeSettings,
        ledger: Arc<dyn Ledger>,
        config: SnapshotCell,
        entitlements: Arc<EntitlementSync>,
        registry: &prometheus::Registry,
    ) -> Result<StripeWebhook, prometheus::Error> {
        let secrets = std::env::var(&settings.webhook_secrets_env)
            .map(|v| parse_secrets(&v))
            .unwrap_or_default();
        if secrets.is_empty() {
            tracing::warn!(env = %settings.webhook_secrets_env, "no Stripe webhook secret set: every webhook is refused");
        }
        let webhooks = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_webhooks_total",
                "Stripe webhook deliveries by event type and outcome",
            ),
            &["type", "outcome"],
        )?;
        let refetches = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_stripe_refetches_total",
                "Same-second Stripe events settled by re-fetching the subscription: `applied` \
                 (Stripe's current state was written), `failed` (the call failed; the last \
                 received event won)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(webhooks.clone()))?;
        registry.register(Box::new(refetches.clone()))?;
        Ok(StripeWebhook {
            settings,
            secrets,
            ledger,
            config,
            entitlements,
            control: std::sync::OnceLock::new(),
            webhooks,
            refetches,
        })
    }

    fn count(&self, event_type: &str, outcome: &str) {
        let t = NAMED_TYPES
            .iter()
            .find(|t| **t == event_type)
            .copied()
            .unwrap_or("other");
        self.webhooks.with_label_values(&[t, outcome]).inc();
    }

    /// Verifies, stores and applies one delivery. `Err` means "refuse; nothing was stored"
    /// (or, for a ledger error, "retry later").
    pub async fn handle(
        &self,
        payload: &str,
        signature: Option<&str>,
    ) -> Result<Outcome, StripeError> {
        let r = self.handle_inner(payload, signature).await;
        if let Err(e) = &r {
            let outcome = match e {
                StripeError::Ledger(_) => "ledger_error",
                _ => "rejected",
            };
            self.count("", outcome);
        }
        r
    }

    async fn handle_inner(
        &self,
        payload: &str,
        signature: Option<&str>,
    ) -> Result<Outcome, StripeError> {
        let header = signature.ok_or(StripeError::MissingSignature)?;
        if self.secrets.is_empty() {
            return Err(StripeError::NoSecrets(
                self.settings.webhook_secrets_env.clone(),
            ));
        }
        let verified = verify(payload, header, &self.secrets, Utc::now().timestamp())?;
        let env = envelope(payload)?;
        // An invoice is read before anything is stored: one whose amounts are not integers is
        // refused (400, nothing stored), and Stripe delivers it again.
        let invoice = match env.object.get("object").and_then(|o| o.as_str()) {
            Some("invoice") if env.event_type.starts_with("invoice.") => {
                Some(invoice_record(&env.object, env.created)?)
            }
            _ => None,
        };
        if verified == Verified::Untyped {
            tracing::debug!(event = %env.id, "event not typable by the SDK; read from raw JSON");
        }
        let record = StripeEventRecord {
            id: env.id.clone(),
            event_type: env.event_type.clone(),
            created: env.created,
            payload: payload.to_string(),
        };
        if self.ledger.record_stripe_event(&record).await? == StripeEventState::Processed {
            self.count(&env.event_type, Outcome::Duplicate.as_str());
            return Ok(Outcome::Duplicate);
        }
        let apply = match env.event_type.as_str() {
            t if t.starts_with("invoice.") => self.invoice_event(&env, &t[8..], invoice).await?,
            "customer.deleted" => self.customer_deleted(&env).await?,
            "checkout.session.completed" => {
                self.checkout_completed(&env).await?;
                Apply::Nothing
            }
            _ => self.plan_change(&env).await?,
        };
        let unmatched = matches!(apply, Apply::Unmatched);
        let apply = match apply {
            Apply::Write(customer, ent) => Some((customer, ent)),
            Apply::Nothing | Apply::Unmatched => None,
        };
        if env.event_type.starts_with("customer.subscription.") {
            self.link_from_subscription(&env).await?;
        }
        let finish = self
            .ledger
            .finish_stripe_event(
                &env.id,
                apply.as_ref().map(|(c, e)| (c.as_str(), e)),
                unmatched,
            )
            .await?;
        let outcome = match (finish, &apply) {
            (StripeFinish::AlreadyProcessed, _) => Outcome::Duplicate,
            (StripeFinish::Processed { changed: true }, Some((customer, _))) => {
                // Written with the event's claim: cache and broadcast.
                self.entitlements
                    .write(customer, LedgerWrite::Written, None)
                    .await?;
                Outcome::Applied
            }
            (StripeFinish::Processed { .. }, Some(_)) => Outcome::Stale,
            (StripeFinish::Processed { .. }, None) if unmatched => Outcome::Unmatched,
            (StripeFinish::Processed { .. }, None) => Outcome::Ignored,
        };
        self.count(&env.event_type, outcome.as_str());
        tracing::info!(event = %env.id, r#type = %env.event_type, outcome = outcome.as_str(), "stripe webhook");
        Ok(outcome)
    }

    /// The tollgate customer an event's object belongs to: the one its metadata names (the
    /// configured key), else the one linked to its Stripe customer (`customer`), as Checkout,
    /// `PUT /admin/customers/{id}/stripe` and earlier events link them. `None`: no known
    /// customer, logged.
    async fn customer_of(
        &self,
        env: &Envelope,
        from_metadata: Option<String>,
    ) -> Result<Option<String>, StripeError> {
        if from_metadata.is_some() {
            return Ok(from_metadata);
        }
        let stripe_customer = stripe_customer_of(&env.object);
        if let Some(cus) = &stripe_customer {
            if let Some((customer, _)) = self.ledger.stripe_link(None, Some(cus)).await? {
                return Ok(Some(customer));
            }
        }
        tracing::warn!(event = %env.id, r#type = %env.event_type, key = %self.settings.customer_metadata_key,
            stripe_customer = stripe_customer.as_deref().unwrap_or("-"),
            "event names no tollgate customer (no metadata, no linked Stripe customer); unmatched");
        Ok(None)
    }

    /// The (customer, entitlement) an event asks for, if it is one tollgate applies.
    async fn plan_change(&self, env: &Envelope) -> Result<Apply, StripeError> {
        let Some(kind) = env.event_type.strip_prefix("customer.subscription.") else {
            return Ok(Apply::Nothing);
        };
        if env.object.get("object").and_then(|o| o.as_str()) != Some("subscription") {
            return Ok(Apply::Nothing);
        }
        let facts = subscription_facts(&env.object, &self.settings.customer_metadata_key);
        let Some(customer) = self.customer_of(env, facts.customer.clone()).await? else {
            return Ok(Apply::Unmatched);
        };
        let snap = self.config.load_full();
        let Some(ent) = entitlement_for(
            &snap.config,
            &self.settings.prices,
            &facts,
            kind == "deleted",
            env.created,
        ) else {
            tracing::warn!(event = %env.id, status = %facts.status, "unknown subscription status; ignored");
            return Ok(Apply::Nothing);
        };
        // The stored state matters only when a same-second event can be settled from the API.
        let stored = match self.control.get() {
            Some(_) => self.ledger.get_customer(&customer).await?,
            None => None,
        };
        let ent = self
            .settle_same_second(env, &facts.id, &customer, stored.as_ref(), ent)
            .await;
        Ok(Apply::Write(customer, ent))
    }

    /// DESIGN §7, same-second events: `proposed` (what the event says) is kept unless the stored
    /// state is as of the event's very second and differs from it. Then `created` cannot say
    /// which came last, so the subscription is fetched from Stripe and what it says now is
    /// written instead, as of the same second (a later event still wins over it). Without the API
    /// key, or when the call fails, `proposed` is kept (the last received wins; the reconciler
    /// repairs it).
    async fn settle_same_second(
        &self,
        env: &Envelope,
        subscription: &str,
        customer: &str,
        stored: Option<&Entitlement>,
        proposed: Entitlement,
    ) -> Entitlement {
        let in_doubt = stored
            .is_some_and(|s| s.updated_at == proposed.updated_at && !same_terms(s, &proposed));
        let Some(control) = self.control.get().filter(|_| in_doubt) else {
            return proposed;
        };
        if subscription.is_empty() {
            return proposed; // an invoice that names no subscription
        }
        let fetched = match control.api.subscription(subscription).await {
            Ok(obj) => obj,
            Err(e) => {
                self.refetches.with_label_values(&["failed"]).inc();
                tracing::warn!(event = %env.id, %subscription, error = %e,
                    "same-second event: could not re-fetch the subscription; the last received wins");
                return proposed;
            }
        };
        let facts = subscription_facts(&fetched, &self.settings.customer_metadata_key);
        if facts.customer.as_deref().is_some_and(|c| c != customer) {
            tracing::warn!(event = %env.id, %subscription, %customer, now = facts.customer.as_deref(),
                "same-second event: the subscription now names another customer; event applied as sent");
            return proposed;
        }
        let snap = self.config.load_full();
        match entitlement_for(
            &snap.config,
            &self.settings.prices,
            &facts,
            false,
            env.created,
        ) {
            Some(current) => {
                self.refetches.with_label_values(&["applied"]).inc();
                tracing::info!(event = %env.id, %subscription, %customer, status = %facts.status,
                    "same-second event: applied the subscription as Stripe has it now");
                current
            }
            None => proposed,
        }
    }

    /// Every `invoice.*` event with an invoice object: the invoice is stored (order-safe, with
    /// its customer, or unlinked when none is known: acknowledged and counted `unmatched`), then
    /// a payment event may change the customer's status ([`StripeWebhook::payment_change`]).
    async fn invoice_event(
        &self,
        env: &Envelope,
        kind: &str,
        invoice: Option<crate::ledger::InvoiceRecord>,
    ) -> Result<Apply, StripeError> {
        let Some(mut invoice) = invoice else {
            return Ok(Apply::Nothing);
        };
        // The subscription's metadata as the invoice carries it: under `parent` since API
        // 2025-03-31, at the top level before.
        let key = &self.settings.customer_metadata_key;
        let named = [
            "/parent/subscription_details/metadata",
            "/subscription_details/metadata",
        ]
        .iter()
        .find_map(|p| {
            env.object
                .pointer(p)
                .and_then(|m| m.get(key))
                .and_then(|c| c.as_str())
        })
        .map(str::trim)
        .filter(|c| crate::entitle::check_customer_id(c).is_ok())
        .map(String::from);
        let customer = self.customer_of(env, named).await?;
        invoice.customer = customer.clone();
        if !self.ledger.record_invoice(&invoice).await? {
            tracing::debug!(event = %env.id, invoice = %invoice.id, "a newer state of the invoice is stored");
        }
        match customer {
            Some(customer) => self.payment_change(env, kind, customer).await,
            None => Ok(Apply::Unmatched),
        }
    }

    /// Invoice events move a subscribed customer between `past_due` and `active` (DESIGN §7:
    /// `invoice.payment_failed` marks it past_due unless a newer state says otherwise). The rest
    /// of the entitlement is the stored one; the write is as of the event's `created`, so the
    /// ledger's conditional upsert refuses it when a newer subscription event was applied. A
    /// canceled or unpaid customer is never revived by an invoice.
    async fn payment_change(
        &self,
        env: &Envelope,
        kind: &str,
        customer: String,
    ) -> Result<Apply, StripeError> {
        let target = match kind {
            "payment_failed" => Status::PastDue,
            "paid" | "payment_succeeded" => Status::Active,
            _ => return Ok(Apply::Nothing),
        };
        let Some(current) = self.ledger.get_customer(&customer).await? else {
            return Ok(Apply::Nothing); // no subscription applied yet: nothing to mark
        };
        let applies = match target {
            Status::PastDue => matches!(
                current.status,
                Status::Active | Status::Trialing | Status::PastDue
            ),
            _ => current.status == Status::PastDue,
        };
        if !applies || current.status == target {
            return Ok(Apply::Nothing);
        }
        let subscription = ["/parent/subscription_details/subscription", "/subscription"]
            .iter()
            .find_map(|p| env.object.pointer(p).and_then(|s| s.as_str()))
            .unwrap_or_default()
            .to_string();
        let ent = Entitlement {
            status: target,
            status_since: Some(env.created),
            updated_at: env.created,
            ..current.clone()
        };
        let ent = self
            .settle_same_second(env, &subscription, &customer, Some(&current), ent)
            .await;
        Ok(Apply::Write(customer, ent))
    }

    /// `customer.deleted`: Stripe cancels every subscription of a deleted customer, so the
    /// linked tollgate customer is canceled and back on no plan (the default plan, if the status
    /// policy falls back to it), as of the event (order-safe like any Stripe write). The link is
    /// kept: it names the customer in the audit and a re-created Stripe customer replaces it.
    async fn customer_deleted(&self, env: &Envelope) -> Result<Apply, StripeError> {
        let Some(cus) = env.object.get("id").and_then(|i| i.as_str()) else {
            return Ok(Apply::Nothing);
        };
        let Some((customer, _)) = self.ledger.stripe_link(None, Some(cus)).await? else {
            tracing::info!(event = %env.id, stripe_customer = %cus, "deleted Stripe customer is linked to no tollgate customer; ignored");
            return Ok(Apply::Nothing);
        };
        let ent = Entitlement {
            plan: None,
            status: Status::Canceled,
            status_since: Some(env.created),
            period_start: None,
            period_end: None,
            suspended: false,
            updated_at: env.created,
            cancel_at_period_end: false,
            trial_end: None,
        };
        Ok(Apply::Write(customer, ent))
    }

    /// `checkout.session.completed`: links the session's Stripe customer to the tollgate
    /// customer named by `client_reference_id`, or else by `metadata[customer_metadata_key]`.
    async fn checkout_completed(&self, env: &Envelope) -> Result<(), StripeError> {
        if env.object.get("object").and_then(|o| o.as_str()) != Some("checkout.session") {
            return Ok(());
        }
        let key = &self.settings.customer_metadata_key;
        let customer = env
            .object
            .get("client_reference_id")
            .and_then(|c| c.as_str())
            .or_else(|| {
                env.object
                    .get("metadata")
                    .and_then(|m| m.get(key))
                    .and_then(|c| c.as_str())
            })
            .map(str::trim)
            .filter(|c| crate::entitle::check_customer_id(c).is_ok());
        match (customer, stripe_customer_of(&env.object)) {
            (Some(customer), Some(cus)) => {
                link_or_log(&*self.ledger, customer, &cus, "checkout", "stripe-webhook").await?;
            }
            _ => {
                tracing::warn!(event = %env.id, "checkout session names no tollgate customer or no Stripe customer; not linked");
            }
        }
        Ok(())
    }

    /// Records the subscription's Stripe customer as the tollgate customer's link (what usage
    /// reporting needs). A Stripe customer already linked to someone else is left as it is.
    async fn link_from_subscription(&self, env: &Envelope) -> Result<(), StripeError> {
        let facts = subscription_facts(&env.object, &self.settings.customer_metadata_key);
        let (Some(customer), Some(stripe_customer)) =
            (facts.customer, stripe_customer_of(&env.object))
        else {
            return Ok(());
        };
        link_or_log(
            &*self.ledger,
            &customer,
            &stripe_customer,
            "webhook",
            "stripe-webhook",
        )
        .await?;
        Ok(())
    }
}
