//! Identity: turns an `Authorization: Bearer <JWT>` header into an [`Identity`] (DESIGN §2 step 2,
//! §7 "Identity").
//!
//! Owns: the verification keys (the HS secret from an environment variable, PEM public keys, a JWKS
//! fetched over HTTPS — or plain HTTP for local use — and refetched when a token names an unknown
//! `kid`), the JWKS client's TLS trust (Mozilla's roots plus an optional private CA file), the JWT
//! validation rules, the customer/plan claim lookup, the verified-token cache, and minting HS
//! tokens for `tollgate token` and tests.
//!
//! Must not touch: HTTP responses (the one denial-mapping module turns an [`AuthError`] into a 401
//! problem+json with `WWW-Authenticate`, using [`AuthError::description`] and
//! [`AuthError::is_missing`]), entitlements, quotas, or any I/O on the request path other than the
//! rate-limited JWKS refetch.
//!
//! Rules it enforces:
//! - The accepted algorithms come from config only, never from the token; `alg: none` (or any name
//!   jsonwebtoken does not know) is refused, and so is a header with `crit`.
//! - HS keys come only from `secret_env`, asymmetric keys only from PEM files or the JWKS, and a key
//!   is only ever used with the algorithms of its own family (and curve), so a token "signed" with a
//!   public key as an HMAC secret cannot verify.
//! - `exp` is required; `nbf` is checked; `iss`/`aud` are required and checked when configured;
//!   leeway is the configured one (jsonwebtoken's default of 60 s is overridden).
//! - Verified tokens are cached by their full text until `exp`, so a repeat request skips the crypto.
//! - The JWKS is fetched over TLS verified against Mozilla's roots plus `auth.jwks_ca_file`
//!   (rustls on aws-lc-rs); plain `http://` works for local use and is warned about unless the host
//!   is loopback, since whoever serves the JWKS decides which tokens verify.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use dashmap::DashMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use tokio::sync::watch;

/// Minimum time between two `kid`-triggered JWKS refetches (DESIGN §7).
const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Whole-request timeout for one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS larger than this is refused (real ones are a few KiB).
const JWKS_MAX_BYTES: usize = 1 << 20;
/// Longer bearer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest customer id / plan name taken from a claim.
const MAX_CLAIM_VALUE_BYTES: usize = 256;
/// Verified-token cache bound; on overflow expired entries are swept, and if that is not enough
/// the cache is cleared (a clear only costs one verification per live token).
const CACHE_MAX_ENTRIES: usize = 100_000;
/// jsonwebtoken computes `now - leeway` unchecked: a leeway above the current time would overflow.
const MAX_LEEWAY_SECONDS: u64 = 1_000_000_000;
/// aws-lc verifies RSA only with 2048..=8192-bit moduli; a smaller key would silently never verify.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// Validated auth settings (built by the config module from TOML `[auth]`).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Accepted algorithms; never taken from the token.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Env var holding the HS secret (raw bytes; a `base64:` prefix means base64 binary).
    pub secret_env: Option<String>,
    /// PEM public keys (RSA/EC/Ed25519), used for RS*/PS*/ES*/EdDSA.
    pub public_key_files: Vec<std::path::PathBuf>,
    /// JWKS document URL: `https://` (real identity providers) or `http://` (local use).
    pub jwks_url: Option<String>,
    /// PEM file of CA certificates trusted for the JWKS fetch in addition to Mozilla's roots
    /// (for an identity provider behind a private CA). Only meaningful with `jwks_url`.
    pub jwks_ca_file: Option<PathBuf>,
    /// Required `iss` when set.
    pub issuer: Option<String>,
    /// Accepted audiences; empty = `aud` is not checked.
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_seconds: u64,
    /// Dotted path of the customer claim: "sub", "org_id", "org.id".
    pub customer_claim: String,
    /// Dotted path of the plan claim; only read when Some (trusting a token's plan is opt-in).
    pub plan_claim: Option<String>,
}

/// Who is calling, as proven by a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The customer claim's value (a string, or an integer stringified).
    pub customer: String,
    /// The plan claim's value, only when `plan_claim` is configured and the token carries one.
    pub plan: Option<String>,
    /// The token's `exp` (unix seconds).
    pub expires_at: u64,
}

/// Why a request's credentials were refused. Every variant maps to a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header, or an empty one.
    #[error("{}", self.description())]
    Missing,
    /// A scheme other than `Bearer` (RFC 6750 treats this like missing credentials).
    #[error("{}", self.description())]
    UnsupportedScheme,
    /// `Bearer` with no token, or a token that is not a compact JWS.
    #[error("{}", self.description())]
    Malformed,
    /// The header's `alg` is not configured (includes `none` and unknown names).
    #[error("{}", self.description())]
    DisallowedAlgorithm,
    /// The header has `crit`: we implement no extensions.
    #[error("{}", self.description())]
    CriticalHeader,
    /// No configured key matches the token's `kid`/algorithm.
    #[error("{}", self.description())]
    UnknownKey,
    /// The signature does not verify with any candidate key.
    #[error("{}", self.description())]
    BadSignature,
    /// `exp` is past (beyond the leeway).
    #[error("{}", self.description())]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("{}", self.description())]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("{}", self.description())]
    WrongIssuer,
    /// `aud` names none of the configured audiences.
    #[error("{}", self.description())]
    WrongAudience,
    /// A required registered claim ("exp", "iss" or "aud") is absent or of the wrong JSON type
    /// (jsonwebtoken treats an unparsable required claim as missing).
    #[error("{}", self.description())]
    MissingClaim(&'static str),
    /// The signature verified but the payload is not a JSON claims object (or jsonwebtoken could
    /// not read it, e.g. `sub`/`iss` holding an object, or a malformed optional `nbf`).
    #[error("{}", self.description())]
    InvalidClaims,
    /// The customer claim is absent, empty, too long, has control characters or is not a
    /// string/integer.
    #[error("{}", self.description())]
    NoCustomerClaim,
}

// === impl AuthError ===

impl AuthError {
    /// Short human text for the problem+json `detail` and the RFC 6750 `error_description`.
    pub fn description(&self) -> &'static str {
        match self {
            AuthError::Missing => "no bearer token was presented",
            AuthError::UnsupportedScheme => "the Authorization scheme is not Bearer",
            AuthError::Malformed => "the bearer token is not a well-formed JWT",
            AuthError::DisallowedAlgorithm => "the token's signing algorithm is not accepted",
            AuthError::CriticalHeader => "the token has a crit header, which is not supported",
            AuthError::UnknownKey => "the token was signed with an unknown key",
            AuthError::BadSignature => "the token's signature is invalid",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::WrongIssuer => "the token's issuer is not accepted",
            AuthError::WrongAudience => "the token's audience is not accepted",
            AuthError::MissingClaim("iss") => "the token has no valid iss claim",
            AuthError::MissingClaim("aud") => "the token has no valid aud claim",
            AuthError::MissingClaim(_) => "the token has no valid exp claim",
            AuthError::InvalidClaims => "the token's claims are malformed",
            AuthError::NoCustomerClaim => "the token has no valid customer claim",
        }
    }

    /// True when no credentials were presented at all (RFC 6750: no `error=` attribute then).
    ///
    /// RFC 6750 §3.1 counts "attempted using an unsupported authentication method" as lacking
    /// authentication information too, so a non-Bearer scheme is also "missing".
    pub fn is_missing(&self) -> bool {
        matches!(self, AuthError::Missing | AuthError::UnsupportedScheme)
    }
}

