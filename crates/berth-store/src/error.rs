//! Store errors: typed so the control plane maps each to one HTTP status.

use berth_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Invalid(#[from] CoreError),
    #[error("stale sync: {0}")]
    StaleSync(String),
    #[error("this replica is not the leader (lease of {holder} at epoch {epoch} is gone)")]
    NotLeader { holder: String, epoch: u64 },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// True when the database could not be reached (as opposed to a query
    /// that failed): callers answer 503 and retry later.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_))
        )
    }
}
