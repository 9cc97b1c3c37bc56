//! Input files of `corpus prepare`: which files ([`expand_inputs`]) and the documents in them
//! ([`for_each_segment`]).
//!
//! - `.txt`: one document per file, per paragraph or per line ([`TxtDocs`]).
//! - `.jsonl`: one JSON object per line; the document is the string in field `text_field`. Blank
//!   lines are skipped; anything else that is not an object with that string field is an error
//!   naming the file and line.
//! - Either may be gzip-compressed (`.txt.gz`, `.jsonl.gz`; concatenated gzip members are read
//!   as one stream).
//! - `.parquet`: one document per row, the string column `text_field` (`parquet_input.rs`).
//!
//! Documents with empty text are skipped (and counted). Every other document gets the next
//! index, in input order. Long documents are handed out in segments of about `segment_bytes`,
//! cut where [`crate::gpt2::safe_split`] allows, so one huge file is tokenized in parallel and never
//! held whole in memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::error::CorpusError;
use crate::format::{SourceInfo, TxtDocs};
use crate::store::StoreDir;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Txt,
    Jsonl,
    Parquet,
}

/// Where an input file is.
#[derive(Clone, Debug)]
pub enum Location {
    Local(PathBuf),
    /// Object `name` of an object-store directory.
    Object { dir: StoreDir, name: String },
}

/// One input file.
#[derive(Clone, Debug)]
pub struct Source {
    pub location: Location,
    pub format: Format,
    pub gz: bool,
    /// Size on disk (or in the store).
    pub bytes: u64,
    /// A local file's modification time (ms since the Unix epoch).
    pub modified_ms: Option<u64>,
}

impl Source {
    pub fn info(&self) -> SourceInfo {
        SourceInfo { path: self.shown(), bytes: self.bytes, modified_ms: self.modified_ms }
    }
    /// How errors name it: the path, or the object's URI.
    pub fn shown(&self) -> String {
        match &self.location {
            Location::Local(p) => p.display().to_string(),
            Location::Object { dir, name } => dir.uri_of(name),
        }
    }
    /// The file's bytes, streamed.
    fn open(&self) -> Result<Box<dyn Read>, CorpusError> {
        match &self.location {
            Location::Local(p) => Ok(Box::new(File::open(p).map_err(|e| CorpusError::io(self.shown(), e))?)),
            Location::Object { dir, name } => Ok(Box::new(crate::object_read::ObjectReader::open(dir, name))),
        }
    }
}

fn classify(path: &Path) -> Option<(Format, bool)> {
    classify_name(path.file_name()?.to_str()?)
}

fn classify_name(name: &str) -> Option<(Format, bool)> {
    let name = name.rsplit('/').next()?.to_ascii_lowercase();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_string(), true),
        None => (name, false),
    };
    if stem.ends_with(".txt") {
        Some((Format::Txt, gz))
    } else if stem.ends_with(".jsonl") {
        Some((Format::Jsonl, gz))
    } else if stem.ends_with(".parquet") && !gz {
        Some((Format::Parquet, false))
    } else {
        None
    }
}

/// The input files under `dir`, recursively; the others (not hidden) are said, once per
/// directory named, rather than left out without a word.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CorpusError> {
    let mut other = Vec::new();
    walk_into(dir, out, &mut other)?;
    if let Some(first) = other.first() {
        tracing::warn!(
            dir = %dir.display(),
            left_out = other.len(),
            first = %first.display(),
            "files of other kinds than .txt, .jsonl (optionally .gz) and .parquet are left out"
        );
    }
    Ok(())
}

fn walk_into(dir: &Path, out: &mut Vec<PathBuf>, other: &mut Vec<PathBuf>) -> Result<(), CorpusError> {
    let shown = dir.display().to_string();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CorpusError::io(&shown, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| CorpusError::io(&shown, e))?;
    entries.sort();
    for p in entries {
        if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        if p.is_dir() {
            walk_into(&p, out, other)?;
        } else if classify(&p).is_some() {
            out.push(p);
        } else {
            other.push(p);
        }
    }
    Ok(())
}

