//! The SQLite writer: one thread, one connection, group commit.
//!
//! SQLite with `synchronous=FULL` pays one fsync per committed transaction.
//! The writer thread takes every write waiting when it is free (up to
//! `max_batch`), runs them one after another in one transaction, and
//! commits once: one fsync for the whole batch. A write that fails must
//! write nothing while the others are unaffected (a refusal still writes
//! nothing, L7). Most failures are refusals decided before any row
//! changes, so writes run bare; a write that fails after changing rows
//! (SQLite's change counter moved) has the whole transaction rolled back,
//! and the batch runs again with each write in its own savepoint, which
//! undoes the failing one alone. Writes decide from the rows and their
//! inputs only, so the second run decides as the first did. Savepoints
//! for every write cost a fifth of the writer's time: SQLite copies each
//! page a savepoint first touches. No answer is given before the commit
//! that makes it durable, so durability is exactly that of one transaction
//! per write. Batching needs no waiting window: the writes that arrive
//! while one batch commits form the next. With `max_batch` 1 every write
//! is its own transaction, the naive path the benchmarks compare against.
//!
//! Checkpoints (copying the log into the database file) run on a second
//! thread with its own connection, so no commit waits for one in the
//! common case; the log is fsynced at every commit either way.
//!
//! The thread owns its rusqlite connection and runs every statement itself
//! (`exec::LiteExec`): no statement crosses a thread. Writes are queries
//! and pure decisions only; one that awaited anything outside its
//! transaction would hold up every write.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::exec::{Exec, LiteExec};
use crate::store::WriteWork;
use crate::StoreError;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One write waiting for the writer: runs inside the batch's transaction
/// (again if the batch is run again; the last run's answer counts), then
/// hears whether the batch committed.
trait Job: Send {
    /// Returns whether the write succeeded (its changes are kept).
    fn run<'a>(&'a mut self, e: &'a mut dyn Exec) -> BoxFuture<'a, bool>;
    /// `Err` names why the batch did not commit.
    fn deliver(self: Box<Self>, committed: Result<(), String>);
    fn succeeded(&self) -> bool;
}

struct Pending<I, F, T> {
    input: I,
    work: F,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<I, F, T> Job for Pending<I, F, T>
where
    I: Send + Sync,
    F: for<'e> Fn(&'e mut dyn Exec, &'e I) -> BoxFuture<'e, Result<T, StoreError>> + Send,
    T: Send,
{
    fn run<'a>(&'a mut self, e: &'a mut dyn Exec) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let out = (self.work)(e, &self.input).await;
            let ok = out.is_ok();
            self.out = Some(out);
            ok
        })
    }

    fn succeeded(&self) -> bool {
        matches!(self.out, Some(Ok(_)))
    }

    fn deliver(self: Box<Self>, committed: Result<(), String>) {
        let answer = match (self.out, committed) {
            // A failed write wrote nothing whatever became of the batch.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)) | None, Err(why)) => Err(StoreError::NotCommitted(why)),
            (None, Ok(())) => Err(StoreError::NotCommitted("the write was not run".into())),
        };
        let _ = self.reply.send(answer);
    }
}

/// The handle of the writer thread. Dropping every handle stops it.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
    counts: Arc<Counts>,
}

/// Writes answered successfully, the commits that made them durable, and
/// the batches run a second time with savepoints.
#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    commits: AtomicU64,
    reruns: AtomicU64,
}

impl GroupCommit {
    /// Opens the writer's connection to `path` (already migrated) and
    /// starts its thread.
    pub(crate) fn spawn(path: &Path, max_batch: usize) -> Result<GroupCommit, StoreError> {
        let conn = crate::sqlite::connect(path)?;
        // Savepoints (a batch run again) and statement journals (a statement
        // that may fail after changing rows) copy the pages they first touch
        // into a sub-journal, by default a temporary file: when every write
        // ran in a savepoint, a third of the writer's time went to those
        // pwrites. The sub-journal only serves a rollback inside the open
        // transaction, so keeping it in memory changes nothing durable; it
        // holds at most the pages one write touches.
        conn.execute_batch("PRAGMA temp_store = MEMORY;")?;
        // Checkpoints run on their own thread (`checkpointer`); the writer
        // checkpoints itself only if the log grows far past that thread's
        // pace, so the log stays bounded even if the thread falls behind.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpoints = crate::sqlite::connect(path)?;
        let (nudge, nudged) = std::sync::mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        let task_counts = counts.clone();
        std::thread::Builder::new()
            .name("berth-store-writer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("the writer's runtime starts");
                rt.block_on(writer(conn, rx, max_batch.max(1), task_counts, nudge));
            })
            .map_err(|e| StoreError::NotCommitted(format!("cannot start the writer thread: {e}")))?;
        std::thread::Builder::new()
            .name("berth-store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, nudged))
            .map_err(|e| StoreError::NotCommitted(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(GroupCommit { jobs, counts })
    }

    /// (writes, commits, batches run again) so far.
    pub(crate) fn stats(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (c.writes.load(Ordering::Relaxed), c.commits.load(Ordering::Relaxed), c.reruns.load(Ordering::Relaxed))
    }

    /// Runs `work` over `input` in the next batch and answers once that
    /// batch has committed (or with `work`'s own error, which wrote nothing).
    pub(crate) async fn write<I, T, F>(&self, input: I, work: F) -> Result<T, StoreError>
    where
        I: Send + Sync + 'static,
        T: Send + 'static,
        F: WriteWork<I, T>,
    {
        let answer = self.enqueue(input, work)?;
        answer.await.map_err(|_| StoreError::NotCommitted("the store writer dropped the write".into()))?
    }

    fn enqueue<I, T, F>(&self, input: I, work: F) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        I: Send + Sync + 'static,
        T: Send + 'static,
        F: WriteWork<I, T>,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending { input, work, out: None, reply });
        self.jobs.send(job).map_err(|_| StoreError::NotCommitted("the store writer has stopped".into()))?;
        Ok(answer)
    }
}

