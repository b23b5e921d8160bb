//! The verify flow end to end: valid tokens of every algorithm, the Authorization header, time and
//! registered claims, algorithms and headers, setup errors, robustness.

use std::sync::atomic::Ordering;

use super::*;
use crate::auth::AuthSetupError;

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
