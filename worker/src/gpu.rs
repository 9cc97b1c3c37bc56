//! Pretraining and fine-tuning (GPT, BERT, T5) on one GPU: the CUDA backend, NCCL between ranks (rank 0's unique id created
//! before the rendezvous, relayed to the others by the coordinator), and the communicator
//! aborted when the run is stopped (job aborted, a peer lost), so a dead peer never hangs a
//! worker. One GPU alone needs no communicator (`Local`).

#[cfg(feature = "cuda")]
use std::time::Duration;

use anyhow::{anyhow, Result};

use smelt_jobspec::JobSpec;

use crate::family::FamilyJob;
use crate::finetune::FinetuneJob;
use crate::finetune_family::FamilyFinetune;
use crate::runner::{Pretrain, RunControl, RunEvent, RunRequest};

/// Bytes of an NCCL unique id (`ncclUniqueId`, 128 in every NCCL release).
pub const NCCL_ID_BYTES: usize = 128;

#[cfg(feature = "cuda")]
const _: () = assert!(NCCL_ID_BYTES == smelt_engine::cuda::nccl::UNIQUE_ID_BYTES);

/// How often a rank waiting for the communicator checks whether its run was stopped.
#[cfg(feature = "cuda")]
const INIT_POLL: Duration = Duration::from_millis(20);

/// The id the rendezvous relayed, checked: every rank of a multi-GPU job needs rank 0's.
pub fn relayed_nccl_id(bytes: &[u8], rank: usize, world: usize) -> Result<[u8; NCCL_ID_BYTES]> {
    bytes.try_into().map_err(|_| {
        anyhow!(
            "the rendezvous relayed an nccl unique id of {} bytes, expected {NCCL_ID_BYTES} (rank {rank} of {world}; \
             rank 0 sends it for every job on more than one gpu)",
            bytes.len()
        )
    })
}

/// GPT pretraining on GPU `ordinal`.
#[cfg(feature = "cuda")]
pub(crate) fn train_gpt(ordinal: usize, job: Pretrain, req: &RunRequest, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    with_gpu(ordinal, req, control, |be, collective| crate::runner::train_gpt(be, collective, job, req, control, events))
}

/// BERT or T5 pretraining on GPU `ordinal`.
#[cfg(feature = "cuda")]
pub(crate) fn train_family(ordinal: usize, job: FamilyJob, req: &RunRequest, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    with_gpu(ordinal, req, control, |be, collective| crate::family::train(be, collective, job, req, control, events))
}

/// GPT fine-tuning on GPU `ordinal`.
#[cfg(feature = "cuda")]
pub(crate) fn finetune_gpt(ordinal: usize, job: &FinetuneJob, req: &RunRequest, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    with_gpu(ordinal, req, control, |be, collective| crate::finetune::train_assignment(be, collective, job, req, control, events))
}

/// BERT or T5 fine-tuning on GPU `ordinal`.
#[cfg(feature = "cuda")]
pub(crate) fn finetune_family(
    ordinal: usize,
    job: &FamilyFinetune,
    spec: &JobSpec,
    req: &RunRequest,
    control: &RunControl,
    events: &dyn Fn(RunEvent),
) -> Result<u64> {
    with_gpu(ordinal, req, control, |be, collective| crate::finetune_family::train(be, collective, job, spec, req, control, events))
}

