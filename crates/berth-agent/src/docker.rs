//! The `docker` driver: runs each instance as a container of the local
//! Docker engine, through bollard over the engine's unix socket.
//!
//! A container is named `berth-<server>-<generation>` and labelled with
//! `berth.server`, `berth.generation`, `berth.node`, `berth.memory_mib` and
//! `berth.spec` (the instance spec, so a restarted agent can adopt it from
//! the engine alone). Its hard memory limit is the reservation with no swap
//! (`memory_swap` = `memory`), its restart policy `no` (berth decides
//! restarts), its port published on the host from the node's range, and
//! the server's data dir (`<root>/<server-id>/`) bind-mounted at the
//! template's `data_mount`. OOM kills are read from the container state.
//!
//! The driver never pulls an image: a missing image is a permanent
//! `image_missing` error. It removes labelled containers of its node that it
//! does not track — stale generations started by hand, and containers that
//! exist although their create call reported an error (the dangling
//! containers of Nomad's `reconcile_dangling.go`) — but never one whose
//! start is in flight. Like every driver it decides nothing about what
//! should run, and it never deletes a data dir.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_core::template::{InstanceSpec, ReadyCheck};
use berth_core::{LastExit, ServerId};
use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, ContainerMemoryStats, ContainerSummary, ContainerSummaryStateEnum, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions, StatsOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use crate::driver::{Driver, DriverError, Key, Observed};
use crate::probe;

/// Engine API versions below this lack what the driver relies on
/// (one-shot stats, label filters, init, `memory_swap` semantics).
pub const MIN_API_VERSION: (u32, u32) = (1, 41);

pub const LABEL_SERVER: &str = "berth.server";
pub const LABEL_GENERATION: &str = "berth.generation";
pub const LABEL_NODE: &str = "berth.node";
pub const LABEL_MEMORY: &str = "berth.memory_mib";
pub const LABEL_SPEC: &str = "berth.spec";
/// Version of the `berth.spec` label's format.
const LABEL_SPEC_VERSION: &str = "berth.spec_version";
const SPEC_VERSION: &str = "1";

/// How often per-container memory usage is fetched from the engine; each
/// fetch is one stats call per running container.
const USAGE_EVERY: Duration = Duration::from_secs(2);

struct Container {
    id: String,
    /// Host pid of the container's init, for readiness probes in its
    /// network namespace.
    pid: Option<i64>,
    kill_reason: Option<String>,
    exited: Option<LastExit>,
}

#[derive(Default)]
struct State {
    containers: HashMap<Key, Container>,
    /// Starts in flight: their containers may exist before they are
    /// tracked, and must not be taken for dangling ones.
    starting: HashSet<Key>,
    /// Container ids the sweep is already removing.
    removing: HashSet<String>,
    /// Container id → MiB used, from the latest stats round.
    usage: HashMap<String, u64>,
    usage_at: Option<Instant>,
    usage_in_flight: bool,
}

struct Inner {
    docker: Docker,
    node: String,
    root: PathBuf,
    state: Mutex<State>,
}

pub struct DockerDriver {
    inner: Arc<Inner>,
}

/// Parses an engine API version such as "1.41".
pub fn parse_api_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Refuses an engine older than `MIN_API_VERSION`, naming both versions.
pub fn check_api_version(reported: Option<&str>) -> Result<(u32, u32), DriverError> {
    let reported = reported.unwrap_or("");
    let v = parse_api_version(reported).ok_or_else(|| DriverError::Permanent(format!("docker engine reported no usable API version ({reported:?})")))?;
    if v < MIN_API_VERSION {
        return Err(DriverError::Permanent(format!(
            "docker engine API {}.{} is older than {}.{}, the minimum berth supports; upgrade the engine",
            v.0, v.1, MIN_API_VERSION.0, MIN_API_VERSION.1
        )));
    }
    Ok(v)
}

pub fn container_name(key: &Key) -> String {
    format!("berth-{}-{}", key.0, key.1)
}

/// The labels of an instance's container.
pub fn labels(spec: &InstanceSpec, node: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_SERVER.to_string(), spec.server_id.0.clone()),
        (LABEL_GENERATION.to_string(), spec.generation.to_string()),
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_MEMORY.to_string(), spec.memory_mib.0.to_string()),
        (LABEL_SPEC.to_string(), serde_json::to_string(spec).expect("a spec serializes")),
        (LABEL_SPEC_VERSION.to_string(), SPEC_VERSION.to_string()),
    ])
}

