//! Retry schedule for transient start failures: exponential backoff with
//! jitter and an attempt limit. Pure: the caller passes the random bits.

use serde::{Deserialize, Serialize};

use crate::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay before the first retry; each further retry doubles it.
    pub base_ms: Millis,
    pub max_ms: Millis,
    /// Attempts (including the first) before the server fails.
    pub max_attempts: u32,
    /// Jitter as a fraction of the delay, in per mille (100 = ±10 %).
    pub jitter_permille: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // The first attempt and three retries, after 1, 2 and 4 minutes.
        RetryPolicy { base_ms: 60_000, max_ms: 240_000, max_attempts: 4, jitter_permille: 100 }
    }
}

/// What to do after the `attempts`-th consecutive transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAt(Millis),
    GiveUp,
}

impl RetryPolicy {
    pub fn after_failure(&self, attempts: u32, now: Millis, random: u64) -> RetryDecision {
        if attempts >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        let exp = attempts.saturating_sub(1).min(30);
        let delay = self.base_ms.saturating_mul(1 << exp).min(self.max_ms);
        let span = delay * self.jitter_permille as i64 / 1000;
        let jitter = if span > 0 { (random % (2 * span as u64 + 1)) as i64 - span } else { 0 };
        RetryDecision::RetryAt(now + (delay + jitter).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_gives_up() {
        let p = RetryPolicy { jitter_permille: 0, ..RetryPolicy::default() };
        assert_eq!(p.after_failure(1, 0, 7), RetryDecision::RetryAt(60_000));
        assert_eq!(p.after_failure(2, 0, 7), RetryDecision::RetryAt(120_000));
        assert_eq!(p.after_failure(3, 0, 7), RetryDecision::RetryAt(240_000));
        assert_eq!(p.after_failure(4, 0, 7), RetryDecision::GiveUp);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy::default();
        for r in 0..1000u64 {
            match p.after_failure(1, 0, r.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                RetryDecision::RetryAt(t) => assert!((54_000..=66_000).contains(&t), "{t}"),
                RetryDecision::GiveUp => panic!("gave up on the first failure"),
            }
        }
    }
}
