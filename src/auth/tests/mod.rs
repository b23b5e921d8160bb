//! Tests of the verify flow as a whole, and the helpers every `auth` test shares (settings, signing,
//! fixtures; `server` has the local JWKS endpoint). Unit tests of one part sit at the bottom of that
//! part's file; the JWKS tests (`jwks`) and the third-party vectors (`vectors`) are here because they
//! are big.
#![allow(clippy::unwrap_used)] // tests unwrap freely

mod jwks;
pub(crate) mod server;
mod vectors;
mod verify;

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::{unix_now, AuthError, AuthSettings, Identity, Verifier};

pub(crate) const SECRET: &[u8] = b"tollgate-test-secret-0123456789abcdef";

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

pub(crate) fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// Third-party vectors, copied into the repository (tests/fixtures/SOURCES.md says whence).
pub(crate) fn read_jwt_fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

pub(crate) fn settings(algorithms: &[Algorithm]) -> AuthSettings {
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

pub(crate) fn with_keys(algorithms: &[Algorithm], files: &[&str]) -> AuthSettings {
    let mut s = settings(algorithms);
    s.public_key_files = files.iter().map(|name| fixture(name)).collect();
    s
}

pub(crate) async fn hs_verifier(s: AuthSettings) -> Verifier {
    Verifier::build(s, Some(SECRET.to_vec())).await.unwrap()
}

pub(crate) fn now() -> u64 {
    unix_now()
}

pub(crate) fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "exp": now() + 600 })
}

pub(crate) fn sign_hs(alg: Algorithm, claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

pub(crate) fn encoding_key(alg: Algorithm, private_pem: &str) -> EncodingKey {
    let pem = read_fixture(private_pem);
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

pub(crate) fn sign_pem(
    alg: Algorithm,
    private_pem: &str,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &encoding_key(alg, private_pem)).unwrap()
}

/// A compact JWS from raw header/payload bytes, HMAC-signed with `secret`.
pub(crate) fn sign_raw_hs(alg: Algorithm, header: &[u8], payload: &[u8], secret: &[u8]) -> String {
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
pub(crate) fn swap_payload(token: &str, payload: &[u8]) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload),
        parts[2]
    )
}

pub(crate) fn payload_of(token: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1).unwrap())
        .unwrap()
}

pub(crate) async fn check(verifier: &Verifier, token: &str) -> Result<Identity, AuthError> {
    verifier
        .verify(Some(format!("Bearer {token}").as_bytes()))
        .await
}

pub(crate) fn ident(customer: &str, expires_at: u64) -> Identity {
    Identity {
        customer: customer.to_owned(),
        plan: None,
        expires_at,
    }
}

pub(crate) fn jwk_for(alg: Algorithm, private_pem: &str, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(&encoding_key(alg, private_pem), alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

pub(crate) fn temp_pem(name: &str, pem: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("tollgate-auth-{}-{name}.pem", std::process::id()));
    std::fs::write(&path, pem).unwrap();
    path
}

pub(crate) fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}
