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
//!
//! Layout (each file's own doc says what it owns and must not touch):
//! - `mod.rs` (this file): the public types and the verify flow: the bearer header, the JWS header
//!   checks, the choice of candidate keys, jsonwebtoken's signature and registered-claim checks,
//!   and the cache lookup around them.
//! - `error.rs`: [`AuthError`] and [`AuthSetupError`], the contract with the denial mapping.
//! - `keys.rs`: the HS secret, PEM public keys, and the algorithm family of each key.
//! - `jwks.rs`: the JWKS client, its TLS trust, and the refetch with its cooldown.
//! - `claims.rs`: claim paths, the customer/plan values, `exp` as a number.
//! - `cache.rs`: the verified-token cache.
//! - `mint.rs`: [`Verifier::mint_hs`].
//! - `tests/`: the end-to-end tests and the helpers all the tests share.

// `pub` only for benches/token_cache.rs, which measures it against cache crates; not an API.
#[doc(hidden)]
pub mod cache;
mod claims;
mod error;
mod jwks;
mod keys;
mod mint;
#[cfg(test)]
mod tests;

pub use error::{AuthError, AuthSetupError};

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use cache::TokenCache;
use claims::ClaimRules;
use jwks::Jwks;
use keys::{alg_index, load_pem_key, read_secret_env, AlgSet, VerifyKey, ALG_COUNT, ALL_ALGS};

/// Longer bearer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Verified-token cache bound; on overflow expired entries are swept, and if that is not enough
/// the cache is cleared (a clear only costs one verification per live token).
const CACHE_MAX_ENTRIES: usize = 100_000;
/// jsonwebtoken computes `now - leeway` unchecked: a leeway above the current time would overflow.
const MAX_LEEWAY_SECONDS: u64 = 1_000_000_000;

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

/// Loads/holds keys; verifies tokens. Cheap to share (`Arc<Verifier>`): `Send + Sync`, and every
/// method takes `&self`.
///
/// The contract: [`Verifier::new`] fails on any setting it cannot honour (naming the setting, env
/// var, file or URL); [`Verifier::verify`] then turns an `Authorization` value into an
/// [`Identity`] or an [`AuthError`], with no I/O other than the rate-limited JWKS refetch.
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
    /// Where the customer and plan are read from the claims.
    claims: ClaimRules,
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
        let claims = ClaimRules::new(&settings.customer_claim, settings.plan_claim.as_deref())?;

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
            claims,
            issuer: settings.issuer,
            audience: settings.audience,
            cache,
            verifications: AtomicU64::new(0),
        })
    }

    /// Verifies the value of an `Authorization` header (None = header absent).
    /// Accepts "Bearer <jwt>" (scheme case-insensitive). Never panics on any input.
    ///
    /// A token that verified before and has not reached its `exp` is answered from the cache;
    /// otherwise its signature and registered claims are checked, and a token naming a `kid` the
    /// JWKS lacks triggers at most one shared refetch per 30 s. Only successes are cached. The
    /// future is `Send`.
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
                url: jwks.url().to_owned(),
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
            Ok(data) => Step::Done(self.claims.identity(&data.claims)),
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

    #[cfg(test)]
    fn jwks_fetches(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |jwks| jwks.fetches())
    }
}

impl std::fmt::Debug for Verifier {
    // Hand-written so no key material can reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.algorithms)
            .field("hs_secret", &self.hs_key.as_ref().map(|_| "[redacted]"))
            .field("public_keys", &self.static_keys.len())
            .field("jwks_url", &self.jwks.as_ref().map(|jwks| jwks.url()))
            .field("cached_tokens", &self.cache.len())
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
