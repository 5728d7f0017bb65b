//! The PostgreSQL backend, for several control-plane replicas on one
//! database. Same schema and semantics as SQLite; what differs is
//! concurrency: writers are concurrent here, so every read that a write
//! decision depends on takes a row lock (`FOR UPDATE`), and the admission
//! commit locks the affected node rows in id order before re-checking their
//! reservation rows, so two committers can never both fit the same memory.
//! Migrations run under an advisory lock so replicas starting together do
//! not race. Transactions contain queries and pure calls only.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::admission::{recheck, NodeCapacity};
use berth_core::billing::EndReason;
use berth_core::health::Verdict;
use berth_core::placement::Placement;
use berth_core::reconcile::{Change, Reconciled};
use berth_core::{
    Event, LastExit, MemMib, Millis, NewEvent, Node, NodeId, NodeStatus, PortRange, Reservation, ReservationState, Server,
    ServerId, ServerStatus, TokenKind,
};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::{
    BillingSession, Decide, EventFilter, LeaderLease, LedgerEntry, NodeRegistration, NodeUsage, PlacementOutcome, QueueSnapshot, ReplicaInfo, Snapshot,
    Store, StoreError, SyncInput, TokenRecord,
};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (2, include_str!("../migrations/postgres/0002_cluster.sql")),
    (3, include_str!("../migrations/postgres/0003_fencing_billing.sql")),
    (4, include_str!("../migrations/postgres/0004_operations.sql")),
    (5, include_str!("../migrations/postgres/0005_volumes.sql")),
];

pub struct PostgresStore {
    write: PgPool,
    read: PgPool,
    fence: std::sync::Mutex<Option<(String, u64)>>,
}


store_common!(Postgres, PgRow, crate::ops_sql::numbered, " FOR UPDATE");
ops_store_impl!(PostgresStore, Postgres, crate::ops_sql::numbered, " FOR UPDATE");

impl PostgresStore {
    /// Connects to `url` and migrates the database. Acquiring a connection
    /// gives up after a few seconds, so requests fail fast (503) while the
    /// database is away instead of piling up.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        // Safety nets: a session left idle inside a transaction is ended, and
        // no statement waits for a lock forever.
        let opts = sqlx::postgres::PgConnectOptions::from_str(url)?
            .options([("idle_in_transaction_session_timeout", "10000"), ("lock_timeout", "10000")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(opts)
            .await?;
        migrate(&pool).await?;
        Ok(PostgresStore { write: pool.clone(), read: pool, fence: std::sync::Mutex::new(None) })
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.write.begin().await?)
    }
}

/// Key of the advisory lock that serializes migrations between replicas.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67;

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
    let result = migrate_locked(&mut conn).await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
    result
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)").execute(&mut *conn).await?;
    // Every missing version is applied, not only those above the highest:
    // migrations developed side by side may land out of order.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(&mut *conn).await?;
    let current = applied.iter().copied().max().unwrap_or(0);
    if let Some((latest, _)) = MIGRATIONS.last() {
        if current > *latest {
            return Err(StoreError::Corrupt(format!(
                "database schema version {current} is newer than this berth ({latest}); refusing to run"
            )));
        }
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)").bind(version).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}











