//! The HTTP surface: routing, authentication, JSON parsing and rendering.
//! Handlers parse and authenticate, call one `App` use case, and render its
//! result; every failure becomes `{"error":{"code","message"}}` through
//! `ControlError`. Bodies are parsed here so malformed JSON is a 400 with a
//! clear message, never a framework default.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_api::{
    CreateToken, CreateWebhook, DeliveryList, EventList, EventView, NodeList, OperationAccepted, OperationList, OperationView, RegisterRequest, ServerList,
    ServerView, SyncRequest, TemplateList, WebhookList, WebhookView,
};
use berth_core::operation::OpKind;
use berth_core::NodeId;
use berth_store::EventFilter;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{authenticate, Caller};
use crate::error::ControlError;
use crate::service::App;

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/servers", get(list_servers).post(create_server))
        .route("/v1/servers/:id", get(get_server).delete(delete_server))
        .route("/v1/servers/:id/start", post(start_server))
        .route("/v1/servers/:id/stop", post(stop_server))
        .route("/v1/servers/:id/costs", get(server_costs))
        .route("/v1/usage", get(usage))
        .route("/v1/servers/:id/restart", post(restart_server))
        .route("/v1/servers/:id/kill", post(kill_server))
        .route("/v1/servers/:id/operations", get(server_operations).post(request_operation))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/:id", get(get_operation))
        .route("/v1/webhooks", get(list_webhooks).post(create_webhook))
        .route("/v1/webhooks/:id", axum::routing::delete(delete_webhook))
        .route("/v1/webhooks/:id/enable", post(enable_webhook))
        .route("/v1/webhooks/:id/disable", post(disable_webhook))
        .route("/v1/webhooks/:id/deliveries", get(webhook_deliveries))
        .route("/v1/deliveries", get(list_deliveries))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/:id/drain", post(drain_node))
        .route("/v1/nodes/:id/undrain", post(undrain_node))
        .route("/v1/nodes/:id/volumes", get(node_volumes))
        .route("/v1/events", get(list_events))
        .route("/v1/tokens", post(create_token))
        .route("/v1/templates", get(list_templates))
        .route("/v1/invariants", get(invariants))
        .route("/v1/cluster", get(cluster))
        .route("/v1/agent/register", post(agent_register))
        .route("/v1/agent/sync", post(agent_sync))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(run_to_completion))
        .with_state(app)
}

/// Runs every request in its own task, so a client that goes away (an agent
/// abandoning a long-poll, a CLI that timed out) never cancels a handler in
/// the middle of a store transaction: a dropped transaction's rollback is
/// only queued, and on PostgreSQL its row locks could stay held by an idle
/// pooled connection, stalling admission.
async fn run_to_completion(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => ControlError::Internal(format!("request task failed: {e}")).into_response(),
    }
}

fn parse_value(body: &Bytes) -> Result<Value, ControlError> {
    serde_json::from_slice(body).map_err(|e| ControlError::MalformedJson(e.to_string()))
}

/// Straight into `T`: an agent's sync carries a report of every instance,
/// and a detour through `Value` parsed it twice. Bad syntax is malformed
/// JSON; well-formed JSON of the wrong shape is an invalid request.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ControlError::invalid("invalid_request", e.to_string()),
        _ => ControlError::MalformedJson(e.to_string()),
    })
}

async fn caller(app: &App, headers: &HeaderMap) -> Result<Caller, ControlError> {
    authenticate(app.store.as_ref(), &app.tokens, headers).await
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Prometheus text; like `/healthz`, no token (scrapers rarely carry one;
/// it holds no tenant data, only fleet totals).
async fn metrics(State(app): AppState) -> Result<Response, ControlError> {
    let body = app.metrics().await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn not_found() -> ControlError {
    ControlError::NotFound("route".into())
}

async fn create_server(State(app): AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_user()?;
    let v = parse_value(&body)?;
    let s = app.create_server(&c, &v).await?;
    Ok((StatusCode::CREATED, Json(ServerView::from(&s))).into_response())
}

async fn list_servers(State(app): AppState, headers: HeaderMap) -> Result<Json<ServerList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let servers = app.list_servers(&c).await?;
    Ok(Json(ServerList { servers: servers.iter().map(ServerView::from).collect() }))
}

async fn get_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<ServerView>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(ServerView::from(&app.find_server(&c, &id).await?)))
}

