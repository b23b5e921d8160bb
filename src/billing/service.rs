//! [`Billing`]: [`SelfService`] over the Stripe API. Each call checks what it can locally first
//! (the plan, the redirect URLs), so a refused request never reaches Stripe; then it reads the
//! caller's Stripe customer (the stored link) and live subscription from Stripe, makes the one
//! change, and writes the entitlement Stripe answered with through the entitlement writer, as
//! of the current second and order-safe like a webhook: the webhook that follows finds the same
//! terms, and a newer event still wins.

use super::{BillingError, Change, CheckoutRequest, Invoice, InvoicePage, SelfService, Session};
use crate::control::entitlement_sync::{Audit, LedgerWrite};
use crate::entitle::Status;
use crate::ledger::Ledger;
use crate::stripe::api::StripeApi;
use crate::stripe::events::{entitlement_for, stripe_customer_of, subscription_facts};
use crate::stripe::StripeWebhook;
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// Stripe's refusal (its status and code) or its failure to answer.
impl From<stripe_api::StripeError> for BillingError {
    fn from(e: stripe_api::StripeError) -> BillingError {
        match e {
            stripe_api::StripeError::Stripe(err, status) => BillingError::Stripe {
                status,
                code: err
                    .code
                    .as_ref()
                    .map(|c| c.as_str().to_string())
                    .or_else(|| err.decline_code.clone()),
                message: err.message.clone().unwrap_or_default(),
            },
            other => BillingError::StripeUnavailable(other.to_string()),
        }
    }
}

/// Subscription statuses that are still a subscription (a change or cancellation applies; a
/// second checkout is refused).
const LIVE: &[&str] = &["active", "trialing", "past_due", "unpaid", "paused"];

/// Self-service billing, built at assembly: invoices from the ledger always, the rest over
/// Stripe when `[stripe]` is configured (else `stripe-not-configured`).
pub struct Billing {
    ledger: Arc<dyn Ledger>,
    stripe: Option<OverStripe>,
}

/// The calls that go to Stripe.
struct OverStripe {
    stripe: Arc<StripeWebhook>,
}

/// Who asks for a change: the caller through self-service (public plans only, cancelling at
/// once only where allowed) or an operator through the admin API (any plan with a Stripe
/// price; audited under the admin actor).
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub actor: &'a str,
    pub operator: bool,
}

impl<'a> Who<'a> {
    /// An operator through the admin API, audited as `actor`.
    pub fn operator(actor: &'a str) -> Who<'a> {
        Who {
            actor,
            operator: true,
        }
    }
}

impl Who<'static> {
    /// The caller of a `/_tollgate/*` call.
    pub const SELF_SERVICE: Who<'static> = Who {
        actor: "self-service",
        operator: false,
    };
}

/// What `POST /admin/customers` provisions in Stripe.
#[derive(Debug, Clone, Default)]
pub struct NewCustomer {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

/// A plan a change may name: public (for self-service), with a Stripe price.
struct Offered {
    plan: String,
    price: String,
    trial_days: u32,
}

// === impl Billing ===

impl Billing {
    pub fn new(ledger: Arc<dyn Ledger>, stripe: Option<Arc<StripeWebhook>>) -> Billing {
        Billing {
            ledger,
            stripe: stripe.map(|stripe| OverStripe { stripe }),
        }
    }

    fn over_stripe(&self) -> Result<&OverStripe, BillingError> {
        self.stripe
            .as_ref()
            .ok_or(BillingError::StripeNotConfigured)
    }

    /// An operator's plan change (`POST /admin/customers/{id}/subscription`).
    pub async fn operator_change_plan(
        &self,
        customer: &str,
        plan: Option<String>,
        actor: &str,
    ) -> Result<Change, BillingError> {
        self.over_stripe()?
            .change_plan(customer, plan, Who::operator(actor))
            .await
    }

