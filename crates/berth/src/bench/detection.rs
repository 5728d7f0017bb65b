//! The detection scenario: one node's agent (a separate `berth agent
//! --driver sim` process, so its simulated instances die with it) is
//! killed with SIGKILL. Measured: from the real death to the `node_lost`
//! verdict, and how far each lost server's billed end lies from the real
//! death. Timing uses the control plane's own defaults unless flags say
//! otherwise; the bound the design promises is TTL + grace + one sync
//! interval for detection and one sync interval for the billing error.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_agent::SimConfig;
use berth_core::PortRange;
use clap::Args;
use serde_json::json;

use super::harness::{cores, create_servers, parse_time_ms, round1, start_all_placed, violations, wait_running, wall_ms, ControlProc, FleetSpec, SimFleet};
use super::Report;

#[derive(Args, Clone)]
pub struct DetectionArgs {
    /// Lease TTL in seconds (the control plane's default)
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    lease_ttl: u64,
    /// Lease grace in seconds
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// Seconds between syncs
    #[arg(long, default_value_t = 2)]
    sync_interval: u64,
    /// Servers on the node that dies
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    servers: usize,
    /// Other (surviving) simulated nodes
    #[arg(long, default_value_t = 4)]
    others: usize,
}

/// The victim agent process; killed by pid on drop.
struct AgentProc(std::process::Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(a: DetectionArgs, dir: &Path) -> Result<Report> {
    let (ttl, grace, sync) = (a.lease_ttl.to_string(), a.lease_grace.to_string(), a.sync_interval.max(1).to_string());
    let cp = ControlProc::start(&dir.join("cp"), &["--lease-ttl", &ttl, "--lease-grace", &grace, "--sync-interval", &sync]).await?;
    let client = cp.client();
    let agent_token = cp.agent_token().await?;
    let spec = FleetSpec {
        prefix: "live".into(),
        nodes: a.others,
        node_mib: 16384,
        ports: PortRange { min: 20000, max: 20999 },
        sim: SimConfig { start_latency_ms: (50, 200), ..SimConfig::default() },
        sync_interval: Duration::from_secs(a.sync_interval.max(1)),
    };
    let fleet = SimFleet::start(&cp.url, &agent_token, &spec);
    // The victim is the smallest node, so best fit places every server on it.
    let victim_dir = dir.join("victim");
    std::fs::create_dir_all(&victim_dir)?;
    let log = std::fs::File::create(victim_dir.join("agent.log"))?;
    let victim_mib = (a.servers as u64 * 256 + 512).to_string();
    let mut cmd = Command::new(std::env::current_exe()?);
    super::harness::die_with_parent(&mut cmd);
    let child = cmd
        .args(["agent", "--driver", "sim", "--control-plane", &cp.url, "--name", "victim", "--data-dir"])
        .arg(&victim_dir)
        .args(["--memory-mib", &victim_mib, "--sync-interval", &sync, "--sim-start-ms", "50-200"])
        .env("BERTH_TOKEN", &agent_token)
        .env("RUST_LOG", std::env::var("BERTH_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the victim agent")?;
    let mut victim = AgentProc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim_id = loop {
        let nodes = client.list_nodes().await?.nodes;
        if nodes.len() == a.others + 1 {
            if let Some(n) = nodes.iter().find(|n| n.name == "victim") {
                break n.id.clone();
            }
        }
        if Instant::now() > deadline {
            bail!("the nodes did not all register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids = create_servers(&client, "det", a.servers, 256, Some(0), 8).await?;
    start_all_placed(&cp.url, &cp.token, &ids, 8, "starting").await?;
    wait_running(&client, a.servers as u64, Duration::from_secs(120)).await?;
    for id in &ids {
        let s = client.get_server(id).await?;
        if s.node_id.as_deref() != Some(victim_id.as_str()) {
            bail!("server {} was placed on {:?}, not on the victim node", s.name, s.node_id);
        }
    }
    // Billing runs for a few syncs before the death.
    tokio::time::sleep(Duration::from_secs(2 * a.sync_interval.max(1) + 1)).await;

    eprintln!("kill -9 of the victim agent (pid {})", victim.0.id());
    let died_at = wall_ms();
    let _ = victim.0.kill();
    let _ = victim.0.wait();
    let bound_ms = ((a.lease_ttl + a.lease_grace + a.sync_interval.max(1)) * 1000) as f64;
    let lost_at = loop {
        let events = client.list_events(&format!("kind=node_lost&node={victim_id}")).await?.events;
        if let Some(e) = events.first() {
            break parse_time_ms(&e.at).context("event time")?;
        }
        if wall_ms() - died_at > 3 * bound_ms as i64 + 30_000 {
            bail!("the dead node was not declared lost within {} ms", 3 * bound_ms as i64 + 30_000);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let detection_ms = (lost_at - died_at) as f64;
    // Each lost server's session ends at its last confirmed-alive time.
    let mut errors = Vec::new();
    for id in &ids {
        let costs = client.costs(id).await?;
        let ended = costs.sessions.last().and_then(|s| s.ended_at.as_deref()).and_then(parse_time_ms);
        let Some(ended) = ended else { bail!("server {id} still has an open billing session after its node was lost") };
        errors.push((ended - died_at) as f64);
    }
    let worst = errors.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
    let seen = violations(&client).await?;
    fleet.stop();
    let rows = vec![
        ("lease ttl / grace / sync s".to_string(), format!("{} / {} / {}", a.lease_ttl, a.lease_grace, a.sync_interval)),
        ("death → node lost ms".into(), format!("{detection_ms:.0}")),
        ("bound (ttl + grace + sync) ms".into(), format!("{bound_ms:.0}")),
        ("billed end − death, worst |ms|".into(), format!("{worst:.0}")),
        ("billed end − death, mean ms".into(), format!("{mean:.0}")),
        ("bound (one sync) ms".into(), format!("{}", a.sync_interval * 1000)),
        ("invariant violations".into(), seen.to_string()),
        ("cores".into(), cores().to_string()),
    ];
    let json = json!({
        "scenario": "detection",
        "lease_ttl_s": a.lease_ttl,
        "lease_grace_s": a.lease_grace,
        "sync_interval_s": a.sync_interval,
        "servers": a.servers,
        "detection_ms": detection_ms,
        "detection_bound_ms": bound_ms,
        "billing_error_ms": worst,
        "billing_error_mean_ms": round1(mean),
        "billing_bound_ms": a.sync_interval * 1000,
        "violations": seen,
        "cores": cores(),
    });
    Ok(Report { title: "detection".into(), rows, json })
}
