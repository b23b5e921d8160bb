//! A cap on the connections one client IP holds open at once (`proxy.max_connections_per_ip`),
//! so one client cannot tie up the listener with thousands of idle or half-sent heads. A
//! connection over the cap is closed at once, before anything is read from it.
//!
//! Wraps pingora's proxy app: a connection is counted for as long as the app serves it (its
//! keep-alive requests included). Owns: the per-IP counts. Must not touch: requests.

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::net::IpAddr;
use std::sync::Arc;

pub struct PerIpCap<A> {
    inner: Arc<A>,
    cap: usize,
    open: DashMap<IpAddr, usize>,
    refused: prometheus::IntCounter,
}

impl<A> PerIpCap<A> {
    /// `cap` connections per IP at once (0: no cap); refusals counted in `refused`.
    pub fn new(inner: A, cap: usize, refused: prometheus::IntCounter) -> PerIpCap<A> {
        PerIpCap {
            inner: Arc::new(inner),
            cap,
            open: DashMap::new(),
            refused,
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
        let ip = session
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let Some(ip) = ip.filter(|_| self.cap > 0) else {
            return self.inner.process_new(session, shutdown).await;
        };
        if !self.enter(ip) {
            self.refused.inc();
            tracing::debug!(%ip, cap = self.cap, "connection refused: too many from this address");
            return None;
        }
        let reuse = self.inner.process_new(session, shutdown).await;
        self.leave(ip);
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
        let cap = PerIpCap::new(
            (),
            2,
            prometheus::IntCounter::new("t", "t").expect("counter"),
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
