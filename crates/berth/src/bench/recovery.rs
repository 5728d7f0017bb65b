//! The recovery scenario: thousands of servers run on simulated nodes; the
//! control plane is killed with SIGKILL and started again on the same data
//! dir. Measured: from the restart until the first answer that shows the
//! right reserved memory on every node (reservations are rows, so nothing
//! is rebuilt), and until every agent has synced with the new process.
//! Nothing may have crashed, been stopped or been placed twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use berth_agent::SimConfig;
use berth_client::Client;
use berth_core::PortRange;
use clap::Args;
use serde_json::json;

use super::harness::{
    cores, create_servers, parse_time_ms, round1, start_all_placed, status_count, violations, wait_running, wall_ms, ControlProc, FleetSpec, SimFleet,
};
use super::Report;

#[derive(Args, Clone)]
pub struct RecoveryArgs {
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    nodes: usize,
    #[arg(long, default_value_t = 16384, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    node_mib: u64,
    /// Running servers when the control plane is killed
    #[arg(long, default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    servers: usize,
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    server_mib: u64,
    /// Seconds between agent syncs
    #[arg(long, default_value_t = 2)]
    sync_interval: u64,
}

/// Reserved MiB per node name, as the API shows it.
async fn reserved(client: &Client) -> Result<BTreeMap<String, u64>> {
    Ok(client.list_nodes().await?.nodes.into_iter().map(|n| (n.name, n.memory.reserved_mib)).collect())
}

pub async fn run(a: RecoveryArgs, dir: &Path) -> Result<Report> {
    let sync = a.sync_interval.max(1).to_string();
    let mut cp = ControlProc::start(&dir.join("cp"), &["--sync-interval", &sync]).await?;
    let client = cp.client();
    let agent_token = cp.agent_token().await?;
    let per_node = a.servers.div_ceil(a.nodes.max(1));
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
    let ids = create_servers(&client, "rec", a.servers, a.server_mib, None, 200).await?;
    start_all_placed(&cp.url, &cp.token, &ids, 200, "starting").await?;
    wait_running(&client, a.servers as u64, Duration::from_secs(600)).await?;
    // Let every node sync at least once with everything running.
    tokio::time::sleep(Duration::from_secs(a.sync_interval.max(1) + 1)).await;
    let expected = reserved(&client).await?;
    let total: u64 = expected.values().sum();
    if total != a.servers as u64 * a.server_mib {
        bail!("before the kill {total} MiB are reserved, expected {}", a.servers as u64 * a.server_mib);
    }
    let live_before = fleet.live_instances();

    eprintln!("kill -9 of the control plane (pid {:?})", cp.pid());
    let killed_at = Instant::now();
    cp.kill9();
    let restarted = cp.respawn()?;
    let restarted_wall = wall_ms();
    // Poll as fast as answers come: the first right one ends the clock.
    let probe = Client::with_timeout(&cp.url, &cp.token, Duration::from_millis(2000));
    let (recovery, first_answer) = loop {
        if let Ok(now) = reserved(&probe).await {
            let first = restarted.elapsed();
            if now == expected {
                break (restarted.elapsed(), first);
            }
        }
        if restarted.elapsed() > Duration::from_secs(60) {
            bail!("no answer with the reservations of before the kill within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // Every agent has synced with the new process once its node's last
    // sync is later than the restart.
    let resync = loop {
        let nodes = probe.list_nodes().await.map(|l| l.nodes).unwrap_or_default();
        let synced = nodes.iter().filter(|n| n.last_sync_at.as_deref().and_then(parse_time_ms).is_some_and(|t| t >= restarted_wall)).count();
        if synced >= fleet.len() {
            break restarted.elapsed();
        }
        if restarted.elapsed() > Duration::from_secs(120) {
            bail!("only {synced} of {} nodes re-synced within 120 s", fleet.len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Nothing was lost or doubled: the same servers run, the same
    // instances live, the checker is clean, after a few more syncs.
    tokio::time::sleep(Duration::from_secs(2 * a.sync_interval.max(1))).await;
    let running = status_count(&client, "running").await?;
    let crashed = status_count(&client, "crashed").await?;
    let live_after = fleet.live_instances();
    let after = reserved(&client).await?;
    let mut seen = violations(&client).await?;
    if running != a.servers as u64 || after != expected || live_after != live_before {
        seen += 1;
        eprintln!(
            "after the restart: {running} running, {crashed} crashed, {live_after} instances (before {live_before}), reservations equal: {}",
            after == expected
        );
    }
    fleet.stop();
    let ms = |d: Duration| round1(d.as_secs_f64() * 1000.0);
    let rows = vec![
        ("nodes / running servers".to_string(), format!("{} / {}", a.nodes, a.servers)),
        ("restart → correct reservations ms".into(), format!("{}", ms(recovery))),
        ("restart → first answer ms".into(), format!("{}", ms(first_answer))),
        ("kill → correct reservations ms".into(), format!("{}", ms(recovery + restarted.duration_since(killed_at)))),
        ("restart → all agents re-synced ms".into(), format!("{}", ms(resync))),
        ("running after / crashed after".into(), format!("{running} / {crashed}")),
        ("invariant violations".into(), seen.to_string()),
        ("cores".into(), cores().to_string()),
    ];
    let json = json!({
        "scenario": "recovery",
        "nodes": a.nodes,
        "servers": a.servers,
        "recovery_ms": ms(recovery),
        "first_answer_ms": ms(first_answer),
        "resync_ms": ms(resync),
        "running_after": running,
        "crashed_after": crashed,
        "violations": seen,
        "cores": cores(),
    });
    Ok(Report { title: "recovery".into(), rows, json })
}
