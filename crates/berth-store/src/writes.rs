//! Every write of the store, written once over `Exec` and run by both
//! backends (SQLite on its writer thread, PostgreSQL in a transaction of
//! its own per call).
//!
//! Each function is one step of one transaction: queries and pure
//! `berth_core` decisions, never foreign I/O. It returns an error to have
//! its writes undone (the caller rolls back); a refusal therefore writes
//! nothing (L7). Status writes derived from reports are conditional on the
//! server's generation and status (L3); reservations are inserted only by
//! `commit_placements`, after `admission::recheck` against the rows in the
//! same transaction (L1, L2). Where writers run concurrently (PostgreSQL),
//! a read a write depends on locks its row (`Exec::lock`).

use std::collections::HashMap;

use berth_core::admission::{recheck, NodeCapacity};
use berth_core::billing::EndReason;
use berth_core::health::Verdict;
use berth_core::notify::{targets, Target, Webhook};
use berth_core::operation::{admit, begin, settle, Begin, OpKind, OpOrigin, OpPhase, OpStatus, Operation, Settle};
use berth_core::placement::Placement;
use berth_core::reconcile::{Change, Placed, Reconciled};
use berth_core::retry::RetryDecision;
use berth_core::{Generation, LastExit, Millis, NewEvent, Node, NodeId, NodeStatus, Server, ServerId, ServerStatus};

use crate::exec::{Arg, Exec};
use crate::rows::*;
use crate::{
    BillingSession, Decide, DeliveryOutcome, DeliveryPolicy, LeaderLease, NodeRegistration, OpRequest, PlacementOutcome, ReplicaInfo, StoreError, SyncInput,
    TokenRecord,
};

type E<'a> = &'a mut dyn Exec;

/// `?, ?, …` for an IN list of `n` values.
pub(crate) fn marks(n: usize) -> String {
    vec!["?"; n.max(1)].join(", ")
}

// ---- shared steps ----

