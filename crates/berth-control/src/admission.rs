//! The queue worker and the admission committer.
//!
//! The queue worker takes a snapshot, runs the pure planner and hands the
//! plans to the committer. The committer is the only task that inserts
//! reservations: it batches plans for a few milliseconds and commits each
//! batch in one store transaction that re-checks every node's fit against
//! the reservation rows (Nomad's plan applier). Nothing here checks capacity
//! and then awaits before writing: the check happens inside the commit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::placement::{plan, Placement};
use berth_store::{PlacementOutcome, Store};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::Clock;
use crate::error::ControlError;
use crate::waker::{NodeWaker, PlacementWaiters};
use crate::worker::{Worker, WorkerState};
use crate::ControlConfig;

type Reply = oneshot::Sender<Result<Vec<PlacementOutcome>, ControlError>>;

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<(Vec<Placement>, Reply)>,
}

impl Committer {
    pub fn spawn(store: Arc<dyn Store>, clock: Arc<dyn Clock>, window: Duration, max_batch: usize) -> Committer {
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
                let result = store.commit_placements(&all, clock.now_ms()).await;
                match result {
                    Ok(outcomes) => {
                        let mut rest = outcomes.into_iter();
                        for (plans, reply) in batch {
                            let mine: Vec<_> = rest.by_ref().take(plans.len()).collect();
                            let _ = reply.send(Ok(mine));
                        }
                    }
                    Err(e) => {
                        let msg = ControlError::from(e);
                        for (_, reply) in batch {
                            let _ = reply.send(Err(ControlError::Internal(msg.to_string())));
                        }
                    }
                }
            }
        });
        Committer { tx }
    }

    pub async fn submit(&self, plans: Vec<Placement>) -> Result<Vec<PlacementOutcome>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((plans, reply)).await.map_err(|_| ControlError::Internal("the committer has stopped".into()))?;
        rx.await.map_err(|_| ControlError::Internal("the committer dropped a batch".into()))?
    }
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
}

#[async_trait]
impl Worker for QueueWorker {
    fn name(&self) -> &'static str {
        "queue"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(WorkerState::Idle);
        }
        let t0 = std::time::Instant::now();
        let snap = self.store.queue_snapshot().await?;
        let t_snap = t0.elapsed();
        if snap.queued.is_empty() {
            return Ok(WorkerState::Idle);
        }
        let plans = plan(&snap.capacities, &snap.queued, self.clock.now_ms(), self.cfg.planner);
        if plans.is_empty() {
            return Ok(WorkerState::Idle);
        }
        let placed: Vec<_> = plans.iter().map(|p| (p.node_id.clone(), p.server_id.clone())).collect();
        let t_plan = t0.elapsed();
        let outcomes = self.committer.submit(plans).await?;
        let t_commit = t0.elapsed();
        let mut committed = 0;
        let mut woken = std::collections::HashSet::new();
        for ((node, server), outcome) in placed.iter().zip(&outcomes) {
            if matches!(outcome, PlacementOutcome::Committed { .. }) {
                committed += 1;
                self.placed.placed(server);
                if woken.insert(node) {
                    self.nodes.wake(node);
                }
            }
        }
        tracing::debug!(committed, planned = outcomes.len(), snapshot_ms = t_snap.as_millis() as u64, plan_ms = t_plan.as_millis() as u64, commit_ms = t_commit.as_millis() as u64, "admission round");
        Ok(if committed > 0 { WorkerState::Busy } else { WorkerState::Idle })
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
