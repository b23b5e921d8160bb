//! Keys: the HS secret from the environment, PEM public keys, and which algorithms a key may
//! serve.
//!
//! Owns: reading `auth.secret_env` (raw bytes, or binary after a `base64:` prefix), loading
//! `auth.public_key_files` (SPKI or PKCS#1 `PUBLIC KEY` PEMs; private keys and certificates are
//! refused with a hint), the key rules (RSA 2048..=8192 bits; EC only on P-256/P-384; Ed25519), and
//! the algorithm families ([`AlgSet`]): a key is tagged with the algorithms of its own family (and
//! curve), and is never tried with any other.
//!
//! Must not touch: the network (JWKS keys are fetched in `jwks.rs`, which uses the same rules
//! through [`AlgSet`] and [`rsa_bits_ok`]), tokens, or the error texts' settings names beyond
//! naming the file or env var at fault.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthSetupError;

/// aws-lc verifies RSA only with 2048..=8192-bit moduli; a smaller key would silently never verify.
pub(super) const RSA_MIN_BITS: usize = 2048;
pub(super) const RSA_MAX_BITS: usize = 8192;

pub(super) const ALG_COUNT: usize = 12;
pub(super) const ALL_ALGS: [Algorithm; ALG_COUNT] = [
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

pub(super) fn alg_index(alg: Algorithm) -> usize {
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
pub(super) struct AlgSet(u16);

impl AlgSet {
    pub(super) const HMAC: AlgSet = AlgSet(0b111);
    pub(super) const RSA: AlgSet = AlgSet(0b1_1111_1000);
    pub(super) const P256: AlgSet = AlgSet(1 << 9);
    pub(super) const P384: AlgSet = AlgSet(1 << 10);
    pub(super) const ED25519: AlgSet = AlgSet(1 << 11);

    pub(super) fn one(alg: Algorithm) -> AlgSet {
        AlgSet(1 << alg_index(alg))
    }

    pub(super) fn of(algs: &[Algorithm]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |bits, &alg| bits | AlgSet::one(alg).0))
    }

    pub(super) fn contains(self, alg: Algorithm) -> bool {
        self.0 & AlgSet::one(alg).0 != 0
    }

    pub(super) fn intersects(self, other: AlgSet) -> bool {
        self.0 & other.0 != 0
    }
}

/// One verification key and the algorithms it may be used with (its family, and for EC its curve).
pub(super) struct VerifyKey {
    pub(super) kid: Option<String>,
    pub(super) algs: AlgSet,
    pub(super) key: DecodingKey,
}

pub(super) fn read_secret_env(var: &str) -> Result<Vec<u8>, AuthSetupError> {
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
pub(super) fn load_pem_key(path: &Path) -> Result<VerifyKey, AuthSetupError> {
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
pub(super) fn ec_point_algs(point: &[u8]) -> Option<AlgSet> {
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
pub(super) fn integer_bits(bytes: &[u8]) -> Option<usize> {
    let start = bytes.iter().position(|&b| b != 0)?;
    let significant = &bytes[start..];
    let leading = significant.first()?.leading_zeros() as usize;
    Some(significant.len() * 8 - leading)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::auth::tests::server::{jwks_verifier, JwksServer};
    use crate::auth::tests::*;
    use crate::auth::{AuthError, Verifier};

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
}