pub(crate) async fn insert_events(e: E<'_>, events: &[NewEvent], now: Millis) -> Result<(), StoreError> {
    for ev in events {
        e.exec(
            "INSERT INTO events (at, kind, server_id, node_id, message) VALUES (?, ?, ?, ?, ?)",
            args![now, ev.kind, ev.server_id.as_ref().map(|s| s.0.as_str()), ev.node_id.as_ref().map(|n| n.0.as_str()), &ev.message],
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn server_by_id(e: E<'_>, id: &ServerId) -> Result<Server, StoreError> {
    let sql = format!("SELECT {SERVER_COLS} FROM servers WHERE id = ? AND status <> 'deleted'{}", e.lock());
    let row = e.row(&sql, args![&id.0]).await?.ok_or_else(|| StoreError::NotFound { what: format!("server {id}") })?;
    server_from_row(&row)
}

/// The server, `None` once deleted (or never known).
async fn status_of(e: E<'_>, id: &ServerId) -> Result<Option<Server>, StoreError> {
    match server_by_id(e, id).await {
        Ok(s) => Ok(Some(s)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

async fn node_by_id(e: E<'_>, id: &NodeId) -> Result<Option<Node>, StoreError> {
    let sql = format!("SELECT {NODE_COLS} FROM nodes WHERE id = ?{}", e.lock());
    e.row(&sql, args![&id.0]).await?.as_ref().map(node_from_row).transpose()
}

/// Moves a server to `to` if it still has `generation` and `from`; returns
/// whether it did. Every status write derived from a report goes through a
/// conditional update like this one (L3 fencing).
async fn transition(e: E<'_>, id: &ServerId, generation: u64, from: ServerStatus, to: ServerStatus, now: Millis) -> Result<bool, StoreError> {
    let n = e
        .exec(
            "UPDATE servers SET status = ?, updated_at = ? WHERE id = ? AND generation = ? AND status = ?",
            args![to.as_str(), now, &id.0, generation as i64, from.as_str()],
        )
        .await?;
    Ok(n == 1)
}

async fn release(e: E<'_>, id: &ServerId, generation: u64) -> Result<(), StoreError> {
    e.exec("DELETE FROM reservations WHERE server_id = ? AND generation = ?", args![&id.0, generation as i64]).await?;
    e.exec("UPDATE servers SET node_id = NULL, port = NULL, used_mib = NULL WHERE id = ? AND generation = ?", args![&id.0, generation as i64]).await?;
    Ok(())
}

async fn ledger(e: E<'_>, at: Millis, kind: &str, session_id: i64, server: &ServerId, detail: &str) -> Result<(), StoreError> {
    e.exec("INSERT INTO ledger (at, kind, session_id, server_id, detail) VALUES (?, ?, ?, ?, ?)", args![at, kind, session_id, &server.0, detail]).await?;
    Ok(())
}

/// Opens the billing session of a server generation at `at` (L4: the unique
/// index refuses a second open session). `kind` is the ledger kind.
async fn open_session(e: E<'_>, server: &ServerId, generation: u64, at: Millis, kind: &str) -> Result<(), StoreError> {
    let id = e
        .insert_key(
            "INSERT INTO billing_sessions (server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at) \
             SELECT id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, ? FROM servers \
             WHERE id = ? AND generation = ? AND node_id IS NOT NULL",
            "id",
            args![at, &server.0, generation as i64],
        )
        .await?;
    if let Some(id) = id {
        ledger(e, at, kind, id, server, &format!("generation {generation}")).await?;
    }
    Ok(())
}

/// Closes the server's open session, if any, at `at` (never before it
/// started) with `reason`.
async fn close_session(e: E<'_>, server: &ServerId, at: Millis, reason: EndReason) -> Result<(), StoreError> {
    let row = e
        .row(
            "UPDATE billing_sessions SET ended_at = CASE WHEN started_at > ? THEN started_at ELSE ? END, end_reason = ? \
             WHERE server_id = ? AND ended_at IS NULL RETURNING id, ended_at",
            args![at, at, reason.as_str(), &server.0],
        )
        .await?;
    if let Some(row) = row {
        ledger(e, row.int("ended_at")?, "closed", row.int("id")?, server, reason.as_str()).await?;
    }
    Ok(())
}

/// Where a backfilled session starts: the end of the session the node's
/// disconnect closed, if this generation has one; otherwise `now`.
async fn backfill_start(e: E<'_>, server: &ServerId, generation: u64, now: Millis) -> Result<Millis, StoreError> {
    let row = e
        .row(
            "SELECT ended_at, end_reason FROM billing_sessions WHERE server_id = ? AND generation = ? ORDER BY started_at DESC, id DESC LIMIT 1",
            args![&server.0, generation as i64],
        )
        .await?;
    Ok(match row {
        Some(r) if r.opt_text("end_reason")?.as_deref() == Some(EndReason::NodeUnreachable.as_str()) => r.opt_int("ended_at")?.unwrap_or(now),
        _ => now,
    })
}

fn ended_reason(to: ServerStatus) -> EndReason {
    if to == ServerStatus::Stopped {
        EndReason::Stopped
    } else {
        EndReason::Crashed
    }
}

// ---- tokens, nodes, servers ----

pub(crate) async fn insert_token(e: E<'_>, t: &TokenRecord) -> Result<(), StoreError> {
    e.exec("INSERT INTO tokens (id, hash, kind, tenant, created_at) VALUES (?, ?, ?, ?, ?)", args![&t.id, &t.hash, t.kind.as_str(), &t.tenant, t.created_at])
        .await
        .map_err(|err| if err.is_unique_violation() { StoreError::Conflict(format!("token {} exists", t.id)) } else { err })?;
    Ok(())
}

pub(crate) async fn register_node(e: E<'_>, reg: &NodeRegistration, new_id: &NodeId, now: Millis) -> Result<Node, StoreError> {
    let sql = format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?{}", e.lock());
    let existing = e.row(&sql, args![&reg.name]).await?.as_ref().map(node_from_row).transpose()?;
    let id = match existing {
        Some(node) => {
            // A draining node stays draining across agent restarts; any
            // other status becomes ready because the agent is back.
            let status = if node.status == NodeStatus::Draining { NodeStatus::Draining } else { NodeStatus::Ready };
            e.exec(
                "UPDATE nodes SET address = ?, driver = ?, total_mib = ?, system_reserved_mib = ?, cpu_cores = ?, \
                 status = ?, max_concurrent_starts = ?, port_min = ?, port_max = ?, epoch = epoch + 1, sync_seq = 0, \
                 last_sync_at = ? WHERE id = ?",
                args![
                    &reg.address,
                    &reg.driver,
                    reg.total_mib.0 as i64,
                    reg.system_reserved_mib.0 as i64,
                    reg.cpu_cores as i64,
                    status.as_str(),
                    reg.max_concurrent_starts as i64,
                    reg.ports.min as i64,
                    reg.ports.max as i64,
                    now,
                    &node.id.0
                ],
            )
            .await?;
            let ev = NewEvent { kind: "node_registered", server_id: None, node_id: Some(node.id.clone()), message: format!("node {} re-registered", reg.name) };
            insert_events(e, &[ev], now).await?;
            node.id
        }
        None => {
            e.exec(
                &format!("INSERT INTO nodes ({NODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, 'ready', ?, ?, ?, 1, 0, ?, ?, 0, 0, 0, 0, 0, NULL)"),
                args![
                    &new_id.0,
                    &reg.name,
                    &reg.address,
                    &reg.driver,
                    reg.total_mib.0 as i64,
                    reg.system_reserved_mib.0 as i64,
                    reg.cpu_cores as i64,
                    reg.max_concurrent_starts as i64,
                    reg.ports.min as i64,
                    reg.ports.max as i64,
                    now,
                    now
                ],
            )
            .await?;
            let ev = NewEvent { kind: "node_registered", server_id: None, node_id: Some(new_id.clone()), message: format!("node {} registered", reg.name) };
            insert_events(e, &[ev], now).await?;
            new_id.clone()
        }
    };
    node_by_id(e, &id).await?.ok_or_else(|| StoreError::Corrupt(format!("node {id} vanished while registering")))
}

pub(crate) async fn set_node_status(e: E<'_>, id: &NodeId, status: NodeStatus) -> Result<Node, StoreError> {
    if e.exec("UPDATE nodes SET status = ? WHERE id = ?", args![status.as_str(), &id.0]).await? == 0 {
        return Err(StoreError::NotFound { what: format!("node {id}") });
    }
    node_by_id(e, id).await?.ok_or_else(|| StoreError::NotFound { what: format!("node {id}") })
}

pub(crate) async fn set_drain(e: E<'_>, id: &NodeId, draining: bool, deadline: Option<Millis>) -> Result<Node, StoreError> {
    let status = if draining { NodeStatus::Draining } else { NodeStatus::Ready };
    let n = e
        .exec(
            "UPDATE nodes SET status = ?, drain_deadline = ? WHERE id = ? AND status IN ('ready', 'draining')",
            args![status.as_str(), if draining { deadline } else { None }, &id.0],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::Conflict(format!("node {id} is not ready or draining")));
    }
    node_by_id(e, id).await?.ok_or_else(|| StoreError::NotFound { what: format!("node {id}") })
}

pub(crate) async fn insert_server(e: E<'_>, s: &Server, event: &NewEvent) -> Result<(), StoreError> {
    e.exec(
        &format!("INSERT INTO servers ({SERVER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, NULL, NULL, 0, NULL, NULL, NULL, ?, ?, ?, ?, ?, ?, NULL, ?)"),
        args![
            &s.id.0,
            &s.tenant,
            &s.name,
            &s.template,
            s.memory_mib.0 as i64,
            serde_json::to_string(&s.config).expect("a json map serializes"),
            s.status.as_str(),
            s.generation as i64,
            s.created_at,
            s.updated_at,
            s.stop_after_ms,
            s.stateless as i64,
            &s.plan,
            s.price_per_gib_hour,
            s.restart_policy.as_str()
        ],
    )
    .await
    .map_err(|err| if err.is_unique_violation() { StoreError::Conflict(format!("a server named {:?} already exists", s.name)) } else { err })?;
    insert_events(e, std::slice::from_ref(event), s.created_at).await
}

pub(crate) async fn request_start(e: E<'_>, id: &ServerId, now: Millis, allow_fresh_world: bool) -> Result<Server, StoreError> {
    let s = server_by_id(e, id).await?;
    let to = s.status.on_start()?;
    if allow_fresh_world && s.home_node.is_some() {
        e.exec("UPDATE servers SET home_node = NULL WHERE id = ?", args![&id.0]).await?;
    }
    e.exec(
        "UPDATE servers SET status = ?, queued_at = ?, attempts = 0, next_attempt_at = NULL, last_error = NULL, updated_at = ? \
         WHERE id = ? AND status = ?",
        args![to.as_str(), now, now, &id.0, s.status.as_str()],
    )
    .await?;
    let ev = NewEvent { kind: "server_queued", server_id: Some(id.clone()), node_id: None, message: format!("server {} queued to start", s.name) };
    insert_events(e, &[ev], now).await?;
    server_by_id(e, id).await
}

pub(crate) async fn request_stop(e: E<'_>, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
    let s = server_by_id(e, id).await?;
    let to = s.status.on_stop()?;
    transition(e, id, s.generation, s.status, to, now).await?;
    if to == ServerStatus::Stopped {
        e.exec("UPDATE servers SET queued_at = NULL, next_attempt_at = NULL WHERE id = ?", args![&id.0]).await?;
    }
    let message = if to == ServerStatus::Stopped { format!("server {} removed from the queue", s.name) } else { format!("server {} stopping", s.name) };
    insert_events(e, &[NewEvent { kind: "server_stop_requested", server_id: Some(id.clone()), node_id: s.node_id.clone(), message }], now).await?;
    server_by_id(e, id).await
}

pub(crate) async fn delete_server(e: E<'_>, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
    let mut s = server_by_id(e, id).await?;
    let to = s.status.on_delete()?;
    transition(e, id, s.generation, s.status, to, now).await?;
    e.exec("UPDATE servers SET queued_at = NULL, next_attempt_at = NULL, deleted_at = ? WHERE id = ?", args![now, &id.0]).await?;
    let ev = NewEvent { kind: "server_deleted", server_id: Some(id.clone()), node_id: None, message: format!("server {} deleted", s.name) };
    insert_events(e, &[ev], now).await?;
    s.status = to;
    Ok(s)
}

// ---- admission ----

/// The admission commit: re-checks every plan against the reservation rows
/// in this transaction and inserts those that fit (L1, L2). `fence` is the
/// leader lease this replica must still hold.
pub(crate) async fn commit_placements(e: E<'_>, plans: &[Placement], now: Millis, fence: Option<(String, u64)>) -> Result<Vec<PlacementOutcome>, StoreError> {
    fence_and_lock(e, plans, fence).await?;
    // Capacity per node is derived from the rows inside this transaction,
    // then updated as plans are accepted, so every plan is checked against
    // everything committed before it.
    let mut caps: HashMap<NodeId, NodeCapacity> = HashMap::new();
    let mut out = Vec::with_capacity(plans.len());
    for p in plans {
        out.push(place_plan(e, p, &mut caps, None, now).await?);
    }
    Ok(out)
}

/// Checks that this replica still holds the leader lease `fence` names,
/// and where replicas are concurrent locks the nodes `plans` touch.
async fn fence_and_lock(e: E<'_>, plans: &[Placement], fence: Option<(String, u64)>) -> Result<(), StoreError> {
    let concurrent = !e.lock().is_empty();
    if let Some((holder, epoch)) = fence {
        // FOR SHARE where replicas are concurrent: a replica taking over the
        // lease waits for this commit.
        let sql = format!("SELECT holder, epoch FROM leader WHERE id = 1{}", if concurrent { " FOR SHARE" } else { "" });
        let current = match e.row(&sql, args![]).await? {
            Some(r) => Some((r.text("holder")?, r.int("epoch")?)),
            None => None,
        };
        if current != Some((holder.clone(), epoch as i64)) {
            return Err(StoreError::NotLeader { holder, epoch });
        }
    }
    if concurrent {
        // Lock the affected node rows in id order: two committers touching
        // the same node serialize here, and the fixed order rules out
        // deadlocks between them.
        let mut ids: Vec<&str> = plans.iter().map(|p| p.node_id.0.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            let sql = format!("SELECT id FROM nodes WHERE id IN ({}) ORDER BY id FOR UPDATE", marks(ids.len()));
            e.rows(&sql, ids.iter().map(|i| Arg::from(*i)).collect()).await?;
        }
    }
    Ok(())
}

/// A server whose start moved it to queued in this same transaction, its
/// row not yet written (see `place_now`): the name, and the status the
/// row still holds.
struct HeldQueue<'a> {
    name: &'a str,
    row_status: ServerStatus,
}

/// Re-checks one plan against the reservation rows and `caps` (the
/// batch's nodes so far) and, if it fits, reserves it. `held`: the
/// server's row is still at its status before its start, and the one
/// update that places it also writes what queueing it would have.
async fn place_plan(
    e: E<'_>,
    p: &Placement,
    caps: &mut HashMap<NodeId, NodeCapacity>,
    held: Option<&HeldQueue<'_>>,
    now: Millis,
) -> Result<PlacementOutcome, StoreError> {
    let name = match held {
        Some(h) => h.name.to_string(),
        None => {
            let server_sql = format!("SELECT name, status, generation FROM servers WHERE id = ?{}", e.lock());
            let Some(server) = e.row(&server_sql, args![&p.server_id.0]).await? else {
                return Ok(PlacementOutcome::Stale);
            };
            if server.text("status")? != ServerStatus::Queued.as_str() || server.int("generation")? as u64 != p.expected_generation {
                return Ok(PlacementOutcome::Stale);
            }
            server.text("name")?
        }
    };
    if !caps.contains_key(&p.node_id) {
        let Some(node) = node_by_id(e, &p.node_id).await? else {
            return Ok(PlacementOutcome::Stale);
        };
        // Summed by the database: the rows themselves, not a copy of
        // them built for each node of the batch. The node's memory and
        // pending starts; its ports are looked up one plan at a time (a
        // point read of the key), not listed.
        let totals = format!("SELECT {} FROM reservations WHERE node_id = ?", totals_sql("NULL"));
        let (reserved, pending, ports) = totals_from_row(&e.one(&totals, args![&p.node_id.0]).await?)?;
        caps.insert(p.node_id.clone(), NodeCapacity::from_totals(&node, berth_core::MemMib(reserved), pending, ports));
    }
    let cap = caps.get_mut(&p.node_id).expect("inserted above");
    // The batch's own ports are in `cap`; those of earlier commits in
    // the rows.
    if let Err(misfit) = recheck(cap, p) {
        return Ok(PlacementOutcome::Rejected(misfit));
    }
    if e.row("SELECT port FROM reservations WHERE node_id = ? AND port = ?", args![&p.node_id.0, p.port as i64]).await?.is_some() {
        return Ok(PlacementOutcome::Rejected(berth_core::admission::Misfit::PortTaken));
    }
    let new_gen = p.new_generation();
    e.exec(
        &format!("INSERT INTO reservations ({RES_COLS}) VALUES (?, ?, ?, ?, ?, 'pending', ?)"),
        args![&p.server_id.0, new_gen as i64, &p.node_id.0, p.memory_mib.0 as i64, p.port as i64, now],
    )
    .await?;
    let mut args = args![&p.node_id.0, new_gen as i64, p.port as i64, now];
    let (queued_sets, row_status) = match held {
        None => (String::new(), ServerStatus::Queued),
        Some(h) => {
            args.push(Arg::Int(now));
            (format!(", {QUEUED_SETS}"), h.row_status)
        }
    };
    args.extend(args![&p.server_id.0, p.expected_generation as i64, row_status.as_str()]);
    let sql = format!("UPDATE servers SET status = 'starting', node_id = ?, generation = ?, port = ?, updated_at = ?{queued_sets} WHERE id = ? AND generation = ? AND status = ?");
    if e.exec(&sql, args).await? != 1 {
        return Err(StoreError::Corrupt(format!("server {} changed under its row lock", p.server_id)));
    }
    cap.take(p.memory_mib, p.port);
    let ev = NewEvent {
        kind: "server_placed",
        server_id: Some(p.server_id.clone()),
        node_id: Some(p.node_id.clone()),
        message: format!("server {name} placed on node {} (generation {new_gen}, port {})", p.node_id, p.port),
    };
    insert_events(e, &[ev], now).await?;
    Ok(PlacementOutcome::Committed { generation: new_gen, at: now })
}

// ---- syncs ----

/// Pairs each change with the event the reconciler emitted for it, if any:
/// usage updates carry no event, every other change carries exactly one.
fn zip_events<'a>(changes: &'a [Change], events: &'a [NewEvent]) -> Vec<(&'a Change, Option<&'a NewEvent>)> {
    let mut evs = events.iter();
    changes
        .iter()
        .map(|c| match c {
            Change::Usage { .. } => (c, None),
            _ => (c, evs.next()),
        })
        .collect()
}

/// The server a change is about, if it may settle an operation (memory use
/// never does).
fn settling_server(change: &Change) -> Option<&ServerId> {
    match change {
        Change::Usage { .. } => None,
        Change::Confirmed { server_id, .. }
        | Change::Ended { server_id, .. }
        | Change::Reconnected { server_id, .. }
        | Change::Requeue { server_id, .. }
        | Change::Fail { server_id, .. } => Some(server_id),
    }
}

async fn apply_change(e: E<'_>, change: &Change, placed: &HashMap<&ServerId, &Placed>, now: Millis) -> Result<bool, StoreError> {
    let from = |id: &ServerId| placed.get(id).map(|s| s.status);
    Ok(match change {
        Change::Reconnected { server_id, generation } => {
            let Some(from) = from(server_id) else { return Ok(false) };
            let ok = transition(e, server_id, *generation, from, ServerStatus::Running, now).await?;
            if ok {
                // The instance ran on through the disconnect (same generation,
                // still alive): bill from where billing stopped, with no gap
                // and no overlap.
                let start = backfill_start(e, server_id, *generation, now).await?;
                open_session(e, server_id, *generation, start, "backfilled").await?;
            }
            ok
        }
        Change::Confirmed { server_id, generation } => {
            // Only a starting instance is confirmed: one the server's stop
            // or another sync has moved on is left as it is.
            if from(server_id).is_none() {
                return Ok(false);
            }
            // One update moves it and clears what a start left behind.
            let ok = e
                .exec(
                    "UPDATE servers SET status = 'running', updated_at = ?, attempts = 0, next_attempt_at = NULL, last_error = NULL, last_exit = NULL \
                     WHERE id = ? AND generation = ? AND status = 'starting'",
                    args![now, &server_id.0, *generation as i64],
                )
                .await?
                == 1;
            if ok {
                open_session(e, server_id, *generation, now, "opened").await?;
                e.exec("UPDATE reservations SET state = 'active' WHERE server_id = ? AND generation = ?", args![&server_id.0, *generation as i64]).await?;
            }
            ok
        }
        Change::Ended { server_id, generation, to, exit, billed_until } => {
            let Some(from) = from(server_id) else { return Ok(false) };
            let ok = transition(e, server_id, *generation, from, *to, now).await?;
            if ok {
                close_session(e, server_id, *billed_until, ended_reason(*to)).await?;
                release(e, server_id, *generation).await?;
                e.exec(
                    "UPDATE servers SET last_exit = ?, queued_at = NULL WHERE id = ?",
                    args![serde_json::to_string(exit).expect("serializable"), &server_id.0],
                )
                .await?;
            }
            ok
        }
        Change::Requeue { server_id, generation, attempts, next_attempt_at, error } => {
            let Some(from) = from(server_id) else { return Ok(false) };
            let ok = transition(e, server_id, *generation, from, ServerStatus::Queued, now).await?;
            if ok {
                close_session(e, server_id, now, EndReason::Crashed).await?;
                release(e, server_id, *generation).await?;
                // The server keeps its place in the queue (queued_at).
                e.exec(
                    "UPDATE servers SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                    args![*attempts as i64, *next_attempt_at, error, &server_id.0],
                )
                .await?;
            }
            ok
        }
        Change::Fail { server_id, generation, error } => {
            let Some(from) = from(server_id) else { return Ok(false) };
            let ok = transition(e, server_id, *generation, from, ServerStatus::Failed, now).await?;
            if ok {
                close_session(e, server_id, now, EndReason::Crashed).await?;
                release(e, server_id, *generation).await?;
                e.exec("UPDATE servers SET last_error = ?, queued_at = NULL WHERE id = ?", args![error, &server_id.0]).await?;
            }
            ok
        }
        Change::Usage { server_id, generation, used_mib } => {
            e.exec("UPDATE servers SET used_mib = ? WHERE id = ? AND generation = ?", args![used_mib.0 as i64, &server_id.0, *generation as i64]).await?;
            true
        }
    })
}

/// What a sync decided before its write: the node's previous renewal it
/// decided with, the servers it saw, the decision.
pub(crate) type PreDecided = (Option<Millis>, Vec<Placed>, Reconciled);

pub(crate) fn placed_sql() -> String {
    format!("SELECT {PLACED_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'stopping', 'unknown')")
}

/// Applies one agent sync (see `Store::sync_node`). A decision made before
/// the write (`pre`, from a read of the last commit) stands if the node's
/// previous renewal is the one it was made with; its changes are
/// conditional on each server's generation and status, so a server that
/// changed meanwhile is left alone until the next sync. Otherwise the
/// decision is made here.
pub(crate) async fn sync_node(e: E<'_>, input: &SyncInput, now: Millis, decide: &Decide, pre: Option<PreDecided>) -> Result<(Node, Reconciled), StoreError> {
    let mut node = node_by_id(e, &input.node_id).await?.ok_or_else(|| StoreError::NotFound { what: format!("node {}", input.node_id) })?;
    if input.epoch != node.epoch {
        return Err(StoreError::StaleSync(format!("epoch {} is not the node's current epoch {}", input.epoch, node.epoch)));
    }
    if input.seq <= node.sync_seq {
        return Err(StoreError::StaleSync(format!("sequence {} is not after {}", input.seq, node.sync_seq)));
    }
    // A node heard from again is back, whatever the monitor concluded.
    let status = if matches!(node.status, NodeStatus::Unreachable | NodeStatus::Lost) { NodeStatus::Ready } else { node.status };
    let last_alive = node.last_sync_at.unwrap_or(node.registered_at);
    let previous_renewal = node.last_sync_at;
    e.exec(
        "UPDATE nodes SET sync_seq = ?, last_sync_at = ?, host_total_mib = ?, host_available_mib = ?, status = ?, disk_total_mib = ?, \
         disk_used_mib = ?, disk_pressure = ? WHERE id = ?",
        args![
            input.seq as i64,
            now,
            input.host_total_mib.0 as i64,
            input.host_available_mib.0 as i64,
            status.as_str(),
            input.disk_total_mib as i64,
            input.disk_used_mib as i64,
            input.disk_pressure as i64,
            &node.id.0
        ],
    )
    .await?;
    if let Some(volumes) = &input.volumes {
        e.exec("UPDATE nodes SET volumes = ? WHERE id = ?", args![serde_json::to_string(volumes).expect("serializable"), &node.id.0]).await?;
    }
    node.sync_seq = input.seq;
    node.last_sync_at = Some(now);
    node.host_total_mib = input.host_total_mib;
    node.host_available_mib = input.host_available_mib;
    node.status = status;
    node.disk_total_mib = input.disk_total_mib;
    node.disk_used_mib = input.disk_used_mib;
    node.disk_pressure = input.disk_pressure;

    let (placed, decided) = match pre {
        Some((seen, placed, decided)) if seen == previous_renewal => (placed, decided),
        _ => {
            let placed = e.rows(&placed_sql(), args![&node.id.0]).await?.iter().map(placed_from_row).collect::<Result<Vec<_>, _>>()?;
            let decided = decide(&placed, last_alive);
            (placed, decided)
        }
    };
    let by_id: HashMap<&ServerId, &Placed> = placed.iter().map(|s| (&s.id, s)).collect();
    let mut applied_events = Vec::new();
    let mut settling = Vec::new();
    for (change, ev) in zip_events(&decided.changes, &decided.events) {
        if apply_change(e, change, &by_id, now).await? {
            applied_events.extend(ev.cloned());
            settling.extend(settling_server(change));
        }
    }
    insert_events(e, &applied_events, now).await?;
    // An operation waiting on what this sync confirmed (a start on its
    // instance running, a stop on it gone) settles in the same transaction,
    // and what waits behind it begins.
    for server_id in settling {
        advance_operations(e, server_id, now).await?;
    }
    Ok((node, decided))
}

// ---- health verdicts ----

async fn apply_verdict(e: E<'_>, v: &Verdict, now: Millis) -> Result<Option<NewEvent>, StoreError> {
    Ok(match v {
        Verdict::NodeUnreachable { node_id, last_sync_at } => {
            let n = e
                .exec(
                    "UPDATE nodes SET status = 'unreachable' WHERE id = ? AND status IN ('ready', 'draining') AND COALESCE(last_sync_at, registered_at) = ?",
                    args![&node_id.0, *last_sync_at],
                )
                .await?;
            (n == 1).then(|| NewEvent {
                kind: "node_unreachable",
                server_id: None,
                node_id: Some(node_id.clone()),
                message: format!("node {node_id} stopped renewing its lease"),
            })
        }
        Verdict::ServerUnknown { server_id, generation, last_alive } => {
            let n = e
                .exec(
                    "UPDATE servers SET status = 'unknown', updated_at = ? WHERE id = ? AND generation = ? AND status IN ('starting', 'running')",
                    args![now, &server_id.0, *generation as i64],
                )
                .await?;
            if n == 1 {
                close_session(e, server_id, *last_alive, EndReason::NodeUnreachable).await?;
            }
            (n == 1).then(|| NewEvent {
                kind: "server_unknown",
                server_id: Some(server_id.clone()),
                node_id: None,
                message: format!("server {server_id} is unknown: its node stopped renewing; billing stopped"),
            })
        }
        Verdict::ServerLost { server_id, generation, node_id, last_alive } => {
            let still_gone = e.row("SELECT id FROM nodes WHERE id = ? AND status IN ('unreachable', 'lost')", args![&node_id.0]).await?;
            if still_gone.is_none() {
                return Ok(None);
            }
            let Some(row) =
                e.row("SELECT status, stateless, name FROM servers WHERE id = ? AND generation = ?", args![&server_id.0, *generation as i64]).await?
            else {
                return Ok(None);
            };
            let status = row.text("status")?;
            let stateless = row.int("stateless")?;
            let name = row.text("name")?;
            let from = ServerStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("server status {status}")))?;
            if !from.holds_reservation() {
                return Ok(None);
            }
            let to = if from == ServerStatus::Stopping { ServerStatus::Stopped } else { ServerStatus::Crashed };
            let exit = LastExit { reason: "node_lost".into(), code: None };
            // A stateful server's world is on the lost node: it may start
            // again there, or elsewhere only with an explicit fresh world.
            let (home, hint) = if stateless == 0 && to == ServerStatus::Crashed {
                (
                    Some(node_id.0.clone()),
                    Some(format!(
                        "node {node_id} was lost with this server's world; it restarts there when the node returns, or start it elsewhere with --allow-fresh-world"
                    )),
                )
            } else {
                (None, None)
            };
            e.exec(
                "UPDATE servers SET status = ?, last_exit = ?, home_node = ?, last_error = ?, queued_at = NULL, updated_at = ? WHERE id = ? AND generation = ?",
                args![to.as_str(), serde_json::to_string(&exit).expect("serializable"), home, hint, now, &server_id.0, *generation as i64],
            )
            .await?;
            release(e, server_id, *generation).await?;
            close_session(e, server_id, *last_alive, EndReason::NodeLost).await?;
            // A session closed provisionally when the node went silent is
            // final now: same end time, final reason.
            let relabelled = e
                .rows(
                    "UPDATE billing_sessions SET end_reason = ? WHERE server_id = ? AND generation = ? AND end_reason = ? RETURNING id",
                    args![EndReason::NodeLost.as_str(), &server_id.0, *generation as i64, EndReason::NodeUnreachable.as_str()],
                )
                .await?;
            for r in relabelled {
                ledger(e, now, "closed_final", r.int("id")?, server_id, EndReason::NodeLost.as_str()).await?;
            }
            Some(NewEvent {
                kind: "server_lost",
                server_id: Some(server_id.clone()),
                node_id: Some(node_id.clone()),
                message: format!("server {name} was lost with node {node_id} (node_lost)"),
            })
        }
        Verdict::NodeLost { node_id } => {
            let n = e.exec("UPDATE nodes SET status = 'lost' WHERE id = ? AND status = 'unreachable'", args![&node_id.0]).await?;
            (n == 1).then(|| NewEvent { kind: "node_lost", server_id: None, node_id: Some(node_id.clone()), message: format!("node {node_id} is lost") })
        }
        Verdict::DrainDeadline { server_id, generation } => {
            let n = e
                .exec(
                    "UPDATE servers SET status = 'stopping', updated_at = ? WHERE id = ? AND generation = ? AND status IN ('starting', 'running')",
                    args![now, &server_id.0, *generation as i64],
                )
                .await?;
            (n == 1).then(|| NewEvent {
                kind: "server_stop_requested",
                server_id: Some(server_id.clone()),
                node_id: None,
                message: format!("server {server_id} stopping: its node's drain deadline passed"),
            })
        }
    })
}

/// Applies health verdicts (each conditional on the facts it was judged
/// from) and settles the operations of the servers they changed.
pub(crate) async fn apply_verdicts(e: E<'_>, verdicts: &[Verdict], now: Millis) -> Result<usize, StoreError> {
    let mut events = Vec::new();
    for v in verdicts {
        if let Some(ev) = apply_verdict(e, v, now).await? {
            events.push(ev);
        }
    }
    insert_events(e, &events, now).await?;
    for server_id in events.iter().filter_map(|ev| ev.server_id.as_ref()) {
        advance_operations(e, server_id, now).await?;
    }
    Ok(events.len())
}

// ---- billing ----

pub(crate) async fn sweep_zombies(e: E<'_>, now: Millis) -> Result<Vec<BillingSession>, StoreError> {
    // A session is a zombie if its server does not run that generation (a
    // stopping server still runs until the stop is confirmed). It closes
    // when the server last changed status (when it stopped running, as far
    // as the records know), never after now.
    let rows = e
        .rows(
            &format!(
                "SELECT {SESSION_COLS}, (SELECT s.updated_at FROM servers s WHERE s.id = b.server_id) AS changed_at FROM billing_sessions b \
                 WHERE b.ended_at IS NULL AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.id = b.server_id AND s.generation = b.generation \
                 AND s.status IN ('running', 'stopping'))"
            ),
            args![],
        )
        .await?;
    let mut closed = Vec::new();
    let mut events = Vec::new();
    for r in &rows {
        let mut s = session_from_row(r)?;
        let at = r.opt_int("changed_at")?.unwrap_or(s.started_at).clamp(s.started_at, now.max(s.started_at));
        close_session(e, &s.server_id, at, EndReason::Zombie).await?;
        events.push(NewEvent {
            kind: "billing_zombie_closed",
            server_id: Some(s.server_id.clone()),
            node_id: Some(s.node_id.clone()),
            message: format!("closed billing session {} of a server that is not running", s.id),
        });
        s.ended_at = Some(at);
        s.end_reason = Some(EndReason::Zombie.as_str().into());
        closed.push(s);
    }
    insert_events(e, &events, now).await?;
    Ok(closed)
}

pub(crate) async fn roll_over(e: E<'_>, max_len_ms: Millis, fresh_ms: Millis, now: Millis) -> Result<usize, StoreError> {
    let rows = e
        .rows(
            "SELECT b.server_id, b.generation FROM billing_sessions b JOIN servers s ON s.id = b.server_id AND s.generation = b.generation \
             JOIN nodes n ON n.id = b.node_id \
             WHERE b.ended_at IS NULL AND b.started_at <= ? AND s.status = 'running' AND n.last_sync_at >= ?",
            args![now - max_len_ms, now - fresh_ms],
        )
        .await?;
    for r in &rows {
        let server = ServerId(r.text("server_id")?);
        let generation = r.int("generation")? as u64;
        close_session(e, &server, now, EndReason::Rollover).await?;
        open_session(e, &server, generation, now, "rollover").await?;
    }
    Ok(rows.len())
}

pub(crate) async fn insert_session(e: E<'_>, s: &BillingSession) -> Result<i64, StoreError> {
    let id = e
        .insert_key(
            "INSERT INTO billing_sessions (server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at, ended_at, end_reason) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "id",
            args![
                &s.server_id.0,
                &s.tenant,
                &s.node_id.0,
                s.generation as i64,
                s.memory_mib.0 as i64,
                &s.plan,
                s.price_per_gib_hour,
                s.started_at,
                s.ended_at,
                &s.end_reason
            ],
        )
        .await
        .map_err(|err| if err.is_unique_violation() { StoreError::Conflict(format!("server {} already has an open session", s.server_id)) } else { err })?
        .ok_or_else(|| StoreError::Corrupt("an insert of one session inserted none".into()))?;
    ledger(e, s.started_at, "opened", id, &s.server_id, "inserted").await?;
    Ok(id)
}

// ---- replicas ----

/// Takes the lease if it is free or expired, renews it if held; the epoch
/// grows only when the holder changes or its lease had lapsed.
pub(crate) async fn try_lead(e: E<'_>, replica: &str, ttl_ms: i64, now: Millis) -> Result<Option<LeaderLease>, StoreError> {
    let row = e
        .row(
            "INSERT INTO leader (id, holder, epoch, expires_at) VALUES (1, ?, 1, ?) \
             ON CONFLICT (id) DO UPDATE SET \
               epoch = CASE WHEN leader.holder = excluded.holder AND leader.expires_at >= ? THEN leader.epoch ELSE leader.epoch + 1 END, \
               holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leader.holder = excluded.holder OR leader.expires_at < ? \
             RETURNING holder, epoch, expires_at",
            args![replica, now + ttl_ms, now, now],
        )
        .await?;
    row.as_ref().map(lease_from_row).transpose()
}

pub(crate) async fn heartbeat(e: E<'_>, r: &ReplicaInfo) -> Result<(), StoreError> {
    e.exec(
        "INSERT INTO replicas (id, address, started_at, last_seen) VALUES (?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at, last_seen = excluded.last_seen",
        args![&r.id, &r.address, r.started_at, r.last_seen],
    )
    .await?;
    Ok(())
}

// ---- operations ----

async fn active_ops(e: E<'_>, id: &ServerId) -> Result<Vec<Operation>, StoreError> {
    let rows = e.rows(&format!("SELECT {OP_COLS} FROM operations WHERE server_id = ? AND status IN ('pending', 'running') ORDER BY seq"), args![&id.0]).await?;
    rows.iter().map(op_from_row).collect()
}

/// Whether `op` has its row yet. A newly admitted operation takes its first
/// step in memory and is inserted once, as that step left it (`seq` 0
/// until then: AUTOINCREMENT starts at 1): one row write instead of an
/// insert and an update of the same row and its indexes.
fn stored(op: &Operation) -> bool {
    op.seq != 0
}

async fn finish(
    e: E<'_>,
    op: &mut Operation,
    status: OpStatus,
    code: Option<&str>,
    error: Option<String>,
    server: Option<&Server>,
    now: Millis,
) -> Result<(), StoreError> {
    op.status = status;
    op.error_code = code.map(String::from);
    op.error = error;
    op.finished_at = Some(now);
    if let Some(s) = server {
        if matches!(op.kind, OpKind::Start | OpKind::Restart) {
            // A confirmed start resets the server's count; the operation
            // keeps how many attempts it took.
            op.attempts = op.attempts.max(s.attempts);
            op.next_attempt_at = s.next_attempt_at;
        }
    }
    if !stored(op) {
        return Ok(());
    }
    e.exec(
        "UPDATE operations SET status = ?, error_code = ?, error = ?, finished_at = ?, attempts = ?, next_attempt_at = ? WHERE id = ?",
        args![status.as_str(), &op.error_code, &op.error, now, op.attempts as i64, op.next_attempt_at, &op.id],
    )
    .await?;
    Ok(())
}

/// What a move to queued writes besides the status (`queued_at` is bound).
const QUEUED_SETS: &str = "queued_at = ?, attempts = 0, next_attempt_at = NULL, last_error = NULL";

/// Whether a move writes the server's row now or leaves it to the
/// placement that follows in the same transaction (`place_now`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowWrite {
    Now,
    /// A move to queued only: its row write is held.
    HoldQueue,
}

