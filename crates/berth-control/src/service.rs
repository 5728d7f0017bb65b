//! The use cases of the control plane: what each API call means, given an
//! authenticated caller. Input is validated completely before anything is
//! written (L7); state changes go through one store call each; decisions
//! are the pure functions of `berth_core`. HTTP details stay in `http`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_api::{
    CreateToken, InstanceKey, InvariantReport, KillOrder, NodeView, RegisterRequest, RegisterResponse, SyncRequest, SyncResponse, TemplateView, TokenCreated,
};
use berth_core::drift::MemoryFacts;
use berth_core::operation::OpKind;
use berth_core::reconcile::{reconcile, Change, InstanceState};
use berth_core::restart::RestartPolicy;
use berth_core::template::InstanceSpec;
use berth_core::{validate, Event, MemMib, NewEvent, NodeId, NodeStatus, Server, ServerId, ServerStatus, TokenKind};
use berth_store::{DesiredView, EventFilter, NodeRegistration, Store, SyncInput, TokenRecord};
use serde_json::Value;
use tokio::sync::Notify;

use crate::auth::{self, Caller};
use crate::clock::Clock;
use crate::drift::DriftWatch;
use crate::error::ControlError;
use crate::templates::Templates;
use crate::waker::{NodeWaker, PlacementWaiters};
use crate::ControlConfig;

pub struct App {
    pub store: Arc<dyn Store>,
    pub templates: Templates,
    pub clock: Arc<dyn Clock>,
    pub cfg: ControlConfig,
    /// Wakes the queue worker: a server was queued or capacity was freed.
    pub queue_wake: Arc<Notify>,
    pub nodes: NodeWaker,
    /// Requests waiting until their server is placed.
    pub placed: PlacementWaiters,
    pub replica: crate::leader::Replica,
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// Memory drift verdicts per node, derived from the latest syncs.
    pub drift: DriftWatch,
    /// Wakes the operations executor: an operation may settle or begin.
    pub ops_wake: Arc<Notify>,
    /// Tokens recently verified.
    pub tokens: auth::TokenCache,
    /// Agent syncs answered, and of them those that carried a changed
    /// desired set: how hard the fleet's lease renewals and reports press
    /// on the store.
    pub syncs: SyncCounts,
    pub sent: SentSets,
    /// Admission transactions the committer made.
    pub admission_commits: crate::admission::AdmissionCommits,
    /// What a start plans on to be placed in its own transaction.
    pub capacity: Arc<crate::capacity::CapacityView>,
}

/// The bits of the last server id this process made: ids sort in
/// creation order (`ServerId::next_ordered_bits` says why).
static LAST_SERVER_ID: AtomicU64 = AtomicU64::new(0);

fn new_server_id(now_ms: i64) -> ServerId {
    // Drawn once, so the step is the same function of `last` however often
    // the update retries, and the bits it stored can be made again.
    let random = rand::random();
    let step = |last| ServerId::next_ordered_bits(last, now_ms, random);
    let last = LAST_SERVER_ID.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(step(last))).expect("the step always gives bits");
    ServerId::from_bits(step(last))
}

#[derive(Default)]
pub struct SyncCounts {
    pub total: AtomicU64,
    pub with_desired: AtomicU64,
    /// Of `with_desired`, those that carried only what changed.
    pub delta: AtomicU64,
}

/// The desired set last sent to each node, by version, as sorted keys, so
/// that a sync naming it gets only what changed since (a generation's spec
/// never changes). One per node: about 80 bytes a server. A version not
/// kept (a restart, another replica, an answer the agent dropped) gets the
/// whole set, as before.
#[derive(Default)]
pub struct SentSets(std::sync::Mutex<HashMap<NodeId, SentSet>>);

/// A desired set's version and its keys, sorted.
type SentSet = (String, Arc<[(ServerId, u64)]>);

impl SentSets {
    fn get(&self, node: &NodeId, version: &str) -> Option<Arc<[(ServerId, u64)]>> {
        let sets = self.0.lock().expect("sent sets lock");
        sets.get(node).filter(|(v, _)| v == version).map(|(_, keys)| keys.clone())
    }

    fn put(&self, node: &NodeId, version: &str, keys: Vec<(ServerId, u64)>) {
        let entry = (version.to_string(), Arc::from(keys));
        // The set it replaces is freed after the lock is let go.
        let _replaced = self.0.lock().expect("sent sets lock").insert(node.clone(), entry);
    }
}