/// Runs an operation and answers with the server as it is after
/// admission, naming the operation in the `Berth-Operation` header.
async fn server_operation(app: &App, headers: &HeaderMap, id: &str, kind: OpKind, status: StatusCode) -> Result<Response, ControlError> {
    let c = caller(app, headers).await?;
    let (op, s) = app.operation(&c, id, kind).await?;
    let mut resp = (status, Json(ServerView::from(&s))).into_response();
    resp.headers_mut().insert("berth-operation", HeaderValue::from_str(&op.id).expect("operation ids are ascii"));
    Ok(resp)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// Let a stateful server whose world is on a lost node start elsewhere
    /// with a fresh world.
    #[serde(default)]
    allow_fresh_world: bool,
    /// `"placed"`: answer once the server's memory is reserved on a node
    /// (or the start ended, or `wait_timeout_s` passed).
    #[serde(default)]
    wait: Option<String>,
    #[serde(default)]
    wait_timeout_s: Option<u64>,
}

const MAX_WAIT_S: u64 = 300;

async fn start_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_user()?;
    let req: StartRequest = if body.is_empty() { StartRequest::default() } else { parse(&body)? };
    let wait = match (req.wait.as_deref(), req.wait_timeout_s) {
        (None, None) => None,
        (None, Some(_)) => return Err(ControlError::invalid("invalid_request", "wait_timeout_s needs \"wait\": \"placed\"")),
        (Some("placed"), t) => match t.unwrap_or(30) {
            t @ 1..=MAX_WAIT_S => Some(std::time::Duration::from_secs(t)),
            t => return Err(ControlError::invalid("invalid_request", format!("wait_timeout_s must be from 1 to {MAX_WAIT_S}, got {t}"))),
        },
        (Some(other), _) => return Err(ControlError::invalid("invalid_request", format!("wait must be \"placed\", got {other:?}"))),
    };
    let (op, s) = match wait {
        Some(timeout) => app.start_and_wait_placed(&c, &id, req.allow_fresh_world, timeout).await?,
        None => app.operation_with(&c, &id, OpKind::Start, req.allow_fresh_world).await?,
    };
    let mut resp = (StatusCode::ACCEPTED, Json(ServerView::from(&s))).into_response();
    resp.headers_mut().insert("berth-operation", HeaderValue::from_str(&op.id).expect("operation ids are ascii"));
    Ok(resp)
}

async fn stop_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ControlError> {
    server_operation(&app, &headers, &id, OpKind::Stop, StatusCode::ACCEPTED).await
}

async fn restart_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ControlError> {
    server_operation(&app, &headers, &id, OpKind::Restart, StatusCode::ACCEPTED).await
}

async fn kill_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ControlError> {
    server_operation(&app, &headers, &id, OpKind::Kill, StatusCode::ACCEPTED).await
}

async fn delete_server(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ControlError> {
    server_operation(&app, &headers, &id, OpKind::Delete, StatusCode::OK).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationBody {
    kind: String,
}

async fn request_operation(State(app): AppState, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_user()?;
    let req: OperationBody = parse(&body)?;
    let kind = OpKind::parse(&req.kind).ok_or_else(|| {
        let known: Vec<&str> = OpKind::ALL.iter().map(|k| k.as_str()).collect();
        ControlError::invalid("invalid_request", format!("unknown operation kind {:?} (known: {})", req.kind, known.join(", ")))
    })?;
    let (op, s) = app.operation(&c, &id, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(OperationAccepted { operation: OperationView::from(&op), server: ServerView::from(&s) })).into_response())
}

fn query_error(e: axum::extract::rejection::QueryRejection) -> ControlError {
    let text = e.body_text();
    let detail = text.split_once(": ").map(|(_, d)| d.to_string()).unwrap_or(text);
    ControlError::invalid("invalid_request", format!("invalid query: {detail}"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationQuery {
    server: Option<String>,
    active: Option<bool>,
    after: Option<i64>,
    limit: Option<u32>,
}

fn operation_list(ops: Vec<berth_core::operation::Operation>, limit: u32) -> OperationList {
    let next_cursor = if ops.len() as u32 == limit { ops.last().map(|o| o.seq) } else { None };
    OperationList { operations: ops.iter().map(OperationView::from).collect(), next_cursor }
}

async fn list_operations(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OperationList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let ops = app.list_operations(&c, q.server.as_deref(), q.active.unwrap_or(false), q.after, limit).await?;
    Ok(Json(operation_list(ops, limit)))
}

async fn server_operations(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OperationList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    if q.server.is_some() {
        return Err(ControlError::invalid("invalid_request", "invalid query: the server is in the path"));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let ops = app.list_operations(&c, Some(&id), q.active.unwrap_or(false), q.after, limit).await?;
    Ok(Json(operation_list(ops, limit)))
}

async fn get_operation(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<OperationView>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(OperationView::from(&app.get_operation(&c, &id).await?)))
}

async fn create_webhook(State(app): AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_user()?;
    let req: CreateWebhook = parse(&body)?;
    Ok((StatusCode::CREATED, Json(app.create_webhook(&c, &req).await?)).into_response())
}

async fn list_webhooks(State(app): AppState, headers: HeaderMap) -> Result<Json<WebhookList>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(WebhookList { webhooks: app.list_webhooks(&c).await? }))
}

async fn delete_webhook(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<StatusCode, ControlError> {
    let c = caller(&app, &headers).await?;
    app.delete_webhook(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn enable_webhook(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<WebhookView>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.set_webhook_enabled(&c, &id, true).await?))
}

async fn disable_webhook(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<WebhookView>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.set_webhook_enabled(&c, &id, false).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryQuery {
    channel: Option<String>,
    limit: Option<u32>,
}

async fn webhook_deliveries(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    if q.channel.is_some() {
        return Err(ControlError::invalid("invalid_request", "invalid query: a webhook's deliveries have one channel"));
    }
    Ok(Json(DeliveryList { deliveries: app.webhook_deliveries(&c, &id, q.limit.unwrap_or(100)).await? }))
}

async fn list_deliveries(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(DeliveryList { deliveries: app.deliveries(&c, q.channel, q.limit.unwrap_or(100)).await? }))
}

async fn list_nodes(State(app): AppState, headers: HeaderMap) -> Result<Json<NodeList>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(NodeList { nodes: app.list_nodes(&c).await? }))
}

async fn drain_node(State(app): AppState, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_admin()?;
    let req: berth_api::DrainRequest = if body.is_empty() { Default::default() } else { parse(&body)? };
    Ok(Json(app.set_draining(&c, &id, true, req.deadline_s).await?).into_response())
}

async fn undrain_node(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.set_draining(&c, &id, false, None).await?).into_response())
}

