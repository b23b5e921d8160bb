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
//! through [`AlgSet`], [`rsa_modulus_ok`] and [`ec_point_fits`]), tokens, or the error texts' settings names beyond
//! naming the file or env var at fault.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use pem::PemError;
use pkcs1::{RsaPublicKey, UintRef};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};

use super::AuthSetupError;

/// aws-lc verifies RSA only with 2048..=8192-bit moduli; a smaller key would silently never verify.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

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
    let bytes = std::fs::read(path).map_err(|source| AuthSetupError::KeyFileRead {
        path: path.to_owned(),
        source,
    })?;
    // The first block counts, as it does for jsonwebtoken's own PEM functions.
    let block = pem::parse(&bytes).map_err(|err| {
        bad(match err {
            PemError::MalformedFraming | PemError::MissingBeginTag | PemError::MissingEndTag => {
                "has no PEM block (-----BEGIN ...-----)"
            }
            _ => {
                "has a PEM block that does not decode (bad base64, or BEGIN and END labels differ)"
            }
        })
    })?;
    let (algs, key) = match block.tag() {
        "PUBLIC KEY" => spki_key(block.contents()).map_err(bad)?,
        "RSA PUBLIC KEY" => {
            let rsa = RsaPublicKey::try_from(block.contents()).map_err(|_| bad(NOT_SUPPORTED))?;
            if !rsa_modulus_ok(rsa.modulus) {
                return Err(bad(RSA_BITS));
            }
            (AlgSet::RSA, DecodingKey::from_rsa_der(block.contents()))
        }
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
    };
    Ok(VerifyKey {
        kid: None,
        algs,
        key,
    })
}

const NOT_SUPPORTED: &str = "is not an RSA, EC (P-256/P-384) or Ed25519 public key";
const RSA_BITS: &str = "is not a 2048..=8192-bit RSA key";

/// `rsaEncryption` (RFC 8017): the algorithm of an SPKI holding a PKCS#1 `RSAPublicKey`.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-ecPublicKey` (RFC 5480): the curve is the algorithm's parameter.
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (P-256) and `secp384r1` (P-384) (RFC 5480).
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `id-Ed25519` (RFC 8410).
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The key in a DER `SubjectPublicKeyInfo` (RFC 5280), told by its algorithm OID: RSA (PKCS#1
/// inside), EC on P-256/P-384 (an uncompressed point), or Ed25519 (32 bytes).
fn spki_key(der: &[u8]) -> Result<(AlgSet, DecodingKey), &'static str> {
    let spki = SubjectPublicKeyInfoRef::try_from(der).map_err(|_| NOT_SUPPORTED)?;
    let key = spki.subject_public_key.as_bytes().ok_or(NOT_SUPPORTED)?;
    let oid = spki.algorithm.oid;
    if oid == RSA_ENCRYPTION {
        match RsaPublicKey::try_from(key) {
            Ok(rsa) if rsa_modulus_ok(rsa.modulus) => {
                Ok((AlgSet::RSA, DecodingKey::from_rsa_der(key)))
            }
            _ => Err(RSA_BITS),
        }
    } else if oid == EC_PUBLIC_KEY {
        let curve = match spki.algorithm.parameters_oid() {
            Ok(curve) if curve == SECP256R1 => AlgSet::P256,
            Ok(curve) if curve == SECP384R1 => AlgSet::P384,
            _ => return Err("is an EC key on a curve other than P-256/P-384"),
        };
        if !ec_point_fits(curve, key) {
            return Err("is an EC key whose point is not an uncompressed point of its curve");
        }
        Ok((curve, DecodingKey::from_ec_der(key)))
    } else if oid == ED25519 {
        if key.len() != 32 {
            return Err("is not an Ed25519 key");
        }
        Ok((AlgSet::ED25519, DecodingKey::from_ed_der(key)))
    } else {
        Err(NOT_SUPPORTED)
    }
}

