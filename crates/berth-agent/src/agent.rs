//! The agent: registers its node, then syncs in a loop, converging what
//! runs to what the control plane wants; a supervisor tick watches every
//! instance (readiness, exit, memory, stop deadlines).
//!
//! Sync is level-triggered and idempotent: every request carries the full
//! set of instances; every answer the full desired set. The agent starts a
//! (server, generation) at most once in its life (an ended generation is
//! never restarted), runs only the newest generation of a server, and
//! keeps an ended instance in its reports until the control plane stops
//! desiring it, so an exit is never lost. It never decides placement.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_api::{InstanceKey, KillOrder, RegisterRequest, SyncRequest};
use berth_client::{Client, ClientError};
use berth_core::reconcile::{ErrorClass, InstanceReport, InstanceState};
use berth_core::template::InstanceSpec;
use berth_core::{LastExit, MemMib, PortRange};
use tokio::sync::{watch, Notify};

use crate::driver::{Driver, Key, Observed};
use crate::{host, preflight, watchdog};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// One URL, or several separated by commas: replicas of one control
    /// plane, tried in turn when one is unreachable or unavailable.
    pub control_plane: String,
    pub token: String,
    pub name: String,
    pub address: String,
    /// Memory berth may reserve on this node; `None` is the host's total
    /// minus a system reserve.
    pub memory_mib: Option<u64>,
    pub ports: PortRange,
    pub max_concurrent_starts: u32,
    /// Extra host memory a start must find free beyond its reservation.
    pub headroom_mib: u64,
    pub sync_interval: Duration,
    pub tick: Duration,
    /// The agent's data dir: its disk use is reported, and the fence
    /// watchdog's state lives there.
    pub data_dir: Option<std::path::PathBuf>,
    /// Disk use (percent) of the data volume above which the agent deletes
    /// the output logs of instances that no longer run.
    pub disk_clean_percent: u64,
    /// The berth binary, to start the fence watchdog (`berth watchdog`).
    /// Without it (or without `data_dir`) only the agent's own supervisor
    /// fences, which a paused agent cannot do.
    pub berth_exe: Option<std::path::PathBuf>,
}

