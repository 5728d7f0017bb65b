//! The queue worker and the admission committer.
//!
//! The queue worker plans on the capacity view (`capacity`: the rows read
//! at most a quarter of a second ago, less what proposals in flight took,
//! its own and those of starts placed in their own write), with the pure
//! planner, and hands the plans to the committer. The committer is the only task that inserts
//! reservations: it takes the plans waiting for it (and, with a window
//! above 0, those arriving within it) and commits them in store
//! transactions of at most `commit_max_batch` placements,
//! each re-checking every node's fit against the reservation rows (Nomad's
//! plan applier). Nothing here checks capacity
//! and then awaits before writing: the check happens inside the commit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::placement::Placement;
use berth_store::{PlacementOutcome, Store};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::capacity::CapacityView;
use crate::clock::Clock;
use crate::error::ControlError;
use crate::waker::{NodeWaker, PlacedFacts, PlacementWaiters};
use crate::worker::{Worker, WorkerState};
use crate::ControlConfig;

/// A submission's answer: the outcomes of a prefix of its plans, in order,
/// and the failure that stopped the rest, if one did.
pub type Submitted = (Vec<PlacementOutcome>, Option<ControlError>);

type Reply = oneshot::Sender<Submitted>;

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<(Vec<Placement>, Reply)>,
}

/// Admission transactions committed: with placements committed, how many
/// placements share one (`/metrics`, the benchmark's naive path).
pub type AdmissionCommits = Arc<std::sync::atomic::AtomicU64>;

impl Committer {
    pub fn spawn(store: Arc<dyn Store>, clock: Arc<dyn Clock>, window: Duration, max_batch: usize, commits: AdmissionCommits) -> Committer {
        let (tx, mut rx) = mpsc::channel::<(Vec<Placement>, Reply)>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let mut n = batch[0].0.len();
                let deadline = tokio::time::Instant::now() + window;
                while n < max_batch {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(more)) => {
                            n += more.0.len();
                            batch.push(more);
                        }
                        _ => break,
                    }
                }
                let all: Vec<Placement> = batch.iter().flat_map(|(p, _)| p.iter().cloned()).collect();
                let (outcomes, failed) = commit_in_chunks(store.as_ref(), clock.as_ref(), &all, max_batch, &commits).await;
                let mut rest = outcomes.into_iter();
                for (plans, reply) in batch {
                    let mine: Vec<_> = rest.by_ref().take(plans.len()).collect();
                    // Plans committed before a failure are answered as
                    // committed (their starts are woken at once); the
                    // failure goes with the plans that got no outcome.
                    let failure = match &failed {
                        Some(msg) if mine.len() < plans.len() => Some(ControlError::Internal(msg.clone())),
                        _ => None,
                    };
                    let _ = reply.send((mine, failure));
                }
            }
        });
        Committer { tx }
    }

    pub async fn submit(&self, plans: Vec<Placement>) -> Submitted {
        let (reply, rx) = oneshot::channel();
        if self.tx.send((plans, reply)).await.is_err() {
            return (Vec::new(), Some(ControlError::Internal("the committer has stopped".into())));
        }
        rx.await.unwrap_or_else(|_| (Vec::new(), Some(ControlError::Internal("the committer dropped a batch".into()))))
    }
}

/// Commits `plans` at most `max_batch` to a transaction, one transaction
/// after another (so `--commit-max-batch 1` is one transaction a placement,
/// the naive path the benchmark compares against). Returns the outcomes of
/// the plans committed before the first failure, and that failure.
async fn commit_in_chunks(
    store: &dyn Store,
    clock: &dyn Clock,
    plans: &[Placement],
    max_batch: usize,
    commits: &AdmissionCommits,
) -> (Vec<PlacementOutcome>, Option<String>) {
    let mut outcomes = Vec::with_capacity(plans.len());
    for chunk in plans.chunks(max_batch.max(1)) {
        match store.commit_placements(chunk, clock.now_ms()).await {
            Ok(done) => {
                commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                outcomes.extend(done);
            }
            Err(e) => return (outcomes, Some(ControlError::from(e).to_string())),
        }
    }
    (outcomes, None)
}

pub struct QueueWorker {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub committer: Committer,
    pub wake: Arc<Notify>,
    pub nodes: NodeWaker,
    /// Requests waiting for their server's placement.
    pub placed: PlacementWaiters,
    pub cfg: ControlConfig,
    /// True while this replica holds the leader lease.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// The capacities it plans on, shared with the starts that propose
    /// their own node, so the two never plan the same port twice.
    pub capacity: Arc<CapacityView>,
}

