//! berth-core: the domain types and every pure decision of berth.
//!
//! This crate owns ids, the memory unit, nodes, servers, reservations, their
//! state machines, templates and config validation, and the decisions that
//! must be testable without I/O: placement, the admission re-check, queue
//! order, agent-report reconciliation, retry backoff, and the invariant
//! checker for the laws of DESIGN.md. It must never depend on tokio, sqlx,
//! axum or any I/O: time, ids and randomness are passed in.

pub mod admission;
pub mod billing;
pub mod drift;
pub mod error;
pub mod health;
pub mod invariants;
pub mod model;
pub mod notify;
pub mod operation;
pub mod placement;
pub mod queue;
pub mod reconcile;
pub mod restart;
pub mod retry;
pub mod template;
pub mod validate;

pub use error::CoreError;
pub use model::*;

/// Milliseconds since the Unix epoch. Time is always a parameter in core.
pub type Millis = i64;

/// A plain stopped server for unit tests of this crate.
#[cfg(test)]
pub(crate) fn reconcile_test_server() -> Server {
    Server {
        id: ServerId("srv_test".into()),
        tenant: "default".into(),
        name: "test".into(),
        template: "fakegame".into(),
        memory_mib: MemMib(100),
        config: Default::default(),
        status: ServerStatus::Stopped,
        node_id: None,
        generation: 0,
        port: None,
        last_exit: None,
        queued_at: Some(0),
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
        used_mib: None,
        stop_after_ms: 300_000,
        stateless: false,
        plan: "standard".into(),
        price_per_gib_hour: 100,
        home_node: None,
        restart_policy: Default::default(),
        created_at: 0,
        updated_at: 0,
    }
}
