//! An exact in-memory copy of the live rows of `servers`, kept by the
//! SQLite writer, so that the reads of every request and every agent sync
//! need not fetch them from the database.
//!
//! Why: SQLite empties a reader connection's page cache whenever another
//! connection has committed, and under a burst the writer commits every
//! few milliseconds, so each read began cold. A sync read its node's
//! hundred servers three to four times (keys, kill orders, reserved
//! memory, the pre-decision), about 1.4 µs a row from the OS's cache: a
//! sixth of the control plane's CPU in the admission burst.
//!
//! How it stays exact: the writer's connection reports every row it
//! changes in `servers` (SQLite's update hook, which also fires for
//! changes a failed statement or a savepoint rollback undoes later), and
//! right before each COMMIT the writer reads those rows again inside the
//! transaction, so what it applies is what commits, whatever undid what
//! meanwhile. The flusher applies them once the commit is on disk, before
//! it publishes the flush or answers the commit's writes: the mirror never
//! shows what a power cut could take back, so a read of it never waits
//! for a flush (a read of the rows does), and a client that got its
//! write's answer finds the write in it. Another process writing the file
//! (the `sqlite3` shell) is seen by `PRAGMA data_version` before each
//! batch, and the mirror is read again from the rows, in commit order.
//!
//! This module owns the copy and its queries; it decides nothing, and it
//! never serves admission: the committer re-checks every plan against the
//! reservation rows in its transaction (L1, L2).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use berth_core::placement::QueuedServer;
use berth_core::reconcile::Placed;
use berth_core::{Generation, LastExit, MemMib, NodeId, Server, ServerId, ServerStatus};

use berth_core::restart::RestartPolicy;

use crate::rows::SERVER_COLS;
use crate::{ServerRef, StoreError};

#[derive(Default)]
pub(crate) struct Mirror {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Every live server (status not `deleted`), by id.
    servers: HashMap<ServerId, Arc<Kept>>,
    /// The id of every live row, by rowid: the writer knows a changed row
    /// by its rowid, also once it is gone from `servers`.
    ids: HashMap<i64, ServerId>,
    names: HashMap<String, ServerId>,
    /// Live servers with a node, by node, in id order.
    on_node: HashMap<NodeId, BTreeSet<ServerId>>,
    queued: BTreeSet<ServerId>,
}

/// A server as the mirror keeps it: its row, with the JSON columns as
/// text (parsed only for a caller that wants the whole `Server`, so the
/// writer's re-read of a changed row is a copy, not a parse).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kept {
    id: ServerId,
    tenant: String,
    name: String,
    template: String,
    memory_mib: MemMib,
    config: String,
    status: ServerStatus,
    node_id: Option<NodeId>,
    generation: Generation,
    port: Option<u16>,
    last_exit: Option<String>,
    queued_at: Option<i64>,
    attempts: u32,
    next_attempt_at: Option<i64>,
    last_error: Option<String>,
    used_mib: Option<MemMib>,
    created_at: i64,
    updated_at: i64,
    stop_after_ms: i64,
    stateless: bool,
    plan: String,
    price_per_gib_hour: i64,
    home_node: Option<NodeId>,
    restart_policy: RestartPolicy,
}

impl Kept {
    fn server(&self) -> Result<Server, StoreError> {
        let corrupt = |what: &str, v: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {v}"));
        Ok(Server {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            template: self.template.clone(),
            memory_mib: self.memory_mib,
            config: serde_json::from_str(&self.config).map_err(|e| corrupt("server config", &e))?,
            status: self.status,
            node_id: self.node_id.clone(),
            generation: self.generation,
            port: self.port,
            last_exit: match &self.last_exit {
                Some(s) => Some(serde_json::from_str::<LastExit>(s).map_err(|e| corrupt("last_exit", &e))?),
                None => None,
            },
            queued_at: self.queued_at,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error.clone(),
            used_mib: self.used_mib,
            restart_policy: self.restart_policy,
            created_at: self.created_at,
            updated_at: self.updated_at,
            stop_after_ms: self.stop_after_ms,
            stateless: self.stateless,
            plan: self.plan.clone(),
            price_per_gib_hour: self.price_per_gib_hour,
            home_node: self.home_node.clone(),
        })
    }
}

