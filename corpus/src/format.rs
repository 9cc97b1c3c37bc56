//! The on-storage format of a prepared corpus.
//!
//! ```text
//! <out>/shard-00000.bin  shard-00001.bin ...   training split, in stream order
//! <out>/val-00000.bin ...                      validation split (absent when there is none)
//! <out>/manifest.json                          written last: a corpus without it does not exist
//! <out>/progress.json                          only while `corpus prepare` has not finished
//! ```
//!
//! A shard is a 32-byte header followed by its tokens, little-endian, `dtype` wide:
//!
//! | bytes  | field                                                   |
//! |--------|---------------------------------------------------------|
//! | 0..8   | magic `SMELTTOK`                                        |
//! | 8..12  | format version, u32 LE (= [`SHARD_VERSION`])            |
//! | 12..16 | bytes per token, u32 LE: 2 (`u16`) or 4 (`u32`)         |
//! | 16..24 | token count, u64 LE                                     |
//! | 24..28 | vocabulary size, u32 LE (every id is below it)          |
//! | 28..32 | end-of-text id, u32 LE                                  |
//!
//! A split's token stream is its shards concatenated; documents are separated (terminated) by
//! the end-of-text id: every document is followed by one, including the last, and a document may
//! continue from one shard into the next. Training sequence `i` of length `T` is tokens
//! `[i*T, i*T + T + 1)` of the training stream (see [`crate::Sequences`]).

use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;

pub const MAGIC: [u8; 8] = *b"SMELTTOK";
pub const SHARD_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 32;
pub const MANIFEST: &str = "manifest.json";
pub const PROGRESS: &str = "progress.json";
/// `format` field of the manifest.
pub const FORMAT: &str = "smelt-corpus";
pub const MANIFEST_VERSION: u32 = 1;

/// Width of a stored token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// The narrowest width that holds ids below `vocab_size`.
    pub fn for_vocab(vocab_size: u64) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    pub fn from_bytes(n: u32) -> Option<Dtype> {
        match n {
            2 => Some(Dtype::U16),
            4 => Some(Dtype::U32),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "u16",
            Dtype::U32 => "u32",
        }
    }

    /// Appends `tokens` little-endian. Ids must fit (checked by the caller against the vocabulary).
    pub fn encode_into(self, tokens: &[u32], out: &mut Vec<u8>) {
        match self {
            Dtype::U16 => {
                out.reserve(tokens.len() * 2);
                for &t in tokens {
                    out.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            Dtype::U32 => {
                out.reserve(tokens.len() * 4);
                for &t in tokens {
                    out.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
    }

    /// Decodes `bytes` into `out`, which holds exactly `bytes.len() / width` tokens.
    pub fn decode_to(self, bytes: &[u8], out: &mut [u32]) {
        debug_assert_eq!(bytes.len() as u64, out.len() as u64 * self.bytes());
        match self {
            Dtype::U16 => out.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(o, c)| *o = u16::from_le_bytes([c[0], c[1]]) as u32),
            Dtype::U32 => out.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(o, c)| *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        }
    }

    /// Decodes whole tokens of `bytes` (its length must be a multiple of the width).
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<u32>) {
        match self {
            Dtype::U16 => out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
            Dtype::U32 => out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        }
    }
}

/// A shard's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub dtype: Dtype,
    pub tokens: u64,
    pub vocab_size: u32,
    pub eot_token: u32,
}

impl ShardHeader {
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES as usize] {
        let mut h = [0u8; HEADER_BYTES as usize];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.bytes() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.tokens.to_le_bytes());
        h[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[28..32].copy_from_slice(&self.eot_token.to_le_bytes());
        h
    }

    /// Parses a header; the error says what is wrong (the caller adds which object).
    pub fn parse(b: &[u8]) -> Result<ShardHeader, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err(format!("truncated: {} bytes, shorter than the {HEADER_BYTES}-byte shard header", b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(format!(
                "not a smelt shard: magic is {:?}, expected {:?}",
                String::from_utf8_lossy(&b[0..8]),
                std::str::from_utf8(&MAGIC).unwrap()
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(format!("shard format version {version}; this smelt reads version {SHARD_VERSION}"));
        }
        let width = u32_at(12);
        let dtype = Dtype::from_bytes(width).ok_or_else(|| format!("bad token width {width} in the header (expected 2 or 4)"))?;
        Ok(ShardHeader {
            dtype,
            tokens: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            vocab_size: u32_at(24),
            eot_token: u32_at(28),
        })
    }

    /// The object's size: header plus tokens.
    pub fn object_bytes(&self) -> u64 {
        HEADER_BYTES + self.tokens * self.dtype.bytes()
    }
}

/// One shard as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Object name under the corpus root, e.g. `shard-00003.bin`.
    pub name: String,
    pub tokens: u64,
    /// Object size in bytes (header included).
    pub bytes: u64,
    /// sha256 of the whole object, lowercase hex.
    pub sha256: String,
    /// End-of-text tokens in this shard (documents that end here).
    pub documents: u64,
}

/// One split (train or validation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

/// How the validation split was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSplit {
    None,
    /// About this fraction of the documents (rounded to a whole number).
    Fraction(f64),
    /// Exactly this many documents.
    Docs(u64),
}