/// Starts the CUDA backend on GPU `ordinal`, joins the job's NCCL communicator (none for one
/// rank) and runs `train` with both.
#[cfg(feature = "cuda")]
fn with_gpu<R>(
    ordinal: usize,
    req: &RunRequest,
    control: &RunControl,
    train: impl FnOnce(smelt_engine::cuda::CudaBackend, &mut dyn smelt_engine::collective::Collective<smelt_engine::cuda::CudaBackend>) -> Result<R>,
) -> Result<R> {
    use anyhow::Context;
    use smelt_engine::cuda::nccl::NcclCollective;
    use smelt_engine::cuda::CudaBackend;
    use smelt_engine::Local;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tracing::info;

    let a = &req.assignment;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let be = CudaBackend::new(ordinal).with_context(|| format!("starting the cuda backend on cuda:{ordinal}"))?;
    info!(job_id = %a.job_id, rank, device = %req.device, gpu = be.device_name(), arch = be.arch(), "cuda backend ready");
    if world == 1 {
        return train(be, &mut Local);
    }
    let id = relayed_nccl_id(&req.nccl_unique_id, rank, world)?;
    // The join returns once every rank has joined: wait for it on a thread of its own, so that
    // an abort (a peer that never comes) still ends this run at once. The cancel flag then ends
    // the join itself (its half-made communicator aborted, the thread gone) where the
    // communicator is non-blocking (nccl.rs); a blocking join's thread stays until NCCL returns.
    let cancel = Arc::new(AtomicBool::new(false));
    let init = {
        let cancel = cancel.clone();
        move || {
            let comm = NcclCollective::join(&be, &id, rank, world, &cancel);
            if let (Ok(c), true) = (&comm, cancel.load(Ordering::SeqCst)) {
                // joined just as the run was stopped: nobody will use it, and its peers may be
                // gone (dropping it would wait for them to finalize)
                c.abort();
            }
            (be, comm)
        }
    };
    let stopped = || control.stopped();
    let (be, comm) = crate::abortable::run_unless_stopped(&format!("nccl-init-{}", a.job_id), init, &stopped, INIT_POLL).map_err(|reason| {
        cancel.store(true, Ordering::SeqCst);
        anyhow!("stopped while joining the nccl communicator as rank {rank} of {world}: {reason}")
    })?;
    let mut comm = comm.with_context(|| format!("joining the nccl communicator as rank {rank} of {world} on cuda:{ordinal}"))?;
    let abort = comm.abort_handle();
    control.on_stop(move || abort.abort());
    if let Some(reason) = control.stopped() {
        return Err(anyhow!("stopped before training: {reason}"));
    }
    info!(job_id = %a.job_id, rank, world, "nccl communicator joined");
    let result = train(be, &mut comm);
    if result.is_err() {
        // a failed run may leave operations its peers never joined: abort (destroying, as
        // dropping does after a run that succeeded, would wait for them)
        comm.abort();
    }
    result
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn train_gpt(ordinal: usize, _job: Pretrain, _req: &RunRequest, _control: &RunControl, _events: &dyn Fn(RunEvent)) -> Result<u64> {
    Err(anyhow!("cuda:{ordinal}: {}", crate::device::BUILT_WITHOUT_CUDA))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn train_family(ordinal: usize, _job: FamilyJob, _req: &RunRequest, _control: &RunControl, _events: &dyn Fn(RunEvent)) -> Result<u64> {
    Err(anyhow!("cuda:{ordinal}: {}", crate::device::BUILT_WITHOUT_CUDA))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn finetune_gpt(ordinal: usize, _job: &FinetuneJob, _req: &RunRequest, _control: &RunControl, _events: &dyn Fn(RunEvent)) -> Result<u64> {
    Err(anyhow!("cuda:{ordinal}: {}", crate::device::BUILT_WITHOUT_CUDA))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn finetune_family(
    ordinal: usize,
    _job: &FamilyFinetune,
    _spec: &JobSpec,
    _req: &RunRequest,
    _control: &RunControl,
    _events: &dyn Fn(RunEvent),
) -> Result<u64> {
    Err(anyhow!("cuda:{ordinal}: {}", crate::device::BUILT_WITHOUT_CUDA))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relayed_id_must_have_nccls_size() {
        let id: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(relayed_nccl_id(&id, 1, 2).unwrap().to_vec(), id);
        for n in [0, 127, 129] {
            let e = relayed_nccl_id(&vec![0; n], 1, 2).unwrap_err().to_string();
            assert!(e.contains(&format!("{n} bytes")) && e.contains("expected 128") && e.contains("rank 1 of 2"), "{e}");
        }
    }
}
