//! `corpus prepare`: input files -> token shards + `manifest.json` in object storage.
//!
//! 1. [`expand_inputs`] lists the files. When the tokenizer is `char` (its vocabulary is the set
//!    of characters) or a validation split is asked for (it needs the number of documents), a
//!    first pass reads every document.
//! 2. Documents are assigned to a split by index alone: with `N` validation documents out of `D`,
//!    document `i` is validation when `floor((i+1)N/D) > floor(iN/D)` — exactly `N`, evenly spread.
//! 3. A reader thread hands out batches of document segments; each batch is tokenized in parallel
//!    (rayon) and appended, in document order, to its split's stream, every document followed by
//!    the end-of-text id. Every `shard_tokens` tokens the stream is cut into a shard, which an
//!    uploader thread hashes and writes while tokenizing goes on, then records in
//!    `progress.json` together with where the stream continues (document, token offset).
//! 4. When both streams are written, `manifest.json` is put (last), and `progress.json` deleted.
//!
//! Everything is a pure function of the inputs and settings, so a rerun after an interruption
//! resumes: the shards listed in `progress.json` that are still there as written are kept, and
//! tokenizing restarts where the first missing one begins (documents before it are read but not
//! tokenized). "Still there as written" is checked cheaply, without reading the shards: one
//! listing of the output gives every object's size and ETag, which must match the size and the
//! ETag recorded when the shard was put (where the store gives no ETag, the 32-byte header is
//! read and compared instead). [`PrepareOptions::verify_resumed`] re-reads every kept shard and
//! checks its sha256 as well. A rerun with other settings or other inputs is refused rather
//! than mixing two corpora; a rerun after success does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::CorpusError;
use crate::format::{
    shard_name, Dtype, Manifest, PrepareSettings, ShardHeader, ShardInfo, SplitInfo, TxtDocs, ValSplit, FORMAT,
    HEADER_BYTES, MANIFEST, MANIFEST_VERSION, PROGRESS,
};
use crate::input::{expand_inputs, for_each_segment, DocOptions, DocStats, Flow, Segment, Source};
use crate::store::{ObjectInfo, StoreDir};
use crate::tokenizer::Tokenizer;

/// What to prepare.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Files, directories, glob patterns.
    pub inputs: Vec<String>,
    /// `gpt2`, `char` or `byte`.
    pub tokenizer: String,
    /// Output location (see [`StoreDir::open`]).
    pub out: String,
    /// JSONL field holding the text.
    pub text_field: String,
    pub txt_docs: TxtDocs,
    /// Tokens per shard (the last shard of each split may hold fewer).
    pub shard_tokens: u64,
    pub val: ValSplit,
    /// Documents longer than this are tokenized in pieces of about this many bytes.
    pub segment_bytes: usize,
    /// Text per parallel batch.
    pub batch_bytes: usize,
    /// Stop (without a manifest) once this many shards have been finished in this run: a
    /// deliberate interruption, for tests and for preparing a corpus in bounded pieces.
    pub stop_after_shards: Option<u64>,
    /// On resume, read every shard an earlier run finished and check its sha256 (otherwise size
    /// and ETag, or header, are checked; see the module docs).
    pub verify_resumed: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            inputs: Vec::new(),
            tokenizer: "gpt2".into(),
            out: String::new(),
            text_field: "text".into(),
            txt_docs: TxtDocs::File,
            shard_tokens: 100_000_000,
            val: ValSplit::None,
            segment_bytes: 1 << 20,
            batch_bytes: 8 << 20,
            stop_after_shards: None,
            verify_resumed: false,
        }
    }
}

/// Progress of [`prepare`], for a progress bar. Called from several threads.
pub trait Progress: Send + Sync {
    /// A new phase (`scan`, `verify`, `tokenize`) over `total_bytes` bytes.
    fn phase(&self, _name: &str, _total_bytes: u64) {}
    /// Bytes of the current phase done.
    fn advance(&self, _bytes: u64) {}
    /// A shard was finished: written, or kept from an earlier run.
    fn shard(&self, _name: &str, _kept: bool) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What [`prepare`] did.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    pub uri: String,
    /// The manifest was written (false after `stop_after_shards`).
    pub complete: bool,
    pub manifest: Option<Manifest>,
    /// Shards written by this run.
    pub shards_written: u64,
    /// Shards found finished and checked, not written again.
    pub shards_kept: u64,
    /// Bytes of an earlier run's shards read to check them on resume (0 when size and ETag
    /// suffice; every kept byte with `verify_resumed`).
    pub resume_bytes_read: u64,
    pub input_files: usize,
    pub input_bytes: u64,
    /// Text bytes tokenized by this run.
    pub tokenized_bytes: u64,
    /// Tokens this run wrote (in new shards).
    pub tokens_written: u64,
    pub seconds: f64,
}

