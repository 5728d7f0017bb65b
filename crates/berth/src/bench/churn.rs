//! The churn scenario: starts and stops at a fixed rate for a fixed time,
//! on simulated nodes that keep running and stopping instances. Open loop:
//! each request is sent at its scheduled time whether or not earlier ones
//! have answered, and its latency counts from that time, so a slow control
//! plane cannot hide its queue. A start's latency runs until its memory is
//! reserved; a stop's until it is admitted. Every start is of a server
//! that never ran and every stop of a server that runs, so no request waits
//! behind another one on the same server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use berth_agent::SimConfig;
use berth_client::Client;
use berth_core::PortRange;
use clap::Args;
use serde_json::json;
use tokio::sync::Semaphore;

use super::harness::{
    cores, create_servers, percentiles, round1, start_all_placed, status_count, violations, wait_running, with_retries, ControlProc, FleetSpec, Sampler,
    SimFleet,
};
use super::Report;

#[derive(Args, Clone)]
pub struct ChurnArgs {
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    nodes: usize,
    #[arg(long, default_value_t = 16384, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    node_mib: u64,
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    server_mib: u64,
    /// Operations per second, half starts and half stops
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of churn
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
}

pub async fn run(a: ChurnArgs, dir: &Path) -> Result<Report> {
    let ops = (a.rate * a.duration_s) as usize;
    let (starts, stops) = (ops.div_ceil(2), ops / 2);
    if ops == 0 {
        bail!("--rate and --duration-s must be positive");
    }
    if (starts + stops) as u64 * a.server_mib > a.nodes as u64 * a.node_mib {
        bail!("{} servers of {} MiB do not fit on {} nodes of {} MiB", starts + stops, a.server_mib, a.nodes, a.node_mib);
    }
    let cp = ControlProc::start(&dir.join("cp"), &[]).await?;
    let client = cp.client();
    let agent_token = cp.agent_token().await?;
    let per_node = (starts + stops).div_ceil(a.nodes.max(1));
    let spec = FleetSpec {
        prefix: "sim".into(),
        nodes: a.nodes,
        node_mib: a.node_mib,
        ports: PortRange { min: 20000, max: 20000 + (per_node as u16).max(1000) },
        sim: SimConfig::default(),
        sync_interval: Duration::from_secs(2),
    };
    let fleet = SimFleet::start(&cp.url, &agent_token, &spec);
    fleet.wait_registered(&client, Duration::from_secs(60)).await?;
    let running = create_servers(&client, "run", stops, a.server_mib, None, 200).await?;
    start_all_placed(&cp.url, &cp.token, &running, 200, "starting the servers to stop").await?;
    wait_running(&client, stops as u64, Duration::from_secs(600)).await?;
    let fresh = create_servers(&client, "new", starts, a.server_mib, None, 200).await?;

    eprintln!("churn: {} operations per second for {} s", a.rate, a.duration_s);
    let sampler = Sampler::start(cp.client(), Duration::from_secs(1));
    // Bounded, so an overwhelmed control plane cannot make the bench
    // itself run out of memory; a request waiting for a slot is still
    // timed from its schedule.
    let slots = Arc::new(Semaphore::new(2000));
    let http = Client::with_timeout(&cp.url, &cp.token, Duration::from_secs(120));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..ops {
        let due = t0 + Duration::from_secs_f64(k as f64 / a.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (http, slots) = (http.clone(), slots.clone());
        let (is_start, id) = if k % 2 == 0 { (true, fresh[k / 2].clone()) } else { (false, running[k / 2].clone()) };
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore open");
            let ok = if is_start {
                with_retries(|| http.start_server_wait_placed(&id, 60)).await.map(|s| s.status.holds_reservation())
            } else {
                with_retries(|| http.stop_server(&id)).await.map(|_| true)
            };
            (is_start, matches!(ok, Ok(true)), due.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let (mut start_ms, mut stop_ms, mut errors) = (Vec::new(), Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (is_start, ok, ms) = done?;
        if !ok {
            errors += 1;
        }
        if is_start {
            start_ms.push(ms);
        } else {
            stop_ms.push(ms);
        }
    }
    let elapsed = t0.elapsed();
    let (samples, sampled) = sampler.finish().await;
    // Settled: the new servers run and the stopped ones are stopped.
    wait_running(&client, starts as u64, Duration::from_secs(300)).await?;
    let settle = Instant::now();
    let stopped = loop {
        let n = status_count(&client, "stopped").await?;
        if n >= stops as u64 || settle.elapsed() > Duration::from_secs(120) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut seen = sampled + violations(&client).await?;
    let running_now = status_count(&client, "running").await?;
    if running_now != starts as u64 || stopped != stops as u64 {
        eprintln!("after churn: {running_now} running (expected {starts}), {stopped} stopped (expected {stops})");
        seen += 1;
    }
    fleet.stop();
    let all: Vec<f64> = start_ms.iter().chain(&stop_ms).copied().collect();
    let (p, ps, pt) = (percentiles(&all), percentiles(&start_ms), percentiles(&stop_ms));
    let achieved = ops as f64 / elapsed.as_secs_f64();
    let rows = vec![
        ("nodes".to_string(), a.nodes.to_string()),
        ("operations (rate × s)".into(), format!("{ops} ({} × {})", a.rate, a.duration_s)),
        ("achieved operations/s".into(), format!("{achieved:.1}")),
        ("all p50 / p99 / max ms".into(), format!("{:.1} / {:.1} / {:.1}", p.p50, p.p99, p.max)),
        ("start → placed p50 / p99 ms".into(), format!("{:.1} / {:.1}", ps.p50, ps.p99)),
        ("stop admitted p50 / p99 ms".into(), format!("{:.1} / {:.1}", pt.p50, pt.p99)),
        ("failed requests".into(), errors.to_string()),
        ("invariant violations (samples)".into(), format!("{seen} ({})", samples + 1)),
        ("cores".into(), cores().to_string()),
    ];
    let json = json!({
        "scenario": "churn",
        "nodes": a.nodes,
        "rate": a.rate,
        "duration_s": a.duration_s,
        "operations": ops,
        "achieved_rate": round1(achieved),
        "p50_ms": round1(p.p50),
        "p99_ms": round1(p.p99),
        "max_ms": round1(p.max),
        "start_p99_ms": round1(ps.p99),
        "stop_p99_ms": round1(pt.p99),
        "errors": errors,
        "violations": seen,
        "invariant_samples": samples + 1,
        "cores": cores(),
    });
    Ok(Report { title: "churn".into(), rows, json })
}
