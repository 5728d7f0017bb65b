//! Background workers of node health and billing, run on the leader only:
//!
//! - `NodeMonitor` judges every node and placed server with the pure
//!   `health::judge` and applies the verdicts (unreachable, unknown, lost,
//!   drain deadlines). It judges nothing before `judging_from`: after a
//!   (re)start the agents get a full lease to reconnect, so a control-plane
//!   restart or outage never crashes a server (DESIGN §7).
//! - `BillingSweeper` closes zombie sessions and rolls over long ones.
//!
//! Neither talks to agents; fencing on the node is the watchdog's job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::health::{judge, needs_judging, HealthConfig};
use berth_core::{Millis, NewEvent};
use berth_store::Store;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::error::ControlError;
use crate::worker::{Worker, WorkerState};
use crate::ControlConfig;

pub struct NodeMonitor {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub cfg: ControlConfig,
    pub leading: Arc<AtomicBool>,
    pub judging_from: Millis,
    pub queue_wake: Arc<Notify>,
    /// Nodes already alerted for disk use, so the alert fires once per crossing.
    pub disk_alerted: std::collections::HashSet<berth_core::NodeId>,
}

#[async_trait]
impl Worker for NodeMonitor {
    fn name(&self) -> &'static str {
        "node-monitor"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(Ordering::SeqCst) {
            return Ok(WorkerState::Idle);
        }
        let nodes = self.store.list_nodes().await?;
        let now = self.clock.now_ms();
        let cfg = HealthConfig { lease_ttl_ms: self.cfg.lease_ttl_ms as i64, lease_grace_ms: self.cfg.lease_grace_ms as i64 };
        // Only the servers of nodes that may get a verdict are read; the
        // verdicts are conditional on the facts they were judged from, so
        // reading nodes and servers apart is safe.
        let judged: Vec<berth_core::Node> = nodes.iter().filter(|n| needs_judging(n, now, self.judging_from, cfg)).cloned().collect();
        let mut placed = Vec::new();
        for n in &judged {
            placed.extend(self.store.placed_on(&n.id).await?);
        }
        let verdicts = judge(&judged, &placed, now, self.judging_from, cfg);
        if !verdicts.is_empty() {
            let applied = self.store.apply_verdicts(&verdicts, now).await?;
            if applied > 0 {
                tracing::info!(applied, "health verdicts applied");
                // Lost servers freed capacity.
                self.queue_wake.notify_one();
            }
        }
        let mut alerts = Vec::new();
        for n in &nodes {
            let over = n.disk_total_mib > 0 && n.disk_used_mib * 100 >= n.disk_total_mib * self.cfg.disk_alert_percent;
            if over && self.disk_alerted.insert(n.id.clone()) {
                alerts.push(NewEvent {
                    kind: "disk_alert",
                    server_id: None,
                    node_id: Some(n.id.clone()),
                    message: format!("node {} data volume is {}% full", n.name, n.disk_used_mib * 100 / n.disk_total_mib),
                });
            } else if !over {
                self.disk_alerted.remove(&n.id);
            }
        }
        if !alerts.is_empty() {
            self.store.insert_events(&alerts, now).await?;
        }
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub struct BillingSweeper {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub cfg: ControlConfig,
    pub leading: Arc<AtomicBool>,
}

#[async_trait]
impl Worker for BillingSweeper {
    fn name(&self) -> &'static str {
        "billing-sweeper"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(Ordering::SeqCst) {
            return Ok(WorkerState::Idle);
        }
        let now = self.clock.now_ms();
        let zombies = self.store.sweep_zombies(now).await?;
        if !zombies.is_empty() {
            tracing::warn!(closed = zombies.len(), "closed zombie billing sessions");
        }
        // A session rolls over only if its node renewed recently: that
        // renewal re-confirmed the instance.
        let fresh = (self.cfg.lease_ttl_ms) as i64;
        self.store.roll_over(self.cfg.max_session_ms, fresh, now).await?;
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        tokio::time::sleep(self.cfg.sweep_interval).await;
    }
}