const DEFAULT_TENANT: &str = "default";
/// Default disconnect window: how long an instance runs on without its
/// node renewing before it is fenced and the server is lost.
const DEFAULT_STOP_AFTER_S: i64 = 300;
const MAX_STOP_AFTER_S: u64 = 7 * 24 * 3600;

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

impl App {
    pub async fn create_server(&self, caller: &Caller, body: &Value) -> Result<Server, ControlError> {
        caller.require_user()?;
        let obj = body.as_object().ok_or_else(|| ControlError::invalid("invalid_request", "the body must be a JSON object"))?;
        for key in obj.keys() {
            if !["name", "template", "memory_mib", "config", "tenant", "stop_after_s", "stateless", "plan", "restart_policy"].contains(&key.as_str()) {
                return Err(ControlError::invalid("unknown_field", format!("unknown field {key:?}")));
            }
        }
        let name = field(obj, "name")
            .ok_or_else(|| ControlError::invalid("invalid_request", "name is required"))?
            .as_str()
            .ok_or_else(|| ControlError::invalid("invalid_request", "name must be a string"))?;
        validate::server_name(name)?;
        let template_name = field(obj, "template")
            .ok_or_else(|| ControlError::invalid("invalid_request", "template is required"))?
            .as_str()
            .ok_or_else(|| ControlError::invalid("invalid_request", "template must be a string"))?;
        let template = self.templates.get(template_name).ok_or_else(|| {
            let known: Vec<&str> = self.templates.all().map(|t| t.name.as_str()).collect();
            ControlError::invalid("unknown_template", format!("unknown template {template_name:?} (known: {})", known.join(", ")))
        })?;
        if template.admin_only && !caller.is_admin() {
            return Err(ControlError::Forbidden(format!("template {template_name} needs an admin token")));
        }
        let memory = match field(obj, "memory_mib") {
            None => return Err(ControlError::invalid("invalid_memory", "memory_mib is required")),
            Some(v) => match (v.as_u64(), v.as_i64()) {
                (Some(m), _) => validate::memory(m)?,
                (None, Some(neg)) => return Err(ControlError::invalid("invalid_memory", format!("memory_mib must be positive, got {neg}"))),
                _ => return Err(ControlError::invalid("invalid_memory", format!("memory_mib must be an integer, got {v}"))),
            },
        };
        if memory.0 < template.min_memory_mib {
            return Err(ControlError::invalid("invalid_memory", format!("template {template_name} needs at least {} MiB", template.min_memory_mib)));
        }
        if let Some(largest) = self.store.largest_allocatable().await? {
            if memory > largest {
                return Err(ControlError::invalid(
                    "exceeds_node_capacity",
                    format!("memory_mib {} is more than any node can hold (largest allocatable: {})", memory.0, largest.0),
                ));
            }
        }
        let config = template.validate_config(obj.get("config"))?;
        let stop_after_ms = match field(obj, "stop_after_s") {
            None => DEFAULT_STOP_AFTER_S * 1000,
            Some(v) => match v.as_u64() {
                Some(s) if s <= MAX_STOP_AFTER_S => s as i64 * 1000,
                _ => return Err(ControlError::invalid("invalid_request", format!("stop_after_s must be an integer from 0 to {MAX_STOP_AFTER_S}, got {v}"))),
            },
        };
        let stateless = match field(obj, "stateless") {
            None => template.stateless,
            Some(v) => v.as_bool().ok_or_else(|| ControlError::invalid("invalid_request", format!("stateless must be true or false, got {v}")))?,
        };
        let plan = match field(obj, "plan") {
            None => "standard".to_string(),
            Some(v) => v.as_str().ok_or_else(|| ControlError::invalid("invalid_request", "plan must be a string"))?.to_string(),
        };
        let price_per_gib_hour = *self.cfg.prices.get(&plan).ok_or_else(|| {
            let known: Vec<&str> = self.cfg.prices.keys().map(|k| k.as_str()).collect();
            ControlError::invalid("unknown_plan", format!("unknown plan {plan:?} (known: {})", known.join(", ")))
        })?;
        let restart_policy = match field(obj, "restart_policy") {
            None => RestartPolicy::Never,
            Some(v) => v
                .as_str()
                .and_then(RestartPolicy::parse)
                .ok_or_else(|| ControlError::invalid("invalid_request", format!("restart_policy must be \"never\" or \"on-failure\", got {v}")))?,
        };
        let tenant = match (caller.kind, field(obj, "tenant")) {
            (TokenKind::Tenant, Some(_)) => return Err(ControlError::Forbidden("tenant tokens create servers for their own tenant only".into())),
            (TokenKind::Tenant, None) => caller.tenant.clone().unwrap_or_default(),
            (_, Some(t)) => {
                let t = t.as_str().ok_or_else(|| ControlError::invalid("invalid_request", "tenant must be a string"))?;
                validate::name(t)?;
                t.to_string()
            }
            (_, None) => DEFAULT_TENANT.to_string(),
        };
        let now = self.clock.now_ms();
        let server = Server {
            id: new_server_id(now),
            tenant,
            name: name.to_string(),
            template: template.name.clone(),
            memory_mib: memory,
            config,
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
            stop_after_ms,
            stateless,
            plan,
            price_per_gib_hour,
            home_node: None,
            restart_policy,
            created_at: now,
            updated_at: now,
        };
        let ev = NewEvent {
            kind: "server_created",
            server_id: Some(server.id.clone()),
            node_id: None,
            message: format!("server {} created from template {}", server.name, server.template),
        };
        self.store.insert_server(&server, &ev).await?;
        Ok(server)
    }