/// The input files named by `inputs` — files, directories (searched recursively for `.txt`,
/// `.jsonl` and their `.gz`, and `.parquet`; hidden entries skipped) and glob patterns — in the order given,
/// each directory's and pattern's files sorted by path, duplicates dropped.
///
/// Object-store URIs (`s3://bucket/prefix/*.jsonl.gz`, `gs://`, `az://`, `file://`,
/// `memory://`) are listed instead: a URI naming an object is that object; one naming a prefix
/// is every `.txt`/`.jsonl` (gzipped or not) object under it; a glob in the key part is matched
/// against the keys (`*` and `?` stay within one `/`-separated segment, `**` crosses them).
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<Source>, CorpusError> {
    let mut paths: Vec<(Location, Option<u64>)> = Vec::new();
    for input in inputs {
        if crate::store::has_scheme(input) {
            paths.extend(crate::object_read::expand_uri(input)?.into_iter().map(|(l, n)| (l, Some(n))));
            continue;
        }
        let p = Path::new(input);
        if p.exists() {
            if p.is_dir() {
                let mut found = Vec::new();
                walk(p, &mut found)?;
                if found.is_empty() {
                    return Err(CorpusError::input(input, None, "directory holds no .txt, .jsonl, .txt.gz, .jsonl.gz or .parquet files"));
                }
                paths.extend(found.into_iter().map(|p| (Location::Local(p), None)));
            } else {
                paths.push((Location::Local(p.to_path_buf()), None));
            }
        } else if input.contains(['*', '?', '[']) {
            let pattern = glob::glob(input).map_err(|e| CorpusError::input(input, None, format!("bad glob pattern: {e}")))?;
            let mut matched = Vec::new();
            for m in pattern {
                let m = m.map_err(|e| CorpusError::io(e.path().display().to_string(), e.into()))?;
                if m.is_dir() {
                    walk(&m, &mut matched)?;
                } else {
                    matched.push(m);
                }
            }
            if matched.is_empty() {
                return Err(CorpusError::input(input, None, "glob pattern matches no files"));
            }
            matched.sort();
            paths.extend(matched.into_iter().map(|p| (Location::Local(p), None)));
        } else {
            return Err(CorpusError::input(input, None, "input not found"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut sources = Vec::new();
    for (location, listed) in paths {
        let (key, name, bytes, modified_ms) = match &location {
            Location::Local(path) => {
                let key = path.canonicalize().unwrap_or_else(|_| path.clone()).display().to_string();
                let shown = path.display().to_string();
                let meta = std::fs::metadata(path).map_err(|e| CorpusError::io(&shown, e))?;
                let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64);
                (key, shown, meta.len(), modified)
            }
            Location::Object { dir, name } => {
                let uri = dir.uri_of(name);
                let bytes = match listed {
                    Some(n) => n,
                    None => dir.size(name)?.ok_or_else(|| CorpusError::input(&uri, None, "input not found"))?,
                };
                (uri.clone(), uri, bytes, None)
            }
        };
        if !seen.insert(key) {
            // a directory and a pattern over it name the same files: read once, and said
            tracing::info!(input = %name, "input named more than once: read once");
            continue;
        }
        let (format, gz) = classify_name(&name).ok_or_else(|| {
            CorpusError::input(&name, None, "unsupported input: expected a .txt or .jsonl file, optionally gzipped (.gz), or a .parquet file")
        })?;
        sources.push(Source { location, format, gz, bytes, modified_ms });
    }
    if sources.is_empty() {
        return Err(CorpusError::Empty("no input files".into()));
    }
    Ok(sources)
}

/// Options that decide where documents begin and end.
#[derive(Clone, Debug)]
pub struct DocOptions {
    pub text_field: String,
    pub txt_docs: TxtDocs,
    /// Long documents are handed out in pieces of about this many bytes.
    pub segment_bytes: usize,
}

/// A piece of document `doc`'s text; `last` marks its final piece.
#[derive(Clone, Debug)]
pub struct Segment {
    pub doc: u64,
    pub source: usize,
    pub text: String,
    pub last: bool,
}

/// Document counts of one pass over the inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DocStats {
    pub documents: u64,
    pub skipped_empty: u64,
}

/// What the consumer of segments wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

struct Counting<'a, R> {
    inner: R,
    on_bytes: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}


struct Emitter<'a> {
    next_doc: u64,
    stats: DocStats,
    segment_bytes: usize,
    emit: &'a mut dyn FnMut(Segment) -> Result<Flow, CorpusError>,
}

