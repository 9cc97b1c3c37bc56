//! Byte-pair merging of one long pre-token piece with a heap: tiktoken's
//! `_byte_pair_merge_large` (MIT licence, OpenAI; used by tiktoken and tiktoken-rs's encoder for
//! pieces of 100 bytes and more), which tiktoken-rs does not export. Its exported
//! `byte_pair_split` rescans every pair after each merge: quadratic in the piece, so a
//! 160,000-letter run with no pre-token break (a DNA line, a base64 blob) took 20 s and a 5 MB
//! one did not end. Both merge the pair of lowest rank first, the leftmost among equals: the same
//! ids (tested against tiktoken-rs's whole encoder in gpt2.rs).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// Pieces shorter than this go through the pairwise scan (tiktoken's own threshold).
pub const LARGE: usize = 100;

/// A possible merge of the token starting at `start` with the next one.
#[derive(Eq, PartialEq, Clone, Copy)]
struct Merge {
    start: usize,
    rank: u32,
}

impl Ord for Merge {
    // a max-heap: the lowest rank first, then the leftmost
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The token starting at a byte offset: where it ends, where the next one ends, the rank of
/// merging the two (u32::MAX: none), its own rank once merged.
struct Token {
    prev: usize,
    end: usize,
    next_end: usize,
    next_rank: u32,
    cur_rank: u32,
}

/// The GPT-2 ids of `piece` (at least 2 bytes; every single byte has a rank).
pub fn merge_large(ranks: &FxHashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(piece.len());
    tokens.push(Token { prev: usize::MAX, end: 1, next_end: 2, next_rank: u32::MAX, cur_rank: u32::MAX });
    let mut heap = BinaryHeap::with_capacity(piece.len());
    for i in 0..piece.len() - 1 {
        if let Some(&rank) = ranks.get(&piece[i..i + 2]) {
            heap.push(Merge { start: i, rank });
            tokens[i].next_rank = rank;
        }
        tokens.push(Token { prev: i, end: i + 2, next_end: i + 3, next_rank: u32::MAX, cur_rank: u32::MAX });
    }
    // (re)computes the merge of the token at `start` with the one ending at `next_end`
    let possible = |tokens: &mut Vec<Token>, heap: &mut BinaryHeap<Merge>, start: usize, next_end: usize| {
        tokens[start].next_end = next_end;
        tokens[start].next_rank = u32::MAX;
        if next_end <= piece.len() {
            if let Some(&rank) = ranks.get(&piece[start..next_end]) {
                heap.push(Merge { start, rank });
                tokens[start].next_rank = rank;
            }
        }
    };
    while let Some(left) = heap.pop() {
        if left.rank != tokens[left.start].next_rank {
            continue; // a merge a later one made stale
        }
        let left_start = left.start;
        let right_start = tokens[left_start].end;
        let right_end = tokens[left_start].next_end;
        let right_next_end = tokens[right_start].next_end;
        tokens[left_start].cur_rank = tokens[left_start].next_rank;
        tokens[left_start].end = right_end;
        possible(&mut tokens, &mut heap, left_start, right_next_end);
        if right_end < tokens.len() {
            tokens[right_end].prev = left_start;
        }
        if left_start > 0 {
            let prev_start = tokens[left_start].prev;
            possible(&mut tokens, &mut heap, prev_start, right_end);
        }
        tokens[right_start].next_rank = u32::MAX;
    }
    let mut ids = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        ids.push(if tokens[i].cur_rank != u32::MAX { tokens[i].cur_rank } else { ranks[&piece[i..tokens[i].end]] });
        i = tokens[i].end;
    }
    ids
}
