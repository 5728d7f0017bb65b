//! The driver seam: how an agent runs instances, whatever the runtime.
//!
//! A driver starts, observes, signals and kills instances keyed by
//! (server, generation), and finds the instances it left running before an
//! agent restart (`adopt`). It decides nothing: the agent decides what
//! should run; the driver only does it and reports what it sees. Every
//! driver (process, docker, sim) implements this one trait, and fakes for
//! tests implement it too. The host facts a preflight needs (memory, free
//! ports) come through the driver too, so a simulated node sees its own
//! simulated host rather than the machine it runs on.

use std::collections::HashMap;
use std::path::PathBuf;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use berth_core::reconcile::ErrorClass;
use berth_core::template::{InstanceSpec, ReadyCheck};
use berth_core::{Generation, LastExit, ServerId};

use crate::probe;

pub type Key = (ServerId, Generation);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// May succeed later (resources, timing, a busy runtime).
    #[error("{0}")]
    Transient(String),
    /// Will not succeed without a change (missing binary or image, bad spec).
    #[error("{0}")]
    Permanent(String),
}

impl DriverError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DriverError::Transient(_) => ErrorClass::Transient,
            DriverError::Permanent(_) => ErrorClass::Permanent,
        }
    }
}

/// What a driver sees of one instance right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Alive { used_mib: Option<u64> },
    Exited(LastExit),
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Instances left by a previous run of the agent, alive or not.
    async fn adopt(&self) -> Result<Vec<(InstanceSpec, Observed)>, DriverError>;

    async fn start(&self, spec: &InstanceSpec) -> Result<(), DriverError>;

    /// Observes every instance the driver knows, in one pass.
    async fn observe_all(&self) -> HashMap<Key, Observed>;

    /// Asks the instance to stop gracefully: the spec's stop command if it
    /// has one, else its stop signal.
    async fn stop(&self, spec: &InstanceSpec) -> Result<(), DriverError>;

    /// Ends the instance at once. `reason` is recorded as its exit reason
    /// (e.g. "oom" when the agent enforces a memory limit).
    async fn kill(&self, key: &Key, reason: &str) -> Result<(), DriverError>;

    /// Forgets an ended instance: its records go, its data dir stays.
    async fn forget(&self, key: &Key);

    /// What the fence watchdog needs to stop this instance without the
    /// agent (a process group, checked by start time), if the driver can
    /// offer it.
    fn fence_handle(&self, key: &Key) -> Option<crate::watchdog::FenceHandle>;

    /// True if the driver enforces memory limits itself (cgroup, engine);
    /// otherwise the agent watches usage and kills at the limit.
    fn enforces_memory_limit(&self, key: &Key) -> bool;

    /// Where the server's persistent data lives on this node.
    fn data_dir(&self, server: &ServerId) -> PathBuf;

    /// True once the instance serves, by the spec's ready check. The
    /// default probes the host's own network, where a process driver's
    /// instances listen.
    async fn ready(&self, spec: &InstanceSpec) -> bool {
        host_ready(spec).await
    }

    /// The memory of the host the instances run on, for registration and
    /// the preflight. The default reads this machine's.
    fn host_memory(&self) -> berth_api::HostStats {
        crate::host::memory()
    }

    fn cpu_cores(&self) -> u32 {
        crate::host::cpu_cores()
    }

    /// Whether a new instance may take `port`. The default binds it on
    /// this machine.
    fn port_free(&self, port: u16) -> bool {
        crate::preflight::port_is_free(port)
    }
}

/// The ready check of an instance that listens in the host's network.
pub async fn host_ready(spec: &InstanceSpec) -> bool {
    match spec.ready {
        ReadyCheck::Alive => true,
        ReadyCheck::Tcp => probe::tcp_ready(SocketAddr::from((Ipv4Addr::LOCALHOST, spec.port)), Duration::from_millis(300)).await,
        ReadyCheck::Udp => probe::udp_port_bound(spec.port),
    }
}
