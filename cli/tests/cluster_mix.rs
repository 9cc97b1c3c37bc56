//! A data mixture (`[[data.mix]]`) through the cluster for real: two corpora prepared by
//! `smelt corpus prepare`, a coordinator and worker processes on loopback. Weights 0.7 and 0.3
//! of 8 sequences a step (5.6 and 2.4): every step takes 8, each source 5-6 and 2-3, the
//! running totals within one sequence of exact; the sources' sequences are their own (ids within
//! each corpus, no repeat inside an epoch, the small source wrapping into its next epoch); the
//! validation loss is each source's, weighted, and the events name both; a job resumed from a
//! checkpoint with another world size draws exactly what the uninterrupted job drew; sources
//! with different tokenizers are refused naming the source.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::Cluster;
use smelt_corpus::mixture::MixtureOrder;
use smelt_proto::v1::JobState;

/// `smelt corpus prepare` of `text` (written to a file) into `<dir>/<name>`.
fn prepare(dir: &Path, name: &str, text: &str, tokenizer: &str) -> PathBuf {
    let input = dir.join(format!("{name}.txt"));
    std::fs::write(&input, text).unwrap();
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["corpus", "prepare", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tokenizer", tokenizer])
        .args(["--txt-docs", "line", "--val-docs", "2"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "prepare {name}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    out
}

fn spec(name: &str, a: &Path, b: &Path, world: usize, extra: &str) -> String {
    format!(
        "name = {name:?}\nseed = 11\n[model]\npreset = \"test\"\n[[data.mix]]\ncorpus = {:?}\nweight = 0.7\n[[data.mix]]\ncorpus = {:?}\nweight = 0.3\n\
         [train]\nsteps = 12\nglobal_batch = 8\nmicro_batch = {}\nseq_len = 16\nlr = 1e-3\neval_interval = 4\n[cluster]\nworld_size = {world}\n{extra}",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        8 / world
    )
}

/// The sample ids each step of `job` drew over all ranks (the last attempt's), sorted.
fn drawn(c: &Cluster, job: &str, world: usize) -> BTreeMap<u64, Vec<u64>> {
    let mut steps: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut attempts: BTreeMap<(u64, usize), (u64, Vec<u64>)> = BTreeMap::new();
    for rank in 0..world {
        let log = c.samples_dir().join(format!("{job}.rank{rank}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}\n{}", log.display(), c.logs()));
        for line in text.lines() {
            let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
            let (attempt, step) = (v[0], v[1]);
            let e = attempts.entry((step, rank)).or_insert((attempt, Vec::new()));
            if attempt >= e.0 {
                *e = (attempt, v[2..].to_vec());
            }
        }
    }
    for ((step, _), (_, ids)) in attempts {
        steps.entry(step).or_default().extend(ids);
    }
    for ids in steps.values_mut() {
        ids.sort();
    }
    steps
}

#[test]
fn a_mixture_draws_each_source_in_proportion_and_resumes_exactly() {
    let c = Cluster::with_workers(2);
    let dir = c.dir.path().to_path_buf();
    let letters: String = (0..60).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    let digits: String = (0..6).map(|i| format!("{i:04} 31415 92653 58979 32384 62643 38327 95028\n")).collect();
    let a = prepare(&dir, "letters", &letters, "byte");
    let b = prepare(&dir, "digits", &digits, "byte");
    let n_b = {
        let r = smelt_corpus::CorpusReader::open(b.to_str().unwrap()).unwrap();
        r.n_sequences(16)
    };

    let job = c.submit(&spec("mix", &a, &b, 2, "[checkpoint]\nevery = 4\n"), "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let whole = drawn(&c, &job.id, 2);
    assert_eq!(whole.keys().copied().collect::<Vec<_>>(), (0..12).collect::<Vec<_>>());
    let mut b_draws = Vec::new();
    let mut totals = [0u64; 2];
    for (step, ids) in &whole {
        assert_eq!(ids.len(), 8, "step {step}");
        let from_a = ids.iter().filter(|&&id| MixtureOrder::decode(id).0 == 0).count() as u64;
        assert!((5..=6).contains(&from_a), "step {step}: {from_a} of 8 from the first corpus (0.7 of 8 = 5.6): {ids:?}");
        totals[0] += from_a;
        totals[1] += 8 - from_a;
        let exact = (*step + 1) as f64 * 8.0 * 0.7;
        assert!((totals[0] as f64 - exact).abs() <= 1.0, "after step {step}: {} from the first corpus, exactly {exact}", totals[0]);
        b_draws.extend(ids.iter().map(|&id| MixtureOrder::decode(id)).filter(|(s, _)| *s == 1).map(|(_, l)| l));
    }
    assert!(b_draws.iter().all(|&l| l < n_b), "every id of the second source is one of its {n_b} sequences");
    assert!(b_draws.len() as u64 > n_b, "the small source ran past its first epoch ({} draws of {n_b})", b_draws.len());
    let first_epoch: Vec<u64> = b_draws.iter().copied().take(n_b as usize).collect();
    let mut dedup = first_epoch.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), n_b as usize, "the second source's first {n_b} draws are each of its sequences once");
    // validation: each source's loss, in the events; the metrics' loss is their weighted mean
    let notes: Vec<String> = c.events(&job.id).into_iter().filter(|e| e.contains("by source")).collect();
    assert_eq!(notes.len(), 3, "evaluations at steps 4, 8 and 12: {notes:?}");
    let parse = |note: &str, name: &str| -> f64 {
        let at = note.find(name).unwrap_or_else(|| panic!("{name} in {note}")) + name.len();
        note[at..].trim_start().split(|c: char| c == ',' || c.is_whitespace()).next().unwrap().parse().unwrap()
    };
    let last = notes.last().unwrap();
    let (la, lb) = (parse(last, a.to_str().unwrap()), parse(last, b.to_str().unwrap()));
    let reported = metrics.iter().rev().find_map(|m| m.val_loss).unwrap() as f64;
    assert!((reported - (0.7 * la + 0.3 * lb)).abs() < 2e-3, "val loss {reported} vs 0.7 x {la} + 0.3 x {lb}");

    // The same job from its step-4 checkpoint as one rank draws steps 4..8 exactly as before.
    let ckpt_root = (0..2).map(|w| dir.join(format!("worker-{w}/jobs/{}/ckpt", job.id))).find(|p| p.exists()).expect("rank 0's checkpoints");
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(&ckpt_root).unwrap().map(|d| d.unwrap().path()).collect();
    ckpts.sort();
    let at4 = ckpts.iter().find(|p| p.file_name().unwrap().to_str().unwrap().trim_start_matches('0') == "4").expect("a step-4 checkpoint").clone();
    c.workers_idle();
    let resumed = c.submit(&spec("mix-resumed", &a, &b, 1, ""), at4.to_str().unwrap());
    let (state, _) = c.follow(&resumed.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&resumed.id).error, c.logs());
    let again = drawn(&c, &resumed.id, 1);
    assert_eq!(again.keys().copied().collect::<Vec<_>>(), (4..12).collect::<Vec<_>>());
    for (step, ids) in &again {
        assert_eq!(ids, &whole[step], "step {step} after the resume");
    }

    // Sources tokenized differently cannot be mixed.
    let chars = prepare(&dir, "chars", &digits, "char");
    let bad = c.submit(&spec("mix-bad", &a, &chars, 1, ""), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&bad.id).error;
    assert!(error.contains("data.mix[1].corpus") && error.contains("share one tokenizer"), "{error}");
}
