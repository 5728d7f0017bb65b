//! Node capacity as the admission committer sees it, and the re-check it
//! runs on every plan inside its transaction.
//!
//! `NodeCapacity` is built from a node and its reservation rows (L2: nothing
//! else counts). The planner works on a snapshot of these; the committer
//! rebuilds them from the rows inside its transaction and calls `recheck`
//! before inserting, so a stale plan is rejected instead of over-committing
//! (L1). This module must not keep totals of its own between calls.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::model::{MemMib, Node, NodeId, NodeStatus, PortRange, Reservation, ReservationState};
use crate::placement::Placement;

/// Why a plan does not fit a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfit {
    NodeNotReady,
    InsufficientMemory,
    StartLimit,
    NoFreePort,
    PortTaken,
}

impl Misfit {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfit::NodeNotReady => "node_not_ready",
            Misfit::InsufficientMemory => "insufficient_memory",
            Misfit::StartLimit => "start_limit",
            Misfit::NoFreePort => "no_free_port",
            Misfit::PortTaken => "port_taken",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node_id: NodeId,
    pub status: NodeStatus,
    pub disk_pressure: bool,
    pub allocatable: MemMib,
    /// Sum of the memory of every reservation row on the node.
    pub reserved: MemMib,
    /// Reservations not yet confirmed running: instances still starting.
    pub pending_starts: u32,
    /// 0 means no limit.
    pub max_concurrent_starts: u32,
    pub ports: PortRange,
    pub used_ports: BTreeSet<u16>,
}

impl NodeCapacity {
    /// Derives the node's capacity from its reservation rows; rows of other
    /// nodes are ignored so callers may pass every row.
    pub fn from_rows<'a>(node: &Node, rows: impl IntoIterator<Item = &'a Reservation>) -> NodeCapacity {
        let mut cap = NodeCapacity::from_totals(node, MemMib(0), 0, []);
        for r in rows.into_iter().filter(|r| r.node_id == node.id) {
            cap.reserved += r.memory_mib;
            if r.state == ReservationState::Pending {
                cap.pending_starts += 1;
            }
            cap.used_ports.insert(r.port);
        }
        cap
    }

    /// The capacity after `placement` is committed on this node: what its
    /// new reservation row adds to the sums (a pending start holding memory
    /// and a port). Lets a planner carry a snapshot forward across its own
    /// commits; the commit still re-checks against the rows.
    pub fn reserve(&mut self, placement: &crate::placement::Placement) {
        debug_assert_eq!(placement.node_id, self.node_id);
        self.reserved += placement.memory_mib;
        self.pending_starts += 1;
        self.used_ports.insert(placement.port);
    }

    /// The node's capacity from its rows summed up by the database: the
    /// memory of every row, the rows still pending, the ports they hold.
    pub fn from_totals(node: &Node, reserved: MemMib, pending_starts: u32, used_ports: impl IntoIterator<Item = u16>) -> NodeCapacity {
        NodeCapacity {
            node_id: node.id.clone(),
            status: node.status,
            disk_pressure: node.disk_pressure,
            allocatable: node.allocatable_mib(),
            reserved,
            pending_starts,
            max_concurrent_starts: node.max_concurrent_starts,
            ports: node.ports,
            used_ports: used_ports.into_iter().collect(),
        }
    }

    /// Ready and not under disk pressure.
    pub fn accepts_placements(&self) -> bool {
        self.status.can_place() && !self.disk_pressure
    }

    pub fn free(&self) -> MemMib {
        self.allocatable.saturating_sub(self.reserved)
    }

    /// Whether a new placement of `memory` fits, ignoring ports.
    pub fn fits_memory(&self, memory: MemMib) -> Result<(), Misfit> {
        if !self.accepts_placements() {
            return Err(Misfit::NodeNotReady);
        }
        if self.max_concurrent_starts > 0 && self.pending_starts >= self.max_concurrent_starts {
            return Err(Misfit::StartLimit);
        }
        if self.reserved + memory > self.allocatable {
            return Err(Misfit::InsufficientMemory);
        }
        Ok(())
    }

    pub fn first_free_port(&self) -> Option<u16> {
        (self.ports.min..=self.ports.max).find(|p| !self.used_ports.contains(p))
    }

    /// Records a placement in this capacity view.
    pub fn take(&mut self, memory: MemMib, port: u16) {
        self.reserved += memory;
        self.pending_starts += 1;
        self.used_ports.insert(port);
    }

    /// Undoes a `take` whose placement was not committed.
    pub fn give_back(&mut self, memory: MemMib, port: u16) {
        self.reserved = self.reserved.saturating_sub(memory);
        self.pending_starts = self.pending_starts.saturating_sub(1);
        self.used_ports.remove(&port);
    }
}

