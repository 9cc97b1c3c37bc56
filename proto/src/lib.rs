//! smelt's control-plane protocol: the worker service (register, heartbeat stream, rendezvous,
//! checkpoint reports) and the jobs service (submit, get, list, cancel, watch, workers).

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("smelt.v1");
}

pub use v1::*;

pub mod auth;
pub mod tls;
pub mod wrong_server;
