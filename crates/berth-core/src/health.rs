//! Health verdicts: from a snapshot of nodes and placed servers and `now`,
//! which nodes stopped renewing their lease, which servers are `unknown`,
//! which are lost, which nodes are lost, and which servers a drain deadline
//! stops. Pure; the node monitor applies the verdicts conditionally.
//!
//! Timing (DESIGN §7): the agent counts its lease from the *send* time of
//! its last successful renewal and fences an instance at
//! `sent + ttl + stop_after`. The control plane counts from the *receive*
//! time (`last_sync_at`), which is later, and adds a grace: a server is lost
//! at `received + ttl + grace + stop_after`, so on a healthy clock the
//! instance is already dead when the control plane may replace it.
//! `judging_from` (the monitor's start, after a failover grace) keeps a
//! control-plane outage from counting against the agents.

use crate::model::{Generation, Node, NodeId, NodeStatus, Server, ServerId, ServerStatus};
use crate::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub lease_ttl_ms: Millis,
    pub lease_grace_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The node's lease expired (ready or draining → unreachable).
    NodeUnreachable { node_id: NodeId, last_sync_at: Millis },
    /// A server on an unreachable node, within its window: not replaced,
    /// billing stops at the node's last renewal.
    ServerUnknown { server_id: ServerId, generation: Generation, last_alive: Millis },
    /// The server's window passed: its instance is fenced on the node; the
    /// reservation is released and billing closes at `last_alive`.
    ServerLost { server_id: ServerId, generation: Generation, node_id: NodeId, last_alive: Millis },
    /// Unreachable past the longest window of its servers.
    NodeLost { node_id: NodeId },
    /// A draining node's deadline passed: stop what still runs there.
    DrainDeadline { server_id: ServerId, generation: Generation },
}

/// When the node was last heard from, for judging: never earlier than the
/// moment judging began, so time the control plane itself was away does
/// not count.
pub fn effective_last_seen(node: &Node, judging_from: Millis) -> Millis {
    node.last_sync_at.unwrap_or(node.registered_at).max(judging_from)
}

/// Whether `judge` could give a verdict about `node` (or its servers)
/// now: its lease expired, it is unreachable or lost, or its drain
/// deadline passed. The monitor reads the servers of these nodes only: a
/// healthy node's servers never yield a verdict.
pub fn needs_judging(node: &Node, now: Millis, judging_from: Millis, cfg: HealthConfig) -> bool {
    if now < judging_from {
        return false;
    }
    let expired = now > effective_last_seen(node, judging_from) + cfg.lease_ttl_ms + cfg.lease_grace_ms;
    match node.status {
        NodeStatus::Ready => expired,
        NodeStatus::Draining => expired || node.drain_deadline.is_some_and(|d| now >= d),
        NodeStatus::Unreachable | NodeStatus::Lost => true,
        NodeStatus::Removed => false,
    }
}

