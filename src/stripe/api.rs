//! Calls to Stripe's API (async-stripe's client pointed at `stripe.api_base`): meter events,
//! subscription listing, retrieval, update and cancellation, billing portal and Checkout
//! sessions. The secret key comes only from the env var
//! named by `stripe.secret_key_env`, read as a `SecretString`.
//!
//! Requests are sent once (async-stripe's `RequestStrategy::Once`): callers decide about retries.
//! DESIGN §7: an `Idempotency-Key` reused after a 500 may replay the 500, so meter events carry
//! none (their `identifier` deduplicates them). Customer creation is the exception: its key is
//! derived from the tollgate customer, so a retry after a lost answer can never make a second
//! Stripe customer (the price: a 500 is replayed to retries for Stripe's 24 hours).

use crate::ledger::MeterReport;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

/// Per-attempt timeout of a Stripe call: a hang is a failure, retried later.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error("Stripe secret key env var {0} is unset or empty")]
    NoKey(String),
    #[error("Stripe client: {0}")]
    Client(#[from] stripe_api::StripeError),
}

/// A Stripe API client. Cheap to clone. `Debug` does not print the key.
#[derive(Clone)]
pub struct StripeApi {
    client: stripe_api::Client,
}

impl std::fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StripeApi")
    }
}

// === impl StripeApi ===

impl StripeApi {
    /// Reads the secret key from the configured env var and points the client at `api_base`.
    pub fn from_settings(s: &crate::config::StripeSettings) -> Result<StripeApi, ApiSetupError> {
        let key: SecretString = std::env::var(&s.secret_key_env)
            .ok()
            .map(|k| k.trim().into())
            .filter(|k: &SecretString| !k.expose_secret().is_empty())
            .ok_or_else(|| ApiSetupError::NoKey(s.secret_key_env.clone()))?;
        // The client keeps its own copy (it takes a `String`); ours is wiped when dropped.
        let client = stripe_api::ClientBuilder::new(key.expose_secret())
            // The client appends `v1/…` to the base as given: it needs the trailing slash.
            .url(format!("{}/", s.api_base))
            .timeout(TIMEOUT)
            .app_info("tollgate", Some(env!("CARGO_PKG_VERSION").into()), None)
            .build()?;
        Ok(StripeApi { client })
    }

    /// `POST /v1/billing/meter_events` for one report: `event_name`, `identifier`, `timestamp`,
    /// `payload[stripe_customer_id]`, `payload[value]` (a whole number).
    pub async fn meter_event(
        &self,
        r: &MeterReport,
    ) -> Result<stripe_billing::BillingMeterEvent, stripe_api::StripeError> {
        use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
        let payload: std::collections::HashMap<String, String> = [
            ("stripe_customer_id".to_string(), r.stripe_customer.clone()),
            ("value".to_string(), r.value.to_string()),
        ]
        .into_iter()
        .collect();
        CreateBillingMeterEvent::new(r.event_name.clone(), payload)
            .identifier(r.identifier.clone())
            .timestamp(r.ts.timestamp())
            .send(&self.client)
            .await
    }

    /// One page of `GET /v1/subscriptions?status=all`, as raw JSON (read like a webhook's
    /// object, whatever the API version).
    pub async fn list_subscriptions(
        &self,
        limit: &str,
        starting_after: Option<&str>,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::{RequestBuilder, StripeMethod};
        // A map: the query encoder takes structs and maps only.
        let mut query = std::collections::BTreeMap::from([("status", "all"), ("limit", limit)]);
        if let Some(a) = starting_after {
            query.insert("starting_after", a);
        }
        let page: miniserde::json::Value = RequestBuilder::new(StripeMethod::Get, "/subscriptions")
            .query(&query)
            .customize()
            .send(&self.client)
            .await?;
        serde_json::from_str(&miniserde::json::to_string(&page))
            .map_err(|e| stripe_api::StripeError::JSONDeserialize(e.to_string()))
    }

    /// `GET /v1/subscriptions/{id}`, as raw JSON (read like a webhook's object). `id` is a path
    /// segment: anything but a plain Stripe id (`sub_` and alphanumerics) is refused unsent.
    pub async fn subscription(
        &self,
        id: &str,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::{RequestBuilder, StripeMethod};
        check_id(id)?;
        let sub: miniserde::json::Value =
            RequestBuilder::new(StripeMethod::Get, format!("/subscriptions/{id}"))
                .customize()
                .send(&self.client)
                .await?;
        serde_json::from_str(&miniserde::json::to_string(&sub))
            .map_err(|e| stripe_api::StripeError::JSONDeserialize(e.to_string()))
    }

