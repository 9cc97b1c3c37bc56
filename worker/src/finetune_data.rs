//! Labeled examples for fine-tuning, JSONL with one object per line, tokenized with the
//! parent model's tokenizer:
//! - classification: `{"text": "...", "label": 1}` (labels 0..num_labels);
//! - SFT: `{"prompt": "...", "response": "..."}`.
//!
//! Errors name the file, the line and the field. Blank lines are skipped; other fields are
//! allowed (datasets carry ids and sources).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use smelt_corpus::store::StoreDir;
use smelt_corpus::Tokenizer;
use smelt_engine::model::heads::sft_example;

/// A text and its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassExample {
    /// Token ids, cut to the job's sequence length (the start is kept).
    pub ids: Vec<u32>,
    pub label: u32,
}

/// A prompt/response pair as one window: inputs and targets (`IGNORE_INDEX` except on the
/// response), unpadded (padding happens per batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

/// A prompt and its response as token ids, for a sequence-to-sequence model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairExample {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

/// Reads a whole file: a local path, or an object-store URI (`file://`, `s3://`, ...); a
/// leading UTF-8 byte-order mark left out (a JSONL file Excel saved: its first line is JSON).
pub fn read_location(location: &str) -> Result<Vec<u8>> {
    let mut bytes = if location.contains("://") {
        let (dir, name) = location.trim_end_matches('/').rsplit_once('/').ok_or_else(|| anyhow!("{location}: no object name"))?;
        let store = StoreDir::open(dir)?;
        store.get(name)?.to_vec()
    } else {
        std::fs::read(location).with_context(|| local_read_context(location, location, "an object store URI"))?
    };
    smelt_corpus::input::strip_utf8_bom(&mut bytes);
    Ok(bytes)
}

/// What a failed read of a local file named in a job spec (`what`: the file, maybe with its
/// field) says: a relative path is the worker's, on the worker's machine (not the spec file's,
/// nor the submitting machine's); `instead` is the other way to name the data.
pub(crate) fn local_read_context(what: &str, path: &str, instead: &str) -> String {
    if std::path::Path::new(path).is_relative() {
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "?".into());
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "this worker's machine".into());
        // (also read by local commands, `smelt train --choices`: no worker there)
        format!("reading {what} (relative to the working directory {cwd} on {host}, in a job the worker's: give an absolute path, or {instead})")
    } else {
        format!("reading {what} (on {}, in a job the worker's machine)", std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "this machine".into()))
    }
}

/// Non-blank lines of a JSONL file, parsed: (1-based line number, object).
fn jsonl(location: &str) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let bytes = read_location(location)?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow!("{location}: not UTF-8 text ({e})"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push((n, m)),
            Ok(_) => bail!("{location} line {n}: expected a JSON object"),
            Err(e) => bail!("{location} line {n}: not JSON: {e}"),
        }
    }
    if out.is_empty() {
        bail!("{location}: no examples");
    }
    Ok(out)
}

fn string_field<'a>(m: &'a serde_json::Map<String, Value>, field: &str, location: &str, n: usize) -> Result<&'a str> {
    match m.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{location} line {n}: field {field:?} must be a string, found {other}"),
        None => bail!("{location} line {n}: missing field {field:?}"),
    }
}

/// Examples cut to fit, counted so that the run says so once (a classifier whose label depends on
/// a text's end learns nothing from texts cut before it, without a word otherwise).
#[derive(Default)]
struct Cuts {
    count: usize,
    longest: usize,
}

impl Cuts {
    /// Notes an example of `len` tokens kept to its first `max`.
    fn note(&mut self, len: usize, max: usize) {
        if len > max {
            self.count += 1;
            self.longest = self.longest.max(len);
        }
    }
    /// Warns (into the job's log) when any example was cut: `what` names the part and the limit.
    fn report(&self, location: &str, of: usize, what: &str) {
        self.report_kept(location, of, what, "keep only their first tokens");
    }
    /// As `report`, saying what of them is kept.
    fn report_kept(&self, location: &str, of: usize, what: &str, kept: &str) {
        if self.count > 0 {
            tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, "{location}: {} of {of} examples have {what}, and {kept} (the longest has {} tokens)", self.count, self.longest);
        }
    }
}

