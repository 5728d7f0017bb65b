//! Reconciliation of one agent report with the control plane's records.
//!
//! Sync is level-triggered: the agent reports every instance it knows, and
//! this function decides, from the servers placed on that node and the
//! report alone, which record changes follow and which instances the node
//! should run. It is idempotent: applying the same report twice yields no
//! further change. Reports about an older generation never change a server
//! (L3: writes derived from reports are conditional on the generation); such
//! instances are simply not desired, so the agent stops them.

use serde::{Deserialize, Serialize};

use crate::model::{Generation, LastExit, MemMib, NewEvent, NodeId, Server, ServerId, ServerStatus};
use crate::retry::{RetryDecision, RetryPolicy};
use crate::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Running,
    Stopping,
    /// The instance ended; `exit` says how.
    Exited,
    /// The instance could not be started; `error_class` says whether a
    /// retry may help.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    Transient,
    Permanent,
}

/// One instance as its agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub server_id: ServerId,
    pub generation: Generation,
    pub state: InstanceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<LastExit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<ErrorClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_mib: Option<MemMib>,
}

/// A record change; each is conditional on the server still having
/// `generation` and the status it had in the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Starting → running; the reservation becomes active.
    Confirmed {
        server_id: ServerId,
        generation: Generation,
    },
    /// The instance is gone: the server moves to `to` and its reservation
    /// is released; its billing session closes at `billed_until` (the last
    /// time it was confirmed alive, or the confirmed stop).
    Ended {
        server_id: ServerId,
        generation: Generation,
        to: ServerStatus,
        exit: LastExit,
        billed_until: Millis,
    },
    /// An unknown server's node came back within the window and the
    /// instance still runs: running again, billing backfilled from where it
    /// stopped.
    Reconnected {
        server_id: ServerId,
        generation: Generation,
    },
    /// A transient start failure: reservation released, back to the queue.
    Requeue {
        server_id: ServerId,
        generation: Generation,
        attempts: u32,
        next_attempt_at: Millis,
        error: String,
    },
    /// A permanent start failure or retries exhausted.
    Fail {
        server_id: ServerId,
        generation: Generation,
        error: String,
    },
    Usage {
        server_id: ServerId,
        generation: Generation,
        used_mib: MemMib,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reconciled {
    pub changes: Vec<Change>,
    /// Servers the node should run after the changes, with their generation.
    pub desired: Vec<(ServerId, Generation)>,
    pub events: Vec<NewEvent>,
}

/// What reconciling needs of a server placed on the reporting node; the
/// store reads only these columns on every sync.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub id: ServerId,
    pub name: String,
    pub node_id: Option<NodeId>,
    pub status: ServerStatus,
    pub generation: Generation,
    pub attempts: u32,
    pub used_mib: Option<MemMib>,
}

impl From<&Server> for Placed {
    fn from(s: &Server) -> Placed {
        Placed {
            id: s.id.clone(),
            name: s.name.clone(),
            node_id: s.node_id.clone(),
            status: s.status,
            generation: s.generation,
            attempts: s.attempts,
            used_mib: s.used_mib,
        }
    }
}

/// Whether a reported memory use is worth recording: the first report, or
/// a move of at least 16 MiB and 5 %. Real memory use wobbles on every
/// sample; writing each wobble of every instance on every sync would make
/// renewals writes of every row.
pub fn usage_changed(recorded: Option<MemMib>, reported: MemMib) -> bool {
    match recorded {
        None => true,
        Some(old) => old.0.abs_diff(reported.0) >= 16.max(old.0 / 20),
    }
}