impl Emitter<'_> {
    /// Emits a whole in-memory document (cut into segments if long). `Stop` passes through.
    fn document(&mut self, source: usize, text: String) -> Result<Flow, CorpusError> {
        if text.is_empty() {
            self.stats.skipped_empty += 1;
            return Ok(Flow::Continue);
        }
        let doc = self.next_doc;
        self.next_doc += 1;
        self.stats.documents += 1;
        if text.len() <= self.segment_bytes * 2 {
            return (self.emit)(Segment { doc, source, text, last: true });
        }
        let mut rest = text.as_str();
        while let Some(i) = crate::gpt2::safe_split(rest, self.segment_bytes).filter(|_| rest.len() > self.segment_bytes * 2) {
            let (l, r) = rest.split_at(i);
            if (self.emit)(Segment { doc, source, text: l.to_string(), last: false })? == Flow::Stop {
                return Ok(Flow::Stop);
            }
            rest = r;
        }
        (self.emit)(Segment { doc, source, text: rest.to_string(), last: true })
    }
}

fn utf8(bytes: Vec<u8>, shown: &str, line: Option<u64>, offset: u64) -> Result<String, CorpusError> {
    String::from_utf8(bytes).map_err(|e| {
        let at = offset + e.utf8_error().valid_up_to() as u64;
        CorpusError::input(shown, line, format!("invalid UTF-8 at byte {at} (of the decompressed text)"))
    })
}

/// Extracts one string field of a JSON object without building the rest.
struct FieldSeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Result<String, String>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Result<String, String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 && found.is_none() {
                let v: serde_json::Value = map.next_value()?;
                found = Some(match v {
                    serde_json::Value::String(s) => Ok(s),
                    other => Err(format!("field {:?} is {}, not a string", self.0, kind_of(&other))),
                });
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found.unwrap_or_else(|| Err(format!("no field {:?} (choose the field with --text-field)", self.0))))
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn jsonl_text(line: &str, field: &str) -> Result<String, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let r = FieldSeed(field).deserialize(&mut de).map_err(|e| {
        if e.is_data() {
            "not a JSON object".to_string()
        } else {
            format!("not valid JSON: {e}")
        }
    })?;
    de.end().map_err(|e| format!("not valid JSON: {e}"))?;
    r
}

