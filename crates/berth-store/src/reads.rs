//! Every read of the store, written once over `Exec` and run by both
//! backends inside a read-only transaction, so what one call returns is one
//! moment (a snapshot the invariant checker can trust, a queue the planner
//! can plan from). Reads decide nothing and change nothing.

use berth_core::notify::Webhook;
use berth_core::operation::{Operation, ServerFacts};
use berth_core::placement::QueuedServer;
use berth_core::{Event, Generation, MemMib, Millis, Node, NodeId, Server, ServerId, ServerStatus, TokenKind};

use crate::exec::{Arg, Exec, Row};
use crate::rows::*;
use crate::writes::{marks, placed_sql, PreDecided};
use crate::{
    ActiveOps, BillingSession, Decide, Delivery, DeliveryFilter, DeliveryJob, DesiredView, EventFilter, Facts, LeaderLease, LedgerEntry, NodeUsage, OpFilter,
    OpsWork, QueueSnapshot, ReplicaInfo, ServerRef, Snapshot, StoreError, SyncInput, TokenRecord,
};

type E<'a> = &'a mut dyn Exec;

pub(crate) async fn find_token(e: E<'_>, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
    e.row("SELECT id, hash, kind, tenant, created_at FROM tokens WHERE hash = ?", args![hash]).await?.as_ref().map(token_from_row).transpose()
}

pub(crate) async fn count_tokens(e: E<'_>, kind: TokenKind) -> Result<u64, StoreError> {
    Ok(e.one("SELECT COUNT(*) AS n FROM tokens WHERE kind = ?", args![kind.as_str()]).await?.first_int()? as u64)
}