/// Where a split's stream continues after a shard: token `offset` of document `doc`'s
/// tokens-plus-end-of-text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub doc: u64,
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ShardRecord {
    #[serde(flatten)]
    info: ShardInfo,
    next: Cursor,
    /// The store's ETag of the object as written, to tell on resume that it was not replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e_tag: Option<String>,
}

impl ShardRecord {
    /// The same shard content at the same place of the stream (the ETag aside).
    fn same_shard(&self, other: &ShardRecord) -> bool {
        self.info == other.info && self.next == other.next
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ProgressFile {
    format: String,
    settings: PrepareSettings,
    skipped_empty_documents: u64,
    train: Vec<ShardRecord>,
    val: Vec<ShardRecord>,
}

fn settings_diff(old: &PrepareSettings, new: &PrepareSettings) -> String {
    let mut d = Vec::new();
    if old.tokenizer.kind() != new.tokenizer.kind() {
        d.push(format!("tokenizer {} vs {}", old.tokenizer.kind(), new.tokenizer.kind()));
    } else if old.tokenizer != new.tokenizer {
        d.push("the character vocabulary".to_string());
    }
    if old.shard_tokens != new.shard_tokens {
        d.push(format!("shard tokens {} vs {}", old.shard_tokens, new.shard_tokens));
    }
    if old.text_field != new.text_field {
        d.push(format!("--text-field {:?} vs {:?}", old.text_field, new.text_field));
    }
    if old.txt_docs != new.txt_docs {
        let name = |t: TxtDocs| match t {
            TxtDocs::File => "file",
            TxtDocs::Paragraph => "paragraph",
            TxtDocs::Line => "line",
        };
        d.push(format!("--txt-docs {} vs {}", name(old.txt_docs), name(new.txt_docs)));
    }
    if old.val != new.val {
        let name = |v: ValSplit| match v {
            ValSplit::None => "no validation split".to_string(),
            ValSplit::Fraction(f) => format!("--val-fraction {f}"),
            ValSplit::Docs(n) => format!("--val-docs {n}"),
        };
        d.push(format!("{} vs {}", name(old.val), name(new.val)));
    }
    if old.sources != new.sources {
        d.push("the input files (names, sizes or modification times)".to_string());
    }
    if old.total_documents != new.total_documents && d.is_empty() {
        d.push(format!("document count {} vs {}", old.total_documents, new.total_documents));
    }
    d.join(", ")
}

/// Which documents are validation documents.
#[derive(Clone, Copy, Debug)]
struct Splitter {
    n_val: u64,
    total: u64,
}

impl Splitter {
    fn is_val(&self, i: u64) -> bool {
        if self.n_val == 0 {
            return false;
        }
        let (n, d) = (self.n_val as u128, self.total as u128);
        (i as u128 + 1) * n / d > i as u128 * n / d
    }
}

/// A finished shard on its way to storage.
struct ShardJob {
    val: bool,
    index: usize,
    data: Vec<u8>,
    tokens: u64,
    documents: u64,
    next: Cursor,
}

/// One split's stream being cut into shards.
struct SplitBuilder {
    val: bool,
    shard_tokens: u64,
    header: ShardHeader,
    index: usize,
    buf: Vec<u32>,
    buf_docs: u64,
    resume: Cursor,
    cur_doc: Option<u64>,
    pos: u64,
    shards_made: u64,
}

impl SplitBuilder {
    /// Whether document `doc` needs tokenizing at all.
    fn wants(&self, doc: u64) -> bool {
        doc >= self.resume.doc
    }

    fn push(&mut self, doc: u64, tokens: &[u32], last: bool, out: &mut dyn FnMut(ShardJob) -> Result<(), CorpusError>) -> Result<(), CorpusError> {
        if !self.wants(doc) {
            return Ok(());
        }
        if self.cur_doc != Some(doc) {
            self.cur_doc = Some(doc);
            self.pos = 0;
        }
        let skip = if doc == self.resume.doc { self.resume.offset } else { 0 };
        self.append(doc, tokens, skip, false, out)?;
        if last {
            let eot = [self.header.eot_token];
            self.append(doc, &eot, skip, true, out)?;
        }
        Ok(())
    }

    fn append(&mut self, doc: u64, mut tokens: &[u32], skip: u64, is_eot: bool, out: &mut dyn FnMut(ShardJob) -> Result<(), CorpusError>) -> Result<(), CorpusError> {
        if self.pos < skip {
            let drop = (skip - self.pos).min(tokens.len() as u64);
            tokens = &tokens[drop as usize..];
            self.pos += drop;
        }
        while !tokens.is_empty() {
            let room = (self.shard_tokens - self.buf.len() as u64) as usize;
            let take = room.min(tokens.len());
            self.buf.extend_from_slice(&tokens[..take]);
            if is_eot {
                self.buf_docs += take as u64;
            }
            tokens = &tokens[take..];
            self.pos += take as u64;
            if self.buf.len() as u64 == self.shard_tokens {
                self.cut(Cursor { doc, offset: self.pos }, out)?;
            }
        }
        Ok(())
    }

    fn cut(&mut self, next: Cursor, out: &mut dyn FnMut(ShardJob) -> Result<(), CorpusError>) -> Result<(), CorpusError> {
        let header = ShardHeader { tokens: self.buf.len() as u64, ..self.header };
        let mut data = Vec::with_capacity(header.object_bytes() as usize);
        data.extend_from_slice(&header.to_bytes());
        header.dtype.encode_into(&self.buf, &mut data);
        let job = ShardJob { val: self.val, index: self.index, data, tokens: header.tokens, documents: self.buf_docs, next };
        self.index += 1;
        self.buf.clear();
        self.buf_docs = 0;
        self.shards_made += 1;
        out(job)
    }

    /// The last, partial shard (none if the stream ended on a shard boundary).
    fn finish(&mut self, end: Cursor, out: &mut dyn FnMut(ShardJob) -> Result<(), CorpusError>) -> Result<(), CorpusError> {
        if !self.buf.is_empty() {
            self.cut(end, out)?;
        }
        Ok(())
    }
}

/// The uploader's state: records so far, and what an earlier run left that may be reused.
struct Uploader<'a> {
    out: &'a StoreDir,
    progress: &'a dyn Progress,
    file: ProgressFile,
    /// Verified shards of an earlier run beyond the kept prefix, by (val, index).
    reusable: std::collections::HashMap<(bool, usize), ShardRecord>,
    written: u64,
    kept: u64,
    tokens_written: u64,
}

impl Uploader<'_> {
    fn handle(&mut self, job: ShardJob) -> Result<(), CorpusError> {
        let name = shard_name(job.val, job.index);
        let sha256 = crate::format::sha256_hex(&job.data);
        let info = ShardInfo { name: name.clone(), tokens: job.tokens, bytes: job.data.len() as u64, sha256, documents: job.documents };
        let mut record = ShardRecord { info, next: job.next, e_tag: None };
        // an earlier run's shard found intact and computed again identical: kept as it is
        let reuse = match self.reusable.get(&(job.val, job.index)).filter(|old| old.same_shard(&record)) {
            Some(old) => {
                record.e_tag = old.e_tag.clone();
                self.kept += 1;
                true
            }
            None => {
                record.e_tag = self.out.put_tagged(&name, job.data)?;
                self.written += 1;
                self.tokens_written += job.tokens;
                false
            }
        };
        self.progress.shard(&name, reuse);
        let list = if job.val { &mut self.file.val } else { &mut self.file.train };
        debug_assert_eq!(list.len(), job.index);
        list.push(record);
        self.save()
    }

