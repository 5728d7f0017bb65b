//! The SQLite writer: one thread, one connection, group commit.
//!
//! Every committed transaction costs one fsync of the log. The writer
//! thread runs writes one after another as they arrive, in one open
//! transaction, and commits it when the flusher (below) is free and no
//! write waits or the batch has run `BATCH_BUDGET`, or when the batch
//! holds `max_batch` writes: one fsync for the whole batch, and no
//! waiting window (the writes that arrive during one fsync form the next
//! batch). A write that fails must write nothing while the others are
//! unaffected (a refusal still writes nothing, L7). Most failures are
//! refusals decided before any row changes, so writes run bare; a write
//! that fails after changing rows (SQLite's change counter moved) has the
//! whole transaction rolled back, and the batch runs again with each write
//! in its own savepoint, which undoes the failing one alone. Writes decide
//! from the rows and their inputs only, so the second run decides as the
//! first did. Savepoints for every write cost a fifth of the writer's
//! time: SQLite copies each page a savepoint first touches.
//!
//! The fsync is pipelined: with group commit on, the writer's connection
//! commits with `synchronous=NORMAL` (the log is written, not yet synced)
//! and hands the batch to a flusher thread, which fsyncs the log once for
//! every batch committed since its last fsync and only then answers them.
//! The writer meanwhile runs the next batch's statements, instead of
//! sleeping through the 2-3 ms fsync that was a third of its time. Nothing
//! that is not on disk is seen outside the store: every answer, of a write
//! or of a read, waits until the log is flushed past every commit it may
//! have seen (`settled`), so durability is exactly that of one
//! `synchronous=FULL` transaction per write. A failed fsync poisons the
//! store: what it should have flushed is in an unknown state (Linux may
//! drop the dirty pages and report success on a retry), so every write and
//! read after it fails until a restart reads the truth back from the disk.
//! With `max_batch` 1 every write is its own `synchronous=FULL` transaction,
//! answered at once: the naive path the benchmarks compare against.
//!
//! Checkpoints (copying the log into the database file) run on a second
//! thread with its own connection, so no commit waits for one in the
//! common case; a checkpoint fsyncs the log before it copies.
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

use tokio::sync::{mpsc, oneshot, watch};

use crate::exec::{Exec, LiteExec};
use crate::mirror::{Mirror, Update};
use crate::store::WriteWork;
use crate::StoreError;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One write waiting for the writer: runs inside the batch's transaction
/// (again if the batch is run again; the last run's answer counts), then
/// hears whether the batch committed.
trait Job: Send {
    /// Returns whether the write succeeded (its changes are kept).
    fn run<'a>(&'a mut self, e: &'a mut dyn Exec) -> BoxFuture<'a, bool>;
    fn deliver(self: Box<Self>, outcome: Outcome);
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

    fn deliver(self: Box<Self>, outcome: Outcome) {
        let answer = match (self.out, outcome) {
            // A failed write wrote nothing whatever became of the batch.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Outcome::Durable) => Ok(v),
            (_, Outcome::NotCommitted(why)) => Err(StoreError::NotCommitted(why)),
            (_, Outcome::Unknown(why)) => Err(StoreError::Unavailable(why.to_string())),
            (None, Outcome::Durable) => Err(StoreError::NotCommitted("the write was not run".into())),
        };
        let _ = self.reply.send(answer);
    }
}

/// What became of a write's batch.
#[derive(Clone)]
enum Outcome {
    /// Committed and on disk.
    Durable,
    /// Not committed, for the reason given: nothing of it was written.
    NotCommitted(String),
    /// Committed, but the log failed to flush: it may or may not survive.
    Unknown(Arc<str>),
}

impl Outcome {
    fn of(committed: Result<(), String>) -> Outcome {
        match committed {
            Ok(()) => Outcome::Durable,
            Err(why) => Outcome::NotCommitted(why),
        }
    }
}

