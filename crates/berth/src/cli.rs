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
    /// List templates and their config keys
    Templates {
        #[command(flatten)]
        conn: Conn,
    },
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
    /// Milliseconds before the first retry of a transient start failure
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
}

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
        Ok(ControlOpts { data_dir: self.data_dir.clone(), database: None, listen: self.listen, templates_dir: self.templates_dir.clone(), cfg })
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
    Undrain { id: String },
    /// Server data dirs kept on a node, and which are recovery candidates
    Volumes { id: String },
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

#[derive(Args)]
pub struct EventsArgs {
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
            daemon::open_store(&a.data_dir, a.database.as_deref()).await?;
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
                    .map(|s| vec![s.node_id.clone(), s.generation.to_string(), s.started_at.clone(), opt(&s.ended_at), opt(&s.end_reason), s.amount.to_string()])
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
                println!("{} {}: {} servers, {} sessions, {} s billed, amount {}", u.tenant.as_deref().unwrap_or("all tenants"), u.month, u.servers, u.sessions, u.billed_seconds, u.amount);
            }
            Ok(())
        }
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
        ServerCmd::Create { name, template, memory_mib, config, tenant, stop_after_s, stateless, plan } => {
            let req = CreateServer { name, template, memory_mib, config: parse_config(&config)?, tenant, stop_after_s, stateless, plan };
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
            if conn.json {
                print_server(&s, true)?;
            } else {
                println!("server {} {}", s.name, s.status);
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
            if conn.json { println!("{}", serde_json::to_string_pretty(&n)?) } else { println!("node {} {}", n.name, n.status) }
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
            if conn.json { println!("{}", serde_json::to_string_pretty(&n)?) } else { println!("node {} {}", n.name, n.status) }
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

async fn events(a: EventsArgs) -> Result<()> {
    let c = a.conn.client()?;
    let mut after: Option<i64> = None;
    loop {
        let mut q = vec!["limit=500".to_string()];
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
