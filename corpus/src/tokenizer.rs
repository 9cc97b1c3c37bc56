//! Byte and character tokenizers, serializable so a saved model can decode its own ids.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenizerError {
    #[error("character {ch:?} (U+{code:04X}) at byte {offset} is not in the tokenizer's vocabulary of {vocab} characters")]
    UnknownChar { ch: char, code: u32, offset: usize, vocab: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    UnknownId { id: u32, vocab: usize },
    #[error("unknown tokenizer {0:?}; expected one of: char, byte")]
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
}

impl Tokenizer {
    /// The tokenizer named `kind` ("char" or "byte"), fitted to `text` where it needs to be.
    pub fn fit(kind: &str, text: &str) -> Result<Self, TokenizerError> {
        match kind {
            "byte" => Ok(Tokenizer::Byte),
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
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Char { chars } => chars.len(),
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
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::UnknownId { id, vocab });
        }
        Ok(match self {
            Tokenizer::Byte => String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned(),
            Tokenizer::Char { chars } => ids.iter().map(|&i| chars[i as usize]).collect(),
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
    }
}