/// The row write of `move_server`: the status, and what the target needs.
async fn write_move(e: E<'_>, id: &ServerId, generation: u64, from: ServerStatus, to: ServerStatus, now: Millis) -> Result<(), StoreError> {
    let extra = match to {
        ServerStatus::Queued => format!(", {QUEUED_SETS}"),
        ServerStatus::Stopped => ", queued_at = NULL, next_attempt_at = NULL".into(),
        // The name is free again (the live-name index holds rows without
        // `deleted_at`).
        ServerStatus::Deleted => ", queued_at = NULL, next_attempt_at = NULL, deleted_at = ?".into(),
        _ => String::new(),
    };
    let sql = format!("UPDATE servers SET status = ?, updated_at = ?{extra} WHERE id = ? AND generation = ? AND status = ?");
    let mut args = args![to.as_str(), now];
    if matches!(to, ServerStatus::Queued | ServerStatus::Deleted) {
        args.push(Arg::Int(now));
    }
    args.extend(args![&id.0, generation as i64, from.as_str()]);
    if e.exec(&sql, args).await? != 1 {
        return Err(StoreError::Corrupt(format!("server {id} changed under its row lock")));
    }
    Ok(())
}

/// Moves the server to `to` as the first step of an operation or of its
/// next phase, with the bookkeeping each target needs. With
/// `RowWrite::HoldQueue` a move to queued records its event and changes
/// `s` but leaves the row to its caller, which must write it: then it
/// returns the status the row still holds.
async fn move_server(e: E<'_>, s: &mut Server, to: ServerStatus, why: &Operation, now: Millis, row: RowWrite) -> Result<Option<ServerStatus>, StoreError> {
    let held = (row == RowWrite::HoldQueue && to == ServerStatus::Queued).then_some(s.status);
    if held.is_none() {
        write_move(e, &s.id, s.generation, s.status, to, now).await?;
    }
    let (kind, message) = match (why.kind, to) {
        (_, ServerStatus::Queued) if why.origin == OpOrigin::RestartPolicy => {
            ("server_queued", format!("server {} queued to restart after a crash (restart policy)", s.name))
        }
        (OpKind::Restart, ServerStatus::Stopping) => ("server_restart_requested", format!("server {} restarting: stopping", s.name)),
        (OpKind::Restart, ServerStatus::Queued) => ("server_queued", format!("server {} queued to start again (restart)", s.name)),
        (_, ServerStatus::Queued) => ("server_queued", format!("server {} queued to start", s.name)),
        (OpKind::Kill, _) => ("server_kill_requested", format!("server {} is being killed", s.name)),
        (_, ServerStatus::Stopped) => ("server_stop_requested", format!("server {} removed from the queue", s.name)),
        (_, ServerStatus::Deleted) => ("server_deleted", format!("server {} deleted", s.name)),
        _ => ("server_stop_requested", format!("server {} stopping", s.name)),
    };
    insert_events(e, &[NewEvent { kind, server_id: Some(s.id.clone()), node_id: s.node_id.clone(), message }], now).await?;
    if to == ServerStatus::Queued {
        s.queued_at = Some(now);
        s.attempts = 0;
        s.next_attempt_at = None;
        s.last_error = None;
    }
    s.status = to;
    // The answer a request returns is this copy: it must match the row.
    s.updated_at = now;
    Ok(held)
}

