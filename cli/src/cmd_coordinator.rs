//! `smelt coordinator`: the control plane (gRPC jobs and worker services over a SQLite file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use smelt_coordinator::{CoordinatorConfig, TlsFiles};

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address for the gRPC services.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The SQLite file holding jobs, workers, events, metrics and checkpoints (created if
    /// missing; a restarted coordinator takes over what it holds).
    #[arg(long, default_value = crate::client::DEFAULT_DATABASE)]
    pub db: PathBuf,
    /// How often workers heartbeat.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A worker silent for longer is lost (and its job restarts or fails).
    #[arg(long, default_value_t = 10_000)]
    pub lease_timeout_ms: u64,
    /// For this long from the first failure of an outage (a job's attempts failing on a store
    /// or network error, with no step gained), a job is restarted without spending its
    /// max_restarts; after it, each failure spends one. 0: every failure spends one.
    #[arg(long, default_value_t = smelt_coordinator::DEFAULT_OUTAGE_GRACE.as_secs())]
    pub outage_grace_s: u64,
    /// File holding the token every worker and client must present (else env SMELT_TOKEN;
    /// none: every call is admitted, fine on loopback).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain to serve gRPC and the dashboard over TLS (with --tls-key; workers
    /// and clients then use an https:// URL and trust its CA through SMELT_TLS_CA).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM certificate(s) of the CA that must have signed every worker's and
    /// client's certificate (they present theirs through SMELT_TLS_CERT and SMELT_TLS_KEY); a
    /// connection without one is refused, the dashboard's included.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

pub fn run(a: CoordinatorArgs) -> Result<()> {
    let cfg = CoordinatorConfig {
        listen: a.listen,
        db_path: a.db,
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms),
        lease_timeout: Duration::from_millis(a.lease_timeout_ms),
        outage_grace: Duration::from_secs(a.outage_grace_s),
        token: crate::client::token(a.token_file.as_deref())?,
        tls: a.tls_cert.zip(a.tls_key).map(|(cert, key)| TlsFiles { cert, key, client_ca: a.tls_client_ca }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(smelt_coordinator::serve(cfg, crate::signals::terminated()))
}
