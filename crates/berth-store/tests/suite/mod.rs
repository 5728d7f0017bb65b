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
        created_at: 1,
        updated_at: 1,
    }
}

fn ev() -> NewEvent {
    NewEvent { kind: "server_created", server_id: None, node_id: None, message: "created".into() }
}

/// Creates and queues a server.
pub async fn queued(store: &dyn Store, name: &str, mib: u64) -> Server {
    let s = server(name, mib);
    store.insert_server(&s, &ev()).await.unwrap();
    store.request_start(&s.id, 10).await.unwrap()
}

fn plan(s: &Server, node: &NodeId, port: u16) -> Placement {
    Placement { server_id: s.id.clone(), expected_generation: s.generation, node_id: node.clone(), memory_mib: s.memory_mib, port }
}

async fn assert_no_violations(store: &dyn Store) {
    let snap = store.snapshot().await.unwrap();
    let v = invariants::check(&snap.nodes, &snap.servers, &snap.reservations, None);
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
    let nothing = |_: &[Server]| Reconciled::default();
    let input = |epoch, seq| SyncInput { node_id: node.id.clone(), epoch, seq, host_total_mib: MemMib(1), host_available_mib: MemMib(1) };
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
    let input = |seq| SyncInput { node_id: node.id.clone(), epoch: 1, seq, host_total_mib: MemMib(1), host_available_mib: MemMib(1) };
    let id = a.id.clone();
    let old = move |_: &[Server]| Reconciled {
        changes: vec![Change::Ended {
            server_id: id.clone(),
            generation: 0,
            to: ServerStatus::Crashed,
            exit: LastExit { reason: "exited".into(), code: Some(1) },
        }],
        ..Default::default()
    };
    store.sync_node(&input(1), 30, &old).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Starting);
    let id = a.id.clone();
    let current = move |_: &[Server]| Reconciled { changes: vec![Change::Confirmed { server_id: id.clone(), generation: 1 }], ..Default::default() };
    store.sync_node(&input(2), 31, &current).await.unwrap();
    assert_eq!(store.get_server("a").await.unwrap().unwrap().status, ServerStatus::Running);
    let desired = store.desired_on(&node.id).await.unwrap();
    assert_eq!(desired.len(), 1);
    // Stopping and a report that the instance is gone release the row.
    store.request_stop(&a.id, 40).await.unwrap();
    assert!(store.desired_on(&node.id).await.unwrap().is_empty());
    let id = a.id.clone();
    let gone = move |_: &[Server]| Reconciled {
        changes: vec![Change::Ended { server_id: id.clone(), generation: 1, to: ServerStatus::Stopped, exit: LastExit { reason: "stopped".into(), code: Some(0) } }],
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
    store.request_start(&a.id, 3).await.unwrap();
    assert!(matches!(store.request_start(&a.id, 4).await, Err(StoreError::Invalid(_))));
    store.delete_server(&a.id, 5).await.unwrap();
    assert!(store.get_server("a").await.unwrap().is_none());
    store.insert_server(&dup, &ev()).await.unwrap();
    assert_eq!(store.list_servers(None).await.unwrap().len(), 1);
    assert!(matches!(store.request_start(&a.id, 6).await, Err(StoreError::NotFound { .. })));
}