/// What a round leaves behind: whether the view must be read again, and
/// whether the next round runs at once.
///
/// A view not read this round may be short of memory freed since its
/// read, so a round that planned nothing on it runs again at once on
/// fresh rows before the queue waits. A rejected plan means the view was
/// long of memory somewhere (a commit it did not see): it is read again,
/// at once if it was not fresh (on fresh rows a misfit waits for the next
/// wake, as it always has).
fn after_round(fresh: bool, planned: usize, committed: usize, rejected: bool) -> (bool, WorkerState) {
    if planned == 0 {
        return (!fresh, if fresh { WorkerState::Idle } else { WorkerState::Busy });
    }
    let again = committed > 0 || (rejected && !fresh);
    (rejected, if again { WorkerState::Busy } else { WorkerState::Idle })
}

#[async_trait]
impl Worker for QueueWorker {
    fn name(&self) -> &'static str {
        "queue"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(std::sync::atomic::Ordering::SeqCst) {
            self.capacity.invalidate();
            return Ok(WorkerState::Idle);
        }
        let began = std::time::Instant::now();
        let fresh = self.capacity.is_stale();
        let queued = if fresh {
            let snap = self.store.queue_snapshot().await?;
            self.capacity.replace(snap.capacities, began);
            snap.queued
        } else {
            self.store.queued().await?
        };
        if queued.is_empty() {
            return Ok(WorkerState::Idle);
        }
        let read = began.elapsed();
        let plans = self.capacity.plan_round(&queued, self.clock.now_ms(), self.cfg.planner);
        let planned_at = began.elapsed();
        if plans.is_empty() {
            let (stale, next) = after_round(fresh, 0, 0, false);
            if stale {
                self.capacity.mark_stale();
            }
            return Ok(next);
        }
        let (outcomes, failed) = self.committer.submit(plans.clone()).await;
        let committed_at = began.elapsed();
        let mut committed = 0;
        let mut rejected = false;
        let mut woken = std::collections::HashSet::new();
        for (i, p) in plans.iter().enumerate() {
            let outcome = outcomes.get(i);
            self.capacity.settle(&p.server_id, matches!(outcome, Some(PlacementOutcome::Committed { .. })));
            match outcome {
                Some(PlacementOutcome::Committed { generation, at }) => {
                    committed += 1;
                    self.placed.placed(&p.server_id, PlacedFacts { node_id: p.node_id.clone(), port: p.port, generation: *generation, at: *at });
                    if woken.insert(&p.node_id) {
                        self.nodes.wake(&p.node_id);
                    }
                }
                Some(PlacementOutcome::Rejected(_)) => rejected = true,
                // The server changed (stopped, deleted): nothing about
                // capacity. No outcome: its transaction failed.
                Some(PlacementOutcome::Stale) | None => {}
            }
        }
        if let Some(e) = failed {
            // What committed before the failure was woken above; the view
            // is read again.
            self.capacity.mark_stale();
            return Err(e);
        }
        let (stale, next) = after_round(fresh, plans.len(), committed, rejected);
        if stale {
            self.capacity.mark_stale();
        }
        tracing::debug!(
            committed,
            planned = outcomes.len(),
            queued = queued.len(),
            fresh,
            read_ms = read.as_secs_f64() * 1e3,
            plan_ms = (planned_at - read).as_secs_f64() * 1e3,
            commit_ms = (committed_at - planned_at).as_secs_f64() * 1e3,
            total_ms = began.elapsed().as_secs_f64() * 1e3,
            "admission round"
        );
        Ok(next)
    }

    async fn wait_for_work(&mut self) {
        // A periodic round as well, because backoff times pass without any
        // notification.
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{MemMib, NewEvent, NodeId, PortRange};
    use berth_store::{NodeRegistration, SqliteStore};

    /// A store with one node of 4 GiB and `n` queued servers of 128 MiB,
    /// and a plan for each of them on that node.
    async fn queued_plans(dir: &std::path::Path, n: usize) -> (Arc<dyn Store>, Vec<Placement>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("berth.db")).await.unwrap());
        let reg = NodeRegistration {
            name: "n1".into(),
            address: String::new(),
            driver: "fake".into(),
            total_mib: MemMib(4096),
            system_reserved_mib: MemMib(0),
            cpu_cores: 2,
            ports: PortRange { min: 30000, max: 30999 },
            max_concurrent_starts: 0,
        };
        let node = store.register_node(&reg, &NodeId("node_0000000000000001".into()), 1).await.unwrap();
        let mut plans = Vec::new();
        for i in 0..n {
            let s = berth_testkit::stopped_server(&format!("s{i}"), 128);
            let ev = NewEvent { kind: "server_created", server_id: None, node_id: None, message: "created".into() };
            store.insert_server(&s, &ev).await.unwrap();
            let s = store.request_start(&s.id, 10, false).await.unwrap();
            plans.push(Placement {
                server_id: s.id,
                expected_generation: s.generation,
                node_id: node.id.clone(),
                memory_mib: s.memory_mib,
                port: 30000 + i as u16,
            });
        }
        (store, plans)
    }

    async fn commits_for(max_batch: usize, n: usize) -> (u64, Vec<PlacementOutcome>) {
        let dir = tempfile::tempdir().unwrap();
        let (store, plans) = queued_plans(dir.path(), n).await;
        let counted = AdmissionCommits::default();
        let committer = Committer::spawn(store.clone(), Arc::new(crate::clock::SystemClock), Duration::from_millis(0), max_batch, counted.clone());
        let before = store.write_stats().unwrap().commits;
        let (outcomes, failed) = committer.submit(plans).await;
        assert!(failed.is_none(), "{failed:?}");
        let commits = store.write_stats().unwrap().commits - before;
        // The counter /metrics shows counts the same transactions.
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), commits);
        (commits, outcomes)
    }

    #[tokio::test]
    async fn a_round_is_committed_at_most_max_batch_placements_a_transaction() {
        // The naive path the benchmark compares against: one a placement.
        let (commits, outcomes) = commits_for(1, 5).await;
        assert_eq!(commits, 5);
        assert_eq!(outcomes.len(), 5);
        assert!(outcomes.iter().all(|o| matches!(o, PlacementOutcome::Committed { .. })), "{outcomes:?}");
        let (commits, outcomes) = commits_for(2, 5).await;
        assert_eq!(commits, 3);
        assert!(outcomes.iter().all(|o| matches!(o, PlacementOutcome::Committed { .. })), "{outcomes:?}");
        let (commits, _) = commits_for(512, 5).await;
        assert_eq!(commits, 1);
    }

    #[tokio::test]
    async fn with_no_window_the_committer_still_takes_every_submission_already_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut plans) = queued_plans(dir.path(), 4).await;
        let second = plans.split_off(2);
        let counted = AdmissionCommits::default();
        let committer = Committer::spawn(store.clone(), Arc::new(crate::clock::SystemClock), Duration::ZERO, 512, counted.clone());
        // Both are sent before the committer's task runs (one thread).
        let (a, b) = tokio::join!(committer.submit(plans), committer.submit(second));
        assert!(a.1.is_none() && b.1.is_none(), "{a:?} {b:?}");
        let committed = |o: &Vec<PlacementOutcome>| o.iter().filter(|o| matches!(o, PlacementOutcome::Committed { .. })).count();
        assert_eq!((committed(&a.0), committed(&b.0)), (2, 2));
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1, "both submissions in one admission transaction");
    }

    #[tokio::test]
    async fn plans_committed_before_a_failed_transaction_are_answered_as_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut plans) = queued_plans(dir.path(), 4).await;
        // The second transaction's first plan breaks a CHECK constraint
        // (memory above 0): that transaction fails as a whole.
        plans[2].memory_mib = MemMib(0);
        let committer = Committer::spawn(store.clone(), Arc::new(crate::clock::SystemClock), Duration::ZERO, 2, AdmissionCommits::default());
        let (outcomes, failed) = committer.submit(plans.clone()).await;
        assert!(failed.is_some(), "the failed transaction is reported");
        assert_eq!(outcomes.len(), 2, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| matches!(o, PlacementOutcome::Committed { .. })), "{outcomes:?}");
        // They are committed: the answer is true.
        for p in &plans[..2] {
            assert_eq!(store.get_server(&p.server_id.0).await.unwrap().unwrap().status, berth_core::ServerStatus::Starting);
        }
        for p in &plans[2..] {
            assert_eq!(store.get_server(&p.server_id.0).await.unwrap().unwrap().status, berth_core::ServerStatus::Queued);
        }
    }

    #[test]
    fn a_round_on_a_view_not_read_that_plans_nothing_runs_again_on_fresh_rows() {
        assert!(matches!(after_round(false, 0, 0, false), (true, WorkerState::Busy)));
        // On fresh rows nothing fits: the queue waits for a wake.
        assert!(matches!(after_round(true, 0, 0, false), (false, WorkerState::Idle)));
    }

    #[test]
    fn a_rejection_has_the_view_read_again() {
        assert!(matches!(after_round(false, 3, 2, true), (true, WorkerState::Busy)));
        assert!(matches!(after_round(false, 1, 0, true), (true, WorkerState::Busy)));
        assert!(matches!(after_round(true, 1, 0, true), (true, WorkerState::Idle)));
    }

    #[test]
    fn committed_plans_keep_the_view_and_the_queue_going() {
        assert!(matches!(after_round(false, 4, 4, false), (false, WorkerState::Busy)));
        assert!(matches!(after_round(true, 4, 4, false), (false, WorkerState::Busy)));
        // Every plan stale (servers stopped meanwhile): nothing to retry.
        assert!(matches!(after_round(true, 2, 0, false), (false, WorkerState::Idle)));
    }
}
