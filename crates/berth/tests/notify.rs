//! Acceptance C: notifications from the real binary. A local webhook
//! receiver that fails three times and then succeeds gets the event once
//! by idempotency key, each attempt validly signed; a receiver that always
//! fails gets its webhook disabled with an event; an email reaches a local
//! SMTP server (aiosmtpd, started by the test) with the expected subject.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_testkit::{require_or_skip, start_control, wait_until, Api, InstanceReaper};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A minimal HTTP receiver on a free loopback port: answers 500 to the
/// first `failures` requests and 200 afterwards, recording each.
fn receiver(failures: usize) -> (String, Arc<Mutex<Vec<Received>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut headers = BTreeMap::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap_or(0);
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap_or(());
            let n = {
                let mut g = seen.lock().unwrap();
                g.push(Received { headers, body });
                g.len()
            };
            let status = if n <= failures { "500 Internal Server Error" } else { "200 OK" };
            let _ = conn.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes());
        }
    });
    (url, got)
}

fn aiosmtpd_available() -> bool {
    Command::new("python3").args(["-c", "import aiosmtpd"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// `python3 -m aiosmtpd` on a free port, killed (by pid) on drop.
struct Smtp {
    child: std::process::Child,
    port: u16,
    out: PathBuf,
}

impl Smtp {
    fn start(dir: &std::path::Path) -> Smtp {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = dir.join("smtp.out");
        let f = std::fs::File::create(&out).unwrap();
        let child = Command::new("python3")
            .args(["-u", "-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start aiosmtpd");
        wait_until(Duration::from_secs(20), "aiosmtpd to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
        Smtp { child, port, out }
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex_hmac(secret: &str, ts: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn webhooks_are_signed_retried_deduplicated_and_disabled_and_email_arrives() {
    if !require_or_skip(aiosmtpd_available(), "aiosmtpd (pip install aiosmtpd)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(tmp.path());
    let (flaky_url, flaky) = receiver(3);
    let (dead_url, dead) = receiver(usize::MAX);
    let data = tmp.path().join("d");
    let mut reaper = InstanceReaper::default();
    reaper.watch(&data.join("agent"));
    let smtp_addr = format!("127.0.0.1:{}", smtp.port);
    let (_p, url, token) = start_control(
        &bin(),
        "dev",
        &data,
        &[
            "--memory-mib",
            "2048",
            "--ports",
            "26400-26499",
            "--no-cgroups",
            "--sync-interval",
            "1",
            "--delivery-retry-base-ms",
            "300",
            "--webhook-disable-after",
            "4",
            "--smtp",
            &smtp_addr,
            "--email-to",
            "ops@example.com",
            "--email-from",
            "berth@example.com",
        ],
    );
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));

    // Bad input stops at the edge and writes nothing.
    for (body, code) in [
        (json!({"url": "ftp://x"}), "invalid_url"),
        (json!({"url": "http://x", "events": ["Not A Kind"]}), "invalid_request"),
        (json!({"url": "http://x", "colour": 1}), "invalid_request"),
    ] {
        let (s, v) = api.call("POST", "/v1/webhooks", Some(&body));
        assert_eq!((s, v["error"]["code"].as_str()), (422, Some(code)), "{body}: {v}");
    }
    assert!(api.ok("GET", "/v1/webhooks", None)["webhooks"].as_array().unwrap().is_empty());

    let flaky_hook = api.ok("POST", "/v1/webhooks", Some(&json!({"url": flaky_url, "events": ["server_crashed"]})));
    let secret = flaky_hook["secret"].as_str().unwrap().to_string();
    let hook_id = flaky_hook["id"].as_str().unwrap().to_string();
    assert!(api.ok("GET", "/v1/webhooks", None)["webhooks"][0]["secret"].is_null(), "the secret is shown once");
    let dead_hook = api.ok("POST", "/v1/webhooks", Some(&json!({"url": dead_url, "events": ["server_crashed"]})));
    let dead_id = dead_hook["id"].as_str().unwrap().to_string();

    let s = api.create_server("crashy", "fakegame", 128, json!({"crash_after_ms": 500}));
    let server_id = s["id"].as_str().unwrap().to_string();
    api.ok("POST", "/v1/servers/crashy/start", None);

    let log = wait_until(Duration::from_secs(60), "the webhook to be delivered", || {
        let log = api.ok("GET", &format!("/v1/webhooks/{hook_id}/deliveries"), None);
        (log["deliveries"][0]["status"] == "delivered").then_some(log)
    });
    let d = &log["deliveries"][0];
    assert_eq!((d["attempts"].as_u64(), d["last_status"].as_u64()), (Some(4), Some(200)), "{d}");
    std::thread::sleep(Duration::from_millis(1500));
    let got = flaky.lock().unwrap().clone();
    assert_eq!(got.len(), 4, "three failures and one success, nothing after it");
    let keys: std::collections::BTreeSet<&str> = got.iter().map(|r| r.headers["idempotency-key"].as_str()).collect();
    assert_eq!(keys.len(), 1, "one event, one idempotency key across retries: {keys:?}");
    assert_eq!(keys.iter().next().unwrap(), &d["id"].as_str().unwrap(), "the key is the delivery's id in the log");
    for r in &got {
        let ts = &r.headers["berth-timestamp"];
        assert_eq!(r.headers["berth-signature"], format!("v1={}", hex_hmac(&secret, ts, &r.body)), "signature over timestamp.body");
        assert_ne!(r.headers["berth-signature"], format!("v1={}", hex_hmac("wrong", ts, &r.body)));
        assert_eq!(r.body, got[0].body, "the same body on every retry");
        assert_eq!(r.headers["berth-event"], "server_crashed");
        assert_eq!(r.headers["berth-webhook"], hook_id);
    }
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["event"]["kind"], "server_crashed");
    assert_eq!(body["event"]["server_id"], server_id.as_str());
    // A receiver that processes by idempotency key acts once.
    let processed: std::collections::BTreeSet<&str> =
        got.iter().filter(|r| r.headers.contains_key("idempotency-key")).map(|r| r.headers["idempotency-key"].as_str()).collect();
    assert_eq!(processed.len(), 1);

    // The always-failing receiver: disabled after four failures in a row
    // (the flaky one, with three, was not).
    let hook = wait_until(Duration::from_secs(30), "the dead webhook to be disabled", || {
        let hooks = api.ok("GET", "/v1/webhooks", None);
        hooks["webhooks"].as_array().unwrap().iter().find(|w| w["id"] == dead_id.as_str() && w["enabled"] == false).cloned()
    });
    assert_eq!(hook["consecutive_failures"], 4, "{hook}");
    assert_eq!(dead.lock().unwrap().len(), 4);
    let ev = api.ok("GET", "/v1/events?kind=webhook_disabled", None);
    assert_eq!(ev["events"].as_array().unwrap().len(), 1, "{ev}");
    assert!(ev["events"][0]["message"].as_str().unwrap().contains(&dead_id));
    let dlog = api.ok("GET", &format!("/v1/webhooks/{dead_id}/deliveries"), None);
    assert_eq!(dlog["deliveries"][0]["status"], "failed", "{dlog}");
    let back = api.ok("POST", &format!("/v1/webhooks/{dead_id}/enable"), None);
    assert_eq!((back["enabled"].as_bool(), back["consecutive_failures"].as_u64()), (Some(true), Some(0)));

    // Email for the crash, through the local SMTP server.
    let subject = "Subject: [berth] server_crashed: server crashy crashed: exited (exit code 3)";
    let mail = wait_until(Duration::from_secs(30), "the email", || {
        // Unfold long header lines (RFC 5322) before matching.
        let m = smtp.received().replace("\r\n ", " ").replace("\n ", " ");
        m.contains(subject).then_some(m)
    });
    assert!(mail.contains("To: ops@example.com"), "{mail}");
    assert!(mail.contains("From: berth@example.com"), "{mail}");
    let emails = api.ok("GET", "/v1/deliveries?channel=email", None);
    assert!(emails["deliveries"].as_array().unwrap().iter().any(|d| d["event_kind"] == "server_crashed" && d["status"] == "delivered"), "{emails}");
}