    /// Finds a server the caller may see; others are reported as not found
    /// so a tenant cannot probe other tenants' names.
    pub async fn find_server(&self, caller: &Caller, id_or_name: &str) -> Result<Server, ControlError> {
        caller.require_user()?;
        match self.store.get_server(id_or_name).await? {
            Some(s) if caller.can_see(&s) => Ok(s),
            _ => Err(ControlError::NotFound(format!("server {id_or_name:?}"))),
        }
    }

    /// Like `find_server`, reading only who the server is: enough for a
    /// request that goes on to a write, which reads the row itself.
    pub async fn find_server_ref(&self, caller: &Caller, id_or_name: &str) -> Result<berth_store::ServerRef, ControlError> {
        caller.require_user()?;
        match self.store.resolve_server(id_or_name).await? {
            Some(s) if caller.can_see_tenant(&s.tenant) => Ok(s),
            _ => Err(ControlError::NotFound(format!("server {id_or_name:?}"))),
        }
    }

    pub async fn list_servers(&self, caller: &Caller) -> Result<Vec<Server>, ControlError> {
        caller.require_user()?;
        let tenant = if caller.is_admin() { None } else { caller.tenant.as_deref() };
        Ok(self.store.list_servers(tenant).await?)
    }

    /// Every change of a server is an operation (see `operations`), so the
    /// guard table serializes them.
    pub async fn start_server(&self, caller: &Caller, id_or_name: &str) -> Result<Server, ControlError> {
        Ok(self.operation(caller, id_or_name, OpKind::Start).await?.1)
    }

    pub async fn stop_server(&self, caller: &Caller, id_or_name: &str) -> Result<Server, ControlError> {
        Ok(self.operation(caller, id_or_name, OpKind::Stop).await?.1)
    }

    pub async fn delete_server(&self, caller: &Caller, id_or_name: &str) -> Result<Server, ControlError> {
        Ok(self.operation(caller, id_or_name, OpKind::Delete).await?.1)
    }

    pub async fn list_nodes(&self, caller: &Caller) -> Result<Vec<NodeView>, ControlError> {
        caller.require_user()?;
        let nodes = self.store.list_nodes().await?;
        let usage = self.store.node_usage().await?;
        Ok(nodes
            .iter()
            .map(|n| {
                let u = usage.iter().find(|u| u.node_id == n.id);
                let mut v = NodeView::new(n, u.map(|u| u.reserved).unwrap_or_default(), u.map(|u| u.servers).unwrap_or(0));
                v.memory_drift = self.drift.view(n);
                v
            })
            .collect())
    }

    pub async fn set_draining(&self, caller: &Caller, id_or_name: &str, draining: bool, deadline_s: Option<u64>) -> Result<NodeView, ControlError> {
        caller.require_admin()?;
        let node = self.store.get_node(id_or_name).await?.ok_or_else(|| ControlError::NotFound(format!("node {id_or_name:?}")))?;
        if !matches!(node.status, NodeStatus::Ready | NodeStatus::Draining) {
            return Err(ControlError::Conflict(format!("node {} is {}; only ready and draining nodes change drain state", node.name, node.status)));
        }
        if deadline_s.is_some_and(|d| d > 30 * 24 * 3600) {
            return Err(ControlError::invalid("invalid_request", "deadline_s must be at most 30 days"));
        }
        let deadline = deadline_s.map(|d| self.clock.now_ms() + d as i64 * 1000);
        let node = self.store.set_drain(&node.id, draining, deadline).await?;
        let to = node.status;
        let kind = if draining { "node_draining" } else { "node_undrained" };
        self.store
            .insert_events(
                &[NewEvent { kind, server_id: None, node_id: Some(node.id.clone()), message: format!("node {} is {to}", node.name) }],
                self.clock.now_ms(),
            )
            .await?;
        if !draining {
            self.queue_wake.notify_one();
        }
        let usage = self.store.node_usage().await?;
        let u = usage.iter().find(|u| u.node_id == node.id);
        let mut v = NodeView::new(&node, u.map(|u| u.reserved).unwrap_or_default(), u.map(|u| u.servers).unwrap_or(0));
        v.memory_drift = self.drift.view(&node);
        Ok(v)
    }