    fn save(&self) -> Result<(), CorpusError> {
        let json = serde_json::to_vec_pretty(&self.file).expect("progress serializes");
        Ok(self.out.put(PROGRESS, json)?)
    }
}

fn char_vocabulary(sources: &[Source], opts: &DocOptions, progress: &dyn Progress) -> Result<(Vec<char>, DocStats), CorpusError> {
    let mut seen = vec![0u64; 0x11_0000usize.div_ceil(64)];
    let stats = for_each_segment(sources, opts, &|n| progress.advance(n), &mut |s: Segment| {
        for c in s.text.chars() {
            let c = c as usize;
            seen[c / 64] |= 1 << (c % 64);
        }
        Ok(Flow::Continue)
    })?;
    let chars = (0..0x11_0000u32)
        .filter(|&c| seen[c as usize / 64] >> (c % 64) & 1 == 1)
        .filter_map(char::from_u32)
        .collect();
    Ok((chars, stats))
}

fn count_documents(sources: &[Source], opts: &DocOptions, progress: &dyn Progress) -> Result<DocStats, CorpusError> {
    for_each_segment(sources, opts, &|n| progress.advance(n), &mut |_| Ok(Flow::Continue))
}

fn load_json<T: serde::de::DeserializeOwned>(out: &StoreDir, name: &str) -> Result<Option<T>, CorpusError> {
    match out.get(name) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| CorpusError::BadManifest { uri: out.uri_of(name), reason: e.to_string() }),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether an earlier run's shard is still there as written: the size and ETag the listing
