//! The SQLite backend: WAL, `synchronous=FULL`, a busy timeout, versioned
//! migrations, one writer.
//!
//! Every write runs on the writer thread (`group`), on its own rusqlite
//! connection, group-committed: many writes in one transaction, each in
//! its own savepoint, answered after the one commit. One writer means
//! write transactions never contend for SQLite's lock. Reads use a pool of
//! sqlx connections and see the last committed state; a read of many rows
//! comes back as one JSON row (`fetch_many`, see `cols`). Transactions
//! contain queries and pure calls only, never foreign I/O.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::health::Verdict;
use berth_core::placement::Placement;
use berth_core::reconcile::Reconciled;
use berth_core::{Event, MemMib, Millis, NewEvent, Node, NodeId, NodeStatus, Server, ServerId, ServerStatus, TokenKind};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool};

use crate::cols::Cols;
use crate::exec::Exec;
use crate::group::{BoxFuture, GroupCommit};
use crate::rows::*;
use crate::writes::{self, placed_sql, PreDecided};
use crate::{
    BillingSession, Decide, EventFilter, LeaderLease, LedgerEntry, NodeRegistration, NodeUsage, PlacementOutcome, QueueSnapshot, ReplicaInfo, Snapshot,
    Store, StoreError, SyncInput, TokenRecord,
};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_cluster.sql")),
    (3, include_str!("../migrations/sqlite/0003_fencing_billing.sql")),
    (4, include_str!("../migrations/sqlite/0004_operations.sql")),
    (5, include_str!("../migrations/sqlite/0005_volumes.sql")),
];

pub struct SqliteStore {
    read: SqlitePool,
    fence: std::sync::Mutex<Option<(String, u64)>>,
    /// The one writer.
    group: GroupCommit,
}

/// How a `SqliteStore` writes.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// Most writes committed together in one transaction (one fsync);
    /// 1 turns group commit off.
    pub group_commit_max: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { group_commit_max: 256 }
    }
}


