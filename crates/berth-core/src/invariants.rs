//! The invariant checker: a pure function over a store snapshot, and
//! optionally over what drivers really run, that reports every breach of
//! the laws of DESIGN.md it can see.
//!
//! - L1: per node, the sum of reservation rows is at most allocatable.
//! - L2: every reservation belongs to a server that is placed on that node
//!   with that generation, and every placed server has exactly one
//!   reservation (reserved memory is derived from rows, nothing else).
//! - L3: at most one live instance per server, and none older than the
//!   server's generation while the newer one runs.
//! - L5: a server's status agrees with what it holds (one placement at a
//!   time, only along the state machine).
//!
//! Tests, simulations and the admin API call it after steps; it never
//! repairs anything.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::model::{Generation, MemMib, Node, NodeId, Reservation, Server, ServerId, ServerStatus};
use crate::Millis;

/// What the checks read of a server. A `Server` has it all; a store reads
/// `CheckedServer` alone when it checks, so that a check of a whole fleet
/// does not decode every server's configuration.
pub trait ServerRecord {
    fn id(&self) -> &ServerId;
    fn status(&self) -> ServerStatus;
    fn node_id(&self) -> Option<&NodeId>;
    fn generation(&self) -> Generation;
    fn memory_mib(&self) -> MemMib;
    fn queued_at(&self) -> Option<Millis>;
}

/// The columns of a server the checks read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedServer {
    pub id: ServerId,
    pub status: ServerStatus,
    pub node_id: Option<NodeId>,
    pub generation: Generation,
    pub memory_mib: MemMib,
    pub queued_at: Option<Millis>,
}

impl From<&Server> for CheckedServer {
    fn from(s: &Server) -> CheckedServer {
        CheckedServer {
            id: s.id.clone(),
            status: s.status,
            node_id: s.node_id.clone(),
            generation: s.generation,
            memory_mib: s.memory_mib,
            queued_at: s.queued_at,
        }
    }
}

macro_rules! server_record {
    ($t:ty) => {
        impl ServerRecord for $t {
            fn id(&self) -> &ServerId {
                &self.id
            }
            fn status(&self) -> ServerStatus {
                self.status
            }
            fn node_id(&self) -> Option<&NodeId> {
                self.node_id.as_ref()
            }
            fn generation(&self) -> Generation {
                self.generation
            }
            fn memory_mib(&self) -> MemMib {
                self.memory_mib
            }
            fn queued_at(&self) -> Option<Millis> {
                self.queued_at
            }
        }
    };
}
server_record!(Server);
server_record!(CheckedServer);

/// An instance some driver reports as alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveInstance {
    pub node_id: NodeId,
    pub server_id: ServerId,
    pub generation: Generation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "law", rename_all = "snake_case")]
pub enum Violation {
    L1 { node_id: NodeId, reserved_mib: MemMib, allocatable_mib: MemMib },
    L2 { server_id: ServerId, detail: String },
    L3 { server_id: ServerId, detail: String },
    L4 { server_id: ServerId, detail: String },
    L5 { server_id: ServerId, detail: String },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::L1 { node_id, reserved_mib, allocatable_mib } => {
                write!(f, "L1: node {node_id} has {reserved_mib} reserved but only {allocatable_mib} allocatable")
            }
            Violation::L2 { server_id, detail } => write!(f, "L2: server {server_id}: {detail}"),
            Violation::L3 { server_id, detail } => write!(f, "L3: server {server_id}: {detail}"),
            Violation::L4 { server_id, detail } => write!(f, "L4: server {server_id}: {detail}"),
            Violation::L5 { server_id, detail } => write!(f, "L5: server {server_id}: {detail}"),
        }
    }
}

