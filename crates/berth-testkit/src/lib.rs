//! berth-testkit: helpers for end-to-end tests that run the real `berth`
//! binary. It starts control planes, agents and `berth dev` on port 0 in
//! temp dirs, talks HTTP to them, waits for conditions with bounded
//! timeouts, and cleans up every process it caused by pid: the berth
//! processes it spawned and the instance process groups recorded in pid
//! records under the data dirs it was given. It never kills by name.
//! It also holds the plain server rows that store and committer tests
//! insert directly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The command line of `berth agent` as the end-to-end tests run it: node
/// `name` with `memory_mib` and `ports`, its data in `dir`, syncing every
/// `sync_s` seconds, then `extra` (most tests add `--no-cgroups`).
#[allow(clippy::too_many_arguments)]
pub fn agent_args(control_plane: &str, token: &str, name: &str, dir: &Path, memory_mib: u64, ports: &str, sync_s: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "agent",
        "--control-plane",
        control_plane,
        "--token",
        token,
        "--name",
        name,
        "--data-dir",
        &dir.display().to_string(),
        "--memory-mib",
        &memory_mib.to_string(),
        "--ports",
        ports,
        "--sync-interval",
        &sync_s.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A spawned berth process, killed (SIGKILL, by pid) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills, on drop, every instance recorded under the given agent data dirs
/// (their process groups, by the pids in the records) and removes the
/// memory cgroups the records name.
#[derive(Default)]
pub struct InstanceReaper {
    dirs: Vec<PathBuf>,
}

impl InstanceReaper {
    pub fn watch(&mut self, agent_data_dir: &Path) {
        self.dirs.push(agent_data_dir.to_path_buf());
    }

    pub fn kill_all(&self) {
        for d in &self.dirs {
            if let Some(pid) = watchdog_pid(d) {
                // SAFETY: kill(2) of the watchdog pid the agent recorded.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        for d in &self.dirs {
            for rec in pid_records(d) {
                if rec.pid > 1 {
                    // SAFETY: kill(2) of a process group recorded by the agent.
                    unsafe {
                        libc::kill(-rec.pid, libc::SIGKILL);
                    }
                }
            }
        }
        // Also instances with no pid record (an agent killed between spawn
        // and record): found by the data dir in their environment.
        for d in &self.dirs {
            let Ok(root) = std::fs::canonicalize(d.join("instances")) else { continue };
            let marker = format!("BERTH_DATA_DIR={}/", root.display());
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
                if env.split(|b| *b == 0).any(|kv| kv.starts_with(marker.as_bytes())) {
                    // SAFETY: kill(2) of a process this test's agent started.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for d in &self.dirs {
            for rec in pid_records(d) {
                if let Some(cg) = rec.cgroup {
                    let _ = std::fs::remove_dir(cg);
                }
            }
        }
    }
}

impl Drop for InstanceReaper {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The fence watchdog's pid, from `DIR/watchdog.pid`, if it still runs
/// with the recorded start time.
pub fn watchdog_pid(agent_data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(agent_data_dir.join("watchdog.pid")).ok()?;
    let mut it = text.split_whitespace();
    let pid: i32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    (fields.get(19)?.parse::<u64>().ok()? == start && pid_alive(pid)).then_some(pid)
}

#[derive(Debug, Clone)]
pub struct PidRecord {
    pub server_id: String,
    pub generation: u64,
    pub pid: i32,
    pub cgroup: Option<PathBuf>,
}

/// Reads every `instance-*.json` under `agent_data_dir/instances/*/`.
pub fn pid_records(agent_data_dir: &Path) -> Vec<PidRecord> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(agent_data_dir.join("instances")) else { return out };
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if !(name.starts_with("instance-") && name.ends_with(".json")) {
                continue;
            }
            let Ok(v) = std::fs::read(f.path()).map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)) else { continue };
            out.push(PidRecord {
                server_id: v["spec"]["server_id"].as_str().unwrap_or_default().to_string(),
                generation: v["spec"]["generation"].as_u64().unwrap_or(0),
                pid: v["pid"].as_i64().unwrap_or(0) as i32,
                cgroup: v["cgroup"].as_str().map(PathBuf::from),
            });
        }
    }
    out
}

