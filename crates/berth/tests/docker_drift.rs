//! Acceptance D of the docker issue: a memory hog outside berth on the
//! node. `used_mib` rises, a `memory_drift` event appears and `berth node
//! list` shows it, and a start that fits the node's reservations but not
//! its real memory is refused by the agent's preflight (transient, back to
//! the queue, nothing runs), then starts once the hog is gone.
//!
//! The node is declared almost as large as the host's available memory, so
//! the hog is modest (6 GiB of 24) yet decisive; the figures leave about
//! 2-3 GiB of slack for other work on the machine. This test is alone in
//! its file so no other test of this binary allocates beside it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_testkit::{
    docker_available, ensure_images, node_containers, require_or_skip, spawn, start_control, unique_node_name, wait_until, Api, ContainerReaper,
};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

fn host_available_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = text.lines().find(|l| l.starts_with("MemAvailable:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

const HOG_MIB: u64 = 6144;

#[test]
fn a_memory_hog_outside_berth_shows_as_drift_and_a_start_that_fits_only_on_paper_is_refused() {
    if !require_or_skip(docker_available(), "a docker engine (docker version)") {
        return;
    }
    ensure_images(&bin(), &["fakegame"]);
    let tmp = tempfile::tempdir().unwrap();
    let node = unique_node_name("drift");
    let mut reaper = ContainerReaper::default();
    reaper.watch(&node);

    let available = host_available_mib();
    assert!(available > HOG_MIB + 6144, "the host needs {} MiB available for this test, has {available}", HOG_MIB + 6144);
    // The system reserve is what the host uses now plus 1 GiB, so only a
    // growth of more than reserve + margin outside berth is drift.
    let allocatable = available - 1024;
    let data = tmp.path().join("d");
    let (_dev, url, token) = start_control(
        &bin(),
        "dev",
        &data,
        &[
            "--driver",
            "docker",
            "--node-name",
            &node,
            "--sync-interval",
            "1",
            "--ports",
            "26700-26749",
            "--memory-mib",
            &allocatable.to_string(),
            "--drift-margin-mib",
            "1024",
            "--retry-base-ms",
            "1500",
        ],
    );
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    let used_before = wait_until(Duration::from_secs(10), "host stats", || api.nodes()[0]["memory"]["used_mib"].as_u64().filter(|u| *u > 0));

    // The hog: a process berth does not manage, killed by pid when dropped.
    let hog_dir = tmp.path().join("hog");
    std::fs::create_dir_all(&hog_dir).unwrap();
    let hog_args: Vec<String> = ["fakegame", "--port", "26799", "--data-dir", &hog_dir.display().to_string(), "--alloc-mib", &HOG_MIB.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut hog = spawn(&bin(), &hog_args, &tmp.path().join("hog.log"), &[]);
    let t0 = Instant::now();
    let used = wait_until(Duration::from_secs(60), "used_mib to rise with the hog", || {
        api.nodes()[0]["memory"]["used_mib"].as_u64().filter(|u| *u >= used_before + HOG_MIB - 1024)
    });
    eprintln!("used_mib {used_before} -> {used} after {:?}", t0.elapsed());

    let ev = wait_until(Duration::from_secs(20), "a memory_drift event", || {
        let (_, v) = api.call("GET", "/v1/events?kind=memory_drift", None);
        v["events"].as_array().and_then(|a| a.first().cloned())
    });
    eprintln!("drift event after {:?}: {}", t0.elapsed(), ev["message"]);
    let node_id = api.nodes()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(ev["node_id"], node_id.as_str());
    assert!(ev["message"].as_str().unwrap().contains("processes berth does not manage use"), "{ev}");
    assert_eq!(api.metric("berth_node_memory_drift{"), 1.0, "drift is exposed in /metrics");
    assert!(api.metric("berth_memory_drift_total") >= 1.0);
    let drift = &api.nodes()[0]["memory_drift"];
    assert!(drift["unmanaged_excess_mib"].as_u64().unwrap() > 1024, "{drift}");
    let out = Command::new(bin()).args(["node", "list", "--addr", &url, "--token", &token]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("MEMORY_DRIFT") && table.contains("outside berth"), "{table}");

    // Fits on paper (nothing else is reserved), not in reality.
    let request = available - 3072;
    assert!(request <= allocatable);
    api.create_server("big", "fakegame", request, json!({}));
    api.ok("POST", "/v1/servers/big/start", None);
    let s = wait_until(Duration::from_secs(30), "the preflight to refuse the start", || {
        let s = api.server("big");
        (s["attempts"] == 1).then_some(s)
    });
    assert_eq!(s["status"], "queued", "a transient refusal goes back to the queue: {s}");
    let err = s["last_error"].as_str().unwrap();
    assert!(err.starts_with("preflight: host has") && err.contains("available"), "{err}");
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 0, "the reservation was released");
    assert!(node_containers(&node).is_empty(), "no container was created for it");

    // Without the hog the same start fits in reality too.
    hog.kill9();
    let s = wait_until(Duration::from_secs(60), "big running once the hog is gone", || {
        let s = api.server("big");
        (s["status"] == "running").then_some(s)
    });
    assert_eq!(s["attempts"], 0);
    assert_eq!(node_containers(&node).len(), 1);
    wait_until(Duration::from_secs(20), "the drift to clear", || {
        let (_, v) = api.call("GET", "/v1/events?kind=memory_drift_cleared", None);
        (v["events"].as_array().map(|a| a.len()) == Some(1)).then_some(())
    });
    assert!(api.nodes()[0]["memory_drift"].is_null());
    assert_eq!(api.metric("berth_node_memory_drift{"), 0.0);
    assert!(api.violations().is_empty());
}
