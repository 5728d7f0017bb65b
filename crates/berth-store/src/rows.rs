//! Column lists and row decoders, written once for every backend over the
//! rows `Exec` returns. A decoder refuses what it cannot read as a corrupt
//! row; it never guesses.

use berth_core::notify::Webhook;
use berth_core::operation::{OpKind, OpOrigin, OpPhase, OpStatus, Operation};
use berth_core::reconcile::Placed;
use berth_core::{Event, LastExit, MemMib, Node, NodeId, NodeStatus, PortRange, Reservation, ReservationState, Server, ServerId, ServerStatus, TokenKind};

use crate::exec::Row;
use crate::{BillingSession, Delivery, LeaderLease, StoreError, TokenRecord};

pub(crate) const SERVER_COLS: &str = "id, tenant, name, template, memory_mib, config, status, node_id, generation, port, last_exit, \
     queued_at, attempts, next_attempt_at, last_error, used_mib, created_at, updated_at, stop_after_ms, stateless, plan, price_per_gib_hour, home_node, \
     restart_policy";

pub(crate) const NODE_COLS: &str = "id, name, address, driver, total_mib, system_reserved_mib, cpu_cores, status, \
     max_concurrent_starts, port_min, port_max, epoch, sync_seq, last_sync_at, registered_at, host_total_mib, host_available_mib, \
     disk_total_mib, disk_used_mib, disk_pressure, drain_deadline";

pub(crate) const RES_COLS: &str = "server_id, generation, node_id, memory_mib, port, state, created_at";

pub(crate) const SESSION_COLS: &str = "id, server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at, ended_at, end_reason";

/// What reconciling a sync needs of each placed server.
pub(crate) const PLACED_COLS: &str = "id, name, node_id, status, generation, attempts, used_mib";

/// Columns of the queue read (the planner orders the queue itself).
pub(crate) const QUEUED_COLS: &str = "id, generation, memory_mib, queued_at, next_attempt_at, home_node";
/// The queue: every server waiting to be placed (the planner orders it).
pub(crate) const QUEUED_SQL: &str = "SELECT id, generation, memory_mib, queued_at, next_attempt_at, home_node FROM servers WHERE status = 'queued'";

pub(crate) const OP_COLS: &str = "seq, id, server_id, kind, status, phase, origin, attempts, next_attempt_at, error_code, error, \
     created_at, started_at, finished_at";

pub(crate) const WEBHOOK_COLS: &str = "id, url, tenant, events, secret, enabled, consecutive_failures, after_seq, created_at";

pub(crate) const DELIVERY_COLS: &str = "d.id, d.channel, d.webhook_id, d.event_seq, d.event_kind, d.tenant, d.status, d.attempts, \
     d.next_attempt_at, d.last_status, d.last_error, d.created_at, d.delivered_at";

pub(crate) fn corrupt(what: &str, v: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {v}"))
}

pub(crate) fn server_from_row(r: &Row) -> Result<Server, StoreError> {
    let status = r.text("status")?;
    let config = r.text("config")?;
    let last_exit = r.opt_text("last_exit")?;
    let policy = r.text("restart_policy")?;
    Ok(Server {
        id: ServerId(r.text("id")?),
        tenant: r.text("tenant")?,
        name: r.text("name")?,
        template: r.text("template")?,
        memory_mib: MemMib(r.int("memory_mib")? as u64),
        config: serde_json::from_str(&config).map_err(|e| corrupt("server config", e))?,
        status: ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?,
        node_id: r.opt_text("node_id")?.map(NodeId),
        generation: r.int("generation")? as u64,
        port: r.opt_int("port")?.map(|p| p as u16),
        last_exit: match last_exit {
            Some(s) => Some(serde_json::from_str::<LastExit>(&s).map_err(|e| corrupt("last_exit", e))?),
            None => None,
        },
        queued_at: r.opt_int("queued_at")?,
        attempts: r.int("attempts")? as u32,
        next_attempt_at: r.opt_int("next_attempt_at")?,
        last_error: r.opt_text("last_error")?,
        used_mib: r.opt_int("used_mib")?.map(|m| MemMib(m as u64)),
        restart_policy: berth_core::restart::RestartPolicy::parse(&policy).ok_or_else(|| corrupt("restart policy", &policy))?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
        stop_after_ms: r.int("stop_after_ms")?,
        stateless: r.int("stateless")? != 0,
        plan: r.text("plan")?,
        price_per_gib_hour: r.int("price_per_gib_hour")?,
        home_node: r.opt_text("home_node")?.map(NodeId),
    })
}

/// The columns of a server the invariant checks read (`reads::facts`).
pub(crate) const CHECKED_SERVER_COLS: &str = "id, status, node_id, generation, memory_mib, queued_at";