/// Classification examples; texts longer than `seq_len` tokens keep their first `seq_len`
/// (counted and warned about).
pub fn load_classification(location: &str, tokenizer: &Tokenizer, num_labels: usize, seq_len: usize) -> Result<Vec<ClassExample>> {
    load_classification_within(location, tokenizer, num_labels, seq_len, &format!("train.seq_len = {seq_len} tokens"))
}

/// [`load_classification`] where the text gets `seq_len` tokens of a window, `limit` saying so
/// in the warning about texts cut (a BERT's `[CLS]` and `[SEP]` take two of train.seq_len).
pub fn load_classification_within(location: &str, tokenizer: &Tokenizer, num_labels: usize, seq_len: usize, limit: &str) -> Result<Vec<ClassExample>> {
    let mut cuts = Cuts::default();
    let examples: Vec<ClassExample> = jsonl(location)?
        .into_iter()
        .map(|(n, m)| {
            let text = string_field(&m, "text", location, n)?;
            let label = match m.get("label") {
                // 1.0 is not read as 1: a float label more likely means a regression target
                Some(Value::Number(x)) if x.is_f64() => {
                    bail!("{location} line {n}: field \"label\" = {x} must be an integer class index from 0 to {}", num_labels.saturating_sub(1))
                }
                Some(Value::Number(x)) => x.as_u64().filter(|&l| (l as usize) < num_labels),
                Some(other) => bail!("{location} line {n}: field \"label\" must be an integer from 0 to {}, found {other}", num_labels.saturating_sub(1)),
                None => bail!("{location} line {n}: missing field \"label\""),
            }
            .ok_or_else(|| anyhow!("{location} line {n}: field \"label\" = {} is not a class: labels run from 0 to {} (finetune.num_labels = {num_labels})", m["label"], num_labels.saturating_sub(1)))?;
            let mut ids = tokenizer.encode(text).with_context(|| format!("{location} line {n}: field \"text\""))?;
            if ids.is_empty() {
                bail!("{location} line {n}: field \"text\" is empty");
            }
            cuts.note(ids.len(), seq_len);
            ids.truncate(seq_len);
            Ok(ClassExample { ids, label: label as u32 })
        })
        .collect::<Result<_>>()?;
    cuts.report(location, examples.len(), &format!("a text longer than {limit}"));
    Ok(examples)
}

/// SFT examples as windows of at most `seq_len` inputs. `eot`, when the model has such an id,
/// ends every response, so the model learns where to stop.
pub fn load_sft(location: &str, tokenizer: &Tokenizer, seq_len: usize, eot: Option<u32>) -> Result<Vec<SftExample>> {
    let mut cuts = Cuts::default();
    let examples: Vec<SftExample> = jsonl(location)?
        .into_iter()
        .map(|(n, m)| {
            let prompt = string_field(&m, "prompt", location, n)?;
            let response = string_field(&m, "response", location, n)?;
            let p = tokenizer.encode(prompt).with_context(|| format!("{location} line {n}: field \"prompt\""))?;
            let mut r = tokenizer.encode(response).with_context(|| format!("{location} line {n}: field \"response\""))?;
            if r.is_empty() {
                bail!("{location} line {n}: field \"response\" is empty: nothing to learn");
            }
            r.extend(eot);
            // Padding is added per batch; the pad value here is cut off again below.
            let (mut inputs, mut targets) = sft_example(&p, &r, seq_len, 0).expect("response is not empty");
            cuts.note(p.len() + r.len() - 1, seq_len);
            let real = (p.len() + r.len() - 1).min(seq_len);
            inputs.truncate(real);
            targets.truncate(real);
            Ok(SftExample { inputs, targets })
        })
        .collect::<Result<_>>()?;
    // (`sft_example` keeps the prompt's end and the response's start, at least one of its tokens)
    cuts.report_kept(
        location,
        examples.len(),
        &format!("a prompt and response longer than train.seq_len = {seq_len} tokens together"),
        "keep the prompt's last tokens and as much of the response as fits after them (at least its first token)",
    );
    Ok(examples)
}