    /// An operator's termination (`DELETE /admin/customers/{id}/subscription`): at once, or at
    /// the period's end.
    pub async fn operator_cancel(
        &self,
        customer: &str,
        now: bool,
        actor: &str,
    ) -> Result<Change, BillingError> {
        self.over_stripe()?
            .cancel(customer, now, Who::operator(actor))
            .await
    }

    /// The Stripe customer of a provisioned customer: the linked one, else one created with
    /// its email, name and metadata and linked (audited as `actor`). The create call's
    /// `Idempotency-Key` is derived from the id, so a retry after a lost answer gets the same
    /// Stripe customer, never a second one. `None` when the Stripe API is off.
    pub async fn provision_stripe_customer(
        &self,
        c: &NewCustomer,
        actor: &str,
    ) -> Result<Option<String>, BillingError> {
        let Some(st) = &self.stripe else {
            return Ok(None);
        };
        let Ok(api) = st.api() else {
            return Ok(None);
        };
        if let Some(cus) = st.stripe_customer(&c.id).await? {
            return Ok(Some(cus));
        }
        let key = st.key();
        let mut form = vec![(format!("metadata[{key}]"), c.id.clone())];
        if let Some(e) = &c.email {
            form.push(("email".into(), e.clone()));
        }
        if let Some(n) = &c.name {
            form.push(("name".into(), n.clone()));
        }
        let created = api
            .create_customer(&form, &customer_idempotency_key(&c.id))
            .await?;
        let cus = created
            .get("id")
            .and_then(|i| i.as_str())
            .filter(|i| i.starts_with("cus_"))
            .ok_or_else(|| BillingError::StripeUnavailable("the customer has no id".into()))?
            .to_string();
        match crate::stripe::link(&*st.stripe.ledger, &c.id, &cus, "admin", actor).await? {
            crate::stripe::Linked::Conflict { owner } => Err(BillingError::Invalid {
                key: "id",
                detail: format!(
                    "Stripe answered with customer {cus}, which is linked to {owner:?}"
                ),
            }),
            _ => Ok(Some(cus)),
        }
    }
}

#[async_trait::async_trait]
impl SelfService for Billing {
    async fn checkout(
        &self,
        customer: &str,
        req: CheckoutRequest,
    ) -> Result<Session, BillingError> {
        self.over_stripe()?.checkout(customer, req).await
    }

    async fn portal(
        &self,
        customer: &str,
        return_url: Option<String>,
    ) -> Result<Session, BillingError> {
        self.over_stripe()?.portal(customer, return_url).await
    }

    async fn change_plan(
        &self,
        customer: &str,
        plan: Option<String>,
    ) -> Result<Change, BillingError> {
        self.over_stripe()?
            .change_plan(customer, plan, Who::SELF_SERVICE)
            .await
    }

    async fn cancel(&self, customer: &str, now: bool) -> Result<Change, BillingError> {
        self.over_stripe()?
            .cancel(customer, now, Who::SELF_SERVICE)
            .await
    }

    async fn invoices(
        &self,
        customer: &str,
        after: Option<String>,
        limit: i64,
    ) -> Result<InvoicePage, BillingError> {
        invoice_page(&*self.ledger, customer, after, limit).await
    }
}

/// The `Idempotency-Key` of creating `id`'s Stripe customer: `tollgate-customer-<id>` for a
/// plain id (readable in Stripe's request log), else a hash of it (Stripe takes at most 255
/// characters; an id may hold any printable character).
fn customer_idempotency_key(id: &str) -> String {
    let plain = id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'));
    if plain {
        format!("tollgate-customer-{id}")
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(id.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("tollgate-customer-sha256-{hex}")
    }
}

/// A page of `customer`'s invoices (the admin API reads the same pages).
pub async fn invoice_page(
    ledger: &dyn Ledger,
    customer: &str,
    after: Option<String>,
    limit: i64,
) -> Result<InvoicePage, BillingError> {
    if let Some(a) = &after {
        if a.is_empty()
            || a.len() > 255
            || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(BillingError::Invalid {
                key: "after",
                detail: format!("not an invoice id: {a:?}"),
            });
        }
    }
    // One more than asked: whether there is a next page.
    let mut rows = ledger
        .invoices(customer, after.as_deref(), limit + 1)
        .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(InvoicePage {
        invoices: rows.into_iter().map(Invoice::from).collect(),
        next,
    })
}

// === impl OverStripe ===

impl OverStripe {
    /// The Stripe API client, or `stripe-not-configured` without the secret key.
    fn api(&self) -> Result<&StripeApi, BillingError> {
        self.stripe
            .control
            .get()
            .map(|c| &c.api)
            .ok_or(BillingError::StripeNotConfigured)
    }

