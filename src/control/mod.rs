//! The control plane's followers: what keeps every instance's in-process state in step with the
//! ledger, which is the truth. Live config (versions, validation, apply, broadcast) and
//! entitlement sync (one customer's change reaches every instance), both over one Redis pub/sub
//! follower.
//!
//! Runs on the control runtime. Must not touch: requests in flight, quota counters, the usage
//! path, HTTP.

pub mod broadcast;
pub mod entitlement_sync;
pub mod live_config;
