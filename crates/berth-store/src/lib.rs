//! berth-store: persistence behind one `Store` trait.
//!
//! The store owns durable state: tokens, nodes, servers, reservation rows
//! and events. Every state change is one short transaction that calls pure
//! core decisions and never awaits foreign I/O. The store never calls
//! `now()` and never invents ids: both are passed in. The SQLite backend is
//! the default; a PostgreSQL backend implements the same trait and runs the
//! same test suite.

mod error;
#[macro_use]
mod exec;
mod group;
mod mirror;
mod postgres;
mod reads;
mod rows;
mod sqlite;
mod store;
mod writes;

use async_trait::async_trait;
use berth_core::admission::{Misfit, NodeCapacity};
use berth_core::health::Verdict;
use berth_core::notify::Webhook;
pub use berth_core::operation::Refusal;
use berth_core::operation::{OpKind, OpOrigin, Operation, ServerFacts};
use berth_core::placement::{Placement, QueuedServer};
use berth_core::reconcile::{Placed, Reconciled};
use berth_core::retry::RetryPolicy;
use berth_core::{Event, Generation, MemMib, Millis, NewEvent, Node, NodeId, NodeStatus, PortRange, Reservation, Server, ServerId, ServerStatus, TokenKind};

pub use error::StoreError;
pub use postgres::{PostgresBackend, PostgresStore};
pub use sqlite::{SqliteBackend, SqliteOptions, SqliteStore};
pub use store::StoreOn;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the secret, hex; the secret itself is never stored.
    pub hash: String,
    pub kind: TokenKind,
    pub tenant: Option<String>,
    pub created_at: Millis,
}

/// What an agent declares about its node when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRegistration {
    pub name: String,
    pub address: String,
    pub driver: String,
    pub total_mib: MemMib,
    pub system_reserved_mib: MemMib,
    pub cpu_cores: u32,
    pub ports: PortRange,
    pub max_concurrent_starts: u32,
}

/// Everything the queue worker plans from, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct QueueSnapshot {
    /// Every node with its reservation rows summed up by the database
    /// (L2: derived from the rows, in the same read as the queue).
    pub capacities: Vec<NodeCapacity>,
    pub queued: Vec<QueuedServer>,
}

/// What an agent's sync is answered from, read in one snapshot
/// (`Store::desired_view`).
#[derive(Debug, Clone, Default)]
pub struct DesiredView {
    /// (server, generation) of every server desired on the node.
    pub keys: Vec<(ServerId, Generation)>,
    /// The desired servers whose key the agent's held set lacks, sorted.
    pub added: Vec<Server>,
    /// Servers on the node whose running kill waits for their instance.
    pub kill: Vec<(ServerId, Generation)>,
    /// The node's reserved MiB from its rows, when asked for.
    pub reserved: Option<MemMib>,
}

/// Everything the invariant checker looks at, in one transaction: each
/// server whole (`S` = `Server`), or only the columns the checks read
/// (`Facts`).
#[derive(Debug, Clone)]
pub struct Snapshot<S = Server> {
    pub nodes: Vec<Node>,
    pub servers: Vec<S>,
    pub reservations: Vec<Reservation>,
    /// (server, generation) of every open billing session, read in the same
    /// transaction so the billing check sees one moment.
    pub open_sessions: Vec<(ServerId, u64)>,
}

/// `Snapshot` as the invariant checker reads it: decoding every server's
/// configuration made a check of 20,000 servers cost twice its read.
pub type Facts = Snapshot<berth_core::invariants::CheckedServer>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementOutcome {
    /// Reserved under `generation`, in the commit stamped `at`.
    Committed { generation: u64, at: Millis },
    /// The node no longer fits the plan; the server stays queued.
    Rejected(Misfit),
    /// The server changed since the snapshot (stopped, deleted, placed).
    Stale,
}

/// A live server's identity, its owner and its node (`Store::resolve_server`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRef {
    pub id: ServerId,
    pub tenant: String,
    pub node_id: Option<NodeId>,
    pub memory_mib: MemMib,
    pub home_node: Option<NodeId>,
}

/// A sync report, as far as the store needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncInput {
    pub node_id: NodeId,
    pub epoch: u64,
    pub seq: u64,
    pub host_total_mib: MemMib,
    pub host_available_mib: MemMib,
    pub disk_total_mib: u64,
    pub disk_used_mib: u64,
    /// Decided by the control plane from its thresholds.
    pub disk_pressure: bool,
    /// Server data dirs on the node, when the agent reported them.
    pub volumes: Option<Vec<String>>,
}

