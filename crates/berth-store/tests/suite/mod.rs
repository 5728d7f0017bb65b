//! The store test suite, written once against `&dyn Store` so every backend
//! runs the same checks (each backend's test file calls these functions).

use std::sync::Arc;

use berth_core::admission::Misfit;
use berth_core::invariants;
use berth_core::operation::{OpKind, OpOrigin, OpStatus as BurstOpStatus};
use berth_core::placement::Placement;
use berth_core::reconcile::{Change, Reconciled};
use berth_core::{LastExit, MemMib, NewEvent, NodeId, PortRange, Server, ServerId, ServerStatus};
use berth_store::{NodeRegistration, OpRequest, PlacementOutcome, ServerRef, Store, StoreError, SyncInput};

pub fn reg(name: &str, mib: u64) -> NodeRegistration {
    NodeRegistration {
        name: name.into(),
        address: String::new(),
        driver: "process".into(),
        total_mib: MemMib(mib),
        system_reserved_mib: MemMib(0),
        cpu_cores: 2,
        ports: PortRange { min: 30000, max: 30999 },
        max_concurrent_starts: 0,
    }
}

pub fn server(name: &str, mib: u64) -> Server {
    berth_testkit::stopped_server(name, mib)
}

pub fn sync_input(node: &NodeId, epoch: u64, seq: u64) -> SyncInput {
    SyncInput {
        node_id: node.clone(),
        epoch,
        seq,
        host_total_mib: MemMib(1),
        host_available_mib: MemMib(1),
        disk_total_mib: 0,
        disk_used_mib: 0,
        disk_pressure: false,
        volumes: None,
    }
}

fn ev() -> NewEvent {
    NewEvent { kind: "server_created", server_id: None, node_id: None, message: "created".into() }
}

/// Creates and queues a server.
pub async fn queued(store: &dyn Store, name: &str, mib: u64) -> Server {
    let s = server(name, mib);
    store.insert_server(&s, &ev()).await.unwrap();
    store.request_start(&s.id, 10, false).await.unwrap()
}

fn plan(s: &Server, node: &NodeId, port: u16) -> Placement {
    Placement { server_id: s.id.clone(), expected_generation: s.generation, node_id: node.clone(), memory_mib: s.memory_mib, port }
}

async fn assert_no_violations(store: &dyn Store) {
    let snap = store.snapshot().await.unwrap();
    let mut v = invariants::check(&snap.nodes, &snap.servers, &snap.reservations, None);
    v.extend(invariants::check_billing(&snap.servers, &snap.open_sessions));
    assert!(v.is_empty(), "{v:?}");
    // The checker's own read (`facts`) sees what the whole snapshot does.
    let facts = store.facts().await.unwrap();
    let checked: Vec<invariants::CheckedServer> = snap.servers.iter().map(Into::into).collect();
    assert_eq!(facts.servers, checked);
    assert_eq!((facts.nodes, facts.reservations, facts.open_sessions), (snap.nodes, snap.reservations, snap.open_sessions));
}

/// L1: plans made on a stale snapshot cannot over-commit; the commit
/// re-checks against the rows.
pub async fn stale_plans_cannot_overcommit(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 2500), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 1024).await;
    let b = queued(store, "b", 1024).await;
    let c = queued(store, "c", 1024).await;
    let out = store.commit_placements(&[plan(&a, &node.id, 30000), plan(&b, &node.id, 30001), plan(&c, &node.id, 30002)], 20).await.unwrap();
    assert!(matches!(out[0], PlacementOutcome::Committed { generation: 1, .. }), "{:?}", out[0]);
    assert!(matches!(out[1], PlacementOutcome::Committed { generation: 1, .. }), "{:?}", out[1]);
    assert_eq!(out[2], PlacementOutcome::Rejected(Misfit::InsufficientMemory));
    let usage = store.node_usage().await.unwrap();
    assert_eq!(usage[0].reserved, MemMib(2048));
    assert_eq!(store.get_server("c").await.unwrap().unwrap().status, ServerStatus::Queued);
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Starting);
    // Who a server is, by name or id: its node once placed, none while queued.
    let placed = ServerRef { id: a.id.clone(), tenant: a.tenant.clone(), node_id: Some(node.id.clone()), memory_mib: a.memory_mib, home_node: None };
    assert_eq!(store.resolve_server("a").await.unwrap(), Some(placed.clone()));
    assert_eq!(store.resolve_server(&a.id.0).await.unwrap(), Some(placed));
    assert_eq!(store.resolve_server("c").await.unwrap().and_then(|r| r.node_id), None);
    assert_no_violations(store).await;
}