/// How a `.txt` file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TxtDocs {
    /// The whole file is one document.
    #[default]
    File,
    /// Paragraphs separated by blank lines; the newlines between a paragraph's lines are kept.
    Paragraph,
    /// Every non-empty line (without its line ending).
    Line,
}

/// One input file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    /// Size on disk (compressed size for `.gz`).
    pub bytes: u64,
    /// Last modification time of a local file (ms since the Unix epoch): a file edited in place
    /// keeps its name and often its size. None for objects in a store, and in manifests written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ms: Option<u64>,
}

/// The same input as far as both records know: name and size, and the modification time when
/// both have one (a manifest from before it was recorded still resumes).
impl PartialEq for SourceInfo {
    fn eq(&self, other: &Self) -> bool {
        let times_agree = match (self.modified_ms, other.modified_ms) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.path == other.path && self.bytes == other.bytes && times_agree
    }
}

/// Everything that decides the token streams: a rerun resumes only when these are equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepareSettings {
    pub tokenizer: Tokenizer,
    pub shard_tokens: u64,
    pub text_field: String,
    pub txt_docs: TxtDocs,
    pub val: ValSplit,
    pub sources: Vec<SourceInfo>,
    /// Non-empty documents in the inputs, in input order (0 when no count was needed).
    pub total_documents: u64,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    pub version: u32,
    pub tokenizer: Tokenizer,
    /// Every id in the shards is below this (the tokenizer's ids plus end-of-text).
    pub vocab_size: u32,
    pub eot_token: u32,
    pub dtype: Dtype,
    /// Tokens per shard (the last shard of a split may hold fewer).
    pub shard_tokens: u64,
    pub train: SplitInfo,
    pub val: SplitInfo,
    /// Documents with no text, skipped.
    pub skipped_empty_documents: u64,
    pub settings: PrepareSettings,
}

/// Name of shard `index` of a split.
pub fn shard_name(val: bool, index: usize) -> String {
    if val {
        format!("val-{index:05}.bin")
    } else {
        format!("shard-{index:05}.bin")
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_errors() {
        let h = ShardHeader { dtype: Dtype::U16, tokens: 12345, vocab_size: 50257, eot_token: 50256 };
        let b = h.to_bytes();
        assert_eq!(ShardHeader::parse(&b).unwrap(), h);
        assert_eq!(h.object_bytes(), 32 + 2 * 12345);
        let mut bad = b;
        bad[0] = b'X';
        assert!(ShardHeader::parse(&bad).unwrap_err().contains("magic"));
        let mut bad = b;
        bad[8] = 9;
        assert!(ShardHeader::parse(&bad).unwrap_err().contains("version 9"));
        assert!(ShardHeader::parse(&b[..10]).unwrap_err().contains("truncated"));
        assert_eq!(Dtype::for_vocab(65536), Dtype::U16);
        assert_eq!(Dtype::for_vocab(65537), Dtype::U32);
        let mut v = Vec::new();
        Dtype::U32.encode_into(&[1, 70000], &mut v);
        let mut t = Vec::new();
        Dtype::U32.decode_into(&v, &mut t);
        assert_eq!(t, [1, 70000]);
        assert_eq!(shard_name(false, 3), "shard-00003.bin");
        assert_eq!(shard_name(true, 12), "val-00012.bin");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
