//! Forwarded headers: who the client is, and what the upstream is told about it.
//!
//! The upstream gets `X-Forwarded-For` (the chain with the connecting address appended),
//! `X-Forwarded-Proto` (`https` on the TLS listener, else `http`) and `X-Forwarded-Host` (the
//! `Host` the client asked for, before `upstreams.*.host` replaces it). What a client sends
//! in these headers is kept only when the connecting address is one of `proxy.trusted_proxies`
//! (a load balancer in front); from anyone else it is replaced, so a caller cannot make the
//! upstream believe it is someone else. The client IP of the access log is the connecting
//! address, or, behind trusted proxies, the nearest address in the chain that is not one.
//!
//! Owns: reading and writing those three headers. Must not touch: routing, charges.

use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::Result;
use std::net::IpAddr;

pub const XFF: &str = "x-forwarded-for";
pub const XFP: &str = "x-forwarded-proto";
pub const XFH: &str = "x-forwarded-host";

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    !proxies.is_empty() && proxies.iter().any(|n| n.contains(&ip))
}

/// Every `X-Forwarded-For` value of the request, joined as one list (`None` when absent).
fn incoming_chain(req: &RequestHeader) -> Option<String> {
    let mut chain: Option<String> = None;
    for v in req.headers.get_all(XFF) {
        let v = String::from_utf8_lossy(v.as_bytes());
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        match &mut chain {
            None => chain = Some(v.to_owned()),
            Some(c) => {
                c.push_str(", ");
                c.push_str(v);
            }
        }
    }
    chain
}

/// The client's address: `peer`, unless `peer` is a trusted proxy; then the rightmost address
/// of the chain that is not one (the leftmost is whatever the client claimed).
pub fn client_ip(peer: Option<IpAddr>, req: &RequestHeader, proxies: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted(peer, proxies) {
        return Some(peer);
    }
    let Some(chain) = incoming_chain(req) else {
        return Some(peer);
    };
    let mut client = peer;
    for hop in chain.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted(ip, proxies) {
                    break;
                }
            }
            Err(_) => break, // not an address: the chain is not to be read further
        }
    }
    Some(client)
}

/// Sets the three headers on the request going upstream (call before `Host` is replaced).
pub fn apply(
    up: &mut RequestHeader,
    peer: Option<IpAddr>,
    proxies: &[IpNet],
    tls: bool,
) -> Result<()> {
    let keep = peer.is_some_and(|p| trusted(p, proxies));
    let chain = if keep { incoming_chain(up) } else { None };
    let xff = match (chain, peer) {
        (Some(c), Some(p)) => format!("{c}, {p}"),
        (Some(c), None) => c,
        (None, Some(p)) => p.to_string(),
        (None, None) => String::new(),
    };
    if xff.is_empty() {
        up.remove_header(XFF);
    } else {
        up.insert_header(XFF, xff)?;
    }
    if !(keep && up.headers.contains_key(XFP)) {
        up.insert_header(XFP, if tls { "https" } else { "http" })?;
    }
    if !(keep && up.headers.contains_key(XFH)) {
        let host = up
            .headers
            .get(http::header::HOST)
            .map(|h| h.as_bytes().to_vec())
            .or_else(|| up.uri.authority().map(|a| a.as_str().as_bytes().to_vec()));
        match host {
            Some(h) => up.insert_header(XFH, h)?,
            None => {
                up.remove_header(XFH);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(xff: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.insert_header("host", "api.example.com").unwrap();
        for v in xff {
            r.append_header(XFF, *v).unwrap();
        }
        r
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let lb = nets(&["10.0.0.0/8"]);
        let r = req(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &r, &lb), ip("1.2.3.4"));
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(client_ip(ip("9.9.9.9"), &r, &lb), ip("9.9.9.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), &r, &[]), ip("10.0.0.1"));
        // Garbage in the chain stops the walk at the last address read.
        let r = req(&["1.2.3.4, junk, 10.0.0.9"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &r, &lb), ip("10.0.0.9"));
    }

    #[test]
    fn an_untrusted_chain_is_replaced_a_trusted_one_extended() {
        let lb = nets(&["10.0.0.0/8"]);
        let mut r = req(&["6.6.6.6"]);
        r.insert_header(XFP, "https").unwrap();
        r.insert_header(XFH, "evil.example").unwrap();
        let mut untrusted = r.clone();
        apply(&mut untrusted, ip("9.9.9.9"), &lb, false).unwrap();
        let h = |r: &RequestHeader, k: &str| r.headers.get(k).unwrap().to_str().unwrap().to_owned();
        assert_eq!(h(&untrusted, XFF), "9.9.9.9");
        assert_eq!(h(&untrusted, XFP), "http");
        assert_eq!(h(&untrusted, XFH), "api.example.com");
        let mut kept = r.clone();
        apply(&mut kept, ip("10.1.2.3"), &lb, false).unwrap();
        assert_eq!(h(&kept, XFF), "6.6.6.6, 10.1.2.3");
        assert_eq!(h(&kept, XFP), "https");
        assert_eq!(h(&kept, XFH), "evil.example");
        assert_eq!(kept.headers.get_all(XFF).iter().count(), 1);
    }
}
