//! JWKS: the keys an identity provider publishes, fetched over HTTPS (or plain HTTP for local
//! use), and refetched when a token names a `kid` we do not hold.
//!
//! Owns: the JWKS HTTP client and its TLS trust (rustls on aws-lc-rs, Mozilla's roots plus
//! `auth.jwks_ca_file`), the fetch limits (5 s, 1 MiB), the single-flight refetch with its 30 s
//! cooldown, parsing a JWKS into keys (skipping, with a log line, what we cannot use: `oct` keys
//! above all, since HS secrets come only from the environment), and clearing the token cache when
//! a refetch drops a key.
//!
//! Must not touch: the request path beyond [`Jwks::refetch`] (which never holds a lock across an
//! await and never runs more than once per cooldown), the PEM keys or the HS secret.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use pkcs1::UintRef;
use serde_json::Value;
use tokio::sync::watch;

use super::cache::TokenCache;
use super::keys::{ec_point_fits, rsa_modulus_ok, AlgSet, VerifyKey};
use super::AuthSetupError;

/// Minimum time between two `kid`-triggered JWKS refetches (DESIGN §7).
const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Whole-request timeout for one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS larger than this is refused (real ones are a few KiB).
const JWKS_MAX_BYTES: usize = 1 << 20;

/// The JWKS-provided keys and the single-flight, rate-limited refetch.
pub(super) struct Jwks {
    url: String,
    /// Whether `auth.jwks_ca_file` is set (an unknown-issuer error then needs no hint about it).
    has_ca_file: bool,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    refetch: Mutex<RefetchState>,
    cooldown: Duration,
    /// The verified-token cache, cleared when a refetch drops a key.
    cache: Arc<TokenCache>,
    /// HTTP fetches attempted (initial, refetch and refresh).
    fetches: AtomicU64,
}

#[derive(Default)]
pub(super) struct KeySet {
    pub(super) keys: Vec<VerifyKey>,
    /// The JWKs the keys came from, to tell whether a refetch removed one.
    jwks: Vec<Jwk>,
}

#[derive(Default)]
struct RefetchState {
    last_started: Option<Instant>,
    /// Present while a fetch runs; callers arriving meanwhile wait on it instead of fetching.
    in_flight: Option<watch::Receiver<()>>,
}

enum RefetchAction {
    Skip,
    Wait(watch::Receiver<()>),
    Fetch(watch::Sender<()>, watch::Receiver<()>),
}

// === impl Jwks ===

impl Jwks {
    /// Checks the URL and builds the HTTP(S) client; fetches nothing yet. A bad `ca_file` is an
    /// error even when the URL is `http://` (a redirect to https would use it, and a typo should
    /// not wait for that day).
    pub(super) fn new(
        url: &str,
        ca_file: Option<&Path>,
        cache: Arc<TokenCache>,
    ) -> Result<Jwks, AuthSetupError> {
        let fail = |reason: String| AuthSetupError::Jwks {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|err| fail(format!("not a URL: {err}")))?;
        match parsed.scheme() {
            "https" => {}
            "http" if is_loopback(&parsed) => {}
            "http" => tracing::warn!(
                url = %url,
                "auth.jwks_url is plain http: whoever can tamper with the network path can \
                 substitute signing keys; use https outside local development"
            ),
            other => {
                return Err(fail(format!(
                    "scheme {other:?} is not supported (use https://, or http:// for local use)"
                )))
            }
        }
        let client = reqwest::Client::builder()
            .timeout(JWKS_TIMEOUT)
            .tls_backend_preconfigured(jwks_tls_config(url, ca_file)?)
            .build()
            .map_err(|err| fail(error_chain(&err)))?;
        Ok(Jwks {
            url: url.to_owned(),
            has_ca_file: ca_file.is_some(),
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refetch: Mutex::new(RefetchState::default()),
            cooldown: REFETCH_COOLDOWN,
            cache,
            fetches: AtomicU64::new(0),
        })
    }