/// gives match the record (where either ETag is missing, the header is read and compared); with
/// `verify`, its sha256 too. Bytes read are added to `read`.
fn shard_intact(
    out: &StoreDir,
    r: &ShardRecord,
    listed: Option<&ObjectInfo>,
    header: &ShardHeader,
    verify: bool,
    read: &mut u64,
) -> Result<bool, CorpusError> {
    let Some(obj) = listed else { return Ok(false) };
    if obj.size != r.info.bytes {
        return Ok(false);
    }
    let fetched = |e: crate::store::StoreError| if e.is_not_found() { Ok(None) } else { Err(CorpusError::from(e)) };
    if verify {
        let Some(data) = out.get(&r.info.name).map(Some).or_else(fetched)? else { return Ok(false) };
        *read += data.len() as u64;
        return Ok(crate::format::sha256_hex(&data) == r.info.sha256);
    }
    if let (Some(a), Some(b)) = (&r.e_tag, &obj.e_tag) {
        return Ok(a == b);
    }
    let Some(head) = out.get_range(&r.info.name, 0..HEADER_BYTES).map(Some).or_else(fetched)? else { return Ok(false) };
    *read += head.len() as u64;
    let want = ShardHeader { tokens: r.info.tokens, ..*header };
    Ok(head[..] == want.to_bytes()[..])
}

/// What no longer matches the manifest of a finished corpus, one line per shard: a missing
/// shard or one of another size (one listing), and with `verify` a sha256 that differs (every
/// shard read, its bytes added to `read`). Empty when every shard is as the manifest says.
fn finished_shards_changed(out: &StoreDir, m: &Manifest, verify: bool, progress: &dyn Progress, read: &mut u64) -> Result<Vec<String>, CorpusError> {
    let shards: Vec<_> = m.train.shards.iter().chain(&m.val.shards).collect();
    progress.phase(if verify { "verify" } else { "check" }, if verify { shards.iter().map(|s| s.bytes).sum() } else { 0 });
    let listed: std::collections::HashMap<String, ObjectInfo> = out.list_info("")?.into_iter().collect();
    let mut bad = Vec::new();
    for s in shards {
        match listed.get(&s.name) {
            None => bad.push(format!("{}: missing", s.name)),
            Some(o) if o.size != s.bytes => bad.push(format!("{}: {} bytes, the manifest says {}", s.name, o.size, s.bytes)),
            Some(_) if verify => {
                let data = out.get(&s.name)?;
                *read += data.len() as u64;
                if crate::format::sha256_hex(&data) != s.sha256 {
                    bad.push(format!("{}: its sha256 does not match the manifest's", s.name));
                }
                progress.advance(s.bytes);
            }
            Some(_) => {}
        }
    }
    Ok(bad)
}