fn strip_eol(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    // CRLF; and a CRLF file's last line cut before its LF (`head -c`) ends in a CR alone
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

/// Reads every document of `sources` in order and hands its text to `emit`, segment by segment.
/// `on_bytes` is told how many bytes of the files (compressed, for `.gz`) were read. Stops early,
/// without error, when `emit` returns [`Flow::Stop`].
pub fn for_each_segment(
    sources: &[Source],
    opts: &DocOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
    emit: &mut dyn FnMut(Segment) -> Result<Flow, CorpusError>,
) -> Result<DocStats, CorpusError> {
    let mut em = Emitter { next_doc: 0, stats: DocStats::default(), segment_bytes: opts.segment_bytes.max(1), emit };
    for (si, src) in sources.iter().enumerate() {
        let shown = src.shown();
        if src.format == Format::Parquet {
            if parquet_documents(src, &shown, si, &opts.text_field, on_bytes, &mut em)? == Flow::Stop {
                break;
            }
            continue;
        }
        let counted = Counting { inner: src.open()?, on_bytes };
        let raw: Box<dyn Read> = if src.gz { Box::new(MultiGzDecoder::new(counted)) } else { Box::new(counted) };
        let mut reader = BufReader::with_capacity(1 << 20, raw);
        let io = |e: std::io::Error| {
            if src.gz && matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) {
                CorpusError::input(&shown, None, format!("corrupt gzip data: {e}"))
            } else {
                CorpusError::io(&shown, e)
            }
        };
        // a UTF-8 byte-order mark (Notepad and Excel's "UTF-8" write one) is no text: left out, as
        // Python's utf-8-sig does, or a .jsonl's first line is no JSON and a .txt's first token a BOM
        let bom = skip_utf8_bom(&mut reader).map_err(io)?;
        let flow = match (src.format, opts.txt_docs) {
            (Format::Txt, TxtDocs::File) => {
                // Stream the file: cut segments at safe points as bytes arrive.
                let doc = em.next_doc;
                let mut buf: Vec<u8> = Vec::new();
                let mut consumed = bom; // bytes of the file already emitted
                let mut emitted_any = false;
                let mut flow = Flow::Continue;
                let mut eof = false;
                while !eof && flow == Flow::Continue {
                    let want = em.segment_bytes * 2;
                    let n = (&mut reader).take(want as u64).read_to_end(&mut buf).map_err(io)?;
                    eof = n == 0;
                    while buf.len() > em.segment_bytes * 2 {
                        let Some(i) = crate::gpt2::safe_split_bytes(&buf, em.segment_bytes) else { break };
                        let rest = buf.split_off(i);
                        let piece = std::mem::replace(&mut buf, rest);
                        let len = piece.len() as u64;
                        let text = utf8(piece, &shown, None, consumed)?;
                        consumed += len;
                        if !emitted_any {
                            em.next_doc += 1;
                            em.stats.documents += 1;
                            emitted_any = true;
                        }
                        flow = (em.emit)(Segment { doc, source: si, text, last: false })?;
                        if flow == Flow::Stop {
                            break;
                        }
                    }
                }
                if flow == Flow::Stop {
                    Flow::Stop
                } else if !emitted_any && buf.is_empty() {
                    em.stats.skipped_empty += 1;
                    Flow::Continue
                } else {
                    let text = utf8(buf, &shown, None, consumed)?;
                    if !emitted_any {
                        em.next_doc += 1;
                        em.stats.documents += 1;
                    }
                    (em.emit)(Segment { doc, source: si, text, last: true })?
                }
            }
            (Format::Txt, mode) => {
                let mut para = String::new();
                let mut line_no = 0u64;
                let mut offset = bom;
                let mut flow = Flow::Continue;
                loop {
                    let mut line = Vec::new();
                    let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    line_no += 1;
                    let text = utf8(strip_eol(line), &shown, Some(line_no), offset)?;
                    offset += n as u64;
                    flow = match mode {
                        TxtDocs::Line => {
                            if text.trim().is_empty() {
                                Flow::Continue
                            } else {
                                em.document(si, text)?
                            }
                        }
                        _ => {
                            if text.trim().is_empty() {
                                if para.is_empty() {
                                    Flow::Continue
                                } else {
                                    em.document(si, std::mem::take(&mut para))?
                                }
                            } else {
                                if !para.is_empty() {
                                    para.push('\n');
                                }
                                para.push_str(&text);
                                Flow::Continue
                            }
                        }
                    };
                    if flow == Flow::Stop {
                        break;
                    }
                }
                if flow == Flow::Continue && !para.is_empty() {
                    em.document(si, para)?
                } else {
                    flow
                }
            }
            (Format::Parquet, _) => unreachable!("parquet is read above, without a byte stream"),
            (Format::Jsonl, _) => {
                let mut line_no = 0u64;
                let mut offset = bom;
                let mut flow = Flow::Continue;
                loop {
                    let mut line = Vec::new();
                    let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    line_no += 1;
                    let raw = utf8(strip_eol(line), &shown, Some(line_no), offset)?;
                    offset += n as u64;
                    if raw.trim().is_empty() {
                        continue;
                    }
                    let text = jsonl_text(&raw, &opts.text_field).map_err(|r| CorpusError::input(&shown, Some(line_no), r))?;
                    flow = em.document(si, text)?;
                    if flow == Flow::Stop {
                        break;
                    }
                }
                flow
            }
        };
        if flow == Flow::Stop {
            break;
        }
    }
    Ok(em.stats)
}

