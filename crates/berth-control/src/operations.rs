//! Operations on servers: the use cases that request them and the serial
//! executor that moves them along.
//!
//! A request is admitted or refused in one store transaction that applies
//! the guard table (`berth_core::operation`); if nothing is ahead of it,
//! its first step happens in that same transaction, so the answer already
//! shows the server queued or stopping. The executor (`OpsWorker`, leader
//! only) settles running operations as agents confirm what happened,
//! begins waiting ones in order, fails queued servers past the queue
//! timeout with `no_capacity`, and applies restart policies. It decides
//! nothing itself: every decision is a pure function of core; this module
//! only reads, calls them and writes their results.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::operation::{needs_advance, OpKind, OpOrigin, Operation};
use berth_core::queue::{no_capacity_message, timed_out};
use berth_core::restart::RestartDecision;
use berth_core::{NewEvent, Server, ServerStatus};
use berth_store::{OpFilter, OpRequest, Proposal, ServerRef, Store, StoreError};
use tokio::sync::Notify;

use crate::auth::Caller;
use crate::clock::Clock;
use crate::error::ControlError;
use crate::service::App;
use crate::waker::NodeWaker;
use crate::worker::{Worker, WorkerState};
use crate::ControlConfig;

/// A new operation id: the wall clock's milliseconds, then 64 random bits.
/// Ids made one after another sort together, so the unique index on them
/// takes each new one at its right edge instead of on a random page.
pub fn new_operation_id() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    format!("op_{ms:012x}{:016x}", rand::random::<u64>())
}

impl App {
    /// Requests `kind` on a server the caller may see. Reserved kinds are
    /// refused at the edge; the guard table answers 409
    /// `operation_in_progress` naming the operation in the way.
    pub async fn operation(&self, caller: &Caller, id_or_name: &str, kind: OpKind) -> Result<(Operation, Server), ControlError> {
        self.operation_with(caller, id_or_name, kind, false).await
    }

    /// Like `operation`; `fresh_world` lets a start place a stateful server
    /// lost with its node elsewhere, on a new world.
    pub async fn operation_with(&self, caller: &Caller, id_or_name: &str, kind: OpKind, fresh_world: bool) -> Result<(Operation, Server), ControlError> {
        if !kind.is_implemented() {
            return Err(ControlError::invalid(
                "unsupported_operation",
                format!("{kind} is reserved: the guard table knows it, but this version cannot run it"),
            ));
        }
        let s = self.find_server_ref(caller, id_or_name).await?;
        self.operation_on(&s, kind, fresh_world).await.map(|(op, server, _)| (op, server))
    }

    /// Requests `kind` on `s`, a server the caller may see (`operation_with`),
    /// and says whether the start's own write placed the server: a start
    /// proposes a node from the capacity view, so that its write can place
    /// the server at once (`OpRequest::place`) instead of queueing it for
    /// the queue worker's next round and commit.
    async fn operation_on(&self, s: &ServerRef, kind: OpKind, fresh_world: bool) -> Result<(Operation, Server, bool), ControlError> {
        let taken = if kind == OpKind::Start { self.propose(s, fresh_world) } else { None };
        let place = taken.as_ref().map(|t| Proposal { node_id: t.node_id.clone(), port: t.port, starvation_ms: self.cfg.planner.starvation_ms, fence: None });
        let req = OpRequest { server_id: s.id.clone(), kind, origin: OpOrigin::User, new_id: new_operation_id(), fresh_world, place };
        let answer = self.store.request_operation(&req, self.clock.now_ms()).await;
        let placed =
            answer.as_ref().is_ok_and(|(_, after)| after.status == ServerStatus::Starting && after.node_id.as_ref() == taken.as_ref().map(|t| &t.node_id));
        if taken.is_some() {
            self.capacity.settle(&s.id, placed);
        }
        let (op, server) = answer.map_err(|e| match e {
            StoreError::OperationInProgress { blocking, status, id } => {
                ControlError::OperationInProgress { requested: kind.as_str(), blocking: blocking.as_str(), status: status.as_str(), id }
            }
            other => other.into(),
        })?;
        if placed {
            // An admission transaction of one placement (`/metrics`).
            self.admission_commits.fetch_add(1, Ordering::Relaxed);
            if let Some(node) = &server.node_id {
                self.nodes.wake(node);
            }
        } else {
            self.after_operation_change(s.node_id.as_ref());
        }
        Ok((op, server, placed))
    }

