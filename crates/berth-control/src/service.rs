//! The use cases of the control plane: what each API call means, given an
//! authenticated caller. Input is validated completely before anything is
//! written (L7); state changes go through one store call each; decisions
//! are the pure functions of `berth_core`. HTTP details stay in `http`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use berth_api::{
    CreateToken, InvariantReport, KillOrder, NodeView, RegisterRequest, RegisterResponse, SyncRequest, SyncResponse, TemplateView,
    TokenCreated,
};
use berth_core::operation::OpKind;
use berth_core::restart::RestartPolicy;
use berth_core::reconcile::{reconcile, Change, InstanceState};
use berth_core::template::InstanceSpec;
use berth_core::{validate, Event, MemMib, NewEvent, NodeId, NodeStatus, Server, ServerId, ServerStatus, TokenKind};
use berth_store::{EventFilter, NodeRegistration, Store, SyncInput, TokenRecord};
use serde_json::Value;
use tokio::sync::Notify;

use crate::auth::{self, Caller};
use crate::clock::Clock;
use crate::error::ControlError;
use crate::templates::Templates;
use crate::waker::NodeWaker;
use crate::ControlConfig;

pub struct App {
    pub store: Arc<dyn Store>,
    pub templates: Templates,
    pub clock: Arc<dyn Clock>,
    pub cfg: ControlConfig,
    /// Wakes the queue worker: a server was queued or capacity was freed.
    pub queue_wake: Arc<Notify>,
    pub nodes: NodeWaker,
    pub replica: crate::leader::Replica,
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the operations executor: an operation may settle or begin.
    pub ops_wake: Arc<Notify>,
}

const DEFAULT_TENANT: &str = "default";

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

