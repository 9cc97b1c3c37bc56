//! Configuration, binding and serving.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use smelt_proto::auth::RequireToken;
use smelt_proto::v1::job_service_server::JobServiceServer;
use smelt_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tokio_rustls::rustls;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::coordinator::Coordinator;
use crate::dashboard;
use crate::tls_accept;
use crate::job_service::JobSvc;
use crate::lease::run_lease_checker;
use crate::store::Store;
use crate::worker_service::WorkerSvc;

/// How long shutdown waits for open connections to close before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `CoordinatorConfig::outage_grace`'s default: a quarter of an hour, as long as a cloud
/// store's regional incident commonly takes to pass.
pub const DEFAULT_OUTAGE_GRACE: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// gRPC address; port 0 picks a free one (see `Bound::local_addr`).
    pub listen: SocketAddr,
    /// The SQLite file (created if missing).
    pub db_path: PathBuf,
    /// How often workers are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker silent for longer is lost.
    pub lease_timeout: Duration,
    /// For this long from an outage's first failure (attempts that fail on a store or network
    /// error their worker reports transient, with no step gained), restarting spends none of a
    /// job's restarts; after it, each failure spends one as any other.
    pub outage_grace: Duration,
    /// With a token, every call must carry it (`smelt_proto::auth`); without, all are admitted.
    pub token: Option<String>,
    /// With a certificate and key, gRPC and the dashboard are served over TLS
    /// (`smelt_proto::tls`); without, in plain text.
    pub tls: Option<TlsFiles>,
}

/// The coordinator's certificate chain and private key, PEM files; with `client_ca`, mutual TLS:
/// every connection must present a client certificate that CA (PEM, one or more) signed.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, db_path: impl Into<PathBuf>) -> Self {
        CoordinatorConfig {
            listen,
            db_path: db_path.into(),
            heartbeat_interval: Duration::from_secs(1),
            lease_timeout: Duration::from_secs(10),
            outage_grace: DEFAULT_OUTAGE_GRACE,
            token: None,
            tls: None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(t) = &self.token {
            smelt_proto::auth::check_token(t).map_err(|e| anyhow::anyhow!("coordinator token: {e}"))?;
        }
        if self.heartbeat_interval.is_zero() {
            anyhow::bail!("the heartbeat interval (--heartbeat-ms) must be positive");
        }
        if self.lease_timeout <= self.heartbeat_interval {
            anyhow::bail!(
                "the lease timeout (--lease-timeout-ms, {} ms) must be longer than the heartbeat interval (--heartbeat-ms, {} ms)",
                self.lease_timeout.as_millis(),
                self.heartbeat_interval.as_millis()
            );
        }
        Ok(())
    }
}

/// A coordinator with its database open and its port bound, not yet serving.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    coord: Coordinator,
    store: Store,
    auth: RequireToken,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Opens the database (restoring jobs and workers) and binds the listen address.
