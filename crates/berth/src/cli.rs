//! Flags and client commands. The contract names (`--data-dir`,
//! `--listen`, `--memory-mib`, `--node-name`, `--control-plane`, `--token`,
//! `--name`, `--kind`, `--tenant`, `--addr`, `--json`) are relied on by
//! tools outside the code: keep them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_api::{CreateServer, CreateToken, ServerView};
use berth_client::Client;
use berth_control::notify::{EmailConfig, SmtpTls};
use berth_control::ControlConfig;
use berth_core::ServerStatus;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::daemon::{self, AgentOpts, ControlOpts, DriverKind};
use crate::output::{opt, table};

#[derive(Parser)]
#[command(name = "berth", version, about = "run memory-hungry, stateful servers on a fleet without over-commit")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Control plane, a local agent and SQLite in one process
    Dev(DevArgs),
    /// The control plane alone (SQLite in --data-dir)
    ControlPlane(ControlArgs),
    /// A node agent
    Agent(AgentArgs),
    /// Create or upgrade the database schema, then exit
    Migrate(MigrateArgs),
    /// Show the control-plane replicas and which one leads
    Cluster {
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage servers
    Server {
        #[command(subcommand)]
        cmd: ServerCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage nodes
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage API tokens
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// List events
    Events(EventsArgs),
    /// Billing sessions and amounts of one server
    Costs {
        id: String,
        /// Comma-separated values instead of a table
        #[arg(long)]
        csv: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// What a tenant was billed in a month (UTC)
    Usage {
        /// Tenant (admin tokens; tenant tokens see their own)
        #[arg(long)]
        tenant: Option<String>,
        /// Month as YYYY-MM
        #[arg(long)]
        month: String,
        #[arg(long)]
        csv: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage webhooks (notifications signed with HMAC-SHA256)
    Webhook {
        #[command(subcommand)]
        cmd: WebhookCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// List templates and their config keys
    Templates {
        #[command(flatten)]
        conn: Conn,
    },
    /// Measure berth: admission, recovery, detection, memory, churn
    Bench(crate::bench::BenchArgs),
    /// The test workload (hidden)
    #[command(hide = true)]
    Fakegame(FakegameCli),
    /// The fence watchdog an agent starts (hidden)
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        agent_pid: i32,
    },
}

#[derive(Args, Clone)]
pub struct Conn {
    /// Control-plane URL
    #[arg(long, env = "BERTH_ADDR", default_value = "http://127.0.0.1:7070", global = true)]
    addr: String,
    /// API token (default: the admin token in ./.berth/admin.token, if present)
    #[arg(long, env = "BERTH_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    fn client(&self) -> Result<Client> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(".berth/admin.token")
                .map(|s| s.trim().to_string())
                .context("no token: pass --token or set BERTH_TOKEN (berth dev writes one to .berth/admin.token)")?,
        };
        let addr = if self.addr.contains("://") { self.addr.clone() } else { format!("http://{}", self.addr) };
        Ok(Client::new(&addr, &token))
    }
}

#[derive(Args)]
pub struct ControlFlags {
    /// Where the SQLite database, admin.token and addr live
    #[arg(long, default_value = "./.berth")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Extra template files (*.toml)
    #[arg(long)]
    templates_dir: Option<PathBuf>,
    /// Seconds an agent's lease lasts without renewal
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Seconds between agent syncs (told to agents)
    #[arg(long, default_value_t = 2)]
    sync_interval: u64,
    /// Milliseconds before the first retry of a transient start failure (then doubling)
    #[arg(long, default_value_t = 60_000)]
    retry_base_ms: i64,
    /// Seconds added to the lease TTL before a silent node is judged
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// Price of a plan per GiB-hour in minor currency units, e.g. standard=100 (repeatable)
    #[arg(long = "price", value_name = "PLAN=MINOR_UNITS")]
    prices: Vec<String>,
    /// Disk use (percent) from which a node receives no placements
    #[arg(long, default_value_t = 90)]
    disk_pressure_percent: u64,
    /// Disk use (percent) from which an alert event fires
    #[arg(long, default_value_t = 95)]
    disk_alert_percent: u64,
    /// Seconds between runs of the billing zombie sweeper
    #[arg(long, default_value_t = 60)]
    sweep_interval: u64,
    /// Hours after which a billing session is rolled over
    #[arg(long, default_value_t = 24)]
    max_session_hours: i64,
    /// MiB a node's real memory use may exceed its budget (reservations plus
    /// system reserve, or the system reserve for processes outside berth)
    /// before a memory_drift event
    #[arg(long, default_value_t = 512)]
    drift_margin_mib: u64,
    /// Start attempts (the first and its retries) before a transient failure fails the server
    #[arg(long, default_value_t = 4)]
    retry_max_attempts: u32,
    /// Seconds a queued server may wait for a node before it fails with no_capacity
    #[arg(long, default_value_t = 600)]
    queue_timeout_s: u64,
    /// Restart policy on-failure: milliseconds before the first automatic restart (then doubling, up to 5 minutes)
    #[arg(long, default_value_t = 10_000)]
    restart_backoff_ms: i64,
    /// Restart policy on-failure: automatic restarts within --restart-window-s before the server fails
    #[arg(long, default_value_t = 5)]
    restart_max: u32,
    #[arg(long, default_value_t = 600)]
    restart_window_s: u64,
    /// Milliseconds before a failed webhook or email delivery is retried (then doubling)
    #[arg(long, default_value_t = 5_000)]
    delivery_retry_base_ms: i64,
    /// Attempts of one delivery before it is given up
    #[arg(long, default_value_t = 10)]
    delivery_max_attempts: u32,
    /// Failed webhook attempts in a row after which the webhook is disabled
    #[arg(long, default_value_t = 20)]
    webhook_disable_after: u32,
    /// Most writes committed together in one SQLite transaction (one fsync); 1 turns group commit off
    #[arg(long, default_value_t = 256)]
    group_commit_max: usize,
    /// Milliseconds the admission committer waits for more plans before its transaction (0: only those already waiting)
    #[arg(long, default_value_t = 0)]
    commit_window_ms: u64,
    /// Most placements in one admission commit
    #[arg(long, default_value_t = 512)]
    commit_max_batch: usize,
    /// SMTP server for email notifications, HOST:PORT (no email without it)
    #[arg(long)]
    smtp: Option<String>,
    /// opportunistic (STARTTLS when offered), required, wrapper (TLS on connect) or none
    #[arg(long, default_value = "opportunistic")]
    smtp_tls: String,
    #[arg(long, env = "BERTH_SMTP_USER")]
    smtp_user: Option<String>,
    #[arg(long, env = "BERTH_SMTP_PASSWORD", hide_env_values = true)]
    smtp_password: Option<String>,
    /// Sender of notification emails
    #[arg(long, default_value = "berth@localhost")]
    email_from: String,
    /// Recipients of notification emails, comma-separated
    #[arg(long)]
    email_to: Option<String>,
}

/// The longest wait the admission committer may be told to make for more plans.
const MAX_COMMIT_WINDOW_MS: u64 = 1_000;

impl ControlFlags {
    fn opts(&self) -> Result<ControlOpts> {
        let mut cfg = ControlConfig {
            lease_ttl_ms: self.lease_ttl * 1000,
            lease_grace_ms: self.lease_grace * 1000,
            sync_interval_ms: self.sync_interval * 1000,
            disk_pressure_percent: self.disk_pressure_percent,
            disk_alert_percent: self.disk_alert_percent,
            sweep_interval: Duration::from_secs(self.sweep_interval.max(1)),
            max_session_ms: self.max_session_hours.max(1) * 3_600_000,
            ..Default::default()
        };
        if self.retry_base_ms <= 0 || self.retry_max_attempts == 0 || self.restart_backoff_ms <= 0 || self.delivery_retry_base_ms <= 0 {
            bail!("retry and backoff settings must be positive");
        }
        if self.group_commit_max == 0 || self.commit_max_batch == 0 {
            bail!("--group-commit-max and --commit-max-batch must be at least 1");
        }
        if self.commit_window_ms > MAX_COMMIT_WINDOW_MS {
            // Every start in a round would wait that long for its answer.
            bail!("--commit-window-ms must be at most {MAX_COMMIT_WINDOW_MS}, got {}", self.commit_window_ms);
        }
        cfg.commit_window = Duration::from_millis(self.commit_window_ms);
        cfg.commit_max_batch = self.commit_max_batch;
        cfg.retry.base_ms = self.retry_base_ms;
        cfg.drift_margin_mib = self.drift_margin_mib;
        cfg.retry.max_ms = self.retry_base_ms.saturating_mul(4);
        for p in &self.prices {
            let (plan, price) = p.split_once('=').with_context(|| format!("--price wants PLAN=MINOR_UNITS, got {p:?}"))?;
            berth_core::validate::name(plan)?;
            let price: i64 = price.parse().ok().filter(|x| *x >= 0).with_context(|| format!("price of {plan} must be a non-negative integer"))?;
            cfg.prices.insert(plan.to_string(), price);
        }
        if self.disk_pressure_percent == 0 || self.disk_pressure_percent > 100 || self.disk_alert_percent > 100 {
            bail!("disk percentages must be from 1 to 100");
        }
        cfg.retry.max_attempts = self.retry_max_attempts;
        cfg.queue_timeout_ms = (self.queue_timeout_s as i64).saturating_mul(1000);
        cfg.restart.base_ms = self.restart_backoff_ms;
        cfg.restart.max_ms = cfg.restart.max_ms.max(self.restart_backoff_ms);
        cfg.restart.max_restarts = self.restart_max;
        cfg.restart.window_ms = (self.restart_window_s as i64).saturating_mul(1000);
        cfg.delivery.retry.base_ms = self.delivery_retry_base_ms;
        cfg.delivery.retry.max_ms = cfg.delivery.retry.max_ms.max(self.delivery_retry_base_ms);
        cfg.delivery.retry.max_attempts = self.delivery_max_attempts.max(1);
        cfg.delivery.disable_after = self.webhook_disable_after.max(1);
        let email = match &self.smtp {
            None => None,
            Some(addr) => {
                let (host, port) = addr.rsplit_once(':').context("--smtp must be HOST:PORT")?;
                let port: u16 = port.parse().context("--smtp port must be a number")?;
                let tls = SmtpTls::parse(&self.smtp_tls).context("--smtp-tls must be opportunistic, required, wrapper or none")?;
                let to: Vec<String> = self.email_to.as_deref().unwrap_or_default().split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                if to.is_empty() {
                    bail!("--smtp needs --email-to");
                }
                let credentials = match (&self.smtp_user, &self.smtp_password) {
                    (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                    (None, None) => None,
                    _ => bail!("--smtp-user and --smtp-password go together"),
                };
                Some(EmailConfig { host: host.to_string(), port, tls, credentials, from: self.email_from.clone(), to })
            }
        };
        Ok(ControlOpts {
            data_dir: self.data_dir.clone(),
            database: None,
            listen: self.listen,
            templates_dir: self.templates_dir.clone(),
            cfg,
            email,
            group_commit_max: self.group_commit_max,
        })
    }
}

#[derive(Args)]
pub struct NodeFlags {
    /// Memory berth may reserve on this node (default: host total minus 512 MiB)
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Ports handed to instances, e.g. 30000-30999
    #[arg(long, default_value = "30000-30999")]
    ports: String,
    /// Starting instances beyond this wait (0: no limit)
    #[arg(long, default_value_t = 0)]
    max_concurrent_starts: u32,
    /// Host memory a start must find free beyond its reservation
    #[arg(long, default_value_t = 64)]
    headroom_mib: u64,
    /// Do not create memory cgroups; watch RSS instead (process driver)
    #[arg(long)]
    no_cgroups: bool,
    /// How instances run: plain processes, or containers of the local Docker engine
    #[arg(long, value_enum, default_value = "process")]
    driver: DriverKind,
    /// The Docker engine's unix socket (docker driver)
    #[arg(long, env = "BERTH_DOCKER_SOCKET", default_value = "/var/run/docker.sock")]
    docker_socket: String,
    #[command(flatten)]
    sim: SimFlags,
}

/// The `sim` driver: instances and host memory exist only in the agent's
/// memory (for trying berth out and for benchmarks).
#[derive(Args, Clone)]
pub struct SimFlags {
    /// sim driver: milliseconds from start to ready, MIN-MAX (uniform)
    #[arg(long, default_value = "200-800")]
    sim_start_ms: MsRange,
    /// sim driver: share of its reservation a running instance uses (0 to 1)
    #[arg(long, default_value_t = 0.8)]
    sim_memory_use: f64,
    /// sim driver: probability that a start fails (transient)
    #[arg(long, default_value_t = 0.0)]
    sim_failure_rate: f64,
    /// sim driver: mean crashes per instance-hour
    #[arg(long, default_value_t = 0.0)]
    sim_crashes_per_hour: f64,
    /// sim driver: milliseconds a graceful stop takes
    #[arg(long, default_value_t = 200)]
    sim_stop_ms: u64,
    /// sim driver: seed of its random choices
    #[arg(long, default_value_t = 1)]
    sim_seed: u64,
}

impl SimFlags {
    /// The sim driver's settings; the simulated host has `memory_mib` for
    /// instances plus the agent's system reserve.
    pub fn config(&self, memory_mib: Option<u64>) -> Result<berth_agent::SimConfig> {
        let cfg = berth_agent::SimConfig {
            host_total_mib: memory_mib.map(|m| m + 512).unwrap_or(16 * 1024),
            start_latency_ms: (self.sim_start_ms.min, self.sim_start_ms.max),
            memory_use: self.sim_memory_use,
            start_failure_rate: self.sim_failure_rate,
            crashes_per_hour: self.sim_crashes_per_hour,
            stop_latency_ms: self.sim_stop_ms,
            seed: self.sim_seed,
        };
        cfg.validate().map_err(|e| anyhow::anyhow!("sim driver: {e}"))?;
        Ok(cfg)
    }
}

/// The longest simulated start `--sim-start-ms` takes: ten minutes.
const MAX_SIM_START_MS: u64 = 600_000;

/// `--sim-start-ms`: milliseconds MIN-MAX, uniform (one number means both).
/// Refused while the flags are parsed, before anything starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsRange {
    pub min: u64,
    pub max: u64,
}

impl std::str::FromStr for MsRange {
    type Err = String;

    fn from_str(s: &str) -> Result<MsRange, String> {
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let ms = |v: &str| v.trim().parse::<u64>().map_err(|_| format!("wants MIN-MAX milliseconds, got {s:?}"));
        let (min, max) = (ms(lo)?, ms(hi)?);
        if min > max {
            return Err(format!("the range {min}-{max} is empty"));
        }
        if max > MAX_SIM_START_MS {
            return Err(format!("must be at most {MAX_SIM_START_MS} ms, got {max}"));
        }
        Ok(MsRange { min, max })
    }
}

impl std::fmt::Display for MsRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[derive(Args)]
pub struct DevArgs {
    #[command(flatten)]
    control: ControlFlags,
    #[command(flatten)]
    node: NodeFlags,
    /// Name of the local node
    #[arg(long, default_value = "local")]
    node_name: String,
}

#[derive(Args)]
pub struct ControlArgs {
    #[command(flatten)]
    control: ControlFlags,
    /// PostgreSQL URL (postgres://…) for several replicas; SQLite in --data-dir when absent
    #[arg(long, env = "BERTH_DATABASE", hide_env_values = true)]
    database: Option<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// SQLite database directory (when --database is absent)
    #[arg(long, default_value = "./.berth")]
    data_dir: PathBuf,
    /// PostgreSQL URL
    #[arg(long, env = "BERTH_DATABASE", hide_env_values = true)]
    database: Option<String>,
}

#[derive(Args)]
pub struct AgentArgs {
    /// Control-plane URL, or several separated by commas (the agent fails over)
    #[arg(long)]
    control_plane: String,
    /// Agent token
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    token: String,
    /// Node name
    #[arg(long)]
    name: String,
    /// Where instances' working dirs live
    #[arg(long)]
    data_dir: PathBuf,
    /// Seconds between syncs when idle
    #[arg(long, default_value_t = 2)]
    sync_interval: u64,
    #[command(flatten)]
    node: NodeFlags,
}

fn agent_opts(name: &str, data_dir: PathBuf, node: &NodeFlags, sync_interval: u64) -> Result<AgentOpts> {
    Ok(AgentOpts {
        name: name.to_string(),
        data_dir,
        memory_mib: node.memory_mib,
        ports: daemon::parse_ports(&node.ports)?,
        max_concurrent_starts: node.max_concurrent_starts,
        headroom_mib: node.headroom_mib,
        sync_interval: Duration::from_secs(sync_interval.max(1)),
        cgroups: !node.no_cgroups,
        driver: node.driver,
        docker_socket: node.docker_socket.clone(),
        sim: node.sim.config(node.memory_mib)?,
    })
}

#[derive(Subcommand)]
pub enum ServerCmd {
    /// Create a server (stopped)
    Create {
        name: String,
        #[arg(long)]
        template: String,
        #[arg(long)]
        memory_mib: u64,
        /// Config key=value (value parsed as JSON when it is valid JSON)
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Create for this tenant (admin tokens only)
        #[arg(long)]
        tenant: Option<String>,
        /// Disconnect window in seconds (default 300; 0 fails over fast)
        #[arg(long)]
        stop_after_s: Option<u64>,
        /// May be replaced on any node with a fresh data dir
        #[arg(long)]
        stateless: Option<bool>,
        /// Price plan
        #[arg(long)]
        plan: Option<String>,
        /// never (default) or on-failure (restart after a crash, with backoff)
        #[arg(long)]
        restart_policy: Option<String>,
    },
    /// Start a server (queue it for placement)
    Start {
        id: String,
        /// A stateful server lost with its node: start elsewhere on a fresh world
        #[arg(long)]
        allow_fresh_world: bool,
        /// Wait until it runs, with progress
        #[arg(long)]
        wait: bool,
        /// Seconds to wait
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop a server gracefully
    Stop {
        id: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop a server, then start it again
    Restart {
        id: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// End a server's instance at once (SIGKILL), bypassing the operation queue
    Kill {
        id: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// List a server's operations (newest last)
    Ops {
        id: String,
        /// Only operations that have not ended
        #[arg(long)]
        active: bool,
    },
    /// Delete a stopped server (its data dir is kept on the node)
    Delete { id: String },
    /// List servers
    List,
    /// Show one server
    Show { id: String },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    List,
    /// Stop placing servers on a node (and stop what runs there at the deadline)
    Drain {
        id: String,
        /// Seconds after which servers still on the node are stopped gracefully
        #[arg(long)]
        deadline: Option<u64>,
    },
    /// Place servers on a node again
    Undrain {
        id: String,
    },
    /// Server data dirs kept on a node, and which are recovery candidates
    Volumes {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; the secret is printed as the last line
    Create {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum WebhookCmd {
    /// Create a webhook; its signing secret is printed as the last line (once)
    Create {
        url: String,
        /// Event kinds, comma-separated (default: alerts; * for all)
        #[arg(long)]
        events: Option<String>,
        /// For one tenant's servers only (admin tokens; tenant tokens always)
        #[arg(long)]
        tenant: Option<String>,
    },
    List,
    Delete {
        id: String,
    },
    /// Enable again (after it was disabled by failures)
    Enable {
        id: String,
    },
    Disable {
        id: String,
    },
    /// The delivery log of a webhook
    Deliveries {
        id: String,
    },
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only events at or after this time: RFC 3339, or a duration ago (10m, 2h)
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    server: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    /// Keep printing new events
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct FakegameCli {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 20)]
    max_players: u32,
    #[arg(long, default_value_t = 0)]
    alloc_mib: u64,
    #[arg(long, default_value_t = 0)]
    start_delay_ms: u64,
    #[arg(long, default_value_t = 0)]
    crash_after_ms: u64,
    #[arg(long, env = "BERTH_RCON_PASSWORD")]
    rcon_password: Option<String>,
}

impl From<FakegameCli> for crate::fakegame::FakegameArgs {
    fn from(a: FakegameCli) -> Self {
        crate::fakegame::FakegameArgs {
            port: a.port,
            data_dir: a.data_dir,
            max_players: a.max_players,
            alloc_mib: a.alloc_mib,
            start_delay_ms: a.start_delay_ms,
            crash_after_ms: a.crash_after_ms,
            rcon_password: a.rcon_password,
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Dev(a) => {
            init_logging();
            let control = a.control.opts()?;
            let agent = agent_opts(&a.node_name, control.data_dir.join("agent"), &a.node, a.control.sync_interval)?;
            daemon::dev(control, agent).await
        }
        Cmd::ControlPlane(a) => {
            init_logging();
            let mut opts = a.control.opts()?;
            opts.database = a.database;
            daemon::control_plane(opts).await
        }
        Cmd::Migrate(a) => {
            init_logging();
            daemon::open_store(&a.data_dir, a.database.as_deref(), berth_store::SqliteOptions::default()).await?;
            println!("schema is up to date");
            Ok(())
        }
        Cmd::Cluster { conn } => {
            let v = conn.client()?.cluster().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = v["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            r["id"].as_str().unwrap_or("").to_string(),
                            r["address"].as_str().unwrap_or("").to_string(),
                            if r["leader"].as_bool() == Some(true) { "leader".into() } else { "-".into() },
                            if r["alive"].as_bool() == Some(true) { "alive".into() } else { "gone".into() },
                            r["last_seen"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["ID", "ADDRESS", "ROLE", "STATE", "LAST_SEEN"], &rows));
            }
            Ok(())
        }
        Cmd::Agent(a) => {
            init_logging();
            let opts = agent_opts(&a.name, a.data_dir.clone(), &a.node, a.sync_interval)?;
            daemon::agent(&a.control_plane, &a.token, opts).await
        }
        Cmd::Server { cmd, conn } => server(cmd, &conn).await,
        Cmd::Node { cmd, conn } => node(cmd, &conn).await,
        Cmd::Token { cmd: TokenCmd::Create { kind, tenant }, conn } => {
            let created = conn.client()?.create_token(&CreateToken { kind, tenant }).await?;
            if conn.json {
                println!("{}", serde_json::to_string(&created)?);
            } else {
                println!("created {} token{} (shown once):", created.kind, created.tenant.as_ref().map(|t| format!(" for tenant {t}")).unwrap_or_default());
                println!("{}", created.token);
            }
            Ok(())
        }
        Cmd::Events(a) => events(a).await,
        Cmd::Costs { id, csv, conn } => {
            let costs = conn.client()?.costs(&id).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&costs)?);
            } else if csv {
                println!("node_id,generation,started_at,ended_at,end_reason,memory_mib,plan,amount");
                for s in &costs.sessions {
                    println!(
                        "{},{},{},{},{},{},{},{}",
                        s.node_id,
                        s.generation,
                        s.started_at,
                        s.ended_at.clone().unwrap_or_default(),
                        s.end_reason.clone().unwrap_or_default(),
                        s.memory_mib,
                        s.plan,
                        s.amount
                    );
                }
            } else {
                let rows: Vec<Vec<String>> = costs
                    .sessions
                    .iter()
                    .map(|s| {
                        vec![s.node_id.clone(), s.generation.to_string(), s.started_at.clone(), opt(&s.ended_at), opt(&s.end_reason), s.amount.to_string()]
                    })
                    .collect();
                print!("{}", table(&["NODE", "GEN", "STARTED", "ENDED", "REASON", "AMOUNT"], &rows));
                println!("total: {}", costs.total);
            }
            Ok(())
        }
        Cmd::Usage { tenant, month, csv, conn } => {
            let u = conn.client()?.usage(tenant.as_deref(), &month).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&u)?);
            } else if csv {
                println!("tenant,month,servers,sessions,billed_seconds,amount");
                println!("{},{},{},{},{},{}", u.tenant.clone().unwrap_or_default(), u.month, u.servers, u.sessions, u.billed_seconds, u.amount);
            } else {
                println!(
                    "{} {}: {} servers, {} sessions, {} s billed, amount {}",
                    u.tenant.as_deref().unwrap_or("all tenants"),
                    u.month,
                    u.servers,
                    u.sessions,
                    u.billed_seconds,
                    u.amount
                );
            }
            Ok(())
        }
        Cmd::Webhook { cmd, conn } => webhook(cmd, &conn).await,
        Cmd::Templates { conn } => {
            let t = conn.client()?.templates().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                let rows: Vec<Vec<String>> = t
                    .templates
                    .iter()
                    .map(|t| {
                        let keys = t.config.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>().join(",")).unwrap_or_default();
                        vec![t.name.clone(), t.drivers.join(","), keys, t.description.clone()]
                    })
                    .collect();
                print!("{}", table(&["NAME", "DRIVERS", "CONFIG", "DESCRIPTION"], &rows));
            }
            Ok(())
        }
        Cmd::Bench(a) => crate::bench::run(a).await,
        Cmd::Fakegame(_) | Cmd::Watchdog { .. } => unreachable!("handled before the runtime starts"),
    }
}

