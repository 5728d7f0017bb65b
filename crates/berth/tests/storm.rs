//! Acceptance C: a storm of concurrent starts across three agents (separate
//! processes) never over-commits and never answers 5xx.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_testkit::{agent_args, pid_alive, pid_records, spawn, start_control, wait_until, Api, InstanceReaper, Proc};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

#[test]
fn storm_of_200_starts_on_three_4096_nodes_runs_exactly_48() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reaper = InstanceReaper::default();
    let (_cp, url, token) = start_control(&bin(), "control-plane", &tmp.path().join("cp"), &["--sync-interval", "1"]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let mut agents: Vec<Proc> = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("agent{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        reaper.watch(&dir);
        let ports = format!("{}-{}", 22000 + i * 100, 22099 + i * 100);
        let args = agent_args(&url, &agent_token, &format!("n{i}"), &dir, 4096, &ports, 1, &[]);
        agents.push(spawn(&bin(), &args, &tmp.path().join(format!("agent{i}.log")), &[]));
    }
    wait_until(Duration::from_secs(20), "three nodes", || (api.nodes().len() == 3).then_some(()));

    // Create 200 servers, then start them from 50 concurrent clients while
    // a sampler checks the nodes and the invariant checker throughout.
    let server_5xx = Arc::new(AtomicUsize::new(0));
    let ids: Vec<String> = (0..200).map(|i| api.create_server(&format!("s{i:03}"), "fakegame", 256, json!({}))["id"].as_str().unwrap().to_string()).collect();
    let done = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (api, done, samples, server_5xx) = (api.clone(), done.clone(), samples.clone(), server_5xx.clone());
        std::thread::spawn(move || {
            let mut worst = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let (s, nodes) = api.call("GET", "/v1/nodes", None);
                if s >= 500 {
                    server_5xx.fetch_add(1, Ordering::SeqCst);
                }
                for n in nodes["nodes"].as_array().into_iter().flatten() {
                    let (r, a) = (n["memory"]["reserved_mib"].as_u64().unwrap(), n["memory"]["allocatable_mib"].as_u64().unwrap());
                    if r > a {
                        worst.push(format!("{}: {r} > {a}", n["name"]));
                    }
                }
                let (s, inv) = api.call("GET", "/v1/invariants", None);
                if s >= 500 {
                    server_5xx.fetch_add(1, Ordering::SeqCst);
                }
                if inv["violations"].as_array().is_some_and(|v| !v.is_empty()) {
                    worst.push(inv.to_string());
                }
                samples.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            worst
        })
    };
    let clients: Vec<_> = ids
        .chunks(4)
        .map(|chunk| {
            let (api, chunk, server_5xx) = (api.clone(), chunk.to_vec(), server_5xx.clone());
            std::thread::spawn(move || {
                for id in chunk {
                    let (s, v) = api.call("POST", &format!("/v1/servers/{id}/start"), None);
                    if s >= 500 {
                        server_5xx.fetch_add(1, Ordering::SeqCst);
                    }
                    assert_eq!(s, 202, "{v}");
                }
            })
        })
        .collect();
    assert_eq!(clients.len(), 50);
    for c in clients {
        c.join().unwrap();
    }
    let counts = wait_until(Duration::from_secs(90), "48 running and 152 queued", || {
        let c = api.status_counts();
        (c.get("running") == Some(&48) && c.get("queued") == Some(&152)).then_some(c)
    });
    // Let a few more sync rounds pass: the count must be stable, not a
    // moment on the way to over-commit.
    std::thread::sleep(Duration::from_millis(2500));
    done.store(true, Ordering::SeqCst);
    let over = sampler.join().unwrap();
    assert!(over.is_empty(), "over-commit or violations sampled: {over:?}");
    assert!(samples.load(Ordering::SeqCst) > 10, "the sampler ran");
    assert_eq!(api.status_counts(), counts);
    assert_eq!(server_5xx.load(Ordering::SeqCst), 0, "no 5xx");
    for n in api.nodes() {
        assert_eq!(n["memory"]["reserved_mib"], 4096, "{n}");
        assert_eq!(n["servers"], 16);
    }
    let live: usize = (0..3).map(|i| pid_records(&tmp.path().join(format!("agent{i}"))).iter().filter(|r| pid_alive(r.pid)).count()).sum();
    assert_eq!(live, 48, "exactly 48 real processes run");
    assert!(api.violations().is_empty());
    // The same facts through /metrics, in base units.
    assert_eq!(api.metric("berth_servers{status=\"running\"}"), 48.0);
    assert_eq!(api.metric("berth_queue_depth"), 152.0);
    assert_eq!(api.metric("berth_placements_total"), 48.0);
    assert_eq!(api.metric("berth_billing_open_sessions"), 48.0);
    for i in 0..3 {
        assert_eq!(api.metric(&format!("berth_node_memory_reserved_bytes{{node=\"n{i}\"")), 4096.0 * 1024.0 * 1024.0);
    }
    drop(agents);
}
