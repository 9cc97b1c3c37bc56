//! `smelt bench step --arch bert|t5`: full training steps (forward, backward, AdamW) of BERT
//! (masked LM) and T5 (a span-denoising shape) on random tokens, shaped like the Hugging Face
//! peers in ../shared/anchors/torch_family.py so the two can be compared in one device call:
//! - BERT: `bert-base` without the next-sentence head (HF `BertForMaskedLM`), (B, T) random
//!   tokens, 15% of positions carry their own token as the MLM target (the peer's
//!   `lab[m] = x[m]`), no padding;
//! - T5: `t5-small`, (B, Te) random encoder tokens, (B, Td) random labels, decoder inputs the
//!   labels shifted right behind start id 0 (what HF does with `labels`), no padding.
//!
//! Tokens per second count input tokens, as the peer does: B*T for BERT, B*Te (encoder) for T5.

use anyhow::{bail, Result};
use smelt_engine::backend::{Backend, ScoreKind, IGNORE_INDEX};
use smelt_engine::model::{Bert, BertBatch, BertConfig, T5Batch, T5Config, T5};
use smelt_engine::optim::{AdamW, AdamWConfig};
use smelt_engine::rng::Rng;

use crate::cmd_bench::{time_loop, StepArgs, Timed};

/// Random batches cycled through, so the host's RNG stays out of the timed steps.
const BATCHES: usize = 4;
/// The peer's learning rate (any constant does: the bench times steps, not learning).
const LR: f32 = 1e-4;
/// Share of BERT positions that are MLM targets.
const MLM_RATE: u64 = 15;

/// What a timed step reads and advances: the model, the batches it cycles through, the step.
struct Family<M, X> {
    model: M,
    batches: Vec<X>,
    step: u64,
}

/// `--scores` (checked by clap against the three names).
fn score_kind(a: &StepArgs) -> ScoreKind {
    match a.scores.as_deref() {
        Some("general") => ScoreKind::General,
        Some("additive") => ScoreKind::Additive,
        _ => ScoreKind::Dot,
    }
}

pub(crate) fn run_bert<B: Backend>(be: B, a: &StepArgs, after_warmup: impl FnOnce(&B), after: impl FnOnce(&B)) -> Result<Timed> {
    let mut cfg = BertConfig::preset(&a.preset())?;
    // HF BertForMaskedLM has neither the pooler nor the next-sentence head.
    cfg.nsp = false;
    cfg.num_labels = 0;
    if let Some(v) = a.vocab {
        cfg.vocab_size = v;
    }
    if let Some(p) = a.dropout {
        cfg.dropout = p;
    }
    cfg.scores = score_kind(a);
    cfg.validate()?;
    let (b, t) = (a.batch, a.seq);
    if b == 0 || t == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    if t > cfg.max_positions {
        bail!("--seq {t} exceeds the preset's max_positions {}", cfg.max_positions);
    }
    let mut rng = Rng::new(0);
    let v = cfg.vocab_size as u64;
    let batches: Vec<BertBatch> = (0..BATCHES)
        .map(|_| {
            let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
            let targets = tokens.iter().map(|&id| if rng.below(100) < MLM_RATE { id } else { IGNORE_INDEX }).collect();
            // a training pass: the config's dropout (if any) acts, as in the peer's train mode
            BertBatch { mlm_targets: Some(targets), train: true, ..BertBatch::new(tokens, b, t) }
        })
        .collect();
    let model = Bert::new(be, cfg.clone(), 0)?;
    let mut opt = AdamW::new(model.backend(), model.table(), AdamWConfig::default())?;
    let params = model.table().numel();
    let mut f = Family { model, batches, step: 0 };
    let secs = time_loop(&mut f, |f| f.model.backend(), a.warmup, a.steps, after_warmup, after, |f| {
        let x = &mut f.batches[f.step as usize % BATCHES];
        x.dropout_seed = f.step; // fresh masks every step
        f.model.zero_grad();
        let loss = f.model.forward(x)?.expect("the batch has MLM targets");
        f.model.backend().synchronize()?;
        if !loss.is_finite() {
            bail!("step {}: loss {loss} is not finite", f.step);
        }
        f.model.backward(1.0)?;
        let (be, _, p, g) = f.model.params_and_grads();
        opt.step(be, p, g, LR, f.step)?;
        f.step += 1;
        Ok(())
    })?;
    let (vocab_size, head_rows) = (cfg.vocab_size, cfg.head_rows());
    Ok(Timed { params, vocab_size, head_rows, flops_per_token: cfg.flops_per_token(t), tokens_per_step: (b * t) as f64, secs })
}