fn parse_config(pairs: &[String]) -> Result<Value> {
    let mut m = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p.split_once('=').with_context(|| format!("--config wants KEY=VALUE, got {p:?}"))?;
        let v = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), v);
    }
    Ok(Value::Object(m))
}

fn server_rows(servers: &[ServerView]) -> String {
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.id.clone(),
                s.template.clone(),
                s.memory_mib.to_string(),
                s.status.to_string(),
                opt(&s.node_id),
                opt(&s.port),
                s.generation.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "ID", "TEMPLATE", "MEMORY_MIB", "STATUS", "NODE", "PORT", "GEN"], &rows)
}

/// The server as JSON, or one line with its status.
fn print_status(s: &ServerView, json: bool) -> Result<()> {
    if json {
        print_server(s, true)
    } else {
        println!("server {} {}", s.name, s.status);
        Ok(())
    }
}

fn print_server(s: &ServerView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!("name:        {}", s.name);
    println!("id:          {}", s.id);
    println!("tenant:      {}", s.tenant);
    println!("template:    {}", s.template);
    println!("memory_mib:  {}", s.memory_mib);
    println!("status:      {}", s.status);
    println!("node:        {}", opt(&s.node_id));
    println!("port:        {}", opt(&s.port));
    println!("generation:  {}", s.generation);
    println!("used_mib:    {}", opt(&s.used_mib));
    println!("restart:     {}", s.restart_policy);
    if let Some(e) = &s.last_exit {
        println!("last_exit:   {}{}", e.reason, e.code.map(|c| format!(" (code {c})")).unwrap_or_default());
    }
    if s.attempts > 0 || s.last_error.is_some() {
        println!("attempts:    {}", s.attempts);
        println!("next_try:    {}", opt(&s.next_attempt_at));
        println!("last_error:  {}", opt(&s.last_error));
    }
    println!("config:      {}", serde_json::to_string(&s.config)?);
    Ok(())
}