async fn set_phase(e: E<'_>, op: &mut Operation, phase: OpPhase, now: Millis) -> Result<(), StoreError> {
    op.phase = Some(phase);
    op.status = OpStatus::Running;
    if op.started_at.is_none() {
        op.started_at = Some(now);
    }
    if !stored(op) {
        return Ok(());
    }
    e.exec("UPDATE operations SET status = 'running', phase = ?, started_at = ? WHERE id = ?", args![phase.as_str(), op.started_at, &op.id]).await?;
    Ok(())
}

/// Begins `op` on `server` (its turn has come). Returns the status the
/// server's row still holds if `row` held its move to queued.
async fn begin_op(e: E<'_>, op: &mut Operation, server: &mut Option<Server>, now: Millis, row: RowWrite) -> Result<Option<ServerStatus>, StoreError> {
    let Some(s) = server.as_mut() else {
        finish(e, op, OpStatus::Failed, Some("deleted"), Some("the server was deleted".into()), None, now).await?;
        return Ok(None);
    };
    let mut held = None;
    match begin(op.kind, s.status) {
        Begin::Transition { to, phase } => {
            held = move_server(e, s, to, op, now, row).await?;
            set_phase(e, op, phase, now).await?;
            if phase == OpPhase::Done {
                let snapshot = s.clone();
                finish(e, op, OpStatus::Succeeded, None, None, Some(&snapshot), now).await?;
            }
        }
        Begin::Delete => {
            move_server(e, s, ServerStatus::Deleted, op, now, RowWrite::Now).await?;
            set_phase(e, op, OpPhase::Done, now).await?;
            finish(e, op, OpStatus::Succeeded, None, None, None, now).await?;
            *server = None;
        }
        Begin::AlreadyDone(why) => {
            set_phase(e, op, OpPhase::Done, now).await?;
            let snapshot = s.clone();
            finish(e, op, OpStatus::Succeeded, None, Some(why), Some(&snapshot), now).await?;
        }
        Begin::Invalid(err) => {
            let snapshot = s.clone();
            finish(e, op, OpStatus::Failed, Some("invalid_state"), Some(err.to_string()), Some(&snapshot), now).await?;
        }
    }
    Ok(held)
}

