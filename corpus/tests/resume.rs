//! A rerun of `corpus prepare` keeps the shards an interrupted run finished.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use smelt_corpus::{prepare, NoProgress, ValSplit};

/// (inode, mtime ns) of every shard file: a rewrite (temp file + rename) changes the inode.
fn identity(dir: &Path, name: &str) -> (u64, i64) {
    let m = std::fs::metadata(dir.join(name)).unwrap();
    (m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000)
}

#[test]
fn interrupted_run_resumes_and_matches_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let input = vec![s(&dir.path().join("in"))];

    // reference: one uninterrupted run
    let fresh = dir.path().join("fresh");
    let mut o = opts(input.clone(), "gpt2", &s(&fresh), 40);
    o.val = ValSplit::Docs(2);
    let want = run(&o).manifest.unwrap();
    let n_shards = want.train.shards.len() + want.val.shards.len();
    assert!(n_shards >= 6, "{n_shards}");

    // interrupted after 3 shards
    let out = dir.path().join("out");
    o.out = s(&out);
    o.stop_after_shards = Some(3);
    let first = run(&o);
    assert!(!first.complete && first.manifest.is_none());
    assert_eq!(first.shards_written, 3);
    assert!(out.join("progress.json").exists() && !out.join("manifest.json").exists());
    let done: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    assert_eq!(done.len(), 3);
    let before: Vec<(String, (u64, i64))> = done.iter().map(|n| (n.clone(), identity(&out, n))).collect();
    // no reader accepts a corpus without a manifest
    assert!(smelt_corpus::CorpusReader::open(&s(&out)).unwrap_err().to_string().contains("manifest.json not found"));

    // the rerun keeps those 3 and writes the rest
    o.stop_after_shards = None;
    let second = run(&o);
    assert!(second.complete);
    assert_eq!(second.shards_kept, 3);
    assert_eq!(second.shards_written as usize, n_shards - 3);
    for (n, id) in &before {
        assert_eq!(&identity(&out, n), id, "{n} was rewritten");
    }
    let got = second.manifest.unwrap();
    assert_eq!(got.train, want.train);
    assert_eq!(got.val, want.val);
    assert!(!out.join("progress.json").exists());

    // a rerun after success does nothing
    let third = run(&o);
    assert!(third.complete && third.shards_written == 0);
    assert_eq!(third.shards_kept as usize, n_shards);

    // another setting is refused, naming what differs
    o.shard_tokens = 41;
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("already holds a finished corpus") && e.contains("shard tokens 40 vs 41"), "{e}");
}

#[test]
fn damaged_shards_of_an_interrupted_run_are_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let fresh = dir.path().join("fresh");
    let mut o = opts(vec![s(&dir.path().join("in"))], "byte", &s(&fresh), 100);
    let want = run(&o).manifest.unwrap();

    let out = dir.path().join("out");
    o.out = s(&out);
    o.stop_after_shards = Some(4);
    run(&o);
    // shard 1 damaged, shard 3 deleted: 0 is kept; 1 and 3 rewritten; 2 recomputed, found
    // identical to what is stored, and kept
    let p1 = out.join("shard-00001.bin");
    let mut b = std::fs::read(&p1).unwrap();
    b[40] ^= 1;
    std::fs::write(&p1, b).unwrap();
    std::fs::remove_file(out.join("shard-00003.bin")).unwrap();
    let id0 = identity(&out, "shard-00000.bin");
    let id2 = identity(&out, "shard-00002.bin");
    o.stop_after_shards = None;
    let r = run(&o);
    assert_eq!(r.shards_kept, 2);
    assert_eq!(r.shards_written as usize, want.train.shards.len() - 2);
    assert_eq!(identity(&out, "shard-00000.bin"), id0);
    assert_eq!(identity(&out, "shard-00002.bin"), id2);
    assert_eq!(r.manifest.unwrap().train, want.train);

    // a partial corpus from other inputs is not mixed with this one
    let out2 = dir.path().join("out2");
    o.out = s(&out2);
    o.stop_after_shards = Some(1);
    run(&o);
    write(&dir.path().join("in/doc99.txt"), "one more document");
    o.stop_after_shards = None;
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("partial corpus") && e.contains("input files"), "{e}");
}

/// Sizes of the shards an interrupted run left in `out`.
fn shard_bytes(out: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().unwrap().ends_with(".bin"))
        .map(|e| (e.file_name().into_string().unwrap(), e.metadata().unwrap().len()))
        .collect();
    v.sort();
    v
}