    /// The configured URL.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// HTTP fetches attempted so far.
    #[cfg(test)]
    pub(super) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The current key set; the read lock is held only to clone the `Arc`.
    pub(super) fn snapshot(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// One refetch shared by every concurrent caller, at most once per cooldown. Returns when
    /// that fetch has finished (or at once when the cooldown forbids one). The fetch runs in its
    /// own task, so a caller that gives up cannot cancel it for the others.
    pub(super) async fn refetch(self: &Arc<Self>) {
        let action = {
            let mut state = lock(&self.refetch);
            // A receiver whose sender is gone belongs to a fetch that died: not in flight.
            match state
                .in_flight
                .as_ref()
                .filter(|rx| rx.has_changed().is_ok())
            {
                Some(rx) => RefetchAction::Wait(rx.clone()),
                None if state
                    .last_started
                    .is_some_and(|at| at.elapsed() < self.cooldown) =>
                {
                    RefetchAction::Skip
                }
                None => {
                    state.last_started = Some(Instant::now());
                    let (tx, rx) = watch::channel(());
                    state.in_flight = Some(rx.clone());
                    RefetchAction::Fetch(tx, rx)
                }
            }
        };
        let mut rx = match action {
            RefetchAction::Skip => return,
            RefetchAction::Wait(rx) => rx,
            RefetchAction::Fetch(tx, rx) => {
                let jwks = Arc::clone(self);
                let task = async move {
                    if let Err(reason) = jwks.fetch_and_replace().await {
                        tracing::warn!(url = %jwks.url, %reason, "JWKS refetch failed; keeping the current keys");
                    }
                    lock(&jwks.refetch).in_flight = None;
                    // Nobody listening is fine.
                    let _ = tx.send(());
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(task);
                    }
                    Err(_) => task.await,
                }
                rx
            }
        };
        // Err = the fetching task died; either way we are done waiting.
        let _ = rx.changed().await;
    }

