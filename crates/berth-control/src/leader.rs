//! Leadership among control-plane replicas: every replica serves the API;
//! only the holder of the leader lease runs the background workers.
//!
//! Each replica announces itself (heartbeat) and tries to take or renew the
//! lease every quarter of its TTL. Winning sets the store's commit fence to
//! (this replica, epoch), so if the lease is later lost — even while this
//! replica still believes it leads — its commits fail inside their
//! transaction instead of over-committing. A replica that cannot reach the
//! store stops leading once its last renewal is a TTL old. This loop
//! decides nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_store::{ReplicaInfo, Store};
use tokio::sync::{watch, Notify};

use crate::clock::Clock;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Stable per data dir, so a restarted replica takes its own lease back
    /// at once instead of waiting for it to expire.
    pub id: String,
    pub address: String,
    pub started_at: i64,
}

pub fn spawn(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    me: Replica,
    ttl_ms: i64,
    leading: Arc<AtomicBool>,
    queue_wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = Duration::from_millis((ttl_ms / 4).max(100) as u64);
    tokio::spawn(async move {
        let mut last_renewal: Option<i64> = None;
        loop {
            let now = clock.now_ms();
            let info = ReplicaInfo { id: me.id.clone(), address: me.address.clone(), started_at: me.started_at, last_seen: now };
            if let Err(e) = store.heartbeat(&info).await {
                tracing::warn!(error = %e, "replica heartbeat failed");
            }
            match store.try_lead(&me.id, ttl_ms, now).await {
                Ok(Some(lease)) => {
                    store.set_fence(Some((me.id.clone(), lease.epoch)));
                    last_renewal = Some(now);
                    if !leading.swap(true, Ordering::SeqCst) {
                        tracing::info!(replica = %me.id, epoch = lease.epoch, "leading: background workers run here");
                        queue_wake.notify_one();
                    }
                }
                Ok(None) => {
                    if leading.swap(false, Ordering::SeqCst) {
                        tracing::warn!(replica = %me.id, "lost the leader lease");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader lease not renewed");
                    if last_renewal.is_none_or(|t| clock.now_ms() - t >= ttl_ms) && leading.swap(false, Ordering::SeqCst) {
                        tracing::warn!(replica = %me.id, "leader lease lapsed while the store was unreachable");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}
