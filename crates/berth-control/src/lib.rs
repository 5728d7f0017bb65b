//! berth-control: the control plane as a library.
//!
//! It owns desired state and every decision: the HTTP API (`http`), the use
//! cases behind it (`service`), the admission committer and queue worker
//! (`admission`), and bootstrap of the first tokens. It stores everything
//! through `berth_store::Store` and never talks to a runtime directly:
//! agents pull their desired instances over the sync protocol.

pub mod admission;
pub mod auth;
pub mod capacity;
pub mod clock;
pub mod drift;
pub mod error;
pub mod http;
pub mod leader;
pub mod monitor;
pub mod notify;
pub mod operations;
pub mod service;
pub mod templates;
pub mod waker;
pub mod webhooks;
pub mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::placement::PlannerConfig;
use berth_core::restart::CrashLoopBackoff;
use berth_core::retry::RetryPolicy;
use berth_core::TokenKind;
use berth_store::{DeliveryPolicy, Store, TokenRecord};
use tokio::sync::{watch, Notify};

pub use error::ControlError;
pub use service::App;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub lease_ttl_ms: u64,
    pub sync_interval_ms: u64,
    /// Longest time a sync answer is held for new work.
    pub long_poll_max_ms: u64,
    pub planner: PlannerConfig,
    pub retry: RetryPolicy,
    /// How long the committer waits for more plans before its transaction.
    /// 0 (the default) takes only those already waiting: the one queue
    /// worker awaits each submission, so nothing else can arrive, and a
    /// window only delayed every round (2.4 ms a round at 2 ms, measured).
    pub commit_window: Duration,
    pub commit_max_batch: usize,
    /// Added to the lease TTL before the control plane judges a node.
    pub lease_grace_ms: u64,
    /// Disk use (percent of the agent's data volume) from which a node gets
    /// `disk_pressure` and no placements, and from which an alert fires.
    pub disk_pressure_percent: u64,
    pub disk_alert_percent: u64,
    /// Sessions longer than this are closed and continued in a new one
    /// after the instance was re-confirmed.
    pub max_session_ms: i64,
    /// How often the zombie sweeper runs.
    pub sweep_interval: Duration,
    /// Price per GiB-hour of each plan, in minor currency units.
    pub prices: std::collections::BTreeMap<String, i64>,
    /// How far a node's real memory use may exceed its budget before a
    /// `memory_drift` event (see `berth_core::drift`).
    pub drift_margin_mib: u64,
    /// A queued server not placed within this fails with `no_capacity`.
    pub queue_timeout_ms: i64,
    /// Crash-loop backoff of restart policy `on-failure`.
    pub restart: CrashLoopBackoff,
    /// Webhook and email delivery retries; webhook disabling.
    pub delivery: DeliveryPolicy,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            lease_ttl_ms: 10_000,
            sync_interval_ms: 2_000,
            long_poll_max_ms: 30_000,
            planner: PlannerConfig::default(),
            retry: RetryPolicy::default(),
            commit_window: Duration::from_millis(0),
            commit_max_batch: 512,
            lease_grace_ms: 5_000,
            disk_pressure_percent: 90,
            disk_alert_percent: 95,
            max_session_ms: 24 * 3_600_000,
            sweep_interval: Duration::from_secs(60),
            prices: [("standard".to_string(), 100)].into_iter().collect(),
            drift_margin_mib: 512,
            queue_timeout_ms: 600_000,
            restart: CrashLoopBackoff::default(),
            delivery: DeliveryPolicy { retry: berth_core::notify::default_delivery_retry(), disable_after: 20 },
        }
    }
}

/// A running control plane: the shared state and its background workers.
pub struct ControlPlane {
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
}

/// What a control plane may be given beyond its config: a clock (tests
/// drive time with one) and the email channel.
#[derive(Default)]
pub struct Extras {
    pub clock: Option<Arc<dyn clock::Clock>>,
    pub email: Option<notify::EmailConfig>,
}

impl ControlPlane {
    /// Builds the app and starts the leadership loop, the committer and the
    /// queue worker (which works only while this replica leads).
    pub fn start(store: Arc<dyn Store>, templates: templates::Templates, cfg: ControlConfig, replica: leader::Replica) -> ControlPlane {
        Self::start_with(store, templates, cfg, replica, Extras::default()).expect("no email settings to check")
    }

