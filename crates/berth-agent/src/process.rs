//! The `process` driver: runs each instance as a plain process in its own
//! session and process group, so it outlives the agent, with its data dir
//! as working directory and its output in `berth-output.log` there.
//!
//! A pid record (`instance-<generation>.json`, written atomically) holds
//! the spec, pid and kernel start time; after an agent restart, `adopt`
//! re-attaches to every recorded process whose pid still has that start
//! time (so a reused pid is never mistaken for ours). Memory is limited by
//! a cgroup (v2, else v1) where the agent may create one; otherwise the
//! agent watches RSS and kills at the limit. This driver never decides
//! what runs, and never deletes a data dir.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_core::template::InstanceSpec;
use berth_core::{LastExit, ServerId};
use serde::{Deserialize, Serialize};

use crate::driver::{Driver, DriverError, Key, Observed};

const RECORD_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct PidRecord {
    version: u32,
    spec: InstanceSpec,
    pid: i32,
    start_time: u64,
    cgroup: Option<PathBuf>,
}

struct Proc {
    pid: i32,
    start_time: u64,
    /// Present when this agent run spawned the process (exit codes are
    /// known); absent for adopted processes.
    child: Option<Child>,
    record: PathBuf,
    cgroup: Option<PathBuf>,
    kill_reason: Option<String>,
    exited: Option<LastExit>,
}

pub struct ProcessDriver {
    root: PathBuf,
    berth_exe: PathBuf,
    cgroups: Option<Cgroups>,
    procs: Mutex<HashMap<Key, Proc>>,
    usage: Mutex<(Option<Instant>, HashMap<i32, u64>)>,
}

impl ProcessDriver {
    /// `root` holds one directory per server; `berth_exe` replaces
    /// `{berth_exe}` in commands.
    pub fn new(root: PathBuf, berth_exe: PathBuf, use_cgroups: bool) -> std::io::Result<ProcessDriver> {
        fs::create_dir_all(&root)?;
        // Instances run with their data dir as cwd, so every path handed to
        // them must be absolute.
        let root = fs::canonicalize(&root)?;
        let cgroups = if use_cgroups { Cgroups::detect() } else { None };
        match &cgroups {
            Some(c) => tracing::info!(root = %c.root.display(), v2 = c.v2, "memory limits through cgroups"),
            None => tracing::info!("no writable cgroup; memory limits by RSS watch"),
        }
        Ok(ProcessDriver { root, berth_exe, cgroups, procs: Mutex::new(HashMap::new()), usage: Mutex::new((None, HashMap::new())) })
    }

    fn record_path(&self, key: &Key) -> PathBuf {
        self.data_dir(&key.0).join(format!("instance-{}.json", key.1))
    }

    /// RSS per process group, refreshed at most once a second because it
    /// reads every /proc/<pid>/stat.
    fn group_rss(&self) -> HashMap<i32, u64> {
        let mut cache = self.usage.lock().expect("usage lock");
        if cache.0.is_none_or(|t| t.elapsed() > Duration::from_millis(900)) {
            cache.1 = scan_group_rss();
            cache.0 = Some(Instant::now());
        }
        cache.1.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
    pub rss_pages: u64,
}

/// Parses /proc/<pid>/stat. The command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
    })
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn scan_group_rss() -> HashMap<i32, u64> {
    let mut out: HashMap<i32, u64> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    let page = page_size();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Some(st) = read_stat(pid) {
            *out.entry(st.pgrp).or_default() += st.rss_pages * page;
        }
    }
    out
}

/// Pids of process-group leaders whose environment places them in a data
/// dir under `root` but which are not in `known`.
fn unrecorded_instances(root: &Path, known: &[i32]) -> Vec<i32> {
    let marker = format!("BERTH_DATA_DIR={}/", root.display());
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if known.contains(&pid) || pid == std::process::id() as i32 {
            continue;
        }
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else { continue };
        let in_root = env.split(|b| *b == 0).any(|kv| kv.starts_with(marker.as_bytes()));
        // Group leaders only: the instance itself; its helpers die with it.
        if in_root && read_stat(pid).is_some_and(|st| st.pgrp == pid && st.state != 'Z') {
            out.push(pid);
        }
    }
    out
}

