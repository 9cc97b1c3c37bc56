//! Generation with a key/value cache (`Gpt::decoder`) against the full forward pass: after a
//! prompt and after every token read one at a time, the decoder's logits equal the forward
//! pass's logits at that position, for pre- and post-LN, learned and rotary positions, a
//! vocabulary the LM head pads; reading past the positions is refused and reads nothing. One
//! body, run on the CPU and (with the `cuda` feature and a GPU) on CUDA.

use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// V = 77 pads to 128 rows in the head; head width 6 (rotary turns 3 pairs); T = 21.
fn cfg(ln_placement: LayerNormPlacement, positions: GptPositions) -> GptConfig {
    GptConfig { vocab_size: 77, block_size: 21, n_layer: 3, n_head: 4, n_embd: 24, ln_placement, positions }
}

/// Weights moved away from init so that attention is far from uniform and every bias matters.
fn perturbed_params(cfg: &GptConfig, seed: u64) -> Vec<f32> {
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
fn decode_matches_forward<B: Backend>(be: B, cfg: &GptConfig, prompt: usize, tol: f32) {
    let params = perturbed_params(cfg, 7);
    let mut model = Gpt::from_params(be, cfg.clone(), &params).unwrap();
    let (t, v) = (cfg.block_size, cfg.vocab_size);
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..t).map(|_| rng.below(v as u64) as u32).collect();
    model.forward(&tokens, None, 1, t).unwrap();
    let want = model.logits(); // (T, V)
    let spread = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(spread > 1.0, "logits of a perturbed model should spread, not {spread}");

    let mut dec = model.decoder();
    assert_eq!((dec.len(), dec.capacity()), (0, t));
    let got = dec.feed(&tokens[..prompt]).unwrap();
    let d = max_abs_diff(&got, &want[(prompt - 1) * v..prompt * v]);
    assert!(d <= tol, "{cfg:?}: after the {prompt}-token prompt the logits differ by {d}");
    for i in prompt..t {
        let got = dec.feed(&tokens[i..i + 1]).unwrap();
        let d = max_abs_diff(&got, &want[i * v..(i + 1) * v]);
        assert!(d <= tol, "{cfg:?}: at position {i} the logits differ by {d}");
    }
    assert_eq!(dec.len(), t);

    // the cache is full: one more token is refused, naming the limit, and nothing is read
    let err = dec.feed(&[0]).unwrap_err().to_string();
    assert!(err.contains("block_size 21"), "{err}");
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

fn every_shape<B: Backend>(be: impl Fn() -> B, tol: f32) {
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        for positions in [GptPositions::Learned, GptPositions::Rotary] {
            let c = cfg(placement, positions);
            // a prompt of one token (every later row from the cache) and of several
            decode_matches_forward(be(), &c, 1, tol);
            decode_matches_forward(be(), &c, 6, tol);
        }
    }
}

#[test]
fn cpu_decoder_matches_the_forward_pass() {
    // the same f32 ops in another order of rows: within rounding
    every_shape(CpuBackend::new, 2e-5);
}

#[test]
fn a_decoder_of_an_empty_piece_is_an_error() {
    let c = cfg(LayerNormPlacement::Pre, GptPositions::Learned);
    let model = Gpt::from_params(CpuBackend::new(), c.clone(), &perturbed_params(&c, 1)).unwrap();
    let mut dec = model.decoder();
    assert!(dec.feed(&[]).unwrap_err().to_string().contains("no tokens"));
    let err = dec.feed(&[1; 22]).unwrap_err().to_string();
    assert!(err.contains("22 tokens after 0 read exceed"), "{err}");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_decoder_matches_its_forward_pass() {
    use smelt_engine::cuda::CudaBackend;
    let gpu = || match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    };
    if gpu().is_none() {
        return;
    }
    // bf16 activations and matmuls, in another order of rows: within bf16 rounding of logits
    // that spread over several units
    every_shape(|| gpu().unwrap(), 0.15);
}
