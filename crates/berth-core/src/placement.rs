//! The planner: a pure function from a capacity snapshot, the queue and
//! `now` to a list of placements.
//!
//! Best fit on allocatable memory minus reservations; nodes that are not
//! ready, are at their concurrent-start limit or have no free port are
//! skipped. The queue is served FIFO with backfill: a server that does not
//! fit is passed over so smaller ones behind it can start, until it has
//! waited past the starvation bound; from then on nothing behind it is
//! placed, so capacity that frees up goes to it first. Plans are proposals:
//! only the admission committer's re-check makes them real.

use serde::{Deserialize, Serialize};

use crate::admission::NodeCapacity;
use crate::model::{Generation, MemMib, NodeId, ServerId};
use crate::Millis;

/// A server waiting in the queue, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedServer {
    pub server_id: ServerId,
    /// The server's generation when the snapshot was taken; the committer
    /// refuses the plan if it changed meanwhile.
    pub generation: Generation,
    pub memory_mib: MemMib,
    pub queued_at: Millis,
    /// A transient failure delays the next attempt until this time.
    pub next_attempt_at: Option<Millis>,
    /// A stateful server whose world is on this node may run only there.
    pub home_node: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannerConfig {
    /// After this long in the queue a server blocks backfill.
    pub starvation_ms: Millis,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig { starvation_ms: 60_000 }
    }
}

/// A proposal to place one server on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub server_id: ServerId,
    pub expected_generation: Generation,
    pub node_id: NodeId,
    pub memory_mib: MemMib,
    pub port: u16,
}

impl Placement {
    /// The fencing token the placement gets once committed.
    pub fn new_generation(&self) -> Generation {
        self.expected_generation + 1
    }
}

/// Orders the queue: oldest request first, ties by id so the order is total.
pub fn queue_order(queue: &mut [QueuedServer]) {
    queue.sort_by(|a, b| a.queued_at.cmp(&b.queued_at).then_with(|| a.server_id.cmp(&b.server_id)));
}

/// Chooses the node for one server: the feasible node with the least free
/// memory left afterwards (best fit), ties broken by fewer starts in flight,
/// then by id. Returns the index into `nodes` and the port.
pub fn best_fit(nodes: &[NodeCapacity], memory: MemMib, home: Option<&NodeId>) -> Option<(usize, u16)> {
    // The best node by memory is found first and its port looked up only
    // then: looking up a port on every node made planning a queue of
    // thousands quadratic in the ports in use. A node without a free port
    // is passed over and the next best taken, as if it did not fit.
    let mut no_port: Vec<usize> = Vec::new();
    loop {
        let (i, n) = nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| !no_port.contains(i) && home.is_none_or(|h| &n.node_id == h))
            .filter(|(_, n)| n.fits_memory(memory).is_ok())
            .min_by(|(_, a), (_, b)| {
                (a.free().0 - memory.0).cmp(&(b.free().0 - memory.0)).then(a.pending_starts.cmp(&b.pending_starts)).then_with(|| a.node_id.cmp(&b.node_id))
            })?;
        match n.first_free_port() {
            Some(port) => return Some((i, port)),
            None => no_port.push(i),
        }
    }
}

