//! Operations on a server and the rules that serialize them (L5).
//!
//! An operation is a user's (or the restart policy's) request to change a
//! server: start, stop, restart, kill, delete, and the kinds reserved for
//! later (backup, restore, migrate, archive, unarchive). At most one runs
//! per server; `kill` is the one exception: it runs next to whatever runs
//! (it only makes an instance end sooner). This module owns the pure
//! decisions about them: the guard table (`guard`), whether a request is
//! admitted and what it cancels (`admit`), the first step of an operation
//! (`begin`) and when a running operation is finished (`settle`). It never
//! performs I/O and never changes a server itself: the store applies the
//! steps these functions return, inside the transaction that read the
//! inputs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{ServerId, ServerStatus};
use crate::{CoreError, Millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Start,
    Stop,
    Restart,
    Kill,
    Delete,
    Backup,
    Restore,
    Migrate,
    Archive,
    Unarchive,
}

impl OpKind {
    pub const ALL: [OpKind; 10] = [
        OpKind::Start,
        OpKind::Stop,
        OpKind::Restart,
        OpKind::Kill,
        OpKind::Delete,
        OpKind::Backup,
        OpKind::Restore,
        OpKind::Migrate,
        OpKind::Archive,
        OpKind::Unarchive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Start => "start",
            OpKind::Stop => "stop",
            OpKind::Restart => "restart",
            OpKind::Kill => "kill",
            OpKind::Delete => "delete",
            OpKind::Backup => "backup",
            OpKind::Restore => "restore",
            OpKind::Migrate => "migrate",
            OpKind::Archive => "archive",
            OpKind::Unarchive => "unarchive",
        }
    }

    pub fn parse(s: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Kinds whose executor exists today; the others are reserved: the guard
    /// table already covers them, but a request for one is refused at the
    /// edge until a later version implements it.
    pub fn is_implemented(self) -> bool {
        matches!(self, OpKind::Start | OpKind::Stop | OpKind::Restart | OpKind::Kill | OpKind::Delete)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// Admitted, waiting for the operations ahead of it.
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Ended by a later request that preempts it (a stop cancels a start).
    Cancelled,
}

impl OpStatus {
    pub const ALL: [OpStatus; 5] = [OpStatus::Pending, OpStatus::Running, OpStatus::Succeeded, OpStatus::Failed, OpStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Pending => "pending",
            OpStatus::Running => "running",
            OpStatus::Succeeded => "succeeded",
            OpStatus::Failed => "failed",
            OpStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<OpStatus> {
        OpStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, OpStatus::Succeeded | OpStatus::Failed | OpStatus::Cancelled)
    }
}

impl fmt::Display for OpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who asked for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpOrigin {
    User,
    /// The server's restart policy restarting it after a crash.
    RestartPolicy,
}

impl OpOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            OpOrigin::User => "user",
            OpOrigin::RestartPolicy => "restart_policy",
        }
    }
    pub fn parse(s: &str) -> Option<OpOrigin> {
        match s {
            "user" => Some(OpOrigin::User),
            "restart_policy" => Some(OpOrigin::RestartPolicy),
            _ => None,
        }
    }
}

/// Where a multi-step operation is. Only `restart` has two steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpPhase {
    /// Waiting for the instance to be confirmed gone.
    Stopping,
    /// Waiting for the server to run (queued, starting).
    Starting,
    Done,
}