/// Polls until the server reaches `target`, showing progress; fails if it
/// lands in a state it will not leave by itself.
async fn wait_for(client: &Client, id: &str, target: ServerStatus, timeout: Duration, json: bool) -> Result<ServerView> {
    let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    loop {
        let s = client.get_server(id).await?;
        bar.set_message(format!("{}: {} ({}s)", s.name, s.status, started.elapsed().as_secs()));
        if s.status == target {
            bar.finish_and_clear();
            return Ok(s);
        }
        let stuck = match target {
            ServerStatus::Running => matches!(s.status, ServerStatus::Stopped | ServerStatus::Crashed | ServerStatus::Failed),
            _ => matches!(s.status, ServerStatus::Crashed | ServerStatus::Failed),
        };
        if stuck {
            bar.finish_and_clear();
            let why = s.last_error.clone().or(s.last_exit.as_ref().map(|e| e.reason.clone())).unwrap_or_default();
            bail!("server {} is {} ({why})", s.name, s.status);
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            bail!("server {} is still {} after {}s", s.name, s.status, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn server(cmd: ServerCmd, conn: &Conn) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        ServerCmd::Create { name, template, memory_mib, config, tenant, stop_after_s, stateless, plan, restart_policy } => {
            let req = CreateServer { name, template, memory_mib, config: parse_config(&config)?, tenant, stop_after_s, stateless, plan, restart_policy };
            let s = c.create_server(&req).await?;
            if conn.json {
                print_server(&s, true)?;
            } else {
                println!("created server {} ({})", s.name, s.id);
            }
        }
        ServerCmd::Start { id, allow_fresh_world, wait, timeout } => {
            let mut s = if allow_fresh_world { c.start_server_fresh(&id).await? } else { c.start_server(&id).await? };
            if wait {
                s = wait_for(&c, &id, ServerStatus::Running, Duration::from_secs(timeout), conn.json).await?;
            }
            if conn.json {
                print_server(&s, true)?;
            } else if wait {
                println!("server {} running on {} port {}", s.name, opt(&s.node_id), opt(&s.port));
            } else {
                println!("server {} {}", s.name, s.status);
            }
        }
        ServerCmd::Stop { id, wait, timeout } => {
            let mut s = c.stop_server(&id).await?;
            if wait {
                s = wait_for(&c, &id, ServerStatus::Stopped, Duration::from_secs(timeout), conn.json).await?;
            }
            print_status(&s, conn.json)?;
        }
        ServerCmd::Restart { id, wait, timeout } => {
            let mut s = c.restart_server(&id).await?;
            if wait {
                s = wait_for_restart(&c, &id, Duration::from_secs(timeout), conn.json).await?;
            }
            print_status(&s, conn.json)?;
        }
        ServerCmd::Kill { id, wait, timeout } => {
            let mut s = c.kill_server(&id).await?;
            if wait {
                s = wait_for(&c, &id, ServerStatus::Stopped, Duration::from_secs(timeout), conn.json).await?;
            }
            print_status(&s, conn.json)?;
        }
        ServerCmd::Ops { id, active } => {
            let l = c.server_operations(&id, if active { "active=true&limit=1000" } else { "limit=1000" }).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .operations
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.clone(),
                            o.kind.clone(),
                            o.status.clone(),
                            opt(&o.phase),
                            o.origin.clone(),
                            o.created_at.clone(),
                            o.error.clone().map(|e| format!("{}: {e}", o.error_code.clone().unwrap_or_default())).unwrap_or_default(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["ID", "KIND", "STATUS", "PHASE", "ORIGIN", "CREATED", "ERROR"], &rows));
            }
        }
        ServerCmd::Delete { id } => {
            let s = c.delete_server(&id).await?;
            if conn.json {
                print_server(&s, true)?;
            } else {
                println!("deleted server {}", s.name);
            }
        }
        ServerCmd::List => {
            let l = c.list_servers().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", server_rows(&l.servers));
            }
        }
        ServerCmd::Show { id } => print_server(&c.get_server(&id).await?, conn.json)?,
    }
    Ok(())
}