/// Prepares a corpus (see the module docs).
pub fn prepare(opts: &PrepareOptions, progress: &dyn Progress) -> Result<PrepareReport, CorpusError> {
    let started = Instant::now();
    if opts.shard_tokens == 0 {
        return Err(CorpusError::Invalid("--shard-tokens must be at least 1".into()));
    }
    match opts.val {
        ValSplit::Fraction(f) if !(0.0..1.0).contains(&f) => {
            return Err(CorpusError::Invalid(format!("--val-fraction {f} must be at least 0 and below 1")))
        }
        _ => {}
    }
    if !matches!(opts.tokenizer.as_str(), "gpt2" | "char" | "byte") {
        return Err(CorpusError::Invalid(format!("unknown tokenizer {:?}; expected gpt2, char or byte", opts.tokenizer)));
    }
    let sources = expand_inputs(&opts.inputs)?;
    let input_bytes: u64 = sources.iter().map(|s| s.bytes).sum();
    let out = StoreDir::open(&opts.out)?;
    let _lock = crate::out_lock::lock(&out)?;
    let doc_opts = DocOptions { text_field: opts.text_field.clone(), txt_docs: opts.txt_docs, segment_bytes: opts.segment_bytes };

    // First pass where needed: the character vocabulary, the number of documents.
    let wants_val = !matches!(opts.val, ValSplit::None | ValSplit::Docs(0));
    let (tokenizer, counted) = if opts.tokenizer == "char" {
        progress.phase("scan", input_bytes);
        let (chars, stats) = char_vocabulary(&sources, &doc_opts, progress)?;
        if chars.is_empty() {
            return Err(CorpusError::Empty(format!("no text in {} input file(s)", sources.len())));
        }
        (Tokenizer::Char { chars }, Some(stats))
    } else {
        let t = Tokenizer::fit(&opts.tokenizer, "").map_err(|e| CorpusError::Invalid(e.to_string()))?;
        if wants_val {
            progress.phase("scan", input_bytes);
            (t, Some(count_documents(&sources, &doc_opts, progress)?))
        } else {
            (t, None)
        }
    };
    if let Some(s) = counted {
        if s.documents == 0 {
            return Err(CorpusError::Empty(format!("no non-empty documents in {} input file(s)", sources.len())));
        }
    }
    let total = counted.map_or(0, |s| s.documents);
    let n_val = match opts.val {
        ValSplit::None => 0,
        ValSplit::Fraction(f) => (f * total as f64).round() as u64,
        ValSplit::Docs(n) => n,
    };
    if let ValSplit::Fraction(f) = opts.val {
        if f > 0.0 && n_val == 0 {
            // a job on this corpus would evaluate nothing, and `smelt eval` find no val split
            tracing::warn!(
                documents = total,
                val_fraction = f,
                "the validation split rounds to no document: {total} document(s) in all (a .txt file is one document \
                 unless --txt-docs paragraph or line splits it)"
            );
        }
    }
    if n_val > 0 && n_val >= total {
        return Err(CorpusError::Invalid(format!(
            "the validation split ({n_val} documents) would take every one of the {total} documents, leaving none to train on"
        )));
    }
    let splitter = Splitter { n_val, total };

    let vocab_size = tokenizer.corpus_vocab_size() as u64;
    let dtype = Dtype::for_vocab(vocab_size);
    let header = ShardHeader { dtype, tokens: 0, vocab_size: vocab_size as u32, eot_token: tokenizer.eot_token() };
    let settings = PrepareSettings {
        tokenizer: tokenizer.clone(),
        shard_tokens: opts.shard_tokens,
        text_field: opts.text_field.clone(),
        txt_docs: opts.txt_docs,
        val: opts.val,
        sources: sources.iter().map(Source::info).collect(),
        total_documents: total,
    };
    let mut report = PrepareReport {
        uri: out.uri().to_string(),
        complete: false,
        manifest: None,
        shards_written: 0,
        shards_kept: 0,
        resume_bytes_read: 0,
        input_files: sources.len(),
        input_bytes,
        tokenized_bytes: 0,
        tokens_written: 0,
        seconds: 0.0,
    };

    // A finished corpus here already?
    if let Some(m) = load_json::<Manifest>(&out, MANIFEST)? {
        if m.settings == settings {
            let bad = finished_shards_changed(&out, &m, opts.verify_resumed, progress, &mut report.resume_bytes_read)?;
            if !bad.is_empty() {
                let shards = m.train.shards.len() + m.val.shards.len();
                return Err(CorpusError::Invalid(format!(
                    "{uri} already holds a finished corpus, but {} of its {shards} shards no longer match its manifest:\n  {}\n\
                     remove {uri} and prepare again (a finished corpus keeps no progress to resume from)",
                    bad.len(),
                    bad.join("\n  "),
                    uri = out.uri(),
                )));
            }
            report.complete = true;
            report.shards_kept = (m.train.shards.len() + m.val.shards.len()) as u64;
            report.manifest = Some(m);
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        return Err(CorpusError::Invalid(format!(
            "{} already holds a finished corpus prepared differently ({}); choose another output or remove it",
            out.uri(),
            settings_diff(&m.settings, &settings)
        )));
    }

    // An interrupted run to resume?
    let mut kept_train = Vec::new();
    let mut kept_val = Vec::new();
    let mut reusable = std::collections::HashMap::new();
    let mut skipped_empty_before = 0;
    if let Some(p) = load_json::<ProgressFile>(&out, PROGRESS)? {
        if p.settings != settings {
            return Err(CorpusError::Invalid(format!(
                "{} holds a partial corpus from a run with other settings ({}); rerun with the same settings to resume, or remove {} and its shards",
                out.uri(),
                settings_diff(&p.settings, &settings),
                out.uri_of(PROGRESS)
            )));
        }
        skipped_empty_before = p.skipped_empty_documents;
        progress.phase(if opts.verify_resumed { "verify" } else { "check" }, p.train.iter().chain(&p.val).map(|r| r.info.bytes).sum());
        // one listing for every shard's size and ETag
        let listed: std::collections::HashMap<String, ObjectInfo> = out.list_info("")?.into_iter().collect();
        for (val, records, kept) in [(false, p.train, &mut kept_train), (true, p.val, &mut kept_val)] {
            let mut prefix = true;
            for (i, r) in records.into_iter().enumerate() {
                let ok = r.info.name == shard_name(val, i)
                    && shard_intact(&out, &r, listed.get(&r.info.name), &header, opts.verify_resumed, &mut report.resume_bytes_read)?;
                progress.advance(r.info.bytes);
                if ok && prefix {
                    kept.push(r);
                } else {
                    prefix = false;
                    if ok {
                        reusable.insert((val, i), r);
                    }
                }
            }
        }
    }
    for r in kept_train.iter().chain(&kept_val) {
        progress.shard(&r.info.name, true);
    }

    let builder = |val: bool, kept: &[ShardRecord]| SplitBuilder {
        val,
        shard_tokens: opts.shard_tokens,
        header,
        index: kept.len(),
        buf: Vec::new(),
        buf_docs: 0,
        resume: kept.last().map(|r| r.next).unwrap_or_default(),
        cur_doc: None,
        pos: 0,
        shards_made: 0,
    };
    let mut train = builder(false, &kept_train);
    let mut val = builder(true, &kept_val);
    let mut uploader = Uploader {
        out: &out,
        progress,
        file: ProgressFile {
            format: FORMAT.into(),
            settings: settings.clone(),
            skipped_empty_documents: skipped_empty_before,
            train: kept_train,
            val: kept_val,
        },
        reusable,
        written: 0,
        kept: 0,
        tokens_written: 0,
    };
    report.shards_kept = (uploader.file.train.len() + uploader.file.val.len()) as u64;

    progress.phase("tokenize", input_bytes);
    let tokenized = AtomicU64::new(0);
    let (stats, stopped, uploaded) = std::thread::scope(|scope| -> Result<(DocStats, bool, Uploader), CorpusError> {
        let (batch_tx, batch_rx): (SyncSender<Vec<Segment>>, Receiver<Vec<Segment>>) = sync_channel(2);
        let (train_resume, val_resume) = (train.resume.doc, val.resume.doc);
        let sources = &sources;
        let doc_opts = &doc_opts;
        let reader = scope.spawn(move || {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let r = for_each_segment(sources, doc_opts, &|n| progress.advance(n), &mut |s| {
                let resume = if splitter.is_val(s.doc) { val_resume } else { train_resume };
                if s.doc < resume {
                    return Ok(Flow::Continue); // finished in an earlier run
                }
                bytes += s.text.len();
                batch.push(s);
                if bytes >= opts.batch_bytes {
                    bytes = 0;
                    if batch_tx.send(std::mem::take(&mut batch)).is_err() {
                        return Ok(Flow::Stop);
                    }
                }
                Ok(Flow::Continue)
            });
            if !batch.is_empty() {
                let _ = batch_tx.send(batch);
            }
            r
        });

        let (job_tx, job_rx) = sync_channel::<ShardJob>(1);
        let up = scope.spawn(move || -> Result<Uploader, CorpusError> {
            for job in job_rx {
                uploader.handle(job)?;
            }
            Ok(uploader)
        });

        let made = std::cell::Cell::new(0u64);
        let limit_hit = std::cell::Cell::new(false);
        let mut failed: Option<CorpusError> = None;
        let mut send = |job: ShardJob| -> Result<(), CorpusError> {
            if opts.stop_after_shards.is_some_and(|n| made.get() >= n) {
                limit_hit.set(true); // a deliberate interruption: this shard is not written
                return Ok(());
            }
            made.set(made.get() + 1);
            job_tx.send(job).map_err(|_| CorpusError::Invalid("the shard uploader stopped".into()))
        };
        'batches: for batch in batch_rx.iter() {
            let ids: Vec<Result<Vec<u32>, CorpusError>> = batch
                .par_iter()
                .map(|s| {
                    tokenized.fetch_add(s.text.len() as u64, Ordering::Relaxed);
                    tokenizer.encode(&s.text).map_err(|e| CorpusError::Tokenize {
                        path: sources[s.source].shown(),
                        cause: std::sync::Arc::new(e),
                    })
                })
                .collect();
            for (s, ids) in batch.iter().zip(ids) {
                let ids = match ids {
                    Ok(ids) => ids,
                    Err(e) => {
                        failed = Some(e);
                        break 'batches;
                    }
                };
                let b = if splitter.is_val(s.doc) { &mut val } else { &mut train };
                if let Err(e) = b.push(s.doc, &ids, s.last, &mut send) {
                    failed = Some(e);
                    break 'batches;
                }
                if limit_hit.get() {
                    break 'batches;
                }
            }
        }
        drop(batch_rx); // a reader still sending sees the stop
        let stats = reader.join().expect("reader thread panicked");
        if failed.is_none() && !limit_hit.get() {
            match stats {
                Ok(s) => {
                    let end = Cursor { doc: s.documents, offset: 0 };
                    if let Err(e) = train.finish(end, &mut send).and_then(|_| val.finish(end, &mut send)) {
                        failed = Some(e);
                    }
                }
                Err(ref e) => failed = Some(e.clone()),
            }
        }
        let stopped = limit_hit.get();
        drop(job_tx);
        let uploaded = up.join().expect("uploader thread panicked");
        if let Some(e) = failed {
            // An upload error explains a refused send better than the send itself.
            return Err(uploaded.err().unwrap_or(e));
        }
        let uploaded = uploaded?;
        Ok((stats?, stopped, uploaded))
    })?;
    let mut uploader = uploaded;
    report.tokenized_bytes = tokenized.load(Ordering::Relaxed);
    report.shards_written = uploader.written;
    report.shards_kept += uploader.kept;
    report.tokens_written = uploader.tokens_written;
    uploader.file.skipped_empty_documents = stats.skipped_empty;

    if stopped {
        uploader.save()?;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    if stats.documents == 0 {
        return Err(CorpusError::Empty(format!("no non-empty documents in {} input file(s)", sources.len())));
    }
    let split_info = |records: &[ShardRecord]| SplitInfo {
        documents: records.iter().map(|r| r.info.documents).sum(),
        tokens: records.iter().map(|r| r.info.tokens).sum(),
        shards: records.iter().map(|r| r.info.clone()).collect(),
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer,
        vocab_size: vocab_size as u32,
        eot_token: header.eot_token,
        dtype,
        shard_tokens: opts.shard_tokens,
        train: split_info(&uploader.file.train),
        val: split_info(&uploader.file.val),
        skipped_empty_documents: stats.skipped_empty,
        settings,
    };
    if manifest.train.tokens == 0 {
        return Err(CorpusError::Empty("no training tokens".into()));
    }
    out.put(MANIFEST, serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    out.delete(PROGRESS)?;
    report.complete = true;
    report.manifest = Some(manifest);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_takes_exactly_n_evenly() {
        for (n, d) in [(0u64, 10u64), (1, 10), (3, 10), (9, 10), (5, 7), (1, 1_000_000)] {
            let s = Splitter { n_val: n, total: d };
            let picked: Vec<u64> = (0..d).filter(|&i| s.is_val(i)).collect();
            assert_eq!(picked.len() as u64, n, "{n}/{d}");
        }
        let s = Splitter { n_val: 2, total: 10 };
        assert_eq!((0..10).filter(|&i| s.is_val(i)).collect::<Vec<_>>(), [4, 9]);
    }
}