/// The log size (pages, 40 MB) at which the writer checkpoints inside its
/// own commit. The checkpoint thread copies pages while commits keep
/// coming, so it rarely finds the log wholly copied; only a checkpoint
/// right after a commit lets the next transaction start the log over.
/// By the time the writer's turn comes the thread has copied nearly
/// everything, so it is short. Measured on the admission burst (three
/// runs each): 1,000 pages 1,586-1,693/s, 4,000 1,592-1,851/s, 10,000
/// 1,738-2,046/s.
const WRITER_CHECKPOINT_PAGES: i64 = 10_000;

/// How long the checkpoint thread lets commits gather before it copies
/// them into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Copies committed pages from the log into the database file, off the
/// writer's thread. SQLite's automatic checkpoint runs inside the COMMIT
/// that crosses its threshold, so one write in every few batches waited
/// for a checkpoint's writes and fsync on top of its own (commit p90 11 ms
/// against p50 2 ms under the admission burst). A passive checkpoint on
/// another connection takes no lock the writer needs; durability is the
/// log's, and the log is fsynced at every commit either way. Ends when the
/// writer does.
fn checkpointer(conn: rusqlite::Connection, nudged: std::sync::mpsc::Receiver<()>) {
    let mut failing = false;
    while nudged.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        let _ = nudged.try_recv();
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            // Said once per streak: a full disk would repeat it ten times a second.
            Err(e) if !failing => {
                tracing::warn!(error = %e, "a checkpoint failed; the next one retries it");
                failing = true;
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
}

async fn writer(
    mut conn: rusqlite::Connection,
    mut rx: mpsc::UnboundedReceiver<Box<dyn Job>>,
    max_batch: usize,
    counts: Arc<Counts>,
    nudge: std::sync::mpsc::SyncSender<()>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = run_batch(&mut conn, &mut batch, &counts).await;
        match &committed {
            Err(why) => {
                tracing::warn!(jobs = batch.len(), error = %why, "a write batch did not commit");
                // Whatever the error left open is closed before the next batch.
                let _ = conn.execute_batch("ROLLBACK");
            }
            Ok(()) => {
                let ok = batch.iter().filter(|j| j.succeeded()).count() as u64;
                counts.writes.fetch_add(ok, Ordering::Relaxed);
                if ok > 0 {
                    counts.commits.fetch_add(1, Ordering::Relaxed);
                    // Full means a checkpoint is already due.
                    let _ = nudge.try_send(());
                }
            }
        }
        for job in batch {
            job.deliver(committed.clone());
        }
    }
}

fn sql(conn: &rusqlite::Connection, text: &str) -> Result<(), String> {
    crate::sqlite::run_cached(conn, text).map_err(|e| format!("{text}: {e}"))
}

async fn run_batch(conn: &mut rusqlite::Connection, batch: &mut [Box<dyn Job>], counts: &Counts) -> Result<(), String> {
    sql(conn, "BEGIN IMMEDIATE")?;
    if batch.len() == 1 {
        // One write is its own transaction: exactly the path without group
        // commit. A failed write is rolled back whole; its error is its answer.
        let ok = batch[0].run(&mut LiteExec { conn: &mut *conn }).await;
        return if ok { sql(conn, "COMMIT") } else { sql(conn, "ROLLBACK") };
    }
    if run_bare(conn, batch).await? {
        return sql(conn, "COMMIT");
    }
    // A write failed after changing rows: none of the batch is kept, and
    // it runs again with every write in a savepoint of its own.
    counts.reruns.fetch_add(1, Ordering::Relaxed);
    sql(conn, "ROLLBACK")?;
    sql(conn, "BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        sql(conn, "SAVEPOINT berth_write")?;
        let ok = job.run(&mut LiteExec { conn: &mut *conn }).await;
        // A failed write is undone alone. If even that fails (SQLite may have
        // rolled the whole transaction back on an I/O error or a full disk),
        // the batch is abandoned and every write hears it did not commit.
        if !ok {
            sql(conn, "ROLLBACK TO berth_write")?;
        }
        sql(conn, "RELEASE berth_write")?;
    }
    sql(conn, "COMMIT")
}

