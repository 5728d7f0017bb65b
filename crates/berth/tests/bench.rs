//! `berth bench` end to end at a small scale: every scenario runs against
//! a real control plane (child process, SQLite) and simulated nodes, prints
//! its table and one JSON object as its last line, and finds no invariant
//! violation. The figures themselves are measured at full scale in
//! BENCHMARKS.md; here they are checked only against what must hold at any
//! scale (nothing lost, bounds of the design).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

/// Runs `berth bench ARGS --json` to completion (bounded) and returns its
/// last line, parsed.
fn bench(args: &[&str]) -> Value {
    let started = Instant::now();
    let mut child =
        Command::new(bin()).arg("bench").args(args).arg("--json").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).spawn().unwrap();
    let pid = child.id();
    let deadline = Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > deadline {
            // Its own children die with it (PR_SET_PDEATHSIG).
            let _ = child.kill();
            panic!("berth bench {args:?} (pid {pid}) ran longer than {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "berth bench {args:?} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().count() > 3, "a table comes first: {text}");
    let last = text.lines().last().unwrap();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is not JSON ({e}): {last}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn every_scenario_runs_and_finds_no_violation() {
    // Instances ready 4 s after their start: the 200 starts (well under a
    // second) are all answered before the fleet confirms one.
    let a = bench(&[
        "admission",
        "--nodes",
        "4",
        "--node-mib",
        "4096",
        "--requests",
        "200",
        "--clients",
        "20",
        "--server-mib",
        "64",
        "--sim-start-ms",
        "4000-4000",
    ]);
    assert_eq!(a["scenario"], "admission");
    assert_eq!(a["sim_start_ms"], serde_json::json!([4000, 4000]), "{a}");
    // The fleet used the start latency it was given: the first start was
    // sent at the burst's beginning and nothing ran 4 s before it.
    assert!(num(&a, "burst_ms") + num(&a, "all_running_after_ms") >= 4000.0, "{a}");
    if num(&a, "burst_ms") < 4000.0 {
        assert_eq!(num(&a, "running_at_burst_end"), 0.0, "none was ready before the burst ended: {a}");
    }
    // 50 instances a node go ready together, 4 s in: the host and the
    // instances' reports must be read together, or the jump looks like
    // memory used outside berth.
    assert_eq!(num(&a, "memory_drift_events"), 0.0, "{a}");
    assert_eq!(num(&a, "violations"), 0.0, "{a}");
    assert!(num(&a, "invariant_samples") >= 2.0, "{a}");
    assert!(num(&a, "placements_per_sec") > 0.0 && num(&a, "baseline_placements_per_sec") > 0.0, "{a}");
    assert!(num(&a, "p50_ms") <= num(&a, "p99_ms") && num(&a, "p99_ms") <= num(&a, "max_ms"), "{a}");
    assert!(num(&a, "writes_per_commit") >= 1.0, "{a}");
    // The disk's own durable commit rate, measured in the same run.
    assert!(num(&a, "durable_commits_per_sec") > 0.0, "{a}");
    // The baseline is the naive path the issue names: every write its own
    // transaction, every placement its own admission transaction.
    assert_eq!(num(&a, "baseline_writes_per_commit"), 1.0, "{a}");
    let naive_share = num(&a, "baseline_placements_per_admission_commit");
    assert!(naive_share > 0.5 && naive_share <= 1.0, "{a}");
    // 50 servers a node arrive over many syncs: after each node's first
    // set, the real agents hold a set the control plane sent, so changes
    // come as deltas.
    assert!(num(&a, "delta_sync_share") > 0.5, "{a}");

    let r = bench(&["recovery", "--nodes", "4", "--servers", "100", "--sync-interval", "1"]);
    assert_eq!(num(&r, "violations"), 0.0, "{r}");
    assert_eq!((num(&r, "running_after"), num(&r, "crashed_after")), (100.0, 0.0), "nothing lost across kill -9: {r}");
    assert!(num(&r, "recovery_ms") <= num(&r, "resync_ms"), "{r}");

    // Short leases: the design's bounds hold at any setting.
    let d = bench(&["detection", "--lease-ttl", "2", "--lease-grace", "1", "--sync-interval", "1", "--servers", "4", "--others", "1"]);
    assert_eq!(num(&d, "violations"), 0.0, "{d}");
    assert!(num(&d, "detection_ms") <= num(&d, "detection_bound_ms"), "lost within ttl + grace + one sync: {d}");
    // Lost no sooner than ttl + grace after the last renewal, which came at
    // most one sync interval before the death.
    assert!(num(&d, "detection_ms") >= 2000.0, "not before ttl + grace - one sync: {d}");
    // A billed end is the last renewal before the death, at most one
    // long-poll earlier (a third of the lease TTL here, under one sync
    // interval). A TTL under two sync intervals once made the agent fence
    // its own instances and end their billing seconds early.
    assert!(num(&d, "billing_error_ms") <= num(&d, "billing_bound_ms"), "{d}");

    let c = bench(&["churn", "--nodes", "4", "--node-mib", "4096", "--server-mib", "64", "--rate", "20", "--duration-s", "5"]);
    assert_eq!((num(&c, "violations"), num(&c, "errors")), (0.0, 0.0), "{c}");
    assert_eq!(num(&c, "operations"), 100.0);

    let m = bench(&["memory", "--nodes", "4", "--node-mib", "8192", "--steps", "100,400", "--sync-interval", "1"]);
    assert_eq!(num(&m, "violations"), 0.0, "{m}");
    assert!(num(&m, "bytes_per_server") > 0.0, "{m}");
}
