//! The keys of the proxy's edges: TLS (`[upstreams.*]` `tls`, `sni`, `ca_file`,
//! `client_cert_file`/`client_key_file`, and `proxy.tls`) and `proxy.trusted_proxies`. TLS keys
//! are paths only; the files are read (and their errors keyed) where the TLS material is built
//! (`crate::tls`), which check-config also runs.

use super::super::raw::{RawListenerTls, RawUpstream};
use super::super::{ListenerTls, UpstreamTls};
use super::Validator;
use std::path::PathBuf;

/// `host[:port]` → `host` (`[v6]:port` → `v6`).
fn host_part(s: &str) -> &str {
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => s,
    }
}

impl Validator {
    pub(super) fn upstream_tls(&mut self, name: &str, u: &RawUpstream) -> Option<UpstreamTls> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        if !u.tls.unwrap_or(false) {
            let set = [
                ("sni", u.sni.is_some()),
                ("ca_file", u.ca_file.is_some()),
                ("client_cert_file", u.client_cert_file.is_some()),
                ("client_key_file", u.client_key_file.is_some()),
            ];
            for (k, _) in set.iter().filter(|(_, set)| *set) {
                self.err(key(k), "only used with tls = true");
            }
            return None;
        }
        let named = u.sni.clone().or_else(|| {
            u.host
                .as_deref()
                .map(host_part)
                .or_else(|| u.targets.first().map(|t| host_part(t)))
                .filter(|h| h.parse::<std::net::IpAddr>().is_err())
                .map(str::to_owned)
        });
        let sni = match named {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                self.err(key("sni"), "must not be empty");
                String::new()
            }
            None => {
                self.err(
                    key("sni"),
                    "required with tls = true when no host is set and the first target is an IP address (the name the certificate is checked against)",
                );
                String::new()
            }
        };
        let client_cert = match (&u.client_cert_file, &u.client_key_file) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => {
                self.err(key("client_key_file"), "required with client_cert_file");
                None
            }
            (None, Some(_)) => {
                self.err(key("client_cert_file"), "required with client_key_file");
                None
            }
        };
        Some(UpstreamTls {
            sni,
            ca_file: u.ca_file.as_ref().map(PathBuf::from),
            client_cert,
        })
    }

    /// `proxy.trusted_proxies`: each an address (a /32 or /128) or a CIDR block.
    pub(super) fn trusted_proxies(&mut self, list: &[String]) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match s.parse::<ipnet::IpNet>() {
                Ok(n) => out.push(n.trunc()),
                Err(_) => match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => out.push(ipnet::IpNet::from(ip)),
                    Err(_) => self.err(
                        format!("proxy.trusted_proxies[{i}]"),
                        format!("not an IP address or CIDR block: {s:?}"),
                    ),
                },
            }
        }
        out
    }

    pub(super) fn listener_tls(&mut self, t: Option<&RawListenerTls>) -> Option<ListenerTls> {
        let t = t?;
        match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => Some(ListenerTls {
                cert_file: c.into(),
                key_file: k.into(),
            }),
            (c, k) => {
                if c.is_none() {
                    self.err("proxy.tls.cert_file", "required");
                }
                if k.is_none() {
                    self.err("proxy.tls.key_file", "required");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::Config;

    fn errors(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Ok(_) => vec![],
            Err(e) => {
                e.0.iter()
                    .map(|e| format!("{}: {}", e.key, e.message))
                    .collect()
            }
        }
    }

    const BASE: &str = r#"
[auth]
algorithms = ["HS256"]
secret_env = "S"
[meters.api_calls]
[[routes]]
match = "GET /a"
upstream = "api"
[plans.free]
default = true
quotas.api_calls = { included = 5 }
"#;

    #[test]
    fn sni_comes_from_sni_then_host_then_a_named_target() {
        let sni = |up: &str| {
            let c = Config::from_toml(&format!("{BASE}[upstreams.api]\n{up}")).unwrap();
            c.upstreams["api"].tls.as_ref().map(|t| t.sni.clone())
        };
        assert_eq!(sni("targets = [\"api.example.com:443\"]"), None);
        assert_eq!(
            sni("targets = [\"api.example.com:443\"]\ntls = true"),
            Some("api.example.com".into())
        );
        assert_eq!(
            sni("targets = [\"10.0.0.1:443\"]\ntls = true\nhost = \"api.example.com:8443\""),
            Some("api.example.com".into())
        );
        assert_eq!(
            sni("targets = [\"10.0.0.1:443\"]\ntls = true\nhost = \"h\"\nsni = \"s.example\""),
            Some("s.example".into())
        );
    }

    #[test]
    fn tls_keys_are_checked_with_their_paths() {
        let e = errors(&format!(
            "{BASE}[upstreams.api]\ntargets = [\"10.0.0.1:443\"]\ntls = true\nclient_cert_file = \"c.pem\"\n\
             [upstreams.plain]\ntargets = [\"10.0.0.2:80\"]\nca_file = \"ca.pem\"\n\
             [proxy.tls]\ncert_file = \"c.pem\"\n"
        ));
        assert!(
            e.iter()
                .any(|m| m.starts_with("upstreams.api.sni: required")),
            "{e:?}"
        );
        assert!(
            e.contains(
                &"upstreams.api.client_key_file: required with client_cert_file".to_string()
            ),
            "{e:?}"
        );
        assert!(
            e.contains(&"upstreams.plain.ca_file: only used with tls = true".to_string()),
            "{e:?}"
        );
        assert!(
            e.contains(&"proxy.tls.key_file: required".to_string()),
            "{e:?}"
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        let up = "[upstreams.api]\ntargets = [\"10.0.0.1:80\"]\n";
        let c = Config::from_toml(&format!(
            "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::1\"]\n{BASE}{up}"
        ))
        .unwrap();
        let nets: Vec<String> = c
            .proxy
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32", "fd00::1/128"]);
        let e = errors(&format!(
            "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.internal\"]\n{BASE}{up}"
        ));
        assert_eq!(
            e,
            ["proxy.trusted_proxies[1]: not an IP address or CIDR block: \"lb.internal\""]
        );
    }
}
