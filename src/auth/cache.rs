//! The verified-token cache: a token that verified once is served from memory until its `exp`,
//! so a repeat request skips the signature check.
//!
//! Owns: the map from the full token text to its [`Identity`], its bound (on overflow: sweep the
//! expired entries, and clear if that is not enough) and expiry on read.
//!
//! Must not touch: verification itself. Only successes go in, and only the verify flow and the
//! JWKS refetch (which clears the cache when a key is dropped) call it.

use dashmap::DashMap;

use super::Identity;

/// Full token text → identity, until `exp`. Keyed by the whole token (a hash-only key would let a
/// colliding forgery through); only successes are stored.
///
/// `pub` (hidden) only so benches/token_cache.rs can measure it; nothing outside `auth` uses it.
#[doc(hidden)]
pub struct TokenCache {
    map: DashMap<Box<str>, Identity>,
    max_entries: usize,
}

impl TokenCache {
    /// An empty cache that holds at most `max_entries` tokens.
    pub fn new(max_entries: usize) -> TokenCache {
        TokenCache {
            map: DashMap::new(),
            max_entries,
        }
    }

    /// The identity of `token` if it is cached and `now` is before its `exp`; an entry found
    /// expired is removed.
    pub fn get(&self, token: &str, now: u64) -> Option<Identity> {
        // The shard guard must be gone before `remove_if` takes the same shard's write lock.
        let expired = match self.map.get(token) {
            None => return None,
            Some(entry) if now < entry.expires_at => return Some(entry.value().clone()),
            Some(_) => true,
        };
        if expired {
            self.map
                .remove_if(token, |_, identity| identity.expires_at <= now);
        }
        None
    }

    /// Caches `token` until `identity.expires_at`; a token already at or past it is not cached.
    /// At the bound, expired entries are swept first, and if fewer than a tenth could go, the
    /// cache is cleared (a clear costs one verification per live token).
    pub fn insert(&self, token: &str, identity: &Identity, now: u64) {
        // Accepted within the leeway but already past `exp`: verify it afresh every time.
        if identity.expires_at <= now {
            return;
        }
        if self.map.len() >= self.max_entries {
            self.map.retain(|_, cached| cached.expires_at > now);
            if self.map.len() >= self.max_entries / 10 * 9 {
                self.map.clear();
            }
        }
        self.map.insert(Box::from(token), identity.clone());
    }

    /// Drops every entry (a JWKS refetch dropped a key).
    pub(super) fn clear(&self) {
        self.map.clear();
    }

    /// Entries held (expired ones included until they are swept or read).
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
        assert_eq!(v.cache.map.len(), 1);
        while now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(check(&v, &token).await, Err(AuthError::Expired));
        assert_eq!(v.cache.map.len(), 0);
    }

    /// The cache is bounded: at the limit it sweeps expired entries, and clears if that is not
    /// enough.
    #[test]
    fn cache_is_bounded() {
        let cache = TokenCache::new(10);
        let id = |exp| ident("c", exp);
        for i in 0..10 {
            cache.insert(&format!("short-{i}"), &id(105), 100);
        }
        assert_eq!(cache.map.len(), 10);
        cache.insert("later", &id(500), 200);
        assert_eq!(cache.map.len(), 1, "expired entries swept");
        for i in 0..9 {
            cache.insert(&format!("live-{i}"), &id(500), 200);
        }
        assert_eq!(cache.map.len(), 10);
        cache.insert("overflow", &id(500), 200);
        assert_eq!(cache.map.len(), 1, "cleared when nothing could be swept");
        assert!(cache.get("overflow", 200).is_some());
        assert!(cache.get("overflow", 500).is_none(), "not served at exp");
    }
}
