//! berth-agent: the node agent as a library.
//!
//! It owns one node: registration, the sync loop with the control plane,
//! supervision of instances through a `Driver` (`process`, `docker`, and
//! `sim`, whose instances and host exist only in memory),
//! preflight checks, and probes. It reports facts and converges to the
//! desired set it is given; it never decides placement.

pub mod agent;
pub mod docker;
pub mod driver;
pub mod host;
pub mod preflight;
pub mod probe;
pub mod process;
pub mod sim;
pub mod watchdog;

pub use agent::{Agent, AgentConfig};
pub use docker::DockerDriver;
pub use driver::{Driver, DriverError, Observed};
pub use process::ProcessDriver;
pub use sim::{SimConfig, SimDriver};
