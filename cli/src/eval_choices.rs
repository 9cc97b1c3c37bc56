//! `smelt eval --choices FILE`: multiple-choice accuracy (acc and acc_norm, as llm.c reports
//! HellaSwag for GPT-2; the scoring is `smelt_worker::choices`), with progress, a JSON result
//! and each example's losses in `--log-samples`.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use smelt_corpus::Tokenizer;
use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_worker::choices::{load, score, Tally};
use tracing::info;

use crate::local_device::OnBackend;

/// Every example of `path` scored on whichever backend `--device` gives: prints acc and
/// acc_norm (JSON with `json`), and writes each example's losses and picks to `log` as JSON
/// lines when given.
pub struct ChoiceEval<'a> {
    pub cfg: GptConfig,
    pub params: &'a [f32],
    pub tokenizer: &'a Tokenizer,
    pub file: &'a str,
    pub path: &'a str,
    /// Score at most this many examples (0: all).
    pub max: usize,
    pub json: bool,
    pub log: Option<&'a str>,
}

impl OnBackend for ChoiceEval<'_> {
    type Out = ();

    fn run<B: Backend>(self, be: B) -> Result<()> {
        let ChoiceEval { cfg, params, tokenizer, file, path, max, json, log } = self;
        let mut model = Gpt::from_params(be, cfg, params)?;
        run(&mut model, tokenizer, file, path, max, json, log)
    }
}

fn run<B: Backend>(model: &mut Gpt<B>, tokenizer: &Tokenizer, file: &str, path: &str, max: usize, json: bool, log: Option<&str>) -> Result<()> {
    let block = model.config().block_size;
    let (examples, shown) = load("--choices", path, max, tokenizer, block)?;
    let mut log = match log {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating --log-samples {p}"))?)),
        None => None,
    };
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut next_report = examples.len() / 10;
    for ex in &examples {
        // every ending of an example in one forward pass
        let s = score(model, ex, usize::MAX, &shown)?;
        tally.add(&s, ex.label);
        if let Some(w) = log.as_mut() {
            let row = serde_json::json!({
                "line": ex.line, "label": ex.label, "pred": s.pick(), "pred_norm": s.pick_norm(),
                "sum_loss": s.sum, "mean_loss": s.mean,
            });
            writeln!(w, "{row}")?;
        }
        let done = tally.examples;
        if done >= next_report.max(1) && done < examples.len() {
            let secs = started.elapsed().as_secs_f64();
            info!(examples = done, of = examples.len(), acc_norm = tally.acc_norm(), examples_per_s = done as f64 / secs.max(1e-9), "evaluating");
            next_report = done + examples.len() / 10;
        }
    }
    if let Some(mut w) = log {
        w.flush()?;
    }
    let Tally { examples: n, right, right_norm } = tally;
    let (acc, acc_norm) = (tally.acc(), tally.acc_norm());
    if json {
        let v = serde_json::json!({
            "model": file, "data": path, "tokenizer": tokenizer.kind(), "examples": n,
            "acc": acc, "acc_norm": acc_norm, "right": right, "right_norm": right_norm,
        });
        println!("{v}");
    } else {
        println!("{file}: acc {acc:.4} ({right}/{n}), acc_norm {acc_norm:.4} ({right_norm}/{n}) on the multiple choices of {path}");
    }
    Ok(())
}
