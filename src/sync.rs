//! Entitlement sync across instances sharing one Redis and one ledger.
//!
//! The ledger is the truth; every instance keeps all entitlements in process (the request path
//! never waits for them). A writer (the admin API today, Stripe sync later) writes the ledger,
//! then publishes the customer id on `{prefix}:entitlements`. Every instance reloads that customer
//! from the ledger. Missed messages (Redis down, subscriber reconnecting) are repaired by a full
//! reload on every (re)subscribe and every `FULL_RELOAD` anyway.
//!
//! Runs on the control runtime. Must not touch: the request path, quota counters.

use crate::entitle::Entitlements;
use crate::ledger::Ledger;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OnceCell};

const FULL_RELOAD: Duration = Duration::from_secs(60);

pub struct EntitlementSync {
    client: redis::Client,
    channel: String,
    /// Reconnects after Redis restarts (a plain multiplexed connection stays dead, and every
    /// later change would reach other instances only through the 60 s full reload).
    publisher: OnceCell<redis::aio::ConnectionManager>,
}

// === impl EntitlementSync ===

impl EntitlementSync {
    pub fn new(redis_url: &str, prefix: &str) -> redis::RedisResult<EntitlementSync> {
        Ok(EntitlementSync {
            client: redis::Client::open(redis_url)?,
            channel: format!("{prefix}:entitlements"),
            publisher: OnceCell::new(),
        })
    }

    /// Tells every instance that `customer` changed in the ledger. One retry: the call that
    /// finds the connection broken fails and makes the manager reconnect.
    pub async fn publish(&self, customer: &str) -> redis::RedisResult<()> {
        let conn = self
            .publisher
            .get_or_try_init(|| self.client.get_connection_manager())
            .await?;
        let mut conn = conn.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.channel).arg(customer);
        let first: redis::RedisResult<i64> = publish.query_async(&mut conn).await;
        if first.is_err() {
            let _: i64 = publish.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Keeps `cache` in step with the ledger until `stop` is notified.
    pub async fn run(
        self: Arc<Self>,
        ledger: Arc<dyn Ledger>,
        cache: Arc<Entitlements>,
        stop: Arc<Notify>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = stop.notified() => return,
                r = self.subscribe_and_follow(&ledger, &cache) => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "entitlement sync lost its subscription; retrying");
                    }
                }
            }
            tokio::select! {
                _ = stop.notified() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe_and_follow(
        &self,
        ledger: &Arc<dyn Ledger>,
        cache: &Entitlements,
    ) -> anyhow::Result<()> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        // Anything published while we were not listening is in the ledger: reload it all.
        reload_all(ledger, cache).await;
        let mut messages = pubsub.on_message();
        let mut tick = tokio::time::interval(FULL_RELOAD);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { anyhow::bail!("subscription closed") };
                    let customer: String = msg.get_payload()?;
                    match ledger.get_customer(&customer).await {
                        Ok(Some(e)) => cache.put(&customer, e),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, %customer, "could not reload entitlement"),
                    }
                }
                _ = tick.tick() => reload_all(ledger, cache).await,
            }
        }
    }
}

async fn reload_all(ledger: &Arc<dyn Ledger>, cache: &Entitlements) {
    match ledger.all_customers().await {
        Ok(all) => {
            for (id, e) in all {
                cache.put(&id, e);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not reload entitlements"),
    }
}
