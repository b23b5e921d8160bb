//! Upstream pools: round-robin over each upstream's targets (pingora's load balancer), with an
//! optional TCP health check so a dead target stops receiving traffic.
//!
//! Owns: turning `[upstreams.*]` into selectable peers. Must not touch: requests or charges.

use crate::config::Upstream;
use pingora::lb::{health_check::TcpHealthCheck, selection::RoundRobin, LoadBalancer};
use pingora::services::background::{background_service, GenBackgroundService};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A background service running one pool's health checks.
pub type HealthCheck = GenBackgroundService<LoadBalancer<RoundRobin>>;

pub struct Pool {
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// `Host` to send upstream, if the operator set one.
    pub host: Option<String>,
}

/// Pools by upstream name, plus the background services that run their health checks (to be
/// added to the pingora server; a pool without health checks needs none).
pub fn build(
    upstreams: &BTreeMap<String, Upstream>,
) -> std::io::Result<(BTreeMap<String, Pool>, Vec<HealthCheck>)> {
    let mut pools = BTreeMap::new();
    let mut services = Vec::new();
    for (name, u) in upstreams {
        let mut lb =
            LoadBalancer::<RoundRobin>::try_from_iter(u.targets.iter().map(String::as_str))?;
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
            },
        );
    }
    Ok((pools, services))
}

/// A pool for an upstream that a live config change added or changed. pingora's background
/// services are fixed when the server starts, so its health check (if any) runs as a task on the
/// current runtime instead, until the pool is dropped (the last snapshot using it is gone).
///
/// Resolving a target that is a host name blocks on DNS (admin path only, never per request).
pub fn build_live(u: &Upstream) -> std::io::Result<Pool> {
    let mut lb = LoadBalancer::<RoundRobin>::try_from_iter(u.targets.iter().map(String::as_str))?;
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
    })
}