/// Settles running operations and begins waiting ones until nothing
/// changes. `ops` are the server's unfinished operations in order; those
/// that end are removed from it. Returns the operations it changed.
async fn converge(e: E<'_>, server: &mut Option<Server>, ops: &mut Vec<Operation>, now: Millis) -> Result<Vec<Operation>, StoreError> {
    let mut changed: Vec<Operation> = Vec::new();
    loop {
        let mut progress = false;
        for op in ops.iter_mut().filter(|o| o.status == OpStatus::Running) {
            let st = server.as_ref().map(|s| s.status);
            let last_error = server.as_ref().and_then(|s| s.last_error.clone());
            match settle(op.kind, op.phase, st, last_error.as_deref()) {
                Settle::Continue => {
                    // Mirror the start's retry state for readers.
                    if let Some(s) = server.as_ref() {
                        if matches!(op.kind, OpKind::Start | OpKind::Restart) && (op.attempts != s.attempts || op.next_attempt_at != s.next_attempt_at) {
                            op.attempts = s.attempts;
                            op.next_attempt_at = s.next_attempt_at;
                            e.exec(
                                "UPDATE operations SET attempts = ?, next_attempt_at = ?, error = ? WHERE id = ?",
                                args![op.attempts as i64, op.next_attempt_at, &s.last_error, &op.id],
                            )
                            .await?;
                        }
                    }
                }
                Settle::Next { to, phase } => {
                    let s = server.as_mut().expect("settle returns next only for a live server");
                    move_server(e, s, to, op, now, RowWrite::Now).await?;
                    set_phase(e, op, phase, now).await?;
                    changed.push(op.clone());
                    progress = true;
                }
                Settle::Succeeded => {
                    finish(e, op, OpStatus::Succeeded, None, None, server.as_ref(), now).await?;
                    changed.push(op.clone());
                    progress = true;
                }
                Settle::Failed { code, message } => {
                    finish(e, op, OpStatus::Failed, Some(code), Some(message), server.as_ref(), now).await?;
                    changed.push(op.clone());
                    progress = true;
                }
            }
        }
        ops.retain(|o| !o.status.is_terminal());
        // The next waiting operation begins once nothing runs (a running
        // kill too: what waits behind it needs the instance confirmed gone).
        if !ops.iter().any(|o| o.status == OpStatus::Running) {
            if let Some(next) = ops.iter_mut().find(|o| o.status == OpStatus::Pending) {
                begin_op(e, next, server, now, RowWrite::Now).await?;
                changed.push(next.clone());
                progress = true;
            }
        }
        ops.retain(|o| !o.status.is_terminal());
        if !progress {
            return Ok(changed);
        }
    }
}

