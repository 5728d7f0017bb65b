//! The one `Store` implementation: every method is a read or a write of
//! `reads`/`writes`, run by a backend (`Backend`) that supplies a
//! transaction to run it in. The backends differ only in how they open
//! transactions and how they speak SQL (`exec::Exec`); what is stored and
//! decided is the same code for both.

use async_trait::async_trait;
use berth_core::health::Verdict;
use berth_core::notify::Webhook;
use berth_core::operation::Operation;
use berth_core::placement::{Placement, QueuedServer};
use berth_core::reconcile::Reconciled;
use berth_core::{Event, Generation, MemMib, Millis, NewEvent, Node, NodeId, NodeStatus, Server, ServerId, ServerStatus, TokenKind};

use crate::exec::Exec;
use crate::group::BoxFuture;
use crate::mirror::Mirror;
use crate::{reads, writes};
use crate::{
    BillingSession, Decide, Delivery, DeliveryFilter, DeliveryJob, DeliveryOutcome, DeliveryPolicy, DesiredView, EventFilter, Facts, LeaderLease, LedgerEntry,
    NodeRegistration, NodeUsage, OpFilter, OpRequest, OpsWork, PlacementOutcome, QueueSnapshot, ReplicaInfo, ServerRef, Snapshot, Store, StoreError, SyncInput,
    TokenRecord, WriteStats,
};

/// What a transaction runs: one `reads` or `writes` function.
pub(crate) trait Work<T>: for<'e> FnOnce(&'e mut dyn Exec) -> BoxFuture<'e, Result<T, StoreError>> + Send + 'static {}
impl<T, F> Work<T> for F where F: for<'e> FnOnce(&'e mut dyn Exec) -> BoxFuture<'e, Result<T, StoreError>> + Send + 'static {}

/// What a write transaction runs: one `writes` function over the write's
/// inputs, which it borrows. It may run more than once: SQLite's writer
/// undoes a whole batch and runs it again when one of its writes fails
/// after changing rows (`group`), so it must decide from the rows and its
/// inputs alone, as every write does.
pub(crate) trait WriteWork<I, T>: for<'e> Fn(&'e mut dyn Exec, &'e I) -> BoxFuture<'e, Result<T, StoreError>> + Send + 'static {}
impl<I, T, F> WriteWork<I, T> for F where F: for<'e> Fn(&'e mut dyn Exec, &'e I) -> BoxFuture<'e, Result<T, StoreError>> + Send + 'static {}

/// How a database runs reads and writes.
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// Runs `work` in a read-only transaction (one consistent moment).
    async fn read<T: Send + 'static, F: Work<T>>(&self, work: F) -> Result<T, StoreError>;
    /// `read` for a read that may take long (every row of a table), run
    /// where it cannot hold up the async workers.
    async fn read_apart<T: Send + 'static, F: Work<T>>(&self, work: F) -> Result<T, StoreError> {
        self.read(work).await
    }
    /// Runs `work` over `input` in a write transaction; an error rolls it back.
    async fn write<I: Send + Sync + 'static, T: Send + 'static, F: WriteWork<I, T>>(&self, input: I, work: F) -> Result<T, StoreError>;
    /// The in-memory copy of the live servers, where the backend keeps an
    /// exact one (SQLite, whose one writer keeps it: `mirror`). It shows a
    /// commit only once it is durable; a read of it checks `healthy`.
    fn mirror(&self) -> Option<&Mirror> {
        None
    }
    /// Fails at once if the store can no longer answer (a failed flush).
    fn healthy(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Writes and commits so far, where the backend counts them.
    fn write_stats(&self) -> Option<WriteStats>;
    /// Whether one writer commits every write, one transaction after
    /// another. Then a sync may be decided from a read before its write
    /// (nothing else writes between the two but what the write re-checks),
    /// and events become visible in `seq` order, so a count may go on from
    /// the last `seq` it saw. With concurrent writers a sync is decided
    /// inside its write, and a transaction holding a lower `seq` can commit
    /// after a higher one is seen.
    fn one_writer(&self) -> bool;
}

/// Events counted by kind, every event with `seq <= after` included.
#[derive(Default)]
pub(crate) struct EventCounts {
    after: i64,
    by_kind: std::collections::BTreeMap<String, i64>,
}