/// The handle of the writer thread. Dropping every handle stops it.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
    counts: Arc<Counts>,
    durability: Arc<Durability>,
}

/// How far the commits are on disk. Commits are numbered in the order the
/// writer begins them; `begun` is stored before a COMMIT is issued, so a
/// reader that loads it after its read transaction has a bound on every
/// commit its snapshot can hold.
struct Durability {
    begun: AtomicU64,
    flushed: watch::Sender<Flushed>,
}

/// Every commit up to `seq` is on disk, unless the log failed to flush.
#[derive(Clone, Default)]
struct Flushed {
    seq: u64,
    failed: Option<Arc<str>>,
}

impl Durability {
    fn failed(&self) -> Option<Arc<str>> {
        self.flushed.borrow().failed.clone()
    }
}

/// Makes the log durable: fsyncs the `-wal` file.
pub(crate) type FlushLog = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Flushes the log of the database at `path`. The file is opened anew each
/// time (a few microseconds), so no descriptor can outlive a log SQLite
/// replaced; SQLite keeps the log while any connection is open, and the
/// writer's always is.
fn flush_wal(path: &Path) -> FlushLog {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    Box::new(move || std::fs::File::open(&wal)?.sync_data())
}

/// A committed batch waiting for its flush.
struct Flush {
    seq: u64,
    wrote: bool,
    committed: Result<(), String>,
    batch: Vec<Box<dyn Job>>,
    /// What the commit did to the mirror, applied once it is on disk.
    mirrored: Option<(Arc<Mirror>, Update)>,
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
    pub(crate) fn spawn(path: &Path, max_batch: usize, mirror: Option<Arc<Mirror>>) -> Result<GroupCommit, StoreError> {
        Self::spawn_with(path, max_batch, flush_wal(path), mirror)
    }

