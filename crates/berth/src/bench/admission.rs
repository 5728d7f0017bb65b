//! The admission scenario: simulated nodes register, servers are created,
//! then every server is started at once from many concurrent clients, each
//! start waiting until its memory is reserved. Measured twice in one run:
//! with group commit (the default) and through the naive path (every write
//! and every placement its own transaction), on fresh control planes with
//! the same fleet, servers and clients.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use berth_agent::SimConfig;
use berth_core::PortRange;
use clap::Args;
use serde_json::json;

use super::harness::{
    cores, create_servers, durable_commits_per_sec, metrics, percentiles, round1, round2, start_all_placed, status_count, violations, wait_running,
    ControlProc, FleetSpec, Percentiles, Sampler, SimFleet,
};
use super::Report;
use crate::cli::MsRange;

#[derive(Args, Clone)]
pub struct AdmissionArgs {
    /// Simulated nodes
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    nodes: usize,
    /// Memory of each node (MiB)
    #[arg(long, default_value_t = 16384, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    node_mib: u64,
    /// Start requests (one per server)
    #[arg(long, default_value_t = 20_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    requests: usize,
    /// Concurrent HTTP clients
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    clients: usize,
    /// Memory of each server (MiB)
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    server_mib: u64,
    /// Skip the naive path
    #[arg(long)]
    no_baseline: bool,
    /// Start the servers in a random order, not in the order they were
    /// created: ids sort by creation time, so creation order keeps each
    /// batch's index entries together and this order scatters them
    #[arg(long)]
    shuffle: bool,
    /// Milliseconds from a simulated instance's start to ready, MIN-MAX
    /// (uniform): when the fleet's confirmations reach the control plane
    #[arg(long, default_value = "200-800")]
    sim_start_ms: MsRange,
}

/// The flags that turn group commit off: one transaction per write and
/// per placement.
pub const NAIVE_FLAGS: &[&str] = &["--group-commit-max", "1", "--commit-max-batch", "1", "--commit-window-ms", "0"];

struct Measured {
    placements_per_sec: f64,
    latency: Percentiles,
    violations: usize,
    samples: usize,
    writes_per_commit: f64,
    /// Agent syncs answered during the burst, per placement.
    syncs_per_placement: f64,
    /// Of the syncs that carried a changed desired set, the share that
    /// carried only the change.
    delta_sync_share: f64,
    writes_per_placement: f64,
    /// Placements that shared one admission transaction, on average.
    placements_per_admission_commit: f64,
    /// Write batches run a second time (a write failed after changing rows).
    reruns: f64,
    wall: Duration,
    /// Control-plane CPU time over the burst, per placement.
    cpu_ms_per_placement: f64,
    /// Share of a core the control plane used with every server running.
    idle_cpu: f64,
    /// Servers already confirmed running when the last start was answered.
    running_at_burst_end: u64,
    /// From the last start answered to every server confirmed running.
    all_running_after: Duration,
    /// Memory drift events from the burst's start until every server ran.
    drift_alarms: f64,
}