    /// Like `start`, with a clock and email settings; starts the operations
    /// executor and the notifier too (both work only while this replica
    /// leads).
    pub fn start_with(
        store: Arc<dyn Store>,
        templates: templates::Templates,
        cfg: ControlConfig,
        replica: leader::Replica,
        extras: Extras,
    ) -> Result<ControlPlane, ControlError> {
        let email = extras.email.map(notify::EmailSender::new).transpose()?.map(Arc::new);
        let clock: Arc<dyn clock::Clock> = extras.clock.unwrap_or_else(|| Arc::new(clock::SystemClock));
        // Fenced from the start: nothing commits before this replica leads.
        store.set_fence(Some((replica.id.clone(), 0)));
        let admission_commits = admission::AdmissionCommits::default();
        let committer = admission::Committer::spawn(store.clone(), clock.clone(), cfg.commit_window, cfg.commit_max_batch, admission_commits.clone());
        let capacity = Arc::new(capacity::CapacityView::default());
        let queue_wake = Arc::new(Notify::new());
        let nodes = waker::NodeWaker::default();
        let placed = waker::PlacementWaiters::default();
        let (shutdown, rx) = watch::channel(false);
        let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
        leader::spawn(store.clone(), clock.clone(), replica.clone(), cfg.lease_ttl_ms as i64, leading.clone(), queue_wake.clone(), rx.clone());
        worker::spawn(
            admission::QueueWorker {
                store: store.clone(),
                clock: clock.clone(),
                committer: committer.clone(),
                wake: queue_wake.clone(),
                nodes: nodes.clone(),
                placed: placed.clone(),
                cfg: cfg.clone(),
                leading: leading.clone(),
                capacity: capacity.clone(),
            },
            rx.clone(),
        );
        worker::spawn(
            monitor::NodeMonitor {
                store: store.clone(),
                clock: clock.clone(),
                cfg: cfg.clone(),
                leading: leading.clone(),
                judging_from: clock.now_ms(),
                queue_wake: queue_wake.clone(),
                disk_alerted: Default::default(),
            },
            rx.clone(),
        );
        worker::spawn(monitor::BillingSweeper { store: store.clone(), clock: clock.clone(), cfg: cfg.clone(), leading: leading.clone() }, rx.clone());
        let ops_wake = Arc::new(Notify::new());
        worker::spawn(
            operations::OpsWorker {
                store: store.clone(),
                clock: clock.clone(),
                cfg: cfg.clone(),
                wake: ops_wake.clone(),
                queue_wake: queue_wake.clone(),
                nodes: nodes.clone(),
                leading: leading.clone(),
                last_sweep: None,
            },
            rx.clone(),
        );
        let notify_wake = Arc::new(Notify::new());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ControlError::Startup(format!("cannot build the webhook client: {e}")))?;
        worker::spawn(
            notify::NotifyWorker { store: store.clone(), clock: clock.clone(), policy: cfg.delivery, email, http, leading: leading.clone(), wake: notify_wake },
            rx,
        );
        let app = Arc::new(App {
            store,
            templates,
            clock,
            cfg,
            queue_wake,
            nodes,
            placed,
            replica,
            leading,
            drift: Default::default(),
            ops_wake,
            tokens: Default::default(),
            syncs: Default::default(),
            sent: Default::default(),
            admission_commits,
            capacity,
        });
        // Servers may be waiting in the queue from before a restart.
        app.queue_wake.notify_one();
        Ok(ControlPlane { app, shutdown })
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.app.clone())
    }

    /// Serves the API on `listener` until `shutdown` completes.
    pub fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        let router = self.router();
        async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Creates a token of `kind` and writes its secret to `path` (mode 0600)
/// unless that file already exists. Returns the secret if one was created.
/// The admin token of a fresh store is made this way.
pub async fn ensure_token_file(store: &dyn Store, kind: TokenKind, path: &Path, now: i64) -> Result<Option<String>, ControlError> {
    if path.exists() {
        return Ok(None);
    }
    if kind == TokenKind::Admin && store.count_tokens(TokenKind::Admin).await? > 0 {
        // The store already has an admin whose secret we cannot recover;
        // do not mint another one silently.
        return Ok(None);
    }
    let secret = auth::new_secret(kind);
    // The bootstrap admin has a fixed id, so of several replicas starting on
    // one empty database exactly one creates it.
    let id = if kind == TokenKind::Admin { "tok_bootstrap_admin".to_string() } else { format!("tok_{:016x}", rand::random::<u64>()) };
    let inserted = store.insert_token(&TokenRecord { id, hash: auth::hash_secret(&secret), kind, tenant: None, created_at: now }).await;
    match inserted {
        Ok(()) => {}
        Err(berth_store::StoreError::Conflict(_)) if kind == TokenKind::Admin => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    write_secret(path, &secret).map_err(|e| ControlError::Startup(format!("cannot write {}: {e}", path.display())))?;
    Ok(Some(secret))
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
