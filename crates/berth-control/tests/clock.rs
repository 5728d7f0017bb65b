//! Time-driven behaviour of the operations engine with an injected clock
//! (acceptance B): a transient start failure is retried on the backoff
//! schedule (1, 2, 4 minutes, then it fails) and succeeds once capacity
//! frees; a server that cannot fit fails with `no_capacity` after the
//! queue timeout; restart policy `on-failure` restarts a crash loop with
//! doubling delays and fails it after the restart limit.
//!
//! A sync naming the desired set it holds gets only what changed.
//!
//! The control plane runs in this process with a manual clock and a real
//! SQLite store; the test plays the agent through the sync use case, so it
//! decides exactly what each instance reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_api::{HostStats, InstanceKey, RegisterRequest, SyncRequest, SyncResponse};
use berth_control::auth::Caller;
use berth_control::clock::Clock;
use berth_control::leader::Replica;
use berth_control::templates::Templates;
use berth_control::{ControlConfig, ControlPlane, Extras};
use berth_core::operation::OpKind;
use berth_core::reconcile::{ErrorClass, InstanceReport, InstanceState};
use berth_core::{LastExit, Millis, PortRange, Server, ServerId, ServerStatus, TokenKind};
use berth_store::{SqliteStore, Store};
use serde_json::json;

struct ManualClock(AtomicI64);

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

const T0: Millis = 1_700_000_000_000;