    /// A node for a start of `s` from the capacity view, taken from it
    /// until the start's write answers; the view is read again in the
    /// background when it is stale. Only the leader places.
    fn propose(&self, s: &ServerRef, fresh_world: bool) -> Option<crate::capacity::Taken> {
        if !self.leading.load(Ordering::SeqCst) {
            self.capacity.invalidate();
            return None;
        }
        if self.capacity.claim_refresh() {
            let (store, view) = (self.store.clone(), self.capacity.clone());
            tokio::spawn(async move {
                let read_at = std::time::Instant::now();
                match store.queue_snapshot().await {
                    Ok(snap) => view.replace(snap.capacities, read_at),
                    Err(e) => {
                        tracing::warn!(error = %e, "the capacity view could not be read");
                        view.refresh_failed();
                    }
                }
            });
        }
        let home = if fresh_world { None } else { s.home_node.as_ref() };
        self.capacity.propose(&s.id, s.memory_mib, home)
    }

    /// Starts a server and answers once its memory is reserved on a node
    /// (or the start ended, or `timeout` passed): the server as it is
    /// then. A client measures from request to committed reservation.
    pub async fn start_and_wait_placed(
        &self,
        caller: &Caller,
        id_or_name: &str,
        fresh_world: bool,
        timeout: Duration,
    ) -> Result<(Operation, Server), ControlError> {
        let s = self.find_server_ref(caller, id_or_name).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Interest is registered before every look at the server, so a
        // placement committed in between is not missed. The first look is
        // the start request's own answer: the server as it left it.
        let watch = |waiters: &crate::waker::PlacementWaiters| {
            let wake = waiters.get(&s.id);
            let mut notified = Box::pin(wake.clone().notified_owned());
            notified.as_mut().enable();
            (wake, notified)
        };
        let (mut wake, mut notified) = watch(&self.placed);
        let (op, before) = match self.operation_on(&s, OpKind::Start, fresh_world).await {
            Ok((op, placed, true)) => {
                drop(notified);
                self.placed.release(&s.id, &wake);
                return Ok((op, placed));
            }
            Ok((op, before, false)) => (op, before),
            Err(e) => {
                // The pending wait holds a handle too: gone first, so the
                // entry is forgotten.
                drop(notified);
                self.placed.release(&s.id, &wake);
                return Err(e);
            }
        };
        let mut current = before.clone();
        loop {
            let placed = current.generation > before.generation && current.status.holds_reservation();
            // While the server waits in the queue its start still runs;
            // only otherwise can the start have ended.
            let done = placed
                || current.status == ServerStatus::Deleted
                || current.status != ServerStatus::Queued && {
                    let now = self.store.get_operation(&op.id).await?;
                    now.as_ref().is_none_or(|o| o.status.is_terminal())
                };
            if done || tokio::time::Instant::now() >= deadline {
                drop(notified);
                self.placed.release(&s.id, &wake);
                return Ok((op, current));
            }
            tokio::select! {
                _ = &mut notified => {}
                // Placements committed elsewhere (another replica) are
                // seen by re-reading.
                _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            (wake, notified) = watch(&self.placed);
            // Woken by the commit that placed it: that commit's columns on
            // the server as the start left it are the row as committed.
            current = match self.placed.take_placed(&s.id).filter(|f| f.generation > before.generation) {
                Some(f) => Server {
                    status: ServerStatus::Starting,
                    node_id: Some(f.node_id),
                    port: Some(f.port),
                    generation: f.generation,
                    updated_at: f.at,
                    ..before.clone()
                },
                None => match self.store.get_server(&s.id.0).await? {
                    Some(now) => now,
                    None => Server { status: ServerStatus::Deleted, ..before.clone() },
                },
            };
        }
    }

    /// Wakes whoever acts next: the queue for a start, the agent of the
    /// node the server was on for a stop or kill.
    pub(crate) fn after_operation_change(&self, node_before: Option<&berth_core::NodeId>) {
        self.queue_wake.notify_one();
        if let Some(node) = node_before {
            self.nodes.wake(node);
        }
        // The executor need not be woken: what waits behind this operation
        // begins in the transaction that settles the one ahead of it.
    }

    pub async fn get_operation(&self, caller: &Caller, id: &str) -> Result<Operation, ControlError> {
        caller.require_user()?;
        let op = self.store.get_operation(id).await?.ok_or_else(|| ControlError::NotFound(format!("operation {id:?}")))?;
        if !caller.is_admin() {
            // Tenants see operations of their own servers only; a deleted
            // server's operations stay visible to admins.
            self.find_server(caller, &op.server_id.0).await.map_err(|_| ControlError::NotFound(format!("operation {id:?}")))?;
        }
        Ok(op)
    }

    /// Operations, oldest first; `server` narrows to one server (required
    /// for tenant tokens).
    pub async fn list_operations(
        &self,
        caller: &Caller,
        server: Option<&str>,
        active_only: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Operation>, ControlError> {
        caller.require_user()?;
        let server_id = match server {
            Some(s) => Some(self.find_server(caller, s).await?.id),
            None if caller.is_admin() => None,
            None => return Err(ControlError::Forbidden("tenant tokens must name a server (?server=)".into())),
        };
        Ok(self.store.list_operations(&OpFilter { server_id, active_only, after, limit }).await?)
    }
}

/// The serial executor of operations (leader only).
pub struct OpsWorker {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub cfg: ControlConfig,
    pub wake: Arc<Notify>,
    pub queue_wake: Arc<Notify>,
    pub nodes: NodeWaker,
    pub leading: Arc<AtomicBool>,
    /// When the last pass over every unfinished operation ran.
    pub last_sweep: Option<std::time::Instant>,
}

/// Stable jitter for a server's n-th automatic restart, so the scheduled
/// time does not move between rounds.
fn restart_jitter(server: &Server, restarts: u32) -> u64 {
    server.id.0.bytes().chain(restarts.to_le_bytes()).fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

#[async_trait]
impl Worker for OpsWorker {
    fn name(&self) -> &'static str {
        "operations"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(Ordering::SeqCst) {
            return Ok(WorkerState::Idle);
        }
        let now = self.clock.now_ms();
        // Operations settle in the transactions that change their servers
        // (syncs, verdicts); the pass over every unfinished one only
        // catches what none of those touched, so it runs now and then.
        let sweep = self.last_sweep.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if sweep {
            self.last_sweep = Some(std::time::Instant::now());
        }
        let work = self.store.ops_work(now - self.cfg.restart.window_ms, sweep).await?;
        let mut acted = false;

        // Only servers where settling would change something get a write;
        // those writes go out together so the store can commit them as one.
        let mut advances = tokio::task::JoinSet::new();
        for a in work.active.into_iter().filter(|a| needs_advance(a.server.as_ref(), &a.ops)) {
            let store = self.store.clone();
            advances.spawn(async move { store.advance_operations(&a.server_id, now).await });
        }
        while let Some(done) = advances.join_next().await {
            let changed = done.map_err(|e| ControlError::Internal(format!("operation advance task failed: {e}")))??;
            acted |= !changed.is_empty();
        }

        for q in timed_out(&work.queued, now, self.cfg.queue_timeout_ms) {
            let Some(s) = self.store.get_server(&q.server_id.0).await? else { continue };
            let message = no_capacity_message(self.cfg.queue_timeout_ms);
            let ev = NewEvent { kind: "start_failed", server_id: Some(s.id.clone()), node_id: None, message: format!("start of {} failed: {message}", s.name) };
            if self.store.fail_server(&s.id, q.generation, ServerStatus::Queued, &message, &ev, now).await? {
                tracing::warn!(server = %s.name, "queue timeout: failed with no_capacity");
                self.store.advance_operations(&s.id, now).await?;
                acted = true;
            }
        }

        for (s, restarts) in &work.crashed {
            match self.cfg.restart.decide(s.restart_policy, s.updated_at, *restarts, restart_jitter(s, *restarts)) {
                RestartDecision::Never => {}
                RestartDecision::GiveUp { restarts } => {
                    let message = format!("crash loop: restarted {restarts} times within {}s and crashed again", self.cfg.restart.window_ms / 1000);
                    let ev = NewEvent {
                        kind: "restart_limit_reached",
                        server_id: Some(s.id.clone()),
                        node_id: None,
                        message: format!("server {} failed: {message}", s.name),
                    };
                    if self.store.fail_server(&s.id, s.generation, ServerStatus::Crashed, &message, &ev, now).await? {
                        tracing::warn!(server = %s.name, restarts, "restart limit reached");
                        acted = true;
                    }
                }
                RestartDecision::At(at) if at <= now => {
                    let req = OpRequest {
                        server_id: s.id.clone(),
                        kind: OpKind::Start,
                        origin: OpOrigin::RestartPolicy,
                        new_id: new_operation_id(),
                        fresh_world: false,
                        place: None,
                    };
                    match self.store.request_operation(&req, now).await {
                        Ok(_) => {
                            tracing::info!(server = %s.name, restart = restarts + 1, "restarting after a crash");
                            acted = true;
                        }
                        // A user acted on the server meanwhile: theirs wins.
                        Err(StoreError::OperationInProgress { .. } | StoreError::Invalid(_) | StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                RestartDecision::At(at) => {
                    if s.next_attempt_at != Some(at) {
                        self.store.set_restart_at(&s.id, s.generation, at).await?;
                    }
                }
            }
        }

        if acted {
            self.queue_wake.notify_one();
            self.nodes.wake_all();
        }
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        // Also periodic: restart and queue-timeout times pass without a
        // notification.
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
