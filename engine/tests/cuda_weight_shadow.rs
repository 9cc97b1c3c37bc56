//! The bf16 weight shadows of the CUDA backend (engine/src/cuda/shadow.rs) change no result:
//! GPT training steps give bitwise the same losses, gradients and parameters with the shadows on
//! and off, and a matmul after any write to its weight buffer (view_mut + write, fill, copy,
//! split_mut, a new buffer at a reused address) reads the new values. Skips (prints why) without
//! a GPU.
#![cfg(feature = "cuda")]

mod op_buffers;
use op_buffers::{randn};
use smelt_engine::backend::{Backend, MatmulShape, WeightLayout, IGNORE_INDEX};
use smelt_engine::cuda::{CudaBackend, CudaOptions, MatmulPrecision, ShadowStats};
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::optim::{AdamW, AdamWConfig};
use smelt_engine::rng::Rng;

/// A bf16 backend with the shadows on or off, or `None` (after printing why) without a GPU.
fn gpu(shadow: bool) -> Option<CudaBackend> {
    match CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }) {
        // the switches that trade bitwise repeatability for speed stay off: this file compares
        // runs bit for bit
        Ok(be) => Some(be.with_weight_shadow(shadow).with_fused_attention_backward(false).with_lt_autotune(false)),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    }
}

/// Bitwise equality (NaNs included), naming the first difference.
fn assert_bits_eq(what: &str, on: &[f32], off: &[f32]) {
    assert_eq!(on.len(), off.len(), "{what}: lengths differ");
    if let Some(i) = (0..on.len()).find(|&i| on[i].to_bits() != off[i].to_bits()) {
        panic!("{what}: element {i} differs: shadow on {} vs off {}", on[i], off[i]);
    }
}

// ---- GPT training steps -------------------------------------------------------------------------

/// V = 300 is not a multiple of 8: the LM head takes the padded path (its rows are copied from
/// the shadow into the scratch).
fn gpt_cfg() -> GptConfig {
    GptConfig { vocab_size: 300, block_size: 80, n_layer: 2, n_head: 4, n_embd: 64, ln_placement: LayerNormPlacement::Pre, positions: Default::default() }
}

/// What each training step produced, in order, and the final parameters.
struct Run {
    losses: Vec<f32>,
    grads: Vec<Vec<f32>>,
    params: Vec<f32>,
    stats: ShadowStats,
}

fn train(be: CudaBackend, steps: u64) -> Run {
    let cfg = gpt_cfg();
    let (b, t) = (3, 70);
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|i| if i % 9 == 4 { IGNORE_INDEX } else { rng.below(cfg.vocab_size as u64) as u32 })
        .collect();
    let mut model = Gpt::new(be, cfg, 7).unwrap();
    let mut opt = AdamW::new(model.backend(), model.table(), AdamWConfig::default()).unwrap();
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    for step in 0..steps {
        model.zero_grad();
        losses.push(model.forward(&tokens, Some(&targets), b, t).unwrap().unwrap());
        model.backward(1.0).unwrap();
        model.backend().synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
        grads.push(model.grads_host());
        let (be, _, params, g) = model.params_and_grads();
        opt.step(be, params, g, 1e-3, step).unwrap();
    }
    model.backend().synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    Run { losses, grads, params: model.params_host(), stats: model.backend().weight_shadow_stats() }
}

#[test]
fn gpt_steps_are_bitwise_equal_with_and_without_shadows() {
    let (Some(on), Some(off)) = (gpu(true), gpu(false)) else { return };
    // Step 0's first matmuls convert their weights; the shadow is made once the reads cover the
    // buffer (within step 0), and AdamW keeps it valid from then on.
    let steps = 5;
    let (a, b) = (train(on, steps), train(off, steps));
    println!("shadow on: {:?}; losses {:?}", a.stats, a.losses);
    assert_bits_eq("losses", &a.losses, &b.losses);
    for (s, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
        assert_bits_eq(&format!("step {s} gradients"), ga, gb);
    }
    assert_bits_eq("parameters after the last step", &a.params, &b.params);
    assert_eq!(b.stats, ShadowStats::default(), "shadows were used although turned off");
    assert!(a.stats.made >= 1, "no shadow was made: {:?}", a.stats);
    assert!(a.stats.fused >= steps - 1, "AdamW did not keep the shadow valid: {:?}", a.stats);
    assert!(a.stats.hits > 0, "no matmul read a shadow: {:?}", a.stats);
}

// ---- writes to a shadowed buffer ----------------------------------------------------------------

