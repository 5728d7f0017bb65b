//! The operations engine through the real binary with real instances:
//! every pair of the guard table among the kinds that run today
//! (acceptance A), permanent errors and the queue timeout (B), and a storm
//! of 1,000 concurrent mixed operations (D). After each, no orphan
//! instance runs, no reservation is lost or leaked, and every server is in
//! a state of the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_testkit::{agent_args, pid_alive, pid_records, spawn, start_control, wait_until, Api, InstanceReaper, Proc};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

const REST_STATES: &[&str] = &["stopped", "running", "crashed", "failed"];

/// What runs on the node, as (server id, generation), from pid records
/// whose process is alive.
fn live_instances(agent_dir: &Path) -> BTreeSet<(String, u64)> {
    pid_records(agent_dir).into_iter().filter(|r| pid_alive(r.pid)).map(|r| (r.server_id, r.generation)).collect()
}

/// No orphan instance, no lost or leaked reservation, every server in a
/// state of the machine, and the invariant checker clean.
fn assert_consistent(api: &Api, agent_dirs: &[&Path]) {
    let servers = api.servers();
    for s in &servers {
        assert!(REST_STATES.contains(&s["status"].as_str().unwrap()), "not at rest: {s}");
    }
    let want: BTreeSet<(String, u64)> =
        servers.iter().filter(|s| s["status"] == "running").map(|s| (s["id"].as_str().unwrap().to_string(), s["generation"].as_u64().unwrap())).collect();
    // An instance that was just stopped may take a moment to be reaped.
    let live = wait_until(Duration::from_secs(10), "live instances to match running servers", || {
        let live: BTreeSet<(String, u64)> = agent_dirs.iter().flat_map(|d| live_instances(d)).collect();
        (live == want).then_some(live)
    });
    assert_eq!(live, want);
    let reserved: u64 = api.nodes().iter().map(|n| n["memory"]["reserved_mib"].as_u64().unwrap()).sum();
    let running_mib: u64 = servers.iter().filter(|s| s["status"] == "running").map(|s| s["memory_mib"].as_u64().unwrap()).sum();
    assert_eq!(reserved, running_mib, "reservations are exactly those of running servers");
    let v = api.violations();
    assert!(v.is_empty(), "{v:?}");
}

fn active_operations(api: &Api) -> Vec<Value> {
    api.ok("GET", "/v1/operations?active=true&limit=1000", None)["operations"].as_array().cloned().unwrap_or_default()
}

fn wait_quiet(api: &Api, secs: u64) {
    wait_until(Duration::from_secs(secs), "every operation to end and every server to rest", || {
        let quiet = active_operations(api).is_empty() && api.servers().iter().all(|s| REST_STATES.contains(&s["status"].as_str().unwrap()));
        quiet.then_some(())
    });
}

struct Cluster {
    api: Api,
    agent: Proc,
    agent_dir: PathBuf,
    _cp: Proc,
    _reaper: InstanceReaper,
}

fn cluster(tmp: &Path, ports: &str, extra: &[&str]) -> Cluster {
    let mut reaper = InstanceReaper::default();
    let mut args = vec!["--sync-interval", "1"];
    args.extend_from_slice(extra);
    let (cp, url, token) = start_control(&bin(), "control-plane", &tmp.join("cp"), &args);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let agent_dir = tmp.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    reaper.watch(&agent_dir);
    let agent_args = agent_args(&url, &agent_token, "n1", &agent_dir, 8192, ports, 1, &["--no-cgroups"]);
    let agent = spawn(&bin(), &agent_args, &tmp.join("agent.log"), &[]);
    wait_until(Duration::from_secs(20), "node n1", || (api.nodes().len() == 1).then_some(()));
    Cluster { api, agent, agent_dir, _cp: cp, _reaper: reaper }
}

fn op_of(resp: &(u16, Value), api: &Api, server: &str) -> Option<Value> {
    // The answer names the operation in a header the blocking client does
    // not return; the newest operation of the server is the same one.
    if resp.0 >= 300 {
        return None;
    }
    let ops = api.ok("GET", &format!("/v1/operations?server={server}&limit=1000"), None)["operations"].as_array().cloned()?;
    ops.last().cloned()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Wait,
    Refuse,
    Preempt,
    Alongside,
    Gone,
}

