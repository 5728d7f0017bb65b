//! One shape for every background loop (after garage's `Worker`): `work`
//! does one bounded round and says whether more is waiting; `wait_for_work`
//! sleeps until there may be; `status` is what the CLI and tests read.
//! The runner owns the loop; a worker never loops forever itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::ControlError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// More work is waiting: call `work` again at once.
    Busy,
    Idle,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    pub rounds: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

#[async_trait]
pub trait Worker: Send + 'static {
    fn name(&self) -> &'static str;
    async fn work(&mut self) -> Result<WorkerState, ControlError>;
    async fn wait_for_work(&mut self);
}

/// Runs a worker until `shutdown` turns true; publishes its status.
pub fn spawn<W: Worker>(mut w: W, mut shutdown: watch::Receiver<bool>) -> Arc<watch::Sender<WorkerStatus>> {
    let status = Arc::new(watch::Sender::new(WorkerStatus::default()));
    let out = status.clone();
    tokio::spawn(async move {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let state = w.work().await;
            status.send_modify(|s| {
                s.rounds += 1;
                if let Err(e) = &state {
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                }
            });
            match state {
                Ok(WorkerState::Busy) => continue,
                Ok(WorkerState::Idle) => {}
                Err(e) => {
                    tracing::warn!(worker = w.name(), error = %e, "worker round failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            tokio::select! {
                _ = w.wait_for_work() => {}
                _ = shutdown.changed() => {}
            }
        }
    });
    out
}