async fn node(cmd: NodeCmd, conn: &Conn) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        NodeCmd::List => {
            let l = c.list_nodes().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.id.clone(),
                            n.status.to_string(),
                            n.memory.allocatable_mib.to_string(),
                            n.memory.reserved_mib.to_string(),
                            n.memory.used_mib.to_string(),
                            n.servers.to_string(),
                            format!("{}-{}", n.ports.min, n.ports.max),
                            drift_cell(n.memory_drift.as_ref()),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "ID", "STATUS", "ALLOCATABLE_MIB", "RESERVED_MIB", "HOST_USED_MIB", "SERVERS", "PORTS", "MEMORY_DRIFT"], &rows));
            }
        }
        NodeCmd::Drain { id, deadline } => {
            let n = c.drain_node(&id, true, deadline).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&n)?)
            } else {
                println!("node {} {}", n.name, n.status)
            }
        }
        NodeCmd::Volumes { id } => {
            let v = c.node_volumes(&id).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = v
                    .volumes
                    .iter()
                    .map(|x| {
                        vec![
                            x.server_id.clone(),
                            opt(&x.server_name),
                            x.server_status.map(|s| s.to_string()).unwrap_or_else(|| "deleted".into()),
                            opt(&x.server_node_id),
                            if x.recovery_candidate { "yes".into() } else { "-".into() },
                        ]
                    })
                    .collect();
                print!("{}", table(&["SERVER", "NAME", "STATUS", "RUNS_ON", "RECOVERY_CANDIDATE"], &rows));
            }
        }
        NodeCmd::Undrain { id } => {
            let n = c.drain_node(&id, false, None).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&n)?)
            } else {
                println!("node {} {}", n.name, n.status)
            }
        }
    }
    Ok(())
}