/// Whether an EC public key is an uncompressed point (`04 || x || y`) of `curve`'s size, the only
/// form jsonwebtoken's ES256/ES384 verification takes.
pub(super) fn ec_point_fits(curve: AlgSet, point: &[u8]) -> bool {
    let coordinate = match curve {
        AlgSet::P256 => 32,
        AlgSet::P384 => 48,
        _ => return false,
    };
    point.first() == Some(&4) && point.len() == 1 + 2 * coordinate
}

/// Whether an RSA modulus is within aws-lc's 2048..=8192 bits. `UintRef` has already dropped the
/// leading zero bytes.
pub(super) fn rsa_modulus_ok(modulus: UintRef<'_>) -> bool {
    let bytes = modulus.as_bytes();
    let bits = bytes
        .first()
        .map_or(0, |first| bytes.len() * 8 - first.leading_zeros() as usize);
    (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};

    use super::*;
    use crate::auth::tests::server::{jwks_verifier, rs256_jwks, JwksServer, K1};
    use crate::auth::tests::*;
    use crate::auth::{AuthError, AuthSettings, Verifier};

    /// Throwaway public keys (OpenSSL 3.0) of kinds the fixtures do not cover.
    const RSA_1024: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDAM70Lxrm7EJjVQTryuvBTM88J
2bFWCkqRO7zyo9qVx4GkHaLeOTCstSg2ku/LqfqpSfUSuvjc0HSYuF3ignZLy5qy
Q/5uS+k0Unu9miGIbvHdCeprgTrV1AlaioBrnosOiawACepGuFo/kniYf4vpgsvx
x/785txJiMbG29nRiwIDAQAB
-----END PUBLIC KEY-----
";
    const SECP256K1: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAESf5xWxdAYCI0h63QQuFV730M3zRnazuf
IS092T82I6mfBZL2lZTY0sN5RMAAeeMmd6VjIXDhPGfKp+OFjKTZtA==
-----END PUBLIC KEY-----
";
    const P256_COMPRESSED: &str = "-----BEGIN PUBLIC KEY-----
MDkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDIgAC4TZkYD5Mbxc+8Bo6n2eb0BjQk8lH
sU+9YQ6EILePotQ=
-----END PUBLIC KEY-----
";
    const X25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VuAyEAbw/jI/OKARkijGZG8ow454HJGmOqycbuaxcr+4yKl1g=
-----END PUBLIC KEY-----
";
    const ED448: &str = "-----BEGIN PUBLIC KEY-----
MEMwBQYDK2VxAzoAUuXXO1RMA1KB5XJ+TsANd9M7hVP64hwcWa7/Ijjh6YqQU8xH
Jh0GCl8CA331qhv09ZfwSUINJjgA
-----END PUBLIC KEY-----
";
    /// `rsa_public.pem` as PKCS#1 (`openssl rsa -pubin -RSAPublicKey_out`).
    const RSA_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAy1a3xeIpWaa40s6B7gmSIvRpHx1/i9zvuNuhHT6EKAHl2pXg4ocu
AC9ShMcwGXbdCD2IvawWI3IJlBkH3bO9DsIq1KQd7t/w8u0K4seqOGjTkIUVE5V0
N4fDPPcRJTLtvb06EwVHZhLsLIRAqtL80xhbpM1XFakC/rLvziSvvSSMtvY3BpsM
R69ToqAUGOGKUS5vAvL2SNuxfQKwybuarsa2rFm7K5/8YqXiWsUmbnBxsJ4LDgoM
bCj/+xa4wqRJvEVNjnOcT41krCeIvb7YvAIhsV8+1xW8k8I8DguUNllAAMGl8cCh
H0i15IWx99WHD+jBbftvz/rjMxgDg/NSaQIDAQAB
-----END RSA PUBLIC KEY-----
";

    /// Every kind of PEM file gets its own verdict, and a refusal names the file and says why.
    #[test]
    fn pem_key_rules() {
        let cases: [(&str, &str, Result<AlgSet, &str>); 11] = [
            ("pkcs1", RSA_PKCS1, Ok(AlgSet::RSA)),
            ("rsa1024", RSA_1024, Err("is not a 2048..=8192-bit RSA key")),
            (
                "secp256k1",
                SECP256K1,
                Err("on a curve other than P-256/P-384"),
            ),
            ("p256c", P256_COMPRESSED, Err("not an uncompressed point")),
            (
                "x25519",
                X25519,
                Err("is not an RSA, EC (P-256/P-384) or Ed25519"),
            ),
            (
                "ed448",
                ED448,
                Err("is not an RSA, EC (P-256/P-384) or Ed25519"),
            ),
            ("hello", "hello", Err("has no PEM block")),
            (
                "unended",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n",
                Err("has no PEM block"),
            ),
            (
                "badb64",
                "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
                Err("does not decode"),
            ),
            (
                "eclabel",
                "-----BEGIN EC PUBLIC KEY-----\nAAAA\n-----END EC PUBLIC KEY-----\n",
                Err("is not a PUBLIC KEY PEM block"),
            ),
            (
                "garbage",
                "-----BEGIN PUBLIC KEY-----\naGVsbG8=\n-----END PUBLIC KEY-----\n",
                Err("is not an RSA, EC (P-256/P-384) or Ed25519"),
            ),
        ];
        for (name, pem, want) in cases {
            let path = temp_pem(&format!("key-rules-{name}"), pem);
            let got = load_pem_key(&path);
            let _ = std::fs::remove_file(&path);
            match (got, want) {
                (Ok(key), Ok(algs)) => assert_eq!(key.algs, algs, "{name}"),
                (Err(err), Err(reason)) => {
                    let text = err.to_string();
                    assert!(
                        matches!(err, AuthSetupError::KeyFile { .. })
                            && text.contains(&path.display().to_string())
                            && text.contains("auth.public_key_files")
                            && text.contains(reason),
                        "{name}: {reason:?} not in {text}"
                    );
                }
                (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|key| key.algs)),
            }
        }
        let refusal = |path: &Path| {
            load_pem_key(path)
                .map(|key| key.algs)
                .unwrap_err()
                .to_string()
        };
        let err = refusal(&tls_fixture("ca.pem"));
        assert!(err.contains("holds a certificate"), "{err}");
        let err = refusal(&fixture("ec256_private.pem"));
        assert!(err.contains("holds a private key"), "{err}");
    }

    /// A PKCS#1 `RSA PUBLIC KEY` file verifies the same tokens as its SPKI form.
    #[tokio::test]
    async fn pkcs1_rsa_public_key_verifies() {
        let path = temp_pem("pkcs1-verifies", RSA_PKCS1);
        let v = Verifier::new(AuthSettings {
            public_key_files: vec![path.clone()],
            ..settings(&[Algorithm::RS256, Algorithm::PS256])
        })
        .await
        .unwrap();
        let _ = std::fs::remove_file(path);
        for alg in [Algorithm::RS256, Algorithm::PS256] {
            let token = sign_pem(alg, "rsa_private.pem", None, &claims("pkcs1"));
            assert_eq!(
                check(&v, &token).await.unwrap().customer,
                "pkcs1",
                "{alg:?}"
            );
        }
    }

    /// The RSA size rule counts significant bits: leading zero bytes do not count, and the bounds
    /// 2048 and 8192 are both accepted.
    #[test]
    fn rsa_modulus_bounds() {
        let ok = |bytes: &[u8]| rsa_modulus_ok(UintRef::new(bytes).unwrap());
        let mut n = vec![0u8; 256];
        n[0] = 0x80;
        assert!(ok(&n), "2048 bits");
        n[0] = 0x7f;
        assert!(!ok(&n), "2047 bits");
        n.insert(0, 0);
        n[1] = 0x80;
        assert!(ok(&n), "2048 bits after a zero byte");
        let mut n = vec![0xffu8; 1024];
        assert!(ok(&n), "8192 bits");
        n.insert(0, 1);
        assert!(!ok(&n), "8193 bits");
        assert!(!ok(&[0, 0]), "zero");
        assert!(!ok(&[]), "empty");
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
        let server = JwksServer::start(rs256_jwks(&[K1])).await;
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