/// A start placed in its own write: re-checked against the rows like a
/// committed plan (L1), and not past a starved server or onto a taken
/// port; a refused proposal leaves the server queued.
pub async fn a_start_is_placed_in_its_own_write_when_it_fits(store: &dyn Store) {
    use berth_core::operation::{OpKind, OpStatus};
    let node = store.register_node(&reg("n1", 2048), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let propose = |port: u16| berth_store::Proposal { node_id: node.id.clone(), port, starvation_ms: 60_000, fence: None };
    let start = |s: &Server, id: &str, port: u16| OpRequest { place: Some(propose(port)), ..op_req(s, OpKind::Start, id) };
    let a = server("direct-a", 1024);
    store.insert_server(&a, &ev()).await.unwrap();
    let (op, placed) = store.request_operation(&start(&a, "op_direct_a", 30005), 100).await.unwrap();
    assert_eq!((placed.status, placed.node_id.as_ref(), placed.port, placed.generation), (ServerStatus::Starting, Some(&node.id), Some(30005), 1));
    assert_eq!(op.status, OpStatus::Running, "the start runs until the instance is confirmed");
    // The answer is the row, with what queueing wrote (its place in the
    // queue, a fresh attempt count) though both steps were one row write.
    assert_eq!(store.get_server(&a.id.0).await.unwrap().unwrap(), placed);
    assert_eq!((placed.queued_at, placed.attempts, placed.updated_at), (Some(100), 0, 100));
    assert_eq!(store.node_usage().await.unwrap()[0].reserved, MemMib(1024));
    // The history keeps both steps, in order.
    let kinds = |evs: Vec<berth_core::Event>| evs.into_iter().map(|e| e.kind).collect::<Vec<_>>();
    let of = |id: &ServerId| berth_store::EventFilter { server_id: Some(id.clone()), limit: 100, ..Default::default() };
    let of_a = kinds(store.list_events(&of(&a.id)).await.unwrap());
    assert_eq!(of_a[of_a.len() - 2..], ["server_queued", "server_placed"], "{of_a:?}");
    // The port is taken: refused by the re-check, queued.
    let b = server("direct-b", 512);
    store.insert_server(&b, &ev()).await.unwrap();
    let (_, b_after) = store.request_operation(&start(&b, "op_direct_b", 30005), 110).await.unwrap();
    assert_eq!((b_after.status, b_after.node_id.as_ref(), b_after.queued_at), (ServerStatus::Queued, None, Some(110)));
    // Refused, the server's row is written queued all the same.
    assert_eq!(store.get_server(&b.id.0).await.unwrap().unwrap(), b_after);
    assert_eq!(kinds(store.list_events(&of(&b.id)).await.unwrap()).last().map(String::as_str), Some("server_queued"));
    // Too big for what is left: refused, queued.
    let c = server("direct-c", 1536);
    store.insert_server(&c, &ev()).await.unwrap();
    let (_, c_after) = store.request_operation(&start(&c, "op_direct_c", 30006), 120).await.unwrap();
    assert_eq!(c_after.status, ServerStatus::Queued);
    assert_eq!(store.get_server(&c.id.0).await.unwrap().unwrap(), c_after);
    // `c` has waited past the starvation bound: it blocks backfill, so a
    // start that fits waits in the queue behind it.
    let d = server("direct-d", 256);
    store.insert_server(&d, &ev()).await.unwrap();
    let (_, d_after) = store.request_operation(&start(&d, "op_direct_d", 30007), 120 + 60_000).await.unwrap();
    assert_eq!(d_after.status, ServerStatus::Queued, "a starved server blocks backfill");
    assert_eq!(store.get_server(&d.id.0).await.unwrap().unwrap(), d_after);
    // Before the bound, backfill: `e` fits and is placed past the queue.
    let e = server("direct-e", 256);
    store.insert_server(&e, &ev()).await.unwrap();
    let (_, e_after) = store.request_operation(&start(&e, "op_direct_e", 30008), 130).await.unwrap();
    assert_eq!(e_after.status, ServerStatus::Starting);
    assert_eq!(store.node_usage().await.unwrap()[0].reserved, MemMib(1024 + 256));
    assert_no_violations(store).await;
}

/// L1 under concurrency: many committers racing for one node.
pub async fn concurrent_commits_never_exceed_a_node(store: Arc<dyn Store>) {
    let node = store.register_node(&reg("n1", 1000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let mut servers = Vec::new();
    for i in 0..40 {
        servers.push(queued(store.as_ref(), &format!("s{i}"), 100).await);
    }
    let tasks: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (store, p) = (store.clone(), plan(s, &node.id, 30000 + i as u16));
            tokio::spawn(async move { store.commit_placements(&[p], 20).await.unwrap() })
        })
        .collect();
    let mut committed = 0;
    for t in tasks {
        if matches!(t.await.unwrap()[0], PlacementOutcome::Committed { .. }) {
            committed += 1;
        }
    }
    assert_eq!(committed, 10);
    assert_eq!(store.node_usage().await.unwrap()[0].reserved, MemMib(1000));
    assert_no_violations(store.as_ref()).await;
}

/// Many writes at once are each answered as if alone (group commit must
/// not change a single answer): a refused request in the burst writes
/// nothing, not even the settling it did before it was refused (L7); a
/// duplicate name is refused without a row or an event; every other write
/// commits; concurrent placements never exceed the node (L1).
pub async fn a_burst_of_writes_is_answered_write_by_write(store: Arc<dyn Store>) {
    let node = store.register_node(&reg("burst", 3000), &NodeId("node_burst".into()), 1).await.unwrap();
    let a = server("burst-a", 1024);
    store.insert_server(&a, &ev()).await.unwrap();
    let start = |id: &ServerId, op: &str| OpRequest {
        server_id: id.clone(),
        kind: OpKind::Start,
        origin: OpOrigin::User,
        new_id: op.into(),
        fresh_world: false,
        place: None,
    };
    store.request_operation(&start(&a.id, "op_burst_a"), 2).await.unwrap();
    // The queue gave up on `a`; its start operation is still running until
    // something settles it.
    let failed = NewEvent { kind: "start_failed", server_id: Some(a.id.clone()), node_id: None, message: "no capacity".into() };
    assert!(store.fail_server(&a.id, 0, ServerStatus::Queued, "no_capacity: test", &failed, 3).await.unwrap());
    assert_eq!(store.get_operation("op_burst_a").await.unwrap().unwrap().status, BurstOpStatus::Running);
    let events_before = event_count(store.as_ref()).await;

    let mut burst = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = store.clone();
        burst.spawn(async move { ("create", store.insert_server(&server(&format!("burst-{i}"), 100), &ev()).await.map(|_| ())) });
    }
    for i in 0..5 {
        let (store, mut dup) = (store.clone(), server(&format!("burst-{i}"), 100));
        dup.id = ServerId(format!("srv_dup{i:013}"));
        burst.spawn(async move { ("duplicate", store.insert_server(&dup, &ev()).await.map(|_| ())) });
    }
    {
        let store = store.clone();
        // Settles the start (failed), then is refused: a failed server
        // does not stop.
        let stop = OpRequest { kind: OpKind::Stop, ..start(&a.id, "op_burst_stop") };
        burst.spawn(async move { ("stop", store.request_operation(&stop, 5).await.map(|_| ())) });
    }
    let (mut created, mut duplicates, mut refused_stop) = (0, 0, false);
    while let Some(done) = burst.join_next().await {
        match done.unwrap() {
            ("create", Ok(())) => created += 1,
            ("create", Err(StoreError::Conflict(_))) => duplicates += 1, // a duplicate won the name
            ("duplicate", Err(StoreError::Conflict(_))) => duplicates += 1,
            ("duplicate", Ok(())) => created += 1,
            ("stop", Err(StoreError::Invalid(_))) => refused_stop = true,
            (what, other) => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!((created, duplicates), (40, 5));
    assert!(refused_stop, "a failed server cannot be stopped");
    assert_eq!(
        store.get_operation("op_burst_a").await.unwrap().unwrap().status,
        BurstOpStatus::Running,
        "the refused request's settling of the start was rolled back with it"
    );
    assert!(store.get_operation("op_burst_stop").await.unwrap().is_none(), "the refused operation left no row");
    assert_eq!(store.list_servers(None).await.unwrap().len(), 41);
    assert_eq!(event_count(store.as_ref()).await, events_before + 40, "refused writes leave no events");

    // Start the 40 at once, then place them in 40 concurrent commits: the
    // 3000 MiB take 30 of them, never more.
    let servers: Vec<Server> = store.list_servers(None).await.unwrap().into_iter().filter(|s| s.id != a.id).collect();
    let mut starts = tokio::task::JoinSet::new();
    for (i, s) in servers.iter().enumerate() {
        let (store, req) = (store.clone(), start(&s.id, &format!("op_burst_{i}")));
        starts.spawn(async move { store.request_operation(&req, 6).await.unwrap().1 });
    }
    let mut queued = Vec::new();
    while let Some(s) = starts.join_next().await {
        let s = s.unwrap();
        assert_eq!(s.status, ServerStatus::Queued);
        queued.push(s);
    }
    let mut commits = tokio::task::JoinSet::new();
    for (i, s) in queued.iter().enumerate() {
        let (store, p) = (store.clone(), plan(s, &node.id, 30001 + i as u16));
        commits.spawn(async move { store.commit_placements(&[p], 7).await.unwrap() });
    }
    let mut committed = 0;
    while let Some(out) = commits.join_next().await {
        if matches!(out.unwrap()[0], PlacementOutcome::Committed { .. }) {
            committed += 1;
        }
    }
    assert_eq!(committed, 30);
    assert_eq!(store.node_usage().await.unwrap()[0].reserved, MemMib(3000));
    assert_no_violations(store.as_ref()).await;
}

/// L2: one port per node, one reservation per server, and plans for a
/// server that changed since the snapshot are refused.
pub async fn ports_are_unique_and_stale_servers_refused(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 100).await;
    let b = queued(store, "b", 100).await;
    let out = store.commit_placements(&[plan(&a, &node.id, 30000), plan(&b, &node.id, 30000)], 20).await.unwrap();
    assert_eq!(out[1], PlacementOutcome::Rejected(Misfit::PortTaken));
    // A port held by a row of an earlier commit is seen in the rows too.
    let out = store.commit_placements(&[plan(&b, &node.id, 30000)], 20).await.unwrap();
    assert_eq!(out[0], PlacementOutcome::Rejected(Misfit::PortTaken));
    // `a` is placed now: a second plan from the old snapshot is stale.
    let out = store.commit_placements(&[plan(&a, &node.id, 30005)], 21).await.unwrap();
    assert_eq!(out[0], PlacementOutcome::Stale);
    // `b` stopped in the meantime: stale too.
    store.request_stop(&b.id, 22).await.unwrap();
    let out = store.commit_placements(&[plan(&b, &node.id, 30006)], 23).await.unwrap();
    assert_eq!(out[0], PlacementOutcome::Stale);
    assert_eq!(store.node_usage().await.unwrap()[0].servers, 1);
    assert_no_violations(store).await;
}

/// Syncs from an older agent run (epoch) or out of order (seq) are refused.
pub async fn syncs_are_fenced_by_epoch_and_sequence(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let nothing = |_: &[berth_core::reconcile::Placed], _: i64| Reconciled::default();
    let input = |epoch, seq| sync_input(&node.id, epoch, seq);
    store.sync_node(&input(1, 1), 5, std::sync::Arc::new(nothing)).await.unwrap();
    assert!(matches!(store.sync_node(&input(1, 1), 6, std::sync::Arc::new(nothing)).await, Err(StoreError::StaleSync(_))));
    let again = store.register_node(&reg("n1", 8000), &NodeId("node_ffffffffffffffff".into()), 7).await.unwrap();
    assert_eq!(again.id, node.id, "re-registration keeps the node");
    assert_eq!(again.epoch, 2);
    assert!(matches!(store.sync_node(&input(1, 9), 8, std::sync::Arc::new(nothing)).await, Err(StoreError::StaleSync(_))));
    store.sync_node(&input(2, 1), 9, std::sync::Arc::new(nothing)).await.unwrap();
}

/// L3: a change derived from a report about another generation is not
/// applied; one about the current generation is.
pub async fn report_changes_are_conditional_on_generation(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 100).await;
    store.commit_placements(&[plan(&a, &node.id, 30000)], 20).await.unwrap();
    let input = |seq| sync_input(&node.id, 1, seq);
    let id = a.id.clone();
    let old = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 0,
            to: ServerStatus::Crashed,
            exit: LastExit { reason: "exited".into(), code: Some(1) },
            billed_until: 29,
        }],
        ..Default::default()
    };
    store.sync_node(&input(1), 30, std::sync::Arc::new(old.clone())).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Starting);
    let id = a.id.clone();
    let current = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Confirmed { server_id: id.clone(), generation: 1 }],
        ..Default::default()
    };
    store.sync_node(&input(2), 31, std::sync::Arc::new(current.clone())).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Running);
    let desired = store.desired_on(&node.id).await.unwrap();
    assert_eq!(desired.len(), 1);
    // Stopping and a report that the instance is gone release the row.
    store.request_stop(&a.id, 40).await.unwrap();
    assert!(store.desired_on(&node.id).await.unwrap().is_empty());
    let id = a.id.clone();
    let gone = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 1,
            to: ServerStatus::Stopped,
            exit: LastExit { reason: "stopped".into(), code: Some(0) },
            billed_until: 41,
        }],
        ..Default::default()
    };
    store.sync_node(&input(3), 41, std::sync::Arc::new(gone.clone())).await.unwrap();
    let s = store.get_server("a").await.unwrap().unwrap();
    assert_eq!(s.status, ServerStatus::Stopped);
    assert_eq!(s.node_id, None);
    assert!(store.node_usage().await.unwrap().is_empty());
    assert_no_violations(store).await;
}

