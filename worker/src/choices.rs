//! Multiple-choice accuracy as llm.c's `hellaswag.py` computes it for GPT-2 (lm-evaluation-
//! harness differs: it cleans HellaSwag's contexts first and its `acc_norm` divides by an
//! ending's characters, not its tokens): for each example the model reads the context followed
//! by each ending (`" " + ending`, encoded apart from the context, as llm.c does for GPT-2's
//! BPE) and the ending's tokens are scored by their cross-entropy given everything before them.
//! The pick with the lowest summed loss counts for `acc`, the one with the lowest mean loss per
//! token for `acc_norm` (the figure llm.c quotes: GPT-2 124M 29.55%). `smelt eval --choices`
//! reports both; a pretraining job with `train.eval_choices` reports acc_norm at each
//! evaluation.
//!
//! The file is JSON lines in HellaSwag's own fields: `ctx` (a string), `endings` (strings) and
//! `label` (the right ending's index, a number or a string of one). A context and an ending
//! longer than the model's positions lose the context's first tokens; an ending that alone
//! leaves no context token is refused, naming its line.

use anyhow::{anyhow, bail, Result};
use smelt_corpus::Tokenizer;
use smelt_engine::backend::{Backend, IGNORE_INDEX};
use smelt_engine::collective::Collective;
use smelt_engine::model::Gpt;

/// One multiple-choice question, its line number kept for errors.
pub struct Example {
    pub line: usize,
    pub ctx: String,
    pub endings: Vec<String>,
    pub label: usize,
}

/// Parses HellaSwag-style JSON lines (`shown` names the file in errors: "--choices x.jsonl");
/// blank lines are skipped.
pub fn parse_examples(text: &str, shown: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: String| anyhow!("{shown}, line {line_no}: {what}");
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| at(format!("not JSON ({e})")))?;
        let ctx = v.get("ctx").and_then(|x| x.as_str()).ok_or_else(|| at("no string field \"ctx\"".into()))?;
        let endings: Vec<String> = v
            .get("endings")
            .and_then(|x| x.as_array())
            .ok_or_else(|| at("no list field \"endings\"".into()))?
            .iter()
            .map(|e| e.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| at("\"endings\" holds something that is not a string".into()))?;
        if endings.len() < 2 {
            return Err(at(format!("{} endings: a choice needs at least two", endings.len())));
        }
        let label = match v.get("label") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        }
        .ok_or_else(|| at("\"label\" must be the right ending's index (a number or a string of one)".into()))?;
        if label as usize >= endings.len() {
            return Err(at(format!("label {label} is not an index of its {} endings", endings.len())));
        }
        out.push(Example { line: line_no, ctx: ctx.to_string(), endings, label: label as usize });
    }
    if out.is_empty() {
        bail!("{shown}: no examples");
    }
    Ok(out)
}

/// Per ending of one example: the summed and the mean cross-entropy of its tokens.
pub struct Scored {
    pub sum: Vec<f64>,
    pub mean: Vec<f64>,
}

impl Scored {
    fn argmin(x: &[f64]) -> usize {
        x.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
    }
    pub fn pick(&self) -> usize {
        Self::argmin(&self.sum)
    }
    pub fn pick_norm(&self) -> usize {
        Self::argmin(&self.mean)
    }
}

/// An example encoded for one model: per ending, the row `ctx + " " + ending` cut to its last
/// `max_inputs + 1` tokens, and how many of its last tokens are the ending's.
pub struct Encoded {
    pub line: usize,
    pub label: usize,
    rows: Vec<(Vec<u32>, usize)>,
}

/// Encodes `examples` with the model's tokenizer, each row at most `max_inputs` inputs (the
/// model's positions, or a job's `seq_len`): every way an example cannot be scored is found
/// here, naming its line, before anything is scored.
pub fn encode(examples: &[Example], tokenizer: &Tokenizer, max_inputs: usize, shown: &str) -> Result<Vec<Encoded>> {
    examples
        .iter()
        .map(|ex| {
            let at = |what: String| anyhow!("{shown}, line {}: {what}", ex.line);
            let ctx = tokenizer.encode(&ex.ctx).map_err(|e| at(format!("the context is not in the model's {} vocabulary: {e}", tokenizer.kind())))?;
            if ctx.is_empty() {
                return Err(at("the context is empty: an ending's first token has nothing to follow".into()));
            }
            let mut rows = Vec::with_capacity(ex.endings.len());
            for (k, ending) in ex.endings.iter().enumerate() {
                let end = tokenizer
                    .encode(&format!(" {ending}"))
                    .map_err(|e| at(format!("ending {k} is not in the model's {} vocabulary: {e}", tokenizer.kind())))?;
                if end.is_empty() {
                    return Err(at(format!("ending {k} encodes to no tokens: it cannot be scored")));
                }
                if end.len() > max_inputs {
                    return Err(at(format!("ending {k} is {} tokens: more than the {max_inputs} positions scored after one context token", end.len())));
                }
                let row: Vec<u32> = ctx.iter().chain(&end).copied().collect();
                rows.push((row[row.len().saturating_sub(max_inputs + 1)..].to_vec(), end.len()));
            }
            Ok(Encoded { line: ex.line, label: ex.label, rows })
        })
        .collect()
}

