//! Templates: what a server runs, and the schema its config must satisfy.
//!
//! A template is data (parsed from TOML at the edge, never here). This
//! module validates a requested config against the schema (types, ranges,
//! enums, unknown keys), fills defaults, and renders the instance spec an
//! agent receives. Placeholders the control plane cannot know (`{data_dir}`,
//! `{berth_exe}`) are left for the agent.
//!
//! A template says how to run its server with each driver: `[process]`
//! (required; it also holds the lifecycle every driver follows: stop
//! signal or command, timeouts, readiness) and optionally `[docker]` (the
//! image and what differs inside a container). The reservation is always
//! the server's `memory_mib`: a driver's hard limit equals it, and the
//! template's `memory_overhead_factor` only shrinks what the workload is
//! told it may use (`{workload_mib}`), so overhead lives inside the
//! reservation and never on top of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{Generation, MemMib, Server, ServerId};
use crate::CoreError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A stateless server may be replaced anywhere with a fresh data dir.
    #[serde(default)]
    pub stateless: bool,
    /// Only admin tokens may create servers from it (e.g. arbitrary commands).
    #[serde(default)]
    pub admin_only: bool,
    #[serde(default)]
    pub min_memory_mib: u64,
    /// Reservation divided by this is what the workload itself may use
    /// (`{workload_mib}`), e.g. a JVM heap; the rest is the runtime's
    /// overhead, inside the same reservation and hard limit. At least 1.
    #[serde(default = "default_overhead_factor")]
    pub memory_overhead_factor: f64,
    pub process: Option<ProcessSpec>,
    /// How to run the server with the `docker` driver; a template without
    /// it runs only on process nodes.
    pub docker: Option<DockerSpec>,
    #[serde(default)]
    pub config: BTreeMap<String, ConfigField>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// A command (argv) that asks the server to stop, run instead of
    /// sending `stop_signal` (e.g. an RCON `stop`). Empty: use the signal.
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    #[serde(default)]
    pub ready: ReadyCheck,
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    /// Exit codes that mean "this will never start" (bad config, missing
    /// files): an instance that exits with one before it is ready fails
    /// its server at once instead of being retried or restarted.
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
}

/// The `[docker]` section: what a container of this template runs. The
/// lifecycle (stop, readiness) comes from `[process]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSpec {
    /// Must already be on the node: berth never pulls.
    pub image: String,
    /// Replaces the image's entrypoint; empty keeps it.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Arguments given to the entrypoint; absent: the `[process]` args.
    pub args: Option<Vec<String>>,
    /// Extra environment, on top of the `[process]` env.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the server's data dir is mounted in the container; `{data_dir}`
    /// renders to it inside the container.
    #[serde(default = "default_data_mount")]
    pub data_mount: String,
    /// Relative CPU weight; absent: 1024 per GiB reserved.
    pub cpu_shares: Option<u32>,
}

fn default_data_mount() -> String {
    "/data".into()
}
fn default_overhead_factor() -> f64 {
    1.0
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_stop_timeout() -> u64 {
    10
}
fn default_ready_timeout() -> u64 {
    120
}

/// How the agent decides an instance is running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyCheck {
    /// A TCP connect to the instance's port succeeds.
    #[default]
    Tcp,
    /// A UDP socket is bound to the instance's port (e.g. Minetest).
    Udp,
    /// The process is alive.
    Alive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    Integer,
    String,
    Boolean,
    Enum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigField {
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub description: String,
    pub min: Option<i64>,
    pub max: Option<i64>,
    /// Allowed values of an enum field.
    #[serde(default)]
    pub values: Vec<String>,
    pub max_length: Option<usize>,
    pub default: Option<Value>,
    #[serde(default)]
    pub required: bool,
}

/// What an agent needs to run one instance. Sent in the sync answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub server_id: ServerId,
    pub generation: Generation,
    pub template: String,
    pub memory_mib: MemMib,
    pub port: u16,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stop_signal: String,
    #[serde(default)]
    pub stop_command: Vec<String>,
    pub stop_timeout_ms: u64,
    pub ready: ReadyCheck,
    pub ready_timeout_ms: u64,
    /// The server's disconnect window: the node fences the instance this
    /// long after its lease expired without renewal.
    #[serde(default = "default_stop_after_ms")]
    pub stop_after_ms: i64,
    /// Present when the template has a `[docker]` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerInstance>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent_exit_codes: Vec<i32>,
}