/// A sync that confirms many instances at once (as every sync does under a
/// burst of starts) does for each exactly what one confirmation does:
/// running, one open session with its ledger line, the reservation active,
/// its event; and a confirmation of another generation, or of a server no
/// longer starting (its stop came first), changes nothing (L3, L4).
pub async fn a_sync_confirms_many_servers_at_once(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 64000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let mut servers = Vec::new();
    for i in 0..21u16 {
        let s = queued(store, &format!("s{i:02}"), 100).await;
        store.commit_placements(&[plan(&s, &node.id, 30000 + i)], 20).await.unwrap();
        servers.push(s);
    }
    // s20 is stopped before the sync: its confirmation finds it stopping.
    store.request_stop(&servers[20].id, 25).await.unwrap();
    let stale = servers[7].id.clone();
    let changes: Vec<Change> = servers.iter().map(|s| Change::Confirmed { server_id: s.id.clone(), generation: if s.id == stale { 0 } else { 1 } }).collect();
    let events: Vec<NewEvent> = servers
        .iter()
        .map(|s| NewEvent { kind: "server_running", server_id: Some(s.id.clone()), node_id: Some(node.id.clone()), message: format!("{} running", s.name) })
        .collect();
    let decided = Reconciled { changes, events, ..Default::default() };
    let before = event_count(store).await;
    store.sync_node(&sync_in(&node.id, 1), 30, Arc::new(move |_: &[berth_core::reconcile::Placed], _: i64| decided.clone())).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    for s in &servers {
        let now = store.get_server(&s.name).await.unwrap().unwrap();
        let sessions = store.sessions_of(&s.id).await.unwrap();
        let ledger = store.ledger_of(&s.id).await.unwrap();
        let reservation = snap.reservations.iter().find(|r| r.server_id == s.id).expect("placed servers keep their reservation");
        if s.id == stale || s.name == "s20" {
            assert_ne!(now.status, ServerStatus::Running, "{}", s.name);
            assert!(sessions.is_empty(), "{}: {sessions:?}", s.name);
            assert!(ledger.is_empty(), "{}: {ledger:?}", s.name);
            assert_eq!(reservation.state, berth_core::ReservationState::Pending, "{}", s.name);
            continue;
        }
        assert_eq!(now.status, ServerStatus::Running, "{}", s.name);
        assert_eq!(sessions.len(), 1, "{}: {sessions:?}", s.name);
        let session = &sessions[0];
        assert_eq!((session.started_at, session.ended_at, session.generation, session.memory_mib), (30, None, 1, MemMib(100)), "{}", s.name);
        assert_eq!(session.node_id, node.id);
        assert_eq!(ledger.len(), 1, "{}: {ledger:?}", s.name);
        assert_eq!((ledger[0].kind.as_str(), ledger[0].session_id, ledger[0].detail.as_str()), ("opened", session.id, "generation 1"), "{}", s.name);
        assert_eq!(reservation.state, berth_core::ReservationState::Active, "{}", s.name);
    }
    assert_eq!(store.open_sessions().await.unwrap().len(), 19);
    assert_eq!(event_count(store).await - before, 19, "one event for each confirmation applied");
    assert_no_violations(store).await;
}