    fn key(&self) -> &str {
        &self.stripe.settings.customer_metadata_key
    }

    /// `plan` checked against the config in force: public unless an operator asks.
    fn offered(&self, plan: Option<String>, who: Who<'_>) -> Result<Offered, BillingError> {
        let invalid = |detail: String| BillingError::Invalid {
            key: "plan",
            detail,
        };
        let name = plan
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                invalid("required: the name of a plan from GET /_tollgate/plans".into())
            })?;
        let snap = self.stripe.config.load_full();
        let p = snap
            .config
            .plans
            .get(&name)
            .filter(|p| p.offer.public || who.operator)
            .ok_or_else(|| {
                invalid(format!(
                    "no plan {name:?} is offered (see GET /_tollgate/plans)"
                ))
            })?;
        let price = p.offer.stripe_price.clone().ok_or_else(|| {
            invalid(format!(
                "plan {name:?} cannot be bought: it has no Stripe price"
            ))
        })?;
        Ok(Offered {
            plan: name,
            price,
            trial_days: p.offer.trial_days,
        })
    }

    /// A redirect URL (`key` names it): absolute http(s), to a host `stripe.redirect_hosts`
    /// allows. Anything else is refused: an open redirect off a payment page is a phishing tool.
    fn redirect(&self, key: &'static str, url: &str) -> Result<String, BillingError> {
        let invalid = |detail: String| BillingError::Invalid { key, detail };
        let parsed = url::Url::parse(url)
            .map_err(|e| invalid(format!("not an absolute URL ({e}): {url:?}")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(invalid(format!("must be https:// or http://, got {url:?}")));
        }
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let with_port = parsed.port().map(|p| format!("{host}:{p}"));
        let allowed = &self.stripe.settings.redirect_hosts;
        if !allowed
            .iter()
            .any(|h| *h == host || Some(h) == with_port.as_ref())
        {
            return Err(invalid(if allowed.is_empty() {
                "no redirect host is allowed: the operator lists them in stripe.redirect_hosts"
                    .into()
            } else {
                format!("host {host:?} is not one of stripe.redirect_hosts")
            }));
        }
        Ok(parsed.into())
    }

    /// The caller's linked Stripe customer, if any.
    async fn stripe_customer(&self, customer: &str) -> Result<Option<String>, BillingError> {
        Ok(self
            .stripe
            .ledger
            .stripe_link(Some(customer), None)
            .await?
            .map(|(_, cus)| cus))
    }

    /// The caller's newest live subscription in Stripe (the one a change applies to).
    async fn live_subscription(
        &self,
        api: &StripeApi,
        stripe_customer: &str,
    ) -> Result<Option<serde_json::Value>, BillingError> {
        let page = api.customer_subscriptions(stripe_customer).await?;
        Ok(page
            .get("data")
            .and_then(|d| d.as_array())
            .into_iter()
            .flatten()
            .find(|s| {
                s.get("status")
                    .and_then(|v| v.as_str())
                    .is_some_and(|st| LIVE.contains(&st))
                    // A list that ignores the filter must not hand us someone else's.
                    && stripe_customer_of(s).as_deref() == Some(stripe_customer)
            })
            .cloned())
    }

    /// Writes the entitlement `sub` (Stripe's answer) means, as of this second, and says what
    /// is in force.
    async fn apply(
        &self,
        customer: &str,
        sub: &serde_json::Value,
        action: &str,
        who: Who<'_>,
    ) -> Result<Change, BillingError> {
        let facts = subscription_facts(sub, self.key());
        let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_default();
        let snap = self.stripe.config.load_full();
        let deleted = facts.status == "canceled";
        let want = entitlement_for(
            &snap.config,
            &self.stripe.settings.prices,
            &facts,
            deleted,
            now,
        );
        let mut in_force = want.as_ref().and_then(|w| w.plan.clone());
        if let Some(mut want) = want {
            let before = self.stripe.ledger.get_customer(customer).await?;
            if let Some(b) = &before {
                if b.status == want.status {
                    want.status_since = b.status_since;
                }
                want.suspended = b.suspended;
            }
            let audit = Audit {
                actor: who.actor,
                action,
                target: customer.to_string(),
                before: before.as_ref(),
            };
            match self
                .stripe
                .entitlements
                .write(customer, LedgerWrite::StripeOrdered(&want), Some(audit))
                .await?
            {
                Some(after) => in_force = after.plan,
                // A webhook of this very second got there first: it says the same or newer.
                None => {
                    in_force = self
                        .stripe
                        .ledger
                        .get_customer(customer)
                        .await?
                        .and_then(|e| e.plan)
                }
            }
        }
        tracing::info!(%customer, subscription = %facts.id, plan = in_force.as_deref(), status = %facts.status, %action, "self-service subscription change");
        Ok(Change {
            subscription: facts.id,
            plan: in_force,
            status: facts.status,
            cancel_at_period_end: facts.cancel_at_period_end,
            period_end: facts
                .period_end
                .and_then(|t| DateTime::from_timestamp(t, 0)),
        })
    }
}