impl OpPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            OpPhase::Stopping => "stopping",
            OpPhase::Starting => "starting",
            OpPhase::Done => "done",
        }
    }
    pub fn parse(s: &str) -> Option<OpPhase> {
        match s {
            "stopping" => Some(OpPhase::Stopping),
            "starting" => Some(OpPhase::Starting),
            "done" => Some(OpPhase::Done),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub server_id: ServerId,
    pub kind: OpKind,
    pub status: OpStatus,
    pub phase: Option<OpPhase>,
    pub origin: OpOrigin,
    /// Order of admission, global and increasing; operations of a server
    /// run in this order.
    pub seq: i64,
    /// Start attempts that failed transiently (mirrors the server while the
    /// operation runs, kept when it ends).
    pub attempts: u32,
    pub next_attempt_at: Option<Millis>,
    /// snake_case reason of a failure: `start_failed`, `no_capacity`,
    /// `crashed`, `invalid_state`, `cancelled`, `deleted`.
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

impl Operation {
    pub fn is_active(&self) -> bool {
        !self.status.is_terminal()
    }
}

/// What the guard table says about a request while another operation of
/// the same server is running or waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The request waits until the other operation has ended.
    Wait,
    /// The request is refused with 409 `operation_in_progress`.
    Refuse,
    /// The request cancels the other operation and takes its place (a stop
    /// cancels a start: the user's latest intent wins, safely).
    Preempt,
    /// The request runs at once next to the other operation (only `kill`,
    /// which only makes an instance end sooner).
    Alongside,
}

/// The guard table: `running` is an operation that has not ended (running
/// or waiting), `requested` the new request. Every pair is listed so the
/// table reads as documentation; `guard_table_is_total` checks it.
pub fn guard(running: OpKind, requested: OpKind) -> Verdict {
    use OpKind::*;
    use Verdict::*;
    if requested == Kill {
        // Kill bypasses the queue. It cancels what would start an instance,
        // runs next to anything else, and is never doubled.
        return match running {
            Start | Restart => Preempt,
            Kill => Refuse,
            _ => Alongside,
        };
    }
    match (running, requested) {
        // A start waits for capacity for up to the queue timeout: a stop
        // cancels it; a delete must not race it (stop first).
        (Start, Stop) => Preempt,
        (Start, Backup | Migrate) => Wait,
        (Start, Start | Restart | Delete | Restore | Archive | Unarchive) => Refuse,

        (Stop, Start | Restart | Delete | Backup | Restore | Migrate | Archive) => Wait,
        (Stop, Stop | Unarchive) => Refuse,

        (Restart, Stop) => Preempt,
        (Restart, Backup | Migrate) => Wait,
        (Restart, Start | Restart | Delete | Restore | Archive | Unarchive) => Refuse,

        (Kill, Start | Restart | Delete | Backup | Restore | Migrate | Archive) => Wait,
        (Kill, Stop | Unarchive) => Refuse,

        // Nothing follows a delete.
        (Delete, _) => Refuse,

        // A backup reads the world: deleting or replacing it meanwhile is
        // refused; lifecycle changes wait for it to finish.
        (Backup, Start | Stop | Restart | Migrate | Archive) => Wait,
        (Backup, Backup | Delete | Restore | Unarchive) => Refuse,

        // A restore replaces the world: a start waits for the restored one.
        (Restore, Start) => Wait,
        (Restore, _) => Refuse,

        // A migration moves the world; only a stop may queue behind it.
        (Migrate, Stop) => Wait,
        (Migrate, _) => Refuse,

        (Archive, Delete) => Wait,
        (Archive, _) => Refuse,

        (Unarchive, Start) => Wait,
        (Unarchive, _) => Refuse,

        (_, Kill) => unreachable!("handled above"),
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The guard table refused it because of `blocking`.
    InProgress { blocking: OpKind, blocking_status: OpStatus, blocking_id: String },
    /// It can never apply to the server as it is or will be.
    InvalidState(CoreError),
}

/// How an admitted request enters the server's operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Operations the request cancels (their status becomes `cancelled`).
    pub cancel: Vec<String>,
    /// True if it begins now; otherwise it waits (`pending`).
    pub begin_now: bool,
}

/// The status a server will have once `kind` has run to its intended end
/// (used to refuse requests that could never apply after what is ahead).
pub fn intended_status(kind: OpKind, from: ServerStatus) -> ServerStatus {
    match kind {
        OpKind::Start | OpKind::Restart => ServerStatus::Running,
        OpKind::Stop | OpKind::Kill => match from {
            ServerStatus::Crashed | ServerStatus::Failed => from,
            _ => ServerStatus::Stopped,
        },
        OpKind::Delete => ServerStatus::Deleted,
        _ => from,
    }
}

/// Whether `kind` can apply to a server in `status` (the state machine).
pub fn applicable(kind: OpKind, status: ServerStatus) -> Result<(), CoreError> {
    let ok = match kind {
        OpKind::Start => status.can_start(),
        OpKind::Stop | OpKind::Kill => matches!(status, ServerStatus::Queued | ServerStatus::Starting | ServerStatus::Running | ServerStatus::Stopping),
        OpKind::Restart => {
            matches!(status, ServerStatus::Running | ServerStatus::Starting | ServerStatus::Stopped | ServerStatus::Crashed | ServerStatus::Failed)
        }
        OpKind::Delete => status.can_delete(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidTransition { action: kind.as_str(), from: status })
    }
}

/// Decides whether a request for `requested` is admitted, given the server's
/// status and its operations that have not ended, oldest first.
///
/// Every unfinished operation is consulted: one that refuses refuses the
/// request (naming it); those it preempts are cancelled; otherwise the
/// request waits behind them. With nothing ahead it must apply to the
/// server's status now; with something ahead, to the status the last one
/// intends (a stop behind a start is fine; a start behind a start is not).
pub fn admit(status: ServerStatus, active: &[Operation], requested: OpKind) -> Result<Admission, Refusal> {
    let mut cancel = Vec::new();
    let mut waits_for_any = false;
    for op in active {
        match guard(op.kind, requested) {
            Verdict::Refuse => return Err(Refusal::InProgress { blocking: op.kind, blocking_status: op.status, blocking_id: op.id.clone() }),
            Verdict::Preempt => cancel.push(op.id.clone()),
            Verdict::Wait => waits_for_any = true,
            Verdict::Alongside => {}
        }
    }
    // The status the request will meet: that of the last operation that
    // stays ahead of it, else the current one. A cancelled start leaves the
    // server where it is; the preempting stop moves it itself.
    let remaining: Vec<&Operation> = active.iter().filter(|o| !cancel.contains(&o.id)).collect();
    let meets = if requested == OpKind::Kill { status } else { remaining.iter().fold(status, |s, o| intended_status(o.kind, s)) };
    applicable(requested, meets).map_err(Refusal::InvalidState)?;
    Ok(Admission { cancel, begin_now: requested == OpKind::Kill || !waits_for_any })
}

/// The first step of an operation when it begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Move the server to `to` (conditional on the status it had) and wait
    /// in `phase`.
    Transition { to: ServerStatus, phase: OpPhase },
    /// Delete the server (its instance is already gone); done at once.
    Delete,
    /// Nothing to do: the server is already where the operation leads.
    AlreadyDone(String),
    /// The operation cannot apply any more (what ran before it ended
    /// elsewhere than intended, e.g. a start failed before a restart).
    Invalid(CoreError),
}

