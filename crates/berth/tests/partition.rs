//! Issue 5 acceptance B and D: an agent on its own test host (a network
//! namespace joined by a veth pair) is cut off from the control plane while
//! its instances keep running. Traffic goes only to the test's own hosts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_testkit::{pid_alive, pid_records, require_or_skip, spawn, start_control_on, wait_until, Api, InstanceReaper, NetNs, Proc};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn agent_args(url: &str, token: &str, name: &str, dir: &Path, ports: &str) -> Vec<String> {
    berth_testkit::agent_args(url, token, name, dir, 2048, ports, 1, &["--no-cgroups"])
}

struct Setup {
    _cp: Proc,
    api: Api,
    url_from_ns: String,
    url: String,
    agent_token: String,
}

fn setup(tmp: &Path, ns: &NetNs) -> Setup {
    // Listen on every address so the test host reaches us through the veth.
    let (cp, url, token) =
        start_control_on(&bin(), "control-plane", &tmp.join("cp"), "0.0.0.0:0", &["--lease-ttl", "3", "--lease-grace", "2", "--sync-interval", "1"]);
    let port = url.rsplit(':').next().unwrap().to_string();
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    Setup { _cp: cp, api, url_from_ns: format!("http://{}:{port}", ns.host_ip), url, agent_token }
}

fn agent_in_ns(tmp: &Path, s: &Setup, ns: &NetNs, name: &str, ports: &str) -> (Proc, PathBuf) {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let args = ns.wrap(&bin(), &agent_args(&s.url_from_ns, &s.agent_token, name, &dir, ports));
    (spawn(Path::new("ip"), &args, &tmp.join(format!("{name}.log")), &[]), dir)
}

fn agent_here(tmp: &Path, s: &Setup, name: &str, ports: &str) -> (Proc, PathBuf) {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    (spawn(&bin(), &agent_args(&s.url, &s.agent_token, name, &dir, ports), &tmp.join(format!("{name}.log")), &[]), dir)
}

fn live_pids(dir: &Path, server: &str) -> Vec<i32> {
    pid_records(dir).into_iter().filter(|r| r.server_id == server && pid_alive(r.pid)).map(|r| r.pid).collect()
}

