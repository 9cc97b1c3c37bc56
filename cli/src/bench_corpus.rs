//! `smelt bench tokenize` and `smelt bench loader`: corpus-side speed, peers side by side.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rayon::prelude::*;
use serde_json::{json, Value};
use smelt_corpus::format::{sha256_hex, MANIFEST};
use smelt_corpus::{gpt2, rank_slice, CorpusReader, ReaderOptions, StoreDir};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
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

#[derive(Args, Debug)]
pub struct LoaderArgs {
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
    /// Also copy the corpus into memory:// and time that (an upper bound), when it is at most
    /// this many MiB (0: never).
    #[arg(long, default_value_t = 2048)]
    pub memory_max_mib: u64,
    #[arg(long)]
    pub json: bool,
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

/// Reads `steps` steps of `batch` sequences in sample order, prefetching `prefetch` steps ahead.
fn time_loader(uri: &str, a: &LoaderArgs) -> Result<Value> {
    let r = CorpusReader::open_with(uri, ReaderOptions::default())?;
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
        checksum = checksum.wrapping_add(x[0] as u64);
    }
    let secs = t.elapsed().as_secs_f64();
    let st = r.stats();
    let tokens = steps * a.batch * a.seq_len as u64;
    Ok(json!({
        "uri": uri,
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

pub fn loader(a: LoaderArgs) -> Result<()> {
    if a.batch == 0 || a.seq_len == 0 {
        bail!("--batch and --seq-len must be at least 1");
    }
    let main = time_loader(&a.corpus, &a)?;
    // memory:// upper bound: the same objects, copied into this process's memory
    let dir = StoreDir::open(&a.corpus)?;
    let m = smelt_corpus::reader::read_manifest(&dir)?;
    let total: u64 = m.train.shards.iter().map(|s| s.bytes).sum();
    let memory = if a.memory_max_mib > 0 && total <= a.memory_max_mib << 20 {
        let mem = StoreDir::open(&format!("memory://bench-loader-{}/corpus", std::process::id()))?;
        for s in &m.train.shards {
            mem.put(&s.name, dir.get(&s.name)?)?;
        }
        mem.put(MANIFEST, dir.get(MANIFEST)?)?;
        Some(time_loader(mem.uri(), &a)?)
    } else {
        None
    };
    let report = json!({
        "bench": "loader",
        "seq_len": a.seq_len,
        "batch": a.batch,
        "prefetch_steps": a.prefetch,
        "corpus_train_tokens": m.train.tokens,
        "store": main,
        "memory": memory,
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    let line = |name: &str, v: &Value| {
        println!(
            "  {name:<8} {:>12.0} tokens/s  ({} steps x {} x {} tokens in {:.3} s; waited {:.3} s; {:.0}% ready when asked; {} requests, {:.1} MiB)",
            v["tokens_per_s"].as_f64().unwrap(),
            v["steps"],
            a.batch,
            a.seq_len,
            v["seconds"].as_f64().unwrap(),
            v["wait_seconds"].as_f64().unwrap(),
            100.0 * v["ready_fraction"].as_f64().unwrap(),
            v["requests"],
            v["mib_fetched"].as_f64().unwrap()
        )
    };
    println!("loader, {} ({} train tokens), sample order, prefetch {} steps:", a.corpus, m.train.tokens, a.prefetch);
    line("store", &main);
    match &memory {
        Some(v) => line("memory://", v),
        None => println!("  memory:// not run (corpus over --memory-max-mib)"),
    }
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