async fn node_volumes(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<berth_api::VolumeList>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.node_volumes(&c, &id).await?))
}

async fn server_costs(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<berth_api::Costs>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.costs(&c, &id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tenant: Option<String>,
    month: String,
}

async fn usage(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<berth_api::Usage>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    Ok(Json(app.usage(&c, q.tenant, &q.month).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    server: Option<String>,
    node: Option<String>,
    kind: Option<String>,
    after: Option<i64>,
    /// RFC 3339 time or Unix milliseconds.
    since: Option<String>,
    limit: Option<u32>,
}

fn parse_since(s: &str) -> Result<i64, ControlError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| ControlError::invalid("invalid_request", format!("invalid query: since must be RFC 3339 or Unix milliseconds ({e})")))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

async fn list_events(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventList>, ControlError> {
    let c = caller(&app, &headers).await?;
    let Query(q) = query.map_err(query_error)?;
    let since = q.since.as_deref().map(parse_since).transpose()?;
    let server_id = match q.server {
        Some(s) => Some(app.find_server(&c, &s).await?.id),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let filter = EventFilter { server_id, node_id: q.node.map(NodeId), kind: q.kind, after: q.after, since, limit };
    let events = app.list_events(&c, filter).await?;
    let next_cursor = if events.len() as u32 == limit { events.last().map(|e| e.seq) } else { None };
    Ok(Json(EventList { events: events.iter().map(EventView::from).collect(), next_cursor }))
}

async fn create_token(State(app): AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_admin()?;
    let req: CreateToken = parse(&body)?;
    Ok((StatusCode::CREATED, Json(app.create_token(&c, &req).await?)).into_response())
}

async fn list_templates(State(app): AppState, headers: HeaderMap) -> Result<Json<TemplateList>, ControlError> {
    caller(&app, &headers).await?.require_user()?;
    Ok(Json(TemplateList { templates: app.template_views() }))
}

async fn invariants(State(app): AppState, headers: HeaderMap) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.invariants(&c).await?).into_response())
}

async fn cluster(State(app): AppState, headers: HeaderMap) -> Result<Json<Value>, ControlError> {
    let c = caller(&app, &headers).await?;
    Ok(Json(app.cluster(&c).await?))
}

async fn agent_register(State(app): AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_agent()?;
    let req: RegisterRequest = parse(&body)?;
    Ok(Json(app.register(&c, &req).await?).into_response())
}

async fn agent_sync(State(app): AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ControlError> {
    let c = caller(&app, &headers).await?;
    c.require_agent()?;
    let req: SyncRequest = parse(&body)?;
    Ok(Json(app.sync(&c, req).await?).into_response())
}
