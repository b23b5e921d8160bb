//! Minting HS tokens, for `tollgate token` and tests: [`Verifier::mint_hs`].
//!
//! Owns: the claims a minted token carries (the customer at the configured claim path, `exp`,
//! `iat`, and `iss`/`aud` when configured) and the choice of algorithm (the first HS one allowed).
//!
//! Must not touch: verification (a minted token goes through [`Verifier::verify`] like any other)
//! or any key but the HS secret from the environment.

use jsonwebtoken::Header;
use serde_json::{Map, Value};

use super::claims::valid_claim_text;
use super::keys::AlgSet;
use super::{unix_now, AuthSetupError, Verifier};

impl Verifier {
    /// Mints an HS token (for `tollgate token` and tests): first HS* algorithm allowed, claims
    /// {customer_claim (nested path builds nested objects): customer, exp: now+ttl, iat, iss/aud if configured}.
    ///
    /// Fails with [`AuthSetupError::Mint`] when no HS algorithm is allowed, `auth.secret_env` is
    /// not set, or `customer` is not 1..=256 bytes without control characters; a minted token
    /// verifies with this same verifier.
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
        self.claims
            .customer()
            .insert(&mut claims, Value::from(customer));
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use jsonwebtoken::Algorithm;

    use super::*;
    use crate::auth::tests::*;

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
}