/// Names are unique among live servers; a deleted server frees its name;
/// illegal transitions are typed errors.
pub async fn names_and_transitions(store: &dyn Store) {
    let a = server("a", 100);
    store.insert_server(&a, &ev()).await.unwrap();
    let mut dup = server("a", 100);
    dup.id = ServerId("srv_00000000000000ff".into());
    assert!(matches!(store.insert_server(&dup, &ev()).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.request_stop(&a.id, 2).await, Err(StoreError::Invalid(_))));
    store.request_start(&a.id, 3, false).await.unwrap();
    assert!(matches!(store.request_start(&a.id, 4, false).await, Err(StoreError::Invalid(_))));
    store.delete_server(&a.id, 5).await.unwrap();
    assert!(store.get_server("a").await.unwrap().is_none());
    assert_eq!(store.resolve_server("a").await.unwrap(), None, "a deleted server is nobody");
    assert_eq!(store.resolve_server(&a.id.0).await.unwrap(), None);
    store.insert_server(&dup, &ev()).await.unwrap();
    // The name now means the new server.
    assert_eq!(store.resolve_server("a").await.unwrap().map(|r| r.id), Some(dup.id.clone()));
    assert_eq!(store.list_servers(None).await.unwrap().len(), 1);
    assert!(matches!(store.request_start(&a.id, 6, false).await, Err(StoreError::NotFound { .. })));
}

/// Leadership: one holder at a time, renewals keep the epoch, a takeover
/// after expiry bumps it, and a fenced commit of a deposed leader fails.
pub async fn leadership_is_exclusive_and_fences_commits(store: &dyn Store) {
    let a = store.try_lead("a", 1000, 0).await.unwrap().expect("a leads a fresh cluster");
    assert_eq!(a.epoch, 1);
    assert!(store.try_lead("b", 1000, 500).await.unwrap().is_none(), "b must wait for a's lease");
    let renewed = store.try_lead("a", 1000, 600).await.unwrap().unwrap();
    assert_eq!(renewed.epoch, 1, "a renewal keeps the epoch");
    assert_eq!(renewed.expires_at, 1600);
    let b = store.try_lead("b", 1000, 1700).await.unwrap().expect("b takes over after expiry");
    assert_eq!(b.epoch, 2);
    assert!(store.try_lead("a", 1000, 1800).await.unwrap().is_none());

    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let s = queued(store, "x", 100).await;
    store.set_fence(Some(("a".into(), 1)));
    let e = store.commit_placements(&[plan(&s, &node.id, 30000)], 1900).await.unwrap_err();
    assert!(matches!(e, StoreError::NotLeader { .. }), "{e:?}");
    assert!(store.node_usage().await.unwrap().is_empty(), "the deposed leader committed nothing");
    store.set_fence(Some(("b".into(), 2)));
    let out = store.commit_placements(&[plan(&s, &node.id, 30000)], 1900).await.unwrap();
    assert!(matches!(out[0], PlacementOutcome::Committed { generation: 1, .. }), "{:?}", out[0]);
    store.set_fence(None);

    let now = 2000;
    store.heartbeat(&berth_store::ReplicaInfo { id: "b".into(), address: "http://b".into(), started_at: 1, last_seen: now }).await.unwrap();
    let (replicas, lease) = store.cluster().await.unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(lease.unwrap().holder, "b");
}

