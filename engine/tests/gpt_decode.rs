//! Generation with a key/value cache (`Gpt::decoder`) against the full forward pass: after a
//! prompt and after every token read one at a time, the decoder's logits equal the forward
//! pass's logits at that position, for pre- and post-LN, learned and rotary positions, a
//! vocabulary the LM head pads; reading past the positions is refused and reads nothing. The
//! body (decode_body/) also runs on CUDA: cuda_decode.rs.

mod decode_body;

use decode_body::*;
use smelt_engine::model::{Gpt, GptPositions, LayerNormPlacement};
use smelt_engine::CpuBackend;

#[test]
fn cpu_decoder_matches_the_forward_pass() {
    // the same f32 ops, rows in another order (GEMMs of 1 row and of n sum differently): within
    // ~80 ulps of the largest logit
    every_shape(CpuBackend::new, cfg, &|spread| 1e-5 * spread);
    every_shape(CpuBackend::new, cfg_wide, &|spread| 1e-5 * spread);
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
