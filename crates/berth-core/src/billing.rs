//! Billing arithmetic: money in integer minor units, never floating point.
//! A session bills `memory × duration × price per GiB-hour`, rounded half
//! up to a minor unit once per session. Pure.

use serde::{Deserialize, Serialize};

use crate::model::MemMib;
use crate::Millis;

const MIB_MS_PER_GIB_HOUR: u128 = 1024 * 3_600_000;

/// The amount of one session in minor units.
pub fn amount(memory: MemMib, started_at: Millis, ended_at: Millis, price_per_gib_hour: i64) -> i64 {
    let ms = (ended_at - started_at).max(0) as u128;
    let price = price_per_gib_hour.max(0) as u128;
    let num = memory.0 as u128 * ms * price;
    ((num + MIB_MS_PER_GIB_HOUR / 2) / MIB_MS_PER_GIB_HOUR) as i64
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Stopped,
    Crashed,
    /// Its node stopped renewing; a reconnect within the window opens a
    /// backfilled session from this end.
    NodeUnreachable,
    NodeLost,
    /// Closed by the sweeper: open while its server was not running.
    Zombie,
    /// Closed at the maximum session length and continued in a new one.
    Rollover,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Stopped => "stopped",
            EndReason::Crashed => "crashed",
            EndReason::NodeUnreachable => "node_unreachable",
            EndReason::NodeLost => "node_lost",
            EndReason::Zombie => "zombie",
            EndReason::Rollover => "rollover",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_gib_for_one_hour_is_the_price() {
        assert_eq!(amount(MemMib(1024), 0, 3_600_000, 100), 100);
        assert_eq!(amount(MemMib(512), 0, 3_600_000, 100), 50);
        assert_eq!(amount(MemMib(1024), 0, 60_000, 100), 2, "1.67 rounds to 2");
        assert_eq!(amount(MemMib(1024), 10, 5, 100), 0, "a negative span bills nothing");
    }

    proptest! {
        #[test]
        fn splitting_a_session_changes_the_total_by_at_most_one_unit(
            mem in 1u64..100_000, a in 0i64..10_000_000_000, d1 in 0i64..1_000_000_000, d2 in 0i64..1_000_000_000, price in 0i64..100_000,
        ) {
            let whole = amount(MemMib(mem), a, a + d1 + d2, price);
            let split = amount(MemMib(mem), a, a + d1, price) + amount(MemMib(mem), a + d1, a + d1 + d2, price);
            prop_assert!((whole - split).abs() <= 1);
        }
    }
}
