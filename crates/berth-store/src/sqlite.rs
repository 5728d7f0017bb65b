//! The SQLite backend: WAL, every answered write fsynced (`synchronous=FULL`,
//! or the writer's own pipelined flush), a busy timeout, versioned
//! migrations, one writer.
//!
//! Every write runs on the writer thread (`group`), on its own connection,
//! group-committed: many writes in one transaction (a savepoint each only
//! when a failed write must be undone alone), answered after the one
//! commit and the fsync of the log that follows it (pipelined: the
//! writer runs the next batch meanwhile). A read is answered only once
//! the log is on disk past every commit it may have seen, so nothing is
//! answered that a power cut could take back. One writer means write
//! transactions never contend for SQLite's lock. Reads run on the calling
//! task, in a read transaction on a connection of a small pool, and see the
//! last commit; a read is a few short queries and waits for no write, only,
//! under a burst, for the fsync of what it saw (at most one fsync).
//! A whole-table read runs the same way on tokio's blocking pool.
//! Statements are function calls into SQLite (rusqlite): none crosses a
//! thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::exec::LiteExec;
use crate::group::GroupCommit;
use crate::mirror::Mirror;
use crate::store::{Backend, StoreOn, Work, WriteWork};
use crate::{StoreError, WriteStats};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_cluster.sql")),
    (3, include_str!("../migrations/sqlite/0003_fencing_billing.sql")),
    (4, include_str!("../migrations/sqlite/0004_operations.sql")),
    (5, include_str!("../migrations/sqlite/0005_volumes.sql")),
    (6, include_str!("../migrations/sqlite/0006_reservations_key.sql")),
    (7, include_str!("../migrations/sqlite/0007_reservations_by_node.sql")),
    (8, include_str!("../migrations/sqlite/0008_servers_indexes.sql")),
    (9, include_str!("../migrations/sqlite/0009_operations_check.sql")),
];

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

/// Connections kept for reads; more are opened when all are busy and
/// closed when given back beyond this.
const IDLE_READERS: usize = 8;

pub struct SqliteBackend {
    readers: Arc<Readers>,
    group: GroupCommit,
    /// The live servers, kept by the writer (`mirror`).
    mirror: Arc<Mirror>,
}

/// The idle read connections, shared with reads run on the blocking pool.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

pub type SqliteStore = StoreOn<SqliteBackend>;

/// Opens a connection with the store's settings.
pub(crate) fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // The working set (servers, reservations, nodes) stays in SQLite's own
    // cache instead of being read back from the OS a page at a time.
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -32768;")?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Runs a fixed statement without rows (BEGIN, SAVEPOINT, COMMIT, ...)
/// from the connection's cache: parsing it again for every transaction
/// was measurable.
pub(crate) fn run_cached(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

pub(crate) fn migrate(conn: &mut rusqlite::Connection) -> Result<(), StoreError> {
    migrate_through(conn, i64::MAX)
}

/// Applies every missing migration up to and including `through` (a test
/// stops short of the latest to build the database an older berth left).
fn migrate_through(conn: &mut rusqlite::Connection, through: i64) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")?;
    // Every missing version is applied, not only those above the highest:
    // migrations developed side by side may land out of order.
    let applied: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT version FROM schema_migrations")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let current = applied.iter().copied().max().unwrap_or(0);
    if let Some((latest, _)) = MIGRATIONS.last() {
        if current > *latest {
            return Err(StoreError::Corrupt(format!("database schema version {current} is newer than this berth ({latest}); refusing to run")));
        }
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= through && !applied.contains(v)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES (?)", [version])?;
        tx.commit()?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

impl StoreOn<SqliteBackend> {
    /// Opens (creating if missing) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        migrate(&mut connect(path)?)?;
        let mirror = Arc::new(Mirror::default());
        let group = GroupCommit::spawn(path, options.group_commit_max, Some(mirror.clone()))?;
        Ok(StoreOn::new(SqliteBackend { readers: Arc::new(Readers { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) }), group, mirror }))
    }
}

impl StoreOn<SqliteBackend> {
    /// Every live server as the writer's copy holds it and as the rows
    /// hold them, both by id: equal whenever no write is in flight. For
    /// tests of the copy.
    #[doc(hidden)]
    pub async fn mirror_and_rows(&self) -> Result<(Vec<berth_core::Server>, Vec<berth_core::Server>), StoreError> {
        let mirrored = self.b.mirror.all()?;
        let mut rows = self.b.readers.read(|e| Box::pin(async move { crate::reads::list_servers(e, None).await })).await?;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((mirrored, rows))
    }
}