fn default_stop_after_ms() -> i64 {
    300_000
}

/// The container half of an instance spec, rendered like the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerInstance {
    pub image: String,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    /// The `[process]` env with the `[docker]` env on top.
    pub env: BTreeMap<String, String>,
    pub data_mount: String,
    pub cpu_shares: Option<u32>,
}

const MAX_STRING: usize = 4096;

impl Template {
    /// Checks the template itself, so a broken operator file is refused at
    /// load time rather than when a server starts.
    pub fn check(&self) -> Result<(), CoreError> {
        let bad = |message: String| CoreError::InvalidTemplate { name: self.name.clone(), message };
        crate::validate::name(&self.name).map_err(|_| bad("the name must be 1-63 letters, digits, '-' or '_'".into()))?;
        if self.process.is_none() {
            return Err(bad("no [process] section".into()));
        }
        if !(self.memory_overhead_factor >= 1.0 && self.memory_overhead_factor <= 16.0) {
            return Err(bad(format!("memory_overhead_factor must be between 1 and 16, got {}", self.memory_overhead_factor)));
        }
        if let Some(d) = &self.docker {
            if d.image.trim().is_empty() {
                return Err(bad("[docker] image is empty".into()));
            }
            if !d.data_mount.starts_with('/') {
                return Err(bad(format!("[docker] data_mount must be an absolute path, got {:?}", d.data_mount)));
            }
        }
        for (key, f) in &self.config {
            if f.kind == FieldType::Enum && f.values.is_empty() {
                return Err(bad(format!("enum field {key} has no values")));
            }
            if let Some(d) = &f.default {
                check_field(key, f, d).map_err(|e| bad(format!("default of {key}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Validates a requested config (`None` means empty) and returns it
    /// with defaults filled in.
    pub fn validate_config(&self, requested: Option<&Value>) -> Result<Map<String, Value>, CoreError> {
        let empty = Map::new();
        let obj = match requested {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(_) => return Err(CoreError::InvalidConfig { path: "config".into(), message: "must be an object".into() }),
        };
        for key in obj.keys() {
            if !self.config.contains_key(key) {
                let known: Vec<&str> = self.config.keys().map(|k| k.as_str()).collect();
                return Err(CoreError::InvalidConfig {
                    path: format!("config.{key}"),
                    message: format!("unknown key for template {} (known: {})", self.name, known.join(", ")),
                });
            }
        }
        let mut out = Map::new();
        for (key, field) in &self.config {
            match obj.get(key).filter(|v| !v.is_null()).or(field.default.as_ref()) {
                Some(v) => {
                    check_field(key, field, v).map_err(|message| CoreError::InvalidConfig { path: format!("config.{key}"), message })?;
                    out.insert(key.clone(), v.clone());
                }
                None if field.required => return Err(CoreError::InvalidConfig { path: format!("config.{key}"), message: "is required".into() }),
                None => {}
            }
        }
        Ok(out)
    }

    /// The drivers this template says how to run with.
    pub fn drivers(&self) -> Vec<&'static str> {
        let mut d = Vec::new();
        if self.process.is_some() {
            d.push("process");
        }
        if self.docker.is_some() {
            d.push("docker");
        }
        d
    }

    /// What the workload may use of `memory`, the rest being overhead.
    pub fn workload_mib(&self, memory: MemMib) -> u64 {
        ((memory.0 as f64) / self.memory_overhead_factor.max(1.0)).floor() as u64
    }

    /// Renders the instance spec for a placed server. `{port}`,
    /// `{memory_mib}`, `{workload_mib}`, `{name}` and `{config.KEY}` are
    /// substituted here.
    pub fn render(&self, server: &Server, port: u16) -> Result<InstanceSpec, CoreError> {
        let p = self.process.as_ref().ok_or_else(|| CoreError::InvalidTemplate { name: self.name.clone(), message: "no [process] section".into() })?;
        let workload = self.workload_mib(server.memory_mib);
        let subst = |s: &str| substitute(s, server, port, workload);
        Ok(InstanceSpec {
            server_id: server.id.clone(),
            generation: server.generation,
            template: self.name.clone(),
            memory_mib: server.memory_mib,
            port,
            command: subst(&p.command),
            args: p.args.iter().map(|a| subst(a)).collect(),
            env: p.env.iter().map(|(k, v)| (k.clone(), subst(v))).collect(),
            stop_signal: p.stop_signal.clone(),
            stop_command: p.stop_command.iter().map(|a| subst(a)).collect(),
            stop_timeout_ms: p.stop_timeout_s * 1000,
            ready: p.ready,
            ready_timeout_ms: p.ready_timeout_s * 1000,
            stop_after_ms: server.stop_after_ms,
            docker: self.docker.as_ref().map(|d| DockerInstance {
                image: d.image.clone(),
                entrypoint: d.entrypoint.iter().map(|a| subst(a)).collect(),
                args: d.args.as_ref().unwrap_or(&p.args).iter().map(|a| subst(a)).collect(),
                env: p.env.iter().chain(d.env.iter()).map(|(k, v)| (k.clone(), subst(v))).collect(),
                data_mount: d.data_mount.clone(),
                cpu_shares: d.cpu_shares,
            }),
            permanent_exit_codes: p.permanent_exit_codes.clone(),
        })
    }
}

/// Replaces `{port}`, `{workload_mib}`, `{memory_mib}`, `{name}` and
/// `{config.KEY}` in one pass; other placeholders (`{data_dir}`,
/// `{berth_exe}`) stay for the agent. What is inserted is never scanned
/// again, so a config value cannot smuggle in a placeholder.
fn substitute(s: &str, server: &Server, port: u16, workload_mib: u64) -> String {
    if !s.contains('{') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let key = &after[..close];
        match key {
            "port" => out.push_str(&port.to_string()),
            "workload_mib" => out.push_str(&workload_mib.to_string()),
            "memory_mib" => out.push_str(&server.memory_mib.0.to_string()),
            "name" => out.push_str(&server.name),
            _ => match key.strip_prefix("config.").and_then(|k| server.config.get(k)) {
                Some(Value::String(v)) => out.push_str(v),
                Some(v) => out.push_str(&v.to_string()),
                None => {
                    out.push('{');
                    out.push_str(key);
                    out.push('}');
                }
            },
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

fn check_field(key: &str, f: &ConfigField, v: &Value) -> Result<(), String> {
    let _ = key;
    match f.kind {
        FieldType::Integer => {
            let n = v.as_i64().ok_or_else(|| format!("must be an integer, got {}", kind_of(v)))?;
            if let Some(min) = f.min {
                if n < min {
                    return Err(format!("must be at least {min}, got {n}"));
                }
            }
            if let Some(max) = f.max {
                if n > max {
                    return Err(format!("must be at most {max}, got {n}"));
                }
            }
        }
        FieldType::Boolean => {
            v.as_bool().ok_or_else(|| format!("must be true or false, got {}", kind_of(v)))?;
        }
        FieldType::String => {
            let s = v.as_str().ok_or_else(|| format!("must be a string, got {}", kind_of(v)))?;
            let limit = f.max_length.unwrap_or(MAX_STRING);
            if s.len() > limit {
                return Err(format!("must be at most {limit} bytes long"));
            }
            if s.contains('\0') {
                return Err("must not contain NUL".into());
            }
        }
        FieldType::Enum => {
            let s = v.as_str().ok_or_else(|| format!("must be one of {}", f.values.join(", ")))?;
            if !f.values.iter().any(|x| x == s) {
                return Err(format!("must be one of {}, got {s:?}", f.values.join(", ")));
            }
        }
    }
    Ok(())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_is_one_pass_and_leaves_agent_placeholders() {
        let mut server = crate::reconcile_test_server();
        server.name = "mc1".into();
        server.memory_mib = MemMib(1024);
        server.config.insert("motd".into(), Value::String("hi {port}".into()));
        server.config.insert("max".into(), Value::from(20));
        let out = substitute("--port {port} -m {memory_mib}/{workload_mib} {name} {config.motd} {config.max} {config.nope} {data_dir} {", &server, 30001, 900);
        assert_eq!(out, "--port 30001 -m 1024/900 mc1 hi {port} 20 {config.nope} {data_dir} {");
        assert_eq!(substitute("plain", &server, 1, 1), "plain");
    }
    use serde_json::json;

    fn t() -> Template {
        let mut config = BTreeMap::new();
        config.insert(
            "max_players".into(),
            ConfigField {
                kind: FieldType::Integer,
                description: String::new(),
                min: Some(1),
                max: Some(1000),
                values: vec![],
                max_length: None,
                default: Some(json!(20)),
                required: false,
            },
        );
        config.insert(
            "mode".into(),
            ConfigField {
                kind: FieldType::Enum,
                description: String::new(),
                min: None,
                max: None,
                values: vec!["survival".into(), "creative".into()],
                max_length: None,
                default: None,
                required: false,
            },
        );
        Template {
            name: "g".into(),
            description: String::new(),
            stateless: false,
            admin_only: false,
            min_memory_mib: 0,
            memory_overhead_factor: 1.0,
            docker: None,
            process: Some(ProcessSpec {
                command: "{berth_exe}".into(),
                args: vec!["--port".into(), "{port}".into(), "--players={config.max_players}".into()],
                env: BTreeMap::new(),
                stop_signal: "SIGTERM".into(),
                stop_command: vec![],
                stop_timeout_s: 10,
                ready: ReadyCheck::Tcp,
                ready_timeout_s: 60,
                permanent_exit_codes: vec![],
            }),
            config,
        }
    }

    #[test]
    fn defaults_are_filled_and_ranges_enforced() {
        let c = t().validate_config(None).unwrap();
        assert_eq!(c["max_players"], json!(20));
        let e = t().validate_config(Some(&json!({"max_players": 0}))).unwrap_err();
        assert_eq!(e.to_string(), "invalid config at config.max_players: must be at least 1, got 0");
        assert!(t().validate_config(Some(&json!({"max_players": 1001}))).is_err());
        assert!(t().validate_config(Some(&json!({"max_players": "ten"}))).is_err());
        assert!(t().validate_config(Some(&json!({"max_players": 2.5}))).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_enums_are_refused() {
        let e = t().validate_config(Some(&json!({"maxplayers": 5}))).unwrap_err();
        assert!(matches!(e, CoreError::InvalidConfig { ref path, .. } if path == "config.maxplayers"));
        assert!(t().validate_config(Some(&json!({"mode": "hardcore"}))).is_err());
        assert!(t().validate_config(Some(&json!({"mode": "creative"}))).is_ok());
        assert!(t().validate_config(Some(&json!([1]))).is_err());
    }

    #[test]
    fn render_substitutes_port_and_config() {
        let mut s = crate::reconcile_test_server();
        s.config = t().validate_config(None).unwrap();
        let spec = t().render(&s, 30005).unwrap();
        assert_eq!(spec.args, vec!["--port", "30005", "--players=20"]);
        assert_eq!(spec.command, "{berth_exe}", "agent-side placeholders stay");
        assert_eq!(spec.docker, None, "no [docker] section, no container spec");
    }

    #[test]
    fn docker_section_renders_with_process_args_by_default_and_overhead_inside_the_reservation() {
        let mut tpl = t();
        tpl.memory_overhead_factor = 1.25;
        tpl.docker = Some(DockerSpec {
            image: "img:local".into(),
            entrypoint: vec![],
            args: None,
            env: [("HEAP".to_string(), "{workload_mib}".to_string())].into(),
            data_mount: "/data".into(),
            cpu_shares: Some(512),
        });
        tpl.check().unwrap();
        let mut s = crate::reconcile_test_server();
        s.memory_mib = MemMib(1000);
        s.config = tpl.validate_config(None).unwrap();
        let spec = tpl.render(&s, 30005).unwrap();
        assert_eq!(spec.memory_mib, MemMib(1000), "the reservation is what the server asked for");
        let d = spec.docker.unwrap();
        assert_eq!(d.args, vec!["--port", "30005", "--players=20"]);
        assert_eq!(d.env["HEAP"], "800", "the workload gets the reservation minus the overhead");
        assert_eq!(d.cpu_shares, Some(512));
        tpl.memory_overhead_factor = 0.5;
        assert!(tpl.check().is_err(), "overhead below 1 would put memory outside the reservation");
    }
}