async fn measure(a: &AdmissionArgs, dir: &Path, flags: &[&str], label: &str) -> Result<Measured> {
    let cp = ControlProc::start(dir, flags).await?;
    let client = cp.client();
    let agent_token = cp.agent_token().await?;
    let per_node = a.requests.div_ceil(a.nodes.max(1));
    let spec = FleetSpec {
        prefix: "sim".into(),
        nodes: a.nodes,
        node_mib: a.node_mib,
        ports: PortRange { min: 20000, max: 20000 + (per_node as u16).max(1000) },
        sim: SimConfig { start_latency_ms: (a.sim_start_ms.min, a.sim_start_ms.max), ..SimConfig::default() },
        sync_interval: Duration::from_secs(2),
    };
    let fleet = SimFleet::start(&cp.url, &agent_token, &spec);
    fleet.wait_registered(&client, Duration::from_secs(60)).await?;
    let mut ids = create_servers(&client, "adm", a.requests, a.server_mib, None, a.clients).await?;
    if a.shuffle {
        use rand::seq::SliceRandom;
        ids.shuffle(&mut rand::thread_rng());
    }
    let before = metrics(&client).await?;
    let cpu_before = cp.cpu_time();
    let sampler = Sampler::start(cp.client(), Duration::from_secs(2));
    let (latencies, wall) = start_all_placed(&cp.url, &cp.token, &ids, a.clients, &format!("starting ({label})")).await?;
    let cpu_burst = cp.cpu_time().zip(cpu_before).map(|(a, b)| a - b);
    // Servers the fleet confirmed running while the burst lasted: their
    // syncs competed with the starts for the control plane.
    let running_at_burst_end = status_count(&client, "running").await?;
    let (samples, sampled) = sampler.finish().await;
    let after = metrics(&client).await?;
    // A counter's growth since the burst began, up to `now`.
    let grew = |now: &std::collections::BTreeMap<String, f64>, name: &str| now.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0);
    let delta = |name: &str| grew(&after, name);
    let placed = delta("berth_placements_total");
    if placed as usize != a.requests {
        bail!("{label}: {placed} placements committed for {} start requests", a.requests);
    }
    let writes = delta("berth_store_writes_total");
    let commits = delta("berth_store_commits_total");
    let syncs = delta("berth_agent_syncs_total");
    let (with_desired, with_delta) = (delta("berth_agent_syncs_desired_total"), delta("berth_agent_syncs_delta_total"));
    let reruns = delta("berth_store_reruns_total");
    let admission_commits = delta("berth_admission_commits_total");
    let mut seen = sampled + violations(&client).await?;
    // The fleet confirms them running: billing opens, reservations turn
    // active; the checker looks once more with everything settled.
    let settled = wait_running(&client, a.requests as u64, Duration::from_secs(300) + Duration::from_millis(a.sim_start_ms.max)).await?;
    seen += violations(&client).await?;
    // The sim fleet runs nothing beside its instances: any memory drift
    // event is a false alarm.
    let drift_alarms = grew(&metrics(&client).await?, "berth_memory_drift_total");
    // What the fleet costs the control plane when nothing changes: lease
    // renewals of every node.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu = cp.cpu_share(Duration::from_secs(5)).await.unwrap_or(0.0);
    fleet.stop();
    Ok(Measured {
        placements_per_sec: a.requests as f64 / wall.as_secs_f64(),
        latency: percentiles(&latencies),
        violations: seen,
        samples: samples + 2,
        writes_per_commit: if commits > 0.0 { writes / commits } else { 0.0 },
        syncs_per_placement: syncs / a.requests.max(1) as f64,
        delta_sync_share: if with_desired > 0.0 { with_delta / with_desired } else { 0.0 },
        writes_per_placement: writes / a.requests.max(1) as f64,
        placements_per_admission_commit: if admission_commits > 0.0 { placed / admission_commits } else { 0.0 },
        reruns,
        wall,
        cpu_ms_per_placement: cpu_burst.map(|c| c.as_secs_f64() * 1000.0 / a.requests as f64).unwrap_or(0.0),
        idle_cpu,
        running_at_burst_end,
        all_running_after: settled,
        drift_alarms,
    })
}

fn start_order(a: &AdmissionArgs) -> &'static str {
    if a.shuffle {
        "shuffled"
    } else {
        "created"
    }
}