pub(crate) async fn list_nodes(e: E<'_>) -> Result<Vec<Node>, StoreError> {
    e.rows(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"), args![]).await?.iter().map(node_from_row).collect()
}

pub(crate) async fn largest_allocatable(e: E<'_>) -> Result<Option<MemMib>, StoreError> {
    let mib = e.one("SELECT CAST(MAX(total_mib - system_reserved_mib) AS BIGINT) AS n FROM nodes WHERE status <> 'removed'", args![]).await?.first_opt_int()?;
    Ok(mib.map(|m| MemMib(m.max(0) as u64)))
}

pub(crate) async fn get_node(e: E<'_>, id_or_name: &str) -> Result<Option<Node>, StoreError> {
    // Two indexed lookups, the id first.
    let sql = format!("SELECT {NODE_COLS} FROM nodes WHERE id = ? UNION ALL SELECT {NODE_COLS} FROM nodes WHERE name = ? LIMIT 1");
    e.row(&sql, args![id_or_name, id_or_name]).await?.as_ref().map(node_from_row).transpose()
}

pub(crate) async fn node_usage(e: E<'_>) -> Result<Vec<NodeUsage>, StoreError> {
    let rows = e.rows("SELECT node_id, CAST(SUM(memory_mib) AS BIGINT) AS reserved, COUNT(*) AS n FROM reservations GROUP BY node_id", args![]).await?;
    rows.iter()
        .map(|r| Ok(NodeUsage { node_id: NodeId(r.text("node_id")?), reserved: MemMib(r.int("reserved")? as u64), servers: r.int("n")? as u32 }))
        .collect()
}

pub(crate) async fn node_reserved(e: E<'_>, node_id: &NodeId) -> Result<MemMib, StoreError> {
    let mib = e.one("SELECT CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS n FROM reservations WHERE node_id = ?", args![&node_id.0]).await?.first_int()?;
    Ok(MemMib(mib as u64))
}

pub(crate) async fn node_volumes(e: E<'_>, id: &NodeId) -> Result<Vec<ServerId>, StoreError> {
    let row = e.row("SELECT volumes FROM nodes WHERE id = ?", args![&id.0]).await?.ok_or_else(|| StoreError::NotFound { what: format!("node {id}") })?;
    let text = row.text("volumes")?;
    let ids: Vec<String> = serde_json::from_str(&text).map_err(|err| StoreError::Corrupt(format!("node volumes: {err}")))?;
    Ok(ids.into_iter().map(ServerId).collect())
}

pub(crate) async fn get_server(e: E<'_>, id_or_name: &str) -> Result<Option<Server>, StoreError> {
    // Two indexed lookups, the id first: `id = ? OR name = ?` scans the
    // table on SQLite. The name's is `deleted_at IS NULL` (the same rows
    // as `status <> 'deleted'`): the live-name index's own condition, which
    // SQLite needs to see in the query to use that index.
    let sql = format!(
        "SELECT {SERVER_COLS} FROM servers WHERE id = ? AND status <> 'deleted' \
         UNION ALL SELECT {SERVER_COLS} FROM servers WHERE name = ? AND deleted_at IS NULL LIMIT 1"
    );
    e.row(&sql, args![id_or_name, id_or_name]).await?.as_ref().map(server_from_row).transpose()
}

pub(crate) async fn resolve_server(e: E<'_>, id_or_name: &str) -> Result<Option<ServerRef>, StoreError> {
    // The same two lookups as `get_server`, three columns instead of the
    // whole row.
    let row = e
        .row(
            "SELECT id, tenant, node_id, memory_mib, home_node FROM servers WHERE id = ? AND status <> 'deleted' \
             UNION ALL SELECT id, tenant, node_id, memory_mib, home_node FROM servers WHERE name = ? AND deleted_at IS NULL LIMIT 1",
            args![id_or_name, id_or_name],
        )
        .await?;
    row.map(|r| {
        Ok(ServerRef {
            id: ServerId(r.text("id")?),
            tenant: r.text("tenant")?,
            node_id: r.opt_text("node_id")?.map(NodeId),
            memory_mib: MemMib(r.int("memory_mib")? as u64),
            home_node: r.opt_text("home_node")?.map(NodeId),
        })
    })
    .transpose()
}

pub(crate) async fn list_servers(e: E<'_>, tenant: Option<&str>) -> Result<Vec<Server>, StoreError> {
    let rows = match tenant {
        Some(t) => e.rows(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted' AND tenant = ? ORDER BY created_at, id"), args![t]).await?,
        None => e.rows(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted' ORDER BY created_at, id"), args![]).await?,
    };
    rows.iter().map(server_from_row).collect()
}

pub(crate) async fn queue_snapshot(e: E<'_>) -> Result<QueueSnapshot, StoreError> {
    // The rows are summed in the database; the committer re-checks every
    // plan against the rows themselves.
    let (nodes_sql, totals_sql, queued_sql) = queue_snapshot_sql(&e.string_agg("port"));
    let nodes = e.rows(&nodes_sql, args![]).await?;
    let totals = e.rows(&totals_sql, args![]).await?;
    let queued = e.rows(queued_sql, args![]).await?;
    queue_snapshot_from(&nodes, &totals, &queued)
}

pub(crate) async fn queued(e: E<'_>) -> Result<Vec<QueuedServer>, StoreError> {
    e.rows(QUEUED_SQL, args![]).await?.iter().map(queued_from_row).collect()
}

pub(crate) async fn desired_on(e: E<'_>, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
    let sql = format!("SELECT {SERVER_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'unknown') ORDER BY id");
    e.rows(&sql, args![&node_id.0]).await?.iter().map(server_from_row).collect()
}

pub(crate) async fn desired_keys(e: E<'_>, node_id: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError> {
    let rows = e.rows("SELECT id, generation FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'unknown')", args![&node_id.0]).await?;
    rows.iter().map(|r| Ok((ServerId(r.text("id")?), r.int("generation")? as u64))).collect()
}

/// The node's desired keys and, of them, the servers not in `base` (sorted),
/// from one snapshot: a delta sync reads and renders only what the agent
/// lacks. The ids are listed a few hundred per statement: a node's servers
/// are bounded only by its port range, and SQLite binds at most 32,766
/// values to one statement.
pub(crate) async fn desired_delta(
    e: E<'_>,
    node_id: &NodeId,
    base: &[(ServerId, Generation)],
) -> Result<(Vec<(ServerId, Generation)>, Vec<Server>), StoreError> {
    let keys = desired_keys(e, node_id).await?;
    let added: Vec<&ServerId> = keys.iter().filter(|k| base.binary_search(k).is_err()).map(|(id, _)| id).collect();
    if added.is_empty() {
        return Ok((keys, Vec::new()));
    }
    let mut servers = Vec::with_capacity(added.len());
    for ids in added.chunks(500) {
        let sql = format!(
            "SELECT {SERVER_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'unknown') AND id IN ({}) ORDER BY id",
            marks(ids.len())
        );
        let mut args = args![&node_id.0];
        args.extend(ids.iter().map(|id| Arg::from(&id.0)));
        for row in e.rows(&sql, args).await? {
            servers.push(server_from_row(&row)?);
        }
    }
    Ok((keys, servers))
}

/// Everything a sync answers from, in one read transaction: a sync made
/// three before and three more after its wait, each with its own
/// transaction and its own wait for the log's flush.
pub(crate) async fn desired_view(e: E<'_>, node_id: &NodeId, base: Option<&[(ServerId, Generation)]>, reserved: bool) -> Result<DesiredView, StoreError> {
    let (keys, added) = match base {
        Some(base) => desired_delta(e, node_id, base).await?,
        None => (desired_keys(e, node_id).await?, Vec::new()),
    };
    let kill = killing_on(e, node_id).await?;
    let reserved = if reserved { Some(node_reserved(e, node_id).await?) } else { None };
    Ok(DesiredView { keys, added, kill, reserved })
}

pub(crate) async fn placed_on(e: E<'_>, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
    let sql = format!("SELECT {SERVER_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'stopping', 'unknown') ORDER BY id");
    e.rows(&sql, args![&node_id.0]).await?.iter().map(server_from_row).collect()
}

/// Reads what a sync decides from (the node's previous renewal, its placed
/// servers) and decides, so the write need not. `None` if the node is
/// unknown (the write says so).
pub(crate) async fn pre_decide(e: E<'_>, input: &SyncInput, decide: &Decide) -> Result<Option<PreDecided>, StoreError> {
    let Some(node) = e.row("SELECT last_sync_at, registered_at FROM nodes WHERE id = ?", args![&input.node_id.0]).await? else { return Ok(None) };
    let last_sync_at = node.opt_int("last_sync_at")?;
    let placed = e.rows(&placed_sql(), args![&input.node_id.0]).await?.iter().map(placed_from_row).collect::<Result<Vec<_>, _>>()?;
    let decided = decide(&placed, last_sync_at.unwrap_or(node.int("registered_at")?));
    Ok(Some((last_sync_at, placed, decided)))
}

pub(crate) async fn status_counts(e: E<'_>) -> Result<(Vec<(ServerStatus, u64)>, u64), StoreError> {
    let rows = e.rows("SELECT status, COUNT(*) AS n FROM servers WHERE status <> 'deleted' GROUP BY status", args![]).await?;
    let mut counts = Vec::new();
    for r in &rows {
        let status = r.text("status")?;
        counts.push((ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?, r.int("n")? as u64));
    }
    Ok((counts, open_session_count(e).await?))
}

pub(crate) async fn open_session_count(e: E<'_>) -> Result<u64, StoreError> {
    Ok(e.one("SELECT COUNT(*) AS n FROM billing_sessions WHERE ended_at IS NULL", args![]).await?.first_int()? as u64)
}

pub(crate) async fn cluster(e: E<'_>) -> Result<(Vec<ReplicaInfo>, Option<LeaderLease>), StoreError> {
    let rows = e.rows("SELECT id, address, started_at, last_seen FROM replicas ORDER BY id", args![]).await?;
    let replicas = rows
        .iter()
        .map(|r| Ok(ReplicaInfo { id: r.text("id")?, address: r.text("address")?, started_at: r.int("started_at")?, last_seen: r.int("last_seen")? }))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let lease = e.row("SELECT holder, epoch, expires_at FROM leader WHERE id = 1", args![]).await?;
    Ok((replicas, lease.as_ref().map(lease_from_row).transpose()?))
}

pub(crate) async fn sessions_of(e: E<'_>, server: &ServerId) -> Result<Vec<BillingSession>, StoreError> {
    let sql = format!("SELECT {SESSION_COLS} FROM billing_sessions WHERE server_id = ? ORDER BY started_at, id");
    e.rows(&sql, args![&server.0]).await?.iter().map(session_from_row).collect()
}

pub(crate) async fn sessions_between(e: E<'_>, tenant: Option<&str>, from: Millis, to: Millis) -> Result<Vec<BillingSession>, StoreError> {
    let sql = format!(
        "SELECT {SESSION_COLS} FROM billing_sessions WHERE (CAST(? AS TEXT) IS NULL OR tenant = ?) AND started_at < ? \
         AND (ended_at IS NULL OR ended_at > ?) ORDER BY started_at, id"
    );
    e.rows(&sql, args![tenant, tenant, to, from]).await?.iter().map(session_from_row).collect()
}

pub(crate) async fn open_sessions(e: E<'_>) -> Result<Vec<BillingSession>, StoreError> {
    e.rows(&format!("SELECT {SESSION_COLS} FROM billing_sessions WHERE ended_at IS NULL ORDER BY id"), args![]).await?.iter().map(session_from_row).collect()
}

pub(crate) async fn ledger_of(e: E<'_>, server: &ServerId) -> Result<Vec<LedgerEntry>, StoreError> {
    let rows = e.rows("SELECT seq, at, kind, session_id, server_id, detail FROM ledger WHERE server_id = ? ORDER BY seq", args![&server.0]).await?;
    rows.iter()
        .map(|r| {
            Ok(LedgerEntry {
                seq: r.int("seq")?,
                at: r.int("at")?,
                kind: r.text("kind")?,
                session_id: r.int("session_id")?,
                server_id: ServerId(r.text("server_id")?),
                detail: r.text("detail")?,
            })
        })
        .collect()
}

/// Events with `seq > after` by kind, and the highest `seq` among them
/// (`after` if none): a range of the primary key, not the whole log.
pub(crate) async fn count_events_after(e: E<'_>, after: i64) -> Result<(Vec<(String, i64)>, i64), StoreError> {
    let rows =
        e.rows("SELECT kind, COUNT(*) AS n, CAST(MAX(seq) AS BIGINT) AS last FROM events WHERE seq > ? GROUP BY kind ORDER BY kind", args![after]).await?;
    let mut last = after;
    let mut counts = Vec::with_capacity(rows.len());
    for r in &rows {
        counts.push((r.text("kind")?, r.int("n")?));
        last = last.max(r.int("last")?);
    }
    Ok((counts, last))
}

pub(crate) async fn list_events(e: E<'_>, f: &EventFilter) -> Result<Vec<Event>, StoreError> {
    let server = f.server_id.as_ref().map(|s| s.0.as_str());
    let node = f.node_id.as_ref().map(|n| n.0.as_str());
    let kind = f.kind.as_deref();
    let rows = e
        .rows(
            "SELECT seq, at, kind, server_id, node_id, message FROM events \
             WHERE (CAST(? AS TEXT) IS NULL OR server_id = ?) AND (CAST(? AS TEXT) IS NULL OR node_id = ?) \
             AND (CAST(? AS TEXT) IS NULL OR kind = ?) AND seq > ? AND (CAST(? AS BIGINT) IS NULL OR at >= ?) ORDER BY seq LIMIT ?",
            args![server, server, node, node, kind, kind, f.after.unwrap_or(0), f.since, f.since, f.limit.clamp(1, 1000) as i64],
        )
        .await?;
    rows.iter().map(event_from_row).collect()
}

pub(crate) async fn snapshot(e: E<'_>) -> Result<Snapshot, StoreError> {
    whole(e, SERVER_COLS, server_from_row).await
}

/// `snapshot` with each server's checked columns only.
pub(crate) async fn facts(e: E<'_>) -> Result<Facts, StoreError> {
    whole(e, CHECKED_SERVER_COLS, checked_server_from_row).await
}

/// Every node, live server (its `cols`, decoded by `server`), reservation
/// and open billing session.
async fn whole<S>(e: E<'_>, cols: &str, server: fn(&Row) -> Result<S, StoreError>) -> Result<Snapshot<S>, StoreError> {
    let nodes = e.rows(&format!("SELECT {NODE_COLS} FROM nodes"), args![]).await?;
    let servers = e.rows(&format!("SELECT {cols} FROM servers WHERE status <> 'deleted'"), args![]).await?;
    let res = e.rows(&format!("SELECT {RES_COLS} FROM reservations"), args![]).await?;
    let open = e.rows("SELECT server_id, generation FROM billing_sessions WHERE ended_at IS NULL", args![]).await?;
    Ok(Snapshot {
        nodes: nodes.iter().map(node_from_row).collect::<Result<_, _>>()?,
        servers: servers.iter().map(server).collect::<Result<_, _>>()?,
        reservations: res.iter().map(reservation_from_row).collect::<Result<_, _>>()?,
        open_sessions: open.iter().map(|r| Ok((ServerId(r.text("server_id")?), r.int("generation")? as u64))).collect::<Result<_, StoreError>>()?,
    })
}

// ---- operations ----

pub(crate) async fn get_operation(e: E<'_>, id: &str) -> Result<Option<Operation>, StoreError> {
    e.row(&format!("SELECT {OP_COLS} FROM operations WHERE id = ?"), args![id]).await?.as_ref().map(op_from_row).transpose()
}

pub(crate) async fn list_operations(e: E<'_>, f: &OpFilter) -> Result<Vec<Operation>, StoreError> {
    let active = if f.active_only { " AND status IN ('pending', 'running')" } else { "" };
    let server = f.server_id.as_ref().map(|s| s.0.as_str());
    let sql = format!("SELECT {OP_COLS} FROM operations WHERE (CAST(? AS TEXT) IS NULL OR server_id = ?) AND seq > ?{active} ORDER BY seq LIMIT ?");
    e.rows(&sql, args![server, server, f.after.unwrap_or(0), f.limit.clamp(1, 1000) as i64]).await?.iter().map(op_from_row).collect()
}

pub(crate) async fn ops_work(e: E<'_>, window_start: Millis, with_active: bool) -> Result<OpsWork, StoreError> {
    // Unfinished operations with what settling them depends on, in one
    // read, so the executor writes only where something would change.
    let op_cols: String = OP_COLS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ");
    let rows = e
        .rows(
            &format!(
                "SELECT {op_cols}, s.status AS s_status, s.attempts AS s_attempts, s.next_attempt_at AS s_next, \
                 s.last_error AS s_error FROM operations o LEFT JOIN servers s ON s.id = o.server_id AND s.status <> 'deleted' \
                 WHERE o.status IN ('pending', 'running') AND (? OR o.server_id IN (SELECT id FROM servers WHERE status = 'crashed')) \
                 ORDER BY o.server_id, o.seq"
            ),
            args![with_active],
        )
        .await?;
    let mut active_ops: Vec<ActiveOps> = Vec::new();
    for r in &rows {
        let op = op_from_row(r)?;
        if active_ops.last().is_none_or(|a| a.server_id != op.server_id) {
            let server = match r.opt_text("s_status")? {
                None => None,
                Some(st) => Some(ServerFacts {
                    status: ServerStatus::parse(&st).ok_or_else(|| corrupt("server status", &st))?,
                    attempts: r.int("s_attempts")? as u32,
                    next_attempt_at: r.opt_int("s_next")?,
                    last_error: r.opt_text("s_error")?,
                }),
            };
            active_ops.push(ActiveOps { server_id: op.server_id.clone(), server, ops: Vec::new() });
        }
        active_ops.last_mut().expect("pushed above").ops.push(op);
    }
    let active: std::collections::HashSet<&str> = active_ops.iter().map(|a| a.server_id.0.as_str()).collect();
    let crashed_rows =
        e.rows(&format!("SELECT {SERVER_COLS} FROM servers WHERE status = 'crashed' AND restart_policy = 'on-failure' ORDER BY id"), args![]).await?;
    let mut crashed = Vec::new();
    for r in &crashed_rows {
        let s = server_from_row(r)?;
        if active.contains(s.id.0.as_str()) {
            continue;
        }
        let n = e
            .one(
                "SELECT COUNT(*) AS n FROM operations WHERE server_id = ? AND origin = 'restart_policy' AND created_at >= ? \
                 AND seq > COALESCE((SELECT MAX(seq) FROM operations WHERE server_id = ? AND origin = 'user' AND kind IN ('start', 'restart')), 0)",
                args![&s.id.0, window_start, &s.id.0],
            )
            .await?
            .first_int()?;
        crashed.push((s, n as u32));
    }
    let queued = e
        .rows(&format!("SELECT {QUEUED_COLS} FROM servers WHERE status = 'queued' ORDER BY queued_at, id"), args![])
        .await?
        .iter()
        .map(queued_from_row)
        .collect::<Result<_, _>>()?;
    Ok(OpsWork { active: active_ops, crashed, queued })
}

/// Of `stopping` (servers in `stopping`, in id order), those a kill is
/// running for: `killing_on` for a caller that knows the node's servers.
pub(crate) async fn kills_among(e: E<'_>, stopping: &[(ServerId, Generation)]) -> Result<Vec<(ServerId, Generation)>, StoreError> {
    let mut killing = std::collections::HashSet::new();
    for ids in stopping.chunks(500) {
        let sql = format!("SELECT server_id FROM operations WHERE kind = 'kill' AND status = 'running' AND server_id IN ({})", marks(ids.len()));
        for row in e.rows(&sql, ids.iter().map(|(id, _)| Arg::from(&id.0)).collect()).await? {
            killing.insert(row.text("server_id")?);
        }
    }
    Ok(stopping.iter().filter(|(id, _)| killing.contains(&id.0)).cloned().collect())
}

/// When the node last renewed its lease, if ever, and when it registered
/// (what a sync decides from besides the node's servers).
pub(crate) async fn node_renewal(e: E<'_>, node: &NodeId) -> Result<Option<(Option<Millis>, Millis)>, StoreError> {
    let Some(row) = e.row("SELECT last_sync_at, registered_at FROM nodes WHERE id = ?", args![&node.0]).await? else { return Ok(None) };
    Ok(Some((row.opt_int("last_sync_at")?, row.int("registered_at")?)))
}

pub(crate) async fn killing_on(e: E<'_>, node: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError> {
    let rows = e
        .rows(
            "SELECT s.id, s.generation FROM servers s WHERE s.node_id = ? AND s.status = 'stopping' AND EXISTS \
             (SELECT 1 FROM operations o WHERE o.server_id = s.id AND o.kind = 'kill' AND o.status = 'running') ORDER BY s.id",
            args![&node.0],
        )
        .await?;
    rows.iter().map(|r| Ok((ServerId(r.text("id")?), r.int("generation")? as u64))).collect()
}

// ---- webhooks and deliveries ----

pub(crate) async fn list_webhooks(e: E<'_>, tenant: Option<&str>) -> Result<Vec<Webhook>, StoreError> {
    let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE (CAST(? AS TEXT) IS NULL OR tenant = ?) ORDER BY created_at, id");
    e.rows(&sql, args![tenant, tenant]).await?.iter().map(webhook_from_row).collect()
}

pub(crate) async fn get_webhook(e: E<'_>, id: &str) -> Result<Option<Webhook>, StoreError> {
    e.row(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?"), args![id]).await?.as_ref().map(webhook_from_row).transpose()
}

pub(crate) async fn due_deliveries(e: E<'_>, now: Millis, limit: u32) -> Result<Vec<DeliveryJob>, StoreError> {
    let rows = e
        .rows(
            &format!(
                "SELECT {DELIVERY_COLS}, e.at AS e_at, e.server_id AS e_server, e.node_id AS e_node, e.message AS e_message \
                 FROM deliveries d JOIN events e ON e.seq = d.event_seq \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.id LIMIT ?"
            ),
            args![now, limit.max(1) as i64],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let delivery = delivery_from_row(r)?;
        let event = Event {
            seq: delivery.event_seq,
            at: r.int("e_at")?,
            kind: delivery.event_kind.clone(),
            server_id: r.opt_text("e_server")?.map(ServerId),
            node_id: r.opt_text("e_node")?.map(NodeId),
            message: r.text("e_message")?,
        };
        let webhook = match &delivery.webhook_id {
            Some(w) => get_webhook(e, w).await?,
            None => None,
        };
        out.push(DeliveryJob { delivery, event, webhook });
    }
    Ok(out)
}

pub(crate) async fn list_deliveries(e: E<'_>, f: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
    let sql = format!(
        "SELECT {DELIVERY_COLS} FROM deliveries d WHERE (CAST(? AS TEXT) IS NULL OR d.webhook_id = ?) AND (CAST(? AS TEXT) IS NULL OR d.channel = ?) \
         AND (CAST(? AS TEXT) IS NULL OR d.tenant = ?) ORDER BY d.event_seq DESC, d.id LIMIT ?"
    );
    let a = |v: &Option<String>| Arg::from(v.clone());
    let args = vec![a(&f.webhook_id), a(&f.webhook_id), a(&f.channel), a(&f.channel), a(&f.tenant), a(&f.tenant), Arg::Int(f.limit.clamp(1, 1000) as i64)];
    e.rows(&sql, args).await?.iter().map(delivery_from_row).collect()
}
