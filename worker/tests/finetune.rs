//! Fine-tuning jobs end to end in one process (real files, the `Local` collective): a small
//! pretrained GPT learns a synthetic classification task and an SFT task, the result records
//! its parent, and bad inputs fail with errors that name them.

use std::path::{Path, PathBuf};

use smelt_corpus::Tokenizer;
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::optim::{AdamWConfig, LrSchedule};
use smelt_engine::rng::Rng;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::{weights, CpuBackend, Local};
use smelt_jobspec::JobSpec;
use smelt_proto::v1::StepMetrics;
use smelt_worker::finetune::{FinetuneJob, FinetuneOutcome};
use smelt_worker::model_file;

const ALPHABET: &[u8] = b"abcdefghx ";

/// A random word over a..h, with an `x` somewhere when `with_x`.
fn word(rng: &mut Rng, with_x: bool) -> String {
    let n = 6 + rng.below(8) as usize;
    let mut w: Vec<u8> = (0..n).map(|_| b'a' + rng.below(8) as u8).collect();
    if with_x {
        w[rng.below(n as u64) as usize] = b'x';
    }
    String::from_utf8(w).unwrap()
}

/// Pretrains a tiny char GPT for a few steps on random words (so it knows the characters and
/// the text's statistics) and saves it as `dir/parent/model.safetensors`.
fn pretrained_parent(dir: &Path) -> PathBuf {
    let mut rng = Rng::new(7);
    let text: String = (0..400).map(|i| word(&mut rng, i % 3 == 0) + " ").collect();
    let tok = Tokenizer::fit("char", std::str::from_utf8(ALPHABET).unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), ALPHABET.len());
    let ids = tok.encode(&text).unwrap();
    let cfg = GptConfig { vocab_size: tok.vocab_size(), block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, ln_placement: LayerNormPlacement::Pre, positions: Default::default() };
    let tc = TrainConfig {
        batch_size: 8,
        seq_len: 32,
        grad_accum: 1,
        steps: 30,
        schedule: LrSchedule::constant(3e-3),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 1,
    };
    let mut trainer = Trainer::new(Gpt::new(CpuBackend::new(), cfg.clone(), 1).unwrap(), tc).unwrap();
    for _ in 0..30 {
        trainer.train_step(&TokenWindows::new(&ids)).unwrap();
    }
    let path = dir.join("parent").join("model.safetensors");
    model_file::save(&path, &cfg, &tok, &trainer.model.params_host(), &[("job", "job-000001".into())]).unwrap();
    path
}