    /// `spawn` with the log flushed by `flush` (tests hold it up or fail it).
    fn spawn_with(path: &Path, max_batch: usize, flush: FlushLog, mirror: Option<Arc<Mirror>>) -> Result<GroupCommit, StoreError> {
        let max_batch = max_batch.max(1);
        let pipelined = max_batch > 1;
        let conn = crate::sqlite::connect(path)?;
        if pipelined {
            // The flusher fsyncs the log before any of these commits is
            // answered or seen (module comment).
            conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
        }
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
        let mirror = mirror.map(|m| Mirrored::install(&conn, m)).transpose()?;
        let checkpoints = crate::sqlite::connect(path)?;
        let (nudge, nudged) = std::sync::mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        let task_counts = counts.clone();
        let durability = Arc::new(Durability { begun: AtomicU64::new(0), flushed: watch::Sender::new(Flushed::default()) });
        let flushes = if pipelined {
            let (tx, rx) = std::sync::mpsc::channel();
            let d = durability.clone();
            std::thread::Builder::new()
                .name("berth-store-flush".into())
                .spawn(move || {
                    serial_stage_priority();
                    flusher(rx, flush, d)
                })
                .map_err(|e| StoreError::NotCommitted(format!("cannot start the log flusher thread: {e}")))?;
            Some(tx)
        } else {
            None
        };
        let d = durability.clone();
        std::thread::Builder::new()
            .name("berth-store-writer".into())
            .spawn(move || {
                serial_stage_priority();
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("the writer's runtime starts");
                rt.block_on(writer(conn, rx, max_batch, task_counts, Downstream { nudge, flushes }, d, mirror));
            })
            .map_err(|e| StoreError::NotCommitted(format!("cannot start the writer thread: {e}")))?;
        std::thread::Builder::new()
            .name("berth-store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, nudged))
            .map_err(|e| StoreError::NotCommitted(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(GroupCommit { jobs, counts, durability })
    }

    /// Waits until every commit a read that just ended may have seen is on
    /// disk, so that nothing is answered before it is durable. Returns at
    /// once when the writer is idle (the common case off a burst).
    pub(crate) async fn settled(&self) -> Result<(), StoreError> {
        let bound = self.durability.begun.load(Ordering::SeqCst);
        {
            let now = self.durability.flushed.borrow();
            if now.seq >= bound && now.failed.is_none() {
                return Ok(());
            }
        }
        let mut flushed = self.durability.flushed.subscribe();
        let now = flushed
            .wait_for(|f| f.seq >= bound || f.failed.is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?
            .clone();
        match now.failed {
            Some(why) => Err(StoreError::Unavailable(why.to_string())),
            None => Ok(()),
        }
    }

    /// Fails once a flush failed (the store is poisoned), without waiting.
    pub(crate) fn healthy(&self) -> Result<(), StoreError> {
        match self.durability.failed() {
            Some(why) => Err(StoreError::Unavailable(why.to_string())),
            None => Ok(()),
        }
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

/// How long a batch runs writes before it commits while writes keep
/// coming. Without a bound a batch took writes for as long as any waited
/// (30-40 on average, up to 190 and 100 ms under a wave of agents'
/// reports), and every write in it was answered only at its end, so its
/// clients came back together as the next wave. Four alternating pairs of
/// admission bursts: p99 99 ms against 127 ms unbounded, placements/s
/// within noise (4,945 against 4,792 mean).
const BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(2);

/// How long the checkpoint thread lets commits gather before it copies
/// them into the database file. At 1 s instead (fewer copies of the hot
/// pages) the writer's own checkpoint, when the log reaches its threshold,
/// found more left to copy: its COMMIT took up to 27.6 and 46.6 ms in two
/// bursts against 14.5 and 13.7 ms at 100 ms, and every start in flight
/// waits for that commit (`BENCHMARKS.md`, 2026-12-06, night).
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
    downstream: Downstream,
    durability: Arc<Durability>,
    mut mirror: Option<Mirrored>,
) {
    let Downstream { nudge, flushes } = downstream;
    let _stopped = Stopped(durability.clone());
    let mut seq = 0u64;
    let mut flushed = durability.flushed.subscribe();
    while let Some(first) = rx.recv().await {
        if let Some(why) = durability.failed() {
            // What ran now could not be made durable either: nothing runs.
            first.deliver(Outcome::NotCommitted(why.to_string()));
            continue;
        }
        let mut batch = vec![first];
        // Writes run as they arrive, in one open transaction, until the
        // flusher is free for the next commit (at once without one): so a
        // batch is what arrives during one fsync, and its statements ran
        // while that fsync did.
        let mut run = match begin(&conn, mirror.as_mut()) {
            Ok(()) => run_bare(&mut conn, &mut batch[0]).await,
            Err(why) => Err(why),
        };
        let opened = std::time::Instant::now();
        while matches!(run, Ok(true)) && batch.len() < max_batch {
            // A batch that has run its budget commits as soon as the
            // flusher is free, even with writes still waiting.
            if opened.elapsed() >= BATCH_BUDGET && (flushes.is_none() || flushed.borrow_and_update().seq >= seq) {
                break;
            }
            let job = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) if flushes.is_none() || flushed.borrow_and_update().seq >= seq => break,
                Err(_) => tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => Some(job),
                        None => break,
                    },
                    // A flush ended (or the flusher stopped): look again.
                    _ = flushed.changed() => None,
                },
            };
            if let Some(mut job) = job {
                run = run_bare(&mut conn, &mut job).await;
                batch.push(job);
            }
        }
        seq += 1;
        durability.begun.store(seq, Ordering::SeqCst);
        let mut update = mirror.as_mut().map(|m| Update { reload: m.reload.take(), rows: Vec::new() });
        let committed = match run {
            Ok(true) => commit(&conn, mirror.as_ref(), update.as_mut()),
            Ok(false) => {
                // The writes waiting now join the second run, as they would
                // have joined the batch: one rerun, not one per failure.
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let second = rerun(&mut conn, &mut batch, &counts, mirror.as_mut()).await;
                // A reload the second run's BEGIN read replaces the first's.
                if let (Some(u), Some(whole)) = (update.as_mut(), mirror.as_mut().and_then(|m| m.reload.take())) {
                    u.reload = Some(whole);
                }
                match second {
                    Ok(true) => commit(&conn, mirror.as_ref(), update.as_mut()),
                    Ok(false) => Ok(()),
                    Err(why) => Err(why),
                }
            }
            Err(why) => Err(why),
        };
        let mut wrote = false;
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
                    wrote = true;
                    counts.commits.fetch_add(1, Ordering::Relaxed);
                    // Full means a checkpoint is already due.
                    let _ = nudge.try_send(());
                }
            }
        }
        let mirrored = mirror.as_ref().zip(update).map(|(m, u)| (m.mirror.clone(), u));
        match &flushes {
            Some(flushes) => {
                if let Err(std::sync::mpsc::SendError(f)) = flushes.send(Flush { seq, wrote, committed, batch, mirrored }) {
                    deliver(f.batch, Outcome::Unknown("the store's log flusher has stopped".into()));
                }
            }
            None => {
                // synchronous=FULL: the commit is on disk.
                if let Some((m, u)) = mirrored {
                    m.apply(u);
                }
                durability.flushed.send_modify(|f| f.seq = seq);
                deliver(batch, Outcome::of(committed));
            }
        }
    }
}