#[test]
fn a_partition_fences_the_old_instance_before_any_replacement_and_nothing_runs_twice_after_heal() {
    if !require_or_skip(NetNs::available(), "iproute2 network namespaces") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    let s = setup(tmp.path(), &ns);
    let mut reaper = InstanceReaper::default();
    let (_a1, d1) = agent_in_ns(tmp.path(), &s, &ns, "far", "28300-28349");
    reaper.watch(&d1);
    wait_until(Duration::from_secs(20), "the far node", || (s.api.nodes().len() == 1).then_some(()));
    let srv = s.api.ok("POST", "/v1/servers", Some(&json!({"name": "p", "template": "fakegame", "memory_mib": 256, "stop_after_s": 0, "stateless": true})));
    let id = srv["id"].as_str().unwrap().to_string();
    s.api.ok("POST", "/v1/servers/p/start", None);
    wait_until(Duration::from_secs(30), "p running on the far node", || (s.api.server("p")["status"] == "running").then_some(()));
    let (_a2, d2) = agent_here(tmp.path(), &s, "near", "28350-28399");
    reaper.watch(&d2);
    wait_until(Duration::from_secs(20), "two nodes", || (s.api.nodes().len() == 2).then_some(()));
    let old = live_pids(&d1, &id);
    assert_eq!(old.len(), 1);
    std::thread::sleep(Duration::from_millis(1200));

    ns.cut();
    let t0 = Instant::now();
    let (mut dead_ms, mut crashed) = (None, false);
    while !crashed && t0.elapsed() < Duration::from_secs(30) {
        if dead_ms.is_none() && !pid_alive(old[0]) {
            dead_ms = Some(now_ms());
        }
        crashed = s.api.server("p")["status"] == "crashed";
        assert!(dead_ms.is_some() || !crashed, "the server was declared lost while its old instance still ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(crashed, "the partitioned server was lost");
    let dead_ms = dead_ms.expect("fenced");
    eprintln!("partition: fenced {} ms after the cut", dead_ms - (now_ms() - t0.elapsed().as_millis() as i64));

    // The replacement (a stateless server) runs on the near node, and
    // started only after the old instance was dead.
    s.api.ok("POST", "/v1/servers/p/start", None);
    wait_until(Duration::from_secs(30), "p running again", || (s.api.server("p")["status"] == "running").then_some(()));
    let starts = std::fs::read_to_string(d2.join("instances").join(&id).join("starts.log")).unwrap();
    let started: i64 = starts.lines().next().unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(started > dead_ms, "replacement started at {started}, old instance seen dead at {dead_ms}");

    ns.heal();
    std::thread::sleep(Duration::from_millis(4000));
    assert!(live_pids(&d1, &id).is_empty(), "after heal nothing runs twice");
    assert_eq!(live_pids(&d2, &id).len(), 1);
    let costs = s.api.ok("GET", "/v1/servers/p/costs", None);
    let sess = costs["sessions"].as_array().unwrap();
    assert_eq!(sess.len(), 2, "{costs}");
    assert!(sess[0]["ended_at"].as_str().unwrap() <= sess[1]["started_at"].as_str().unwrap(), "no overlap: {costs}");
    assert!(s.api.violations().is_empty(), "{:?}", s.api.violations());
}

#[test]
fn a_short_partition_inside_the_window_keeps_the_instance_and_billing_has_no_gap() {
    if !require_or_skip(NetNs::available(), "iproute2 network namespaces") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    let s = setup(tmp.path(), &ns);
    let mut reaper = InstanceReaper::default();
    let (_a1, d1) = agent_in_ns(tmp.path(), &s, &ns, "far", "28400-28449");
    reaper.watch(&d1);
    wait_until(Duration::from_secs(20), "the far node", || (s.api.nodes().len() == 1).then_some(()));
    let srv = s.api.ok("POST", "/v1/servers", Some(&json!({"name": "q", "template": "fakegame", "memory_mib": 256, "stop_after_s": 20})));
    let id = srv["id"].as_str().unwrap().to_string();
    s.api.ok("POST", "/v1/servers/q/start", None);
    wait_until(Duration::from_secs(30), "q running", || (s.api.server("q")["status"] == "running").then_some(()));
    let pid = live_pids(&d1, &id)[0];
    std::thread::sleep(Duration::from_millis(1200));

    ns.cut();
    let cut = Instant::now();
    wait_until(Duration::from_secs(15), "q unknown", || (s.api.server("q")["status"] == "unknown").then_some(()));
    eprintln!("short partition: unknown after {:?}", cut.elapsed());
    while cut.elapsed() < Duration::from_secs(9) {
        assert!(pid_alive(pid), "the instance keeps running inside its window");
        assert_eq!(s.api.server("q")["status"], "unknown", "not replaced, not lost");
        std::thread::sleep(Duration::from_millis(200));
    }
    ns.heal();
    wait_until(Duration::from_secs(20), "q running again", || (s.api.server("q")["status"] == "running").then_some(()));
    eprintln!("short partition: running again {:?} after the cut", cut.elapsed());
    assert!(pid_alive(pid));
    assert_eq!(live_pids(&d1, &id), vec![pid], "the same process, never restarted");
    let costs = s.api.ok("GET", "/v1/servers/q/costs", None);
    let sess = costs["sessions"].as_array().unwrap();
    assert_eq!(sess.len(), 2, "{costs}");
    assert_eq!(sess[0]["end_reason"], "node_unreachable");
    assert_eq!(sess[1]["started_at"], sess[0]["ended_at"], "backfilled: no gap and no overlap");
    assert!(sess[1]["ended_at"].is_null());
    let (_, ev) = s.api.call("GET", "/v1/events?kind=server_reconnected", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 1);
    assert!(s.api.violations().is_empty(), "{:?}", s.api.violations());
}