fn write_jsonl(path: &Path, lines: impl Iterator<Item = serde_json::Value>) {
    let text: String = lines.map(|v| v.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn spec(body: &str, steps: u64, lr: f32, eval_interval: u64) -> JobSpec {
    JobSpec::parse(&format!(
        "name = \"ft\"\nkind = \"finetune\"\nseed = 5\n\n[finetune]\n{body}\n\n[train]\nsteps = {steps}\nglobal_batch = 16\nmicro_batch = 8\nseq_len = 16\nlr = {lr}\nwarmup_steps = 5\nweight_decay = 0.0\neval_interval = {eval_interval}\n"
    ))
    .unwrap()
}

fn train(spec: &JobSpec, out: &Path) -> (FinetuneOutcome, Vec<StepMetrics>) {
    let job = FinetuneJob::prepare(spec, out).unwrap();
    let mut seen = Vec::new();
    let outcome = job.train(CpuBackend::new(), "job-000002", out, &mut Local, &|| None, &mut |m| seen.push(m)).unwrap();
    (outcome, seen)
}

/// "Does the text contain an x?" from a briefly pretrained init: validation accuracy well
/// above chance (0.5) after 160 steps; the saved model records its parent and carries the head.
#[test]
fn classification_learns_and_records_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = pretrained_parent(dir.path());
    let mut rng = Rng::new(99);
    let data = dir.path().join("x.jsonl");
    write_jsonl(
        &data,
        (0..400).map(|i| {
            let with_x = i % 2 == 1;
            serde_json::json!({"text": word(&mut rng, with_x), "label": with_x as u32, "id": i})
        }),
    );
    let s = spec(&format!("init_from = {:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}\nval_fraction = 0.2", parent.to_str().unwrap(), data.to_str().unwrap()), 160, 2e-3, 80);
    let out = dir.path().join("out");
    let (outcome, metrics) = train(&s, &out);

    let acc = outcome.val_accuracy.expect("classification reports accuracy");
    eprintln!("validation accuracy {acc}");
    assert!(acc >= 0.9, "validation accuracy {acc} after 160 steps (chance is 0.5)");
    assert_eq!(metrics.len(), 160);
    let evals: Vec<&StepMetrics> = metrics.iter().filter(|m| m.val_accuracy.is_some()).collect();
    assert_eq!(evals.iter().map(|m| m.step).collect::<Vec<_>>(), vec![80, 160]);
    assert_eq!(evals[1].val_accuracy, Some(acc));
    assert_eq!(evals[1].val_loss, outcome.val_loss);

    let path = outcome.model_path.unwrap();
    assert_eq!(path, out.join("jobs/job-000002/model.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let meta = weights::metadata(&bytes, "saved").unwrap();
    assert_eq!(meta["smelt.parent"], parent.to_str().unwrap());
    assert_eq!(meta["smelt.parent_job"], "job-000001");
    assert_eq!(meta["smelt.kind"], "finetune");
    assert_eq!(meta["smelt.head"], "classification");
    assert_eq!(meta["smelt.num_labels"], "2");
    assert_eq!(meta["smelt.val_accuracy"].parse::<f32>().unwrap(), acc);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("score.weight").unwrap().shape(), &[2, 32]);
    // Still a smelt model: the GPT loads (sample, export), and it moved away from the parent.
    let child = model_file::load(&path).unwrap();
    let parent_params = model_file::load(&parent).unwrap().params;
    assert_eq!(child.params.len(), parent_params.len());
    assert_ne!(child.params, parent_params);

    // Fine-tuning the classifier further starts from its trained head (a head drawn afresh
    // from the seed lost the parent's accuracy at step 0): at a vanishing learning rate the
    // head and the accuracy stay the parent's.
    let again = |labels: u32, steps: u64| {
        spec(&format!("init_from = {:?}\nhead = \"classification\"\nnum_labels = {labels}\ndata = {:?}\nval_fraction = 0.2", path.to_str().unwrap(), data.to_str().unwrap()), steps, 1e-9, steps)
    };
    let job = FinetuneJob::prepare(&again(2, 5), &dir.path().join("out2")).unwrap();
    assert!(job.head_notes.iter().any(|n| n.contains("starts from the parent's (2 labels")), "{:?}", job.head_notes);
    let continued = job.train(CpuBackend::new(), "job-000003", &dir.path().join("out2"), &mut Local, &|| None, &mut |_| {}).unwrap();
    let acc2 = continued.val_accuracy.unwrap();
    assert!((acc2 - acc).abs() < 0.03, "continued from a classifier with accuracy {acc}: {acc2}");
    let head_of = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("score.weight").unwrap();
        t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<f32>>()
    };
    let (before, after) = (head_of(&path), head_of(&continued.model_path.unwrap()));
    let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved < 1e-5, "the head moved by {moved} at lr 1e-9: it was not the parent's");
    // another label count cannot take it: a new head, and the job says so
    let job = FinetuneJob::prepare(&again(3, 5), &dir.path().join("out3")).unwrap();
    assert!(job.head_notes.iter().any(|n| n.contains("2-label classification head is not used: this job has 3 labels")), "{:?}", job.head_notes);
}

/// SFT on "<word> " -> the word again (a copy task): the validation loss (response tokens only) falls, and
/// a job id as init_from finds that job's final weights under the output directory.
#[test]
fn sft_loss_falls_and_a_job_id_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let parent = pretrained_parent(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("jobs/job-000001")).unwrap();
    std::fs::copy(&parent, out.join("jobs/job-000001/model.safetensors")).unwrap();
    let mut rng = Rng::new(3);
    let data = dir.path().join("sft.jsonl");
    write_jsonl(
        &data,
        (0..300).map(|_| {
            let w: String = word(&mut rng, false).chars().take(6).collect();
            serde_json::json!({"prompt": format!("{w} "), "response": w})
        }),
    );
    let s = spec(&format!("init_from = \"job-000001\"\nhead = \"sft\"\ndata = {:?}", data.to_str().unwrap()), 150, 3e-3, 10);
    let (outcome, metrics) = train(&s, &out);
    let vals: Vec<f32> = metrics.iter().filter_map(|m| m.val_loss).collect();
    assert_eq!(vals.len(), 15);
    assert!(outcome.val_accuracy.is_none() && metrics.iter().all(|m| m.val_accuracy.is_none()));
    let (first, last) = (vals[0], *vals.last().unwrap());
    eprintln!("sft validation loss {vals:?}");
    assert!(last < 0.5 * first, "SFT validation loss went from {first} to {last}");
    let meta = weights::metadata(&std::fs::read(outcome.model_path.unwrap()).unwrap(), "saved").unwrap();
    assert_eq!(meta["smelt.parent"], "job-000001");
    assert_eq!(meta["smelt.head"], "sft");
}