/// Plans as many queued servers as fit. `nodes` is a snapshot and is not
/// modified; the planner tracks its own placements on a copy.
pub fn plan(nodes: &[NodeCapacity], queue: &[QueuedServer], now: Millis, cfg: PlannerConfig) -> Vec<Placement> {
    let mut nodes = nodes.to_vec();
    let mut queue = queue.to_vec();
    queue_order(&mut queue);
    let largest_node = nodes.iter().filter(|n| n.accepts_placements()).map(|n| n.allocatable).max().unwrap_or(MemMib(0));
    let mut out = Vec::new();
    for q in &queue {
        if q.next_attempt_at.is_some_and(|t| t > now) {
            continue;
        }
        match best_fit(&nodes, q.memory_mib, q.home_node.as_ref()) {
            Some((i, port)) => {
                nodes[i].take(q.memory_mib, port);
                out.push(Placement {
                    server_id: q.server_id.clone(),
                    expected_generation: q.generation,
                    node_id: nodes[i].node_id.clone(),
                    memory_mib: q.memory_mib,
                    port,
                });
            }
            None => {
                // A starved server blocks backfill, but only if it could ever
                // fit: one larger than every node would block the queue
                // forever and is left to the queue timeout instead.
                // A server tied to its home node never blocks the others.
                let starved = now - q.queued_at >= cfg.starvation_ms && q.home_node.is_none();
                if starved && q.memory_mib <= largest_node {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{recheck, NodeCapacity};
    use crate::model::{NodeStatus, PortRange};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn cap(id: &str, alloc: u64, reserved: u64) -> NodeCapacity {
        NodeCapacity {
            node_id: NodeId(id.into()),
            status: NodeStatus::Ready,
            disk_pressure: false,
            allocatable: MemMib(alloc),
            reserved: MemMib(reserved),
            pending_starts: 0,
            max_concurrent_starts: 0,
            ports: PortRange { min: 1000, max: 1999 },
            used_ports: BTreeSet::new(),
        }
    }

    fn q(id: &str, mem: u64, at: Millis) -> QueuedServer {
        QueuedServer { server_id: ServerId(id.into()), generation: 0, memory_mib: MemMib(mem), queued_at: at, next_attempt_at: None, home_node: None }
    }

    #[test]
    fn three_gigabytes_on_2500_places_exactly_two() {
        let nodes = vec![cap("n1", 2500, 0)];
        let queue = vec![q("a", 1024, 1), q("b", 1024, 2), q("c", 1024, 3)];
        let plans = plan(&nodes, &queue, 10, PlannerConfig::default());
        let ids: Vec<_> = plans.iter().map(|p| p.server_id.0.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_ne!(plans[0].port, plans[1].port);
    }

    #[test]
    fn best_fit_prefers_the_tightest_node() {
        let nodes = vec![cap("big", 8000, 0), cap("tight", 2000, 900)];
        let plans = plan(&nodes, &[q("a", 1000, 0)], 0, PlannerConfig::default());
        assert_eq!(plans[0].node_id.0, "tight");
    }

    #[test]
    fn backfill_places_smaller_servers_behind_a_big_one() {
        let nodes = vec![cap("n1", 1000, 0)];
        let queue = vec![q("big", 900, 0), q("small", 100, 1)];
        let mut nodes2 = nodes.clone();
        nodes2[0].reserved = MemMib(500);
        let plans = plan(&nodes2, &queue, 10, PlannerConfig { starvation_ms: 1000 });
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].server_id.0, "small");
    }

    #[test]
    fn a_starved_server_blocks_backfill() {
        let mut nodes = vec![cap("n1", 1000, 0)];
        nodes[0].reserved = MemMib(500);
        let queue = vec![q("big", 900, 0), q("small", 100, 1)];
        let plans = plan(&nodes, &queue, 5000, PlannerConfig { starvation_ms: 1000 });
        assert!(plans.is_empty(), "backfill must stop behind a starved request: {plans:?}");
    }

    #[test]
    fn a_server_larger_than_every_node_never_blocks() {
        let nodes = vec![cap("n1", 1000, 0)];
        let queue = vec![q("huge", 5000, 0), q("small", 100, 1)];
        let plans = plan(&nodes, &queue, 1_000_000, PlannerConfig { starvation_ms: 1000 });
        assert_eq!(plans.len(), 1);
    }

    #[test]
    fn backoff_delays_an_attempt_without_blocking_others() {
        let nodes = vec![cap("n1", 1000, 0)];
        let mut a = q("a", 100, 0);
        a.next_attempt_at = Some(50);
        let plans = plan(&nodes, &[a.clone(), q("b", 100, 1)], 10, PlannerConfig::default());
        assert_eq!(plans.iter().map(|p| p.server_id.0.as_str()).collect::<Vec<_>>(), ["b"]);
        let plans = plan(&nodes, &[a, q("b", 100, 1)], 60, PlannerConfig::default());
        assert_eq!(plans.len(), 2);
    }

    #[test]
    fn a_server_with_a_home_node_waits_for_it() {
        let nodes = vec![cap("other", 8000, 0), cap("home", 1000, 1000)];
        let mut q1 = q("stateful", 100, 0);
        q1.home_node = Some(NodeId("home".into()));
        let plans = plan(&nodes, &[q1.clone(), q("x", 100, 1)], 1_000_000, PlannerConfig { starvation_ms: 10 });
        assert_eq!(plans.len(), 1, "the home node is full; the other server is not blocked: {plans:?}");
        assert_eq!(plans[0].server_id.0, "x");
        let nodes = vec![cap("other", 8000, 0), cap("home", 1000, 0)];
        let plans = plan(&nodes, &[q1], 10, PlannerConfig::default());
        assert_eq!(plans[0].node_id.0, "home", "never elsewhere, even where there is more room");
    }

    #[test]
    fn draining_nodes_and_start_limits_are_skipped() {
        let mut nodes = vec![cap("drain", 8000, 0), cap("limited", 8000, 0)];
        nodes[0].status = NodeStatus::Draining;
        nodes[1].max_concurrent_starts = 2;
        let queue: Vec<_> = (0..5).map(|i| q(&format!("s{i}"), 10, i)).collect();
        let plans = plan(&nodes, &queue, 10, PlannerConfig::default());
        assert_eq!(plans.len(), 2);
        assert!(plans.iter().all(|p| p.node_id.0 == "limited"));
    }

    proptest! {
        // L1 at the planning level: whatever the snapshot and queue, the
        // plans re-check cleanly in order and never exceed any node.
        #[test]
        fn plans_never_overcommit(
            allocs in proptest::collection::vec(0u64..10_000, 1..8),
            reserved in proptest::collection::vec(0u64..10_000, 8),
            mems in proptest::collection::vec(1u64..4_000, 0..60),
        ) {
            let nodes: Vec<_> = allocs.iter().enumerate()
                .map(|(i, a)| cap(&format!("n{i}"), *a, reserved[i].min(*a)))
                .collect();
            let queue: Vec<_> = mems.iter().enumerate().map(|(i, m)| q(&format!("s{i:03}"), *m, i as i64)).collect();
            let plans = plan(&nodes, &queue, 100, PlannerConfig::default());
            let mut check = nodes.clone();
            for p in &plans {
                let n = check.iter_mut().find(|n| n.node_id == p.node_id).unwrap();
                prop_assert_eq!(recheck(n, p), Ok(()));
                n.take(p.memory_mib, p.port);
                prop_assert!(n.reserved <= n.allocatable);
            }
        }

        // The fast best fit chooses exactly what a scan of every node's
        // first free port would, including when ports run out.
        #[test]
        fn best_fit_equals_the_exhaustive_scan(
            allocs in proptest::collection::vec(0u64..5_000, 1..10),
            reserved in proptest::collection::vec(0u64..5_000, 10),
            used in proptest::collection::vec(0u16..6, 10),
            pending in proptest::collection::vec(0u32..3, 10),
            memory in 1u64..3_000,
        ) {
            let nodes: Vec<_> = allocs.iter().enumerate()
                .map(|(i, a)| {
                    let mut n = cap(&format!("n{i}"), *a, reserved[i].min(*a));
                    n.ports = PortRange { min: 1000, max: 1004 };
                    n.used_ports = (0..used[i]).map(|p| 1000 + p).collect();
                    n.pending_starts = pending[i];
                    n
                })
                .collect();
            let exhaustive = nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.fits_memory(MemMib(memory)).is_ok())
                .filter_map(|(i, n)| n.first_free_port().map(|p| (i, p, n)))
                .min_by(|(_, _, a), (_, _, b)| {
                    (a.free().0 - memory)
                        .cmp(&(b.free().0 - memory))
                        .then(a.pending_starts.cmp(&b.pending_starts))
                        .then_with(|| a.node_id.cmp(&b.node_id))
                })
                .map(|(i, p, _)| (i, p));
            prop_assert_eq!(best_fit(&nodes, MemMib(memory), None), exhaustive);
        }
    }
}