pub fn check<S: ServerRecord>(nodes: &[Node], servers: &[S], reservations: &[Reservation], live: Option<&[LiveInstance]>) -> Vec<Violation> {
    let mut out = Vec::new();

    // L1
    // Maps only looked up are hashed (a check of 20,000 servers spent most
    // of its time comparing ids in ordered maps); maps walked for the
    // report stay ordered, so violations come out in the same order.
    let mut per_node: HashMap<&NodeId, MemMib> = HashMap::new();
    for r in reservations {
        *per_node.entry(&r.node_id).or_default() += r.memory_mib;
    }
    for n in nodes {
        let reserved = per_node.get(&n.id).copied().unwrap_or_default();
        if reserved > n.allocatable_mib() {
            out.push(Violation::L1 { node_id: n.id.clone(), reserved_mib: reserved, allocatable_mib: n.allocatable_mib() });
        }
    }

    // L2
    let by_id: HashMap<&ServerId, &S> = servers.iter().map(|s| (s.id(), s)).collect();
    let mut rows_per_server: HashMap<&ServerId, usize> = HashMap::with_capacity(reservations.len());
    let node_ids: HashSet<&NodeId> = nodes.iter().map(|n| &n.id).collect();
    for r in reservations {
        *rows_per_server.entry(&r.server_id).or_default() += 1;
        if !node_ids.contains(&r.node_id) {
            out.push(Violation::L2 { server_id: r.server_id.clone(), detail: format!("reservation on unknown node {}", r.node_id) });
        }
        match by_id.get(&r.server_id) {
            None => out.push(Violation::L2 { server_id: r.server_id.clone(), detail: "reservation of an unknown server".into() }),
            Some(s) => {
                if !s.status().holds_reservation() {
                    out.push(Violation::L2 { server_id: s.id().clone(), detail: format!("reservation held by a server that is {}", s.status()) });
                }
                if s.generation() != r.generation || s.node_id() != Some(&r.node_id) {
                    out.push(Violation::L2 {
                        server_id: s.id().clone(),
                        detail: format!(
                            "reservation (generation {}, node {}) does not match the server (generation {}, node {:?})",
                            r.generation,
                            r.node_id,
                            s.generation(),
                            s.node_id()
                        ),
                    });
                }
                if s.memory_mib() != r.memory_mib {
                    out.push(Violation::L2 { server_id: s.id().clone(), detail: "reservation memory differs from the server's".into() });
                }
            }
        }
    }
    for s in servers {
        let rows = rows_per_server.get(s.id()).copied().unwrap_or(0);
        if s.status().holds_reservation() && rows != 1 {
            out.push(Violation::L2 { server_id: s.id().clone(), detail: format!("{} server has {rows} reservations", s.status()) });
        }
        // L5: the record agrees with the state machine.
        let placed = s.node_id().is_some();
        if s.status().holds_reservation() != placed {
            out.push(Violation::L5 { server_id: s.id().clone(), detail: format!("{} server {} a node", s.status(), if placed { "has" } else { "has no" }) });
        }
        if s.status() == ServerStatus::Queued && s.queued_at().is_none() {
            out.push(Violation::L5 { server_id: s.id().clone(), detail: "queued server without a queue time".into() });
        }
    }

    // L3
    if let Some(live) = live {
        let mut per_server: BTreeMap<&ServerId, Vec<&LiveInstance>> = BTreeMap::new();
        for i in live {
            per_server.entry(&i.server_id).or_default().push(i);
        }
        for (sid, insts) in per_server {
            if insts.len() > 1 {
                let desc: Vec<String> = insts.iter().map(|i| format!("generation {} on {}", i.generation, i.node_id)).collect();
                out.push(Violation::L3 { server_id: sid.clone(), detail: format!("{} live instances: {}", insts.len(), desc.join(", ")) });
            }
            if let Some(s) = by_id.get(sid) {
                for i in insts {
                    if i.generation > s.generation() {
                        out.push(Violation::L3 {
                            server_id: sid.clone(),
                            detail: format!("instance of generation {} is newer than the server's {}", i.generation, s.generation()),
                        });
                    }
                }
            }
        }
    }
    out
}

