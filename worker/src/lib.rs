//! The smelt worker: registers with the coordinator, holds its lease by heartbeat, and runs each
//! assignment on a training thread of its own (never on the async runtime).

pub mod abortable;
pub mod agent;
pub mod checkpointing;
pub mod choices;
pub mod device;
pub mod family;
pub mod family_data;
pub mod finetune;
pub mod finetune_data;
pub mod finetune_family;
pub mod gpu;
pub mod init_from;
pub mod log_capture;
pub mod memory_check;
pub mod model_file;
pub mod resume_warnings;
pub mod ring_addr;
pub mod runner;
pub mod sample_log;
pub mod train_data;
pub mod transient;
mod write_probe;

pub use agent::{run, WorkerConfig};
pub use device::{Device, DeviceRequest};
pub use log_capture::LogCapture;
