//! Domain types: ids, memory, nodes, servers, reservations and their state
//! machines. States are enums with `can_*` predicates; an illegal transition
//! is a typed error, never a panic. Nothing here performs I/O.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Millis};

/// Memory in mebibytes. All capacity arithmetic is done in this unit so
/// reservations and allocatable memory are compared exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemMib(pub u64);

impl MemMib {
    pub fn saturating_sub(self, other: MemMib) -> MemMib {
        MemMib(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for MemMib {
    type Output = MemMib;
    fn add(self, rhs: MemMib) -> MemMib {
        MemMib(self.0 + rhs.0)
    }
}

impl std::ops::AddAssign for MemMib {
    fn add_assign(&mut self, rhs: MemMib) {
        self.0 += rhs.0;
    }
}

impl std::iter::Sum for MemMib {
    fn sum<I: Iterator<Item = MemMib>>(iter: I) -> MemMib {
        MemMib(iter.map(|m| m.0).sum())
    }
}

impl fmt::Display for MemMib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

macro_rules! string_id {
    ($name:ident, $prefix:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// Builds an id from caller-supplied bits (random for a node,
            /// `ServerId::next_ordered_bits` for a server), so core never
            /// draws randomness itself.
            pub fn from_bits(bits: u64) -> Self {
                $name(format!("{}{:016x}", $prefix, bits))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// True if `s` has the shape of an id of this kind.
            pub fn looks_like(s: &str) -> bool {
                s.len() == $prefix.len() + 16 && s.starts_with($prefix) && s[$prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(ServerId, "srv_");
string_id!(NodeId, "node_");

/// Bits of a server id below its creation time: up to 4,194,304 ids a
/// millisecond.
const ID_SEQ_BITS: u32 = 22;

impl ServerId {
    /// The bits of the id to make at `now_ms` after the id made of `last`
    /// (0 for none): the creation time in milliseconds above 22 bits drawn
    /// from `random`, or `last + 1` if that would not be larger. Ids made
    /// one after another therefore sort in creation order, and a new
    /// server's entries in every index keyed by server (its events,
    /// operations, reservation, billing sessions) are neighbours of the
    /// previous server's: one page of each takes a whole batch of starts,
    /// where random ids put every entry on a page of its own. The random
    /// low bits keep two control planes that make ids in the same
    /// millisecond apart. 42 bits of milliseconds last until 2109.
    pub fn next_ordered_bits(last: u64, now_ms: i64, random: u32) -> u64 {
        let candidate = ((now_ms.max(0) as u64) << ID_SEQ_BITS) | (random as u64 & ((1 << ID_SEQ_BITS) - 1));
        candidate.max(last.wrapping_add(1))
    }
}

/// A fencing token: every placement of a server gets a new, larger one.
pub type Generation = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    Draining,
    Unreachable,
    Lost,
    Removed,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 5] = [NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Unreachable, NodeStatus::Lost, NodeStatus::Removed];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Lost => "lost",
            NodeStatus::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<NodeStatus> {
        NodeStatus::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// Only a ready node receives new placements.
    pub fn can_place(self) -> bool {
        self == NodeStatus::Ready
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A contiguous, inclusive range of ports a node hands out to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        self.min <= p && p <= self.max
    }
    pub fn len(&self) -> usize {
        if self.max < self.min {
            0
        } else {
            (self.max - self.min) as usize + 1
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub address: String,
    pub driver: String,
    pub total_mib: MemMib,
    pub system_reserved_mib: MemMib,
    pub cpu_cores: u32,
    pub status: NodeStatus,
    pub max_concurrent_starts: u32,
    pub ports: PortRange,
    /// Incremented on every registration; a sync from an older epoch is
    /// refused so a delayed request of a previous agent run cannot apply.
    pub epoch: u64,
    /// Highest sync sequence applied within `epoch`.
    pub sync_seq: u64,
    pub last_sync_at: Option<Millis>,
    pub registered_at: Millis,
    /// Host memory as last reported by the agent.
    pub host_total_mib: MemMib,
    pub host_available_mib: MemMib,
    /// The agent's data volume, as last reported.
    pub disk_total_mib: u64,
    pub disk_used_mib: u64,
    /// Placements stop above the pressure threshold (a condition, not a
    /// status: the node still runs what it has).
    pub disk_pressure: bool,
    /// When draining: servers still on the node are stopped at this time.
    pub drain_deadline: Option<Millis>,
}

impl Node {
    /// Memory that reservations may use on this node.
    pub fn allocatable_mib(&self) -> MemMib {
        self.total_mib.saturating_sub(self.system_reserved_mib)
    }

    /// Whether the node may receive a new placement.
    pub fn accepts_placements(&self) -> bool {
        self.status.can_place() && !self.disk_pressure
    }

    /// Memory in use on the host, from the agent's last report.
    pub fn used_mib(&self) -> MemMib {
        self.host_total_mib.saturating_sub(self.host_available_mib)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    Stopped,
    Queued,
    Starting,
    Running,
    Stopping,
    Crashed,
    Failed,
    Deleted,
    /// Placed on a node that stopped renewing its lease, within the
    /// server's disconnect window: not replaced, not billed.
    Unknown,
}

impl ServerStatus {
    pub const ALL: [ServerStatus; 9] = [
        ServerStatus::Stopped,
        ServerStatus::Queued,
        ServerStatus::Starting,
        ServerStatus::Running,
        ServerStatus::Stopping,
        ServerStatus::Crashed,
        ServerStatus::Failed,
        ServerStatus::Deleted,
        ServerStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Stopped => "stopped",
            ServerStatus::Queued => "queued",
            ServerStatus::Starting => "starting",
            ServerStatus::Running => "running",
            ServerStatus::Stopping => "stopping",
            ServerStatus::Crashed => "crashed",
            ServerStatus::Failed => "failed",
            ServerStatus::Deleted => "deleted",
            ServerStatus::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<ServerStatus> {
        ServerStatus::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Statuses in which the server holds a reservation on a node.
    pub fn holds_reservation(self) -> bool {
        matches!(self, ServerStatus::Starting | ServerStatus::Running | ServerStatus::Stopping | ServerStatus::Unknown)
    }

    /// Statuses in which the node's agent should run the instance. An
    /// unknown server is still wanted: if its node comes back within the
    /// window, the instance simply goes on.
    pub fn is_desired_running(self) -> bool {
        matches!(self, ServerStatus::Starting | ServerStatus::Running | ServerStatus::Unknown)
    }

    pub fn can_start(self) -> bool {
        matches!(self, ServerStatus::Stopped | ServerStatus::Crashed | ServerStatus::Failed)
    }

    pub fn can_stop(self) -> bool {
        matches!(self, ServerStatus::Queued | ServerStatus::Starting | ServerStatus::Running | ServerStatus::Unknown)
    }

    pub fn can_delete(self) -> bool {
        matches!(self, ServerStatus::Stopped | ServerStatus::Crashed | ServerStatus::Failed | ServerStatus::Queued)
    }

    /// The status a start request moves the server to.
    pub fn on_start(self) -> Result<ServerStatus, CoreError> {
        if self.can_start() {
            Ok(ServerStatus::Queued)
        } else {
            Err(CoreError::InvalidTransition { action: "start", from: self })
        }
    }

    /// The status a stop request moves the server to: a queued server holds
    /// nothing and stops at once; a placed one must wait for its instance to
    /// be confirmed gone.
    pub fn on_stop(self) -> Result<ServerStatus, CoreError> {
        match self {
            ServerStatus::Queued => Ok(ServerStatus::Stopped),
            ServerStatus::Starting | ServerStatus::Running | ServerStatus::Unknown => Ok(ServerStatus::Stopping),
            other => Err(CoreError::InvalidTransition { action: "stop", from: other }),
        }
    }

    pub fn on_delete(self) -> Result<ServerStatus, CoreError> {
        if self.can_delete() {
            Ok(ServerStatus::Deleted)
        } else {
            Err(CoreError::InvalidTransition { action: "delete", from: self })
        }
    }
}

impl fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an instance ended, as last confirmed by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub reason: String,
    pub code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub id: ServerId,
    pub tenant: String,
    pub name: String,
    pub template: String,
    pub memory_mib: MemMib,
    /// Validated against the template's schema, with defaults filled in.
    pub config: serde_json::Map<String, serde_json::Value>,
    pub status: ServerStatus,
    pub node_id: Option<NodeId>,
    pub generation: Generation,
    pub port: Option<u16>,
    pub last_exit: Option<LastExit>,
    /// When the server entered the queue; FIFO order and the starvation
    /// bound are measured from here.
    pub queued_at: Option<Millis>,
    /// Start attempts that ended in a transient failure since the last start
    /// request.
    pub attempts: u32,
    pub next_attempt_at: Option<Millis>,
    pub last_error: Option<String>,
    /// Resident memory of the instance as last reported by its agent.
    pub used_mib: Option<MemMib>,
    /// How long the instance may run on without its node renewing its lease
    /// before it is fenced (stopped on the node) and the server is lost.
    pub stop_after_ms: Millis,
    /// A stateless server may be replaced on any node with a fresh data dir.
    pub stateless: bool,
    /// Price plan for billing, and its price per GiB-hour in minor currency
    /// units, fixed when the server was created.
    pub plan: String,
    pub price_per_gib_hour: i64,
    /// Set after a stateful server was lost with its node: it may start
    /// again only there (its world is there) until an operator allows a
    /// fresh world elsewhere.
    pub home_node: Option<NodeId>,
    /// What happens after a crash (`never` or `on-failure`).
    #[serde(default)]
    pub restart_policy: crate::restart::RestartPolicy,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Placed, the instance not yet confirmed running. Counts toward L1
    /// exactly like an active reservation.
    Pending,
    Active,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Pending => "pending",
            ReservationState::Active => "active",
        }
    }
    pub fn parse(s: &str) -> Option<ReservationState> {
        match s {
            "pending" => Some(ReservationState::Pending),
            "active" => Some(ReservationState::Active),
            _ => None,
        }
    }
}

/// Memory held on a node for one placement of one server (L2: reserved
/// memory is the sum of these rows, nothing else).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub server_id: ServerId,
    pub generation: Generation,
    pub node_id: NodeId,
    pub memory_mib: MemMib,
    pub port: u16,
    pub state: ReservationState,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Admin,
    Tenant,
    Agent,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Tenant => "tenant",
            TokenKind::Agent => "agent",
        }
    }
    pub fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "admin" => Some(TokenKind::Admin),
            "tenant" => Some(TokenKind::Tenant),
            "agent" => Some(TokenKind::Agent),
            _ => None,
        }
    }
}

/// A typed, timestamped record of something that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub at: Millis,
    pub kind: String,
    pub server_id: Option<ServerId>,
    pub node_id: Option<NodeId>,
    pub message: String,
}

/// An event before the store has numbered it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: &'static str,
    pub server_id: Option<ServerId>,
    pub node_id: Option<NodeId>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_allowed_only_from_rest_states() {
        for s in ServerStatus::ALL {
            let expected = matches!(s, ServerStatus::Stopped | ServerStatus::Crashed | ServerStatus::Failed);
            assert_eq!(s.on_start().is_ok(), expected, "{s}");
        }
    }

    #[test]
    fn stop_of_queued_needs_no_confirmation_but_placed_does() {
        assert_eq!(ServerStatus::Queued.on_stop(), Ok(ServerStatus::Stopped));
        assert_eq!(ServerStatus::Running.on_stop(), Ok(ServerStatus::Stopping));
        assert_eq!(ServerStatus::Starting.on_stop(), Ok(ServerStatus::Stopping));
        assert!(ServerStatus::Stopped.on_stop().is_err());
        assert!(ServerStatus::Deleted.on_stop().is_err());
    }

    #[test]
    fn delete_refuses_a_server_that_holds_a_reservation() {
        for s in ServerStatus::ALL {
            if s.holds_reservation() {
                assert!(s.on_delete().is_err(), "{s}");
            }
        }
        assert_eq!(ServerStatus::Running.on_delete().unwrap_err().to_string(), "cannot delete a server that is running");
    }

    #[test]
    fn status_names_round_trip() {
        for s in ServerStatus::ALL {
            assert_eq!(ServerStatus::parse(s.as_str()), Some(s));
        }
        for n in NodeStatus::ALL {
            assert_eq!(NodeStatus::parse(n.as_str()), Some(n));
        }
    }

    #[test]
    fn ids_have_a_recognisable_shape() {
        let id = ServerId::from_bits(0xdead_beef);
        assert!(ServerId::looks_like(id.as_str()));
        assert!(!ServerId::looks_like("my-server"));
        assert!(!NodeId::looks_like(id.as_str()));
    }

    #[test]
    fn ordered_ids_sort_in_creation_order() {
        let mut last = 0;
        let mut ids = Vec::new();
        // Many in one millisecond, with random bits that fall and rise,
        // then a later millisecond, then a clock that went back.
        for (now, random) in [(1_000, 9), (1_000, 3), (1_000, u32::MAX), (1_000, 0), (1_001, 5), (999, 7)] {
            last = ServerId::next_ordered_bits(last, now, random);
            ids.push(ServerId::from_bits(last));
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "ids sort as made and never repeat");
        assert!(ids.iter().all(|id| ServerId::looks_like(id.as_str())));
        assert_eq!(ServerId::next_ordered_bits(0, 1_001, 5) >> 22, 1_001, "the creation time leads");
    }
}
