//! smelt's control-plane protocol: the worker service (register, heartbeat stream, rendezvous,
//! checkpoint reports) and the jobs service (submit, get, list, cancel, watch, workers).

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("smelt.v1");
}

pub use v1::*;

/// The longest a worker waits between attempts to reach its coordinator (its backoff doubles up
/// to this): a restarted coordinator adds it to the lease it gives the workers it restores.
pub const MAX_RECONNECT_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// The log target of a worker's warnings about the job itself (a corpus without a validation
/// split, examples cut to fit, labels of one class): the coordinator records those that rank 0
/// logs as job events too, where `jobs get` and `--follow` show them, not only in `jobs logs`.
pub const JOB_WARNING_TARGET: &str = "smelt::job";

/// The log target of the coordinator's "coordinator listening" line, which `smelt up` (and any
/// supervisor reading its log) waits for: its own target, so a `RUST_LOG` that quiets the rest
/// (`warn`) can be given `,smelt::ready=info` and still show it.
pub const READY_TARGET: &str = "smelt::ready";

pub mod auth;
pub mod tls;
pub mod wrong_server;
