//! The SQLite writer: one thread, one connection, group commit.
//!
//! SQLite with `synchronous=FULL` pays one fsync per committed transaction.
//! The writer thread takes every write waiting when it is free (up to
//! `max_batch`), runs each inside its own savepoint of one transaction, and
//! commits once: one fsync for the whole batch. A write that fails is
//! rolled back to its savepoint, so it writes nothing and the others are
//! unaffected (a refusal still writes nothing, L7). No answer is given
//! before the commit that makes it durable, so durability is exactly that
//! of one transaction per write. Batching needs no waiting window: the
//! writes that arrive while one batch commits form the next. With
//! `max_batch` 1 every write is its own transaction, the naive path the
//! benchmarks compare against.
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
use crate::StoreError;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One write waiting for the writer: runs once inside the batch's
/// transaction, then hears whether the batch committed.
trait Job: Send {
    /// Returns whether the write succeeded (its changes are kept).
    fn run<'a>(&'a mut self, e: &'a mut dyn Exec) -> BoxFuture<'a, bool>;
    /// `Err` names why the batch did not commit.
    fn deliver(self: Box<Self>, committed: Result<(), String>);
    fn succeeded(&self) -> bool;
}

struct Pending<F, T> {
    work: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<F, T> Job for Pending<F, T>
where
    F: for<'e> FnOnce(&'e mut dyn Exec) -> BoxFuture<'e, Result<T, StoreError>> + Send,
    T: Send,
{
    fn run<'a>(&'a mut self, e: &'a mut dyn Exec) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let work = self.work.take().expect("a write job runs once");
            let out = work(e).await;
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

/// Writes answered successfully and the commits that made them durable.
#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    commits: AtomicU64,
}

impl GroupCommit {
    /// Opens the writer's connection to `path` (already migrated) and
    /// starts its thread.
    pub(crate) fn spawn(path: &Path, max_batch: usize) -> Result<GroupCommit, StoreError> {
        let conn = crate::sqlite::connect(path)?;
        // Each write runs in a savepoint, and SQLite copies every page a
        // savepoint first touches into a sub-journal, by default a temporary
        // file: a third of the writer's time went to those pwrites. The
        // sub-journal only serves a rollback inside the open transaction,
        // so keeping it in memory changes nothing durable; it holds at most
        // the pages one write touches.
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

    /// (writes, commits) so far.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.counts.writes.load(Ordering::Relaxed), self.counts.commits.load(Ordering::Relaxed))
    }

    /// Runs `work` in the next batch and answers once that batch has
    /// committed (or with `work`'s own error, which rolled it back).
    pub(crate) async fn write<T: Send + 'static, F: crate::store::Work<T>>(&self, work: F) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending { work: Some(work), out: None, reply });
        self.jobs.send(job).map_err(|_| StoreError::NotCommitted("the store writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::NotCommitted("the store writer dropped the write".into()))?
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
        let committed = run_batch(&mut conn, &mut batch).await;
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

async fn run_batch(conn: &mut rusqlite::Connection, batch: &mut [Box<dyn Job>]) -> Result<(), String> {
    sql(conn, "BEGIN IMMEDIATE")?;
    if batch.len() == 1 {
        // One write is its own transaction: exactly the path without group
        // commit. A failed write is rolled back whole; its error is its answer.
        let ok = batch[0].run(&mut LiteExec { conn: &mut *conn }).await;
        return if ok { sql(conn, "COMMIT") } else { sql(conn, "ROLLBACK") };
    }
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