/// A short drift summary for the node table; details are in `--json` and
/// the `memory_drift` event.
fn drift_cell(d: Option<&berth_api::DriftView>) -> String {
    let Some(d) = d else { return "-".into() };
    let mut parts = Vec::new();
    if d.over_reservations_mib > 0 {
        parts.push(format!("+{} MiB over reservations", d.over_reservations_mib));
    }
    if d.unmanaged_excess_mib > 0 {
        parts.push(format!("{} MiB outside berth", d.unmanaged_mib));
    }
    parts.join(", ")
}

/// `--since`: an RFC 3339 time as is, or a duration before now.
fn since_param(s: &str) -> Result<String> {
    if humantime::parse_rfc3339_weak(s).is_ok() {
        return Ok(s.to_string());
    }
    let ago = humantime::parse_duration(s).with_context(|| format!("--since wants RFC 3339 or a duration like 10m, got {s:?}"))?;
    let at = std::time::SystemTime::now().checked_sub(ago).context("--since is too far back")?;
    Ok(humantime::format_rfc3339_millis(at).to_string())
}

async fn webhook(cmd: WebhookCmd, conn: &Conn) -> Result<()> {
    let c = conn.client()?;
    let print = |w: &berth_api::WebhookView| -> Result<()> {
        if conn.json {
            println!("{}", serde_json::to_string_pretty(w)?);
        } else {
            println!("webhook {} {} ({})", w.id, w.url, if w.enabled { "enabled" } else { "disabled" });
        }
        Ok(())
    };
    match cmd {
        WebhookCmd::Create { url, events, tenant } => {
            let events = events.map(|e| e.split(',').map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect()).unwrap_or_default();
            let w = c.create_webhook(&berth_api::CreateWebhook { url, events, tenant }).await?;
            print(&w)?;
            if !conn.json {
                println!("signing secret (shown once):");
                println!("{}", w.secret.clone().unwrap_or_default());
            }
        }
        WebhookCmd::List => {
            let l = c.list_webhooks().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .webhooks
                    .iter()
                    .map(|w| {
                        vec![
                            w.id.clone(),
                            w.url.clone(),
                            opt(&w.tenant),
                            if w.events.is_empty() { "alerts".into() } else { w.events.join(",") },
                            if w.enabled { "enabled".into() } else { "disabled".into() },
                            w.consecutive_failures.to_string(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["ID", "URL", "TENANT", "EVENTS", "STATE", "FAILURES"], &rows));
            }
        }
        WebhookCmd::Delete { id } => {
            c.delete_webhook(&id).await?;
            println!("deleted webhook {id}");
        }
        WebhookCmd::Enable { id } => print(&c.set_webhook_enabled(&id, true).await?)?,
        WebhookCmd::Disable { id } => print(&c.set_webhook_enabled(&id, false).await?)?,
        WebhookCmd::Deliveries { id } => {
            let l = c.webhook_deliveries(&id).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .deliveries
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.clone(),
                            d.event_kind.clone(),
                            d.status.clone(),
                            d.attempts.to_string(),
                            opt(&d.last_status),
                            opt(&d.next_attempt_at),
                            d.last_error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["IDEMPOTENCY_KEY", "EVENT", "STATUS", "ATTEMPTS", "LAST_HTTP", "NEXT_TRY", "LAST_ERROR"], &rows));
            }
        }
    }
    Ok(())
}