pub fn begin(kind: OpKind, status: ServerStatus) -> Begin {
    use ServerStatus as S;
    match (kind, status) {
        (OpKind::Start, s) if s.can_start() => Begin::Transition { to: S::Queued, phase: OpPhase::Starting },
        (OpKind::Start, S::Running) => Begin::AlreadyDone("the server is already running".into()),
        (OpKind::Stop | OpKind::Kill, S::Queued) => Begin::Transition { to: S::Stopped, phase: OpPhase::Done },
        (OpKind::Stop | OpKind::Kill, S::Starting | S::Running) => Begin::Transition { to: S::Stopping, phase: OpPhase::Stopping },
        // Already on its way out: wait for the confirmation like any stop.
        (OpKind::Stop | OpKind::Kill, S::Stopping) => Begin::Transition { to: S::Stopping, phase: OpPhase::Stopping },
        (OpKind::Stop, S::Stopped | S::Crashed | S::Failed) => Begin::AlreadyDone(format!("the server is already {status}")),
        (OpKind::Restart, S::Starting | S::Running) => Begin::Transition { to: S::Stopping, phase: OpPhase::Stopping },
        (OpKind::Restart, s) if s.can_start() => Begin::Transition { to: S::Queued, phase: OpPhase::Starting },
        (OpKind::Delete, s) if s.can_delete() => Begin::Delete,
        (k, s) => Begin::Invalid(CoreError::InvalidTransition { action: k.as_str(), from: s }),
    }
}

/// What a running operation's next step is, given its server now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Still on its way.
    Continue,
    /// Move on to the next phase by moving the server to `to`.
    Next {
        to: ServerStatus,
        phase: OpPhase,
    },
    Succeeded,
    Failed {
        code: &'static str,
        message: String,
    },
}

