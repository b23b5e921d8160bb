//! JWKS keys: verification by `kid`, the refetch on an unknown `kid` (once per cooldown, shared by
//! concurrent callers), failures that keep the old keys, cache eviction when a key is dropped, and
//! the fetch over HTTPS with a private CA.

use std::sync::Arc;

use jsonwebtoken::DecodingKey;

use super::server::{jwks_verifier, rs256, rs256_jwks, rs256_jwks_verifier, JwksServer, K1, K2};
use super::*;
use crate::auth::AuthSetupError;

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

/// An unknown kid triggers exactly one refetch; within the cooldown a second unknown kid
/// (even one the server now has) does not fetch again.
#[tokio::test]
async fn unknown_kid_refetches_once_then_cooldown() {
    let (server, v) = rs256_jwks_verifier(&[K1]).await;
    assert_eq!(server.hits(), 1, "initial fetch");

    let known = rs256(K1, "a");
    assert!(check(&v, &known).await.is_ok());
    assert_eq!(server.hits(), 1);

    let unknown = rs256(K2, "a");
    assert_eq!(check(&v, &unknown).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 2, "exactly one refetch");

    server.answer(200, rs256_jwks(&[K1, K2]));
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
    let (server, v) = rs256_jwks_verifier(&[K1]).await;
    server.answer(200, rs256_jwks(&[K1, K2]));
    let token = rs256(K2, "rotated");
    assert_eq!(check(&v, &token).await.unwrap().customer, "rotated");
    assert_eq!(server.hits(), 2);
}

/// Concurrent callers with an unknown kid share a single refetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kids_share_one_refetch() {
    let (server, v) = rs256_jwks_verifier(&[K1]).await;
    let v = Arc::new(v);
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
    let (server, v) = rs256_jwks_verifier(&[K1]).await;
    server.answer(500, json!({ "error": "boom" }));
    let unknown = rs256(K2, "a");
    assert_eq!(check(&v, &unknown).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 2);
    let known = rs256(K1, "still-ok");
    assert_eq!(check(&v, &known).await.unwrap().customer, "still-ok");
    // A document without a usable key is a failure too, not an empty set.
    server.answer(200, json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }] }));
    assert!(v.refresh_jwks().await.is_err());
    let known = rs256(K1, "still-ok-2");
    assert!(check(&v, &known).await.is_ok());
}

/// A refetch that drops a key evicts the cached tokens it had verified.
#[tokio::test]
async fn dropped_key_evicts_cached_tokens() {
    let (server, v) = rs256_jwks_verifier(&[K1]).await;
    let old = rs256(K1, "old");
    assert!(check(&v, &old).await.is_ok());
    server.answer(200, rs256_jwks(&[K2]));
    let new = rs256(K2, "new");
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
    server.answer(200, rs256_jwks(&[K2]));
    let jwks_token = rs256(K2, "jwks");
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

fn https_settings(server: &JwksServer, ca_file: Option<&str>) -> AuthSettings {
    let mut s = settings(&[Algorithm::RS256]);
    s.jwks_url = Some(server.url.clone());
    s.jwks_ca_file = ca_file.map(tls_fixture);
    s
}

/// An https JWKS from a private CA loads (by IP and by DNS name) when auth.jwks_ca_file names
/// that CA, its keys verify tokens, and an unknown kid refetches over TLS too.
#[tokio::test]
async fn https_jwks_with_private_ca_verifies() {
    let server = JwksServer::start_tls(rs256_jwks(&[K1]), "server").await;
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let v = Verifier::new(https_settings(&server, Some("ca.pem")))
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);
    let token = rs256(K1, "tls");
    assert_eq!(check(&v, &token).await.unwrap().customer, "tls");

    server.answer(200, rs256_jwks(&[K2]));
    let rotated = rs256(K2, "k2");
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
    let server = JwksServer::start_tls(rs256_jwks(&[K1]), "server").await;
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
    let token = rs256(K1, "tls");
    assert_eq!(check(&v, &token).await, Err(AuthError::UnknownKey));
    let err = v.refresh_jwks().await.unwrap_err().to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

/// A certificate from the trusted CA but for another name is refused, and the error says so.
#[tokio::test]
async fn https_jwks_certificate_for_another_name_is_refused() {
    let server = JwksServer::start_tls(rs256_jwks(&[K1]), "wrong_name").await;
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
    let server = JwksServer::start(rs256_jwks(&[K1])).await;
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
