//! Control-plane errors and the one function that maps them to HTTP.
//!
//! Every handler returns `ControlError`; `status()` and `code()` are the
//! only place where a domain error becomes a status code and a snake_case
//! code, and `IntoResponse` renders `{"error":{"code","message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_api::{ErrorBody, ErrorDetail};
use berth_core::CoreError;
use berth_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("malformed json: {0}")]
    MalformedJson(String),
    /// A request whose JSON is well formed but whose fields are wrong.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{0}")]
    Conflict(String),
    /// The guard table refused a request because of another operation.
    #[error("cannot {requested} now: {blocking} is {status} on this server (operation {id})")]
    OperationInProgress { requested: &'static str, blocking: &'static str, status: &'static str, id: String },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("stale sync: {0}")]
    StaleSync(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Startup(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ControlError::NotFound(what),
            StoreError::Conflict(m) => ControlError::Conflict(m),
            // The service fills in what was requested; see `App::operation`.
            StoreError::OperationInProgress { blocking, status, id } => {
                ControlError::OperationInProgress { requested: "act", blocking: blocking.as_str(), status: status.as_str(), id }
            }
            StoreError::Invalid(c) => ControlError::Core(c),
            StoreError::StaleSync(m) => ControlError::StaleSync(m),
            StoreError::Corrupt(m) => ControlError::Internal(m),
            e @ StoreError::NotLeader { .. } => ControlError::Unavailable(e.to_string()),
            e @ StoreError::Database(_) if e.is_unavailable() => ControlError::Unavailable(e.to_string()),
            StoreError::Database(e) => ControlError::Internal(e.to_string()),
            e @ (StoreError::NotCommitted(_) | StoreError::Unavailable(_)) => ControlError::Unavailable(e.to_string()),
            e @ StoreError::Sqlite(_) if e.is_unavailable() => ControlError::Unavailable(e.to_string()),
            StoreError::Sqlite(e) => ControlError::Internal(e.to_string()),
        }
    }
}

impl ControlError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ControlError::Invalid { code, message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ControlError::Unauthorized => StatusCode::UNAUTHORIZED,
            ControlError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ControlError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Core(CoreError::InvalidTransition { .. }) => StatusCode::CONFLICT,
            ControlError::Core(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Conflict(_) | ControlError::StaleSync(_) | ControlError::OperationInProgress { .. } => StatusCode::CONFLICT,
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Startup(_) | ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ControlError::Unauthorized => "unauthorized",
            ControlError::Forbidden(_) => "forbidden",
            ControlError::NotFound(_) => "not_found",
            ControlError::MalformedJson(_) => "malformed_json",
            ControlError::Invalid { code, .. } => code,
            ControlError::Core(CoreError::InvalidTransition { .. }) => "invalid_state",
            ControlError::Core(CoreError::InvalidName { .. }) => "invalid_name",
            ControlError::Core(CoreError::InvalidMemory(_)) => "invalid_memory",
            ControlError::Core(CoreError::InvalidConfig { .. }) => "invalid_config",
            ControlError::Core(CoreError::InvalidTemplate { .. }) => "invalid_template",
            ControlError::Conflict(_) => "conflict",
            ControlError::OperationInProgress { .. } => "operation_in_progress",
            ControlError::StaleSync(_) => "stale_sync",
            ControlError::Unavailable(_) => "store_unavailable",
            ControlError::Startup(_) | ControlError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code().to_string(), message: self.to_string() } };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("2"));
        }
        resp
    }
}