#[test]
fn resume_checks_size_and_etag_without_reading_shards() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let input = vec![s(&dir.path().join("in"))];
    let want = run(&opts(input.clone(), "byte", &s(&dir.path().join("fresh")), 100)).manifest.unwrap();
    let interrupted = |name: &str| {
        let out = dir.path().join(name);
        let mut o = opts(input.clone(), "byte", &s(&out), 100);
        o.stop_after_shards = Some(4);
        assert_eq!(run(&o).shards_written, 4);
        o.stop_after_shards = None;
        (out, o)
    };

    // size + ETag from one listing: no shard byte read, all 4 kept
    let (out, o) = interrupted("cheap");
    let r = run(&o);
    assert_eq!((r.shards_kept, r.resume_bytes_read), (4, 0));
    assert_eq!(r.manifest.unwrap().train, want.train);

    // --verify reads each kept shard whole and checks its sha256
    let (out2, mut o2) = interrupted("verify");
    let kept: u64 = shard_bytes(&out2).iter().map(|(_, n)| n).sum();
    o2.verify_resumed = true;
    let r = run(&o2);
    assert_eq!((r.shards_kept, r.resume_bytes_read), (4, kept));

    // a shard whose size differs is redone; so is one rewritten in place at the same size
    // (its ETag changed); the others are kept unread
    let (out3, o3) = interrupted("damaged");
    let p1 = out3.join("shard-00001.bin");
    let b = std::fs::read(&p1).unwrap();
    std::fs::write(&p1, &b[..b.len() - 2]).unwrap();
    let p2 = out3.join("shard-00002.bin");
    let mut b = std::fs::read(&p2).unwrap();
    b[40] ^= 1;
    std::fs::write(&p2, &b).unwrap();
    let id3 = identity(&out3, "shard-00003.bin");
    let r = run(&o3);
    // 0 kept; 1 and 2 rewritten; 3 recomputed identical and kept (never read)
    assert_eq!((r.shards_kept, r.resume_bytes_read), (2, 0));
    assert_eq!(identity(&out3, "shard-00003.bin"), id3);
    assert_eq!(r.manifest.unwrap().train, want.train);
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(dir.path().join("fresh/shard-00001.bin")).unwrap());
    assert_eq!(std::fs::read(&p2).unwrap(), std::fs::read(dir.path().join("fresh/shard-00002.bin")).unwrap());

    // a progress file without ETags (an older run, or a store that gives none): each header
    // (32 bytes) is read and compared instead
    let (out4, o4) = interrupted("no-etags");
    let pj = out4.join("progress.json");
    let mut p: serde_json::Value = serde_json::from_slice(&std::fs::read(&pj).unwrap()).unwrap();
    let mut stripped = 0;
    for r in p["train"].as_array_mut().unwrap() {
        stripped += r.as_object_mut().unwrap().remove("e_tag").is_some() as usize;
    }
    assert_eq!(stripped, 4, "every record had an ETag");
    std::fs::write(&pj, serde_json::to_vec(&p).unwrap()).unwrap();
    let r = run(&o4);
    assert_eq!((r.shards_kept, r.resume_bytes_read), (4, 4 * 32));
    drop(out);
}

/// A rerun of a finished corpus checks its shards against the manifest: one cut short or gone
/// (by the listing's sizes), or with `verify_resumed` one whose bytes changed (sha256), is
/// named, and the rerun fails instead of reporting the corpus as kept; then another setting is
/// named by its option.
#[test]
fn a_finished_corpus_whose_shards_changed_is_not_reported_as_kept() {
    let dir = tempfile::tempdir().unwrap();
    txt_dir(&dir.path().join("in"), &documents());
    let out = dir.path().join("out");
    let mut o = opts(vec![s(&dir.path().join("in"))], "gpt2", &s(&out), 40);
    o.val = ValSplit::Docs(2);
    let m = run(&o).manifest.unwrap();
    let (first, second) = (&m.train.shards[0], &m.train.shards[1]);

    // a byte flipped in place: the size is unchanged, so only a verifying rerun sees it
    let path = out.join(&first.name);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(run(&o).complete, "the listing's sizes still match");
    o.verify_resumed = true;
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains(&format!("{}: its sha256 does not match", first.name)) && e.contains("1 of"), "{e}");

    // cut short, and removed: both named without reading a shard
    o.verify_resumed = false;
    std::fs::write(&path, &bytes[..100]).unwrap();
    std::fs::remove_file(out.join(&second.name)).unwrap();
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains(&format!("{}: 100 bytes, the manifest says {}", first.name, first.bytes)), "{e}");
    assert!(e.contains(&format!("{}: missing", second.name)) && e.contains("2 of") && e.contains("prepare again"), "{e}");

    o.val = ValSplit::Fraction(0.5);
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("--val-docs 2 vs --val-fraction 0.5"), "{e}");
}

/// An input edited in place keeps its name and often its size: the rerun sees its modification
/// time and refuses the old corpus, rather than report its shards kept (it trained on the old
/// text). A manifest from before the times were recorded still resumes.
#[test]
fn an_input_edited_in_place_is_not_taken_for_the_one_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    write(&input, "First Citizen: before we proceed any further, hear me speak.");
    let out = dir.path().join("out");
    let mut o = opts(vec![s(&input)], "gpt2", &s(&out), 40);
    o.val = ValSplit::None;
    assert!(run(&o).manifest.is_some());
    assert!(run(&o).complete, "unchanged: kept");
    // the same size, other text, a later time
    write(&input, "tsriF Citizen: before we proceed any further, hear me speak.");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&input).unwrap().set_modified(later).unwrap();
    let e = prepare(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("modification times"), "{e}");
    // a manifest written before modification times were recorded: names and sizes decide
    let manifest = out.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for src in m["settings"]["sources"].as_array_mut().unwrap() {
        src.as_object_mut().unwrap().remove("modified_ms").expect("recorded");
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(run(&o).complete, "an older manifest resumes on names and sizes");
}
