//! Acceptance H: for random histories of one server (running, partitions
//! shorter and longer than its window, crashes, stops), the time billed
//! equals the confirmed running time within one sync interval per session,
//! and sessions never overlap. Drives the real SQLite store with the real
//! `reconcile` and `health::judge` on a simulated clock.

#[allow(dead_code)]
mod suite;

use berth_core::health::{judge, HealthConfig};
use berth_core::placement::Placement;
use berth_core::reconcile::{reconcile, InstanceReport, InstanceState};
use berth_core::retry::RetryPolicy;
use berth_core::{LastExit, NodeId, ServerStatus};
use berth_store::{SqliteStore, Store};
use proptest::prelude::*;

const SYNC: i64 = 1000;
const CFG: HealthConfig = HealthConfig { lease_ttl_ms: 3000, lease_grace_ms: 2000 };

#[derive(Debug, Clone)]
enum Step {
    Run(i64),
    Partition(i64),
    Crash,
    Stop,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1i64..20).prop_map(|n| Step::Run(n * SYNC)),
        2 => (1i64..40).prop_map(|n| Step::Partition(n * SYNC)),
        1 => Just(Step::Crash),
        1 => Just(Step::Stop),
    ]
}

struct Sim {
    store: SqliteStore,
    node: NodeId,
    server: berth_core::ServerId,
    t: i64,
    seq: u64,
    generation: u64,
    /// The agent's last successful renewal (no latency here: sent = received).
    last_send: i64,
    window: i64,
    alive: bool,
}

impl Sim {
    async fn sync(&mut self, report: Vec<InstanceReport>) {
        self.seq += 1;
        let input = suite::sync_input(&self.node, 1, self.seq);
        let t = self.t;
        let decide = move |placed: &[berth_core::reconcile::Placed], last_alive: i64| reconcile(placed, &report, t, last_alive, &RetryPolicy::default(), 0);
        self.store.sync_node(&input, t, std::sync::Arc::new(decide.clone())).await.unwrap();
        self.last_send = t;
    }

    fn report(&self, state: InstanceState, exit: Option<LastExit>) -> Vec<InstanceReport> {
        vec![InstanceReport { server_id: self.server.clone(), generation: self.generation, state, exit, error_class: None, error: None, used_mib: None }]
    }

    async fn judge(&mut self) {
        let snap = self.store.snapshot().await.unwrap();
        let v = judge(&snap.nodes, &snap.servers, self.t, 0, CFG);
        self.store.apply_verdicts(&v, self.t).await.unwrap();
    }

    async fn status(&self) -> ServerStatus {
        self.store.get_server(&self.server.0).await.unwrap().unwrap().status
    }
}

async fn run(window: i64, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("b.db")).await.unwrap();
    let node = store.register_node(&suite::reg("n1", 8000), &NodeId("node_0000000000000001".into()), 0).await.unwrap();
    let mut s = suite::server("s", 512);
    s.stop_after_ms = window;
    store.insert_server(&s, &berth_core::NewEvent { kind: "server_created", server_id: None, node_id: None, message: String::new() }).await.unwrap();
    let q = store.request_start(&s.id, 0, false).await.unwrap();
    let p = Placement { server_id: s.id.clone(), expected_generation: q.generation, node_id: node.id.clone(), memory_mib: s.memory_mib, port: 30000 };
    store.commit_placements(&[p], 0).await.unwrap();
    let mut sim = Sim { store, node: node.id, server: s.id, t: SYNC, seq: 0, generation: 1, last_send: 0, window, alive: true };
    sim.sync(sim.report(InstanceState::Starting, None)).await;
    sim.t += SYNC;
    sim.sync(sim.report(InstanceState::Running, None)).await;
    let confirmed_at = sim.t;
    // Ground truth: the instance confirmed alive from `confirmed_at` to
    // `truth_end` (its last confirmation, or its confirmed stop).
    let mut truth_end = confirmed_at;

    'history: for st in steps {
        match st {
            Step::Run(d) => {
                let until = sim.t + d;
                while sim.t < until {
                    sim.t += SYNC;
                    sim.sync(sim.report(InstanceState::Running, None)).await;
                    sim.judge().await;
                    truth_end = sim.t;
                }
            }
            Step::Partition(d) => {
                let until = sim.t + d;
                let fence_at = sim.last_send + CFG.lease_ttl_ms + sim.window;
                while sim.t < until {
                    sim.t += SYNC;
                    if sim.alive && sim.t > fence_at {
                        sim.alive = false; // the watchdog fenced it
                    }
                    sim.judge().await;
                }
                sim.t += SYNC;
                if sim.alive {
                    sim.sync(sim.report(InstanceState::Running, None)).await;
                    truth_end = sim.t; // it ran through: the backfill is real time
                } else {
                    sim.sync(sim.report(InstanceState::Exited, Some(LastExit { reason: "fenced".into(), code: None }))).await;
                    break 'history;
                }
                sim.judge().await;
            }
            Step::Crash => {
                sim.t += SYNC;
                sim.sync(sim.report(InstanceState::Exited, Some(LastExit { reason: "exited".into(), code: Some(1) }))).await;
                break 'history;
            }
            Step::Stop => {
                let id = sim.server.clone();
                sim.store.request_stop(&id, sim.t).await.unwrap();
                sim.t += SYNC;
                sim.sync(vec![]).await; // gone: the stop is confirmed now
                truth_end = sim.t;
                break 'history;
            }
        }
        if !matches!(sim.status().await, ServerStatus::Running | ServerStatus::Unknown) {
            break;
        }
    }
    let status = sim.status().await;
    let sessions = sim.store.sessions_of(&sim.server).await.unwrap();
    prop_assert!(!sessions.is_empty());
    for w in sessions.windows(2) {
        prop_assert!(w[0].ended_at.unwrap() <= w[1].started_at, "sessions overlap: {sessions:?}");
    }
    let end_of = |e: Option<i64>| e.unwrap_or(sim.t);
    let billed: i64 = sessions.iter().map(|b| end_of(b.ended_at) - b.started_at).sum();
    // While still running, the open session is billed to now, which the
    // last report confirmed.
    let truth = if status == ServerStatus::Running { sim.t - confirmed_at } else { truth_end - confirmed_at };
    prop_assert!((billed - truth).abs() <= SYNC * sessions.len() as i64, "billed {billed} ms, confirmed {truth} ms, status {status:?}, sessions {sessions:?}");
    let open = sessions.iter().filter(|b| b.ended_at.is_none()).count();
    prop_assert!(open <= 1);
    prop_assert_eq!(open == 1, status == ServerStatus::Running, "an open session exactly while running: {:?}", sessions);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn billed_time_is_confirmed_running_time(window in prop_oneof![Just(0i64), Just(5000i64), Just(20_000i64)], steps in proptest::collection::vec(step(), 1..8)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(window, steps))?;
    }
}
