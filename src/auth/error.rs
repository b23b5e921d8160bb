//! The two error types of `auth`: [`AuthError`] (a request's credentials were refused: always a 401)
//! and [`AuthSetupError`] (a [`super::Verifier`] could not be built, or a token not minted).
//!
//! Owns: the variants and their texts. [`AuthError::description`] and [`AuthError::is_missing`] are
//! what the denial-mapping module turns into the problem+json `detail`, the RFC 6750
//! `error_description` and the choice of `WWW-Authenticate` attributes.
//!
//! Must not touch: HTTP (no status codes or headers here), and no key material: no message may
//! carry a secret or a token.

use std::path::PathBuf;

use jsonwebtoken::Algorithm;

use super::MAX_LEEWAY_SECONDS;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

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
