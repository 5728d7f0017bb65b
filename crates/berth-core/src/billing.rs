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

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC bounds `[start, end)` in ms of a month written `YYYY-MM`.
pub fn month_bounds(month: &str) -> Option<(Millis, Millis)> {
    let (y, m) = month.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let (y, m): (i64, i64) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) || !(1970..=9999).contains(&y) {
        return None;
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    Some((days_from_civil(y, m, 1) * 86_400_000, days_from_civil(ny, nm, 1) * 86_400_000))
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

    #[test]
    fn month_bounds_are_utc_calendar_months() {
        assert_eq!(month_bounds("1970-01"), Some((0, 31 * 86_400_000)));
        let (a, b) = month_bounds("2024-02").unwrap();
        assert_eq!((b - a) / 86_400_000, 29, "leap february");
        assert_eq!(month_bounds("2026-11").unwrap().0, 1_793_491_200_000);
        for bad in ["2026-13", "2026-1", "26-11", "x", "2026-00"] {
            assert_eq!(month_bounds(bad), None, "{bad}");
        }
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