/// `placed` are the servers whose `node_id` is the reporting node and whose
/// status holds a reservation; `last_alive` is when the node last renewed
/// before this report (an instance reported ended now was last confirmed
/// alive then); `random` feeds retry jitter.
pub fn reconcile(placed: &[Placed], report: &[InstanceReport], now: Millis, last_alive: Millis, retry: &RetryPolicy, random: u64) -> Reconciled {
    let mut out = Reconciled::default();
    let by_key: std::collections::HashMap<(&ServerId, Generation), &InstanceReport> = report.iter().map(|r| ((&r.server_id, r.generation), r)).collect();
    for s in placed {
        let r = by_key.get(&(&s.id, s.generation)).copied();
        let mut status = s.status;
        if let Some(r) = r {
            if let Some(used) = r.used_mib {
                if usage_changed(s.used_mib, used) {
                    out.changes.push(Change::Usage { server_id: s.id.clone(), generation: s.generation, used_mib: used });
                }
            }
        }
        let ev = |kind: &'static str, message: String| NewEvent { kind, server_id: Some(s.id.clone()), node_id: s.node_id.clone(), message };
        match (s.status, r.map(|r| r.state)) {
            (ServerStatus::Starting, Some(InstanceState::Running)) => {
                out.changes.push(Change::Confirmed { server_id: s.id.clone(), generation: s.generation });
                out.events.push(ev("server_running", format!("server {} is running (generation {})", s.name, s.generation)));
                status = ServerStatus::Running;
            }
            (ServerStatus::Unknown, Some(InstanceState::Running)) => {
                out.changes.push(Change::Reconnected { server_id: s.id.clone(), generation: s.generation });
                out.events.push(ev("server_reconnected", format!("server {} is running again: its node is back", s.name)));
                status = ServerStatus::Running;
            }
            (ServerStatus::Starting | ServerStatus::Running | ServerStatus::Unknown, Some(InstanceState::Exited)) => {
                let exit = r.and_then(|r| r.exit.clone()).unwrap_or(LastExit { reason: "exited".into(), code: None });
                out.events.push(ev("server_crashed", format!("server {} crashed: {}{}", s.name, exit.reason, code_suffix(exit.code))));
                out.changes.push(Change::Ended {
                    server_id: s.id.clone(),
                    generation: s.generation,
                    to: ServerStatus::Crashed,
                    exit,
                    billed_until: last_alive,
                });
                status = ServerStatus::Crashed;
            }
            (ServerStatus::Running | ServerStatus::Unknown, None) => {
                let exit = LastExit { reason: "instance_missing".into(), code: None };
                out.events.push(ev("server_crashed", format!("server {} crashed: its node no longer reports the instance", s.name)));
                out.changes.push(Change::Ended {
                    server_id: s.id.clone(),
                    generation: s.generation,
                    to: ServerStatus::Crashed,
                    exit,
                    billed_until: last_alive,
                });
                status = ServerStatus::Crashed;
            }
            (ServerStatus::Starting | ServerStatus::Running | ServerStatus::Unknown, Some(InstanceState::Failed)) => {
                let r = r.expect("matched Some");
                let error = r.error.clone().unwrap_or_else(|| "start failed".into());
                let decision = match r.error_class {
                    Some(ErrorClass::Transient) => retry.after_failure(s.attempts + 1, now, random),
                    _ => RetryDecision::GiveUp,
                };
                match decision {
                    RetryDecision::RetryAt(at) => {
                        out.events.push(ev("start_retry", format!("start of {} failed ({error}); retrying", s.name)));
                        out.changes.push(Change::Requeue {
                            server_id: s.id.clone(),
                            generation: s.generation,
                            attempts: s.attempts + 1,
                            next_attempt_at: at,
                            error,
                        });
                        status = ServerStatus::Queued;
                    }
                    RetryDecision::GiveUp => {
                        out.events.push(ev("start_failed", format!("start of {} failed: {error}", s.name)));
                        out.changes.push(Change::Fail { server_id: s.id.clone(), generation: s.generation, error });
                        status = ServerStatus::Failed;
                    }
                }
            }
            (ServerStatus::Stopping, None | Some(InstanceState::Exited) | Some(InstanceState::Failed)) => {
                let code = r.and_then(|r| r.exit.as_ref()).and_then(|e| e.code);
                let exit = LastExit { reason: "stopped".into(), code };
                out.events.push(ev("server_stopped", format!("server {} stopped", s.name)));
                out.changes.push(Change::Ended { server_id: s.id.clone(), generation: s.generation, to: ServerStatus::Stopped, exit, billed_until: now });
                status = ServerStatus::Stopped;
            }
            _ => {}
        }
        if status.is_desired_running() {
            out.desired.push((s.id.clone(), s.generation));
        }
    }
    out
}