/// One stretch of billed running of one server generation on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingSession {
    pub id: i64,
    pub server_id: ServerId,
    pub tenant: String,
    pub node_id: NodeId,
    pub generation: u64,
    pub memory_mib: MemMib,
    pub plan: String,
    pub price_per_gib_hour: i64,
    pub started_at: Millis,
    pub ended_at: Option<Millis>,
    pub end_reason: Option<String>,
}

/// One append-only ledger line.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    pub seq: i64,
    pub at: Millis,
    pub kind: String,
    pub session_id: i64,
    pub server_id: ServerId,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub server_id: Option<ServerId>,
    pub node_id: Option<NodeId>,
    pub kind: Option<String>,
    /// Only events with a larger sequence number.
    pub after: Option<i64>,
    /// Only events at or after this time.
    pub since: Option<Millis>,
    pub limit: u32,
}

/// A request for an operation on a server.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRequest {
    pub server_id: ServerId,
    pub kind: OpKind,
    pub origin: OpOrigin,
    /// The new operation's id (the store invents no ids).
    pub new_id: String,
    /// A start that lets a stateful server lost with its node run on a
    /// fresh world elsewhere (clears its home node).
    pub fresh_world: bool,
    /// A start that finds the server queued places it here in the same
    /// transaction, if it fits and no starved server waits.
    pub place: Option<Proposal>,
}

/// Where a start proposes to place its server (`OpRequest::place`).
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub node_id: NodeId,
    pub port: u16,
    pub starvation_ms: Millis,
    pub fence: Option<(String, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpFilter {
    pub server_id: Option<ServerId>,
    /// Only pending and running operations.
    pub active_only: bool,
    /// Only operations with a larger sequence number.
    pub after: Option<i64>,
    pub limit: u32,
}

/// A server with operations that have not ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveOps {
    pub server_id: ServerId,
    /// `None` once the server is deleted.
    pub server: Option<ServerFacts>,
    /// Its unfinished operations, in admission order.
    pub ops: Vec<Operation>,
}

/// What the operations executor looks at in one round.
#[derive(Debug, Clone, Default)]
pub struct OpsWork {
    /// Servers with an operation that has not ended.
    pub active: Vec<ActiveOps>,
    /// Crashed servers whose restart policy is `on-failure` and that have no
    /// unfinished operation, each with its automatic restarts since the
    /// window began (and since the last start by a user).
    pub crashed: Vec<(Server, u32)>,
    /// Queued servers, for the queue timeout.
    pub queued: Vec<QueuedServer>,
}

/// A notification delivery: one event to one channel, retried until it is
/// delivered or given up. Its id is the idempotency key receivers see.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: String,
    /// `webhook` or `email`.
    pub channel: String,
    pub webhook_id: Option<String>,
    pub event_seq: i64,
    pub event_kind: String,
    pub tenant: Option<String>,
    /// `pending`, `delivered` or `failed` (given up).
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Millis,
    /// HTTP status of the last attempt, if it got an answer.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub delivered_at: Option<Millis>,
}

/// A due delivery with what sending it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryJob {
    pub delivery: Delivery,
    pub event: Event,
    /// The target webhook, `None` for email or if it was deleted.
    pub webhook: Option<Webhook>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    Delivered {
        status: Option<u16>,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
    /// Stop trying (the webhook is gone or disabled).
    Abandon {
        error: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryFilter {
    pub webhook_id: Option<String>,
    pub channel: Option<String>,
    pub tenant: Option<String>,
    pub limit: u32,
}

/// How deliveries are retried and when a webhook is disabled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryPolicy {
    pub retry: RetryPolicy,
    /// Failed attempts in a row after which a webhook is disabled.
    pub disable_after: u32,
}

/// Per-node totals derived from reservation rows.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeUsage {
    pub node_id: NodeId,
    pub reserved: MemMib,
    pub servers: u32,
}

/// A control-plane replica, as it last announced itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaInfo {
    pub id: String,
    pub address: String,
    pub started_at: Millis,
    pub last_seen: Millis,
}

/// The lease that decides which replica runs the background workers.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderLease {
    pub holder: String,
    /// Grows whenever leadership changes hands; fences a deposed leader.
    pub epoch: u64,
    pub expires_at: Millis,
}

/// How many writes the store answered and how many commits (fsyncs) made
/// them durable: group commit folds many writes into one commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub writes: u64,
    pub commits: u64,
    /// Batches undone and run again with a savepoint per write, because
    /// one of their writes failed after changing rows.
    pub reruns: u64,
}

