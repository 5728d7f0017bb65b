//! Long-running modes: `control-plane`, `agent`, and `dev` (both in one
//! process). Owns the data-dir files (`berth.db`, `admin.token`,
//! `agent.token`, `addr`) and shutdown on SIGINT/SIGTERM. Instances are
//! never stopped on shutdown: they outlive the agent and are re-adopted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_agent::{Agent, AgentConfig, DockerDriver, Driver, ProcessDriver, SimConfig, SimDriver};
use berth_control::leader::Replica;
use berth_control::notify::EmailConfig;
use berth_control::templates::Templates;
use berth_control::{ensure_token_file, ControlConfig, ControlPlane, Extras};
use berth_core::{PortRange, TokenKind};
use berth_store::{PostgresStore, SqliteOptions, SqliteStore, Store};
use tokio::sync::watch;

pub struct ControlOpts {
    pub data_dir: PathBuf,
    /// `postgres://…`; SQLite in `data_dir` when absent.
    pub database: Option<String>,
    pub listen: SocketAddr,
    pub templates_dir: Option<PathBuf>,
    pub cfg: ControlConfig,
    /// SMTP settings; no email without them.
    pub email: Option<EmailConfig>,
    /// SQLite group commit (1: off).
    pub group_commit_max: usize,
}