/// Admits an operation (see `Store::request_operation`); a refusal is an
/// error, so the caller undoes what converging wrote before it.
pub(crate) async fn request_operation(e: E<'_>, req: &OpRequest, now: Millis) -> Result<(Operation, Server), StoreError> {
    let mut server = Some(server_by_id(e, &req.server_id).await?);
    let mut ops = active_ops(e, &req.server_id).await?;
    converge(e, &mut server, &mut ops, now).await?;
    let Some(current) = server.clone() else {
        return Err(StoreError::NotFound { what: format!("server {}", req.server_id) });
    };
    let admission = admit(current.status, &ops, req.kind).map_err(|r| match r {
        crate::Refusal::InProgress { blocking, blocking_status, blocking_id } => {
            StoreError::OperationInProgress { blocking, status: blocking_status, id: blocking_id }
        }
        crate::Refusal::InvalidState(err) => StoreError::Invalid(err),
    })?;
    for op in ops.iter_mut().filter(|o| admission.cancel.contains(&o.id)) {
        let why = format!("cancelled by {} operation {}", req.kind, req.new_id);
        finish(e, op, OpStatus::Cancelled, Some("cancelled"), Some(why), server.as_ref(), now).await?;
    }
    ops.retain(|o| !o.status.is_terminal());
    let mut op = Operation {
        id: req.new_id.clone(),
        server_id: req.server_id.clone(),
        kind: req.kind,
        status: OpStatus::Pending,
        phase: None,
        origin: req.origin,
        seq: 0,
        attempts: 0,
        next_attempt_at: None,
        error_code: None,
        error: None,
        created_at: now,
        started_at: None,
        finished_at: None,
    };
    if req.fresh_world && req.kind == OpKind::Start {
        // The operator gives up the world on the lost node: the server may
        // be placed anywhere from now on.
        e.exec("UPDATE servers SET home_node = NULL WHERE id = ?", args![&req.server_id.0]).await?;
        if let Some(s) = server.as_mut() {
            s.home_node = None;
        }
    }
    // A start that proposes a node is placed right after it is queued,
    // in this transaction: one row write for both steps when it fits.
    let row = if req.place.is_some() { RowWrite::HoldQueue } else { RowWrite::Now };
    let held = if admission.begin_now { begin_op(e, &mut op, &mut server, now, row).await? } else { None };
    let seq = e
        .insert_key(
            "INSERT INTO operations (id, server_id, kind, status, phase, origin, attempts, next_attempt_at, error_code, error, created_at, \
             started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "seq",
            args![
                &op.id,
                &op.server_id.0,
                op.kind.as_str(),
                op.status.as_str(),
                op.phase.map(|p| p.as_str()),
                op.origin.as_str(),
                op.attempts as i64,
                op.next_attempt_at,
                &op.error_code,
                &op.error,
                op.created_at,
                op.started_at,
                op.finished_at
            ],
        )
        .await?;
    op.seq = seq.ok_or_else(|| StoreError::Corrupt("an insert of one operation inserted none".into()))?;
    let mut after = match &server {
        Some(s) => s.clone(),
        None => Server { status: ServerStatus::Deleted, ..current },
    };
    if let (Some(p), ServerStatus::Queued) = (&req.place, after.status) {
        place_now(e, &mut after, p, now, held).await?;
    }
    Ok((op, after))
}

