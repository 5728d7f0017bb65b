//! The capacity view a start request plans on: every node's capacity as
//! last read from the rows, plus what starts in flight have taken from it
//! since.
//!
//! A start proposes a node from this view and its write places the server
//! there in the same transaction, re-checked against the rows (L1): the
//! view only proposes, it never admits. A proposal is taken from the view
//! at once, so concurrent starts spread over nodes instead of all choosing
//! the same best fit, and given back if its write did not place it. The
//! view is read again from the rows at most every `FRESH_FOR`; between
//! reads it can only be short of memory freed meanwhile (a stop), never
//! long of it, except for what this process did not see (another replica,
//! a node reporting less): then the write's re-check refuses the proposal
//! and the server waits in the queue, as it would have.
//!
//! This module must not decide placement itself (`berth_core::placement`
//! does) nor write anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_core::admission::NodeCapacity;
use berth_core::placement::{best_fit, plan, Placement, PlannerConfig, QueuedServer};
use berth_core::{MemMib, Millis, NodeId, ServerId};

/// How long a read of the rows is planned on before it is read again.
pub const FRESH_FOR: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct CapacityView {
    state: Mutex<ViewState>,
    refreshing: AtomicBool,
}

#[derive(Default)]
struct ViewState {
    caps: Vec<NodeCapacity>,
    read_at: Option<Instant>,
    /// A commit refused a proposal: the view is long of something it did
    /// not see, and is read again before it is trusted for long.
    stale: bool,
    /// Proposals taken and not yet settled (`None`), and those committed
    /// since (their settle time): re-applied to a fresh read, which may
    /// have begun before their commits.
    in_flight: HashMap<ServerId, (Taken, Option<Instant>)>,
}

/// What a proposal took from a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub node_id: NodeId,
    pub memory: MemMib,
    pub port: u16,
}

impl CapacityView {
    /// A node and port for `server` (`memory`, bound to `home` if set),
    /// taken from the view until `settle`; `None` if the view has never
    /// been read or nothing fits.
    pub fn propose(&self, server: &ServerId, memory: MemMib, home: Option<&NodeId>) -> Option<Taken> {
        let mut st = self.state.lock().expect("capacity view lock");
        st.read_at?;
        let (i, port) = best_fit(&st.caps, memory, home)?;
        st.caps[i].take(memory, port);
        let taken = Taken { node_id: st.caps[i].node_id.clone(), memory, port };
        st.in_flight.insert(server.clone(), (taken.clone(), None));
        Some(taken)
    }

    /// The queue worker's round: `berth_core::placement::plan` over the
    /// view, every plan taken from it like a start's proposal (settled the
    /// same way).
    pub fn plan_round(&self, queued: &[QueuedServer], now: Millis, cfg: PlannerConfig) -> Vec<Placement> {
        let mut st = self.state.lock().expect("capacity view lock");
        if st.read_at.is_none() {
            return Vec::new();
        }
        let plans = plan(&st.caps, queued, now, cfg);
        for p in &plans {
            if let Some(cap) = st.caps.iter_mut().find(|c| c.node_id == p.node_id) {
                cap.reserve(p);
            }
            st.in_flight.insert(p.server_id.clone(), (Taken { node_id: p.node_id.clone(), memory: p.memory_mib, port: p.port }, None));
        }
        plans
    }

    /// Whether the view is due to be read from the rows (never read, older
    /// than `FRESH_FOR`, or a commit refused a proposal from it).
    pub fn is_stale(&self) -> bool {
        let st = self.state.lock().expect("capacity view lock");
        st.stale || st.read_at.is_none_or(|t| t.elapsed() >= FRESH_FOR)
    }

    /// A commit refused a proposal from the view: read it again soon.
    pub fn mark_stale(&self) {
        self.state.lock().expect("capacity view lock").stale = true;
    }

    /// The proposal for `server` is settled: kept in the view if it was
    /// committed (and re-applied to reads begun before now), given back if
    /// not.
    pub fn settle(&self, server: &ServerId, committed: bool) {
        let mut st = self.state.lock().expect("capacity view lock");
        if committed {
            if let Some(entry) = st.in_flight.get_mut(server) {
                entry.1 = Some(Instant::now());
            }
            return;
        }
        let Some((t, _)) = st.in_flight.remove(server) else { return };
        if let Some(cap) = st.caps.iter_mut().find(|c| c.node_id == t.node_id) {
            cap.give_back(t.memory, t.port);
        }
    }