/// Acceptance A: for every pair (running, requested) of start, stop,
/// restart, kill, delete: the running operation is held in progress by
/// pausing the agent (SIGSTOP), the request gets the guard table's answer,
/// and once the agent resumes everything ends consistently.
#[test]
fn every_pair_of_the_guard_table_with_real_instances() {
    use Expect::*;
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), "26000-26099", &[]);
    let api = c.api.clone();
    let kinds = ["start", "stop", "restart", "kill", "delete"];
    let table: BTreeMap<(&str, &str), (Expect, &str)> = [
        (("start", "start"), (Refuse, "running")),
        (("start", "stop"), (Preempt, "stopped")),
        (("start", "restart"), (Refuse, "running")),
        (("start", "kill"), (Preempt, "stopped")),
        (("start", "delete"), (Refuse, "running")),
        (("stop", "start"), (Wait, "running")),
        (("stop", "stop"), (Refuse, "stopped")),
        (("stop", "restart"), (Wait, "running")),
        (("stop", "kill"), (Alongside, "stopped")),
        (("stop", "delete"), (Wait, "deleted")),
        (("restart", "start"), (Refuse, "running")),
        (("restart", "stop"), (Preempt, "stopped")),
        (("restart", "restart"), (Refuse, "running")),
        (("restart", "kill"), (Preempt, "stopped")),
        (("restart", "delete"), (Refuse, "running")),
        (("kill", "start"), (Wait, "running")),
        (("kill", "stop"), (Refuse, "stopped")),
        (("kill", "restart"), (Wait, "running")),
        (("kill", "kill"), (Refuse, "stopped")),
        (("kill", "delete"), (Wait, "deleted")),
        (("delete", "start"), (Gone, "deleted")),
        (("delete", "stop"), (Gone, "deleted")),
        (("delete", "restart"), (Gone, "deleted")),
        (("delete", "kill"), (Gone, "deleted")),
        (("delete", "delete"), (Gone, "deleted")),
    ]
    .into_iter()
    .collect();
    assert_eq!(table.len(), kinds.len() * kinds.len());

    // One server per pair, in the state its running operation starts from.
    let mut names = BTreeMap::new();
    for (i, (first, second)) in table.keys().enumerate() {
        let name = format!("p{i:02}-{first}-{second}");
        api.create_server(&name, "fakegame", 64, json!({}));
        if matches!(*first, "stop" | "restart" | "kill") {
            api.ok("POST", &format!("/v1/servers/{name}/start"), None);
        }
        names.insert((*first, *second), name);
    }
    wait_until(Duration::from_secs(60), "the servers that need it to run", || {
        names.iter().filter(|((f, _), _)| matches!(*f, "stop" | "restart" | "kill")).all(|(_, n)| api.server(n)["status"] == "running").then_some(())
    });
    let generations: BTreeMap<String, u64> = names.values().map(|n| (n.clone(), api.server(n)["generation"].as_u64().unwrap())).collect();

    // Freeze the agent: nothing confirms, so every first operation stays
    // in progress while the second is requested.
    c.agent.signal(libc::SIGSTOP);
    let mut firsts = BTreeMap::new();
    for ((first, second), name) in &names {
        let method = if *first == "delete" { "DELETE" } else { "POST" };
        let path = if *first == "delete" { format!("/v1/servers/{name}") } else { format!("/v1/servers/{name}/{first}") };
        let r = api.call(method, &path, None);
        assert!(r.0 == 202 || r.0 == 200, "{first} of {name}: {r:?}");
        if *first != "delete" {
            let op = op_of(&r, &api, name).unwrap();
            assert_eq!(op["kind"], *first);
            assert_eq!(op["status"], "running", "{first} of {name} is in progress: {op}");
            firsts.insert((*first, *second), op["id"].as_str().unwrap().to_string());
        }
    }
    let mut seconds = BTreeMap::new();
    for ((first, second), name) in &names {
        let (expect, _) = table[&(*first, *second)];
        let method = if *second == "delete" { "DELETE" } else { "POST" };
        let path = if *second == "delete" { format!("/v1/servers/{name}") } else { format!("/v1/servers/{name}/{second}") };
        let r = api.call(method, &path, None);
        let what = format!("{second} while {first} runs on {name}: {r:?}");
        match expect {
            Refuse => {
                assert_eq!(r.0, 409, "{what}");
                assert_eq!(r.1["error"]["code"], "operation_in_progress", "{what}");
                let msg = r.1["error"]["message"].as_str().unwrap();
                assert!(msg.contains(&format!("{first} is running")) && msg.contains(&firsts[&(*first, *second)]), "names the running operation: {what}");
            }
            Gone => {
                assert_eq!(r.0, 404, "{what}");
                assert_eq!(r.1["error"]["code"], "not_found", "{what}");
            }
            Wait | Preempt | Alongside => {
                assert!(r.0 == 202 || r.0 == 200, "{what}");
                let op = op_of(&r, &api, name).unwrap();
                assert_eq!(op["kind"], *second, "{what}");
                let first_op = api.ok("GET", &format!("/v1/operations/{}", firsts[&(*first, *second)]), None);
                match expect {
                    Wait => {
                        assert_eq!(op["status"], "pending", "waits its turn: {what}");
                        assert_eq!(first_op["status"], "running", "{what}");
                    }
                    Preempt => {
                        assert_eq!(first_op["status"], "cancelled", "{what}");
                        assert_eq!(first_op["error_code"], "cancelled", "{what}");
                    }
                    _ => {
                        assert_eq!(op["status"], "running", "a kill runs at once: {what}");
                        assert_eq!(first_op["status"], "running", "next to the stop: {what}");
                    }
                }
                seconds.insert((*first, *second), op["id"].as_str().unwrap().to_string());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    c.agent.signal(libc::SIGCONT);

    wait_quiet(&api, 60);
    for ((first, second), name) in &names {
        let (expect, end) = table[&(*first, *second)];
        let (status, body) = api.call("GET", &format!("/v1/servers/{name}"), None);
        let got = if status == 404 { "deleted".to_string() } else { body["status"].as_str().unwrap().to_string() };
        assert_eq!(got, end, "{second} after {first} on {name}: {body}");
        if let Some(op) = seconds.get(&(*first, *second)) {
            let op = api.ok("GET", &format!("/v1/operations/{op}"), None);
            assert_eq!(op["status"], "succeeded", "{second} after {first}: {op}");
        }
        if let Some(op) = firsts.get(&(*first, *second)) {
            let op = api.ok("GET", &format!("/v1/operations/{op}"), None);
            let want = if expect == Preempt { "cancelled" } else { "succeeded" };
            assert_eq!(op["status"], want, "{first} (then {second}): {op}");
        }
        if end == "running" && matches!((*first, *second), ("stop", _) | ("kill", _) | ("restart", _)) {
            assert!(body["generation"].as_u64().unwrap() > generations[name], "a new placement: {body}");
        }
    }
    assert_consistent(&api, &[&c.agent_dir]);
}

fn write_template(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), body).unwrap();
}