#[async_trait]
impl Store for PostgresStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tokens (id, hash, kind, tenant, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&t.id)
            .bind(&t.hash)
            .bind(t.kind.as_str())
            .bind(&t.tenant)
            .bind(t.created_at)
            .execute(&self.write)
            .await
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("token {} exists", t.id)) } else { e.into() })?;
        Ok(())
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT id, hash, kind, tenant, created_at FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE kind = $1").bind(kind.as_str()).fetch_one(&self.read).await?;
        Ok(n as u64)
    }

    async fn register_node(&self, reg: &NodeRegistration, new_id: &NodeId, now: Millis) -> Result<Node, StoreError> {
        let mut tx = self.begin().await?;
        let existing = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE name = $1 FOR UPDATE"))
            .bind(&reg.name)
            .fetch_optional(&mut *tx)
            .await?;
        let id = match existing {
            Some(row) => {
                let node = node_from_row(&row)?;
                // A draining node stays draining across agent restarts; any
                // other status becomes ready because the agent is back.
                let status = if node.status == NodeStatus::Draining { NodeStatus::Draining } else { NodeStatus::Ready };
                sqlx::query(
                    "UPDATE nodes SET address = $1, driver = $2, total_mib = $3, system_reserved_mib = $4, cpu_cores = $5, \
                     status = $6, max_concurrent_starts = $7, port_min = $8, port_max = $9, epoch = epoch + 1, sync_seq = 0, \
                     last_sync_at = $10 WHERE id = $11",
                )
                .bind(&reg.address)
                .bind(&reg.driver)
                .bind(reg.total_mib.0 as i64)
                .bind(reg.system_reserved_mib.0 as i64)
                .bind(reg.cpu_cores as i64)
                .bind(status.as_str())
                .bind(reg.max_concurrent_starts as i64)
                .bind(reg.ports.min as i64)
                .bind(reg.ports.max as i64)
                .bind(now)
                .bind(&node.id.0)
                .execute(&mut *tx)
                .await?;
                insert_events_tx(
                    &mut tx,
                    &[NewEvent { kind: "node_registered", server_id: None, node_id: Some(node.id.clone()), message: format!("node {} re-registered", reg.name) }],
                    now,
                )
                .await?;
                node.id
            }
            None => {
                sqlx::query(&format!(
                    "INSERT INTO nodes ({NODE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 'ready', $8, $9, $10, 1, 0, $11, $12, 0, 0, 0, 0, 0, NULL)"
                ))
                .bind(&new_id.0)
                .bind(&reg.name)
                .bind(&reg.address)
                .bind(&reg.driver)
                .bind(reg.total_mib.0 as i64)
                .bind(reg.system_reserved_mib.0 as i64)
                .bind(reg.cpu_cores as i64)
                .bind(reg.max_concurrent_starts as i64)
                .bind(reg.ports.min as i64)
                .bind(reg.ports.max as i64)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                insert_events_tx(
                    &mut tx,
                    &[NewEvent { kind: "node_registered", server_id: None, node_id: Some(new_id.clone()), message: format!("node {} registered", reg.name) }],
                    now,
                )
                .await?;
                new_id.clone()
            }
        };
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1")).bind(&id.0).fetch_one(&mut *tx).await?;
        let node = node_from_row(&row)?;
        tx.commit().await?;
        Ok(node)
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name")).fetch_all(&self.read).await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn largest_allocatable(&self) -> Result<Option<MemMib>, StoreError> {
        let mib: Option<i64> = sqlx::query_scalar("SELECT CAST(MAX(total_mib - system_reserved_mib) AS BIGINT) FROM nodes WHERE status <> 'removed'")
            .fetch_one(&self.read)
            .await?;
        Ok(mib.map(|m| MemMib(m.max(0) as u64)))
    }

    async fn get_node(&self, id_or_name: &str) -> Result<Option<Node>, StoreError> {
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1 UNION ALL SELECT {NODE_COLS} FROM nodes WHERE name = $2 LIMIT 1"))
            .bind(id_or_name)
            .bind(id_or_name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    async fn set_node_status(&self, id: &NodeId, status: NodeStatus) -> Result<Node, StoreError> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE nodes SET status = $1 WHERE id = $2").bind(status.as_str()).bind(&id.0).execute(&mut *tx).await?;
        if n.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("node {id}") });
        }
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1")).bind(&id.0).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        node_from_row(&row)
    }

    async fn node_usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        let rows = sqlx::query("SELECT node_id, SUM(memory_mib)::BIGINT AS reserved, COUNT(*) AS n FROM reservations GROUP BY node_id")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeUsage {
                    node_id: NodeId(r.try_get("node_id")?),
                    reserved: MemMib(r.try_get::<i64, _>("reserved")? as u64),
                    servers: r.try_get::<i64, _>("n")? as u32,
                })
            })
            .collect()
    }

    async fn insert_server(&self, s: &Server, event: &NewEvent) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let res = sqlx::query(&format!(
            "INSERT INTO servers ({SERVER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, NULL, NULL, NULL, 0, NULL, NULL, NULL, $9, $10, $11, $12, $13, $14, NULL, $15)"
        ))
        .bind(&s.id.0)
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(&s.template)
        .bind(s.memory_mib.0 as i64)
        .bind(serde_json::to_string(&s.config).expect("a json map serializes"))
        .bind(s.status.as_str())
        .bind(s.generation as i64)
        .bind(s.created_at)
        .bind(s.updated_at)
        .bind(s.stop_after_ms)
        .bind(s.stateless as i64)
        .bind(&s.plan)
        .bind(s.price_per_gib_hour)
        .bind(s.restart_policy.as_str())
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("a server named {:?} already exists", s.name)));
            }
            other => {
                other?;
            }
        }
        insert_events_tx(&mut tx, std::slice::from_ref(event), s.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_server(&self, id_or_name: &str) -> Result<Option<Server>, StoreError> {
        let row = sqlx::query(&format!(
            // Two indexed lookups, the id first: `id = ? OR name = ?` scans
            // the table on SQLite.
            "SELECT {SERVER_COLS} FROM servers WHERE id = $1 AND status <> 'deleted' \
             UNION ALL SELECT {SERVER_COLS} FROM servers WHERE name = $2 AND status <> 'deleted' LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(server_from_row).transpose()
    }

    async fn list_servers(&self, tenant: Option<&str>) -> Result<Vec<Server>, StoreError> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted' AND tenant = $1 ORDER BY created_at, id"))
                    .bind(t)
                    .fetch_all(&self.read)
                    .await?
            }
            None => {
                sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted' ORDER BY created_at, id"))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.iter().map(server_from_row).collect()
    }

    async fn request_start(&self, id: &ServerId, now: Millis, allow_fresh_world: bool) -> Result<Server, StoreError> {
        let mut tx = self.begin().await?;
        let s = server_by_id_tx(&mut tx, id).await?;
        let to = s.status.on_start()?;
        if allow_fresh_world && s.home_node.is_some() {
            sqlx::query("UPDATE servers SET home_node = NULL WHERE id = $1").bind(&id.0).execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE servers SET status = $1, queued_at = $2, attempts = 0, next_attempt_at = NULL, last_error = NULL, updated_at = $3 \
             WHERE id = $4 AND status = $5",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(now)
        .bind(&id.0)
        .bind(s.status.as_str())
        .execute(&mut *tx)
        .await?;
        insert_events_tx(
            &mut tx,
            &[NewEvent { kind: "server_queued", server_id: Some(id.clone()), node_id: None, message: format!("server {} queued to start", s.name) }],
            now,
        )
        .await?;
        let s = server_by_id_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(s)
    }

    async fn request_stop(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let mut tx = self.begin().await?;
        let s = server_by_id_tx(&mut tx, id).await?;
        let to = s.status.on_stop()?;
        transition_tx(&mut tx, id, s.generation, s.status, to, now).await?;
        if to == ServerStatus::Stopped {
            sqlx::query("UPDATE servers SET queued_at = NULL, next_attempt_at = NULL WHERE id = $1").bind(&id.0).execute(&mut *tx).await?;
        }
        let message = if to == ServerStatus::Stopped {
            format!("server {} removed from the queue", s.name)
        } else {
            format!("server {} stopping", s.name)
        };
        insert_events_tx(&mut tx, &[NewEvent { kind: "server_stop_requested", server_id: Some(id.clone()), node_id: s.node_id.clone(), message }], now)
            .await?;
        let s = server_by_id_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(s)
    }

    async fn delete_server(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let mut tx = self.begin().await?;
        let s = server_by_id_tx(&mut tx, id).await?;
        let to = s.status.on_delete()?;
        transition_tx(&mut tx, id, s.generation, s.status, to, now).await?;
        sqlx::query("UPDATE servers SET queued_at = NULL, next_attempt_at = NULL WHERE id = $1").bind(&id.0).execute(&mut *tx).await?;
        insert_events_tx(
            &mut tx,
            &[NewEvent { kind: "server_deleted", server_id: Some(id.clone()), node_id: None, message: format!("server {} deleted", s.name) }],
            now,
        )
        .await?;
        tx.commit().await?;
        let mut s = s;
        s.status = to;
        Ok(s)
    }

    async fn queue_snapshot(&self) -> Result<QueueSnapshot, StoreError> {
        // One read transaction: nodes, their rows and the queue are one
        // consistent snapshot. The rows are summed in the database; the
        // committer re-checks every plan against the rows themselves.
        let mut tx = self.read.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let (nodes_sql, totals_sql, queued_sql) = queue_snapshot_sql("STRING_AGG(port::text, ',')");
        let nodes = sqlx::query(&nodes_sql).fetch_all(&mut *tx).await?;
        let totals = sqlx::query(&totals_sql).fetch_all(&mut *tx).await?;
        let queued = sqlx::query(queued_sql).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        queue_snapshot_from(&nodes, &totals, &queued)
    }

    async fn commit_placements(&self, plans: &[Placement], now: Millis) -> Result<Vec<PlacementOutcome>, StoreError> {
        let mut tx = self.begin().await?;
        let fence = self.fence.lock().expect("fence lock").clone();
        if let Some((holder, epoch)) = fence {
            // FOR SHARE: a replica taking over the lease waits for this commit.
            let row = sqlx::query("SELECT holder, epoch FROM leader WHERE id = 1 FOR SHARE").fetch_optional(&mut *tx).await?;
            let current = row.map(|r| -> Result<(String, i64), sqlx::Error> { Ok((r.try_get("holder")?, r.try_get("epoch")?)) }).transpose()?;
            if current != Some((holder.clone(), epoch as i64)) {
                return Err(StoreError::NotLeader { holder, epoch });
            }
        }
        // Capacity per node is derived from the rows inside this
        // transaction, then updated as plans are accepted, so every plan is
        // checked against everything committed before it (L1, L2).
        // Lock the affected node rows in id order: two committers (replicas)
        // touching the same node serialize here, and the fixed order rules
        // out deadlocks between them.
        let mut node_ids: Vec<&str> = plans.iter().map(|p| p.node_id.0.as_str()).collect();
        node_ids.sort_unstable();
        node_ids.dedup();
        sqlx::query("SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE").bind(&node_ids).fetch_all(&mut *tx).await?;
        let mut caps: HashMap<NodeId, NodeCapacity> = HashMap::new();
        let mut out = Vec::with_capacity(plans.len());
        for p in plans {
            let server = sqlx::query("SELECT name, status, generation FROM servers WHERE id = $1 FOR UPDATE")
                .bind(&p.server_id.0)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(server) = server else {
                out.push(PlacementOutcome::Stale);
                continue;
            };
            let status: String = server.try_get("status")?;
            let generation = server.try_get::<i64, _>("generation")? as u64;
            let name: String = server.try_get("name")?;
            if status != ServerStatus::Queued.as_str() || generation != p.expected_generation {
                out.push(PlacementOutcome::Stale);
                continue;
            }
            if !caps.contains_key(&p.node_id) {
                let Some(row) = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"))
                    .bind(&p.node_id.0)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    out.push(PlacementOutcome::Stale);
                    continue;
                };
                let node = node_from_row(&row)?;
                let rows = sqlx::query(&format!("SELECT {RES_COLS} FROM reservations WHERE node_id = $1"))
                    .bind(&p.node_id.0)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(reservation_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                caps.insert(p.node_id.clone(), NodeCapacity::from_rows(&node, &rows));
            }
            let cap = caps.get_mut(&p.node_id).expect("inserted above");
            if let Err(misfit) = recheck(cap, p) {
                out.push(PlacementOutcome::Rejected(misfit));
                continue;
            }
            let new_gen = p.new_generation();
            sqlx::query(&format!("INSERT INTO reservations ({RES_COLS}) VALUES ($1, $2, $3, $4, $5, 'pending', $6)"))
                .bind(&p.server_id.0)
                .bind(new_gen as i64)
                .bind(&p.node_id.0)
                .bind(p.memory_mib.0 as i64)
                .bind(p.port as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE servers SET status = 'starting', node_id = $1, generation = $2, port = $3, updated_at = $4 \
                 WHERE id = $5 AND generation = $6 AND status = 'queued'",
            )
            .bind(&p.node_id.0)
            .bind(new_gen as i64)
            .bind(p.port as i64)
            .bind(now)
            .bind(&p.server_id.0)
            .bind(p.expected_generation as i64)
            .execute(&mut *tx)
            .await?;
            cap.take(p.memory_mib, p.port);
            insert_events_tx(
                &mut tx,
                &[NewEvent {
                    kind: "server_placed",
                    server_id: Some(p.server_id.clone()),
                    node_id: Some(p.node_id.clone()),
                    message: format!("server {name} placed on node {} (generation {new_gen}, port {})", p.node_id, p.port),
                }],
                now,
            )
            .await?;
            out.push(PlacementOutcome::Committed { generation: new_gen });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn sync_node(&self, input: &SyncInput, now: Millis, decide: Decide) -> Result<(Node, Reconciled), StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1 FOR UPDATE"))
            .bind(&input.node_id.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound { what: format!("node {}", input.node_id) })?;
        let mut node = node_from_row(&row)?;
        if input.epoch != node.epoch {
            return Err(StoreError::StaleSync(format!("epoch {} is not the node's current epoch {}", input.epoch, node.epoch)));
        }
        if input.seq <= node.sync_seq {
            return Err(StoreError::StaleSync(format!("sequence {} is not after {}", input.seq, node.sync_seq)));
        }
        // A node heard from again is back, whatever the monitor concluded.
        let status = if matches!(node.status, NodeStatus::Unreachable | NodeStatus::Lost) { NodeStatus::Ready } else { node.status };
        let last_alive = node.last_sync_at.unwrap_or(node.registered_at);
        sqlx::query("UPDATE nodes SET sync_seq = $1, last_sync_at = $2, host_total_mib = $3, host_available_mib = $4, status = $5, disk_total_mib = $6, disk_used_mib = $7, disk_pressure = $8 WHERE id = $9")
            .bind(input.seq as i64)
            .bind(now)
            .bind(input.host_total_mib.0 as i64)
            .bind(input.host_available_mib.0 as i64)
            .bind(status.as_str())
            .bind(input.disk_total_mib as i64)
            .bind(input.disk_used_mib as i64)
            .bind(input.disk_pressure as i64)
            .bind(&node.id.0)
            .execute(&mut *tx)
            .await?;
        node.sync_seq = input.seq;
        node.last_sync_at = Some(now);
        node.host_total_mib = input.host_total_mib;
        node.host_available_mib = input.host_available_mib;
        if let Some(volumes) = &input.volumes {
            sqlx::query("UPDATE nodes SET volumes = $1 WHERE id = $2")
                .bind(serde_json::to_string(volumes).expect("serializable"))
                .bind(&node.id.0)
                .execute(&mut *tx)
                .await?;
        }
        node.status = status;
        node.disk_total_mib = input.disk_total_mib;
        node.disk_used_mib = input.disk_used_mib;
        node.disk_pressure = input.disk_pressure;

        let placed = sqlx::query(&format!(
            "SELECT {PLACED_COLS} FROM servers WHERE node_id = $1 AND status IN ('starting', 'running', 'stopping', 'unknown')"
        ))
        .bind(&node.id.0)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(placed_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let decided = decide(&placed, last_alive);
        let by_id: HashMap<&ServerId, &berth_core::reconcile::Placed> = placed.iter().map(|s| (&s.id, s)).collect();
        let mut applied_events = Vec::new();
        let mut settling = Vec::new();
        for (change, ev) in decided.changes.iter().zip_events(&decided.events) {
            let applied = apply_change(&mut tx, change, &by_id, now).await?;
            if applied {
                if let Some(ev) = ev {
                    applied_events.push(ev.clone());
                }
                settling.extend(settling_server(change));
            }
        }
        insert_events_tx(&mut tx, &applied_events, now).await?;
        // An operation waiting on what this sync confirmed (a start on its
        // instance running, a stop on it gone) settles in the same
        // transaction, and what waits behind it begins.
        for server_id in settling {
            ops_impl::advance_tx(&mut tx, server_id, now).await?;
        }
        tx.commit().await?;
        Ok((node, decided))
    }

    async fn desired_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVER_COLS} FROM servers WHERE node_id = $1 AND status IN ('starting', 'running', 'unknown') ORDER BY id"
        ))
        .bind(&node_id.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(server_from_row).collect()
    }

    async fn desired_keys(&self, node_id: &NodeId) -> Result<Vec<(ServerId, berth_core::Generation)>, StoreError> {
        let rows = sqlx::query("SELECT id, generation FROM servers WHERE node_id = $1 AND status IN ('starting', 'running', 'unknown')")
            .bind(&node_id.0)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(|r| Ok((ServerId(r.try_get("id")?), r.try_get::<i64, _>("generation")? as u64))).collect()
    }

    async fn placed_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVER_COLS} FROM servers WHERE node_id = $1 AND status IN ('starting', 'running', 'stopping', 'unknown') ORDER BY id"
        ))
        .bind(&node_id.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(server_from_row).collect()
    }

    async fn node_reserved(&self, node_id: &NodeId) -> Result<MemMib, StoreError> {
        let mib: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) FROM reservations WHERE node_id = $1")
            .bind(&node_id.0)
            .fetch_one(&self.read)
            .await?;
        Ok(MemMib(mib as u64))
    }

    async fn status_counts(&self) -> Result<(Vec<(ServerStatus, u64)>, u64), StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM servers WHERE status <> 'deleted' GROUP BY status").fetch_all(&self.read).await?;
        let mut counts = Vec::new();
        for r in &rows {
            let status: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            counts.push((ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?, n as u64));
        }
        let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM billing_sessions WHERE ended_at IS NULL").fetch_one(&self.read).await?;
        Ok((counts, open as u64))
    }

    async fn try_lead(&self, replica: &str, ttl_ms: i64, now: Millis) -> Result<Option<LeaderLease>, StoreError> {
        let row = sqlx::query(LEAD_SQL)
            .bind(replica)
            .bind(now + ttl_ms)
            .bind(now)
            .fetch_optional(&self.write)
            .await?;
        row.map(|r| lease_from_row(&r)).transpose()
    }

    async fn heartbeat(&self, r: &ReplicaInfo) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (id, address, started_at, last_seen) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at, last_seen = excluded.last_seen",
        )
        .bind(&r.id)
        .bind(&r.address)
        .bind(r.started_at)
        .bind(r.last_seen)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn cluster(&self) -> Result<(Vec<ReplicaInfo>, Option<LeaderLease>), StoreError> {
        let rows = sqlx::query("SELECT id, address, started_at, last_seen FROM replicas ORDER BY id").fetch_all(&self.read).await?;
        let replicas = rows
            .iter()
            .map(|r| Ok(ReplicaInfo { id: r.try_get("id")?, address: r.try_get("address")?, started_at: r.try_get("started_at")?, last_seen: r.try_get("last_seen")? }))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let lease = sqlx::query("SELECT holder, epoch, expires_at FROM leader WHERE id = 1").fetch_optional(&self.read).await?;
        Ok((replicas, lease.map(|r| lease_from_row(&r)).transpose()?))
    }

    async fn apply_verdicts(&self, verdicts: &[Verdict], now: Millis) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let applied = apply_verdicts_tx(&mut tx, verdicts, now).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn set_drain(&self, id: &NodeId, draining: bool, deadline: Option<Millis>) -> Result<Node, StoreError> {
        let mut tx = self.begin().await?;
        let status = if draining { NodeStatus::Draining } else { NodeStatus::Ready };
        let n = sqlx::query("UPDATE nodes SET status = $1, drain_deadline = $2 WHERE id = $3 AND status IN ('ready', 'draining')")
            .bind(status.as_str())
            .bind(if draining { deadline } else { None })
            .bind(&id.0)
            .execute(&mut *tx)
            .await?;
        if n.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("node {id} is not ready or draining")));
        }
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1")).bind(&id.0).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        node_from_row(&row)
    }

    async fn sessions_of(&self, server: &ServerId) -> Result<Vec<BillingSession>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {SESSION_COLS} FROM billing_sessions WHERE server_id = $1 ORDER BY started_at, id"))
            .bind(&server.0)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn sessions_between(&self, tenant: Option<&str>, from: Millis, to: Millis) -> Result<Vec<BillingSession>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM billing_sessions WHERE (CAST($1 AS TEXT) IS NULL OR tenant = $2) AND started_at < $3 AND (ended_at IS NULL OR ended_at > $4) ORDER BY started_at, id"
        ))
        .bind(tenant)
        .bind(tenant)
        .bind(to)
        .bind(from)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn open_sessions(&self) -> Result<Vec<BillingSession>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {SESSION_COLS} FROM billing_sessions WHERE ended_at IS NULL ORDER BY id")).fetch_all(&self.read).await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn ledger_of(&self, server: &ServerId) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query("SELECT seq, at, kind, session_id, server_id, detail FROM ledger WHERE server_id = $1 ORDER BY seq")
            .bind(&server.0)
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LedgerEntry {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    session_id: r.try_get("session_id")?,
                    server_id: ServerId(r.try_get("server_id")?),
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    async fn sweep_zombies(&self, now: Millis) -> Result<Vec<BillingSession>, StoreError> {
        let mut tx = self.begin().await?;
        // A session is a zombie if its server does not run that generation
        // (a stopping server still runs until the stop is confirmed).
        // It closes when the server last changed status (when it stopped
        // running, as far as the records know), never after now.
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS}, (SELECT s.updated_at FROM servers s WHERE s.id = b.server_id) AS changed_at FROM billing_sessions b \
             WHERE b.ended_at IS NULL AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.id = b.server_id AND s.generation = b.generation AND s.status IN ('running', 'stopping'))"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let mut closed = Vec::new();
        let mut events = Vec::new();
        for r in &rows {
            let mut s = session_from_row(r)?;
            let changed: Option<i64> = r.try_get("changed_at")?;
            let at = changed.unwrap_or(s.started_at).clamp(s.started_at, now.max(s.started_at));
            close_session_tx(&mut tx, &s.server_id, at, EndReason::Zombie).await?;
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
        insert_events_tx(&mut tx, &events, now).await?;
        tx.commit().await?;
        Ok(closed)
    }

    async fn roll_over(&self, max_len_ms: Millis, fresh_ms: Millis, now: Millis) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT b.server_id, b.generation FROM billing_sessions b JOIN servers s ON s.id = b.server_id AND s.generation = b.generation \
             JOIN nodes n ON n.id = b.node_id \
             WHERE b.ended_at IS NULL AND b.started_at <= $1 AND s.status = 'running' AND n.last_sync_at >= $2",
        )
        .bind(now - max_len_ms)
        .bind(now - fresh_ms)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let server = ServerId(r.try_get("server_id")?);
            let generation = r.try_get::<i64, _>("generation")? as u64;
            close_session_tx(&mut tx, &server, now, EndReason::Rollover).await?;
            open_session_tx(&mut tx, &server, generation, now, "rollover").await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn insert_session(&self, s: &BillingSession) -> Result<i64, StoreError> {
        let mut tx = self.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO billing_sessions (server_id, tenant, node_id, generation, memory_mib, plan, price_per_gib_hour, started_at, ended_at, end_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(&s.server_id.0)
        .bind(&s.tenant)
        .bind(&s.node_id.0)
        .bind(s.generation as i64)
        .bind(s.memory_mib.0 as i64)
        .bind(&s.plan)
        .bind(s.price_per_gib_hour)
        .bind(s.started_at)
        .bind(s.ended_at)
        .bind(&s.end_reason)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("server {} already has an open session", s.server_id)) } else { e.into() })?;
        ledger_tx(&mut tx, s.started_at, "opened", id, &s.server_id, "inserted").await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn node_volumes(&self, id: &NodeId) -> Result<Vec<ServerId>, StoreError> {
        let text: Option<String> = sqlx::query_scalar("SELECT volumes FROM nodes WHERE id = $1").bind(&id.0).fetch_optional(&self.read).await?;
        let text = text.ok_or_else(|| StoreError::NotFound { what: format!("node {id}") })?;
        let ids: Vec<String> = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("node volumes: {e}")))?;
        Ok(ids.into_iter().map(ServerId).collect())
    }

    async fn count_events(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT kind, COUNT(*) AS n FROM events GROUP BY kind ORDER BY kind").fetch_all(&self.read).await?;
        rows.iter().map(|r| Ok((r.try_get("kind")?, r.try_get("n")?))).collect()
    }

    fn set_fence(&self, fence: Option<(String, u64)>) {
        *self.fence.lock().expect("fence lock") = fence;
    }


        async fn request_operation(&self, req: &crate::OpRequest, now: Millis) -> Result<(berth_core::operation::Operation, Server), StoreError> {
            // Concurrent writers each take their own transaction here;
            // PostgreSQL groups their commits itself.
            let mut tx = self.begin().await?;
            let out = ops_impl::request_tx(&mut tx, req, now).await?;
            tx.commit().await?;
            Ok(out)
        }
        async fn advance_operations(&self, server_id: &ServerId, now: Millis) -> Result<Vec<berth_core::operation::Operation>, StoreError> {
            let mut tx = self.begin().await?;
            let changed = ops_impl::advance_tx(&mut tx, server_id, now).await?;
            tx.commit().await?;
            Ok(changed)
        }
        async fn get_operation(&self, id: &str) -> Result<Option<berth_core::operation::Operation>, StoreError> {
            self.ops_get(id).await
        }
        async fn list_operations(&self, filter: &crate::OpFilter) -> Result<Vec<berth_core::operation::Operation>, StoreError> {
            self.ops_list(filter).await
        }
        async fn ops_work(&self, window_start: Millis, with_active: bool) -> Result<crate::OpsWork, StoreError> {
            self.ops_worklist(window_start, with_active).await
        }
        async fn fail_server(
            &self,
            id: &ServerId,
            generation: berth_core::Generation,
            from: ServerStatus,
            error: &str,
            event: &NewEvent,
            now: Millis,
        ) -> Result<bool, StoreError> {
            self.ops_fail_server(id, generation, from, error, event, now).await
        }
        async fn set_restart_at(&self, id: &ServerId, generation: berth_core::Generation, at: Millis) -> Result<(), StoreError> {
            self.ops_set_restart_at(id, generation, at).await
        }
        async fn killing_on(&self, node_id: &NodeId) -> Result<Vec<(ServerId, berth_core::Generation)>, StoreError> {
            self.ops_killing_on(node_id).await
        }
        async fn insert_webhook(&self, w: &berth_core::notify::Webhook) -> Result<berth_core::notify::Webhook, StoreError> {
            self.webhook_insert(w).await
        }
        async fn list_webhooks(&self, tenant: Option<&str>) -> Result<Vec<berth_core::notify::Webhook>, StoreError> {
            self.webhook_list(tenant).await
        }
        async fn get_webhook(&self, id: &str) -> Result<Option<berth_core::notify::Webhook>, StoreError> {
            self.webhook_get(id).await
        }
        async fn delete_webhook(&self, id: &str) -> Result<(), StoreError> {
            self.webhook_delete(id).await
        }
        async fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Result<berth_core::notify::Webhook, StoreError> {
            self.webhook_set_enabled(id, enabled).await
        }
        async fn fan_out(&self, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError> {
            self.notify_fan_out(email, limit, now).await
        }
        async fn due_deliveries(&self, now: Millis, limit: u32) -> Result<Vec<crate::DeliveryJob>, StoreError> {
            self.notify_due(now, limit).await
        }
        async fn record_delivery(
            &self,
            id: &str,
            outcome: &crate::DeliveryOutcome,
            policy: &crate::DeliveryPolicy,
            random: u64,
            now: Millis,
        ) -> Result<(), StoreError> {
            self.notify_record(id, outcome, policy, random, now).await
        }
        async fn list_deliveries(&self, filter: &crate::DeliveryFilter) -> Result<Vec<crate::Delivery>, StoreError> {
            self.notify_list(filter).await
        }

    async fn insert_events(&self, events: &[NewEvent], now: Millis) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        insert_events_tx(&mut tx, events, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_events(&self, f: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, server_id, node_id, message FROM events \
             WHERE ($1 IS NULL OR server_id = $1) AND ($2 IS NULL OR node_id = $2) AND ($3 IS NULL OR kind = $3) AND seq > $4 \
             AND ($6 IS NULL OR at >= $6) ORDER BY seq LIMIT $5",
        )
        .bind(f.server_id.as_ref().map(|s| s.0.as_str()))
        .bind(f.node_id.as_ref().map(|n| n.0.as_str()))
        .bind(f.kind.as_deref())
        .bind(f.after.unwrap_or(0))
        .bind(f.limit.clamp(1, 1000) as i64)
        .bind(f.since)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    server_id: r.try_get::<Option<String>, _>("server_id")?.map(ServerId),
                    node_id: r.try_get::<Option<String>, _>("node_id")?.map(NodeId),
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut tx = self.read.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let nodes = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes")).fetch_all(&mut *tx).await?;
        let servers = sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted'")).fetch_all(&mut *tx).await?;
        let res = sqlx::query(&format!("SELECT {RES_COLS} FROM reservations")).fetch_all(&mut *tx).await?;
        let open = sqlx::query("SELECT server_id, generation FROM billing_sessions WHERE ended_at IS NULL").fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(Snapshot {
            nodes: nodes.iter().map(node_from_row).collect::<Result<_, _>>()?,
            servers: servers.iter().map(server_from_row).collect::<Result<_, _>>()?,
            reservations: res.iter().map(reservation_from_row).collect::<Result<_, _>>()?,
            open_sessions: open
                .iter()
                .map(|r| Ok((ServerId(r.try_get("server_id")?), r.try_get::<i64, _>("generation")? as u64)))
                .collect::<Result<_, StoreError>>()?,
        })
    }
}










/// Takes the lease if it is free or expired, renews it if held; the epoch
/// grows only when the holder changes or its lease had lapsed. Binds:
/// replica, new expiry, now.
const LEAD_SQL: &str = "INSERT INTO leader (id, holder, epoch, expires_at) VALUES (1, $1, 1, $2) \
     ON CONFLICT (id) DO UPDATE SET \
       epoch = CASE WHEN leader.holder = excluded.holder AND leader.expires_at >= $3 THEN leader.epoch ELSE leader.epoch + 1 END, \
       holder = excluded.holder, expires_at = excluded.expires_at \
     WHERE leader.holder = excluded.holder OR leader.expires_at < $3 \
     RETURNING holder, epoch, expires_at";




