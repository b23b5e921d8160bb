//! TLS on pingora's rustls stack: the process's crypto provider, what an HTTPS upstream's peers
//! carry (server name, extra trusted CAs, client certificate), and the proxy listener's
//! certificate, swapped on SIGHUP while connections stay up.
//!
//! Owns: reading PEM files into the forms rustls and pingora take, and checking them before
//! pingora sees them (pingora panics on a certificate it cannot parse). Must not touch:
//! requests, config validation (it is handed validated paths).

use crate::config::{ConfigError, ListenerTls, UpstreamTls};
use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;

/// Makes aws-lc-rs the process's rustls provider before pingora installs its own (ring), so one
/// provider does all the crypto. Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    // Each one parses as X.509 (what pingora's own parser would otherwise panic on).
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store.add(c.clone()).map_err(|e| {
            format!(
                "{}: certificate {} is not valid: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_certs(cert)?;
    let der = read_key(key)?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{} does not match the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ck)
}

/// What every peer of an HTTPS upstream carries.
#[derive(Clone)]
pub struct PeerTls {
    /// Sent as SNI and verified against the certificate.
    pub sni: String,
    /// Trusted CAs when `ca_file` is set: the system's roots plus the file's (pingora takes a
    /// peer's list instead of its default one, so the roots are copied in).
    pub ca: Option<Arc<CaType>>,
    pub client: Option<Arc<CertKey>>,
}

/// Reads an upstream's TLS files; an error names the key of the file that is wrong.
pub fn peer_tls(upstream: &str, t: &UpstreamTls) -> Result<PeerTls, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        key: format!("upstreams.{upstream}.{key}"),
        message,
    };
    let ca = match &t.ca_file {
        None => None,
        Some(path) => {
            let extra = read_certs(path).map_err(|m| err("ca_file", m))?;
            let mut all: Vec<Vec<u8>> = pingora::tls::load_native_certs()
                .map(|roots| roots.into_iter().map(|c| c.to_vec()).collect())
                .unwrap_or_default();
            all.extend(extra.iter().map(|c| c.to_vec()));
            let list: Vec<WrappedX509> = all
                .into_iter()
                .map(|der| WrappedX509::new(der, parse_x509))
                .collect();
            Some(Arc::from(list.into_boxed_slice()))
        }
    };
    let client = match &t.client_cert {
        None => None,
        Some((cert, key)) => {
            let ck = certified_key(cert, key).map_err(|m| err("client_cert_file", m))?;
            let der = read_key(key).map_err(|m| err("client_key_file", m))?;
            let chain = ck.cert.iter().map(|c| c.to_vec()).collect();
            Some(Arc::new(CertKey::new(chain, der.secret_der().to_vec())))
        }
    };
    Ok(PeerTls {
        sni: t.sni.clone(),
        ca,
        client,
    })
}

/// The proxy listener's certificate: read at start, swapped by [`ListenerCert::reload`]. New
/// handshakes get the new one; connections already up keep theirs.
#[derive(Debug)]
pub struct ListenerCert {
    files: ListenerTls,
    current: ArcSwap<CertifiedKey>,
}

impl ListenerCert {
    pub fn load(files: &ListenerTls) -> Result<Arc<ListenerCert>, ConfigError> {
        let ck =
            certified_key(&files.cert_file, &files.key_file).map_err(|message| ConfigError {
                key: "proxy.tls.cert_file".into(),
                message,
            })?;
        Ok(Arc::new(ListenerCert {
            files: files.clone(),
            current: ArcSwap::from_pointee(ck),
        }))
    }

    /// Reads the files again; on an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let ck = certified_key(&self.files.cert_file, &self.files.key_file)?;
        self.current.store(Arc::new(ck));
        Ok(())
    }

    /// pingora's listener settings: this certificate, HTTP/2 offered first over ALPN.
    pub fn settings(self: &Arc<Self>) -> pingora::Result<TlsSettings> {
        let mut s = TlsSettings::intermediate("", "")?;
        s.set_cert_resolver(self.clone());
        s.enable_h2();
        Ok(s)
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads every TLS file `config` names, as `serve` will: what check-config reports beyond the
/// rules of the document itself.
pub fn check(config: &crate::config::Config) -> Vec<ConfigError> {
    install_provider();
    let mut errors: Vec<ConfigError> = config
        .upstreams
        .iter()
        .filter_map(|(name, u)| u.tls.as_ref().and_then(|t| peer_tls(name, t).err()))
        .collect();
    if let Some(files) = &config.proxy.tls {
        errors.extend(ListenerCert::load(files).err());
    }
    errors
}
