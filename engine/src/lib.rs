//! smelt-engine: the math of training transformers, with no async runtime; its only network
//! code is the blocking TCP ring that averages gradients ([`collective`]).
//!
//! - [`backend`]: the `Backend` trait, every op a transformer needs, forward beside backward;
//! - [`cpu`]: `CpuBackend`, the readable f32 reference;
//! - [`model`]: models written once against `Backend` (GPT now);
//! - [`params`]: the flat parameter/gradient buffers' name table;
//! - [`optim`]: AdamW, learning-rate schedule, clipping;
//! - [`train`]: the training loop (single process, or one rank of a data-parallel group);
//! - [`collective`]: averaging gradients across ranks (`Local`, `TcpRing`);
//! - [`weights`]: safetensors in and out.

pub mod backend;
pub mod background_ring;
pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod grad_buckets;
pub mod model;
pub mod optim;
pub mod params;
pub mod profile;
pub mod rng;
pub mod train;
pub mod weights;

pub use backend::Backend;
pub use collective::{Collective, CollectiveError, Local, TcpRing};
pub use cpu::CpuBackend;
pub use error::{ConfigError, EngineError};