    pub async fn costs(&self, caller: &Caller, id_or_name: &str) -> Result<berth_api::Costs, ControlError> {
        let s = self.find_server(caller, id_or_name).await?;
        let now = self.clock.now_ms();
        let sessions: Vec<berth_api::CostSession> = self
            .store
            .sessions_of(&s.id)
            .await?
            .iter()
            .map(|b| berth_api::CostSession {
                node_id: b.node_id.0.clone(),
                generation: b.generation,
                started_at: berth_api::rfc3339(b.started_at),
                ended_at: b.ended_at.map(berth_api::rfc3339),
                end_reason: b.end_reason.clone(),
                memory_mib: b.memory_mib.0,
                plan: b.plan.clone(),
                amount: berth_core::billing::amount(b.memory_mib, b.started_at, b.ended_at.unwrap_or(now), b.price_per_gib_hour),
            })
            .collect();
        let total = sessions.iter().map(|x| x.amount).sum();
        Ok(berth_api::Costs { server_id: s.id.0, sessions, total })
    }

    /// What a tenant (or, for admins without a tenant, everyone) was billed
    /// in a calendar month (UTC); sessions are clipped to the month.
    pub async fn usage(&self, caller: &Caller, tenant: Option<String>, month: &str) -> Result<berth_api::Usage, ControlError> {
        caller.require_user()?;
        let tenant = match (caller.kind, tenant) {
            (TokenKind::Tenant, Some(t)) if Some(&t) != caller.tenant.as_ref() => {
                return Err(ControlError::Forbidden("tenant tokens read their own usage only".into()))
            }
            (TokenKind::Tenant, _) => caller.tenant.clone(),
            (_, t) => t,
        };
        let (from, to) = berth_core::billing::month_bounds(month)
            .ok_or_else(|| ControlError::invalid("invalid_request", format!("month must look like 2026-11, got {month:?}")))?;
        let now = self.clock.now_ms();
        let sessions = self.store.sessions_between(tenant.as_deref(), from, to).await?;
        let mut servers = BTreeSet::new();
        let (mut amount, mut billed_ms) = (0i64, 0i64);
        for b in &sessions {
            let start = b.started_at.max(from);
            let end = b.ended_at.unwrap_or(now).min(to).min(now.max(start));
            amount += berth_core::billing::amount(b.memory_mib, start, end, b.price_per_gib_hour);
            billed_ms += (end - start).max(0);
            servers.insert(b.server_id.0.clone());
        }
        Ok(berth_api::Usage {
            tenant,
            month: month.to_string(),
            servers: servers.len() as u32,
            sessions: sessions.len() as u32,
            billed_seconds: billed_ms / 1000,
            amount,
        })
    }

    /// The server data dirs a node keeps, flagged as recovery candidates
    /// when they are not the copy the server runs on (never deleted here).
    pub async fn node_volumes(&self, caller: &Caller, id_or_name: &str) -> Result<berth_api::VolumeList, ControlError> {
        caller.require_admin()?;
        let node = self.store.get_node(id_or_name).await?.ok_or_else(|| ControlError::NotFound(format!("node {id_or_name:?}")))?;
        let mut volumes = Vec::new();
        for sid in self.store.node_volumes(&node.id).await? {
            let server = self.store.get_server(&sid.0).await?;
            let placed_here = server.as_ref().is_some_and(|s| s.node_id.as_ref() == Some(&node.id));
            volumes.push(berth_api::VolumeView {
                server_id: sid.0.clone(),
                server_name: server.as_ref().map(|s| s.name.clone()),
                server_status: server.as_ref().map(|s| s.status),
                server_node_id: server.as_ref().and_then(|s| s.node_id.as_ref().map(|n| n.0.clone())),
                // Placed elsewhere, deleted, or lost with this node: this
                // copy is a world someone may want back.
                recovery_candidate: !placed_here
                    && server.as_ref().is_none_or(|s| s.node_id.is_some() || s.last_exit.as_ref().is_some_and(|e| e.reason == "node_lost")),
            });
        }
        Ok(berth_api::VolumeList { node_id: node.id.0, volumes })
    }