/// A text file's contents as a string, less a leading UTF-8 byte-order mark (as `corpus prepare`
/// reads its inputs): `smelt train --text`, `eval --text` and a job's `data.text` read the same
/// characters from a file Notepad saved, not a U+FEFF token first.
pub fn read_text_file(path: impl AsRef<Path>) -> std::io::Result<String> {
    let mut text = std::fs::read_to_string(path)?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// A UTF-8 byte-order mark (U+FEFF's bytes), which readers of text here leave out.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` less a leading UTF-8 byte-order mark (a whole file read at once: fine-tuning JSONL,
/// `--choices`).
pub fn strip_utf8_bom(bytes: &mut Vec<u8>) {
    if bytes.starts_with(UTF8_BOM) {
        bytes.drain(..UTF8_BOM.len());
    }
}

/// Consumes a UTF-8 byte-order mark at the start of `r`; its length (0 or 3).
fn skip_utf8_bom(r: &mut impl BufRead) -> std::io::Result<u64> {
    if r.fill_buf()?.starts_with(UTF8_BOM) {
        r.consume(UTF8_BOM.len());
        return Ok(UTF8_BOM.len() as u64);
    }
    Ok(0)
}

/// The documents of Parquet input `src` (source `si`), one per row of column `field`. Parquet is
/// read from its footer: a local file in place, an object by ranged GETs of the footer and that
/// column's chunks (`parquet_object.rs`), never as one byte stream.
fn parquet_documents(src: &Source, shown: &str, si: usize, field: &str, on_bytes: &(dyn Fn(u64) + Sync), em: &mut Emitter) -> Result<Flow, CorpusError> {
    let mut flow = Flow::Continue;
    let mut each = |text: Option<String>| {
        flow = em.document(si, text.unwrap_or_default())?;
        Ok(flow == Flow::Continue)
    };
    // progress by row groups: the file's bytes in proportion to the groups read (only one
    // column of them is, but each group is the same share of the work)
    let reported = std::cell::Cell::new(0u64);
    let progress = |at: crate::parquet_input::RowGroupAt| {
        let upto = src.bytes * at.index as u64 / at.of.max(1) as u64;
        on_bytes(upto - reported.replace(upto));
    };
    match &src.location {
        Location::Local(p) => {
            let file = File::open(p).map_err(|e| CorpusError::io(shown, e))?;
            crate::parquet_input::for_each_text(file, shown, field, &|at| Ok(progress(at)), &mut each)?;
        }
        Location::Object { dir, name } => {
            let chunks = crate::parquet_object::ObjectChunks::new(dir.clone(), name.clone(), src.bytes);
            let prefetch = |at: crate::parquet_input::RowGroupAt| {
                progress(at);
                chunks.prefetch(at.start, at.len).map_err(|e| e.to_string())
            };
            crate::parquet_input::for_each_text(chunks.clone(), shown, field, &prefetch, &mut each)?;
            tracing::debug!(input = %shown, fetched = chunks.fetched(), size = src.bytes, "parquet object read by ranges");
        }
    }
    on_bytes(src.bytes - reported.get());
    Ok(flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(sources: &[Source], opts: &DocOptions) -> Result<(Vec<(u64, String)>, DocStats), CorpusError> {
        let mut docs: Vec<(u64, String)> = Vec::new();
        let stats = for_each_segment(sources, opts, &|_| {}, &mut |s| {
            match docs.last_mut() {
                Some((d, t)) if *d == s.doc => t.push_str(&s.text),
                _ => docs.push((s.doc, s.text)),
            }
            Ok(Flow::Continue)
        })?;
        Ok((docs, stats))
    }

    #[test]
    fn json_field_extraction() {
        assert_eq!(jsonl_text(r#"{"id":1,"text":"hi","x":{"text":2}}"#, "text"), Ok("hi".into()));
        assert!(jsonl_text(r#"{"id":1}"#, "text").unwrap_err().contains("no field \"text\""));
        assert!(jsonl_text(r#"{"text":3}"#, "text").unwrap_err().contains("a number"));
        assert!(jsonl_text(r#"[1]"#, "text").unwrap_err().contains("not a JSON object"));
        assert!(jsonl_text(r#"{"text":"a"} x"#, "text").unwrap_err().contains("not valid JSON"));
        assert!(jsonl_text(r#"{"text":"a""#, "text").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn txt_modes_and_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "one line\r\ntwo lines here\n\n\nthird para\n").unwrap();
        let src = expand_inputs(&[p.display().to_string()]).unwrap();
        let mut o = DocOptions { text_field: "text".into(), txt_docs: TxtDocs::File, segment_bytes: 1 << 20 };
        let (d, _) = collect(&src, &o).unwrap();
        assert_eq!(d, [(0, "one line\r\ntwo lines here\n\n\nthird para\n".to_string())]);
        o.txt_docs = TxtDocs::Paragraph;
        assert_eq!(collect(&src, &o).unwrap().0, [(0, "one line\ntwo lines here".into()), (1, "third para".into())]);
        o.txt_docs = TxtDocs::Line;
        let (d, _) = collect(&src, &o).unwrap();
        assert_eq!(d.len(), 3);
        // a CRLF file's last line without its LF keeps no CR
        std::fs::write(&p, "one\r\ntwo\r").unwrap();
        assert_eq!(collect(&src, &o).unwrap().0, [(0, "one".into()), (1, "two".into())]);
        // a long file arrives in several segments and reassembles exactly
        let long: String = (0..3000).map(|i| format!("word{i} and more\n")).collect();
        std::fs::write(&p, &long).unwrap();
        o.txt_docs = TxtDocs::File;
        o.segment_bytes = 1000;
        let mut n = 0;
        let mut text = String::new();
        for_each_segment(&src, &o, &|_| {}, &mut |s| {
            n += 1;
            text.push_str(&s.text);
            Ok(Flow::Continue)
        })
        .unwrap();
        assert!(n > 10, "{n}");
        assert_eq!(text, long);
    }

    #[test]
    fn a_utf8_byte_order_mark_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (txt, jsonl) = (dir.path().join("a.txt"), dir.path().join("b.jsonl"));
        std::fs::write(&txt, "\u{feff}first\n\nsecond \u{feff} kept inside\n").unwrap();
        std::fs::write(&jsonl, "\u{feff}{\"text\":\"one\"}\n{\"text\":\"two\"}\n").unwrap();
        let mut o = DocOptions { text_field: "text".into(), txt_docs: TxtDocs::Paragraph, segment_bytes: 1 << 20 };
        let src = expand_inputs(&[txt.display().to_string(), jsonl.display().to_string()]).unwrap();
        let texts = |o: &DocOptions| collect(&src, o).unwrap().0.into_iter().map(|(_, t)| t).collect::<Vec<_>>();
        assert_eq!(texts(&o), ["first", "second \u{feff} kept inside", "one", "two"]);
        o.txt_docs = TxtDocs::File;
        assert_eq!(texts(&o), ["first\n\nsecond \u{feff} kept inside\n", "one", "two"]);
        // gzipped the same
        let gz = dir.path().join("c.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, "\u{feff}{\"text\":\"zipped\"}\n".as_bytes()).unwrap();
        e.finish().unwrap();
        let src = expand_inputs(&[gz.display().to_string()]).unwrap();
        assert_eq!(collect(&src, &o).unwrap().0, [(0, "zipped".to_string())]);
        // the whole-file reader of `smelt train` and `data.text` the same
        assert_eq!(read_text_file(&txt).unwrap(), "first\n\nsecond \u{feff} kept inside\n");
    }
}
