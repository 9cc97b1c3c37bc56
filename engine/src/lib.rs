//! smelt-engine: the math of training transformers, with no network and no async runtime.
//!
//! - [`backend`]: the `Backend` trait, every op a transformer needs, forward beside backward;
//! - [`cpu`]: `CpuBackend`, the readable f32 reference;
//! - [`model`]: models written once against `Backend` (GPT now);
//! - [`params`]: the flat parameter/gradient buffers' name table;
//! - [`optim`]: AdamW, learning-rate schedule, clipping;
//! - [`train`]: the single-process training loop; [`weights`]: safetensors in and out.

pub mod backend;
pub mod cpu;
pub mod data;
pub mod error;
pub mod model;
pub mod optim;
pub mod params;
pub mod rng;
pub mod train;
pub mod weights;

pub use backend::Backend;
pub use cpu::CpuBackend;
pub use error::{ConfigError, EngineError};
