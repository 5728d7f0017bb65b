//! Acceptance A and B of the foundation: the over-commit incident and
//! restarts, against the real `berth` binary and real `fakegame` processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_testkit::{agent_args, pid_alive, pid_records, spawn, start_control, wait_until, Api, InstanceReaper};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

fn starts(agent_dir: &Path, server_id: &str) -> usize {
    std::fs::read_to_string(agent_dir.join("instances").join(server_id).join("starts.log")).map(|s| s.lines().count()).unwrap_or(0)
}

fn by_status(api: &Api) -> BTreeMap<String, Vec<Value>> {
    let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in api.servers() {
        m.entry(s["status"].as_str().unwrap().to_string()).or_default().push(s);
    }
    m
}

fn count(m: &BTreeMap<String, Vec<Value>>, status: &str) -> usize {
    m.get(status).map(|v| v.len()).unwrap_or(0)
}

fn live_pids(agent_dir: &Path) -> BTreeMap<String, i32> {
    pid_records(agent_dir).into_iter().filter(|r| pid_alive(r.pid)).map(|r| (r.server_id, r.pid)).collect()
}

#[test]
fn the_incident_two_of_three_run_and_survive_kill9_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let agent_dir = data.join("agent");
    let mut reaper = InstanceReaper::default();
    reaper.watch(&agent_dir);
    let args = ["--memory-mib", "2500", "--sync-interval", "1", "--no-cgroups"];
    let (mut dev, url, token) = start_control(&bin(), "dev", &data, &args);
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    assert_eq!(api.nodes()[0]["memory"]["allocatable_mib"], 2500);

    for n in ["a", "b", "c"] {
        api.create_server(n, "fakegame", 1024, json!({}));
    }
    let starters: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|n| {
            let api = api.clone();
            std::thread::spawn(move || api.call("POST", &format!("/v1/servers/{n}/start"), None).0)
        })
        .collect();
    for h in starters {
        assert_eq!(h.join().unwrap(), 202);
    }
    let m = wait_until(Duration::from_secs(30), "two running, one queued", || {
        let m = by_status(&api);
        (count(&m, "running") == 2 && count(&m, "queued") == 1).then_some(m)
    });
    let queued_id = m["queued"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);
    let pids_before = live_pids(&agent_dir);
    assert_eq!(pids_before.len(), 2, "exactly two instances run: {pids_before:?}");
    assert!(api.violations().is_empty());

    // kill -9 of berth dev: the instances keep running.
    dev.kill9();
    std::thread::sleep(Duration::from_millis(500));
    for (sid, pid) in &pids_before {
        assert!(pid_alive(*pid), "instance of {sid} (pid {pid}) died with the control plane");
    }

    // Restart on the same data dir.
    let (_dev2, url2, _) = start_control(&bin(), "dev", &data, &args);
    let api = Api::new(&url2, &token);
    let node = &api.nodes()[0];
    assert_eq!(node["memory"]["reserved_mib"], 2048, "reservations are rows, they survive the restart");
    let m = by_status(&api);
    assert_eq!((count(&m, "running"), count(&m, "queued")), (2, 1), "{m:?}");

    // Within one sync interval the agent has re-synced; nothing was started
    // twice and nothing changed.
    wait_until(Duration::from_secs(10), "the agent re-registered", || {
        let (_, ev) = api.call("GET", "/v1/events?kind=node_registered", None);
        (ev["events"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(live_pids(&agent_dir), pids_before, "the same processes run after the restart");
    for sid in pids_before.keys() {
        assert_eq!(starts(&agent_dir, sid), 1, "{sid} was started more than once");
    }
    let m = by_status(&api);
    assert_eq!((count(&m, "running"), count(&m, "queued")), (2, 1), "{m:?}");
    assert_eq!(m["queued"][0]["id"], queued_id.as_str());
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);

    // Stopping one lets the queued one start by itself.
    let victim = pids_before.keys().next().unwrap().clone();
    let (s, _) = api.call("POST", &format!("/v1/servers/{victim}/stop"), None);
    assert_eq!(s, 202);
    wait_until(Duration::from_secs(30), "the queued server to run", || {
        (api.server(&queued_id)["status"] == "running" && api.server(&victim)["status"] == "stopped").then_some(())
    });
    assert!(!pid_alive(pids_before[&victim]), "the stopped instance is gone");
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);
    assert_eq!(starts(&agent_dir, &queued_id), 1);
    assert_eq!(live_pids(&agent_dir).len(), 2);
    let v = api.violations();
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn agent_restart_readopts_instances_without_restarting_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cp_dir = tmp.path().join("cp");
    let agent_dir = tmp.path().join("agent");
    let mut reaper = InstanceReaper::default();
    reaper.watch(&agent_dir);
    let (_cp, url, token) = start_control(&bin(), "control-plane", &cp_dir, &["--sync-interval", "1"]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let agent_args = agent_args(&url, &agent_token, "n1", &agent_dir, 4096, "21100-21199", 1, &["--no-cgroups"]);
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = spawn(&bin(), &agent_args, &tmp.path().join("agent1.log"), &[]);
    wait_until(Duration::from_secs(20), "node n1", || (api.nodes().len() == 1).then_some(()));

    for n in ["x", "y"] {
        api.create_server(n, "fakegame", 512, json!({"max_players": 5}));
        api.ok("POST", &format!("/v1/servers/{n}/start"), None);
    }
    wait_until(Duration::from_secs(30), "both running", || (count(&by_status(&api), "running") == 2).then_some(()));
    let before = live_pids(&agent_dir);
    assert_eq!(before.len(), 2);

    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent2 = spawn(&bin(), &agent_args, &tmp.path().join("agent2.log"), &[]);
    wait_until(Duration::from_secs(10), "the agent to re-register", || {
        let (_, ev) = api.call("GET", "/v1/events?kind=node_registered", None);
        (ev["events"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    // Several sync rounds with the re-adopted instances.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(live_pids(&agent_dir), before, "instances were re-adopted, not restarted");
    assert_eq!(pid_records(&agent_dir).len(), 2, "no duplicate instance");
    for sid in before.keys() {
        assert_eq!(starts(&agent_dir, sid), 1);
        assert_eq!(api.server(sid)["status"], "running");
    }
    assert!(api.violations().is_empty());

    // The re-adopted instances are still under control: a stop works.
    let sid = before.keys().next().unwrap();
    api.ok("POST", &format!("/v1/servers/{sid}/stop"), None);
    wait_until(Duration::from_secs(20), "stopped", || (api.server(sid)["status"] == "stopped").then_some(()));
    assert!(!pid_alive(before[sid]));
    agent2.kill9();
}
