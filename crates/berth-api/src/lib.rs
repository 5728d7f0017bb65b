//! berth-api: the wire types of the HTTP API and of the agent protocol, and
//! their conversions from core types.
//!
//! Everything a client or an agent sends or receives is defined here, once,
//! so the control plane, the agent, the CLI and the tests agree on names.
//! Times on the wire are RFC 3339 strings. This crate must not contain
//! behaviour beyond conversions.

use berth_core::invariants::Violation;
use berth_core::notify::Webhook;
use berth_core::operation::Operation;
use berth_core::reconcile::InstanceReport;
use berth_core::template::InstanceSpec;
use berth_core::{Event, LastExit, MemMib, Millis, Node, NodeStatus, PortRange, Server, ServerStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Formats a time for the wire.
pub fn rfc3339(ms: Millis) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateServer {
    pub name: String,
    pub template: String,
    pub memory_mib: u64,
    #[serde(default)]
    pub config: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateless: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Admin tokens may create a server for a tenant; tenant tokens always
    /// create for their own tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `never` (default) or `on-failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub template: String,
    pub memory_mib: u64,
    pub config: Map<String, Value>,
    pub status: ServerStatus,
    pub node_id: Option<String>,
    pub generation: u64,
    pub port: Option<u16>,
    pub last_exit: Option<LastExit>,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub used_mib: Option<u64>,
    /// Disconnect window: seconds the instance may run on without its node
    /// renewing before it is fenced and the server is lost.
    pub stop_after_s: i64,
    pub stateless: bool,
    pub plan: String,
    /// Set for a stateful server lost with its node: where its world is.
    pub home_node: Option<String>,
    #[serde(default)]
    pub restart_policy: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Server> for ServerView {
    fn from(s: &Server) -> Self {
        ServerView {
            id: s.id.0.clone(),
            name: s.name.clone(),
            tenant: s.tenant.clone(),
            template: s.template.clone(),
            memory_mib: s.memory_mib.0,
            config: s.config.clone(),
            status: s.status,
            node_id: s.node_id.as_ref().map(|n| n.0.clone()),
            generation: s.generation,
            port: s.port,
            last_exit: s.last_exit.clone(),
            attempts: s.attempts,
            next_attempt_at: s.next_attempt_at.map(rfc3339),
            last_error: s.last_error.clone(),
            used_mib: s.used_mib.map(|m| m.0),
            stop_after_s: s.stop_after_ms / 1000,
            stateless: s.stateless,
            plan: s.plan.clone(),
            home_node: s.home_node.as_ref().map(|n| n.0.clone()),
            restart_policy: s.restart_policy.as_str().to_string(),
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMemory {
    pub total_mib: u64,
    pub allocatable_mib: u64,
    pub reserved_mib: u64,
    pub used_mib: u64,
    pub available_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub status: NodeStatus,
    pub driver: String,
    pub address: String,
    pub memory: NodeMemory,
    pub ports: PortRange,
    pub max_concurrent_starts: u32,
    /// Servers holding a reservation on the node.
    pub servers: u32,
    pub last_sync_at: Option<String>,
    pub disk: DiskStats,
    pub disk_pressure: bool,
    pub drain_deadline: Option<String>,
    /// Present while the node's real memory use has drifted from its
    /// reservations (see `berth_core::drift`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_drift: Option<DriftView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftView {
    pub message: String,
    pub since: String,
    /// Host use beyond reservations plus system reserve.
    pub over_reservations_mib: u64,
    /// Memory used by processes berth does not manage.
    pub unmanaged_mib: u64,
    /// Of which beyond the system reserve.
    pub unmanaged_excess_mib: u64,
}

impl NodeView {
    pub fn new(n: &Node, reserved: MemMib, servers: u32) -> NodeView {
        NodeView {
            id: n.id.0.clone(),
            name: n.name.clone(),
            status: n.status,
            driver: n.driver.clone(),
            address: n.address.clone(),
            memory: NodeMemory {
                total_mib: n.total_mib.0,
                allocatable_mib: n.allocatable_mib().0,
                reserved_mib: reserved.0,
                used_mib: n.used_mib().0,
                available_mib: n.host_available_mib.0,
            },
            ports: n.ports,
            max_concurrent_starts: n.max_concurrent_starts,
            servers,
            last_sync_at: n.last_sync_at.map(rfc3339),
            disk: DiskStats { total_mib: n.disk_total_mib, used_mib: n.disk_used_mib },
            disk_pressure: n.disk_pressure,
            drain_deadline: n.drain_deadline.map(rfc3339),
            memory_drift: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateToken {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The secret; shown once, stored only hashed.
    pub token: String,
    pub kind: String,
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub server_id: Option<String>,
    pub node_id: Option<String>,
    pub message: String,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        EventView {
            seq: e.seq,
            at: rfc3339(e.at),
            kind: e.kind.clone(),
            server_id: e.server_id.as_ref().map(|s| s.0.clone()),
            node_id: e.node_id.as_ref().map(|n| n.0.clone()),
            message: e.message.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<EventView>,
    /// Pass as `after` to read the next page.
    pub next_cursor: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationView {
    pub id: String,
    pub server_id: String,
    pub kind: String,
    /// `pending running succeeded failed cancelled`
    pub status: String,
    pub phase: Option<String>,
    /// `user` or `restart_policy`
    pub origin: String,
    pub seq: i64,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl From<&Operation> for OperationView {
    fn from(o: &Operation) -> Self {
        OperationView {
            id: o.id.clone(),
            server_id: o.server_id.0.clone(),
            kind: o.kind.as_str().to_string(),
            status: o.status.as_str().to_string(),
            phase: o.phase.map(|p| p.as_str().to_string()),
            origin: o.origin.as_str().to_string(),
            seq: o.seq,
            attempts: o.attempts,
            next_attempt_at: o.next_attempt_at.map(rfc3339),
            error_code: o.error_code.clone(),
            error: o.error.clone(),
            created_at: rfc3339(o.created_at),
            started_at: o.started_at.map(rfc3339),
            finished_at: o.finished_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationList {
    pub operations: Vec<OperationView>,
    pub next_cursor: Option<i64>,
}

/// The answer to an operation request: the operation and the server as it
/// is right after admission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationAccepted {
    pub operation: OperationView,
    pub server: ServerView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    pub url: String,
    /// Event kinds; empty: the alert kinds; `["*"]`: every kind.
    #[serde(default)]
    pub events: Vec<String>,
    /// Admin tokens may create a webhook for one tenant; without it the
    /// webhook is global. Tenant tokens always create for their tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub tenant: Option<String>,
    pub events: Vec<String>,
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub created_at: String,
    /// The signing secret: only in the answer that created the webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<&Webhook> for WebhookView {
    fn from(w: &Webhook) -> Self {
        WebhookView {
            id: w.id.clone(),
            url: w.url.clone(),
            tenant: w.tenant.clone(),
            events: w.events.clone(),
            enabled: w.enabled,
            consecutive_failures: w.consecutive_failures,
            created_at: rfc3339(w.created_at),
            secret: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryView {
    /// Also the `Idempotency-Key` the receiver saw.
    pub id: String,
    pub channel: String,
    pub webhook_id: Option<String>,
    pub event_seq: i64,
    pub event_kind: String,
    /// `pending delivered failed`
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvariantReport {
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateView {
    pub name: String,
    pub description: String,
    pub stateless: bool,
    pub admin_only: bool,
    /// Drivers the template can run with (`process`, `docker`).
    #[serde(default)]
    pub drivers: Vec<String>,
    pub config: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateList {
    pub templates: Vec<TemplateView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostSession {
    pub node_id: String,
    pub generation: u64,
    pub started_at: String,
    /// Null while the session is open.
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    pub memory_mib: u64,
    pub plan: String,
    /// Minor currency units; an open session's amount so far.
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    pub server_id: String,
    pub sessions: Vec<CostSession>,
    pub total: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub tenant: Option<String>,
    pub month: String,
    pub servers: u32,
    pub sessions: u32,
    /// Server-seconds billed in the month, and the amount in minor units.
    pub billed_seconds: i64,
    pub amount: i64,
}

/// A server's data dir kept on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeView {
    pub server_id: String,
    /// Null when the server was deleted.
    pub server_name: Option<String>,
    pub server_status: Option<ServerStatus>,
    /// The server's current node, if it is placed.
    pub server_node_id: Option<String>,
    /// True when this copy is not the one the server runs on: a world left
    /// behind by a lost node or a move, kept for an operator to recover.
    pub recovery_candidate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeList {
    pub node_id: String,
    pub volumes: Vec<VolumeView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainRequest {
    /// Servers still on the node are stopped gracefully after this long.
    #[serde(default)]
    pub deadline_s: Option<u64>,
}

// ---- agent protocol ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(default)]
    pub address: String,
    pub driver: String,
    pub total_mib: u64,
    pub allocatable_mib: u64,
    pub cpu_cores: u32,
    pub ports: PortRange,
    #[serde(default)]
    pub max_concurrent_starts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: String,
    /// Every sync must carry this epoch; a newer registration fences older
    /// runs of the agent.
    pub epoch: u64,
    pub sync_interval_ms: u64,
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStats {
    pub total_mib: u64,
    pub available_mib: u64,
}

/// The agent's data volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStats {
    pub total_mib: u64,
    pub used_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub node_id: String,
    pub epoch: u64,
    /// Strictly increasing within an epoch; older requests are refused.
    pub seq: u64,
    pub instances: Vec<InstanceReport>,
    pub host: HostStats,
    #[serde(default)]
    pub disk: Option<DiskStats>,
    /// Servers whose data dir (world) is on this node, running or not.
    #[serde(default)]
    pub volumes: Option<Vec<String>>,
    /// Long-poll: if nothing is to change, the answer may wait this long
    /// for new work.
    #[serde(default)]
    pub wait_ms: u64,
    /// The `desired_version` of the last desired set the agent received;
    /// if it still holds, the answer leaves the set out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    /// The agent applies an answer that carries only the change to the set
    /// it named (`base_version`). An agent that does not say so (one older
    /// than delta answers) gets the whole set: it would take a delta for
    /// the whole set and stop everything else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepts_delta: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The complete set of instances the node should run; empty when
    /// `unchanged`; only those added to the set named `base_version` when
    /// that is present.
    pub desired: Vec<InstanceSpec>,
    /// The answer is a change to the set the agent named in its request
    /// (`desired_version`), which this names: the new set is that one
    /// without `removed`, with `desired` added. A generation's spec never
    /// changes, so sending again what the agent holds would only cost
    /// rendering, bytes and parsing on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<String>,
    /// The instances that left the set named `base_version`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<InstanceKey>,
    /// Names the desired set (see `desired_version`).
    #[serde(default)]
    pub desired_version: String,
    /// The desired set is the one the agent named in its request: keep it.
    /// Most syncs are renewals that change nothing; sending and rendering
    /// the whole set on each would cost more than everything else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    /// Instances to end at once (SIGKILL), not gracefully: a `kill`
    /// operation. They are never in `desired`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kill: Vec<KillOrder>,
    pub lease_ttl_ms: u64,
    pub sync_interval_ms: u64,
}

/// Names a desired set by what identifies it: each (server, generation).
/// A generation's instance spec never changes (a change of a server is a
/// new placement, a new generation), so equal versions mean equal sets.
/// FNV-1a over the sorted pairs, in hex.
pub fn desired_version(keys: &[(berth_core::ServerId, u64)]) -> String {
    let mut sorted: Vec<&(berth_core::ServerId, u64)> = keys.iter().collect();
    sorted.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, generation) in sorted {
        for b in id.0.bytes().chain([b':']).chain(generation.to_le_bytes()).chain([b';']) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}.{}", keys.len())
}

/// One instance of a desired set: a server's generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceKey {
    pub server_id: berth_core::ServerId,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillOrder {
    pub server_id: berth_core::ServerId,
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::ServerId;

    #[test]
    fn the_desired_version_names_the_set_not_its_order() {
        let a = (ServerId("srv_a".into()), 1);
        let b = (ServerId("srv_b".into()), 2);
        assert_eq!(desired_version(&[a.clone(), b.clone()]), desired_version(&[b.clone(), a.clone()]));
        assert_ne!(desired_version(&[a.clone(), b.clone()]), desired_version(std::slice::from_ref(&a)));
        assert_ne!(desired_version(std::slice::from_ref(&a)), desired_version(&[(ServerId("srv_a".into()), 2)]), "a new generation is a new set");
        assert_ne!(desired_version(&[]), desired_version(&[a]));
    }
}
