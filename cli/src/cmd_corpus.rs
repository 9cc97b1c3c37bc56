//! `smelt corpus`: prepare token shards in object storage, and check them.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use smelt_corpus::{prepare, CorpusReader, PrepareOptions, Progress, ReaderOptions, TxtDocs, ValSplit};

#[derive(Subcommand, Debug)]
pub enum CorpusCommand {
    /// Tokenize .txt / .jsonl files (gzip too) or .parquet into shards + manifest.json at an object-store
    /// URI. Rerunning with the same arguments resumes an interrupted run.
    Prepare(PrepareArgs),
    /// Read every shard of a prepared corpus whole: sizes, headers, sha256, token ids.
    Verify(VerifyArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TxtDocsArg {
    /// The whole file is one document.
    File,
    /// Paragraphs (separated by blank lines) are documents.
    Paragraph,
    /// Every non-empty line is a document.
    Line,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// Input files, directories (searched recursively) or glob patterns; or object-store URIs:
    /// an object, a prefix (every .txt/.jsonl object under it) or a glob over keys, e.g.
    /// `s3://bucket/raw/*.jsonl.gz`; repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// gpt2 (OpenAI's GPT-2 BPE), char (the inputs' characters) or byte.
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    /// Output: a local path, file://, s3://, gs:// or az:// URI.
    #[arg(long)]
    pub out: String,
    /// The JSONL field (or Parquet column) that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// How .txt files are cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    pub txt_docs: TxtDocsArg,
    /// Tokens per shard.
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: u64,
    /// Fraction of the documents that go to the validation split.
    #[arg(long, conflicts_with = "val_docs", allow_negative_numbers = true)]
    pub val_fraction: Option<f64>,
    /// Number of documents that go to the validation split.
    #[arg(long)]
    pub val_docs: Option<u64>,
    /// When resuming, re-read every shard an earlier run finished and check its sha256 (by
    /// default they are kept on their size and ETag, or header, without being read).
    #[arg(long)]
    pub verify: bool,
    /// Stop after writing this many shards, without a manifest (a rerun continues).
    #[arg(long, hide = true)]
    pub stop_after_shards: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The corpus URI.
    pub corpus: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: CorpusCommand) -> Result<()> {
    match cmd {
        CorpusCommand::Prepare(a) => run_prepare(a),
        CorpusCommand::Verify(a) => run_verify(a),
    }
}

struct Bar {
    bar: ProgressBar,
    /// Off a terminal (a log file, CI) the bar draws nothing: a plain line every
    /// [`PLAIN_EVERY`] instead, so a long run is not silent.
    plain: Option<std::sync::Mutex<std::time::Instant>>,
}

const PLAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Bar {
    fn new(bar: ProgressBar) -> Bar {
        use std::io::IsTerminal;
        let plain = (!std::io::stderr().is_terminal()).then(|| std::sync::Mutex::new(std::time::Instant::now()));
        Bar { bar, plain }
    }

    /// `tokenize: 35.2 MiB of 78.0 MiB (45%), 12.1 MiB/s, ~4 s left; shard-00003`
    fn plain_line(&self) -> String {
        use indicatif::{BinaryBytes, HumanDuration};
        let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let secs = self.bar.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let mut line = format!("{}: {} of {}", self.bar.prefix(), BinaryBytes(done), BinaryBytes(total));
        if total > 0 {
            line += &format!(" ({:.0}%)", 100.0 * done as f64 / total as f64);
        }
        line += &format!(", {}/s", BinaryBytes(rate as u64));
        if rate > 0.0 && total > done {
            line += &format!(", ~{} left", HumanDuration(std::time::Duration::from_secs_f64((total - done) as f64 / rate)));
        }
        let msg = self.bar.message();
        if !msg.is_empty() {
            line += &format!("; {msg}");
        }
        line
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total_bytes: u64) {
        self.bar.set_length(total_bytes);
        self.bar.set_position(0);
        self.bar.reset_eta();
        self.bar.reset_elapsed();
        self.bar.set_prefix(name.to_string());
        if let Some(last) = &self.plain {
            *last.lock().unwrap() = std::time::Instant::now();
            if total_bytes > 0 {
                eprintln!("{name}: {}", indicatif::BinaryBytes(total_bytes));
            }
        }
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
        if let Some(last) = &self.plain {
            let mut last = last.lock().unwrap();
            if last.elapsed() >= PLAIN_EVERY {
                *last = std::time::Instant::now();
                eprintln!("{}", self.plain_line());
            }
        }
    }
    fn shard(&self, name: &str, kept: bool) {
        self.bar.set_message(format!("{name}{}", if kept { " (kept)" } else { "" }));
    }
}

fn run_prepare(a: PrepareArgs) -> Result<()> {
    // a memory store lives in one process: this one's, which ends with the command ("1 shard
    // written", and nothing anywhere)
    if a.out.trim().to_ascii_lowercase().starts_with("memory://") {
        bail!("--out {}: a memory:// store lives only inside one process and is gone when this command ends; give a path or an s3://, gs:// or az:// URI", a.out);
    }
    let val = match (a.val_fraction, a.val_docs) {
        (Some(f), _) => ValSplit::Fraction(f),
        (None, Some(n)) => ValSplit::Docs(n),
        (None, None) => ValSplit::None,
    };
    let opts = PrepareOptions {
        inputs: a.input,
        tokenizer: a.tokenizer,
        out: a.out,
        text_field: a.text_field,
        txt_docs: match a.txt_docs {
            TxtDocsArg::File => TxtDocs::File,
            TxtDocsArg::Paragraph => TxtDocs::Paragraph,
            TxtDocsArg::Line => TxtDocs::Line,
        },
        shard_tokens: a.shard_tokens,
        val,
        stop_after_shards: a.stop_after_shards,
        verify_resumed: a.verify,
        ..PrepareOptions::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(
        "{prefix:>8} {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg} [{elapsed_precise} < {eta_precise}]",
    )?);
    let progress = Bar::new(bar);
    let report = prepare(&opts, &progress);
    progress.bar.finish_and_clear();
    let report = report?;
    let m = report.manifest.as_ref();
    if a.json {
        println!(
            "{}",
            json!({
                "uri": report.uri,
                "complete": report.complete,
                "shards_written": report.shards_written,
                "shards_kept": report.shards_kept,
                "resume_bytes_read": report.resume_bytes_read,
                "input_files": report.input_files,
                "input_bytes": report.input_bytes,
                "tokenized_bytes": report.tokenized_bytes,
                "tokens_written": report.tokens_written,
                "seconds": report.seconds,
                "tokenizer": m.map(|m| m.tokenizer.kind()),
                "vocab_size": m.map(|m| m.vocab_size),
                "train_tokens": m.map(|m| m.train.tokens),
                "train_documents": m.map(|m| m.train.documents),
                "val_tokens": m.map(|m| m.val.tokens),
                "val_documents": m.map(|m| m.val.documents),
            })
        );
    } else if let Some(m) = m {
        println!(
            "{}: {} train tokens in {} ({}), {} validation tokens in {} ({}); \
             tokenizer {} (vocabulary {}, end-of-text {}), {}; {} written, {} kept; {:.1} MB of text in {:.1} s",
            report.uri,
            m.train.tokens,
            counted(m.train.shards.len() as u64, "shard"),
            counted(m.train.documents, "document"),
            m.val.tokens,
            counted(m.val.shards.len() as u64, "shard"),
            counted(m.val.documents, "document"),
            m.tokenizer.kind(),
            m.vocab_size,
            m.eot_token,
            m.dtype.name(),
            counted(report.shards_written, "shard"),
            report.shards_kept,
            report.tokenized_bytes as f64 / 1e6,
            report.seconds
        );
    } else {
        println!(
            "{}: stopped after {} ({} kept); rerun the same command to continue",
            report.uri,
            counted(report.shards_written, "new shard"),
            report.shards_kept
        );
    }
    Ok(())
}

/// `n` and `noun`, plural unless one: "1 shard", "3 shards".
fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn run_verify(a: VerifyArgs) -> Result<()> {
    // a corpus is its directory: its manifest's path read as one said "manifest.json/manifest.json:
    // Not a directory"
    if let Some(dir) = a.corpus.trim_end_matches('/').strip_suffix("manifest.json").filter(|d| d.is_empty() || d.ends_with('/')) {
        let dir = if dir.is_empty() { "." } else { dir.trim_end_matches('/') };
        bail!("{}: a corpus is named by its directory, not its manifest: give {dir}", a.corpus);
    }
    let r = CorpusReader::open_with(&a.corpus, ReaderOptions::default())?;
    let v = match r.verify() {
        Ok(v) => v,
        Err(smelt_corpus::CorpusError::BadShards { uri, shards, bad }) if a.json => {
            let bad: Vec<_> = bad.iter().map(|e| json!({"error": e.to_string()})).collect();
            println!("{}", json!({"uri": uri, "ok": false, "shards": shards, "bad": bad}));
            std::process::exit(1);
        }
        Err(e) => return Err(e.into()),
    };
    let m = r.manifest();
    if v.tokens != m.train.tokens + m.val.tokens {
        bail!("{}: read {} tokens, the manifest lists {}", a.corpus, v.tokens, m.train.tokens + m.val.tokens);
    }
    if a.json {
        println!("{}", json!({"uri": a.corpus, "ok": true, "shards": v.shards, "bytes": v.bytes, "tokens": v.tokens}));
    } else {
        println!("{}: ok — {} shard{}, {} tokens, {} bytes; every sha256 matches", a.corpus, v.shards, if v.shards == 1 { "" } else { "s" }, v.tokens, v.bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_progress_line_says_how_far_how_fast_and_what() {
        let bar = Bar::new(ProgressBar::hidden());
        bar.phase("tokenize", 80 << 20);
        bar.shard("shard-00003", false);
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.advance(20 << 20);
        let line = bar.plain_line();
        assert!(line.starts_with("tokenize: 20.00 MiB of 80.00 MiB (25%), "), "{line}");
        assert!(line.contains("/s, ~") && line.contains(" left; shard-00003"), "{line}");
    }
}