/// The instance a labelled container claims to be, if its labels say.
pub fn key_from_labels(labels: &HashMap<String, String>) -> Option<Key> {
    let server = labels.get(LABEL_SERVER)?;
    let generation = labels.get(LABEL_GENERATION)?.parse().ok()?;
    Some((ServerId(server.clone()), generation))
}

/// The spec a container was started with, if it carries one berth wrote.
fn spec_from_labels(labels: &HashMap<String, String>) -> Option<InstanceSpec> {
    if labels.get(LABEL_SPEC_VERSION).map(String::as_str) != Some(SPEC_VERSION) {
        return None;
    }
    let spec: InstanceSpec = serde_json::from_str(labels.get(LABEL_SPEC)?).ok()?;
    (Some((spec.server_id.clone(), spec.generation)) == key_from_labels(labels)).then_some(spec)
}

/// The container to create for `spec`, its data dir at `host_dir`.
pub fn container_body(spec: &InstanceSpec, node: &str, host_dir: &str) -> Result<ContainerCreateBody, DriverError> {
    let d = spec
        .docker
        .as_ref()
        .ok_or_else(|| DriverError::Permanent(format!("template {} has no [docker] section, so it cannot run on a docker node", spec.template)))?;
    let resolve = |s: &str| s.replace("{data_dir}", &d.data_mount);
    let mut env: Vec<String> = d.env.iter().map(|(k, v)| format!("{k}={}", resolve(v))).collect();
    env.extend([
        format!("BERTH_SERVER_ID={}", spec.server_id),
        format!("BERTH_GENERATION={}", spec.generation),
        format!("BERTH_PORT={}", spec.port),
        format!("BERTH_MEMORY_MIB={}", spec.memory_mib.0),
        format!("BERTH_DATA_DIR={}", d.data_mount),
    ]);
    let bytes = (spec.memory_mib.0 * 1024 * 1024) as i64;
    let ports = [format!("{}/tcp", spec.port), format!("{}/udp", spec.port)];
    let bindings = ports.iter().map(|p| (p.clone(), Some(vec![PortBinding { host_ip: None, host_port: Some(spec.port.to_string()) }]))).collect();
    Ok(ContainerCreateBody {
        image: Some(d.image.clone()),
        entrypoint: (!d.entrypoint.is_empty()).then(|| d.entrypoint.iter().map(|a| resolve(a)).collect()),
        cmd: Some(d.args.iter().map(|a| resolve(a)).collect()),
        env: Some(env),
        working_dir: Some(d.data_mount.clone()),
        labels: Some(labels(spec, node)),
        exposed_ports: Some(ports.to_vec()),
        stop_signal: Some(spec.stop_signal.clone()),
        host_config: Some(HostConfig {
            // The hard limit is the reservation, and swap may not stretch it.
            memory: Some(bytes),
            memory_swap: Some(bytes),
            cpu_shares: Some(d.cpu_shares.map(i64::from).unwrap_or_else(|| default_cpu_shares(spec.memory_mib.0))),
            binds: Some(vec![format!("{host_dir}:{}", d.data_mount)]),
            port_bindings: Some(bindings),
            // berth decides restarts; the engine must not resurrect an
            // instance the control plane has replaced elsewhere (L3).
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            // An init forwards stop signals to a workload that runs as
            // pid 1 without handlers, and reaps its zombies.
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// CPU weight in proportion to the reservation (the engine's default
/// weight, 1024, per GiB), so under contention a server gets CPU in the
/// measure of the memory it pays for; the engine's minimum is 2.
pub fn default_cpu_shares(memory_mib: u64) -> i64 {
    (memory_mib as i64).clamp(2, 262_144)
}

/// How long an exit by SIGKILL waits for the engine's OOM event
/// (`DockerDriver::oom_logged`).
const OOM_EVENT_GRACE: Duration = Duration::from_millis(500);

/// How an ended container ended. A reason the agent gave when it killed
/// wins; then the engine's OOM flag; then the exit code (above 128 the
/// engine's convention for death by signal).
pub fn classify_exit(oom_killed: bool, exit_code: Option<i64>, kill_reason: Option<&str>) -> LastExit {
    let code = exit_code.map(|c| c as i32);
    let reason = match (kill_reason, oom_killed, code) {
        (Some(r), _, _) => r.to_string(),
        (None, true, _) => "oom".into(),
        (None, false, Some(c)) if c > 128 => "signaled".into(),
        _ => "exited".into(),
    };
    LastExit { reason, code }
}

/// Memory a container really uses, as `docker stats` counts it: the
/// cgroup's usage less the page cache the kernel can drop at once.
pub fn used_bytes(m: &ContainerMemoryStats) -> Option<u64> {
    let usage = m.usage?;
    let stats = m.stats.as_ref();
    let inactive = stats.and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file"))).copied().unwrap_or(0);
    Some(usage.saturating_sub(inactive.min(usage)))
}

fn status_of(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Classifies an engine error on the start path: a refused request (400)
/// will be refused again; a conflict, a server error (e.g. "port is
/// already allocated") or a broken connection may pass later.
pub fn classify_engine_error(what: &str, e: &EngineError) -> DriverError {
    let message = match e {
        EngineError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    match status_of(e) {
        Some(400) => DriverError::Permanent(format!("{what}: {message}")),
        _ => DriverError::Transient(format!("{what}: {message}")),
    }
}

fn image_missing(image: &str) -> DriverError {
    DriverError::Permanent(format!(
        "image_missing: image {image} is not on this node and berth never pulls; build or load it there (e.g. scripts/build-images)"
    ))
}

impl DockerDriver {
    /// Connects to the engine at `socket` (a path, or `unix://path`),
    /// refuses an engine older than `MIN_API_VERSION`, and prepares `root`
    /// for data dirs. `node` labels every container; it must be unique
    /// among the agents sharing an engine, because each agent removes the
    /// labelled containers of its node that it does not track.
    pub async fn connect(socket: &str, node: &str, root: PathBuf) -> Result<DockerDriver, DriverError> {
        let path = socket.trim_start_matches("unix://");
        let client_version = bollard::ClientVersion { major_version: MIN_API_VERSION.0 as usize, minor_version: MIN_API_VERSION.1 as usize };
        let docker =
            Docker::connect_with_unix(path, 60, &client_version).map_err(|e| DriverError::Permanent(format!("cannot use docker socket {path}: {e}")))?;
        let version = docker.version().await.map_err(|e| DriverError::Transient(format!("docker engine at {path} does not answer: {e}")))?;
        let api = check_api_version(version.api_version.as_deref())?;
        std::fs::create_dir_all(&root).map_err(|e| DriverError::Permanent(format!("cannot create {}: {e}", root.display())))?;
        let root = std::fs::canonicalize(&root).map_err(|e| DriverError::Permanent(format!("cannot resolve {}: {e}", root.display())))?;
        tracing::info!(socket = path, api = %format!("{}.{}", api.0, api.1), engine = version.version.as_deref().unwrap_or("?"), node, "docker driver connected");
        Ok(DockerDriver { inner: Arc::new(Inner { docker, node: node.to_string(), root, state: Mutex::new(State::default()) }) })
    }

    async fn list(&self) -> Result<Vec<ContainerSummary>, EngineError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={}", self.inner.node)])]);
        self.inner.docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() })).await
    }

    async fn inspect_exit(&self, id: &str, kill_reason: Option<&str>) -> LastExit {
        match self.inner.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(c) => {
                let st = c.state.unwrap_or_default();
                let mut oom = st.oom_killed.unwrap_or(false);
                if !oom && kill_reason.is_none() && st.exit_code == Some(137) {
                    oom = self.oom_logged(id).await;
                }
                classify_exit(oom, st.exit_code, kill_reason)
            }
            Err(_) => LastExit { reason: kill_reason.unwrap_or("container_removed").to_string(), code: None },
        }
    }

    /// Whether the engine logged an OOM kill of the container since it
    /// was created. A SIGKILL berth did not send may be the kernel's OOM
    /// killer even when the container's `OOMKilled` is false: the engine
    /// can handle the exit before the OOM event when both come at once
    /// (containerd's event order; seen here once in a loaded test run),
    /// and then only its event log has it. Waits at most `OOM_EVENT_GRACE`
    /// for an event still on its way; asked only for such exits.
    async fn oom_logged(&self, id: &str) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let until = now + OOM_EVENT_GRACE;
        let options = EventsOptions {
            // Unix seconds (the API takes no RFC 3339): the engine keeps
            // its recent events in memory, and the filter finds the
            // container's among them.
            since: Some(now.as_secs().saturating_sub(24 * 3600).to_string()),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(HashMap::from([("container".to_string(), vec![id.to_string()]), ("event".to_string(), vec!["oom".to_string()])])),
        };
        let mut events = std::pin::pin!(self.inner.docker.events(Some(options)));
        // The stream ends at `until` by itself; the timeout only guards
        // against an engine that never ends it. An error is no evidence.
        matches!(tokio::time::timeout(OOM_EVENT_GRACE + Duration::from_secs(2), events.next()).await, Ok(Some(Ok(_))))
    }

    async fn pid_of(&self, id: &str) -> Option<i64> {
        let c = self.inner.docker.inspect_container(id, None::<InspectContainerOptions>).await.ok()?;
        c.state?.pid.filter(|p| *p > 0)
    }

    /// Removes a container whatever its state; a container already gone
    /// is fine.
    async fn remove(&self, id_or_name: &str) -> Result<(), EngineError> {
        match self.inner.docker.remove_container(id_or_name, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            other => other,
        }
    }

    /// Kills and removes labelled containers of this node that no instance
    /// owns, each in the background, so observing never waits for them.
    /// No graceful stop: such a container was never a confirmed instance
    /// (containers berth started are adopted from their spec label and
    /// stopped gracefully by the agent), and a workload that has not yet
    /// installed its signal handler would ignore SIGTERM as pid 1.
    fn sweep(&self, dangling: Vec<(String, Option<Key>)>) {
        for (id, key) in dangling {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                tracing::warn!(container = %id, instance = ?key, "removing a labelled container no instance owns (stale generation, unknown, or left by a failed create)");
                let removed = inner.docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
                if let Err(e) = &removed {
                    if status_of(e) != Some(404) {
                        tracing::warn!(container = %id, error = %e, "could not remove a dangling container; retrying on the next pass");
                    }
                }
                inner.state.lock().expect("state lock").removing.remove(&id);
            });
        }
    }

    /// Fetches memory usage of running containers in the background, at
    /// most every `USAGE_EVERY`: a stats call costs the engine more than a
    /// list, and usage need not be fresher than a sync.
    fn refresh_usage(&self, running: Vec<String>) {
        {
            let mut st = self.inner.state.lock().expect("state lock");
            if st.usage_in_flight || st.usage_at.is_some_and(|t| t.elapsed() < USAGE_EVERY) {
                return;
            }
            st.usage_in_flight = true;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut usage = HashMap::new();
            for id in running {
                let mut s = inner.docker.stats(&id, Some(StatsOptions { stream: false, one_shot: true }));
                if let Some(Ok(stats)) = s.next().await {
                    if let Some(b) = stats.memory_stats.as_ref().and_then(used_bytes) {
                        usage.insert(id, b / (1024 * 1024));
                    }
                }
            }
            let mut st = inner.state.lock().expect("state lock");
            st.usage = usage;
            st.usage_at = Some(Instant::now());
            st.usage_in_flight = false;
        });
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn adopt(&self) -> Result<Vec<(InstanceSpec, Observed)>, DriverError> {
        let found = self.list().await.map_err(|e| DriverError::Transient(format!("cannot list containers: {e}")))?;
        let mut out = Vec::new();
        for c in found {
            let (Some(id), Some(labels)) = (c.id.clone(), c.labels.as_ref()) else { continue };
            let Some(spec) = spec_from_labels(labels) else {
                // Left to the sweep: berth cannot run what it cannot describe.
                continue;
            };
            let key: Key = (spec.server_id.clone(), spec.generation);
            let running =
                matches!(c.state, Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING | ContainerSummaryStateEnum::PAUSED));
            let exited = if running { None } else { Some(self.inspect_exit(&id, None).await) };
            let pid = if running { self.pid_of(&id).await } else { None };
            tracing::info!(server = %key.0, generation = key.1, container = %id, running, "adopted container");
            out.push((
                spec,
                match &exited {
                    Some(e) => Observed::Exited(e.clone()),
                    None => Observed::Alive { used_mib: None },
                },
            ));
            self.inner.state.lock().expect("state lock").containers.insert(key, Container { id, pid, kill_reason: None, exited });
        }
        Ok(out)
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let dir = self.data_dir(&spec.server_id);
        let body = container_body(spec, &self.inner.node, &dir.to_string_lossy())?;
        let image = body.image.clone().unwrap_or_default();
        match self.inner.docker.inspect_image(&image).await {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => return Err(image_missing(&image)),
            Err(e) => return Err(classify_engine_error(&format!("cannot inspect image {image}"), &e)),
        }
        std::fs::create_dir_all(&dir).map_err(|e| DriverError::Transient(format!("cannot create {}: {e}", dir.display())))?;

        self.inner.state.lock().expect("state lock").starting.insert(key.clone());
        let name = container_name(&key);
        let result = async {
            let created = match self.inner.docker.create_container(Some(CreateContainerOptions { name: Some(name.clone()), ..Default::default() }), body).await
            {
                Ok(c) => c,
                Err(e) => {
                    // The engine may have created it although the call
                    // failed (a timeout, a dropped connection): remove it
                    // by name now; the sweep retries if this fails too.
                    let _ = self.remove(&name).await;
                    return Err(match status_of(&e) {
                        Some(404) => image_missing(&image),
                        _ => classify_engine_error(&format!("cannot create container {name}"), &e),
                    });
                }
            };
            for w in created.warnings.iter().filter(|w| !w.is_empty()) {
                tracing::warn!(container = %name, warning = %w, "engine warning on create");
            }
            if let Err(e) = self.inner.docker.start_container(&created.id, None).await {
                let _ = self.remove(&created.id).await;
                return Err(classify_engine_error(&format!("cannot start container {name}"), &e));
            }
            Ok(created.id)
        }
        .await;
        let result = match result {
            Ok(id) => {
                let pid = self.pid_of(&id).await;
                Ok((id, pid))
            }
            Err(e) => Err(e),
        };
        // Leaving `starting` and becoming tracked happen under one lock,
        // so the sweep never sees the container owned by neither.
        let mut st = self.inner.state.lock().expect("state lock");
        st.starting.remove(&key);
        let (id, pid) = result?;
        tracing::info!(server = %spec.server_id, generation = spec.generation, container = %id, image = %image, "started container");
        st.containers.insert(key, Container { id, pid, kill_reason: None, exited: None });
        Ok(())
    }

    /// The container's init, by host pid and kernel start time: killing it
    /// ends the container, so the watchdog can fence it without the agent
    /// or the engine.
    fn fence_handle(&self, key: &Key) -> Option<crate::watchdog::FenceHandle> {
        let pid = self.inner.state.lock().expect("state lock").containers.get(key).filter(|c| c.exited.is_none()).and_then(|c| c.pid)?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start_time = crate::process::parse_stat(&stat)?.start_time;
        Some(crate::watchdog::FenceHandle { pid: pid as i32, start_time })
    }

    async fn observe_all(&self) -> HashMap<Key, Observed> {
        let listed = self.list().await;
        let mut out = HashMap::new();
        let mut to_inspect = Vec::new();
        let mut running = Vec::new();
        let mut dangling = Vec::new();
        {
            let mut st = self.inner.state.lock().expect("state lock");
            let Ok(listed) = &listed else {
                // The engine did not answer: what was alive is not known to
                // be dead, so it stays alive until the engine says otherwise.
                for (key, c) in &st.containers {
                    out.insert(
                        key.clone(),
                        match &c.exited {
                            Some(e) => Observed::Exited(e.clone()),
                            None => Observed::Alive { used_mib: None },
                        },
                    );
                }
                return out;
            };
            let by_id: HashMap<&str, &ContainerSummary> = listed.iter().filter_map(|c| Some((c.id.as_deref()?, c))).collect();
            let tracked_ids: HashSet<String> = st.containers.values().map(|c| c.id.clone()).collect();
            for c in listed {
                let Some(id) = c.id.clone() else { continue };
                let key = c.labels.as_ref().and_then(key_from_labels);
                let owned = tracked_ids.contains(&id) || key.as_ref().is_some_and(|k| st.starting.contains(k));
                if !owned && st.removing.insert(id.clone()) {
                    dangling.push((id, key));
                }
            }
            for (key, c) in st.containers.iter() {
                if let Some(e) = &c.exited {
                    out.insert(key.clone(), Observed::Exited(e.clone()));
                    continue;
                }
                match by_id.get(c.id.as_str()).and_then(|s| s.state) {
                    Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                        to_inspect.push((key.clone(), c.id.clone(), c.kill_reason.clone()))
                    }
                    None => to_inspect.push((key.clone(), c.id.clone(), c.kill_reason.clone())),
                    Some(_) => {
                        running.push(c.id.clone());
                        out.insert(key.clone(), Observed::Alive { used_mib: st.usage.get(&c.id).copied() });
                    }
                }
            }
        }
        self.sweep(dangling);
        self.refresh_usage(running);
        for (key, id, reason) in to_inspect {
            let exit = self.inspect_exit(&id, reason.as_deref()).await;
            tracing::info!(server = %key.0, generation = key.1, container = %id, reason = %exit.reason, code = ?exit.code, "container ended");
            if let Some(c) = self.inner.state.lock().expect("state lock").containers.get_mut(&key) {
                c.exited = Some(exit.clone());
            }
            out.insert(key, Observed::Exited(exit));
        }
        out
    }

    async fn stop(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let id = match self.inner.state.lock().expect("state lock").containers.get(&key).filter(|c| c.exited.is_none()) {
            Some(c) => c.id.clone(),
            None => return Ok(()),
        };
        if !spec.stop_command.is_empty() {
            // The stop command runs inside the container, beside the
            // server; if it does not end it, the agent kills at the deadline.
            let d = spec.docker.as_ref();
            let mount = d.map(|d| d.data_mount.as_str()).unwrap_or("/");
            let cmd: Vec<String> = spec.stop_command.iter().map(|a| a.replace("{data_dir}", mount)).collect();
            let exec = self
                .inner
                .docker
                .create_exec(&id, bollard::exec::CreateExecOptions { cmd: Some(cmd), working_dir: Some(mount.to_string()), ..Default::default() })
                .await
                .map_err(|e| DriverError::Transient(format!("cannot run the stop command in {id}: {e}")))?;
            self.inner
                .docker
                .start_exec(&exec.id, Some(bollard::exec::StartExecOptions { detach: true, ..Default::default() }))
                .await
                .map_err(|e| DriverError::Transient(format!("cannot run the stop command in {id}: {e}")))?;
            return Ok(());
        }
        match self.inner.docker.kill_container(&id, Some(KillContainerOptions { signal: spec.stop_signal.clone() })).await {
            Ok(()) => Ok(()),
            // Not running (409) or gone (404): it is already stopping.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(DriverError::Transient(format!("cannot signal container {id}: {e}"))),
        }
    }

    async fn kill(&self, key: &Key, reason: &str) -> Result<(), DriverError> {
        let id = {
            let mut st = self.inner.state.lock().expect("state lock");
            match st.containers.get_mut(key).filter(|c| c.exited.is_none()) {
                Some(c) => {
                    c.kill_reason.get_or_insert_with(|| reason.to_string());
                    c.id.clone()
                }
                None => return Ok(()),
            }
        };
        match self.inner.docker.kill_container(&id, Some(KillContainerOptions { signal: "SIGKILL".into() })).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(DriverError::Transient(format!("cannot kill container {id}: {e}"))),
        }
    }

    async fn forget(&self, key: &Key) {
        let c = self.inner.state.lock().expect("state lock").containers.remove(key);
        if let Some(c) = c {
            if let Err(e) = self.remove(&c.id).await {
                // Untracked now, so the sweep removes it on a later pass.
                tracing::warn!(container = %c.id, error = %e, "could not remove an ended container");
            }
        }
    }

    fn enforces_memory_limit(&self, _key: &Key) -> bool {
        true
    }

    fn data_dir(&self, server: &ServerId) -> PathBuf {
        self.inner.root.join(server.as_str())
    }

    /// Probes the container's own network namespace: a connect through
    /// the published port would be accepted by the engine's proxy before
    /// the server listens.
    async fn ready(&self, spec: &InstanceSpec) -> bool {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let pid = self.inner.state.lock().expect("state lock").containers.get(&key).and_then(|c| c.pid);
        match (spec.ready, pid) {
            (ReadyCheck::Alive, _) => true,
            (_, None) => false,
            (ReadyCheck::Tcp, Some(pid)) => probe::tcp_port_listening_in(pid, spec.port),
            (ReadyCheck::Udp, Some(pid)) => probe::udp_port_bound_in(pid, spec.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::template::DockerInstance;
    use berth_core::MemMib;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            server_id: ServerId("srv_00000000000000d1".into()),
            generation: 4,
            template: "fakegame".into(),
            memory_mib: MemMib(512),
            port: 30007,
            command: "{berth_exe}".into(),
            args: vec!["fakegame".into(), "--data-dir".into(), "{data_dir}".into()],
            env: Default::default(),
            stop_signal: "SIGTERM".into(),
            stop_command: vec![],
            stop_timeout_ms: 10_000,
            ready: ReadyCheck::Tcp,
            ready_timeout_ms: 60_000,
            stop_after_ms: 300_000,
            permanent_exit_codes: vec![],
            docker: Some(DockerInstance {
                image: "berth-fakegame:local".into(),
                entrypoint: vec![],
                args: vec!["fakegame".into(), "--data-dir".into(), "{data_dir}".into(), "--port".into(), "30007".into()],
                env: [("WORLD".to_string(), "{data_dir}/world".to_string())].into(),
                data_mount: "/data".into(),
                cpu_shares: Some(256),
            }),
        }
    }

    /// A container of the test image, without berth's labels: `args` after
    /// `fakegame`, a hard limit of 64 MiB.
    async fn bare_container(d: &DockerDriver, name: &str, args: &[&str]) -> String {
        let mut cmd: Vec<String> = ["fakegame", "--data-dir", "/tmp", "--port", "26998"].iter().map(|s| s.to_string()).collect();
        cmd.extend(args.iter().map(|s| s.to_string()));
        let body = ContainerCreateBody {
            image: Some("berth-fakegame:local".into()),
            cmd: Some(cmd),
            host_config: Some(HostConfig { memory: Some(64 << 20), memory_swap: Some(64 << 20), ..Default::default() }),
            ..Default::default()
        };
        let id = d.inner.docker.create_container(Some(CreateContainerOptions { name: Some(name.into()), ..Default::default() }), body).await.unwrap().id;
        d.inner.docker.start_container(&id, None::<bollard::query_parameters::StartContainerOptions>).await.unwrap();
        id
    }

    async fn exited(d: &DockerDriver, id: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let st = d.inner.docker.inspect_container(id, None::<InspectContainerOptions>).await.ok()?.state?;
            if st.running == Some(false) && st.finished_at.as_deref().is_some_and(|f| !f.starts_with("0001")) {
                return st.started_at;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    #[tokio::test]
    async fn an_oom_kill_is_found_in_the_engines_log_and_a_plain_sigkill_is_not() {
        if !berth_testkit::require_or_skip(berth_testkit::docker_available(), "a docker engine (docker version)") {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let d = DockerDriver::connect("/var/run/docker.sock", "oom-log-test", root.path().to_path_buf()).await.unwrap();
        let image = d.inner.docker.inspect_image("berth-fakegame:local").await.is_ok();
        if !berth_testkit::require_or_skip(image, "the berth-fakegame:local image (scripts/build-images fakegame)") {
            return;
        }
        let tag = format!("{}-{}", std::process::id(), rand::random::<u32>());
        let hog = bare_container(&d, &format!("berth-oom-hog-{tag}"), &["--alloc-mib", "400"]).await;
        let idle = bare_container(&d, &format!("berth-oom-idle-{tag}"), &[]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        d.inner.docker.kill_container(&idle, Some(KillContainerOptions { signal: "KILL".into() })).await.unwrap();
        let (hog_started, idle_started) = (exited(&d, &hog).await, exited(&d, &idle).await);
        let hog_logged = d.oom_logged(&hog).await;
        let idle_logged = d.oom_logged(&idle).await;
        let idle_exit = d.inspect_exit(&idle, None).await;
        for id in [&hog, &idle] {
            d.remove(id).await.unwrap();
        }
        assert!(hog_started.is_some() && idle_started.is_some(), "both containers ended");
        assert!(hog_logged, "the engine logged the OOM kill");
        assert!(!idle_logged, "a SIGKILL from outside is no OOM kill");
        assert_eq!(idle_exit, LastExit { reason: "signaled".into(), code: Some(137) });
    }

    #[test]
    fn the_container_has_a_hard_limit_without_swap_labels_port_and_data_mount() {
        let b = container_body(&spec(), "node-a", "/var/lib/berth/instances/srv_00000000000000d1").unwrap();
        let h = b.host_config.as_ref().unwrap();
        assert_eq!(h.memory, Some(512 * 1024 * 1024));
        assert_eq!(h.memory_swap, h.memory, "no swap beyond the reservation");
        assert_eq!(h.cpu_shares, Some(256));
        assert_eq!(h.restart_policy.as_ref().unwrap().name, Some(RestartPolicyNameEnum::NO));
        assert_eq!(h.binds.as_ref().unwrap(), &vec!["/var/lib/berth/instances/srv_00000000000000d1:/data".to_string()]);
        let pb = h.port_bindings.as_ref().unwrap();
        for p in ["30007/tcp", "30007/udp"] {
            assert_eq!(pb[p].as_ref().unwrap()[0].host_port.as_deref(), Some("30007"), "{p}");
        }
        let l = b.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_SERVER], "srv_00000000000000d1");
        assert_eq!(l[LABEL_GENERATION], "4");
        assert_eq!(l[LABEL_NODE], "node-a");
        assert_eq!(l[LABEL_MEMORY], "512");
        assert_eq!(b.cmd.as_ref().unwrap()[2], "/data", "{{data_dir}} is the mount point inside the container");
        assert!(b.env.as_ref().unwrap().contains(&"WORLD=/data/world".to_string()));
        assert_eq!(b.entrypoint, None, "the image's entrypoint is kept");
    }

    #[test]
    fn labels_round_trip_to_the_spec_and_hand_made_labels_do_not_pass_for_one() {
        let s = spec();
        let l = labels(&s, "n");
        assert_eq!(spec_from_labels(&l), Some(s.clone()));
        assert_eq!(key_from_labels(&l), Some((s.server_id.clone(), 4)));
        let mut hand = l.clone();
        hand.remove(LABEL_SPEC);
        assert_eq!(spec_from_labels(&hand), None);
        assert_eq!(key_from_labels(&hand), Some((s.server_id.clone(), 4)), "still recognizably berth's");
        let mut lying = l;
        lying.insert(LABEL_GENERATION.into(), "3".into());
        assert_eq!(spec_from_labels(&lying), None, "labels and spec must agree");
    }

    #[test]
    fn cpu_shares_follow_the_reservation_unless_the_template_sets_them() {
        let mut s = spec();
        s.docker.as_mut().unwrap().cpu_shares = None;
        let b = container_body(&s, "n", "/d").unwrap();
        assert_eq!(b.host_config.unwrap().cpu_shares, Some(512), "512 MiB weighs half of the engine's default");
        assert_eq!(default_cpu_shares(1), 2);
        assert_eq!(default_cpu_shares(4096), 4096);
    }

    #[test]
    fn a_template_without_a_docker_section_is_a_permanent_error() {
        let mut s = spec();
        s.docker = None;
        assert!(matches!(container_body(&s, "n", "/d"), Err(DriverError::Permanent(m)) if m.contains("no [docker] section")));
    }

    #[test]
    fn exits_are_classified_oom_first_then_by_code() {
        assert_eq!(classify_exit(true, Some(137), None), LastExit { reason: "oom".into(), code: Some(137) });
        assert_eq!(classify_exit(false, Some(0), None), LastExit { reason: "exited".into(), code: Some(0) });
        assert_eq!(classify_exit(false, Some(3), None), LastExit { reason: "exited".into(), code: Some(3) });
        assert_eq!(classify_exit(false, Some(137), None).reason, "signaled");
        assert_eq!(classify_exit(true, Some(137), Some("ready_timeout")).reason, "ready_timeout", "the agent's own kill wins");
    }

    #[test]
    fn api_versions_below_the_minimum_are_refused_with_both_named() {
        assert_eq!(check_api_version(Some("1.41")), Ok((1, 41)));
        assert_eq!(check_api_version(Some("1.45")), Ok((1, 45)));
        let e = check_api_version(Some("1.40")).unwrap_err().to_string();
        assert_eq!(e, "docker engine API 1.40 is older than 1.41, the minimum berth supports; upgrade the engine");
        assert!(check_api_version(None).is_err());
        assert!(check_api_version(Some("banana")).is_err());
    }

    #[test]
    fn engine_errors_are_transient_unless_the_request_itself_is_bad() {
        let server = |status_code| EngineError::DockerResponseServerError { status_code, message: "m".into() };
        assert!(matches!(classify_engine_error("x", &server(400)), DriverError::Permanent(_)));
        assert!(matches!(classify_engine_error("x", &server(409)), DriverError::Transient(_)));
        assert!(matches!(classify_engine_error("x", &server(500)), DriverError::Transient(_)));
        assert!(image_missing("img:1").to_string().starts_with("image_missing: image img:1 "));
    }

    #[test]
    fn usage_excludes_reclaimable_page_cache() {
        let m = ContainerMemoryStats { usage: Some(300 << 20), stats: Some([("total_inactive_file".to_string(), 100u64 << 20)].into()), ..Default::default() };
        assert_eq!(used_bytes(&m), Some(200 << 20));
        let v2 = ContainerMemoryStats { usage: Some(50), stats: Some([("inactive_file".to_string(), 80u64)].into()), ..Default::default() };
        assert_eq!(used_bytes(&v2), Some(0));
    }
}