    pub async fn create_token(&self, caller: &Caller, req: &CreateToken) -> Result<TokenCreated, ControlError> {
        caller.require_admin()?;
        let kind = TokenKind::parse(&req.kind)
            .ok_or_else(|| ControlError::invalid("invalid_request", format!("kind must be admin, tenant or agent, got {:?}", req.kind)))?;
        match (kind, &req.tenant) {
            (TokenKind::Tenant, None) => return Err(ControlError::invalid("invalid_request", "a tenant token needs a tenant")),
            (TokenKind::Tenant, Some(t)) => validate::name(t)?,
            (_, Some(_)) => return Err(ControlError::invalid("invalid_request", "only tenant tokens have a tenant")),
            (_, None) => {}
        }
        let secret = auth::new_secret(kind);
        self.store
            .insert_token(&TokenRecord {
                id: format!("tok_{:016x}", rand::random::<u64>()),
                hash: auth::hash_secret(&secret),
                kind,
                tenant: req.tenant.clone(),
                created_at: self.clock.now_ms(),
            })
            .await?;
        Ok(TokenCreated { token: secret, kind: kind.as_str().into(), tenant: req.tenant.clone() })
    }

    pub async fn list_events(&self, caller: &Caller, mut filter: EventFilter) -> Result<Vec<Event>, ControlError> {
        caller.require_user()?;
        if !caller.is_admin() {
            // A tenant reads the events of one of its own servers.
            let Some(sid) = filter.server_id.clone() else {
                return Err(ControlError::Forbidden("tenant tokens must name one of their servers (server=…)".into()));
            };
            let s = self.find_server(caller, &sid.0).await?;
            filter.server_id = Some(s.id);
            filter.node_id = None;
        }
        Ok(self.store.list_events(&filter).await?)
    }

    pub async fn cluster(&self, caller: &Caller) -> Result<Value, ControlError> {
        caller.require_user()?;
        let (replicas, lease) = self.store.cluster().await?;
        let now = self.clock.now_ms();
        let alive_after = now - 3 * self.cfg.lease_ttl_ms as i64;
        let leader = lease.as_ref().filter(|l| l.expires_at >= now);
        Ok(serde_json::json!({
            "this_replica": self.replica.id,
            "leader": leader.map(|l| serde_json::json!({"id": l.holder, "epoch": l.epoch, "expires_at": berth_api::rfc3339(l.expires_at)})),
            "replicas": replicas.iter().map(|r| serde_json::json!({
                "id": r.id,
                "address": r.address,
                "started_at": berth_api::rfc3339(r.started_at),
                "last_seen": berth_api::rfc3339(r.last_seen),
                "alive": r.last_seen >= alive_after,
                "leader": leader.is_some_and(|l| l.holder == r.id),
            })).collect::<Vec<_>>(),
        }))
    }

