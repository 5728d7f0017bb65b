//! berth-client: a typed HTTP client for the berth API, used by the CLI,
//! the agent, tests and benchmarks. It maps every non-2xx answer to
//! `ClientError::Api` with the server's code and message, and does nothing
//! else: no retries, no caching (callers decide).

use std::time::Duration;

use berth_api::{
    CreateServer, CreateToken, CreateWebhook, DeliveryList, ErrorBody, EventList, InvariantReport, NodeList, NodeView, OperationList, RegisterRequest,
    RegisterResponse, ServerList, ServerView, SyncRequest, SyncResponse, TemplateList, TokenCreated, WebhookList, WebhookView,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("{message} ({code}, http {status})")]
    Api { status: u16, code: String, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Percent-encodes a path segment (ids and names are already restricted,
/// but user input on the CLI is not yet validated).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_timeout(base, token, Duration::from_secs(30))
    }

    pub fn with_timeout(base: &str, token: &str, timeout: Duration) -> Client {
        let http = reqwest::Client::builder().timeout(timeout).build().expect("a client without tls builds");
        Client { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ClientError::Api { status: status.as_u16(), code: e.error.code, message: e.error.message },
                Err(_) => ClientError::Api {
                    status: status.as_u16(),
                    code: status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "_"),
                    message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { url, message: e.to_string() })
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/healthz", None::<&()>, None).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let resp = self.http.get(&url).send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| ClientError::Transport { url, source })?;
        if !status.is_success() {
            return Err(ClientError::Api { status: status.as_u16(), code: "metrics_failed".into(), message: text.chars().take(200).collect() });
        }
        Ok(text)
    }

    /// `/metrics` as (series, value) pairs: `name{labels}` exactly as
    /// written, comments skipped.
    pub async fn metrics(&self) -> Result<Vec<(String, f64)>, ClientError> {
        Ok(parse_metrics(&self.metrics_text().await?))
    }

    pub async fn create_server(&self, req: &CreateServer) -> Result<ServerView, ClientError> {
        self.call(Method::POST, "/v1/servers", Some(req), None).await
    }

    pub async fn list_servers(&self) -> Result<ServerList, ClientError> {
        self.call(Method::GET, "/v1/servers", None::<&()>, None).await
    }

    pub async fn get_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::GET, &format!("/v1/servers/{}", seg(id)), None::<&()>, None).await
    }

    pub async fn start_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::POST, &format!("/v1/servers/{}/start", seg(id)), None::<&()>, None).await
    }

    /// Starts a stateful server lost with its node elsewhere, on a fresh world.
    pub async fn start_server_fresh(&self, id: &str) -> Result<ServerView, ClientError> {
        let body = serde_json::json!({"allow_fresh_world": true});
        self.call(Method::POST, &format!("/v1/servers/{}/start", seg(id)), Some(&body), None).await
    }

    /// Starts a server and answers once its memory is reserved on a node
    /// (status `starting`), the start ended, or `timeout_s` passed.
    pub async fn start_server_wait_placed(&self, id: &str, timeout_s: u64) -> Result<ServerView, ClientError> {
        let body = serde_json::json!({"wait": "placed", "wait_timeout_s": timeout_s});
        let http_timeout = Duration::from_secs(timeout_s) + Duration::from_secs(10);
        self.call(Method::POST, &format!("/v1/servers/{}/start", seg(id)), Some(&body), Some(http_timeout)).await
    }

    pub async fn stop_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::POST, &format!("/v1/servers/{}/stop", seg(id)), None::<&()>, None).await
    }

    pub async fn restart_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::POST, &format!("/v1/servers/{}/restart", seg(id)), None::<&()>, None).await
    }

    pub async fn kill_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::POST, &format!("/v1/servers/{}/kill", seg(id)), None::<&()>, None).await
    }

    /// `query` is a ready-made query string without the leading `?`.
    pub async fn server_operations(&self, id: &str, query: &str) -> Result<OperationList, ClientError> {
        self.call(Method::GET, &format!("/v1/servers/{}/operations?{query}", seg(id)), None::<&()>, None).await
    }

    pub async fn create_webhook(&self, req: &CreateWebhook) -> Result<WebhookView, ClientError> {
        self.call(Method::POST, "/v1/webhooks", Some(req), None).await
    }

    pub async fn list_webhooks(&self) -> Result<WebhookList, ClientError> {
        self.call(Method::GET, "/v1/webhooks", None::<&()>, None).await
    }

    pub async fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Result<WebhookView, ClientError> {
        let verb = if enabled { "enable" } else { "disable" };
        self.call(Method::POST, &format!("/v1/webhooks/{}/{verb}", seg(id)), None::<&()>, None).await
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<(), ClientError> {
        let url = format!("{}/v1/webhooks/{}", self.base, seg(id));
        let resp = self.http.delete(&url).bearer_auth(&self.token).send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ClientError::Api { status, code: e.error.code, message: e.error.message },
            Err(_) => ClientError::Api { status, code: "error".into(), message: String::from_utf8_lossy(&bytes).into() },
        })
    }

    pub async fn webhook_deliveries(&self, id: &str) -> Result<DeliveryList, ClientError> {
        self.call(Method::GET, &format!("/v1/webhooks/{}/deliveries", seg(id)), None::<&()>, None).await
    }

    pub async fn delete_server(&self, id: &str) -> Result<ServerView, ClientError> {
        self.call(Method::DELETE, &format!("/v1/servers/{}", seg(id)), None::<&()>, None).await
    }

    pub async fn list_nodes(&self) -> Result<NodeList, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>, None).await
    }

    pub async fn drain_node(&self, id: &str, drain: bool, deadline_s: Option<u64>) -> Result<NodeView, ClientError> {
        if drain {
            let body = berth_api::DrainRequest { deadline_s };
            self.call(Method::POST, &format!("/v1/nodes/{}/drain", seg(id)), Some(&body), None).await
        } else {
            self.call(Method::POST, &format!("/v1/nodes/{}/undrain", seg(id)), None::<&()>, None).await
        }
    }

    pub async fn node_volumes(&self, id: &str) -> Result<berth_api::VolumeList, ClientError> {
        self.call(Method::GET, &format!("/v1/nodes/{}/volumes", seg(id)), None::<&()>, None).await
    }

    pub async fn costs(&self, id: &str) -> Result<berth_api::Costs, ClientError> {
        self.call(Method::GET, &format!("/v1/servers/{}/costs", seg(id)), None::<&()>, None).await
    }

    pub async fn usage(&self, tenant: Option<&str>, month: &str) -> Result<berth_api::Usage, ClientError> {
        let mut path = format!("/v1/usage?month={}", seg(month));
        if let Some(t) = tenant {
            path.push_str(&format!("&tenant={}", seg(t)));
        }
        self.call(Method::GET, &path, None::<&()>, None).await
    }

    pub async fn create_token(&self, req: &CreateToken) -> Result<TokenCreated, ClientError> {
        self.call(Method::POST, "/v1/tokens", Some(req), None).await
    }

    /// `query` is a ready-made query string without the leading `?`.
    pub async fn list_events(&self, query: &str) -> Result<EventList, ClientError> {
        let path = if query.is_empty() { "/v1/events".to_string() } else { format!("/v1/events?{query}") };
        self.call(Method::GET, &path, None::<&()>, None).await
    }

    pub async fn templates(&self) -> Result<TemplateList, ClientError> {
        self.call(Method::GET, "/v1/templates", None::<&()>, None).await
    }

    pub async fn invariants(&self) -> Result<InvariantReport, ClientError> {
        self.call(Method::GET, "/v1/invariants", None::<&()>, None).await
    }

    pub async fn cluster(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/v1/cluster", None::<&()>, None).await
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.call(Method::POST, "/v1/agent/register", Some(req), None).await
    }

    /// A sync may be held by the control plane for `wait_ms`; the request
    /// timeout allows for that.
    pub async fn sync(&self, req: &SyncRequest) -> Result<SyncResponse, ClientError> {
        // Short beyond the poll itself: over a link that went dead the agent
        // must notice soon, or a healed partition is seen late.
        let timeout = Duration::from_millis(req.wait_ms) + Duration::from_secs(5);
        self.call(Method::POST, "/v1/agent/sync", Some(req), Some(timeout)).await
    }
}

/// Parses Prometheus text into (series, value) pairs.
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// True for answers that mean "try again later" rather than "you are wrong".
pub fn is_retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } => true,
        ClientError::Api { status, .. } => *status >= 500 || *status == StatusCode::TOO_MANY_REQUESTS.as_u16(),
        ClientError::Decode { .. } => false,
    }
}