pub async fn run(a: AdmissionArgs, dir: &Path) -> Result<Report> {
    if a.requests as u64 * a.server_mib > a.nodes as u64 * a.node_mib {
        bail!("{} servers of {} MiB do not fit on {} nodes of {} MiB", a.requests, a.server_mib, a.nodes, a.node_mib);
    }
    // The disk first, while nothing else runs: the same run's measure of
    // what group commit can save.
    let probe_dir = dir.join("commit-probe");
    let durable_commits = tokio::task::spawn_blocking(move || durable_commits_per_sec(&probe_dir)).await??;
    let grouped = measure(&a, &dir.join("group-commit"), &[], "group commit").await?;
    let naive = if a.no_baseline { None } else { Some(measure(&a, &dir.join("naive"), NAIVE_FLAGS, "naive").await?) };
    let ratio = naive.as_ref().map(|n| grouped.placements_per_sec / n.placements_per_sec);
    let mut rows = vec![
        ("nodes × MiB".to_string(), format!("{} × {}", a.nodes, a.node_mib)),
        ("start requests / clients".into(), format!("{} / {}", a.requests, a.clients)),
        ("sim start to ready ms".into(), a.sim_start_ms.to_string()),
        ("start order".into(), start_order(&a).into()),
        ("durable single-row commits/s on this disk".into(), format!("{durable_commits:.0}")),
        ("placements/s (group commit)".into(), format!("{:.0}", grouped.placements_per_sec)),
        ("admission p50 / p99 / max ms".into(), format!("{:.1} / {:.1} / {:.1}", grouped.latency.p50, grouped.latency.p99, grouped.latency.max)),
        ("writes per commit".into(), format!("{:.1}", grouped.writes_per_commit)),
        ("placements per admission commit".into(), format!("{:.1}", grouped.placements_per_admission_commit)),
        ("store writes / agent syncs per placement".into(), format!("{:.2} / {:.2}", grouped.writes_per_placement, grouped.syncs_per_placement)),
        ("changed-set syncs carrying only the change".into(), format!("{:.0} %", grouped.delta_sync_share * 100.0)),
        ("write batches run again".into(), format!("{:.0}", grouped.reruns)),
        ("burst wall time s".into(), format!("{:.2}", grouped.wall.as_secs_f64())),
        ("confirmed running by the burst's end".into(), format!("{} of {}", grouped.running_at_burst_end, a.requests)),
        ("all running after the burst s".into(), format!("{:.2}", grouped.all_running_after.as_secs_f64())),
        ("memory drift events (none is real on sim)".into(), format!("{:.0}", grouped.drift_alarms)),
        ("control-plane CPU ms per placement".into(), format!("{:.2}", grouped.cpu_ms_per_placement)),
        ("control-plane CPU, all running and idle".into(), format!("{:.0} % of a core", grouped.idle_cpu * 100.0)),
    ];
    if let (Some(n), Some(r)) = (&naive, ratio) {
        rows.push(("placements/s (naive)".into(), format!("{:.0}", n.placements_per_sec)));
        rows.push(("naive p50 / p99 / max ms".into(), format!("{:.1} / {:.1} / {:.1}", n.latency.p50, n.latency.p99, n.latency.max)));
        rows.push(("naive writes / placements per commit".into(), format!("{:.1} / {:.1}", n.writes_per_commit, n.placements_per_admission_commit)));
        rows.push(("speedup over naive".into(), format!("{r:.2}×")));
    }
    let violations = grouped.violations + naive.as_ref().map(|n| n.violations).unwrap_or(0);
    let samples = grouped.samples + naive.as_ref().map(|n| n.samples).unwrap_or(0);
    rows.push(("invariant violations (samples)".into(), format!("{violations} ({samples})")));
    rows.push(("cores".into(), cores().to_string()));
    let json = json!({
        "scenario": "admission",
        "nodes": a.nodes,
        "node_mib": a.node_mib,
        "requests": a.requests,
        "clients": a.clients,
        "server_mib": a.server_mib,
        "sim_start_ms": [a.sim_start_ms.min, a.sim_start_ms.max],
        "start_order": start_order(&a),
        "durable_commits_per_sec": round1(durable_commits),
        "placements_per_sec": round1(grouped.placements_per_sec),
        "baseline_placements_per_sec": naive.as_ref().map(|n| round1(n.placements_per_sec)),
        "speedup": ratio.map(round2),
        "p50_ms": round1(grouped.latency.p50),
        "p99_ms": round1(grouped.latency.p99),
        "max_ms": round1(grouped.latency.max),
        "baseline_p99_ms": naive.as_ref().map(|n| round1(n.latency.p99)),
        "writes_per_commit": round1(grouped.writes_per_commit),
        "placements_per_admission_commit": round1(grouped.placements_per_admission_commit),
        "baseline_writes_per_commit": naive.as_ref().map(|n| round2(n.writes_per_commit)),
        "baseline_placements_per_admission_commit": naive.as_ref().map(|n| round2(n.placements_per_admission_commit)),
        "writes_per_placement": round2(grouped.writes_per_placement),
        "syncs_per_placement": round2(grouped.syncs_per_placement),
        "delta_sync_share": round2(grouped.delta_sync_share),
        "batch_reruns": grouped.reruns,
        "cpu_ms_per_placement": round2(grouped.cpu_ms_per_placement),
        "idle_cpu_share": round2(grouped.idle_cpu),
        "burst_ms": round1(grouped.wall.as_secs_f64() * 1000.0),
        "running_at_burst_end": grouped.running_at_burst_end,
        "all_running_after_ms": round1(grouped.all_running_after.as_secs_f64() * 1000.0),
        "memory_drift_events": grouped.drift_alarms + naive.as_ref().map(|n| n.drift_alarms).unwrap_or(0.0),
        "violations": violations,
        "invariant_samples": samples,
        "cores": cores(),
    });
    Ok(Report { title: "admission".into(), rows, json })
}
