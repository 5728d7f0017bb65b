//! Issue 6 acceptance: two control-plane replicas on one PostgreSQL database
//! (started by the test), agents pointed at both. No over-commit across
//! replicas, workers fail over when the leader dies, and a database restart
//! mid-storm is survived with 503s and nothing half-written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_testkit::{agent_args, require_or_skip, spawn, wait_until, Api, InstanceReaper, PgServer, Proc};
use serde_json::json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

const TTL_S: u64 = 3;

struct Cluster {
    replicas: Vec<(Proc, String, PathBuf)>,
    agents: Vec<Proc>,
    token: String,
    _reaper: InstanceReaper,
}

fn replica(tmp: &Path, name: &str, db: &str) -> (Proc, String, PathBuf) {
    let dir = tmp.join(name);
    let ttl = TTL_S.to_string();
    let (p, url, _) = start_control_with_db(&dir, db, &ttl);
    (p, url, dir)
}

/// Like `start_control`, but the admin token is written only by the replica
/// that initialised the database, so it is not required here.
fn start_control_with_db(dir: &Path, db: &str, ttl: &str) -> (Proc, String, ()) {
    std::fs::create_dir_all(dir).unwrap();
    let _ = std::fs::remove_file(dir.join("addr"));
    let args: Vec<String> =
        ["control-plane", "--data-dir", &dir.display().to_string(), "--listen", "127.0.0.1:0", "--database", db, "--lease-ttl", ttl, "--sync-interval", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut p = spawn(&bin(), &args, &dir.join("control-plane.log"), &[]);
    let url = berth_testkit::wait_for_addr(dir, &mut p, Duration::from_secs(30));
    (p, url, ())
}

fn cluster(tmp: &Path, db: &str, agents: usize, ports_base: u16) -> Cluster {
    let a = replica(tmp, "cpA", db);
    let token = std::fs::read_to_string(a.2.join("admin.token")).expect("the first replica initialised the database").trim().to_string();
    let b = replica(tmp, "cpB", db);
    assert!(!b.2.join("admin.token").exists(), "only the initialising replica writes admin.token");
    let api = Api::new(&a.1, &token);
    let agent_token = api.create_token("agent", None);
    let urls = format!("{},{}", a.1, b.1);
    let mut reaper = InstanceReaper::default();
    let mut procs = Vec::new();
    for i in 0..agents {
        let dir = tmp.join(format!("agent{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        reaper.watch(&dir);
        let ports = format!("{}-{}", ports_base + i as u16 * 100, ports_base + i as u16 * 100 + 99);
        // Half the agents list the other replica first.
        let urls = if i % 2 == 0 { urls.clone() } else { format!("{},{}", b.1, a.1) };
        let args = agent_args(&urls, &agent_token, &format!("n{i}"), &dir, 4096, &ports, 1, &["--no-cgroups"]);
        procs.push(spawn(&bin(), &args, &tmp.join(format!("agent{i}.log")), &[]));
    }
    wait_until(Duration::from_secs(30), "all agents registered", || (api.nodes().len() == agents).then_some(()));
    Cluster { replicas: vec![a, b], agents: procs, token, _reaper: reaper }
}

/// Starts every server from `clients` concurrent clients spread over the
/// replicas, retrying 503s (a database or replica outage) with a bounded
/// number of attempts. Returns the number of 5xx answers other than 503.
fn start_all(apis: &[Api], ids: &[String], clients: usize, saw_503: &Arc<AtomicUsize>) -> usize {
    let other_5xx = Arc::new(AtomicUsize::new(0));
    let chunk = ids.len().div_ceil(clients);
    let handles: Vec<_> = ids
        .chunks(chunk)
        .enumerate()
        .map(|(i, chunk)| {
            let (api, chunk, other_5xx, saw_503) = (apis[i % apis.len()].clone(), chunk.to_vec(), other_5xx.clone(), saw_503.clone());
            std::thread::spawn(move || {
                for id in chunk {
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        let (s, v) = api.call("POST", &format!("/v1/servers/{id}/start"), None);
                        match s {
                            202 => break,
                            // An earlier attempt committed before its answer was lost.
                            // (invalid_state once it runs, operation_in_progress while its start op is.)
                            409 if attempts > 1 && (v["error"]["code"] == "invalid_state" || v["error"]["code"] == "operation_in_progress") => break,
                            503 => {
                                saw_503.fetch_add(1, Ordering::SeqCst);
                                assert!(attempts < 200, "still 503 after {attempts} attempts");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            s if s >= 500 => {
                                other_5xx.fetch_add(1, Ordering::SeqCst);
                                panic!("{s}: {v}");
                            }
                            _ => panic!("start {id}: {s} {v}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    other_5xx.load(Ordering::SeqCst)
}

#[test]
fn two_replicas_four_agents_400_starts_run_exactly_64_and_the_leader_fails_over() {
    if !require_or_skip(PgServer::available(), "PostgreSQL server binaries") {
        return;
    }
    let pg = PgServer::start().unwrap();
    let db = pg.database("berth_b");
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), &db, 4, 24000);
    let apis: Vec<Api> = c.replicas.iter().map(|r| Api::new(&r.1, &c.token)).collect();

    // 400 servers created through both replicas.
    let ids: Vec<String> =
        (0..400).map(|i| apis[i % 2].create_server(&format!("s{i:03}"), "fakegame", 256, json!({}))["id"].as_str().unwrap().to_string()).collect();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (apis, done) = (apis.clone(), done.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            let mut samples = 0;
            while !done.load(Ordering::SeqCst) {
                for api in &apis {
                    let (s, nodes) = api.call("GET", "/v1/nodes", None);
                    assert!(s < 500, "{s}: {nodes}");
                    for n in nodes["nodes"].as_array().into_iter().flatten() {
                        if n["memory"]["reserved_mib"].as_u64() > n["memory"]["allocatable_mib"].as_u64() {
                            bad.push(n.to_string());
                        }
                    }
                    let v = api.violations();
                    if !v.is_empty() {
                        bad.push(format!("{v:?}"));
                    }
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (bad, samples)
        })
    };
    let saw_503 = Arc::new(AtomicUsize::new(0));
    assert_eq!(start_all(&apis, &ids, 50, &saw_503), 0, "no 5xx");
    assert_eq!(saw_503.load(Ordering::SeqCst), 0, "nothing was unavailable");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = apis[1].status_counts();
        if last.get("running") == Some(&64) && last.get("queued") == Some(&336) {
            break;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = c
                .replicas
                .iter()
                .map(|r| {
                    std::fs::read_to_string(&r.0.log).unwrap_or_default().lines().filter(|l| !l.contains(" INFO ")).take(60).collect::<Vec<_>>().join("\n")
                })
                .collect();
            let cluster = apis[1].ok("GET", "/v1/cluster", None);
            panic!("no convergence to 64 running / 336 queued: {last:?}\ncluster: {cluster}\nlogs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(apis[0].status_counts().get("running"), Some(&64), "stable at 64");
    done.store(true, Ordering::SeqCst);
    let (bad, samples) = sampler.join().unwrap();
    assert!(bad.is_empty(), "over-commit sampled: {bad:?}");
    assert!(samples > 10);
    for n in apis[0].nodes() {
        assert_eq!(n["memory"]["reserved_mib"], 4096, "{n}");
    }

    // kill -9 of the leader: the survivor takes over the workers.
    let cluster_view = apis[0].ok("GET", "/v1/cluster", None);
    let leader_id = cluster_view["leader"]["id"].as_str().unwrap().to_string();
    let leader_idx = c.replicas.iter().position(|r| std::fs::read_to_string(r.2.join("replica.id")).unwrap().trim() == leader_id).unwrap();
    let survivor = apis[1 - leader_idx].clone();
    let killed_at = Instant::now();
    c.replicas[leader_idx].0.kill9();
    let survivor_id = std::fs::read_to_string(c.replicas[1 - leader_idx].2.join("replica.id")).unwrap().trim().to_string();
    wait_until(Duration::from_secs(TTL_S * 3), "the survivor to lead", || {
        (survivor.ok("GET", "/v1/cluster", None)["leader"]["id"] == survivor_id.as_str()).then_some(())
    });
    let takeover = killed_at.elapsed();
    eprintln!("takeover after kill -9 of the leader: {takeover:?} (lease ttl {TTL_S}s)");
    assert!(takeover <= Duration::from_millis(TTL_S * 1000 + TTL_S * 250 + 500), "takeover took {takeover:?}");

    // Stopping servers through the survivor lets queued ones start.
    let running: Vec<String> =
        survivor.servers().into_iter().filter(|s| s["status"] == "running").take(10).map(|s| s["id"].as_str().unwrap().to_string()).collect();
    for id in &running {
        survivor.ok("POST", &format!("/v1/servers/{id}/stop"), None);
    }
    wait_until(Duration::from_secs(60), "10 stopped, 64 running, 326 queued", || {
        let c = survivor.status_counts();
        (c.get("stopped") == Some(&10) && c.get("running") == Some(&64) && c.get("queued") == Some(&326)).then_some(())
    });
    let (_, ev) = survivor.call("GET", "/v1/events?kind=server_placed&limit=1000", None);
    let placed = ev["events"].as_array().unwrap();
    let mut keys: Vec<(String, String)> =
        placed.iter().map(|e| (e["server_id"].as_str().unwrap().to_string(), e["message"].as_str().unwrap().to_string())).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "no reservation committed twice");
    let (_, retries) = survivor.call("GET", "/v1/events?kind=start_retry&limit=5", None);
    assert_eq!(n, 74, "64 first placements and 10 after the stops; retries: {retries}");
    assert!(survivor.violations().is_empty());
    drop(c.agents.drain(..));
}

#[test]
fn a_database_restart_mid_storm_answers_503_and_leaves_nothing_half_written() {
    if !require_or_skip(PgServer::available(), "PostgreSQL server binaries") {
        return;
    }
    let mut pg = PgServer::start().unwrap();
    let db = pg.database("berth_d");
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), &db, 2, 25000);
    let apis: Vec<Api> = c.replicas.iter().map(|r| Api::new(&r.1, &c.token)).collect();
    let ids: Vec<String> =
        (0..120).map(|i| apis[i % 2].create_server(&format!("d{i:03}"), "fakegame", 256, json!({}))["id"].as_str().unwrap().to_string()).collect();

    let saw_503 = Arc::new(AtomicUsize::new(0));
    let storm = {
        let (apis, ids, saw_503) = (apis.clone(), ids.clone(), saw_503.clone());
        std::thread::spawn(move || {
            // Slow the storm down so the outage lands in its middle.
            let mut other = 0;
            for chunk in ids.chunks(10) {
                other += start_all(&apis, chunk, 5, &saw_503);
                std::thread::sleep(Duration::from_millis(150));
            }
            other
        })
    };
    std::thread::sleep(Duration::from_millis(600));
    pg.pause();
    // While the database is down, requests answer 503 with Retry-After.
    let (s, body) = apis[0].call("GET", "/v1/servers", None);
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    std::thread::sleep(Duration::from_millis(2000));
    pg.resume();
    assert_eq!(storm.join().unwrap(), 0, "no 5xx other than 503");
    assert!(saw_503.load(Ordering::SeqCst) > 0, "the outage was seen by clients");
    wait_until(Duration::from_secs(120), "32 running and 88 queued", || {
        let c = apis[0].status_counts();
        (c.get("running") == Some(&32) && c.get("queued") == Some(&88)).then_some(())
    });
    for api in &apis {
        assert!(api.violations().is_empty(), "nothing half-written");
    }
    for n in apis[1].nodes() {
        assert_eq!(n["memory"]["reserved_mib"], 4096);
    }
}
