//! The NCCL unique id through the rendezvous: rank 0's bytes reach every rank exactly as sent
//! (the coordinator neither reads nor requires them), other ranks' bytes are ignored, and a
//! multi-GPU job whose rank 0 sends none (fine-tuning on GPU workers averages over the TCP
//! ring) still meets. A real coordinator over a real SQLite file; workers are gRPC clients.

mod common;

use common::*;
use smelt_proto::v1::*;

fn cuda(i: u32) -> WorkerOpts<'static> {
    WorkerOpts { device_class: DeviceClass::Cuda, device_index: i, ..Default::default() }
}

/// Three GPU workers take the three ranks of a CUDA job (by device index).
async fn three_gpu_ranks(coord: &Coord) -> (Vec<Worker>, Vec<Assignment>) {
    let mut ws = Vec::new();
    for i in 0..3 {
        ws.push(Worker::join_with(&coord.url, "", cuda(i)).await);
    }
    let mut asg = Vec::new();
    for w in ws.iter_mut() {
        asg.push(w.assignment().await);
    }
    let ranks: Vec<u32> = asg.iter().map(|a| a.rank).collect();
    assert_eq!(ranks, [0, 1, 2], "ranks follow device_index on one host");
    (ws, asg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank0_id_reaches_every_rank_byte_for_byte() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    submit(&mut jobs, &spec_on("gpu3", 3, 0, 0, "cuda")).await;
    let (ws, a) = three_gpu_ranks(&coord).await;
    // 128 bytes like an ncclUniqueId: zeros, 0xff, and sequences that are not UTF-8.
    let mut id: Vec<u8> = (0..128u32).map(|i| (i * 131 + 7) as u8).collect();
    id[..4].copy_from_slice(&[0, 0xff, 0xc3, 0x28]);
    assert!(id.contains(&0) && id.contains(&0xff) && std::str::from_utf8(&id).is_err());
    // Rank 2 sends bytes of its own: only rank 0's count. Rank 0 joins last.
    let (r1, r2, r0) = tokio::join!(ws[1].rendezvous(&a[1], &[]), ws[2].rendezvous(&a[2], b"not rank 0"), async {
        tokio::time::sleep(HEARTBEAT).await;
        ws[0].rendezvous(&a[0], &id).await
    });
    for r in [r0, r1, r2] {
        assert_eq!(r.expect("rendezvous").nccl_unique_id, id);
    }
    // A rank that calls again (a retry) gets the same id.
    assert_eq!(ws[1].rendezvous(&a[1], &[]).await.unwrap().nccl_unique_id, id);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_job_whose_rank0_sends_no_id_still_meets() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    submit(&mut jobs, &spec_on("gpu-ring", 3, 0, 0, "cuda")).await;
    let (ws, a) = three_gpu_ranks(&coord).await;
    let (r0, r1, r2) =
        tokio::join!(ws[0].rendezvous(&a[0], &[]), ws[1].rendezvous(&a[1], &[]), ws[2].rendezvous(&a[2], &[]));
    for r in [r0, r1, r2] {
        let r = r.expect("rendezvous");
        assert!(r.nccl_unique_id.is_empty());
        assert_eq!(r.peer_addrs.len(), 3);
    }
    coord.stop().await;
}