/// The committer's re-check of one plan against capacity derived from the
/// latest rows. `Ok` means the plan may be inserted; the caller must then
/// `take` it before checking the next plan for the same node.
pub fn recheck(node: &NodeCapacity, plan: &Placement) -> Result<(), Misfit> {
    node.fits_memory(plan.memory_mib)?;
    if !node.ports.contains(plan.port) || node.used_ports.contains(&plan.port) {
        return Err(Misfit::PortTaken);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerId;

    pub(crate) fn node(id: &str, alloc: u64) -> Node {
        Node {
            id: NodeId(id.into()),
            name: id.into(),
            address: String::new(),
            driver: "process".into(),
            total_mib: MemMib(alloc),
            system_reserved_mib: MemMib(0),
            cpu_cores: 2,
            status: NodeStatus::Ready,
            max_concurrent_starts: 0,
            ports: PortRange { min: 30000, max: 30009 },
            epoch: 1,
            sync_seq: 0,
            last_sync_at: None,
            registered_at: 0,
            host_total_mib: MemMib(alloc),
            host_available_mib: MemMib(alloc),
            disk_total_mib: 0,
            disk_used_mib: 0,
            disk_pressure: false,
            drain_deadline: None,
        }
    }

    fn res(server: &str, node: &str, mem: u64, port: u16) -> Reservation {
        Reservation {
            server_id: ServerId(server.into()),
            generation: 1,
            node_id: NodeId(node.into()),
            memory_mib: MemMib(mem),
            port,
            state: ReservationState::Pending,
            created_at: 0,
        }
    }

    fn plan(server: &str, node: &str, mem: u64, port: u16) -> Placement {
        Placement { server_id: ServerId(server.into()), expected_generation: 0, node_id: NodeId(node.into()), memory_mib: MemMib(mem), port }
    }

    #[test]
    fn reserving_a_placement_equals_deriving_from_its_new_row() {
        let n = node("n1", 4096);
        let mut rows = vec![res("a", "n1", 1024, 30000)];
        let mut carried = NodeCapacity::from_rows(&n, &rows);
        carried.reserve(&plan("b", "n1", 512, 30003));
        rows.push(Reservation { generation: 1, ..res("b", "n1", 512, 30003) });
        assert_eq!(carried, NodeCapacity::from_rows(&n, &rows));
        assert_eq!(carried.free(), MemMib(4096 - 1536));
        assert_eq!(carried.pending_starts, 2);
    }

    #[test]
    fn the_incident_third_gigabyte_does_not_fit_on_2500() {
        let n = node("n1", 2500);
        let rows = vec![res("a", "n1", 1024, 30000), res("b", "n1", 1024, 30001)];
        let cap = NodeCapacity::from_rows(&n, &rows);
        assert_eq!(cap.reserved, MemMib(2048));
        assert_eq!(recheck(&cap, &plan("c", "n1", 1024, 30002)), Err(Misfit::InsufficientMemory));
        assert_eq!(recheck(&cap, &plan("c", "n1", 452, 30002)), Ok(()));
    }

    #[test]
    fn totals_and_rows_give_the_same_capacity() {
        let n = node("n1", 2500);
        let mut rows = vec![res("a", "n1", 1024, 30000), res("b", "n1", 700, 30003), res("c", "n2", 9, 30001)];
        rows[1].state = ReservationState::Active;
        assert_eq!(NodeCapacity::from_rows(&n, &rows), NodeCapacity::from_totals(&n, MemMib(1724), 1, [30000, 30003]));
    }

    #[test]
    fn rows_of_other_nodes_do_not_count() {
        let n = node("n1", 2500);
        let rows = vec![res("a", "n2", 2048, 30000)];
        assert_eq!(NodeCapacity::from_rows(&n, &rows).reserved, MemMib(0));
    }

    #[test]
    fn taken_port_and_start_limit_and_status_reject() {
        let mut n = node("n1", 8000);
        let rows = vec![res("a", "n1", 100, 30000)];
        let cap = NodeCapacity::from_rows(&n, &rows);
        assert_eq!(recheck(&cap, &plan("b", "n1", 100, 30000)), Err(Misfit::PortTaken));
        assert_eq!(recheck(&cap, &plan("b", "n1", 100, 40000)), Err(Misfit::PortTaken));
        n.max_concurrent_starts = 1;
        let cap = NodeCapacity::from_rows(&n, &rows);
        assert_eq!(recheck(&cap, &plan("b", "n1", 100, 30001)), Err(Misfit::StartLimit));
        n.max_concurrent_starts = 0;
        n.status = NodeStatus::Draining;
        let cap = NodeCapacity::from_rows(&n, &rows);
        assert_eq!(recheck(&cap, &plan("b", "n1", 100, 30001)), Err(Misfit::NodeNotReady));
        n.status = NodeStatus::Ready;
        n.disk_pressure = true;
        let cap = NodeCapacity::from_rows(&n, &rows);
        assert_eq!(recheck(&cap, &plan("b", "n1", 100, 30001)), Err(Misfit::NodeNotReady), "disk pressure closes the node");
    }
}
