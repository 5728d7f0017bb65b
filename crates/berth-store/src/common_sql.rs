//! The store code both backends share, written once.
//!
//! `store_common!` expands inside `sqlite.rs` and `postgres.rs` into the
//! column lists, row decoders and transaction helpers their `Store` impls
//! use (and `ops_sql.rs` builds on). SQL is written with `?` placeholders
//! and passed through the backend's `$q` (identity on SQLite, `$n`
//! numbering on PostgreSQL, so no placeholder may be reused: bind twice);
//! `$lock` is ` FOR UPDATE` where writers are concurrent. Nothing here
//! awaits foreign I/O inside a transaction.

macro_rules! store_common {
    ($Db:ty, $DbRow:ty, $q:path, $lock:expr) => {
        const SERVER_COLS: &str = "id, tenant, name, template, memory_mib, config, status, node_id, generation, port, last_exit, \
             queued_at, attempts, next_attempt_at, last_error, used_mib, created_at, updated_at, stop_after_ms, stateless, plan, price_per_gib_hour, home_node, \
             restart_policy";

        const NODE_COLS: &str = "id, name, address, driver, total_mib, system_reserved_mib, cpu_cores, status, \
             max_concurrent_starts, port_min, port_max, epoch, sync_seq, last_sync_at, registered_at, host_total_mib, host_available_mib, \
             disk_total_mib, disk_used_mib, disk_pressure, drain_deadline";

        impl crate::cols::Cols for $DbRow {
            fn text(&self, col: &str) -> Result<String, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                Ok(self.try_get(col)?)
            }
        }

        /// Columns of the queue read (the planner orders the queue itself).
        #[allow(dead_code)]
        const QUEUED_COLS: &str = "id, generation, memory_mib, queued_at, next_attempt_at, home_node";

        /// What reconciling a sync needs of each placed server.
        const PLACED_COLS: &str = "id, name, node_id, status, generation, attempts, used_mib";

        fn placed_from_row(r: &impl crate::cols::Cols) -> Result<berth_core::reconcile::Placed, StoreError> {
            let status: String = r.text("status")?;
            Ok(berth_core::reconcile::Placed {
                id: ServerId(r.text("id")?),
                name: r.text("name")?,
                node_id: r.opt_text("node_id")?.map(NodeId),
                status: ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?,
                generation: r.int("generation")? as u64,
                attempts: r.int("attempts")? as u32,
                used_mib: r.opt_int("used_mib")?.map(|m| MemMib(m as u64)),
            })
        }

        const RES_COLS: &str = "server_id, generation, node_id, memory_mib, port, state, created_at";

        const SESSION_COLS: &str = "id, server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at, ended_at, end_reason";

        /// Columns of the queue read: a node's rows summed up (memory,
        /// pending count, ports as text `p1,p2,…`, built by `$ports_agg`).
        fn queue_snapshot_sql(ports_agg: &str) -> (String, String, &'static str) {
            (
                format!("SELECT {NODE_COLS} FROM nodes"),
                format!(
                    "SELECT node_id, CAST(SUM(memory_mib) AS BIGINT) AS reserved, \
                     CAST(SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS BIGINT) AS pending, {ports_agg} AS ports \
                     FROM reservations GROUP BY node_id"
                ),
                "SELECT id, generation, memory_mib, queued_at, next_attempt_at, home_node FROM servers WHERE status = 'queued'",
            )
        }

        fn queue_snapshot_from<R: crate::cols::Cols>(nodes: &[R], totals: &[R], queued: &[R]) -> Result<QueueSnapshot, StoreError> {
            let mut by_node: HashMap<String, (u64, u32, Vec<u16>)> = HashMap::new();
            for r in totals {
                let ports: Option<String> = r.opt_text("ports")?;
                let ports = ports
                    .unwrap_or_default()
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.trim().parse::<u16>().map_err(|e| corrupt("reservation port", e)))
                    .collect::<Result<Vec<_>, _>>()?;
                let reserved = r.int("reserved")? as u64;
                let pending = r.int("pending")? as u32;
                by_node.insert(r.text("node_id")?, (reserved, pending, ports));
            }
            let capacities = nodes
                .iter()
                .map(|row| {
                    let n = node_from_row(row)?;
                    let (reserved, pending, ports) = by_node.remove(&n.id.0).unwrap_or_default();
                    Ok(berth_core::admission::NodeCapacity::from_totals(&n, MemMib(reserved), pending, ports))
                })
                .collect::<Result<_, StoreError>>()?;
            let queued = queued
                .iter()
                .map(|r| {
                    Ok(berth_core::placement::QueuedServer {
                        server_id: ServerId(r.text("id")?),
                        generation: r.int("generation")? as u64,
                        memory_mib: MemMib(r.int("memory_mib")? as u64),
                        queued_at: r.opt_int("queued_at")?.unwrap_or(0),
                        next_attempt_at: r.opt_int("next_attempt_at")?,
                        home_node: r.opt_text("home_node")?.map(NodeId),
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            Ok(QueueSnapshot { capacities, queued })
        }

        fn corrupt(what: &str, v: impl std::fmt::Display) -> StoreError {
            StoreError::Corrupt(format!("{what}: {v}"))
        }

        fn server_from_row(r: &impl crate::cols::Cols) -> Result<Server, StoreError> {
            let status: String = r.text("status")?;
            let config: String = r.text("config")?;
            let last_exit: Option<String> = r.opt_text("last_exit")?;
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
                restart_policy: {
                    let p: String = r.text("restart_policy")?;
                    berth_core::restart::RestartPolicy::parse(&p).ok_or_else(|| corrupt("restart policy", &p))?
                },
                created_at: r.int("created_at")?,
                updated_at: r.int("updated_at")?,
                stop_after_ms: r.int("stop_after_ms")?,
                stateless: r.int("stateless")? != 0,
                plan: r.text("plan")?,
                price_per_gib_hour: r.int("price_per_gib_hour")?,
                home_node: r.opt_text("home_node")?.map(NodeId),
            })
        }

        fn node_from_row(r: &impl crate::cols::Cols) -> Result<Node, StoreError> {
            let status: String = r.text("status")?;
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

        fn reservation_from_row(r: &impl crate::cols::Cols) -> Result<Reservation, StoreError> {
            let state: String = r.text("state")?;
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

        fn token_from_row(r: &$DbRow) -> Result<TokenRecord, StoreError> {
            let kind: String = r.try_get("kind")?;
            Ok(TokenRecord {
                id: r.try_get("id")?,
                hash: r.try_get("hash")?,
                kind: TokenKind::parse(&kind).ok_or_else(|| corrupt("token kind", &kind))?,
                tenant: r.try_get("tenant")?,
                created_at: r.try_get("created_at")?,
            })
        }

        fn session_from_row(r: &$DbRow) -> Result<BillingSession, StoreError> {
            Ok(BillingSession {
                id: r.try_get("id")?,
                server_id: ServerId(r.try_get("server_id")?),
                tenant: r.try_get("tenant")?,
                node_id: NodeId(r.try_get("node_id")?),
                generation: r.try_get::<i64, _>("generation")? as u64,
                memory_mib: MemMib(r.try_get::<i64, _>("memory_mib")? as u64),
                plan: r.try_get("plan")?,
                price_per_gib_hour: r.try_get("price_per_gib_hour")?,
                started_at: r.try_get("started_at")?,
                ended_at: r.try_get("ended_at")?,
                end_reason: r.try_get("end_reason")?,
            })
        }

        fn lease_from_row(r: &$DbRow) -> Result<LeaderLease, StoreError> {
            Ok(LeaderLease { holder: r.try_get("holder")?, epoch: r.try_get::<i64, _>("epoch")? as u64, expires_at: r.try_get("expires_at")? })
        }

        fn is_unique_violation(e: &sqlx::Error) -> bool {
            matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
        }

        async fn insert_events_tx(tx: &mut Transaction<'_, $Db>, events: &[NewEvent], now: Millis) -> Result<(), StoreError> {
            for e in events {
                sqlx::query(&$q("INSERT INTO events (at, kind, server_id, node_id, message) VALUES (?, ?, ?, ?, ?)"))
                    .bind(now)
                    .bind(e.kind)
                    .bind(e.server_id.as_ref().map(|s| s.0.as_str()))
                    .bind(e.node_id.as_ref().map(|n| n.0.as_str()))
                    .bind(&e.message)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        async fn server_by_id_tx(tx: &mut Transaction<'_, $Db>, id: &ServerId) -> Result<Server, StoreError> {
            let row = sqlx::query(&$q(&format!("SELECT {SERVER_COLS} FROM servers WHERE id = ? AND status <> 'deleted'{}", $lock)))
                .bind(&id.0)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or_else(|| StoreError::NotFound { what: format!("server {id}") })?;
            server_from_row(&row)
        }

        /// Moves a server to `to` if it still has `generation` and `from`; returns
        /// whether it did. Every status write derived from a report goes through a
        /// conditional update like this one (L3 fencing).
        async fn transition_tx(
            tx: &mut Transaction<'_, $Db>,
            id: &ServerId,
            generation: u64,
            from: ServerStatus,
            to: ServerStatus,
            now: Millis,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query(&$q("UPDATE servers SET status = ?, updated_at = ? WHERE id = ? AND generation = ? AND status = ?"))
                .bind(to.as_str())
                .bind(now)
                .bind(&id.0)
                .bind(generation as i64)
                .bind(from.as_str())
                .execute(&mut **tx)
                .await?
                .rows_affected();
            Ok(done == 1)
        }

        async fn release_tx(tx: &mut Transaction<'_, $Db>, id: &ServerId, generation: u64) -> Result<(), StoreError> {
            sqlx::query(&$q("DELETE FROM reservations WHERE server_id = ? AND generation = ?"))
                .bind(&id.0)
                .bind(generation as i64)
                .execute(&mut **tx)
                .await?;
            sqlx::query(&$q("UPDATE servers SET node_id = NULL, port = NULL, used_mib = NULL WHERE id = ? AND generation = ?"))
                .bind(&id.0)
                .bind(generation as i64)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        async fn ledger_tx(tx: &mut Transaction<'_, $Db>, at: Millis, kind: &str, session_id: i64, server: &ServerId, detail: &str) -> Result<(), StoreError> {
            sqlx::query(&$q("INSERT INTO ledger (at, kind, session_id, server_id, detail) VALUES (?, ?, ?, ?, ?)"))
                .bind(at)
                .bind(kind)
                .bind(session_id)
                .bind(&server.0)
                .bind(detail)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// Opens the billing session of a server generation at `at` (L4: the unique
        /// index refuses a second open session). `kind` is the ledger kind.
        async fn open_session_tx(tx: &mut Transaction<'_, $Db>, server: &ServerId, generation: u64, at: Millis, kind: &str) -> Result<(), StoreError> {
            let row = sqlx::query(
                &$q("INSERT INTO billing_sessions (server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at) \
                 SELECT id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, ? FROM servers \
                 WHERE id = ? AND generation = ? AND node_id IS NOT NULL RETURNING id"),
            )
            .bind(at)
            .bind(&server.0)
            .bind(generation as i64)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = row {
                let id: i64 = row.try_get("id")?;
                ledger_tx(tx, at, kind, id, server, &format!("generation {generation}")).await?;
            }
            Ok(())
        }

        /// Closes the server's open session, if any, at `at` (never before it
        /// started) with `reason`.
        async fn close_session_tx(tx: &mut Transaction<'_, $Db>, server: &ServerId, at: Millis, reason: EndReason) -> Result<(), StoreError> {
            let row = sqlx::query(
                &$q("UPDATE billing_sessions SET ended_at = CASE WHEN started_at > ? THEN started_at ELSE ? END, end_reason = ? \
                 WHERE server_id = ? AND ended_at IS NULL RETURNING id, ended_at"),
            )
            .bind(at)
            .bind(at)
            .bind(reason.as_str())
            .bind(&server.0)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = row {
                let id: i64 = row.try_get("id")?;
                let ended: i64 = row.try_get("ended_at")?;
                ledger_tx(tx, ended, "closed", id, server, reason.as_str()).await?;
            }
            Ok(())
        }

        /// Where a backfilled session starts: the end of the session the node's
        /// disconnect closed, if this generation has one; otherwise `now`.
        async fn backfill_start_tx(tx: &mut Transaction<'_, $Db>, server: &ServerId, generation: u64, now: Millis) -> Result<Millis, StoreError> {
            let row = sqlx::query(
                &$q("SELECT ended_at, end_reason FROM billing_sessions WHERE server_id = ? AND generation = ? ORDER BY started_at DESC, id DESC LIMIT 1"),
            )
            .bind(&server.0)
            .bind(generation as i64)
            .fetch_optional(&mut **tx)
            .await?;
            Ok(match row {
                Some(r) if r.try_get::<Option<String>, _>("end_reason")?.as_deref() == Some(EndReason::NodeUnreachable.as_str()) => {
                    r.try_get::<Option<i64>, _>("ended_at")?.unwrap_or(now)
                }
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

        async fn apply_verdict_tx(tx: &mut Transaction<'_, $Db>, v: &Verdict, now: Millis) -> Result<Option<NewEvent>, StoreError> {
            Ok(match v {
                Verdict::NodeUnreachable { node_id, last_sync_at } => {
                    let n = sqlx::query(&$q("UPDATE nodes SET status = 'unreachable' WHERE id = ? AND status IN ('ready', 'draining') AND COALESCE(last_sync_at, registered_at) = ?"))
                        .bind(&node_id.0)
                        .bind(*last_sync_at)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    (n == 1).then(|| NewEvent { kind: "node_unreachable", server_id: None, node_id: Some(node_id.clone()), message: format!("node {node_id} stopped renewing its lease") })
                }
                Verdict::ServerUnknown { server_id, generation, last_alive } => {
                    let n = sqlx::query(&$q("UPDATE servers SET status = 'unknown', updated_at = ? WHERE id = ? AND generation = ? AND status IN ('starting', 'running')"))
                        .bind(now)
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    if n == 1 {
                        close_session_tx(tx, server_id, *last_alive, EndReason::NodeUnreachable).await?;
                    }
                    (n == 1).then(|| NewEvent { kind: "server_unknown", server_id: Some(server_id.clone()), node_id: None, message: format!("server {server_id} is unknown: its node stopped renewing; billing stopped") })
                }
                Verdict::ServerLost { server_id, generation, node_id, last_alive } => {
                    let still_gone: Option<i64> = sqlx::query_scalar(&$q("SELECT CAST(1 AS BIGINT) FROM nodes WHERE id = ? AND status IN ('unreachable', 'lost')"))
                        .bind(&node_id.0)
                        .fetch_optional(&mut **tx)
                        .await?;
                    if still_gone.is_none() {
                        return Ok(None);
                    }
                    let row = sqlx::query(&$q("SELECT status, stateless, name FROM servers WHERE id = ? AND generation = ?"))
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .fetch_optional(&mut **tx)
                        .await?;
                    let Some(row) = row else { return Ok(None) };
                    let status: String = row.try_get("status")?;
                    let stateless: i64 = row.try_get("stateless")?;
                    let name: String = row.try_get("name")?;
                    let from = ServerStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("server status {status}")))?;
                    if !from.holds_reservation() {
                        return Ok(None);
                    }
                    let to = if from == ServerStatus::Stopping { ServerStatus::Stopped } else { ServerStatus::Crashed };
                    let exit = LastExit { reason: "node_lost".into(), code: None };
                    // A stateful server's world is on the lost node: it may start
                    // again there, or elsewhere only with an explicit fresh world.
                    let (home, hint) = if stateless == 0 && to == ServerStatus::Crashed {
                        (Some(node_id.0.clone()), Some(format!("node {node_id} was lost with this server's world; it restarts there when the node returns, or start it elsewhere with --allow-fresh-world")))
                    } else {
                        (None, None)
                    };
                    sqlx::query(&$q("UPDATE servers SET status = ?, last_exit = ?, home_node = ?, last_error = ?, queued_at = NULL, updated_at = ? WHERE id = ? AND generation = ?"))
                        .bind(to.as_str())
                        .bind(serde_json::to_string(&exit).expect("serializable"))
                        .bind(home)
                        .bind(hint)
                        .bind(now)
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .execute(&mut **tx)
                        .await?;
                    release_tx(tx, server_id, *generation).await?;
                    close_session_tx(tx, server_id, *last_alive, EndReason::NodeLost).await?;
                    // A session closed provisionally when the node went silent is
                    // final now: same end time, final reason.
                    let relabelled = sqlx::query(&$q("UPDATE billing_sessions SET end_reason = ? WHERE server_id = ? AND generation = ? AND end_reason = ? RETURNING id"))
                        .bind(EndReason::NodeLost.as_str())
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .bind(EndReason::NodeUnreachable.as_str())
                        .fetch_all(&mut **tx)
                        .await?;
                    for r in relabelled {
                        ledger_tx(tx, now, "closed_final", r.try_get("id")?, server_id, EndReason::NodeLost.as_str()).await?;
                    }
                    Some(NewEvent { kind: "server_lost", server_id: Some(server_id.clone()), node_id: Some(node_id.clone()), message: format!("server {name} was lost with node {node_id} (node_lost)") })
                }
                Verdict::NodeLost { node_id } => {
                    let n = sqlx::query(&$q("UPDATE nodes SET status = 'lost' WHERE id = ? AND status = 'unreachable'"))
                        .bind(&node_id.0)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    (n == 1).then(|| NewEvent { kind: "node_lost", server_id: None, node_id: Some(node_id.clone()), message: format!("node {node_id} is lost") })
                }
                Verdict::DrainDeadline { server_id, generation } => {
                    let n = sqlx::query(&$q("UPDATE servers SET status = 'stopping', updated_at = ? WHERE id = ? AND generation = ? AND status IN ('starting', 'running')"))
                        .bind(now)
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    (n == 1).then(|| NewEvent { kind: "server_stop_requested", server_id: Some(server_id.clone()), node_id: None, message: format!("server {server_id} stopping: its node's drain deadline passed") })
                }
            })
        }

        /// Pairs each change with the event the reconciler emitted for it, if any:
        /// usage updates carry no event, every other change carries exactly one.
        trait ZipEvents<'a> {
            fn zip_events(self, events: &'a [NewEvent]) -> Vec<(&'a Change, Option<&'a NewEvent>)>;
        }

        impl<'a> ZipEvents<'a> for std::slice::Iter<'a, Change> {
            fn zip_events(self, events: &'a [NewEvent]) -> Vec<(&'a Change, Option<&'a NewEvent>)> {
                let mut evs = events.iter();
                self.map(|c| match c {
                    Change::Usage { .. } => (c, None),
                    _ => (c, evs.next()),
                })
                .collect()
            }
        }

        /// Applies health verdicts (see `Store::apply_verdicts`) and settles
        /// the operations of the servers they changed, in `tx`.
        async fn apply_verdicts_tx(tx: &mut Transaction<'static, $Db>, verdicts: &[Verdict], now: Millis) -> Result<usize, StoreError> {
            let mut events = Vec::new();
            for v in verdicts {
                if let Some(e) = apply_verdict_tx(tx, v, now).await? {
                    events.push(e);
                }
            }
            insert_events_tx(tx, &events, now).await?;
            for server_id in events.iter().filter_map(|e| e.server_id.as_ref()) {
                ops_impl::advance_tx(tx, server_id, now).await?;
            }
            Ok(events.len())
        }

        /// The server a change is about, if it may settle an operation
        /// (memory use never does).
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

        async fn apply_change(
            tx: &mut Transaction<'_, $Db>,
            change: &Change,
            placed: &HashMap<&ServerId, &berth_core::reconcile::Placed>,
            now: Millis,
        ) -> Result<bool, StoreError> {
            let from = |id: &ServerId| placed.get(id).map(|s| s.status);
            Ok(match change {
                Change::Reconnected { server_id, generation } => {
                    let Some(from) = from(server_id) else { return Ok(false) };
                    let ok = transition_tx(tx, server_id, *generation, from, ServerStatus::Running, now).await?;
                    if ok {
                        // The instance ran on through the disconnect (same
                        // generation, still alive): bill from where billing stopped,
                        // with no gap and no overlap.
                        let start = backfill_start_tx(tx, server_id, *generation, now).await?;
                        open_session_tx(tx, server_id, *generation, start, "backfilled").await?;
                    }
                    ok
                }
                Change::Confirmed { server_id, generation } => {
                    let Some(from) = from(server_id) else { return Ok(false) };
                    let ok = transition_tx(tx, server_id, *generation, from, ServerStatus::Running, now).await?;
                    if ok {
                        open_session_tx(tx, server_id, *generation, now, "opened").await?;
                        sqlx::query(&$q("UPDATE reservations SET state = 'active' WHERE server_id = ? AND generation = ?"))
                            .bind(&server_id.0)
                            .bind(*generation as i64)
                            .execute(&mut **tx)
                            .await?;
                        sqlx::query(&$q("UPDATE servers SET attempts = 0, next_attempt_at = NULL, last_error = NULL, last_exit = NULL WHERE id = ?"))
                            .bind(&server_id.0)
                            .execute(&mut **tx)
                            .await?;
                    }
                    ok
                }
                Change::Ended { server_id, generation, to, exit, billed_until } => {
                    let Some(from) = from(server_id) else { return Ok(false) };
                    let ok = transition_tx(tx, server_id, *generation, from, *to, now).await?;
                    if ok {
                        close_session_tx(tx, server_id, *billed_until, ended_reason(*to)).await?;
                        release_tx(tx, server_id, *generation).await?;
                        sqlx::query(&$q("UPDATE servers SET last_exit = ?, queued_at = NULL WHERE id = ?"))
                            .bind(serde_json::to_string(exit).expect("serializable"))
                            .bind(&server_id.0)
                            .execute(&mut **tx)
                            .await?;
                    }
                    ok
                }
                Change::Requeue { server_id, generation, attempts, next_attempt_at, error } => {
                    let Some(from) = from(server_id) else { return Ok(false) };
                    let ok = transition_tx(tx, server_id, *generation, from, ServerStatus::Queued, now).await?;
                    if ok {
                        close_session_tx(tx, server_id, now, EndReason::Crashed).await?;
                        release_tx(tx, server_id, *generation).await?;
                        // The server keeps its place in the queue (queued_at).
                        sqlx::query(&$q("UPDATE servers SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?"))
                            .bind(*attempts as i64)
                            .bind(*next_attempt_at)
                            .bind(error)
                            .bind(&server_id.0)
                            .execute(&mut **tx)
                            .await?;
                    }
                    ok
                }
                Change::Fail { server_id, generation, error } => {
                    let Some(from) = from(server_id) else { return Ok(false) };
                    let ok = transition_tx(tx, server_id, *generation, from, ServerStatus::Failed, now).await?;
                    if ok {
                        close_session_tx(tx, server_id, now, EndReason::Crashed).await?;
                        release_tx(tx, server_id, *generation).await?;
                        sqlx::query(&$q("UPDATE servers SET last_error = ?, queued_at = NULL WHERE id = ?"))
                            .bind(error)
                            .bind(&server_id.0)
                            .execute(&mut **tx)
                            .await?;
                    }
                    ok
                }
                Change::Usage { server_id, generation, used_mib } => {
                    sqlx::query(&$q("UPDATE servers SET used_mib = ? WHERE id = ? AND generation = ?"))
                        .bind(used_mib.0 as i64)
                        .bind(&server_id.0)
                        .bind(*generation as i64)
                        .execute(&mut **tx)
                        .await?;
                    true
                }
            })
        }
    };
}