/// The pure decision `sync_node` runs inside its transaction.
/// It gets the servers placed on the node and when the node last renewed
/// before this sync. Owned, so a group-committed write can carry it.
pub type Decide = std::sync::Arc<dyn Fn(&[Placed], Millis) -> Reconciled + Send + Sync>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    async fn count_tokens(&self, kind: TokenKind) -> Result<u64, StoreError>;

    /// Registers a node, or re-registers the node of that name with a new
    /// epoch (fencing syncs of the agent's previous run).
    async fn register_node(&self, reg: &NodeRegistration, new_id: &NodeId, now: Millis) -> Result<Node, StoreError>;
    async fn list_nodes(&self) -> Result<Vec<Node>, StoreError>;
    /// The most allocatable memory of any node that is not removed (what
    /// the largest server may ask for); `None` without nodes.
    async fn largest_allocatable(&self) -> Result<Option<MemMib>, StoreError>;
    async fn get_node(&self, id_or_name: &str) -> Result<Option<Node>, StoreError>;
    async fn set_node_status(&self, id: &NodeId, status: NodeStatus) -> Result<Node, StoreError>;
    async fn node_usage(&self) -> Result<Vec<NodeUsage>, StoreError>;

    /// Inserts a new server; a live server of the same name is a conflict.
    async fn insert_server(&self, s: &Server, event: &NewEvent) -> Result<(), StoreError>;
    async fn get_server(&self, id_or_name: &str) -> Result<Option<Server>, StoreError>;
    /// Who a live server is, by id or name, without reading the rest of
    /// its row: what a request must know before it asks for a write.
    async fn resolve_server(&self, id_or_name: &str) -> Result<Option<ServerRef>, StoreError>;
    async fn list_servers(&self, tenant: Option<&str>) -> Result<Vec<Server>, StoreError>;
    /// Queues a server. A stateful server lost with its node waits for that
    /// node unless `allow_fresh_world` lets it start elsewhere on a new world.
    async fn request_start(&self, id: &ServerId, now: Millis, allow_fresh_world: bool) -> Result<Server, StoreError>;
    async fn request_stop(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError>;
    async fn delete_server(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError>;

    async fn queue_snapshot(&self) -> Result<QueueSnapshot, StoreError>;
    /// The queue alone, without the capacities: cheap where the snapshot
    /// sums every reservation row.
    async fn queued(&self) -> Result<Vec<berth_core::placement::QueuedServer>, StoreError>;
    /// The admission commit: one transaction that re-checks every plan
    /// against the reservation rows and inserts those that fit.
    async fn commit_placements(&self, plans: &[Placement], now: Millis) -> Result<Vec<PlacementOutcome>, StoreError>;

    /// Applies one agent sync in one transaction: refuses an old epoch or
    /// sequence, records the lease renewal and host stats, runs `decide` on
    /// the servers placed on the node and applies its changes, each
    /// conditional on the server's generation and status.
    async fn sync_node(&self, input: &SyncInput, now: Millis, decide: Decide) -> Result<(Node, Reconciled), StoreError>;
    /// Servers placed on the node that it should run now.
    async fn desired_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError>;
    /// What a sync answers from, in one snapshot: the (server, generation)
    /// keys of `desired_on`; of its servers only those whose key is not in
    /// `base` (none without a base); `killing_on`; and, if asked, the
    /// node's reserved MiB from its rows.
    async fn desired_view(&self, node_id: &NodeId, base: Option<std::sync::Arc<[(ServerId, Generation)]>>, reserved: bool) -> Result<DesiredView, StoreError>;
    /// Every server holding a reservation on the node.
    async fn placed_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError>;
    /// How many live servers have each status, and how many billing
    /// sessions are open: the gauges of `/metrics`, without reading rows.
    async fn status_counts(&self) -> Result<(Vec<(ServerStatus, u64)>, u64), StoreError>;

    /// Takes or renews the leader lease for `replica` until `now + ttl_ms`.
    /// Returns the lease if `replica` holds it afterwards. All replicas pass
    /// their own clock; leases are long against clock skew.
    async fn try_lead(&self, replica: &str, ttl_ms: i64, now: Millis) -> Result<Option<LeaderLease>, StoreError>;
    async fn heartbeat(&self, replica: &ReplicaInfo) -> Result<(), StoreError>;
    async fn cluster(&self) -> Result<(Vec<ReplicaInfo>, Option<LeaderLease>), StoreError>;
    /// While set, `commit_placements` commits only if the leader lease still
    /// has this holder and epoch (checked inside its transaction), so a
    /// replica that lost leadership cannot commit placements.
    fn set_fence(&self, fence: Option<(String, u64)>);
    /// How many events of each kind exist: the monotonic counters of
    /// `/metrics`, derived from the log so they survive restarts. Where
    /// events become visible in order (SQLite) a call counts only those
    /// since the last call, so a scrape does not grow with the log.
    async fn count_events(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Server data dirs the node last reported keeping.
    async fn node_volumes(&self, id: &NodeId) -> Result<Vec<ServerId>, StoreError>;

    /// Applies health verdicts, each conditional on the facts it was
    /// judged from (node not heard from since, server generation and
    /// status), in one transaction. Returns how many applied.
    async fn apply_verdicts(&self, verdicts: &[Verdict], now: Millis) -> Result<usize, StoreError>;
    /// Draining with an optional deadline, or back to ready.
    async fn set_drain(&self, id: &NodeId, draining: bool, deadline: Option<Millis>) -> Result<Node, StoreError>;

    async fn sessions_of(&self, server: &ServerId) -> Result<Vec<BillingSession>, StoreError>;
    /// Sessions of a tenant (or all) overlapping `[from, to)`.
    async fn sessions_between(&self, tenant: Option<&str>, from: Millis, to: Millis) -> Result<Vec<BillingSession>, StoreError>;
    async fn open_sessions(&self) -> Result<Vec<BillingSession>, StoreError>;
    async fn ledger_of(&self, server: &ServerId) -> Result<Vec<LedgerEntry>, StoreError>;
    /// Closes open sessions whose server is not running that generation
    /// (reason `zombie`); returns them.
    async fn sweep_zombies(&self, now: Millis) -> Result<Vec<BillingSession>, StoreError>;
    /// Closes sessions older than `max_len_ms` whose server still runs and
    /// whose node renewed within `fresh_ms`, continuing each in a new one.
    async fn roll_over(&self, max_len_ms: Millis, fresh_ms: Millis, now: Millis) -> Result<usize, StoreError>;
    /// Test and repair hook: opens a session as it is, bypassing the
    /// lifecycle (used to inject zombies in tests).
    async fn insert_session(&self, s: &BillingSession) -> Result<i64, StoreError>;

    /// Admits an operation in one transaction: settles the server's running
    /// operation, runs the guard table (`operation::admit`), cancels what
    /// the request preempts, and begins it if nothing is ahead. A refusal
    /// writes nothing.
    async fn request_operation(&self, req: &OpRequest, now: Millis) -> Result<(Operation, Server), StoreError>;
    /// Settles the server's running operations and begins waiting ones
    /// whose turn has come. Returns the operations it changed.
    async fn advance_operations(&self, server_id: &ServerId, now: Millis) -> Result<Vec<Operation>, StoreError>;
    async fn get_operation(&self, id: &str) -> Result<Option<Operation>, StoreError>;
    async fn list_operations(&self, filter: &OpFilter) -> Result<Vec<Operation>, StoreError>;
    /// `window_start`: automatic restarts before it are not counted.
    /// Without `with_active` the unfinished operations are not read
    /// (`active` is empty).
    async fn ops_work(&self, window_start: Millis, with_active: bool) -> Result<OpsWork, StoreError>;
    /// Fails a server that holds no reservation (queued past its timeout,
    /// crashed too often), if it still has `generation` and `from`.
    async fn fail_server(
        &self,
        id: &ServerId,
        generation: Generation,
        from: ServerStatus,
        error: &str,
        event: &NewEvent,
        now: Millis,
    ) -> Result<bool, StoreError>;
    /// Records when a crashed server will be restarted (shown to users).
    async fn set_restart_at(&self, id: &ServerId, generation: Generation, at: Millis) -> Result<(), StoreError>;
    /// Instances on the node whose kill was requested and that are not yet
    /// confirmed gone.
    async fn killing_on(&self, node_id: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError>;

    async fn insert_webhook(&self, w: &Webhook) -> Result<Webhook, StoreError>;
    /// `tenant`: only that tenant's webhooks; `None`: all.
    async fn list_webhooks(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StoreError>;
    async fn get_webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError>;
    async fn delete_webhook(&self, id: &str) -> Result<(), StoreError>;
    /// Enabling also forgets past failures.
    async fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Result<Webhook, StoreError>;
    /// Turns events after the notification cursor into deliveries (one per
    /// target, idempotent) and moves the cursor, in one transaction.
    /// Returns how many events it looked at.
    async fn fan_out(&self, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError>;
    async fn due_deliveries(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryJob>, StoreError>;
    /// Records one attempt: delivered, retried later, or given up; counts a
    /// webhook's failures in a row and disables it (with an event) at the
    /// policy's limit.
    async fn record_delivery(&self, id: &str, outcome: &DeliveryOutcome, policy: &DeliveryPolicy, random: u64, now: Millis) -> Result<(), StoreError>;
    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError>;

    async fn insert_events(&self, events: &[NewEvent], now: Millis) -> Result<(), StoreError>;
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError>;
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// What the invariant checker reads, in one transaction: a `Snapshot`
    /// with only the columns of each server the checks look at.
    async fn facts(&self) -> Result<Facts, StoreError>;
    /// The group-committed writes so far, where the backend counts them.
    fn write_stats(&self) -> Option<WriteStats> {
        None
    }
}