pub fn judge(nodes: &[Node], placed: &[Server], now: Millis, judging_from: Millis, cfg: HealthConfig) -> Vec<Verdict> {
    let mut out = Vec::new();
    if now < judging_from {
        return out;
    }
    for node in nodes {
        let on_node: Vec<&Server> = placed.iter().filter(|s| s.node_id.as_ref() == Some(&node.id) && s.status.holds_reservation()).collect();
        let last = effective_last_seen(node, judging_from);
        let last_alive = node.last_sync_at.unwrap_or(node.registered_at);
        let expired = now > last + cfg.lease_ttl_ms + cfg.lease_grace_ms;
        match node.status {
            NodeStatus::Ready | NodeStatus::Draining if expired => {
                out.push(Verdict::NodeUnreachable { node_id: node.id.clone(), last_sync_at: last_alive });
                for s in &on_node {
                    if matches!(s.status, ServerStatus::Starting | ServerStatus::Running) {
                        out.push(Verdict::ServerUnknown { server_id: s.id.clone(), generation: s.generation, last_alive });
                    }
                }
            }
            NodeStatus::Draining if node.drain_deadline.is_some_and(|d| now >= d) => {
                for s in &on_node {
                    if matches!(s.status, ServerStatus::Starting | ServerStatus::Running) {
                        out.push(Verdict::DrainDeadline { server_id: s.id.clone(), generation: s.generation });
                    }
                }
            }
            NodeStatus::Unreachable | NodeStatus::Lost => {
                let mut remaining = 0;
                for s in &on_node {
                    if now > last + cfg.lease_ttl_ms + cfg.lease_grace_ms + s.stop_after_ms {
                        out.push(Verdict::ServerLost { server_id: s.id.clone(), generation: s.generation, node_id: node.id.clone(), last_alive });
                    } else {
                        remaining += 1;
                    }
                }
                if node.status == NodeStatus::Unreachable && remaining == 0 {
                    out.push(Verdict::NodeLost { node_id: node.id.clone() });
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemMib, PortRange};

    const CFG: HealthConfig = HealthConfig { lease_ttl_ms: 10_000, lease_grace_ms: 5_000 };

    fn node(status: NodeStatus, last: Millis) -> Node {
        Node {
            id: NodeId("n1".into()),
            name: "n1".into(),
            address: String::new(),
            driver: "process".into(),
            total_mib: MemMib(1000),
            system_reserved_mib: MemMib(0),
            cpu_cores: 1,
            status,
            max_concurrent_starts: 0,
            ports: PortRange { min: 1, max: 2 },
            epoch: 1,
            sync_seq: 1,
            last_sync_at: Some(last),
            registered_at: 0,
            host_total_mib: MemMib(0),
            host_available_mib: MemMib(0),
            disk_total_mib: 0,
            disk_used_mib: 0,
            disk_pressure: false,
            drain_deadline: None,
        }
    }

    fn server(status: ServerStatus, window: Millis) -> Server {
        let mut s = crate::reconcile_test_server();
        s.status = status;
        s.node_id = Some(NodeId("n1".into()));
        s.generation = 3;
        s.stop_after_ms = window;
        s
    }

    #[test]
    fn judging_only_the_nodes_that_need_it_gives_the_same_verdicts() {
        let mut nodes = Vec::new();
        let mut servers = Vec::new();
        let statuses = [NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Unreachable, NodeStatus::Lost, NodeStatus::Removed];
        for (i, status) in statuses.iter().enumerate() {
            for (j, last) in [100_000, 110_000, 130_000].iter().enumerate() {
                for deadline in [None, Some(120_000), Some(200_000)] {
                    let mut n = node(*status, *last);
                    n.id = NodeId(format!("n{i}{j}{}", deadline.unwrap_or(0)));
                    n.drain_deadline = deadline;
                    for (k, st) in [ServerStatus::Running, ServerStatus::Unknown, ServerStatus::Starting].iter().enumerate() {
                        let mut s = server(*st, [0, 20_000, 300_000][k]);
                        s.id = ServerId(format!("{}-{k}", n.id));
                        s.node_id = Some(n.id.clone());
                        servers.push(s);
                    }
                    nodes.push(n);
                }
            }
        }
        for now in [110_000, 116_000, 126_000, 150_000, 500_000] {
            for judging_from in [0, 112_000] {
                let all = judge(&nodes, &servers, now, judging_from, CFG);
                let some: Vec<Node> = nodes.iter().filter(|n| needs_judging(n, now, judging_from, CFG)).cloned().collect();
                let theirs: Vec<Server> = servers.iter().filter(|s| some.iter().any(|n| Some(&n.id) == s.node_id.as_ref())).cloned().collect();
                assert_eq!(judge(&some, &theirs, now, judging_from, CFG), all, "now {now}, judging from {judging_from}");
                assert!(some.len() < nodes.len(), "some nodes are healthy at {now}");
            }
        }
    }

    #[test]
    fn a_renewing_node_is_fine() {
        let v = judge(&[node(NodeStatus::Ready, 100_000)], &[server(ServerStatus::Running, 0)], 114_000, 0, CFG);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn lease_expiry_makes_the_node_unreachable_and_its_servers_unknown() {
        let v = judge(&[node(NodeStatus::Ready, 100_000)], &[server(ServerStatus::Running, 300_000)], 115_001, 0, CFG);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(matches!(v[0], Verdict::NodeUnreachable { .. }));
        assert!(matches!(v[1], Verdict::ServerUnknown { last_alive: 100_000, .. }));
    }

    #[test]
    fn a_server_is_lost_only_after_ttl_grace_and_its_window() {
        let n = node(NodeStatus::Unreachable, 100_000);
        let s = server(ServerStatus::Unknown, 20_000);
        assert!(judge(std::slice::from_ref(&n), std::slice::from_ref(&s), 135_000, 0, CFG).is_empty());
        let v = judge(&[n], &[s], 135_001, 0, CFG);
        assert!(matches!(v[0], Verdict::ServerLost { last_alive: 100_000, .. }), "{v:?}");
        assert!(matches!(v[1], Verdict::NodeLost { .. }), "the last server gone, the node is lost: {v:?}");
    }

    #[test]
    fn the_longest_window_keeps_the_node_from_being_lost() {
        let n = node(NodeStatus::Unreachable, 100_000);
        let v = judge(&[n], &[server(ServerStatus::Unknown, 0), server(ServerStatus::Unknown, 60_000)], 120_000, 0, CFG);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(v[0], Verdict::ServerLost { .. }));
    }

    #[test]
    fn time_before_judging_began_does_not_count() {
        // The control plane was down from 100 s to 200 s; it judges from 215 s.
        let n = node(NodeStatus::Ready, 100_000);
        let s = server(ServerStatus::Running, 300_000);
        assert!(judge(std::slice::from_ref(&n), std::slice::from_ref(&s), 210_000, 215_000, CFG).is_empty());
        assert!(judge(std::slice::from_ref(&n), std::slice::from_ref(&s), 229_000, 215_000, CFG).is_empty(), "agents get a full lease after the restart");
        let v = judge(&[n], &[s], 230_001, 215_000, CFG);
        assert!(matches!(v[0], Verdict::NodeUnreachable { .. }));
    }

    #[test]
    fn a_drain_deadline_stops_what_runs() {
        let mut n = node(NodeStatus::Draining, 100_000);
        n.drain_deadline = Some(105_000);
        assert!(judge(&[n.clone()], &[server(ServerStatus::Running, 0)], 104_000, 0, CFG).is_empty());
        let v = judge(&[n], &[server(ServerStatus::Running, 0)], 105_000, 0, CFG);
        assert!(matches!(v[0], Verdict::DrainDeadline { .. }));
    }
}
