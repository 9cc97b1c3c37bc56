//! The tonic JobService: submit, get, list, cancel, watch, list workers.

use std::pin::Pin;

use smelt_proto::v1::job_service_server::JobService;
use smelt_proto::v1::{
    job_event, CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest, ListJobsResponse,
    JobLogsRequest, JobLogsResponse, ListWorkersRequest, ListWorkersResponse, SubmitRequest, SubmitResponse, WatchJobRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::coordinator::Coordinator;
use crate::job_logs::{self, LogQuery};
use crate::state::is_terminal;

pub struct JobSvc {
    pub coord: Coordinator,
    /// The SQLite file, read directly for what the coordinator does not keep in memory (logs).
    pub db_path: std::path::PathBuf,
}

type Events = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send + 'static>>;

/// True for the state change that ends a job: the watch stream ends after it.
fn ends_job(ev: &JobEvent) -> bool {
    matches!(&ev.body, Some(job_event::Body::State(s)) if is_terminal(JobState::try_from(s.to).unwrap_or_default()))
}

#[tonic::async_trait]
impl JobService for JobSvc {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        let r = req.into_inner();
        let job = self.coord.with(|st| st.submit(r.spec_toml, r.resume_from))?;
        self.coord.flush().await?;
        Ok(Response::new(SubmitResponse { job: Some(job) }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.coord.with(|st| st.get_job(&req.get_ref().job_id))?))
    }

    async fn list_jobs(&self, _req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse { jobs: self.coord.with(|st| st.list_jobs()) }))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let job = self.coord.with(|st| st.cancel(&req.get_ref().job_id))?;
        self.coord.flush().await?;
        Ok(Response::new(job))
    }

    type WatchJobStream = Events;

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = req.into_inner().job_id;
        let (replay, live) = self.coord.with(|st| st.watch(&job_id))?;
        let (tx, rx) = mpsc::channel(256);
        let coord = self.coord.clone();
        tokio::spawn(async move {
            for ev in replay {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            let Some(mut live) = live else { return };
            let mut stop = coord.shutdown_signal();
            loop {
                let ev = tokio::select! {
                    ev = live.recv() => Some(ev),
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(ev) = ev else {
                    let _ = tx.send(Err(Status::unavailable("coordinator shutting down"))).await;
                    return;
                };
                match ev {
                    Ok(ev) => {
                        let last = ends_job(&ev);
                        if tx.send(Ok(ev)).await.is_err() || last {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // A slow watcher skipped some events (metrics, mostly). If the job ended
                        // meanwhile, send its last state change and stop.
                        let last = coord.with(|st| {
                            st.job(&job_id)
                                .ok()
                                .filter(|j| is_terminal(j.row.state))
                                .and_then(|j| j.events.iter().rev().find(|e| ends_job(e)).cloned())
                        });
                        if let Some(ev) = last {
                            let _ = tx.send(Ok(ev)).await;
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_workers(&self, _req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse { workers: self.coord.with(|st| st.list_workers()) }))
    }

    async fn job_logs(&self, req: Request<JobLogsRequest>) -> Result<Response<JobLogsResponse>, Status> {
        let r = req.into_inner();
        // an unknown job is NOT_FOUND, as for get_job; whether all its lines are in is known
        // before the read, so that the read holds them
        let settled = self.coord.with(|st| st.logs_settled(&r.job_id))?;
        // every line received so far committed first: a job seen ended has all its ranks'
        // lines readable (each worker sends its last ones before its Done)
        self.coord.flush().await?;
        let min_level = r.min_level.parse().map_err(|e: String| Status::invalid_argument(format!("min_level: {e}")))?;
        let q = LogQuery { after: r.after, limit: r.limit, attempt: r.attempt, rank: r.rank, tail: r.tail, min_level };
        let db = self.db_path.clone();
        let page = tokio::task::spawn_blocking(move || job_logs::read(&db, &r.job_id, &q).map_err(|e| format!("reading logs from {}: {e}", db.display())))
            .await
            .map_err(|e| Status::internal(format!("reading logs: {e}")))?
            .map_err(Status::internal)?;
        Ok(Response::new(JobLogsResponse { lines: page.lines.iter().map(|l| l.to_proto()).collect(), next: page.next, more: page.more, settled }))
    }
}
