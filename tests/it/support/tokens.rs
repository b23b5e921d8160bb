//! HS256 test tokens, signed with the secret the test configs name.

use super::SECRET;
use jsonwebtoken::{EncodingKey, Header};

/// Claims for test tokens.
pub fn claims(customer: &str) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    serde_json::json!({"sub": customer, "iss": "https://issuer.test/", "aud": "api", "iat": now, "exp": now + 600})
}

/// A valid HS256 token for `customer`.
pub fn token(customer: &str) -> String {
    sign(&claims(customer))
}

pub fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}
