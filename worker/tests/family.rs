//! The BERT/T5 training thread in process on one rank (the cluster tests run two ranks as real
//! processes): the contrastive objective, with additive scores and sinusoidal positions, lowers
//! its loss and saves a `bert/1` model; a T5 job reads a prepared corpus (its vocabulary the
//! corpus's, end-of-text included); on a GPU worker the job takes the CUDA path.

use std::net::TcpListener;
use std::sync::Mutex;

use smelt_proto::v1::{Assignment, AssignmentDone, StepMetrics};
use smelt_worker::model_file::{self, AnyModel, FamilyModel};
use smelt_worker::runner::{run_assignment, RunControl, RunEvent, RunRequest};
use smelt_worker::Device;

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

/// Runs one rank of a job to its end: its metrics and its `Done`.
fn run(spec: &str, out: &std::path::Path) -> (Vec<StepMetrics>, AssignmentDone) {
    run_on(spec, out, Device::Cpu)
}

/// [`run`] on the given device.
fn run_on(spec: &str, out: &std::path::Path, device: Device) -> (Vec<StepMetrics>, AssignmentDone) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let req = RunRequest {
        assignment: Assignment { job_id: "job-000001".into(), rank: 0, world_size: 1, spec_toml: spec.into(), ..Default::default() },
        peer_addrs: vec![addr],
        listener,
        out_dir: out.to_path_buf(),
        device,
        nccl_unique_id: Vec::new(),
    };
    let (metrics, done) = (Mutex::new(Vec::new()), Mutex::new(None));
    run_assignment(req, RunControl::default(), &|e| match e {
        RunEvent::Metrics(m) => metrics.lock().unwrap().push(m),
        RunEvent::Done(d) => *done.lock().unwrap() = Some(d),
        _ => {}
    });
    (metrics.into_inner().unwrap(), done.into_inner().unwrap().expect("a run always ends with Done"))
}

fn spec(model: &str, text: &std::path::Path, extra: &str) -> String {
    format!(
        "name = \"c\"\n[model]\n{model}\n[data]\ntext = {:?}\n[train]\nsteps = 40\nglobal_batch = 8\nmicro_batch = 8\nseq_len = 24\nlr = 3e-3\nweight_decay = 0.01\n{extra}",
        text.to_str().unwrap()
    )
}

#[test]
fn contrastive_bert_job_lowers_its_loss_and_saves_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    // 24 lines: 207 validation tokens, 9 windows of 22, evaluated as one batch of 8 (a lone
    // window has no negative to contrast with, so it is left out)
    std::fs::write(&text, LINE.repeat(24)).unwrap();
    let model = "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"contrastive\"\nscores = \"additive\"\npositions = \"sinusoidal\"\ntemperature = 0.1";
    let (metrics, done) = run(&spec(model, &text, ""), dir.path());
    assert!(done.ok, "{}", done.error);
    assert_eq!(metrics.len(), 40);
    let mean = |ms: &[StepMetrics]| ms.iter().map(|m| m.loss).sum::<f32>() / ms.len() as f32;
    let (first, last) = (mean(&metrics[..5]), mean(&metrics[35..]));
    eprintln!("contrastive loss {first} -> {last}");
    assert!(last < 0.7 * first, "contrastive loss {first} -> {last}");
    assert!(metrics[39].val_loss.is_some_and(f32::is_finite), "{:?}", metrics[39]);
    let AnyModel::Family(saved) = model_file::load_any(&dir.path().join("jobs/job-000001/model.safetensors")).unwrap() else { panic!("saved as a GPT") };
    let FamilyModel::Bert { config, specials } = saved.model else { panic!("not a BERT") };
    assert_eq!((config.nsp, config.vocab_size), (false, specials.base_vocab as usize + 4));
    assert_eq!(saved.metadata["smelt.objective"], "contrastive");
}

#[test]
fn a_family_job_on_a_gpu_worker_takes_the_cuda_path() {
    // A T5 with general attention scores (the learned-score kernels on CUDA): where this build
    // and machine cannot train on cuda:0 (no `cuda` feature, no GPU) the run fails naming CUDA;
    // where they can, it trains there.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, LINE.repeat(5)).unwrap();
    let model = "arch = \"t5\"\npreset = \"t5-test\"\nsentinels = 8\nscores = \"general\"";
    let (metrics, done) = run_on(&spec(model, &text, "[cluster]\ndevice = \"cuda\"\n"), dir.path(), Device::Cuda(0));
    if smelt_worker::device::probe_cuda(0).is_ok() {
        assert!(done.ok && !metrics.is_empty(), "{}", done.error);
    } else {
        assert!(!done.ok && metrics.is_empty());
        assert!(done.error.contains("cuda"), "{}", done.error);
    }
}

#[test]
fn t5_job_trains_on_a_prepared_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lines.txt");
    std::fs::write(&input, LINE.repeat(60)).unwrap();
    let corpus = dir.path().join("corpus");
    let opts = smelt_corpus::PrepareOptions {
        inputs: vec![input.to_str().unwrap().into()],
        tokenizer: "byte".into(),
        out: corpus.to_str().unwrap().into(),
        txt_docs: smelt_corpus::TxtDocs::Line,
        val: smelt_corpus::ValSplit::Docs(6),
        ..Default::default()
    };
    smelt_corpus::prepare(&opts, &smelt_corpus::NoProgress).unwrap();
    let spec = format!(
        "name = \"c\"\n[model]\narch = \"t5\"\npreset = \"t5-test\"\nsentinels = 8\nscores = \"general\"\n[data]\ncorpus = {:?}\n\
         [train]\nsteps = 30\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 24\nlr = 1e-2\nweight_decay = 0.01\n",
        corpus.to_str().unwrap()
    );
    let (metrics, done) = run(&spec, dir.path());
    assert!(done.ok, "{}", done.error);
    let (first, last) = (metrics[0].loss, metrics.last().unwrap().loss);
    eprintln!("t5 on a corpus: loss {first} -> {last}, val {:?}", metrics.last().unwrap().val_loss);
    // a new T5 starts near the uniform loss, ln 257 (its tied head scaled by C^-0.5): well below it
    assert!(first < 6.0 && last < first - 1.0, "loss {first} -> {last}");
    assert!(metrics.last().unwrap().val_loss.is_some(), "rank 0 evaluates on the corpus's validation split");
    let AnyModel::Family(saved) = model_file::load_any(&dir.path().join("jobs/job-000001/model.safetensors")).unwrap() else { panic!("saved as a GPT") };
    let FamilyModel::T5 { config, specials } = saved.model else { panic!("not a T5") };
    // byte ids 0..256 and end-of-text 256, then the pad id and 8 sentinels
    assert_eq!((specials.base_vocab, specials.pad, config.vocab_size), (257, 257, 257 + 1 + 8));
}
