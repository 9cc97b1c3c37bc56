//! The body of the key/value-cache decoder tests, one generic fn over `Backend`, run on the
//! CPU (gpt_decode.rs) and on CUDA (cuda_decode.rs).
#![allow(dead_code)]

use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// The small shape: V = 77 pads to 128 rows in the head; head width 6 (rotary turns 3 pairs);
/// T = 21.
pub fn cfg(ln_placement: LayerNormPlacement, positions: GptPositions) -> GptConfig {
    GptConfig { vocab_size: 77, block_size: 21, n_layer: 3, n_head: 4, n_embd: 24, ln_placement, positions }
}

/// GPT-2's head width (64, the width fast attention paths take) and more keys than a 64-wide
/// tile: T = 130, V = 300 (padded to 320).
pub fn cfg_wide(ln_placement: LayerNormPlacement, positions: GptPositions) -> GptConfig {
    GptConfig { vocab_size: 300, block_size: 130, n_layer: 2, n_head: 2, n_embd: 128, ln_placement, positions }
}

/// Weights moved away from init so that attention is far from uniform and every bias matters.
pub fn perturbed_params(cfg: &GptConfig, seed: u64) -> Vec<f32> {
    let model = Gpt::new(CpuBackend::new(), cfg.clone(), seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut params = model.params_host();
    for s in model.table().specs() {
        params[s.range()].iter_mut().for_each(|x| *x += 0.3 * rng.normal() as f32);
    }
    params
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Reads a `prompt`-token prompt, then the rest of a full block one token at a time, checking
/// the logits after each read against one forward pass over the whole block.
/// `tol(spread)`: the largest difference of logits accepted, given how far they spread.
pub fn decode_matches_forward<B: Backend>(be: B, cfg: &GptConfig, prompt: usize, tol: &dyn Fn(f32) -> f32) {
    let params = perturbed_params(cfg, 7);
    let mut model = Gpt::from_params(be, cfg.clone(), &params).unwrap();
    let (t, v) = (cfg.block_size, cfg.vocab_size);
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..t).map(|_| rng.below(v as u64) as u32).collect();
    model.forward(&tokens, None, 1, t).unwrap();
    let want = model.logits(); // (T, V)
    let spread = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(spread > 1.0, "logits of a perturbed model should spread, not {spread}");
    let tol = tol(spread);

    let mut dec = model.decoder();
    assert_eq!((dec.len(), dec.capacity()), (0, t));
    let got = dec.feed(&tokens[..prompt]).unwrap();
    let d = max_abs_diff(&got, &want[(prompt - 1) * v..prompt * v]);
    assert!(d <= tol, "{cfg:?}: after the {prompt}-token prompt the logits differ by {d}");
    for i in prompt..t {
        let got = dec.feed(&tokens[i..i + 1]).unwrap();
        let d = max_abs_diff(&got, &want[i * v..(i + 1) * v]);
        assert!(d <= tol, "{cfg:?}: at position {i} the logits differ by {d} (they spread over {spread})");
    }
    assert_eq!(dec.len(), t);

    // the cache is full: one more token is refused, naming the limit, and nothing is read
    let err = dec.feed(&[0]).unwrap_err().to_string();
    assert!(err.contains(&format!("block_size {t}")), "{err}");
    assert_eq!(dec.len(), t);
    // a token outside the vocabulary is refused too
    dec.clear();
    let err = dec.feed(&[v as u32]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(dec.len(), 0);

    // cleared, it reads a new text from position 0: a piece of several tokens after a
    // prompt is read token by token and ends at the same logits
    let first = dec.feed(&tokens[..2]).unwrap();
    assert!(max_abs_diff(&first, &want[v..2 * v]) <= tol);
    let after = dec.feed(&tokens[2..9]).unwrap();
    let d = max_abs_diff(&after, &want[8 * v..9 * v]);
    assert!(d <= tol, "{cfg:?}: a 7-token piece after the prompt differs by {d}");
}

pub fn every_shape<B: Backend>(be: impl Fn() -> B, shape: fn(LayerNormPlacement, GptPositions) -> GptConfig, tol: &dyn Fn(f32) -> f32) {
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        for positions in [GptPositions::Learned, GptPositions::Rotary] {
            let c = shape(placement, positions);
            // a prompt of one token (every later row from the cache) and of several
            decode_matches_forward(be(), &c, 1, tol);
            decode_matches_forward(be(), &c, 6, tol);
        }
    }
}