impl Readers {
    fn take(&self) -> Result<rusqlite::Connection, StoreError> {
        let idle = self.idle.lock().expect("readers lock").pop();
        match idle {
            Some(c) => Ok(c),
            None => connect(&self.path),
        }
    }

    fn give(&self, conn: rusqlite::Connection) {
        let mut idle = self.idle.lock().expect("readers lock");
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }

    /// One read transaction on an idle connection. Every statement
    /// completes before it returns: nothing here waits.
    async fn read<T, F: Work<T>>(&self, work: F) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        run_cached(&conn, "BEGIN")?;
        let out = work(&mut LiteExec { conn: &mut conn }).await;
        let ended = run_cached(&conn, if out.is_ok() { "COMMIT" } else { "ROLLBACK" });
        if ended.is_ok() {
            self.give(conn);
        }
        out
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn read<T: Send + 'static, F: Work<T>>(&self, work: F) -> Result<T, StoreError> {
        // On the calling thread: a point read is page-cache work, cheaper
        // than a hand-off to another thread.
        let out = self.readers.read(work).await?;
        self.group.settled().await?;
        Ok(out)
    }

    async fn read_apart<T: Send + 'static, F: Work<T>>(&self, work: F) -> Result<T, StoreError> {
        // A whole-table read takes tens of milliseconds at 10k servers;
        // on an async worker it would stall every request queued behind it
        // (half the runtime on two cores).
        let readers = self.readers.clone();
        let handle = tokio::runtime::Handle::current();
        match tokio::task::spawn_blocking(move || handle.block_on(readers.read(work))).await {
            Ok(out) => {
                let out = out?;
                self.group.settled().await?;
                Ok(out)
            }
            // A panic in the read is the caller's, as it would be inline.
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => Err(StoreError::Unavailable(format!("a read was cancelled: {e}"))),
            },
        }
    }

    async fn write<I: Send + Sync + 'static, T: Send + 'static, F: WriteWork<I, T>>(&self, input: I, work: F) -> Result<T, StoreError> {
        self.group.write(input, work).await
    }

    fn mirror(&self) -> Option<&Mirror> {
        Some(&self.mirror)
    }

    fn healthy(&self) -> Result<(), StoreError> {
        self.group.healthy()
    }

    fn write_stats(&self) -> Option<WriteStats> {
        let (writes, commits, reruns) = self.group.stats();
        Some(WriteStats { writes, commits, reruns })
    }

    fn one_writer(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column `i` of every row `sql` returns.
    fn column<T: rusqlite::types::FromSql>(conn: &rusqlite::Connection, sql: &str, i: usize) -> Vec<T> {
        conn.prepare(sql).unwrap().query_map([], |r| r.get(i)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// A database at version 5 with a node, a running server with its
    /// reservation and a queued server, migrated through `through`; the
    /// reservation's row and rules are checked after. Returns the
    /// connection and the indexes of `reservations` (origin, name).
    fn reservation_after_migrating(dir: &tempfile::TempDir, through: i64) -> (rusqlite::Connection, Vec<(String, String)>) {
        let mut conn = connect(&dir.path().join("berth.db")).unwrap();
        migrate_through(&mut conn, 5).unwrap();
        conn.execute_batch(
            "INSERT INTO nodes (id, name, address, driver, total_mib, system_reserved_mib, cpu_cores, status, max_concurrent_starts, port_min, \
             port_max, epoch, sync_seq, registered_at) VALUES ('n1', 'node-1', '10.0.0.1', 'sim', 4096, 0, 2, 'ready', 4, 20000, 20010, 1, 0, 0);
             INSERT INTO servers (id, tenant, name, template, memory_mib, config, status, node_id, generation, port, created_at, updated_at) \
             VALUES ('s1', 't', 'one', 'x', 512, '{}', 'running', 'n1', 3, 20001, 0, 0), ('s2', 't', 'two', 'x', 256, '{}', 'queued', NULL, 0, NULL, 0, 0);
             INSERT INTO reservations (server_id, generation, node_id, memory_mib, port, state, created_at) VALUES ('s1', 3, 'n1', 512, 20001, 'active', 7);",
        )
        .unwrap();
        migrate_through(&mut conn, through).unwrap();

        let row: (i64, String, i64, i64, String, i64) = conn
            .query_row("SELECT generation, node_id, memory_mib, port, state, created_at FROM reservations WHERE server_id = 's1'", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .unwrap();
        assert_eq!(row, (3, "n1".into(), 512, 20001, "active".into(), 7));
        let insert = |server: &str, generation: i64, port: i64| {
            conn.execute(
                "INSERT INTO reservations (server_id, generation, node_id, memory_mib, port, state, created_at) VALUES (?, ?, 'n1', 256, ?, 'pending', 8)",
                rusqlite::params![server, generation, port],
            )
        };
        // One reservation per server, whatever its generation (L2).
        assert!(insert("s1", 4, 20002).is_err(), "a second reservation of one server was accepted");
        // One server per port of a node.
        assert!(insert("s2", 1, 20001).is_err(), "two reservations of one port were accepted");
        // A server that is not there has no reservation.
        assert!(insert("ghost", 1, 20003).is_err(), "a reservation of a missing server was accepted");
        insert("s2", 1, 20002).unwrap();
        let indexes: Vec<(String, String)> = conn
            .prepare("SELECT origin, name FROM pragma_index_list('reservations') ORDER BY origin")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (conn, indexes)
    }

    #[test]
    fn reservations_rekeyed_by_server_keep_their_rows_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (_, indexes) = reservation_after_migrating(&dir, 6);
        // The node's ports and the key: nothing written twice.
        assert_eq!(indexes.len(), 2, "{indexes:?}");
        assert_eq!(indexes[0], ("c".to_string(), "reservations_node_port".to_string()));
        assert_eq!(indexes[1].0, "pk");
    }

    #[test]
    fn reservations_stored_in_node_order_keep_their_rows_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, indexes) = reservation_after_migrating(&dir, 7);
        // The server's one reservation and the key: still two b-trees.
        assert_eq!(indexes.len(), 2, "{indexes:?}");
        assert_eq!(indexes[0], ("c".to_string(), "reservations_server".to_string()));
        assert_eq!(indexes[1].0, "pk");
        // The key is the node and its port: a node's rows are neighbours.
        let key: Vec<String> = column(&conn, &format!("SELECT name FROM pragma_index_info('{}') ORDER BY seqno", indexes[1].1), 0);
        assert_eq!(key, ["node_id", "port"]);
        // Read in key order: the node's ports, the lowest first.
        let ports: Vec<i64> = column(&conn, "SELECT port FROM reservations WHERE node_id = 'n1'", 0);
        assert_eq!(ports, [20001, 20002]);
    }

    /// Schema 8: a deleted server keeps its row and frees its name; the
    /// reads that look for a name, the queue and crashed servers use the
    /// new partial indexes; and a server's step from starting to running
    /// writes its row alone (one page), where schema 7 also rewrote its
    /// entries in the status and live-name indexes.
    #[test]
    fn a_status_step_writes_no_index_and_a_deleted_server_frees_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = connect(&dir.path().join("berth.db")).unwrap();
        migrate_through(&mut conn, 7).unwrap();
        conn.execute_batch(
            "INSERT INTO servers (id, tenant, name, template, memory_mib, config, status, generation, created_at, updated_at) \
             VALUES ('s1', 't', 'one', 'x', 512, '{}', 'deleted', 0, 0, 40), ('s2', 't', 'two', 'x', 256, '{}', 'starting', 1, 0, 50);",
        )
        .unwrap();
        migrate_through(&mut conn, 8).unwrap();
        let deleted_at = |id: &str| conn.query_row("SELECT deleted_at FROM servers WHERE id = ?", [id], |r| r.get::<_, Option<i64>>(0)).unwrap();
        assert_eq!((deleted_at("s1"), deleted_at("s2")), (Some(40), None));
        let insert = |id: &str, name: &str| {
            conn.execute(
                "INSERT INTO servers (id, tenant, name, template, memory_mib, config, status, generation, created_at, updated_at) \
                 VALUES (?, 't', ?, 'x', 128, '{}', 'stopped', 0, 60, 60)",
                [id, name],
            )
        };
        insert("s3", "one").expect("the deleted server's name is free");
        assert!(insert("s4", "two").is_err(), "a live server's name was taken twice");

        let plan = |sql: &str| -> String { column::<String>(&conn, &format!("EXPLAIN QUERY PLAN {sql}"), 3).join("; ") };
        assert!(plan(&format!("{} ORDER BY queued_at, id", crate::rows::QUEUED_SQL)).contains("servers_queue"));
        assert!(plan("SELECT id FROM servers WHERE name = 'one' AND deleted_at IS NULL").contains("servers_live_name"));
        assert!(plan("SELECT id FROM servers WHERE status = 'crashed'").contains("servers_crashed"));

        // Count the pages one committed step appends to the log.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        let wal = dir.path().join("berth.db-wal");
        let size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        conn.execute_batch("UPDATE servers SET updated_at = 61 WHERE id = 's3'").unwrap();
        let frame = size();
        assert!(frame > 0, "the log holds the first commit");
        conn.execute_batch("UPDATE servers SET status = 'running', updated_at = 62 WHERE id = 's2' AND status = 'starting'").unwrap();
        assert_eq!(size() - frame, frame - 32, "starting to running wrote more than the row's page");
    }

    /// Schema 9: operations keep their rows, keys, rules and indexes, the
    /// key counter goes on from where it was (a deleted newest operation's
    /// `seq` is not given again), and inserting or settling an operation
    /// opens no temporary b-tree, which the status CHECK's IN list did.
    #[test]
    fn operations_rebuilt_keep_their_rows_and_check_status_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = connect(&dir.path().join("berth.db")).unwrap();
        migrate_through(&mut conn, 8).unwrap();
        let ephemeral = |conn: &rusqlite::Connection, sql: &str| -> usize {
            column::<String>(conn, &format!("EXPLAIN {sql}"), 1).iter().filter(|o| *o == "OpenEphemeral").count()
        };
        let insert = "INSERT INTO operations (id, server_id, kind, status, origin, created_at) VALUES ('o9', 's1', 'start', 'running', 'user', 9)";
        let settle = "UPDATE operations SET status = 'succeeded', finished_at = 10 WHERE id = 'o1'";
        assert_eq!((ephemeral(&conn, insert), ephemeral(&conn, settle)), (1, 1), "schema 8 is not what this test thinks");
        conn.execute_batch(
            "INSERT INTO servers (id, tenant, name, template, memory_mib, config, status, generation, created_at, updated_at) \
             VALUES ('s1', 't', 'one', 'x', 512, '{}', 'running', 1, 0, 0); \
             INSERT INTO operations (id, server_id, kind, status, phase, origin, attempts, created_at, started_at) VALUES \
             ('o1', 's1', 'start', 'running', 'wait_running', 'user', 2, 5, 6), ('o2', 's1', 'stop', 'pending', NULL, 'user', 0, 7, NULL), \
             ('o3', 's1', 'kill', 'failed', NULL, 'user', 0, 8, NULL); \
             DELETE FROM operations WHERE id = 'o3';",
        )
        .unwrap();
        migrate_through(&mut conn, 9).unwrap();

        let rows: Vec<(i64, String, String, Option<String>, i64)> = conn
            .prepare("SELECT seq, id, status, phase, attempts FROM operations ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(1, "o1".into(), "running".into(), Some("wait_running".into()), 2), (2, "o2".into(), "pending".into(), None, 0)]);
        assert_eq!((ephemeral(&conn, insert), ephemeral(&conn, settle)), (0, 0), "the status CHECK builds a temporary b-tree again");
        conn.execute_batch(insert).unwrap();
        let seq: i64 = conn.query_row("SELECT seq FROM operations WHERE id = 'o9'", [], |r| r.get(0)).unwrap();
        assert_eq!(seq, 4, "the deleted operation's key was given again");
        assert!(conn.execute_batch("UPDATE operations SET status = 'paused' WHERE id = 'o1'").is_err(), "an unknown status was accepted");
        assert!(
            conn.execute_batch("INSERT INTO operations (id, server_id, kind, status, origin, created_at) VALUES ('o1', 's1', 'stop', 'pending', 'user', 11)")
                .is_err(),
            "an operation id was taken twice"
        );
        assert!(
            conn.execute_batch(
                "INSERT INTO operations (id, server_id, kind, status, origin, created_at) VALUES ('o8', 'ghost', 'stop', 'pending', 'user', 11)"
            )
            .is_err(),
            "an operation of a missing server was accepted"
        );
        let indexes: Vec<String> = column(&conn, "SELECT name FROM pragma_index_list('operations') WHERE origin = 'c' ORDER BY name", 0);
        assert_eq!(indexes, ["operations_active", "operations_server"]);
        let plan: String = conn.query_row("EXPLAIN QUERY PLAN SELECT seq FROM operations WHERE status IN ('pending', 'running')", [], |r| r.get(3)).unwrap();
        assert!(plan.contains("operations_active"), "{plan}");
    }

    /// SQLite is built without its process-wide page-cache lock and
    /// allocation counters (`.cargo/config.toml`): a build that lost the
    /// flags would still pass every other test, only slower.
    #[test]
    fn sqlite_is_built_without_global_locks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("berth.db")).unwrap();
        let options: Vec<String> = column(&conn, "PRAGMA compile_options", 0);
        assert!(!options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"), "SQLite shares one locked page cache: {options:?}");
        assert!(options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "SQLite counts allocations under a lock: {options:?}");
    }
}