    /// Prometheus text exposition (base units, DESIGN §9 names), derived
    /// from one store snapshot, the event log and the drift watch.
    pub async fn metrics(&self) -> Result<String, ControlError> {
        use std::fmt::Write;
        const MIB: u64 = 1024 * 1024;
        // Counts, not rows: a scrape costs the same at 100 servers and at
        // 100,000.
        let nodes = self.store.list_nodes().await?;
        let (by_status, open_sessions) = self.store.status_counts().await?;
        let servers_in = |st: ServerStatus| by_status.iter().find(|(s, _)| *s == st).map(|(_, n)| *n).unwrap_or(0);
        let usage = self.store.node_usage().await?;
        let counts = self.store.count_events().await?;
        let count = |kind: &str| counts.iter().find(|(k, _)| k == kind).map(|(_, n)| *n).unwrap_or(0);
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, lines: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let node_label = |n: &berth_core::Node| format!("{{node=\"{}\",node_id=\"{}\"}}", n.name, n.id);
        gauge(
            "berth_node_memory_allocatable_bytes",
            "Memory reservations may use on the node.",
            "gauge",
            nodes.iter().map(|n| (node_label(n), (n.allocatable_mib().0 * MIB) as f64)).collect(),
        );
        gauge(
            "berth_node_memory_reserved_bytes",
            "Sum of the node's reservation rows.",
            "gauge",
            nodes.iter().map(|n| (node_label(n), (usage.iter().find(|u| u.node_id == n.id).map(|u| u.reserved.0).unwrap_or(0) * MIB) as f64)).collect(),
        );
        gauge(
            "berth_node_memory_used_bytes",
            "Memory in use on the host, as last reported by the agent.",
            "gauge",
            nodes.iter().map(|n| (node_label(n), (n.used_mib().0 * MIB) as f64)).collect(),
        );
        gauge(
            "berth_node_memory_drift",
            "1 while the node's real memory use has drifted from its reservations.",
            "gauge",
            nodes.iter().map(|n| (node_label(n), if self.drift.view(n).is_some() { 1.0 } else { 0.0 })).collect(),
        );
        gauge(
            "berth_node_disk_pressure",
            "1 while the node's data volume is past the pressure threshold.",
            "gauge",
            nodes.iter().map(|n| (node_label(n), if n.disk_pressure { 1.0 } else { 0.0 })).collect(),
        );
        gauge(
            "berth_nodes",
            "Nodes by status.",
            "gauge",
            berth_core::NodeStatus::ALL.iter().map(|st| (format!("{{status=\"{st}\"}}"), nodes.iter().filter(|n| n.status == *st).count() as f64)).collect(),
        );
        gauge(
            "berth_servers",
            "Servers by status.",
            "gauge",
            ServerStatus::ALL.iter().filter(|st| **st != ServerStatus::Deleted).map(|st| (format!("{{status=\"{st}\"}}"), servers_in(*st) as f64)).collect(),
        );
        let queued = servers_in(ServerStatus::Queued);
        gauge("berth_queue_depth", "Servers waiting for a placement.", "gauge", vec![(String::new(), queued as f64)]);
        gauge("berth_billing_open_sessions", "Open billing sessions.", "gauge", vec![(String::new(), open_sessions as f64)]);
        for (name, help, kind) in [
            ("berth_placements_total", "Placements committed.", "server_placed"),
            ("berth_node_lost_total", "Nodes declared lost.", "node_lost"),
            ("berth_servers_lost_total", "Servers lost with their node.", "server_lost"),
            ("berth_billing_zombies_closed_total", "Billing sessions closed by the zombie sweeper.", "billing_zombie_closed"),
            ("berth_memory_drift_total", "Memory drift events.", "memory_drift"),
        ] {
            gauge(name, help, "counter", vec![(String::new(), count(kind) as f64)]);
        }
        let counter = |c: &AtomicU64| vec![(String::new(), c.load(Ordering::Relaxed) as f64)];
        gauge("berth_agent_syncs_total", "Agent syncs (lease renewals with reports) answered.", "counter", counter(&self.syncs.total));
        gauge("berth_agent_syncs_desired_total", "Agent syncs answered with a changed desired set.", "counter", counter(&self.syncs.with_desired));
        gauge("berth_agent_syncs_delta_total", "Agent syncs answered with only what changed in the desired set.", "counter", counter(&self.syncs.delta));
        gauge(
            "berth_admission_commits_total",
            "Admission transactions committed, each at most --commit-max-batch placements.",
            "counter",
            counter(&self.admission_commits),
        );
        if let Some(w) = self.store.write_stats() {
            gauge("berth_store_writes_total", "Writes the store committed since it opened.", "counter", vec![(String::new(), w.writes as f64)]);
            gauge(
                "berth_store_commits_total",
                "Transactions (fsyncs) those writes took: fewer than writes under group commit.",
                "counter",
                vec![(String::new(), w.commits as f64)],
            );
            gauge(
                "berth_store_reruns_total",
                "Write batches undone and run again, a savepoint per write, because one write failed after changing rows.",
                "counter",
                vec![(String::new(), w.reruns as f64)],
            );
        }
        Ok(out)
    }

    pub fn template_views(&self) -> Vec<TemplateView> {
        self.templates
            .all()
            .map(|t| TemplateView {
                name: t.name.clone(),
                description: t.description.clone(),
                stateless: t.stateless,
                admin_only: t.admin_only,
                drivers: t.drivers().iter().map(|d| d.to_string()).collect(),
                config: serde_json::to_value(&t.config).unwrap_or(Value::Null),
            })
            .collect()
    }

    pub async fn invariants(&self, caller: &Caller) -> Result<InvariantReport, ControlError> {
        caller.require_admin()?;
        let snap = self.store.facts().await?;
        // O(every server): kept off the async workers, like the read.
        let violations = tokio::task::spawn_blocking(move || {
            let mut v = berth_core::invariants::check(&snap.nodes, &snap.servers, &snap.reservations, None);
            v.extend(berth_core::invariants::check_billing(&snap.servers, &snap.open_sessions));
            v
        })
        .await
        .map_err(|e| ControlError::Internal(format!("the invariant check failed: {e}")))?;
        Ok(InvariantReport { violations })
    }