/// True if a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(|x| x.to_string()));
            !matches!(state.as_deref(), Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

pub fn spawn(bin: &Path, args: &[String], log: &Path, envs: &[(&str, &str)]) -> Proc {
    if let Some(i) = args.iter().position(|a| a == "--ports") {
        if let Some(max) = args.get(i + 1).and_then(|r| r.split('-').nth(1)).and_then(|m| m.parse::<u16>().ok()) {
            assert_below_ephemeral(max);
        }
    }
    let out = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).env("RUST_LOG", "info,sqlx=warn");
    cmd.env_remove("BERTH_TOKEN").env_remove("BERTH_ADDR");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn berth");
    Proc { child, name: args.first().cloned().unwrap_or_default(), log: log.to_path_buf() }
}

/// Waits for `DATA_DIR/addr` (written once the listener is bound) and for
/// /healthz to answer, then returns the URL.
pub fn wait_for_addr(data_dir: &Path, proc_: &mut Proc, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = proc_.child.try_wait() {
            panic!("{} exited early with {status}:\n{}", proc_.name, proc_.log_tail());
        }
        if let Ok(a) = std::fs::read_to_string(data_dir.join("addr")) {
            let url = a.trim().to_string();
            if reqwest::blocking::get(format!("{url}/healthz")).map(|r| r.status().is_success()).unwrap_or(false) {
                return url;
            }
        }
        assert!(Instant::now() < deadline, "{} did not come up:\n{}", proc_.name, proc_.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `berth dev` (or `control-plane`) in `data_dir`, listening on port 0.
pub fn start_control(bin: &Path, mode: &str, data_dir: &Path, extra: &[&str]) -> (Proc, String, String) {
    start_control_on(bin, mode, data_dir, "127.0.0.1:0", extra)
}

/// Like `start_control`, on a given address (to come back where agents
/// expect it after a restart).
pub fn start_control_on(bin: &Path, mode: &str, data_dir: &Path, listen: &str, extra: &[&str]) -> (Proc, String, String) {
    std::fs::create_dir_all(data_dir).unwrap();
    let _ = std::fs::remove_file(data_dir.join("addr"));
    let mut args = vec![mode.to_string(), "--data-dir".into(), data_dir.display().to_string(), "--listen".into(), listen.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = data_dir.join(format!("{mode}-{}.log", unique()));
    let mut p = spawn(bin, &args, &log, &[]);
    let url = wait_for_addr(data_dir, &mut p, Duration::from_secs(30));
    let token = std::fs::read_to_string(data_dir.join("admin.token")).expect("admin.token").trim().to_string();
    (p, url, token)
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// A blocking JSON client for tests; returns status and body for every
/// call so tests can assert on errors too.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Api {
        Api { url: url.to_string(), token: token.to_string(), http: reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap() }
    }

    pub fn with_token(&self, token: &str) -> Api {
        Api { token: token.to_string(), ..self.clone() }
    }

    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>, token: Option<&str>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_vec());
        }
        let resp = req.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        self.raw(method, path, bytes.as_deref(), Some(&self.token))
    }

    /// Like `call`, but panics unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }

    pub fn create_server(&self, name: &str, template: &str, memory: u64, config: Value) -> Value {
        self.ok("POST", "/v1/servers", Some(&serde_json::json!({"name": name, "template": template, "memory_mib": memory, "config": config})))
    }

    pub fn server(&self, id: &str) -> Value {
        self.ok("GET", &format!("/v1/servers/{id}"), None)
    }

    pub fn servers(&self) -> Vec<Value> {
        self.ok("GET", "/v1/servers", None)["servers"].as_array().cloned().unwrap_or_default()
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.ok("GET", "/v1/nodes", None)["nodes"].as_array().cloned().unwrap_or_default()
    }

    pub fn status_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in self.servers() {
            *m.entry(s["status"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
        m
    }

    /// `/metrics` (no token), as (name with labels, value) pairs.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let text = self.http.get(format!("{}/metrics", self.url)).send().unwrap().text().unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN))))
            .collect()
    }

    /// The value of the one metric line whose name-and-labels starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        let m: Vec<_> = self.metrics().into_iter().filter(|(k, _)| k.starts_with(prefix)).collect();
        assert_eq!(m.len(), 1, "metric {prefix}: {m:?}");
        m[0].1
    }

    pub fn violations(&self) -> Vec<Value> {
        self.ok("GET", "/v1/invariants", None)["violations"].as_array().cloned().unwrap_or_default()
    }

    pub fn create_token(&self, kind: &str, tenant: Option<&str>) -> String {
        let v = self.ok("POST", "/v1/tokens", Some(&serde_json::json!({"kind": kind, "tenant": tenant})));
        v["token"].as_str().unwrap().to_string()
    }
}