pub(crate) fn alive(pid: i32, start_time: u64) -> bool {
    matches!(read_stat(pid), Some(st) if st.start_time == start_time && st.state != 'Z' && st.state != 'X')
}

fn classify(status: ExitStatus) -> LastExit {
    match (status.code(), status.signal()) {
        (Some(code), _) => LastExit { reason: "exited".into(), code: Some(code) },
        (None, Some(sig)) => LastExit { reason: "signaled".into(), code: Some(128 + sig) },
        _ => LastExit { reason: "exited".into(), code: None },
    }
}

pub(crate) fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => return None,
    })
}

pub(crate) fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; a negative pid
    // addresses the process group the instance leads (setsid made pid ==
    // pgid), so helpers it spawned are signalled too.
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn adopt(&self) -> Result<Vec<(InstanceSpec, Observed)>, DriverError> {
        let mut out = Vec::new();
        let dirs = fs::read_dir(&self.root).map_err(|e| DriverError::Transient(format!("cannot read {}: {e}", self.root.display())))?;
        let mut procs = self.procs.lock().expect("procs lock");
        for d in dirs.flatten() {
            let Ok(files) = fs::read_dir(d.path()) else { continue };
            for f in files.flatten() {
                let path = f.path();
                let name = f.file_name().to_string_lossy().to_string();
                if !(name.starts_with("instance-") && name.ends_with(".json")) {
                    continue;
                }
                let rec: PidRecord = match fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                    Some(r) => r,
                    None => {
                        tracing::warn!(path = %path.display(), "unreadable pid record left in place");
                        continue;
                    }
                };
                if rec.version != RECORD_VERSION {
                    tracing::warn!(path = %path.display(), version = rec.version, "pid record of another version left in place");
                    continue;
                }
                let key = (rec.spec.server_id.clone(), rec.spec.generation);
                let is_alive = alive(rec.pid, rec.start_time);
                let exited = (!is_alive).then(|| LastExit { reason: "exited".into(), code: None });
                tracing::info!(server = %key.0, generation = key.1, pid = rec.pid, alive = is_alive, "adopted instance");
                out.push((
                    rec.spec.clone(),
                    match &exited {
                        Some(e) => Observed::Exited(e.clone()),
                        None => Observed::Alive { used_mib: None },
                    },
                ));
                procs.insert(key, Proc { pid: rec.pid, start_time: rec.start_time, child: None, record: path, cgroup: rec.cgroup, kill_reason: None, exited });
            }
        }
        // A process spawned just before the previous agent died, before its
        // pid record was written, runs unknown to anyone and would hold its
        // port and its world: found by the data dir in its environment, it
        // is stopped.
        let known: Vec<i32> = procs.values().map(|p| p.pid).collect();
        drop(procs);
        for pid in unrecorded_instances(&self.root, &known) {
            tracing::warn!(pid, "stopping an instance that has no pid record (its agent died while starting it)");
            kill_group(pid, libc::SIGKILL);
        }
        Ok(out)
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let dir = self.data_dir(&spec.server_id);
        fs::create_dir_all(&dir).map_err(|e| DriverError::Transient(format!("cannot create {}: {e}", dir.display())))?;
        let dir_s = dir.to_string_lossy().to_string();
        let exe_s = self.berth_exe.to_string_lossy().to_string();
        let resolve = |s: &str| s.replace("{data_dir}", &dir_s).replace("{berth_exe}", &exe_s);
        let program = resolve(&spec.command);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("berth-output.log"))
            .map_err(|e| DriverError::Transient(format!("cannot open the output log: {e}")))?;
        let log2 = log.try_clone().map_err(|e| DriverError::Transient(e.to_string()))?;

        let cgroup = match &self.cgroups {
            Some(cg) => match cg.create(&key, spec.memory_mib.0) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "cgroup not created; falling back to RSS watch");
                    None
                }
            },
            None => None,
        };
        let procs_file = cgroup.as_ref().and_then(|p| CString::new(p.join("cgroup.procs").to_string_lossy().as_bytes()).ok());

        let mut cmd = Command::new(&program);
        cmd.args(spec.args.iter().map(|a| resolve(a)))
            .current_dir(&dir)
            .env_remove("BERTH_TOKEN")
            .envs(spec.env.iter().map(|(k, v)| (k.clone(), resolve(v))))
            .env("BERTH_SERVER_ID", spec.server_id.as_str())
            .env("BERTH_GENERATION", spec.generation.to_string())
            .env("BERTH_PORT", spec.port.to_string())
            .env("BERTH_MEMORY_MIB", spec.memory_mib.0.to_string())
            .env("BERTH_DATA_DIR", &dir_s)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (setsid, getpid, open, write, close) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(path) = &procs_file {
                    // Join the cgroup before exec so every byte the workload
                    // allocates is charged to it.
                    let mut buf = [0u8; 16];
                    let mut n = libc::getpid() as u32;
                    let mut i = buf.len();
                    loop {
                        i -= 1;
                        buf[i] = b'0' + (n % 10) as u8;
                        n /= 10;
                        if n == 0 {
                            break;
                        }
                    }
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => DriverError::Permanent(format!("cannot run {program}: {e}")),
            _ => DriverError::Transient(format!("cannot run {program}: {e}")),
        })?;
        let pid = child.id() as i32;
        let start_time = read_stat(pid).map(|s| s.start_time).unwrap_or(0);
        let record = self.record_path(&key);
        let rec = PidRecord { version: RECORD_VERSION, spec: spec.clone(), pid, start_time, cgroup: cgroup.clone() };
        if let Err(e) = write_atomic(&record, &serde_json::to_vec_pretty(&rec).expect("serializable")) {
            // Without a record the instance could not be adopted after an
            // agent restart, so it must not run at all.
            kill_group(pid, libc::SIGKILL);
            return Err(DriverError::Transient(format!("cannot write pid record {}: {e}", record.display())));
        }
        tracing::info!(server = %spec.server_id, generation = spec.generation, pid, program = %program, "started instance");
        self.procs.lock().expect("procs lock").insert(key, Proc { pid, start_time, child: Some(child), record, cgroup, kill_reason: None, exited: None });
        Ok(())
    }

    async fn observe_all(&self) -> HashMap<Key, Observed> {
        let groups = self.group_rss();
        let mut out = HashMap::new();
        let mut procs = self.procs.lock().expect("procs lock");
        for (key, p) in procs.iter_mut() {
            if let Some(e) = &p.exited {
                out.insert(key.clone(), Observed::Exited(e.clone()));
                continue;
            }
            let exit = match &mut p.child {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(classify(status)),
                    Ok(None) => None,
                    Err(_) => Some(LastExit { reason: "exited".into(), code: None }),
                },
                None => (!alive(p.pid, p.start_time)).then(|| LastExit { reason: "exited".into(), code: None }),
            };
            match exit {
                Some(mut e) => {
                    // Helpers the instance left in its group go with it.
                    kill_group(p.pid, libc::SIGKILL);
                    if let Some(r) = &p.kill_reason {
                        e.reason = r.clone();
                    } else if p.cgroup.as_deref().is_some_and(cgroup_oom_killed) {
                        e.reason = "oom".into();
                    }
                    p.exited = Some(e.clone());
                    out.insert(key.clone(), Observed::Exited(e));
                }
                None => {
                    let used_mib = groups.get(&p.pid).map(|b| b / (1024 * 1024));
                    out.insert(key.clone(), Observed::Alive { used_mib });
                }
            }
        }
        out
    }

    async fn stop(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let pid = match self.procs.lock().expect("procs lock").get(&key).filter(|p| p.exited.is_none()) {
            Some(p) => p.pid,
            None => return Ok(()),
        };
        if let Some((program, args)) = spec.stop_command.split_first() {
            // The stop command runs beside the instance, in its data dir; if
            // it does not end the instance, the agent kills it at the stop
            // deadline.
            let dir = self.data_dir(&spec.server_id);
            let dir_s = dir.to_string_lossy().to_string();
            let exe_s = self.berth_exe.to_string_lossy().to_string();
            let resolve = |s: &str| s.replace("{data_dir}", &dir_s).replace("{berth_exe}", &exe_s);
            let mut child = Command::new(resolve(program))
                .args(args.iter().map(|a| resolve(a)))
                .current_dir(&dir)
                .env_remove("BERTH_TOKEN")
                .env("BERTH_PORT", spec.port.to_string())
                .env("BERTH_DATA_DIR", &dir_s)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| DriverError::Transient(format!("cannot run the stop command: {e}")))?;
            // Reap it in the background so it does not linger as a zombie.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(());
        }
        let signal = &spec.stop_signal;
        let sig = signal_number(signal).ok_or_else(|| DriverError::Permanent(format!("unknown stop signal {signal}")))?;
        kill_group(pid, sig);
        Ok(())
    }

    async fn kill(&self, key: &Key, reason: &str) -> Result<(), DriverError> {
        let mut procs = self.procs.lock().expect("procs lock");
        if let Some(p) = procs.get_mut(key).filter(|p| p.exited.is_none()) {
            p.kill_reason.get_or_insert_with(|| reason.to_string());
            kill_group(p.pid, libc::SIGKILL);
        }
        Ok(())
    }

    async fn forget(&self, key: &Key) {
        let p = self.procs.lock().expect("procs lock").remove(key);
        if let Some(p) = p {
            let _ = fs::remove_file(&p.record);
            if let Some(cg) = p.cgroup {
                let _ = fs::remove_dir(cg);
            }
        }
    }

    fn fence_handle(&self, key: &Key) -> Option<crate::watchdog::FenceHandle> {
        let procs = self.procs.lock().expect("procs lock");
        procs.get(key).filter(|p| p.exited.is_none()).map(|p| crate::watchdog::FenceHandle { pid: p.pid, start_time: p.start_time })
    }

    fn enforces_memory_limit(&self, key: &Key) -> bool {
        self.procs.lock().expect("procs lock").get(key).is_some_and(|p| p.cgroup.is_some())
    }

    fn data_dir(&self, server: &ServerId) -> PathBuf {
        self.root.join(server.as_str())
    }
}

