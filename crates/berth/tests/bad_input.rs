//! Acceptance E: bad input stops at the edge (L7) with a clear 4xx, a
//! snake_case code and a message, and writes nothing.

use std::path::PathBuf;
use std::time::Duration;

use berth_testkit::{start_control, wait_until, Api, InstanceReaper};
use serde_json::{json, Value};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

/// Everything a bad request could have changed.
fn state(api: &Api) -> (Value, Value, Value) {
    (
        api.ok("GET", "/v1/servers", None),
        api.ok("GET", "/v1/events?limit=1000", None),
        api.ok("GET", "/v1/nodes", None)["nodes"].as_array().unwrap().iter().map(|n| n["memory"]["reserved_mib"].clone()).collect(),
    )
}

fn expect(resp: (u16, Value), status: u16, code: &str, what: &str) {
    let (s, body) = resp;
    assert_eq!(s, status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{what}: empty message");
    assert!(!msg.ends_with('.'), "{what}: message ends with a period: {msg}");
    assert!(!msg.starts_with(|c: char| c.is_uppercase()), "{what}: message is not lowercase: {msg}");
}

#[test]
fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut reaper = InstanceReaper::default();
    reaper.watch(&data.join("agent"));
    let (_dev, url, token) = start_control(&bin(), "dev", &data, &["--memory-mib", "2500", "--sync-interval", "1", "--no-cgroups"]);
    let api = Api::new(&url, &token);
    wait_until(Duration::from_secs(20), "the local node", || (api.nodes().len() == 1).then_some(()));
    let good = api.create_server("good", "fakegame", 256, json!({"max_players": 10}));
    let good_id = good["id"].as_str().unwrap().to_string();
    api.ok("POST", "/v1/servers/good/start", None);
    wait_until(Duration::from_secs(30), "good running", || (api.server("good")["status"] == "running").then_some(()));
    let tenant_a = api.with_token(&api.create_token("tenant", Some("alice")));
    let tenant_b = api.with_token(&api.create_token("tenant", Some("bob")));
    let agent = api.with_token(&api.create_token("agent", None));
    let alices = tenant_a.create_server("alices", "fakegame", 128, json!({}));
    let alices_id = alices["id"].as_str().unwrap().to_string();

    let before = state(&api);
    let create = |body: Value| api.call("POST", "/v1/servers", Some(&body));
    let srv = |name: &str, mem: Value, template: &str, config: Value| json!({"name": name, "template": template, "memory_mib": mem, "config": config});

    expect(create(srv("m0", json!(0), "fakegame", json!({}))), 422, "invalid_memory", "memory 0");
    expect(create(srv("mneg", json!(-5), "fakegame", json!({}))), 422, "invalid_memory", "negative memory");
    expect(create(srv("mstr", json!("1024"), "fakegame", json!({}))), 422, "invalid_memory", "memory as a string");
    expect(create(srv("mfloat", json!(1.5), "fakegame", json!({}))), 422, "invalid_memory", "fractional memory");
    expect(create(srv("mbig", json!(2501), "fakegame", json!({}))), 422, "exceeds_node_capacity", "memory above every node");
    expect(create(json!({"name": "nomem", "template": "fakegame"})), 422, "invalid_memory", "missing memory");
    expect(create(srv("t", json!(128), "nosuch", json!({}))), 422, "unknown_template", "unknown template");
    expect(create(srv("c1", json!(128), "fakegame", json!({"max_players": 0}))), 422, "invalid_config", "max_players 0");
    expect(create(srv("c2", json!(128), "fakegame", json!({"max_players": 1001}))), 422, "invalid_config", "max_players 1001");
    expect(create(srv("c3", json!(128), "fakegame", json!({"max_players": "ten"}))), 422, "invalid_config", "max_players string");
    let (s, body) = create(srv("c4", json!(128), "fakegame", json!({"maxplayers": 5})));
    assert!(body["error"]["message"].as_str().unwrap().contains("config.maxplayers"), "names the field: {body}");
    expect((s, body), 422, "invalid_config", "unknown config key");
    expect(create(srv("c5", json!(128), "fakegame", json!([1, 2]))), 422, "invalid_config", "config not an object");
    expect(create(srv("good", json!(128), "fakegame", json!({}))), 409, "conflict", "duplicate name");
    for bad in ["", "a/b", "..", "../etc", "a b", "-x", "srv_0123456789abcdef", &"x".repeat(64)] {
        expect(create(srv(bad, json!(128), "fakegame", json!({}))), 422, "invalid_name", &format!("name {bad:?}"));
    }
    expect(create(json!({"name": 5, "template": "fakegame", "memory_mib": 1})), 422, "invalid_request", "name not a string");
    expect(create(json!({"name": "u", "template": "fakegame", "memory_mib": 1, "colour": "red"})), 422, "unknown_field", "unknown field");
    expect(create(json!([1])), 422, "invalid_request", "body not an object");
    for raw in [&b"{"[..], b"{\"name\": }", b"not json", b""] {
        expect(api.raw("POST", "/v1/servers", Some(raw), Some(&token)), 400, "malformed_json", "malformed json");
    }
    expect(api.raw("POST", "/v1/tokens", Some(b"{\"kind\": \"root\"}"), Some(&token)), 422, "invalid_request", "unknown token kind");
    expect(api.call("POST", "/v1/tokens", Some(&json!({"kind": "tenant"}))), 422, "invalid_request", "tenant token without tenant");

    // Unknown ids and names.
    for (m, p) in [
        ("GET", "/v1/servers/nosuch"),
        ("POST", "/v1/servers/nosuch/start"),
        ("POST", "/v1/servers/nosuch/stop"),
        ("DELETE", "/v1/servers/nosuch"),
        ("GET", "/v1/servers/srv_0000000000000000"),
        ("GET", "/v1/servers/a%2Fb"),
    ] {
        expect(api.call(m, p, None), 404, "not_found", &format!("{m} {p}"));
    }
    expect(api.call("POST", "/v1/nodes/nosuch/drain", None), 404, "not_found", "unknown node");
    expect(api.call("GET", "/v1/nosuch", None), 404, "not_found", "unknown route");
    expect(api.call("GET", "/v1/events?bogus=1", None), 422, "invalid_request", "unknown query parameter");

    // Waiting for a placement: only "placed", for 1 to 300 seconds.
    let start_alices = |body: Value| api.call("POST", "/v1/servers/alices/start", Some(&body));
    expect(start_alices(json!({"wait": "running"})), 422, "invalid_request", "wait for something else");
    expect(start_alices(json!({"wait": "placed", "wait_timeout_s": 0})), 422, "invalid_request", "wait 0 s");
    expect(start_alices(json!({"wait": "placed", "wait_timeout_s": 301})), 422, "invalid_request", "wait over 300 s");
    expect(start_alices(json!({"wait_timeout_s": 5})), 422, "invalid_request", "a timeout without wait");

    // Wrong state.
    expect(api.call("POST", "/v1/servers/good/start", None), 409, "invalid_state", "start a running server");
    expect(api.call("DELETE", "/v1/servers/good", None), 409, "invalid_state", "delete a running server");

    // Tokens.
    expect(api.raw("GET", "/v1/servers", None, None), 401, "unauthorized", "no token");
    expect(api.raw("GET", "/v1/servers", None, Some("berth_admin_nope")), 401, "unauthorized", "invalid token");
    expect(api.raw("POST", "/v1/servers", Some(b"{}"), Some("")), 401, "unauthorized", "empty token");
    expect(agent.call("GET", "/v1/servers", None), 403, "forbidden", "agent token on the server api");
    expect(tenant_a.call("POST", "/v1/agent/register", Some(&json!({}))), 403, "forbidden", "tenant as agent");
    expect(tenant_a.call("POST", "/v1/tokens", Some(&json!({"kind": "admin"}))), 403, "forbidden", "tenant minting tokens");
    expect(tenant_b.call("GET", &format!("/v1/servers/{alices_id}"), None), 404, "not_found", "bob reads alice's server");
    expect(tenant_b.call("GET", "/v1/servers/alices", None), 404, "not_found", "bob reads alice's server by name");
    expect(tenant_b.call("POST", &format!("/v1/servers/{alices_id}/start"), None), 404, "not_found", "bob starts alice's server");
    expect(tenant_b.call("DELETE", &format!("/v1/servers/{alices_id}"), None), 404, "not_found", "bob deletes alice's server");
    expect(tenant_b.call("GET", &format!("/v1/servers/{good_id}"), None), 404, "not_found", "bob reads the admin's server");
    expect(tenant_b.call("GET", &format!("/v1/events?server={alices_id}"), None), 404, "not_found", "bob reads alice's events");
    expect(tenant_b.call("GET", "/v1/events", None), 403, "forbidden", "tenant reads all events");
    expect(
        tenant_b.call("POST", "/v1/servers", Some(&srv("cmd", json!(128), "command", json!({"command": "true"})))),
        403,
        "forbidden",
        "tenant uses an admin-only template",
    );
    expect(
        tenant_b.call("POST", "/v1/servers", Some(&json!({"name": "x", "template": "fakegame", "memory_mib": 128, "tenant": "alice"}))),
        403,
        "forbidden",
        "tenant creates for another tenant",
    );
    assert_eq!(tenant_b.servers().len(), 0, "bob sees none of alice's servers");
    assert_eq!(tenant_a.servers().len(), 1);
    assert_eq!(tenant_a.servers()[0]["name"], "alices");

    assert_eq!(state(&api), before, "a bad request changed the store");
    assert!(api.violations().is_empty());
}
