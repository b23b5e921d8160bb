//! The verified-token cache: a token that verified once is served from memory until its `exp`,
//! so a repeat request skips the signature check.
//!
//! Owns: the map from the full token text to its [`Identity`], its bound and expiry on read. The
//! map is `quick_cache`'s bounded concurrent cache: at the bound it evicts the coldest entries
//! (CLOCK-Pro), instead of the cliff of clearing everything, and a hit costs less than a
//! `DashMap`'s (benches/token_cache.rs: 91 against 170 ns on one thread, 197 against 271 on two).
//!
//! Must not touch: verification itself. Only successes go in, and only the verify flow and the
//! JWKS refetch (which clears the cache when a key is dropped) call it.

use quick_cache::sync::Cache;

use super::Identity;

/// Full token text → identity, until `exp`. Keyed by the whole token (a hash-only key would let a
/// colliding forgery through); only successes are stored.
///
/// `pub` (hidden) only so benches/token_cache.rs can measure it; nothing outside `auth` uses it.
#[doc(hidden)]
pub struct TokenCache {
    map: Cache<Box<str>, Identity>,
}

impl TokenCache {
    /// An empty cache that holds at most `max_entries` tokens.
    pub fn new(max_entries: usize) -> TokenCache {
        TokenCache {
            map: Cache::new(max_entries.max(1)),
        }
    }

    /// The identity of `token` if it is cached and `now` is before its `exp`; an entry found
    /// expired is removed.
    pub fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let identity = self.map.get(token)?;
        if now < identity.expires_at {
            return Some(identity);
        }
        self.map
            .remove_if(token, |identity| identity.expires_at <= now);
        None
    }

    /// Caches `token` until `identity.expires_at`; a token already at or past it is not cached.
    /// At the bound the cache evicts its coldest entries.
    pub fn insert(&self, token: &str, identity: &Identity, now: u64) {
        // Accepted within the leeway but already past `exp`: verify it afresh every time.
        if identity.expires_at <= now {
            return;
        }
        self.map.insert(Box::from(token), identity.clone());
    }

    /// Drops every entry (a JWKS refetch dropped a key).
    pub(super) fn clear(&self) {
        self.map.clear();
    }

    /// Entries held (expired ones included until they are read or evicted).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::auth::tests::*;
    use crate::auth::AuthError;

    /// A cache hit returns the same identity without running the crypto again.
    #[tokio::test]
    async fn cache_hit_returns_same_identity() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let token = sign_hs(Algorithm::HS256, &claims("acme"));
        let first = check(&v, &token).await.unwrap();
        let second = check(&v, &token).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(
            v.verifications.load(Ordering::Relaxed),
            1,
            "the second call was a cache hit"
        );
        // The whole token is the key: a tampered variant is verified (and refused), not served.
        let tampered = swap_payload(&token, claims("mallory").to_string().as_bytes());
        assert_eq!(check(&v, &tampered).await, Err(AuthError::BadSignature));
        // Failures are never cached.
        assert_eq!(check(&v, &tampered).await, Err(AuthError::BadSignature));
        assert_eq!(v.verifications.load(Ordering::Relaxed), 3);
    }

    /// A cached token is dropped at its exp and then refused as expired.
    #[tokio::test]
    async fn expired_cached_token_is_rejected() {
        let v = hs_verifier(settings(&[Algorithm::HS256])).await;
        let exp = now() + 1;
        let token = sign_hs(Algorithm::HS256, &json!({ "sub": "acme", "exp": exp }));
        assert!(check(&v, &token).await.is_ok());
        assert_eq!(v.cache.len(), 1);
        while now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(check(&v, &token).await, Err(AuthError::Expired));
        assert_eq!(v.cache.len(), 0);
    }

    /// The cache is bounded: however many tokens verify, it never holds more than its bound, a
    /// token just cached is served, and no entry is served at or after its `exp`.
    #[test]
    fn cache_is_bounded() {
        let cache = TokenCache::new(10);
        let id = |exp| ident("c", exp);
        for i in 0..1_000 {
            cache.insert(&format!("live-{i}"), &id(500), 200);
            assert!(
                cache.len() <= 10,
                "{} entries after {i} inserts",
                cache.len()
            );
        }
        cache.insert("newest", &id(500), 200);
        assert!(
            cache.get("newest", 200).is_some(),
            "a token just cached is served"
        );
        assert!(cache.get("newest", 500).is_none(), "not served at exp");
        assert!(
            cache.get("newest", 200).is_none(),
            "dropped once found expired"
        );
        cache.insert("stale", &id(200), 200);
        assert!(
            cache.get("stale", 200).is_none(),
            "already at exp: never cached"
        );
    }
}