fn code_suffix(code: Option<i32>) -> String {
    code.map(|c| format!(" (exit code {c})")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeId;

    fn server(id: &str, status: ServerStatus, gen: Generation) -> Server {
        Server {
            id: ServerId(id.into()),
            name: id.into(),
            status,
            node_id: Some(NodeId("n1".into())),
            generation: gen,
            port: Some(30000),
            ..crate::reconcile_test_server()
        }
    }

    fn rep(id: &str, gen: Generation, state: InstanceState) -> InstanceReport {
        InstanceReport { server_id: ServerId(id.into()), generation: gen, state, exit: None, error_class: None, error: None, used_mib: None }
    }

    fn go(placed: &[Server], report: &[InstanceReport]) -> Reconciled {
        let placed: Vec<Placed> = placed.iter().map(Placed::from).collect();
        reconcile(&placed, report, 1000, 900, &RetryPolicy::default(), 0)
    }

    #[test]
    fn small_wobbles_of_memory_use_are_not_written() {
        assert!(usage_changed(None, MemMib(100)));
        assert!(!usage_changed(Some(MemMib(1000)), MemMib(1030)), "3 % of 1000");
        assert!(usage_changed(Some(MemMib(1000)), MemMib(1050)), "5 % of 1000");
        assert!(!usage_changed(Some(MemMib(100)), MemMib(110)), "under 16 MiB");
        assert!(usage_changed(Some(MemMib(100)), MemMib(84)));
        let mut s = server("a", ServerStatus::Running, 1);
        s.used_mib = Some(MemMib(500));
        let mut r = rep("a", 1, InstanceState::Running);
        r.used_mib = Some(MemMib(505));
        assert!(go(std::slice::from_ref(&s), std::slice::from_ref(&r)).changes.is_empty());
        r.used_mib = Some(MemMib(600));
        assert_eq!(go(&[s], &[r]).changes, vec![Change::Usage { server_id: ServerId("a".into()), generation: 1, used_mib: MemMib(600) }]);
    }

    #[test]
    fn running_report_confirms_a_starting_server() {
        let r = go(&[server("a", ServerStatus::Starting, 2)], &[rep("a", 2, InstanceState::Running)]);
        assert_eq!(r.changes, vec![Change::Confirmed { server_id: ServerId("a".into()), generation: 2 }]);
        assert_eq!(r.desired, vec![(ServerId("a".into()), 2)]);
    }

    #[test]
    fn reports_of_an_older_generation_change_nothing() {
        let r = go(&[server("a", ServerStatus::Starting, 3)], &[rep("a", 2, InstanceState::Running)]);
        assert!(r.changes.is_empty());
        assert_eq!(r.desired, vec![(ServerId("a".into()), 3)]);
        let r = go(&[server("a", ServerStatus::Running, 3)], &[rep("a", 2, InstanceState::Exited), rep("a", 3, InstanceState::Running)]);
        assert!(r.changes.is_empty());
    }

    #[test]
    fn a_starting_server_not_yet_reported_stays_desired() {
        let r = go(&[server("a", ServerStatus::Starting, 1)], &[]);
        assert!(r.changes.is_empty());
        assert_eq!(r.desired.len(), 1);
    }

    #[test]
    fn stopping_server_is_stopped_only_once_its_instance_is_gone() {
        let s = server("a", ServerStatus::Stopping, 1);
        let r = go(std::slice::from_ref(&s), &[rep("a", 1, InstanceState::Stopping)]);
        assert!(r.changes.is_empty());
        assert!(r.desired.is_empty(), "a stopping server must not be desired");
        let r = go(&[s], &[]);
        assert!(matches!(&r.changes[0], Change::Ended { to: ServerStatus::Stopped, .. }));
    }

    #[test]
    fn exit_of_a_running_instance_is_a_crash_and_is_not_desired() {
        let mut e = rep("a", 1, InstanceState::Exited);
        e.exit = Some(LastExit { reason: "exited".into(), code: Some(3) });
        let r = go(&[server("a", ServerStatus::Running, 1)], &[e]);
        assert!(matches!(&r.changes[0], Change::Ended { to: ServerStatus::Crashed, exit, .. } if exit.code == Some(3)));
        assert!(r.desired.is_empty());
        assert_eq!(r.events[0].kind, "server_crashed");
    }

    #[test]
    fn transient_failure_requeues_and_permanent_fails() {
        let mut f = rep("a", 1, InstanceState::Failed);
        f.error_class = Some(ErrorClass::Transient);
        f.error = Some("port 30000 is taken".into());
        let r = go(&[server("a", ServerStatus::Starting, 1)], &[f.clone()]);
        assert!(matches!(&r.changes[0], Change::Requeue { attempts: 1, .. }));
        assert!(r.desired.is_empty());
        f.error_class = Some(ErrorClass::Permanent);
        let r = go(&[server("a", ServerStatus::Starting, 1)], &[f.clone()]);
        assert!(matches!(&r.changes[0], Change::Fail { .. }));
        f.error_class = Some(ErrorClass::Transient);
        let mut tired = server("a", ServerStatus::Starting, 1);
        tired.attempts = RetryPolicy::default().max_attempts - 1;
        let r = go(&[tired], &[f]);
        assert!(matches!(&r.changes[0], Change::Fail { .. }), "retries exhausted must fail");
    }

    #[test]
    fn an_unknown_server_reported_running_is_reconnected_and_stays_desired() {
        let r = go(&[server("a", ServerStatus::Unknown, 4)], &[rep("a", 4, InstanceState::Running)]);
        assert_eq!(r.changes, vec![Change::Reconnected { server_id: ServerId("a".into()), generation: 4 }]);
        assert_eq!(r.desired.len(), 1);
        let r = go(&[server("a", ServerStatus::Unknown, 4)], &[rep("a", 4, InstanceState::Starting)]);
        assert!(r.changes.is_empty());
        assert_eq!(r.desired.len(), 1, "an unknown server is still wanted");
    }

    #[test]
    fn a_crash_is_billed_until_the_last_renewal_and_a_stop_until_now() {
        let r = go(&[server("a", ServerStatus::Running, 1)], &[rep("a", 1, InstanceState::Exited)]);
        assert!(matches!(r.changes[0], Change::Ended { billed_until: 900, .. }), "{:?}", r.changes);
        let r = go(&[server("a", ServerStatus::Stopping, 1)], &[]);
        assert!(matches!(r.changes[0], Change::Ended { billed_until: 1000, .. }), "{:?}", r.changes);
    }

    #[test]
    fn running_server_missing_from_the_report_crashed() {
        let r = go(&[server("a", ServerStatus::Running, 1)], &[]);
        assert!(matches!(&r.changes[0], Change::Ended { to: ServerStatus::Crashed, exit, .. } if exit.reason == "instance_missing"));
    }
}
