//! Store errors: typed so the control plane maps each to one HTTP status.

use berth_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{0}")]
    Conflict(String),
    /// The guard table refused an operation because of another one.
    #[error("{blocking} is {status} on this server (operation {id})")]
    OperationInProgress { blocking: berth_core::operation::OpKind, status: berth_core::operation::OpStatus, id: String },
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
    /// The write's batch did not commit (the writer stopped, or the
    /// database failed under it); nothing of it was written.
    #[error("the write was not committed: {0}")]
    NotCommitted(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A read could not run (the runtime is shutting down).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A unique index refused the write (a name, a token, an open session).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(d)) => d.is_unique_violation(),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::ConstraintViolation
                    && matches!(f.extended_code, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
            }
            _ => false,
        }
    }

    /// True when the database could not be reached (as opposed to a query
    /// that failed): callers answer 503 and retry later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_)) => true,
            // PostgreSQL: connection exceptions (class 08) and operator or
            // crash shutdowns (57P01..57P03) mean "come back later".
            StoreError::Database(sqlx::Error::Database(d)) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            StoreError::Database(sqlx::Error::Protocol(m)) => m.contains("connection"),
            StoreError::NotCommitted(_) | StoreError::Unavailable(_) => true,
            // The writer's own connection: a full disk or an I/O error is
            // worth retrying; a bad statement is not.
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                matches!(
                    f.code,
                    rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                )
            }
            _ => false,
        }
    }
}
