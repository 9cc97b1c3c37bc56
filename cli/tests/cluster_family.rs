//! BERT and T5 jobs through the cluster for real: a coordinator process and two worker
//! processes on loopback train a masked-LM + next-sentence BERT and a span-corruption T5 on a
//! small text; each job finishes, its loss falls, its model file records the architecture and
//! special tokens, and `smelt attention` draws its maps (bidirectional for BERT; encoder,
//! causal decoder and cross-attention for T5). A BERT spec with an unknown objective is refused
//! at submission, naming the field.

mod harness;

use std::path::Path;
use std::process::Command;

use harness::Cluster;
use smelt_proto::v1::{Job, JobState, StepMetrics};

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

/// A two-rank job spec of the given `[model]` table over the text file.
fn spec(name: &str, model: &str, text: &Path, steps: u64, lr: f32) -> String {
    format!(
        "name = {name:?}\n[model]\n{model}\n[data]\ntext = {:?}\n\
         [train]\nsteps = {steps}\nglobal_batch = 16\nmicro_batch = 4\nseq_len = 24\nlr = {lr}\nwarmup_steps = 5\nweight_decay = 0.01\neval_interval = {}\neval_batches = 4\n\
         [cluster]\nworld_size = 2\n",
        text.to_str().unwrap(),
        steps / 2
    )
}

/// Runs a job to success and checks its metrics: every step reported once, the training loss
/// of the last five steps below `fall` times the first five's, validation at each evaluation.
fn run_job(c: &Cluster, spec: &str, steps: u64, fall: f64) -> (Job, Vec<StepMetrics>) {
    let job = c.submit(spec, "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "job failed: {}\n{}", c.job(&job.id).error, c.logs());
    assert_eq!(metrics.iter().map(|m| m.step).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>(), "{metrics:?}");
    let mean = |ms: &[StepMetrics]| ms.iter().map(|m| m.loss as f64).sum::<f64>() / ms.len() as f64;
    let (first, last) = (mean(&metrics[..5]), mean(&metrics[steps as usize - 5..]));
    eprintln!("{}: loss {first:.3} -> {last:.3}", job.name);
    assert!(last < fall * first, "loss did not fall below {fall} x its start: {first} -> {last}");
    let evals: Vec<u64> = metrics.iter().filter(|m| m.val_loss.is_some()).map(|m| m.step).collect();
    assert_eq!(evals, vec![steps / 2, steps]);
    (job, metrics)
}

/// `smelt attention` on a model: the parsed attention.json.
fn attention(c: &Cluster, model: &Path, text: &str, out: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["attention", model.to_str().unwrap(), "--text", text, "--out", out.to_str().unwrap(), "--cell", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "attention failed: {}{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr), c.logs());
    serde_json::from_slice(&std::fs::read(out.join("attention.json")).unwrap()).unwrap()
}

/// Each map of `weights[layer][head]` is (rows, cols) of distributions; `causal`: zero above the
/// diagonal; otherwise some query attends to a later key.
fn check_maps(weights: &serde_json::Value, layers: usize, heads: usize, rows: usize, cols: usize, causal: bool) {
    assert_eq!(weights.as_array().unwrap().len(), layers);
    let mut future = 0.0f64;
    for l in 0..layers {
        for h in 0..heads {
            let m = weights[l][h].as_array().unwrap();
            assert_eq!(m.len(), rows);
            for (i, row) in m.iter().enumerate() {
                let w: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                assert_eq!(w.len(), cols);
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-4, "layer {l} head {h} row {i} is not a distribution");
                future += w[(i + 1).min(cols)..].iter().sum::<f64>();
            }
        }
    }
    if causal {
        assert_eq!(future, 0.0, "a causal map attends to later keys");
    } else {
        assert!(future > 0.1, "a bidirectional map never attends to later keys");
    }
}

fn png_size(path: &Path) -> (u32, u32) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let info = png::Decoder::new(std::io::BufReader::new(f)).read_info().unwrap().info().clone();
    (info.width, info.height)
}

/// A tiny BERT's masked-LM + next-sentence loss starts at ln(V) + ln 2 = 3.0 on this text (6
/// characters and 4 special tokens); the characters' frequencies alone would bring it to
/// 1.58 + 0.69 = 2.27, so a loss well below that shows the model uses context.
const BERT_STEPS: u64 = 100;
const BERT_TEXT: &str = "abracadabra ";