/// Where the writer hands what it committed: the checkpointer, nudged
/// after each commit, and the flusher (none on the naive path, whose
/// commits are flushed by themselves).
struct Downstream {
    nudge: std::sync::mpsc::SyncSender<()>,
    flushes: Option<std::sync::mpsc::Sender<Flush>>,
}

/// Answers every write of a batch with what became of it.
fn deliver(batch: Vec<Box<dyn Job>>, outcome: Outcome) {
    for job in batch {
        job.deliver(outcome.clone());
    }
}

/// Tells waiting readers that the writer is gone (it ended, or a write
/// panicked), so none waits for a flush that will never come.
struct Stopped(Arc<Durability>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.flushed.send_modify(|f| {
            f.failed.get_or_insert_with(|| "the store writer has stopped".into());
        });
    }
}

/// How much sooner than the request handlers the writer and the flusher
/// get a core (a nice value below the default 0).
const SERIAL_STAGE_NICE: i32 = -10;

/// Every write, and every answer to one, passes through the writer and
/// then the flusher, one at a time. On a busy machine the kernel's fair
/// share would give each of them a core only as often as any request
/// handler, while all of those wait on them; so they run at a higher
/// priority. Raising a priority needs `CAP_SYS_NICE`; without it they run
/// at the default, as before.
fn serial_stage_priority() {
    // SAFETY: gettid and setpriority have no preconditions; they change
    // only this thread's scheduling.
    let ok = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, SERIAL_STAGE_NICE) == 0
    };
    if !ok {
        tracing::debug!(error = %std::io::Error::last_os_error(), "the store's writer runs at the default priority");
    }
}

/// Fsyncs the log once for every batch committed since the last fsync,
/// then answers their writes, in commit order. Ends when the writer does.
fn flusher(rx: std::sync::mpsc::Receiver<Flush>, mut flush: FlushLog, durability: Arc<Durability>) {
    let mut failed: Option<Arc<str>> = None;
    while let Ok(first) = rx.recv() {
        let mut due = vec![first];
        due.extend(rx.try_iter());
        let seq = due.last().map(|f| f.seq).unwrap_or_default();
        if failed.is_none() && due.iter().any(|f| f.wrote) {
            if let Err(e) = flush() {
                tracing::error!(error = %e, "the store's log could not be flushed to disk; every write and read fails until the control plane restarts");
                failed = Some(
                    format!(
                        "the store's log could not be flushed to disk ({e}): whether the last writes survive is known only after the control plane restarts"
                    )
                    .into(),
                );
            }
        }
        if failed.is_none() {
            // The mirror shows a commit only once it is on disk, before
            // anyone learns it is (`settled`, the answers).
            for f in due.iter_mut() {
                if let Some((m, u)) = f.mirrored.take() {
                    m.apply(u);
                }
            }
        }
        durability.flushed.send_modify(|f| {
            f.seq = seq;
            if let Some(why) = &failed {
                f.failed.get_or_insert_with(|| why.clone());
            }
        });
        for f in due {
            let outcome = match (&failed, f.committed) {
                (Some(why), Ok(())) => Outcome::Unknown(why.clone()),
                (_, committed) => Outcome::of(committed),
            };
            deliver(f.batch, outcome);
        }
    }
}

