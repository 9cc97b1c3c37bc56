//! The smelt worker: registers with the coordinator, holds its lease by heartbeat, and runs each
//! assignment on a training thread of its own (never on the async runtime).

pub mod agent;
pub mod checkpointing;
pub mod finetune;
pub mod finetune_data;
pub mod model_file;
pub mod runner;
pub mod sample_log;

pub use agent::{run, WorkerConfig};
