//! Wake-ups, in memory only: per node for long-polling agents (when a
//! node's desired set changes, its held sync answer is released at once
//! instead of at the end of the poll), and per server for requests waiting
//! for a placement. Losing one costs latency, never correctness: every
//! waiter also re-reads the store on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_core::{Millis, NodeId, ServerId};
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

/// Wake-ups for requests waiting until a server is placed (a start with
/// `"wait": "placed"`): the queue worker calls `placed` after the commit
/// that reserved the server's memory, with what that commit wrote, so the
/// woken request answers without reading the server again. Waiters also
/// re-read the store now and then, so a placement committed by another
/// replica is seen too.
#[derive(Clone, Default)]
pub struct PlacementWaiters {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    notify: HashMap<ServerId, Arc<Notify>>,
    /// What the commit wrote, for a waiter woken and not yet back.
    placed: HashMap<ServerId, PlacedFacts>,
}

/// The columns a committed placement set on its server row.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedFacts {
    pub node_id: NodeId,
    pub port: u16,
    pub generation: u64,
    pub at: Millis,
}

impl PlacementWaiters {
    pub fn get(&self, server: &ServerId) -> Arc<Notify> {
        self.inner.lock().expect("waiters lock").notify.entry(server.clone()).or_default().clone()
    }

    pub fn placed(&self, server: &ServerId, facts: PlacedFacts) {
        let mut inner = self.inner.lock().expect("waiters lock");
        if let Some(n) = inner.notify.remove(server) {
            // Kept only for someone waiting: they take it (or release it).
            inner.placed.insert(server.clone(), facts);
            n.notify_waiters();
        }
    }

    /// What the placement that woke the caller wrote, if one did.
    pub fn take_placed(&self, server: &ServerId) -> Option<PlacedFacts> {
        self.inner.lock().expect("waiters lock").placed.remove(server)
    }

    /// Forgets a server's entry once nobody but the caller holds it.
    pub fn release(&self, server: &ServerId, mine: &Arc<Notify>) {
        let mut inner = self.inner.lock().expect("waiters lock");
        // The map's handle and the caller's: nobody else waits.
        if inner.notify.get(server).is_some_and(|n| Arc::ptr_eq(n, mine) && Arc::strong_count(n) <= 2) {
            inner.notify.remove(server);
        }
        if !inner.notify.contains_key(server) {
            inner.placed.remove(server);
        }
    }

    pub fn len(&self) -> usize {
        let inner = self.inner.lock().expect("waiters lock");
        inner.notify.len() + inner.placed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
