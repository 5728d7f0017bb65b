//! Issue 5 acceptance G: a node whose data volume (a small tmpfs made by the
//! test) fills past the pressure threshold gets `disk_pressure` and
//! receives no placements; above the alert threshold an event fires; when
//! space returns, placements resume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_testkit::{agent_args, require_or_skip, spawn, start_control, wait_until, Api, InstanceReaper};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

/// A tmpfs mounted for the test, unmounted on drop (declare it first so it
/// is dropped after the processes using it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(path).status().map(|s| s.success()).unwrap_or(false);
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn used_percent(path: &Path) -> u64 {
    let out = Command::new("df").args(["--output=pcent"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().trim_end_matches('%').parse().unwrap()
}

/// Grows `ballast` until the volume is at least `percent` full.
fn fill_to(volume: &Path, percent: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(volume.join("ballast")).unwrap();
    let chunk = vec![7u8; 256 * 1024];
    while used_percent(volume) < percent {
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
}

#[test]
fn a_full_data_volume_stops_placements_until_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path().join("volume");
    let Some(_mount) = Tmpfs::mount(&volume, 32) else {
        assert!(require_or_skip(false, "mounting a tmpfs (root)"), "unreachable");
        return;
    };
    let (_cp, url, token) = start_control(&bin(), "control-plane", &tmp.path().join("cp"), &["--sync-interval", "1"]);
    let api = Api::new(&url, &token);
    let agent_token = api.create_token("agent", None);
    let mut reaper = InstanceReaper::default();
    reaper.watch(&volume);
    let args = agent_args(&url, &agent_token, "small", &volume, 2048, "28500-28549", 1, &["--no-cgroups"]);
    let _agent = spawn(&bin(), &args, &tmp.path().join("agent.log"), &[]);
    wait_until(Duration::from_secs(20), "the node", || (api.nodes().len() == 1).then_some(()));
    let node = |api: &Api| api.nodes().into_iter().next().unwrap();
    assert_eq!(node(&api)["disk_pressure"], false);
    assert!(node(&api)["disk"]["total_mib"].as_u64().unwrap() >= 31);

    fill_to(&volume, 92);
    wait_until(Duration::from_secs(10), "disk pressure", || (node(&api)["disk_pressure"] == true).then_some(()));
    api.create_server("d", "fakegame", 128, json!({}));
    api.ok("POST", "/v1/servers/d/start", None);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(api.server("d")["status"], "queued", "no placement on a node under disk pressure");
    assert_eq!(node(&api)["memory"]["reserved_mib"], 0);

    // Stats are whole MiB: on a 32 MiB volume, fill well past 95 %.
    fill_to(&volume, 99);
    wait_until(Duration::from_secs(10), "a disk alert", || {
        let (_, ev) = api.call("GET", "/v1/events?kind=disk_alert", None);
        (ev["events"].as_array().map(|a| a.len()) == Some(1)).then_some(())
    });

    std::fs::remove_file(volume.join("ballast")).unwrap();
    wait_until(Duration::from_secs(10), "pressure gone", || (node(&api)["disk_pressure"] == false).then_some(()));
    wait_until(Duration::from_secs(20), "d running", || (api.server("d")["status"] == "running").then_some(()));
    assert!(api.violations().is_empty());
}