fn prepare_err(spec: &JobSpec, out: &Path) -> String {
    match FinetuneJob::prepare(spec, out) {
        Ok(_) => panic!("prepare should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_init_from_and_bad_data_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let parent = pretrained_parent(dir.path());
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"abc\", \"label\": 0}\n{\"text\": \"abx\"}\n").unwrap();
    let body = |init: &str| format!("init_from = {init:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}", data.to_str().unwrap());
    let out = dir.path().join("out");

    let e = prepare_err(&spec(&body("/nonexistent/model.safetensors"), 5, 1e-3, 0), &out);
    assert!(e.contains("finetune.init_from") && e.contains("/nonexistent/model.safetensors"), "{e}");
    let e = prepare_err(&spec(&body("job-000042"), 5, 1e-3, 0), &out);
    assert!(e.contains("finetune.init_from") && e.contains("no final weights of job job-000042"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = prepare_err(&spec(&body(empty.to_str().unwrap()), 5, 1e-3, 0), &out);
    assert!(e.contains("finetune.init_from") && e.contains("no model.safetensors"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = prepare_err(&spec(&body(junk.to_str().unwrap()), 5, 1e-3, 0), &out);
    assert!(e.contains("finetune.init_from") && e.contains("not a safetensors file"), "{e}");

    // A good parent (its checkpoint-style directory), bad data: the line and the field.
    let e = prepare_err(&spec(&body(parent.parent().unwrap().to_str().unwrap()), 5, 1e-3, 0), &out);
    assert!(e.contains("finetune.data") && e.contains("line 2") && e.contains("missing field \"label\""), "{e}");
    // seq_len beyond the parent's block size.
    let long = JobSpec::parse(&spec(&body(parent.to_str().unwrap()), 5, 1e-3, 0).to_toml().replace("seq_len = 16", "seq_len = 64")).unwrap();
    let e = prepare_err(&long, &out);
    assert!(e.contains("train.seq_len") && e.contains("block_size 32"), "{e}");
}

/// Two ranks on a loopback ring fine-tune for 6 steps; rank 0's saved model. With `bucket`,
/// the ring runs on its own thread and the GPT's gradient is averaged in buckets during the
/// backward pass (the spec's grad_bucket_mb); else one all-reduce after it.
fn two_ranks(dir: &Path, body: &str, bucket_mb: Option<f64>, name: &str) -> Vec<u8> {
    use smelt_engine::background_ring::BackgroundRing;
    use smelt_engine::collective::TcpRing;
    let mut text = format!("name = \"ft\"\nkind = \"finetune\"\nseed = 5\n\n[finetune]\n{body}\n\n[train]\nsteps = 6\nglobal_batch = 16\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 0\n\n[cluster]\nworld_size = 2\n");
    if let Some(mb) = bucket_mb {
        text.push_str(&format!("grad_bucket_mb = {mb}\n"));
    }
    let spec = JobSpec::parse(&text).unwrap();
    let listeners: Vec<std::net::TcpListener> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let runs: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, spec, out) = (addrs.clone(), spec.clone(), dir.join(format!("{name}-{rank}")));
            std::thread::spawn(move || {
                let ring = TcpRing::connect(rank, &addrs, l, std::time::Duration::from_secs(30)).unwrap();
                let job = FinetuneJob::prepare(&spec, &out).unwrap();
                match bucket_mb {
                    Some(_) => {
                        let mut ring = BackgroundRing::new(ring);
                        let outcome = job.train(CpuBackend::new(), "job-000002", &out, &mut ring, &|| None, &mut |_| {}).unwrap();
                        (outcome.model_path, ring.reductions_started())
                    }
                    None => (job.train(CpuBackend::new(), "job-000002", &out, &mut { ring }, &|| None, &mut |_| {}).unwrap().model_path, 0),
                }
            })
        })
        .collect();
    let done: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
    if bucket_mb.is_some() {
        // 6 steps: a bucket of final GPT gradients at a time, several per backward pass
        assert!(done[0].1 >= 6 * 3, "{name}: only {} reductions started in 6 steps", done[0].1);
    }
    std::fs::read(done[0].0.as_ref().expect("rank 0 saves")).unwrap()
}

/// Averaging the GPT's gradient in buckets during the backward pass (classification: after the
/// head's backward; SFT: the LM's) leaves the saved weights bit for bit those of one all-reduce
/// after the pass.
#[test]
fn gradient_buckets_match_one_all_reduce_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let parent = pretrained_parent(dir.path());
    let mut rng = Rng::new(12);
    let class = dir.path().join("c.jsonl");
    write_jsonl(&class, (0..64).map(|i| serde_json::json!({"text": word(&mut rng, i % 2 == 1), "label": i % 2})));
    let sft = dir.path().join("s.jsonl");
    write_jsonl(&sft, (0..64).map(|_| serde_json::json!({"prompt": word(&mut rng, false), "response": "ab"})));
    let init = parent.to_str().unwrap();
    for (what, body) in [
        ("classification", format!("init_from = {init:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}\nval_fraction = 0.0", class.to_str().unwrap())),
        ("sft", format!("init_from = {init:?}\nhead = \"sft\"\ndata = {:?}\nval_fraction = 0.0", sft.to_str().unwrap())),
    ] {
        let plain = two_ranks(dir.path(), &body, None, &format!("{what}-plain"));
        // 0.01 MiB: ~2,600 values, several buckets per backward pass of the 2-layer GPT
        let bucketed = two_ranks(dir.path(), &body, Some(0.01), &format!("{what}-buckets"));
        let weights = |b: &[u8]| {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            b[8 + n..].to_vec()
        };
        assert!(weights(&plain) == weights(&bucketed), "{what}: bucketed fine-tuning's weights differ from one all-reduce's");
    }
}