/// `status` is the server's current status, `None` if it was deleted;
/// `last_error` its last error, for the message of a failed start.
pub fn settle(kind: OpKind, phase: Option<OpPhase>, status: Option<ServerStatus>, last_error: Option<&str>) -> Settle {
    use ServerStatus as S;
    let Some(status) = status else {
        return if kind == OpKind::Delete { Settle::Succeeded } else { Settle::Failed { code: "deleted", message: "the server was deleted".into() } };
    };
    let starting = |what: &str| match status {
        S::Queued | S::Starting => Settle::Continue,
        S::Running => Settle::Succeeded,
        S::Failed => {
            let why = last_error.unwrap_or("start failed");
            let code = if why.starts_with("no_capacity") { "no_capacity" } else { "start_failed" };
            Settle::Failed { code, message: format!("{what} failed: {why}") }
        }
        S::Crashed => Settle::Failed { code: "crashed", message: format!("the server crashed during its {what}") },
        other => Settle::Failed { code: "invalid_state", message: format!("the server became {other} during its {what}") },
    };
    match (kind, phase) {
        (_, Some(OpPhase::Done)) => Settle::Succeeded,
        (OpKind::Start, _) => starting("start"),
        (OpKind::Restart, Some(OpPhase::Starting)) => starting("restart"),
        (OpKind::Restart, _) => match status {
            S::Stopping => Settle::Continue,
            // The old instance is confirmed gone: start the new one.
            S::Stopped | S::Crashed | S::Failed => Settle::Next { to: S::Queued, phase: OpPhase::Starting },
            other => Settle::Failed { code: "invalid_state", message: format!("the server became {other} during its restart") },
        },
        (OpKind::Stop | OpKind::Kill, _) => match status {
            S::Stopping | S::Starting | S::Running => Settle::Continue,
            _ => Settle::Succeeded,
        },
        (OpKind::Delete, _) => Settle::Continue,
        (k, _) => Settle::Failed { code: "unsupported", message: format!("{k} is not implemented") },
    }
}

/// What of a server the settling of its operations depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerFacts {
    pub status: ServerStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<Millis>,
    pub last_error: Option<String>,
}