/// Where the agent may create per-instance memory cgroups.
struct Cgroups {
    root: PathBuf,
    v2: bool,
}

impl Cgroups {
    fn detect() -> Option<Cgroups> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 { PathBuf::from("/sys/fs/cgroup/berth") } else { PathBuf::from("/sys/fs/cgroup/memory/berth") };
        if !v2 && !Path::new("/sys/fs/cgroup/memory").is_dir() {
            return None;
        }
        if fs::create_dir_all(&root).is_err() {
            return None;
        }
        if v2 {
            // Delegate the memory controller to our subtree.
            let _ = fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
            if fs::write(root.join("cgroup.subtree_control"), "+memory").is_err() {
                return None;
            }
        }
        Some(Cgroups { root, v2 })
    }

    fn create(&self, key: &Key, memory_mib: u64) -> std::io::Result<PathBuf> {
        let dir = self.root.join(format!("{}-{}", key.0, key.1));
        fs::create_dir_all(&dir)?;
        let bytes = (memory_mib * 1024 * 1024).to_string();
        if self.v2 {
            fs::write(dir.join("memory.max"), &bytes)?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        } else {
            fs::write(dir.join("memory.limit_in_bytes"), &bytes)?;
            // No swap: limit memory+swap to the same value where the kernel
            // accounts swap at all.
            let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), &bytes);
        }
        Ok(dir)
    }
}