/// Waits until the server has no unfinished operation, then requires it
/// to be running (a restart ends with the server running or failed).
async fn wait_for_restart(client: &Client, id: &str, timeout: Duration, json: bool) -> Result<ServerView> {
    let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    loop {
        let active = client.server_operations(id, "active=true").await?;
        let s = client.get_server(id).await?;
        bar.set_message(format!("{}: {} ({}s)", s.name, s.status, started.elapsed().as_secs()));
        if active.operations.is_empty() {
            bar.finish_and_clear();
            if s.status != ServerStatus::Running {
                let why = s.last_error.clone().or(s.last_exit.as_ref().map(|e| e.reason.clone())).unwrap_or_default();
                bail!("server {} is {} ({why})", s.name, s.status);
            }
            return Ok(s);
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            bail!("server {} is still {} after {}s", s.name, s.status, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn events(a: EventsArgs) -> Result<()> {
    let c = a.conn.client()?;
    let mut after: Option<i64> = None;
    let since = a.since.as_deref().map(since_param).transpose()?;
    loop {
        let mut q = vec!["limit=500".to_string()];
        if let (Some(s), None) = (&since, after) {
            q.push(format!("since={}", s.replace('+', "%2B")));
        }
        if let Some(s) = &a.server {
            q.push(format!("server={s}"));
        }
        if let Some(n) = &a.node {
            q.push(format!("node={n}"));
        }
        if let Some(k) = &a.kind {
            q.push(format!("kind={k}"));
        }
        if let Some(x) = after {
            q.push(format!("after={x}"));
        }
        let page = c.list_events(&q.join("&")).await?;
        for e in &page.events {
            if a.conn.json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                println!("{}  {:<22} {}", e.at, e.kind, e.message);
            }
            after = Some(e.seq);
        }
        if page.next_cursor.is_some() {
            continue;
        }
        if !a.follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        control: ControlFlags,
    }

    fn opts(args: &[&str]) -> Result<ControlOpts> {
        Flags::try_parse_from(std::iter::once("berth").chain(args.iter().copied())).expect("flags parse").control.opts()
    }

    #[test]
    fn a_commit_window_beyond_a_second_is_refused_with_its_flag_named() {
        assert!(opts(&[]).is_ok());
        assert!(opts(&["--commit-window-ms", "1000"]).is_ok());
        let err = opts(&["--commit-window-ms", "18446744073709551615"]).err().expect("refused").to_string();
        assert!(err.contains("--commit-window-ms must be at most 1000"), "{err}");
        let err = opts(&["--commit-max-batch", "0"]).err().expect("refused").to_string();
        assert!(err.contains("--commit-max-batch"), "{err}");
    }

    #[test]
    fn a_sim_start_range_parses_or_is_refused_with_the_reason() {
        assert_eq!("200-800".parse::<MsRange>(), Ok(MsRange { min: 200, max: 800 }));
        assert_eq!(" 5 ".parse::<MsRange>(), Ok(MsRange { min: 5, max: 5 }));
        assert_eq!("600000-600000".parse::<MsRange>(), Ok(MsRange { min: 600_000, max: 600_000 }));
        assert_eq!(MsRange { min: 200, max: 800 }.to_string(), "200-800");
        let err = |s: &str| s.parse::<MsRange>().expect_err(s);
        assert!(err("800-200").contains("is empty"));
        assert!(err("abc").contains("MIN-MAX"));
        assert!(err("1-2-3").contains("MIN-MAX"));
        assert!(err("-5").contains("MIN-MAX"));
        assert!(err("0-600001").contains("at most 600000"));
    }
}