pub(crate) fn run_t5<B: Backend>(be: B, a: &StepArgs, after_warmup: impl FnOnce(&B), after: impl FnOnce(&B)) -> Result<Timed> {
    let mut cfg = T5Config::preset(&a.preset())?;
    if let Some(v) = a.vocab {
        cfg.vocab_size = v;
    }
    cfg.scores = score_kind(a);
    cfg.validate()?;
    let (b, te, td) = (a.batch, a.seq, a.dec_seq());
    if b == 0 || te == 0 || td == 0 {
        bail!("--batch, --seq and --dec-seq must be at least 1");
    }
    for (flag, len) in [("--seq", te), ("--dec-seq", td)] {
        if len > cfg.max_positions {
            bail!("{flag} {len} exceeds the preset's max_positions {}", cfg.max_positions);
        }
    }
    let mut rng = Rng::new(0);
    let v = cfg.vocab_size as u64;
    let batches: Vec<T5Batch> = (0..BATCHES)
        .map(|_| {
            let enc_tokens: Vec<u32> = (0..b * te).map(|_| rng.below(v) as u32).collect();
            let labels: Vec<u32> = (0..b * td).map(|_| rng.below(v) as u32).collect();
            // decoder input = [start 0, labels[..Td-1]] per row
            let dec_tokens = labels.chunks(td).flat_map(|row| std::iter::once(0).chain(row[..td - 1].iter().copied())).collect();
            T5Batch { batch: b, enc_len: te, dec_len: td, enc_tokens, dec_tokens, targets: Some(labels), ..Default::default() }
        })
        .collect();
    let model = T5::new(be, cfg.clone(), 0)?;
    let mut opt = AdamW::new(model.backend(), model.table(), AdamWConfig::default())?;
    let params = model.table().numel();
    let mut f = Family { model, batches, step: 0 };
    let secs = time_loop(&mut f, |f| f.model.backend(), a.warmup, a.steps, after_warmup, after, |f| {
        let x = &f.batches[f.step as usize % BATCHES];
        f.model.zero_grad();
        let loss = f.model.forward(x)?.expect("the batch has targets");
        f.model.backend().synchronize()?;
        if !loss.is_finite() {
            bail!("step {}: loss {loss} is not finite", f.step);
        }
        f.model.backward(1.0)?;
        let (be, _, p, g) = f.model.params_and_grads();
        opt.step(be, p, g, LR, f.step)?;
        f.step += 1;
        Ok(())
    })?;
    let (vocab_size, head_rows) = (cfg.vocab_size, cfg.head_rows());
    Ok(Timed { params, vocab_size, head_rows, flops_per_token: cfg.flops_per_input_token(te, td), tokens_per_step: (b * te) as f64, secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_base_flops_match_a_hand_count() {
        // BERT-base at T = 512: per token 12 * (4*768^2 + 2*768*3072 + 2*768*512) + 768^2
        // + 768*30522 MACs = 12 * 7,864,320 + 589,824 + 23,440,896 = 118,402,560; x6 = 710.4 MFLOP.
        let cfg = BertConfig::preset("bert-base").unwrap();
        assert_eq!(cfg.flops_per_token(512), 6.0 * 118_402_560.0);
    }

    #[test]
    fn t5_flops_reduce_to_the_encoder_plus_scaled_decoder() {
        let cfg = T5Config::preset("t5-small").unwrap();
        let (c, f, v) = (512.0, 2048.0, 32128.0);
        let enc = 6.0 * (4.0 * c * c + 2.0 * c * f + 2.0 * c * 512.0) + 6.0 * 2.0 * c * c;
        let dec = 6.0 * (6.0 * c * c + 2.0 * c * 114.0 + 2.0 * c * 512.0 + 2.0 * c * f) + c * v;
        let want = 6.0 * (enc + dec * 114.0 / 512.0);
        assert!((cfg.flops_per_input_token(512, 114) - want).abs() < 1e-6 * want);
        // Td = Te: decoder work per token counts in full
        let same = cfg.flops_per_input_token(64, 64);
        let dec64 = 6.0 * (6.0 * c * c + 2.0 * c * 64.0 + 2.0 * c * 64.0 + 2.0 * c * f) + c * v;
        let enc64 = 6.0 * (4.0 * c * c + 2.0 * c * f + 2.0 * c * 64.0) + 6.0 * 2.0 * c * c;
        assert!((same - 6.0 * (enc64 + dec64)).abs() < 1e-6 * same);
    }
}