/// A desired set as keys: (server, generation).
type Keys = Vec<(ServerId, Generation)>;

/// A row the writer read again: `None` if it is gone or deleted.
pub(crate) type Changed = (i64, Option<Kept>);

/// Every live row, read at once (`load`).
pub(crate) struct Whole(State);

/// What one commit does to the mirror: the whole table read again first
/// (another process wrote the file), then the rows it changed.
#[derive(Default)]
pub(crate) struct Update {
    pub(crate) reload: Option<Whole>,
    pub(crate) rows: Vec<Changed>,
}

/// Every live row, read on `conn`.
pub(crate) fn load(conn: &rusqlite::Connection) -> Result<Whole, StoreError> {
    let mut fresh = State::default();
    let mut stmt = conn.prepare(&format!("SELECT rowid, {SERVER_COLS} FROM servers WHERE status <> 'deleted'"))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (rowid, s) = (row.get::<_, i64>(0)?, kept_from(row)?);
        fresh.insert(rowid, s);
    }
    Ok(Whole(fresh))
}

impl State {
    /// Removes the row; returns what it held, to be dropped outside the
    /// lock.
    fn remove(&mut self, rowid: i64) -> Option<Arc<Kept>> {
        let id = self.ids.remove(&rowid)?;
        let old = self.servers.remove(&id)?;
        if self.names.get(&old.name) == Some(&id) {
            self.names.remove(&old.name);
        }
        if let Some(node) = &old.node_id {
            if let Some(set) = self.on_node.get_mut(node) {
                set.remove(&id);
                if set.is_empty() {
                    self.on_node.remove(node);
                }
            }
        }
        self.queued.remove(&id);
        Some(old)
    }

    /// Puts the row in; returns what it replaced, to be dropped outside
    /// the lock.
    fn insert(&mut self, rowid: i64, s: Kept) -> Option<Arc<Kept>> {
        // Most changes keep the server's id, name, node and queue
        // membership (a status or memory reading): only the row changes.
        if self.ids.get(&rowid) == Some(&s.id) && s.status != ServerStatus::Deleted {
            if let Some(slot) = self.servers.get_mut(&s.id) {
                if slot.name == s.name && slot.node_id == s.node_id && (slot.status == ServerStatus::Queued) == (s.status == ServerStatus::Queued) {
                    return Some(std::mem::replace(slot, Arc::new(s)));
                }
            }
        }
        let old = self.remove(rowid);
        if s.status == ServerStatus::Deleted {
            return old;
        }
        let id = s.id.clone();
        self.ids.insert(rowid, id.clone());
        self.names.insert(s.name.clone(), id.clone());
        if let Some(node) = &s.node_id {
            self.on_node.entry(node.clone()).or_default().insert(id.clone());
        }
        if s.status == ServerStatus::Queued {
            self.queued.insert(id.clone());
        }
        self.servers.insert(id, Arc::new(s));
        old
    }

    fn find(&self, id_or_name: &str) -> Option<&Arc<Kept>> {
        self.servers.get(&ServerId(id_or_name.to_string())).or_else(|| self.names.get(id_or_name).and_then(|id| self.servers.get(id)))
    }

    fn on(&self, node: &NodeId) -> impl Iterator<Item = &Arc<Kept>> {
        self.on_node.get(node).into_iter().flatten().filter_map(|id| self.servers.get(id))
    }
}

