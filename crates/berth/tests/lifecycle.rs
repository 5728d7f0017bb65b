//! Instance lifecycle through the real binary: crashes are reported with
//! their exit code, memory limits are enforced (cgroup, or RSS watch when
//! cgroups are off), a failed preflight sends the server back to the queue
//! and it starts once the port is free, and the CLI drives all of it.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use berth_testkit::{start_control, wait_until, Api, InstanceReaper};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

fn dev(tmp: &tempfile::TempDir, name: &str, extra: &[&str]) -> (berth_testkit::Proc, Api, InstanceReaper) {
    let data = tmp.path().join(name);
    let mut reaper = InstanceReaper::default();
    reaper.watch(&data.join("agent"));
    let mut args = vec!["--memory-mib", "4096", "--sync-interval", "1"];
    args.extend_from_slice(extra);
    let (p, url, token) = start_control(&bin(), "dev", &data, &args);
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    (p, api, reaper)
}

fn wait_status(api: &Api, name: &str, status: &str, secs: u64) -> Value {
    wait_until(Duration::from_secs(secs), &format!("{name} {status}"), || {
        let s = api.server(name);
        (s["status"] == status).then_some(s)
    })
}

#[test]
fn a_crash_is_reported_with_its_exit_code_and_frees_the_reservation() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, api, _r) = dev(&tmp, "d", &["--ports", "23100-23199", "--no-cgroups"]);
    api.create_server("crashy", "fakegame", 256, json!({"crash_after_ms": 700}));
    api.ok("POST", "/v1/servers/crashy/start", None);
    wait_status(&api, "crashy", "running", 30);
    let s = wait_status(&api, "crashy", "crashed", 30);
    assert_eq!(s["last_exit"], json!({"reason": "exited", "code": 3}));
    assert_eq!(s["node_id"], Value::Null);
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 0);
    let (_, ev) = api.call("GET", "/v1/events?server=crashy&kind=server_crashed", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 1, "{ev}");
    assert!(api.violations().is_empty());
}

/// Returns the agent's log, so callers can tell which mechanism killed.
fn oom_is_enforced(extra: &[&str], ports: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--ports", ports];
    args.extend_from_slice(extra);
    let (p, api, _r) = dev(&tmp, "d", &args);
    api.create_server("hog", "fakegame", 64, json!({"alloc_mib": 400}));
    api.ok("POST", "/v1/servers/hog/start", None);
    let s = wait_until(Duration::from_secs(30), "hog killed", || {
        let s = api.server("hog");
        (s["status"] == "crashed").then_some(s)
    });
    assert_eq!(s["last_exit"]["reason"], "oom", "{s}");
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 0);
    assert!(api.violations().is_empty());
    std::fs::read_to_string(&p.log).unwrap()
}

#[test]
fn memory_above_the_reservation_is_killed_by_rss_watch() {
    let log = oom_is_enforced(&["--no-cgroups"], "23200-23299");
    assert!(log.contains("memory limit exceeded; killing"), "the RSS watch killed it:\n{log}");
}

#[test]
fn memory_above_the_reservation_is_killed_by_the_cgroup_where_one_is_available() {
    let log = oom_is_enforced(&[], "23300-23399");
    if log.contains("no writable cgroup") {
        eprintln!("no writable cgroup on this host: the agent fell back to the RSS watch, which the other test covers");
        return;
    }
    assert!(log.contains("memory limits through cgroups"), "cgroups were used:\n{log}");
    assert!(!log.contains("memory limit exceeded; killing"), "the kernel, not the RSS watch, killed it:\n{log}");
}

#[test]
fn a_failed_preflight_requeues_and_the_server_starts_once_the_port_is_free() {
    let tmp = tempfile::tempdir().unwrap();
    let port = 23400u16;
    let squatter = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    let (_p, api, _r) = dev(&tmp, "d", &["--ports", "23400-23400", "--retry-base-ms", "1500", "--no-cgroups"]);
    api.create_server("p", "fakegame", 128, json!({}));
    api.ok("POST", "/v1/servers/p/start", None);
    let s = wait_until(Duration::from_secs(20), "a transient failure", || {
        let s = api.server("p");
        (s["attempts"] == 1).then_some(s)
    });
    assert_eq!(s["status"], "queued", "{s}");
    assert!(s["last_error"].as_str().unwrap().contains("port 23400"), "{s}");
    assert!(s["next_attempt_at"].is_string());
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 0, "the reservation was released");
    drop(squatter);
    let s = wait_status(&api, "p", "running", 30);
    assert_eq!(s["port"], port);
    assert_eq!(s["attempts"], 0);
    assert!(api.violations().is_empty());
}