/// Scores every ending of `ex`, at most `max_rows` endings per forward pass (a job scores in
/// its micro-batch, so the eval never grows the model's buffers past training's): a row per
/// ending, shorter rows padded on the right (causal attention: padding after a row's tokens
/// cannot change them); each position's loss counts only on the ending's targets, summed per
/// row in f64.
pub fn score<B: Backend>(model: &mut Gpt<B>, ex: &Encoded, max_rows: usize, shown: &str) -> Result<Scored> {
    let at = |what: String| anyhow!("{shown}, line {}: {what}", ex.line);
    let (mut sum, mut mean) = (Vec::new(), Vec::new());
    for rows in ex.rows.chunks(max_rows.max(1)) {
        let t = rows.iter().map(|(r, _)| r.len() - 1).max().expect("a chunk has rows");
        let (mut inputs, mut targets) = (Vec::with_capacity(rows.len() * t), Vec::with_capacity(rows.len() * t));
        for (row, end) in rows {
            // inputs row[..n], targets row[1..]: the ending's tokens are the last `end` targets
            let n = row.len() - 1;
            inputs.extend(row[..n].iter().copied().chain(std::iter::repeat_n(0, t - n)));
            targets.extend((0..t).map(|i| if i < n && i + end >= n { row[i + 1] } else { IGNORE_INDEX }));
        }
        model.forward(&inputs, Some(&targets), rows.len(), t).map_err(|e| at(e.to_string()))?;
        let losses = model.losses();
        for (k, (_, end)) in rows.iter().enumerate() {
            let s: f64 = losses[k * t..(k + 1) * t].iter().map(|&x| x as f64).sum();
            if !s.is_finite() {
                return Err(at(format!("ending {}'s loss is {s}", sum.len())));
            }
            sum.push(s);
            mean.push(s / *end as f64);
        }
    }
    Ok(Scored { sum, mean })
}

/// Right picks over a set of examples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub examples: usize,
    /// By the lowest summed loss (`acc`).
    pub right: usize,
    /// By the lowest mean loss per token (`acc_norm`).
    pub right_norm: usize,
}

impl Tally {
    pub fn add(&mut self, s: &Scored, label: usize) {
        self.examples += 1;
        self.right += usize::from(s.pick() == label);
        self.right_norm += usize::from(s.pick_norm() == label);
    }
    pub fn acc(&self) -> f64 {
        self.right as f64 / self.examples.max(1) as f64
    }
    pub fn acc_norm(&self) -> f64 {
        self.right_norm as f64 / self.examples.max(1) as f64
    }
}

/// Scores `examples` and counts the right picks.
pub fn tally<'a, B: Backend>(model: &mut Gpt<B>, examples: impl IntoIterator<Item = &'a Encoded>, max_rows: usize, shown: &str) -> Result<Tally> {
    let mut t = Tally::default();
    for ex in examples {
        t.add(&score(model, ex, max_rows, shown)?, ex.label);
    }
    Ok(t)
}

/// Every rank's tally summed (each rank scored its share of the examples): through the job's
/// collective, as a mean of the three counts times the world size (exact: counts far below
/// 2^24).
pub fn sum_over_ranks<B: Backend>(mine: Tally, be: &B, collective: &mut dyn Collective<B>) -> Result<Tally> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(mine);
    }
    let mut buf = be.upload(&[mine.examples as f32, mine.right as f32, mine.right_norm as f32]);
    collective.all_reduce_mean(be, be.view_mut(&mut buf, 0..3)).map_err(|e| anyhow!("summing the multiple-choice counts over the ranks: {e}"))?;
    let v = be.download(be.view(&buf, 0..3));
    let count = |x: f32| (x as f64 * world as f64).round() as usize;
    Ok(Tally { examples: count(v[0]), right: count(v[1]), right_norm: count(v[2]) })
}

/// The examples (the first `max`, 0: all) of a local path or an object-store URI, encoded for
/// `tokenizer` with at most `max_inputs` inputs a row, and how errors name them: `what` (the
/// option or field that gave the location, e.g. `train.eval_choices`) and the location.
pub fn load(what: &str, location: &str, max: usize, tokenizer: &Tokenizer, max_inputs: usize) -> Result<(Vec<Encoded>, String)> {
    let shown = format!("{what} {location}");
    let bytes = crate::finetune_data::read_location(location).map_err(|e| anyhow!("{shown}: {e:#}"))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow!("{shown}: not UTF-8 text ({e})"))?;
    let mut examples = parse_examples(&text, &shown)?;
    if max > 0 {
        examples.truncate(max);
    }
    let encoded = encode(&examples, tokenizer, max_inputs, &shown)?;
    Ok((encoded, shown))
}