impl App {
    pub async fn create_server(&self, caller: &Caller, body: &Value) -> Result<Server, ControlError> {
        caller.require_user()?;
        let obj = body.as_object().ok_or_else(|| ControlError::invalid("invalid_request", "the body must be a JSON object"))?;
        for key in obj.keys() {
            if !["name", "template", "memory_mib", "config", "tenant", "restart_policy"].contains(&key.as_str()) {
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
            return Err(ControlError::invalid(
                "invalid_memory",
                format!("template {template_name} needs at least {} MiB", template.min_memory_mib),
            ));
        }
        let nodes = self.store.list_nodes().await?;
        let largest = nodes.iter().filter(|n| n.status != NodeStatus::Removed).map(|n| n.allocatable_mib()).max();
        if let Some(largest) = largest {
            if memory > largest {
                return Err(ControlError::invalid(
                    "exceeds_node_capacity",
                    format!("memory_mib {} is more than any node can hold (largest allocatable: {})", memory.0, largest.0),
                ));
            }
        }
        let config = template.validate_config(obj.get("config"))?;
        let restart_policy = match field(obj, "restart_policy") {
            None => RestartPolicy::Never,
            Some(v) => v.as_str().and_then(RestartPolicy::parse).ok_or_else(|| {
                ControlError::invalid("invalid_request", format!("restart_policy must be \"never\" or \"on-failure\", got {v}"))
            })?,
        };
        let tenant = match (caller.kind, field(obj, "tenant")) {
            (TokenKind::Tenant, Some(_)) => {
                return Err(ControlError::Forbidden("tenant tokens create servers for their own tenant only".into()))
            }
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
            id: ServerId::from_random(rand::random()),
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
                NodeView::new(n, u.map(|u| u.reserved).unwrap_or_default(), u.map(|u| u.servers).unwrap_or(0))
            })
            .collect())
    }

    pub async fn set_draining(&self, caller: &Caller, id_or_name: &str, draining: bool) -> Result<NodeView, ControlError> {
        caller.require_admin()?;
        let node = self.store.get_node(id_or_name).await?.ok_or_else(|| ControlError::NotFound(format!("node {id_or_name:?}")))?;
        let to = match (node.status, draining) {
            (NodeStatus::Ready | NodeStatus::Draining, true) => NodeStatus::Draining,
            (NodeStatus::Draining | NodeStatus::Ready, false) => NodeStatus::Ready,
            (other, _) => {
                return Err(ControlError::Conflict(format!("node {} is {other}; only ready and draining nodes change drain state", node.name)))
            }
        };
        let node = self.store.set_node_status(&node.id, to).await?;
        let kind = if draining { "node_draining" } else { "node_undrained" };
        self.store
            .insert_events(&[NewEvent { kind, server_id: None, node_id: Some(node.id.clone()), message: format!("node {} is {to}", node.name) }], self.clock.now_ms())
            .await?;
        if !draining {
            self.queue_wake.notify_one();
        }
        let usage = self.store.node_usage().await?;
        let u = usage.iter().find(|u| u.node_id == node.id);
        Ok(NodeView::new(&node, u.map(|u| u.reserved).unwrap_or_default(), u.map(|u| u.servers).unwrap_or(0)))
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

    pub fn template_views(&self) -> Vec<TemplateView> {
        self.templates
            .all()
            .map(|t| TemplateView {
                name: t.name.clone(),
                description: t.description.clone(),
                stateless: t.stateless,
                admin_only: t.admin_only,
                config: serde_json::to_value(&t.config).unwrap_or(Value::Null),
            })
            .collect()
    }

    pub async fn invariants(&self, caller: &Caller) -> Result<InvariantReport, ControlError> {
        caller.require_admin()?;
        let snap = self.store.snapshot().await?;
        Ok(InvariantReport { violations: berth_core::invariants::check(&snap.nodes, &snap.servers, &snap.reservations, None) })
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
        let node = self.store.register_node(&reg, &NodeId::from_random(rand::random()), self.clock.now_ms()).await?;
        self.queue_wake.notify_one();
        Ok(RegisterResponse {
            node_id: node.id.0,
            epoch: node.epoch,
            sync_interval_ms: self.cfg.sync_interval_ms,
            lease_ttl_ms: self.cfg.lease_ttl_ms,
        })
    }

    pub async fn sync(&self, caller: &Caller, req: SyncRequest) -> Result<SyncResponse, ControlError> {
        caller.require_agent()?;
        let node_id = NodeId(req.node_id.clone());
        let now = self.clock.now_ms();
        let input = SyncInput {
            node_id: node_id.clone(),
            epoch: req.epoch,
            seq: req.seq,
            host_total_mib: MemMib(req.host.total_mib),
            host_available_mib: MemMib(req.host.available_mib),
        };
        let retry = self.cfg.retry;
        let random = rand::random::<u64>();
        let report = req.instances.clone();
        let decide = move |placed: &[Server]| reconcile(placed, &report, now, &retry, random);
        let (_node, decided) = self.store.sync_node(&input, now, &decide).await?;
        if decided.changes.iter().any(|c| !matches!(c, Change::Usage { .. } | Change::Confirmed { .. })) {
            // Capacity was freed or a server went back to the queue.
            self.queue_wake.notify_one();
        }
        if decided.changes.iter().any(|c| !matches!(c, Change::Usage { .. })) {
            // An operation may have reached its end.
            self.ops_wake.notify_one();
        }

        let mut desired = self.store.desired_on(&node_id).await?;
        let mut kill = self.store.killing_on(&node_id).await?;
        if req.wait_ms > 0 && nothing_to_do(&desired, &kill, &req) {
            let wake = self.nodes.get(&node_id);
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-read after registering interest so a change committed in
            // between is not missed.
            desired = self.store.desired_on(&node_id).await?;
            kill = self.store.killing_on(&node_id).await?;
            if nothing_to_do(&desired, &kill, &req) {
                let wait = Duration::from_millis(req.wait_ms.min(self.cfg.long_poll_max_ms));
                let _ = tokio::time::timeout(wait, notified).await;
                desired = self.store.desired_on(&node_id).await?;
                kill = self.store.killing_on(&node_id).await?;
            }
        }
        Ok(SyncResponse {
            desired: desired.iter().filter_map(|s| self.render(s)).collect(),
            kill: kill.into_iter().map(|(server_id, generation)| KillOrder { server_id, generation }).collect(),
            lease_ttl_ms: self.cfg.lease_ttl_ms,
            sync_interval_ms: self.cfg.sync_interval_ms,
        })
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
fn nothing_to_do(desired: &[Server], kill: &[(ServerId, u64)], req: &SyncRequest) -> bool {
    let must_kill = req
        .instances
        .iter()
        .any(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running) && kill.iter().any(|(s, g)| *s == i.server_id && *g == i.generation));
    if must_kill {
        return false;
    }
    let want: BTreeSet<(&str, u64)> = desired.iter().map(|s| (s.id.0.as_str(), s.generation)).collect();
    let have: BTreeSet<(&str, u64)> = req.instances.iter().map(|i| (i.server_id.0.as_str(), i.generation)).collect();
    want.is_subset(&have)
        && req
            .instances
            .iter()
            .filter(|i| !want.contains(&(i.server_id.0.as_str(), i.generation)))
            .all(|i| matches!(i.state, InstanceState::Stopping))
}
