//! The spec's file and store locations checked for their form at submit (the workers would only
//! find out after taking the job): `data.text`, read from each worker's disk, takes a path, not
//! a URI; the others (corpora, stores, models, JSON-lines files) a path or a scheme the workers
//! open.

use crate::{err, JobSpec, SpecError};

/// The schemes `smelt_corpus::StoreDir` opens (http(s): the URLs of those clouds that
/// `object_store` recognises).
const STORE_SCHEMES: [&str; 11] = ["file", "memory", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "http", "https"];

/// The scheme of `s` (`s3` of `s3://b/x`), when it starts with one rather than being a path.
fn scheme_of(s: &str) -> Option<&str> {
    let s = s.trim();
    let i = s.find("://")?;
    (i > 1 && s[..i].chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')).then(|| &s[..i])
}

/// A file each worker reads from its own disk (a text, a JSON-lines file): a path.
fn local_file(field: &str, value: &str, instead: &str) -> Result<(), SpecError> {
    match scheme_of(value) {
        Some("file") => Err(err(field, format!("{value:?}: a path on each worker's disk; give it without file://"))),
        Some(s) => Err(err(field, format!("{value:?}: a path on each worker's disk, not a {s}:// URI{instead}"))),
        None => Ok(()),
    }
}

/// A store location (a corpus, a checkpoint store, a model): a path or a URI the workers open.
fn store(field: &str, value: &str) -> Result<(), SpecError> {
    match scheme_of(value) {
        Some(s) if !STORE_SCHEMES.contains(&s.to_ascii_lowercase().as_str()) => {
            Err(err(field, format!("{value:?}: unknown scheme {s}://; a store is s3://, gs://, az://, file:// or a path")))
        }
        _ => Ok(()),
    }
}

pub(crate) fn check(spec: &JobSpec) -> Result<(), SpecError> {
    let prepare = " (a text in object storage: `smelt corpus prepare` it there and set data.corpus)";
    if let Some(t) = &spec.data.text {
        local_file("data.text", t, prepare)?;
    }
    if let Some(c) = &spec.train.eval_choices {
        store("train.eval_choices", c)?;
    }
    if let Some(c) = &spec.data.corpus {
        store("data.corpus", c)?;
    }
    for (i, m) in spec.data.mix.iter().enumerate() {
        store(&format!("data.mix[{i}].corpus"), &m.corpus)?;
    }
    if let Some(s) = &spec.checkpoint.store {
        store("checkpoint.store", s)?;
    }
    if let Some(m) = &spec.model.init_from {
        store("model.init_from", m)?;
    }
    if let Some(f) = &spec.finetune {
        store("finetune.init_from", &f.init_from)?;
        store("finetune.data", &f.data)?;
        if let Some(v) = &f.val_data {
            store("finetune.val_data", v)?;
        }
    }
    Ok(())
}

/// A job name shown in tables and terminals: no control characters (a newline breaks a table's
/// rows, an escape sequence writes into an operator's terminal), at most [`MAX_NAME`] characters.
pub(crate) fn check_name(name: &str) -> Result<(), SpecError> {
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(err("name", format!("{name:?} holds the control character {c:?}: a name is shown in tables and terminals")));
    }
    let n = name.chars().count();
    if n > MAX_NAME {
        return Err(err("name", format!("{n} characters, more than {MAX_NAME}")));
    }
    Ok(())
}

pub const MAX_NAME: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_told_from_paths() {
        assert_eq!(scheme_of("s3://b/x"), Some("s3"));
        assert_eq!(scheme_of("file:///tmp/x"), Some("file"));
        assert_eq!(scheme_of("data/x.txt"), None);
        assert_eq!(scheme_of("C://x"), None, "one letter: a drive, not a scheme");
        assert!(store("checkpoint.store", "ftp://host/x").unwrap_err().message.contains("unknown scheme ftp://"));
        assert!(store("checkpoint.store", "s3://bucket/ckpt").is_ok());
        assert!(store("model.init_from", "job-000003").is_ok());
        let e = local_file("data.text", "s3://b/x.txt", "").unwrap_err();
        assert!(e.message.contains("a path on each worker's disk, not a s3:// URI"), "{}", e.message);
        assert!(local_file("data.text", "file:///tmp/x.txt", "").unwrap_err().message.contains("without file://"));
        assert!(check_name("a\nb").unwrap_err().message.contains("control character"));
        assert!(check_name("\u{1b}[31mRED").is_err());
        assert!(check_name(&"x".repeat(129)).unwrap_err().message.contains("129 characters"));
        assert!(check_name("pretrain: gpt2 — 124M").is_ok());
    }
}
