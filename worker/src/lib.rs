//! The smelt worker: registers with the coordinator, holds its lease by heartbeat, and runs each
//! assignment on a training thread of its own (never on the async runtime).

pub mod agent;
pub mod model_file;
pub mod runner;

pub use agent::{run, WorkerConfig};