/// Polls `cond` every 50 ms until it returns `Some`, or panics with `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True if `minetestserver` from Debian's package is installed.
pub fn minetest_installed() -> bool {
    Path::new("/usr/games/minetestserver").exists()
}

/// In CI a missing tool is a failure, not a skip.
pub fn require_or_skip(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI but missing; .ci/run installs it");
    }
    eprintln!("skipping: {what} is not installed");
    false
}

/// A throwaway PostgreSQL cluster under a temp dir, on a free loopback
/// port, started from the installed server binaries (`initdb`,
/// `postgres`). When the tests run as root it runs as the `postgres` user,
/// as PostgreSQL refuses root. Stopped by pid on drop.
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    uid_gid: Option<(u32, u32)>,
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|e| e.path().join("bin")).collect();
    versions.retain(|p| p.join("initdb").exists() && p.join("postgres").exists());
    versions.sort();
    versions.pop()
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgServer {
    /// True if PostgreSQL's server binaries are installed.
    pub fn available() -> bool {
        pg_bin_dir().is_some()
    }

    /// Starts a new cluster, or returns `None` if PostgreSQL is not installed.
    pub fn start() -> Option<PgServer> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("berth-pg").tempdir().unwrap();
        let uid_gid = postgres_user();
        if let Some((uid, gid)) = uid_gid {
            let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: chown(2) on a path we just created.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, gid) }, 0, "chown of the cluster dir");
        }
        let mut init = Command::new(bin.join("initdb"));
        init.args(["-D", &dir.path().join("data").display().to_string(), "-U", "berth", "-A", "trust", "-E", "UTF8", "--no-sync"]);
        if let Some((uid, gid)) = uid_gid {
            use std::os::unix::process::CommandExt;
            init.uid(uid).gid(gid);
        }
        let out = init.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = PgServer { port: free_port(), bin, dir, child: None, uid_gid };
        pg.resume();
        Some(pg)
    }

    /// Starts (again) the server process on the same data and port.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.path().join(format!("postgres-{}.log", unique()))).unwrap();
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.args([
            "-D",
            &self.dir.path().join("data").display().to_string(),
            "-p",
            &self.port.to_string(),
            "-k",
            &self.dir.path().display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        if let Some((uid, gid)) = self.uid_gid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn().expect("start postgres"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.psql("postgres", "SELECT 1") {
            if Instant::now() > deadline {
                panic!("postgres did not accept connections within 60s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let mut logs: Vec<PathBuf> =
            std::fs::read_dir(self.dir.path()).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
        logs.sort();
        logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect::<Vec<_>>().join("\n---\n")
    }

    /// Fast shutdown (SIGINT) and wait; the data stays for `resume`.
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the postgres postmaster we spawned.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("postgres did not shut down within 60s:\n{}", self.log_tail());
        }
    }

    fn psql(&self, db: &str, sql: &str) -> bool {
        Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "berth", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Creates a fresh database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "plain database names only");
        assert!(self.psql("postgres", &format!("CREATE DATABASE {name}")), "create database {name}");
        format!("postgres://berth@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Instance port ranges used by tests must stay below the kernel's
/// ephemeral range, or outgoing connections of the test itself occupy
/// them and starts fail their preflight.
pub fn assert_below_ephemeral(port: u16) {
    let lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<u16>().ok()))
        .unwrap_or(32768);
    assert!(port < lo, "test port {port} is inside the ephemeral range starting at {lo}");
}
// ---- Docker ----

/// True if the docker CLI is installed and its engine answers.
pub fn docker_available() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `docker ARGS` and returns its stdout; panics on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Builds the test images (`scripts/build-images`) from `berth_bin`,
/// once per test process; the script leaves an image whose source is
/// unchanged as it is.
pub fn ensure_images(berth_bin: &Path, which: &[&str]) {
    static LOCK: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut done = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = which.iter().copied().filter(|w| !done.iter().any(|d| d == w)).collect();
    if missing.is_empty() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-images");
    let out = Command::new(&script).args(&missing).env("BERTH_BIN", berth_bin).output().expect("run scripts/build-images");
    assert!(out.status.success(), "scripts/build-images {missing:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    done.extend(missing.iter().map(|s| s.to_string()));
}

/// A node name no other test (or test run) uses, so the containers a test
/// causes are exactly those labelled with it.
pub fn unique_node_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// One container as `docker ps` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub state: String,
    pub server: String,
    pub generation: String,
}

/// Containers labelled `berth.node=<node>`, running or not.
pub fn node_containers(node: &str) -> Vec<ContainerInfo> {
    let filter = format!("label=berth.node={node}");
    docker(&["ps", "-a", "--no-trunc", "--filter", &filter, "--format", "{{.ID}} {{.State}} {{.Label \"berth.server\"}} {{.Label \"berth.generation\"}}"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(ContainerInfo {
                id: f.first()?.to_string(),
                state: f.get(1)?.to_string(),
                server: f.get(2).unwrap_or(&"").to_string(),
                generation: f.get(3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Removes, on drop, every container labelled with one of the watched
/// node names: exactly the containers the test caused.
#[derive(Default)]
pub struct ContainerReaper {
    nodes: Vec<String>,
}

impl ContainerReaper {
    pub fn watch(&mut self, node: &str) {
        self.nodes.push(node.to_string());
    }
}

impl Drop for ContainerReaper {
    fn drop(&mut self) {
        for n in &self.nodes {
            let ids: Vec<String> = Command::new("docker")
                .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label=berth.node={n}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
                .unwrap_or_default();
            if !ids.is_empty() {
                let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).stdout(Stdio::null()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// A test host: a network namespace joined to this one by a veth pair
/// (`10.231.N.1` here, `10.231.N.2` inside). Processes started with
/// `command` run inside it; `cut` and `heal` take the link down and up.
/// Removed on drop. Addresses are only those of the test's own hosts.
pub struct NetNs {
    pub name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl NetNs {
    pub fn available() -> bool {
        Command::new("ip").args(["netns", "list"]).output().map(|o| o.status.success()).unwrap_or(false)
    }

    pub fn new() -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = (std::process::id() % 100_000) * 10 + n;
        let subnet = (std::process::id() * 7 + n * 13) % 250 + 1;
        let ns =
            NetNs { name: format!("berth-t{tag}"), host_if: format!("bh{tag}"), host_ip: format!("10.231.{subnet}.1"), ns_ip: format!("10.231.{subnet}.2") };
        let peer = format!("bn{tag}");
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Arguments that run `program args…` inside the namespace through
    /// `ip netns exec`, which execs in place (the pid is the program's).
    pub fn wrap(&self, program: &Path, args: &[String]) -> Vec<String> {
        let mut v = vec!["netns".to_string(), "exec".into(), self.name.clone(), program.display().to_string()];
        v.extend(args.iter().cloned());
        v
    }

    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A stopped server row named `name` of `mib` MiB, its id derived from the
/// name, for tests that insert servers into a store directly.
pub fn stopped_server(name: &str, mib: u64) -> berth_core::Server {
    use berth_core::{MemMib, Server, ServerId, ServerStatus};
    Server {
        id: ServerId(format!("srv_{:016x}", name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)))),
        tenant: "default".into(),
        name: name.into(),
        template: "fakegame".into(),
        memory_mib: MemMib(mib),
        config: Default::default(),
        status: ServerStatus::Stopped,
        node_id: None,
        generation: 0,
        port: None,
        last_exit: None,
        queued_at: None,
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
        used_mib: None,
        stop_after_ms: 300_000,
        stateless: false,
        plan: "standard".into(),
        price_per_gib_hour: 100,
        home_node: None,
        restart_policy: Default::default(),
        created_at: 1,
        updated_at: 1,
    }
}
