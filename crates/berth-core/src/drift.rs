//! Memory drift: the gap between what berth reserved on a node and what
//! the node really uses. Reservations keep L1 on paper; the kernel kills on
//! facts, so an operator must see when the two part ways: when the node
//! uses more than its reservations plus its system reserve, or when
//! processes berth does not manage use more than the system reserve.
//!
//! This module only decides, from one node's facts and the previous
//! verdict; the control plane feeds it each sync and turns a change of
//! verdict into an event. A drifting node is flagged by a margin and
//! cleared only below half of it, so a node hovering at the edge does not
//! flap.

use serde::{Deserialize, Serialize};

/// One node's memory, as its latest sync and the reservation rows say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFacts {
    pub host_total_mib: u64,
    pub host_available_mib: u64,
    /// Host memory berth does not hand out (total minus allocatable).
    pub system_reserved_mib: u64,
    /// Sum of the reservation rows on the node.
    pub reserved_mib: u64,
    /// Sum of what the node's instances report using.
    pub instances_used_mib: u64,
}

impl MemoryFacts {
    pub fn host_used_mib(&self) -> u64 {
        self.host_total_mib.saturating_sub(self.host_available_mib)
    }

    /// Used by everything that is not an instance berth runs: the OS,
    /// daemons, the agent, and processes started by hand.
    pub fn unmanaged_mib(&self) -> u64 {
        self.host_used_mib().saturating_sub(self.instances_used_mib)
    }
}

/// A node's drift verdict; both figures are how far past the budget it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// Host use beyond reservations plus system reserve.
    pub over_reservations_mib: u64,
    /// Use outside berth beyond the system reserve.
    pub unmanaged_excess_mib: u64,
    pub host_used_mib: u64,
    pub reserved_mib: u64,
    pub unmanaged_mib: u64,
}

impl Drift {
    pub fn message(&self, node: &str) -> String {
        let mut parts = Vec::new();
        if self.over_reservations_mib > 0 {
            parts.push(format!(
                "uses {} MiB, {} MiB more than its {} MiB of reservations and its system reserve",
                self.host_used_mib, self.over_reservations_mib, self.reserved_mib
            ));
        }
        if self.unmanaged_excess_mib > 0 {
            parts.push(format!("processes berth does not manage use {} MiB, {} MiB beyond the system reserve", self.unmanaged_mib, self.unmanaged_excess_mib));
        }
        format!("memory drift on node {node}: {}", parts.join("; "))
    }
}

/// `was_drifting` is the previous verdict: once flagged, a node stays
/// flagged until both excesses fall below half the margin.
pub fn assess(f: &MemoryFacts, margin_mib: u64, was_drifting: bool) -> Option<Drift> {
    let over = f.host_used_mib().saturating_sub(f.reserved_mib + f.system_reserved_mib);
    let unmanaged_excess = f.unmanaged_mib().saturating_sub(f.system_reserved_mib);
    let threshold = if was_drifting { margin_mib / 2 } else { margin_mib };
    if f.host_total_mib == 0 || (over <= threshold && unmanaged_excess <= threshold) {
        return None;
    }
    Some(Drift {
        over_reservations_mib: over,
        unmanaged_excess_mib: unmanaged_excess,
        host_used_mib: f.host_used_mib(),
        reserved_mib: f.reserved_mib,
        unmanaged_mib: f.unmanaged_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(used: u64, reserved: u64, instances: u64) -> MemoryFacts {
        MemoryFacts {
            host_total_mib: 16_000,
            host_available_mib: 16_000 - used,
            system_reserved_mib: 1_000,
            reserved_mib: reserved,
            instances_used_mib: instances,
        }
    }

    #[test]
    fn a_node_within_its_budget_does_not_drift() {
        // 4000 reserved, instances use 3500, the OS 900.
        assert_eq!(assess(&facts(4_400, 4_000, 3_500), 256, false), None);
    }

    #[test]
    fn processes_outside_berth_drift_even_when_reservations_leave_room() {
        // Instances use little of their 8000; a hog of 3000 runs beside them.
        let d = assess(&facts(4_500, 8_000, 600), 256, false).expect("drift");
        assert_eq!(d.over_reservations_mib, 0);
        assert_eq!(d.unmanaged_mib, 3_900);
        assert_eq!(d.unmanaged_excess_mib, 2_900);
        assert!(d.message("n1").contains("processes berth does not manage use 3900 MiB"), "{}", d.message("n1"));
    }

    #[test]
    fn instances_above_their_reservations_drift() {
        // Limits not enforced (RSS watch lag) or overhead outside the limit.
        let d = assess(&facts(6_000, 4_000, 5_200), 256, false).expect("drift");
        assert_eq!(d.over_reservations_mib, 1_000);
        assert_eq!(d.unmanaged_excess_mib, 0);
    }

    #[test]
    fn the_margin_is_tolerated_and_clearing_needs_half_of_it() {
        assert_eq!(assess(&facts(1_200, 0, 0), 256, false), None, "200 over is within a 256 margin");
        assert!(assess(&facts(1_300, 0, 0), 256, false).is_some());
        assert!(assess(&facts(1_200, 0, 0), 256, true).is_some(), "a drifting node stays flagged above half the margin");
        assert_eq!(assess(&facts(1_100, 0, 0), 256, true), None);
    }

    #[test]
    fn a_node_without_host_facts_yet_is_not_judged() {
        let f = MemoryFacts { host_total_mib: 0, host_available_mib: 0, system_reserved_mib: 0, reserved_mib: 0, instances_used_mib: 0 };
        assert_eq!(assess(&f, 0, false), None);
    }
}