impl AgentConfig {
    pub fn new(control_plane: &str, token: &str, name: &str) -> AgentConfig {
        AgentConfig {
            control_plane: control_plane.to_string(),
            token: token.to_string(),
            name: name.to_string(),
            address: String::new(),
            memory_mib: None,
            ports: PortRange { min: 30000, max: 30999 },
            max_concurrent_starts: 0,
            headroom_mib: 64,
            sync_interval: Duration::from_secs(2),
            tick: Duration::from_millis(200),
            data_dir: None,
            disk_clean_percent: 90,
            berth_exe: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Instance {
    /// Shared, not copied: the supervisor tick snapshots every live
    /// instance, and a spec is the bulk of one.
    spec: Arc<InstanceSpec>,
    state: InstanceState,
    exit: Option<LastExit>,
    error: Option<(ErrorClass, String)>,
    used_mib: Option<u64>,
    since: Instant,
    stop_deadline: Option<Instant>,
    /// A kill order was carried out; it is not repeated.
    killed: bool,
}

impl Instance {
    fn new(spec: Arc<InstanceSpec>, state: InstanceState) -> Instance {
        Instance { spec, state, exit: None, error: None, used_mib: None, since: Instant::now(), stop_deadline: None, killed: false }
    }

    fn report(&self) -> InstanceReport {
        InstanceReport {
            server_id: self.spec.server_id.clone(),
            generation: self.spec.generation,
            state: self.state,
            exit: self.exit.clone(),
            error_class: self.error.as_ref().map(|e| e.0),
            error: self.error.as_ref().map(|e| e.1.clone()),
            used_mib: self.used_mib.map(MemMib),
        }
    }

    fn is_live(&self) -> bool {
        matches!(self.state, InstanceState::Starting | InstanceState::Running | InstanceState::Stopping)
    }
}

pub struct Agent {
    cfg: AgentConfig,
    driver: Arc<dyn Driver>,
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
    instances: Mutex<HashMap<Key, Instance>>,
    /// Generations that ended here; never started again.
    finished: Mutex<HashSet<Key>>,
    changed: Notify,
    lease: Mutex<Lease>,
    /// Host memory read by the supervisor's last look, right after it
    /// measured every instance. A sync reports this with those
    /// measurements: the control plane compares host and instance figures
    /// of one moment. (A live host figure beside measurements up to a tick
    /// old made a burst of instances going ready look like memory used
    /// outside berth: a false memory drift alarm.)
    host_seen: Mutex<Option<berth_api::HostStats>>,
}

/// The agent's view of its lease, counted from when it *sent* the last
/// renewal that succeeded, so it always expires before the control plane's
/// view (counted from receipt, plus a grace).
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    renewed_at: Option<Instant>,
    renewed_mono_ms: i64,
    ttl_ms: i64,
}

const SYSTEM_RESERVE_MIB: u64 = 512;

impl Agent {
    /// The first wait after a failed sync; it doubles up to the sync interval.
    const FIRST_RETRY: Duration = Duration::from_millis(200);

    pub fn new(cfg: AgentConfig, driver: Arc<dyn Driver>) -> Arc<Agent> {
        let clients: Vec<Client> = cfg
            .control_plane
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Client::with_timeout(u, &cfg.token, Duration::from_secs(30)))
            .collect();
        assert!(!clients.is_empty(), "an agent needs at least one control-plane url");
        Arc::new(Agent {
            cfg,
            driver,
            clients,
            current: std::sync::atomic::AtomicUsize::new(0),
            instances: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            lease: Mutex::new(Lease::default()),
            host_seen: Mutex::new(None),
        })
    }

    fn client(&self) -> &Client {
        &self.clients[self.current.load(std::sync::atomic::Ordering::SeqCst) % self.clients.len()]
    }

    /// Moves to the next control-plane URL after `e` if it says this one is
    /// unreachable or unavailable. Returns whether it moved.
    fn failover(&self, e: &ClientError) -> bool {
        let unavailable = matches!(e, ClientError::Transport { .. }) || e.status() == Some(503);
        if unavailable && self.clients.len() > 1 {
            let next = self.current.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tracing::warn!(error = %e, to = %self.clients[next % self.clients.len()].base(), "failing over to another control-plane replica");
            return true;
        }
        false
    }

    /// Runs until `shutdown` turns true. Instances keep running after the
    /// agent stops: they are re-adopted by the next run.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if let (Some(dir), Some(exe)) = (&self.cfg.data_dir, &self.cfg.berth_exe) {
            match watchdog::ensure_running(exe, dir) {
                Ok(pid) => tracing::info!(pid, "fence watchdog running"),
                Err(e) => tracing::error!(error = %e, "cannot start the fence watchdog; a paused agent will not fence its instances"),
            }
        }
        self.adopt().await;
        let sup = self.clone();
        let sup_shutdown = shutdown.clone();
        let supervisor = tokio::spawn(async move { sup.supervise(sup_shutdown).await });
        tokio::select! {
            _ = self.sync_loop() => {}
            _ = shutdown.changed() => {}
        }
        supervisor.abort();
    }

    async fn adopt(&self) {
        match self.driver.adopt().await {
            Ok(found) => {
                let mut inst = self.instances.lock().expect("instances lock");
                for (spec, obs) in found {
                    let key = (spec.server_id.clone(), spec.generation);
                    let mut i = Instance::new(Arc::new(spec), InstanceState::Starting);
                    if let Observed::Exited(e) = obs {
                        i.state = InstanceState::Exited;
                        i.exit = Some(e);
                    }
                    inst.insert(key, i);
                }
            }
            Err(e) => tracing::error!(error = %e, "adoption failed; instances left by a previous run are not tracked"),
        }
    }

    fn registration(&self) -> RegisterRequest {
        let mem = self.driver.host_memory();
        let allocatable = self.cfg.memory_mib.unwrap_or(mem.total_mib.saturating_sub(SYSTEM_RESERVE_MIB));
        RegisterRequest {
            name: self.cfg.name.clone(),
            address: self.cfg.address.clone(),
            driver: self.driver.name().to_string(),
            total_mib: mem.total_mib.max(allocatable),
            allocatable_mib: allocatable,
            cpu_cores: self.driver.cpu_cores(),
            ports: self.cfg.ports,
            max_concurrent_starts: self.cfg.max_concurrent_starts,
        }
    }

    async fn register(&self) -> (String, u64) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.client().register(&self.registration()).await {
                Ok(r) => {
                    tracing::info!(node = %r.node_id, epoch = r.epoch, "registered");
                    self.lease.lock().expect("lease lock").ttl_ms = r.lease_ttl_ms as i64;
                    return (r.node_id, r.epoch);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    let moved = self.failover(&e);
                    tokio::time::sleep(if moved { delay / self.clients.len() as u32 } else { delay }).await;
                    delay = (delay * 2).min(self.cfg.sync_interval);
                }
            }
        }
    }

    /// How long a sync may be held. The lease counts from when the last
    /// answered sync was *sent*, and the next one is sent only when that
    /// answer comes: just before an answer the lease is two polls old. So
    /// a poll is at most a third of the lease TTL, or a healthy agent with
    /// a TTL under two sync intervals would fence its own instances.
    fn poll_ms(&self) -> u64 {
        let ttl = self.lease.lock().expect("lease lock").ttl_ms.max(0) as u64;
        let interval = self.cfg.sync_interval.as_millis() as u64;
        if ttl == 0 {
            interval
        } else {
            interval.min(ttl / 3)
        }
    }

    /// The host memory a sync reports: the supervisor's last reading (see
    /// `host_seen`), or a live one before its first look.
    fn host_report(&self) -> berth_api::HostStats {
        let seen = self.host_seen.lock().expect("host lock").clone();
        seen.unwrap_or_else(|| self.driver.host_memory())
    }

    fn report(&self) -> Vec<berth_core::reconcile::InstanceReport> {
        let inst = self.instances.lock().expect("instances lock");
        let mut r: Vec<_> = inst.values().map(Instance::report).collect();
        r.sort_by(|a, b| (&a.server_id, a.generation).cmp(&(&b.server_id, b.generation)));
        r
    }

    async fn sync_loop(&self) {
        let (mut node_id, mut epoch) = self.register().await;
        let mut seq = 0u64;
        // The last desired set received and its version: an answer that
        // says `unchanged` means this set.
        let mut last_desired: Option<(String, Arc<[Arc<InstanceSpec>]>)> = None;
        let mut retry_delay = Self::FIRST_RETRY;
        loop {
            seq += 1;
            let req = SyncRequest {
                node_id: node_id.clone(),
                epoch,
                seq,
                instances: self.report(),
                host: self.host_report(),
                disk: self.cfg.data_dir.as_deref().and_then(host::disk),
                volumes: self.cfg.data_dir.as_deref().map(list_volumes),
                wait_ms: self.poll_ms(),
                desired_version: last_desired.as_ref().map(|(v, _)| v.clone()),
                accepts_delta: true,
            };
            let sent = Instant::now();
            let sent_mono = watchdog::monotonic_ms();
            let resp = tokio::select! {
                r = self.client().sync(&req) => r,
                // A local change (ready, exited) is reported at once; the
                // held request is abandoned, its report already applied.
                _ = self.changed.notified() => continue,
            };
            match resp {
                Ok(resp) => {
                    retry_delay = Self::FIRST_RETRY;
                    *self.lease.lock().expect("lease lock") = Lease { renewed_at: Some(sent), renewed_mono_ms: sent_mono, ttl_ms: resp.lease_ttl_ms as i64 };
                    let killed = self.kill_ordered(&resp.kill).await;
                    let desired = match (resp.unchanged, &last_desired) {
                        (true, Some((_, cached))) => cached.clone(),
                        (true, None) => {
                            // Cannot happen (no version was sent); ask again.
                            continue;
                        }
                        (false, _) => {
                            let desired: Arc<[Arc<InstanceSpec>]> = match (resp.base_version.as_deref(), &last_desired) {
                                (None, _) => resp.desired.into_iter().map(Arc::new).collect(),
                                (Some(base), Some((held, cached))) if base == held => apply_delta(cached, &resp.removed, resp.desired),
                                (Some(_), _) => {
                                    // A change to a set this agent does not
                                    // hold: name none, and get the whole set.
                                    last_desired = None;
                                    continue;
                                }
                            };
                            last_desired = Some((resp.desired_version.clone(), desired.clone()));
                            desired
                        }
                    };
                    let acted = self.converge(&desired).await || killed;
                    self.publish_lease();
                    if !acted && sent.elapsed() < Duration::from_millis(50) {
                        // Guard against a hot loop if the two sides ever
                        // disagree about whether there is work.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(ClientError::Api { status: 404 | 409, message, .. }) => {
                    tracing::warn!(%message, "sync refused; registering again");
                    (node_id, epoch) = self.register().await;
                    seq = 0;
                    last_desired = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sync failed");
                    if !self.failover(&e) {
                        // A control plane that restarts is back within a
                        // fraction of a second: try again soon, then back
                        // off to the sync interval. Jitter keeps a fleet
                        // from returning in one burst.
                        let jitter = Duration::from_millis(std::process::id() as u64 % 97 + seq % 89);
                        tokio::time::sleep(retry_delay + jitter).await;
                        retry_delay = (retry_delay * 2).min(self.cfg.sync_interval);
                    } else {
                        // Give every replica a turn before backing off.
                        tokio::time::sleep(self.cfg.sync_interval / self.clients.len() as u32).await;
                    }
                }
            }
        }
    }

    /// Hands the renewed lease and the live instances to the watchdog.
    fn publish_lease(&self) {
        let Some(dir) = &self.cfg.data_dir else { return };
        if let Some(exe) = &self.cfg.berth_exe {
            // A watchdog that exited (its agent was gone for a while) is
            // started again.
            if let Err(e) = watchdog::ensure_running(exe, dir) {
                tracing::warn!(error = %e, "cannot start the fence watchdog");
            }
        }
        let lease = *self.lease.lock().expect("lease lock");
        let instances: Vec<watchdog::FencedInstance> = {
            let inst = self.instances.lock().expect("instances lock");
            inst.iter()
                .filter(|(_, i)| i.is_live())
                .filter_map(|(k, i)| {
                    self.driver.fence_handle(k).map(|handle| watchdog::FencedInstance {
                        server_id: k.0.clone(),
                        generation: k.1,
                        handle,
                        stop_after_ms: i.spec.stop_after_ms,
                    })
                })
                .collect()
        };
        let state = watchdog::LeaseState { renewed_mono_ms: lease.renewed_mono_ms, ttl_ms: lease.ttl_ms, instances, agent_pid: std::process::id() as i32 };
        if let Err(e) = watchdog::write_lease(dir, &state) {
            tracing::warn!(error = %e, "cannot publish the lease to the watchdog");
        }
    }

    /// Fences on the agent's own clock: an instance whose window passed
    /// without a renewal is stopped even if the watchdog is missing; and
    /// instances the watchdog fenced are recorded as such, never restarted.
    async fn fence(&self) -> bool {
        let lease = *self.lease.lock().expect("lease lock");
        let fenced_by_watchdog: HashSet<Key> = match &self.cfg.data_dir {
            Some(dir) => watchdog::read_fenced(dir).into_iter().map(|r| (r.server_id, r.generation)).collect(),
            None => HashSet::new(),
        };
        // Only what must be fenced is collected: this runs every tick over
        // every instance.
        let since_renewal = lease.renewed_at.map(|at| at.elapsed());
        let to_fence: Vec<Key> = {
            let inst = self.instances.lock().expect("instances lock");
            inst.iter()
                .filter(|(k, i)| {
                    i.is_live()
                        && (since_renewal.is_some_and(|e| e > Duration::from_millis((lease.ttl_ms + i.spec.stop_after_ms.max(0)) as u64))
                            || fenced_by_watchdog.contains(*k))
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        let changed = !to_fence.is_empty();
        for key in to_fence {
            tracing::warn!(server = %key.0, generation = key.1, "fencing: the disconnect window passed without a lease renewal");
            let _ = self.driver.kill(&key, "fenced").await;
            self.update(&key, |i| {
                i.state = InstanceState::Exited;
                i.exit = Some(LastExit { reason: "fenced".into(), code: None });
            });
            self.finished.lock().expect("finished lock").insert(key);
        }
        changed
    }

    /// Frees disk under pressure: the output logs of instances that no
    /// longer run go (worlds are never touched). Returns bytes freed.
    fn clean_disk(&self) -> u64 {
        let Some(dir) = &self.cfg.data_dir else { return 0 };
        let Some(disk) = host::disk(dir) else { return 0 };
        if disk.total_mib == 0 || disk.used_mib * 100 < disk.total_mib * self.cfg.disk_clean_percent {
            return 0;
        }
        let live: HashSet<String> = {
            let inst = self.instances.lock().expect("instances lock");
            inst.iter().filter(|(_, i)| i.is_live()).map(|(k, _)| k.0 .0.clone()).collect()
        };
        let mut freed = 0;
        // Every driver keeps one directory per server under DATA_DIR/instances.
        for entry in std::fs::read_dir(dir.join("instances")).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if live.contains(&name) {
                continue;
            }
            let log = entry.path().join("berth-output.log");
            if let Ok(meta) = std::fs::metadata(&log) {
                if std::fs::remove_file(&log).is_ok() {
                    freed += meta.len();
                }
            }
        }
        if freed > 0 {
            tracing::warn!(freed_bytes = freed, used_mib = disk.used_mib, total_mib = disk.total_mib, "disk pressure: removed logs of stopped instances");
        }
        freed
    }

    /// Converges local instances to `desired`. Returns whether it acted.
    async fn converge(&self, desired: &[Arc<InstanceSpec>]) -> bool {
        let want: HashSet<Key> = desired.iter().map(|s| (s.server_id.clone(), s.generation)).collect();
        let mut acted = false;

        // Stop or drop what is no longer wanted.
        let (to_stop, to_forget): (Vec<_>, Vec<_>) = {
            let inst = self.instances.lock().expect("instances lock");
            let unwanted: Vec<_> = inst.iter().filter(|(k, _)| !want.contains(*k)).map(|(k, i)| (k.clone(), i.state)).collect();
            unwanted.into_iter().partition(|(_, st)| matches!(st, InstanceState::Starting | InstanceState::Running))
        };
        for (key, _) in to_stop {
            self.begin_stop(&key).await;
            acted = true;
        }
        for (key, state) in to_forget {
            if matches!(state, InstanceState::Exited | InstanceState::Failed) {
                self.instances.lock().expect("instances lock").remove(&key);
                self.finished.lock().expect("finished lock").insert(key.clone());
                self.driver.forget(&key).await;
                acted = true;
            }
        }

        // Start what is wanted and new here.
        for spec in desired {
            let key: Key = (spec.server_id.clone(), spec.generation);
            if self.finished.lock().expect("finished lock").contains(&key) {
                continue;
            }
            let older_live: Vec<Key> = {
                let inst = self.instances.lock().expect("instances lock");
                if inst.contains_key(&key) {
                    continue;
                }
                inst.iter().filter(|(k, i)| k.0 == key.0 && k.1 != key.1 && i.is_live()).map(|(k, _)| k.clone()).collect()
            };
            if !older_live.is_empty() {
                // L3 on one node: the old generation must be gone before the
                // new one starts on the same data.
                for k in older_live {
                    self.begin_stop(&k).await;
                }
                acted = true;
                continue;
            }
            acted = true;
            let mem = self.driver.host_memory();
            let port_free = self.driver.port_free(spec.port);
            let mut inst = match preflight::check(mem.available_mib, spec.memory_mib.0, self.cfg.headroom_mib, spec.port, port_free) {
                Err(e) => {
                    tracing::warn!(server = %spec.server_id, error = %e, "preflight failed");
                    let mut i = Instance::new(spec.clone(), InstanceState::Failed);
                    i.error = Some((ErrorClass::Transient, format!("preflight: {e}")));
                    i
                }
                Ok(()) => match self.driver.start(spec).await {
                    Ok(()) => Instance::new(spec.clone(), InstanceState::Starting),
                    Err(e) => {
                        tracing::warn!(server = %spec.server_id, error = %e, "start failed");
                        let mut i = Instance::new(spec.clone(), InstanceState::Failed);
                        i.error = Some((e.class(), e.to_string()));
                        i
                    }
                },
            };
            inst.since = Instant::now();
            self.instances.lock().expect("instances lock").insert(key, inst);
        }
        acted
    }

    /// Kills (SIGKILL, no grace) the live instances the control plane
    /// ordered killed. The instance then reports `stopping` until the
    /// supervisor sees it gone, so the control plane releases its
    /// reservation only once it is confirmed dead (L3).
    async fn kill_ordered(&self, orders: &[KillOrder]) -> bool {
        let mut acted = false;
        for o in orders {
            let key: Key = (o.server_id.clone(), o.generation);
            let due = {
                let mut inst = self.instances.lock().expect("instances lock");
                match inst.get_mut(&key) {
                    Some(i) if i.is_live() && !i.killed => {
                        i.killed = true;
                        i.state = InstanceState::Stopping;
                        true
                    }
                    _ => false,
                }
            };
            if due {
                tracing::info!(server = %key.0, generation = key.1, "killing instance (kill operation)");
                if let Err(e) = self.driver.kill(&key, "killed").await {
                    tracing::warn!(error = %e, "kill failed");
                }
                acted = true;
            }
        }
        acted
    }

    async fn begin_stop(&self, key: &Key) {
        let spec = {
            let mut inst = self.instances.lock().expect("instances lock");
            let Some(i) = inst.get_mut(key) else { return };
            if !matches!(i.state, InstanceState::Starting | InstanceState::Running) {
                return;
            }
            i.state = InstanceState::Stopping;
            i.stop_deadline = Some(Instant::now() + Duration::from_millis(i.spec.stop_timeout_ms));
            i.spec.clone()
        };
        tracing::info!(server = %key.0, generation = key.1, signal = %spec.stop_signal, command = ?spec.stop_command, timeout_ms = spec.stop_timeout_ms, "stopping instance");
        if let Err(e) = self.driver.stop(&spec).await {
            tracing::warn!(error = %e, "graceful stop failed; killing");
            let _ = self.driver.kill(key, "stopped").await;
        }
    }

    /// The supervisor tick: observes every instance and moves it along its
    /// life (starting → running, → exited), enforces memory limits the
    /// driver does not, and kills instances past their stop deadline.
    async fn supervise(&self, shutdown: watch::Receiver<bool>) {
        let mut ticks: u64 = 0;
        // Agents started together (a fleet restarted at once, or many
        // simulated agents in one process) would tick together for good,
        // and what each tick found reaches the control plane as one sync
        // per agent in the same instant: a wave every tick that the writer
        // takes in one go while every start waits behind it. The first
        // wait is a random share of a tick, which spreads the fleet out.
        let mut wait = first_wait(self.cfg.tick);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut changed = self.fence().await;
            if ticks.is_multiple_of(50) {
                self.clean_disk();
            }
            ticks += 1;
            // The instances are listed before the driver is asked: an
            // instance is listed only once its start returned, so the
            // driver's answer covers every one listed. (Asked first, an
            // instance started in between was missing and reported lost.)
            let snapshot: Vec<(Key, Instance)> =
                self.instances.lock().expect("instances lock").iter().filter(|(_, i)| i.is_live()).map(|(k, i)| (k.clone(), i.clone())).collect();
            let observed = self.driver.observe_all().await;
            let host = self.driver.host_memory();
            for (key, inst) in snapshot {
                match observed.get(&key) {
                    Some(Observed::Exited(exit)) => {
                        let mut exit = exit.clone();
                        if inst.state == InstanceState::Stopping && exit.reason != "oom" {
                            exit.reason = if inst.killed { "killed".into() } else { "stopped".into() };
                        }
                        tracing::info!(server = %key.0, generation = key.1, reason = %exit.reason, code = ?exit.code, "instance ended");
                        let permanent = inst.state == InstanceState::Starting && exit.code.is_some_and(|c| inst.spec.permanent_exit_codes.contains(&c));
                        self.update(&key, |i| {
                            if permanent {
                                // It will never start: fail it rather than
                                // report a crash that a restart would repeat.
                                i.state = InstanceState::Failed;
                                i.error = Some((
                                    ErrorClass::Permanent,
                                    format!("exited with code {} before it was ready (a permanent error of its template)", exit.code.unwrap_or_default()),
                                ));
                            } else {
                                i.state = InstanceState::Exited;
                            }
                            i.exit = Some(exit);
                        });
                        changed = true;
                    }
                    Some(Observed::Alive { used_mib }) => {
                        if let Some(used) = used_mib {
                            self.update(&key, |i| i.used_mib = Some(*used));
                            if *used > inst.spec.memory_mib.0 && !self.driver.enforces_memory_limit(&key) {
                                tracing::warn!(server = %key.0, used, limit = inst.spec.memory_mib.0, "memory limit exceeded; killing");
                                let _ = self.driver.kill(&key, "oom").await;
                                continue;
                            }
                        }
                        match inst.state {
                            InstanceState::Starting => {
                                if self.driver.ready(&inst.spec).await {
                                    tracing::info!(server = %key.0, generation = key.1, "instance ready");
                                    self.update(&key, |i| i.state = InstanceState::Running);
                                    changed = true;
                                } else if inst.since.elapsed() > Duration::from_millis(inst.spec.ready_timeout_ms) {
                                    tracing::warn!(server = %key.0, "instance not ready in time; killing");
                                    let _ = self.driver.kill(&key, "ready_timeout").await;
                                }
                            }
                            InstanceState::Stopping if inst.stop_deadline.is_some_and(|d| Instant::now() > d) => {
                                tracing::warn!(server = %key.0, "graceful stop timed out; killing");
                                let _ = self.driver.kill(&key, "stopped").await;
                            }
                            _ => {}
                        }
                    }
                    None => {
                        // The driver lost the instance (should not happen):
                        // report it ended rather than running forever.
                        self.update(&key, |i| {
                            i.state = InstanceState::Exited;
                            i.exit = Some(LastExit { reason: "lost".into(), code: None });
                        });
                        changed = true;
                    }
                }
            }
            *self.host_seen.lock().expect("host lock") = Some(host);
            if changed {
                self.changed.notify_one();
            }
            tokio::time::sleep(wait).await;
            wait = self.cfg.tick;
        }
    }

    fn update(&self, key: &Key, f: impl FnOnce(&mut Instance)) {
        if let Some(i) = self.instances.lock().expect("instances lock").get_mut(key) {
            f(i);
        }
    }
}

/// The supervisor's first wait: a random share of `tick`, so that agents
/// started in the same instant do not tick in step.
fn first_wait(tick: Duration) -> Duration {
    tick.mul_f64(rand::random::<f64>())
}

/// The desired set `held` became: without `removed`, with `added`, in
/// server order as a whole set comes.
fn apply_delta(held: &[Arc<InstanceSpec>], removed: &[InstanceKey], added: Vec<InstanceSpec>) -> Arc<[Arc<InstanceSpec>]> {
    let gone: HashSet<(&str, u64)> = removed.iter().map(|k| (k.server_id.0.as_str(), k.generation)).collect();
    let mut set: Vec<Arc<InstanceSpec>> = held.iter().filter(|s| !gone.contains(&(s.server_id.0.as_str(), s.generation))).cloned().collect();
    set.extend(added.into_iter().map(Arc::new));
    set.sort_by(|a, b| (&a.server_id, a.generation).cmp(&(&b.server_id, b.generation)));
    set.into()
}

/// Server ids with a data dir under `DATA_DIR/instances` (bounded: the list
/// rides on every sync).
fn list_volumes(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| berth_core::ServerId::looks_like(n))
        .collect();
    v.sort();
    v.truncate(10_000);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tests::spec;

    #[test]
    fn agents_started_together_take_their_first_ticks_apart() {
        let tick = Duration::from_millis(200);
        let mut waits: Vec<Duration> = (0..200).map(|_| first_wait(tick)).collect();
        assert!(waits.iter().all(|w| *w < tick), "within one tick");
        waits.sort();
        // 200 agents over 200 ms: a uniform spread puts about ten in each
        // 10 ms step; ticks in step would put all 200 in one.
        let crowd = (0..20).map(|k| waits.iter().filter(|w| w.as_millis() / 10 == k).count()).max().unwrap();
        assert!(crowd < 60, "at most {crowd} in one 10 ms step: {waits:?}");
        assert!(waits.last().unwrap().saturating_sub(waits[0]) > tick / 2, "spread over the tick");
    }

    #[test]
    fn a_delta_removes_and_adds_to_the_held_set() {
        let held: Vec<Arc<InstanceSpec>> = [("a", 1), ("b", 1), ("c", 2)].iter().map(|(id, g)| Arc::new(spec(id, *g, 128, 27000))).collect();
        let removed = [
            InstanceKey { server_id: berth_core::ServerId("b".into()), generation: 1 },
            InstanceKey { server_id: berth_core::ServerId("c".into()), generation: 1 },
        ];
        let set = apply_delta(&held, &removed, vec![spec("b", 2, 128, 27001), spec("0", 1, 128, 27002)]);
        let keys: Vec<(&str, u64)> = set.iter().map(|s| (s.server_id.0.as_str(), s.generation)).collect();
        // b's old generation left; c generation 1 was never held, so c 2 stays.
        assert_eq!(keys, [("0", 1), ("a", 1), ("b", 2), ("c", 2)]);
        assert!(Arc::ptr_eq(&set[1], &held[0]), "a held spec is kept, not copied");
    }
}