    /// Fetches the JWKS and replaces the key set; on any failure the current set stays.
    pub(super) async fn fetch_and_replace(&self) -> Result<usize, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let body = self.fetch_body().await?;
        let set = parse_jwks(&body)?;
        let count = set.keys.len();
        let removed_any = {
            let mut current = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            let removed_any = current.jwks.iter().any(|old| !set.jwks.contains(old));
            *current = Arc::new(set);
            removed_any
        };
        if removed_any {
            // Tokens signed by a key that is gone must not live on in the cache.
            self.cache.clear();
        }
        Ok(count)
    }

    async fn fetch_body(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| self.send_error(err))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        if response
            .content_length()
            .is_some_and(|len| len > JWKS_MAX_BYTES as u64)
        {
            return Err(format!("document larger than {JWKS_MAX_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| error_chain(&err.without_url()))?
        {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(format!("document larger than {JWKS_MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A failed request as one readable line: the cause chain (e.g. "… invalid peer certificate:
    /// UnknownIssuer"), without the URL (every caller reports it beside this), plus a hint when
    /// the server's CA is unknown and no `auth.jwks_ca_file` is set.
    fn send_error(&self, err: reqwest::Error) -> String {
        let unknown_issuer = tls_error(&err).is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            )
        });
        let mut text = error_chain(&err.without_url());
        if unknown_issuer && !self.has_ca_file {
            text.push_str(
                " (no trusted root for the server's certificate: if it comes from a private CA, \
                 set auth.jwks_ca_file)",
            );
        }
        text
    }
}

/// The JWKS client's TLS: rustls on aws-lc-rs (the provider jsonwebtoken already uses; ring is
/// kept out of the build), trusting Mozilla's roots plus the certificates in `ca_file`.
fn jwks_tls_config(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, AuthSetupError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let added = add_ca_file(&mut roots, path)?;
        tracing::info!(file = %path.display(), certificates = added, "JWKS client trusts extra CAs");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| AuthSetupError::Jwks {
            url: url.to_owned(),
            reason: format!("TLS setup: {err}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Adds every `CERTIFICATE` block of the PEM file at `path` to `roots`; returns how many. A file
/// with none, a broken PEM block or a certificate that cannot be a trust anchor is an error.
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, AuthSetupError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;

    let fail = |reason: String| AuthSetupError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::CaFileRead {
        path: path.to_owned(),
        source,
    })?;
    let mut added = 0;
    for (index, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert =
            cert.map_err(|err| fail(format!("is not valid PEM: {}", pem_error_text(&err))))?;
        roots.add(cert).map_err(|err| {
            // rustls words every certificate error as the peer's ("invalid peer certificate").
            let why = match err {
                rustls::Error::InvalidCertificate(why) => why.to_string(),
                other => other.to_string(),
            };
            fail(format!(
                "certificate {} is not usable as a CA: {why}",
                index + 1
            ))
        })?;
        added += 1;
    }
    if added == 0 {
        return Err(fail("holds no PEM CERTIFICATE block".to_owned()));
    }
    Ok(added)
}

/// pki-types prints PEM markers as byte arrays; these two read better as text.
fn pem_error_text(err: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match err {
        Error::MissingSectionEnd { end_marker } => format!(
            "no END line for a {} block",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    }
}

/// The rustls error behind a failed request, if TLS is what failed. hyper-rustls hands it up
/// wrapped in `io::Error`s (nested), whose `source()` skips the wrapped error, so an `io::Error` in
/// the chain is opened with `get_ref` instead.
fn tls_error(err: &reqwest::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = next {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    None
}

/// `localhost` or a loopback IP: plain http to it does not cross a network.
fn is_loopback(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Parses a JWKS document, keeping the keys we can use and skipping (with a log line) the rest.
/// A document with no usable key is an error, so a broken refetch cannot empty the set.
fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document =
        serde_json::from_slice(body).map_err(|err| format!("not a JWKS document: {err}"))?;
    let mut set = KeySet::default();
    for (index, raw) in document.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(jwk) => jwk,
            Err(err) => {
                tracing::info!(index, error = %err, "skipping unsupported JWKS entry");
                continue;
            }
        };
        match key_from_jwk(&jwk) {
            Ok(key) => {
                set.keys.push(key);
                set.jwks.push(jwk);
            }
            Err(reason) => {
                tracing::info!(
                    index,
                    kid = jwk.common.key_id.as_deref(),
                    reason,
                    "skipping JWKS entry"
                );
            }
        }
    }
    if set.keys.is_empty() {
        return Err("the JWKS holds no usable signature key".to_owned());
    }
    Ok(set)
}

fn key_from_jwk(jwk: &Jwk) -> Result<VerifyKey, &'static str> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return Err("use is not sig");
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err("key_ops lacks verify");
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(params) => {
            let modulus = URL_SAFE_NO_PAD
                .decode(&params.n)
                .map_err(|_| "n is not base64url")?;
            match UintRef::new(&modulus) {
                Ok(modulus) if rsa_modulus_ok(modulus) => AlgSet::RSA,
                _ => return Err("RSA modulus is not 2048..=8192 bits"),
            }
        }
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => AlgSet::P256,
            EllipticCurve::P384 => AlgSet::P384,
            _ => return Err("unsupported EC curve"),
        },
        AlgorithmParameters::OctetKeyPair(params) => match params.curve {
            EllipticCurve::Ed25519 => AlgSet::ED25519,
            _ => return Err("unsupported OKP curve"),
        },
        // HS secrets come only from the environment (a JWKS `oct` key would let whoever serves
        // the JWKS mint tokens).
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are never taken from a JWKS")
        }
    };
    let algs = match jwk.common.key_algorithm {
        None => family,
        Some(key_alg) => match jwk_algorithm(key_alg) {
            Some(alg) if family.contains(alg) => AlgSet::one(alg),
            _ => return Err("alg does not fit the key type"),
        },
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "invalid key parameters")?;
    let shape_ok = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(_) => ec_point_fits(family, key.as_bytes()),
        AlgorithmParameters::OctetKeyPair(_) => key.as_bytes().len() == 32,
        _ => true,
    };
    if !shape_ok {
        return Err("key coordinates have the wrong length for the curve");
    }
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algs,
        key,
    })
}

fn jwk_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error and its sources on one line (reqwest's top-level message hides the cause).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
