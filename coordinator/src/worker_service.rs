//! The tonic WorkerService: register, heartbeat stream, rendezvous, checkpoint reports.

use std::pin::Pin;

use smelt_proto::v1::worker_service_server::WorkerService;
use smelt_proto::v1::{
    worker_message, CheckpointAck, CheckpointReport, CoordinatorMessage, RegisterRequest, RegisterResponse, RendezvousRequest,
    RendezvousResponse, WorkerMessage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::coordinator::Coordinator;
use crate::error::CoordError;

pub struct WorkerSvc {
    pub coord: Coordinator,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl WorkerService for WorkerSvc {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let resp = self.coord.with(|st| st.register(req.into_inner()))?;
        self.coord.flush().await?;
        Ok(Response::new(resp))
    }

    type HeartbeatStream = Outbound;

    /// The first message names the worker (the id Register returned); from then on the stream is
    /// its lease. Assignments and aborts go down the returned stream.
    async fn heartbeat(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let coord = self.coord.clone();
        tokio::spawn(async move {
            let mut stop = coord.shutdown_signal();
            let first = tokio::select! {
                m = inbound.message() => m,
                _ = stop.wait_for(|s| *s) => return,
            };
            let first = match first {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return,
            };
            let worker_id = first.worker_id.clone();
            let gen = match coord.with(|st| st.attach_stream(&worker_id, tx.clone())) {
                Ok(gen) => gen,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            // From here the state holds the only sender: dropping it there ends the stream.
            drop(tx);
            // numbered log batches are acknowledged once the store committed them, by a task of
            // their own: the reader never waits on the store (a slow disk must not cost a
            // worker its lease), and one flush answers every batch that came meanwhile
            let (logs_tx, logs_rx) = watch::channel(());
            tokio::spawn(acknowledge_logs(coord.clone(), worker_id.clone(), gen, logs_rx));
            if !coord.with(|st| st.on_message(&worker_id, gen, first)) {
                return;
            }
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match next {
                    Ok(Some(m)) => {
                        let numbered_logs = matches!(&m.body, Some(worker_message::Body::Logs(b)) if b.seq > 0);
                        if !coord.with(|st| st.on_message(&worker_id, gen, m)) {
                            debug!(worker_id = %worker_id, gen, "heartbeat stream superseded; reader stops");
                            return;
                        }
                        if numbered_logs {
                            logs_tx.send_replace(());
                        }
                    }
                    Ok(None) => {
                        coord.with(|st| st.on_stream_end(&worker_id, gen, "heartbeat stream closed by the worker"));
                        return;
                    }
                    Err(status) => {
                        // in words an operator reads first; the transport's own after them
                        let why = format!("its connection broke (the process exited or the network failed: {})", status.message());
                        coord.with(|st| st.on_stream_end(&worker_id, gen, &why));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn rendezvous(&self, req: Request<RendezvousRequest>) -> Result<Response<RendezvousResponse>, Status> {
        let rx = self.coord.with(|st| st.rendezvous_join(req.into_inner()))?;
        match rx.await {
            Ok(r) => Ok(Response::new(r?)),
            Err(_) => Err(CoordError::Unavailable("coordinator shutting down".into()).into()),
        }
    }

    async fn report_checkpoint(&self, req: Request<CheckpointReport>) -> Result<Response<CheckpointAck>, Status> {
        self.coord.with(|st| st.report_checkpoint(req.into_inner()))?;
        self.coord.flush().await?;
        Ok(Response::new(CheckpointAck {}))
    }
}

/// Acknowledges a worker's numbered log batches on stream `gen` once the store has committed
/// them: at each signal from the stream's reader, a flush, then a `LogsAck` of the highest number
/// received before it. Ends with the stream (its reader drops the sender).
async fn acknowledge_logs(coord: Coordinator, worker_id: String, gen: u64, mut signal: watch::Receiver<()>) {
    while signal.changed().await.is_ok() {
        let upto = coord.with(|st| st.logs_received(&worker_id));
        let flushed = coord.flush().await.is_ok();
        // a batch that failed in an earlier transaction is told by the store, not by this flush
        // (taken whatever the flush said: a flag left over would fail the next round)
        let failed = coord.with(|st| st.store.take_log_failure(&worker_id));
        let committed = flushed && !failed;
        coord.with(|st| st.logs_flushed(&worker_id, gen, upto, committed));
    }
}