impl Mirror {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("mirror lock")
    }

    /// Applies what one commit changed (`Update`).
    pub(crate) fn apply(&self, update: Update) {
        if let Some(whole) = update.reload {
            drop(std::mem::replace(&mut *self.state.write().expect("mirror lock"), whole.0));
        }
        let changed = update.rows;
        if changed.is_empty() {
            return;
        }
        let mut replaced = Vec::with_capacity(changed.len());
        {
            let mut st = self.state.write().expect("mirror lock");
            for (rowid, row) in changed {
                replaced.push(match row {
                    Some(s) => st.insert(rowid, s),
                    None => st.remove(rowid),
                });
            }
        }
        // Freed here, not while readers wait for the lock.
        drop(replaced);
    }

    pub(crate) fn get_server(&self, id_or_name: &str) -> Result<Option<Server>, StoreError> {
        let found = self.read().find(id_or_name).cloned();
        found.map(|s| s.server()).transpose()
    }

    pub(crate) fn resolve_server(&self, id_or_name: &str) -> Option<ServerRef> {
        self.read().find(id_or_name).map(|s| ServerRef {
            id: s.id.clone(),
            tenant: s.tenant.clone(),
            node_id: s.node_id.clone(),
            memory_mib: s.memory_mib,
            home_node: s.home_node.clone(),
        })
    }

    pub(crate) fn queued(&self) -> Vec<QueuedServer> {
        let st = self.read();
        st.queued
            .iter()
            .filter_map(|id| st.servers.get(id))
            .map(|s| QueuedServer {
                server_id: s.id.clone(),
                generation: s.generation,
                memory_mib: s.memory_mib,
                queued_at: s.queued_at.unwrap_or(0),
                next_attempt_at: s.next_attempt_at,
                home_node: s.home_node.clone(),
            })
            .collect()
    }

    /// The node's desired set as keys.
    pub(crate) fn desired_keys(&self, node: &NodeId) -> Keys {
        self.read().on(node).filter(|s| s.status.is_desired_running()).map(|s| (s.id.clone(), s.generation)).collect()
    }

    /// The node's desired set, in id order.
    pub(crate) fn desired_on(&self, node: &NodeId) -> Result<Vec<Server>, StoreError> {
        let kept: Vec<Arc<Kept>> = self.read().on(node).filter(|s| s.status.is_desired_running()).cloned().collect();
        kept.iter().map(|s| s.server()).collect()
    }

    /// The node's desired keys and, of them, the servers not in `base`
    /// (sorted by key), at one moment.
    pub(crate) fn desired_delta(&self, node: &NodeId, base: &[(ServerId, Generation)]) -> Result<(Keys, Vec<Server>), StoreError> {
        let mut keys = Vec::new();
        let mut added = Vec::new();
        for s in self.read().on(node).filter(|s| s.status.is_desired_running()) {
            let key = (s.id.clone(), s.generation);
            if base.binary_search(&key).is_err() {
                added.push(s.clone());
            }
            keys.push(key);
        }
        Ok((keys, added.iter().map(|s| s.server()).collect::<Result<_, _>>()?))
    }

    /// Servers on the node in `stopping`, with their generations: those a
    /// kill may be running for.
    pub(crate) fn stopping_on(&self, node: &NodeId) -> Keys {
        self.read().on(node).filter(|s| s.status == ServerStatus::Stopping).map(|s| (s.id.clone(), s.generation)).collect()
    }

    /// The memory of the servers that hold a reservation on the node. Equal
    /// to the sum of its reservation rows while L2 holds (the invariant
    /// checker compares rows and servers); used for memory drift verdicts,
    /// never for admission.
    pub(crate) fn node_reserved(&self, node: &NodeId) -> MemMib {
        MemMib(self.read().on(node).filter(|s| s.status.holds_reservation()).map(|s| s.memory_mib.0).sum())
    }

    /// The servers placed on the node as a sync reconciles them (those
    /// holding a reservation there).
    pub(crate) fn placed(&self, node: &NodeId) -> Vec<Placed> {
        self.read()
            .on(node)
            .filter(|s| s.status.holds_reservation())
            .map(|s| Placed {
                id: s.id.clone(),
                name: s.name.clone(),
                node_id: s.node_id.clone(),
                status: s.status,
                generation: s.generation,
                attempts: s.attempts,
                used_mib: s.used_mib,
            })
            .collect()
    }

    /// Servers placed on the node (every status a sync reconciles), in id
    /// order.
    pub(crate) fn placed_on(&self, node: &NodeId) -> Result<Vec<Server>, StoreError> {
        let kept: Vec<Arc<Kept>> = self.read().on(node).filter(|s| s.status.holds_reservation()).cloned().collect();
        kept.iter().map(|s| s.server()).collect()
    }

    /// Live servers by status.
    pub(crate) fn status_counts(&self) -> Vec<(ServerStatus, u64)> {
        let mut counts: HashMap<ServerStatus, u64> = HashMap::new();
        for s in self.read().servers.values() {
            *counts.entry(s.status).or_default() += 1;
        }
        let mut out: Vec<_> = counts.into_iter().collect();
        out.sort_by_key(|(s, _)| s.as_str());
        out
    }

    /// Every live server as the mirror holds it, by id (tests compare it
    /// with the rows).
    pub(crate) fn all(&self) -> Result<Vec<Server>, StoreError> {
        let kept: Vec<Arc<Kept>> = self.read().servers.values().cloned().collect();
        let mut out: Vec<Server> = kept.iter().map(|s| s.server()).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// The rows of `rowids`, read again on the writer's connection inside its
/// open transaction (`None`: gone, or deleted).
pub(crate) fn read_again(conn: &rusqlite::Connection, rowids: &[i64]) -> Result<Vec<Changed>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT rowid, {SERVER_COLS} FROM servers WHERE rowid = ?"))?;
    let mut out = Vec::with_capacity(rowids.len());
    for &rowid in rowids {
        let mut rows = stmt.query([rowid])?;
        let row = match rows.next()? {
            Some(row) => Some(kept_from(row)?).filter(|s| s.status != ServerStatus::Deleted),
            None => None,
        };
        out.push((rowid, row));
    }
    Ok(out)
}

