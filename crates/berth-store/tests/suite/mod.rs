//! The store test suite, written once against `&dyn Store` so every backend
//! runs the same checks (each backend's test file calls these functions).

use std::sync::Arc;

use berth_core::admission::Misfit;
use berth_core::invariants;
use berth_core::placement::Placement;
use berth_core::reconcile::{Change, Reconciled};
use berth_core::{LastExit, MemMib, NewEvent, NodeId, PortRange, Server, ServerId, ServerStatus};
use berth_store::{NodeRegistration, PlacementOutcome, Store, StoreError, SyncInput};

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
    Server {
        id: ServerId(format!("srv_{:016x}", name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)))),
        tenant: "default".into(),
        name: name.into(),
        template: "fakegame".into(),
        memory_mib: MemMib(mib),
        config: Default::default(),
        status: ServerStatus::Stopped,
        node_id: None,
        generation: 0,
        port: None,
        last_exit: None,
        queued_at: None,
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
        used_mib: None,
        stop_after_ms: 300_000,
        stateless: false,
        plan: "standard".into(),
        price_per_gib_hour: 100,
        home_node: None,
        created_at: 1,
        updated_at: 1,
    }
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
}

/// L1: plans made on a stale snapshot cannot over-commit; the commit
/// re-checks against the rows.
pub async fn stale_plans_cannot_overcommit(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 2500), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 1024).await;
    let b = queued(store, "b", 1024).await;
    let c = queued(store, "c", 1024).await;
    let out = store.commit_placements(&[plan(&a, &node.id, 30000), plan(&b, &node.id, 30001), plan(&c, &node.id, 30002)], 20).await.unwrap();
    assert_eq!(out[0], PlacementOutcome::Committed { generation: 1 });
    assert_eq!(out[1], PlacementOutcome::Committed { generation: 1 });
    assert_eq!(out[2], PlacementOutcome::Rejected(Misfit::InsufficientMemory));
    let usage = store.node_usage().await.unwrap();
    assert_eq!(usage[0].reserved, MemMib(2048));
    assert_eq!(store.get_server("c").await.unwrap().unwrap().status, ServerStatus::Queued);
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Starting);
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

/// L2: one port per node, one reservation per server, and plans for a
/// server that changed since the snapshot are refused.
pub async fn ports_are_unique_and_stale_servers_refused(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 100).await;
    let b = queued(store, "b", 100).await;
    let out = store.commit_placements(&[plan(&a, &node.id, 30000), plan(&b, &node.id, 30000)], 20).await.unwrap();
    assert_eq!(out[1], PlacementOutcome::Rejected(Misfit::PortTaken));
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
    let nothing = |_: &[Server], _: i64| Reconciled::default();
    let input = |epoch, seq| sync_input(&node.id, epoch, seq);
    store.sync_node(&input(1, 1), 5, &nothing).await.unwrap();
    assert!(matches!(store.sync_node(&input(1, 1), 6, &nothing).await, Err(StoreError::StaleSync(_))));
    let again = store.register_node(&reg("n1", 8000), &NodeId("node_ffffffffffffffff".into()), 7).await.unwrap();
    assert_eq!(again.id, node.id, "re-registration keeps the node");
    assert_eq!(again.epoch, 2);
    assert!(matches!(store.sync_node(&input(1, 9), 8, &nothing).await, Err(StoreError::StaleSync(_))));
    store.sync_node(&input(2, 1), 9, &nothing).await.unwrap();
}

/// L3: a change derived from a report about another generation is not
/// applied; one about the current generation is.
pub async fn report_changes_are_conditional_on_generation(store: &dyn Store) {
    let node = store.register_node(&reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let a = queued(store, "a", 100).await;
    store.commit_placements(&[plan(&a, &node.id, 30000)], 20).await.unwrap();
    let input = |seq| sync_input(&node.id, 1, seq);
    let id = a.id.clone();
    let old = move |_: &[Server], _: i64| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 0,
            to: ServerStatus::Crashed,
            exit: LastExit { reason: "exited".into(), code: Some(1) },
            billed_until: 29,
        }],
        ..Default::default()
    };
    store.sync_node(&input(1), 30, &old).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Starting);
    let id = a.id.clone();
    let current = move |_: &[Server], _: i64| Reconciled { changes: vec![Change::Confirmed { server_id: id.clone(), generation: 1 }], ..Default::default() };
    store.sync_node(&input(2), 31, &current).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Running);
    let desired = store.desired_on(&node.id).await.unwrap();
    assert_eq!(desired.len(), 1);
    // Stopping and a report that the instance is gone release the row.
    store.request_stop(&a.id, 40).await.unwrap();
    assert!(store.desired_on(&node.id).await.unwrap().is_empty());
    let id = a.id.clone();
    let gone = move |_: &[Server], _: i64| Reconciled {
        changes: vec![Change::Ended { server_id: id.clone(), generation: 1, to: ServerStatus::Stopped, exit: LastExit { reason: "stopped".into(), code: Some(0) }, billed_until: 41 }],
        ..Default::default()
    };
    store.sync_node(&input(3), 41, &gone).await.unwrap();
    let s = store.get_server("a").await.unwrap().unwrap();
    assert_eq!(s.status, ServerStatus::Stopped);
    assert_eq!(s.node_id, None);
    assert!(store.node_usage().await.unwrap().is_empty());
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
    store.insert_server(&dup, &ev()).await.unwrap();
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
    assert_eq!(out[0], PlacementOutcome::Committed { generation: 1 });
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
}
