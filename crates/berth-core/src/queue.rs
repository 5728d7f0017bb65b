//! The queue timeout: a queued server that no node could take within the
//! timeout fails with `no_capacity` instead of waiting forever (a request
//! that can never be met must not poison the queue). Pure: `now` is an
//! input. The timeout counts from the start request (`queued_at`), across
//! transient retries, so it bounds the whole start.

use crate::placement::QueuedServer;
use crate::Millis;

/// The error code a start fails with when no node could take it in time.
pub const NO_CAPACITY: &str = "no_capacity";

/// Queued servers whose wait has reached `timeout_ms`, oldest first. A
/// stateful server waiting for the node that holds its world is not short
/// of capacity: it waits for that node, however long (DESIGN §7).
pub fn timed_out(queued: &[QueuedServer], now: Millis, timeout_ms: Millis) -> Vec<&QueuedServer> {
    let mut out: Vec<&QueuedServer> = queued.iter().filter(|q| q.home_node.is_none() && now - q.queued_at >= timeout_ms).collect();
    out.sort_by(|a, b| a.queued_at.cmp(&b.queued_at).then_with(|| a.server_id.cmp(&b.server_id)));
    out
}

/// The message a timed-out server records as its last error; it starts
/// with the code so clients can match it.
pub fn no_capacity_message(timeout_ms: Millis) -> String {
    format!("{NO_CAPACITY}: no node could take the server within {}s", timeout_ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemMib, ServerId};

    #[test]
    fn a_server_waiting_for_its_home_node_never_times_out() {
        let mut q = QueuedServer {
            server_id: ServerId("s".into()),
            generation: 0,
            memory_mib: MemMib(1),
            queued_at: 0,
            next_attempt_at: None,
            home_node: Some(crate::NodeId("n".into())),
        };
        assert!(timed_out(std::slice::from_ref(&q), 10_000_000, 1000).is_empty());
        q.home_node = None;
        assert_eq!(timed_out(std::slice::from_ref(&q), 10_000_000, 1000).len(), 1);
    }

    fn q(id: &str, at: Millis) -> QueuedServer {
        QueuedServer { server_id: ServerId(id.into()), generation: 0, memory_mib: MemMib(1), queued_at: at, next_attempt_at: None, home_node: None }
    }

    #[test]
    fn only_servers_past_the_timeout_fail() {
        let queue = [q("b", 500), q("a", 0), q("c", 900)];
        let out: Vec<&str> = timed_out(&queue, 1_000, 500).iter().map(|q| q.server_id.as_str()).collect();
        assert_eq!(out, ["a", "b"]);
        assert!(timed_out(&queue, 1_000, 10_000).is_empty());
        assert!(no_capacity_message(600_000).starts_with("no_capacity: "));
    }
}
