//! Limits on client connections, before a request exists: a cap on the connections one client IP
//! holds open at once (`proxy.max_connections_per_ip`; one over the cap is closed at once,
//! before anything is read from it), and a deadline for a new connection's first request head
//! (`proxy.header_read_timeout`; pingora bounds each read, not the head, so a client trickling
//! a byte at a time would hold its connection forever). Together they keep one client from
//! tying up the listener with thousands of idle or half-sent heads.
//!
//! Wraps pingora's proxy app: a connection is counted for as long as the app serves it (its
//! keep-alive requests included). [`Heads`] is how the request path says a connection's first
//! head arrived. Owns: the per-IP counts, the connections awaiting their first head. Must not
//! touch: requests.

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Connections (by client address) that have not sent a complete request head yet. Shared by
/// [`PerIpCap`] (which adds them) and the request path (which removes one when its head is
/// parsed: one map lookup per request, a hit only on a connection's first).
#[derive(Debug, Default)]
pub struct Heads {
    waiting: DashMap<SocketAddr, ()>,
}

impl Heads {
    /// The connection from `peer` sent a complete head.
    pub fn arrived(&self, peer: Option<SocketAddr>) {
        if let Some(peer) = peer {
            self.waiting.remove(&peer);
        }
    }
}

pub struct PerIpCap<A> {
    inner: Arc<A>,
    cap: usize,
    open: DashMap<IpAddr, usize>,
    refused: prometheus::IntCounter,
    /// Deadline of a connection's first head (`None`: none).
    head_timeout: Option<Duration>,
    heads: Arc<Heads>,
    timed_out: prometheus::IntCounter,
}

/// What [`PerIpCap`] counts.
pub struct Counters {
    /// Connections refused over the per-IP cap.
    pub refused: prometheus::IntCounter,
    /// Connections closed for not sending their first head in time.
    pub timed_out: prometheus::IntCounter,
}

impl<A> PerIpCap<A> {
    /// `cap` connections per IP at once (0: no cap); a first head within `head_timeout`
    /// (zero: no deadline), reported through `heads`.
    pub fn new(
        inner: A,
        cap: usize,
        head_timeout: Duration,
        heads: Arc<Heads>,
        counters: Counters,
    ) -> PerIpCap<A> {
        PerIpCap {
            inner: Arc::new(inner),
            cap,
            open: DashMap::new(),
            refused: counters.refused,
            head_timeout: (!head_timeout.is_zero()).then_some(head_timeout),
            heads,
            timed_out: counters.timed_out,
        }
    }

    /// Counts a connection from `ip`, or `false` when the IP is at the cap.
    fn enter(&self, ip: IpAddr) -> bool {
        let mut n = self.open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        self.open.remove_if_mut(&ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// Connections open from `ip` (tests).
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).map_or(0, |n| *n)
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for PerIpCap<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = session
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let ip = peer.map(|p| p.ip()).filter(|_| self.cap > 0);
        if let Some(ip) = ip {
            if !self.enter(ip) {
                self.refused.inc();
                tracing::debug!(%ip, cap = self.cap, "connection refused: too many from this address");
                return None;
            }
        }
        let reuse = match (self.head_timeout, peer) {
            (Some(deadline), Some(peer)) => {
                self.heads.waiting.insert(peer, ());
                let serve = self.inner.process_new(session, shutdown);
                let expire = async {
                    tokio::time::sleep(deadline).await;
                    if self.heads.waiting.remove(&peer).is_none() {
                        std::future::pending::<()>().await; // the head came in time
                    }
                    // Counted here, before the select drops the app's future (which closes
                    // the connection): whoever sees the close sees the count.
                    self.timed_out.inc();
                    tracing::debug!(%peer, deadline_ms = deadline.as_millis() as u64, "connection closed: no request head in time");
                };
                tokio::select! {
                    reuse = serve => {
                        self.heads.waiting.remove(&peer);
                        reuse
                    }
                    () = expire => None,
                }
            }
            _ => self.inner.process_new(session, shutdown).await,
        };
        if let Some(ip) = ip {
            self.leave(ip);
        }
        reuse
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts up to the cap per IP, other IPs apart, and frees a slot when one leaves.
    #[test]
    fn counts_per_ip_up_to_the_cap() {
        let counter = || prometheus::IntCounter::new("t", "t").expect("counter");
        let cap = PerIpCap::new(
            (),
            2,
            Duration::ZERO,
            Arc::default(),
            Counters {
                refused: counter(),
                timed_out: counter(),
            },
        );
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        assert!(cap.enter(a) && cap.enter(a));
        assert!(!cap.enter(a));
        assert!(cap.enter(b));
        cap.leave(a);
        assert!(cap.enter(a));
        cap.leave(a);
        cap.leave(a);
        assert_eq!(cap.open_from(a), 0);
        assert!(
            cap.open.get(&a).is_none(),
            "an IP with nothing open is forgotten"
        );
    }
}
