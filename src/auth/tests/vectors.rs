//! Third-party vectors (tests/fixtures/jwt): RFC 7515 Appendix A and a Wycheproof subset.

use std::str::FromStr;

use super::server::{jwks_verifier, JwksServer};
use super::*;
use crate::auth::keys::AlgSet;

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