pub(crate) fn checked_server_from_row(r: &Row) -> Result<berth_core::invariants::CheckedServer, StoreError> {
    let status = r.text("status")?;
    Ok(berth_core::invariants::CheckedServer {
        id: ServerId(r.text("id")?),
        status: ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?,
        node_id: r.opt_text("node_id")?.map(NodeId),
        generation: r.int("generation")? as u64,
        memory_mib: MemMib(r.int("memory_mib")? as u64),
        queued_at: r.opt_int("queued_at")?,
    })
}

pub(crate) fn node_from_row(r: &Row) -> Result<Node, StoreError> {
    let status = r.text("status")?;
    Ok(Node {
        id: NodeId(r.text("id")?),
        name: r.text("name")?,
        address: r.text("address")?,
        driver: r.text("driver")?,
        total_mib: MemMib(r.int("total_mib")? as u64),
        system_reserved_mib: MemMib(r.int("system_reserved_mib")? as u64),
        cpu_cores: r.int("cpu_cores")? as u32,
        status: NodeStatus::parse(&status).ok_or_else(|| corrupt("node status", &status))?,
        max_concurrent_starts: r.int("max_concurrent_starts")? as u32,
        ports: PortRange { min: r.int("port_min")? as u16, max: r.int("port_max")? as u16 },
        epoch: r.int("epoch")? as u64,
        sync_seq: r.int("sync_seq")? as u64,
        last_sync_at: r.opt_int("last_sync_at")?,
        registered_at: r.int("registered_at")?,
        host_total_mib: MemMib(r.int("host_total_mib")? as u64),
        host_available_mib: MemMib(r.int("host_available_mib")? as u64),
        disk_total_mib: r.int("disk_total_mib")? as u64,
        disk_used_mib: r.int("disk_used_mib")? as u64,
        disk_pressure: r.int("disk_pressure")? != 0,
        drain_deadline: r.opt_int("drain_deadline")?,
    })
}

pub(crate) fn placed_from_row(r: &Row) -> Result<Placed, StoreError> {
    let status = r.text("status")?;
    Ok(Placed {
        id: ServerId(r.text("id")?),
        name: r.text("name")?,
        node_id: r.opt_text("node_id")?.map(NodeId),
        status: ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?,
        generation: r.int("generation")? as u64,
        attempts: r.int("attempts")? as u32,
        used_mib: r.opt_int("used_mib")?.map(|m| MemMib(m as u64)),
    })
}

pub(crate) fn reservation_from_row(r: &Row) -> Result<Reservation, StoreError> {
    let state = r.text("state")?;
    Ok(Reservation {
        server_id: ServerId(r.text("server_id")?),
        generation: r.int("generation")? as u64,
        node_id: NodeId(r.text("node_id")?),
        memory_mib: MemMib(r.int("memory_mib")? as u64),
        port: r.int("port")? as u16,
        state: ReservationState::parse(&state).ok_or_else(|| corrupt("reservation state", &state))?,
        created_at: r.int("created_at")?,
    })
}

pub(crate) fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
    let kind = r.text("kind")?;
    Ok(TokenRecord {
        id: r.text("id")?,
        hash: r.text("hash")?,
        kind: TokenKind::parse(&kind).ok_or_else(|| corrupt("token kind", &kind))?,
        tenant: r.opt_text("tenant")?,
        created_at: r.int("created_at")?,
    })
}

pub(crate) fn session_from_row(r: &Row) -> Result<BillingSession, StoreError> {
    Ok(BillingSession {
        id: r.int("id")?,
        server_id: ServerId(r.text("server_id")?),
        tenant: r.text("tenant")?,
        node_id: NodeId(r.text("node_id")?),
        generation: r.int("generation")? as u64,
        memory_mib: MemMib(r.int("memory_mib")? as u64),
        plan: r.text("plan")?,
        price_per_gib_hour: r.int("price_per_gib_hour")?,
        started_at: r.int("started_at")?,
        ended_at: r.opt_int("ended_at")?,
        end_reason: r.opt_text("end_reason")?,
    })
}

pub(crate) fn lease_from_row(r: &Row) -> Result<LeaderLease, StoreError> {
    Ok(LeaderLease { holder: r.text("holder")?, epoch: r.int("epoch")? as u64, expires_at: r.int("expires_at")? })
}

pub(crate) fn op_from_row(r: &Row) -> Result<Operation, StoreError> {
    let kind = r.text("kind")?;
    let status = r.text("status")?;
    let phase = r.opt_text("phase")?;
    let origin = r.text("origin")?;
    Ok(Operation {
        id: r.text("id")?,
        server_id: ServerId(r.text("server_id")?),
        kind: OpKind::parse(&kind).ok_or_else(|| corrupt("operation kind", &kind))?,
        status: OpStatus::parse(&status).ok_or_else(|| corrupt("operation status", &status))?,
        phase: match phase {
            Some(p) => Some(OpPhase::parse(&p).ok_or_else(|| corrupt("operation phase", &p))?),
            None => None,
        },
        origin: OpOrigin::parse(&origin).ok_or_else(|| corrupt("operation origin", &origin))?,
        seq: r.int("seq")?,
        attempts: r.int("attempts")? as u32,
        next_attempt_at: r.opt_int("next_attempt_at")?,
        error_code: r.opt_text("error_code")?,
        error: r.opt_text("error")?,
        created_at: r.int("created_at")?,
        started_at: r.opt_int("started_at")?,
        finished_at: r.opt_int("finished_at")?,
    })
}