    pub async fn register(&self, caller: &Caller, req: &RegisterRequest) -> Result<RegisterResponse, ControlError> {
        caller.require_agent()?;
        validate::name(&req.name)?;
        if req.ports.is_empty() || req.ports.min == 0 {
            return Err(ControlError::invalid("invalid_request", "ports must be a non-empty range of non-zero ports"));
        }
        if req.allocatable_mib > req.total_mib.max(req.allocatable_mib) || req.allocatable_mib > validate::MAX_MEMORY_MIB {
            return Err(ControlError::invalid("invalid_memory", "allocatable_mib is out of range"));
        }
        let reg = NodeRegistration {
            name: req.name.clone(),
            address: req.address.clone(),
            driver: req.driver.clone(),
            // The node's allocatable memory is what the agent declares; the
            // rest of the host is system reserve.
            total_mib: MemMib(req.total_mib.max(req.allocatable_mib)),
            system_reserved_mib: MemMib(req.total_mib.max(req.allocatable_mib) - req.allocatable_mib),
            cpu_cores: req.cpu_cores,
            ports: req.ports,
            max_concurrent_starts: req.max_concurrent_starts,
        };
        let node = self.store.register_node(&reg, &NodeId::from_bits(rand::random()), self.clock.now_ms()).await?;
        self.queue_wake.notify_one();
        Ok(RegisterResponse { node_id: node.id.0, epoch: node.epoch, sync_interval_ms: self.cfg.sync_interval_ms, lease_ttl_ms: self.cfg.lease_ttl_ms })
    }

    pub async fn sync(&self, caller: &Caller, req: SyncRequest) -> Result<SyncResponse, ControlError> {
        caller.require_agent()?;
        let node_id = NodeId(req.node_id.clone());
        let now = self.clock.now_ms();
        let disk = req.disk.unwrap_or_default();
        let disk_pressure = disk.total_mib > 0 && disk.used_mib * 100 >= disk.total_mib * self.cfg.disk_pressure_percent;
        let input = SyncInput {
            node_id: node_id.clone(),
            epoch: req.epoch,
            seq: req.seq,
            host_total_mib: MemMib(req.host.total_mib),
            host_available_mib: MemMib(req.host.available_mib),
            disk_total_mib: disk.total_mib,
            disk_used_mib: disk.used_mib,
            disk_pressure,
            volumes: req.volumes.clone(),
        };
        let retry = self.cfg.retry;
        let random = rand::random::<u64>();
        let report = req.instances.clone();
        let decide: berth_store::Decide =
            Arc::new(move |placed: &[berth_core::reconcile::Placed], last_alive: i64| reconcile(placed, &report, now, last_alive, &retry, random));
        let (node, decided) = self.store.sync_node(&input, now, decide).await?;
        self.syncs.total.fetch_add(1, Ordering::Relaxed);
        if decided.changes.iter().any(|c| !matches!(c, Change::Usage { .. } | Change::Confirmed { .. })) {
            // Capacity was freed or a server went back to the queue.
            self.queue_wake.notify_one();
        }
        // Interest in new work is registered before the first read, so a
        // placement committed in between is not missed.
        let wake = self.nodes.get(&node_id);
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The set the agent holds, if this control plane sent it: then the
        // keys and only the servers added since are read (one snapshot).
        let base = req.desired_version.as_deref().filter(|_| req.accepts_delta).and_then(|v| self.sent.get(&node_id, v).map(|keys| (v.to_string(), keys)));
        let held = base.as_ref().map(|(_, keys)| keys.clone());
        let view = self.store.desired_view(&node_id, held.clone(), true).await?;
        self.watch_drift(&node, &req, now, view.reserved.unwrap_or_default()).await?;
        if decided.changes.iter().any(|c| matches!(c, Change::Ended { .. } | Change::Fail { .. })) {
            // Operations settled inside the sync; a crash may call for the
            // restart policy.
            self.ops_wake.notify_one();
        }
        let DesiredView { mut keys, mut added, mut kill, .. } = view;
        if req.wait_ms > 0 && nothing_to_do(&keys, &kill, &req) {
            let wait = Duration::from_millis(req.wait_ms.min(self.cfg.long_poll_max_ms));
            // Woken or not, the set is read again.
            let _ = tokio::time::timeout(wait, notified).await;
            DesiredView { keys, added, kill, .. } = self.store.desired_view(&node_id, held, false).await?;
        }
        keys.sort_unstable();
        let version = berth_api::desired_version(&keys);
        let kill: Vec<KillOrder> = kill.into_iter().map(|(server_id, generation)| KillOrder { server_id, generation }).collect();
        let mut resp = SyncResponse {
            desired: Vec::new(),
            base_version: None,
            removed: Vec::new(),
            desired_version: version,
            unchanged: false,
            kill,
            lease_ttl_ms: self.cfg.lease_ttl_ms,
            sync_interval_ms: self.cfg.sync_interval_ms,
        };
        if req.desired_version.as_deref() == Some(resp.desired_version.as_str()) {
            resp.unchanged = true;
            return Ok(resp);
        }
        self.syncs.with_desired.fetch_add(1, Ordering::Relaxed);
        // What the agent holds once it applies this answer: the keys, also
        // of a server whose template is gone (never rendered, and not
        // renderable until a restart loads templates again).
        match base {
            // What changed since the set the agent holds, read with the
            // keys in one snapshot.
            Some((held_version, held)) => {
                resp.removed = held
                    .iter()
                    .filter(|k| keys.binary_search(k).is_err())
                    .map(|(server_id, generation)| InstanceKey { server_id: server_id.clone(), generation: *generation })
                    .collect();
                resp.desired = added.iter().filter_map(|s| self.render(s)).collect();
                resp.base_version = Some(held_version);
            }
            // The whole set, versioned by what was read: read after its
            // keys, it may have moved on since.
            None => {
                let servers = self.store.desired_on(&node_id).await?;
                keys = servers.iter().map(|s| (s.id.clone(), s.generation)).collect();
                keys.sort_unstable();
                resp.desired_version = berth_api::desired_version(&keys);
                resp.desired = servers.iter().filter_map(|s| self.render(s)).collect();
            }
        }
        self.sent.put(&node_id, &resp.desired_version, keys);
        self.syncs.delta.fetch_add(resp.base_version.is_some() as u64, Ordering::Relaxed);
        Ok(resp)
    }

