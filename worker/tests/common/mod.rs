//! A real coordinator in process, over a real SQLite file in `dir`, for the agent tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use smelt_coordinator::{bind, CoordinatorConfig};
use tokio::sync::oneshot;

/// A running coordinator: its URL, and what stops it.
pub struct Coordinator {
    pub url: String,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coordinator {
    /// Listens on a free loopback port, heartbeats every 50 ms, leases of `lease_timeout`.
    pub async fn start(dir: &Path, lease_timeout: Duration) -> Coordinator {
        let cfg = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            db_path: dir.join("smelt.db"),
            heartbeat_interval: Duration::from_millis(50),
            lease_timeout,
            outage_grace: smelt_coordinator::DEFAULT_OUTAGE_GRACE,
            token: None,
            tls: None,
        };
        let bound = bind(cfg).await.unwrap();
        let url = format!("http://{}", bound.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Coordinator { url, stop, served }
    }

    /// Stops it and waits (at most `patience`) for it to end.
    pub async fn stop(self, patience: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(patience, self.served).await;
    }
}