pub(crate) fn webhook_from_row(r: &Row) -> Result<Webhook, StoreError> {
    let events = r.text("events")?;
    Ok(Webhook {
        id: r.text("id")?,
        url: r.text("url")?,
        tenant: r.opt_text("tenant")?,
        events: serde_json::from_str(&events).map_err(|e| corrupt("webhook events", e))?,
        secret: r.text("secret")?,
        enabled: r.flag("enabled")?,
        consecutive_failures: r.int("consecutive_failures")? as u32,
        after_seq: r.int("after_seq")?,
        created_at: r.int("created_at")?,
    })
}

pub(crate) fn delivery_from_row(r: &Row) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        id: r.text("id")?,
        channel: r.text("channel")?,
        webhook_id: r.opt_text("webhook_id")?,
        event_seq: r.int("event_seq")?,
        event_kind: r.text("event_kind")?,
        tenant: r.opt_text("tenant")?,
        status: r.text("status")?,
        attempts: r.int("attempts")? as u32,
        next_attempt_at: r.int("next_attempt_at")?,
        last_status: r.opt_int("last_status")?.map(|s| s as u16),
        last_error: r.opt_text("last_error")?,
        created_at: r.int("created_at")?,
        delivered_at: r.opt_int("delivered_at")?,
    })
}

/// Columns of the queue read: a node's rows summed up (memory,
/// pending count, ports as text `p1,p2,…`, built by `$ports_agg`).
pub(crate) fn queue_snapshot_sql(ports_agg: &str) -> (String, String, &'static str) {
    (format!("SELECT {NODE_COLS} FROM nodes"), format!("SELECT node_id, {} FROM reservations GROUP BY node_id", totals_sql(ports_agg)), QUEUED_SQL)
}

/// Reservation rows summed up by the database: their memory, how many are
/// pending, the ports they hold (`reserved`, `pending`, `ports`).
pub(crate) fn totals_sql(ports_agg: &str) -> String {
    format!(
        "CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS reserved, \
         CAST(COALESCE(SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END), 0) AS BIGINT) AS pending, {ports_agg} AS ports"
    )
}

/// The sums of `totals_sql`.
pub(crate) fn totals_from_row(r: &Row) -> Result<(u64, u32, Vec<u16>), StoreError> {
    let ports = r
        .opt_text("ports")?
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().parse::<u16>().map_err(|e| corrupt("reservation port", e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((r.int("reserved")? as u64, r.int("pending")? as u32, ports))
}

pub(crate) fn queue_snapshot_from(nodes: &[Row], totals: &[Row], queued: &[Row]) -> Result<crate::QueueSnapshot, StoreError> {
    let mut by_node: std::collections::HashMap<String, (u64, u32, Vec<u16>)> = std::collections::HashMap::new();
    for r in totals {
        by_node.insert(r.text("node_id")?, totals_from_row(r)?);
    }
    let capacities = nodes
        .iter()
        .map(|row| {
            let n = node_from_row(row)?;
            let (reserved, pending, ports) = by_node.remove(&n.id.0).unwrap_or_default();
            Ok(berth_core::admission::NodeCapacity::from_totals(&n, MemMib(reserved), pending, ports))
        })
        .collect::<Result<_, StoreError>>()?;
    let queued = queued.iter().map(queued_from_row).collect::<Result<_, StoreError>>()?;
    Ok(crate::QueueSnapshot { capacities, queued })
}

pub(crate) fn queued_from_row(r: &Row) -> Result<berth_core::placement::QueuedServer, StoreError> {
    Ok(berth_core::placement::QueuedServer {
        server_id: ServerId(r.text("id")?),
        generation: r.int("generation")? as u64,
        memory_mib: MemMib(r.int("memory_mib")? as u64),
        queued_at: r.opt_int("queued_at")?.unwrap_or(0),
        next_attempt_at: r.opt_int("next_attempt_at")?,
        home_node: r.opt_text("home_node")?.map(NodeId),
    })
}

pub(crate) fn event_from_row(r: &Row) -> Result<Event, StoreError> {
    Ok(Event {
        seq: r.int("seq")?,
        at: r.int("at")?,
        kind: r.text("kind")?,
        server_id: r.opt_text("server_id")?.map(ServerId),
        node_id: r.opt_text("node_id")?.map(NodeId),
        message: r.text("message")?,
    })
}