#[test]
fn bert_mlm_nsp_job_runs_on_two_workers_and_its_attention_is_drawn() {
    let c = Cluster::with_workers(2);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, BERT_TEXT.repeat(300)).unwrap();
    let (job, metrics) = run_job(&c, &spec("bert", "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"mlm+nsp\"\nln_placement = \"post\"", &text, BERT_STEPS, 1e-2), BERT_STEPS, 0.85);
    let last: f32 = metrics[BERT_STEPS as usize - 5..].iter().map(|m| m.loss).sum::<f32>() / 5.0;
    assert!(last < 2.1, "the loss {last} did not go below the unigram floor 2.27");

    let model = c.model_path(&job.id);
    let meta = smelt_engine::weights::metadata(&std::fs::read(&model).unwrap(), "bert").unwrap();
    assert_eq!((meta["smelt.format"].as_str(), meta["smelt.objective"].as_str()), ("bert/1", "mlm+nsp"));
    let chars = {
        let mut v: Vec<char> = BERT_TEXT.chars().collect();
        v.sort_unstable();
        v.dedup();
        v.len() as u64
    };
    let specials: serde_json::Value = serde_json::from_str(&meta["smelt.special_tokens"]).unwrap();
    assert_eq!(specials["base_vocab"], chars);
    assert_eq!((specials["pad"].as_u64(), specials["mask"].as_u64()), (Some(chars), Some(chars + 3)));
    let config: serde_json::Value = serde_json::from_str(&meta["smelt.config"]).unwrap();
    assert_eq!(config["vocab_size"], chars + 4);

    let out = c.dir.path().join("att-bert");
    let doc = attention(&c, &model, "a bad cab", &out);
    let t = "a bad cab".len() + 2;
    let tokens: Vec<&str> = doc["tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!((tokens.len(), tokens[0], tokens[t - 1], doc["arch"].as_str()), (t, "[CLS]", "[SEP]", Some("bert")));
    check_maps(&doc["weights"], 2, 2, t, t, false);
    for (l, h) in [(0, 0), (1, 1)] {
        assert_eq!(png_size(&out.join(format!("layer{l}_head{h}.png"))), (2 * t as u32, 2 * t as u32));
    }
}

#[test]
fn t5_span_corruption_job_runs_on_two_workers_and_its_attention_is_drawn() {
    let c = Cluster::with_workers(2);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, LINE.repeat(40)).unwrap();
    let (job, _) = run_job(&c, &spec("t5", "arch = \"t5\"\npreset = \"t5-test\"\nobjective = \"span\"\nsentinels = 8", &text, 40, 1e-2), 40, 0.8);

    let model = c.model_path(&job.id);
    let meta = smelt_engine::weights::metadata(&std::fs::read(&model).unwrap(), "t5").unwrap();
    assert_eq!(meta["smelt.format"], "t5/1");
    let specials: serde_json::Value = serde_json::from_str(&meta["smelt.special_tokens"]).unwrap();
    let config: serde_json::Value = serde_json::from_str(&meta["smelt.config"]).unwrap();
    assert_eq!(specials["sentinels"], 8);
    assert_eq!(config["vocab_size"].as_u64().unwrap(), specials["base_vocab"].as_u64().unwrap() + 1 + 8);

    let out = c.dir.path().join("att-t5");
    let doc = attention(&c, &model, "pack my box", &out);
    let (te, td) = (11, 12);
    let dec: Vec<&str> = doc["decoder_tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!((doc["encoder_tokens"].as_array().unwrap().len(), dec.len(), dec[0]), (te, td, "<pad>"));
    check_maps(&doc["encoder"], 2, 2, te, te, false);
    check_maps(&doc["decoder_self"], 2, 2, td, td, true);
    check_maps(&doc["cross"], 2, 2, td, te, false);
    assert_eq!(png_size(&out.join("encoder_layer1_head1.png")), (2 * te as u32, 2 * te as u32));
    assert_eq!(png_size(&out.join("decoder_layer0_head0.png")), (2 * td as u32, 2 * td as u32));
    assert_eq!(png_size(&out.join("cross_layer1_head0.png")), (2 * te as u32, 2 * td as u32));
}

#[test]
fn bert_spec_with_an_unknown_objective_is_refused_naming_the_field() {
    let c = Cluster::with_workers(0);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, LINE).unwrap();
    let e = c.try_submit(&spec("bad", "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"next-token\"", &text, 10, 1e-3), "").unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("model.objective") && e.message().contains("next-token"), "{}", e.message());
}
