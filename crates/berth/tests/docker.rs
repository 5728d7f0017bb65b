//! The docker driver against the real Docker engine of this machine, with
//! the images `scripts/build-images` makes: containers are limited,
//! labelled and published; the incident with containers (kill -9 and
//! restart, adoption); OOM kills by the kernel; stale and unknown labelled
//! containers removed; a missing image and an old engine refused; Minetest
//! in a container. In CI a missing engine is a failure, not a skip. Every
//! test uses its own node name and removes the containers labelled with
//! it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_testkit::{
    docker, docker_available, ensure_images, minetest_installed, node_containers, require_or_skip, start_control, unique_node_name, wait_until, Api,
    ContainerReaper, Proc,
};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

/// Skips (locally) or fails (CI) without an engine; builds the images.
fn engine(images: &[&str]) -> bool {
    if !require_or_skip(docker_available(), "a docker engine (docker version)") {
        return false;
    }
    ensure_images(&bin(), images);
    true
}

struct Dev {
    proc_: Proc,
    api: Api,
    node: String,
    data: PathBuf,
    args: Vec<String>,
    _reaper: ContainerReaper,
}

/// `berth dev --driver docker` on a fresh node name.
fn dev(tmp: &tempfile::TempDir, extra: &[&str]) -> Dev {
    let node = unique_node_name("dk");
    let mut reaper = ContainerReaper::default();
    reaper.watch(&node);
    let data = tmp.path().join("d");
    let mut args: Vec<String> = ["--driver", "docker", "--node-name", &node, "--sync-interval", "1"].iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (proc_, url, token) = start_control(&bin(), "dev", &data, &a);
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    Dev { proc_, api, node, data, args, _reaper: reaper }
}

impl Dev {
    fn agent_dir(&self) -> PathBuf {
        self.data.join("agent")
    }
}

fn wait_status(api: &Api, name: &str, status: &str, secs: u64) -> Value {
    wait_until(Duration::from_secs(secs), &format!("{name} {status}"), || {
        let s = api.server(name);
        (s["status"] == status).then_some(s)
    })
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

fn inspect(id: &str) -> Value {
    let v: Value = serde_json::from_str(&docker(&["inspect", id])).unwrap();
    v[0].clone()
}

fn running_ids(node: &str) -> BTreeMap<String, String> {
    node_containers(node).into_iter().filter(|c| c.state == "running").map(|c| (c.server, c.id)).collect()
}

fn starts(agent_dir: &Path, server_id: &str) -> usize {
    std::fs::read_to_string(agent_dir.join("instances").join(server_id).join("starts.log")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn a_container_is_limited_labelled_published_and_reports_its_usage() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26100-26199"]);
    let s = d.api.create_server("lim", "fakegame", 256, json!({"alloc_mib": 120, "max_players": 9}));
    let id = s["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    d.api.ok("POST", "/v1/servers/lim/start", None);
    let running = wait_status(&d.api, "lim", "running", 60);
    eprintln!("start to running through the docker driver: {:?}", t0.elapsed());
    let port = running["port"].as_u64().unwrap() as u16;

    let cs = node_containers(&d.node);
    assert_eq!(cs.len(), 1, "{cs:?}");
    let c = inspect(&cs[0].id);
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["berth.server"], id.as_str());
    assert_eq!(labels["berth.generation"], running["generation"].to_string().as_str());
    assert_eq!(labels["berth.node"], d.node.as_str());
    assert_eq!(labels["berth.memory_mib"], "256");
    let h = &c["HostConfig"];
    assert_eq!(h["Memory"], 256 * 1024 * 1024, "the hard limit is the reservation");
    assert_eq!(h["MemorySwap"], h["Memory"], "no swap beyond it");
    assert_eq!(h["RestartPolicy"]["Name"], "no", "berth decides restarts, not the engine");
    assert_eq!(h["PortBindings"][format!("{port}/tcp")][0]["HostPort"], port.to_string().as_str());
    let data_dir = d.agent_dir().join("instances").join(&id);
    assert_eq!(h["Binds"][0], format!("{}:/data", std::fs::canonicalize(&data_dir).unwrap().display()).as_str());

    // The published port answers the Minecraft server-list ping from the host.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ping = rt
        .block_on(berth_agent::probe::minecraft_ping(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(5)))
        .expect("ping through the published port");
    assert_eq!(ping.max_players, 9, "{ping:?}");
    // The world is written through the bind mount into the agent's data dir.
    assert_eq!(starts(&d.agent_dir(), &id), 1);

    // The engine's per-container usage reaches the server record.
    let used = wait_until(Duration::from_secs(20), "usage from the engine", || d.api.server("lim")["used_mib"].as_u64().filter(|u| *u >= 120));
    assert!(used < 256, "usage {used} stays under the limit");
    d.api.ok("POST", "/v1/servers/lim/stop", None);
    let stopped = wait_status(&d.api, "lim", "stopped", 30);
    assert_eq!(stopped["last_exit"], json!({"reason": "stopped", "code": 0}), "SIGTERM reached the workload through the init");
    wait_until(Duration::from_secs(10), "the ended container removed", || node_containers(&d.node).is_empty().then_some(()));
    assert!(data_dir.join("starts.log").exists(), "the data dir outlives the container");
}

#[test]
fn a_container_is_not_ready_while_only_the_engines_proxy_accepts_on_its_port() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26800-26899"]);
    d.api.create_server("slow", "fakegame", 128, json!({"start_delay_ms": 4000}));
    d.api.ok("POST", "/v1/servers/slow/start", None);
    let port = wait_until(Duration::from_secs(30), "the container to run", || {
        let s = d.api.server("slow");
        (running_ids(&d.node).len() == 1).then(|| s["port"].as_u64()).flatten()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let proxied = std::net::TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port as u16)), Duration::from_secs(2));
    assert!(proxied.is_ok(), "the engine's proxy accepts on the published port before the server listens");
    assert_eq!(d.api.server("slow")["status"], "starting", "a connect through the proxy is not readiness");
    wait_status(&d.api, "slow", "running", 30);
}