/// Places a server its start just queued on the node the start proposed,
/// in the start's own transaction: re-checked against the reservation
/// rows like any plan (L1). Not while another queued server has waited
/// past the starvation bound (it blocks backfill in the planner too), nor
/// off the server's home node: then the server stays queued for the queue
/// worker, as does one the re-check refuses. `held`: the status the row
/// still holds when its move to queued was held (`RowWrite::HoldQueue`);
/// this writes it, placed or queued.
async fn place_now(e: E<'_>, s: &mut Server, p: &crate::Proposal, now: Millis, held: Option<ServerStatus>) -> Result<(), StoreError> {
    if !placed_now(e, s, p, now, held).await? {
        if let Some(row_status) = held {
            write_move(e, &s.id, s.generation, row_status, ServerStatus::Queued, now).await?;
        }
    }
    Ok(())
}

/// Whether `place_now` placed the server.
async fn placed_now(e: E<'_>, s: &mut Server, p: &crate::Proposal, now: Millis, held: Option<ServerStatus>) -> Result<bool, StoreError> {
    if s.next_attempt_at.is_some_and(|t| t > now) || s.home_node.as_ref().is_some_and(|h| *h != p.node_id) {
        return Ok(false);
    }
    let starved = e.row("SELECT id FROM servers WHERE status = 'queued' AND queued_at <= ? AND id <> ? LIMIT 1", args![now - p.starvation_ms, &s.id.0]).await?;
    if starved.is_some() {
        return Ok(false);
    }
    let plan = Placement { server_id: s.id.clone(), expected_generation: s.generation, node_id: p.node_id.clone(), memory_mib: s.memory_mib, port: p.port };
    fence_and_lock(e, std::slice::from_ref(&plan), p.fence.clone()).await?;
    let held = held.map(|row_status| HeldQueue { name: &s.name, row_status });
    let outcome = place_plan(e, &plan, &mut HashMap::new(), held.as_ref(), now).await?;
    let PlacementOutcome::Committed { generation, at } = outcome else { return Ok(false) };
    s.status = ServerStatus::Starting;
    s.node_id = Some(plan.node_id);
    s.port = Some(plan.port);
    s.generation = generation;
    s.updated_at = at;
    Ok(true)
}