/// Whether settling and beginning a server's unfinished operations (`ops`,
/// in admission order) would change anything now: a running one settles or
/// moves to its next phase, or mirrors a changed retry state; or nothing
/// runs and one waits. `server` is `None` once the server is deleted. The
/// executor asks this of every server with unfinished operations and opens
/// a write only for those where the answer is yes; it must agree with the
/// store's `converge`, which applies the same `settle`.
pub fn needs_advance(server: Option<&ServerFacts>, ops: &[Operation]) -> bool {
    let mut running = ops.iter().filter(|o| o.status == OpStatus::Running).peekable();
    if running.peek().is_none() {
        return ops.iter().any(|o| o.status == OpStatus::Pending);
    }
    running.any(|op| match settle(op.kind, op.phase, server.map(|s| s.status), server.and_then(|s| s.last_error.as_deref())) {
        Settle::Continue => {
            matches!(op.kind, OpKind::Start | OpKind::Restart) && server.is_some_and(|s| s.attempts != op.attempts || s.next_attempt_at != op.next_attempt_at)
        }
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str, kind: OpKind, status: OpStatus) -> Operation {
        Operation {
            id: id.into(),
            server_id: ServerId("srv_x".into()),
            kind,
            status,
            phase: None,
            origin: OpOrigin::User,
            seq: 1,
            attempts: 0,
            next_attempt_at: None,
            error_code: None,
            error: None,
            created_at: 0,
            started_at: None,
            finished_at: None,
        }
    }

    fn facts(status: ServerStatus) -> ServerFacts {
        ServerFacts { status, attempts: 0, next_attempt_at: None, last_error: None }
    }

    #[test]
    fn needs_advance_only_when_converge_would_act() {
        let mut start = op("o1", OpKind::Start, OpStatus::Running);
        start.phase = Some(OpPhase::Starting);
        // Waiting for placement or confirmation: nothing to do.
        assert!(!needs_advance(Some(&facts(ServerStatus::Queued)), std::slice::from_ref(&start)));
        assert!(!needs_advance(Some(&facts(ServerStatus::Starting)), std::slice::from_ref(&start)));
        // Confirmed, failed, deleted: it settles.
        assert!(needs_advance(Some(&facts(ServerStatus::Running)), std::slice::from_ref(&start)));
        assert!(needs_advance(Some(&facts(ServerStatus::Failed)), std::slice::from_ref(&start)));
        assert!(needs_advance(None, std::slice::from_ref(&start)));
        // A retry changed the server's attempts: the operation mirrors it.
        let retried = ServerFacts { attempts: 1, next_attempt_at: Some(60_000), ..facts(ServerStatus::Queued) };
        assert!(needs_advance(Some(&retried), std::slice::from_ref(&start)));
        start.attempts = 1;
        start.next_attempt_at = Some(60_000);
        assert!(!needs_advance(Some(&retried), std::slice::from_ref(&start)));
        // A stop waits behind a running start; it begins only once the start ends.
        let stop = op("o2", OpKind::Stop, OpStatus::Pending);
        assert!(!needs_advance(Some(&retried), &[start.clone(), stop.clone()]));
        assert!(needs_advance(Some(&facts(ServerStatus::Running)), &[start, stop.clone()]));
        // Nothing runs and one waits: it begins.
        assert!(needs_advance(Some(&facts(ServerStatus::Running)), &[stop]));
        assert!(!needs_advance(Some(&facts(ServerStatus::Running)), &[]));
        // A stop finishes once the instance is confirmed gone.
        let mut stopping = op("o3", OpKind::Stop, OpStatus::Running);
        stopping.phase = Some(OpPhase::Stopping);
        assert!(!needs_advance(Some(&facts(ServerStatus::Stopping)), std::slice::from_ref(&stopping)));
        assert!(needs_advance(Some(&facts(ServerStatus::Stopped)), &[stopping]));
    }

    #[test]
    fn guard_table_is_total_and_kill_is_never_queued() {
        for a in OpKind::ALL {
            for b in OpKind::ALL {
                let v = guard(a, b);
                if b == OpKind::Kill {
                    assert_ne!(v, Verdict::Wait, "{a} x kill");
                } else {
                    assert_ne!(v, Verdict::Alongside, "only kill runs alongside: {a} x {b}");
                }
            }
        }
    }

    #[test]
    fn the_pairs_the_issue_names() {
        assert_eq!(guard(OpKind::Start, OpKind::Delete), Verdict::Refuse);
        assert_eq!(guard(OpKind::Stop, OpKind::Start), Verdict::Wait);
        assert_eq!(guard(OpKind::Backup, OpKind::Delete), Verdict::Refuse);
        assert_eq!(guard(OpKind::Restore, OpKind::Start), Verdict::Wait);
        assert_eq!(guard(OpKind::Migrate, OpKind::Archive), Verdict::Refuse);
        assert_eq!(guard(OpKind::Backup, OpKind::Restore), Verdict::Refuse);
        assert_eq!(guard(OpKind::Start, OpKind::Stop), Verdict::Preempt);
    }

    #[test]
    fn no_operation_of_a_kind_runs_twice_at_once() {
        for k in OpKind::ALL {
            assert_eq!(guard(k, k), Verdict::Refuse, "{k} x {k}");
        }
    }

    #[test]
    fn a_stop_cancels_a_waiting_or_running_start() {
        let a = admit(ServerStatus::Queued, &[op("o1", OpKind::Start, OpStatus::Running)], OpKind::Stop).unwrap();
        assert_eq!(a, Admission { cancel: vec!["o1".into()], begin_now: true });
        let ahead = [op("o1", OpKind::Stop, OpStatus::Running), op("o2", OpKind::Start, OpStatus::Pending)];
        let r = admit(ServerStatus::Stopping, &ahead, OpKind::Stop);
        assert!(matches!(r, Err(Refusal::InProgress { blocking: OpKind::Stop, .. })), "{r:?}");
    }

    #[test]
    fn a_request_behind_others_must_fit_what_they_intend() {
        // stop running, then start: fine, it waits.
        let a = admit(ServerStatus::Stopping, &[op("o1", OpKind::Stop, OpStatus::Running)], OpKind::Start).unwrap();
        assert!(!a.begin_now);
        // stop running, then delete: waits; the server will be stopped.
        assert!(admit(ServerStatus::Stopping, &[op("o1", OpKind::Stop, OpStatus::Running)], OpKind::Delete).is_ok());
        // start running, then delete: refused by the table.
        let r = admit(ServerStatus::Queued, &[op("o1", OpKind::Start, OpStatus::Running)], OpKind::Delete);
        assert!(matches!(r, Err(Refusal::InProgress { blocking: OpKind::Start, .. })));
        // nothing ahead: the current status decides.
        assert!(matches!(admit(ServerStatus::Running, &[], OpKind::Start), Err(Refusal::InvalidState(_))));
        assert!(matches!(admit(ServerStatus::Running, &[], OpKind::Delete), Err(Refusal::InvalidState(_))));
        assert!(admit(ServerStatus::Stopped, &[], OpKind::Start).unwrap().begin_now);
    }

    #[test]
    fn kill_runs_at_once_next_to_a_stop_and_cancels_a_start() {
        let a = admit(ServerStatus::Stopping, &[op("o1", OpKind::Stop, OpStatus::Running)], OpKind::Kill).unwrap();
        assert_eq!(a, Admission { cancel: vec![], begin_now: true });
        let a = admit(ServerStatus::Starting, &[op("o1", OpKind::Start, OpStatus::Running)], OpKind::Kill).unwrap();
        assert_eq!(a.cancel, vec!["o1".to_string()]);
        assert!(matches!(admit(ServerStatus::Stopped, &[], OpKind::Kill), Err(Refusal::InvalidState(_))));
    }

    #[test]
    fn restart_stops_then_starts() {
        assert_eq!(begin(OpKind::Restart, ServerStatus::Running), Begin::Transition { to: ServerStatus::Stopping, phase: OpPhase::Stopping });
        assert_eq!(settle(OpKind::Restart, Some(OpPhase::Stopping), Some(ServerStatus::Stopping), None), Settle::Continue);
        assert_eq!(
            settle(OpKind::Restart, Some(OpPhase::Stopping), Some(ServerStatus::Stopped), None),
            Settle::Next { to: ServerStatus::Queued, phase: OpPhase::Starting }
        );
        assert_eq!(settle(OpKind::Restart, Some(OpPhase::Starting), Some(ServerStatus::Running), None), Settle::Succeeded);
    }

    #[test]
    fn a_start_ends_with_the_server() {
        assert_eq!(settle(OpKind::Start, Some(OpPhase::Starting), Some(ServerStatus::Queued), None), Settle::Continue);
        assert_eq!(settle(OpKind::Start, Some(OpPhase::Starting), Some(ServerStatus::Running), None), Settle::Succeeded);
        assert!(matches!(
            settle(OpKind::Start, Some(OpPhase::Starting), Some(ServerStatus::Failed), Some("no_capacity: waited 10m")),
            Settle::Failed { code: "no_capacity", .. }
        ));
        assert!(matches!(settle(OpKind::Start, Some(OpPhase::Starting), Some(ServerStatus::Crashed), None), Settle::Failed { code: "crashed", .. }));
        assert!(matches!(settle(OpKind::Start, Some(OpPhase::Starting), None, None), Settle::Failed { code: "deleted", .. }));
    }

    #[test]
    fn stop_and_kill_end_when_the_instance_is_confirmed_gone() {
        for k in [OpKind::Stop, OpKind::Kill] {
            assert_eq!(settle(k, Some(OpPhase::Stopping), Some(ServerStatus::Stopping), None), Settle::Continue);
            assert_eq!(settle(k, Some(OpPhase::Stopping), Some(ServerStatus::Stopped), None), Settle::Succeeded);
        }
        assert_eq!(begin(OpKind::Stop, ServerStatus::Queued), Begin::Transition { to: ServerStatus::Stopped, phase: OpPhase::Done });
    }

    /// The guard table users read in the README is this one.
    #[test]
    fn the_readme_guard_table_matches_the_code() {
        let readme = include_str!("../../../README.md");
        let mut rows = 0;
        for line in readme.lines().filter(|l| l.starts_with("| **")) {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let running = OpKind::parse(cells[0].trim_matches('*')).expect("a kind per row");
            for (requested, cell) in OpKind::ALL.into_iter().zip(&cells[1..]) {
                let want = match *cell {
                    "W" => Verdict::Wait,
                    "R" => Verdict::Refuse,
                    "P" => Verdict::Preempt,
                    "A" => Verdict::Alongside,
                    other => panic!("unknown cell {other:?}"),
                };
                assert_eq!(guard(running, requested), want, "README says {running} x {requested} is {cell}");
            }
            rows += 1;
        }
        assert_eq!(rows, OpKind::ALL.len(), "one README row per kind");
    }

    #[test]
    fn only_the_five_lifecycle_kinds_are_implemented() {
        let implemented: Vec<OpKind> = OpKind::ALL.into_iter().filter(|k| k.is_implemented()).collect();
        assert_eq!(implemented, [OpKind::Start, OpKind::Stop, OpKind::Restart, OpKind::Kill, OpKind::Delete]);
        for k in OpKind::ALL {
            assert_eq!(OpKind::parse(k.as_str()), Some(k));
        }
    }
}
