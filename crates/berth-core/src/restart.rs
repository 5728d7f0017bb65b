//! Restart policy: what happens to a server after it crashed. Pure: the
//! crash time, the number of automatic restarts in the current window and
//! the random bits for jitter are inputs.
//!
//! `on-failure` restarts a crashed server after a crash-loop backoff (10 s
//! doubling up to 5 minutes by default) until it has been restarted
//! `max_restarts` times within `window_ms`; then it fails, so a server that
//! can never run is not restarted forever. `never` leaves it crashed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Millis;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    #[serde(rename = "never")]
    Never,
    #[serde(rename = "on-failure")]
    OnFailure,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
    pub fn parse(s: &str) -> Option<RestartPolicy> {
        match s {
            "never" => Some(RestartPolicy::Never),
            "on-failure" => Some(RestartPolicy::OnFailure),
            _ => None,
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashLoopBackoff {
    /// Delay before the first automatic restart; doubles with each one.
    pub base_ms: Millis,
    pub max_ms: Millis,
    /// Automatic restarts allowed within `window_ms` before the server fails.
    pub max_restarts: u32,
    pub window_ms: Millis,
    /// Jitter in per mille of the delay (100 = ±10 %).
    pub jitter_permille: u32,
}

impl Default for CrashLoopBackoff {
    fn default() -> Self {
        CrashLoopBackoff { base_ms: 10_000, max_ms: 300_000, max_restarts: 5, window_ms: 600_000, jitter_permille: 100 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Leave the server as it is (policy `never`).
    Never,
    /// Restart it at this time (now or later).
    At(Millis),
    /// It crashed too often: fail it.
    GiveUp { restarts: u32 },
}

impl CrashLoopBackoff {
    /// `recent_restarts` counts automatic restarts since the window began
    /// (the caller counts them from the operations of the last `window_ms`,
    /// after the server's last start by a user).
    pub fn decide(&self, policy: RestartPolicy, crashed_at: Millis, recent_restarts: u32, random: u64) -> RestartDecision {
        if policy == RestartPolicy::Never {
            return RestartDecision::Never;
        }
        if recent_restarts >= self.max_restarts {
            return RestartDecision::GiveUp { restarts: recent_restarts };
        }
        let delay = self.base_ms.saturating_mul(1i64 << recent_restarts.min(30)).min(self.max_ms);
        let span = delay * self.jitter_permille as i64 / 1000;
        let jitter = if span > 0 { (random % (2 * span as u64 + 1)) as i64 - span } else { 0 };
        RestartDecision::At(crashed_at + (delay + jitter).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_then_gives_up() {
        let b = CrashLoopBackoff { jitter_permille: 0, ..Default::default() };
        let at = |n| b.decide(RestartPolicy::OnFailure, 1_000, n, 42);
        assert_eq!(at(0), RestartDecision::At(11_000));
        assert_eq!(at(1), RestartDecision::At(21_000));
        assert_eq!(at(2), RestartDecision::At(41_000));
        assert_eq!(at(4), RestartDecision::At(161_000));
        assert_eq!(at(5), RestartDecision::GiveUp { restarts: 5 });
        let capped = CrashLoopBackoff { max_restarts: 100, ..b };
        assert_eq!(capped.decide(RestartPolicy::OnFailure, 0, 9, 1), RestartDecision::At(300_000));
    }

    #[test]
    fn never_means_never() {
        assert_eq!(CrashLoopBackoff::default().decide(RestartPolicy::Never, 0, 0, 0), RestartDecision::Never);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let b = CrashLoopBackoff::default();
        for r in 0..500u64 {
            match b.decide(RestartPolicy::OnFailure, 0, 0, r.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                RestartDecision::At(t) => assert!((9_000..=11_000).contains(&t), "{t}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [RestartPolicy::Never, RestartPolicy::OnFailure] {
            assert_eq!(RestartPolicy::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.as_str()));
        }
    }
}
