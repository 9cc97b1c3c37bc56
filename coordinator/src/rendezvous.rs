//! Rendezvous of one attempt: every rank calls in; once all have, each gets the ring's addresses
//! in rank order (each assigned worker's registered `data_addr`) and rank 0's NCCL unique id.
//! A rank that calls again later (a retry) gets the same answer. When the attempt ends first,
//! waiting ranks get `Aborted`.

use std::collections::BTreeMap;

use smelt_proto::v1::{JobState, RendezvousRequest, RendezvousResponse};
use tokio::sync::oneshot;
use tracing::info;

use crate::error::{CoordError, Result};
use crate::state::{job_state_name, State};

pub type Reply = oneshot::Sender<Result<RendezvousResponse>>;

#[derive(Default)]
pub struct Rendezvous {
    waiters: BTreeMap<u32, Reply>,
    nccl_unique_id: Vec<u8>,
    /// Set once every rank has joined.
    answer: Option<RendezvousResponse>,
}

impl State {
    /// Joins `req.rank` to its attempt's rendezvous; the receiver resolves when all ranks have.
    pub fn rendezvous_join(&mut self, req: RendezvousRequest) -> Result<oneshot::Receiver<Result<RendezvousResponse>>> {
        let job = self.job(&req.job_id)?;
        let (state, attempt, world_size) = (job.row.state, job.row.attempt, job.row.world_size);
        if req.attempt != attempt || !matches!(state, JobState::Scheduled | JobState::Running) {
            return Err(CoordError::Aborted(format!(
                "attempt {} of job {} is not current (the job is {} at attempt {attempt})",
                req.attempt,
                req.job_id,
                job_state_name(state)
            )));
        }
        if req.rank >= world_size {
            return Err(CoordError::InvalidArgument(format!(
                "rank {} is out of range for job {} (world size {world_size})",
                req.rank, req.job_id
            )));
        }
        let holder = job.ranks.get(req.rank as usize).cloned().unwrap_or_default();
        if holder != req.worker_id {
            return Err(CoordError::PermissionDenied(format!(
                "rank {} of job {} attempt {attempt} is assigned to worker {holder}, not {:?}",
                req.rank, req.job_id, req.worker_id
            )));
        }
        let (tx, rx) = oneshot::channel();
        let key = (req.job_id.clone(), attempt);
        let rv = self.rendezvous.entry(key.clone()).or_default();
        if let Some(answer) = &rv.answer {
            let _ = tx.send(Ok(answer.clone()));
            return Ok(rx);
        }
        if req.rank == 0 && !req.nccl_unique_id.is_empty() {
            rv.nccl_unique_id = req.nccl_unique_id.clone();
        }
        if let Some(old) = rv.waiters.insert(req.rank, tx) {
            let _ = old
                .send(Err(CoordError::Aborted(format!("superseded by a newer rendezvous call of rank {}", req.rank))));
        }
        if rv.waiters.len() < world_size as usize {
            return Ok(rx);
        }
        // Everyone is here.
        let job = self.job(&req.job_id)?;
        let peer_addrs: Vec<String> = job
            .ranks
            .iter()
            .map(|w| self.workers.get(w).map(|w| w.row.data_addr.clone()).unwrap_or_default())
            .collect();
        let rv = self.rendezvous.get_mut(&key).expect("entry inserted above");
        let answer = RendezvousResponse { peer_addrs, nccl_unique_id: rv.nccl_unique_id.clone() };
        for (_, w) in std::mem::take(&mut rv.waiters) {
            let _ = w.send(Ok(answer.clone()));
        }
        rv.answer = Some(answer);
        info!(job_id = %req.job_id, attempt, world_size, "rendezvous complete");
        if state == JobState::Scheduled {
            self.transition_or_log(
                &req.job_id,
                JobState::Running,
                format!("all {world_size} ranks joined the rendezvous"),
            );
        }
        Ok(rx)
    }

    /// Ends an attempt's rendezvous: ranks still waiting get `Aborted` with the reason.
    pub fn abort_rendezvous(&mut self, job_id: &str, attempt: u32, reason: &str) {
        if let Some(rv) = self.rendezvous.remove(&(job_id.to_string(), attempt)) {
            for (_, w) in rv.waiters {
                let _ = w
                    .send(Err(CoordError::Aborted(format!("attempt {attempt} of job {job_id} was aborted: {reason}"))));
            }
        }
    }

    /// Coordinator shutdown: nobody waits on a rendezvous that can no longer complete here.
    pub fn abort_all_rendezvous(&mut self, reason: &str) {
        for (_, rv) in self.rendezvous.drain() {
            for (_, w) in rv.waiters {
                let _ = w.send(Err(CoordError::Unavailable(reason.to_string())));
            }
        }
    }
}
