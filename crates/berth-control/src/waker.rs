//! Per-node wake-ups for long-polling agents: when a node's desired set
//! changes (a placement, a stop), its held sync answer is released at once
//! instead of at the end of the poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_core::NodeId;
use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct NodeWaker {
    inner: Arc<Mutex<HashMap<NodeId, Arc<Notify>>>>,
}

impl NodeWaker {
    pub fn get(&self, node: &NodeId) -> Arc<Notify> {
        self.inner.lock().expect("waker lock").entry(node.clone()).or_default().clone()
    }

    pub fn wake(&self, node: &NodeId) {
        self.get(node).notify_waiters();
    }

    /// Wakes every held sync (the executor changed servers on nodes it did
    /// not look up).
    pub fn wake_all(&self) {
        for n in self.inner.lock().expect("waker lock").values() {
            n.notify_waiters();
        }
    }
}