/// Two weights in one buffer, the second at an odd offset (its shadow view is not 16-byte
/// aligned) with OC = 37 (padded rows), plus spare room that copies come from.
const N: usize = 24;
const IC: usize = 64;
const OC1: usize = 48;
const OC2: usize = 37;
const W1: std::ops::Range<usize> = 0..IC * OC1;
const W2: std::ops::Range<usize> = IC * OC1 + 3..IC * OC1 + 3 + OC2 * IC;
const LEN: usize = W2.end + 5;

/// Four matmuls over each weight (enough reads for a shadow at the next generation), forward
/// and backward; every output downloaded.
fn read_weights(be: &CudaBackend, w: &<CudaBackend as Backend>::Buf, x: &<CudaBackend as Backend>::Buf, outs: &mut Vec<Vec<f32>>) {
    let s1 = MatmulShape { rows: N, in_features: IC, out_features: OC1, layout: WeightLayout::InOut };
    let s2 = MatmulShape { rows: N, in_features: IC, out_features: OC2, layout: WeightLayout::OutIn };
    for (range, s) in [(W1, s1), (W2, s2)] {
        for _ in 0..2 {
            let mut out = be.zeros(N * s.out_features);
            be.matmul_forward(be.view_mut(&mut out, 0..N * s.out_features), be.view(x, 0..N * IC), be.view(w, range.clone()), None, s);
            outs.push(be.download(be.view(&out, 0..N * s.out_features)));
            let dout = be.upload(&randn(5, N * s.out_features, 1.0));
            let (mut dinp, mut dw) = (be.zeros(N * IC), be.zeros(range.len()));
            be.matmul_backward(
                Some(be.view_mut(&mut dinp, 0..N * IC)),
                be.view_mut(&mut dw, 0..range.len()),
                None,
                be.view(&dout, 0..N * s.out_features),
                be.view(x, 0..N * IC),
                be.view(w, range.clone()),
                s,
            );
            outs.push(be.download(be.view(&dinp, 0..N * IC)));
        }
    }
}

/// Reads, writes the weights one way, reads again, ... Returns every output in order.
fn reads_across_writes(be: &CudaBackend) -> Vec<Vec<f32>> {
    let x = be.upload(&randn(1, N * IC, 1.0));
    let mut w = be.upload(&randn(2, LEN, 0.1));
    let mut outs = Vec::new();
    // Rounds 0 and 1 read the first generation (the shadow is made at its 4th read, in round 0);
    // it is remade at the first read after each kind of write (rounds 2 to 5).
    read_weights(be, &w, &x, &mut outs);
    read_weights(be, &w, &x, &mut outs);
    be.write(be.view_mut(&mut w, 0..LEN), &randn(3, LEN, 0.1));
    read_weights(be, &w, &x, &mut outs);
    be.fill(be.view_mut(&mut w, W1.start + 100..W1.end - 100), 0.25);
    read_weights(be, &w, &x, &mut outs);
    let other = be.upload(&randn(4, W2.len(), 0.1));
    be.copy(be.view_mut(&mut w, W2), be.view(&other, 0..W2.len()));
    read_weights(be, &w, &x, &mut outs);
    {
        let [a, b] = be.split_mut(&mut w, [W1.start..W1.start + 10, W2.end - 10..W2.end]);
        be.write(a, &[1.0; 10]);
        be.write(b, &[-1.0; 10]);
    }
    read_weights(be, &w, &x, &mut outs);
    // A new buffer, likely at the freed one's address: a new id, so the old shadow is not read
    // (rounds 6 and 7).
    drop(w);
    let w = be.upload(&randn(6, LEN, 0.1));
    read_weights(be, &w, &x, &mut outs);
    read_weights(be, &w, &x, &mut outs);
    be.synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    outs
}

#[test]
fn matmuls_see_every_write_to_a_shadowed_buffer() {
    let (Some(on), Some(off)) = (gpu(true), gpu(false)) else { return };
    let (a, b) = (reads_across_writes(&on), reads_across_writes(&off));
    let stats = on.weight_shadow_stats();
    println!("shadow on: {stats:?}");
    assert_eq!(a.len(), b.len());
    for (i, (oa, ob)) in a.iter().zip(&b).enumerate() {
        assert_bits_eq(&format!("output {i}"), oa, ob);
    }
    // Each write changed what the matmuls return (the test would not notice a stale read else).
    let per_round = a.len() / 8;
    let round = |r: usize| &a[r * per_round..(r + 1) * per_round];
    for r in 1..6 {
        assert_ne!(round(r + 1), round(r), "the write after round {r} changed nothing");
    }
    // Round 0 converts its first reads and reads the shadow after; round 1 reads the shadow only.
    assert_eq!(round(0), round(1));
    assert!(stats.made >= 6, "shadows made: {stats:?}");
    assert!(stats.hits > 0, "{stats:?}");
}
