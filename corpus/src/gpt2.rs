//! OpenAI's GPT-2 byte-level BPE (tiktoken's `r50k_base`, identical to the original `gpt2`
//! encoder.json + vocab.bpe), offline: the ranks come from the `tiktoken-rs` crate, whose copy of
//! `r50k_base.tiktoken` has OpenAI's published sha256
//! (`306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930`).
//!
//! [`encode`] is ordinary-text encoding (tiktoken's `encode_ordinary`): the text is cut into
//! pieces by GPT-2's pattern
//!
//! ```text
//! '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s
//! ```
//!
//! and each piece is byte-pair merged by rank. The pattern is matched by hand here (a few
//! branches per character over a per-code-point class table) rather than by `fancy-regex` as
//! tiktoken does — the same pieces, several times faster; the classes `\p{L}`, `\p{N}` and `\s`
//! are taken from the `regex` crate, the engine under fancy-regex, so they agree code point for
//! code point. Merging is tiktoken-rs's own `byte_pair_split` over the same ranks, and for pieces
//! of 100 bytes and more tiktoken's heap merge (`bpe_merge.rs`), as tiktoken itself does.
//! [`encode_reference`] is tiktoken-rs's whole encoder, kept for tests and benchmarks.
//! `corpus/tests/gpt2_golden.rs` checks [`encode`] against ids produced by OpenAI's Python
//! `tiktoken` (`tools/golden/gpt2_tiktoken.py`) and against [`encode_reference`] on random text.
//!
//! [`safe_split`] finds places where a long text can be cut and each part encoded on its own
//! with exactly the ids of the whole: that is how a large document is tokenized in parallel.

use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

/// Ids 0..50257; the last is `<|endoftext|>`.
pub const VOCAB_SIZE: u32 = 50257;
/// `<|endoftext|>`.
pub const EOT: u32 = 50256;

/// tiktoken-rs's encoder (built on first use: about a tenth of a second).
pub fn core() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

struct Encoder {
    ranks: FxHashMap<Vec<u8>, u32>,
    /// `\p{L}` / `\p{N}` / `\s` / other, for every code point.
    class: Vec<u8>,
}

fn encoder() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| {
        let bpe = core();
        let mut ranks = FxHashMap::default();
        ranks.reserve(EOT as usize);
        for rank in 0..EOT {
            ranks.insert(bpe.decode_bytes(&[rank]).expect("ranks below 50256 decode"), rank);
        }
        let mut class = vec![OTHER; 0x11_0000];
        let all: String = (0..0x11_0000u32).filter_map(char::from_u32).collect();
        for (id, pattern) in [(LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+"), (SPACE, r"\s+")] {
            let re = regex::Regex::new(pattern).expect("class pattern");
            for m in re.find_iter(&all) {
                for c in m.as_str().chars() {
                    class[c as usize] = id;
                }
            }
        }
        Encoder { ranks, class }
    })
}