/// Prompt/response pairs (the SFT JSONL) for an encoder-decoder: prompts keep their first
/// `max_prompt` tokens, responses (ended by `eot` when given) their first `max_response`.
pub fn load_pairs(location: &str, tokenizer: &Tokenizer, max_prompt: usize, max_response: usize, eot: Option<u32>) -> Result<Vec<PairExample>> {
    let (mut long_prompts, mut long_responses) = (Cuts::default(), Cuts::default());
    let examples: Vec<PairExample> = jsonl(location)?
        .into_iter()
        .map(|(n, m)| {
            let p = string_field(&m, "prompt", location, n)?;
            let r = string_field(&m, "response", location, n)?;
            let mut prompt = tokenizer.encode(p).with_context(|| format!("{location} line {n}: field \"prompt\""))?;
            let mut response = tokenizer.encode(r).with_context(|| format!("{location} line {n}: field \"response\""))?;
            if prompt.is_empty() {
                bail!("{location} line {n}: field \"prompt\" is empty: the encoder has nothing to read");
            }
            if response.is_empty() {
                bail!("{location} line {n}: field \"response\" is empty: nothing to learn");
            }
            response.extend(eot);
            long_prompts.note(prompt.len(), max_prompt);
            long_responses.note(response.len(), max_response);
            prompt.truncate(max_prompt);
            response.truncate(max_response);
            Ok(PairExample { prompt, response })
        })
        .collect::<Result<_>>()?;
    long_prompts.report(location, examples.len(), &format!("a prompt longer than the encoder's {max_prompt} tokens"));
    long_responses.report(location, examples.len(), &format!("a response longer than the decoder's {max_response} tokens"));
    Ok(examples)
}

/// Example `i` of `n` is held out for validation iff floor((i+1)k/n) > floor(ik/n), with
/// k = round(n * fraction): k examples evenly spread, the same rule as corpus validation splits.
pub fn is_validation(i: usize, n: usize, fraction: f64) -> bool {
    let k = ((n as f64) * fraction).round() as usize;
    (i + 1) * k / n > i * k / n
}

/// Splits examples into (train, validation) by [`is_validation`].
pub fn split<T>(examples: Vec<T>, fraction: f64) -> (Vec<T>, Vec<T>) {
    let n = examples.len();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if is_validation(i, n, fraction) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    if fraction > 0.0 && val.is_empty() {
        // round(n * fraction) = 0: the run would report no validation at all, silently
        tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, "finetune.val_fraction = {fraction} of {n} examples holds none out: this run has no validation (more examples, or finetune.val_data)");
    }
    (train, val)
}

