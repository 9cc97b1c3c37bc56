//! A record of the sample indices each rank trains on, for tests that check a resumed run sees
//! exactly the data an uninterrupted one would: with `SMELT_SAMPLE_LOG=<dir>` set, rank r of
//! job J appends `<attempt> <step> <index> <index> ...` per step to `<dir>/<J>.rank<r>.log`.

use std::io::Write;
use std::path::PathBuf;

pub const ENV: &str = "SMELT_SAMPLE_LOG";

pub struct SampleLog {
    file: Option<std::fs::File>,
    attempt: u32,
}

impl SampleLog {
    pub fn from_env(job_id: &str, rank: u32, attempt: u32) -> SampleLog {
        let file = std::env::var_os(ENV).and_then(|dir| {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).ok()?;
            let path = dir.join(format!("{job_id}.rank{rank}.log"));
            std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
        });
        SampleLog { file, attempt }
    }

    pub fn record(&mut self, step: u64, indices: &[u64]) {
        if let Some(f) = self.file.as_mut() {
            let mut line = format!("{} {step}", self.attempt);
            for i in indices {
                line.push_str(&format!(" {i}"));
            }
            line.push('\n');
            let _ = f.write_all(line.as_bytes());
        }
    }
}