/// Two replicas (two stores on one database) committing at once for the
/// same nodes never over-commit.
pub async fn two_replicas_committing_never_overcommit(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let n1 = a.register_node(&reg("n1", 1000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let n2 = a.register_node(&reg("n2", 1000), &NodeId("node_0000000000000002".into()), 0).await.unwrap();
    let mut servers = Vec::new();
    for i in 0..60 {
        servers.push(queued(a.as_ref(), &format!("s{i}"), 100).await);
    }
    let tasks: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            // Each plan names both nodes' worth of work in one batch, in
            // opposite node orders on the two replicas.
            let (first, second) = if i % 2 == 0 { (&n1.id, &n2.id) } else { (&n2.id, &n1.id) };
            let p1 = plan(s, first, 30000 + i as u16);
            let mut p2 = plan(s, second, 30100 + i as u16);
            p2.expected_generation = 99; // the duplicate for the other node is stale
            tokio::spawn(async move { store.commit_placements(&[p1, p2], 20).await.unwrap() })
        })
        .collect();
    let mut committed = 0;
    for t in tasks {
        committed += t.await.unwrap().iter().filter(|o| matches!(o, PlacementOutcome::Committed { .. })).count();
    }
    assert_eq!(committed, 20, "two nodes of 1000 MiB hold exactly twenty 100 MiB servers");
    for u in a.node_usage().await.unwrap() {
        assert_eq!(u.reserved, MemMib(1000));
    }
    assert_no_violations(a.as_ref()).await;
}

