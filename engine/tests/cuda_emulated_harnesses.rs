//! The CUDA kernels with block-level cooperation (attention, learned-score attention,
//! LayerNorm, the classifier's cross-entropy, the embedding backward, column sums, AdamW) run
//! under the host emulator by their harnesses in tools/cuda_emu, each against references written
//! in the harness (f64 sums, and the CPU's formulas where a kernel claims to be bitwise them).
//! On any machine with g++, so in CI, where there is no GPU for the cuda_*.rs tests; a harness
//! exits with its failure count. The slow harnesses run a subset of their cases chosen to cover
//! every code path (named below); with no arguments each runs all of them, as a person
//! changing a kernel should (see each harness's header).

mod emulator;

use emulator::{run_harness, STRICT};

/// The harnesses built as their headers say, without the alignment sanitizer (their vector types
/// are not declared with CUDA's alignment, so it would see nothing; they check indexing, masks
/// and fragment layouts).
const PLAIN: &[&str] = &[];

#[test]
fn adamw_bitwise_with_and_without_the_bf16_shadow() {
    run_harness("adamw_emu.cpp", STRICT, &[]);
}

#[test]
fn column_sums_vector_kernels_bitwise_the_scalar_ones() {
    run_harness("colsum_emu.cpp", STRICT, &[]);
}

#[test]
fn embedding_backward_bitwise_the_cpu_order() {
    run_harness("embedding_emu.cpp", PLAIN, &[]);
}

/// Every vocabulary of the harness: GPT-2's (50,257 and 50,304), BERT's, T5's, tiny and odd ones.
#[test]
fn cross_entropy_and_the_fused_classifier() {
    run_harness("cross_entropy_emu.cpp", STRICT, &[]);
}

/// C = 7 (the scalar path), 100 (a last group only some lanes hold), 768 (the vector path at
/// GPT-2's width) and 1030 (the two-pass backward above 1024), forward and backward.
#[test]
fn layernorm_forward_and_backward_on_every_path() {
    run_harness("layernorm_emu.cpp", STRICT, &["7", "100", "768", "1030"]);
}

/// A general-score case (bidirectional, padded keys, an odd head width) and an additive one
/// (cross-attention, padded keys), each in f32 and bf16, accumulating and overwriting.
#[test]
fn learned_score_attention_general_and_additive() {
    run_harness("learned_scores_emu.cpp", PLAIN, &["general packed bidirectional masked hd33", "additive split cross"]);
}

/// The f32 flash kernels, every case (causal, bidirectional, cross, padded keys, head widths 20
/// to 128 and an odd one).
#[test]
fn attention_f32_kernels() {
    run_harness("attention_emu.cpp", PLAIN, &[]);
}

/// The tensor-core kernels as the engine runs them by default: bf16 activations, q, k, v and dout
/// read in place, the backward as a dkv and a dq pass.
#[test]
fn attention_bf16_kernels_in_place() {
    run_harness("attention_emu.cpp", PLAIN, &["direct"]);
}

/// The tensor-core kernels on f32 activations (SMELT_BF16_ACTIVATIONS=0): q, k, v and dout
/// through head-major bf16 copies, f32 outputs and gradients.
#[test]
fn attention_bf16_kernels_on_f32_activations() {
    run_harness("attention_emu.cpp", PLAIN, &["bf16"]);
}

/// The one-pass backward (SMELT_ATTN_FUSED_BWD=1) with dq by bulk reductions, as on sm_90.
#[test]
fn attention_fused_backward_bulk_reductions() {
    run_harness("attention_emu.cpp", PLAIN, &["fused"]);
}

/// The one-pass backward with dq by vector atomics (SMELT_ATTN_DQ_BULK=0).
#[test]
fn attention_fused_backward_vector_atomics() {
    run_harness("attention_emu.cpp", &["-DSMELT_ATTN_DQ_BULK=0"], &["fused"]);
}

/// The Hopper kernels (SMELT_ATTN_WGMMA=1: forward, dkv and dq passes on wgmma, core-matrix
/// tiles read by descriptor) in place, as an H100 would run them; the emulated wgmma decodes
/// each descriptor as the PTX ISA's no-swizzle canonical layouts define it.
#[test]
fn attention_wgmma_kernels_in_place() {
    run_harness("attention_emu.cpp", PLAIN, &["wgmma"]);
}

/// The Hopper kernels on head-major copies (head dims that are no kernel width).
#[test]
fn attention_wgmma_kernels_on_copies() {
    run_harness("attention_emu.cpp", PLAIN, &["wgmmacopies"]);
}