/// L4: at most one open billing session per server, and none for a server
/// that is not running that generation. A server that is stopping still
/// runs: its session closes when the stop is confirmed. `open` lists
/// (server, generation) of every open session.
pub fn check_billing<S: ServerRecord>(servers: &[S], open: &[(ServerId, Generation)]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut per_server: BTreeMap<&ServerId, usize> = BTreeMap::new();
    // Looked up by id: a scan per session made checking 20,000 servers
    // take seconds.
    let by_id: HashMap<&ServerId, &S> = servers.iter().map(|s| (s.id(), s)).collect();
    for (sid, gen) in open {
        *per_server.entry(sid).or_default() += 1;
        let running = by_id.get(sid).is_some_and(|s| s.generation() == *gen && matches!(s.status(), ServerStatus::Running | ServerStatus::Stopping));
        if !running {
            out.push(Violation::L4 { server_id: sid.clone(), detail: format!("open billing session (generation {gen}) for a server that is not running it") });
        }
    }
    for (sid, n) in per_server {
        if n > 1 {
            out.push(Violation::L4 { server_id: sid.clone(), detail: format!("{n} open billing sessions") });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRange, ReservationState};

    fn node(id: &str, alloc: u64) -> Node {
        Node {
            id: NodeId(id.into()),
            name: id.into(),
            address: String::new(),
            driver: "process".into(),
            total_mib: MemMib(alloc),
            system_reserved_mib: MemMib(0),
            cpu_cores: 1,
            status: crate::model::NodeStatus::Ready,
            max_concurrent_starts: 0,
            ports: PortRange { min: 1, max: 10 },
            epoch: 1,
            sync_seq: 0,
            last_sync_at: None,
            registered_at: 0,
            host_total_mib: MemMib(0),
            host_available_mib: MemMib(0),
            disk_total_mib: 0,
            disk_used_mib: 0,
            disk_pressure: false,
            drain_deadline: None,
        }
    }

    fn placed(id: &str, node: &str, mem: u64, gen: u64) -> (Server, Reservation) {
        let mut s = crate::reconcile_test_server();
        s.id = ServerId(id.into());
        s.status = ServerStatus::Running;
        s.node_id = Some(NodeId(node.into()));
        s.generation = gen;
        s.memory_mib = MemMib(mem);
        let r = Reservation {
            server_id: s.id.clone(),
            generation: gen,
            node_id: NodeId(node.into()),
            memory_mib: MemMib(mem),
            port: 1,
            state: ReservationState::Active,
            created_at: 0,
        };
        (s, r)
    }

    #[test]
    fn a_consistent_world_has_no_violation() {
        let (s1, r1) = placed("a", "n1", 1024, 1);
        let (s2, r2) = placed("b", "n1", 1024, 1);
        let v = check(&[node("n1", 2500)], &[s1, s2], &[r1, r2], Some(&[]));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn overcommit_is_an_l1_violation() {
        let (s1, r1) = placed("a", "n1", 1024, 1);
        let (s2, r2) = placed("b", "n1", 1024, 1);
        let (s3, r3) = placed("c", "n1", 1024, 1);
        let v = check(&[node("n1", 2500)], &[s1, s2, s3], &[r1, r2, r3], None);
        assert!(matches!(v.as_slice(), [Violation::L1 { .. }]), "{v:?}");
    }

    #[test]
    fn leaked_and_mismatched_reservations_are_l2_violations() {
        let (mut s1, r1) = placed("a", "n1", 100, 1);
        s1.status = ServerStatus::Stopped;
        s1.node_id = None;
        let v = check(&[node("n1", 2500)], &[s1], &[r1], None);
        assert!(v.iter().any(|x| matches!(x, Violation::L2 { .. })), "{v:?}");
        let (s2, mut r2) = placed("b", "n1", 100, 2);
        r2.generation = 1;
        let v = check(&[node("n1", 2500)], std::slice::from_ref(&s2), &[r2], None);
        assert!(v.iter().any(|x| matches!(x, Violation::L2 { .. })), "{v:?}");
        let v = check(&[node("n1", 2500)], &[s2], &[], None);
        assert!(v.iter().any(|x| matches!(x, Violation::L2 { .. })), "running server without a reservation: {v:?}");
    }

    #[test]
    fn two_live_instances_are_an_l3_violation() {
        let (s1, r1) = placed("a", "n1", 100, 2);
        let live = [
            LiveInstance { node_id: NodeId("n1".into()), server_id: s1.id.clone(), generation: 2 },
            LiveInstance { node_id: NodeId("n2".into()), server_id: s1.id.clone(), generation: 1 },
        ];
        let v = check(&[node("n1", 2500)], &[s1], &[r1], Some(&live));
        assert!(matches!(v.as_slice(), [Violation::L3 { .. }]), "{v:?}");
    }

    #[test]
    fn open_sessions_only_for_running_servers() {
        let (s1, _) = placed("a", "n1", 100, 2);
        assert!(check_billing(std::slice::from_ref(&s1), &[(s1.id.clone(), 2)]).is_empty());
        assert_eq!(check_billing(std::slice::from_ref(&s1), &[(s1.id.clone(), 1)]).len(), 1, "an old generation is not billed");
        assert_eq!(check_billing(std::slice::from_ref(&s1), &[(s1.id.clone(), 2), (s1.id.clone(), 2)]).len(), 1, "two open sessions");
        let mut stopped = s1.clone();
        stopped.status = ServerStatus::Stopped;
        assert_eq!(check_billing(&[stopped.clone()], &[(s1.id.clone(), 2)]).len(), 1);
        stopped.status = ServerStatus::Stopping;
        assert!(check_billing(&[stopped.clone()], &[(s1.id.clone(), 2)]).is_empty(), "billed until the stop is confirmed");
        for status in [ServerStatus::Unknown, ServerStatus::Queued, ServerStatus::Starting, ServerStatus::Crashed] {
            stopped.status = status;
            assert_eq!(check_billing(&[stopped.clone()], &[(s1.id.clone(), 2)]).len(), 1, "{status}");
        }
    }

    #[test]
    fn a_queued_server_on_a_node_is_an_l5_violation() {
        let (mut s1, _) = placed("a", "n1", 100, 1);
        s1.status = ServerStatus::Queued;
        let v = check(&[node("n1", 2500)], &[s1], &[], None);
        assert!(v.iter().any(|x| matches!(x, Violation::L5 { .. })), "{v:?}");
    }

    /// The checker's own read carries a server's checked columns only;
    /// over them every check reports exactly what it does over whole servers.
    #[test]
    fn checked_columns_alone_give_the_same_report() {
        let (mut stopped, leaked) = placed("a", "n1", 100, 1);
        stopped.status = ServerStatus::Stopped;
        stopped.node_id = None;
        let (mut queued, _) = placed("b", "n1", 100, 1);
        queued.status = ServerStatus::Queued;
        let (big, big_r) = placed("c", "n1", 3000, 2);
        let (running, mut stale_r) = placed("d", "n2", 100, 3);
        stale_r.generation = 2;
        let servers = [stopped, queued, big, running];
        let reservations = [leaked, big_r, stale_r];
        let nodes = [node("n1", 2500), node("n2", 2500)];
        let live = [LiveInstance { node_id: NodeId("n2".into()), server_id: servers[3].id.clone(), generation: 4 }];
        let open = [(servers[0].id.clone(), 1), (servers[3].id.clone(), 3), (servers[3].id.clone(), 3)];
        let checked: Vec<CheckedServer> = servers.iter().map(Into::into).collect();
        let whole = check(&nodes, &servers, &reservations, Some(&live));
        assert_eq!(whole.iter().map(std::mem::discriminant).collect::<std::collections::HashSet<_>>().len(), 4, "L1, L2, L3 and L5 in one report: {whole:?}");
        assert_eq!(check(&nodes, &checked, &reservations, Some(&live)), whole);
        let billing = check_billing(&servers, &open);
        assert_eq!(billing.len(), 2, "{billing:?}");
        assert_eq!(check_billing(&checked, &open), billing);
    }
}
