//! The drift watch: after each agent sync, judges the node's memory with
//! `berth_core::drift::assess` and turns a change of verdict into a
//! `memory_drift` (or `memory_drift_cleared`) event.
//!
//! Verdicts live in memory only: they are derived from the latest report
//! and the reservation rows, so after a restart the first sync of each
//! node re-derives them (L6). It must not write anything but events.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_api::{rfc3339, DriftView};
use berth_core::drift::{assess, Drift, MemoryFacts};
use berth_core::{Millis, NewEvent, Node, NodeId};

#[derive(Default)]
pub struct DriftWatch {
    by_node: Mutex<HashMap<NodeId, (Drift, Millis)>>,
}

impl DriftWatch {
    /// Judges `facts` of `node` and returns the event its change of
    /// verdict calls for, if any.
    pub fn observe(&self, node: &Node, facts: &MemoryFacts, margin_mib: u64, now: Millis) -> Option<NewEvent> {
        let mut by_node = self.by_node.lock().expect("drift lock");
        let was = by_node.get(&node.id).cloned();
        let verdict = assess(facts, margin_mib, was.is_some());
        let event = |kind: &'static str, message: String| NewEvent { kind, server_id: None, node_id: Some(node.id.clone()), message };
        match (was, verdict) {
            (None, Some(d)) => {
                let message = d.message(&node.name);
                by_node.insert(node.id.clone(), (d, now));
                Some(event("memory_drift", message))
            }
            (Some((_, since)), Some(d)) => {
                by_node.insert(node.id.clone(), (d, since));
                None
            }
            (Some(_), None) => {
                by_node.remove(&node.id);
                Some(event("memory_drift_cleared", format!("memory of node {} is within its budget again", node.name)))
            }
            (None, None) => None,
        }
    }

    pub fn view(&self, node: &Node) -> Option<DriftView> {
        let by_node = self.by_node.lock().expect("drift lock");
        let (d, since) = by_node.get(&node.id)?;
        Some(DriftView {
            message: d.message(&node.name),
            since: rfc3339(*since),
            over_reservations_mib: d.over_reservations_mib,
            unmanaged_mib: d.unmanaged_mib,
            unmanaged_excess_mib: d.unmanaged_excess_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{MemMib, NodeStatus, PortRange};

    fn node() -> Node {
        Node {
            id: NodeId("n1".into()),
            name: "n1".into(),
            address: String::new(),
            driver: "docker".into(),
            total_mib: MemMib(8_000),
            system_reserved_mib: MemMib(1_000),
            cpu_cores: 2,
            status: NodeStatus::Ready,
            max_concurrent_starts: 0,
            ports: PortRange { min: 1, max: 2 },
            epoch: 1,
            sync_seq: 1,
            last_sync_at: None,
            registered_at: 0,
            host_total_mib: MemMib(8_000),
            host_available_mib: MemMib(0),
            disk_total_mib: 0,
            disk_used_mib: 0,
            disk_pressure: false,
            drain_deadline: None,
        }
    }

    fn facts(used: u64) -> MemoryFacts {
        MemoryFacts { host_total_mib: 8_000, host_available_mib: 8_000 - used, system_reserved_mib: 1_000, reserved_mib: 2_000, instances_used_mib: 500 }
    }

    #[test]
    fn one_event_when_drift_begins_none_while_it_lasts_one_when_it_ends() {
        let w = DriftWatch::default();
        let n = node();
        assert_eq!(w.observe(&n, &facts(1_200), 256, 1), None);
        let e = w.observe(&n, &facts(4_000), 256, 2).expect("drift begins");
        assert_eq!(e.kind, "memory_drift");
        assert!(e.message.contains("processes berth does not manage use 3500 MiB"), "{}", e.message);
        assert_eq!(w.observe(&n, &facts(4_500), 256, 3), None, "no event while it lasts");
        let v = w.view(&n).unwrap();
        assert_eq!(v.unmanaged_mib, 4_000, "the view follows the latest facts");
        assert_eq!(v.since, rfc3339(2));
        assert_eq!(w.observe(&n, &facts(1_200), 256, 4).unwrap().kind, "memory_drift_cleared");
        assert_eq!(w.view(&n), None);
    }
}
