//! One Redis pub/sub follower for everything an instance keeps in step with the ledger (live
//! config versions, entitlement changes).
//!
//! The ledger is the truth; a message only says "something changed, look". So a follower:
//! 1. subscribes, then **resyncs** (anything published while it was not listening is in the
//!    ledger), on every (re)subscribe;
//! 2. handles each message as it comes;
//! 3. resyncs again every `catch_up` anyway (a message can be lost between Redis and us);
//! 4. after a lost subscription, waits (the shared backoff) and subscribes again.
//!
//! Without Redis, only step 3 runs (instances sharing a ledger still converge).
//!
//! Owns: the Redis pub/sub connection, the publisher connection, the follow loop. Must not
//! touch: what the messages mean (the [`Follower`] decides), the ledger.

use async_trait::async_trait;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// First wait after a lost subscription; doubles per failure up to [`RESUBSCRIBE_MAX`].
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// One named channel on the Redis that the instances share.
pub struct Channel {
    client: redis::Client,
    name: String,
    /// Reconnects after Redis restarts (a plain multiplexed connection stays dead, and every
    /// later change would reach other instances only through the periodic resync).
    publisher: OnceCell<redis::aio::ConnectionManager>,
}

/// What a follower does with its channel.
#[async_trait]
pub trait Follower: Send + Sync {
    /// Brings this instance up to the ledger (messages may have been missed).
    async fn resync(&self);
    /// One message's payload.
    async fn message(&self, payload: &redis::Msg);
}

// === impl Channel ===

impl Channel {
    /// `{prefix}:{topic}` on the Redis at `redis_url`. With a cluster's comma-separated node list
    /// any one node will do: in a cluster, PUBLISH reaches every node's subscribers.
    pub fn new(redis_url: &str, prefix: &str, topic: &str) -> redis::RedisResult<Channel> {
        let url = redis_url.split(',').next().unwrap_or(redis_url).trim();
        Ok(Channel {
            client: redis::Client::open(url)?,
            name: format!("{prefix}:{topic}"),
            publisher: OnceCell::new(),
        })
    }

    /// Tells every instance. One retry: the call that finds the connection broken fails and
    /// makes the manager reconnect, so a publish right after a Redis restart still arrives.
    pub async fn publish<T: redis::ToRedisArgs + Send + Sync>(
        &self,
        payload: T,
    ) -> redis::RedisResult<()> {
        let conn = self
            .publisher
            .get_or_try_init(|| self.client.get_connection_manager())
            .await?;
        let mut conn = conn.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.name).arg(payload);
        let first: redis::RedisResult<i64> = publish.query_async(&mut conn).await;
        if first.is_err() {
            let _: i64 = publish.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Instances subscribed to this channel (`PUBSUB NUMSUB`), i.e. how many share this Redis.
    /// On a cluster, the subscribers of the node asked.
    pub async fn subscribers(&self) -> redis::RedisResult<u32> {
        let conn = self
            .publisher
            .get_or_try_init(|| self.client.get_connection_manager())
            .await?;
        let mut conn = conn.clone();
        let (_, n): (String, u32) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&self.name)
            .query_async::<Vec<(String, u32)>>(&mut conn)
            .await?
            .pop()
            .unwrap_or_default();
        Ok(n)
    }

    /// Subscribed: resync, then messages and the periodic resync until the subscription ends.
    async fn subscribe(&self, follower: &dyn Follower, catch_up: Duration) -> anyhow::Result<()> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.name).await?;
        follower.resync().await;
        let mut messages = pubsub.on_message();
        let mut tick = tokio::time::interval(catch_up);
        tick.tick().await; // the first tick is now: just resynced
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { anyhow::bail!("subscription closed") };
                    follower.message(&msg).await;
                }
                _ = tick.tick() => follower.resync().await,
            }
        }
    }
}

/// Counts the instances subscribed to `channel` every `every` while Redis answers, handing each
/// count to `on_count`, until `cancel`.
pub async fn census(
    channel: Channel,
    every: Duration,
    on_count: impl Fn(u32) + Send,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let counted = tokio::time::timeout(Duration::from_secs(1), channel.subscribers()).await;
        if let Ok(Ok(n)) = counted {
            on_count(n);
        }
    }
}

/// Follows `channel` (or, without Redis, only resyncs every `catch_up`) until `cancel`.
pub async fn follow(
    channel: Option<&Channel>,
    follower: &dyn Follower,
    catch_up: Duration,
    cancel: CancellationToken,
) {
    let Some(channel) = channel else {
        let mut tick = tokio::time::interval(catch_up);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => follower.resync().await,
            }
        }
    };
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = channel.subscribe(follower, catch_up) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, channel = %channel.name, "lost the broadcast subscription; retrying");
                }
            }
        }
        failures += 1;
        let wait = crate::backoff::wait(RESUBSCRIBE_FIRST, failures, RESUBSCRIBE_MAX);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
