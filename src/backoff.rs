//! Exponential backoff, the one formula of every retry loop (usage flusher, Stripe usage reports
//! and subscription pages, threshold alerts, the pub/sub follower): the first wait, doubled per
//! retry, never more than a cap.
//!
//! Owns: that arithmetic. Must not touch: I/O; callers sleep and count.

use std::time::Duration;

/// The wait before retry number `retry` (1 = the first retry): `first × 2^(retry − 1)`, at most
/// `cap`, saturating instead of overflowing.
pub fn wait(first: Duration, retry: u32, cap: Duration) -> Duration {
    let doublings = retry.saturating_sub(1).min(30);
    first.saturating_mul(1u32 << doublings).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap() {
        let s = Duration::from_secs;
        let w = |n| wait(s(60), n, s(3600)).as_secs();
        assert_eq!(
            [0, 1, 2, 3, 6, 7, 100, u32::MAX].map(w),
            [60, 60, 120, 240, 1920, 3600, 3600, 3600]
        );
    }
}