store_common!(Sqlite, SqliteRow);
ops_store_impl!(SqliteStore, crate::ops_sql::same);

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // The working set (servers, reservations, nodes) stays in
            // SQLite's own cache instead of being read back from the OS
            // page cache a page at a time.
            .pragma("cache_size", "-32768")
            .foreign_keys(true);
        {
            // Migrations run on a connection of their own, closed before the
            // writer opens its one.
            let migrator = SqlitePoolOptions::new().max_connections(1).connect_with(opts.clone()).await?;
            migrate(&migrator).await?;
            migrator.close().await;
        }
        let read = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
        let group = GroupCommit::spawn(path, options.group_commit_max)?;
        Ok(SqliteStore { read, fence: std::sync::Mutex::new(None), group })
    }

    /// Runs one write on the writer thread; see `group`.
    async fn with_write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: for<'e> FnOnce(&'e mut dyn Exec) -> BoxFuture<'e, Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.group.write(work).await
    }

    /// Reads what a sync decides from (the node's previous renewal, its
    /// placed servers) from the last commit and decides, outside the
    /// writer. `None` if the node is unknown (the write says so).
    async fn pre_decide(&self, input: &SyncInput, decide: &Decide) -> Result<Option<PreDecided>, StoreError> {
        let mut rtx = self.read.begin().await?;
        let last: Option<(Option<i64>, i64)> = sqlx::query_as("SELECT last_sync_at, registered_at FROM nodes WHERE id = ?")
            .bind(&input.node_id.0)
            .fetch_optional(&mut *rtx)
            .await?;
        let Some((last_sync_at, registered_at)) = last else { return Ok(None) };
        let placed = fetch_many(&mut *rtx, &placed_sql(), PLACED_COLS, &[&input.node_id.0])
            .await?
            .iter()
            .map(placed_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        rtx.commit().await?;
        let decided = decide(&placed, last_sync_at.unwrap_or(registered_at));
        Ok(Some((last_sync_at, placed, decided)))
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)").execute(pool).await?;
    // Every missing version is applied, not only those above the highest:
    // migrations developed side by side may land out of order.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(pool).await?;
    let current = applied.iter().copied().max().unwrap_or(0);
    if let Some((latest, _)) = MIGRATIONS.last() {
        if current > *latest {
            return Err(StoreError::Corrupt(format!(
                "database schema version {current} is newer than this berth ({latest}); refusing to run"
            )));
        }
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version) VALUES (?)").bind(version).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}











#[async_trait]
impl Store for SqliteStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.with_write(move |e| Box::pin(async move { writes::insert_token(e, &t).await })).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT id, hash, kind, tenant, created_at FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE kind = ?").bind(kind.as_str()).fetch_one(&self.read).await?;
        Ok(n as u64)
    }

    async fn register_node(&self, reg: &NodeRegistration, new_id: &NodeId, now: Millis) -> Result<Node, StoreError> {
        let (reg, new_id) = (reg.clone(), new_id.clone());
        self.with_write(move |e| Box::pin(async move { writes::register_node(e, &reg, &new_id, now).await })).await
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let rows = fetch_many(&self.read, &format!("SELECT {NODE_COLS} FROM nodes"), NODE_COLS, &[]).await?;
        let mut nodes = rows.iter().map(node_from_row).collect::<Result<Vec<_>, _>>()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    async fn largest_allocatable(&self) -> Result<Option<MemMib>, StoreError> {
        let mib: Option<i64> = sqlx::query_scalar("SELECT CAST(MAX(total_mib - system_reserved_mib) AS BIGINT) FROM nodes WHERE status <> 'removed'")
            .fetch_one(&self.read)
            .await?;
        Ok(mib.map(|m| MemMib(m.max(0) as u64)))
    }

    async fn get_node(&self, id_or_name: &str) -> Result<Option<Node>, StoreError> {
        let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = ? UNION ALL SELECT {NODE_COLS} FROM nodes WHERE name = ? LIMIT 1"))
            .bind(id_or_name)
            .bind(id_or_name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    async fn set_node_status(&self, id: &NodeId, status: NodeStatus) -> Result<Node, StoreError> {
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::set_node_status(e, &id, status).await })).await
    }

    async fn node_usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        let rows = fetch_many(&self.read, "SELECT node_id, SUM(memory_mib) AS reserved, COUNT(*) AS n FROM reservations GROUP BY node_id", "node_id, reserved, n", &[])
            .await?;
        rows.iter()
            .map(|r| Ok(NodeUsage { node_id: NodeId(r.text("node_id")?), reserved: MemMib(r.int("reserved")? as u64), servers: r.int("n")? as u32 }))
            .collect()
    }

    async fn insert_server(&self, s: &Server, event: &NewEvent) -> Result<(), StoreError> {
        let (s, event) = (s.clone(), event.clone());
        self.with_write(move |e| Box::pin(async move { writes::insert_server(e, &s, &event).await })).await
    }

    async fn get_server(&self, id_or_name: &str) -> Result<Option<Server>, StoreError> {
        let row = sqlx::query(&format!(
            // Two indexed lookups, the id first: `id = ? OR name = ?` scans
            // the table on SQLite.
            "SELECT {SERVER_COLS} FROM servers WHERE id = ? AND status <> 'deleted' \
             UNION ALL SELECT {SERVER_COLS} FROM servers WHERE name = ? AND status <> 'deleted' LIMIT 1"
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
                sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted' AND tenant = ? ORDER BY created_at, id"))
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
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::request_start(e, &id, now, allow_fresh_world).await })).await
    }

    async fn request_stop(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::request_stop(e, &id, now).await })).await
    }

    async fn delete_server(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::delete_server(e, &id, now).await })).await
    }

    async fn queue_snapshot(&self) -> Result<QueueSnapshot, StoreError> {
        // One read transaction: nodes, their rows and the queue are one
        // consistent snapshot. The rows are summed in the database; the
        // committer re-checks every plan against the rows themselves.
        let mut tx = self.read.begin().await?;
        let (nodes_sql, totals_sql, queued_sql) = queue_snapshot_sql("GROUP_CONCAT(port)");
        let nodes = fetch_many(&mut *tx, &nodes_sql, NODE_COLS, &[]).await?;
        let totals = fetch_many(&mut *tx, &totals_sql, "node_id, reserved, pending, ports", &[]).await?;
        let queued = fetch_many(&mut *tx, queued_sql, QUEUED_COLS, &[]).await?;
        tx.commit().await?;
        queue_snapshot_from(&nodes, &totals, &queued)
    }

    async fn commit_placements(&self, plans: &[Placement], now: Millis) -> Result<Vec<PlacementOutcome>, StoreError> {
        // The fence is read when the commit is requested; it is checked
        // against the lease row inside the transaction.
        let fence = self.fence.lock().expect("fence lock").clone();
        let plans = plans.to_vec();
        self.with_write(move |e| Box::pin(async move { writes::commit_placements(e, &plans, now, fence).await })).await
    }

    async fn sync_node(&self, input: &SyncInput, now: Millis, decide: Decide) -> Result<(Node, Reconciled), StoreError> {
        let input = input.clone();
        let pre = self.pre_decide(&input, &decide).await?;
        self.with_write(move |e| Box::pin(async move { writes::sync_node(e, &input, now, &decide, pre).await })).await
    }

    async fn desired_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        let sql = format!("SELECT {SERVER_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'unknown')");
        let rows = fetch_many(&self.read, &sql, SERVER_COLS, &[&node_id.0]).await?;
        let mut servers = rows.iter().map(server_from_row).collect::<Result<Vec<_>, _>>()?;
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(servers)
    }

    async fn desired_keys(&self, node_id: &NodeId) -> Result<Vec<(ServerId, berth_core::Generation)>, StoreError> {
        let sql = "SELECT id, generation FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'unknown')";
        let rows = fetch_many(&self.read, sql, "id, generation", &[&node_id.0]).await?;
        rows.iter().map(|r| Ok((ServerId(r.text("id")?), r.int("generation")? as u64))).collect()
    }

    async fn placed_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        let sql = format!("SELECT {SERVER_COLS} FROM servers WHERE node_id = ? AND status IN ('starting', 'running', 'stopping', 'unknown')");
        let rows = fetch_many(&self.read, &sql, SERVER_COLS, &[&node_id.0]).await?;
        let mut servers = rows.iter().map(server_from_row).collect::<Result<Vec<_>, _>>()?;
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(servers)
    }

    async fn node_reserved(&self, node_id: &NodeId) -> Result<MemMib, StoreError> {
        let mib: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) FROM reservations WHERE node_id = ?")
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
        let replica = replica.to_string();
        self.with_write(move |e| Box::pin(async move { writes::try_lead(e, &replica, ttl_ms, now).await })).await
    }

    async fn heartbeat(&self, r: &ReplicaInfo) -> Result<(), StoreError> {
        let r = r.clone();
        self.with_write(move |e| Box::pin(async move { writes::heartbeat(e, &r).await })).await
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
        let verdicts = verdicts.to_vec();
        self.with_write(move |e| Box::pin(async move { writes::apply_verdicts(e, &verdicts, now).await })).await
    }

    async fn set_drain(&self, id: &NodeId, draining: bool, deadline: Option<Millis>) -> Result<Node, StoreError> {
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::set_drain(e, &id, draining, deadline).await })).await
    }

    async fn sessions_of(&self, server: &ServerId) -> Result<Vec<BillingSession>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {SESSION_COLS} FROM billing_sessions WHERE server_id = ? ORDER BY started_at, id"))
            .bind(&server.0)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn sessions_between(&self, tenant: Option<&str>, from: Millis, to: Millis) -> Result<Vec<BillingSession>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM billing_sessions WHERE (CAST(? AS TEXT) IS NULL OR tenant = ?) AND started_at < ? AND (ended_at IS NULL OR ended_at > ?) ORDER BY started_at, id"
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
        let rows = sqlx::query("SELECT seq, at, kind, session_id, server_id, detail FROM ledger WHERE server_id = ? ORDER BY seq")
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
        self.with_write(move |e| Box::pin(async move { writes::sweep_zombies(e, now).await })).await
    }

    async fn roll_over(&self, max_len_ms: Millis, fresh_ms: Millis, now: Millis) -> Result<usize, StoreError> {
        self.with_write(move |e| Box::pin(async move { writes::roll_over(e, max_len_ms, fresh_ms, now).await })).await
    }

    async fn insert_session(&self, s: &BillingSession) -> Result<i64, StoreError> {
        let s = s.clone();
        self.with_write(move |e| Box::pin(async move { writes::insert_session(e, &s).await })).await
    }

    async fn node_volumes(&self, id: &NodeId) -> Result<Vec<ServerId>, StoreError> {
        let text: Option<String> = sqlx::query_scalar("SELECT volumes FROM nodes WHERE id = ?").bind(&id.0).fetch_optional(&self.read).await?;
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

    fn write_stats(&self) -> Option<crate::WriteStats> {
        let (writes, commits) = self.group.stats();
        Some(crate::WriteStats { writes, commits })
    }


    async fn request_operation(&self, req: &crate::OpRequest, now: Millis) -> Result<(berth_core::operation::Operation, Server), StoreError> {
        let req = req.clone();
        self.with_write(move |e| Box::pin(async move { writes::request_operation(e, &req, now).await })).await
    }

    async fn advance_operations(&self, server_id: &ServerId, now: Millis) -> Result<Vec<berth_core::operation::Operation>, StoreError> {
        let id = server_id.clone();
        self.with_write(move |e| Box::pin(async move { writes::advance_operations(e, &id, now).await })).await
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
        let (id, error, event) = (id.clone(), error.to_string(), event.clone());
        self.with_write(move |e| Box::pin(async move { writes::fail_server(e, &id, generation, from, &error, &event, now).await })).await
    }

    async fn set_restart_at(&self, id: &ServerId, generation: berth_core::Generation, at: Millis) -> Result<(), StoreError> {
        let id = id.clone();
        self.with_write(move |e| Box::pin(async move { writes::set_restart_at(e, &id, generation, at).await })).await
    }

        async fn killing_on(&self, node_id: &NodeId) -> Result<Vec<(ServerId, berth_core::Generation)>, StoreError> {
            self.ops_killing_on(node_id).await
        }
    async fn insert_webhook(&self, w: &berth_core::notify::Webhook) -> Result<berth_core::notify::Webhook, StoreError> {
        let w = w.clone();
        self.with_write(move |e| Box::pin(async move { writes::insert_webhook(e, &w).await })).await
    }

        async fn list_webhooks(&self, tenant: Option<&str>) -> Result<Vec<berth_core::notify::Webhook>, StoreError> {
            self.webhook_list(tenant).await
        }
        async fn get_webhook(&self, id: &str) -> Result<Option<berth_core::notify::Webhook>, StoreError> {
            self.webhook_get(id).await
        }
    async fn delete_webhook(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.with_write(move |e| Box::pin(async move { writes::delete_webhook(e, &id).await })).await
    }

    async fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Result<berth_core::notify::Webhook, StoreError> {
        let id = id.to_string();
        self.with_write(move |e| Box::pin(async move { writes::set_webhook_enabled(e, &id, enabled).await })).await
    }

    async fn fan_out(&self, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError> {
        self.with_write(move |e| Box::pin(async move { writes::fan_out(e, email, limit, now).await })).await
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
        let (id, outcome, policy) = (id.to_string(), outcome.clone(), *policy);
        self.with_write(move |e| Box::pin(async move { writes::record_delivery(e, &id, &outcome, &policy, random, now).await })).await
    }

        async fn list_deliveries(&self, filter: &crate::DeliveryFilter) -> Result<Vec<crate::Delivery>, StoreError> {
            self.notify_list(filter).await
        }

    async fn insert_events(&self, events: &[NewEvent], now: Millis) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.with_write(move |e| Box::pin(async move { writes::insert_events(e, &events, now).await })).await
    }

    async fn list_events(&self, f: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, server_id, node_id, message FROM events \
             WHERE (?1 IS NULL OR server_id = ?1) AND (?2 IS NULL OR node_id = ?2) AND (?3 IS NULL OR kind = ?3) AND seq > ?4 \
             AND (?6 IS NULL OR at >= ?6) ORDER BY seq LIMIT ?5",
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
        let nodes = fetch_many(&mut *tx, &format!("SELECT {NODE_COLS} FROM nodes"), NODE_COLS, &[]).await?;
        let servers = fetch_many(&mut *tx, &format!("SELECT {SERVER_COLS} FROM servers WHERE status <> 'deleted'"), SERVER_COLS, &[]).await?;
        let res = fetch_many(&mut *tx, &format!("SELECT {RES_COLS} FROM reservations"), RES_COLS, &[]).await?;
        let open = fetch_many(&mut *tx, "SELECT server_id, generation FROM billing_sessions WHERE ended_at IS NULL", "server_id, generation", &[]).await?;
        tx.commit().await?;
        Ok(Snapshot {
            nodes: nodes.iter().map(node_from_row).collect::<Result<_, _>>()?,
            servers: servers.iter().map(server_from_row).collect::<Result<_, _>>()?,
            reservations: res.iter().map(reservation_from_row).collect::<Result<_, _>>()?,
            open_sessions: open.iter().map(|r| Ok((ServerId(r.text("server_id")?), r.int("generation")? as u64))).collect::<Result<_, StoreError>>()?,
        })
    }
}










/// Runs `select` (binding `binds` in order) and returns its rows as
/// objects of the columns `names`, handed over as one JSON row: sqlx passes
/// SQLite rows from its connection thread one at a time (see `cols`).
async fn fetch_many<'e, E>(exec: E, select: &str, names: &str, binds: &[&str]) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let sql = format!("SELECT COALESCE(json_group_array({}), '[]') FROM ({select})", crate::cols::json_object(names));
    let mut q = sqlx::query_scalar::<_, String>(&sql);
    for b in binds {
        q = q.bind(*b);
    }
    let text = q.fetch_one(exec).await?;
    crate::cols::json_rows(&text)
}