    /// Whether the caller should read the rows again: the view is older
    /// than `FRESH_FOR` (or was never read) and nobody else is reading.
    /// The caller then calls `replace` or `refresh_failed`.
    pub fn claim_refresh(&self) -> bool {
        self.is_stale() && !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// A read of the rows begun at `read_at`: proposals in flight, and
    /// those committed after the read began, are taken from it again.
    pub fn replace(&self, mut caps: Vec<NodeCapacity>, read_at: Instant) {
        let mut st = self.state.lock().expect("capacity view lock");
        self.refreshing.store(false, Ordering::Release);
        if st.read_at.is_some_and(|t| t > read_at) {
            // A read begun later was applied first: this one is older.
            return;
        }
        // Commits settled before the read began are in it.
        st.in_flight.retain(|_, (_, settled)| settled.is_none_or(|at| at >= read_at));
        for (t, _) in st.in_flight.values() {
            if let Some(cap) = caps.iter_mut().find(|c| c.node_id == t.node_id) {
                // A commit the read already saw holds its port there.
                if !cap.used_ports.contains(&t.port) {
                    cap.take(t.memory, t.port);
                }
            }
        }
        st.caps = caps;
        st.read_at = Some(read_at);
        st.stale = false;
    }

    pub fn refresh_failed(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// Forgets the view: no proposal until the rows are read again
    /// (leadership lost).
    pub fn invalidate(&self) {
        let mut st = self.state.lock().expect("capacity view lock");
        st.read_at = None;
        st.caps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{NodeStatus, PortRange};

    fn node(id: &str, allocatable: u64, used: &[u16]) -> NodeCapacity {
        NodeCapacity {
            node_id: NodeId(id.into()),
            status: NodeStatus::Ready,
            disk_pressure: false,
            allocatable: MemMib(allocatable),
            reserved: MemMib(0),
            pending_starts: 0,
            max_concurrent_starts: 0,
            ports: PortRange { min: 100, max: 103 },
            used_ports: used.iter().copied().collect(),
        }
    }

    fn id(s: &str) -> ServerId {
        ServerId(s.into())
    }

    #[test]
    fn nothing_is_proposed_before_the_rows_were_read() {
        let v = CapacityView::default();
        assert!(v.claim_refresh(), "never read: the first caller reads");
        assert!(!v.claim_refresh(), "one reader at a time");
        assert_eq!(v.propose(&id("a"), MemMib(1), None), None);
    }

    #[test]
    fn proposals_in_flight_take_memory_and_ports_until_given_back() {
        let v = CapacityView::default();
        v.replace(vec![node("n1", 1024, &[100])], Instant::now());
        let a = v.propose(&id("a"), MemMib(512), None).unwrap();
        let b = v.propose(&id("b"), MemMib(512), None).unwrap();
        assert_eq!((a.port, b.port), (101, 102), "concurrent starts get different ports");
        assert_eq!(v.propose(&id("c"), MemMib(512), None), None, "the node is full while both are in flight");
        // `b` was not placed: what it took is free again.
        v.settle(&id("b"), false);
        assert_eq!(v.propose(&id("c"), MemMib(512), None).map(|t| t.port), Some(102));
        // Bound to a node the view does not have: nothing.
        assert_eq!(v.propose(&id("d"), MemMib(1), Some(&NodeId("n9".into()))), None);
    }

    #[test]
    fn a_read_begun_before_a_commit_gets_it_again() {
        let v = CapacityView::default();
        v.replace(vec![node("n1", 1024, &[])], Instant::now());
        let read_begun = Instant::now();
        let a = v.propose(&id("a"), MemMib(512), None).unwrap();
        v.settle(&id("a"), true);
        // Read before `a` committed: its memory and port are not in it.
        v.replace(vec![node("n1", 1024, &[])], read_begun);
        let b = v.propose(&id("b"), MemMib(512), None).unwrap();
        assert_ne!(b.port, a.port);
        assert_eq!(v.propose(&id("c"), MemMib(512), None), None, "a and b fill the node");
        // A read begun after both committed has them; nothing is counted twice.
        v.settle(&id("b"), true);
        v.replace(vec![node("n1", 1024, &[a.port, b.port]).with_reserved(1024)], Instant::now());
        assert_eq!(v.propose(&id("c"), MemMib(1), None), None);
        v.replace(vec![node("n1", 2048, &[a.port, b.port]).with_reserved(1024)], Instant::now());
        assert!(v.propose(&id("c"), MemMib(1024), None).is_some(), "the rows' 1024 MiB counted once");
    }

    fn queued(id: &str, mib: u64, at: i64) -> QueuedServer {
        QueuedServer { server_id: ServerId(id.into()), generation: 0, memory_mib: MemMib(mib), queued_at: at, next_attempt_at: None, home_node: None }
    }

    #[test]
    fn the_queue_and_the_starts_plan_on_one_view() {
        let v = CapacityView::default();
        assert!(v.plan_round(&[queued("q1", 1, 0)], 0, PlannerConfig::default()).is_empty(), "nothing before a read");
        v.replace(vec![node("n1", 1024, &[])], Instant::now());
        // A start's proposal in flight holds its port and memory...
        let started = v.propose(&id("s"), MemMib(512), None).unwrap();
        // ...so the queue's round plans around it, and takes its own.
        let plans = v.plan_round(&[queued("q1", 256, 0), queued("q2", 512, 1)], 0, PlannerConfig::default());
        assert_eq!(plans.len(), 1, "512 + 256 fit, another 512 does not: {plans:?}");
        assert_ne!(plans[0].port, started.port);
        assert_eq!(v.propose(&id("t"), MemMib(512), None), None, "the round's plan holds its memory too");
        // A plan not committed is given back like a proposal.
        v.settle(&plans[0].server_id, false);
        assert!(v.propose(&id("t"), MemMib(256), None).is_some());
    }

    #[test]
    fn a_refused_proposal_or_an_old_read_never_stands_for_long() {
        let v = CapacityView::default();
        let older = Instant::now();
        v.replace(vec![node("n1", 1024, &[])], Instant::now());
        assert!(!v.is_stale());
        // A read begun before the one applied is dropped.
        v.replace(vec![node("n1", 0, &[])], older);
        assert!(v.propose(&id("a"), MemMib(512), None).is_some(), "the newer read stands");
        // A commit refused something the view proposed: read it again.
        v.mark_stale();
        assert!(v.is_stale() && v.claim_refresh());
        v.replace(vec![node("n1", 1024, &[])], Instant::now());
        assert!(!v.is_stale());
    }

    trait Reserved {
        fn with_reserved(self, mib: u64) -> Self;
    }

    impl Reserved for NodeCapacity {
        fn with_reserved(mut self, mib: u64) -> Self {
            self.reserved = MemMib(mib);
            self
        }
    }
}
