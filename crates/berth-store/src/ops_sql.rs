//! Operations, webhooks and deliveries, written once for both backends.
//!
//! `ops_store_impl!` expands inside `sqlite.rs` and `postgres.rs` into
//! inherent methods of their store; each backend's `Store` impl delegates
//! to them. The SQL is written with `?` placeholders and passed through the
//! backend's `q` (identity on SQLite, `$n` numbering on PostgreSQL);
//! `$lock` is ` FOR UPDATE` on PostgreSQL, where writers are concurrent.
//! The expansion uses the backend's own `server_by_id_tx`, `insert_events_tx`,
//! `server_from_row`, `SERVER_COLS` and `begin`. Every method is one
//! transaction of queries and pure `berth_core` decisions; none awaits
//! foreign I/O.

/// Rewrites `?` placeholders as `$1`, `$2`, … for PostgreSQL.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn same(sql: &str) -> String {
    sql.to_string()
}

macro_rules! ops_store_impl {
    ($Store:ty, $Db:ty, $q:path, $lock:expr) => {
        mod ops_impl {
            use super::*;
            use berth_core::notify::{targets, Target, Webhook};
            use berth_core::operation::{admit, begin, settle, Begin, OpKind, OpOrigin, OpPhase, OpStatus, Operation, Settle};
            use berth_core::retry::RetryDecision;
            use berth_core::{Event, Generation, Millis, NewEvent, NodeId, Server, ServerId, ServerStatus};
            use sqlx::{Row, Transaction};

            use crate::{
                Delivery, DeliveryFilter, DeliveryJob, DeliveryOutcome, DeliveryPolicy, OpFilter, OpRequest, OpsWork, StoreError,
            };

            type Tx = Transaction<'static, $Db>;
            type DbRow = <$Db as sqlx::Database>::Row;

            const OP_COLS: &str = "seq, id, server_id, kind, status, phase, origin, attempts, next_attempt_at, error_code, error, \
                 created_at, started_at, finished_at";
            const WEBHOOK_COLS: &str = "id, url, tenant, events, secret, enabled, consecutive_failures, after_seq, created_at";
            const DELIVERY_COLS: &str = "d.id, d.channel, d.webhook_id, d.event_seq, d.event_kind, d.tenant, d.status, d.attempts, \
                 d.next_attempt_at, d.last_status, d.last_error, d.created_at, d.delivered_at";

            fn corrupt(what: &str, v: impl std::fmt::Display) -> StoreError {
                StoreError::Corrupt(format!("{what}: {v}"))
            }

            fn op_from_row(r: &DbRow) -> Result<Operation, StoreError> {
                let kind: String = r.try_get("kind")?;
                let status: String = r.try_get("status")?;
                let phase: Option<String> = r.try_get("phase")?;
                let origin: String = r.try_get("origin")?;
                Ok(Operation {
                    id: r.try_get("id")?,
                    server_id: ServerId(r.try_get("server_id")?),
                    kind: OpKind::parse(&kind).ok_or_else(|| corrupt("operation kind", &kind))?,
                    status: OpStatus::parse(&status).ok_or_else(|| corrupt("operation status", &status))?,
                    phase: match phase {
                        Some(p) => Some(OpPhase::parse(&p).ok_or_else(|| corrupt("operation phase", &p))?),
                        None => None,
                    },
                    origin: OpOrigin::parse(&origin).ok_or_else(|| corrupt("operation origin", &origin))?,
                    seq: r.try_get("seq")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    error_code: r.try_get("error_code")?,
                    error: r.try_get("error")?,
                    created_at: r.try_get("created_at")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            }

            fn webhook_from_row(r: &DbRow) -> Result<Webhook, StoreError> {
                let events: String = r.try_get("events")?;
                Ok(Webhook {
                    id: r.try_get("id")?,
                    url: r.try_get("url")?,
                    tenant: r.try_get("tenant")?,
                    events: serde_json::from_str(&events).map_err(|e| corrupt("webhook events", e))?,
                    secret: r.try_get("secret")?,
                    enabled: r.try_get("enabled")?,
                    consecutive_failures: r.try_get::<i64, _>("consecutive_failures")? as u32,
                    after_seq: r.try_get("after_seq")?,
                    created_at: r.try_get("created_at")?,
                })
            }

            fn delivery_from_row(r: &DbRow) -> Result<Delivery, StoreError> {
                Ok(Delivery {
                    id: r.try_get("id")?,
                    channel: r.try_get("channel")?,
                    webhook_id: r.try_get("webhook_id")?,
                    event_seq: r.try_get("event_seq")?,
                    event_kind: r.try_get("event_kind")?,
                    tenant: r.try_get("tenant")?,
                    status: r.try_get("status")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    last_status: r.try_get::<Option<i64>, _>("last_status")?.map(|s| s as u16),
                    last_error: r.try_get("last_error")?,
                    created_at: r.try_get("created_at")?,
                    delivered_at: r.try_get("delivered_at")?,
                })
            }

            async fn active_ops(tx: &mut Tx, id: &ServerId) -> Result<Vec<Operation>, StoreError> {
                let rows = sqlx::query(&$q(&format!(
                    "SELECT {OP_COLS} FROM operations WHERE server_id = ? AND status IN ('pending', 'running') ORDER BY seq"
                )))
                .bind(&id.0)
                .fetch_all(&mut **tx)
                .await?;
                rows.iter().map(op_from_row).collect()
            }

            /// The server's status, `None` once deleted (or never known).
            async fn status_of(tx: &mut Tx, id: &ServerId) -> Result<Option<Server>, StoreError> {
                match server_by_id_tx(tx, id).await {
                    Ok(s) => Ok(Some(s)),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }

            async fn finish(tx: &mut Tx, op: &mut Operation, status: OpStatus, code: Option<&str>, error: Option<String>, server: Option<&Server>, now: Millis) -> Result<(), StoreError> {
                op.status = status;
                op.error_code = code.map(String::from);
                op.error = error;
                op.finished_at = Some(now);
                if let Some(s) = server {
                    if matches!(op.kind, OpKind::Start | OpKind::Restart) {
                        // A confirmed start resets the server's count; the
                        // operation keeps how many attempts it took.
                        op.attempts = op.attempts.max(s.attempts);
                        op.next_attempt_at = s.next_attempt_at;
                    }
                }
                sqlx::query(&$q(
                    "UPDATE operations SET status = ?, error_code = ?, error = ?, finished_at = ?, attempts = ?, next_attempt_at = ? WHERE id = ?",
                ))
                .bind(status.as_str())
                .bind(&op.error_code)
                .bind(&op.error)
                .bind(now)
                .bind(op.attempts as i64)
                .bind(op.next_attempt_at)
                .bind(&op.id)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Moves the server to `to` as the first step of an operation or
            /// of its next phase, with the bookkeeping each target needs.
            async fn move_server(tx: &mut Tx, s: &mut Server, to: ServerStatus, why: &Operation, now: Millis) -> Result<(), StoreError> {
                let extra = match to {
                    ServerStatus::Queued => ", queued_at = ?, attempts = 0, next_attempt_at = NULL, last_error = NULL",
                    ServerStatus::Stopped | ServerStatus::Deleted => ", queued_at = NULL, next_attempt_at = NULL",
                    _ => "",
                };
                let sql = format!("UPDATE servers SET status = ?, updated_at = ?{extra} WHERE id = ? AND generation = ? AND status = ?");
                let sql = $q(&sql);
                let mut qy = sqlx::query(&sql).bind(to.as_str()).bind(now);
                if to == ServerStatus::Queued {
                    qy = qy.bind(now);
                }
                let done = qy.bind(&s.id.0).bind(s.generation as i64).bind(s.status.as_str()).execute(&mut **tx).await?.rows_affected();
                if done != 1 {
                    return Err(StoreError::Corrupt(format!("server {} changed under its row lock", s.id)));
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
                let ev = NewEvent { kind, server_id: Some(s.id.clone()), node_id: s.node_id.clone(), message };
                insert_events_tx(tx, std::slice::from_ref(&ev), now).await?;
                if to == ServerStatus::Queued {
                    s.queued_at = Some(now);
                    s.attempts = 0;
                    s.next_attempt_at = None;
                    s.last_error = None;
                }
                s.status = to;
                Ok(())
            }

            async fn set_phase(tx: &mut Tx, op: &mut Operation, phase: OpPhase, now: Millis) -> Result<(), StoreError> {
                op.phase = Some(phase);
                op.status = OpStatus::Running;
                if op.started_at.is_none() {
                    op.started_at = Some(now);
                }
                sqlx::query(&$q("UPDATE operations SET status = 'running', phase = ?, started_at = ? WHERE id = ?"))
                    .bind(phase.as_str())
                    .bind(op.started_at)
                    .bind(&op.id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// Begins `op` on `server` (its turn has come).
            async fn begin_op(tx: &mut Tx, op: &mut Operation, server: &mut Option<Server>, now: Millis) -> Result<(), StoreError> {
                let Some(s) = server.as_mut() else {
                    return finish(tx, op, OpStatus::Failed, Some("deleted"), Some("the server was deleted".into()), None, now).await;
                };
                match begin(op.kind, s.status) {
                    Begin::Transition { to, phase } => {
                        move_server(tx, s, to, op, now).await?;
                        set_phase(tx, op, phase, now).await?;
                        if phase == OpPhase::Done {
                            let snapshot = s.clone();
                            finish(tx, op, OpStatus::Succeeded, None, None, Some(&snapshot), now).await?;
                        }
                    }
                    Begin::Delete => {
                        move_server(tx, s, ServerStatus::Deleted, op, now).await?;
                        set_phase(tx, op, OpPhase::Done, now).await?;
                        finish(tx, op, OpStatus::Succeeded, None, None, None, now).await?;
                        *server = None;
                    }
                    Begin::AlreadyDone(why) => {
                        set_phase(tx, op, OpPhase::Done, now).await?;
                        let snapshot = s.clone();
                        finish(tx, op, OpStatus::Succeeded, None, Some(why), Some(&snapshot), now).await?;
                    }
                    Begin::Invalid(e) => {
                        let snapshot = s.clone();
                        finish(tx, op, OpStatus::Failed, Some("invalid_state"), Some(e.to_string()), Some(&snapshot), now).await?;
                    }
                }
                Ok(())
            }

            /// Settles running operations and begins waiting ones until
            /// nothing changes. `ops` are the server's unfinished operations
            /// in order; those that end are removed from it. Returns the
            /// operations it changed.
            async fn converge(tx: &mut Tx, server: &mut Option<Server>, ops: &mut Vec<Operation>, now: Millis) -> Result<Vec<Operation>, StoreError> {
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
                                    if matches!(op.kind, OpKind::Start | OpKind::Restart)
                                        && (op.attempts != s.attempts || op.next_attempt_at != s.next_attempt_at)
                                    {
                                        op.attempts = s.attempts;
                                        op.next_attempt_at = s.next_attempt_at;
                                        sqlx::query(&$q("UPDATE operations SET attempts = ?, next_attempt_at = ?, error = ? WHERE id = ?"))
                                            .bind(op.attempts as i64)
                                            .bind(op.next_attempt_at)
                                            .bind(&s.last_error)
                                            .bind(&op.id)
                                            .execute(&mut **tx)
                                            .await?;
                                    }
                                }
                            }
                            Settle::Next { to, phase } => {
                                let s = server.as_mut().expect("settle returns next only for a live server");
                                move_server(tx, s, to, op, now).await?;
                                set_phase(tx, op, phase, now).await?;
                                changed.push(op.clone());
                                progress = true;
                            }
                            Settle::Succeeded => {
                                finish(tx, op, OpStatus::Succeeded, None, None, server.as_ref(), now).await?;
                                changed.push(op.clone());
                                progress = true;
                            }
                            Settle::Failed { code, message } => {
                                finish(tx, op, OpStatus::Failed, Some(code), Some(message), server.as_ref(), now).await?;
                                changed.push(op.clone());
                                progress = true;
                            }
                        }
                    }
                    ops.retain(|o| !o.status.is_terminal());
                    // The next waiting operation begins once nothing runs
                    // (a running kill too: what waits behind it needs the
                    // instance confirmed gone).
                    let busy = ops.iter().any(|o| o.status == OpStatus::Running);
                    if !busy {
                        if let Some(next) = ops.iter_mut().find(|o| o.status == OpStatus::Pending) {
                            begin_op(tx, next, server, now).await?;
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

            /// Admits an operation inside `tx` (see `Store::request_operation`);
            /// the caller commits, or drops `tx` on an error so a refusal
            /// writes nothing.
            pub(crate) async fn request_tx(tx: &mut Tx, req: &OpRequest, now: Millis) -> Result<(Operation, Server), StoreError> {
                let mut server = Some(server_by_id_tx(tx, &req.server_id).await?);
                let mut ops = active_ops(tx, &req.server_id).await?;
                converge(tx, &mut server, &mut ops, now).await?;
                let Some(current) = server.clone() else {
                    return Err(StoreError::NotFound { what: format!("server {}", req.server_id) });
                };
                let admission = admit(current.status, &ops, req.kind).map_err(|r| match r {
                    crate::Refusal::InProgress { blocking, blocking_status, blocking_id } => {
                        StoreError::OperationInProgress { blocking, status: blocking_status, id: blocking_id }
                    }
                    crate::Refusal::InvalidState(e) => StoreError::Invalid(e),
                })?;
                for op in ops.iter_mut().filter(|o| admission.cancel.contains(&o.id)) {
                    let why = format!("cancelled by {} operation {}", req.kind, req.new_id);
                    finish(tx, op, OpStatus::Cancelled, Some("cancelled"), Some(why), server.as_ref(), now).await?;
                }
                ops.retain(|o| !o.status.is_terminal());
                let seq: i64 = sqlx::query_scalar(&$q(
                    "INSERT INTO operations (id, server_id, kind, status, origin, created_at) VALUES (?, ?, ?, 'pending', ?, ?) RETURNING seq",
                ))
                .bind(&req.new_id)
                .bind(&req.server_id.0)
                .bind(req.kind.as_str())
                .bind(req.origin.as_str())
                .bind(now)
                .fetch_one(&mut **tx)
                .await?;
                let mut op = Operation {
                    id: req.new_id.clone(),
                    server_id: req.server_id.clone(),
                    kind: req.kind,
                    status: OpStatus::Pending,
                    phase: None,
                    origin: req.origin,
                    seq,
                    attempts: 0,
                    next_attempt_at: None,
                    error_code: None,
                    error: None,
                    created_at: now,
                    started_at: None,
                    finished_at: None,
                };
                if req.fresh_world && req.kind == OpKind::Start {
                    // The operator gives up the world on the lost node:
                    // the server may be placed anywhere from now on.
                    sqlx::query(&$q("UPDATE servers SET home_node = NULL WHERE id = ?")).bind(&req.server_id.0).execute(&mut **tx).await?;
                    if let Some(s) = server.as_mut() {
                        s.home_node = None;
                    }
                }
                if admission.begin_now {
                    begin_op(tx, &mut op, &mut server, now).await?;
                }
                let after = match &server {
                    Some(s) => s.clone(),
                    None => Server { status: ServerStatus::Deleted, ..current },
                };
                Ok((op, after))
            }

            /// Settles and begins a server's operations inside `tx`.
            pub(crate) async fn advance_tx(tx: &mut Tx, id: &ServerId, now: Millis) -> Result<Vec<Operation>, StoreError> {
                let mut server = status_of(tx, id).await?;
                let mut ops = active_ops(tx, id).await?;
                if ops.is_empty() {
                    return Ok(vec![]);
                }
                converge(tx, &mut server, &mut ops, now).await
            }

            impl $Store {
                pub(crate) async fn ops_get(&self, id: &str) -> Result<Option<Operation>, StoreError> {
                    let row = sqlx::query(&$q(&format!("SELECT {OP_COLS} FROM operations WHERE id = ?")))
                        .bind(id)
                        .fetch_optional(&self.read)
                        .await?;
                    row.as_ref().map(op_from_row).transpose()
                }

                pub(crate) async fn ops_list(&self, f: &OpFilter) -> Result<Vec<Operation>, StoreError> {
                    let active = if f.active_only { " AND status IN ('pending', 'running')" } else { "" };
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {OP_COLS} FROM operations WHERE (? IS NULL OR server_id = ?) AND seq > ?{active} ORDER BY seq LIMIT ?"
                    )))
                    .bind(f.server_id.as_ref().map(|s| s.0.clone()))
                    .bind(f.server_id.as_ref().map(|s| s.0.clone()))
                    .bind(f.after.unwrap_or(0))
                    .bind(f.limit.clamp(1, 1000) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(op_from_row).collect()
                }

                pub(crate) async fn ops_worklist(&self, window_start: Millis, with_active: bool) -> Result<OpsWork, StoreError> {
                    let mut conn = self.read.acquire().await?;
                    // Unfinished operations with what settling them depends
                    // on, in one read, so the executor writes only where
                    // something would change.
                    let op_cols: String = OP_COLS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ");
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {op_cols}, s.status AS s_status, s.attempts AS s_attempts, s.next_attempt_at AS s_next, \
                         s.last_error AS s_error FROM operations o LEFT JOIN servers s ON s.id = o.server_id AND s.status <> 'deleted' \
                         WHERE o.status IN ('pending', 'running') AND (? OR o.server_id IN (SELECT id FROM servers WHERE status = 'crashed')) \
                         ORDER BY o.server_id, o.seq"
                    )))
                    .bind(with_active)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut active_ops: Vec<crate::ActiveOps> = Vec::new();
                    for r in &rows {
                        let op = op_from_row(r)?;
                        if active_ops.last().is_none_or(|a| a.server_id != op.server_id) {
                            let status: Option<String> = r.try_get("s_status")?;
                            let server = match status {
                                None => None,
                                Some(st) => Some(berth_core::operation::ServerFacts {
                                    status: ServerStatus::parse(&st).ok_or_else(|| corrupt("server status", &st))?,
                                    attempts: r.try_get::<i64, _>("s_attempts")? as u32,
                                    next_attempt_at: r.try_get("s_next")?,
                                    last_error: r.try_get("s_error")?,
                                }),
                            };
                            active_ops.push(crate::ActiveOps { server_id: op.server_id.clone(), server, ops: Vec::new() });
                        }
                        active_ops.last_mut().expect("pushed above").ops.push(op);
                    }
                    let active: std::collections::HashSet<&str> = active_ops.iter().map(|a| a.server_id.0.as_str()).collect();
                    let crashed_rows = sqlx::query(&format!(
                        "SELECT {SERVER_COLS} FROM servers WHERE status = 'crashed' AND restart_policy = 'on-failure' ORDER BY id"
                    ))
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut crashed = Vec::new();
                    for r in &crashed_rows {
                        let s = server_from_row(r)?;
                        if active.contains(s.id.0.as_str()) {
                            continue;
                        }
                        let n: i64 = sqlx::query_scalar(&$q(
                            "SELECT COUNT(*) FROM operations WHERE server_id = ? AND origin = 'restart_policy' AND created_at >= ? \
                             AND seq > COALESCE((SELECT MAX(seq) FROM operations WHERE server_id = ? AND origin = 'user' \
                             AND kind IN ('start', 'restart')), 0)",
                        ))
                        .bind(&s.id.0)
                        .bind(window_start)
                        .bind(&s.id.0)
                        .fetch_one(&mut *conn)
                        .await?;
                        crashed.push((s, n as u32));
                    }
                    let queued = sqlx::query(
                        "SELECT id, generation, memory_mib, queued_at, next_attempt_at, home_node FROM servers WHERE status = 'queued' ORDER BY queued_at, id",
                    )
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(berth_core::placement::QueuedServer {
                            server_id: ServerId(r.try_get("id")?),
                            generation: r.try_get::<i64, _>("generation")? as u64,
                            memory_mib: berth_core::MemMib(r.try_get::<i64, _>("memory_mib")? as u64),
                            queued_at: r.try_get::<Option<i64>, _>("queued_at")?.unwrap_or(0),
                            next_attempt_at: r.try_get("next_attempt_at")?,
                            home_node: r.try_get::<Option<String>, _>("home_node")?.map(berth_core::NodeId),
                        })
                    })
                    .collect::<Result<_, StoreError>>()?;
                    Ok(OpsWork { active: active_ops, crashed, queued })
                }

                pub(crate) async fn ops_fail_server(
                    &self,
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
                    let mut tx = self.begin().await?;
                    let done = sqlx::query(&$q(
                        "UPDATE servers SET status = 'failed', last_error = ?, queued_at = NULL, next_attempt_at = NULL, updated_at = ? \
                         WHERE id = ? AND generation = ? AND status = ?",
                    ))
                    .bind(error)
                    .bind(now)
                    .bind(&id.0)
                    .bind(generation as i64)
                    .bind(from.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if done == 1 {
                        insert_events_tx(&mut tx, std::slice::from_ref(event), now).await?;
                    }
                    tx.commit().await?;
                    Ok(done == 1)
                }

                pub(crate) async fn ops_set_restart_at(&self, id: &ServerId, generation: Generation, at: Millis) -> Result<(), StoreError> {
                    let mut tx = self.begin().await?;
                    sqlx::query(&$q("UPDATE servers SET next_attempt_at = ? WHERE id = ? AND generation = ? AND status = 'crashed'"))
                        .bind(at)
                        .bind(&id.0)
                        .bind(generation as i64)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(())
                }

                pub(crate) async fn ops_killing_on(&self, node: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError> {
                    let rows = sqlx::query(&$q(
                        "SELECT s.id, s.generation FROM servers s WHERE s.node_id = ? AND s.status = 'stopping' AND EXISTS \
                         (SELECT 1 FROM operations o WHERE o.server_id = s.id AND o.kind = 'kill' AND o.status = 'running') ORDER BY s.id",
                    ))
                    .bind(&node.0)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(|r| Ok((ServerId(r.try_get("id")?), r.try_get::<i64, _>("generation")? as u64))).collect()
                }

                pub(crate) async fn webhook_insert(&self, w: &Webhook) -> Result<Webhook, StoreError> {
                    let mut tx = self.begin().await?;
                    let after: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events").fetch_one(&mut *tx).await?;
                    sqlx::query(&$q(&format!("INSERT INTO webhooks ({WEBHOOK_COLS}) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)")))
                        .bind(&w.id)
                        .bind(&w.url)
                        .bind(&w.tenant)
                        .bind(serde_json::to_string(&w.events).expect("a list of strings serializes"))
                        .bind(&w.secret)
                        .bind(w.enabled)
                        .bind(after)
                        .bind(w.created_at)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(Webhook { after_seq: after, consecutive_failures: 0, ..w.clone() })
                }

                pub(crate) async fn webhook_list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StoreError> {
                    let rows = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE (? IS NULL OR tenant = ?) ORDER BY created_at, id")))
                        .bind(tenant)
                        .bind(tenant)
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map(webhook_from_row).collect()
                }

                pub(crate) async fn webhook_get(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
                    let row = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?"))).bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map(webhook_from_row).transpose()
                }

                pub(crate) async fn webhook_delete(&self, id: &str) -> Result<(), StoreError> {
                    let mut tx = self.begin().await?;
                    let n = sqlx::query(&$q("DELETE FROM webhooks WHERE id = ?")).bind(id).execute(&mut *tx).await?.rows_affected();
                    if n == 0 {
                        return Err(StoreError::NotFound { what: format!("webhook {id}") });
                    }
                    // Its log stays readable; what was still to send is dropped.
                    sqlx::query(&$q("UPDATE deliveries SET status = 'failed', last_error = 'webhook deleted' WHERE webhook_id = ? AND status = 'pending'"))
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(())
                }

                pub(crate) async fn webhook_set_enabled(&self, id: &str, enabled: bool) -> Result<Webhook, StoreError> {
                    let mut tx = self.begin().await?;
                    let n = sqlx::query(&$q("UPDATE webhooks SET enabled = ?, consecutive_failures = 0 WHERE id = ?"))
                        .bind(enabled)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n == 0 {
                        return Err(StoreError::NotFound { what: format!("webhook {id}") });
                    }
                    let row = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?"))).bind(id).fetch_one(&mut *tx).await?;
                    tx.commit().await?;
                    webhook_from_row(&row)
                }

                pub(crate) async fn notify_fan_out(&self, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError> {
                    let mut tx = self.begin().await?;
                    let cursor: i64 = sqlx::query_scalar(&format!("SELECT seq FROM notify_cursor WHERE id = 1{}", $lock)).fetch_one(&mut *tx).await?;
                    let hooks = sqlx::query(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE enabled = TRUE"))
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(webhook_from_row)
                        .collect::<Result<Vec<_>, _>>()?;
                    if hooks.is_empty() && !email {
                        // Nobody to tell: the cursor moves past every event
                        // without reading them (a webhook made later starts
                        // after the newest event anyway).
                        let last: Option<i64> = sqlx::query_scalar(&$q("SELECT MAX(seq) FROM events WHERE seq > ?")).bind(cursor).fetch_one(&mut *tx).await?;
                        let Some(last) = last else { return Ok(0) };
                        sqlx::query(&$q("UPDATE notify_cursor SET seq = ? WHERE id = 1")).bind(last).execute(&mut *tx).await?;
                        tx.commit().await?;
                        return Ok((last - cursor).min(limit as i64).max(0) as usize);
                    }
                    let rows = sqlx::query(&$q(
                        "SELECT e.seq, e.at, e.kind, e.server_id, e.node_id, e.message, s.tenant FROM events e \
                         LEFT JOIN servers s ON s.id = e.server_id WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                    ))
                    .bind(cursor)
                    .bind(limit.max(1) as i64)
                    .fetch_all(&mut *tx)
                    .await?;
                    if rows.is_empty() {
                        return Ok(0);
                    }
                    let mut last = cursor;
                    for r in &rows {
                        let event = Event {
                            seq: r.try_get("seq")?,
                            at: r.try_get("at")?,
                            kind: r.try_get("kind")?,
                            server_id: r.try_get::<Option<String>, _>("server_id")?.map(ServerId),
                            node_id: r.try_get::<Option<String>, _>("node_id")?.map(NodeId),
                            message: r.try_get("message")?,
                        };
                        let tenant: Option<String> = r.try_get("tenant")?;
                        last = event.seq;
                        for target in targets(&event, tenant.as_deref(), &hooks, email) {
                            let (id, channel, webhook) = match &target {
                                Target::Webhook(w) => (format!("{w}.{}", event.seq), "webhook", Some(w.clone())),
                                Target::Email => (format!("email.{}", event.seq), "email", None),
                            };
                            sqlx::query(&$q(
                                "INSERT INTO deliveries (id, channel, webhook_id, event_seq, event_kind, tenant, status, attempts, \
                                 next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) ON CONFLICT (id) DO NOTHING",
                            ))
                            .bind(&id)
                            .bind(channel)
                            .bind(webhook)
                            .bind(event.seq)
                            .bind(&event.kind)
                            .bind(&tenant)
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                    sqlx::query(&$q("UPDATE notify_cursor SET seq = ? WHERE id = 1")).bind(last).execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(rows.len())
                }

                pub(crate) async fn notify_due(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryJob>, StoreError> {
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {DELIVERY_COLS}, e.at AS e_at, e.server_id AS e_server, e.node_id AS e_node, e.message AS e_message \
                         FROM deliveries d JOIN events e ON e.seq = d.event_seq \
                         WHERE d.status = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.id LIMIT ?"
                    )))
                    .bind(now)
                    .bind(limit.max(1) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    for r in &rows {
                        let delivery = delivery_from_row(r)?;
                        let event = Event {
                            seq: delivery.event_seq,
                            at: r.try_get("e_at")?,
                            kind: delivery.event_kind.clone(),
                            server_id: r.try_get::<Option<String>, _>("e_server")?.map(ServerId),
                            node_id: r.try_get::<Option<String>, _>("e_node")?.map(NodeId),
                            message: r.try_get("e_message")?,
                        };
                        let webhook = match &delivery.webhook_id {
                            Some(w) => self.webhook_get(w).await?,
                            None => None,
                        };
                        out.push(DeliveryJob { delivery, event, webhook });
                    }
                    Ok(out)
                }

                pub(crate) async fn notify_record(
                    &self,
                    id: &str,
                    outcome: &DeliveryOutcome,
                    policy: &DeliveryPolicy,
                    random: u64,
                    now: Millis,
                ) -> Result<(), StoreError> {
                    let mut tx = self.begin().await?;
                    let row = sqlx::query(&$q(&format!("SELECT {DELIVERY_COLS} FROM deliveries d WHERE d.id = ?{}", $lock)))
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or_else(|| StoreError::NotFound { what: format!("delivery {id}") })?;
                    let d = delivery_from_row(&row)?;
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
                    sqlx::query(&$q(
                        "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status = ?, last_error = ?, delivered_at = ? WHERE id = ?",
                    ))
                    .bind(status)
                    .bind(attempts as i64)
                    .bind(next)
                    .bind(last_status.map(|s| s as i64))
                    .bind(&error)
                    .bind(if ok { Some(now) } else { None })
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    if let (Some(wid), false) = (&d.webhook_id, matches!(outcome, DeliveryOutcome::Abandon { .. })) {
                        let row = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?{}", $lock)))
                            .bind(wid)
                            .fetch_optional(&mut *tx)
                            .await?;
                        if let Some(row) = row {
                            let w = webhook_from_row(&row)?;
                            let failures = if ok { 0 } else { w.consecutive_failures + 1 };
                            let disable = !ok && w.enabled && failures >= policy.disable_after;
                            sqlx::query(&$q("UPDATE webhooks SET consecutive_failures = ?, enabled = ? WHERE id = ?"))
                                .bind(failures as i64)
                                .bind(w.enabled && !disable)
                                .bind(wid)
                                .execute(&mut *tx)
                                .await?;
                            if disable {
                                sqlx::query(&$q(
                                    "UPDATE deliveries SET status = 'failed', last_error = 'webhook disabled' WHERE webhook_id = ? AND status = 'pending'",
                                ))
                                .bind(wid)
                                .execute(&mut *tx)
                                .await?;
                                let ev = NewEvent {
                                    kind: "webhook_disabled",
                                    server_id: None,
                                    node_id: None,
                                    message: format!("webhook {wid} ({}) disabled after {failures} failed attempts in a row", w.url),
                                };
                                insert_events_tx(&mut tx, std::slice::from_ref(&ev), now).await?;
                            }
                        }
                    }
                    tx.commit().await?;
                    Ok(())
                }

                pub(crate) async fn notify_list(&self, f: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {DELIVERY_COLS} FROM deliveries d WHERE (? IS NULL OR d.webhook_id = ?) AND (? IS NULL OR d.channel = ?) \
                         AND (? IS NULL OR d.tenant = ?) ORDER BY d.event_seq DESC, d.id LIMIT ?"
                    )))
                    .bind(&f.webhook_id)
                    .bind(&f.webhook_id)
                    .bind(&f.channel)
                    .bind(&f.channel)
                    .bind(&f.tenant)
                    .bind(&f.tenant)
                    .bind(f.limit.clamp(1, 1000) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(delivery_from_row).collect()
                }
            }
        }
    };
}