fn sql(conn: &rusqlite::Connection, text: &str) -> Result<(), String> {
    crate::sqlite::run_cached(conn, text).map_err(|e| format!("{text}: {e}"))
}

/// Runs one write of the open transaction without a savepoint. `Ok(false)`
/// if it failed after changing rows (it cannot be undone alone); a write
/// that fails before changing any is left out at no cost.
async fn run_bare(conn: &mut rusqlite::Connection, job: &mut Box<dyn Job>) -> Result<bool, String> {
    // Counts rows changed by every statement that completed; a statement
    // that failed had its own changes undone by SQLite.
    let before = conn.total_changes();
    let ok = job.run(&mut LiteExec { conn: &mut *conn }).await;
    // SQLite rolls the whole transaction back on some errors (a full disk,
    // I/O): nothing of the batch is left to commit.
    if conn.is_autocommit() {
        return Err("sqlite rolled the batch's transaction back".into());
    }
    Ok(ok || conn.total_changes() == before)
}

/// A write of `batch` failed after changing rows: none of the batch is
/// kept, and it runs again with every write in a savepoint of its own
/// (a write alone is simply rolled back: its error is its answer).
/// `Ok(true)`: the second run's transaction is open, to be committed.
async fn rerun(conn: &mut rusqlite::Connection, batch: &mut [Box<dyn Job>], counts: &Counts, mirror: Option<&mut Mirrored>) -> Result<bool, String> {
    sql(conn, "ROLLBACK")?;
    if batch.len() == 1 {
        return Ok(false);
    }
    counts.reruns.fetch_add(1, Ordering::Relaxed);
    begin(conn, mirror)?;
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
    Ok(true)
}

/// The mirror (`mirror`) as the writer keeps it: the rows of `servers`
/// its connection changed in the open transaction (by the update hook),
/// the database's data version, which moves when another connection
/// commits, and the whole table read again when it moved, for the batch's
/// update.
struct Mirrored {
    mirror: Arc<Mirror>,
    changed: Arc<std::sync::Mutex<Vec<i64>>>,
    data_version: i64,
    reload: Option<crate::mirror::Whole>,
}

impl Mirrored {
    /// Fills the mirror from the writer's connection and has the
    /// connection record the rows it changes from now on.
    fn install(conn: &rusqlite::Connection, mirror: Arc<Mirror>) -> Result<Mirrored, StoreError> {
        mirror.apply(Update { reload: Some(crate::mirror::load(conn)?), rows: Vec::new() });
        let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let changed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = changed.clone();
        conn.update_hook(Some(move |_: rusqlite::hooks::Action, _: &str, table: &str, rowid: i64| {
            if table == "servers" {
                seen.lock().expect("changed rows lock").push(rowid);
            }
        }));
        Ok(Mirrored { mirror, changed, data_version, reload: None })
    }
}

