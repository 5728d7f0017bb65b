//! The store suite against SQLite, plus what only a file database shows:
//! committed rows survive closing and reopening (L6).

#[allow(dead_code)] // the two-replica case needs a server database
mod suite;

use std::sync::Arc;

use berth_core::{MemMib, NewEvent, NodeId};
use berth_store::{SqliteOptions, SqliteStore, Store};

async fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("berth.db")).await.unwrap()
}

macro_rules! suite_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir).await;
            suite::$name(&store).await;
            mirror_matches_rows(&store).await;
        }
    )*};
}

suite_tests!(
    stale_plans_cannot_overcommit,
    ports_are_unique_and_stale_servers_refused,
    syncs_are_fenced_by_epoch_and_sequence,
    report_changes_are_conditional_on_generation,
    a_sync_confirms_many_servers_at_once,
    names_and_transitions,
    events_filter_and_page,
    operations_follow_the_guard_table,
    kill_is_ordered_until_the_instance_is_gone,
    a_stopping_server_is_billed_until_the_stop_is_confirmed,
    failing_and_restart_bookkeeping,
    webhooks_fan_out_retry_and_disable,
    a_start_is_placed_in_its_own_write_when_it_fits,
);

/// The writer's copy of the servers (what requests and syncs read) equals
/// the rows, server by server, once the writes are answered.
async fn mirror_matches_rows(store: &SqliteStore) {
    let (mirrored, rows) = store.mirror_and_rows().await.unwrap();
    assert_eq!(mirrored.len(), rows.len(), "servers in the copy and in the rows");
    for (m, r) in mirrored.iter().zip(&rows) {
        assert_eq!(m, r, "server {} differs between the copy and the rows", r.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_never_exceed_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir).await);
    suite::concurrent_commits_never_exceed_a_node(store.clone()).await;
    mirror_matches_rows(&store).await;
}

/// Rows another process changed reach the copy from the writer's next
/// batch on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_follows_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let s = suite::queued(&store, "copy-a", 256).await;
    mirror_matches_rows(&store).await;
    // Another process renames the server behind the store's back.
    let conn = rusqlite::Connection::open(dir.path().join("berth.db")).unwrap();
    conn.execute("UPDATE servers SET name = 'copy-renamed' WHERE id = ?", [&s.id.0]).unwrap();
    drop(conn);
    // The writer notices at its next batch.
    suite::queued(&store, "copy-b", 256).await;
    mirror_matches_rows(&store).await;
    assert_eq!(store.get_server("copy-renamed").await.unwrap().map(|x| x.id), Some(s.id.clone()));
    assert!(store.get_server("copy-a").await.unwrap().is_none(), "the old name is gone from the copy");
}

/// Group commit answers every write of a burst as if it ran alone, and
/// folds them into fewer commits; with group commit off (one transaction
/// per write, the benchmarks' naive path) the answers are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_group_committed_with_the_same_answers() {
    for group_commit_max in [256, 1] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_with(&dir.path().join("berth.db"), SqliteOptions { group_commit_max }).await.unwrap());
        suite::a_burst_of_writes_is_answered_write_by_write(store.clone()).await;
        mirror_matches_rows(&store).await;
        let stats = store.write_stats().unwrap();
        assert!(stats.writes >= 40 + 40 + 30, "{stats:?}");
        if group_commit_max == 1 {
            assert_eq!(stats.commits, stats.writes, "one commit per write: {stats:?}");
        } else {
            assert!(stats.commits < stats.writes, "a burst shares commits: {stats:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_survive_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir).await;
        suite::stale_plans_cannot_overcommit(&store).await;
    }
    let store = open(&dir).await;
    let usage = store.node_usage().await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].reserved, MemMib(2048));
    assert_eq!(usage[0].node_id, NodeId("node_0000000000000001".into()));
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir).await);
    let conn = rusqlite::Connection::open(dir.path().join("berth.db")).unwrap();
    conn.execute("INSERT INTO schema_migrations (version) VALUES (99)", []).unwrap();
    drop(conn);
    let e = SqliteStore::open(&dir.path().join("berth.db")).await.err().expect("refused");
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn leadership_is_exclusive_and_fences_commits() {
    let dir = tempfile::tempdir().unwrap();
    suite::leadership_is_exclusive_and_fences_commits(&open(&dir).await).await;
}

/// Committed pages reach the database file by the checkpoint thread, long
/// before the log grows to the size at which the writer would checkpoint
/// inside a commit (10,000 pages): the log does not grow unchecked and no
/// commit carries a checkpoint's cost in the common case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_pages_are_checkpointed_off_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.db");
    let store = open(&dir).await;
    let db_len = || std::fs::metadata(&path).unwrap().len();
    let before = db_len();
    // About 400 KB of rows: far below the writer's own threshold (40 MB).
    for i in 0..1000 {
        store
            .insert_server(
                &suite::server(&format!("ckpt-{i:04}"), 100),
                &NewEvent { kind: "server_created", server_id: None, node_id: None, message: "x".repeat(100) },
            )
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while db_len() < before + 200 * 1024 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(db_len() >= before + 200 * 1024, "the database file grew from {before} to {} bytes only", db_len());
}
