//! `Gpt::backward_overlapped` reports each range of the flat gradient as soon as it is final:
//! the ranges cover the table exactly once, and what a range holds when it is reported is what
//! it holds at the end of the pass (so averaging it early, while the pass goes on, is sound).
//! Pre-LN and post-LN (and rotary positions: no position table), with gradient accumulation
//! onto an earlier micro-batch's gradients.

use std::ops::Range;

use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::CpuBackend;

fn tokens(n: usize, vocab: u32, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % vocab).collect()
}

#[test]
fn reported_ranges_are_final_and_cover_the_table_once() {
    let cases = [
        (LayerNormPlacement::Pre, GptPositions::Learned),
        (LayerNormPlacement::Post, GptPositions::Learned),
        (LayerNormPlacement::Pre, GptPositions::Rotary),
    ];
    for (ln, positions) in cases {
        let cfg = GptConfig { vocab_size: 37, block_size: 12, n_layer: 3, n_head: 2, n_embd: 16, ln_placement: ln, positions };
        let mut gpt = Gpt::new(CpuBackend, cfg, 3).unwrap();
        let (b, t) = (2, 12);
        let total = gpt.table().total();
        gpt.zero_grad();
        // an earlier micro-batch's gradients, to accumulate onto
        let x = tokens(b * t + 1, 37, 1);
        gpt.forward(&x[..b * t], Some(&x[1..]), b, t).unwrap();
        gpt.backward(0.5).unwrap();
        let y = tokens(b * t + 1, 37, 99);
        gpt.forward(&y[..b * t], Some(&y[1..]), b, t).unwrap();
        let mut reported: Vec<(Range<usize>, Vec<f32>)> = Vec::new();
        gpt.backward_overlapped(0.5, &mut |be, grads, r| {
            reported.push((r.clone(), be.download(be.view(grads, r))));
        })
        .unwrap();
        let grads = gpt.grads_host();
        let mut seen = vec![0u8; total];
        for (r, at_report) in &reported {
            for i in r.clone() {
                seen[i] += 1;
            }
            assert_eq!(at_report.as_slice(), &grads[r.clone()], "{ln:?}: range {r:?} changed after it was reported");
        }
        assert!(seen.iter().all(|&c| c == 1), "{ln:?}: ranges {:?} do not cover 0..{total} once", reported.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
        // ln_f first, the blocks from the last, the embeddings last
        assert_eq!(reported.len(), 1 + 3 + 1, "{ln:?}");
        assert_eq!(reported.last().unwrap().0.start, 0, "{ln:?}: the embeddings (with the tied head) come last");
        assert!(reported.windows(2).skip(1).all(|w| w[1].0.end == w[0].0.start), "{ln:?}: blocks arrive last to first, adjacent");
        assert!(grads.iter().any(|g| *g != 0.0));
    }
}
