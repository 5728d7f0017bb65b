//! The fence watchdog: a small separate process per node that stops every
//! instance whose disconnect window has passed without a lease renewal,
//! even when the agent itself is hung, paused (SIGSTOP) or dead.
//!
//! The agent writes `lease.json` (atomically) after each successful
//! renewal: the CLOCK_MONOTONIC time at which it *sent* that renewal, the
//! TTL, and for each instance its process group, kernel start time and
//! window. The watchdog reads it every 100 ms and kills each instance at
//! `sent + ttl + stop_after`; every kill is appended to `fenced.json`, which
//! the agent reads so it never resurrects a fenced generation. The
//! monotonic clock is shared by all processes of one boot, so the deadline
//! is immune to wall-clock jumps. This module decides nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_core::{Generation, ServerId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceHandle {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencedInstance {
    pub server_id: ServerId,
    pub generation: Generation,
    pub handle: FenceHandle,
    pub stop_after_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    /// CLOCK_MONOTONIC milliseconds when the last successful renewal was sent.
    pub renewed_mono_ms: i64,
    pub ttl_ms: i64,
    pub instances: Vec<FencedInstance>,
    /// The agent's pid, so a watchdog with nothing left to guard can exit.
    pub agent_pid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub server_id: ServerId,
    pub generation: Generation,
}

/// CLOCK_MONOTONIC in milliseconds.
pub fn monotonic_ms() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

pub fn lease_path(dir: &Path) -> PathBuf {
    dir.join("lease.json")
}

pub fn fenced_path(dir: &Path) -> PathBuf {
    dir.join("fenced.json")
}

pub fn write_lease(dir: &Path, state: &LeaseState) -> std::io::Result<()> {
    let path = lease_path(dir);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(state).expect("serializable"))?;
    // No fsync: the lease only matters while this boot lasts.
    std::fs::rename(&tmp, &path)
}

pub fn read_fenced(dir: &Path) -> Vec<FenceRecord> {
    std::fs::read_to_string(fenced_path(dir)).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The instances whose window has passed at `now_mono`.
pub fn due(state: &LeaseState, now_mono: i64) -> Vec<&FencedInstance> {
    state.instances.iter().filter(|i| now_mono > state.renewed_mono_ms + state.ttl_ms + i.stop_after_ms.max(0)).collect()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The watchdog's loop. Returns when the agent (the one that started it,
/// or the latest one to publish a lease) is gone and nothing is left to
/// guard.
pub fn run(dir: &Path, started_by: i32) -> std::io::Result<()> {
    let mut fenced: std::collections::HashSet<(ServerId, Generation)> = read_fenced(dir).into_iter().map(|r| (r.server_id, r.generation)).collect();
    loop {
        let state: Option<LeaseState> = std::fs::read(lease_path(dir)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(state) = &state {
            let now = monotonic_ms();
            for inst in due(state, now) {
                let key = (inst.server_id.clone(), inst.generation);
                if crate::process::alive(inst.handle.pid, inst.handle.start_time) {
                    // The group for a process instance (it leads one); the
                    // pid itself for a container's init, which may not.
                    crate::process::kill_group(inst.handle.pid, libc::SIGKILL);
                    // SAFETY: kill(2) of a pid checked against its start time.
                    unsafe {
                        libc::kill(inst.handle.pid, libc::SIGKILL);
                    }
                    eprintln!("watchdog: fenced {} generation {} (pid {})", inst.server_id, inst.generation, inst.handle.pid);
                }
                if fenced.insert(key) {
                    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(fenced_path(dir))?;
                    let rec = FenceRecord { server_id: inst.server_id.clone(), generation: inst.generation };
                    writeln!(f, "{}", serde_json::to_string(&rec).expect("serializable"))?;
                    f.sync_all()?;
                }
            }
            let guarding = state.instances.iter().any(|i| crate::process::alive(i.handle.pid, i.handle.start_time));
            if !guarding && !pid_alive(state.agent_pid) && !pid_alive(started_by) {
                return Ok(());
            }
        } else if !pid_alive(started_by) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the watchdog for `dir` in its own session unless one runs
/// already (recorded in `watchdog.pid`). `exe` is the berth binary.
pub fn ensure_running(exe: &Path, dir: &Path) -> std::io::Result<u32> {
    let pid_file = dir.join("watchdog.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        let mut it = text.split_whitespace();
        if let (Some(pid), Some(start)) = (it.next().and_then(|p| p.parse::<i32>().ok()), it.next().and_then(|s| s.parse::<u64>().ok())) {
            if crate::process::alive(pid, start) {
                return Ok(pid as u32);
            }
        }
    }
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("watchdog.log"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("watchdog")
        .arg("--dir")
        .arg(dir)
        .arg("--agent-pid")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // The watchdog outlives the agent; reap it in the background while we live.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let start = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|t| crate::process::parse_stat(&t)).map(|s| s.start_time).unwrap_or(0);
    std::fs::write(&pid_file, format!("{pid} {start}\n"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(window: i64) -> FencedInstance {
        FencedInstance { server_id: ServerId("s".into()), generation: 1, handle: FenceHandle { pid: 0, start_time: 0 }, stop_after_ms: window }
    }

    #[test]
    fn an_instance_is_due_after_ttl_plus_its_window_from_the_send_time() {
        let state = LeaseState { renewed_mono_ms: 1000, ttl_ms: 10_000, instances: vec![inst(0), inst(5000)], agent_pid: 0 };
        assert!(due(&state, 11_000).is_empty());
        assert_eq!(due(&state, 11_001).len(), 1);
        assert_eq!(due(&state, 16_001).len(), 2);
    }

    #[test]
    fn monotonic_time_advances() {
        let a = monotonic_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(monotonic_ms() >= a + 4);
    }
}
