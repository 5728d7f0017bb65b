//! Acceptance D: a real game server (Debian's `minetest-server`) is
//! started, binds its port, stops gracefully and starts again on the same
//! world. In CI a missing `minetestserver` is a failure, not a skip.

use std::path::PathBuf;
use std::time::Duration;

use berth_testkit::{minetest_installed, pid_alive, pid_records, require_or_skip, start_control, wait_until, Api, InstanceReaper};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

/// True if a UDP socket is bound to `port` (minetest listens on [::]).
fn udp_bound(port: u64) -> bool {
    let hex = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .any(|f| std::fs::read_to_string(f).unwrap_or_default().lines().skip(1).any(|l| l.split_whitespace().nth(1).is_some_and(|a| a.ends_with(&hex))))
}

#[test]
fn minetest_starts_binds_its_port_stops_gracefully_and_restarts_on_the_same_world() {
    if !require_or_skip(minetest_installed(), "/usr/games/minetestserver (apt-get install minetest-server)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let agent_dir = data.join("agent");
    let mut reaper = InstanceReaper::default();
    reaper.watch(&agent_dir);
    let (_dev, url, token) = start_control(&bin(), "dev", &data, &["--memory-mib", "2048", "--sync-interval", "1", "--ports", "23000-23099"]);
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    let s = api.create_server("mt", "minetest", 512, json!({"game": "minetest_game"}));
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(s["config"]["game"], "minetest_game");

    api.ok("POST", "/v1/servers/mt/start", None);
    let running = wait_until(Duration::from_secs(60), "minetest running", || {
        let s = api.server("mt");
        (s["status"] == "running").then_some(s)
    });
    let port = running["port"].as_u64().unwrap();
    assert!(udp_bound(port), "the real server binds udp port {port}");
    let recs = pid_records(&agent_dir);
    assert_eq!(recs.len(), 1);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", recs[0].pid)).unwrap();
    assert_eq!(comm.trim(), "minetestserver", "the instance is the real minetest server");
    let world = agent_dir.join("instances").join(&id).join("world");
    let world_mt = std::fs::read_to_string(world.join("world.mt")).expect("minetest wrote its world");
    assert!(world_mt.contains("minetest_game"));

    // Graceful stop: SIGTERM, minetest saves and exits 0 (a kill would be
    // reported as signaled, code 137).
    api.ok("POST", "/v1/servers/mt/stop", None);
    let stopped = wait_until(Duration::from_secs(60), "minetest stopped", || {
        let s = api.server("mt");
        (s["status"] == "stopped").then_some(s)
    });
    assert_eq!(stopped["last_exit"], json!({"reason": "stopped", "code": 0}), "{stopped}");
    assert!(!pid_alive(recs[0].pid));
    assert!(!udp_bound(port));
    let log = std::fs::read_to_string(agent_dir.join("instances").join(&id).join("debug.txt")).unwrap();
    assert!(log.contains("Shutting down"), "minetest shut down cleanly");

    // Start again: the same world dir is used, not a fresh one.
    api.ok("POST", "/v1/servers/mt/start", None);
    let again = wait_until(Duration::from_secs(60), "minetest running again", || {
        let s = api.server("mt");
        (s["status"] == "running").then_some(s)
    });
    assert_eq!(again["generation"], 2);
    assert!(udp_bound(again["port"].as_u64().unwrap()));
    assert_eq!(std::fs::read_to_string(world.join("world.mt")).unwrap(), world_mt, "the same world");
    let log = std::fs::read_to_string(agent_dir.join("instances").join(&id).join("debug.txt")).unwrap();
    let world_line = format!("World at [{}]", world.display());
    assert_eq!(log.matches(&world_line).count(), 2, "both runs used {world_line}");
    api.ok("POST", "/v1/servers/mt/stop", None);
    wait_until(Duration::from_secs(60), "minetest stopped again", || (api.server("mt")["status"] == "stopped").then_some(()));
    assert!(api.violations().is_empty());
}