#[test]
fn containers_the_incident_two_of_three_run_and_survive_kill9_and_restart() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = dev(&tmp, &["--memory-mib", "2500", "--ports", "26200-26299"]);
    let api = d.api.clone();
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
    let m = wait_until(Duration::from_secs(60), "two running, one queued", || {
        let m = by_status(&api);
        (count(&m, "running") == 2 && count(&m, "queued") == 1).then_some(m)
    });
    let queued_id = m["queued"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);
    let before = running_ids(&d.node);
    assert_eq!(before.len(), 2, "exactly two containers run: {before:?}");
    assert_eq!(node_containers(&d.node).len(), 2, "and no other container exists");

    // kill -9 of berth dev: the containers keep running.
    d.proc_.kill9();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(running_ids(&d.node), before, "containers died with berth");

    // Restart on the same data dir: adopted, not restarted.
    let a: Vec<&str> = d.args.iter().map(String::as_str).collect();
    let (_dev2, url2, token) = start_control(&bin(), "dev", &d.data, &a);
    let api = Api::new(&url2, &token);
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048, "reservations are rows, they survive the restart");
    wait_until(Duration::from_secs(10), "the agent re-registered", || {
        let (_, ev) = api.call("GET", "/v1/events?kind=node_registered", None);
        (ev["events"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(running_ids(&d.node), before, "the same containers run after the restart");
    assert_eq!(node_containers(&d.node).len(), 2, "no new container");
    for sid in before.keys() {
        assert_eq!(starts(&d.agent_dir(), sid), 1, "{sid} was started more than once");
        assert_eq!(api.server(sid)["status"], "running");
    }
    let m = by_status(&api);
    assert_eq!((count(&m, "running"), count(&m, "queued")), (2, 1), "{m:?}");
    assert_eq!(m["queued"][0]["id"], queued_id.as_str());
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);
    assert!(api.violations().is_empty());

    // The adopted containers are still under control: stopping one lets the
    // queued server start in a container of its own.
    let victim = before.keys().next().unwrap().clone();
    api.ok("POST", &format!("/v1/servers/{victim}/stop"), None);
    wait_until(Duration::from_secs(60), "the queued server to run", || {
        (api.server(&queued_id)["status"] == "running" && api.server(&victim)["status"] == "stopped").then_some(())
    });
    let now = running_ids(&d.node);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains_key(&victim) && now.contains_key(&queued_id), "{now:?}");
    assert_eq!(api.nodes()[0]["memory"]["reserved_mib"], 2048);
    assert!(api.violations().is_empty());
}

#[test]
fn an_oom_kill_by_the_kernel_crashes_the_server_with_reason_oom_and_frees_its_reservation() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26300-26399"]);
    d.api.create_server("hog", "fakegame", 64, json!({"alloc_mib": 400}));
    d.api.ok("POST", "/v1/servers/hog/start", None);
    let s = wait_status(&d.api, "hog", "crashed", 60);
    assert_eq!(s["last_exit"]["reason"], "oom", "{s}");
    assert_eq!(s["node_id"], Value::Null);
    assert_eq!(d.api.nodes()[0]["memory"]["reserved_mib"], 0, "the reservation is released");
    let (_, ev) = d.api.call("GET", "/v1/events?server=hog&kind=server_crashed", None);
    let evs = ev["events"].as_array().unwrap();
    assert_eq!(evs.len(), 1, "{ev}");
    assert!(evs[0]["message"].as_str().unwrap().contains("oom"), "{ev}");
    let log = std::fs::read_to_string(&d.proc_.log).unwrap();
    assert!(!log.contains("memory limit exceeded; killing"), "the kernel killed it at the container's limit, not the agent:\n{log}");

    // A plain crash is told apart from the OOM kill by its exit code.
    d.api.create_server("crashy", "fakegame", 128, json!({"crash_after_ms": 700}));
    d.api.ok("POST", "/v1/servers/crashy/start", None);
    wait_status(&d.api, "crashy", "running", 60);
    let s = wait_status(&d.api, "crashy", "crashed", 30);
    assert_eq!(s["last_exit"], json!({"reason": "exited", "code": 3}));
    assert!(d.api.violations().is_empty());
}

