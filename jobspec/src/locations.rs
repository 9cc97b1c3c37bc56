//! The spec's file and store locations, listed once ([`JobSpec::locations`]) for everyone that
//! looks at them: checked for their form at submit (the workers would only find out after taking
//! the job): `data.text`, read from each worker's disk, takes a path, not a URI; the others
//! (corpora, stores, models, JSON-lines files) a path or a scheme the workers open. `smelt up`
//! checks from the same list that the paths it will hand its workers exist.

use crate::{err, JobSpec, SpecError};

/// The schemes `smelt_corpus::StoreDir` opens (http(s): the URLs of those clouds that
/// `object_store` recognises).
const STORE_SCHEMES: [&str; 11] = ["file", "memory", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "http", "https"];

/// The scheme of `s` (`s3` of `s3://b/x`), when it starts with one rather than being a path.
/// (`smelt_corpus::store::has_scheme` tells the same; the corpus crate does not depend on this one.)
pub fn scheme_of(s: &str) -> Option<&str> {
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

/// How a location of the spec is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocationKind {
    /// Read from each worker's own disk: a path, never a URI (`data.text`).
    WorkerFile,
    /// Read: a path, a store URI, or (for models) a job id.
    Input,
    /// Written: a path or a store URI that need not exist yet (`checkpoint.store`).
    Output,
}

/// One location of a spec: its field (`data.mix[1].corpus`), its value, how it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub field: String,
    pub value: String,
    pub kind: LocationKind,
}

impl Location {
    /// A path on this machine that must exist before the job can run: read (not written), and
    /// neither a URI nor a job id (`looks_like_job_id` is the checkpoint crate's, passed in).
    pub fn local_input(&self, looks_like_job_id: impl Fn(&str) -> bool) -> Option<&str> {
        let v = self.value.trim();
        (self.kind != LocationKind::Output && !v.is_empty() && scheme_of(v).is_none() && !looks_like_job_id(v)).then_some(v)
    }
}

impl JobSpec {
    /// Every file or store location the spec names, in the order of its sections. A new field
    /// naming a location belongs here: submit checks its form and `smelt up` its existence.
    pub fn locations(&self) -> Vec<Location> {
        let mut out = Vec::new();
        let mut add = |field: String, value: &str, kind| out.push(Location { field, value: value.to_string(), kind });
        if let Some(t) = &self.data.text {
            add("data.text".into(), t, LocationKind::WorkerFile);
        }
        if let Some(c) = &self.data.corpus {
            add("data.corpus".into(), c, LocationKind::Input);
        }
        for (i, m) in self.data.mix.iter().enumerate() {
            add(format!("data.mix[{i}].corpus"), &m.corpus, LocationKind::Input);
        }
        if let Some(c) = &self.train.eval_choices {
            add("train.eval_choices".into(), c, LocationKind::Input);
        }
        if let Some(m) = &self.model.init_from {
            add("model.init_from".into(), m, LocationKind::Input);
        }
        if let Some(f) = &self.finetune {
            add("finetune.init_from".into(), &f.init_from, LocationKind::Input);
            add("finetune.data".into(), &f.data, LocationKind::Input);
            if let Some(v) = &f.val_data {
                add("finetune.val_data".into(), v, LocationKind::Input);
            }
        }
        if let Some(s) = &self.checkpoint.store {
            add("checkpoint.store".into(), s, LocationKind::Output);
        }
        out
    }
}

pub(crate) fn check(spec: &JobSpec) -> Result<(), SpecError> {
    let prepare = " (a text in object storage: `smelt corpus prepare` it there and set data.corpus)";
    for l in spec.locations() {
        match l.kind {
            LocationKind::WorkerFile => local_file(&l.field, &l.value, prepare)?,
            LocationKind::Input | LocationKind::Output => store(&l.field, &l.value)?,
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

    #[test]
    fn every_location_is_listed_with_how_it_is_used() {
        let spec = JobSpec::parse(
            r#"
name = "mix"
[model]
init_from = "job-000002"
[train]
steps = 10
global_batch = 8
micro_batch = 8
seq_len = 16
lr = 1e-3
[[data.mix]]
corpus = "corpora/web"
weight = 3.0
[[data.mix]]
corpus = "s3://bucket/code"
weight = 1.0
[checkpoint]
store = "ckpt"
every = 5
"#,
        )
        .unwrap();
        let locations = spec.locations();
        let listed: Vec<_> = locations.iter().map(|l| (l.field.as_str(), l.value.as_str(), l.kind)).collect();
        assert_eq!(
            listed,
            [
                ("data.mix[0].corpus", "corpora/web", LocationKind::Input),
                ("data.mix[1].corpus", "s3://bucket/code", LocationKind::Input),
                ("model.init_from", "job-000002", LocationKind::Input),
                ("checkpoint.store", "ckpt", LocationKind::Output),
            ]
        );
        let job_id = |s: &str| s.starts_with("job-");
        let local: Vec<_> = locations.iter().filter_map(|l| l.local_input(job_id).map(str::to_string)).collect();
        assert_eq!(local, ["corpora/web"], "a URI, a job id and the store written are not files to find");
    }
}
