//! What every benchmark scenario stands on: a real control plane in a
//! child process (the `berth` binary itself, SQLite in a temp dir, HTTP on
//! loopback), a fleet of simulated agents in this process (the real agent
//! code over real HTTP, with the `sim` driver), load helpers, percentiles,
//! and the invariant checks. It measures; it decides nothing about berth.
//! Every process it starts is killed by pid when its handle drops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_agent::{Agent, AgentConfig, SimConfig, SimDriver};
use berth_api::{CreateServer, CreateToken};
use berth_client::Client;
use berth_core::PortRange;
use tokio::sync::{watch, Semaphore};

/// Wall-clock milliseconds since the epoch (the control plane's clock too:
/// both run on this machine).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn parse_time_ms(rfc3339: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(rfc3339).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Durable single-row SQLite transactions a second on the disk under
/// `dir` (WAL, `synchronous=FULL`, one insert a transaction): what one
/// fsynced commit costs here. Group commit saves that cost and nothing
/// else, so it bounds what group commit can gain over one transaction a
/// write on this machine; the issue cites about 7,000 a second for its
/// own. At most 2,000 transactions or 2 s; the file is removed after.
pub fn durable_commits_per_sec(dir: &Path) -> Result<f64> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("commit-probe.db");
    let rate = {
        let conn = rusqlite::Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        // `journal_mode` answers with a row, so it is queried, not executed.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("the commit probe's database is in {mode} mode, not WAL");
        }
        conn.execute_batch("PRAGMA synchronous = FULL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);")?;
        let value = "x".repeat(100);
        let started = Instant::now();
        let mut n = 0u32;
        while n < 2000 && started.elapsed() < Duration::from_secs(2) {
            // Outside BEGIN, each statement is its own transaction.
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&value])?;
            n += 1;
        }
        f64::from(n) / started.elapsed().as_secs_f64()
    };
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    Ok(rate)
}

/// Progress on stderr, one line every few seconds (stdout stays the report).
pub struct Progress {
    what: String,
    total: usize,
    done: AtomicUsize,
    started: Instant,
    last: std::sync::Mutex<Instant>,
}

impl Progress {
    pub fn new(what: &str, total: usize) -> Arc<Progress> {
        eprintln!("{what}: 0/{total}");
        Arc::new(Progress { what: what.to_string(), total, done: AtomicUsize::new(0), started: Instant::now(), last: std::sync::Mutex::new(Instant::now()) })
    }

    pub fn add(&self, n: usize) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let mut last = self.last.lock().expect("progress lock");
        if last.elapsed() >= Duration::from_secs(3) || done == self.total {
            *last = Instant::now();
            eprintln!("{}: {done}/{} ({:.1} s)", self.what, self.total, self.started.elapsed().as_secs_f64());
        }
    }
}

