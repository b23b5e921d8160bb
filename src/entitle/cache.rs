//! The in-process entitlement cache the request path reads (never the ledger): loaded at start,
//! updated by the one entitlement writer (`control::entitlements`) and by the sync follower.
//!
//! Must not touch: the ledger, Redis (its writers bring what they read).

use super::Entitlement;
use dashmap::DashMap;
use std::sync::Arc;

/// The in-process entitlement cache the request path reads (never the ledger).
#[derive(Default)]
pub struct Entitlements {
    map: DashMap<String, Arc<Entitlement>>,
}

// === impl Entitlements ===

impl Entitlements {
    pub fn get(&self, customer: &str) -> Option<Arc<Entitlement>> {
        self.map.get(customer).map(|e| e.clone())
    }

    /// Stores `e` unless what is cached is newer (`updated_at`), so late writes cannot win.
    pub fn put(&self, customer: &str, e: Entitlement) {
        let mut slot = self
            .map
            .entry(customer.to_string())
            .or_insert_with(|| Arc::new(e.clone()));
        if slot.updated_at <= e.updated_at {
            *slot = Arc::new(e);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