/// Warns when every training example has the same label: the head would learn to give that
/// answer whatever the text (a labelling mistake, or data sorted by label and cut short).
pub fn warn_if_one_class(train: &[ClassExample], num_labels: usize) {
    let Some(first) = train.first() else { return };
    if num_labels > 1 && train.len() > 1 && train.iter().all(|e| e.label == first.label) {
        tracing::warn!(
            target: smelt_proto::JOB_WARNING_TARGET,
            "finetune.data: all {} training examples have label {}: the head learns to answer {} whatever the text (check the labels)",
            train.len(),
            first.label,
            first.label
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::backend::IGNORE_INDEX;

    fn write(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, text).unwrap();
        let s = p.to_str().unwrap().to_string();
        (dir, s)
    }

    /// What `f` logs (at warn and above), as text.
    fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_ansi(false).with_writer(move || out.clone()).finish();
        let r = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (r, text)
    }

    /// A missing file named by a relative path says whose directory it was looked for in.
    #[test]
    fn a_missing_relative_file_names_the_workers_directory() {
        let e = format!("{:#}", load_classification("no-such-dir/train.jsonl", &Tokenizer::Byte, 2, 8).unwrap_err());
        let cwd = std::env::current_dir().unwrap().display().to_string();
        assert!(e.contains(&format!("reading no-such-dir/train.jsonl (relative to the working directory {cwd} on ")), "{e}");
        let e = format!("{:#}", load_classification("/no-such-dir/train.jsonl", &Tokenizer::Byte, 2, 8).unwrap_err());
        assert!(e.contains(", in a job the worker's machine)"), "{e}");
    }

    /// A file that starts with a UTF-8 byte-order mark reads as the same examples.
    #[test]
    fn a_byte_order_mark_is_left_out() {
        let lines = "{\"text\": \"abc\", \"label\": 1}\n{\"text\": \"de\", \"label\": 0}\n";
        let (_d, plain) = write(lines);
        let (_e, marked) = write(&format!("\u{feff}{lines}"));
        let a = load_classification(&plain, &Tokenizer::Byte, 2, 8).unwrap();
        let b = load_classification(&marked, &Tokenizer::Byte, 2, 8).unwrap();
        assert_eq!(a, b);
    }

    /// A validation fraction too small for the examples holds none out: said, not silent.
    #[test]
    fn a_fraction_that_holds_nothing_out_is_warned_about() {
        let ((train, val), warned) = warnings_of(|| split(vec![1, 2], 0.2));
        assert_eq!((train.len(), val.len()), (2, 0));
        assert!(warned.contains("finetune.val_fraction = 0.2 of 2 examples holds none out"), "{warned}");
        let ((_, val), quiet) = warnings_of(|| split(vec![1, 2, 3, 4, 5], 0.2));
        assert_eq!(val, vec![5]);
        assert!(quiet.is_empty(), "{quiet}");
    }

    /// Training examples of one label only are warned about; two labels, nothing said.
    #[test]
    fn training_examples_of_one_label_are_warned_about() {
        let ex = |label| ClassExample { ids: vec![1], label };
        let ((), warned) = warnings_of(|| warn_if_one_class(&[ex(1), ex(1), ex(1)], 2));
        assert!(warned.contains("all 3 training examples have label 1"), "{warned}");
        let ((), quiet) = warnings_of(|| warn_if_one_class(&[ex(1), ex(0), ex(1)], 2));
        assert!(quiet.is_empty(), "{quiet}");
    }

    /// Examples cut to fit are counted and the run says so once; none cut, nothing said.
    #[test]
    fn examples_cut_to_fit_are_warned_about() {
        let tok = Tokenizer::Byte;
        let (_d, p) = write("{\"text\": \"abc\", \"label\": 1}\n{\"text\": \"abcdef\", \"label\": 0}\n");
        let (ex, warned) = warnings_of(|| load_classification(&p, &tok, 2, 4).unwrap());
        assert_eq!(ex.len(), 2);
        assert!(warned.contains("1 of 2 examples have a text longer than train.seq_len = 4 tokens") && warned.contains("the longest has 6 tokens"), "{warned}");
        let (_, quiet) = warnings_of(|| load_classification(&p, &tok, 2, 6).unwrap());
        assert!(quiet.is_empty(), "{quiet}");
        let (_d, p) = write("{\"prompt\": \"abcdef\", \"response\": \"xy\"}\n");
        let (_, warned) = warnings_of(|| load_pairs(&p, &tok, 4, 8, None).unwrap());
        assert!(warned.contains("1 of 1 examples have a prompt longer than the encoder's 4 tokens"), "{warned}");
        assert!(!warned.contains("a response"), "{warned}");
        // a decoder's prompt and response: the prompt's end is what is kept, and it says so
        let (_d, p) = write("{\"prompt\": \"abcdefgh\", \"response\": \"xy\"}\n");
        let (ex, warned) = warnings_of(|| load_sft(&p, &tok, 6, None).unwrap());
        assert!(warned.contains("1 of 1 examples have a prompt and response longer than train.seq_len = 6") && warned.contains("keep the prompt's last tokens"), "{warned}");
        let ids = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
        assert_eq!(ex[0].inputs, ids("cdefgh"), "the prompt's end");
        assert_eq!(ex[0].targets[5], u32::from(b'x'), "predicting the response's first token");
    }

    #[test]
    fn classification_lines_and_their_errors() {
        let tok = Tokenizer::Byte;
        let (_d, p) = write("{\"text\": \"abc\", \"label\": 1, \"id\": 7}\n\n{\"text\": \"abcdef\", \"label\": 0}\n");
        let ex = load_classification(&p, &tok, 2, 4).unwrap();
        assert_eq!(ex, vec![ClassExample { ids: vec![97, 98, 99], label: 1 }, ClassExample { ids: vec![97, 98, 99, 100], label: 0 }]);
        let err = |text: &str| {
            let (_d, p) = write(text);
            format!("{:#}", load_classification(&p, &tok, 2, 8).unwrap_err())
        };
        let e = err("{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"}\n");
        assert!(e.contains("line 2") && e.contains("missing field \"label\""), "{e}");
        let e = err("{\"label\": 0}\n");
        assert!(e.contains("line 1") && e.contains("missing field \"text\""), "{e}");
        let e = err("{\"text\": \"a\", \"label\": 2}\n");
        assert!(e.contains("is not a class: labels run from 0 to 1 (finetune.num_labels = 2)"), "{e}");
        let e = err("{\"text\": \"a\", \"label\": \"pos\"}\n");
        assert!(e.contains("must be an integer"), "{e}");
        let e = err("{\"text\": \"a\", \"label\": 1.0}\n");
        assert!(e.contains("must be an integer class index") && !e.contains("outside"), "{e}");
        let e = err("not json\n");
        assert!(e.contains("line 1") && e.contains("not JSON"), "{e}");
        let e = err("\n");
        assert!(e.contains("no examples"), "{e}");
        // A character the parent's tokenizer does not know names the field.
        let chars = Tokenizer::fit("char", "ab").unwrap();
        let (_d, p) = write("{\"text\": \"abz\", \"label\": 0}\n");
        let e = format!("{:#}", load_classification(&p, &chars, 2, 8).unwrap_err());
        assert!(e.contains("field \"text\"") && e.contains("'z'"), "{e}");
    }

    #[test]
    fn sft_lines_become_masked_windows() {
        let tok = Tokenizer::Byte;
        let (_d, p) = write("{\"prompt\": \"ab\", \"response\": \"c\"}\n");
        let ex = load_sft(&p, &tok, 8, Some(256)).unwrap();
        // tokens a b c <eot>: inputs a b c, targets (ignored) c <eot>
        assert_eq!(ex, vec![SftExample { inputs: vec![97, 98, 99], targets: vec![IGNORE_INDEX, 99, 256] }]);
        let (_d, p) = write("{\"prompt\": \"ab\"}\n");
        let e = format!("{:#}", load_sft(&p, &tok, 8, None).unwrap_err());
        assert!(e.contains("missing field \"response\""), "{e}");
    }

    #[test]
    fn validation_split_is_even_and_exact() {
        let (train, val) = split((0..10).collect::<Vec<_>>(), 0.2);
        assert_eq!(val, vec![4, 9]);
        assert_eq!(train.len(), 8);
        let (train, val) = split((0..5).collect::<Vec<_>>(), 0.0);
        assert_eq!((train.len(), val.len()), (5, 0));
    }
}