pub async fn bind(cfg: CoordinatorConfig) -> anyhow::Result<Bound> {
    cfg.validate()?;
    // a bad certificate or key fails here, before the database is opened or the port bound
    let tls = match &cfg.tls {
        Some(f) => Some(tls_accept::server_config(&f.cert, &f.key, f.client_ca.as_deref()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    // the port first: a coordinator that cannot listen must not leave a new database behind
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let path = cfg.db_path.clone();
    let (store, loaded) =
        tokio::task::spawn_blocking(move || Store::open(&path)).await.context("store thread panicked")??;
    let coord = Coordinator::restore(loaded, store.handle(), cfg.heartbeat_interval, cfg.lease_timeout, cfg.outage_grace);
    // Restoring may have changed rows (stale assignments); make that durable before serving.
    coord.flush().await?;
    let addr = listener.local_addr()?;
    // the `smelt worker` a waiting job's hint suggests must reach this coordinator: named
    // unless it is the default one (an unspecified address: this machine's name)
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() { hostname_or_localhost() } else { addr.ip().to_string() };
    let url = format!("{scheme}://{host}:{}", addr.port());
    if url != "http://127.0.0.1:7070" {
        coord.with(|st| st.worker_flag = format!(" --coordinator {url}"));
    }
    let auth = RequireToken::new(cfg.token.as_deref());
    let mutual = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if !auth.enabled() && !mutual && !addr.ip().is_loopback() {
        warn!(addr = %addr, "listening beyond loopback without a token: anyone who reaches this port can submit jobs and register workers (set SMELT_TOKEN or --token-file)");
    }
    if auth.enabled() && tls.is_none() && !addr.ip().is_loopback() {
        warn!(addr = %addr, "listening beyond loopback without TLS: the token and job specs cross the network in clear (give --tls-cert and --tls-key)");
    }
    Ok(Bound { listener, addr, coord, store, auth, tls })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then closes every stream, lets connections finish and
    /// commits what is queued for the store. Jobs and workers are left as they are: the next
    /// coordinator on the same file takes them over.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Bound { listener, addr, coord, store, auth, tls } = self;
        info!(target: smelt_proto::READY_TARGET, addr = %addr, db = %store.path().display(), token = auth.enabled(), tls = tls.is_some(), "coordinator listening");
        let lease = tokio::spawn(run_lease_checker(coord.clone()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // gRPC (HTTP/2) and the dashboard (HTTP/1.1 from browsers) on one port.
        let mut grpc = RoutesBuilder::default();
        grpc.add_service(WorkerServiceServer::with_interceptor(WorkerSvc { coord: coord.clone() }, auth.clone()))
            .add_service(JobServiceServer::with_interceptor(JobSvc { coord: coord.clone(), db_path: store.path().to_path_buf() }, auth.clone()));
        let routes = grpc.routes().into_axum_router().merge(dashboard::router(coord.clone(), store.path().to_path_buf(), auth))
            .fallback(dashboard::fallback)
            .layer(axum::middleware::map_response(says_it_is_smelt));
        info!(url = %format!("{}://{addr}/", if tls.is_some() { "https" } else { "http" }), "dashboard");
        let router = Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_routes(Routes::from(routes));
        let stopped = async {
            let _ = stop_rx.await;
        };
        let mut server = match tls {
            // the handshake is ours (tls_accept.rs): h2 and http/1.1 both offered
            Some(config) => tokio::spawn(router.serve_with_incoming_shutdown(tls_accept::incoming(listener, config), stopped)),
            None => tokio::spawn(router.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stopped)),
        };
        let mut result = tokio::select! {
            _ = shutdown => None,
            r = &mut server => Some(r),
        };
        info!("coordinator shutting down");
        coord.begin_shutdown();
        let _ = stop_tx.send(());
        if result.is_none() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => result = Some(r),
                Err(_) => {
                    warn!(
                        grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
                        "connections still open after the grace period; dropping them"
                    );
                    server.abort();
                }
            }
        }
        let _ = lease.await;
        tokio::task::spawn_blocking(move || store.close()).await.context("store thread panicked")?;
        info!("coordinator stopped");
        match result {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(anyhow::anyhow!("grpc server: {e}")),
            Some(Err(e)) => Err(anyhow::anyhow!("grpc server task: {e}")),
        }
    }
}

/// Binds and serves until `shutdown` resolves.
pub async fn serve(cfg: CoordinatorConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    bind(cfg).await?.serve(shutdown).await
}

/// Every answer names the coordinator (`server: smelt-coordinator`), so a client that suspects
/// it reached some other server on the port (`smelt_proto::wrong_server`) can tell it is not.
async fn says_it_is_smelt(mut r: axum::response::Response) -> axum::response::Response {
    r.headers_mut().insert(axum::http::header::SERVER, axum::http::HeaderValue::from_static(smelt_proto::wrong_server::SERVER_HEADER));
    r
}

/// This machine's name for a URL others can dial (`HOSTNAME`, else /etc/hostname), or
/// `localhost`.
fn hostname_or_localhost() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
