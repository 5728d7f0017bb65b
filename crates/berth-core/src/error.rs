//! The typed errors of pure decisions. Messages are lowercase, without a
//! trailing period, and name the thing that was wrong.

use crate::model::ServerStatus;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("cannot {action} a server that is {from}")]
    InvalidTransition { action: &'static str, from: ServerStatus },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid memory_mib: {0}")]
    InvalidMemory(String),
    #[error("invalid config at {path}: {message}")]
    InvalidConfig { path: String, message: String },
    #[error("invalid template {name:?}: {message}")]
    InvalidTemplate { name: String, message: String },
}
