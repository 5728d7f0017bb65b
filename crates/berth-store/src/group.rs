//! Group commit for the SQLite writer.
//!
//! SQLite with `synchronous=FULL` pays one fsync per committed transaction,
//! and that fsync, not the queries, bounds how many writes a second one
//! writer connection makes. The writer task here takes every write job
//! waiting when it is free (up to `max_batch`), runs each inside its own
//! savepoint of one transaction, and commits once: one fsync for the whole
//! batch. A job that fails is rolled back to its savepoint, so it writes
//! nothing and the others are unaffected (a refusal still writes nothing,
//! L7). No answer is given before the commit that makes it durable, so
//! durability is exactly that of one transaction per write. Batching needs
//! no waiting window: the jobs that arrive while one batch commits form the
//! next. With `max_batch` 1 every job is its own transaction, the naive
//! path the benchmarks compare against.
//!
//! Jobs are queries and pure decisions only; a job must never await
//! anything outside its transaction, or it would hold up every write.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::{Sqlite, SqlitePool, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

pub(crate) type Tx = Transaction<'static, Sqlite>;
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One write waiting for the writer: runs once inside the batch's
/// transaction, then hears whether the batch committed.
trait Job: Send {
    /// Returns whether the job succeeded (its writes are kept).
    fn run<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, bool>;
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
    F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send,
    T: Send,
{
    fn run<'a>(&'a mut self, tx: &'a mut Tx) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let work = self.work.take().expect("a write job runs once");
            let out = work(tx).await;
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
            // A failed job wrote nothing whatever became of the batch.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)) | None, Err(why)) => Err(StoreError::NotCommitted(why)),
            (None, Ok(())) => Err(StoreError::NotCommitted("the write was not run".into())),
        };
        let _ = self.reply.send(answer);
    }
}

/// The handle of the writer task. Dropping every handle stops the task.
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
    pub(crate) fn spawn(pool: SqlitePool, max_batch: usize) -> GroupCommit {
        let (jobs, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        let task_counts = counts.clone();
        // The writer runs on a thread of its own: every statement of a
        // batch is a round trip to SQLite's worker thread, and on a busy
        // runtime each would wait behind request handlers for its turn.
        // The thread ends when every handle (sender) is gone.
        std::thread::Builder::new()
            .name("berth-store-writer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("the writer's runtime starts");
                rt.block_on(writer(pool, rx, max_batch.max(1), task_counts));
            })
            .expect("the writer thread starts");
        GroupCommit { jobs, counts }
    }

    /// (writes, commits) so far.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.counts.writes.load(Ordering::Relaxed), self.counts.commits.load(Ordering::Relaxed))
    }

    /// Runs `work` in the next batch and answers once that batch has
    /// committed (or with `work`'s own error, which rolled it back).
    pub(crate) async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending { work: Some(work), out: None, reply });
        self.jobs.send(job).map_err(|_| StoreError::NotCommitted("the store writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::NotCommitted("the store writer dropped the write".into()))?
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<Box<dyn Job>>, max_batch: usize, counts: Arc<Counts>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let t0 = std::time::Instant::now();
        let committed = if batch.len() == 1 { run_alone(&pool, &mut batch[0]).await } else { run_batch(&pool, &mut batch).await };
        tracing::debug!(jobs = batch.len(), ms = t0.elapsed().as_millis() as u64, "write batch");
        match &committed {
            Err(why) => tracing::warn!(jobs = batch.len(), error = %why, "a write batch did not commit"),
            Ok(()) => {
                let ok = batch.iter().filter(|j| j.succeeded()).count() as u64;
                counts.writes.fetch_add(ok, Ordering::Relaxed);
                if ok > 0 {
                    counts.commits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for job in batch {
            job.deliver(committed.clone());
        }
    }
}

/// One job in its own transaction: exactly the path without group commit.
// The batch functions return boxed futures: that pins their lifetimes down
// where the compiler checks the writer task is `Send`.
fn run_alone<'a>(pool: &'a SqlitePool, job: &'a mut Box<dyn Job>) -> BoxFuture<'a, Result<(), String>> {
    Box::pin(async move {
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    if job.run(&mut tx).await {
        tx.commit().await.map_err(|e| e.to_string())
    } else {
        // Dropping the transaction rolls it back; the job's own error is
        // its answer.
        drop(tx);
        Ok(())
    }
    })
}

fn run_batch<'a>(pool: &'a SqlitePool, batch: &'a mut [Box<dyn Job>]) -> BoxFuture<'a, Result<(), String>> {
    Box::pin(async move {
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    for job in batch.iter_mut() {
        exec(&mut tx, "SAVEPOINT berth_job").await.map_err(|e| format!("cannot open a savepoint: {e}"))?;
        let ok = job.run(&mut tx).await;
        // A failed job is undone alone. If even that fails (SQLite may have
        // rolled the whole transaction back on an I/O error or a full disk),
        // the batch is abandoned and every job hears it did not commit.
        if !ok {
            exec(&mut tx, "ROLLBACK TO berth_job").await.map_err(|e| format!("cannot roll back a savepoint: {e}"))?;
        }
        exec(&mut tx, "RELEASE berth_job").await.map_err(|e| format!("cannot release a savepoint: {e}"))?;
    }
    tx.commit().await.map_err(|e| e.to_string())
    })
}

fn exec<'a>(tx: &'a mut Tx, sql: &'static str) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::query(sql).execute(&mut **tx).await.map(|_| ()) })
}