/// True if the kernel OOM-killed a process of this cgroup.
fn cgroup_oom_killed(dir: &Path) -> bool {
    for file in ["memory.events", "memory.oom_control"] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            for line in text.lines() {
                if let Some(n) = line.strip_prefix("oom_kill ") {
                    return n.trim().parse::<u64>().unwrap_or(0) > 0;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let text = "1234 (my (weird) game) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 123456789 2560 18446744073709551615";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.pgrp, 1234);
        assert_eq!(st.start_time, 987654);
        assert_eq!(st.rss_pages, 2560);
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("INT"), Some(libc::SIGINT));
        assert_eq!(signal_number("SIGFOO"), None);
    }

    fn spec(dir_cmd: &str, args: &[&str]) -> InstanceSpec {
        InstanceSpec {
            server_id: ServerId("srv_00000000000000aa".into()),
            generation: 1,
            template: "command".into(),
            memory_mib: berth_core::MemMib(64),
            port: 1,
            command: dir_cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            stop_signal: "SIGTERM".into(),
            stop_command: vec![],
            stop_timeout_ms: 1000,
            ready: berth_core::template::ReadyCheck::Alive,
            ready_timeout_ms: 1000,
            stop_after_ms: 300_000,
            docker: None,
            permanent_exit_codes: vec![],
        }
    }

    #[tokio::test]
    async fn start_observe_stop_and_adopt_after_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path().join("i"), "/bin/true".into(), false).unwrap();
        let s = spec("/bin/sleep", &["30"]);
        let key = (s.server_id.clone(), 1);
        d.start(&s).await.unwrap();
        assert!(matches!(d.observe_all().await.get(&key), Some(Observed::Alive { .. })));
        let pid = d.procs.lock().unwrap().get(&key).unwrap().pid;

        // A new driver over the same directory is a restarted agent.
        let d2 = ProcessDriver::new(tmp.path().join("i"), "/bin/true".into(), false).unwrap();
        let adopted = d2.adopt().await.unwrap();
        assert_eq!(adopted.len(), 1);
        assert!(matches!(adopted[0].1, Observed::Alive { .. }));
        d2.stop(&s).await.unwrap();
        let mut exited = None;
        for _ in 0..50 {
            if let Some(Observed::Exited(e)) = d2.observe_all().await.get(&key) {
                exited = Some(e.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(exited.is_some(), "adopted process {pid} did not stop");
        // The first driver still owns the child: reap it.
        let _ = d.procs.lock().unwrap().get_mut(&key).unwrap().child.as_mut().unwrap().wait();
        d2.forget(&key).await;
        assert!(!d2.record_path(&key).exists());
    }

    #[tokio::test]
    async fn an_instance_without_a_pid_record_is_stopped_on_adoption() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path().join("i"), "/bin/true".into(), false).unwrap();
        let s = spec("/bin/sleep", &["30"]);
        let key = (s.server_id.clone(), 1);
        d.start(&s).await.unwrap();
        let pid = d.procs.lock().unwrap().get(&key).unwrap().pid;
        // As if the agent died between spawn and writing the record.
        std::fs::remove_file(d.record_path(&key)).unwrap();
        let d2 = ProcessDriver::new(tmp.path().join("i"), "/bin/true".into(), false).unwrap();
        assert!(d2.adopt().await.unwrap().is_empty());
        let mut dead = false;
        for _ in 0..50 {
            let _ = d.procs.lock().unwrap().get_mut(&key).unwrap().child.as_mut().unwrap().try_wait();
            if !alive(pid, read_stat(pid).map(|s| s.start_time).unwrap_or(0)) {
                dead = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(dead, "the unrecorded instance {pid} was stopped");
    }

    #[tokio::test]
    async fn a_missing_binary_is_a_permanent_error() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path().to_path_buf(), "/bin/true".into(), false).unwrap();
        let e = d.start(&spec("/nonexistent/game", &[])).await.unwrap_err();
        assert!(matches!(e, DriverError::Permanent(_)), "{e:?}");
    }

    #[tokio::test]
    async fn exit_codes_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path().to_path_buf(), "/bin/true".into(), false).unwrap();
        let s = spec("/bin/sh", &["-c", "exit 7"]);
        d.start(&s).await.unwrap();
        let key = (s.server_id.clone(), 1);
        for _ in 0..100 {
            if let Some(Observed::Exited(e)) = d.observe_all().await.get(&key) {
                assert_eq!(e.code, Some(7));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("exit not observed");
    }
}
