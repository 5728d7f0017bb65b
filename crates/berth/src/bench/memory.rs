//! The memory scenario: the control plane's resident memory with 10,000
//! and then 100,000 running servers on simulated nodes that keep syncing.
//! Resident memory is sampled for a few seconds at each step once every
//! server runs, and the largest sample is reported, with the process's
//! peak (which includes the bursts of creating and starting them).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_agent::SimConfig;
use berth_core::PortRange;
use clap::Args;
use serde_json::json;

use super::harness::{cores, create_servers, start_all_placed, violations, wait_running, ControlProc, FleetSpec, SimFleet};
use super::Report;

#[derive(Args, Clone)]
pub struct MemoryArgs {
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    nodes: usize,
    #[arg(long, default_value_t = 32768, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    node_mib: u64,
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    server_mib: u64,
    /// Server counts to measure at, ascending, comma-separated
    #[arg(long, default_value = "10000,100000")]
    steps: String,
    /// Seconds between agent syncs
    #[arg(long, default_value_t = 2)]
    sync_interval: u64,
}

struct Step {
    servers: usize,
    rss_kib: u64,
    peak_kib: u64,
}

pub async fn run(a: MemoryArgs, dir: &Path) -> Result<Report> {
    let steps: Vec<usize> =
        a.steps.split(',').map(|s| s.trim().parse::<usize>()).collect::<Result<_, _>>().context("--steps wants counts like 10000,100000")?;
    if steps.is_empty() || steps[0] == 0 || steps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--steps must be ascending server counts, the first at least 1");
    }
    let last = *steps.last().expect("not empty");
    if last as u64 * a.server_mib > a.nodes as u64 * a.node_mib {
        bail!("{last} servers of {} MiB do not fit on {} nodes of {} MiB", a.server_mib, a.nodes, a.node_mib);
    }
    let sync = a.sync_interval.max(1).to_string();
    let cp = ControlProc::start(&dir.join("cp"), &["--sync-interval", &sync]).await?;
    let client = cp.client();
    let agent_token = cp.agent_token().await?;
    let per_node = last.div_ceil(a.nodes.max(1));
    let spec = FleetSpec {
        prefix: "sim".into(),
        nodes: a.nodes,
        node_mib: a.node_mib,
        ports: PortRange { min: 20000, max: 20000 + (per_node as u16).max(1000) },
        sim: SimConfig { start_latency_ms: (50, 200), ..SimConfig::default() },
        sync_interval: Duration::from_secs(a.sync_interval.max(1)),
    };
    let fleet = SimFleet::start(&cp.url, &agent_token, &spec);
    fleet.wait_registered(&client, Duration::from_secs(60)).await?;
    let baseline = cp.memory_kib().context("cannot read the control plane's memory")?;
    let mut measured = Vec::new();
    let mut have = 0;
    for (n, &target) in steps.iter().enumerate() {
        let ids = create_servers(&client, &format!("m{n}-"), target - have, a.server_mib, None, 200).await?;
        start_all_placed(&cp.url, &cp.token, &ids, 200, &format!("starting up to {target}")).await?;
        wait_running(&client, target as u64, Duration::from_secs(900)).await?;
        have = target;
        // Steady state: every node has synced its full set a few times.
        tokio::time::sleep(Duration::from_secs(2 * a.sync_interval.max(1))).await;
        let sampling = Instant::now();
        let mut rss = 0;
        let mut peak = 0;
        while sampling.elapsed() < Duration::from_secs(2 * a.sync_interval.max(1)) {
            let (r, p) = cp.memory_kib().context("cannot read the control plane's memory")?;
            rss = rss.max(r);
            peak = peak.max(p);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{target} servers: resident {} MiB, peak {} MiB", rss / 1024, peak / 1024);
        measured.push(Step { servers: target, rss_kib: rss, peak_kib: peak });
    }
    let seen = violations(&client).await?;
    fleet.stop();
    let top = measured.last().expect("at least one step");
    let bytes_per_server = top.rss_kib as f64 * 1024.0 / top.servers as f64;
    let marginal = match measured.first() {
        Some(first) if measured.len() > 1 => Some((top.rss_kib as f64 - first.rss_kib as f64) * 1024.0 / (top.servers - first.servers) as f64),
        _ => None,
    };
    let mut rows = vec![("nodes".to_string(), a.nodes.to_string()), ("resident before servers MiB".into(), (baseline.0 / 1024).to_string())];
    for s in &measured {
        rows.push((format!("resident / peak MiB at {}", s.servers), format!("{} / {}", s.rss_kib / 1024, s.peak_kib / 1024)));
    }
    rows.push((format!("bytes per server at {}", top.servers), format!("{bytes_per_server:.0}")));
    if let Some(m) = marginal {
        rows.push(("bytes per added server".into(), format!("{m:.0}")));
    }
    rows.push(("invariant violations".into(), seen.to_string()));
    rows.push(("cores".into(), cores().to_string()));
    let json = json!({
        "scenario": "memory",
        "nodes": a.nodes,
        "steps": measured.iter().map(|s| json!({"servers": s.servers, "rss_bytes": s.rss_kib * 1024, "peak_bytes": s.peak_kib * 1024})).collect::<Vec<_>>(),
        "rss_bytes_10k": measured.iter().find(|s| s.servers == 10_000).map(|s| s.rss_kib * 1024),
        "rss_bytes_100k": measured.iter().find(|s| s.servers == 100_000).map(|s| s.rss_kib * 1024),
        "bytes_per_server": bytes_per_server.round(),
        "marginal_bytes_per_server": marginal.map(|m| m.round()),
        "violations": seen,
        "cores": cores(),
    });
    Ok(Report { title: "memory".into(), rows, json })
}
