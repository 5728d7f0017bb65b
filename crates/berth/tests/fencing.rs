//! Issue 5 acceptance on real processes: node death, a paused agent, a
//! control-plane outage, zombie billing sessions. Leases are short here
//! (TTL 3 s, grace 2 s, sync 1 s) so the tests run in seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_testkit::{agent_args, pid_alive, pid_records, spawn, start_control_on, wait_until, watchdog_pid, Api, InstanceReaper, Proc};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

const TTL_S: u64 = 3;
const GRACE_S: u64 = 2;
const SYNC_S: u64 = 1;

fn control(dir: &Path, listen: &str, extra: &[&str]) -> (Proc, String, String) {
    let ttl = TTL_S.to_string();
    let grace = GRACE_S.to_string();
    let sync = SYNC_S.to_string();
    let mut args = vec!["--lease-ttl", &ttl, "--lease-grace", &grace, "--sync-interval", &sync];
    args.extend_from_slice(extra);
    start_control_on(&bin(), "control-plane", dir, listen, &args)
}

const ANY: &str = "127.0.0.1:0";

fn agent(tmp: &Path, url: &str, token: &str, name: &str, ports: &str) -> (Proc, PathBuf) {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let args = agent_args(url, token, name, &dir, 2048, ports, SYNC_S, &["--no-cgroups"]);
    let log = tmp.join(format!("{name}-{}.log", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()));
    (spawn(&bin(), &args, &log, &[]), dir)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn ms_of(rfc3339: &Value) -> i64 {
    // 2026-11-22T06:50:54.198Z
    let s = rfc3339.as_str().unwrap();
    let (date, time) = s.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let frac_ms: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
    ((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + frac_ms
}

/// Which of the agents runs `server_id`, by its live pid records.
fn running_on(dirs: &[PathBuf], server_id: &str) -> Option<(usize, i32)> {
    dirs.iter().enumerate().find_map(|(i, d)| pid_records(d).into_iter().find(|r| r.server_id == server_id && pid_alive(r.pid)).map(|r| (i, r.pid)))
}

#[test]
fn node_death_loses_servers_in_time_closes_billing_replaces_the_stateless_and_keeps_the_stateful_for_its_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cp, url, token) = control(&tmp.path().join("cp"), ANY, &["--restart-backoff-ms", "300"]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let mut reaper = InstanceReaper::default();
    // Both servers start on n1 (the only node); n2 joins afterwards.
    let (mut a1, d1) = agent(tmp.path(), &url, &agent_token, "n1", "28000-28049");
    reaper.watch(&d1);
    wait_until(Duration::from_secs(20), "n1", || (api.nodes().len() == 1).then_some(()));
    let create = |name: &str, stateless: bool| {
        let body = json!({"name": name, "template": "fakegame", "memory_mib": 256, "stop_after_s": 0, "stateless": stateless, "restart_policy": "on-failure"});
        api.ok("POST", "/v1/servers", Some(&body))["id"].as_str().unwrap().to_string()
    };
    let w = create("w", false);
    let sl = create("sl", true);
    for name in ["w", "sl"] {
        api.ok("POST", &format!("/v1/servers/{name}/start"), None);
    }
    wait_until(Duration::from_secs(30), "both running", || (api.server("w")["status"] == "running" && api.server("sl")["status"] == "running").then_some(()));
    let n1_id = api.server("w")["node_id"].clone();
    let (_a2, d2) = agent(tmp.path(), &url, &agent_token, "n2", "28050-28099");
    reaper.watch(&d2);
    wait_until(Duration::from_secs(20), "two nodes", || (api.nodes().len() == 2).then_some(()));
    std::thread::sleep(Duration::from_millis(1500)); // some billed time

    // Node death: agent, watchdog and instances killed -9.
    let watchdog = watchdog_pid(&d1).expect("n1 runs a fence watchdog");
    let pids: Vec<i32> = pid_records(&d1).iter().map(|r| r.pid).collect();
    let died = now_ms();
    a1.kill9();
    // SAFETY: kill(2) of pids this test caused.
    unsafe {
        libc::kill(watchdog, libc::SIGKILL);
        for p in &pids {
            libc::kill(-p, libc::SIGKILL);
        }
    }
    let t0 = Instant::now();
    let lost = wait_until(Duration::from_secs(30), "w lost", || {
        let s = api.server("w");
        (s["last_exit"]["reason"] == "node_lost").then_some(s)
    });
    let detection = t0.elapsed();
    eprintln!("node death detected after {detection:?} (ttl {TTL_S} s + grace {GRACE_S} s + sync {SYNC_S} s)");
    assert!(detection <= Duration::from_secs(TTL_S + GRACE_S + SYNC_S + 1), "detected after {detection:?}");
    assert_eq!(lost["home_node"], n1_id, "a stateful server remembers where its world is");
    assert!(lost["last_error"].as_str().unwrap_or_default().contains("--allow-fresh-world") || lost["status"] == "queued", "{lost}");
    for id in [&w, &sl] {
        let costs = api.ok("GET", &format!("/v1/servers/{id}/costs"), None);
        let first = &costs["sessions"][0];
        assert_eq!(first["end_reason"], "node_lost", "{costs}");
        let error = died - ms_of(&first["ended_at"]);
        eprintln!("billing of {id} closed {error} ms before the real death");
        assert!((0..=(SYNC_S as i64 * 1000 + 300)).contains(&error), "billing error {error} ms");
    }
    wait_until(Duration::from_secs(5), "n1 lost", || (api.nodes().into_iter().find(|n| n["name"] == "n1").unwrap()["status"] == "lost").then_some(()));
    let (_, ev) = api.call("GET", "/v1/events?kind=server_lost", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 2);

    // The stateless server runs elsewhere by its restart policy ...
    let moved = wait_until(Duration::from_secs(30), "sl running on n2", || {
        let s = api.server("sl");
        (s["status"] == "running").then_some(s)
    });
    assert_ne!(moved["node_id"], n1_id);
    // ... the stateful one waits for its node, never an empty world elsewhere.
    std::thread::sleep(Duration::from_millis(2500));
    let waiting = api.server("w");
    assert_eq!(waiting["status"], "queued", "{waiting}");
    assert!(!d2.join("instances").join(&w).exists(), "no world was made for it on n2");

    // n1 returns: the stateful server restarts there, on the same world.
    let (_a1b, _) = agent(tmp.path(), &url, &agent_token, "n1", "28000-28049");
    let back = wait_until(Duration::from_secs(30), "w running on n1 again", || {
        let s = api.server("w");
        (s["status"] == "running").then_some(s)
    });
    assert_eq!(back["node_id"], n1_id);
    let starts = std::fs::read_to_string(d1.join("instances").join(&w).join("starts.log")).unwrap();
    assert_eq!(starts.lines().count(), 2, "the same world, started a second time");
    assert!(api.violations().is_empty(), "{:?}", api.violations());
}

#[test]
fn a_paused_agent_is_fenced_by_its_watchdog_before_the_server_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cp, url, token) = control(&tmp.path().join("cp"), ANY, &[]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let mut reaper = InstanceReaper::default();
    let agents: Vec<(Proc, PathBuf)> =
        [("n1", "28100-28149"), ("n2", "28150-28199")].iter().map(|(n, p)| agent(tmp.path(), &url, &agent_token, n, p)).collect();
    for (_, d) in &agents {
        reaper.watch(d);
    }
    wait_until(Duration::from_secs(20), "two nodes", || (api.nodes().len() == 2).then_some(()));
    let s = api.ok("POST", "/v1/servers", Some(&json!({"name": "p", "template": "fakegame", "memory_mib": 256, "stop_after_s": 0, "stateless": true})));
    let id = s["id"].as_str().unwrap().to_string();
    api.ok("POST", "/v1/servers/p/start", None);
    wait_until(Duration::from_secs(30), "p running", || (api.server("p")["status"] == "running").then_some(()));
    let dirs: Vec<PathBuf> = agents.iter().map(|(_, d)| d.clone()).collect();
    let (victim, old_pid) = running_on(&dirs, &id).unwrap();
    agents[victim].0.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let (mut dead_at, mut crashed_at) = (None, None);
    while crashed_at.is_none() && t0.elapsed() < Duration::from_secs(30) {
        if dead_at.is_none() && !pid_alive(old_pid) {
            dead_at = Some(t0.elapsed());
        }
        if api.server("p")["status"] == "crashed" {
            crashed_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (dead_at, crashed_at) = (dead_at.expect("the watchdog stopped the instance"), crashed_at.expect("the server was lost"));
    eprintln!("paused agent: instance fenced after {dead_at:?}, server lost after {crashed_at:?}");
    assert!(dead_at < crashed_at, "the old instance must be dead before the server may be replaced");
    let fenced = std::fs::read_to_string(dirs[victim].join("fenced.json")).unwrap();
    assert!(fenced.contains(&id), "the watchdog recorded the fence: {fenced}");

    // Replace it on the other node, then let the paused agent go on.
    api.ok("POST", "/v1/servers/p/start", Some(&json!({"allow_fresh_world": true})));
    wait_until(Duration::from_secs(30), "p running again", || (api.server("p")["status"] == "running").then_some(()));
    let (idx, _) = running_on(&dirs, &id).unwrap();
    assert_ne!(idx, victim, "the replacement runs on the other node");
    agents[victim].0.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(3000));
    let live: Vec<_> = dirs.iter().flat_map(|d| pid_records(d)).filter(|r| r.server_id == id && pid_alive(r.pid)).collect();
    assert_eq!(live.len(), 1, "SIGCONT did not bring the old instance back: {live:?}");
    assert!(!pid_alive(old_pid));
    // The old node keeps the old world and lists it for recovery.
    let victim_name = ["n1", "n2"][victim];
    let vols = wait_until(Duration::from_secs(10), "the old world listed", || {
        let v = api.ok("GET", &format!("/v1/nodes/{victim_name}/volumes"), None);
        v["volumes"].as_array().unwrap().iter().any(|x| x["server_id"] == id.as_str()).then_some(v)
    });
    let vol = vols["volumes"].as_array().unwrap().iter().find(|x| x["server_id"] == id.as_str()).unwrap().clone();
    assert_eq!(vol["recovery_candidate"], true, "{vols}");
    assert!(dirs[victim].join("instances").join(&id).join("world").join("level.dat").exists(), "never deleted silently");
    let costs = api.ok("GET", "/v1/servers/p/costs", None);
    let s = costs["sessions"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    assert!(ms_of(&s[0]["ended_at"]) <= ms_of(&s[1]["started_at"]), "sessions do not overlap: {costs}");
    assert!(api.violations().is_empty(), "{:?}", api.violations());
}

#[test]
fn a_control_plane_outage_longer_than_the_lease_stops_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cp_dir = tmp.path().join("cp");
    let (mut cp, url, token) = control(&cp_dir, ANY, &[]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let mut reaper = InstanceReaper::default();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let (_a1, d1) = agent(tmp.path(), &url, &agent_token, "n1", "28200-28249");
    reaper.watch(&d1);
    wait_until(Duration::from_secs(20), "node", || (api.nodes().len() == 1).then_some(()));
    api.create_server("e", "fakegame", 256, json!({}));
    api.ok("POST", "/v1/servers/e/start", None);
    wait_until(Duration::from_secs(30), "e running", || (api.server("e")["status"] == "running").then_some(()));
    let pid = pid_records(&d1)[0].pid;

    cp.kill9();
    std::thread::sleep(Duration::from_secs(TTL_S + GRACE_S + 2));
    assert!(pid_alive(pid), "an outage shorter than the window stops nothing");
    // Back on the same address, so the agent finds it.
    let listen = format!("127.0.0.1:{port}");
    let (_cp2, url2, _) = control(&cp_dir, &listen, &[]);
    assert_eq!(url2, url);
    std::thread::sleep(Duration::from_secs(TTL_S + GRACE_S + 2));
    assert!(pid_alive(pid));
    let s = api.server("e");
    assert_eq!(s["status"], "running", "no server is marked crashed after the control plane returns: {s}");
    let costs = api.ok("GET", "/v1/servers/e/costs", None);
    let sessions = costs["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "billing stayed continuous: {costs}");
    assert_eq!(sessions[0]["ended_at"], Value::Null);
    let (_, ev) = api.call("GET", "/v1/events?kind=node_unreachable", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 0);
}

#[test]
fn a_zombie_billing_session_is_closed_by_the_sweeper() {
    let tmp = tempfile::tempdir().unwrap();
    let cp_dir = tmp.path().join("cp");
    let (_cp, url, token) = control(&cp_dir, ANY, &["--sweep-interval", "1"]);
    let api = Api::new(&url, &token);
    let s = api.create_server("z", "fakegame", 512, json!({}));
    let id = s["id"].as_str().unwrap().to_string();
    // Inject an open session for a server that is not running, straight
    // into the database (as a lost event or a failed write would leave it).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = berth_store::SqliteStore::open(&cp_dir.join("berth.db")).await.unwrap();
        use berth_store::Store;
        store
            .insert_session(&berth_store::BillingSession {
                id: 0,
                server_id: berth_core::ServerId(id.clone()),
                tenant: "default".into(),
                node_id: berth_core::NodeId("node_0000000000000000".into()),
                generation: 1,
                memory_mib: berth_core::MemMib(512),
                plan: "standard".into(),
                price_per_gib_hour: 100,
                started_at: now_ms() - 60_000,
                ended_at: None,
                end_reason: None,
            })
            .await
            .unwrap();
    });
    let closed = wait_until(Duration::from_secs(10), "the zombie closed", || {
        let c = api.ok("GET", "/v1/servers/z/costs", None);
        (c["sessions"][0]["end_reason"] == "zombie").then_some(c)
    });
    assert!(closed["sessions"][0]["ended_at"].is_string());
    let (_, ev) = api.call("GET", "/v1/events?kind=billing_zombie_closed", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 1);
    assert!(api.violations().is_empty());
}