/// Events filter by server, node and kind, and page by sequence.
pub async fn events_filter_and_page(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 100).await;
    let _b = queued(store, "b", 100).await;
    let all = store.list_events(&berth_store::EventFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 5, "{all:?}"); // node_registered, 2x created, 2x queued
    let of_a = store.list_events(&berth_store::EventFilter { server_id: Some(a.id.clone()), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(of_a.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["server_queued"], "created events carry no id in this suite");
    let of_node = store.list_events(&berth_store::EventFilter { node_id: Some(node.id.clone()), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(of_node.len(), 1);
    let queued_kind = store.list_events(&berth_store::EventFilter { kind: Some("server_queued".into()), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(queued_kind.len(), 2);
    let page1 = store.list_events(&berth_store::EventFilter { limit: 2, ..Default::default() }).await.unwrap();
    let page2 = store.list_events(&berth_store::EventFilter { limit: 100, after: Some(page1[1].seq), ..Default::default() }).await.unwrap();
    assert_eq!(page1.len() + page2.len(), all.len());
    assert!(page2[0].seq > page1[1].seq);
    assert_eq!(store.count_events().await.unwrap(), counted(&all));
    store.insert_events(&[NewEvent { kind: "later", server_id: None, node_id: None, message: "later".into() }], 5_000).await.unwrap();
    let since = store.list_events(&berth_store::EventFilter { since: Some(5_000), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(since.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["later"]);
    // The counts go on from the last call: the new event once, the old
    // ones not again, and a call with nothing new changes nothing.
    let all = store.list_events(&berth_store::EventFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), counted(&all));
    let _c = queued(store, "c", 100).await;
    let all = store.list_events(&berth_store::EventFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), counted(&all));
    assert_eq!(store.count_events().await.unwrap(), counted(&all));
}

/// Events by kind, in kind order, as `count_events` answers.
fn counted(events: &[berth_core::Event]) -> Vec<(String, i64)> {
    let mut by_kind = std::collections::BTreeMap::<String, i64>::new();
    for e in events {
        *by_kind.entry(e.kind.clone()).or_default() += 1;
    }
    by_kind.into_iter().collect()
}

fn op_req(s: &Server, kind: berth_core::operation::OpKind, id: &str) -> berth_store::OpRequest {
    berth_store::OpRequest { server_id: s.id.clone(), kind, origin: berth_core::operation::OpOrigin::User, new_id: id.into(), fresh_world: false, place: None }
}

async fn event_count(store: &dyn Store) -> usize {
    store.list_events(&berth_store::EventFilter { limit: 1000, ..Default::default() }).await.unwrap().len()
}

fn sync_in(node: &NodeId, seq: u64) -> SyncInput {
    sync_input(node, 1, seq)
}

/// L5: operations run one at a time along the guard table; a refusal
/// writes nothing; a stop cancels a start; a start behind a stop waits
/// until the instance is confirmed gone.
pub async fn operations_follow_the_guard_table(store: &dyn Store) {
    use berth_core::operation::{OpKind, OpStatus};
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let s = server("a", 100);
    store.insert_server(&s, &ev()).await.unwrap();
    let (start, srv) = store.request_operation(&op_req(&s, OpKind::Start, "op_1"), 10).await.unwrap();
    assert_eq!((start.status, srv.status), (OpStatus::Running, ServerStatus::Queued));
    let events = event_count(store).await;
    let e = store.request_operation(&op_req(&s, OpKind::Delete, "op_2"), 11).await.unwrap_err();
    assert!(matches!(e, StoreError::OperationInProgress { blocking: OpKind::Start, .. }), "{e:?}");
    let e = store.request_operation(&op_req(&s, OpKind::Start, "op_3"), 11).await.unwrap_err();
    assert!(matches!(e, StoreError::OperationInProgress { .. }), "{e:?}");
    assert_eq!(event_count(store).await, events, "a refused request wrote an event");
    assert!(store.get_operation("op_2").await.unwrap().is_none(), "a refused request wrote an operation");

    // A stop while queued cancels the start and is done at once.
    let (stop, srv) = store.request_operation(&op_req(&s, OpKind::Stop, "op_4"), 12).await.unwrap();
    assert_eq!((stop.status, srv.status), (OpStatus::Succeeded, ServerStatus::Stopped));
    let start = store.get_operation("op_1").await.unwrap().unwrap();
    assert_eq!((start.status, start.error_code.as_deref()), (OpStatus::Cancelled, Some("cancelled")));

    // Start, place, confirm; then stop and a start behind it.
    let (_, srv) = store.request_operation(&op_req(&s, OpKind::Start, "op_5"), 13).await.unwrap();
    store.commit_placements(&[plan(&srv, &node.id, 30000)], 14).await.unwrap();
    let id = s.id.clone();
    store
        .sync_node(
            &sync_in(&node.id, 1),
            15,
            std::sync::Arc::new(move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
                changes: vec![Change::Confirmed { server_id: id.clone(), generation: 1 }],
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    store.advance_operations(&s.id, 16).await.unwrap();
    assert_eq!(store.get_operation("op_5").await.unwrap().unwrap().status, OpStatus::Succeeded);
    let (stop, srv) = store.request_operation(&op_req(&s, OpKind::Stop, "op_6"), 17).await.unwrap();
    assert_eq!((stop.status, srv.status), (OpStatus::Running, ServerStatus::Stopping));
    let (again, _) = store.request_operation(&op_req(&s, OpKind::Start, "op_7"), 18).await.unwrap();
    assert_eq!(again.status, OpStatus::Pending, "a start behind a stop waits");
    assert!(store.advance_operations(&s.id, 19).await.unwrap().is_empty(), "nothing moves before the instance is gone");
    assert_eq!(store.node_usage().await.unwrap()[0].reserved, MemMib(100), "the reservation stays until confirmed gone");
    let id = s.id.clone();
    let gone = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 1,
            to: ServerStatus::Stopped,
            exit: LastExit { reason: "stopped".into(), code: Some(0) },
            billed_until: 0,
        }],
        ..Default::default()
    };
    store.sync_node(&sync_in(&node.id, 2), 20, std::sync::Arc::new(gone.clone())).await.unwrap();
    // The sync that confirmed the instance gone settled the stop and began
    // the start behind it, in its own transaction: nothing is left to do.
    let changed = store.advance_operations(&s.id, 21).await.unwrap();
    assert!(changed.is_empty(), "{changed:?}");
    assert_eq!(store.get_operation("op_6").await.unwrap().unwrap().status, OpStatus::Succeeded);
    assert_eq!(store.get_operation("op_7").await.unwrap().unwrap().status, OpStatus::Running);
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Queued);
    let all = store.list_operations(&berth_store::OpFilter { server_id: Some(s.id.clone()), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["op_1", "op_4", "op_5", "op_6", "op_7"]);
    let active = store.list_operations(&berth_store::OpFilter { active_only: true, limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(active.len(), 1);
    let work = store.ops_work(0, true).await.unwrap();
    assert_eq!(work.active.iter().map(|a| a.server_id.clone()).collect::<Vec<_>>(), vec![s.id.clone()]);
    assert_eq!(work.active[0].ops.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["op_7"]);
    assert_eq!(work.active[0].server.as_ref().map(|f| f.status), Some(ServerStatus::Queued));
    // The executor's filter agrees with the store: a queued start has
    // nothing to settle, and advancing it changes nothing.
    assert!(!berth_core::operation::needs_advance(work.active[0].server.as_ref(), &work.active[0].ops));
    assert!(store.advance_operations(&s.id, 22).await.unwrap().is_empty());
    assert_no_violations(store).await;
}

/// Kill runs next to a stop, is listed for the node until the instance is
/// confirmed gone, and the reservation is released only then (L3).
pub async fn kill_is_ordered_until_the_instance_is_gone(store: &dyn Store) {
    use berth_core::operation::{OpKind, OpStatus};
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let s = server("k", 100);
    store.insert_server(&s, &ev()).await.unwrap();
    let (_, srv) = store.request_operation(&op_req(&s, OpKind::Start, "op_1"), 10).await.unwrap();
    store.commit_placements(&[plan(&srv, &node.id, 30000)], 11).await.unwrap();
    let (stop, _) = store.request_operation(&op_req(&s, OpKind::Stop, "op_2"), 12).await.unwrap();
    assert_eq!(stop.status, OpStatus::Running, "the stop preempted the start and waits for the instance");
    assert_eq!(store.get_operation("op_1").await.unwrap().unwrap().status, OpStatus::Cancelled);
    assert!(store.killing_on(&node.id).await.unwrap().is_empty(), "a stop is graceful");
    let (kill, srv) = store.request_operation(&op_req(&s, OpKind::Kill, "op_3"), 13).await.unwrap();
    assert_eq!((kill.status, srv.status), (OpStatus::Running, ServerStatus::Stopping));
    assert_eq!(store.killing_on(&node.id).await.unwrap(), vec![(s.id.clone(), 1)]);
    let e = store.request_operation(&op_req(&s, OpKind::Kill, "op_4"), 14).await.unwrap_err();
    assert!(matches!(e, StoreError::OperationInProgress { blocking: OpKind::Kill, .. }), "{e:?}");
    // Regression: what waits behind a kill begins only once the instance
    // is confirmed gone (it began at once and failed as invalid_state).
    let (delete, _) = store.request_operation(&op_req(&s, OpKind::Delete, "op_5"), 14).await.unwrap();
    assert_eq!(delete.status, OpStatus::Pending);
    store.advance_operations(&s.id, 14).await.unwrap();
    assert_eq!(store.get_operation("op_5").await.unwrap().unwrap().status, OpStatus::Pending);
    let id = s.id.clone();
    let gone = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 1,
            to: ServerStatus::Stopped,
            exit: LastExit { reason: "stopped".into(), code: None },
            billed_until: 0,
        }],
        ..Default::default()
    };
    store.sync_node(&sync_in(&node.id, 1), 15, std::sync::Arc::new(gone.clone())).await.unwrap();
    store.advance_operations(&s.id, 16).await.unwrap();
    assert_eq!(store.get_operation("op_3").await.unwrap().unwrap().status, OpStatus::Succeeded);
    assert_eq!(store.get_operation("op_2").await.unwrap().unwrap().status, OpStatus::Succeeded);
    assert_eq!(store.get_operation("op_5").await.unwrap().unwrap().status, OpStatus::Succeeded);
    assert!(store.get_server("k").await.unwrap().is_none(), "deleted after the kill");
    // Deleted by its operation, the server frees its name.
    let mut again = server("k", 100);
    again.id = ServerId("srv_00000000000000fe".into());
    store.insert_server(&again, &ev()).await.unwrap();
    assert_eq!(store.resolve_server("k").await.unwrap().map(|r| r.id), Some(again.id.clone()));
    assert!(store.killing_on(&node.id).await.unwrap().is_empty());
    assert!(store.node_usage().await.unwrap().is_empty());
    assert_no_violations(store).await;
}

/// L4 through a graceful stop: the session stays open while the server is
/// stopping (it still runs) and the sweeper leaves it alone; it closes at
/// the confirmed stop. A session of a stopped server is a zombie.
pub async fn a_stopping_server_is_billed_until_the_stop_is_confirmed(store: &dyn Store) {
    use berth_core::operation::OpKind;
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let s = server("bill", 100);
    store.insert_server(&s, &ev()).await.unwrap();
    let (_, srv) = store.request_operation(&op_req(&s, OpKind::Start, "op_1"), 10).await.unwrap();
    store.commit_placements(&[plan(&srv, &node.id, 30000)], 11).await.unwrap();
    let id = s.id.clone();
    let confirm = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Confirmed { server_id: id.clone(), generation: 1 }],
        ..Default::default()
    };
    store.sync_node(&sync_in(&node.id, 1), 1_000, std::sync::Arc::new(confirm)).await.unwrap();
    let (_, srv) = store.request_operation(&op_req(&s, OpKind::Stop, "op_2"), 2_000).await.unwrap();
    assert_eq!(srv.status, ServerStatus::Stopping);
    assert!(store.sweep_zombies(60_000).await.unwrap().is_empty(), "a stopping server's session is not a zombie");
    assert_no_violations(store).await;
    let id = s.id.clone();
    let gone = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 1,
            to: ServerStatus::Stopped,
            exit: LastExit { reason: "stopped".into(), code: Some(0) },
            billed_until: 61_000,
        }],
        events: vec![NewEvent { kind: "server_stopped", server_id: Some(id.clone()), node_id: None, message: "stopped".into() }],
        ..Default::default()
    };
    store.sync_node(&sync_in(&node.id, 2), 61_000, std::sync::Arc::new(gone)).await.unwrap();
    let sessions = store.sessions_of(&s.id).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!((sessions[0].started_at, sessions[0].ended_at), (1_000, Some(61_000)), "billed through the graceful stop");
    // A session left open on a stopped server is a zombie.
    let mut zombie = sessions[0].clone();
    zombie.ended_at = None;
    zombie.end_reason = None;
    zombie.started_at = 70_000;
    store.insert_session(&zombie).await.unwrap();
    assert_eq!(store.sweep_zombies(80_000).await.unwrap().len(), 1);
    assert_no_violations(store).await;
}

