//! Upstream pools: round-robin over each upstream's targets (pingora's load balancer), with an
//! optional TCP health check so a dead target stops receiving traffic, and the TLS material of
//! an HTTPS upstream.
//!
//! Owns: turning `[upstreams.*]` into selectable peers. Must not touch: requests or charges.

use crate::config::{ConfigError, ConfigErrors, Upstream};
use crate::tls::{peer_tls, PeerTls};
use pingora::lb::{health_check::TcpHealthCheck, selection::RoundRobin, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::services::background::{background_service, GenBackgroundService};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A background service running one pool's health checks.
pub type HealthCheck = GenBackgroundService<LoadBalancer<RoundRobin>>;

#[derive(Clone)]
pub struct Pool {
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// `Host` to send upstream, if the operator set one.
    pub host: Option<String>,
    /// Set for an HTTPS upstream.
    pub tls: Option<Arc<PeerTls>>,
}

impl Pool {
    /// A peer for `addr`, plain or HTTPS as the upstream says.
    pub fn peer(&self, addr: impl std::net::ToSocketAddrs) -> HttpPeer {
        match &self.tls {
            None => HttpPeer::new(addr, false, String::new()),
            Some(t) => {
                let mut peer = HttpPeer::new(addr, true, t.sni.clone());
                peer.options.ca = t.ca.clone();
                peer.client_cert_key = t.client.clone();
                peer
            }
        }
    }
}

fn targets(name: &str, u: &Upstream) -> Result<LoadBalancer<RoundRobin>, ConfigError> {
    LoadBalancer::<RoundRobin>::try_from_iter(u.targets.iter().map(String::as_str)).map_err(|e| {
        ConfigError {
            key: format!("upstreams.{name}.targets"),
            message: format!("cannot resolve: {e}"),
        }
    })
}

fn tls(name: &str, u: &Upstream) -> Result<Option<Arc<PeerTls>>, ConfigError> {
    u.tls
        .as_ref()
        .map(|t| peer_tls(name, t).map(Arc::new))
        .transpose()
}

/// Pools by upstream name, plus the background services that run their health checks (to be
/// added to the pingora server; a pool without health checks needs none).
pub fn build(
    upstreams: &BTreeMap<String, Upstream>,
) -> Result<(BTreeMap<String, Pool>, Vec<HealthCheck>), ConfigErrors> {
    let mut pools = BTreeMap::new();
    let mut services = Vec::new();
    let mut errors = Vec::new();
    for (name, u) in upstreams {
        let (mut lb, tls) = match (targets(name, u), tls(name, u)) {
            (Ok(lb), Ok(tls)) => (lb, tls),
            (lb, tls) => {
                errors.extend(lb.err());
                errors.extend(tls.err());
                continue;
            }
        };
        let lb = match u.health_check {
            Some(every) => {
                lb.set_health_check(TcpHealthCheck::new());
                lb.health_check_frequency = Some(every);
                let svc = background_service(&format!("health check {name}"), lb);
                let lb = svc.task();
                services.push(svc);
                lb
            }
            None => Arc::new(lb),
        };
        pools.insert(
            name.clone(),
            Pool {
                lb,
                host: u.host.clone(),
                tls,
            },
        );
    }
    if errors.is_empty() {
        Ok((pools, services))
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A pool for an upstream that a live config change added or changed. pingora's background
/// services are fixed when the server starts, so its health check (if any) runs as a task on the
/// current runtime instead, until the pool is dropped (the last snapshot using it is gone).
///
/// Resolving a target that is a host name blocks on DNS, and TLS files are read (admin path
/// only, never per request).
pub fn build_live(name: &str, u: &Upstream) -> Result<Pool, ConfigError> {
    let mut lb = targets(name, u)?;
    let tls = tls(name, u)?;
    if u.health_check.is_some() {
        lb.set_health_check(TcpHealthCheck::new());
    }
    let lb = Arc::new(lb);
    if let Some(every) = u.health_check {
        let weak = Arc::downgrade(&lb);
        tokio::spawn(async move {
            while let Some(lb) = weak.upgrade() {
                lb.backends().run_health_check(false).await;
                drop(lb);
                tokio::time::sleep(every).await;
            }
        });
    }
    Ok(Pool {
        lb,
        host: u.host.clone(),
        tls,
    })
}
