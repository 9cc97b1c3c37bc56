//! Snapshots of small models for the checkpoint tests, and an S3-protocol server on loopback.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use smelt_checkpoint::manifest::{DataPosition, FORMAT};
use smelt_checkpoint::{Lineage, Snapshot, TrainerJson};
use smelt_corpus::Tokenizer;
use smelt_engine::model::{GptConfig, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::train::TrainerState;

pub fn config(vocab: usize, n_embd: usize) -> GptConfig {
    GptConfig { vocab_size: vocab, block_size: 32, n_layer: 2, n_head: 2, n_embd, ln_placement: LayerNormPlacement::Pre, positions: Default::default() }
}

/// A snapshot whose every value depends on `step`, so checkpoints of different steps differ.
pub fn snapshot(cfg: &GptConfig, step: u64) -> Snapshot {
    let n = smelt_engine::model::Gpt::<smelt_engine::CpuBackend>::param_table(cfg).total();
    let mut rng = Rng::new(step);
    let mut draw = |scale: f64| (0..n).map(|_| (rng.normal() * scale) as f32).collect::<Vec<f32>>();
    let (params, m, v) = (draw(0.02), draw(1e-3), draw(1e-6).into_iter().map(f32::abs).collect());
    let mut data_rng = Rng::new(99);
    for _ in 0..step {
        data_rng.next_u64();
    }
    Snapshot {
        params,
        m,
        v,
        trainer: TrainerJson {
            format: FORMAT.into(),
            step,
            job_id: "job-000001".into(),
            attempt: 1,
            data: DataPosition { samples_consumed: step * 8, global_batch: 8, seed: 7 },
            trainer: TrainerState { step, optimizer_steps: step, data_rng },
            model: cfg.clone().into(),
            head: None,
            tokenizer: Tokenizer::Byte,
            spec_toml: "name = \"t\"\n".into(),
            lineage: Lineage { parent_checkpoint: None, parent_job: None },
            smelt_version: "test".into(),
        },
    }
}

pub const KEY: &str = "smelt-test-key";
pub const SECRET: &str = "smelt-test-secret";

/// Serves `root` (a directory per bucket) over the S3 protocol on `listener`, from a background
/// runtime, for the rest of the process.
pub fn serve_s3(root: &Path, listener: TcpListener) -> SocketAddr {
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(KEY, SECRET));
    let service = b.build();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            use hyper_util::rt::{TokioExecutor, TokioIo};
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
    });
    addr
}