/// Opens the batch's transaction. Rows recorded before it belong to a
/// transaction that ended (applied, or rolled back); if another
/// connection wrote the file since the last batch, the mirror is read
/// again from the rows first (the write lock is held: nothing else
/// commits meanwhile).
fn begin(conn: &rusqlite::Connection, mirror: Option<&mut Mirrored>) -> Result<(), String> {
    sql(conn, "BEGIN IMMEDIATE")?;
    let Some(m) = mirror else { return Ok(()) };
    m.changed.lock().expect("changed rows lock").clear();
    let version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(|e| format!("data_version: {e}"))?;
    if m.data_version != version {
        tracing::warn!("another process wrote the database: the store's copy of the servers is read again");
        m.reload = Some(crate::mirror::load(conn).map_err(|e| format!("reading the servers again: {e}"))?);
        m.data_version = version;
    }
    Ok(())
}

/// Commits the open transaction; the rows of `servers` it changed are
/// read again first (what the update hook recorded may since have been
/// undone) and go into `update` once the COMMIT succeeded, for the mirror
/// once the commit is on disk.
fn commit(conn: &rusqlite::Connection, mirror: Option<&Mirrored>, update: Option<&mut Update>) -> Result<(), String> {
    let (Some(m), Some(update)) = (mirror, update) else { return sql(conn, "COMMIT") };
    let mut rowids = std::mem::take(&mut *m.changed.lock().expect("changed rows lock"));
    rowids.sort_unstable();
    rowids.dedup();
    let rows = crate::mirror::read_again(conn, &rowids).map_err(|e| format!("reading changed servers: {e}"))?;
    sql(conn, "COMMIT")?;
    update.rows = rows;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    type Answer = oneshot::Receiver<Result<(), StoreError>>;

    /// The nice value of every thread of this process named `prefix…`.
    fn nice_of(prefix: &str) -> Vec<i64> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim().starts_with(prefix) {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // After the command in parentheses: state is field 3, nice 19.
                let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
                out.push(fields[16].parse().unwrap());
            }
        }
        out
    }

    #[test]
    fn the_writer_and_the_flusher_run_at_a_higher_priority_where_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (_g, _) = writer_on(&dir);
        // Whether this process may raise a thread's priority at all (it
        // needs CAP_SYS_NICE), tried on a thread of its own.
        let allowed = std::thread::spawn(|| unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -1) == 0 }).join().unwrap();
        let want = if allowed { SERIAL_STAGE_NICE as i64 } else { 0 };
        // The threads are named at spawn and set their priority first thing.
        std::thread::sleep(std::time::Duration::from_millis(100));
        for name in ["berth-store-wri", "berth-store-flu"] {
            let nice = nice_of(name);
            assert!(!nice.is_empty(), "no {name} thread");
            assert!(nice.iter().all(|n| *n == want), "{name}: {nice:?}, want {want}");
        }
        assert!(nice_of("berth-store-che").iter().all(|n| *n == 0), "the checkpointer keeps the default");
    }

    /// A writer over `table`.
    fn writer_on(dir: &tempfile::TempDir) -> (GroupCommit, std::path::PathBuf) {
        let path = table(dir);
        (GroupCommit::spawn(&path, 256, None).unwrap(), path)
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

    /// A log flush that waits until its gate is opened.
    fn held_flush(gate: &Arc<Gate>) -> FlushLog {
        let gate = gate.clone();
        Box::new(move || {
            let mut open = gate.0.lock().unwrap();
            while !*open {
                open = gate.1.wait(open).unwrap();
            }
            Ok(())
        })
    }

    /// A fresh database with one table `t (name UNIQUE)`.
    fn table(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("w.db");
        crate::sqlite::connect(&path).unwrap().execute_batch("CREATE TABLE t (name TEXT NOT NULL UNIQUE)").unwrap();
        path
    }

    #[tokio::test]
    async fn no_write_or_read_is_answered_before_the_log_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = table(&dir);
        let flush = Arc::new(Gate::default());
        let g = GroupCommit::spawn_with(&path, 256, held_flush(&flush), None).unwrap();
        let mut a = insert(&g, &["a1"], false);
        // Committed: another connection sees the row...
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while names(&path).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the write never committed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // ...but neither its write nor a read that may have seen it is
        // answered while the flush has not returned.
        let short = std::time::Duration::from_millis(300);
        assert!(tokio::time::timeout(short, &mut a).await.is_err(), "a write was answered before its flush");
        assert!(tokio::time::timeout(short, g.settled()).await.is_err(), "a read was answered before the flush of what it saw");
        flush.open();
        a.await.unwrap().unwrap();
        g.settled().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_write_and_read_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = table(&dir);
        let g = GroupCommit::spawn_with(&path, 256, Box::new(|| Err(std::io::Error::other("injected fsync failure"))), None).unwrap();
        match insert(&g, &["a1"], false).await.unwrap() {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("could not be flushed") && why.contains("injected"), "{why}"),
            other => panic!("a write whose flush failed was answered {other:?}"),
        }
        // The next write is refused before it runs: nothing of it is written.
        assert!(matches!(insert(&g, &["b1"], false).await.unwrap(), Err(StoreError::NotCommitted(_))));
        assert_eq!(names(&path), ["a1"]);
        assert!(matches!(g.settled().await, Err(StoreError::Unavailable(_))), "a read after a failed flush must fail");
    }

    #[tokio::test]
    async fn without_group_commit_the_commit_is_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = table(&dir);
        // synchronous=FULL: the naive path never hands a batch to a flusher.
        let g = GroupCommit::spawn_with(&path, 1, Box::new(|| panic!("the naive path flushed through the flusher")), None).unwrap();
        insert(&g, &["a1"], false).await.unwrap().unwrap();
        g.settled().await.unwrap();
        assert_eq!(names(&path), ["a1"]);
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

    /// A migrated database with servers `s1` (queued) and `s2` (stopped),
    /// and a writer keeping a mirror of them.
    fn mirrored_writer(dir: &tempfile::TempDir) -> (GroupCommit, Arc<Mirror>, std::path::PathBuf) {
        mirrored_writer_flushed_by(dir, flush_wal(&dir.path().join("m.db")))
    }

    fn mirrored_writer_flushed_by(dir: &tempfile::TempDir, flush: FlushLog) -> (GroupCommit, Arc<Mirror>, std::path::PathBuf) {
        let path = dir.path().join("m.db");
        let mut conn = crate::sqlite::connect(&path).unwrap();
        crate::sqlite::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO servers (id, tenant, name, template, memory_mib, config, status, generation, created_at, updated_at) VALUES \
             ('s1', 't', 'one', 'x', 512, '{}', 'queued', 0, 1, 1), ('s2', 't', 'two', 'x', 256, '{}', 'stopped', 0, 2, 2);",
        )
        .unwrap();
        let mirror = Arc::new(Mirror::default());
        let g = GroupCommit::spawn_with(&path, 256, flush, Some(mirror.clone())).unwrap();
        (g, mirror, path)
    }

    #[tokio::test]
    async fn the_mirror_shows_a_commit_only_once_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let flush = Arc::new(Gate::default());
        let (g, mirror, path) = mirrored_writer_flushed_by(&dir, held_flush(&flush));
        let mut renamed = rename(&g, "s2", "flushed", false);
        let row = || crate::sqlite::connect(&path).unwrap().query_row("SELECT name FROM servers WHERE id = 's2'", [], |r| r.get::<_, String>(0)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while row() != "flushed" {
            assert!(std::time::Instant::now() < deadline, "the write never committed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Committed, its flush held: the mirror (what reads answer from)
        // still shows the row as it is on disk.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(200), &mut renamed).await.is_err(), "answered before the flush");
        assert_eq!(name_of(&mirror, "s2").as_deref(), Some("two"));
        flush.open();
        renamed.await.unwrap().unwrap();
        assert_eq!(name_of(&mirror, "s2").as_deref(), Some("flushed"), "applied before the answer");
    }

    /// Renames server `id`; with `fail`, the write fails after renaming.
    fn rename(g: &GroupCommit, id: &str, to: &str, fail: bool) -> Answer {
        g.enqueue((id.to_string(), to.to_string()), move |e, (id, to): &(String, String)| {
            Box::pin(async move {
                e.exec("UPDATE servers SET name = ? WHERE id = ?", args![to.as_str(), id.as_str()]).await?;
                if fail {
                    return Err(StoreError::Conflict("refused after writing".into()));
                }
                Ok(())
            })
        })
        .unwrap()
    }

    fn name_of(m: &Mirror, id: &str) -> Option<String> {
        m.get_server(id).unwrap().map(|s| s.name)
    }

    #[tokio::test]
    async fn the_mirror_holds_what_committed_not_what_was_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (g, mirror, _path) = mirrored_writer(&dir);
        assert_eq!((name_of(&mirror, "s1").as_deref(), name_of(&mirror, "s2").as_deref()), (Some("one"), Some("two")), "loaded at start");
        let (gate, held) = Gate::hold(&g);
        // In one batch: a rename undone by its write's failure (the batch
        // runs again with savepoints), a rename undone by its own failed
        // statement (the foreign key is checked at the statement's end,
        // after the row changed), and a rename that stays.
        let undone = rename(&g, "s1", "undone", true);
        let refused = g
            .enqueue((), |e, _: &()| {
                Box::pin(async move {
                    e.exec("UPDATE servers SET name = 'refused', node_id = 'node_missing' WHERE id = 's2'", args![]).await?;
                    Ok(())
                })
            })
            .unwrap();
        let kept = rename(&g, "s2", "kept", false);
        gate.open();
        held.await.unwrap().unwrap();
        assert!(undone.await.unwrap().is_err());
        assert!(refused.await.unwrap().is_err(), "no such node");
        kept.await.unwrap().unwrap();
        assert_eq!(g.stats().2, 1, "the batch ran again");
        assert_eq!(name_of(&mirror, "s1").as_deref(), Some("one"));
        assert_eq!(name_of(&mirror, "s2").as_deref(), Some("kept"));
        assert!(mirror.get_server("undone").unwrap().is_none() && mirror.get_server("refused").unwrap().is_none());
        // A failing write alone: rolled back without a second run.
        rename(&g, "s1", "alone", true).await.unwrap().unwrap_err();
        rename(&g, "s2", "last", false).await.unwrap().unwrap();
        assert_eq!(name_of(&mirror, "s1").as_deref(), Some("one"));
        assert_eq!(name_of(&mirror, "s2").as_deref(), Some("last"));
        assert_eq!(mirror.get_server("last").unwrap().map(|s| s.id.0), Some("s2".to_string()), "found by its new name");
    }

    #[tokio::test]
    async fn a_batch_commits_after_its_budget_while_writes_keep_coming() {
        let dir = tempfile::tempdir().unwrap();
        let path = table(&dir);
        // The log "flushed" at once: a batch past its budget commits when
        // the flusher is free, so with the disk's fsync a loaded machine
        // (one CI run: 3 commits) would measure the disk, not the budget.
        let g = GroupCommit::spawn_with(&path, 256, Box::new(|| Ok(())), None).unwrap();
        let (gate, held) = Gate::hold(&g);
        // 200 writes of 0.2 ms each, all waiting before the first runs:
        // 40 ms of writes, so 20 budgets, where taking them while any
        // waits would make one batch (up to 256).
        let answers: Vec<Answer> = (0..200)
            .map(|i| {
                g.enqueue(i, |e, i: &i32| {
                    Box::pin(async move {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        e.exec("INSERT INTO t (name) VALUES (?)", args![format!("b{i:03}")]).await?;
                        Ok(())
                    })
                })
                .unwrap()
            })
            .collect();
        let before = g.stats().1;
        gate.open();
        held.await.unwrap().unwrap();
        for a in answers {
            a.await.unwrap().unwrap();
        }
        let commits = g.stats().1 - before;
        assert!(commits >= 10, "{commits} commits for 40 ms of writes");
        assert_eq!(names(&path).len(), 200);
    }
}
