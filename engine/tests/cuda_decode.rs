//! The key/value-cache decoder on CUDA against the CUDA forward pass (decode_body/): bf16
//! activations and matmuls, so within bf16 rounding of the logits' spread. Both shapes: the
//! small one, and GPT-2's head width 64 with 130 keys (past a 64-wide tile, where the
//! attention's saved state grows between steps). Skips (prints why) without a GPU.
#![cfg(feature = "cuda")]

mod decode_body;

use decode_body::*;
use smelt_engine::cuda::CudaBackend;

#[test]
fn cuda_decoder_matches_its_forward_pass() {
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
    // the same ops on the same backend, rows in another order: bf16 rounding of values that
    // spread over several units
    every_shape(|| gpu().unwrap(), cfg, &|spread| 0.02 * spread);
    every_shape(|| gpu().unwrap(), cfg_wide, &|spread| 0.02 * spread);
}