/// Queue timeout and crash loops fail servers that hold nothing; automatic
/// restarts are counted per window and reset by a user's start.
pub async fn failing_and_restart_bookkeeping(store: &dyn Store) {
    use berth_core::operation::{OpKind, OpOrigin, OpStatus};
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let s = server("q", 100);
    store.insert_server(&s, &ev()).await.unwrap();
    let (_, srv) = store.request_operation(&op_req(&s, OpKind::Start, "op_1"), 10).await.unwrap();
    let work = store.ops_work(0, true).await.unwrap();
    assert_eq!(work.queued.len(), 1);
    let fail_ev = NewEvent { kind: "start_failed", server_id: Some(s.id.clone()), node_id: None, message: "no capacity".into() };
    assert!(!store.fail_server(&s.id, srv.generation + 7, ServerStatus::Queued, "no_capacity: x", &fail_ev, 20).await.unwrap(), "stale generation");
    assert!(store.fail_server(&s.id, srv.generation, ServerStatus::Queued, "no_capacity: x", &fail_ev, 20).await.unwrap());
    store.advance_operations(&s.id, 21).await.unwrap();
    let op = store.get_operation("op_1").await.unwrap().unwrap();
    assert_eq!((op.status, op.error_code.as_deref()), (OpStatus::Failed, Some("no_capacity")));
    assert!(store.fail_server(&s.id, 0, ServerStatus::Running, "x", &fail_ev, 22).await.is_err(), "a placed server cannot be failed this way");

    // A crashed server with restart policy on-failure.
    let mut c = server("c", 100);
    c.restart_policy = berth_core::restart::RestartPolicy::OnFailure;
    store.insert_server(&c, &ev()).await.unwrap();
    assert_eq!(store.get_server("c").await.unwrap().unwrap().restart_policy, berth_core::restart::RestartPolicy::OnFailure);
    let mut seq = 0;
    for (round, origin) in [(0, OpOrigin::User), (1, OpOrigin::RestartPolicy), (2, OpOrigin::RestartPolicy)] {
        let req =
            berth_store::OpRequest { server_id: c.id.clone(), kind: OpKind::Start, origin, new_id: format!("op_c{round}"), fresh_world: false, place: None };
        let (_, srv) = store.request_operation(&req, 100 + round).await.unwrap();
        store.commit_placements(&[plan(&srv, &node.id, 30000)], 101 + round).await.unwrap();
        let (id, gen) = (c.id.clone(), srv.generation + 1);
        seq += 1;
        let crash = move |_: &[berth_core::reconcile::Placed], _: i64| Reconciled {
            changes: vec![Change::Ended {
                server_id: id.clone(),
                generation: gen,
                to: ServerStatus::Crashed,
                exit: LastExit { reason: "exited".into(), code: Some(3) },
                billed_until: 0,
            }],
            ..Default::default()
        };
        store.sync_node(&sync_in(&node.id, seq), 102 + round, std::sync::Arc::new(crash.clone())).await.unwrap();
        store.advance_operations(&c.id, 103 + round).await.unwrap();
        let work = store.ops_work(0, true).await.unwrap();
        let (crashed, restarts) = work.crashed.iter().find(|(s, _)| s.id == c.id).cloned().expect("listed as crashed");
        assert_eq!(crashed.status, ServerStatus::Crashed);
        assert_eq!(restarts, round as u32, "automatic restarts since the user's start");
    }
    assert_eq!(store.ops_work(1_000, true).await.unwrap().crashed[0].1, 0, "restarts before the window do not count");
    store.set_restart_at(&c.id, store.get_server("c").await.unwrap().unwrap().generation, 5_000).await.unwrap();
    assert_eq!(store.get_server("c").await.unwrap().unwrap().next_attempt_at, Some(5_000));
    assert_no_violations(store).await;
}