struct Harness {
    cp: ControlPlane,
    clock: Arc<ManualClock>,
    admin: Caller,
    node_id: String,
    epoch: u64,
    seq: u64,
    /// What the fake agent reports, by (server, generation).
    instances: BTreeMap<(ServerId, u64), InstanceReport>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(memory_mib: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("berth.db")).await.unwrap());
        let clock = Arc::new(ManualClock(AtomicI64::new(T0)));
        // A lease far longer than the clock jumps of the test.
        let cfg = ControlConfig { lease_ttl_ms: 24 * 3_600_000, ..Default::default() };
        let replica = Replica { id: "cp_test".into(), address: "http://test".into(), started_at: T0 };
        let extras = Extras { clock: Some(clock.clone()), email: None };
        let cp = ControlPlane::start_with(store, Templates::load(None).unwrap(), cfg, replica, extras).unwrap();
        let admin = Caller { kind: TokenKind::Admin, tenant: None };
        let reg = RegisterRequest {
            name: "n1".into(),
            address: String::new(),
            driver: "fake".into(),
            total_mib: memory_mib,
            allocatable_mib: memory_mib,
            cpu_cores: 2,
            ports: PortRange { min: 27000, max: 27099 },
            max_concurrent_starts: 0,
        };
        let r = cp.app.register(&admin, &reg).await.unwrap();
        // The leader loop takes the lease at once; wait for it.
        for _ in 0..100 {
            if cp.app.leading.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Harness { cp, clock, admin, node_id: r.node_id, epoch: r.epoch, seq: 0, instances: BTreeMap::new(), _dir: dir }
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    fn advance(&self, ms: Millis) {
        self.clock.0.fetch_add(ms, Ordering::SeqCst);
        self.cp.app.queue_wake.notify_one();
        self.cp.app.ops_wake.notify_one();
    }

    async fn server(&self, name: &str) -> Server {
        self.cp.app.store.get_server(name).await.unwrap().expect("server exists")
    }

    async fn create(&self, name: &str, mib: u64, restart_policy: &str) {
        let body = json!({"name": name, "template": "fakegame", "memory_mib": mib, "restart_policy": restart_policy});
        self.cp.app.create_server(&self.admin, &body).await.unwrap();
    }

    async fn start(&self, name: &str) -> String {
        self.cp.app.operation(&self.admin, name, OpKind::Start).await.unwrap().0.id
    }

    /// Waits (real time, bounded) until the server satisfies `cond`.
    async fn wait(&self, name: &str, what: &str, cond: impl Fn(&Server) -> bool) -> Server {
        for _ in 0..200 {
            let s = self.server(name).await;
            if cond(&s) {
                return s;
            }
            self.cp.app.queue_wake.notify_one();
            self.cp.app.ops_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {name} to be {what}: {:?}", self.server(name).await);
    }

    /// Sets what the agent reports for the server's current generation and
    /// syncs once (every instance is reported, as a real agent does).
    async fn report(&mut self, name: &str, state: InstanceState, error: Option<(ErrorClass, &str)>, exit_code: Option<i32>) {
        let s = self.server(name).await;
        let r = InstanceReport {
            server_id: s.id.clone(),
            generation: s.generation,
            state,
            exit: exit_code.map(|c| LastExit { reason: "exited".into(), code: Some(c) }),
            error_class: error.map(|e| e.0),
            error: error.map(|e| e.1.to_string()),
            used_mib: None,
        };
        self.instances.insert((s.id.clone(), s.generation), r);
        self.sync().await;
        // Ended instances are dropped once reported, as the agent forgets
        // them when they are no longer desired.
        self.instances.retain(|_, r| matches!(r.state, InstanceState::Starting | InstanceState::Running));
    }

    async fn sync(&mut self) {
        self.sync_naming(None).await;
    }

    /// Syncs naming `held` as the desired set the agent holds.
    async fn sync_naming(&mut self, held: Option<String>) -> SyncResponse {
        self.sync_as(held, true).await
    }

    /// A sync from an agent that does (or, older, does not) apply deltas.
    async fn sync_as(&mut self, held: Option<String>, accepts_delta: bool) -> SyncResponse {
        self.seq += 1;
        let req = SyncRequest {
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            seq: self.seq,
            instances: self.instances.values().cloned().collect(),
            host: HostStats { total_mib: 1 << 20, available_mib: 1 << 20 },
            disk: None,
            volumes: None,
            wait_ms: 0,
            desired_version: held,
            accepts_delta,
        };
        self.cp.app.sync(&self.admin, req).await.unwrap()
    }

    /// On the 1024 MiB node: "a" (800 MiB) runs, and "b" (800 MiB) is
    /// started and cannot fit beside it. Returns b's start operation.
    async fn a_runs_and_b_waits_for_its_memory(&mut self) -> String {
        self.create("a", 800, "never").await;
        self.start("a").await;
        self.wait("a", "starting", |s| s.status == ServerStatus::Starting).await;
        self.report("a", InstanceState::Running, None, None).await;
        self.create("b", 800, "never").await;
        self.start("b").await
    }

    async fn op(&self, id: &str) -> berth_core::operation::Operation {
        self.cp.app.store.get_operation(id).await.unwrap().unwrap()
    }
}

fn within(at: Option<Millis>, from: Millis, delay: Millis) {
    let at = at.expect("a next attempt time");
    let (lo, hi) = (from + delay - delay / 10, from + delay + delay / 10);
    assert!((lo..=hi).contains(&at), "next attempt {} s after, expected {} s ±10 %", (at - from) / 1000, delay / 1000);
}

const PREFLIGHT: &str = "preflight: host has 300 MiB available, the start needs 576 MiB including 64 MiB headroom";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_after_one_two_four_minutes_then_fail() {
    let mut h = Harness::new(4096).await;
    h.create("p", 512, "never").await;
    let op = h.start("p").await;
    h.wait("p", "starting", |s| s.status == ServerStatus::Starting).await;

    for (attempt, delay) in [(1u32, 60_000), (2, 120_000), (3, 240_000)] {
        h.report("p", InstanceState::Failed, Some((ErrorClass::Transient, PREFLIGHT)), None).await;
        let s = h.server("p").await;
        assert_eq!((s.status, s.attempts), (ServerStatus::Queued, attempt), "{s:?}");
        assert!(s.last_error.as_deref().unwrap().contains("preflight"), "{s:?}");
        assert!(s.node_id.is_none(), "the reservation was released");
        within(s.next_attempt_at, h.now(), delay);
        let generation = s.generation;
        // Not before its time, however often the queue runs.
        h.advance(s.next_attempt_at.unwrap() - h.now() - 1_000);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(h.server("p").await.status, ServerStatus::Queued, "retried early");
        assert_eq!(h.op(&op).await.attempts, attempt, "the operation shows the attempts");
        h.advance(2_000);
        let s = h.wait("p", "placed again", |s| s.status == ServerStatus::Starting).await;
        assert_eq!(s.generation, generation + 1);
    }

    // Capacity has freed: the fourth attempt runs.
    h.report("p", InstanceState::Running, None, None).await;
    let s = h.server("p").await;
    assert_eq!((s.status, s.attempts, s.last_error.as_deref()), (ServerStatus::Running, 0, None));
    let o = h.wait_op(&op).await;
    assert_eq!((o.status.as_str(), o.attempts), ("succeeded", 3));

    // A server that keeps failing gives up after the fourth attempt.
    h.create("q", 512, "never").await;
    let op = h.start("q").await;
    for _ in 0..4 {
        h.wait("q", "starting", |s| s.status == ServerStatus::Starting).await;
        h.report("q", InstanceState::Failed, Some((ErrorClass::Transient, PREFLIGHT)), None).await;
        if let Some(at) = h.server("q").await.next_attempt_at {
            h.advance(at - h.now() + 1);
        }
    }
    let s = h.wait("q", "failed", |s| s.status == ServerStatus::Failed).await;
    assert!(s.last_error.as_deref().unwrap().contains("preflight"), "{s:?}");
    let o = h.wait_op(&op).await;
    assert_eq!((o.status.as_str(), o.error_code.as_deref()), ("failed", Some("start_failed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_fit_fails_with_no_capacity_after_the_queue_timeout() {
    let mut h = Harness::new(1024).await;
    let op = h.a_runs_and_b_waits_for_its_memory().await;
    h.advance(9 * 60_000);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(h.server("b").await.status, ServerStatus::Queued, "not before ten minutes");
    h.advance(61_000);
    let s = h.wait("b", "failed", |s| s.status == ServerStatus::Failed).await;
    assert!(s.last_error.as_deref().unwrap().starts_with("no_capacity"), "{s:?}");
    let o = h.wait_op(&op).await;
    assert_eq!((o.status.as_str(), o.error_code.as_deref()), ("failed", Some("no_capacity")));
    let failed =
        h.cp.app
            .store
            .list_events(&berth_store::EventFilter { server_id: Some(s.id.clone()), kind: Some("start_failed".into()), limit: 10, ..Default::default() })
            .await
            .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(h.server("a").await.status, ServerStatus::Running, "the running server is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_a_crash_loop_with_backoff_then_fails_it() {
    let mut h = Harness::new(4096).await;
    h.create("c", 256, "on-failure").await;
    h.create("n", 256, "never").await;
    for name in ["c", "n"] {
        h.start(name).await;
        h.wait(name, "starting", |s| s.status == ServerStatus::Starting).await;
        h.report(name, InstanceState::Running, None, None).await;
    }
    h.report("n", InstanceState::Exited, None, Some(3)).await;
    assert_eq!(h.server("n").await.status, ServerStatus::Crashed);

    for (restart, delay) in [(1, 10_000), (2, 20_000), (3, 40_000), (4, 80_000), (5, 160_000)] {
        h.report("c", InstanceState::Exited, None, Some(3)).await;
        let crashed_at = h.now();
        let s = h.wait("c", "scheduled", |s| s.status == ServerStatus::Crashed && s.next_attempt_at.is_some()).await;
        within(s.next_attempt_at, crashed_at, delay);
        h.advance(s.next_attempt_at.unwrap() - h.now() - 500);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(h.server("c").await.status, ServerStatus::Crashed, "restart {restart} came early");
        h.advance(1_000);
        h.wait("c", "restarted", |s| s.status == ServerStatus::Starting).await;
        h.report("c", InstanceState::Running, None, None).await;
    }
    let ops = h.cp.app.list_operations(&h.admin, Some("c"), false, None, 100).await.unwrap();
    assert_eq!(ops.iter().filter(|o| o.origin == berth_core::operation::OpOrigin::RestartPolicy).count(), 5);

    // The sixth crash within the window: no more restarts.
    h.report("c", InstanceState::Exited, None, Some(3)).await;
    let s = h.wait("c", "failed", |s| s.status == ServerStatus::Failed).await;
    assert!(s.last_error.as_deref().unwrap().contains("crash loop"), "{s:?}");
    let ev =
        h.cp.app.store.list_events(&berth_store::EventFilter { kind: Some("restart_limit_reached".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(ev.len(), 1);

    // Policy never: still crashed long after.
    h.advance(30 * 60_000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.server("n").await.status, ServerStatus::Crashed);
}

impl Harness {
    async fn wait_op(&self, id: &str) -> berth_core::operation::Operation {
        for _ in 0..200 {
            let o = self.op(id).await;
            if o.status.is_terminal() {
                return o;
            }
            self.cp.app.ops_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("operation {id} did not end: {:?}", self.op(id).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_freed_by_a_stop_is_planned_at_once_although_the_queue_plans_on_a_carried_snapshot() {
    // The queue worker carries its capacities across its own commits for a
    // moment; a stop frees memory it has not re-read. The waiting server
    // must still be placed on the next round, not a snapshot later.
    let mut h = Harness::new(1024).await;
    h.a_runs_and_b_waits_for_its_memory().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.server("b").await.status, ServerStatus::Queued, "a holds the memory");
    h.cp.app.operation(&h.admin, "a", OpKind::Stop).await.unwrap();
    h.report("a", InstanceState::Exited, None, Some(0)).await;
    let a = h.server("a").await;
    assert_eq!(a.status, ServerStatus::Stopped, "{a:?}");
    // No clock advance and no extra wake: the release itself wakes the queue.
    let started = std::time::Instant::now();
    loop {
        let b = h.server("b").await;
        if b.status == ServerStatus::Starting {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "b was not placed after a released its memory: {b:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v = h.cp.app.store.snapshot().await.unwrap();
    let violations = berth_core::invariants::check(&v.nodes, &v.servers, &v.reservations, None);
    assert!(violations.is_empty(), "{violations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_waiting_for_its_placement_answers_placed_or_queued_and_forgets_its_wait() {
    let h = Harness::new(1024).await;
    h.create("a", 1024, "never").await;
    h.create("b", 512, "never").await;
    let app = &h.cp.app;
    let (_, a) = app.start_and_wait_placed(&h.admin, "a", false, Duration::from_secs(5)).await.unwrap();
    assert_eq!(a.status, ServerStatus::Starting, "answered once its memory is reserved: {a:?}");
    assert!(a.node_id.is_some(), "{a:?}");
    // Answered from what the placing commit wrote, not a re-read: it must
    // be the row as committed, field for field.
    assert_eq!(a, h.server("a").await, "the answer is the server row as committed");
    // b cannot fit while a holds the node: the wait ends at its timeout
    // with b still queued.
    let (_, b) = app.start_and_wait_placed(&h.admin, "b", false, Duration::from_millis(300)).await.unwrap();
    assert_eq!(b.status, ServerStatus::Queued, "{b:?}");
    // An unknown server is refused before anything waits.
    assert!(app.start_and_wait_placed(&h.admin, "nope", false, Duration::from_secs(1)).await.is_err());
    assert!(app.placed.is_empty(), "every wait forgot its wake-up: {} left", app.placed.len());
}

fn spec_keys(specs: &[berth_core::template::InstanceSpec]) -> Vec<(String, u64)> {
    let mut keys: Vec<(String, u64)> = specs.iter().map(|s| (s.server_id.0.clone(), s.generation)).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_sync_naming_the_set_it_holds_gets_only_what_changed() {
    let mut h = Harness::new(4096).await;
    for name in ["a", "b"] {
        h.create(name, 512, "never").await;
        h.start(name).await;
        h.wait(name, "starting", |s| s.status == ServerStatus::Starting).await;
    }
    let first = h.sync_naming(None).await;
    assert!(first.base_version.is_none() && first.removed.is_empty());
    assert_eq!(spec_keys(&first.desired).len(), 2);

    // An agent that does not apply deltas gets the whole set, even naming
    // a set this control plane sent.
    h.create("c", 512, "never").await;
    h.start("c").await;
    h.wait("c", "starting", |s| s.status == ServerStatus::Starting).await;
    let held = h.sync_as(Some(first.desired_version.clone()), false).await;
    assert!(held.base_version.is_none() && held.removed.is_empty());
    assert_eq!(spec_keys(&held.desired).len(), 3, "a, b and c, whole");

    // d is placed and a leaves the set (stopping).
    let a = h.server("a").await;
    h.create("d", 512, "never").await;
    h.start("d").await;
    let d = h.wait("d", "starting", |s| s.status == ServerStatus::Starting).await;
    h.cp.app.operation(&h.admin, "a", OpKind::Stop).await.unwrap();
    h.wait("a", "stopping", |s| s.status == ServerStatus::Stopping).await;

    let delta = h.sync_naming(Some(held.desired_version.clone())).await;
    assert_eq!(delta.base_version.as_deref(), Some(held.desired_version.as_str()));
    assert_eq!(spec_keys(&delta.desired), [(d.id.0.clone(), d.generation)], "only the added instance is sent");
    assert_eq!(delta.removed, [InstanceKey { server_id: a.id.clone(), generation: a.generation }]);

    // The held set changed by the delta is the whole set a fresh sync gets,
    // under the same version.
    let whole = h.sync_naming(None).await;
    assert_eq!(whole.desired_version, delta.desired_version);
    let mut merged: Vec<(String, u64)> = spec_keys(&held.desired).into_iter().filter(|(id, g)| !(id == &a.id.0 && *g == a.generation)).collect();
    merged.extend(spec_keys(&delta.desired));
    merged.sort();
    assert_eq!(merged, spec_keys(&whole.desired));
    assert_eq!(spec_keys(&whole.desired).len(), 3, "b, c and d");

    // Naming the current set changes nothing; naming a set this control
    // plane never sent gets the whole set.
    let same = h.sync_naming(Some(whole.desired_version.clone())).await;
    assert!(same.unchanged && same.desired.is_empty());
    let unknown = h.sync_naming(Some("0123456789abcdef.3".into())).await;
    assert!(unknown.base_version.is_none());
    assert_eq!(spec_keys(&unknown.desired), spec_keys(&whole.desired));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ids_sort_in_creation_order_while_the_clock_stands_still_or_goes_back() {
    let h = Harness::new(1024).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        if i == 3 {
            // The wall clock stepped back a minute.
            h.clock.0.fetch_sub(60_000, Ordering::SeqCst);
        }
        let name = format!("s{i}");
        h.create(&name, 64, "never").await;
        ids.push(h.server(&name).await.id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "each id sorts after the one made before it: {ids:?}");
}
