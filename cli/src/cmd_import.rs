//! `smelt import hf <dir> <out>`: a Hugging Face GPT-2 (`GPT2LMHeadModel` / `GPT2Model`
//! safetensors, e.g. the Hub's `gpt2` .. `gpt2-xl` downloaded with `huggingface-cli download`)
//! as a smelt model file, which `smelt sample`, `smelt export` and a job's `init_from` read: a
//! fine-tuning job starts from it, a pretraining job continues from it. Reading and checking
//! are in `import_hf.rs`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use smelt_worker::model_file;
use tracing::info;

// Live beside this file (cli/src/import_hf.rs, hf_neox.rs), declared here so main.rs needs no entry.
#[path = "hf_neox.rs"]
pub(crate) mod hf_neox;
#[path = "import_hf.rs"]
mod import_hf;

#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// A Hugging Face transformers GPT-2 directory (config.json + model.safetensors, or shards
    /// with model.safetensors.index.json; vocab.json / tokenizer.json) as a smelt model file;
    /// or a GPT-NeoX one (sequential residuals, full rotary) as a rotary GPT. A directory
    /// `smelt export hf` wrote imports too (its smelt_tokenizer.json gives the tokenizer).
    Hf(HfImportArgs),
}

#[derive(Args, Debug)]
pub struct HfImportArgs {
    /// The directory (as `save_pretrained` writes it or the Hub publishes it).
    pub dir: PathBuf,
    /// The smelt model file to write (`model.safetensors`).
    pub out: PathBuf,
    /// The tokenizer, when the directory has no tokenizer files: gpt2 or byte. A GPT-2
    /// vocab.json / tokenizer.json is checked against smelt's GPT-2 BPE either way.
    #[arg(long)]
    pub tokenizer: Option<String>,
}

pub fn run(c: ImportCommand) -> Result<()> {
    match c {
        ImportCommand::Hf(a) => import(&a),
    }
}

fn import(a: &HfImportArgs) -> Result<()> {
    let m = import_hf::read_gpt2(&a.dir, a.tokenizer.as_deref()).with_context(|| format!("importing {}", a.dir.display()))?;
    let source = std::fs::canonicalize(&a.dir).unwrap_or_else(|_| a.dir.clone()).display().to_string();
    model_file::save(&a.out, &m.config, &m.tokenizer, &m.params, &[("imported_from", source)])?;
    info!(
        from = %a.dir.display(),
        out = %a.out.display(),
        layers = m.config.n_layer,
        width = m.config.n_embd,
        vocab = m.config.vocab_size,
        positions = m.config.block_size,
        tokenizer = m.tokenizer.kind(),
        tokenizer_from = %m.tokenizer_source,
        dtypes = ?m.dtypes,
        rotary = m.config.positions == smelt_engine::model::GptPositions::Rotary,
        "imported a hugging face model"
    );
    println!("{}", a.out.display());
    Ok(())
}