/// Why a [`Verifier`] could not be built (or a token minted). Messages name the setting, env var,
/// file or URL at fault.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// `algorithms` is empty.
    #[error("auth.algorithms is empty: allow at least one algorithm")]
    NoAlgorithms,
    /// `leeway_seconds` is absurdly large.
    #[error("auth.leeway_seconds = {0} is too large (at most {MAX_LEEWAY_SECONDS})")]
    Leeway(u64),
    /// `customer_claim` / `plan_claim` is not a dotted claim path.
    #[error("auth.{setting} = {path:?} is not a claim path (names separated by single dots)")]
    ClaimPath {
        /// "customer_claim" or "plan_claim".
        setting: &'static str,
        /// The configured value.
        path: String,
    },
    /// The secret env var is not set.
    #[error("environment variable {var} (auth.secret_env) is not set")]
    SecretEnvUnset {
        /// The env var's name.
        var: String,
    },
    /// The secret env var is not valid UTF-8.
    #[error(
        "environment variable {var} (auth.secret_env) is not valid UTF-8 (use a base64: value)"
    )]
    SecretEnvNotUnicode {
        /// The env var's name.
        var: String,
    },
    /// The secret env var is empty.
    #[error("environment variable {var} (auth.secret_env) is empty")]
    SecretEnvEmpty {
        /// The env var's name.
        var: String,
    },
    /// The secret env var has a `base64:` prefix but the rest is not base64.
    #[error("environment variable {var} (auth.secret_env) starts with base64: but is not valid base64: {source}")]
    SecretEnvBase64 {
        /// The env var's name.
        var: String,
        /// The decoder's complaint.
        source: base64::DecodeError,
    },
    /// An HS algorithm is allowed but there is no secret.
    #[error("auth.algorithms allows {alg:?} but auth.secret_env is not set (HS secrets come only from the environment)")]
    NoSecret {
        /// The HS algorithm.
        alg: Algorithm,
    },
    /// An asymmetric algorithm is allowed but nothing can provide a key for it.
    #[error("auth.algorithms allows {alg:?} but no auth.public_key_files entry holds a key for it and auth.jwks_url is not set")]
    NoKeyForAlgorithm {
        /// The algorithm without a key source.
        alg: Algorithm,
    },
    /// A public key file cannot be read.
    #[error("cannot read public key file {path} (auth.public_key_files): {source}")]
    KeyFileRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A public key file is not a usable public key.
    #[error("public key file {path} (auth.public_key_files) {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The JWKS CA file cannot be read.
    #[error("cannot read CA file {path} (auth.jwks_ca_file): {source}")]
    CaFileRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The JWKS CA file is not a PEM list of usable CA certificates.
    #[error("CA file {path} (auth.jwks_ca_file) {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The JWKS URL is unusable, or its first fetch failed and there is no other key.
    #[error("auth.jwks_url {url}: {reason}")]
    Jwks {
        /// The configured URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// `mint_hs` cannot mint with these settings or this customer.
    #[error("cannot mint a token: {0}")]
    Mint(&'static str),
    /// jsonwebtoken failed to sign.
    #[error("cannot mint a token: signing failed: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Loads/holds keys; verifies tokens. Cheap to share (`Arc<Verifier>`).
pub struct Verifier {
    /// The configured algorithms, in config order (`mint_hs` takes the first HS one).
    algorithms: Vec<Algorithm>,
    allowed: AlgSet,
    /// One prebuilt `Validation` per allowed algorithm, indexed by `alg_index`: jsonwebtoken
    /// insists that every algorithm in a `Validation` shares the key's family.
    validations: [Option<Validation>; ALG_COUNT],
    hs_key: Option<DecodingKey>,
    hs_signing_key: Option<EncodingKey>,
    /// Keys from PEM files (they have no `kid`).
    static_keys: Vec<VerifyKey>,
    jwks: Option<Arc<Jwks>>,
    customer: ClaimPath,
    plan: Option<ClaimPath>,
    issuer: Option<String>,
    audience: Vec<String>,
    cache: Arc<TokenCache>,
    /// Full verifications run (cache misses that reached the key lookup).
    verifications: AtomicU64,
}

// === impl Verifier ===

impl Verifier {
    /// Builds from settings: reads the env secret / PEM files now (error names the env var or file),
    /// fetches the JWKS if configured (a failing first fetch is an error only if there are no other keys;
    /// otherwise log and retry later).
    ///
    /// "Later" is the first token that names an unknown `kid` or finds no key (subject to the 30 s
    /// refetch cooldown), or [`Verifier::refresh_jwks`].
    pub async fn new(settings: AuthSettings) -> Result<Verifier, AuthSetupError> {
        let secret = match &settings.secret_env {
            Some(var) => Some(read_secret_env(var)?),
            None => None,
        };
        Self::build(settings, secret).await
    }

    /// `new` with the HS secret already in hand (tests use it to avoid mutating the environment).
    async fn build(
        settings: AuthSettings,
        hs_secret: Option<Vec<u8>>,
    ) -> Result<Verifier, AuthSetupError> {
        if settings.algorithms.is_empty() {
            return Err(AuthSetupError::NoAlgorithms);
        }
        if settings.leeway_seconds > MAX_LEEWAY_SECONDS {
            return Err(AuthSetupError::Leeway(settings.leeway_seconds));
        }
        let allowed = AlgSet::of(&settings.algorithms);
        let customer = ClaimPath::parse("customer_claim", &settings.customer_claim)?;
        let plan = match &settings.plan_claim {
            Some(path) => Some(ClaimPath::parse("plan_claim", path)?),
            None => None,
        };

        let (hs_key, hs_signing_key) = match &hs_secret {
            Some(secret) => {
                if !allowed.intersects(AlgSet::HMAC) {
                    tracing::warn!(
                        "auth.secret_env is set but no HS algorithm is allowed: the secret is unused"
                    );
                }
                (
                    Some(DecodingKey::from_secret(secret)),
                    Some(EncodingKey::from_secret(secret)),
                )
            }
            None => (None, None),
        };

        let mut static_keys = Vec::with_capacity(settings.public_key_files.len());
        for path in &settings.public_key_files {
            let key = load_pem_key(path)?;
            if !key.algs.intersects(allowed) {
                tracing::warn!(
                    file = %path.display(),
                    "public key file fits none of auth.algorithms: it is unused"
                );
            }
            static_keys.push(key);
        }

        for &alg in &settings.algorithms {
            if AlgSet::HMAC.contains(alg) {
                if hs_key.is_none() {
                    return Err(AuthSetupError::NoSecret { alg });
                }
            } else if settings.jwks_url.is_none()
                && !static_keys.iter().any(|key| key.algs.contains(alg))
            {
                return Err(AuthSetupError::NoKeyForAlgorithm { alg });
            }
        }

        let validations = std::array::from_fn(|index| {
            let alg = ALL_ALGS[index];
            allowed
                .contains(alg)
                .then(|| build_validation(alg, &settings))
        });

        let cache = Arc::new(TokenCache::new(CACHE_MAX_ENTRIES));
        let jwks = match &settings.jwks_url {
            Some(url) => {
                let jwks = Arc::new(Jwks::new(
                    url,
                    settings.jwks_ca_file.as_deref(),
                    Arc::clone(&cache),
                )?);
                match jwks.fetch_and_replace().await {
                    Ok(count) => tracing::info!(url = %url, keys = count, "JWKS loaded"),
                    Err(reason) if static_keys.is_empty() && hs_key.is_none() => {
                        return Err(AuthSetupError::Jwks {
                            url: url.clone(),
                            reason,
                        });
                    }
                    Err(reason) => tracing::warn!(
                        url = %url,
                        %reason,
                        "JWKS fetch failed; using the other configured keys until a refetch succeeds"
                    ),
                }
                Some(jwks)
            }
            None => {
                if let Some(path) = &settings.jwks_ca_file {
                    tracing::warn!(
                        file = %path.display(),
                        "auth.jwks_ca_file is set but auth.jwks_url is not: the CA file is unused"
                    );
                }
                None
            }
        };

        Ok(Verifier {
            algorithms: settings.algorithms,
            allowed,
            validations,
            hs_key,
            hs_signing_key,
            static_keys,
            jwks,
            customer,
            plan,
            issuer: settings.issuer,
            audience: settings.audience,
            cache,
            verifications: AtomicU64::new(0),
        })
    }

    /// Verifies the value of an `Authorization` header (None = header absent).
    /// Accepts "Bearer <jwt>" (scheme case-insensitive). Never panics on any input.
    pub async fn verify(&self, authorization: Option<&[u8]>) -> Result<Identity, AuthError> {
        let token = bearer_token(authorization)?;
        let now = unix_now();
        if let Some(identity) = self.cache.get(token, now) {
            return Ok(identity);
        }
        self.verifications.fetch_add(1, Ordering::Relaxed);

        let header = self.check_header(token)?;
        let identity = if AlgSet::HMAC.contains(header.alg) {
            self.verify_hmac(token, header.alg)?
        } else {
            match self.verify_asymmetric(token, header.alg, header.kid.as_deref()) {
                KeyOutcome::Done(result) => result?,
                KeyOutcome::NoKey => {
                    let Some(jwks) = &self.jwks else {
                        return Err(AuthError::UnknownKey);
                    };
                    // The key set may have rotated: one shared, rate-limited refetch, then one
                    // more look. No lock is held across this await.
                    jwks.refetch().await;
                    match self.verify_asymmetric(token, header.alg, header.kid.as_deref()) {
                        KeyOutcome::Done(result) => result?,
                        KeyOutcome::NoKey => return Err(AuthError::UnknownKey),
                    }
                }
            }
        };
        self.cache.insert(token, &identity, now);
        Ok(identity)
    }

    /// Mints an HS token (for `tollgate token` and tests): first HS* algorithm allowed, claims
    /// {customer_claim (nested path builds nested objects): customer, exp: now+ttl, iat, iss/aud if configured}.
    pub fn mint_hs(&self, customer: &str, ttl_seconds: u64) -> Result<String, AuthSetupError> {
        let alg = self
            .algorithms
            .iter()
            .copied()
            .find(|&alg| AlgSet::HMAC.contains(alg))
            .ok_or(AuthSetupError::Mint(
                "auth.algorithms allows no HS algorithm",
            ))?;
        let key = self
            .hs_signing_key
            .as_ref()
            .ok_or(AuthSetupError::Mint("auth.secret_env is not set"))?;
        if !valid_claim_text(customer) {
            return Err(AuthSetupError::Mint(
                "the customer must be 1..=256 bytes without control characters",
            ));
        }

        let now = unix_now();
        let mut claims = Map::new();
        insert_path(&mut claims, &self.customer.segments, Value::from(customer));
        claims.insert(
            "exp".to_owned(),
            Value::from(now.saturating_add(ttl_seconds)),
        );
        claims.insert("iat".to_owned(), Value::from(now));
        if let Some(issuer) = &self.issuer {
            claims.insert("iss".to_owned(), Value::from(issuer.as_str()));
        }
        match self.audience.as_slice() {
            [] => {}
            [one] => {
                claims.insert("aud".to_owned(), Value::from(one.as_str()));
            }
            many => {
                claims.insert("aud".to_owned(), Value::from(many.to_vec()));
            }
        }
        jsonwebtoken::encode(&Header::new(alg), &Value::Object(claims), key)
            .map_err(AuthSetupError::Sign)
    }

    /// Fetches the JWKS now and replaces the key set (for the background key refresher); a no-op
    /// without `jwks_url`. A failure keeps the current set.
    pub async fn refresh_jwks(&self) -> Result<(), AuthSetupError> {
        let Some(jwks) = &self.jwks else {
            return Ok(());
        };
        jwks.fetch_and_replace()
            .await
            .map(|_| ())
            .map_err(|reason| AuthSetupError::Jwks {
                url: jwks.url.clone(),
                reason,
            })
    }

    /// Decodes the header once: algorithm allowed, no `crit`.
    fn check_header(&self, token: &str) -> Result<Header, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| classify_bad_header(token))?;
        if !self.allowed.contains(header.alg) {
            return Err(AuthError::DisallowedAlgorithm);
        }
        if header.crit.is_some() {
            return Err(AuthError::CriticalHeader);
        }
        Ok(header)
    }

    /// HS tokens: the env secret is the only candidate; a `kid` is irrelevant (HS keys never come
    /// from the JWKS, so an HS `kid` must not trigger a refetch either).
    fn verify_hmac(&self, token: &str, alg: Algorithm) -> Result<Identity, AuthError> {
        let Some(key) = &self.hs_key else {
            return Err(AuthError::UnknownKey);
        };
        match self.decode_with(token, alg, key) {
            Step::Done(result) => result,
            Step::NextKey => Err(AuthError::BadSignature),
        }
    }

    /// Asymmetric tokens. With a JWKS configured a `kid` must name a JWKS key (unknown → the caller
    /// refetches); without one a `kid` cannot name anything we hold, so it is ignored. A token with
    /// no `kid` may match any key of its algorithm, PEM keys first.
    fn verify_asymmetric(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> KeyOutcome {
        let jwks_keys = self.jwks.as_ref().map(|jwks| jwks.snapshot());
        let jwks_keys: &[VerifyKey] = jwks_keys.as_deref().map_or(&[], |set| &set.keys);
        let mut tried = false;
        match kid {
            Some(kid) if self.jwks.is_some() => {
                let mut known = false;
                for key in jwks_keys
                    .iter()
                    .filter(|key| key.kid.as_deref() == Some(kid))
                {
                    known = true;
                    if key.algs.contains(alg) {
                        tried = true;
                        if let Step::Done(result) = self.decode_with(token, alg, &key.key) {
                            return KeyOutcome::Done(result);
                        }
                    }
                }
                if !known {
                    return KeyOutcome::NoKey;
                }
            }
            _ => {
                for key in self.static_keys.iter().chain(jwks_keys) {
                    if key.algs.contains(alg) {
                        tried = true;
                        if let Step::Done(result) = self.decode_with(token, alg, &key.key) {
                            return KeyOutcome::Done(result);
                        }
                    }
                }
                if !tried && self.jwks.is_some() {
                    return KeyOutcome::NoKey;
                }
            }
        }
        KeyOutcome::Done(Err(if tried {
            AuthError::BadSignature
        } else {
            AuthError::UnknownKey
        }))
    }

    /// One signature + claims check with one key. A signature (or key) mismatch moves on to the
    /// next candidate; anything after the signature verified is final.
    fn decode_with(&self, token: &str, alg: Algorithm, key: &DecodingKey) -> Step {
        let Some(validation) = &self.validations[alg_index(alg)] else {
            return Step::Done(Err(AuthError::DisallowedAlgorithm));
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, key, validation) {
            Ok(data) => Step::Done(self.identity_from_claims(&data.claims)),
            Err(err) => match err.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => Step::NextKey,
                kind => Step::Done(Err(map_jwt_error(kind))),
            },
        }
    }

    fn identity_from_claims(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let customer = self
            .customer
            .lookup(claims)
            .and_then(claim_text)
            .ok_or(AuthError::NoCustomerClaim)?;
        // An unusable plan claim is ignored rather than fatal: the entitlement step falls back.
        let plan = self
            .plan
            .as_ref()
            .and_then(|path| path.lookup(claims))
            .and_then(claim_text);
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(AuthError::InvalidClaims)?;
        Ok(Identity {
            customer,
            plan,
            expires_at,
        })
    }

    #[cfg(test)]
    fn jwks_fetches(&self) -> u64 {
        self.jwks
            .as_ref()
            .map_or(0, |jwks| jwks.fetches.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for Verifier {
    // Hand-written so no key material can reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.algorithms)
            .field("hs_secret", &self.hs_key.as_ref().map(|_| "[redacted]"))
            .field("public_keys", &self.static_keys.len())
            .field(
                "jwks_url",
                &self.jwks.as_ref().map(|jwks| jwks.url.as_str()),
            )
            .field("cached_tokens", &self.cache.map.len())
            .finish_non_exhaustive()
    }
}

enum KeyOutcome {
    Done(Result<Identity, AuthError>),
    /// No key could even be tried: worth a JWKS refetch.
    NoKey,
}

enum Step {
    Done(Result<Identity, AuthError>),
    NextKey,
}

fn build_validation(alg: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = settings.leeway_seconds;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    if settings.audience.is_empty() {
        // jsonwebtoken checks `aud` by default and would refuse any token carrying one.
        validation.validate_aud = false;
    } else {
        validation.set_audience(&settings.audience);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Maps a jsonwebtoken failure that happened with a usable key.
fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(match claim.as_str() {
            "iss" => "iss",
            "aud" => "aud",
            _ => "exp",
        }),
        // Our own header parse already succeeded, so a JSON/UTF-8 failure here is the payload's,
        // found after the signature verified.
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            AuthError::InvalidClaims
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::DisallowedAlgorithm,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        _ => AuthError::Malformed,
    }
}

/// Why `decode_header` failed: an `alg` jsonwebtoken has no name for (`none`, `ES512`, …) is a
/// disallowed algorithm; anything else is malformed. Error path only, so it may allocate.
fn classify_bad_header(token: &str) -> AuthError {
    let alg = token
        .split('.')
        .next()
        .and_then(|segment| URL_SAFE_NO_PAD.decode(segment).ok())
        .and_then(|json| serde_json::from_slice::<Value>(&json).ok())
        .and_then(|header| header.get("alg").and_then(Value::as_str).map(str::to_owned));
    match alg {
        Some(alg) if Algorithm::from_str(&alg).is_err() => AuthError::DisallowedAlgorithm,
        _ => AuthError::Malformed,
    }
}

/// Extracts the token from `Bearer <token>`: scheme case-insensitive, then one or more spaces,
/// then exactly three base64url segments separated by dots.
fn bearer_token(authorization: Option<&[u8]>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?.trim_ascii();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    let (scheme, rest) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(at) => value.split_at(at),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthError::UnsupportedScheme);
    }
    let token = rest.trim_ascii_start();
    if token.is_empty()
        || token.len() > MAX_TOKEN_BYTES
        || token.iter().filter(|&&b| b == b'.').count() != 2
        || !token
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(AuthError::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| AuthError::Malformed)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// `exp` as jsonwebtoken reads it: a non-negative integer, or a float rounded.
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

/// A customer/plan value: a usable string, or an integer stringified.
fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if valid_claim_text(text) => Some(text.clone()),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}