/// Webhooks get deliveries for the events they want (not the history),
/// once per event; failures are retried and, in a row, disable the webhook
/// with an event; successes reset the count.
pub async fn webhooks_fan_out_retry_and_disable(store: &dyn Store) {
    use berth_core::notify::Webhook;
    let crash = |id: &str| NewEvent { kind: "server_crashed", server_id: Some(ServerId(id.into())), node_id: None, message: "crashed".into() };
    let s = server("w", 100);
    store.insert_server(&s, &ev()).await.unwrap();
    store.insert_events(&[crash(&s.id.0)], 1).await.unwrap();
    let hook = |id: &str, tenant: Option<&str>| Webhook {
        id: id.into(),
        url: "http://127.0.0.1:9/hook".into(),
        tenant: tenant.map(String::from),
        events: vec![],
        secret: "sekrit".into(),
        enabled: true,
        consecutive_failures: 0,
        after_seq: 0,
        created_at: 2,
    };
    let global = store.insert_webhook(&hook("wh_global", None)).await.unwrap();
    assert!(global.after_seq > 0, "history is not sent to a new webhook");
    store.insert_webhook(&hook("wh_other", Some("someone-else"))).await.unwrap();
    store.insert_webhook(&hook("wh_mine", Some("default"))).await.unwrap();
    assert_eq!(store.list_webhooks(Some("default")).await.unwrap().len(), 1);
    assert_eq!(store.list_webhooks(None).await.unwrap().len(), 3);

    store.insert_events(&[crash(&s.id.0)], 3).await.unwrap();
    store.insert_events(&[NewEvent { kind: "server_running", server_id: Some(s.id.clone()), node_id: None, message: "up".into() }], 3).await.unwrap();
    assert!(store.fan_out(true, 100, 4).await.unwrap() >= 2);
    assert_eq!(store.fan_out(true, 100, 4).await.unwrap(), 0, "the cursor moved");
    let due = store.due_deliveries(4, 100).await.unwrap();
    let mut ids: Vec<&str> = due.iter().map(|j| j.delivery.id.as_str()).collect();
    ids.sort();
    let seq = due.iter().find(|j| j.delivery.channel == "webhook").unwrap().event.seq;
    // Email follows the notification cursor (from the schema's creation),
    // a webhook only events after its own creation.
    assert_eq!(
        ids,
        [format!("email.{}", seq - 1), format!("email.{seq}"), format!("wh_global.{seq}"), format!("wh_mine.{seq}")],
        "one per target, alerts only"
    );
    assert!(due.iter().all(|j| j.event.kind == "server_crashed"));
    let job = due.iter().find(|j| j.delivery.id.starts_with("wh_global")).unwrap();
    assert_eq!(job.webhook.as_ref().unwrap().secret, "sekrit");

    let policy = berth_store::DeliveryPolicy { retry: berth_core::notify::default_delivery_retry(), disable_after: 3 };
    let fail = berth_store::DeliveryOutcome::Failed { status: Some(500), error: "http 500".into() };
    let id = format!("wh_global.{seq}");
    store.record_delivery(&id, &fail, &policy, 0, 10).await.unwrap();
    store.record_delivery(&id, &fail, &policy, 0, 11).await.unwrap();
    assert!(store.due_deliveries(12, 100).await.unwrap().iter().all(|j| j.delivery.id != id), "not due before its backoff");
    store.record_delivery(&id, &berth_store::DeliveryOutcome::Delivered { status: Some(200) }, &policy, 0, 20_000).await.unwrap();
    store.record_delivery(&id, &fail, &policy, 0, 20_001).await.unwrap(); // a late duplicate changes nothing
    let log = store.list_deliveries(&berth_store::DeliveryFilter { webhook_id: Some("wh_global".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].status.as_str(), log[0].attempts, log[0].last_status), ("delivered", 3, Some(200)));
    assert_eq!(store.get_webhook("wh_global").await.unwrap().unwrap().consecutive_failures, 0, "a success resets the count");

    let id = format!("wh_mine.{seq}");
    for t in 0..3 {
        store.record_delivery(&id, &fail, &policy, 0, 30 + t).await.unwrap();
    }
    let mine = store.get_webhook("wh_mine").await.unwrap().unwrap();
    assert!(!mine.enabled, "disabled after three failures in a row");
    let disabled = store.list_events(&berth_store::EventFilter { kind: Some("webhook_disabled".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(disabled.len(), 1);
    assert_eq!(
        store.list_deliveries(&berth_store::DeliveryFilter { webhook_id: Some("wh_mine".into()), limit: 10, ..Default::default() }).await.unwrap()[0].status,
        "failed"
    );
    let back = store.set_webhook_enabled("wh_mine", true).await.unwrap();
    assert!(back.enabled && back.consecutive_failures == 0);
    store.delete_webhook("wh_other").await.unwrap();
    assert!(matches!(store.delete_webhook("wh_other").await, Err(StoreError::NotFound { .. })));
    let emails = store.list_deliveries(&berth_store::DeliveryFilter { channel: Some("email".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(emails.len(), 2);
}