/// Starts a container by hand with berth's labels, as an operator or a
/// lost create call might leave one. The agent may remove it between the
/// engine's create and start, which fails `docker run` ("marked for
/// removal", "no such container"): that is the behaviour under test, so
/// only other failures fail the test.
fn hand_made_container(node: &str, server: &str, generation: u64) {
    let out = std::process::Command::new("docker")
        .args(["run", "-d"])
        .args(["--label", &format!("berth.server={server}"), "--label", &format!("berth.generation={generation}")])
        .args(["--label", &format!("berth.node={node}"), "--label", "berth.memory_mib=64", "-m", "64m"])
        .args(["berth-fakegame:local", "fakegame", "--port", "1", "--data-dir", "/tmp"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(out.status.success() || err.contains("marked for removal") || err.contains("no such container"), "docker run: {err}");
}

#[test]
fn a_stale_generation_or_unknown_container_started_by_hand_is_removed_within_one_sync() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26400-26499"]);
    let s = d.api.create_server("w", "fakegame", 128, json!({}));
    let id = s["id"].as_str().unwrap().to_string();
    d.api.ok("POST", "/v1/servers/w/start", None);
    let running = wait_status(&d.api, "w", "running", 60);
    let generation = running["generation"].as_u64().unwrap();
    let live = running_ids(&d.node);
    assert_eq!(live.len(), 1);

    let t0 = Instant::now();
    hand_made_container(&d.node, &id, generation - 1);
    hand_made_container(&d.node, "srv_00000000deadbeef", 1);
    // Two `docker run`s (up to a second each on a loaded engine) and one
    // sync interval (1 s) from the start of their creation.
    wait_until(Duration::from_secs(5), "hand-made containers removed within a sync", || {
        let hand_made = node_containers(&d.node)
            .into_iter()
            .filter(|c| (c.server == id && c.generation != generation.to_string()) || c.server == "srv_00000000deadbeef")
            .count();
        (hand_made == 0).then_some(())
    });
    eprintln!("hand-made labelled containers removed {:?} after their creation began", t0.elapsed());
    assert_eq!(running_ids(&d.node), live, "the current generation was left alone");
    assert_eq!(node_containers(&d.node).len(), 1);
    assert_eq!(d.api.server("w")["status"], "running");
    assert_eq!(starts(&d.agent_dir(), &id), 1);
}

#[test]
fn after_a_restart_a_stale_generation_is_adopted_then_stopped_and_removed_and_the_current_one_kept() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26900-26949"]);
    let s = d.api.create_server("w", "fakegame", 128, json!({}));
    let id = s["id"].as_str().unwrap().to_string();
    d.api.ok("POST", "/v1/servers/w/start", None);
    let running = wait_status(&d.api, "w", "running", 60);
    let generation = running["generation"].as_u64().unwrap();
    let live = running_ids(&d.node);
    d.proc_.kill9();

    // While berth is down, a container of the previous generation appears
    // with complete labels, as one from before a failover would have.
    let c = inspect(&live[&id]);
    let mut spec: Value = serde_json::from_str(c["Config"]["Labels"]["berth.spec"].as_str().unwrap()).unwrap();
    spec["generation"] = json!(generation - 1);
    let mut args = vec!["run".to_string(), "-d".into()];
    for (k, v) in c["Config"]["Labels"].as_object().unwrap() {
        let v = match k.as_str() {
            "berth.generation" => (generation - 1).to_string(),
            "berth.spec" => spec.to_string(),
            _ => v.as_str().unwrap().to_string(),
        };
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    args.extend(["--init", "berth-fakegame:local", "fakegame", "--port", "1", "--data-dir", "/tmp"].map(String::from));
    let stale = docker(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim().to_string();

    let a: Vec<&str> = d.args.iter().map(String::as_str).collect();
    let (_dev2, url2, token) = start_control(&bin(), "dev", &d.data, &a);
    let api = Api::new(&url2, &token);
    let t0 = Instant::now();
    wait_until(Duration::from_secs(15), "the stale generation stopped and removed", || (!node_containers(&d.node).iter().any(|c| c.id == stale)).then_some(()));
    eprintln!("adopted stale generation removed {:?} after the restart", t0.elapsed());
    // The restarted dev's log is the one that names the stale container.
    let logs: Vec<String> = d
        .data
        .read_dir()
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let log = logs.iter().find(|l| l.contains(&stale)).expect("a log names the stale container");
    let adopted = log.lines().any(|l| l.contains("adopted container") && l.contains(&stale));
    assert!(adopted, "it was adopted (then stopped by the agent), not swept:\n{log}");
    assert_eq!(running_ids(&d.node), live, "the current generation is the same container");
    assert_eq!(api.server("w")["status"], "running");
    assert_eq!(api.server("w")["generation"], generation);
    assert_eq!(starts(&d.agent_dir(), &id), 1);
}

#[test]
fn a_missing_image_fails_the_start_at_once_with_image_missing() {
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let templates = tmp.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(
        templates.join("ghost.toml"),
        "name = \"ghost\"\n[process]\ncommand = \"/bin/true\"\nready = \"alive\"\n[docker]\nimage = \"berth-no-such-image:never\"\n",
    )
    .unwrap();
    let dir = templates.display().to_string();
    let d = dev(&tmp, &["--memory-mib", "4096", "--ports", "26500-26599", "--templates-dir", &dir]);
    d.api.create_server("g", "ghost", 64, json!({}));
    d.api.ok("POST", "/v1/servers/g/start", None);
    let s = wait_status(&d.api, "g", "failed", 30);
    let err = s["last_error"].as_str().unwrap();
    assert!(err.starts_with("image_missing: ") && err.contains("berth-no-such-image:never"), "{err}");
    assert_eq!(s["attempts"], 0, "a permanent error is not retried");
    assert!(node_containers(&d.node).is_empty());
    let images = docker(&["images", "-q", "berth-no-such-image"]);
    assert!(images.trim().is_empty(), "nothing was pulled");
}

/// Answers every HTTP request on a unix socket as an engine of API `api`
/// would answer `GET /version`.
fn fake_engine(sock: &Path, api: &'static str) {
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let body = format!("{{\"Version\":\"1.12.0\",\"ApiVersion\":\"{api}\",\"MinAPIVersion\":\"1.12\"}}");
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
}

#[test]
fn an_engine_older_than_the_minimum_api_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("old-engine.sock");
    fake_engine(&sock, "1.24");
    let out = std::process::Command::new(bin())
        .args(["agent", "--control-plane", "http://127.0.0.1:9", "--token", "x", "--name", "old", "--driver", "docker"])
        .args(["--docker-socket", &sock.display().to_string(), "--data-dir", &tmp.path().join("a").display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("docker engine API 1.24 is older than 1.41, the minimum berth supports"), "{err}");
}

/// True if a UDP socket is bound to `port` in the network namespace of `pid`.
fn udp_bound_in(pid: u64, port: u64) -> bool {
    let hex = format!(":{port:04X}");
    ["udp", "udp6"].iter().any(|t| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1).is_some_and(|a| a.ends_with(&hex)))
    })
}