/// Decodes a row of `rowid, SERVER_COLS` by position (the writer's
/// re-reads are on its critical path; `rows::server_from_row` finds
/// columns by name).
fn kept_from(r: &rusqlite::Row<'_>) -> Result<Kept, StoreError> {
    let corrupt = |what: &str, v: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {v}"));
    let status: String = r.get(7)?;
    let policy: String = r.get(24)?;
    Ok(Kept {
        id: ServerId(r.get(1)?),
        tenant: r.get(2)?,
        name: r.get(3)?,
        template: r.get(4)?,
        memory_mib: MemMib(r.get::<_, i64>(5)? as u64),
        config: r.get(6)?,
        status: ServerStatus::parse(&status).ok_or_else(|| corrupt("server status", &status))?,
        node_id: r.get::<_, Option<String>>(8)?.map(NodeId),
        generation: r.get::<_, i64>(9)? as u64,
        port: r.get::<_, Option<i64>>(10)?.map(|p| p as u16),
        last_exit: r.get(11)?,
        queued_at: r.get(12)?,
        attempts: r.get::<_, i64>(13)? as u32,
        next_attempt_at: r.get(14)?,
        last_error: r.get(15)?,
        used_mib: r.get::<_, Option<i64>>(16)?.map(|m| MemMib(m as u64)),
        created_at: r.get(17)?,
        updated_at: r.get(18)?,
        stop_after_ms: r.get(19)?,
        stateless: r.get::<_, i64>(20)? != 0,
        plan: r.get(21)?,
        price_per_gib_hour: r.get(22)?,
        home_node: r.get::<_, Option<String>>(23)?.map(NodeId),
        restart_policy: RestartPolicy::parse(&policy).ok_or_else(|| corrupt("restart policy", &policy))?,
    })
}