/// Runs the batch's writes without savepoints. `Ok(false)` as soon as one
/// fails after changing rows (it cannot be undone alone); a write that
/// fails before changing any is left out at no cost.
async fn run_bare(conn: &mut rusqlite::Connection, batch: &mut [Box<dyn Job>]) -> Result<bool, String> {
    for job in batch.iter_mut() {
        // Counts rows changed by every statement that completed; a
        // statement that failed had its own changes undone by SQLite.
        let before = conn.total_changes();
        let ok = job.run(&mut LiteExec { conn: &mut *conn }).await;
        // SQLite rolls the whole transaction back on some errors (a full
        // disk, I/O): nothing of the batch is left to commit.
        if conn.is_autocommit() {
            return Err("sqlite rolled the batch's transaction back".into());
        }
        if !ok && conn.total_changes() != before {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    type Answer = oneshot::Receiver<Result<(), StoreError>>;

    /// A writer over a fresh database with one table `t (name UNIQUE)`.
    fn writer_on(dir: &tempfile::TempDir) -> (GroupCommit, std::path::PathBuf) {
        let path = dir.path().join("w.db");
        crate::sqlite::connect(&path).unwrap().execute_batch("CREATE TABLE t (name TEXT NOT NULL UNIQUE)").unwrap();
        (GroupCommit::spawn(&path, 256).unwrap(), path)
    }

    /// Holds the writer inside a write until `open` is called, so that the
    /// writes queued meanwhile are taken as one batch.
    #[derive(Default)]
    struct Gate(Mutex<bool>, Condvar);

    impl Gate {
        fn hold(g: &GroupCommit) -> (Arc<Gate>, Answer) {
            let gate = Arc::new(Gate::default());
            let answer = g
                .enqueue(gate.clone(), |_, gate: &Arc<Gate>| {
                    Box::pin(async move {
                        let mut open = gate.0.lock().unwrap();
                        while !*open {
                            open = gate.1.wait(open).unwrap();
                        }
                        Ok(())
                    })
                })
                .unwrap();
            (gate, answer)
        }

        fn open(&self) {
            *self.0.lock().unwrap() = true;
            self.1.notify_all();
        }
    }

    /// Inserts `names` in order; fails after them if `fail` is set.
    fn insert(g: &GroupCommit, names: &[&str], fail: bool) -> Answer {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        g.enqueue(names, move |e, names: &Vec<String>| {
            Box::pin(async move {
                for n in names {
                    e.exec("INSERT INTO t (name) VALUES (?)", args![n.as_str()]).await?;
                }
                if fail {
                    return Err(StoreError::Conflict("refused after writing".into()));
                }
                Ok(())
            })
        })
        .unwrap()
    }

    fn names(path: &Path) -> Vec<String> {
        let conn = crate::sqlite::connect(path).unwrap();
        let mut stmt = conn.prepare("SELECT name FROM t ORDER BY name").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    #[tokio::test]
    async fn a_write_failing_after_changes_is_undone_alone_and_its_batch_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let (g, path) = writer_on(&dir);
        let (gate, held) = Gate::hold(&g);
        let a = insert(&g, &["a1", "a2"], false);
        let b = insert(&g, &["b1", "b2"], true);
        // Fails on its own statement: the unique name; nothing of it stays.
        let c = insert(&g, &["c1", "a1"], false);
        let d = insert(&g, &["d1"], false);
        gate.open();
        held.await.unwrap().unwrap();
        a.await.unwrap().unwrap();
        assert!(matches!(b.await.unwrap(), Err(StoreError::Conflict(_))));
        assert!(c.await.unwrap().is_err());
        d.await.unwrap().unwrap();
        assert_eq!(names(&path), ["a1", "a2", "d1"]);
        let (writes, _, reruns) = g.stats();
        assert_eq!((writes, reruns), (3, 1), "b wrote before failing: its batch ran again");
    }

    #[tokio::test]
    async fn a_write_failing_before_any_change_costs_no_second_run() {
        let dir = tempfile::tempdir().unwrap();
        let (g, path) = writer_on(&dir);
        let (gate, held) = Gate::hold(&g);
        let a = insert(&g, &["a1"], false);
        let refused = insert(&g, &[], true);
        // The duplicate fails in its first statement, which SQLite undoes.
        let duplicate = insert(&g, &["a1"], false);
        let b = insert(&g, &["b1"], false);
        gate.open();
        held.await.unwrap().unwrap();
        a.await.unwrap().unwrap();
        assert!(refused.await.unwrap().is_err());
        assert!(duplicate.await.unwrap().is_err());
        b.await.unwrap().unwrap();
        assert_eq!(names(&path), ["a1", "b1"]);
        assert_eq!(g.stats().2, 0, "no write changed rows and then failed");
    }
}