#[test]
fn minetest_runs_in_a_container_built_by_build_images_and_keeps_its_world() {
    if !require_or_skip(minetest_installed(), "/usr/games/minetestserver (apt-get install minetest-server)") || !engine(&["minetest"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = dev(&tmp, &["--memory-mib", "2048", "--ports", "26600-26699"]);
    let s = d.api.create_server("mt", "minetest", 512, json!({"game": "minetest_game"}));
    let id = s["id"].as_str().unwrap().to_string();
    d.api.ok("POST", "/v1/servers/mt/start", None);
    let running = wait_status(&d.api, "mt", "running", 90);
    let port = running["port"].as_u64().unwrap();
    let cs = node_containers(&d.node);
    assert_eq!(cs.len(), 1);
    let c = inspect(&cs[0].id);
    assert_eq!(c["Config"]["Image"], "berth-minetest:local");
    let pid = c["State"]["Pid"].as_u64().unwrap();
    assert!(udp_bound_in(pid, port), "minetest binds udp {port} in its container");
    let world = d.agent_dir().join("instances").join(&id).join("world");
    let world_mt = std::fs::read_to_string(world.join("world.mt")).expect("minetest wrote its world through the bind mount");
    assert!(world_mt.contains("minetest_game"));

    d.api.ok("POST", "/v1/servers/mt/stop", None);
    let stopped = wait_status(&d.api, "mt", "stopped", 60);
    assert_eq!(stopped["last_exit"], json!({"reason": "stopped", "code": 0}), "minetest saved and exited on SIGTERM");
    let log = std::fs::read_to_string(d.agent_dir().join("instances").join(&id).join("debug.txt")).unwrap();
    assert!(log.contains("Shutting down"), "minetest shut down cleanly");

    d.api.ok("POST", "/v1/servers/mt/start", None);
    let again = wait_status(&d.api, "mt", "running", 90);
    assert_eq!(again["generation"], 2);
    assert_eq!(std::fs::read_to_string(world.join("world.mt")).unwrap(), world_mt, "the same world");
    let log = std::fs::read_to_string(d.agent_dir().join("instances").join(&id).join("debug.txt")).unwrap();
    assert_eq!(log.matches("World at [/data/world]").count(), 2, "both runs used the mounted world");
    d.api.ok("POST", "/v1/servers/mt/stop", None);
    wait_status(&d.api, "mt", "stopped", 60);
    assert!(d.api.violations().is_empty());
}

/// The fakegame spec the control plane would send for a fresh server.
fn driver_spec(server: &str, port: u16) -> berth_core::template::InstanceSpec {
    let templates = berth_control::templates::Templates::load(None).unwrap();
    let t = templates.get("fakegame").unwrap();
    let s = berth_core::Server {
        id: berth_core::ServerId(server.into()),
        config: t.validate_config(None).unwrap(),
        status: berth_core::ServerStatus::Starting,
        generation: 1,
        port: Some(port),
        created_at: 0,
        updated_at: 0,
        ..berth_testkit::stopped_server(server, 128)
    };
    t.render(&s, port).unwrap()
}

#[test]
fn a_container_left_by_a_failed_create_is_removed_and_a_restarted_driver_adopts_the_rest() {
    use berth_agent::{DockerDriver, Driver, DriverError, Observed};
    if !engine(&["fakegame"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let node = unique_node_name("drv");
    let mut reaper = ContainerReaper::default();
    reaper.watch(&node);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let root = tmp.path().join("instances");
        let d = DockerDriver::connect("/var/run/docker.sock", &node, root.clone()).await.unwrap();
        let spec = driver_spec("srv_00000000000dead1", 26790);
        let key = (spec.server_id.clone(), spec.generation);

        // A container of this instance's name that the engine made although
        // the create call reported an error (here: made by hand beforehand).
        let name = format!("berth-{}-{}", key.0, key.1);
        docker(&["create", "--name", &name, "--label", &format!("berth.node={node}"), "berth-fakegame:local", "--help"]);
        let e = d.start(&spec).await.unwrap_err();
        assert!(matches!(e, DriverError::Transient(ref m) if m.contains("cannot create container")), "{e:?}");
        assert!(node_containers(&node).is_empty(), "the leftover was removed by name");

        // Now it starts, and is observed alive with its usage.
        d.start(&spec).await.unwrap();
        let id = node_containers(&node)[0].id.clone();
        let t0 = Instant::now();
        while !d.ready(&spec).await {
            assert!(t0.elapsed() < Duration::from_secs(30), "not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(matches!(d.observe_all().await.get(&key), Some(Observed::Alive { .. })));

        // A new driver over the same engine and node is a restarted agent.
        let d2 = DockerDriver::connect("/var/run/docker.sock", &node, root).await.unwrap();
        let adopted = d2.adopt().await.unwrap();
        assert_eq!(adopted.len(), 1);
        assert_eq!(adopted[0].0, spec, "the spec comes back from the labels");
        assert!(d2.ready(&spec).await, "readiness works on an adopted container");
        d2.stop(&spec).await.unwrap();
        let exit = loop {
            if let Some(Observed::Exited(e)) = d2.observe_all().await.get(&key) {
                break e.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "not stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(exit, berth_core::LastExit { reason: "exited".into(), code: Some(0) }, "SIGTERM, saved, exit 0");
        assert_eq!(node_containers(&node)[0].id, id, "an ended container stays until forgotten");
        d2.forget(&key).await;
        assert!(node_containers(&node).is_empty());
    });
}