/// A port below the kernel's ephemeral range, so no outgoing connection
/// takes it while the control plane is down between a kill and a restart.
fn free_listen_port() -> Result<u16> {
    let seed = (wall_ms() as u64 ^ std::process::id() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for i in 0..500u64 {
        let port = 15000 + ((seed >> 16).wrapping_add(i * 7919) % 5000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 15000 and 19999")
}

/// Makes the kernel kill the child when this process dies, so a bench that
/// is itself killed leaves nothing running.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A control plane in a child process.
pub struct ControlProc {
    pub dir: PathBuf,
    pub url: String,
    pub token: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl ControlProc {
    /// Starts `berth control-plane` in `dir` with `extra` flags and waits
    /// until it answers.
    pub async fn start(dir: &Path, extra: &[&str]) -> Result<ControlProc> {
        std::fs::create_dir_all(dir)?;
        let port = free_listen_port()?;
        let mut args: Vec<String> =
            ["control-plane", "--data-dir", &dir.display().to_string(), "--listen", &format!("127.0.0.1:{port}")].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cp = ControlProc { dir: dir.to_path_buf(), url: format!("http://127.0.0.1:{port}"), token: String::new(), args, child: None };
        cp.spawn()?;
        cp.wait_ready(Duration::from_secs(60)).await?;
        cp.token = std::fs::read_to_string(dir.join("admin.token")).context("the control plane wrote no admin token")?.trim().to_string();
        Ok(cp)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("control-plane.log"))?;
        let exe = std::env::current_exe().context("cannot find the berth executable")?;
        let mut cmd = Command::new(exe);
        die_with_parent(&mut cmd);
        let child = cmd
            .args(&self.args)
            .env("RUST_LOG", std::env::var("BERTH_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the control plane")?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let probe = Client::with_timeout(&self.url, "", Duration::from_millis(500));
        let deadline = Instant::now() + timeout;
        loop {
            if probe.health().await.is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("the control plane exited ({status}); see {}", self.dir.join("control-plane.log").display());
            }
            if Instant::now() > deadline {
                bail!("the control plane did not answer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn client(&self) -> Client {
        Client::with_timeout(&self.url, &self.token, Duration::from_secs(120))
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data dir and port; returns when the
    /// process was started (not when it answers).
    pub fn respawn(&mut self) -> Result<Instant> {
        let at = Instant::now();
        self.spawn()?;
        Ok(at)
    }

    /// CPU time the control plane has used (user + system), from /proc.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_millis(ticks * 1000 / hz))
    }

    /// Share of one core the control plane uses over `window`.
    pub async fn cpu_share(&self, window: Duration) -> Option<f64> {
        let before = self.cpu_time()?;
        tokio::time::sleep(window).await;
        Some((self.cpu_time()? - before).as_secs_f64() / window.as_secs_f64())
    }

    /// Resident and peak resident memory (KiB) from /proc.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok());
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    pub async fn agent_token(&self) -> Result<String> {
        Ok(self.client().create_token(&CreateToken { kind: "agent".into(), tenant: None }).await?.token)
    }
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Simulated nodes: the real agent, one per node, with the `sim` driver.
pub struct FleetSpec {
    pub prefix: String,
    pub nodes: usize,
    pub node_mib: u64,
    pub ports: PortRange,
    pub sim: SimConfig,
    pub sync_interval: Duration,
}

/// One simulated node: its name, driver, shutdown switch and agent task.
type SimNode = (String, Arc<SimDriver>, watch::Sender<bool>, tokio::task::JoinHandle<()>);

pub struct SimFleet {
    agents: Vec<SimNode>,
}

impl SimFleet {
    pub fn start(url: &str, token: &str, spec: &FleetSpec) -> SimFleet {
        let agents = (0..spec.nodes)
            .map(|i| {
                let name = format!("{}{i:04}", spec.prefix);
                let sim = SimConfig { host_total_mib: spec.node_mib + 512, seed: spec.sim.seed.wrapping_add(i as u64), ..spec.sim.clone() };
                let driver = Arc::new(SimDriver::new(sim));
                let mut cfg = AgentConfig::new(url, token, &name);
                cfg.memory_mib = Some(spec.node_mib);
                cfg.ports = spec.ports;
                cfg.sync_interval = spec.sync_interval;
                let agent = Agent::new(cfg, driver.clone());
                let (tx, rx) = watch::channel(false);
                let task = tokio::spawn(agent.run(rx));
                (name, driver, tx, task)
            })
            .collect();
        SimFleet { agents }
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Simulated instances alive on every node.
    pub fn live_instances(&self) -> usize {
        self.agents.iter().map(|a| a.1.live()).sum()
    }

    pub async fn wait_registered(&self, client: &Client, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = client.list_nodes().await.map(|l| l.nodes.iter().filter(|n| self.agents.iter().any(|a| a.0 == n.name)).count()).unwrap_or(0);
            if n == self.agents.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {n} of {} simulated nodes registered within {timeout:?}", self.agents.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop(self) {
        for (_, _, tx, task) in self.agents {
            let _ = tx.send(true);
            task.abort();
        }
    }
}

/// Creates `count` servers named `{prefix}{i}` from `concurrency` clients;
/// returns their ids in order.
pub async fn create_servers(
    client: &Client,
    prefix: &str,
    count: usize,
    memory_mib: u64,
    stop_after_s: Option<u64>,
    concurrency: usize,
) -> Result<Vec<String>> {
    let progress = Progress::new(&format!("creating {prefix}*"), count);
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let (client, sem, progress) = (client.clone(), sem.clone(), progress.clone());
        let req = CreateServer {
            name: format!("{prefix}{i}"),
            template: "fakegame".into(),
            memory_mib,
            config: serde_json::json!({}),
            stop_after_s,
            stateless: Some(true),
            plan: None,
            tenant: None,
            restart_policy: None,
        };
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let s = with_retries(|| client.create_server(&req)).await;
            progress.add(1);
            s.map(|s| (i, s.id))
        });
    }
    let mut ids = vec![String::new(); count];
    while let Some(done) = tasks.join_next().await {
        let (i, id) = done??;
        ids[i] = id;
    }
    Ok(ids)
}

/// Retries what a loaded control plane answers with 503 (it asks to come
/// back); anything else is returned at once.
pub async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, berth_client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, berth_client::ClientError>>,
{
    let mut delay = Duration::from_millis(20);
    for _ in 0..20 {
        match call().await {
            Err(e) if e.status() == Some(503) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
    call().await
}

/// Starts every server from `clients` concurrent clients, each waiting
/// until its server is placed; returns each start's latency (request to
/// committed reservation) and the wall time of the whole burst.
pub async fn start_all_placed(url: &str, token: &str, ids: &[String], clients: usize, what: &str) -> Result<(Vec<f64>, Duration)> {
    let progress = Progress::new(what, ids.len());
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        // One HTTP client each, as separate users would have.
        let client = Client::with_timeout(url, token, Duration::from_secs(120));
        let (ids, next, progress) = (ids.clone(), next.clone(), progress.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { return Ok::<_, anyhow::Error>(latencies) };
                let t = Instant::now();
                let s = with_retries(|| client.start_server_wait_placed(id, 60)).await.with_context(|| format!("start of {id}"))?;
                if !s.status.holds_reservation() {
                    bail!("server {id} was not placed: it is {} ({})", s.status, s.last_error.unwrap_or_default());
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                progress.add(1);
            }
        });
    }
    let mut all = Vec::with_capacity(ids.len());
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok((all, started.elapsed()))
}

/// `/metrics` as a map.
pub async fn metrics(client: &Client) -> Result<BTreeMap<String, f64>> {
    Ok(client.metrics().await?.into_iter().collect())
}

pub async fn status_count(client: &Client, status: &str) -> Result<u64> {
    Ok(metrics(client).await?.get(&format!("berth_servers{{status=\"{status}\"}}")).copied().unwrap_or(0.0) as u64)
}

/// Waits until `count` servers are running.
pub async fn wait_running(client: &Client, count: u64, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let running = status_count(client, "running").await?;
        if running >= count {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("only {running} of {count} servers running after {timeout:?}");
        }
        if last_print.elapsed() > Duration::from_secs(3) {
            eprintln!("waiting for {count} running: {running}");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Violations the invariant checker finds now.
pub async fn violations(client: &Client) -> Result<usize> {
    Ok(with_retries(|| client.invariants()).await?.violations.len())
}

/// Samples the invariant checker every `every` until stopped; the handle
/// returns (samples taken, violations seen).
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl Sampler {
    pub fn start(client: Client, every: Duration) -> Sampler {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (mut samples, mut seen) = (0, 0);
            loop {
                if let Ok(report) = client.invariants().await {
                    samples += 1;
                    seen += report.violations.len();
                    for v in report.violations.iter().take(3) {
                        eprintln!("invariant violation: {v:?}");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = rx.changed() => return (samples, seen),
                }
            }
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> (usize, usize) {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or((0, 0))
    }
}

/// Nearest-rank percentiles of latencies in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(samples: &[f64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles { p50: 0.0, p99: 0.0, max: 0.0 };
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles { p50: rank(0.50), p99: rank(0.99), max: v[v.len() - 1] }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Two decimals, for ratios and per-placement figures.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        let p = percentiles(&v);
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        let p = percentiles(&[7.0]);
        assert_eq!((p.p50, p.p99, p.max), (7.0, 7.0, 7.0));
        assert_eq!(percentiles(&[]).max, 0.0);
    }

    #[test]
    fn rfc3339_times_parse_to_milliseconds() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(parse_time_ms(&berth_api::rfc3339(1_764_600_000_123)), Some(1_764_600_000_123));
        assert_eq!(parse_time_ms("yesterday"), None);
    }
}
