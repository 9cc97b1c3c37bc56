//! `smelt bench tokenize` and `smelt bench loader`: corpus-side speed, peers side by side; the
//! loader from the given store, an S3-protocol server on loopback and memory://, in one command.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rayon::prelude::*;
use serde_json::{json, Value};
use smelt_corpus::format::{sha256_hex, MANIFEST};
use smelt_corpus::loopback::S3Loopback;
use smelt_corpus::ranges::Coalesce;
use smelt_corpus::{gpt2, rank_slice, CorpusReader, ReaderOptions, StoreDir};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// A UTF-8 text file.
    #[arg(long)]
    pub input: PathBuf,
    /// Timed repetitions (best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Skip the tiktoken (Python) peer.
    #[arg(long)]
    pub no_peer: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct LoaderArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// A prepared corpus (local path, file://, memory://, s3://, ...).
    #[arg(long)]
    pub corpus: String,
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    pub batch: u64,
    /// Steps to time (at most one epoch).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Steps prefetched ahead.
    #[arg(long, default_value_t = 2)]
    pub prefetch: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ways of reading to time, each on every store: `whole` (whole shards held in memory, the
    /// default for a split within --whole-max-mib), `coalesced` (ranged GETs, a step's ranges
    /// merged), `single` (one ranged GET per sequence: the reader before coalescing),
    /// `cached` (coalesced ranged GETs through the local-disk shard cache, whole-shard limit 0,
    /// starting cold: shards downloaded in the background while the steps read ranges),
    /// `cached-warm` (the same with every shard in the cache first, untimed). The cache applies
    /// to remote stores only (s3-loopback, memory); on a local store these read ranges.
    #[arg(long, value_delimiter = ',', default_value = "whole,coalesced,single")]
    pub modes: Vec<LoaderMode>,
    /// The shard cache directory of the `cached` modes (emptied per store before they run);
    /// default: a temporary directory, removed afterwards.
    #[arg(long)]
    pub disk_cache: Option<PathBuf>,
    /// The reader's whole-shard limit for the `whole` mode, MiB.
    #[arg(long, default_value_t = 256)]
    pub whole_max_mib: u64,
    /// GETs in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// `coalesced` mode: ranges of a shard at most this many KiB apart are read in one GET.
    #[arg(long, default_value_t = 64)]
    pub max_gap_kib: u64,
    /// `coalesced` mode: the longest merged GET, MiB.
    #[arg(long, default_value_t = 16)]
    pub max_get_mib: u64,
    /// Also copy the corpus into an S3-protocol server started in this process on 127.0.0.1
    /// (s3s + s3s-fs, uploaded through the S3 API) and into memory:// (an upper bound: no I/O),
    /// and time those too, when it is at most this many MiB (0: never).
    #[arg(long, default_value_t = 2048)]
    pub memory_max_mib: u64,
    /// Skip the S3 loopback server.
    #[arg(long)]
    pub no_s3_loopback: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoaderMode {
    Whole,
    Coalesced,
    Single,
    Cached,
    CachedWarm,
}

impl LoaderMode {
    fn name(self) -> &'static str {
        match self {
            LoaderMode::Whole => "whole",
            LoaderMode::Coalesced => "coalesced",
            LoaderMode::Single => "single",
            LoaderMode::Cached => "cached",
            LoaderMode::CachedWarm => "cached-warm",
        }
    }
    fn options(self, a: &LoaderArgs) -> ReaderOptions {
        let base = ReaderOptions { concurrency: a.concurrency, whole_split_max_bytes: 0, ..ReaderOptions::default() };
        match self {
            LoaderMode::Whole => ReaderOptions { whole_split_max_bytes: a.whole_max_mib << 20, ..base },
            LoaderMode::Coalesced => ReaderOptions { coalesce: Some(Coalesce { max_gap: a.max_gap_kib << 10, max_len: (a.max_get_mib << 20).max(1) }), ..base },
            LoaderMode::Single => ReaderOptions { coalesce: None, ..base },
            LoaderMode::Cached | LoaderMode::CachedWarm => ReaderOptions {
                coalesce: Some(Coalesce { max_gap: a.max_gap_kib << 10, max_len: (a.max_get_mib << 20).max(1) }),
                disk_cache: Some(a.disk_cache.clone().expect("set by loader()")),
                ..base
            },
        }
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// tiktoken's `r50k_base.tiktoken`, rebuilt from the ranks smelt uses, so the Python peer runs
/// offline (tiktoken checks it against OpenAI's sha256 before using it).
fn r50k_ranks_file() -> Vec<u8> {
    let mut out = String::new();
    for rank in 0..gpt2::EOT {
        let bytes = gpt2::core().decode_bytes(&[rank]).expect("every rank below 50256 decodes");
        out.push_str(&base64(&bytes));
        out.push(' ');
        out.push_str(&rank.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// OpenAI's published sha256 of `r50k_base.tiktoken`.
const R50K_SHA256: &str = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930";

const PEER: &str = r#"
import sys, os, json, time, hashlib, array, shutil
path, offsets_path, reps, threads, ranks, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ:
    shutil.copy(ranks, os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
try:
    import tiktoken
except ImportError:
    print(json.dumps({"missing": "tiktoken is not installed (pip install tiktoken)"}))
    sys.exit(0)
data = open(path, "rb").read()
text = data.decode("utf-8")
enc = tiktoken.get_encoding("r50k_base")
enc.encode_ordinary("warm up")
best = 1e9
for _ in range(reps):
    t = time.perf_counter(); ids = enc.encode_ordinary(text); best = min(best, time.perf_counter() - t)
h = hashlib.sha256(array.array("I", ids).tobytes()).hexdigest()
offs = json.load(open(offsets_path))
chunks = [data[a:b].decode("utf-8") for a, b in zip(offs[:-1], offs[1:])]
bestp = 1e9
for _ in range(reps):
    t = time.perf_counter(); out = enc.encode_ordinary_batch(chunks, num_threads=threads); bestp = min(bestp, time.perf_counter() - t)
print(json.dumps({"version": tiktoken.__version__, "seconds": best, "tokens": len(ids), "sha256": h,
                  "parallel_seconds": bestp, "parallel_tokens": sum(len(x) for x in out)}))
"#;

fn ids_sha256(ids: &[u32]) -> String {
    let mut b = Vec::with_capacity(ids.len() * 4);
    for &i in ids {
        b.extend_from_slice(&i.to_le_bytes());
    }
    sha256_hex(&b)
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("{}: cannot read as UTF-8 text", a.input.display()))?;
    if text.is_empty() {
        bail!("{}: empty file", a.input.display());
    }
    let reps = a.repeat.max(1);
    let mb = text.len() as f64 / 1e6;
    let threads = rayon::current_num_threads();
    gpt2::encode("warm up"); // builds the encoder (not timed)

    let mut best = f64::INFINITY;
    let mut ids = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        ids = gpt2::encode(&text);
        best = best.min(t.elapsed().as_secs_f64());
    }
    // tiktoken-rs's own encoder (fancy-regex pre-tokenization) on one thread, for reference
    let mut best_ref = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let r = gpt2::encode_reference(&text);
        best_ref = best_ref.min(t.elapsed().as_secs_f64());
        if r != ids {
            bail!("smelt's GPT-2 encoder disagrees with tiktoken-rs on {}", a.input.display());
        }
    }
    // the parallel run: the same safe pieces `corpus prepare` would use
    let mut offsets = vec![0usize];
    while let Some(i) = gpt2::safe_split(&text, offsets.last().unwrap() + (64 << 10)) {
        offsets.push(i);
    }
    offsets.push(text.len());
    let pieces: Vec<&str> = offsets.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let mut best_par = f64::INFINITY;
    let mut par_tokens = 0;
    for _ in 0..reps {
        let t = Instant::now();
        let out: Vec<Vec<u32>> = pieces.par_iter().map(|p| gpt2::encode(p)).collect();
        best_par = best_par.min(t.elapsed().as_secs_f64());
        par_tokens = out.iter().map(Vec::len).sum();
    }
    if par_tokens != ids.len() {
        bail!("smelt: the parallel encoding gave {par_tokens} tokens, the whole-text one {}", ids.len());
    }
    let sha = ids_sha256(&ids);

    // the peer, in the same command, on the same file and pieces
    let peer: Value = if a.no_peer {
        json!({"skipped": "--no-peer"})
    } else {
        let tmp = std::env::temp_dir().join(format!("smelt-bench-tokenize-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let ranks = r50k_ranks_file();
        let ranks_ok = sha256_hex(&ranks) == R50K_SHA256;
        std::fs::write(tmp.join("r50k_base.tiktoken"), &ranks)?;
        std::fs::write(tmp.join("offsets.json"), serde_json::to_vec(&offsets)?)?;
        let out = Command::new("python3")
            .arg("-c")
            .arg(PEER)
            .arg(&a.input)
            .arg(tmp.join("offsets.json"))
            .arg(reps.to_string())
            .arg(threads.to_string())
            .arg(tmp.join("r50k_base.tiktoken"))
            .arg(&tmp)
            .output();
        let _ = std::fs::remove_dir_all(&tmp);
        match out {
            Err(e) => json!({"missing": format!("python3 cannot be run: {e}")}),
            Ok(o) if !o.status.success() => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().last().unwrap_or("").to_string();
                json!({"missing": format!("the tiktoken peer failed: {last}{}", if ranks_ok { "" } else { " (smelt's rebuilt r50k ranks did not match OpenAI's hash either)" })})
            }
            Ok(o) => serde_json::from_slice(&o.stdout).unwrap_or_else(|e| json!({"missing": format!("unreadable peer output: {e}")})),
        }
    };

    let smelt = json!({
        "mb_per_s_1_thread": mb / best,
        "mb_per_s_all_threads": mb / best_par,
        "mb_per_s_per_core": mb / best_par / threads as f64,
        "seconds_1_thread": best,
        "seconds_all_threads": best_par,
        "tokens": ids.len(),
        "tiktoken_rs_mb_per_s_1_thread": mb / best_ref,
    });
    let mut report = json!({
        "bench": "tokenize",
        "input": a.input.display().to_string(),
        "bytes": text.len(),
        "threads": threads,
        "pieces": pieces.len(),
        "repeat": reps,
        "smelt": smelt,
    });
    let peer_ok = peer.get("seconds").and_then(Value::as_f64).is_some();
    if peer_ok {
        let ps = peer["seconds"].as_f64().unwrap();
        let pp = peer["parallel_seconds"].as_f64().unwrap();
        report["tiktoken"] = json!({
            "version": peer["version"],
            "mb_per_s_1_thread": mb / ps,
            "mb_per_s_all_threads": mb / pp,
            "mb_per_s_per_core": mb / pp / threads as f64,
            "tokens": peer["tokens"],
        });
        report["ratio_1_thread"] = json!(ps / best);
        report["ratio_all_threads"] = json!(pp / best_par);
        report["identical_ids"] = json!(peer["sha256"].as_str() == Some(sha.as_str()) && peer["parallel_tokens"] == json!(ids.len()));
    } else {
        report["tiktoken"] = json!({"note": peer.get("missing").or(peer.get("skipped")).cloned().unwrap_or(peer.clone())});
    }
    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!("GPT-2 BPE, {} ({:.1} MB, {} tokens), best of {reps}, {threads} threads:", a.input.display(), mb, ids.len());
    println!(
        "  smelt     1 thread {:7.2} MB/s | {threads} threads {:7.2} MB/s ({:.2} MB/s per core)",
        mb / best,
        mb / best_par,
        mb / best_par / threads as f64
    );
    println!("  (tiktoken-rs, the Rust crate smelt takes its ranks from: 1 thread {:7.2} MB/s)", mb / best_ref);
    if peer_ok {
        let t = &report["tiktoken"];
        println!(
            "  tiktoken  1 thread {:7.2} MB/s | {threads} threads {:7.2} MB/s ({:.2} MB/s per core)   (Python tiktoken {})",
            t["mb_per_s_1_thread"].as_f64().unwrap(),
            t["mb_per_s_all_threads"].as_f64().unwrap(),
            t["mb_per_s_per_core"].as_f64().unwrap(),
            peer["version"].as_str().unwrap_or("?")
        );
        println!(
            "  smelt / tiktoken: {:.2}x on 1 thread, {:.2}x on {threads}; ids identical: {}",
            report["ratio_1_thread"].as_f64().unwrap(),
            report["ratio_all_threads"].as_f64().unwrap(),
            if report["identical_ids"] == json!(true) { "yes" } else { "NO" }
        );
    } else {
        println!("  tiktoken: not run — {}; smelt alone reported", report["tiktoken"]["note"].as_str().unwrap_or("unavailable"));
    }
    Ok(())
}

/// Reads `steps` steps of `batch` sequences in sample order, prefetching `prefetch` steps ahead,
/// as a worker does.
fn time_loader(dir: &StoreDir, name: &str, mode: LoaderMode, a: &LoaderArgs) -> Result<Value> {
    let mut opts = mode.options(a);
    if let Some(c) = &mut opts.disk_cache {
        // a cache per store (the same corpus on two stores would share one otherwise)
        *c = c.join(name);
        if mode == LoaderMode::Cached {
            let _ = std::fs::remove_dir_all(&c);
        }
    }
    let r = CorpusReader::open_dir(dir.clone(), opts)?;
    if mode == LoaderMode::CachedWarm {
        r.fill_disk_cache()?;
    }
    let order = r.sample_order(a.seq_len, a.seed)?;
    let steps = a.steps.min(order.n_sequences() / a.batch).max(1);
    let step_indices = |s: u64| -> Result<Vec<u64>> { Ok(rank_slice(s, a.batch, 0, 1)?.map(|k| order.sequence_at(k)).collect()) };
    let t = Instant::now();
    let mut checksum = 0u64;
    for s in 0..a.prefetch.min(steps) {
        r.prefetch(a.seq_len, step_indices(s)?);
    }
    for s in 0..steps {
        if s + a.prefetch < steps {
            r.prefetch(a.seq_len, step_indices(s + a.prefetch)?);
        }
        let (x, _) = r.batch(a.seq_len, &step_indices(s)?)?;
        // every token, in order: equal sums say equal batches across stores and modes
        checksum = x.iter().fold(checksum, |c, &v| c.wrapping_mul(31).wrapping_add(v as u64));
    }
    let secs = t.elapsed().as_secs_f64();
    let st = r.stats();
    let tokens = steps * a.batch * a.seq_len as u64;
    Ok(json!({
        "uri": dir.uri(),
        "mode": mode.name(),
        "whole_shards": r.whole_shards(),
        "disk_cache": r.disk_cache().map(|p| p.display().to_string()),
        "cached_shards": r.cached_shards(),
        "steps": steps,
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens as f64 / secs,
        "wait_seconds": st.wait_seconds,
        "ready_fraction": st.ready as f64 / st.sequences.max(1) as f64,
        "requests": st.requests,
        "mib_fetched": st.bytes_fetched as f64 / (1 << 20) as f64,
        "checksum": checksum,
    }))
}

/// Copies the corpus (manifest and train shards) from `from` to `to`.
fn copy_corpus(from: &StoreDir, to: &StoreDir, m: &smelt_corpus::Manifest) -> Result<()> {
    for s in &m.train.shards {
        to.put(&s.name, from.get(&s.name)?)?;
    }
    to.put(MANIFEST, from.get(MANIFEST)?)?;
    Ok(())
}

pub fn loader(a: LoaderArgs) -> Result<()> {
    if a.batch == 0 || a.seq_len == 0 {
        bail!("--batch and --seq-len must be at least 1");
    }
    if a.modes.is_empty() {
        bail!("--modes names no way of reading");
    }
    let dir = StoreDir::open(&a.corpus)?;
    let m = smelt_corpus::reader::read_manifest(&dir)?;
    let total: u64 = m.train.shards.iter().map(|s| s.bytes).sum();
    let copies = a.memory_max_mib > 0 && total <= a.memory_max_mib << 20;

    // the stores: as given; an S3-protocol server on loopback; memory:// (the bound)
    let mut stores: Vec<(&str, StoreDir)> = vec![("store", dir.clone())];
    let s3_root = std::env::temp_dir().join(format!("smelt-bench-loader-{}", std::process::id()));
    let server = if copies && !a.no_s3_loopback {
        let server = S3Loopback::start(&s3_root)?;
        server.create_bucket("bench")?;
        let s3 = server.dir("bench", "corpus")?;
        copy_corpus(&dir, &s3, &m).context("uploading the corpus to the S3 loopback server")?;
        stores.push(("s3-loopback", s3));
        Some(server)
    } else {
        None
    };
    if copies {
        let mem = StoreDir::open(&format!("memory://bench-loader-{}/corpus", std::process::id()))?;
        copy_corpus(&dir, &mem, &m)?;
        stores.push(("memory", mem));
    }
    let temp_cache = a.disk_cache.is_none().then(|| std::env::temp_dir().join(format!("smelt-bench-loader-cache-{}", std::process::id())));
    let a = LoaderArgs { disk_cache: a.disk_cache.clone().or(temp_cache.clone()), ..a };
    let mut runs = Vec::new();
    let mut failed = None;
    'all: for (name, store) in &stores {
        // untimed: open the store's connections (and warm its caches) before the timed runs
        let warm = LoaderArgs { steps: a.steps.min(4), seed: a.seed.wrapping_add(1), modes: vec![LoaderMode::Single], ..a.clone() };
        if let Err(e) = time_loader(store, name, LoaderMode::Single, &warm) {
            failed = Some(e.context(format!("{name} ({}), warming up", store.uri())));
            break 'all;
        }
        for &mode in &a.modes {
            match time_loader(store, name, mode, &a) {
                Ok(mut v) => {
                    v["store"] = json!(name);
                    runs.push(v);
                }
                Err(e) => {
                    failed = Some(e.context(format!("{name} ({}), {} mode", store.uri(), mode.name())));
                    break 'all;
                }
            }
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&s3_root);
    if let Some(t) = &temp_cache {
        let _ = std::fs::remove_dir_all(t);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let same = runs.windows(2).all(|w| w[0]["checksum"] == w[1]["checksum"]);
    if !same {
        bail!("the stores and modes handed out different batches: {}", serde_json::to_string(&runs)?);
    }
    let report = json!({
        "bench": "loader",
        "corpus": a.corpus,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "prefetch_steps": a.prefetch,
        "concurrency": a.concurrency,
        "max_gap_kib": a.max_gap_kib,
        "max_get_mib": a.max_get_mib,
        "corpus_train_tokens": m.train.tokens,
        "corpus_train_shards": m.train.shards.len(),
        "runs": runs,
        "copies": if copies { "made" } else { "corpus over --memory-max-mib: s3-loopback and memory not run" },
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "loader, {} ({} train tokens in {} shards), sample order, {} x {} tokens per step, prefetch {} steps, {} GETs in flight, coalescing gaps <= {} KiB into GETs <= {} MiB:",
        a.corpus,
        m.train.tokens,
        m.train.shards.len(),
        a.batch,
        a.seq_len,
        a.prefetch,
        a.concurrency,
        a.max_gap_kib,
        a.max_get_mib
    );
    for v in &runs {
        println!(
            "  {:<12} {:<10} {:>12.0} tokens/s  ({} steps in {:.3} s; waited {:.3} s; {:.0}% ready when asked; {} requests, {:.1} MiB)",
            v["store"].as_str().unwrap_or("?"),
            v["mode"].as_str().unwrap_or("?"),
            v["tokens_per_s"].as_f64().unwrap(),
            v["steps"],
            v["seconds"].as_f64().unwrap(),
            v["wait_seconds"].as_f64().unwrap(),
            100.0 * v["ready_fraction"].as_f64().unwrap(),
            v["requests"],
            v["mib_fetched"].as_f64().unwrap()
        );
    }
    if !copies {
        println!("  s3-loopback and memory:// not run (corpus over --memory-max-mib)");
    }
    println!("  every store and mode handed out the same batches (checksum {})", runs[0]["checksum"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn rebuilt_ranks_are_openais_file() {
        assert_eq!(sha256_hex(&r50k_ranks_file()), R50K_SHA256);
    }
}