    /// Judges the node's memory after a sync: real use from the report,
    /// reservations from the rows.
    async fn watch_drift(&self, node: &berth_core::Node, req: &SyncRequest, now: berth_core::Millis, reserved: MemMib) -> Result<(), ControlError> {
        let reserved = reserved.0;
        let instances_used_mib = req
            .instances
            .iter()
            .filter(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running | InstanceState::Stopping))
            .filter_map(|i| i.used_mib.map(|m| m.0))
            .sum();
        let facts = MemoryFacts {
            host_total_mib: req.host.total_mib,
            host_available_mib: req.host.available_mib,
            system_reserved_mib: node.system_reserved_mib.0,
            reserved_mib: reserved,
            instances_used_mib,
        };
        if let Some(ev) = self.drift.observe(node, &facts, self.cfg.drift_margin_mib, now) {
            tracing::warn!(node = %node.name, kind = ev.kind, message = %ev.message, "memory drift");
            self.store.insert_events(&[ev], now).await?;
        }
        Ok(())
    }

    fn render(&self, s: &Server) -> Option<InstanceSpec> {
        let port = s.port?;
        let t = self.templates.get(&s.template).or_else(|| {
            tracing::warn!(server = %s.id, template = %s.template, "template of a placed server is gone");
            None
        })?;
        t.render(s, port).ok()
    }
}

/// The agent has nothing to do when it already has every desired instance,
/// every other instance it reports is already on its way out, and none it
/// must kill is still reported as starting or running (a killed instance
/// reports `stopping` until it is seen gone).
fn nothing_to_do(desired: &[(ServerId, u64)], kill: &[(ServerId, u64)], req: &SyncRequest) -> bool {
    let must_kill = req
        .instances
        .iter()
        .any(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running) && kill.iter().any(|(s, g)| *s == i.server_id && *g == i.generation));
    if must_kill {
        return false;
    }
    let want: BTreeSet<(&str, u64)> = desired.iter().map(|(id, generation)| (id.0.as_str(), *generation)).collect();
    let have: BTreeSet<(&str, u64)> = req.instances.iter().map(|i| (i.server_id.0.as_str(), i.generation)).collect();
    want.is_subset(&have)
        && req.instances.iter().filter(|i| !want.contains(&(i.server_id.0.as_str(), i.generation))).all(|i| matches!(i.state, InstanceState::Stopping))
}