/// A store on a backend: `SqliteStore` or `PostgresStore`.
pub struct StoreOn<B> {
    pub(crate) b: B,
    pub(crate) fence: std::sync::Mutex<Option<(String, u64)>>,
    /// Events counted by kind up to a `seq`, so a `/metrics` scrape counts
    /// only the events since the last one (the log only grows).
    pub(crate) event_counts: std::sync::Mutex<EventCounts>,
}

impl<B> StoreOn<B> {
    pub(crate) fn new(b: B) -> StoreOn<B> {
        StoreOn { b, fence: std::sync::Mutex::new(None), event_counts: Default::default() }
    }
}

/// A read of the backend's mirror, where it keeps one: what a read of the
/// rows answers, answered from the mirror (which holds only what is
/// durable, so nothing waits).
fn mirrored<B: Backend, T>(b: &B, read: impl FnOnce(&Mirror) -> T) -> Result<Option<T>, StoreError> {
    let Some(m) = b.mirror() else { return Ok(None) };
    b.healthy()?;
    Ok(Some(read(m)))
}

#[async_trait]
impl<B: Backend> Store for StoreOn<B> {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.b.write(t, move |e, t| Box::pin(writes::insert_token(e, t))).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let hash = hash.to_string();
        self.b.read(move |e| Box::pin(async move { reads::find_token(e, &hash).await })).await
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<u64, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::count_tokens(e, kind).await })).await
    }

    async fn register_node(&self, reg: &NodeRegistration, new_id: &NodeId, now: Millis) -> Result<Node, StoreError> {
        let (reg, new_id) = (reg.clone(), new_id.clone());
        self.b.write((reg, new_id), move |e, (reg, new_id)| Box::pin(writes::register_node(e, reg, new_id, now))).await
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::list_nodes(e).await })).await
    }

    async fn largest_allocatable(&self) -> Result<Option<MemMib>, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::largest_allocatable(e).await })).await
    }

    async fn get_node(&self, id_or_name: &str) -> Result<Option<Node>, StoreError> {
        let id_or_name = id_or_name.to_string();
        self.b.read(move |e| Box::pin(async move { reads::get_node(e, &id_or_name).await })).await
    }

    async fn set_node_status(&self, id: &NodeId, status: NodeStatus) -> Result<Node, StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::set_node_status(e, id, status))).await
    }

    async fn node_usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::node_usage(e).await })).await
    }

    async fn insert_server(&self, s: &Server, event: &NewEvent) -> Result<(), StoreError> {
        let (s, event) = (s.clone(), event.clone());
        self.b.write((s, event), move |e, (s, event)| Box::pin(writes::insert_server(e, s, event))).await
    }

    async fn get_server(&self, id_or_name: &str) -> Result<Option<Server>, StoreError> {
        if let Some(s) = mirrored(&self.b, |m| m.get_server(id_or_name))? {
            return s;
        }
        let id_or_name = id_or_name.to_string();
        self.b.read(move |e| Box::pin(async move { reads::get_server(e, &id_or_name).await })).await
    }

    async fn resolve_server(&self, id_or_name: &str) -> Result<Option<ServerRef>, StoreError> {
        if let Some(s) = mirrored(&self.b, |m| m.resolve_server(id_or_name))? {
            return Ok(s);
        }
        let id_or_name = id_or_name.to_string();
        self.b.read(move |e| Box::pin(async move { reads::resolve_server(e, &id_or_name).await })).await
    }

    async fn list_servers(&self, tenant: Option<&str>) -> Result<Vec<Server>, StoreError> {
        let tenant = tenant.map(str::to_string);
        self.b.read_apart(move |e| Box::pin(async move { reads::list_servers(e, tenant.as_deref()).await })).await
    }

    async fn request_start(&self, id: &ServerId, now: Millis, allow_fresh_world: bool) -> Result<Server, StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::request_start(e, id, now, allow_fresh_world))).await
    }

    async fn request_stop(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::request_stop(e, id, now))).await
    }

    async fn delete_server(&self, id: &ServerId, now: Millis) -> Result<Server, StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::delete_server(e, id, now))).await
    }

    async fn queue_snapshot(&self) -> Result<QueueSnapshot, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::queue_snapshot(e).await })).await
    }

    async fn queued(&self) -> Result<Vec<QueuedServer>, StoreError> {
        if let Some(q) = mirrored(&self.b, |m| m.queued())? {
            return Ok(q);
        }
        self.b.read(move |e| Box::pin(async move { reads::queued(e).await })).await
    }

    async fn commit_placements(&self, plans: &[Placement], now: Millis) -> Result<Vec<PlacementOutcome>, StoreError> {
        // The fence is read when the commit is requested; it is checked
        // against the lease row inside the transaction.
        let (plans, fence) = (plans.to_vec(), self.fence.lock().expect("fence lock").clone());
        self.b.write((plans, fence), move |e, (plans, fence)| Box::pin(writes::commit_placements(e, plans, now, fence.clone()))).await
    }

    async fn desired_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        if let Some(d) = mirrored(&self.b, |m| m.desired_on(node_id))? {
            return d;
        }
        let node_id = node_id.clone();
        self.b.read(move |e| Box::pin(async move { reads::desired_on(e, &node_id).await })).await
    }

    async fn desired_view(&self, node_id: &NodeId, base: Option<std::sync::Arc<[(ServerId, Generation)]>>, reserved: bool) -> Result<DesiredView, StoreError> {
        let from_mirror = mirrored(&self.b, |m| {
            let (keys, added) = match base.as_deref() {
                Some(base) => m.desired_delta(node_id, base)?,
                None => (m.desired_keys(node_id), Vec::new()),
            };
            Ok::<_, StoreError>((keys, added, m.stopping_on(node_id), reserved.then(|| m.node_reserved(node_id))))
        })?;
        if let Some(view) = from_mirror {
            let (keys, added, stopping, reserved) = view?;
            // A kill order needs the running kill operation: read only for
            // the node's servers in `stopping`, mostly none.
            let kill =
                if stopping.is_empty() { Vec::new() } else { self.b.read(move |e| Box::pin(async move { reads::kills_among(e, &stopping).await })).await? };
            return Ok(DesiredView { keys, added, kill, reserved });
        }
        let node_id = node_id.clone();
        self.b.read(move |e| Box::pin(async move { reads::desired_view(e, &node_id, base.as_deref(), reserved).await })).await
    }

    async fn placed_on(&self, node_id: &NodeId) -> Result<Vec<Server>, StoreError> {
        if let Some(p) = mirrored(&self.b, |m| m.placed_on(node_id))? {
            return p;
        }
        let node_id = node_id.clone();
        self.b.read(move |e| Box::pin(async move { reads::placed_on(e, &node_id).await })).await
    }

    async fn status_counts(&self) -> Result<(Vec<(ServerStatus, u64)>, u64), StoreError> {
        if let Some(counts) = mirrored(&self.b, |m| m.status_counts())? {
            let open = self.b.read(move |e| Box::pin(async move { reads::open_session_count(e).await })).await?;
            return Ok((counts, open));
        }
        self.b.read(move |e| Box::pin(async move { reads::status_counts(e).await })).await
    }

    async fn try_lead(&self, replica: &str, ttl_ms: i64, now: Millis) -> Result<Option<LeaderLease>, StoreError> {
        let replica = replica.to_string();
        self.b.write(replica, move |e, replica| Box::pin(writes::try_lead(e, replica, ttl_ms, now))).await
    }

    async fn heartbeat(&self, replica: &ReplicaInfo) -> Result<(), StoreError> {
        let replica = replica.clone();
        self.b.write(replica, move |e, replica| Box::pin(writes::heartbeat(e, replica))).await
    }

    async fn cluster(&self) -> Result<(Vec<ReplicaInfo>, Option<LeaderLease>), StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::cluster(e).await })).await
    }

    async fn count_events(&self) -> Result<Vec<(String, i64)>, StoreError> {
        // Where a lower seq may still commit, every scrape counts them all.
        let after = if self.b.one_writer() { self.event_counts.lock().expect("event counts lock").after } else { 0 };
        let (new, last) = self.b.read(move |e| Box::pin(async move { reads::count_events_after(e, after).await })).await?;
        if !self.b.one_writer() {
            return Ok(new);
        }
        let mut counts = self.event_counts.lock().expect("event counts lock");
        // A scrape that ran alongside took this step already: its total
        // stands (it covers this one's events or is a moment behind).
        if counts.after == after {
            for (kind, n) in new {
                *counts.by_kind.entry(kind).or_default() += n;
            }
            counts.after = last.max(after);
        }
        Ok(counts.by_kind.iter().map(|(k, n)| (k.clone(), *n)).collect())
    }

    async fn node_volumes(&self, id: &NodeId) -> Result<Vec<ServerId>, StoreError> {
        let id = id.clone();
        self.b.read(move |e| Box::pin(async move { reads::node_volumes(e, &id).await })).await
    }

    async fn apply_verdicts(&self, verdicts: &[Verdict], now: Millis) -> Result<usize, StoreError> {
        let verdicts = verdicts.to_vec();
        self.b.write(verdicts, move |e, verdicts| Box::pin(writes::apply_verdicts(e, verdicts, now))).await
    }

    async fn set_drain(&self, id: &NodeId, draining: bool, deadline: Option<Millis>) -> Result<Node, StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::set_drain(e, id, draining, deadline))).await
    }

    async fn sessions_of(&self, server: &ServerId) -> Result<Vec<BillingSession>, StoreError> {
        let server = server.clone();
        self.b.read(move |e| Box::pin(async move { reads::sessions_of(e, &server).await })).await
    }

    async fn sessions_between(&self, tenant: Option<&str>, from: Millis, to: Millis) -> Result<Vec<BillingSession>, StoreError> {
        let tenant = tenant.map(str::to_string);
        self.b.read(move |e| Box::pin(async move { reads::sessions_between(e, tenant.as_deref(), from, to).await })).await
    }

    async fn open_sessions(&self) -> Result<Vec<BillingSession>, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::open_sessions(e).await })).await
    }

    async fn ledger_of(&self, server: &ServerId) -> Result<Vec<LedgerEntry>, StoreError> {
        let server = server.clone();
        self.b.read(move |e| Box::pin(async move { reads::ledger_of(e, &server).await })).await
    }

    async fn sweep_zombies(&self, now: Millis) -> Result<Vec<BillingSession>, StoreError> {
        self.b.write((), move |e, _| Box::pin(writes::sweep_zombies(e, now))).await
    }

    async fn roll_over(&self, max_len_ms: Millis, fresh_ms: Millis, now: Millis) -> Result<usize, StoreError> {
        self.b.write((), move |e, _| Box::pin(writes::roll_over(e, max_len_ms, fresh_ms, now))).await
    }

    async fn insert_session(&self, s: &BillingSession) -> Result<i64, StoreError> {
        let s = s.clone();
        self.b.write(s, move |e, s| Box::pin(writes::insert_session(e, s))).await
    }

    async fn request_operation(&self, req: &OpRequest, now: Millis) -> Result<(Operation, Server), StoreError> {
        let mut req = req.clone();
        if let Some(p) = req.place.as_mut() {
            // Checked against the lease row inside the transaction, as an
            // admission commit's is.
            p.fence = self.fence.lock().expect("fence lock").clone();
        }
        self.b.write(req, move |e, req| Box::pin(writes::request_operation(e, req, now))).await
    }

    async fn advance_operations(&self, server_id: &ServerId, now: Millis) -> Result<Vec<Operation>, StoreError> {
        let server_id = server_id.clone();
        self.b.write(server_id, move |e, server_id| Box::pin(writes::advance_operations(e, server_id, now))).await
    }

    async fn get_operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        let id = id.to_string();
        self.b.read(move |e| Box::pin(async move { reads::get_operation(e, &id).await })).await
    }

    async fn list_operations(&self, filter: &OpFilter) -> Result<Vec<Operation>, StoreError> {
        let filter = filter.clone();
        self.b.read(move |e| Box::pin(async move { reads::list_operations(e, &filter).await })).await
    }

    async fn ops_work(&self, window_start: Millis, with_active: bool) -> Result<OpsWork, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::ops_work(e, window_start, with_active).await })).await
    }

    async fn fail_server(
        &self,
        id: &ServerId,
        generation: Generation,
        from: ServerStatus,
        error: &str,
        event: &NewEvent,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let (id, error, event) = (id.clone(), error.to_string(), event.clone());
        self.b.write((id, error, event), move |e, (id, error, event)| Box::pin(writes::fail_server(e, id, generation, from, error, event, now))).await
    }

    async fn set_restart_at(&self, id: &ServerId, generation: Generation, at: Millis) -> Result<(), StoreError> {
        let id = id.clone();
        self.b.write(id, move |e, id| Box::pin(writes::set_restart_at(e, id, generation, at))).await
    }

    async fn killing_on(&self, node_id: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError> {
        let node_id = node_id.clone();
        self.b.read(move |e| Box::pin(async move { reads::killing_on(e, &node_id).await })).await
    }

    async fn insert_webhook(&self, w: &Webhook) -> Result<Webhook, StoreError> {
        let w = w.clone();
        self.b.write(w, move |e, w| Box::pin(writes::insert_webhook(e, w))).await
    }

    async fn list_webhooks(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StoreError> {
        let tenant = tenant.map(str::to_string);
        self.b.read(move |e| Box::pin(async move { reads::list_webhooks(e, tenant.as_deref()).await })).await
    }

    async fn get_webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let id = id.to_string();
        self.b.read(move |e| Box::pin(async move { reads::get_webhook(e, &id).await })).await
    }

    async fn delete_webhook(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.b.write(id, move |e, id| Box::pin(writes::delete_webhook(e, id))).await
    }

    async fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Result<Webhook, StoreError> {
        let id = id.to_string();
        self.b.write(id, move |e, id| Box::pin(writes::set_webhook_enabled(e, id, enabled))).await
    }

    async fn fan_out(&self, email: bool, limit: u32, now: Millis) -> Result<usize, StoreError> {
        self.b.write((), move |e, _| Box::pin(writes::fan_out(e, email, limit, now))).await
    }

    async fn due_deliveries(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryJob>, StoreError> {
        self.b.read(move |e| Box::pin(async move { reads::due_deliveries(e, now, limit).await })).await
    }

    async fn record_delivery(&self, id: &str, outcome: &DeliveryOutcome, policy: &DeliveryPolicy, random: u64, now: Millis) -> Result<(), StoreError> {
        let (id, outcome, policy) = (id.to_string(), outcome.clone(), *policy);
        self.b.write((id, outcome, policy), move |e, (id, outcome, policy)| Box::pin(writes::record_delivery(e, id, outcome, policy, random, now))).await
    }

    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
        let filter = filter.clone();
        self.b.read(move |e| Box::pin(async move { reads::list_deliveries(e, &filter).await })).await
    }

    async fn insert_events(&self, events: &[NewEvent], now: Millis) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.b.write(events, move |e, events| Box::pin(writes::insert_events(e, events, now))).await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let filter = filter.clone();
        self.b.read(move |e| Box::pin(async move { reads::list_events(e, &filter).await })).await
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.b.read_apart(move |e| Box::pin(async move { reads::snapshot(e).await })).await
    }

    async fn facts(&self) -> Result<Facts, StoreError> {
        self.b.read_apart(move |e| Box::pin(async move { reads::facts(e).await })).await
    }

    async fn sync_node(&self, input: &SyncInput, now: Millis, decide: Decide) -> Result<(Node, Reconciled), StoreError> {
        let pre = if let Some(m) = self.b.mirror() {
            // The node's renewal from its row, its servers from the mirror
            // (at least as new as the row read just before).
            let node_id = input.node_id.clone();
            match self.b.read(move |e| Box::pin(async move { reads::node_renewal(e, &node_id).await })).await? {
                Some((last_sync_at, registered_at)) => {
                    let placed = m.placed(&input.node_id);
                    let decided = decide(&placed, last_sync_at.unwrap_or(registered_at));
                    Some((last_sync_at, placed, decided))
                }
                None => None,
            }
        } else if self.b.one_writer() {
            let (input, decide) = (input.clone(), decide.clone());
            self.b.read(move |e| Box::pin(async move { reads::pre_decide(e, &input, &decide).await })).await?
        } else {
            None
        };
        let input = input.clone();
        self.b
            .write((input, decide, std::sync::Mutex::new(pre)), move |e, (input, decide, pre)| {
                Box::pin(writes::sync_node(e, input, now, decide, pre.lock().expect("pre lock").take()))
            })
            .await
    }

    fn set_fence(&self, fence: Option<(String, u64)>) {
        *self.fence.lock().expect("fence lock") = fence;
    }

    fn write_stats(&self) -> Option<WriteStats> {
        self.b.write_stats()
    }
}
