//! smelt's coordinator: the control plane of a cluster.
//!
//! - `store`: SQLite (WAL) on its own thread: jobs, workers, assignments, events, metrics,
//!   checkpoints; `schema`: its tables, versioned and migrated on open.
//! - `state`: the in-memory mirror and the job state machine; `coordinator`: the shared handle
//!   and restoring from the store.
//! - `scheduler`: gang scheduling by priority then age, per device class.
//! - `lease`: heartbeat leases; `attempt`: how an attempt ends (success, restart, failure,
//!   cancellation); `rendezvous`: ring addresses and the NCCL id for each attempt.
//! - `jobs`, `workers`: the operations; `job_service`, `worker_service`: the gRPC glue;
//!   `error`: the one mapping to gRPC codes; `server`: config, bind, serve.
//! - `dashboard`: the read-only web page and its JSON API, on the same port as gRPC; `json`:
//!   the JSON shapes of jobs and workers (the API's and the CLI's).
//!
//! Data plan: a worker needs nothing from its peers to know its data. Its assignment carries the
//! job's spec (with the seed) and the step to start at; the sample order is a pure function of
//! those, so the coordinator hands out nothing else.

mod attempt;
mod coordinator;
mod dashboard;
pub mod error;
pub mod job_logs;
mod job_service;
pub mod json;
mod jobs;
mod lease;
mod parent_model;
mod backfill;
mod preemption;
mod cert_validity;
mod tls_accept;
mod waiting;
mod rendezvous;
pub mod scheduler;
mod schema;
mod server;
pub mod state;
pub mod store;
mod store_writer;
mod worker_service;
mod workers;

/// A job's step metrics from the database file, read-only (`smelt jobs metrics`, the dashboard).
pub use dashboard::history::{metrics as metrics_history, MetricSeries};
pub use error::CoordError;
pub use server::{bind, serve, Bound, CoordinatorConfig, TlsFiles, DEFAULT_OUTAGE_GRACE};
