//! Byte, character and GPT-2 BPE tokenizers, serializable so a saved model can decode its own ids.
//!
//! GPT-2 is OpenAI's GPT-2 encoding (`r50k_base` in tiktoken: 50,257 ids, `<|endoftext|>` =
//! 50256), with the ranks the `tiktoken-rs` crate ships, so it works offline; see [`crate::gpt2`].
//! Text is encoded as ordinary text: a literal `<|endoftext|>` in a document is not the
//! end-of-text token.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenizerError {
    #[error("character {ch:?} (U+{code:04X}) at byte {offset} is not in the tokenizer's vocabulary of {vocab} characters")]
    UnknownChar { ch: char, code: u32, offset: usize, vocab: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    UnknownId { id: u32, vocab: usize },
    #[error("unknown tokenizer {0:?}; expected one of: gpt2, char, byte")]
    UnknownKind(String),
    #[error("cannot build a character vocabulary from an empty text")]
    EmptyText,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Tokenizer {
    /// One token per byte of UTF-8: vocabulary 256, never fails.
    Byte,
    /// One token per distinct character of the training text, in sorted order.
    Char { chars: Vec<char> },
    /// OpenAI's GPT-2 byte-level BPE: vocabulary 50,257 including `<|endoftext|>` (50256).
    Gpt2,
}

impl Tokenizer {
    /// The tokenizer named `kind` ("char" or "byte"), fitted to `text` where it needs to be.
    pub fn fit(kind: &str, text: &str) -> Result<Self, TokenizerError> {
        match kind {
            "byte" => Ok(Tokenizer::Byte),
            "gpt2" => Ok(Tokenizer::Gpt2),
            "char" => {
                let mut chars: Vec<char> = text.chars().collect();
                chars.sort_unstable();
                chars.dedup();
                if chars.is_empty() {
                    return Err(TokenizerError::EmptyText);
                }
                Ok(Tokenizer::Char { chars })
            }
            other => Err(TokenizerError::UnknownKind(other.to_string())),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Char { .. } => "char",
            Tokenizer::Gpt2 => "gpt2",
        }
    }

    /// The ids [`Tokenizer::encode`] can produce and [`Tokenizer::decode`] accepts (for GPT-2
    /// this includes `<|endoftext|>`; byte and char have no end-of-text id of their own).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Char { chars } => chars.len(),
            Tokenizer::Gpt2 => crate::gpt2::VOCAB_SIZE as usize,
        }
    }

    /// The id that separates documents in a corpus: GPT-2's `<|endoftext|>` (50256); for byte
    /// and char, one past their own ids (256, or the number of characters), so a corpus made
    /// with them has a vocabulary one larger than the tokenizer's.
    pub fn eot_token(&self) -> u32 {
        match self {
            Tokenizer::Gpt2 => crate::gpt2::EOT,
            other => other.vocab_size() as u32,
        }
    }

    /// The vocabulary of a corpus made with this tokenizer: every id plus the end-of-text id.
    pub fn corpus_vocab_size(&self) -> usize {
        match self {
            Tokenizer::Gpt2 => self.vocab_size(),
            other => other.vocab_size() + 1,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Char { chars } => text
                .char_indices()
                .map(|(offset, ch)| {
                    chars.binary_search(&ch).map(|i| i as u32).map_err(|_| TokenizerError::UnknownChar {
                        ch,
                        code: ch as u32,
                        offset,
                        vocab: chars.len(),
                    })
                })
                .collect(),
            Tokenizer::Gpt2 => Ok(crate::gpt2::encode(text)),
        }
    }

    /// How two char vocabularies differ, in words, for an error naming both sides (`this` names
    /// `self`, `that` names `other`): "the corpus has 65 characters, the model 59; only the
    /// corpus has 'Q', 'Z'; only the model has 'é'". `None` unless both are char tokenizers and
    /// differ: their kind alone ("char" and "char") would not say what is wrong.
    pub fn char_difference(&self, this: &str, other: &Tokenizer, that: &str) -> Option<String> {
        const SHOWN: usize = 5;
        let (Tokenizer::Char { chars: a }, Tokenizer::Char { chars: b }) = (self, other) else { return None };
        if a == b {
            return None;
        }
        let (sa, sb): (BTreeSet<char>, BTreeSet<char>) = (a.iter().copied().collect(), b.iter().copied().collect());
        let only = |x: &BTreeSet<char>, y: &BTreeSet<char>, who: &str| -> Option<String> {
            let d: Vec<char> = x.difference(y).copied().collect();
            if d.is_empty() {
                return None;
            }
            let shown: Vec<String> = d.iter().take(SHOWN).map(|c| format!("{c:?}")).collect();
            let more = if d.len() > SHOWN { format!(" and {} more", d.len() - SHOWN) } else { String::new() };
            Some(format!("only {who} has {}{more}", shown.join(", ")))
        };
        let mut parts = vec![format!("{this} has {} characters, {that} {}", a.len(), b.len())];
        parts.extend(only(&sa, &sb, this));
        parts.extend(only(&sb, &sa, that));
        if parts.len() == 1 {
            parts.push("the same ones in another order".to_string());
        }
        Some(parts.join("; "))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::UnknownId { id, vocab });
        }
        Ok(match self {
            Tokenizer::Byte => String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned(),
            Tokenizer::Char { chars } => ids.iter().map(|&i| chars[i as usize]).collect(),
            Tokenizer::Gpt2 => crate::gpt2::decode(ids),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_round_trip_and_sorted_vocab() {
        let t = Tokenizer::fit("char", "hello, world").unwrap();
        assert_eq!(t.vocab_size(), 9); // " ,dehlorw"
        let ids = t.encode("low, old").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "low, old");
        assert_eq!(t.encode(" ").unwrap(), vec![0]);
    }

    #[test]
    fn char_rejects_unseen_character_by_name() {
        let t = Tokenizer::fit("char", "abc").unwrap();
        let e = t.encode("abz").unwrap_err();
        assert_eq!(e, TokenizerError::UnknownChar { ch: 'z', code: 0x7A, offset: 2, vocab: 3 });
        assert!(e.to_string().contains("'z'"));
    }

    #[test]
    fn char_vocabularies_say_how_they_differ() {
        let (a, b) = (Tokenizer::fit("char", "abcxyz").unwrap(), Tokenizer::fit("char", "abcQ").unwrap());
        assert_eq!(
            a.char_difference("the corpus", &b, "the model").as_deref(),
            Some("the corpus has 6 characters, the model 4; only the corpus has 'x', 'y', 'z'; only the model has 'Q'")
        );
        assert_eq!(a.char_difference("the corpus", &a, "the model"), None);
        assert_eq!(a.char_difference("the corpus", &Tokenizer::Byte, "the model"), None);
    }

    #[test]
    fn byte_handles_any_utf8() {
        let t = Tokenizer::fit("byte", "").unwrap();
        let ids = t.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
        assert!(t.decode(&[256]).is_err());
    }

    #[test]
    fn serializes_with_its_kind() {
        let t = Tokenizer::fit("char", "ba").unwrap();
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, r#"{"kind":"char","chars":["a","b"]}"#);
        assert_eq!(serde_json::from_str::<Tokenizer>(&s).unwrap(), t);
        assert!(Tokenizer::fit("bpe", "x").is_err());
        let g = Tokenizer::fit("gpt2", "").unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), r#"{"kind":"gpt2"}"#);
    }

    #[test]
    fn gpt2_round_trip_and_separators() {
        let g = Tokenizer::Gpt2;
        let ids = g.encode("Hello, world!").unwrap();
        assert_eq!(ids, [15496, 11, 995, 0]);
        assert_eq!(g.decode(&ids).unwrap(), "Hello, world!");
        assert_eq!((g.eot_token(), g.vocab_size(), g.corpus_vocab_size()), (50256, 50257, 50257));
        assert!(g.decode(&[50257]).is_err());
        let c = Tokenizer::fit("char", "ab").unwrap();
        assert_eq!((c.eot_token(), c.corpus_vocab_size()), (2, 3));
        assert_eq!((Tokenizer::Byte.eot_token(), Tokenizer::Byte.corpus_vocab_size()), (256, 257));
    }
}