/// Settles and begins a server's operations.
pub(crate) async fn advance_operations(e: E<'_>, id: &ServerId, now: Millis) -> Result<Vec<Operation>, StoreError> {
    let mut ops = active_ops(e, id).await?;
    if ops.is_empty() {
        return Ok(vec![]);
    }
    let mut server = status_of(e, id).await?;
    converge(e, &mut server, &mut ops, now).await
}

pub(crate) async fn fail_server(
    e: E<'_>,
    id: &ServerId,
    generation: Generation,
    from: ServerStatus,
    error: &str,
    event: &NewEvent,
    now: Millis,
) -> Result<bool, StoreError> {
    if from.holds_reservation() {
        return Err(StoreError::Corrupt(format!("fail_server of a {from} server would leak its reservation")));
    }
    let n = e
        .exec(
            "UPDATE servers SET status = 'failed', last_error = ?, queued_at = NULL, next_attempt_at = NULL, updated_at = ? \
             WHERE id = ? AND generation = ? AND status = ?",
            args![error, now, &id.0, generation as i64, from.as_str()],
        )
        .await?;
    if n == 1 {
        insert_events(e, std::slice::from_ref(event), now).await?;
    }
    Ok(n == 1)
}

pub(crate) async fn set_restart_at(e: E<'_>, id: &ServerId, generation: Generation, at: Millis) -> Result<(), StoreError> {
    e.exec("UPDATE servers SET next_attempt_at = ? WHERE id = ? AND generation = ? AND status = 'crashed'", args![at, &id.0, generation as i64]).await?;
    Ok(())
}

// ---- webhooks and deliveries ----

pub(crate) async fn insert_webhook(e: E<'_>, w: &Webhook) -> Result<Webhook, StoreError> {
    let after = e.one("SELECT COALESCE(MAX(seq), 0) AS n FROM events", args![]).await?.first_int()?;
    e.exec(
        &format!("INSERT INTO webhooks ({WEBHOOK_COLS}) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)"),
        args![&w.id, &w.url, &w.tenant, serde_json::to_string(&w.events).expect("a list of strings serializes"), &w.secret, w.enabled, after, w.created_at],
    )
    .await?;
    Ok(Webhook { after_seq: after, consecutive_failures: 0, ..w.clone() })
}

pub(crate) async fn delete_webhook(e: E<'_>, id: &str) -> Result<(), StoreError> {
    if e.exec("DELETE FROM webhooks WHERE id = ?", args![id]).await? == 0 {
        return Err(StoreError::NotFound { what: format!("webhook {id}") });
    }
    // Its log stays readable; what was still to send is dropped.
    e.exec("UPDATE deliveries SET status = 'failed', last_error = 'webhook deleted' WHERE webhook_id = ? AND status = 'pending'", args![id]).await?;
    Ok(())
}

pub(crate) async fn set_webhook_enabled(e: E<'_>, id: &str, enabled: bool) -> Result<Webhook, StoreError> {
    if e.exec("UPDATE webhooks SET enabled = ?, consecutive_failures = 0 WHERE id = ?", args![enabled, id]).await? == 0 {
        return Err(StoreError::NotFound { what: format!("webhook {id}") });
    }
    webhook_from_row(&e.one(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?"), args![id]).await?)
}

/// Turns events after the notification cursor into deliveries (one per
/// target, idempotent) and moves the cursor. Returns how many events it
/// looked at.
pub(crate) async fn fan_out(e: E<'_>, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError> {
    let cursor = e.one(&format!("SELECT seq FROM notify_cursor WHERE id = 1{}", e.lock()), args![]).await?.first_int()?;
    let hooks = e
        .rows(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE enabled = ?"), args![true])
        .await?
        .iter()
        .map(webhook_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    if hooks.is_empty() && !email {
        // Nobody to tell: the cursor moves past every event without reading
        // them (a webhook made later starts after the newest event anyway).
        let Some(last) = e.one("SELECT MAX(seq) AS n FROM events WHERE seq > ?", args![cursor]).await?.first_opt_int()? else { return Ok(0) };
        e.exec("UPDATE notify_cursor SET seq = ? WHERE id = 1", args![last]).await?;
        return Ok((last - cursor).min(limit as i64).max(0) as usize);
    }
    let rows = e
        .rows(
            "SELECT e.seq, e.at, e.kind, e.server_id, e.node_id, e.message, s.tenant FROM events e \
             LEFT JOIN servers s ON s.id = e.server_id WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
            args![cursor, limit.max(1) as i64],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut last = cursor;
    for r in &rows {
        let event = event_from_row(r)?;
        let tenant = r.opt_text("tenant")?;
        last = event.seq;
        for target in targets(&event, tenant.as_deref(), &hooks, email) {
            let (id, channel, webhook) = match &target {
                Target::Webhook(w) => (format!("{w}.{}", event.seq), "webhook", Some(w.clone())),
                Target::Email => (format!("email.{}", event.seq), "email", None),
            };
            e.exec(
                "INSERT INTO deliveries (id, channel, webhook_id, event_seq, event_kind, tenant, status, attempts, next_attempt_at, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) ON CONFLICT (id) DO NOTHING",
                args![&id, channel, webhook, event.seq, &event.kind, &tenant, now, now],
            )
            .await?;
        }
    }
    e.exec("UPDATE notify_cursor SET seq = ? WHERE id = 1", args![last]).await?;
    Ok(rows.len())
}

/// Records one delivery attempt (see `Store::record_delivery`).
pub(crate) async fn record_delivery(
    e: E<'_>,
    id: &str,
    outcome: &DeliveryOutcome,
    policy: &DeliveryPolicy,
    random: u64,
    now: Millis,
) -> Result<(), StoreError> {
    let sql = format!("SELECT {DELIVERY_COLS} FROM deliveries d WHERE d.id = ?{}", e.lock());
    let d = delivery_from_row(&e.row(&sql, args![id]).await?.ok_or_else(|| StoreError::NotFound { what: format!("delivery {id}") })?)?;
    if d.status != "pending" {
        return Ok(());
    }
    let attempts = d.attempts + 1;
    let (status, next, last_status, error, ok) = match outcome {
        DeliveryOutcome::Delivered { status } => ("delivered", d.next_attempt_at, *status, None, true),
        DeliveryOutcome::Abandon { error } => ("failed", d.next_attempt_at, None, Some(error.clone()), false),
        DeliveryOutcome::Failed { status, error } => match policy.retry.after_failure(attempts, now, random) {
            RetryDecision::RetryAt(at) => ("pending", at, *status, Some(error.clone()), false),
            RetryDecision::GiveUp => ("failed", d.next_attempt_at, *status, Some(format!("gave up after {attempts} attempts: {error}")), false),
        },
    };
    e.exec(
        "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status = ?, last_error = ?, delivered_at = ? WHERE id = ?",
        args![status, attempts as i64, next, last_status.map(|s| s as i64), error, if ok { Some(now) } else { None }, id],
    )
    .await?;
    if let (Some(wid), false) = (&d.webhook_id, matches!(outcome, DeliveryOutcome::Abandon { .. })) {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?{}", e.lock());
        if let Some(row) = e.row(&sql, args![wid]).await? {
            let w = webhook_from_row(&row)?;
            let failures = if ok { 0 } else { w.consecutive_failures + 1 };
            let disable = !ok && w.enabled && failures >= policy.disable_after;
            e.exec("UPDATE webhooks SET consecutive_failures = ?, enabled = ? WHERE id = ?", args![failures as i64, w.enabled && !disable, wid]).await?;
            if disable {
                e.exec("UPDATE deliveries SET status = 'failed', last_error = 'webhook disabled' WHERE webhook_id = ? AND status = 'pending'", args![wid])
                    .await?;
                let ev = NewEvent {
                    kind: "webhook_disabled",
                    server_id: None,
                    node_id: None,
                    message: format!("webhook {wid} ({}) disabled after {failures} failed attempts in a row", w.url),
                };
                insert_events(e, &[ev], now).await?;
            }
        }
    }
    Ok(())
}