impl OverStripe {
    async fn checkout(
        &self,
        customer: &str,
        req: CheckoutRequest,
    ) -> Result<Session, BillingError> {
        let offered = self.offered(req.plan, Who::SELF_SERVICE)?;
        let success = req.success_url.ok_or(BillingError::Invalid {
            key: "success_url",
            detail: "required: where Stripe sends the caller after paying".into(),
        })?;
        let success = self.redirect("success_url", &success)?;
        let cancel = match req.cancel_url {
            Some(u) => Some(self.redirect("cancel_url", &u)?),
            None => None,
        };
        let api = self.api()?;
        let linked = self.stripe_customer(customer).await?;
        if let Some(cus) = &linked {
            if let Some(sub) = self.live_subscription(api, cus).await? {
                let snap = self.stripe.config.load_full();
                let facts = subscription_facts(&sub, self.key());
                let plan = facts
                    .price_ids
                    .iter()
                    .find_map(|p| snap.config.plan_for_price(&self.stripe.settings.prices, p))
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                return Err(BillingError::SubscriptionExists(plan));
            }
        }
        let key = self.key();
        let mut form: Vec<(String, String)> = vec![
            ("mode".into(), "subscription".into()),
            ("line_items[0][price]".into(), offered.price.clone()),
            ("line_items[0][quantity]".into(), "1".into()),
            ("success_url".into(), success),
            ("client_reference_id".into(), customer.into()),
            (format!("metadata[{key}]"), customer.into()),
            (
                format!("subscription_data[metadata][{key}]"),
                customer.into(),
            ),
        ];
        if let Some(c) = cancel {
            form.push(("cancel_url".into(), c));
        }
        if let Some(cus) = linked {
            form.push(("customer".into(), cus));
        }
        if offered.trial_days > 0 {
            form.push((
                "subscription_data[trial_period_days]".into(),
                offered.trial_days.to_string(),
            ));
        }
        let session = api.checkout_session(&form).await?;
        let field = |k: &str| session.get(k).and_then(|v| v.as_str()).map(String::from);
        let (Some(id), Some(url)) = (field("id"), field("url")) else {
            return Err(BillingError::StripeUnavailable(
                "the Checkout session has no id or url".into(),
            ));
        };
        tracing::info!(%customer, plan = %offered.plan, session = %id, "checkout session created");
        Ok(Session {
            id,
            url,
            plan: Some(offered.plan),
        })
    }