    /// A call whose answer is read as raw JSON (like a webhook's object, whatever the API
    /// version): `form` is sent form-encoded (keys already in Stripe's bracket form,
    /// `line_items[0][price]`), `query` as the query string, with `Idempotency-Key:
    /// idempotency_key` when given (Stripe answers a repeat with the first answer).
    async fn raw(
        &self,
        method: stripe_client_core::StripeMethod,
        path: String,
        query: &[(&str, &str)],
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::RequestBuilder;
        let mut req = RequestBuilder::new(method, path);
        if !query.is_empty() {
            let q: std::collections::BTreeMap<&str, &str> = query.iter().copied().collect();
            req = req.query(&q);
        }
        if !form.is_empty() {
            let f: std::collections::BTreeMap<&str, &str> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            req = req.form(&f);
        }
        let mut req = req.customize();
        if let Some(k) = idempotency_key {
            let key = stripe_client_core::IdempotencyKey::new(k)
                .map_err(|e| stripe_api::StripeError::ClientError(e.to_string()))?;
            req = req.request_strategy(stripe_client_core::RequestStrategy::Idempotent(key));
        }
        let v: miniserde::json::Value = req.send(&self.client).await?;
        serde_json::from_str(&miniserde::json::to_string(&v))
            .map_err(|e| stripe_api::StripeError::JSONDeserialize(e.to_string()))
    }

    /// `POST /v1/checkout/sessions` with these fields: the session (`id`, `url`, …).
    pub async fn checkout_session(
        &self,
        form: &[(String, String)],
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::StripeMethod;
        self.raw(
            StripeMethod::Post,
            "/checkout/sessions".into(),
            &[],
            form,
            None,
        )
        .await
    }

    /// The newest subscriptions of a Stripe customer (`GET /v1/subscriptions?customer=…`,
    /// every status), as raw JSON.
    pub async fn customer_subscriptions(
        &self,
        stripe_customer: &str,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::StripeMethod;
        let q = [
            ("customer", stripe_customer),
            ("status", "all"),
            ("limit", "20"),
        ];
        self.raw(StripeMethod::Get, "/subscriptions".into(), &q, &[], None)
            .await
    }

    /// `POST /v1/subscriptions/{id}` with these fields: the subscription as it is now.
    pub async fn update_subscription(
        &self,
        id: &str,
        form: &[(String, String)],
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::StripeMethod;
        check_id(id)?;
        self.raw(
            StripeMethod::Post,
            format!("/subscriptions/{id}"),
            &[],
            form,
            None,
        )
        .await
    }

    /// `DELETE /v1/subscriptions/{id}`: ends it now; the subscription as it is then.
    pub async fn cancel_subscription(
        &self,
        id: &str,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::StripeMethod;
        check_id(id)?;
        self.raw(
            StripeMethod::Delete,
            format!("/subscriptions/{id}"),
            &[],
            &[],
            None,
        )
        .await
    }

    /// `POST /v1/customers` with these fields under `idempotency_key`: the customer.
    pub async fn create_customer(
        &self,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<serde_json::Value, stripe_api::StripeError> {
        use stripe_client_core::StripeMethod;
        self.raw(
            StripeMethod::Post,
            "/customers".into(),
            &[],
            form,
            Some(idempotency_key),
        )
        .await
    }

    /// `POST /v1/billing_portal/sessions` for a Stripe customer: the session's id and URL.
    pub async fn portal_session(
        &self,
        stripe_customer: &str,
        return_url: Option<&str>,
    ) -> Result<(String, String), stripe_api::StripeError> {
        use stripe_billing::billing_portal_session::CreateBillingPortalSession;
        let mut req = CreateBillingPortalSession::new().customer(stripe_customer);
        if let Some(u) = return_url {
            req = req.return_url(u);
        }
        let session = req.send(&self.client).await?;
        Ok((session.id.to_string(), session.url))
    }
}

/// A Stripe id used as a path segment: anything but `sub_`-like alphanumerics is refused unsent.
fn check_id(id: &str) -> Result<(), stripe_api::StripeError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(stripe_api::StripeError::ClientError(format!(
            "not a Stripe id: {id:?}"
        )));
    }
    Ok(())
}