fn valid_claim_text(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_CLAIM_VALUE_BYTES && !text.chars().any(char::is_control)
}

/// A configured claim location: "sub", "org_id", "org.id".
#[derive(Debug, Clone)]
struct ClaimPath {
    full: String,
    segments: Vec<String>,
}

impl ClaimPath {
    fn parse(setting: &'static str, path: &str) -> Result<ClaimPath, AuthSetupError> {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(AuthSetupError::ClaimPath {
                setting,
                path: path.to_owned(),
            });
        }
        Ok(ClaimPath {
            full: path.to_owned(),
            segments,
        })
    }

    /// The literal key wins (so a namespaced claim like "https://example.com/org" works), then the
    /// dotted walk through nested objects.
    fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(value) = claims.get(&self.full) {
            return Some(value);
        }
        let (first, rest) = self.segments.split_first()?;
        if rest.is_empty() {
            return None;
        }
        let mut value = claims.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

/// Sets `path` in `claims`, creating (or replacing non-object values with) nested objects.
fn insert_path(claims: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut object = claims;
    for segment in parents {
        let slot = object
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else {
            return;
        };
        object = next;
    }
    object.insert(last.clone(), value);
}

// === keys ===

const ALG_COUNT: usize = 12;
const ALL_ALGS: [Algorithm; ALG_COUNT] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn alg_index(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS256 => 0,
        Algorithm::HS384 => 1,
        Algorithm::HS512 => 2,
        Algorithm::RS256 => 3,
        Algorithm::RS384 => 4,
        Algorithm::RS512 => 5,
        Algorithm::PS256 => 6,
        Algorithm::PS384 => 7,
        Algorithm::PS512 => 8,
        Algorithm::ES256 => 9,
        Algorithm::ES384 => 10,
        Algorithm::EdDSA => 11,
    }
}

/// A set of algorithms as a bitmask: what config allows, what a key may be used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AlgSet(u16);

impl AlgSet {
    const HMAC: AlgSet = AlgSet(0b111);
    const RSA: AlgSet = AlgSet(0b1_1111_1000);
    const P256: AlgSet = AlgSet(1 << 9);
    const P384: AlgSet = AlgSet(1 << 10);
    const ED25519: AlgSet = AlgSet(1 << 11);

    fn one(alg: Algorithm) -> AlgSet {
        AlgSet(1 << alg_index(alg))
    }

    fn of(algs: &[Algorithm]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |bits, &alg| bits | AlgSet::one(alg).0))
    }

    fn contains(self, alg: Algorithm) -> bool {
        self.0 & AlgSet::one(alg).0 != 0
    }

    fn intersects(self, other: AlgSet) -> bool {
        self.0 & other.0 != 0
    }
}

/// One verification key and the algorithms it may be used with (its family, and for EC its curve).
struct VerifyKey {
    kid: Option<String>,
    algs: AlgSet,
    key: DecodingKey,
}

fn read_secret_env(var: &str) -> Result<Vec<u8>, AuthSetupError> {
    match std::env::var(var) {
        Ok(value) => parse_secret(var, &value),
        Err(std::env::VarError::NotPresent) => Err(AuthSetupError::SecretEnvUnset {
            var: var.to_owned(),
        }),
        Err(std::env::VarError::NotUnicode(_)) => Err(AuthSetupError::SecretEnvNotUnicode {
            var: var.to_owned(),
        }),
    }
}

/// Raw bytes, or base64 binary after a `base64:` prefix (DESIGN §7).
fn parse_secret(var: &str, value: &str) -> Result<Vec<u8>, AuthSetupError> {
    let secret =
        match value.strip_prefix("base64:") {
            Some(encoded) => STANDARD.decode(encoded.trim()).map_err(|source| {
                AuthSetupError::SecretEnvBase64 {
                    var: var.to_owned(),
                    source,
                }
            })?,
            None => value.as_bytes().to_vec(),
        };
    if secret.is_empty() {
        return Err(AuthSetupError::SecretEnvEmpty {
            var: var.to_owned(),
        });
    }
    if secret.len() < 32 {
        tracing::warn!(
            var,
            bytes = secret.len(),
            "HS secret is shorter than 32 bytes (RFC 7518 §3.2 wants at least the hash size)"
        );
    }
    Ok(secret)
}