pub struct AgentOpts {
    pub name: String,
    pub data_dir: PathBuf,
    pub memory_mib: Option<u64>,
    pub ports: PortRange,
    pub max_concurrent_starts: u32,
    pub headroom_mib: u64,
    pub sync_interval: Duration,
    pub cgroups: bool,
    pub driver: DriverKind,
    /// The Docker engine's unix socket (docker driver).
    pub docker_socket: String,
    /// How simulated instances behave (sim driver).
    pub sim: SimConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// Plain processes in their own sessions
    Process,
    /// Containers of the local Docker engine
    Docker,
    /// Simulated instances in the agent's memory (benchmarks, trying berth out)
    Sim,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn parse_ports(s: &str) -> Result<PortRange> {
    let (a, b) = s.split_once('-').context("ports must look like 30000-30999")?;
    let r = PortRange { min: a.trim().parse().context("bad first port")?, max: b.trim().parse().context("bad last port")? };
    if r.min == 0 || r.max < r.min {
        bail!("ports must be a non-empty range of non-zero ports, got {s}");
    }
    Ok(r)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A running control plane with its HTTP listener bound.
struct Started {
    url: String,
    store: Arc<dyn Store>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _cp: ControlPlane,
}

/// Opens the store the options name (and migrates it).
pub async fn open_store(data_dir: &Path, database: Option<&str>, sqlite: SqliteOptions) -> Result<Arc<dyn Store>> {
    Ok(match database {
        Some(url) => {
            if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                bail!("--database must be a postgres:// URL (SQLite is the default, in --data-dir)");
            }
            Arc::new(PostgresStore::open(url).await.context("cannot open the PostgreSQL store")?)
        }
        None => {
            std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
            Arc::new(
                SqliteStore::open_with(&data_dir.join("berth.db"), sqlite).await.with_context(|| format!("cannot open the store in {}", data_dir.display()))?,
            )
        }
    })
}

/// This replica's id, kept in the data dir so a restart takes its own
/// leader lease back at once.
fn replica_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("replica.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let id = format!("cp_{:016x}", rand::random::<u64>());
    std::fs::write(&path, format!("{id}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Connections the kernel queues for the control plane before it accepts
/// them (capped by `net.core.somaxconn`). The standard library's 128 was
/// too few: a fleet's agents reconnect together (after a restart, or when
/// their supervisor ticks line up), connections past the queue have their
/// SYN dropped, and each waits the 1 s retransmit: a benchmark burst
/// counted up to 24 such drops and a 1.06 s start.
const LISTEN_BACKLOG: u32 = 4096;

/// The control plane's listener, with `LISTEN_BACKLOG`.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As the standard library's bind does: a restarted control plane can
    // listen again while the old one's connections are in TIME-WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn start_control(opts: &ControlOpts, shutdown: watch::Receiver<bool>) -> Result<Started> {
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
    let store = open_store(&opts.data_dir, opts.database.as_deref(), SqliteOptions { group_commit_max: opts.group_commit_max }).await?;
    let templates = Templates::load(opts.templates_dir.as_deref())?;
    let listener = listen(opts.listen).with_context(|| format!("cannot listen on {}", opts.listen))?;
    let mut addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}");
    let replica = Replica { id: replica_id(&opts.data_dir)?, address: url.clone(), started_at: now_ms() };
    let extras = Extras { clock: None, email: opts.email.clone() };
    let cp = ControlPlane::start_with(store.clone(), templates, opts.cfg.clone(), replica, extras)?;
    let admin_path = opts.data_dir.join("admin.token");
    let created = ensure_token_file(store.as_ref(), TokenKind::Admin, &admin_path, now_ms()).await?;
    std::fs::write(opts.data_dir.join("addr"), format!("{url}\n"))?;
    println!("berth control plane listening on {url}");
    match created {
        Some(secret) => println!("admin token (also in {}): {secret}", admin_path.display()),
        None => println!("admin token in {}", admin_path.display()),
    }
    let mut sd = shutdown.clone();
    let server = tokio::spawn(cp.serve(listener, async move {
        let _ = sd.wait_for(|v| *v).await;
    }));
    Ok(Started { url, store, server, _cp: cp })
}

/// Warns when the instance ports overlap the kernel's ephemeral range:
/// outgoing connections then take instance ports and starts fail preflight.
fn warn_on_ephemeral_overlap(ports: PortRange) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range.split_whitespace().filter_map(|x| x.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if ports.min <= hi && ports.max >= lo {
            tracing::warn!(
                ports = %format!("{}-{}", ports.min, ports.max),
                ephemeral = %format!("{lo}-{hi}"),
                "instance ports overlap the kernel's ephemeral port range; starts may fail with port taken"
            );
        }
    }
}

async fn start_agent(url: &str, token: &str, opts: &AgentOpts, shutdown: watch::Receiver<bool>) -> Result<tokio::task::JoinHandle<()>> {
    if opts.driver != DriverKind::Sim {
        warn_on_ephemeral_overlap(opts.ports);
    }
    let instances = opts.data_dir.join("instances");
    let driver: Arc<dyn Driver> = match opts.driver {
        DriverKind::Process => {
            let exe = std::env::current_exe().context("cannot find the berth executable")?;
            Arc::new(ProcessDriver::new(instances, exe, opts.cgroups).with_context(|| format!("cannot prepare {}", opts.data_dir.display()))?)
        }
        DriverKind::Docker => Arc::new(DockerDriver::connect(&opts.docker_socket, &opts.name, instances).await.context("cannot use the docker driver")?),
        DriverKind::Sim => Arc::new(SimDriver::new(opts.sim.clone())),
    };
    let mut cfg = AgentConfig::new(url, token, &opts.name);
    cfg.memory_mib = opts.memory_mib;
    cfg.ports = opts.ports;
    cfg.max_concurrent_starts = opts.max_concurrent_starts;
    cfg.headroom_mib = opts.headroom_mib;
    cfg.sync_interval = opts.sync_interval;
    if opts.driver != DriverKind::Sim {
        // A simulated instance lives in this process: nothing outside it
        // (the fence watchdog) could stop it, and it keeps no files.
        cfg.data_dir = Some(opts.data_dir.clone());
        cfg.berth_exe = Some(std::env::current_exe().context("cannot find the berth executable")?);
    }
    let agent = Agent::new(cfg, driver);
    Ok(tokio::spawn(agent.run(shutdown)))
}

pub async fn control_plane(opts: ControlOpts) -> Result<()> {
    let (tx, rx) = watch::channel(false);
    let started = start_control(&opts, rx).await?;
    shutdown_signal().await;
    let _ = tx.send(true);
    let _ = started.server.await;
    Ok(())
}

pub async fn agent(url: &str, token: &str, opts: AgentOpts) -> Result<()> {
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
    let (tx, rx) = watch::channel(false);
    let handle = start_agent(url, token, &opts, rx).await?;
    println!("berth agent {} syncing with {url}", opts.name);
    shutdown_signal().await;
    let _ = tx.send(true);
    let _ = handle.await;
    Ok(())
}

fn read_secret(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?.trim().to_string())
}

pub async fn dev(control: ControlOpts, agent: AgentOpts) -> Result<()> {
    let (tx, rx) = watch::channel(false);
    let started = start_control(&control, rx.clone()).await?;
    let agent_token_path = control.data_dir.join("agent.token");
    ensure_token_file(started.store.as_ref(), TokenKind::Agent, &agent_token_path, now_ms()).await?;
    let token = read_secret(&agent_token_path)?;
    let handle = start_agent(&started.url, &token, &agent, rx).await?;
    println!("local agent {} ready; try: berth server create mc1 --template fakegame --memory-mib 512", agent.name);
    shutdown_signal().await;
    let _ = tx.send(true);
    let _ = handle.await;
    let _ = started.server.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_queues_a_fleet_connecting_at_once() {
        // Nothing accepts: every connection waits in the kernel's queue, as
        // they do while the control plane is busy. Past the queue, a
        // connection's SYN is dropped and its connect times out.
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::task::spawn_blocking(move || {
            (0..400)
                .map(|i| {
                    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500))
                        .unwrap_or_else(|e| panic!("connection {i} was not queued: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(held.len(), 400);
        drop(listener);
    }
}