/// Acceptance B (real binary part): a process that exits at once with a
/// permanent-error code fails without any retry; one that exits with
/// another code crashed (and restart policy `never` leaves it so); a
/// server that cannot fit fails with `no_capacity` after the queue timeout.
#[test]
fn permanent_errors_fail_at_once_and_the_queue_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let templates = tmp.path().join("templates");
    write_template(
        &templates,
        "broken",
        "name = \"broken\"\n[process]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"exit 78\"]\nready = \"tcp\"\npermanent_exit_codes = [78]\n",
    );
    write_template(
        &templates,
        "flaky",
        "name = \"flaky\"\n[process]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"exit 1\"]\nready = \"tcp\"\npermanent_exit_codes = [78]\n",
    );
    let dir = templates.display().to_string();
    let c = cluster(tmp.path(), "26100-26199", &["--templates-dir", &dir, "--queue-timeout-s", "3", "--retry-base-ms", "500"]);
    let api = &c.api;

    // Strict validation at the edge: the field is named, nothing written.
    let events_before = api.ok("GET", "/v1/events?limit=1000", None)["events"].as_array().unwrap().len();
    for (body, code, field) in [
        (json!({"name": "v", "template": "fakegame", "memory_mib": 64, "config": {"version": "1.8"}}), "invalid_config", "config.version"),
        (json!({"name": "v", "template": "fakegame", "memory_mib": 64, "restart_policy": "always"}), "invalid_request", "restart_policy"),
    ] {
        let (s, v) = api.call("POST", "/v1/servers", Some(&body));
        assert_eq!((s, v["error"]["code"].as_str()), (422, Some(code)), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(field), "names {field}: {v}");
    }
    let (s, v) = api.call("POST", "/v1/servers/nosuch/operations", Some(&json!({"kind": "backup"})));
    assert_eq!(s, 422, "reserved kinds are refused before anything else: {v}");
    assert_eq!(v["error"]["code"], "unsupported_operation");
    assert!(api.servers().is_empty());
    assert_eq!(api.ok("GET", "/v1/events?limit=1000", None)["events"].as_array().unwrap().len(), events_before);
    let ok = api.create_server("versioned", "fakegame", 64, json!({"version": "1.20.4"}));
    assert_eq!(ok["config"]["version"], "1.20.4");
    api.ok("DELETE", "/v1/servers/versioned", None);

    api.create_server("broken", "broken", 64, json!({}));
    api.ok("POST", "/v1/servers/broken/start", None);
    let s = wait_until(Duration::from_secs(30), "broken to fail", || {
        let s = api.server("broken");
        (s["status"] == "failed").then_some(s)
    });
    assert!(s["last_error"].as_str().unwrap().contains("code 78"), "{s}");
    assert_eq!(s["attempts"], 0, "no retry: {s}");
    assert_eq!(s["generation"], 1, "placed once: {s}");
    let ev = api.ok("GET", "/v1/events?server=broken", None);
    let kinds: Vec<&str> = ev["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(!kinds.contains(&"start_retry"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "start_failed").count(), 1, "{kinds:?}");
    // The operation settles on the executor's round after the server did.
    let ops = wait_until(Duration::from_secs(10), "the start operation to settle", || {
        let ops = api.ok("GET", "/v1/servers/broken/operations", None);
        (ops["operations"][0]["status"] != "running").then_some(ops)
    });
    assert_eq!(ops["operations"][0]["status"], "failed", "{ops}");
    assert_eq!(ops["operations"][0]["error_code"], "start_failed", "{ops}");
    // The CLI shows the same: operations, and events filtered by time.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin()).args(args).args(["--addr", &api.url, "--token", &api.token]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = cli(&["server", "ops", "broken"]);
    assert!(out.contains("start") && out.contains("failed") && out.contains("start_failed"), "{out}");
    let out = cli(&["events", "--server", "broken", "--kind", "start_failed", "--since", "10m", "--json"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("code 78"), "{out}");
    let out = cli(&["events", "--server", "broken", "--since", "2099-01-01T00:00:00Z"]);
    assert!(out.trim().is_empty(), "nothing from the future: {out}");

    api.create_server("flaky", "flaky", 64, json!({}));
    api.ok("POST", "/v1/servers/flaky/start", None);
    let s = wait_until(Duration::from_secs(30), "flaky to crash", || {
        let s = api.server("flaky");
        (s["status"] == "crashed").then_some(s)
    });
    assert_eq!(s["last_exit"]["code"], 1, "{s}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(api.server("flaky")["status"], "crashed", "restart policy never: it stays crashed");

    // 8192 MiB node: one 5000 MiB server runs, a second cannot fit.
    api.create_server("big1", "fakegame", 5000, json!({}));
    api.ok("POST", "/v1/servers/big1/start", None);
    wait_until(Duration::from_secs(30), "big1 running", || (api.server("big1")["status"] == "running").then_some(()));
    api.create_server("big2", "fakegame", 5000, json!({}));
    let queued_at = Instant::now();
    api.ok("POST", "/v1/servers/big2/start", None);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(api.server("big2")["status"], "queued", "still waiting before the timeout");
    let s = wait_until(Duration::from_secs(20), "big2 to fail with no_capacity", || {
        let s = api.server("big2");
        (s["status"] == "failed").then_some(s)
    });
    assert!(queued_at.elapsed() >= Duration::from_secs(3), "not before the timeout");
    assert!(s["last_error"].as_str().unwrap().starts_with("no_capacity"), "{s}");
    let ops = wait_until(Duration::from_secs(10), "the start operation to settle", || {
        let ops = api.ok("GET", "/v1/servers/big2/operations", None);
        (ops["operations"][0]["status"] != "running").then_some(ops)
    });
    assert_eq!(ops["operations"][0]["status"], "failed", "{ops}");
    assert_eq!(ops["operations"][0]["error_code"], "no_capacity", "{ops}");
    assert_eq!(api.server("big1")["status"], "running");
    assert_consistent(api, &[&c.agent_dir]);
}

/// Acceptance D: 1,000 concurrent mixed operations (start, stop, restart,
/// delete) on 50 servers: no 5xx, every admitted operation ends, and the
/// world is consistent afterwards.
#[test]
fn a_thousand_concurrent_mixed_operations_on_fifty_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), "26200-26399", &[]);
    let api = c.api.clone();
    let ids: Vec<String> = (0..50).map(|i| api.create_server(&format!("m{i:02}"), "fakegame", 64, json!({}))["id"].as_str().unwrap().to_string()).collect();
    for id in ids.iter().step_by(2) {
        api.ok("POST", &format!("/v1/servers/{id}/start"), None);
    }

    let answers: Arc<Mutex<BTreeMap<u16, usize>>> = Arc::default();
    let codes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let five_xx = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..20u64)
        .map(|t| {
            let (api, ids, answers, codes, five_xx) = (api.clone(), ids.clone(), answers.clone(), codes.clone(), five_xx.clone());
            std::thread::spawn(move || {
                // A small xorshift per thread: reproducible, no extra crate.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for _ in 0..50 {
                    let id = &ids[(next() % ids.len() as u64) as usize];
                    let r = next() % 100;
                    let (method, path) = match r {
                        0..=34 => ("POST", format!("/v1/servers/{id}/start")),
                        35..=64 => ("POST", format!("/v1/servers/{id}/stop")),
                        65..=96 => ("POST", format!("/v1/servers/{id}/restart")),
                        _ => ("DELETE", format!("/v1/servers/{id}")),
                    };
                    let (s, v) = api.call(method, &path, None);
                    if s >= 500 {
                        five_xx.fetch_add(1, Ordering::SeqCst);
                    }
                    *answers.lock().unwrap().entry(s).or_default() += 1;
                    if let Some(code) = v["error"]["code"].as_str() {
                        *codes.lock().unwrap().entry(code.to_string()).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let requests_took = started.elapsed();
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.values().sum::<usize>(), 1000);
    assert_eq!(five_xx.load(Ordering::SeqCst), 0, "no 5xx: {answers:?}");
    for s in answers.keys() {
        assert!([200, 202, 404, 409].contains(s), "unexpected answer {s}: {answers:?}");
    }
    wait_quiet(&api, 120);
    let settled = started.elapsed();
    let all = api.ok("GET", "/v1/operations?limit=1000", None);
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut after = None;
    let mut page = all;
    loop {
        for o in page["operations"].as_array().unwrap() {
            *by_status.entry(o["status"].as_str().unwrap().to_string()).or_default() += 1;
        }
        match page["next_cursor"].as_i64() {
            Some(c) if after != Some(c) => {
                after = Some(c);
                page = api.ok("GET", &format!("/v1/operations?limit=1000&after={c}"), None);
            }
            _ => break,
        }
    }
    assert!(by_status.keys().all(|s| ["succeeded", "failed", "cancelled"].contains(&s.as_str())), "every operation ended: {by_status:?}");
    eprintln!(
        "1000 operations: answers {answers:?}, refusals {:?}, operations {by_status:?}; requests took {requests_took:?}, all settled after {settled:?}",
        codes.lock().unwrap()
    );
    assert_consistent(&api, &[&c.agent_dir]);
}