    async fn portal(
        &self,
        customer: &str,
        return_url: Option<String>,
    ) -> Result<Session, BillingError> {
        let return_url = match return_url {
            Some(u) => Some(self.redirect("return_url", &u)?),
            None => None,
        };
        let api = self.api()?;
        let cus = self
            .stripe_customer(customer)
            .await?
            .ok_or(BillingError::NoStripeCustomer)?;
        let (id, url) = api.portal_session(&cus, return_url.as_deref()).await?;
        Ok(Session {
            id,
            url,
            plan: None,
        })
    }

    async fn change_plan(
        &self,
        customer: &str,
        plan: Option<String>,
        who: Who<'_>,
    ) -> Result<Change, BillingError> {
        let offered = self.offered(plan, who)?;
        let api = self.api()?;
        let cus = self
            .stripe_customer(customer)
            .await?
            .ok_or(BillingError::NoSubscription)?;
        let sub = self
            .live_subscription(api, &cus)
            .await?
            .ok_or(BillingError::NoSubscription)?;
        let facts = subscription_facts(&sub, self.key());
        let snap = self.stripe.config.load_full();
        let prices = &self.stripe.settings.prices;
        if facts.price_ids.iter().any(|p| {
            snap.config
                .plan_for_price(prices, p)
                .is_some_and(|p| p.name == offered.plan)
        }) {
            return Err(BillingError::PlanUnchanged(offered.plan));
        }
        // The item carrying a plan's price is the one swapped; other items (add-ons) stay.
        let items = sub
            .pointer("/items/data")
            .and_then(|d| d.as_array())
            .cloned()
            .unwrap_or_default();
        let item = items
            .iter()
            .find(|i| {
                i.pointer("/price/id")
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| snap.config.plan_for_price(prices, p).is_some())
            })
            .or(items.first())
            .and_then(|i| i.get("id"))
            .and_then(|i| i.as_str())
            .ok_or(BillingError::NoSubscription)?;
        let key = self.key();
        let form: Vec<(String, String)> = vec![
            ("items[0][id]".into(), item.into()),
            ("items[0][price]".into(), offered.price),
            (
                "proration_behavior".into(),
                self.stripe.settings.proration_behavior.clone(),
            ),
            (format!("metadata[{key}]"), customer.into()),
        ];
        let updated = api.update_subscription(&facts.id, &form).await?;
        self.apply(customer, &updated, "billing.change_plan", who)
            .await
    }

    async fn cancel(
        &self,
        customer: &str,
        now: bool,
        who: Who<'_>,
    ) -> Result<Change, BillingError> {
        if now && !who.operator && !self.stripe.settings.allow_cancel_now {
            return Err(BillingError::Invalid {
                key: "now",
                detail: "ending a subscription at once is not offered here; without now=true it ends at the period's end".into(),
            });
        }
        let api = self.api()?;
        let cus = self
            .stripe_customer(customer)
            .await?
            .ok_or(BillingError::NoSubscription)?;
        let sub = self
            .live_subscription(api, &cus)
            .await?
            .ok_or(BillingError::NoSubscription)?;
        let id = subscription_facts(&sub, self.key()).id;
        let updated = if now {
            api.cancel_subscription(&id).await?
        } else {
            let form = vec![("cancel_at_period_end".to_string(), "true".to_string())];
            api.update_subscription(&id, &form).await?
        };
        let change = self
            .apply(customer, &updated, "billing.cancel", who)
            .await?;
        if now && change.status != Status::Canceled.as_str() {
            tracing::warn!(%customer, subscription = %id, status = %change.status, "cancellation answered a status other than canceled");
        }
        Ok(change)
    }
}