/// Reads one PEM public key and works out which algorithms it may serve.
fn load_pem_key(path: &Path) -> Result<VerifyKey, AuthSetupError> {
    let bad = |reason| AuthSetupError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::KeyFileRead {
        path: path.to_owned(),
        source,
    })?;
    let label = pem_label(&pem).ok_or_else(|| bad("has no PEM block (-----BEGIN ...-----)"))?;
    match label {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        label if label.contains("PRIVATE KEY") => {
            return Err(bad(
                "holds a private key: configure the public key (openssl pkey -pubout)",
            ));
        }
        "CERTIFICATE" => {
            return Err(bad(
                "holds a certificate: configure its public key (openssl x509 -pubkey -noout)",
            ));
        }
        _ => return Err(bad("is not a PUBLIC KEY PEM block")),
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        match rsa_modulus_bits(key.as_bytes()) {
            Some(bits) if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) => {}
            _ => return Err(bad("is not a 2048..=8192-bit RSA key")),
        }
        return Ok(VerifyKey {
            kid: None,
            algs: AlgSet::RSA,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        let algs = ec_point_algs(key.as_bytes())
            .ok_or_else(|| bad("is an EC key on a curve other than P-256/P-384"))?;
        return Ok(VerifyKey {
            kid: None,
            algs,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        if key.as_bytes().len() != 32 {
            return Err(bad("is not an Ed25519 key"));
        }
        return Ok(VerifyKey {
            kid: None,
            algs: AlgSet::ED25519,
            key,
        });
    }
    Err(bad("is not an RSA, EC (P-256/P-384) or Ed25519 public key"))
}

/// The label of the first `-----BEGIN <label>-----` line.
fn pem_label(pem: &[u8]) -> Option<&str> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let start = pem
        .windows(BEGIN.len())
        .position(|window| window == BEGIN)?
        + BEGIN.len();
    let rest = &pem[start..];
    let end = rest.windows(5).position(|window| window == b"-----")?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// An uncompressed EC point's length tells its curve.
fn ec_point_algs(point: &[u8]) -> Option<AlgSet> {
    match (point.first(), point.len()) {
        (Some(4), 65) => Some(AlgSet::P256),
        (Some(4), 97) => Some(AlgSet::P384),
        _ => None,
    }
}

/// Bit length of the modulus of a PKCS#1 `RSAPublicKey` (SEQUENCE { INTEGER n, INTEGER e }).
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    let (sequence, _) = der_element(der, 0x30)?;
    let (modulus, _) = der_element(sequence, 0x02)?;
    integer_bits(modulus)
}

/// Splits a DER element with the given tag into (content, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len_byte, rest) = rest.split_first()?;
    let (len, rest) = if len_byte < 0x80 {
        (usize::from(len_byte), rest)
    } else {
        let count = usize::from(len_byte & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(count);
        (
            len_bytes
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b)),
            rest,
        )
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Bit length of a big-endian unsigned integer (leading zero bytes ignored).
fn integer_bits(bytes: &[u8]) -> Option<usize> {
    let start = bytes.iter().position(|&b| b != 0)?;
    let significant = &bytes[start..];
    let leading = significant.first()?.leading_zeros() as usize;
    Some(significant.len() * 8 - leading)
}

// === JWKS ===

/// The JWKS-provided keys and the single-flight, rate-limited refetch.
struct Jwks {
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
struct KeySet {
    keys: Vec<VerifyKey>,
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
    fn new(
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

    /// The current key set; the read lock is held only to clone the `Arc`.
    fn snapshot(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// One refetch shared by every concurrent caller, at most once per cooldown. Returns when
    /// that fetch has finished (or at once when the cooldown forbids one). The fetch runs in its
    /// own task, so a caller that gives up cannot cancel it for the others.
    async fn refetch(self: &Arc<Self>) {
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
    async fn fetch_and_replace(&self) -> Result<usize, String> {
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
                tracing::info!(index, kid = ?jwk.common.key_id, reason, "skipping JWKS entry");
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
            match integer_bits(&modulus) {
                Some(bits) if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) => AlgSet::RSA,
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
        AlgorithmParameters::EllipticCurve(_) => ec_point_algs(key.as_bytes()) == Some(family),
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

// === verified-token cache ===

/// Full token text → identity, until `exp`. Keyed by the whole token (a hash-only key would let a
/// colliding forgery through); only successes are stored.
struct TokenCache {
    map: DashMap<Box<str>, Identity>,
    max_entries: usize,
}

impl TokenCache {
    fn new(max_entries: usize) -> TokenCache {
        TokenCache {
            map: DashMap::new(),
            max_entries,
        }
    }

    fn get(&self, token: &str, now: u64) -> Option<Identity> {
        // The shard guard must be gone before `remove_if` takes the same shard's write lock.
        let expired = match self.map.get(token) {
            None => return None,
            Some(entry) if now < entry.expires_at => return Some(entry.value().clone()),
            Some(_) => true,
        };
        if expired {
            self.map
                .remove_if(token, |_, identity| identity.expires_at <= now);
        }
        None
    }

    fn insert(&self, token: &str, identity: &Identity, now: u64) {
        // Accepted within the leeway but already past `exp`: verify it afresh every time.
        if identity.expires_at <= now {
            return;
        }
        if self.map.len() >= self.max_entries {
            self.map.retain(|_, cached| cached.expires_at > now);
            if self.map.len() >= self.max_entries / 10 * 9 {
                self.map.clear();
            }
        }
        self.map.insert(Box::from(token), identity.clone());
    }

    fn clear(&self) {
        self.map.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use jsonwebtoken::encode;
    use serde_json::json;

    const SECRET: &[u8] = b"tollgate-test-secret-0123456789abcdef";

    // === helpers ===

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/auth")
            .join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    /// Third-party vectors, copied into the repository (tests/fixtures/SOURCES.md says whence).
    fn read_jwt_fixture(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        serde_json::from_slice(&bytes).unwrap()
    }

    fn settings(algorithms: &[Algorithm]) -> AuthSettings {
        AuthSettings {
            algorithms: algorithms.to_vec(),
            secret_env: None,
            public_key_files: Vec::new(),
            jwks_url: None,
            jwks_ca_file: None,
            issuer: None,
            audience: Vec::new(),
            leeway_seconds: 0,
            customer_claim: "sub".to_owned(),
            plan_claim: None,
        }
    }

    fn with_keys(algorithms: &[Algorithm], files: &[&str]) -> AuthSettings {
        let mut s = settings(algorithms);
        s.public_key_files = files.iter().map(|name| fixture(name)).collect();
        s
    }

    async fn hs_verifier(s: AuthSettings) -> Verifier {
        Verifier::build(s, Some(SECRET.to_vec())).await.unwrap()
    }

    fn now() -> u64 {
        unix_now()
    }

    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": now() + 600 })
    }

    fn sign_hs(alg: Algorithm, claims: &Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn encoding_key(alg: Algorithm, private_pem: &str) -> EncodingKey {
        let pem = read_fixture(private_pem);
        match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
        }
    }

    fn sign_pem(alg: Algorithm, private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &encoding_key(alg, private_pem)).unwrap()
    }

    /// A compact JWS from raw header/payload bytes, HMAC-signed with `secret`.
    fn sign_raw_hs(alg: Algorithm, header: &[u8], payload: &[u8], secret: &[u8]) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(secret), alg)
                .unwrap();
        format!("{message}.{signature}")
    }

    /// Replaces the payload segment, keeping header and signature.
    fn swap_payload(token: &str, payload: &[u8]) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload),
            parts[2]
        )
    }

    fn payload_of(token: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap()
    }

    async fn check(verifier: &Verifier, token: &str) -> Result<Identity, AuthError> {
        verifier
            .verify(Some(format!("Bearer {token}").as_bytes()))
            .await
    }

    fn ident(customer: &str, expires_at: u64) -> Identity {
        Identity {
            customer: customer.to_owned(),
            plan: None,
            expires_at,
        }
    }

    fn jwk_for(alg: Algorithm, private_pem: &str, kid: &str) -> Value {
        let mut jwk = Jwk::from_encoding_key(&encoding_key(alg, private_pem), alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }

    fn temp_pem(name: &str, pem: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("tollgate-auth-{}-{name}.pem", std::process::id()));
        std::fs::write(&path, pem).unwrap();
        path
    }

    fn tls_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// A TCP listener that completes a TLS handshake before handing a connection to axum.
    struct TlsListener {
        tcp: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    }

    impl TlsListener {
        /// Serves `tests/fixtures/tls/{cert}.pem` with `{cert}_key.pem`.
        fn new(tcp: tokio::net::TcpListener, cert: &str) -> TlsListener {
            use rustls::pki_types::pem::PemObject as _;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};

            let chain = CertificateDer::pem_file_iter(tls_fixture(&format!("{cert}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key =
                PrivateKeyDer::from_pem_file(tls_fixture(&format!("{cert}_key.pem"))).unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
            TlsListener {
                tcp,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            }
        }
    }

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, addr)) = self.tcp.accept().await else {
                    continue;
                };
                // A client that refuses our certificate fails the handshake: wait for the next.
                if let Ok(tls) = self.acceptor.accept(tcp).await {
                    return (tls, addr);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }

    /// A local JWKS endpoint that counts its hits and can change its answer.
    struct JwksServer {
        url: String,
        hits: Arc<AtomicUsize>,
        answer: Arc<Mutex<(u16, Value)>>,
    }

    impl JwksServer {
        /// Plain http on 127.0.0.1.
        async fn start(doc: Value) -> JwksServer {
            Self::start_with(doc, None).await
        }

        /// https on 127.0.0.1 with the fixture certificate `cert` (see tests/fixtures/tls).
        async fn start_tls(doc: Value, cert: &str) -> JwksServer {
            Self::start_with(doc, Some(cert)).await
        }

        async fn start_with(doc: Value, tls_cert: Option<&str>) -> JwksServer {
            let hits = Arc::new(AtomicUsize::new(0));
            let answer = Arc::new(Mutex::new((200u16, doc)));
            let handler = {
                let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
                move || {
                    let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let (status, doc) = answer.lock().unwrap().clone();
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            axum::Json(doc),
                        )
                    }
                }
            };
            let app = axum::Router::new().route("/jwks.json", axum::routing::get(handler));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let scheme = match tls_cert {
                None => {
                    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
                    "http"
                }
                Some(cert) => {
                    let listener = TlsListener::new(listener, cert);
                    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
                    "https"
                }
            };
            JwksServer {
                url: format!("{scheme}://{addr}/jwks.json"),
                hits,
                answer,
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn answer(&self, status: u16, doc: Value) {
            *self.answer.lock().unwrap() = (status, doc);
        }
    }

    async fn jwks_verifier(server: &JwksServer, algorithms: &[Algorithm]) -> Verifier {
        let mut s = settings(algorithms);
        s.jwks_url = Some(server.url.clone());
        Verifier::new(s).await.unwrap()
    }

    // === valid tokens, every algorithm ===

    /// HS256, HS384 and HS512 tokens signed with the env secret verify.
    #[tokio::test]
    async fn valid_hs256_hs384_hs512() {
        let v = hs_verifier(settings(&[
            Algorithm::HS256,
            Algorithm::HS384,
            Algorithm::HS512,
        ]))
        .await;
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let c = claims(&format!("cust-{alg:?}"));
            let id = check(&v, &sign_hs(alg, &c)).await.unwrap();
            assert_eq!(
                id,
                ident(&format!("cust-{alg:?}"), c["exp"].as_u64().unwrap())
            );
        }
    }

    /// RS256 and PS256 tokens verify with an RSA PEM public key.
    #[tokio::test]
    async fn valid_rs256_and_ps256_with_pem() {
        let v = Verifier::new(with_keys(
            &[Algorithm::RS256, Algorithm::PS256],
            &["rsa_public.pem"],
        ))
        .await
        .unwrap();
        for alg in [Algorithm::RS256, Algorithm::PS256] {
            let token = sign_pem(alg, "rsa_private.pem", None, &claims("acme"));
            assert_eq!(check(&v, &token).await.unwrap().customer, "acme");
        }
    }

    /// ES256 (P-256), ES384 (P-384) and EdDSA (Ed25519) tokens verify with PEM public keys.
    #[tokio::test]
    async fn valid_es256_es384_eddsa_with_pem() {
        let v = Verifier::new(with_keys(
            &[Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA],
            &["ec256_public.pem", "ec384_public.pem", "ed25519_public.pem"],
        ))
        .await
        .unwrap();
        for (alg, private) in [
            (Algorithm::ES256, "ec256_private.pem"),
            (Algorithm::ES384, "ec384_private.pem"),
            (Algorithm::EdDSA, "ed25519_private.pem"),
        ] {
            let token = sign_pem(alg, private, None, &claims("acme"));
            assert_eq!(check(&v, &token).await.unwrap().customer, "acme", "{alg:?}");
        }
    }

    /// RS256, ES256 and EdDSA keys served by a JWKS verify tokens that name them by kid.
    #[tokio::test]
    async fn valid_tokens_with_jwks_keys() {
        let ed_public = DecodingKey::from_ed_pem(&read_fixture("ed25519_public.pem")).unwrap();
        let server = JwksServer::start(json!({ "keys": [
            jwk_for(Algorithm::RS256, "rsa_private.pem", "rsa-1"),
            jwk_for(Algorithm::ES256, "ec256_private.pem", "ec-1"),
            { "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "use": "sig",
              "x": URL_SAFE_NO_PAD.encode(ed_public.as_bytes()) },
        ]}))
        .await;
        let v = jwks_verifier(
            &server,
            &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        )
        .await;
        for (alg, private, kid) in [
            (Algorithm::RS256, "rsa_private.pem", "rsa-1"),
            (Algorithm::ES256, "ec256_private.pem", "ec-1"),
            (Algorithm::EdDSA, "ed25519_private.pem", "ed-1"),
        ] {
            let token = sign_pem(alg, private, Some(kid), &claims("acme"));
            assert_eq!(check(&v, &token).await.unwrap().customer, "acme", "{alg:?}");
        }
        // Without a kid, every JWKS key of the algorithm is a candidate.
        let token = sign_pem(Algorithm::RS256, "rsa_private.pem", None, &claims("nokid"));
        assert_eq!(check(&v, &token).await.unwrap().customer, "nokid");
        assert_eq!(server.hits(), 1);
    }

    /// Without a JWKS a token's kid names nothing we hold, so PEM keys still verify it.
    #[tokio::test]
    async fn kid_is_ignored_without_jwks() {
        let v = Verifier::new(with_keys(&[Algorithm::RS256], &["rsa_public.pem"]))
            .await
            .unwrap();
        let token = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("whatever"),
            &claims("acme"),
        );
        assert_eq!(check(&v, &token).await.unwrap().customer, "acme");
    }

    // === the Authorization header ===

    /// No header (or an empty one) is Missing, which RFC 6750 answers without an error code.
    #[tokio::test]
    async fn header_absent_is_missing() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        for header in [None, Some(&b""[..]), Some(&b"   "[..])] {
            let err = v.verify(header).await.unwrap_err();
            assert_eq!(err, AuthError::Missing);
            assert!(err.is_missing());
        }
    }

    /// "Bearer" with no token is malformed, not missing.
    #[tokio::test]
    async fn bearer_without_token_is_malformed() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        for header in [&b"Bearer"[..], b"Bearer ", b"bearer     ", b"Bearer \t "] {
            let err = v.verify(Some(header)).await.unwrap_err();
            assert_eq!(
                err,
                AuthError::Malformed,
                "{:?}",
                String::from_utf8_lossy(header)
            );
            assert!(!err.is_missing());
        }
    }

    /// Garbage tokens are Malformed (or a disallowed algorithm), never a panic.
    #[tokio::test]
    async fn garbage_is_malformed() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let long = format!("Bearer {}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c");
        let cases: Vec<Vec<u8>> = vec![
            b"Bearer abc".to_vec(),
            b"Bearer a.b".to_vec(),
            b"Bearer a.b.c".to_vec(),
            b"Bearer a.b.c.d".to_vec(),
            b"Bearer ..".to_vec(),
            b"Bearer a b.c".to_vec(),
            b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.\xff\xfe".to_vec(),
            b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.a=b".to_vec(),
            b"Bearer e30.e30.e30".to_vec(),
            b"Bearer bm90IGpzb24.e30.e30".to_vec(),
            long.into_bytes(),
        ];
        for header in cases {
            assert_eq!(
                v.verify(Some(&header)).await,
                Err(AuthError::Malformed),
                "{:?}",
                String::from_utf8_lossy(&header)
            );
        }
    }

    /// A non-Bearer scheme is refused and counts as missing (RFC 6750 §3.1); the scheme name
    /// itself is case-insensitive.
    #[tokio::test]
    async fn wrong_scheme_is_refused_and_scheme_is_case_insensitive() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let token = sign_hs(Algorithm::HS256, &claims("acme"));
        for header in [
            format!("Basic {token}"),
            format!("Token {token}"),
            format!("Bearer{token}"),
        ] {
            let err = v.verify(Some(header.as_bytes())).await.unwrap_err();
            assert_eq!(err, AuthError::UnsupportedScheme);
            assert!(err.is_missing());
        }
        for header in [
            format!("bearer {token}"),
            format!("BEARER  {token}"),
            format!("Bearer\t{token} "),
        ] {
            assert!(v.verify(Some(header.as_bytes())).await.is_ok(), "{header}");
        }
    }

    // === time and registered claims ===

    /// A token past its exp is Expired; within the leeway it passes (but is not cached).
    #[tokio::test]
    async fn expired_token_and_leeway() {
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "acme", "exp": now() - 10 }),
        );
        let strict = hs_verifier(settings(&[Algorithm::HS256])).await;
        assert_eq!(check(&strict, &token).await, Err(AuthError::Expired));

        let mut s = settings(&[Algorithm::HS256]);
        s.leeway_seconds = 60;
        let lenient = hs_verifier(s).await;
        assert!(check(&lenient, &token).await.is_ok());
        assert!(check(&lenient, &token).await.is_ok());
        assert_eq!(
            lenient.verifications.load(Ordering::Relaxed),
            2,
            "past-exp tokens are not cached"
        );
    }

    /// A token whose nbf is in the future (beyond the leeway) is NotYetValid.
    #[tokio::test]
    async fn nbf_in_the_future_is_refused() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 300 }),
        );
        assert_eq!(check(&v, &token).await, Err(AuthError::NotYetValid));
        let mut s = settings(&[Algorithm::HS256]);
        s.leeway_seconds = 600;
        assert!(check(&hs_verifier(s).await, &token).await.is_ok());
    }

    /// A token without exp is refused; exp must be a number.
    #[tokio::test]
    async fn exp_is_required() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let token = sign_hs(Algorithm::HS256, &json!({ "sub": "acme" }));
        assert_eq!(check(&v, &token).await, Err(AuthError::MissingClaim("exp")));
        // jsonwebtoken reads an unparsable required claim as absent.
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "acme", "exp": "tomorrow" }),
        );
        assert_eq!(check(&v, &token).await, Err(AuthError::MissingClaim("exp")));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "acme", "exp": now() + 60, "nbf": "soon" }),
        );
        assert_eq!(check(&v, &token).await, Err(AuthError::InvalidClaims));
    }

    /// A wrong or missing iss is refused when an issuer is configured.
    #[tokio::test]
    async fn wrong_issuer_is_refused() {
        let mut s = settings(&[Algorithm::HS256]);
        s.issuer = Some("https://issuer.example".to_owned());
        let v = hs_verifier(s).await;
        let exp = now() + 600;
        let good = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "a", "exp": exp, "iss": "https://issuer.example" }),
        );
        assert!(check(&v, &good).await.is_ok());
        let wrong = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "a", "exp": exp, "iss": "https://evil.example" }),
        );
        assert_eq!(check(&v, &wrong).await, Err(AuthError::WrongIssuer));
        let none = sign_hs(Algorithm::HS256, &json!({ "sub": "a", "exp": exp }));
        assert_eq!(check(&v, &none).await, Err(AuthError::MissingClaim("iss")));
    }

    /// A wrong or missing aud is refused when audiences are configured; unchecked otherwise.
    #[tokio::test]
    async fn wrong_audience_is_refused() {
        let mut s = settings(&[Algorithm::HS256]);
        s.audience = vec!["api".to_owned(), "admin".to_owned()];
        let v = hs_verifier(s).await;
        let exp = now() + 600;
        for aud in [json!("api"), json!(["other", "admin"])] {
            let token = sign_hs(
                Algorithm::HS256,
                &json!({ "sub": "a", "exp": exp, "aud": aud }),
            );
            assert!(check(&v, &token).await.is_ok(), "{aud}");
        }
        let wrong = sign_hs(
            Algorithm::HS256,
            &json!({ "sub": "a", "exp": exp, "aud": "web" }),
        );
        assert_eq!(check(&v, &wrong).await, Err(AuthError::WrongAudience));
        let none = sign_hs(Algorithm::HS256, &json!({ "sub": "a", "exp": exp }));
        assert_eq!(check(&v, &none).await, Err(AuthError::MissingClaim("aud")));

        // No audience configured: any aud is accepted (jsonwebtoken would refuse it by default).
        let open = hs_verifier(settings(&[Algorithm::HS256])).await;
        assert!(check(&open, &wrong).await.is_ok());
    }

    // === algorithms, headers, keys ===

    /// alg "none" (any spelling) is refused even with no signature to check.
    #[tokio::test]
    async fn alg_none_is_refused() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let payload = URL_SAFE_NO_PAD.encode(claims("acme").to_string());
        for alg in ["none", "None", "NONE"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            for signature in ["", "c2ln"] {
                let token = format!("{header}.{payload}.{signature}");
                assert_eq!(
                    check(&v, &token).await,
                    Err(AuthError::DisallowedAlgorithm),
                    "{alg}"
                );
            }
        }
    }

    /// An HS256 token "signed" with the RSA public key PEM as HMAC secret is refused whether or
    /// not HS256 is allowed: the PEM is only ever an RSA key.
    #[tokio::test]
    async fn algorithm_confusion_is_refused() {
        let pem = read_fixture("rsa_public.pem");
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims("mallory"),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        let rs_only = Verifier::new(with_keys(&[Algorithm::RS256], &["rsa_public.pem"]))
            .await
            .unwrap();
        assert_eq!(
            check(&rs_only, &forged).await,
            Err(AuthError::DisallowedAlgorithm)
        );

        let both = Verifier::build(
            with_keys(&[Algorithm::RS256, Algorithm::HS256], &["rsa_public.pem"]),
            Some(SECRET.to_vec()),
        )
        .await
        .unwrap();
        assert_eq!(check(&both, &forged).await, Err(AuthError::BadSignature));
    }

    /// A token whose alg is not configured is refused, even when the key would verify it.
    #[tokio::test]
    async fn alg_not_allowed_is_refused() {
        let v = Verifier::new(with_keys(&[Algorithm::RS256], &["rsa_public.pem"]))
            .await
            .unwrap();
        for alg in [Algorithm::PS256, Algorithm::RS512] {
            let token = sign_pem(alg, "rsa_private.pem", None, &claims("acme"));
            assert_eq!(
                check(&v, &token).await,
                Err(AuthError::DisallowedAlgorithm),
                "{alg:?}"
            );
        }
        assert_eq!(
            check(&v, &sign_hs(Algorithm::HS256, &claims("acme"))).await,
            Err(AuthError::DisallowedAlgorithm)
        );
    }

    /// A key only serves its own family and curve: an ES256 token finds no P-384 key, and a JWK's
    /// alg narrows it further.
    #[tokio::test]
    async fn keys_serve_only_their_family_and_curve() {
        // ES256 allowed but only a P-384 key configured: a setup error.
        let err = Verifier::new(with_keys(&[Algorithm::ES256], &["ec384_public.pem"]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthSetupError::NoKeyForAlgorithm {
                    alg: Algorithm::ES256
                }
            ),
            "{err}"
        );

        // Each PEM key is tagged with exactly its family (and curve).
        let tag = |name: &str| load_pem_key(&fixture(name)).unwrap().algs;
        assert_eq!(tag("ec256_public.pem"), AlgSet::P256);
        assert_eq!(tag("ec384_public.pem"), AlgSet::P384);
        assert_eq!(tag("ed25519_public.pem"), AlgSet::ED25519);
        assert_eq!(tag("rsa_public.pem"), AlgSet::RSA);

        // With both curves configured, the ES256 token still verifies (via the P-256 key).
        let v = Verifier::new(with_keys(
            &[Algorithm::ES256, Algorithm::ES384],
            &["ec384_public.pem", "ec256_public.pem"],
        ))
        .await
        .unwrap();
        let token = sign_pem(Algorithm::ES256, "ec256_private.pem", None, &claims("a"));
        assert!(check(&v, &token).await.is_ok());

        // A JWK marked RS256 is not used for PS256, although it is the same RSA key.
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = jwks_verifier(&server, &[Algorithm::RS256, Algorithm::PS256]).await;
        let token = sign_pem(
            Algorithm::PS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("a"),
        );
        assert_eq!(check(&v, &token).await, Err(AuthError::UnknownKey));
        assert_eq!(server.hits(), 1, "a known kid does not trigger a refetch");
    }

    /// Symmetric keys in a JWKS are ignored: HS tokens verify only with the env secret.
    #[tokio::test]
    async fn jwks_oct_keys_are_never_used() {
        let jwks_secret = b"secret-published-in-the-jwks-0123456789";
        let server = JwksServer::start(json!({ "keys": [
            { "kty": "oct", "kid": "h1", "k": URL_SAFE_NO_PAD.encode(jwks_secret) },
            jwk_for(Algorithm::RS256, "rsa_private.pem", "r1"),
        ]}))
        .await;
        let mut s = settings(&[Algorithm::RS256, Algorithm::HS256]);
        s.jwks_url = Some(server.url.clone());
        let v = Verifier::build(s, Some(SECRET.to_vec())).await.unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("h1".to_owned());
        let token = encode(
            &header,
            &claims("a"),
            &EncodingKey::from_secret(jwks_secret),
        )
        .unwrap();
        assert_eq!(check(&v, &token).await, Err(AuthError::BadSignature));
        assert_eq!(server.hits(), 1, "an HS kid never triggers a JWKS refetch");
    }

    /// A header with crit is refused (we implement no JWS extensions).
    #[tokio::test]
    async fn crit_header_is_refused() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".to_owned()]);
        let token = encode(&header, &claims("acme"), &EncodingKey::from_secret(SECRET)).unwrap();
        assert_eq!(check(&v, &token).await, Err(AuthError::CriticalHeader));
        let raw = sign_raw_hs(
            Algorithm::HS256,
            br#"{"alg":"HS256","crit":[]}"#,
            claims("a").to_string().as_bytes(),
            SECRET,
        );
        assert_eq!(check(&v, &raw).await, Err(AuthError::CriticalHeader));
    }

    /// Flipping a claim while keeping the signature fails, for HS and RS tokens alike.
    #[tokio::test]
    async fn tampered_payload_is_refused() {
        let v = Verifier::build(
            with_keys(&[Algorithm::HS256, Algorithm::RS256], &["rsa_public.pem"]),
            Some(SECRET.to_vec()),
        )
        .await
        .unwrap();
        let c = claims("alice");
        for token in [
            sign_hs(Algorithm::HS256, &c),
            sign_pem(Algorithm::RS256, "rsa_private.pem", None, &c),
        ] {
            assert!(check(&v, &token).await.is_ok());
            let mut flipped = c.clone();
            flipped["sub"] = json!("bob");
            let tampered = swap_payload(&token, flipped.to_string().as_bytes());
            assert_eq!(check(&v, &tampered).await, Err(AuthError::BadSignature));
        }
        // A different key of the same family does not verify either.
        let other = sign_pem(Algorithm::RS256, "rsa2_private.pem", None, &c);
        assert_eq!(check(&v, &other).await, Err(AuthError::BadSignature));
    }

    /// A correctly signed payload that is not a JSON object is refused as invalid claims.
    #[tokio::test]
    async fn non_object_claims_are_refused() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let header = br#"{"alg":"HS256"}"#;
        for payload in [&b"[1700000000]"[..], b"\"sub\"", b"foo", b""] {
            let token = sign_raw_hs(Algorithm::HS256, header, payload, SECRET);
            assert_eq!(
                check(&v, &token).await,
                Err(AuthError::InvalidClaims),
                "{payload:?}"
            );
        }
    }

    // === JWKS ===

    /// An unknown kid triggers exactly one refetch; within the cooldown a second unknown kid
    /// (even one the server now has) does not fetch again.
    #[tokio::test]
    async fn unknown_kid_refetches_once_then_cooldown() {
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = jwks_verifier(&server, &[Algorithm::RS256]).await;
        assert_eq!(server.hits(), 1, "initial fetch");

        let known = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("a"),
        );
        assert!(check(&v, &known).await.is_ok());
        assert_eq!(server.hits(), 1);

        let unknown = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("a"),
        );
        assert_eq!(check(&v, &unknown).await, Err(AuthError::UnknownKey));
        assert_eq!(server.hits(), 2, "exactly one refetch");

        server.answer(
            200,
            json!({ "keys": [
                jwk_for(Algorithm::RS256, "rsa_private.pem", "k1"),
                jwk_for(Algorithm::RS256, "rsa2_private.pem", "k2"),
            ]}),
        );
        assert_eq!(check(&v, &unknown).await, Err(AuthError::UnknownKey));
        let other = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k3"),
            &claims("a"),
        );
        assert_eq!(check(&v, &other).await, Err(AuthError::UnknownKey));
        assert_eq!(server.hits(), 2, "cooldown: no second refetch");
        assert_eq!(v.jwks_fetches(), 2);
    }

    /// A rotated-in key is picked up by the refetch an unknown kid triggers.
    #[tokio::test]
    async fn refetch_finds_rotated_key() {
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = jwks_verifier(&server, &[Algorithm::RS256]).await;
        server.answer(
            200,
            json!({ "keys": [
                jwk_for(Algorithm::RS256, "rsa_private.pem", "k1"),
                jwk_for(Algorithm::RS256, "rsa2_private.pem", "k2"),
            ]}),
        );
        let token = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("rotated"),
        );
        assert_eq!(check(&v, &token).await.unwrap().customer, "rotated");
        assert_eq!(server.hits(), 2);
    }

    /// Concurrent callers with an unknown kid share a single refetch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_unknown_kids_share_one_refetch() {
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = Arc::new(jwks_verifier(&server, &[Algorithm::RS256]).await);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16 {
            let v = Arc::clone(&v);
            let token = sign_pem(
                Algorithm::RS256,
                "rsa2_private.pem",
                Some(&format!("k{}", i + 2)),
                &claims("a"),
            );
            tasks.spawn(async move { check(&v, &token).await });
        }
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap(), Err(AuthError::UnknownKey));
        }
        assert_eq!(server.hits(), 2, "one initial fetch + one shared refetch");
    }

    /// A failed refetch keeps the old key set.
    #[tokio::test]
    async fn failed_refetch_keeps_old_keys() {
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = jwks_verifier(&server, &[Algorithm::RS256]).await;
        server.answer(500, json!({ "error": "boom" }));
        let unknown = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("a"),
        );
        assert_eq!(check(&v, &unknown).await, Err(AuthError::UnknownKey));
        assert_eq!(server.hits(), 2);
        let known = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("still-ok"),
        );
        assert_eq!(check(&v, &known).await.unwrap().customer, "still-ok");
        // A document without a usable key is a failure too, not an empty set.
        server.answer(200, json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }] }));
        assert!(v.refresh_jwks().await.is_err());
        let known = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("still-ok-2"),
        );
        assert!(check(&v, &known).await.is_ok());
    }

    /// A refetch that drops a key evicts the cached tokens it had verified.
    #[tokio::test]
    async fn dropped_key_evicts_cached_tokens() {
        let server = JwksServer::start(
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] }),
        )
        .await;
        let v = jwks_verifier(&server, &[Algorithm::RS256]).await;
        let old = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("old"),
        );
        assert!(check(&v, &old).await.is_ok());
        server.answer(
            200,
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa2_private.pem", "k2")] }),
        );
        let new = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("new"),
        );
        assert!(check(&v, &new).await.is_ok());
        assert_eq!(check(&v, &old).await, Err(AuthError::UnknownKey));
    }

    /// A failing first JWKS fetch is fatal only when no other key exists; a URL that is not
    /// http(s) is refused up front; errors name the URL.
    #[tokio::test]
    async fn first_jwks_fetch_failure() {
        let server = JwksServer::start(json!({ "error": "down" })).await;
        server.answer(503, json!({}));
        let mut s = settings(&[Algorithm::RS256]);
        s.jwks_url = Some(server.url.clone());
        let err = Verifier::new(s.clone()).await.unwrap_err();
        assert!(err.to_string().contains(&server.url), "{err}");

        s.public_key_files = vec![fixture("rsa_public.pem")];
        let v = Verifier::new(s).await.unwrap();
        let pem_token = sign_pem(Algorithm::RS256, "rsa_private.pem", None, &claims("pem"));
        assert!(check(&v, &pem_token).await.is_ok());
        // Later, the JWKS comes up: the first unknown kid loads it.
        server.answer(
            200,
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa2_private.pem", "k2")] }),
        );
        let jwks_token = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("jwks"),
        );
        assert_eq!(check(&v, &jwks_token).await.unwrap().customer, "jwks");

        let mut s = settings(&[Algorithm::RS256]);
        s.jwks_url = Some("ftp://issuer.example/jwks.json".to_owned());
        let err = Verifier::new(s).await.unwrap_err();
        assert!(
            err.to_string().contains("ftp://issuer.example/jwks.json")
                && err.to_string().contains("not supported"),
            "{err}"
        );
    }

    // === JWKS over HTTPS ===

    fn https_settings(server: &JwksServer, ca_file: Option<&str>) -> AuthSettings {
        let mut s = settings(&[Algorithm::RS256]);
        s.jwks_url = Some(server.url.clone());
        s.jwks_ca_file = ca_file.map(tls_fixture);
        s
    }

    fn rs256_jwks() -> Value {
        json!({ "keys": [jwk_for(Algorithm::RS256, "rsa_private.pem", "k1")] })
    }

    /// An https JWKS from a private CA loads (by IP and by DNS name) when auth.jwks_ca_file names
    /// that CA, its keys verify tokens, and an unknown kid refetches over TLS too.
    #[tokio::test]
    async fn https_jwks_with_private_ca_verifies() {
        let server = JwksServer::start_tls(rs256_jwks(), "server").await;
        assert!(
            server.url.starts_with("https://127.0.0.1:"),
            "{}",
            server.url
        );
        let v = Verifier::new(https_settings(&server, Some("ca.pem")))
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
        let token = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("tls"),
        );
        assert_eq!(check(&v, &token).await.unwrap().customer, "tls");

        server.answer(
            200,
            json!({ "keys": [jwk_for(Algorithm::RS256, "rsa2_private.pem", "k2")] }),
        );
        let rotated = sign_pem(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("k2"),
            &claims("k2"),
        );
        assert_eq!(check(&v, &rotated).await.unwrap().customer, "k2");
        assert_eq!(server.hits(), 2);

        // The certificate also names "localhost" (a DNS SAN rather than an IP SAN).
        let mut s = https_settings(&server, Some("ca.pem"));
        s.jwks_url = Some(server.url.replace("127.0.0.1", "localhost"));
        let v = Verifier::new(s).await.unwrap();
        assert_eq!(check(&v, &rotated).await.unwrap().customer, "k2");
    }

    /// With only the public roots a private-CA https JWKS is refused: setup fails (no other key)
    /// or its keys stay unknown (PEM keys present), and the error names the URL, says
    /// "UnknownIssuer" and points at auth.jwks_ca_file.
    #[tokio::test]
    async fn https_jwks_without_ca_names_the_certificate_problem() {
        let server = JwksServer::start_tls(rs256_jwks(), "server").await;
        let err = Verifier::new(https_settings(&server, None))
            .await
            .unwrap_err()
            .to_string();
        for needle in [
            server.url.as_str(),
            "invalid peer certificate: UnknownIssuer",
            "auth.jwks_ca_file",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        assert_eq!(err.matches(&server.url).count(), 1, "URL once: {err}");

        let mut s = https_settings(&server, None);
        s.public_key_files = vec![fixture("rsa2_public.pem")];
        let v = Verifier::new(s).await.unwrap();
        let token = sign_pem(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("k1"),
            &claims("tls"),
        );
        assert_eq!(check(&v, &token).await, Err(AuthError::UnknownKey));
        let err = v.refresh_jwks().await.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    /// A certificate from the trusted CA but for another name is refused, and the error says so.
    #[tokio::test]
    async fn https_jwks_certificate_for_another_name_is_refused() {
        let server = JwksServer::start_tls(rs256_jwks(), "wrong_name").await;
        let err = Verifier::new(https_settings(&server, Some("ca.pem")))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&server.url) && err.contains("certificate not valid for name"),
            "{err}"
        );
        assert!(
            !err.contains("jwks_ca_file"),
            "no CA hint for a name mismatch: {err}"
        );
    }

    /// A missing, empty, key-only or corrupt auth.jwks_ca_file is a setup error naming the file,
    /// even when other keys would let a failed JWKS fetch slide.
    #[tokio::test]
    async fn bad_jwks_ca_file_is_a_setup_error() {
        let server = JwksServer::start(rs256_jwks()).await;
        let garbage_cert = temp_pem(
            "garbage-ca",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let unterminated = temp_pem("unterminated-ca", "-----BEGIN CERTIFICATE-----\naGVsbG8=\n");
        let cases = [
            (tls_fixture("does_not_exist.pem"), "cannot read CA file"),
            (fixture("README.md"), "holds no PEM CERTIFICATE block"),
            (tls_fixture("ca_key.pem"), "holds no PEM CERTIFICATE block"),
            (
                garbage_cert.clone(),
                "certificate 1 is not usable as a CA: BadEncoding",
            ),
            (
                unterminated.clone(),
                "is not valid PEM: no END line for a CERTIFICATE block",
            ),
        ];
        for (path, want) in cases {
            let mut s = settings(&[Algorithm::RS256]);
            s.public_key_files = vec![fixture("rsa_public.pem")];
            s.jwks_url = Some(server.url.clone());
            s.jwks_ca_file = Some(path.clone());
            let err = Verifier::new(s).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthSetupError::CaFileRead { .. } | AuthSetupError::CaFile { .. }
                ),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&path.display().to_string())
                    && text.contains("auth.jwks_ca_file")
                    && text.contains(want),
                "{want:?} not in {text}"
            );
        }
        let _ = std::fs::remove_file(garbage_cert);
        let _ = std::fs::remove_file(unterminated);
    }

    // === customer and plan claims ===

    /// No usable customer claim → NoCustomerClaim; integers are stringified; 256 bytes is the cap.
    #[tokio::test]
    async fn customer_claim_rules() {
        // org_id rather than sub: jsonwebtoken itself refuses a non-string sub it cannot parse.
        let v = hs_verifier(AuthSettings {
            customer_claim: "org_id".to_owned(),
            ..settings(&[Algorithm::HS256])
        })
        .await;
        let exp = now() + 600;
        let missing = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "sub": "user" }));
        assert_eq!(check(&v, &missing).await, Err(AuthError::NoCustomerClaim));
        for bad in [
            json!(""),
            json!("x".repeat(257)),
            json!("a\u{0}b"),
            json!("line\nbreak"),
            json!(true),
            json!(1.5),
            json!({}),
            json!([]),
            json!(null),
        ] {
            let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": bad }));
            assert_eq!(
                check(&v, &token).await,
                Err(AuthError::NoCustomerClaim),
                "{bad}"
            );
        }
        let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": 42 }));
        assert_eq!(check(&v, &token).await.unwrap().customer, "42");
        let long = "é".repeat(128);
        let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": long }));
        assert_eq!(check(&v, &token).await.unwrap().customer, long);
    }

    /// A dotted customer_claim walks nested objects ("org.id"); a literal key of that name wins.
    #[tokio::test]
    async fn nested_customer_claim() {
        let mut s = settings(&[Algorithm::HS256]);
        s.customer_claim = "org.id".to_owned();
        let v = hs_verifier(s).await;
        let exp = now() + 600;
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "sub": "user", "org": { "id": "acme" } }),
        );
        assert_eq!(check(&v, &token).await.unwrap(), ident("acme", exp));
        let flat = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org": "acme" }));
        assert_eq!(check(&v, &flat).await, Err(AuthError::NoCustomerClaim));
        let literal = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "org.id": "lit", "org": { "id": "nested" } }),
        );
        assert_eq!(check(&v, &literal).await.unwrap().customer, "lit");
    }

    /// The token's plan is ignored unless plan_claim is configured.
    #[tokio::test]
    async fn plan_claim_only_when_configured() {
        let exp = now() + 600;
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "sub": "acme", "plan": "pro", "billing": { "plan": "team" } }),
        );
        let ignoring = hs_verifier(settings(&[Algorithm::HS256])).await;
        assert_eq!(check(&ignoring, &token).await.unwrap().plan, None);

        let mut s = settings(&[Algorithm::HS256]);
        s.plan_claim = Some("plan".to_owned());
        assert_eq!(
            check(&hs_verifier(s).await, &token)
                .await
                .unwrap()
                .plan
                .as_deref(),
            Some("pro")
        );

        let mut s = settings(&[Algorithm::HS256]);
        s.plan_claim = Some("billing.plan".to_owned());
        assert_eq!(
            check(&hs_verifier(s).await, &token)
                .await
                .unwrap()
                .plan
                .as_deref(),
            Some("team")
        );

        let mut s = settings(&[Algorithm::HS256]);
        s.plan_claim = Some("tier".to_owned());
        let id = check(&hs_verifier(s).await, &token).await.unwrap();
        assert_eq!(
            id,
            ident("acme", exp),
            "an absent plan claim is None, not an error"
        );
    }

    // === cache ===

    /// A cache hit returns the same identity without running the crypto again.
    #[tokio::test]
    async fn cache_hit_returns_same_identity() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let token = sign_hs(Algorithm::HS256, &claims("acme"));
        let first = check(&v, &token).await.unwrap();
        let second = check(&v, &token).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(
            v.verifications.load(Ordering::Relaxed),
            1,
            "the second call was a cache hit"
        );
        // The whole token is the key: a tampered variant is verified (and refused), not served.
        let tampered = swap_payload(&token, claims("mallory").to_string().as_bytes());
        assert_eq!(check(&v, &tampered).await, Err(AuthError::BadSignature));
        // Failures are never cached.
        assert_eq!(check(&v, &tampered).await, Err(AuthError::BadSignature));
        assert_eq!(v.verifications.load(Ordering::Relaxed), 3);
    }

    /// A cached token is dropped at its exp and then refused as expired.
    #[tokio::test]
    async fn expired_cached_token_is_rejected() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let exp = now() + 1;
        let token = sign_hs(Algorithm::HS256, &json!({ "sub": "acme", "exp": exp }));
        assert!(check(&v, &token).await.is_ok());
        assert_eq!(v.cache.map.len(), 1);
        while now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(check(&v, &token).await, Err(AuthError::Expired));
        assert_eq!(v.cache.map.len(), 0);
    }

    /// The cache is bounded: at the limit it sweeps expired entries, and clears if that is not
    /// enough.
    #[test]
    fn cache_is_bounded() {
        let cache = TokenCache::new(10);
        let id = |exp| ident("c", exp);
        for i in 0..10 {
            cache.insert(&format!("short-{i}"), &id(105), 100);
        }
        assert_eq!(cache.map.len(), 10);
        cache.insert("later", &id(500), 200);
        assert_eq!(cache.map.len(), 1, "expired entries swept");
        for i in 0..9 {
            cache.insert(&format!("live-{i}"), &id(500), 200);
        }
        assert_eq!(cache.map.len(), 10);
        cache.insert("overflow", &id(500), 200);
        assert_eq!(cache.map.len(), 1, "cleared when nothing could be swept");
        assert!(cache.get("overflow", 200).is_some());
        assert!(cache.get("overflow", 500).is_none(), "not served at exp");
    }

    // === minting ===

    /// mint_hs uses the first allowed HS algorithm and writes nested customer, exp, iat, iss, aud.
    #[tokio::test]
    async fn mint_hs_round_trips() {
        let mut s = settings(&[Algorithm::RS256, Algorithm::HS384, Algorithm::HS256]);
        s.public_key_files = vec![fixture("rsa_public.pem")];
        s.customer_claim = "org.id".to_owned();
        s.issuer = Some("tollgate".to_owned());
        s.audience = vec!["api".to_owned()];
        let v = hs_verifier(s).await;
        let before = now();
        let token = v.mint_hs("acme", 3600).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().alg,
            Algorithm::HS384
        );
        let id = check(&v, &token).await.unwrap();
        assert_eq!(id.customer, "acme");
        assert!((before + 3600..=now() + 3600).contains(&id.expires_at));
        let claims: Value = serde_json::from_slice(&payload_of(&token)).unwrap();
        assert_eq!(claims["org"]["id"], "acme");
        assert_eq!(claims["iss"], "tollgate");
        assert_eq!(claims["aud"], "api");
        assert!(claims["iat"].as_u64().unwrap() >= before);

        assert!(matches!(v.mint_hs("", 60), Err(AuthSetupError::Mint(_))));
        let rs = Verifier::new(with_keys(&[Algorithm::RS256], &["rsa_public.pem"]))
            .await
            .unwrap();
        assert!(matches!(
            rs.mint_hs("acme", 60),
            Err(AuthSetupError::Mint(_))
        ));
    }

    // === setup ===

    /// The HS secret is read from the named env var; a missing var is an error naming it.
    #[tokio::test]
    async fn secret_env_is_read_and_named_in_errors() {
        // cargo sets CARGO_PKG_NAME for test runs: a real env var without mutating the environment.
        let mut s = settings(&[Algorithm::HS256]);
        s.secret_env = Some("CARGO_PKG_NAME".to_owned());
        let v = Verifier::new(s).await.unwrap();
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims("env"),
            &EncodingKey::from_secret(env!("CARGO_PKG_NAME").as_bytes()),
        )
        .unwrap();
        assert_eq!(check(&v, &token).await.unwrap().customer, "env");
        assert!(check(&v, &v.mint_hs("minted", 60).unwrap()).await.is_ok());

        let mut s = settings(&[Algorithm::HS256]);
        s.secret_env = Some("TOLLGATE_AUTH_TEST_SURELY_UNSET_7f3a".to_owned());
        let err = Verifier::new(s).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("TOLLGATE_AUTH_TEST_SURELY_UNSET_7f3a"),
            "{err}"
        );
    }

    /// A base64: prefix means binary; bad base64 and empty secrets are errors naming the var.
    #[test]
    fn secret_parsing() {
        assert_eq!(parse_secret("V", "plain").unwrap(), b"plain");
        assert_eq!(
            parse_secret("V", "base64:AAEC/w==").unwrap(),
            vec![0, 1, 2, 255]
        );
        let err = parse_secret("MY_SECRET", "base64:!!").unwrap_err();
        assert!(
            matches!(err, AuthSetupError::SecretEnvBase64 { .. })
                && err.to_string().contains("MY_SECRET")
        );
        assert!(matches!(
            parse_secret("V", ""),
            Err(AuthSetupError::SecretEnvEmpty { .. })
        ));
        assert!(matches!(
            parse_secret("V", "base64:"),
            Err(AuthSetupError::SecretEnvEmpty { .. })
        ));
    }

    /// Bad settings and key files are refused at build time with the file or setting named.
    #[tokio::test]
    async fn setup_errors() {
        let err = Verifier::new(settings(&[])).await.unwrap_err();
        assert!(matches!(err, AuthSetupError::NoAlgorithms));
        let err = Verifier::new(settings(&[Algorithm::HS256]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthSetupError::NoSecret {
                    alg: Algorithm::HS256
                }
            ),
            "{err}"
        );
        let err = Verifier::new(settings(&[Algorithm::RS256]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthSetupError::NoKeyForAlgorithm {
                    alg: Algorithm::RS256
                }
            ),
            "{err}"
        );

        let err = Verifier::new(with_keys(&[Algorithm::RS256], &["does_not_exist.pem"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthSetupError::KeyFileRead { .. })
                && err.to_string().contains("does_not_exist.pem"),
            "{err}"
        );
        let err = Verifier::new(with_keys(&[Algorithm::RS256], &["rsa_private.pem"]))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("rsa_private.pem") && err.to_string().contains("private key"),
            "{err}"
        );
        let not_pem = temp_pem("not-pem", "hello");
        let err = Verifier::new(AuthSettings {
            public_key_files: vec![not_pem.clone()],
            ..settings(&[Algorithm::RS256])
        })
        .await
        .unwrap_err();
        assert!(matches!(err, AuthSetupError::KeyFile { .. }), "{err}");
        let _ = std::fs::remove_file(not_pem);

        let mut s = settings(&[Algorithm::HS256]);
        s.customer_claim = "org..id".to_owned();
        assert!(matches!(
            Verifier::build(s, Some(SECRET.to_vec())).await,
            Err(AuthSetupError::ClaimPath { .. })
        ));
        let mut s = settings(&[Algorithm::HS256]);
        s.plan_claim = Some(String::new());
        assert!(matches!(
            Verifier::build(s, Some(SECRET.to_vec())).await,
            Err(AuthSetupError::ClaimPath { .. })
        ));
        let mut s = settings(&[Algorithm::HS256]);
        s.leeway_seconds = u64::MAX;
        assert!(matches!(
            Verifier::build(s, Some(SECRET.to_vec())).await,
            Err(AuthSetupError::Leeway(_))
        ));
    }

    /// Debug output never shows key material.
    #[tokio::test]
    async fn debug_redacts_secret() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let text = format!("{v:?}");
        assert!(
            text.contains("[redacted]") && !text.contains("tollgate-test-secret"),
            "{text}"
        );
    }

    // === third-party vectors ===

    /// RFC 7515 Appendix A: the HS256, RS256 and ES256 examples verify (exp 2011, so a large
    /// leeway), tampering fails, ES512 and alg none are refused.
    #[tokio::test]
    async fn rfc7515_appendix_a() {
        let doc = read_jwt_fixture("rfc7515_appendix_a.json");
        let ex = &doc["examples"];
        let exp = 1_300_819_380;
        let leeway = now() - exp + 3600;
        let joe = ident("joe", exp);
        let compact = |name: &str| ex[name]["compact"].as_str().unwrap().to_owned();
        let tamper = |token: &str| {
            let payload = String::from_utf8(payload_of(token))
                .unwrap()
                .replace("joe", "eve");
            swap_payload(token, payload.as_bytes())
        };
        let rfc_settings = |algs: &[Algorithm]| AuthSettings {
            customer_claim: "iss".to_owned(),
            leeway_seconds: leeway,
            ..settings(algs)
        };

        // A.1 HS256 with the 64-byte key k.
        let secret = URL_SAFE_NO_PAD
            .decode(ex["A1"]["key"]["k"].as_str().unwrap())
            .unwrap();
        let v = Verifier::build(rfc_settings(&[Algorithm::HS256]), Some(secret.clone()))
            .await
            .unwrap();
        assert_eq!(check(&v, &compact("A1")).await.unwrap(), joe);
        assert_eq!(
            check(&v, &tamper(&compact("A1"))).await,
            Err(AuthError::BadSignature)
        );
        let strict = Verifier::build(settings(&[Algorithm::HS256]), Some(secret))
            .await
            .unwrap();
        assert_eq!(
            check(&strict, &compact("A1")).await,
            Err(AuthError::Expired)
        );

        // A.2 RS256 and A.3 ES256 with their PEMs.
        let rsa = temp_pem(
            "a2",
            ex["A2"]["derived_public_key_pem_spki"].as_str().unwrap(),
        );
        let ec = temp_pem(
            "a3",
            ex["A3"]["derived_public_key_pem_spki"].as_str().unwrap(),
        );
        let mut s = rfc_settings(&[Algorithm::RS256, Algorithm::ES256]);
        s.public_key_files = vec![rsa.clone(), ec.clone()];
        let v = Verifier::new(s).await.unwrap();
        for name in ["A2", "A3"] {
            assert_eq!(check(&v, &compact(name)).await.unwrap(), joe, "{name}");
            assert_eq!(
                check(&v, &tamper(&compact(name))).await,
                Err(AuthError::BadSignature),
                "{name}"
            );
        }
        // A.4 is ES512 (jsonwebtoken has none), A.5 is alg none.
        assert_eq!(
            check(&v, &compact("A4")).await,
            Err(AuthError::DisallowedAlgorithm)
        );
        assert_eq!(
            check(&v, &compact("A5")).await,
            Err(AuthError::DisallowedAlgorithm)
        );
        let _ = (std::fs::remove_file(rsa), std::fs::remove_file(ec));

        // A.2 and A.3 again, keys from the derived JWKS (tokens without kid try every key).
        let server = JwksServer::start(doc["derived_jwks_public"].clone()).await;
        let mut s = rfc_settings(&[Algorithm::RS256, Algorithm::ES256]);
        s.jwks_url = Some(server.url.clone());
        let v = Verifier::new(s).await.unwrap();
        for name in ["A2", "A3"] {
            assert_eq!(
                check(&v, &compact(name)).await.unwrap(),
                joe,
                "{name} via JWKS"
            );
            assert_eq!(
                check(&v, &tamper(&compact(name))).await,
                Err(AuthError::BadSignature),
                "{name}"
            );
        }
    }

    /// Wycheproof JWS vectors: every "invalid" case is refused before the claims stage, every
    /// "valid" one passes the signature (its payload is not JWT claims, so it then fails there).
    #[tokio::test]
    async fn wycheproof_signature_vectors() {
        let doc = read_jwt_fixture("wycheproof_json_web_signature_subset.json");
        let (mut invalid_checked, mut valid_checked, mut skipped) = (0usize, 0usize, 0usize);
        let mut servers = Vec::new();
        for group in doc["testGroups"].as_array().unwrap() {
            let tests = group["tests"].as_array().unwrap();
            let key = group
                .get("public")
                .or_else(|| group.get("private"))
                .unwrap();
            let Some(alg) = key["alg"]
                .as_str()
                .and_then(|alg| Algorithm::from_str(alg).ok())
            else {
                skipped += tests.len();
                continue;
            };
            // The group's key, expressed as our settings allow: HS secret or a JWKS.
            let verifier = if AlgSet::HMAC.contains(alg) {
                let secret = URL_SAFE_NO_PAD.decode(key["k"].as_str().unwrap()).unwrap();
                Verifier::build(settings(&[alg]), Some(secret))
                    .await
                    .unwrap()
            } else {
                let server = JwksServer::start(json!({ "keys": [group["public"].clone()] })).await;
                let v = jwks_verifier(&server, &[alg]).await;
                servers.push(server);
                v
            };
            for case in tests {
                let (Some(jws), Some(expected)) = (case["jws"].as_str(), case["result"].as_str())
                else {
                    skipped += 1;
                    continue;
                };
                let result = check(&verifier, jws).await;
                let past_signature = matches!(
                    result,
                    Ok(_)
                        | Err(AuthError::InvalidClaims
                            | AuthError::MissingClaim(_)
                            | AuthError::NoCustomerClaim
                            | AuthError::Expired
                            | AuthError::NotYetValid)
                );
                let id = &case["tcId"];
                match expected {
                    "invalid" => {
                        assert!(
                            !past_signature,
                            "tcId {id} ({}): accepted: {result:?}",
                            case["comment"]
                        );
                        invalid_checked += 1;
                    }
                    "valid" => {
                        assert!(
                            past_signature,
                            "tcId {id} ({}): refused: {result:?}",
                            case["comment"]
                        );
                        valid_checked += 1;
                    }
                    _ => skipped += 1,
                }
            }
        }
        println!("wycheproof: {invalid_checked} invalid + {valid_checked} valid cases checked, {skipped} skipped");
        assert!(invalid_checked > 0 && valid_checked > 0);
    }

    // === robustness ===

    /// verify never panics: thousands of mutated tokens and odd headers all return.
    #[tokio::test]
    async fn never_panics_on_mutated_input() {
        let v = Verifier::build(
            with_keys(
                &[Algorithm::HS256, Algorithm::RS256, Algorithm::ES256],
                &["rsa_public.pem", "ec256_public.pem"],
            ),
            Some(SECRET.to_vec()),
        )
        .await
        .unwrap();
        let seeds = [
            sign_hs(Algorithm::HS256, &claims("a")),
            sign_pem(Algorithm::RS256, "rsa_private.pem", Some("k"), &claims("a")),
            sign_pem(Algorithm::ES256, "ec256_private.pem", None, &claims("a")),
        ];
        let alphabet = b"AZaz09-_.=+/ \t\x00\xff{}\"";
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let mut bytes = format!("Bearer {}", seeds[round % seeds.len()]).into_bytes();
            for _ in 0..(1 + next() % 3) {
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = alphabet[(next() as usize) % alphabet.len()],
                    1 => bytes.truncate(at.max(1)),
                    _ => bytes.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                }
            }
            let _ = v.verify(Some(&bytes)).await;
        }
    }

    /// The verify future is Send (pingora's async traits need it) and Verifier is Send + Sync.
    #[tokio::test]
    async fn verify_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Verifier>();
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let future = v.verify(None);
        assert_send(&future);
        assert_eq!(future.await, Err(AuthError::Missing));
    }

    /// Every error has a description, and only Missing/UnsupportedScheme count as missing.
    #[test]
    fn descriptions_and_is_missing() {
        let all = [
            AuthError::Missing,
            AuthError::UnsupportedScheme,
            AuthError::Malformed,
            AuthError::DisallowedAlgorithm,
            AuthError::CriticalHeader,
            AuthError::UnknownKey,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingClaim("exp"),
            AuthError::MissingClaim("iss"),
            AuthError::MissingClaim("aud"),
            AuthError::InvalidClaims,
            AuthError::NoCustomerClaim,
        ];
        for err in &all {
            assert!(!err.description().is_empty());
            assert_eq!(err.to_string(), err.description());
            assert_eq!(
                err.is_missing(),
                matches!(err, AuthError::Missing | AuthError::UnsupportedScheme)
            );
        }
    }
}