fn cli(api: &Api, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).args(["--addr", &api.url, "--token", &api.token]).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn the_cli_creates_starts_waits_lists_stops_and_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, api, _r) = dev(&tmp, "d", &["--ports", "23500-23599", "--no-cgroups"]);
    let (ok, out, err) = cli(&api, &["server", "create", "mc", "--template", "fakegame", "--memory-mib", "256", "--config", "max_players=7"]);
    assert!(ok, "{err}");
    assert!(out.contains("created server mc"), "{out}");
    let (ok, out, err) = cli(&api, &["server", "start", "mc", "--wait", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "running");
    assert_eq!(v["config"]["max_players"], 7);
    let (ok, out, _) = cli(&api, &["server", "list"]);
    assert!(ok && out.lines().next().unwrap().starts_with("NAME") && out.contains("running"), "{out}");
    let (ok, out, _) = cli(&api, &["node", "list", "--json"]);
    assert!(ok);
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes["nodes"][0]["memory"]["reserved_mib"], 256);
    let (ok, out, _) = cli(&api, &["node", "drain", "local"]);
    assert!(ok && out.contains("draining"), "{out}");
    let (ok, _, _) = cli(&api, &["node", "undrain", "local"]);
    assert!(ok);
    let (ok, out, err) = cli(&api, &["server", "stop", "mc", "--wait"]);
    assert!(ok, "{err}");
    assert!(out.contains("stopped"), "{out}");
    let (ok, _, _) = cli(&api, &["server", "delete", "mc"]);
    assert!(ok);
    let (ok, _, err) = cli(&api, &["server", "show", "mc"]);
    assert!(!ok);
    assert!(err.contains("not_found"), "{err}");
    let (ok, out, _) = cli(&api, &["token", "create", "--kind", "tenant", "--tenant", "carol"]);
    assert!(ok);
    let secret = out.lines().last().unwrap();
    assert!(secret.starts_with("berth_tenant_"), "{out}");
    assert_eq!(api.with_token(secret).servers().len(), 0);
    let (ok, _, err) = cli(&api, &["server", "create", "bad", "--template", "fakegame", "--memory-mib", "0"]);
    assert!(!ok && err.contains("invalid_memory"), "{err}");
}

#[test]
fn a_draining_node_receives_no_placements() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, api, _r) = dev(&tmp, "d", &["--ports", "23600-23699", "--no-cgroups"]);
    api.ok("POST", "/v1/nodes/local/drain", None);
    api.create_server("w", "fakegame", 128, json!({}));
    api.ok("POST", "/v1/servers/w/start", None);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(api.server("w")["status"], "queued");
    api.ok("POST", "/v1/nodes/local/undrain", None);
    wait_status(&api, "w", "running", 30);
}

#[test]
fn a_template_stop_command_stops_the_instance_gracefully() {
    let tmp = tempfile::tempdir().unwrap();
    let templates = tmp.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    // The workload ignores SIGTERM: only its stop command ends it in time.
    std::fs::write(
        templates.join("waiter.toml"),
        r#"name = "waiter"
[process]
command = "/bin/sh"
args = ["-c", "trap '' TERM; while [ ! -f stop-now ]; do sleep 0.1; done; exit 0"]
stop_command = ["/bin/sh", "-c", "touch stop-now"]
stop_timeout_s = 30
ready = "alive"
"#,
    )
    .unwrap();
    let dir = templates.display().to_string();
    let (_p, api, _r) = dev(&tmp, "d", &["--ports", "23700-23799", "--no-cgroups", "--templates-dir", &dir]);
    api.create_server("w", "waiter", 64, json!({}));
    api.ok("POST", "/v1/servers/w/start", None);
    wait_status(&api, "w", "running", 30);
    api.ok("POST", "/v1/servers/w/stop", None);
    let s = wait_status(&api, "w", "stopped", 10);
    assert_eq!(s["last_exit"], json!({"reason": "stopped", "code": 0}), "ended by its stop command, not killed");
}