impl Encoder {
    /// Class and UTF-8 length of the character at byte `i` (a character boundary).
    #[inline(always)]
    fn class_at(&self, b: &[u8], i: usize) -> (u8, usize) {
        let c0 = b[i];
        if c0 < 0x80 {
            return (ASCII_CLASS[c0 as usize], 1);
        }
        let (cp, len) = if c0 < 0xE0 {
            (((c0 as u32 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
        } else if c0 < 0xF0 {
            (((c0 as u32 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F), 3)
        } else {
            (
                ((c0 as u32 & 0x07) << 18) | ((b[i + 1] as u32 & 0x3F) << 12) | ((b[i + 2] as u32 & 0x3F) << 6) | (b[i + 3] as u32 & 0x3F),
                4,
            )
        };
        (self.class[cp as usize], len)
    }

    /// End of the run of characters of class `cls` starting at `i`.
    #[inline(always)]
    fn run_end(&self, b: &[u8], mut i: usize, cls: u8) -> usize {
        while i < b.len() {
            let (c, l) = self.class_at(b, i);
            if c != cls {
                break;
            }
            i += l;
        }
        i
    }

    /// Calls `piece` with every pre-tokenized piece of `text`, in order.
    #[inline(always)]
    fn pieces(&self, text: &str, mut piece: impl FnMut(&[u8])) {
        let b = text.as_bytes();
        let n = b.len();
        let mut i = 0;
        while i < n {
            let start = i;
            let c0 = b[i];
            // '(?:[sdmt]|ll|ve|re)
            if c0 == b'\'' && i + 1 < n {
                let c1 = b[i + 1];
                let c2 = if i + 2 < n { b[i + 2] } else { 0 };
                let len = match (c1, c2) {
                    (b's' | b'd' | b'm' | b't', _) => 2,
                    (b'l', b'l') | (b'v', b'e') | (b'r', b'e') => 3,
                    _ => 0,
                };
                if len > 0 {
                    i += len;
                    piece(&b[start..i]);
                    continue;
                }
            }
            let (cls, len) = self.class_at(b, i);
            if cls != SPACE {
                // \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+
                i = self.run_end(b, i + len, cls);
            } else if c0 == b' ' && i + 1 < n && self.class_at(b, i + 1).0 != SPACE {
                // " " followed by a letter, number or other run
                let (c2, l2) = self.class_at(b, i + 1);
                i = self.run_end(b, i + 1 + l2, c2);
            } else {
                // \s+$ | \s+(?!\S) | \s
                let mut last = i;
                let mut j = i + len;
                while j < n {
                    let (c, l) = self.class_at(b, j);
                    if c != SPACE {
                        break;
                    }
                    last = j;
                    j += l;
                }
                i = if j == n || last == i { j } else { last };
            }
            piece(&b[start..i]);
        }
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        self.pieces(text, |p| match self.ranks.get(p) {
            Some(&r) => out.push(r),
            // tiktoken's own merge: the scan of every pair per merge for short pieces, a heap
            // from 100 bytes on (a 160,000-letter run took 20 s by the scan alone)
            None if p.len() >= crate::bpe_merge::LARGE => out.extend(crate::bpe_merge::merge_large(&self.ranks, p)),
            None => out.extend(tiktoken_rs::byte_pair_split(p, &self.ranks).into_iter().map(|part| self.ranks[part])),
        });
    }
}

const ASCII_CLASS: [u8; 128] = {
    let mut t = [OTHER; 128];
    let mut c = 0;
    while c < 128 {
        let b = c as u8;
        t[c] = if b.is_ascii_alphabetic() {
            LETTER
        } else if b.is_ascii_digit() {
            NUMBER
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            SPACE
        } else {
            OTHER
        };
        c += 1;
    }
    t
};

/// GPT-2 ids of `text`, as ordinary text.
pub fn encode(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 4 + 4);
    encoder().encode_into(text, &mut out);
    out
}

/// The same ids by tiktoken-rs's own encoder (fancy-regex pre-tokenization): the reference
/// [`encode`] is tested against, and the baseline of `smelt bench tokenize`.
pub fn encode_reference(text: &str) -> Vec<u32> {
    core().encode_ordinary(text)
}

/// The text of `ids` (invalid UTF-8, possible when a multi-byte character is cut, is replaced by
/// U+FFFD). Ids must be below [`VOCAB_SIZE`].
pub fn decode(ids: &[u32]) -> String {
    let bytes = core().decode_bytes(ids).expect("GPT-2 ids checked against the vocabulary");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A byte index `i` in `from..text.len()` where `text` may be cut into `text[..i]` and
/// `text[i..]`, each encoded separately, without changing a single id; `None` if there is none.
///
/// GPT-2's pattern (`'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s`)
/// only looks ahead, so a cut is invisible when the whole text has a piece boundary at `i`, and the
/// left part's last piece is matched the same without what follows. Two ASCII shapes guarantee
/// both: `x|" "y` (an ASCII letter, then a space and an ASCII letter: the letter run ends at `x`
/// either way, and " y" starts a piece) and `z"\n"|y` (a non-space ASCII character, a newline, an
/// ASCII letter: the lone newline is a piece either way, since `\s+$` and `\s` both match exactly
/// it). The same cuts are harmless for the byte and char tokenizers, which have no context.
pub fn safe_split(text: &str, from: usize) -> Option<usize> {
    safe_split_bytes(text.as_bytes(), from)
}

/// [`safe_split`] over raw bytes: it only looks at ASCII bytes, so it never cuts a UTF-8
/// character, and input readers can use it before decoding.
pub fn safe_split_bytes(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from.max(1);
    while i + 1 < b.len() {
        let (prev, cur, next) = (b[i - 1], b[i], b[i + 1]);
        if next.is_ascii_alphabetic() {
            if cur == b' ' && prev.is_ascii_alphabetic() {
                return Some(i);
            }
            if cur == b'\n' && prev.is_ascii_graphic() {
                return Some(i + 1);
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_classes_agree_with_the_table() {
        let e = encoder();
        for c in 0u8..128 {
            assert_eq!(ASCII_CLASS[c as usize], e.class[c as usize], "byte {c}");
        }
        assert_eq!(e.class['é' as usize], LETTER);
        assert_eq!(e.class['٣' as usize], NUMBER);
        assert_eq!(e.class['\u{3000}' as usize], SPACE);
        assert_eq!(e.class['\u{200b}' as usize], OTHER);
        assert_eq!(e.class['\u{301}' as usize], OTHER); // a combining mark is not \p{L}
    }

    #[test]
    fn long_pieces_merge_as_tiktoken_merges_them() {
        // pieces of 100 bytes and more go through the heap merge (the pairwise scan is quadratic
        // in the piece): runs without a pre-token break, random letters, a long number
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut letters = |alphabet: &[u8], n: usize| -> String {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    alphabet[(rng % alphabet.len() as u64) as usize] as char
                })
                .collect()
        };
        let texts = [
            "x".repeat(5000),
            letters(b"ACGT", 4000),
            letters(b"abcdefghijklmnopqrstuvwxyz", 3000),
            format!("{} and {}", "ab".repeat(700), letters(b"0123456789", 999)),
            letters(b"!@#$%^&*()", 500),
        ];
        for t in &texts {
            assert_eq!(encode(t), encode_reference(t), "{}...", &t[..20]);
        }
    }

    #[test]
    fn split_points_do_not_change_ids() {
        let text = "Hello there, friend.\nThis is  a test \n\nof splitting: it's   fine\ny'all x\nz 12 34 ab cd\n";
        let whole = encode(text);
        let mut cuts = 0;
        let mut from = 0;
        while let Some(i) = safe_split(text, from) {
            let (l, r) = text.split_at(i);
            let mut ids = encode(l);
            ids.extend(encode(r));
            assert_eq!(ids, whole, "cut at {i}: {l:?} | {r:?}");
            cuts += 1;
            from = i + 1;
        }
        assert!(cuts > 8, "{cuts}");
        assert_eq!(safe_split("ab", 0), None);
        assert_eq!(safe_split("a b", 0), Some(1));
        assert_eq!(safe_split(" \nb", 0), None);
        assert_eq!(safe_split(".\nb", 0), Some(2));
    }
}
