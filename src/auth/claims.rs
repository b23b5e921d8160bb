//! Claims: where the customer and plan are found in a verified token's claims, and what makes a
//! usable value.
//!
//! Owns: claim paths (`"sub"`, `"org_id"`, `"org.id"`; a literal key wins over the dotted walk),
//! the customer/plan value rules (a string of 1..=256 bytes without control characters, or an
//! integer, stringified), reading `exp` as a numeric date, and writing a claim path (for minting).
//!
//! Must not touch: signatures, keys or the registered-claim checks (`exp`/`nbf`/`iss`/`aud` are
//! jsonwebtoken's, configured in `mod.rs`): these functions only ever see claims whose signature
//! and registered claims have already been checked.

use serde_json::{Map, Value};

use super::{AuthError, AuthSetupError, Identity};

/// Longest customer id / plan name taken from a claim.
const MAX_CLAIM_VALUE_BYTES: usize = 256;

/// Where the customer and (optionally) the plan are read from.
#[derive(Debug, Clone)]
pub(super) struct ClaimRules {
    customer: ClaimPath,
    plan: Option<ClaimPath>,
}

impl ClaimRules {
    /// Parses `auth.customer_claim` and `auth.plan_claim`.
    pub(super) fn new(customer: &str, plan: Option<&str>) -> Result<ClaimRules, AuthSetupError> {
        let customer = ClaimPath::parse("customer_claim", customer)?;
        let plan = match plan {
            Some(path) => Some(ClaimPath::parse("plan_claim", path)?),
            None => None,
        };
        Ok(ClaimRules { customer, plan })
    }

    /// The customer claim's path (minting writes it).
    pub(super) fn customer(&self) -> &ClaimPath {
        &self.customer
    }

    /// The identity in verified claims: the customer (required), the plan (when configured; an
    /// unusable one is ignored) and `exp`.
    pub(super) fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let customer = self
            .customer
            .lookup(claims)
            .and_then(claim_text)
            .filter(|c| crate::entitle::check_customer_id(c).is_ok())
            .ok_or(AuthError::NoCustomerClaim)?;
        // An unusable plan claim is ignored rather than fatal: the entitlement step falls back.
        let plan = self
            .plan
            .as_ref()
            .and_then(|path| path.lookup(claims))
            .and_then(claim_text);
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(AuthError::InvalidClaims)?;
        Ok(Identity {
            customer,
            plan,
            expires_at,
        })
    }
}

/// `exp` as jsonwebtoken reads it: a non-negative integer, or a float rounded.
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

/// A customer/plan value: a usable string, or an integer stringified.
fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if valid_claim_text(text) => Some(text.clone()),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}

pub(super) fn valid_claim_text(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_CLAIM_VALUE_BYTES && !text.chars().any(char::is_control)
}

/// A configured claim location: "sub", "org_id", "org.id".
#[derive(Debug, Clone)]
pub(super) struct ClaimPath {
    full: String,
    segments: Vec<String>,
}

impl ClaimPath {
    fn parse(setting: &'static str, path: &str) -> Result<ClaimPath, AuthSetupError> {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(AuthSetupError::ClaimPath {
                setting,
                path: path.to_owned(),
            });
        }
        Ok(ClaimPath {
            full: path.to_owned(),
            segments,
        })
    }

    /// The literal key wins (so a namespaced claim like "https://example.com/org" works), then the
    /// dotted walk through nested objects.
    fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(value) = claims.get(&self.full) {
            return Some(value);
        }
        let (first, rest) = self.segments.split_first()?;
        if rest.is_empty() {
            return None;
        }
        let mut value = claims.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }

    /// Sets this path in `claims`, creating (or replacing non-object values with) nested objects.
    pub(super) fn insert(&self, claims: &mut Map<String, Value>, value: Value) {
        let Some((last, parents)) = self.segments.split_last() else {
            return;
        };
        let mut object = claims;
        for segment in parents {
            let slot = object
                .entry(segment.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            let Value::Object(next) = slot else {
                return;
            };
            object = next;
        }
        object.insert(last.clone(), value);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use crate::auth::tests::*;
    use crate::auth::{AuthError, AuthSettings};

    /// No usable customer claim → NoCustomerClaim; integers are stringified; 256 bytes is the cap.
    #[tokio::test]
    async fn customer_claim_rules() {
        // org_id rather than sub: jsonwebtoken itself refuses a non-string sub it cannot parse.
        let v = hs_verifier(AuthSettings {
            customer_claim: "org_id".to_owned(),
            ..settings(&[Algorithm::HS256])
        })
        .await;
        let exp = now() + 600;
        let missing = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "sub": "user" }));
        assert_eq!(check(&v, &missing).await, Err(AuthError::NoCustomerClaim));
        for bad in [
            json!(""),
            json!("x".repeat(257)),
            json!("a\u{0}b"),
            json!("line\nbreak"),
            json!(true),
            json!(1.5),
            json!({}),
            json!([]),
            json!(null),
        ] {
            let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": bad }));
            assert_eq!(
                check(&v, &token).await,
                Err(AuthError::NoCustomerClaim),
                "{bad}"
            );
        }
        let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": 42 }));
        assert_eq!(check(&v, &token).await.unwrap().customer, "42");
        let long = "é".repeat(128);
        let token = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org_id": long }));
        assert_eq!(check(&v, &token).await.unwrap().customer, long);
    }

    /// A dotted customer_claim walks nested objects ("org.id"); a literal key of that name wins.
    #[tokio::test]
    async fn nested_customer_claim() {
        let mut s = settings(&[Algorithm::HS256]);
        s.customer_claim = "org.id".to_owned();
        let v = hs_verifier(s).await;
        let exp = now() + 600;
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "sub": "user", "org": { "id": "acme" } }),
        );
        assert_eq!(check(&v, &token).await.unwrap(), ident("acme", exp));
        let flat = sign_hs(Algorithm::HS256, &json!({ "exp": exp, "org": "acme" }));
        assert_eq!(check(&v, &flat).await, Err(AuthError::NoCustomerClaim));
        let literal = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "org.id": "lit", "org": { "id": "nested" } }),
        );
        assert_eq!(check(&v, &literal).await.unwrap().customer, "lit");
    }

    /// The token's plan is ignored unless plan_claim is configured.
    #[tokio::test]
    async fn plan_claim_only_when_configured() {
        let exp = now() + 600;
        let token = sign_hs(
            Algorithm::HS256,
            &json!({ "exp": exp, "sub": "acme", "plan": "pro", "billing": { "plan": "team" } }),
        );
        let ignoring = hs_verifier(settings(&[Algorithm::HS256])).await;
        assert_eq!(check(&ignoring, &token).await.unwrap().plan, None);

        for (plan_claim, plan) in [("plan", "pro"), ("billing.plan", "team")] {
            let mut s = settings(&[Algorithm::HS256]);
            s.plan_claim = Some(plan_claim.to_owned());
            let id = check(&hs_verifier(s).await, &token).await.unwrap();
            assert_eq!(id.plan.as_deref(), Some(plan), "{plan_claim}");
        }

        let mut s = settings(&[Algorithm::HS256]);
        s.plan_claim = Some("tier".to_owned());
        let id = check(&hs_verifier(s).await, &token).await.unwrap();
        assert_eq!(
            id,
            ident("acme", exp),
            "an absent plan claim is None, not an error"
        );
    }
}
