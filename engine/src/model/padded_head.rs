//! An LM head over the vocabulary rounded up (llm.c's `padded_vocab_size`): the tied token
//! table keeps its Hugging Face shape (V, C) and is followed in the flat buffers by
//! `(Vp - V) * C` spare values (`ParamSpec::spare`, zero for good), so the head's GEMMs run
//! over Vp rows. cuBLAS's fast bf16 kernels need the GEMM's own m to be a round number, not
//! only its leading dimensions: at GPT-2's 50,257 the head's GEMMs ran ~3x slower on an H100
//! than at 50,304 (bench/NOTES.md, v3), the vocabulary the PyTorch peer and llm.c train with.
//!
//! The padded rows' logits get [`PADDED_LOGIT`] from the head's bias, so they take no share of
//! the softmax and their gradient is exactly zero: the model computes what the unpadded one
//! does (the golden tests' vocabularies are all padded), and the spare values never move.

use crate::backend::Backend;

/// The head's rows are a multiple of this.
pub const HEAD_ROW_MULTIPLE: usize = 64;

/// The logit of every padded head row: exp(PADDED_LOGIT - max) is 0 in f32 and bf16 alike, and
/// it stays finite (an infinity times a zero gradient would be NaN somewhere).
pub const PADDED_LOGIT: f32 = -1.0e30;

/// Rows of the head's GEMMs for a vocabulary of `vocab` ids (GPT-2's 50,257 -> 50,304).
pub fn head_rows(vocab: usize) -> usize {
    vocab.div_ceil(HEAD_ROW_MULTIPLE) * HEAD_ROW_MULTIPLE
}

/// The bias of a padded head: 0 for every real id, [`PADDED_LOGIT`] for the padding (Vp
/// values); None when the vocabulary is a round number (no padding). A head with a bias of its
/// own copies its V values over the zeros before each forward pass.
pub fn mask<B: Backend>(be: &B, vocab: usize) -> Option<B::Buf> {
    let rows = head_rows(vocab);
    (rows > vocab).then(|| be.upload(&(0..rows).map(|i| if i < vocab { 0.0 } else { PADDED_LOGIT }).collect::<Vec<_>>()))
}

/// Host logits (rows of Vp) without the padding: rows of V.
pub fn unpadded(padded: Vec<f32>, vocab: usize) -> Vec<f32> {
    let rows = head_rows(vocab);
    if rows == vocab {
        return padded;
    }
    padded.chunks_exact(rows).flat_map(|row| &row[..vocab]).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_rows_round_up_to_the_multiple() {
        assert_eq!(head_rows(50257), 50304, "GPT-2's vocabulary, as llm.c and the peer pad it");
        assert_eq!(head_rows(50304), 50304);
        assert_eq!(head_rows(30522), 30528);
        assert_eq!(head_rows(32128), 32128);
        assert_eq!((head_rows(1), head_rows(64), head_rows(65)), (64, 64, 128));
    }

    #[test]
    fn unpadded_keeps_the_first_v_of_each_row() {
        let padded: Vec<f32> = (0..128).map(|x| x as f32).collect();
        assert_eq!(unpadded(padded.clone(), 3), vec![0.0, 1.0, 2.0, 64.0, 65.0, 66.0]);
        assert_eq!(unpadded(padded.clone(), 64), padded);
    }
}
